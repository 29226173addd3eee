"""Robust rules against NumPy on hand-made inputs with outliers, absent entries and Krum's choice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.aggregate import robust
from fedjax_llm.aggregate.base import buffered_reducer
from fedjax_llm.types import ClientOutput


def _honest_and_outliers(seed=0, n_honest=7, n_bad=2, d=6):
    rng = np.random.default_rng(seed)
    honest = rng.normal(loc=1.0, scale=0.1, size=(n_honest, d))
    bad = rng.normal(loc=-50.0, scale=5.0, size=(n_bad, d))
    return np.concatenate([honest, bad]).astype(np.float32)


def test_median_matches_numpy_and_ignores_absent_entries():
    u = _honest_and_outliers()
    w = np.ones(len(u), np.float32)
    w[3] = 0  # absent: must not count, even though it is an ordinary value
    got = robust.coordinate_median({"a": jnp.asarray(u)}, jnp.asarray(w))["a"]
    np.testing.assert_allclose(np.asarray(got), np.median(u[w > 0], axis=0), rtol=1e-6)
    # odd count
    w[4] = 0
    got = robust.coordinate_median({"a": jnp.asarray(u)}, jnp.asarray(w))["a"]
    np.testing.assert_allclose(np.asarray(got), np.median(u[w > 0], axis=0), rtol=1e-6)


def test_median_hand_case():
    u = np.array([[1.0], [100.0], [2.0], [3.0], [-7.0]], np.float32)
    w = np.array([1, 1, 1, 1, 0], np.float32)  # -7 absent -> median of {1, 100, 2, 3} = 2.5
    assert float(robust.coordinate_median(jnp.asarray(u), jnp.asarray(w))[0]) == pytest.approx(2.5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.4])
def test_trimmed_mean_matches_numpy(beta):
    u = _honest_and_outliers(seed=1, n_honest=8, n_bad=2)
    w = np.ones(len(u), np.float32)
    w[0] = 0
    present = u[w > 0]
    n, k = len(present), int(np.floor(beta * len(present)))
    s = np.sort(present, axis=0)
    expected = s[k:n - k].mean(axis=0)
    got = robust.trimmed_mean(beta)(jnp.asarray(u), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def _krum_numpy(u, present, f):
    idx = np.flatnonzero(present)
    n = len(idx)
    scores = {}
    for i in idx:
        d = sorted(np.sum((u[i] - u[j]) ** 2) for j in idx if j != i)
        scores[i] = sum(d[: n - f - 2])
    return scores


def test_krum_scores_match_numpy_and_pick_an_honest_client():
    u = _honest_and_outliers(seed=2)
    w = np.ones(len(u), np.float32)
    w[1] = 0
    f = 2
    got = np.asarray(robust.krum_scores({"a": jnp.asarray(u[:, :3]), "b": jnp.asarray(u[:, 3:])},
                                        jnp.asarray(w), f))
    ref = _krum_numpy(u, w > 0, f)
    for i, s in ref.items():
        assert got[i] == pytest.approx(s, rel=1e-4)
    assert np.isinf(got[1])
    chosen = robust.multi_krum(f, 1)(jnp.asarray(u), jnp.asarray(w))
    best = min(ref, key=ref.get)
    np.testing.assert_allclose(np.asarray(chosen), u[best], rtol=1e-6)
    assert best < 7  # an honest client


def test_multi_krum_averages_the_m_best():
    u = _honest_and_outliers(seed=3)
    w = np.ones(len(u), np.float32)
    ref = _krum_numpy(u, w > 0, 2)
    best3 = sorted(ref, key=ref.get)[:3]
    got = robust.multi_krum(2, 3)(jnp.asarray(u), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(got), u[best3].mean(axis=0), rtol=1e-5)


def test_norm_bounded_mean_matches_numpy():
    u = _honest_and_outliers(seed=4)
    w = np.arange(1, len(u) + 1, dtype=np.float32)
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    clipped = u * np.minimum(1.0, 2.0 / norms)
    expected = (w[:, None] * clipped).sum(0) / w.sum()
    got = robust.norm_bounded_mean(2.0)(jnp.asarray(u), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_robust_rules_resist_outliers_where_the_mean_breaks():
    u = _honest_and_outliers(seed=5)
    w = jnp.ones(len(u))
    mean = np.asarray(jnp.mean(jnp.asarray(u), axis=0))
    assert np.all(mean < -5)  # two outliers drag the plain mean far away
    for rule in (robust.coordinate_median, robust.trimmed_mean(0.25), robust.multi_krum(2, 1)):
        out = np.asarray(rule(jnp.asarray(u), w))
        assert np.all(np.abs(out - 1.0) < 0.5), rule


def test_buffered_reducer_applies_the_rule_per_cloud_in_chunks():
    u = _honest_and_outliers(seed=6, n_honest=6, n_bad=2)  # 8 clients
    cloud = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    w = np.ones(8, np.float32)
    out = ClientOutput(delta={"a": jnp.asarray(u)}, weight=jnp.asarray(w), steps=jnp.ones(8), aux={},
                       loss_sum=jnp.zeros(8), tokens=jnp.zeros(8), finite=jnp.ones(8, bool))
    red = buffered_reducer(robust.coordinate_median)
    acc = red.init(jax.tree.map(lambda a: a[0], out), 2, 8)
    onehot = np.eye(2, dtype=np.float32)[cloud]
    for s in range(0, 8, 3):  # chunks of 3, 3, 2
        acc = red.accumulate(acc, jax.tree.map(lambda a: a[s:s + 3], out), jnp.asarray(onehot[s:s + 3]))
    res = red.finalize(acc)
    for c in (0, 1):
        np.testing.assert_allclose(np.asarray(res.delta["a"][c]), np.median(u[cloud == c], axis=0), rtol=1e-6)
    assert list(np.asarray(res.clients)) == [4, 4]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 17, 40, 64, 65])
def test_sort_axis0_matches_numpy_on_both_paths(n):
    x = np.random.default_rng(n).normal(size=(n, 33)).astype(np.float32)
    x[0, :3] = np.inf  # absent entries sort last
    np.testing.assert_array_equal(np.asarray(robust.sort_axis0(jnp.asarray(x))), np.sort(x, axis=0))
