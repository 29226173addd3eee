"""The drift schedule: phases by round, which examples each phase shows (against a NumPy recount from
the config), clients left without data, and start-up errors naming the key."""
import dataclasses

import numpy as np
import pytest

from fedjax_llm.config import ConfigError, DriftConfig, PhaseCloudConfig, PhaseConfig
from fedjax_llm.data.corpus import Example
from fedjax_llm.data.federated import FederatedData, round_batches
from fedjax_llm.drift.phases import Drift
from fedjax_llm.drift.schedule import make_schedule, visibility
from fedjax_llm.validation import validate
from tests.conftest import compose_config

LABELS = ["a", "b", "c", "d"]


def _data(n=120, seed=0):
    """Two clouds x 2 clients, examples with random labels, every 5th held out."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(LABELS, n)
    examples = [Example(prompt=f"p{i}", response="r", meta={"category": str(v)}) for i, v in enumerate(labels)]
    owner = rng.integers(0, 4, n)
    train = [np.flatnonzero((owner == c) & (np.arange(n) % 5 != 0)) for c in range(4)]
    held = [np.flatnonzero((owner == c) & (np.arange(n) % 5 == 0)) for c in range(4)]
    return FederatedData(tokens=np.zeros((n, 4), np.int32), loss_mask=np.ones((n, 4), np.float32),
                         train_idx=train, eval_idx=held, client_names=["x/0", "x/1", "y/0", "y/1"],
                         client_cloud=np.array([0, 0, 1, 1], np.int32), cloud_names=["x", "y"],
                         tokenizer=None, num_truncated=0, excluded=0, examples=examples)


CFG = DriftConfig(enabled=True, phases=[
    PhaseConfig(name="one", rounds=2, clouds={"x": PhaseCloudConfig(labels=["a", "b"])}),   # y joins later
    PhaseConfig(name="two", rounds=3, clouds={"x": PhaseCloudConfig(labels=["c"]),           # new label in x
                                              "y": PhaseCloudConfig(labels=["a", "b"], keep={"a": 0.3})}),
    PhaseConfig(rounds=1, clouds={"y": PhaseCloudConfig()}),                                  # y: everything
])


def test_rounds_map_to_phases():
    s = make_schedule(CFG)
    assert s.names == ("one", "two", "phase2") and s.starts == (1, 3, 6) and s.ends == (2, 5, 6)
    assert [s.phase_at(r) for r in range(0, 9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_visibility_matches_a_recount_from_the_config():
    data = _data()
    vis = visibility(CFG, data, seed=7)
    labels = np.array([e.meta["category"] for e in data.examples])
    cloud = np.full(len(labels), -1)
    for c, (t, h) in enumerate(zip(data.train_idx, data.eval_idx)):
        cloud[t] = cloud[h] = data.client_cloud[c]
    np.testing.assert_array_equal(vis[0], (cloud == 0) & np.isin(labels, ["a", "b"]))
    np.testing.assert_array_equal(vis[2], cloud == 1)
    # phase two: x shows only c; y shows b and about 30 % of its a's (the same draw for every seed-7 call)
    np.testing.assert_array_equal(vis[1] & (cloud == 0), (cloud == 0) & (labels == "c"))
    np.testing.assert_array_equal(vis[1][(cloud == 1) & (labels == "b")], True)
    assert not vis[1][(cloud == 1) & np.isin(labels, ["c", "d"])].any()
    a_y = (cloud == 1) & (labels == "a")
    assert 0 < vis[1][a_y].sum() < a_y.sum()
    np.testing.assert_array_equal(vis, visibility(CFG, data, seed=7))  # deterministic from the seed
    assert (visibility(CFG, data, seed=8)[1][a_y] != vis[1][a_y]).any()


def test_phase_views_restrict_training_and_clients_without_data_take_no_step():
    data = _data()
    drift = Drift(CFG, data, seed=0, task="classify")
    first = drift.view(0)
    assert [len(t) for t in first.train_idx[2:]] == [0, 0]  # cloud y has not joined
    for c in range(2):
        assert set(first.train_idx[c]) == {i for i in data.train_idx[c] if data.examples[i].meta["category"] in "ab"}
    assert [len(e) for e in first.eval_idx] == [len(e) for e in data.eval_idx]  # held-out sets unchanged
    rb = round_batches(first, np.arange(4), np.zeros(4, np.int64), steps=2, batch_size=3, data_seed=1)
    assert rb.step_mask[:2].all() and not rb.step_mask[2:].any()
    assert (rb.loss_mask[2:] == 0).all() and (rb.cursors[2:] == 0).all()


def test_a_label_that_matches_nothing_names_the_key():
    bad = dataclasses.replace(CFG, phases=[PhaseConfig(rounds=1, clouds={"x": PhaseCloudConfig(labels=["zz"])})])
    with pytest.raises(ValueError, match=r"drift.phases.0.clouds.x.labels: \['zz'\] match no example"):
        Drift(bad, _data(), seed=0, task="classify")
    empty = dataclasses.replace(CFG, phases=[PhaseConfig(rounds=1, clouds={"x": PhaseCloudConfig(keep={"a": 1e-9})}),
                                             PhaseConfig(rounds=1, clouds={"x": PhaseCloudConfig(labels=["a"], keep={"a": 1e-9})})])
    with pytest.raises(ValueError, match=r"drift.phases.1 \(phase1\): no client holds a training example"):
        Drift(empty, _data(), seed=0, task="classify")


@pytest.mark.parametrize("overrides, key", [
    (["drift.remedy=ewc"], "drift.remedy"),
    (["drift=topics_phases", "drift.remedy=replay"], "drift.remedy"),
    (["drift=topics_phases", "drift.phases.1.rounds=0", "run.rounds=20"], "drift.phases.1.rounds"),
    (["drift=topics_phases", "+drift.phases.0.clouds.mars.labels=[ai]", "run.rounds=20"], "drift.phases.0.clouds.mars"),
    (["drift=topics_phases", "drift.phases.1.clouds.central.keep.ai=1.5", "run.rounds=20"],
     "drift.phases.1.clouds.central.keep.ai"),
    (["drift=topics_phases", "+drift.phases.1.clouds.central.keep.sports=0.5", "run.rounds=20"],
     "drift.phases.1.clouds.central.keep.sports"),
    (["drift=topics_phases", "drift.ewc_lambda=-1", "run.rounds=20"], "drift.ewc_lambda"),
])
def test_bad_schedules_fail_at_start_up_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["task=topics", *overrides]))
    assert str(info.value).startswith(key), str(info.value)


def test_a_misspelt_phase_key_is_named():
    with pytest.raises(Exception, match="drift.phases.0.clouds.east.lables: not a config key; did you mean "
                                        "drift.phases.0.clouds.east.labels"):
        compose_config(["task=topics", "drift=topics_phases", "+drift.phases.0.clouds.east.lables=[ai]"])


def test_phases_past_run_rounds_warn_since_a_run_may_be_extended(caplog):
    cfg = compose_config(["task=topics", "drift=topics_phases", "run.rounds=10"])
    with caplog.at_level("WARNING", logger="fedjax_llm"):
        validate(cfg)
    assert "drift.phases: their rounds add up to 18, past run.rounds=10" in caplog.text
