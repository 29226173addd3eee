"""Federated LoRA aggregation against NumPy: the global delta each scheme yields vs the average of the
clients' products (exact schemes), its best rank-r approximation (FlexLoRA), or neither (naive)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm.aggregate import lora_agg
from fedjax_llm.models import LlamaSpec, LoRASpec, combine, init_model

K, R, SCALE = 4, 4, 2.0
SHAPES = {"q_proj": (12, 10), "v_proj": (12, 6)}
WEIGHTS = np.array([3.0, 1.0, 0.0, 2.0], np.float32)  # client 2 is absent


def _adapters(seed=0, ranks=None, absent_nan=True):
    """Stacked adapters [K, ...] of two modules plus a head; client 2 holds NaN (it must not count)."""
    rng = np.random.default_rng(seed)
    tree = {"layers": {"0": {"self_attn": {}}}, "head": {"kernel": rng.normal(size=(K, 5, 3))}}
    for name, (i, o) in SHAPES.items():
        a, b = rng.normal(size=(K, i, R)), rng.normal(size=(K, R, o))
        if ranks is not None:
            for k, r in enumerate(ranks):
                a[k, :, r:], b[k, r:, :] = 0.0, 0.0
        tree["layers"]["0"]["self_attn"][name] = {"lora_a": a, "lora_b": b}
    if absent_nan:
        tree["layers"]["0"]["self_attn"]["q_proj"]["lora_a"][2] = np.nan
        tree["head"]["kernel"][2] = np.nan
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _modules(tree):
    return tree["layers"]["0"]["self_attn"]


def _np_product_mean(tree, weights=WEIGHTS, scale=SCALE):
    """{module: sum_k p_k scale A_k B_k} in float64, skipping absent clients."""
    p = weights / weights.sum()
    out = {}
    for name, m in _modules(_np(tree)).items():
        out[name] = sum(p[k] * scale * m["lora_a"][k] @ m["lora_b"][k] for k in range(K) if p[k] > 0)
    return out


def _delta(adapters, residual=None):
    d = lora_agg.effective_delta(adapters, SCALE, residual)
    return {n: np.asarray(v["kernel"]) for n, v in _modules(d).items()}


def test_naive_is_mean_of_factors_not_mean_of_products():
    tree = _adapters()
    got = jax.jit(lora_agg.naive)(tree, WEIGHTS)
    p = WEIGHTS / WEIGHTS.sum()
    want = _np_product_mean(tree)
    for name, m in _modules(_np(tree)).items():
        a = sum(p[k] * m["lora_a"][k] for k in range(K) if p[k] > 0)
        b = sum(p[k] * m["lora_b"][k] for k in range(K) if p[k] > 0)
        np.testing.assert_allclose(_delta(got)[name], SCALE * a @ b, rtol=1e-5, atol=1e-5)
        assert np.abs(_delta(got)[name] - want[name]).max() > 0.1  # the products' mean is missed
    head = sum(p[k] * np.asarray(tree["head"]["kernel"][k]) for k in (0, 1, 3))
    np.testing.assert_allclose(got["head"]["kernel"], head, rtol=1e-6)


def test_ffa_shared_a_is_exact_and_keeps_a_bitwise():
    tree = _adapters(absent_nan=False)
    glob = jax.tree.map(lambda x: x[0], tree)
    for m, g in zip(_modules(tree).values(), _modules(glob).values()):
        m["lora_a"] = jnp.broadcast_to(g["lora_a"], m["lora_a"].shape)  # every client kept A
    got = jax.jit(lora_agg.ffa)(glob, tree, WEIGHTS)
    want = _np_product_mean(tree)
    for name in SHAPES:
        np.testing.assert_allclose(_delta(got)[name], want[name], rtol=1e-5, atol=1e-5)
        assert np.array_equal(np.asarray(_modules(got)[name]["lora_a"]),
                              np.asarray(_modules(glob)[name]["lora_a"]))
    assert np.asarray(lora_agg.a_unchanged(glob, tree)).all()
    moved = jax.tree.map(lambda x: x, tree)
    _modules(moved)["v_proj"]["lora_a"] = _modules(tree)["v_proj"]["lora_a"].at[1, 0, 0].add(1e-7)
    assert np.asarray(lora_agg.a_unchanged(glob, moved)).tolist() == [True, False, True, True]


def test_freeze_a_optimizer_never_moves_a():
    """AdamW with weight decay under freeze_a: A bitwise fixed, B trained; ffa_split gives the same model."""
    spec = LlamaSpec(vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32,
                     lora=LoRASpec(rank=2, targets=("q_proj", "v_proj")))
    fns, trainable, frozen = init_model(spec, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 50)
    loss = lambda t: jnp.mean(fns.apply(t, frozen, tokens) ** 2)  # noqa: E731
    opt = lora_agg.freeze_a(optax.adamw(1e-2, weight_decay=0.1))

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params, state = trainable, opt.init(trainable)
    for _ in range(3):
        params, state = step(params, state)
    stacked = jax.tree.map(lambda x: x[None], params)
    assert bool(lora_agg.a_unchanged(trainable, stacked)[0])
    b0 = trainable["layers"]["0"]["self_attn"]["q_proj"]["lora_b"]
    assert float(jnp.abs(params["layers"]["0"]["self_attn"]["q_proj"]["lora_b"] - b0).max()) > 0
    rest, a = lora_agg.ffa_split(params)
    assert "lora_a" not in rest["layers"]["0"]["self_attn"]["q_proj"]
    apply = jax.jit(fns.apply)
    np.testing.assert_array_equal(apply(rest, combine(a, frozen), tokens), apply(params, frozen, tokens))


def test_fedex_residual_makes_the_global_delta_exact():
    tree = _adapters()
    adapters, residual = jax.jit(lora_agg.fedex, static_argnums=2)(tree, WEIGHTS, SCALE)
    want = _np_product_mean(tree)
    got = _delta(adapters, residual)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
        assert np.abs(_delta(adapters)[name] - want[name]).max() > 0.1  # the residual matters
    for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(lora_agg.naive(tree, WEIGHTS))):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)  # FedEx's adapters are the naive mean
    frozen = {"layers": {"0": {"self_attn": {n: {"kernel": jnp.ones(s)} for n, s in SHAPES.items()}}}}
    folded = lora_agg.fold_residual(frozen, residual)
    for name in SHAPES:
        base = np.asarray(folded["layers"]["0"]["self_attn"][name]["kernel"])
        np.testing.assert_allclose(base + _delta(adapters)[name], 1.0 + want[name], rtol=1e-5, atol=1e-5)


def test_fedex_residual_from_deltas_equals_residual_from_adapters():
    """The residual is a weighted covariance: the engine may pass client deltas (A_k - A, B_k - B)."""
    tree = _adapters()
    glob = jax.tree.map(lambda x: x[0], _adapters(seed=9))
    deltas = jax.tree.map(lambda x, g: x - g[None], tree, glob)
    _, from_adapters = lora_agg.fedex(tree, WEIGHTS, SCALE)
    _, from_deltas = lora_agg.fedex(deltas, WEIGHTS, SCALE)
    for x, y in zip(jax.tree.leaves(from_adapters), jax.tree.leaves(from_deltas)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_fedex_two_levels_equal_one_level():
    """Clouds {0, 1} and {2, 3} aggregate first; the aggregator's result equals the flat one."""
    tree = _adapters(absent_nan=False)
    weights = np.array([3.0, 1.0, 0.5, 2.0], np.float32)
    flat_a, flat_r = lora_agg.fedex(tree, weights, SCALE)
    parts = [lora_agg.fedex(jax.tree.map(lambda x: x[i:i + 2], tree), weights[i:i + 2], SCALE)
             for i in (0, 2)]
    clouds = jax.tree.map(lambda *x: jnp.stack(x), *[p[0] for p in parts])
    cloud_res = jax.tree.map(lambda *x: jnp.stack(x), *[p[1] for p in parts])
    cloud_w = np.array([weights[:2].sum(), weights[2:].sum()])
    top_a, top_r = lora_agg.fedex(clouds, cloud_w, SCALE, residual_K=cloud_res)
    for x, y in zip(jax.tree.leaves((flat_a, flat_r)), jax.tree.leaves((top_a, top_r))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def _np_truncate(m, r):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], s


