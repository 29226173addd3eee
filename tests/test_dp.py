"""DP-FedAvg clipping, noise and adaptive clipping; the accountant against dp-accounting and a published
reference."""
import json
import math

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedjax_llm.secure import accountant as A
from fedjax_llm.secure import dp


def _updates(norms_K, seed=0):
    """Stacked two-leaf updates whose per-client global L2 norms are exactly-ish norms_K."""
    rng = np.random.default_rng(seed)
    K = len(norms_K)
    a, b = rng.normal(size=(K, 6, 5)), rng.normal(size=(K, 7))
    total = np.sqrt((a**2).sum((1, 2)) + (b**2).sum(1))
    s = np.asarray(norms_K) / total
    return {"a": (a * s[:, None, None]).astype(np.float32), "b": (b * s[:, None]).astype(np.float32)}


def _np_norms(tree):
    return np.sqrt(sum((np.asarray(x, np.float64) ** 2).reshape(x.shape[0], -1).sum(1)
                       for x in jax.tree.leaves(tree)))


def test_clip_bounds_norms_and_keeps_small_updates_unchanged():
    norms = np.array([0.1, 0.5, 0.99, 1.01, 3.0, 100.0])
    u = _updates(norms)
    clipped, got_norms = dp.clip_by_l2(u, 1.0)
    np.testing.assert_allclose(got_norms, _np_norms(u), rtol=1e-5)
    after = _np_norms(clipped)
    assert np.all(after <= 1.0 + 1e-5)
    small = norms < 1.0
    for k in u:
        np.testing.assert_array_equal(np.asarray(clipped[k])[small], u[k][small])  # bit for bit
        big = np.asarray(clipped[k])[~small] / (1.0 / norms[~small]).reshape((-1,) + (1,) * (u[k].ndim - 1))
        np.testing.assert_allclose(big, u[k][~small], rtol=1e-4, atol=1e-6)  # direction kept
    np.testing.assert_allclose(after[~small], 1.0, rtol=1e-5)


