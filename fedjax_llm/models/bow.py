"""Bag-of-embeddings text classifier: the small classic model of the "traditional FL" baseline.

logits = out(relu(hidden(mean of the real tokens' embeddings))), with the hidden layer optional
(spec.hidden = 0 drops it). No attention, no positions, no LoRA: every weight trains.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_llm.models.llama import Embed
from fedjax_llm.models.lora import LoRALinear
from fedjax_llm.models.spec import BowSpec

__all__ = ["Bow", "BowSpec", "masked_mean"]


def masked_mean(x_BxTxD: jax.Array, attention_mask: Optional[jax.Array]) -> jax.Array:
    """Mean over the tokens whose mask is 1, in float32 [B, D]; all tokens without a mask.

    A row with no real token gives zeros rather than NaN.
    """
    x32 = x_BxTxD.astype(jnp.float32)
    if attention_mask is None:
        return jnp.mean(x32, axis=1)
    m_BxT = (attention_mask != 0).astype(jnp.float32)
    total_BxD = jnp.einsum("btd,bt->bd", x32, m_BxT)
    return total_BxD / jnp.maximum(jnp.sum(m_BxT, axis=1, keepdims=True), 1.0)


class Bow(nnx.Module):
    """Token embedding [V, D] -> masked mean -> optional ReLU layer [D, H] -> linear [., L]."""

    def __init__(self, spec: BowSpec, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(spec.param_dtype), jnp.dtype(spec.compute_dtype)
        dense = lambda d_in, d_out: LoRALinear(d_in, d_out, rngs=rngs, use_bias=True,  # noqa: E731
                                               param_dtype=pdt, compute_dtype=cdt)
        self.embed = Embed(spec.vocab_size, spec.d_model, rngs, pdt, cdt)
        self.hidden = dense(spec.d_model, spec.hidden) if spec.hidden else None
        self.out = dense(spec.hidden or spec.d_model, spec.num_labels)
        self.compute_dtype = cdt

    def __call__(self, tokens_BxT: jax.Array, dropout_key: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """Logits [B, num_labels] in float32; attention_mask [B, T] is 1 on real tokens.

        dropout_key is accepted for the common apply signature and unused (no dropout here).
        """
        x_BxD = masked_mean(self.embed(tokens_BxT), attention_mask).astype(self.compute_dtype)
        if self.hidden is not None:
            x_BxD = jax.nn.relu(self.hidden(x_BxD))
        return self.out(x_BxD).astype(jnp.float32)
