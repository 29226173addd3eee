"""Pieces shared by the GPT-2 and BERT modules: LayerNorm, activations, dropout, masked attention.

Numerics follow PyTorch/Hugging Face in float32 (LayerNorm statistics and softmax in f32), so f32
logits match `transformers` to ~1e-6.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

# Hugging Face ACT2FN names -> functions ("gelu" is the exact erf form, "gelu_new" the tanh one).
ACT_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm: statistics in f32 (biased variance), then scale and shift."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype, compute_dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.compute_dtype = compute_dtype

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x32 = x_BxTxD.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.compute_dtype)


def dropout(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout as torch's train mode; the identity without a key (eval) or at rate 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def attention(q_BxTxNxH: jax.Array, k_BxSxNxH: jax.Array, v_BxSxNxH: jax.Array, *,
              causal: bool, key_mask_BxS: Optional[jax.Array] = None, dropout_rate: float = 0.0,
              dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """Softmax(q k^T / sqrt(H) + mask) v with f32 logits; masked keys get float32 min as in HF."""
    hd = q_BxTxNxH.shape[-1]
    logits_BxNxTxS = jnp.einsum("btnh,bsnh->bnts", q_BxTxNxH, k_BxSxNxH,
                                preferred_element_type=jnp.float32) / math.sqrt(hd)
    t, s = logits_BxNxTxS.shape[-2:]
    allowed = jnp.ones((1, 1, t, s), bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, s), bool))[None, None]
    if key_mask_BxS is not None:
        allowed = allowed & key_mask_BxS.astype(bool)[:, None, None, :]
    logits_BxNxTxS = jnp.where(allowed, logits_BxNxTxS, jnp.finfo(jnp.float32).min)
    probs_BxNxTxS = jax.nn.softmax(logits_BxNxTxS, axis=-1)
    probs_BxNxTxS = dropout(probs_BxNxTxS, dropout_rate, dropout_key).astype(v_BxSxNxH.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs_BxNxTxS, v_BxSxNxH)


def check_length(spec: object, seq_len: int) -> None:
    """Raises naming the config field when seq_len exceeds what the model computes exactly."""
    field, limit = spec.max_len()  # type: ignore[attr-defined]
    if limit is not None and seq_len > limit:
        raise ValueError(f"models.apply: sequence length {seq_len} exceeds {field}={limit} of "
                         f"{type(spec).__name__}")
