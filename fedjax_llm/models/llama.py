"""Flax NNX decoder-only transformer of the Llama family (Mistral via GQA, Qwen2 via qkv_bias).

Numerics follow Hugging Face `LlamaForCausalLM` (f32 RMSNorm, non-interleaved RoPE, f32 softmax) and
attribute names follow its state dict, so import/export is a rename plus a kernel transpose. With
spec.num_labels it is `LlamaForSequenceClassification` (also Qwen2/Mistral): `score` on the last
real token instead of lm_head.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_llm.models.lora import LoRALinear, adapted_linear, init_value
from fedjax_llm.models.spec import LORA_TARGETS, LlamaSpec


def fold_key(key: Optional[jax.Array], i: int) -> Optional[jax.Array]:
    """A distinct dropout key per layer or projection; None stays None (deterministic)."""
    return None if key is None else jax.random.fold_in(key, i)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [T, hd] of HF Llama's rotary embedding, computed in f32 for positions 0..T-1."""
    inv_freq_Hh = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_TxHh = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq_Hh[None, :]
    emb_TxH = jnp.concatenate([freqs_TxHh, freqs_TxHh], axis=-1)
    return jnp.cos(emb_TxH), jnp.sin(emb_TxH)


def rope_at(positions_BxT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, hd] at each row's own positions (KV-cache decoding); same f32 math as rope_tables."""
    inv_freq_Hh = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BxTxHh = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_Hh
    emb_BxTxH = jnp.concatenate([freqs_BxTxHh, freqs_BxTxHh], axis=-1)
    return jnp.cos(emb_BxTxH), jnp.sin(emb_BxTxH)


def apply_rope(x_BxTxNxH: jax.Array, cos_TxH: jax.Array, sin_TxH: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin over the two halves of the last axis (HF, not interleaved).

    cos/sin are [T, hd] (shared positions) or [B, T, hd] (per-row positions, from rope_at).
    """
    if cos_TxH.ndim == 3:
        bshape = cos_TxH.shape[:2] + (1,) + cos_TxH.shape[2:]
    else:
        t, hd = cos_TxH.shape
        bshape = (t,) + (1,) * (x_BxTxNxH.ndim - 3) + (hd,)
    cos = cos_TxH.reshape(bshape).astype(x_BxTxNxH.dtype)
    sin = sin_TxH.reshape(bshape).astype(x_BxTxNxH.dtype)
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BxTxNxH * cos + rotated * sin


def causal_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array) -> jax.Array:
    """Grouped-query causal attention; query head n reads kv head n // (N / K), as HF's repeat_kv.

    jax.nn.dot_product_attention groups heads without repeating K/V, scales by 1/sqrt(head_dim) and
    keeps logits and softmax in f32; on the 2-core CPU it timed level with (<=2% ahead of) a
    hand-written grouped einsum (10 AdamW steps, w-tiny, B16 T64).
    """
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=True)


class KVCache(NamedTuple):
    """One layer's keys and values [B, S, K, hd] for positions 0..S-1 (rotated keys, compute dtype)."""

    k: jax.Array
    v: jax.Array


def cached_attention(q_BxTxNxH: jax.Array, cache: KVCache, positions_BxT: jax.Array) -> jax.Array:
    """Grouped-query attention of T new queries over the cache; query at position p sees keys <= p.

    Cache slots past a row's position hold stale or padding entries: the mask hides them.
    """
    s = cache.k.shape[1]
    mask_Bx1xTxS = (jnp.arange(s)[None, None, :] <= positions_BxT[:, :, None])[:, None]
    return jax.nn.dot_product_attention(q_BxTxNxH, cache.k, cache.v, mask=mask_Bx1xTxS)


def write_cache(cache_BxSxKxH: jax.Array, new_BxTxKxH: jax.Array, start_B: jax.Array) -> jax.Array:
    """Writes each row's T new entries at slots start_b..start_b+T-1 (the caller keeps them < S)."""
    put = lambda c, x, s: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (s, 0, 0))  # noqa: E731
    return jax.vmap(put)(cache_BxSxKxH, new_BxTxKxH, start_B)


def last_token(h_BxTxD: jax.Array, attention_mask: Optional[jax.Array]) -> jax.Array:
    """Each row's hidden state at its rightmost real token [B, D]; the last position without a mask.

    HF's *ForSequenceClassification finds that token as the rightmost one != pad_token_id; we take
    it from the mask (1 on real tokens), which agrees whenever pads sit only where the mask is 0.
    A row without real tokens reads position 0, as HF's argmax does.
    """
    if attention_mask is None:
        return h_BxTxD[:, -1]
    t = h_BxTxD.shape[1]
    idx_B = jnp.argmax(jnp.arange(t)[None, :] * (attention_mask != 0), axis=-1)
    return jnp.take_along_axis(h_BxTxD, idx_B[:, None, None], axis=1)[:, 0]


