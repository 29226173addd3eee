"""Tests for fedjax_llm.models against an independent NumPy forward pass and second code paths."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.models import (LlamaSpec, LoRASpec, abstract_params, count_params, init_model,
                               merge_lora, model_fns)
from fedjax_llm.models.lora import lora_dropout

# GQA (4 query heads on 2 kv heads), Qwen2-style bias, head_dim 12 != 32 / 4, untied head; a large
# norm_eps and a small rope_theta so that misusing either changes the logits visibly.
GQA = LlamaSpec(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                head_dim=12, qkv_bias=True, rope_theta=1000.0, norm_eps=0.1)
TIED = dataclasses.replace(GQA, tie_embeddings=True, qkv_bias=False, head_dim=None)
LORA = LoRASpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
B, T = 2, 10


def _tokens(spec: LlamaSpec, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, T), 0, spec.vocab_size, dtype=jnp.int32)


def _randomize(tree, seed: int):
    """Replaces every leaf by O(1)-scale noise, so wrong wiring gives visibly wrong logits."""
    rng = np.random.default_rng(seed)

    def noise(path, x):
        z = rng.standard_normal(x.shape)
        name = path[-1].key
        if name == "scale":
            z = 1.0 + 0.2 * z
        elif name == "bias":
            z = 0.3 * z
        elif name != "embedding":
            z = z / np.sqrt(x.shape[0])
        return jnp.asarray(z, x.dtype)

    return jax.tree_util.tree_map_with_path(noise, tree)


def _paths(tree, prefix=""):
    return {p for k, v in tree.items()
            for p in (_paths(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}"})}


def numpy_forward(spec: LlamaSpec, params, tokens_BxT) -> np.ndarray:
    """Reference Llama forward in float64, written from the HF formulas (repeat_kv, not groups)."""
    p = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64), params)
    tokens_BxT = np.asarray(tokens_BxT)
    b, t = tokens_BxT.shape
    h, kvh = spec.n_heads, spec.n_kv_heads
    hd = spec.head_dim or spec.d_model // spec.n_heads
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(t)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

    def rms(x, w):
        return w * x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + spec.norm_eps)

    def rotate_half(x):
        return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)

    def linear(m, x):
        y = x @ m["kernel"]
        return y + m["bias"] if "bias" in m else y

    x = p["embed_tokens"]["embedding"][tokens_BxT]
    for i in range(spec.n_layers):
        layer, attn = p["layers"][str(i)], p["layers"][str(i)]["self_attn"]
        y = rms(x, layer["input_layernorm"]["scale"])
        q = linear(attn["q_proj"], y).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
        k = linear(attn["k_proj"], y).reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)
        v = linear(attn["v_proj"], y).reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        o = (w / w.sum(-1, keepdims=True)) @ v
        x = x + linear(attn["o_proj"], o.transpose(0, 2, 1, 3).reshape(b, t, h * hd))
        y = rms(x, layer["post_attention_layernorm"]["scale"])
        mlp = layer["mlp"]
        g = linear(mlp["gate_proj"], y)
        x = x + linear(mlp["down_proj"], g / (1 + np.exp(-g)) * linear(mlp["up_proj"], y))
    x = rms(x, p["norm"]["scale"])
    head = p["embed_tokens"]["embedding"].T if spec.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


@pytest.mark.parametrize("spec", [GQA, TIED], ids=["gqa_bias_headdim", "tied"])
def test_matches_numpy_reference(spec):
    fns, trainable, frozen = init_model(spec, jax.random.key(0))
    params = _randomize(trainable, seed=3)
    tokens = _tokens(spec)
    logits = jax.jit(fns.apply)(params, frozen, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (B, T, spec.vocab_size)
    ref = numpy_forward(spec, params, tokens)
    assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero arrays
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5, rtol=1e-5)


def test_param_paths_mirror_hugging_face():
    _, trainable, frozen = init_model(GQA, jax.random.key(0))
    assert frozen == {}
    want = {"embed_tokens/embedding", "norm/scale", "lm_head/kernel"}
    for i in range(GQA.n_layers):
        want |= {f"layers/{i}/self_attn/{n}/kernel" for n in ("q_proj", "k_proj", "v_proj",
                                                             "o_proj")}
        want |= {f"layers/{i}/self_attn/{n}/bias" for n in ("q_proj", "k_proj", "v_proj")}
        want |= {f"layers/{i}/mlp/{n}/kernel" for n in ("gate_proj", "up_proj", "down_proj")}
        want |= {f"layers/{i}/input_layernorm/scale", f"layers/{i}/post_attention_layernorm/scale"}
    assert _paths(trainable) == want
    assert trainable["layers"]["0"]["self_attn"]["k_proj"]["kernel"].shape == (32, 2 * 12)
    assert trainable["lm_head"]["kernel"].shape == (32, 61)
    _, tied, _ = init_model(TIED, jax.random.key(0))
    assert "lm_head" not in tied


def test_causal():
    fns, trainable, frozen = init_model(GQA, jax.random.key(0))
    params = _randomize(trainable, seed=4)
    tokens = _tokens(GQA)
    changed = tokens.at[:, 6:].set((tokens[:, 6:] + 7) % GQA.vocab_size)
    apply = jax.jit(fns.apply)
    a, b = apply(params, frozen, tokens), apply(params, frozen, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
    assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).min() > 0  # later positions do see the change


def test_fresh_lora_matches_base_and_splits_by_type():
    spec = dataclasses.replace(GQA, lora=LORA)
    fns, adapters, base = init_model(spec, jax.random.key(0))
    base_fns, full, empty = init_model(dataclasses.replace(spec, lora=None), jax.random.key(0))
    assert empty == {}
    jax.tree.map(np.testing.assert_array_equal, base, full)  # same key -> same base weights
    assert all(p.rsplit("/", 1)[1] in ("lora_a", "lora_b") for p in _paths(adapters))
    assert not any("lora" in p for p in _paths(base))
    adapted = {p.rsplit("/", 2)[1] for p in _paths(adapters)}
    assert adapted == set(LORA.targets)
    assert np.abs(np.asarray(adapters["layers"]["1"]["mlp"]["down_proj"]["lora_a"])).max() > 0
    tokens = _tokens(spec)
    np.testing.assert_allclose(np.asarray(jax.jit(fns.apply)(adapters, base, tokens)),
                               np.asarray(jax.jit(base_fns.apply)(full, {}, tokens)), atol=1e-6)


def test_merge_lora_matches_unmerged_logits():
    spec = dataclasses.replace(GQA, lora=LORA)
    fns, adapters, base = init_model(spec, jax.random.key(0))
    adapters = _randomize(adapters, seed=5)
    merged = merge_lora(spec, adapters, base)
    assert _paths(merged) == _paths(base)
    tokens = _tokens(spec)
    unmerged_logits = jax.jit(fns.apply)(adapters, base, tokens)
    base_apply = jax.jit(model_fns(dataclasses.replace(spec, lora=None)).apply)
    merged_logits = base_apply(merged, {}, tokens)
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(unmerged_logits), atol=1e-5)
    by_hand = jax.tree.map(np.asarray, base)  # W + (alpha / rank) A B, folded in NumPy
    for i in range(spec.n_layers):
        for group, name in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")):
            a = np.asarray(adapters["layers"][str(i)][group][name]["lora_a"], np.float64)
            b = np.asarray(adapters["layers"][str(i)][group][name]["lora_b"], np.float64)
            by_hand["layers"][str(i)][group][name]["kernel"] = (
                by_hand["layers"][str(i)][group][name]["kernel"] + LORA.alpha / LORA.rank * a @ b)
    np.testing.assert_allclose(np.asarray(unmerged_logits), numpy_forward(spec, by_hand, tokens),
                               atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(base_apply(base, {}, tokens) - merged_logits)).max() > 1e-2


def test_param_counts():
    _, trainable, frozen = init_model(GQA, jax.random.key(0))
    assert count_params(trainable) + count_params(frozen) == GQA.param_count()
    spec = dataclasses.replace(GQA, lora=LORA)
    _, adapters, base = init_model(spec, jax.random.key(0))
    shapes = spec.projection_shapes()
    per_layer = sum(LORA.rank * (shapes[t][0] + shapes[t][1]) for t in LORA.targets)
    assert count_params(base) == GQA.param_count()
    assert count_params(adapters) == GQA.n_layers * per_layer
    abstract = abstract_params(spec)
    assert isinstance(jax.tree.leaves(abstract)[0], jax.ShapeDtypeStruct)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
        lambda x: (x.shape, x.dtype), (adapters, base))


def test_vmap_over_trainable_with_frozen_unbatched():
    spec = dataclasses.replace(GQA, lora=LORA)
    fns, adapters, base = init_model(spec, jax.random.key(0))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[_randomize(adapters, seed=s) for s in (10, 11, 12)])
    tokens = _tokens(spec)
    batched = jax.jit(jax.vmap(fns.apply, in_axes=(0, None, None)))(stacked, base, tokens)
    apply = jax.jit(fns.apply)
    for i in range(3):
        one = apply(jax.tree.map(lambda x: x[i], stacked), base, tokens)
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(one), atol=1e-6)
    assert np.abs(np.asarray(batched[0] - batched[1])).max() > 1e-3


def test_bfloat16():
    spec = dataclasses.replace(GQA, param_dtype="bfloat16", compute_dtype="bfloat16", lora=LORA)
    fns, adapters, base = init_model(spec, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves((adapters, base))} == {jnp.dtype(jnp.bfloat16)}
    base = _randomize(base, seed=6)
    tokens = _tokens(spec)
    logits = jax.jit(fns.apply)(adapters, base, tokens)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    ref = numpy_forward(spec, base, tokens)  # same bf16 weights, f64 arithmetic
    np.testing.assert_allclose(np.asarray(logits), ref, atol=0.15 * np.abs(ref).max())


def test_lora_dropout():
    lora = LoRASpec(rank=4, alpha=8.0, dropout=0.5, targets=("q_proj", "up_proj"))
    spec = dataclasses.replace(GQA, n_layers=1, lora=lora)  # one layer keeps the compile short
    fns, adapters, base = init_model(spec, jax.random.key(0))
    base = _randomize(base, seed=7)
    tokens = _tokens(spec)
    apply = jax.jit(fns.apply)
    fresh = np.asarray(apply(adapters, base, tokens))
    np.testing.assert_allclose(np.asarray(apply(adapters, base, tokens, jax.random.key(7))), fresh,
                               atol=1e-6)  # lora_b = 0: dropout cannot matter yet
    adapters = _randomize(adapters, seed=8)
    plain = np.asarray(apply(adapters, base, tokens))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    d1, d1_again, d2 = (np.asarray(apply(adapters, base, tokens, k)) for k in (k1, k1, k2))
    assert np.abs(d1 - plain).max() > 1e-3
    assert np.abs(d1 - d2).max() > 1e-3
    np.testing.assert_array_equal(d1, d1_again)
    x = jnp.ones((2, 3))
    assert lora_dropout(x, 0.0, k1) is x and lora_dropout(x, 0.5, None) is x
    kept = np.asarray(lora_dropout(jnp.ones((4000,)), 0.25, k1))
    assert set(np.unique(kept)) == {0.0, np.float32(1 / 0.75)} and abs((kept > 0).mean() - 0.75) < 0.03


def test_apply_is_cached_per_spec_and_rejects_wrong_trees():
    fns_a, trainable, frozen = init_model(GQA, jax.random.key(0))
    fns_b, _, _ = init_model(GQA, jax.random.key(1))
    assert fns_a.apply is fns_b.apply  # one jit cache per spec, not per init call
    apply = jax.jit(fns_a.apply)
    tokens = _tokens(GQA)
    apply(trainable, frozen, tokens)
    apply(_randomize(trainable, seed=9), frozen, tokens)
    assert apply._cache_size() == 1
    broken = dict(trainable, norm={"scale": jnp.ones((5,))})
    with pytest.raises(ValueError, match="norm/scale"):
        fns_a.apply(broken, frozen, tokens)