def test_noise_std_matches_noise_multiplier_times_clip():
    clip, z = 0.5, 1.3
    agg = dp.dp_sum(clip, z)
    zeros = {"w": jnp.zeros((3, 400, 500), jnp.float32)}  # 3 clients of 200k zero coordinates
    noised, state, info = agg.update(zeros, agg.init(jax.random.key(0)))
    x = np.asarray(noised["w"], np.float64).ravel()
    N, sigma = x.size, z * clip
    # Sample std of N normals has standard error sigma / sqrt(2N); the mean sigma / sqrt(N).
    assert abs(x.std() - sigma) < 5 * sigma / math.sqrt(2 * N)
    assert abs(x.mean()) < 5 * sigma / math.sqrt(N)
    assert float(info["noise_std"]) == pytest.approx(sigma)
    noised2, _, _ = agg.update(zeros, state)  # the key in the state is split: fresh noise
    assert not np.allclose(noised2["w"], noised["w"])
    # The signal part is the plain sum of clipped updates; absent (padded) clients are excluded.
    u = _updates([0.2, 5.0, 0.3])
    plain = dp.dp_sum(1.0, 0.0)
    exact, _, _ = plain.update(u, plain.init(jax.random.key(1)), jnp.array([True, True, False]))
    ref = dp.clip_by_l2(u, 1.0)[0]
    for k in u:
        np.testing.assert_allclose(exact[k], np.asarray(ref[k])[:2].sum(0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_adaptive_clip_moves_to_the_target_quantile(target):
    """Andrew et al. 2021: with a log-normal norm distribution C converges to its target quantile."""
    K, rounds = 100, 150
    agg = dp.dp_sum(20.0, 1.0, adaptive=dp.AdaptiveClip(target, learning_rate=0.2), expected_clients=K)
    state = agg.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    quantile = math.exp(0.0 + 0.5 * {0.5: 0.0, 0.9: 1.2815515655446004}[target])  # exp(mu + sd z_q)
    clips = []
    for r in range(rounds):
        norms = np.exp(rng.normal(0.0, 0.5, K))
        _, state, _ = agg.update(_updates(norms, seed=r), state)
        clips.append(float(state.clip))
    assert clips[0] < 20.0 and clips[10] < clips[0]  # moving down from a too-large start
    assert abs(math.log(np.mean(clips[-30:]) / quantile)) < 0.15
    assert int(state.count) == rounds and state.key.dtype == jnp.uint32  # checkpointable arrays


def test_adaptive_noise_split_preserves_total_multiplier():
    z, sigma_b = 1.0, 5.0
    z_update = dp.update_noise_multiplier(z, sigma_b)
    assert z_update ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)
    with pytest.raises(ValueError, match="count_stddev"):
        dp.update_noise_multiplier(1.0, 0.4)


# ----- accountant ------------------------------------------------------------------------------------
def _direct(acc, event, count):
    acc.compose(event, count)
    return acc.get_epsilon(1e-5)


def test_epsilon_equals_dp_accounting_used_directly():
    q, z, T = 0.01, 1.1, 500
    event = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    for kind, ref in [("rdp", rdp.RdpAccountant()), ("pld", pld.PLDAccountant())]:
        acc = A.accountant(kind)
        state = acc.init()
        for _ in range(T // 100):
            state = acc.update(state, z, q, 100)
        assert state["rounds"] == T and len(state["history"]) == 1
        assert A.epsilon(state, 1e-5) == pytest.approx(_direct(ref, event, T), rel=1e-9)
    # A changing noise multiplier composes like the two events one after the other.
    acc = A.accountant("rdp")
    state = acc.update(acc.update(acc.init(), 1.1, q, 200), 0.8, q, 50)
    direct = rdp.RdpAccountant()
    direct.compose(dpa.SelfComposedDpEvent(event, 200))
    direct.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(0.8)), 50))
    assert A.epsilon(state, 1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    # Fixed-size sampling (m of N without replacement, replace-one neighbours): RDP only.
    fixed = A.accountant("rdp", "fixed", population=1000)
    state = fixed.update(fixed.init(), 1.1, 10, 300)
    ref = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    wor = dpa.SampledWithoutReplacementDpEvent(1000, 10, dpa.GaussianDpEvent(1.1))
    assert A.epsilon(state, 1e-5) == pytest.approx(_direct(ref, wor, 300), rel=1e-12)
    with pytest.raises(ValueError, match="RDP accountant only"):
        A.accountant("pld", "fixed", population=1000)
    json.dumps(state)  # the state is a small JSON-able dict: it checkpoints


def test_published_reference_tf_privacy_mnist_tutorial():
    """TF Privacy tutorials/README.md, "Select Parameters" table (MNIST DP-SGD, delta = 1e-5, RDP with
    the classic conversion and the tutorial's orders): q = 256/60000, 60000 // 256 = 234 steps/epoch;
    noise 1.12 x 60 epochs -> eps 2.92, noise 1.2 x 10 epochs -> eps 1.20 (printed to two decimals)."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acc = A.accountant("rdp", orders=orders)
    for z, epochs, published in [(1.12, 60, 2.92), (1.2, 10, 1.20)]:
        state = acc.update(acc.init(), z, 256 / 60000, epochs * 234)
        assert A.classic_rdp_epsilon(state, 1e-5) == pytest.approx(published, abs=0.005)
        assert A.epsilon(state, 1e-5) < published  # dp-accounting's conversion is tighter
    # The brief's setting (noise 1.1, 60 epochs) gives "about 3": 3.006 with the classic conversion.
    state = acc.update(acc.init(), 1.1, 256 / 60000, 60 * 234)
    assert A.classic_rdp_epsilon(state, 1e-5) == pytest.approx(3.0, abs=0.05)


def test_rounds_until_and_next_round_check():
    acc = A.accountant("rdp")
    state = acc.update(acc.init(), 1.1, 0.01, 100)
    k = A.rounds_until(state, 3.0, 1e-5, 1.1, 0.01)
    assert A.epsilon(state, 1e-5, [(1.1, 0.01, k)]) <= 3.0 < A.epsilon(state, 1e-5, [(1.1, 0.01, k + 1)])
    at_limit = acc.update(state, 1.1, 0.01, k)
    assert not A.next_round_exceeds(state, 3.0, 1e-5, 1.1, 0.01)
    assert A.next_round_exceeds(at_limit, 3.0, 1e-5, 1.1, 0.01)
    assert A.rounds_until(at_limit, 3.0, 1e-5, 1.1, 0.01) == 0
    assert A.epsilon(acc.init(), 1e-5) == 0.0