class Score(nnx.Module):
    """HF's bias-free `score` head; its kernel is a HeadParam, so it trains under LoRA too."""

    def __init__(self, d_in: int, num_labels: int, rngs: nnx.Rngs, param_dtype: jnp.dtype):
        from fedjax_llm.models.bert import HeadParam  # bert imports this module: import late
        self.kernel = HeadParam(init_value("kernel", rngs.params(), (d_in, num_labels),
                                           param_dtype))

    def __call__(self, h_BxD: jax.Array) -> jax.Array:
        return jnp.dot(h_BxD, self.kernel[...].astype(h_BxD.dtype),
                       preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """HF Llama RMSNorm: normalise in f32, cast back to the compute dtype, then scale."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, compute_dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.compute_dtype = compute_dtype

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x32 = x_BxTxD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        cdt = self.compute_dtype
        return self.scale[...].astype(cdt) * x32.astype(cdt)


class Embed(nnx.Module):
    """Token embedding table [V, D]; the lookup is cast to the compute dtype."""

    def __init__(self, vocab_size: int, dim: int, rngs: nnx.Rngs, param_dtype: jnp.dtype,
                 compute_dtype: jnp.dtype):
        self.embedding = nnx.Param(init_value("embedding", rngs.params(), (vocab_size, dim),
                                              param_dtype))
        self.compute_dtype = compute_dtype

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.compute_dtype)


def _projection(spec: LlamaSpec, name: str, rngs: nnx.Rngs, use_bias: bool = False) -> LoRALinear:
    """The named projection of one layer, with adapters when spec.lora targets it."""
    d_in, d_out = spec.projection_shapes()[name]
    return adapted_linear(spec, name, d_in, d_out, rngs, use_bias)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and optional q/k/v bias (Qwen2); no o_proj bias."""

    def __init__(self, spec: LlamaSpec, rngs: nnx.Rngs):
        self.q_proj = _projection(spec, "q_proj", rngs, spec.qkv_bias)
        self.k_proj = _projection(spec, "k_proj", rngs, spec.qkv_bias)
        self.v_proj = _projection(spec, "v_proj", rngs, spec.qkv_bias)
        self.o_proj = _projection(spec, "o_proj", rngs)
        self.n_heads = spec.n_heads
        self.n_kv_heads = spec.n_kv_heads
        self.head_dim = spec.resolved_head_dim

    def __call__(self, x_BxTxD: jax.Array, cos_TxH: jax.Array, sin_TxH: jax.Array,
                 dropout_key: Optional[jax.Array] = None) -> jax.Array:
        b, t, _ = x_BxTxD.shape
        n, kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        key = lambda name: fold_key(dropout_key, LORA_TARGETS.index(name))  # noqa: E731
        q_BxTxNxH = self.q_proj(x_BxTxD, key("q_proj")).reshape(b, t, n, hd)
        k_BxTxKxH = self.k_proj(x_BxTxD, key("k_proj")).reshape(b, t, kv, hd)
        v_BxTxKxH = self.v_proj(x_BxTxD, key("v_proj")).reshape(b, t, kv, hd)
        q_BxTxNxH = apply_rope(q_BxTxNxH, cos_TxH, sin_TxH)
        k_BxTxKxH = apply_rope(k_BxTxKxH, cos_TxH, sin_TxH)
        out_BxTxNxH = causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
        return self.o_proj(out_BxTxNxH.reshape(b, t, n * hd), key("o_proj"))

    def decode(self, x_BxTxD: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array,
               cache: KVCache, start_B: jax.Array) -> tuple[jax.Array, KVCache]:
        """Attention for T new tokens at positions start_b.. of each row, reading and extending the cache."""
        b, t, _ = x_BxTxD.shape
        n, kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q_BxTxNxH = apply_rope(self.q_proj(x_BxTxD).reshape(b, t, n, hd), cos_BxTxH, sin_BxTxH)
        k_BxTxKxH = apply_rope(self.k_proj(x_BxTxD).reshape(b, t, kv, hd), cos_BxTxH, sin_BxTxH)
        v_BxTxKxH = self.v_proj(x_BxTxD).reshape(b, t, kv, hd)
        cache = KVCache(write_cache(cache.k, k_BxTxKxH, start_B),
                        write_cache(cache.v, v_BxTxKxH, start_B))
        positions_BxT = start_B[:, None] + jnp.arange(t)[None, :]
        out_BxTxNxH = cached_attention(q_BxTxNxH, cache, positions_BxT)
        return self.o_proj(out_BxTxNxH.reshape(b, t, n * hd)), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, spec: LlamaSpec, rngs: nnx.Rngs):
        self.gate_proj = _projection(spec, "gate_proj", rngs)
        self.up_proj = _projection(spec, "up_proj", rngs)
        self.down_proj = _projection(spec, "down_proj", rngs)

    def __call__(self, x_BxTxD: jax.Array, dropout_key: Optional[jax.Array] = None) -> jax.Array:
        key = lambda name: fold_key(dropout_key, LORA_TARGETS.index(name))  # noqa: E731
        h_BxTxF = jax.nn.silu(self.gate_proj(x_BxTxD, key("gate_proj"))) * self.up_proj(
            x_BxTxD, key("up_proj"))
        return self.down_proj(h_BxTxF, key("down_proj"))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, spec: LlamaSpec, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(spec.param_dtype), jnp.dtype(spec.compute_dtype)
        self.input_layernorm = RMSNorm(spec.d_model, spec.norm_eps, pdt, cdt)
        self.self_attn = Attention(spec, rngs)
        self.post_attention_layernorm = RMSNorm(spec.d_model, spec.norm_eps, pdt, cdt)
        self.mlp = MLP(spec, rngs)

    def __call__(self, x_BxTxD: jax.Array, cos_TxH: jax.Array, sin_TxH: jax.Array,
                 dropout_key: Optional[jax.Array] = None) -> jax.Array:
        h_BxTxD = x_BxTxD + self.self_attn(self.input_layernorm(x_BxTxD), cos_TxH, sin_TxH,
                                           dropout_key)
        return h_BxTxD + self.mlp(self.post_attention_layernorm(h_BxTxD), dropout_key)

    def decode(self, x_BxTxD: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array,
               cache: KVCache, start_B: jax.Array) -> tuple[jax.Array, KVCache]:
        attn_BxTxD, cache = self.self_attn.decode(self.input_layernorm(x_BxTxD), cos_BxTxH,
                                                  sin_BxTxH, cache, start_B)
        h_BxTxD = x_BxTxD + attn_BxTxD
        return h_BxTxD + self.mlp(self.post_attention_layernorm(h_BxTxD)), cache


