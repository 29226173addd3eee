"""Flax NNX GPT-2 with the numerics of Hugging Face `GPT2LMHeadModel` and LoRA on its projections.

HF's Conv1D stores weights as [in, out], which is already our kernel layout, so c_attn stays one fused
[D, 3D] projection (as PEFT adapts it) and import/export copies kernels without a transpose. With
spec.num_labels it is `GPT2ForSequenceClassification`: `score` on the last real token, no lm_head.
`GPT2.decode` is the KV-cached forward for generation (positions offset by each row's cache start).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_llm.models.layers import ACT_FNS, LayerNorm, attention, check_length, dropout
from fedjax_llm.models.llama import (Embed, KVCache, Score, cached_attention, fold_key, last_token,
                                     write_cache)
from fedjax_llm.models.lora import LoRALinear, adapted_linear
from fedjax_llm.models.spec import GPT2Spec

# fold_in indices of the dropout sites inside one block (LoRA dropout uses 10 + projection index).
_ATTN_PROBS, _ATTN_RESID, _MLP_RESID = 0, 1, 2


def _projection(spec: GPT2Spec, name: str, d_in: int, d_out: int, rngs: nnx.Rngs) -> LoRALinear:
    """A biased Conv1D-equivalent projection, with adapters when spec.lora targets `name`."""
    return adapted_linear(spec, name, d_in, d_out, rngs, True)


class GPT2Attention(nnx.Module):
    """Causal multi-head attention from one fused c_attn projection, then c_proj."""

    def __init__(self, spec: GPT2Spec, rngs: nnx.Rngs):
        d = spec.d_model
        self.c_attn = _projection(spec, "c_attn", d, 3 * d, rngs)
        self.c_proj = _projection(spec, "c_proj", d, d, rngs)
        self.n_heads = spec.n_heads
        self.attn_dropout = spec.attn_dropout

    def __call__(self, x_BxTxD: jax.Array, key: Optional[jax.Array]) -> jax.Array:
        b, t, d = x_BxTxD.shape
        n = self.n_heads
        qkv_BxTx3D = self.c_attn(x_BxTxD, fold_key(key, 10))
        q, k, v = (y.reshape(b, t, n, d // n) for y in jnp.split(qkv_BxTx3D, 3, axis=-1))
        out_BxTxNxH = attention(q, k, v, causal=True, dropout_rate=self.attn_dropout,
                                dropout_key=fold_key(key, _ATTN_PROBS))
        return self.c_proj(out_BxTxNxH.reshape(b, t, d), fold_key(key, 11))

    def decode(self, x_BxTxD: jax.Array, cache: KVCache, start_B: jax.Array
               ) -> tuple[jax.Array, KVCache]:
        """Attention for T new tokens at positions start_b.. of each row, reading and extending the cache."""
        b, t, d = x_BxTxD.shape
        n = self.n_heads
        q_BxTxNxH, k_BxTxNxH, v_BxTxNxH = (
            y.reshape(b, t, n, d // n) for y in jnp.split(self.c_attn(x_BxTxD), 3, axis=-1))
        cache = KVCache(write_cache(cache.k, k_BxTxNxH, start_B),
                        write_cache(cache.v, v_BxTxNxH, start_B))
        positions_BxT = start_B[:, None] + jnp.arange(t)[None, :]
        out_BxTxNxH = cached_attention(q_BxTxNxH, cache, positions_BxT)
        return self.c_proj(out_BxTxNxH.reshape(b, t, d)), cache


class GPT2MLP(nnx.Module):
    """c_proj(act(c_fc(x))), with HF's activation_function (gelu_new for GPT-2)."""

    def __init__(self, spec: GPT2Spec, rngs: nnx.Rngs):
        self.c_fc = _projection(spec, "c_fc", spec.d_model, spec.ffn_dim, rngs)
        self.c_proj = _projection(spec, "c_proj", spec.ffn_dim, spec.d_model, rngs)
        self.activation = spec.activation

    def __call__(self, x_BxTxD: jax.Array, key: Optional[jax.Array]) -> jax.Array:
        h_BxTxF = ACT_FNS[self.activation](self.c_fc(x_BxTxD, fold_key(key, 12)))
        return self.c_proj(h_BxTxF, fold_key(key, 13))