@pytest.mark.parametrize("rank", [R, 2])
def test_flexlora_heterogeneous_ranks_is_best_rank_r_approximation(rank):
    ranks = np.array([1, 4, 3, 2])
    tree = _adapters(ranks=ranks)
    fn = jax.jit(lora_agg.flexlora, static_argnames=("rank",))
    glob, clients = fn(tree, WEIGHTS, ranks, SCALE, rank=rank)
    want = _np_product_mean(tree)
    got = _delta(glob)
    for name in SHAPES:
        best, s = _np_truncate(want[name], rank)
        np.testing.assert_allclose(got[name], best, rtol=1e-4, atol=1e-4)
        # Eckart-Young: the error is the tail of the spectrum
        np.testing.assert_allclose(np.linalg.norm(got[name] - want[name]),
                                   np.sqrt((s[rank:] ** 2).sum()), rtol=1e-4, atol=1e-5)
        m = _modules(clients)[name]
        for k in range(K):  # client k gets the top min(r_k, rank) components, zero-padded
            ck = SCALE * np.asarray(m["lora_a"][k], np.float64) @ np.asarray(m["lora_b"][k], np.float64)
            np.testing.assert_allclose(ck, _np_truncate(want[name], min(ranks[k], rank))[0],
                                       rtol=1e-4, atol=1e-4)
            assert not np.asarray(m["lora_a"][k][:, ranks[k]:]).any()
            assert not np.asarray(m["lora_b"][k][ranks[k]:]).any()
    p = WEIGHTS / WEIGHTS.sum()
    head = sum(p[k] * np.asarray(tree["head"]["kernel"][k]) for k in (0, 1, 3))
    np.testing.assert_allclose(glob["head"]["kernel"], head, rtol=1e-6)
    for k in range(K):  # the client can cut its view from the global adapters itself
        mine = jax.jit(lora_agg.truncate_to_rank)(glob, ranks[k])
        for x, y in zip(jax.tree.leaves(_modules(mine)), jax.tree.leaves(_modules(clients))):
            np.testing.assert_allclose(x, y[k], rtol=1e-6, atol=1e-7)