class Llama(nnx.Module):
    """Embedding, n_layers decoder blocks, final norm and lm_head (tied embeddings, or score)."""

    def __init__(self, spec: LlamaSpec, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(spec.param_dtype), jnp.dtype(spec.compute_dtype)
        self.embed_tokens = Embed(spec.vocab_size, spec.d_model, rngs, pdt, cdt)
        self.layers = nnx.List([DecoderLayer(spec, rngs) for _ in range(spec.n_layers)])
        self.norm = RMSNorm(spec.d_model, spec.norm_eps, pdt, cdt)
        self.lm_head = (None if spec.tie_embeddings or spec.num_labels else
                        LoRALinear(spec.d_model, spec.vocab_size, rngs=rngs, param_dtype=pdt,
                                   compute_dtype=cdt))
        self.score = Score(spec.d_model, spec.num_labels, rngs, pdt) if spec.num_labels else None
        self.head_dim = spec.resolved_head_dim
        self.rope_theta = spec.rope_theta
        self.compute_dtype = cdt

    def __call__(self, tokens_BxT: jax.Array, dropout_key: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """Causal LM logits [B, T, V], or with a score head [B, num_labels]; float32.

        attention_mask [B, T] (1 on real tokens, right padding) only picks the classified token:
        causal attention already keeps real positions blind to the padding after them. LoRA
        dropout acts only when dropout_key is given.
        """
        cos_TxH, sin_TxH = rope_tables(tokens_BxT.shape[1], self.head_dim, self.rope_theta)
        h_BxTxD = self.embed_tokens(tokens_BxT)
        for i, layer in enumerate(self.layers):
            h_BxTxD = layer(h_BxTxD, cos_TxH, sin_TxH, fold_key(dropout_key, i))
        if self.score is not None:
            return self.score(last_token(self.norm(h_BxTxD), attention_mask))
        return self._logits(h_BxTxD)

    def decode(self, tokens_BxT: jax.Array, cache: tuple[KVCache, ...],
               start_B: jax.Array) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """Logits [B, T, V] of T new tokens at positions start_b..start_b+T-1 and the extended cache.

        Prefill is one call with T = prompt length and start 0; each decode step is T = 1. Numerics
        are those of __call__ (no dropout), so cached logits equal the full forward's.
        """
        if self.score is not None:
            raise ValueError("Llama.decode: a classifier (spec.num_labels set) has no lm_head")
        t = tokens_BxT.shape[1]
        positions_BxT = start_B[:, None] + jnp.arange(t)[None, :]
        cos_BxTxH, sin_BxTxH = rope_at(positions_BxT, self.head_dim, self.rope_theta)
        h_BxTxD = self.embed_tokens(tokens_BxT)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            h_BxTxD, layer_cache = layer.decode(h_BxTxD, cos_BxTxH, sin_BxTxH, layer_cache, start_B)
            new_cache.append(layer_cache)
        return self._logits(h_BxTxD), tuple(new_cache)

    def _logits(self, h_BxTxD: jax.Array) -> jax.Array:
        """Final norm and lm_head (or the tied embedding), logits in float32."""
        h_BxTxD = self.norm(h_BxTxD)
        if self.lm_head is None:
            head_DxV = self.embed_tokens.embedding[...].T
        else:
            head_DxV = self.lm_head.kernel[...]
        return jnp.einsum("btd,dv->btv", h_BxTxD, head_DxV.astype(self.compute_dtype),
                          preferred_element_type=jnp.float32)
