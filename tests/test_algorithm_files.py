"""Smoke test: every algorithm file runs end to end on a tiny model (a file of its own so that pytest
workers run it beside the experiment smoke test)."""
import pytest

from tests.test_experiments import _names, _sweep


@pytest.mark.slow
def test_every_algorithm_file_runs(tmp_path):
    # The byzantine scenario has 5 clients per cloud, enough for Krum, and an attacker to resist.
    summaries = _sweep(tmp_path, "algorithm=glob(*)", "experiment=byzantine")
    assert len(summaries) == len(_names("algorithm"))
    for s in summaries:
        assert s["final_eval_loss"] is not None and s["tokens"] > 0
