"""FedAvg and the per-cloud reducer against NumPy weighted means."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.aggregate.base import weighted_mean_reducer
from fedjax_llm.aggregate.fedavg import fedavg
from fedjax_llm.types import ClientOutput, CloudAggregate


def _updates(rng, n):
    return {"a": rng.normal(size=(n, 3, 4)).astype(np.float32),
            "b": {"c": rng.normal(size=(n, 5)).astype(np.float32)}}


def _msgs(updates, weights):
    n = len(weights)
    return CloudAggregate(delta=updates, weight=jnp.asarray(weights), steps=jnp.ones(n), aux={},
                          loss_sum=jnp.zeros(n), tokens=jnp.zeros(n), clients=jnp.ones(n))


def test_fedavg_matches_numpy_weighted_mean():
    rng = np.random.default_rng(0)
    u, w = _updates(rng, 6), rng.uniform(1, 50, size=6).astype(np.float32)
    agg = fedavg()
    out, state = jax.jit(agg.update)(_msgs(u, w), agg.init(None), None)
    for got, ref in [(out["a"], u["a"]), (out["b"]["c"], u["b"]["c"])]:
        expected = (w[:, None, None] * ref if ref.ndim == 3 else w[:, None] * ref).sum(0) / w.sum()
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_fedavg_zero_weight_entries_are_absent_even_when_nan():
    rng = np.random.default_rng(1)
    u, w = _updates(rng, 4), np.array([2.0, 0.0, 3.0, 0.0], np.float32)
    u["a"][1] = np.nan
    u["b"]["c"][3] = np.inf
    out, _ = fedavg().update(_msgs(u, w), (), None)
    expected = (2 * u["a"][0] + 3 * u["a"][2]) / 5
    np.testing.assert_allclose(np.asarray(out["a"]), expected, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(out["b"]["c"])))


def test_fedavg_all_absent_gives_zero_update():
    u = _updates(np.random.default_rng(2), 3)
    out, _ = fedavg().update(_msgs(u, np.zeros(3, np.float32)), (), None)
    assert float(jnp.abs(out["a"]).max()) == 0.0


def _outputs(rng, n):
    return ClientOutput(delta=_updates(rng, n), weight=jnp.asarray(rng.uniform(1, 9, n), jnp.float32),
                        steps=jnp.asarray(rng.integers(1, 5, n), jnp.float32), aux={},
                        loss_sum=jnp.asarray(rng.uniform(1, 9, n), jnp.float32),
                        tokens=jnp.asarray(rng.integers(1, 90, n), jnp.float32),
                        finite=jnp.ones(n, bool))


@pytest.mark.parametrize("chunk", [1, 2, 3, 6])
def test_reducer_streaming_equals_per_cloud_numpy_mean(chunk):
    rng = np.random.default_rng(3)
    n, C = 6, 3
    outs = _outputs(rng, n)
    cloud = np.array([0, 2, 1, 0, 2, 2])
    onehot = np.eye(C, dtype=np.float32)[cloud]
    red = weighted_mean_reducer()
    acc = red.init(jax.tree.map(lambda a: a[0], outs), C, n)
    for s in range(0, n, chunk):
        part = jax.tree.map(lambda a: a[s:s + chunk], outs)
        acc = red.accumulate(acc, part, jnp.asarray(onehot[s:s + chunk]))
    res = red.finalize(acc)
    w = np.asarray(outs.weight)
    for c in range(C):
        sel = cloud == c
        ref = (w[sel, None, None] * outs.delta["a"][sel]).sum(0) / w[sel].sum()
        np.testing.assert_allclose(np.asarray(res.delta["a"][c]), ref, rtol=1e-5, atol=1e-6)
        assert float(res.weight[c]) == pytest.approx(w[sel].sum(), rel=1e-6)
        assert float(res.clients[c]) == sel.sum()
        assert float(res.tokens[c]) == pytest.approx(np.asarray(outs.tokens)[sel].sum())
