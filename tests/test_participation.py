"""Client sampling, dropout, stragglers and Byzantine selection: rates match the config, keys make
them reproducible, and a resumed run samples exactly the same clients."""
import dataclasses

import jax
import numpy as np
import pytest

from fedjax_llm import participation
from fedjax_llm.validation import validate
from tests.conftest import compose_config

ROUNDS = 400


def _cfg(*overrides):
    return validate(compose_config(["clouds=shared", "clouds.members.east.clients=10",
                                    "clouds.members.central.clients=6", "clouds.members.west.clients=4",
                                    *overrides]))


CLIENT_CLOUD = np.array([0] * 10 + [1] * 6 + [2] * 4)


def _draws(cfg):
    return [participation.sample_cohort(cfg, CLIENT_CLOUD, jax.random.key(r), r) for r in range(ROUNDS)]


def _binomial_ok(count, n, p, z=4.5):
    return abs(count - n * p) <= z * np.sqrt(n * p * (1 - p)) + 1


def test_fixed_count_per_cloud_and_uniform_frequencies():
    cfg = _cfg("clouds.members.east.clients_per_round=3", "clouds.members.central.clients_per_round=2")
    draws = _draws(cfg)
    counts = np.zeros(20)
    for d in draws:
        assert np.bincount(CLIENT_CLOUD[d.ids], minlength=3).tolist() == [3, 2, 4]
        counts[d.ids] += 1
    for c, (n, m) in enumerate([(10, 3), (6, 2), (4, 4)]):
        for i in np.flatnonzero(CLIENT_CLOUD == c):
            assert _binomial_ok(counts[i], ROUNDS, m / n), (i, counts[i])


def test_fraction_sampling_sizes():
    cfg = _cfg("participation.sampling=fraction", "participation.fraction=0.5")
    for d in _draws(cfg)[:20]:
        assert np.bincount(CLIENT_CLOUD[d.ids], minlength=3).tolist() == [5, 3, 2]


def test_poisson_inclusion_rate_and_variable_size():
    q = 0.3
    cfg = _cfg("participation.sampling=poisson", f"participation.fraction={q}")
    draws = _draws(cfg)
    counts = np.zeros(20)
    for d in draws:
        counts[d.ids] += 1
    for i in range(20):
        assert _binomial_ok(counts[i], ROUNDS, q), (i, counts[i])
    sizes = {len(d.ids) for d in draws}
    assert len(sizes) > 3
    assert max(sizes) <= participation.cohort_capacity(cfg, CLIENT_CLOUD)


def test_dropout_and_straggler_rates():
    cfg = _cfg("participation.dropout=0.2", "participation.straggler_fraction=0.3",
               "participation.straggler_min_steps=2", "client.local_steps=6")
    draws = _draws(cfg)
    n = sum(len(d.ids) for d in draws)
    dropped = sum(int(d.dropped.sum()) for d in draws)
    steps = np.concatenate([d.steps for d in draws])
    assert _binomial_ok(dropped, n, 0.2)
    slow = steps < 6
    # a straggler draws U{2..6}: 1 in 5 draws the full 6 steps, so slow share = 0.3 * 4/5
    assert _binomial_ok(int(slow.sum()), n, 0.3 * 4 / 5)
    assert steps.min() == 2 and steps.max() == 6


def test_same_key_same_cohort():
    cfg = _cfg("participation.sampling=poisson", "participation.fraction=0.4", "participation.dropout=0.3")
    a = participation.sample_cohort(cfg, CLIENT_CLOUD, jax.random.key(7), 1)
    b = participation.sample_cohort(cfg, CLIENT_CLOUD, jax.random.key(7), 1)
    c = participation.sample_cohort(cfg, CLIENT_CLOUD, jax.random.key(8), 1)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("ids", "dropped", "steps"))
    assert not (np.array_equal(a.ids, c.ids) and np.array_equal(a.dropped, c.dropped))


def test_byzantine_selection_share_per_cloud_or_whole_cloud():
    cfg = _cfg("attack.kind=sign_flip", "attack.fraction=0.5")
    flags = participation.byzantine_clients(cfg.attack, CLIENT_CLOUD, ["east", "central", "west"],
                                            jax.random.key(0))
    assert [int(flags[CLIENT_CLOUD == c].sum()) for c in range(3)] == [5, 3, 2]
    cfg = _cfg("attack.kind=gaussian", "attack.cloud=west")
    flags = participation.byzantine_clients(cfg.attack, CLIENT_CLOUD, ["east", "central", "west"],
                                            jax.random.key(0))
    assert np.array_equal(flags, CLIENT_CLOUD == 2)


def test_label_flip_is_an_involution_on_regular_tokens():
    tokens = np.array([[0, 1, 2, 3, 4, 5, 510, 511]], np.int32)
    flipped = participation.flip_labels(tokens, 512)
    assert flipped.tolist() == [[0, 1, 2, 3, 511, 510, 5, 4]]
    assert np.array_equal(participation.flip_labels(flipped, 512), tokens)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from fedjax_llm.data.federated import build_federated_data
    cfg = compose_config(["debug=tiny", "data.seq_len=16", f"data.tokenizer_cache={tmp_path_factory.mktemp('t')}"])
    return build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)


def test_resumed_state_samples_and_trains_identically(tiny_data, tmp_path):
    """A state restored from a checkpoint continues with the same cohorts, dropouts and params."""
    from fedjax_llm.checkpoint import Checkpointer
    from fedjax_llm.server import Federation
    cfg = compose_config(["debug=tiny", "data.seq_len=16", "participation.sampling=poisson",
                          "participation.fraction=0.6", "participation.dropout=0.25",
                          "participation.straggler_fraction=0.5", "client.local_steps=3",
                          "algorithm=scaffold"])
    fed = Federation(validate(cfg), tiny_data)
    state = fed.init_state()
    state, _ = fed.run_round(state)
    ck = Checkpointer(str(tmp_path), 1, 2, 10)
    ck.save(1, state)
    straight = [fed.run_round(state)]
    straight.append(fed.run_round(straight[-1][0]))
    restored, _ = ck.restore(fed.init_state())
    resumed = [fed.run_round(restored)]
    resumed.append(fed.run_round(resumed[-1][0]))
    for (sa, ma), (sb, mb) in zip(straight, resumed):
        for key in ("sampled", "dropped", "stragglers", "clients"):
            assert ma[key] == mb[key], key
        for x, y in zip(jax.tree.leaves((sa.params, sa.client_states, sa.agg_state)),
                        jax.tree.leaves((sb.params, sb.client_states, sb.agg_state))):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_attacked_clients_are_reported(tiny_data):
    from fedjax_llm.server import Federation
    cfg = validate(compose_config(["debug=tiny", "data.seq_len=16", "attack.kind=sign_flip",
                                   "attack.cloud=asia"]))
    fed = Federation(cfg, tiny_data)
    _, m = fed.run_round(fed.init_state())
    asia = [n for n, c in zip(tiny_data.client_names, tiny_data.client_cloud) if tiny_data.cloud_names[c] == "asia"]
    assert sorted(m["attacked_clients"]) == sorted(asia)
    cfg2 = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, kind="none", cloud=None))
    _, m2 = Federation(cfg2, tiny_data).run_round(Federation(cfg2, tiny_data).init_state())
    assert m2["attacked_clients"] == []
