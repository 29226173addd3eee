"""Flax NNX BERT encoder with the numerics of Hugging Face `BertModel` / `BertForSequenceClassification`.

Post-LayerNorm blocks over word + position + token-type embeddings, a padding mask on the keys, a
tanh pooler on the first token and an optional classifier; LoRA may adapt any of its projections.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_llm.models.layers import ACT_FNS, LayerNorm, attention, check_length, dropout
from fedjax_llm.models.llama import Embed, fold_key
from fedjax_llm.models.lora import LoRALinear, adapted_linear, init_value
from fedjax_llm.models.spec import BertSpec


class HeadParam(nnx.Param):
    """A task-head weight: trained even under LoRA, because it starts random (PEFT modules_to_save)."""


class Head(nnx.Module):
    """Linear classifier whose weights are HeadParam; logits in float32."""

    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, param_dtype: jnp.dtype):
        self.kernel = HeadParam(init_value("kernel", rngs.params(), (d_in, d_out), param_dtype))
        self.bias = HeadParam(jnp.zeros((d_out,), param_dtype))

    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        return (jnp.dot(x_BxD, self.kernel[...].astype(x_BxD.dtype),
                        preferred_element_type=jnp.float32) + self.bias[...].astype(jnp.float32))


def _projection(spec: BertSpec, name: str, d_in: int, d_out: int, rngs: nnx.Rngs) -> LoRALinear:
    """A biased projection, with adapters when spec.lora targets `name`."""
    return adapted_linear(spec, name, d_in, d_out, rngs, True)


class Embeddings(nnx.Module):
    """LayerNorm(word + token_type + absolute position embeddings), then dropout."""

    def __init__(self, spec: BertSpec, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(spec.param_dtype), jnp.dtype(spec.compute_dtype)
        self.word = Embed(spec.vocab_size, spec.d_model, rngs, pdt, cdt)
        self.position = Embed(spec.max_positions, spec.d_model, rngs, pdt, cdt)
        self.token_type = Embed(spec.type_vocab_size, spec.d_model, rngs, pdt, cdt)
        self.norm = LayerNorm(spec.d_model, spec.norm_eps, pdt, cdt)
        self.rate = spec.hidden_dropout

    def __call__(self, tokens_BxT: jax.Array, token_type_BxT: jax.Array,
                 key: Optional[jax.Array]) -> jax.Array:
        t = tokens_BxT.shape[1]
        h_BxTxD = (self.word(tokens_BxT) + self.token_type(token_type_BxT)
                   + self.position(jnp.arange(t)[None, :]))
        return dropout(self.norm(h_BxTxD), self.rate, key)


class BertLayer(nnx.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + output(act(intermediate(x))))."""

    def __init__(self, spec: BertSpec, rngs: nnx.Rngs):
        d, f = spec.d_model, spec.ffn_dim
        pdt, cdt = jnp.dtype(spec.param_dtype), jnp.dtype(spec.compute_dtype)
        self.query = _projection(spec, "query", d, d, rngs)
        self.key = _projection(spec, "key", d, d, rngs)
        self.value = _projection(spec, "value", d, d, rngs)
        self.attention_output = _projection(spec, "attention_output", d, d, rngs)
        self.attention_norm = LayerNorm(d, spec.norm_eps, pdt, cdt)
        self.intermediate = _projection(spec, "intermediate", d, f, rngs)
        self.output = _projection(spec, "output", f, d, rngs)
        self.output_norm = LayerNorm(d, spec.norm_eps, pdt, cdt)
        self.n_heads = spec.n_heads
        self.activation = spec.activation
        self.hidden_dropout = spec.hidden_dropout
        self.attn_dropout = spec.attn_dropout

    def __call__(self, x_BxTxD: jax.Array, mask_BxT: Optional[jax.Array],
                 key: Optional[jax.Array]) -> jax.Array:
        b, t, d = x_BxTxD.shape
        n = self.n_heads
        k = lambda i: fold_key(key, i)  # noqa: E731
        q = self.query(x_BxTxD, k(10)).reshape(b, t, n, d // n)
        kk = self.key(x_BxTxD, k(11)).reshape(b, t, n, d // n)
        v = self.value(x_BxTxD, k(12)).reshape(b, t, n, d // n)
        ctx_BxTxNxH = attention(q, kk, v, causal=False, key_mask_BxS=mask_BxT,
                                dropout_rate=self.attn_dropout, dropout_key=k(0))
        a_BxTxD = self.attention_output(ctx_BxTxNxH.reshape(b, t, d), k(13))
        x_BxTxD = self.attention_norm(x_BxTxD + dropout(a_BxTxD, self.hidden_dropout, k(1)))
        h_BxTxF = ACT_FNS[self.activation](self.intermediate(x_BxTxD, k(14)))
        o_BxTxD = self.output(h_BxTxF, k(15))
        return self.output_norm(x_BxTxD + dropout(o_BxTxD, self.hidden_dropout, k(2)))


class Bert(nnx.Module):
    """Embeddings, n_layers encoder blocks, tanh pooler on token 0 and an optional classifier."""

    def __init__(self, spec: BertSpec, rngs: nnx.Rngs):
        pdt, cdt = jnp.dtype(spec.param_dtype), jnp.dtype(spec.compute_dtype)
        self.embeddings = Embeddings(spec, rngs)
        self.layers = nnx.List([BertLayer(spec, rngs) for _ in range(spec.n_layers)])
        self.pooler = LoRALinear(spec.d_model, spec.d_model, rngs=rngs, use_bias=True,
                                 param_dtype=pdt, compute_dtype=cdt)
        self.classifier = Head(spec.d_model, spec.num_labels, rngs, pdt) if spec.num_labels else None
        self.spec = spec

    def __call__(self, tokens_BxT: jax.Array, dropout_key: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None,
                 token_type_ids: Optional[jax.Array] = None) -> jax.Array:
        """spec.output: hidden [B, T, D], pooled [B, D] or logits [B, num_labels], all float32.

        attention_mask [B, T] is 1 on real tokens and 0 on padding; HF's dropouts act only with a key.
        """
        check_length(self.spec, tokens_BxT.shape[1])
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens_BxT)
        h_BxTxD = self.embeddings(tokens_BxT, token_type_ids, fold_key(dropout_key, 0))
        for i, layer in enumerate(self.layers):
            h_BxTxD = layer(h_BxTxD, attention_mask, fold_key(dropout_key, i + 1))
        if self.spec.output == "hidden":
            return h_BxTxD.astype(jnp.float32)
        pooled_BxD = jnp.tanh(self.pooler(h_BxTxD[:, 0]))
        if self.spec.output == "pooled":
            return pooled_BxD.astype(jnp.float32)
        pooled_BxD = dropout(pooled_BxD, self.spec.classifier_dropout,
                             fold_key(dropout_key, self.spec.n_layers + 1))
        return self.classifier(pooled_BxD)