class GPT2Block(nnx.Module):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then h + mlp(ln_2(h))."""

    def __init__(self, spec: GPT2Spec, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(spec.param_dtype), jnp.dtype(spec.compute_dtype)
        self.ln_1 = LayerNorm(spec.d_model, spec.norm_eps, pdt, cdt)
        self.attn = GPT2Attention(spec, rngs)
        self.ln_2 = LayerNorm(spec.d_model, spec.norm_eps, pdt, cdt)
        self.mlp = GPT2MLP(spec, rngs)
        self.resid_dropout = spec.resid_dropout

    def __call__(self, x_BxTxD: jax.Array, key: Optional[jax.Array]) -> jax.Array:
        a_BxTxD = self.attn(self.ln_1(x_BxTxD), key)
        h_BxTxD = x_BxTxD + dropout(a_BxTxD, self.resid_dropout, fold_key(key, _ATTN_RESID))
        m_BxTxD = self.mlp(self.ln_2(h_BxTxD), key)
        return h_BxTxD + dropout(m_BxTxD, self.resid_dropout, fold_key(key, _MLP_RESID))

    def decode(self, x_BxTxD: jax.Array, cache: KVCache, start_B: jax.Array
               ) -> tuple[jax.Array, KVCache]:
        """The block of __call__ without dropout, attention reading and extending the cache."""
        a_BxTxD, cache = self.attn.decode(self.ln_1(x_BxTxD), cache, start_B)
        h_BxTxD = x_BxTxD + a_BxTxD
        return h_BxTxD + self.mlp(self.ln_2(h_BxTxD), None), cache


class GPT2(nnx.Module):
    """Token and learned position embeddings, n_layers blocks, ln_f, lm_head (or tied, or score)."""

    def __init__(self, spec: GPT2Spec, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(spec.param_dtype), jnp.dtype(spec.compute_dtype)
        self.wte = Embed(spec.vocab_size, spec.d_model, rngs, pdt, cdt)
        self.wpe = Embed(spec.n_positions, spec.d_model, rngs, pdt, cdt)
        self.h = nnx.List([GPT2Block(spec, rngs) for _ in range(spec.n_layers)])
        self.ln_f = LayerNorm(spec.d_model, spec.norm_eps, pdt, cdt)
        self.lm_head = (None if spec.tie_embeddings or spec.num_labels else
                        LoRALinear(spec.d_model, spec.vocab_size, rngs=rngs, param_dtype=pdt,
                                   compute_dtype=cdt))
        self.score = Score(spec.d_model, spec.num_labels, rngs, pdt) if spec.num_labels else None
        self.spec = spec

    def __call__(self, tokens_BxT: jax.Array, dropout_key: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """Causal LM logits [B, T, V], or with a score head [B, num_labels]; float32.

        attention_mask [B, T] (1 on real tokens, right padding) only picks the classified token
        (see llama.last_token). HF's dropouts (and LoRA's) act only with a key.
        """
        t = tokens_BxT.shape[1]
        check_length(self.spec, t)
        h_BxTxD = self.wte(tokens_BxT) + self.wpe(jnp.arange(t)[None, :])
        h_BxTxD = dropout(h_BxTxD, self.spec.embd_dropout, fold_key(dropout_key, 0))
        for i, block in enumerate(self.h):
            h_BxTxD = block(h_BxTxD, fold_key(dropout_key, i + 1))
        h_BxTxD = self.ln_f(h_BxTxD)
        if self.score is not None:
            return self.score(last_token(h_BxTxD, attention_mask))
        return self._logits(h_BxTxD)

    def decode(self, tokens_BxT: jax.Array, cache: tuple[KVCache, ...],
               start_B: jax.Array) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """Logits [B, T, V] of T new tokens at positions start_b..start_b+T-1 and the extended cache.

        Prefill is one call at start 0, each decode step T = 1; the learned position of a token is
        its row's start plus its offset, so cached logits equal __call__'s (no dropout).
        """
        if self.score is not None:
            raise ValueError("GPT2.decode: a classifier (spec.num_labels set) has no lm_head")
        positions_BxT = start_B[:, None] + jnp.arange(tokens_BxT.shape[1])[None, :]
        h_BxTxD = self.wte(tokens_BxT) + self.wpe(positions_BxT)
        new_cache = []
        for block, block_cache in zip(self.h, cache):
            h_BxTxD, block_cache = block.decode(h_BxTxD, block_cache, start_B)
            new_cache.append(block_cache)
        return self._logits(self.ln_f(h_BxTxD)), tuple(new_cache)

    def _logits(self, h_BxTxD: jax.Array) -> jax.Array:
        """lm_head (or the tied wte) on the final-normed hidden states, logits in float32."""
        head_DxV = (self.wte.embedding[...].T if self.lm_head is None else
                    self.lm_head.kernel[...])
        return jnp.einsum("btd,dv->btv", h_BxTxD, head_DxV.astype(h_BxTxD.dtype),
                          preferred_element_type=jnp.float32)
