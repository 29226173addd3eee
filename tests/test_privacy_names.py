"""The privacy ledger names what it logs: q (a probability), the sample size and the population, never
a cohort size under the name of a rate."""
import types

import numpy as np
import pytest

from fedjax_llm.validation import validate
from fedjax_llm.secure.privacy import Privacy
from tests.conftest import compose_config

DP = ["secure.dp.enabled=true", "client.weighting=uniform"]
DATA = types.SimpleNamespace(client_cloud=np.repeat(np.arange(3), 3), cloud_names=["americas", "europe", "asia"])


def _logged(*overrides):
    privacy = Privacy(validate(compose_config([*DP, *overrides])), DATA)
    server_state = types.SimpleNamespace(agg_state=types.SimpleNamespace(clip=0.5))
    return privacy.step(server_state), privacy.summary()


def test_fixed_size_sampling_logs_q_sample_size_and_population_of_the_worst_cloud():
    for figures in _logged("clouds.members.americas.clients_per_round=1",
                           "clouds.members.europe.clients_per_round=2", "clouds.members.asia.clients_per_round=2"):
        assert "sampling_rate" not in figures
        assert figures["sampling"] == "fixed" and figures["accounted_cloud"] == "europe"
        assert figures["sampling_q"] == pytest.approx(2 / 3)
        assert (figures["sample_size"], figures["population"]) == (2, 3)


def test_every_client_every_round_is_q_one_not_a_rate_of_three():
    record, summary = _logged()
    assert (record["sampling_q"], record["sample_size"], record["population"]) == (1.0, 3, 3)


def test_poisson_sampling_logs_q_and_the_whole_population_with_no_fixed_size():
    for figures in _logged("participation.sampling=poisson", "participation.fraction=0.3"):
        assert figures["sampling"] == "poisson" and figures["sampling_q"] == pytest.approx(0.3)
        assert figures["sample_size"] is None and figures["population"] == 9
