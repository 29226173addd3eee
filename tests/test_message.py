"""Pytree serialization: lossless round trips, determinism, and named structure errors."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fedjax_llm.clouds import message
from fedjax_llm.clouds.channel import RoutingError, plaintext_channel


def _tree():
    rng = np.random.default_rng(0)
    return {"layers": {"0": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
                       "1": {"kernel": rng.normal(size=(4, 3)).astype(ml_dtypes.bfloat16)}},
            "count": np.array(7, np.int32)}


def test_round_trip_is_bitwise_including_bf16():
    tree = _tree()
    out, meta = message.decode(message.encode(tree, {"k": "v"}), like=tree)
    assert meta == {"k": "v"}
    for path, leaf in message.leaf_paths(tree):
        got = dict(message.leaf_paths(out))[path]
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert got.tobytes() == np.asarray(leaf).tobytes(), path


def test_encoding_is_deterministic_and_accepts_jax_arrays():
    tree = _tree()
    as_jax = {"layers": {k: {"kernel": jnp.asarray(v["kernel"])} for k, v in tree["layers"].items()},
              "count": jnp.asarray(tree["count"])}
    assert message.encode(tree) == message.encode(tree) == message.encode(as_jax)


def test_shape_mismatch_names_the_path():
    tree = _tree()
    other = _tree()
    other["layers"]["1"]["kernel"] = np.zeros((4, 4), ml_dtypes.bfloat16)
    with pytest.raises(message.MessageError, match="layers/1/kernel"):
        message.decode(message.encode(other), like=tree)


def test_missing_and_extra_paths_are_named():
    tree = _tree()
    smaller = {"layers": tree["layers"]}
    with pytest.raises(message.MessageError, match="count"):
        message.decode(message.encode(smaller), like=tree)
    with pytest.raises(message.MessageError, match="unexpected path 'count'"):
        message.decode(message.encode(tree), like=smaller)


def test_truncated_message_is_rejected():
    data = message.encode(_tree())
    for cut in (3, 20, len(data) - 5):
        with pytest.raises(message.MessageError):
            message.decode(data[:cut], like=_tree())


def test_structure_digest_changes_with_dtype():
    a = {"x": np.zeros(3, np.float32)}
    b = {"x": np.zeros(3, np.float16)}
    assert message.structure_digest(a) != message.structure_digest(b)


def test_channel_checks_routing_header():
    ch = plaintext_channel()
    tree = _tree()
    data = ch.send(tree, sender="europe", recipient="aggregator", round=3)
    out, _ = ch.receive(data, like=tree, sender="europe", recipient="aggregator", round=3)
    assert out["count"] == 7
    with pytest.raises(RoutingError, match="round"):
        ch.receive(data, like=tree, sender="europe", recipient="aggregator", round=4)
    with pytest.raises(RoutingError, match="sender"):
        ch.receive(data, like=tree, sender="asia", recipient="aggregator", round=3)