def test_flexlora_per_client_scales():
    """Standard LoRA scales alpha / r_k differ per client; each product counts with its own scale."""
    ranks = np.array([1, 4, 3, 2])
    tree = _adapters(ranks=ranks, absent_nan=False)
    scales = (8.0 / ranks).astype(np.float32)
    glob, clients = lora_agg.flexlora(tree, WEIGHTS, ranks, jnp.asarray(scales), global_scale=2.0)
    p = WEIGHTS / WEIGHTS.sum()
    for name, m in _modules(_np(tree)).items():
        want = sum(p[k] * scales[k] * m["lora_a"][k] @ m["lora_b"][k] for k in range(K))
        g = _modules(glob)[name]
        np.testing.assert_allclose(2.0 * np.asarray(g["lora_a"]) @ np.asarray(g["lora_b"]),
                                   _np_truncate(want, R)[0], rtol=1e-4, atol=1e-4)
        c = _modules(clients)[name]
        ck = scales[1] * np.asarray(c["lora_a"][1]) @ np.asarray(c["lora_b"][1])
        np.testing.assert_allclose(ck, _np_truncate(want, ranks[1])[0], rtol=1e-4, atol=1e-4)
        mine = _modules(lora_agg.truncate_to_rank(glob, ranks[1], 2.0 / scales[1]))[name]
        np.testing.assert_allclose(mine["lora_a"], c["lora_a"][1], rtol=1e-5, atol=1e-6)


def test_pad_rank_keeps_the_product_and_errors_name_the_tensor():
    rng = np.random.default_rng(1)
    small = {"q_proj": {"lora_a": jnp.asarray(rng.normal(size=(6, 2))),
                        "lora_b": jnp.asarray(rng.normal(size=(2, 5)))}}
    padded = lora_agg.pad_rank(small, 4)
    assert padded["q_proj"]["lora_a"].shape == (6, 4) and padded["q_proj"]["lora_b"].shape == (4, 5)
    np.testing.assert_allclose(lora_agg.effective_delta(padded, 1.0)["q_proj"]["kernel"],
                               small["q_proj"]["lora_a"] @ small["q_proj"]["lora_b"], rtol=1e-6)
    with pytest.raises(ValueError, match="q_proj/lora_a has shape"):
        lora_agg.naive(small, WEIGHTS)
    with pytest.raises(ValueError, match="no lora_a/lora_b"):
        lora_agg.naive({"w": jnp.zeros((K, 3))}, WEIGHTS)
