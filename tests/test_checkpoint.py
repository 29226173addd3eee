"""Checkpoints: bitwise round trip, fallback past a corrupt latest step, refusal to write NaN."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm.checkpoint import Checkpointer, CheckpointError
from fedjax_llm.cloud import CloudState, Pending
from fedjax_llm.server import AggregatorState, FederationState


def _state(seed: int, rnd: int = 1) -> FederationState:
    """The aggregator's state and two clouds' states, as a run checkpoints them."""
    rng = np.random.default_rng(seed)
    params = {"layers": {"0": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}},
              "norm": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)}}
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    _, opt_state = opt.update(params, opt_state, params)  # non-trivial moments and count
    agg = AggregatorState(round=jnp.int32(rnd), params=params, opt_state=opt_state, agg_state=(),
                          counted=np.array([rnd, rnd - 1], np.int32))

    def cloud(c: int) -> CloudState:
        states = {"scaffold": {"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)}}
        return CloudState(key=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), c)),
                          cursors=rng.integers(0, 1000, size=3).astype(np.int64),
                          data_seed=np.asarray(rng.integers(0, 2**32 - 1), np.uint32), client_states=states,
                          pending=Pending(round=jnp.int32(rnd), slots=np.array([0, -1], np.int32),
                                          states=jax.tree.map(lambda s: s[:2] + 1, states)),
                          last_round=jnp.int32(rnd))

    return FederationState(aggregator=agg, clouds={"east": cloud(0), "west": cloud(1)}, names=("east", "west"))


def _bitwise_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb))


def test_round_trip_is_bitwise(tmp_path):
    ck = Checkpointer(str(tmp_path), every=1, keep=3, last_round=10)
    state = _state(0)
    ck.save(1, state, {"frozen_digest": "abc"})
    restored, meta = ck.restore(_state(99))
    assert _bitwise_equal(restored, state)
    assert meta["round"] == 1 and meta["frozen_digest"] == "abc"
    assert isinstance(restored.data_cursors, np.ndarray)


def test_no_checkpoint_returns_none(tmp_path):
    assert Checkpointer(str(tmp_path), 1, 3, 10).restore(_state(0)) is None


def test_keeps_only_the_newest(tmp_path):
    ck = Checkpointer(str(tmp_path), every=1, keep=2, last_round=10)
    for r in (1, 2, 3):
        ck.save(r, _state(r, r))
    assert ck.steps() == [3, 2]


def test_should_save_every_n_and_last(tmp_path):
    ck = Checkpointer(str(tmp_path), every=3, keep=2, last_round=7)
    assert [r for r in range(1, 8) if ck.should_save(r)] == [3, 6, 7]


def _data_files(step_dir):
    out = []
    for root, _, files in os.walk(step_dir):
        out += [os.path.join(root, f) for f in files
                if os.path.getsize(os.path.join(root, f)) > 64 and "/state/" in os.path.join(root, f)
                and not f.startswith("_")]
    return out


def _corrupt(step_dir, mode: str):
    files = _data_files(step_dir)
    assert files, f"no data files under {step_dir}"
    for path in files:
        data = bytearray(open(path, "rb").read())
        if mode == "truncate":
            data = data[: len(data) // 2]
        else:  # flip bytes in the middle of the payload
            for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
                data[i] ^= 0xFF
        open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("mode", ["flip", "truncate"])
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, caplog, mode):
    ck = Checkpointer(str(tmp_path), every=1, keep=3, last_round=10)
    s1, s2 = _state(1, 1), _state(2, 2)
    ck.save(1, s1)
    ck.save(2, s2)
    _corrupt(os.path.join(str(tmp_path), "2"), mode)
    with caplog.at_level(logging.WARNING):
        restored, meta = Checkpointer(str(tmp_path), 1, 3, 10).restore(_state(0))
    assert meta["round"] == 1 and _bitwise_equal(restored, s1)
    assert any("step 2" in r.getMessage() for r in caplog.records)


def test_all_corrupt_stops_with_clear_error(tmp_path):
    ck = Checkpointer(str(tmp_path), every=1, keep=3, last_round=10)
    ck.save(1, _state(1, 1))
    _corrupt(os.path.join(str(tmp_path), "1"), "flip")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step 1"):
        ck.restore(_state(0))


def test_partial_write_directory_is_ignored(tmp_path):
    ck = Checkpointer(str(tmp_path), every=1, keep=3, last_round=10)
    ck.save(1, _state(1, 1))
    # What a kill during a save leaves behind: an unfinalized temporary step directory.
    os.makedirs(os.path.join(str(tmp_path), "2.orbax-checkpoint-tmp-1234", "state"))
    restored, meta = Checkpointer(str(tmp_path), 1, 3, 10).restore(_state(0))
    assert meta["round"] == 1


def test_refuses_to_write_nan(tmp_path):
    ck = Checkpointer(str(tmp_path), every=1, keep=3, last_round=10)
    bad = _state(0)
    nan = {**bad.params, "norm": {"scale": jnp.full((4,), jnp.nan, jnp.bfloat16)}}
    bad = bad.replace(aggregator=bad.aggregator.replace(params=nan))
    with pytest.raises(CheckpointError, match="NaN"):
        ck.save(1, bad)
    assert ck.steps() == []


def test_fallback_moves_the_bad_step_aside_and_the_step_can_be_written_again(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), every=1, keep=3, last_round=10)
    s1, s2 = _state(1, 1), _state(2, 2)
    ck.save(1, s1, {"records": [{"round": 0}, {"round": 1}]})
    ck.save(2, s2)
    _corrupt(os.path.join(str(tmp_path), "2"), "flip")
    with caplog.at_level(logging.WARNING):
        restored, meta = ck.restore(_state(0))
    assert meta["round"] == 1 and _bitwise_equal(restored, s1) and meta["records"][1] == {"round": 1}
    assert os.path.isdir(os.path.join(str(tmp_path), "corrupt", "2")) and ck.steps() == [1]
    ck.save(2, s2)  # the round retrained after the fallback is saved again (orbax refused before)
    assert ck.steps() == [2, 1] and _bitwise_equal(ck.restore(_state(0))[0], s2)


def test_read_only_restore_moves_nothing(tmp_path):
    ck = Checkpointer(str(tmp_path), every=1, keep=3, last_round=10)
    ck.save(1, _state(1, 1))
    ck.save(2, _state(2, 2))
    _corrupt(os.path.join(str(tmp_path), "2"), "truncate")
    _, meta = ck.restore(_state(0), quarantine=False)
    assert meta["round"] == 1 and ck.steps() == [2, 1]


def test_edited_metadata_is_caught_by_its_digest(tmp_path):
    import json

    ck = Checkpointer(str(tmp_path), every=1, keep=3, last_round=10)
    ck.save(1, _state(1, 1), {"records": [{"round": 1, "eval_loss": 2.5}]})
    ck.save(2, _state(2, 2), {"records": [{"round": 2, "eval_loss": 2.0}]})
    path = os.path.join(str(tmp_path), "2", "meta", "metadata")
    meta = json.load(open(path))
    meta["records"][0]["eval_loss"] = 1.0  # valid JSON, wrong figure
    json.dump(meta, open(path, "w"))
    _, restored = ck.restore(_state(0))
    assert restored["round"] == 1


def test_a_checkpoint_of_another_version_is_named_as_such(tmp_path):
    import json

    from fedjax_llm.checkpoint import FormatError

    ck = Checkpointer(str(tmp_path), every=1, keep=3, last_round=10)
    ck.save(1, _state(1, 1))
    path = os.path.join(str(tmp_path), "1", "meta", "metadata")
    meta = json.load(open(path))
    del meta["format"]  # what a version before the cloud/aggregator split wrote
    json.dump(meta, open(path, "w"))
    with pytest.raises(FormatError, match="step 1 was written by another version of fedjax_llm"):
        ck.restore(_state(0))
    assert ck.steps() == [1]  # not treated as damage: nothing moved
