"""A Linear projection with optional low-rank adapters beside its kernel (Hu et al., 2021).

Base weights are `nnx.Param` and adapters are `nnx.LoRAParam`, so one type filter separates the
frozen base from what a LoRA client trains. Adapter paths sit next to the kernel they adapt
(`q_proj/kernel`, `q_proj/lora_a`, `q_proj/lora_b`), mirroring PEFT's per-module layout.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

# Hugging Face Llama initialises projections and embeddings from N(0, initializer_range=0.02);
# PEFT's kaiming_uniform(a=sqrt(5)) gives lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) over [in, r].
# One table by leaf name, so params.init can draw every leaf of a kind in one RNG call.
INIT_STDDEV = 0.02
INIT_RULES: dict[str, str] = {"kernel": "normal", "embedding": "normal", "lora_a": "uniform",
                              "lora_b": "zeros", "bias": "zeros", "scale": "ones"}


def init_scale(name: str, shape: tuple[int, ...]) -> float:
    """Std of a "normal" leaf or half-width of a "uniform" one."""
    return INIT_STDDEV if INIT_RULES[name] == "normal" else shape[0] ** -0.5


def init_value(name: str, key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """Initial value of one leaf by INIT_RULES (the per-leaf path used when building a module)."""
    rule = INIT_RULES[name]
    if rule == "normal":
        return (init_scale(name, shape) * jax.random.normal(key, shape)).astype(dtype)
    if rule == "uniform":
        return (init_scale(name, shape) * jax.random.uniform(key, shape, minval=-1.0)).astype(dtype)
    return (jnp.ones if rule == "ones" else jnp.zeros)(shape, dtype)


def lora_dropout(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout on the adapter input; the identity without a key or at rate 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


class LoRALinear(nnx.Module):
    """y = x W (+ b) + scale * dropout(x) A B in compute_dtype; plain Linear when rank is None."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = False,
                 lora_rank: Optional[int] = None, lora_scale: float = 1.0,
                 lora_dropout: float = 0.0, param_dtype: jnp.dtype = jnp.float32,
                 compute_dtype: jnp.dtype = jnp.float32):
        self.kernel = nnx.Param(init_value("kernel", rngs.params(), (d_in, d_out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if use_bias else None
        if lora_rank is not None:
            # A separate "lora" stream keeps the base weights identical with and without adapters.
            self.lora_a = nnx.LoRAParam(init_value("lora_a", rngs.lora(), (d_in, lora_rank),
                                                   param_dtype))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank, d_out), param_dtype))
        else:
            self.lora_a = None
            self.lora_b = None
        self.lora_scale = lora_scale
        self.lora_dropout = lora_dropout
        self.compute_dtype = compute_dtype

    def __call__(self, x_BxTxI: jax.Array, dropout_key: Optional[jax.Array] = None) -> jax.Array:
        cdt = self.compute_dtype
        x_BxTxI = x_BxTxI.astype(cdt)
        y_BxTxO = x_BxTxI @ self.kernel[...].astype(cdt)
        if self.bias is not None:
            y_BxTxO = y_BxTxO + self.bias[...].astype(cdt)
        if self.lora_a is not None:
            xd_BxTxI = lora_dropout(x_BxTxI, self.lora_dropout, dropout_key)
            z_BxTxR = xd_BxTxI @ self.lora_a[...].astype(cdt)
            y_BxTxO = y_BxTxO + (z_BxTxR @ self.lora_b[...].astype(cdt)) * jnp.asarray(
                self.lora_scale, cdt)
        return y_BxTxO


def adapted_linear(spec, name: str, d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool) -> "LoRALinear":
    """The named projection of a model spec (any family), with adapters when spec.lora targets it."""
    lora = spec.lora
    adapted = lora is not None and name in lora.targets
    return LoRALinear(d_in, d_out, rngs=rngs, use_bias=use_bias,
                      lora_rank=lora.rank if adapted else None,
                      lora_scale=lora.scale if adapted else 1.0,
                      lora_dropout=lora.dropout if adapted else 0.0,
                      param_dtype=jnp.dtype(spec.param_dtype),
                      compute_dtype=jnp.dtype(spec.compute_dtype))
