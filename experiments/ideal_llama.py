"""An "ideal" Llama training step for the benchmarks: written plainly, independently of fedjax_llm.models.

No masks, no dropout, no trainable/frozen split and merge, no algorithm pieces: a dict of arrays, a
Python loop over layers, RMSNorm, RoPE (non-interleaved halves), grouped-query causal attention through
jax.nn.dot_product_attention, a SwiGLU MLP, an untied lm_head, next-token cross-entropy averaged over
every position. LoRA puts low-rank adapters on the query and value projections and differentiates only
them. The optimizer is the engine's (global-norm clip, then AdamW), so the work per step is the same.

    ideal = IdealLlama(vocab=512, d=128, layers=2, heads=4, kv_heads=4, ffn=344, lora_rank=0)
    params = ideal.init(jax.random.key(0))
    step = ideal.train_step(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class IdealLlama:
    vocab: int
    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    lora_rank: int = 0  # > 0: adapters of this rank on q and v; the base is frozen
    lora_alpha: float = 16.0
    theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d // self.heads

    def init(self, key: jax.Array) -> dict:
        """{"base": every weight, "lora": adapters (empty without LoRA)}."""
        d, hd = self.d, self.head_dim
        shapes = {"wq": (d, self.heads * hd), "wk": (d, self.kv_heads * hd), "wv": (d, self.kv_heads * hd),
                  "wo": (self.heads * hd, d), "w_gate": (d, self.ffn), "w_up": (d, self.ffn), "w_down": (self.ffn, d)}
        keys = iter(jax.random.split(key, 2 + self.layers * (len(shapes) + 2)))
        normal = lambda shape: 0.02 * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
        layers = [dict({n: normal(s) for n, s in shapes.items()}, attn_norm=jnp.ones(d), mlp_norm=jnp.ones(d))
                  for _ in range(self.layers)]
        base = {"embed": normal((self.vocab, d)), "layers": layers, "norm": jnp.ones(d),
                "lm_head": normal((d, self.vocab))}
        lora = []
        if self.lora_rank:
            r = self.lora_rank
            lora = [{"qa": normal((d, r)), "qb": jnp.zeros((r, self.heads * hd)),
                     "va": normal((d, r)), "vb": jnp.zeros((r, self.kv_heads * hd))} for _ in range(self.layers)]
        return {"base": base, "lora": lora}

    def _norm(self, x: jax.Array, scale: jax.Array) -> jax.Array:
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale

    def _rope(self, x_BxTxNxH: jax.Array) -> jax.Array:
        t, hd = x_BxTxNxH.shape[1], x_BxTxNxH.shape[-1]
        inv = 1.0 / (self.theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
        ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
        cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
        x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def logits(self, base: dict, lora: list, tokens_BxT: jax.Array) -> jax.Array:
        b, t = tokens_BxT.shape
        hd, scale = self.head_dim, self.lora_alpha / max(self.lora_rank, 1)
        x = base["embed"][tokens_BxT]
        for i, w in enumerate(base["layers"]):
            h = self._norm(x, w["attn_norm"])
            q, v = h @ w["wq"], h @ w["wv"]
            if lora:
                q = q + scale * (h @ lora[i]["qa"]) @ lora[i]["qb"]
                v = v + scale * (h @ lora[i]["va"]) @ lora[i]["vb"]
            q = self._rope(q.reshape(b, t, self.heads, hd))
            k = self._rope((h @ w["wk"]).reshape(b, t, self.kv_heads, hd))
            attn = jax.nn.dot_product_attention(q, k, v.reshape(b, t, self.kv_heads, hd), is_causal=True)
            x = x + attn.reshape(b, t, self.heads * hd) @ w["wo"]
            h = self._norm(x, w["mlp_norm"])
            x = x + (jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]
        return self._norm(x, base["norm"]) @ base["lm_head"]

    def loss(self, trainable, frozen, tokens_BxT: jax.Array) -> jax.Array:
        base, lora = (frozen, trainable) if self.lora_rank else (trainable, [])
        logits = self.logits(base, lora, tokens_BxT[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxT[:, 1:]))

    def split(self, params: dict) -> tuple:
        """(trainable, frozen): the adapters and the base with LoRA, else every weight and nothing."""
        return (params["lora"], params["base"]) if self.lora_rank else (params["base"], None)

    def train_step(self, opt: optax.GradientTransformation) -> Callable:
        """step((trainable, opt_state), frozen, tokens_BxT) -> (trainable, opt_state): one optimizer step."""
        grad = jax.grad(self.loss)

        def step(carry, frozen, tokens_BxT):
            trainable, state = carry
            updates, state = opt.update(grad(trainable, frozen, tokens_BxT), state, trainable)
            return optax.apply_updates(trainable, updates), state

        return step


def count(tree) -> int:
    return sum(int(a.size) for a in jax.tree.leaves(tree))


def matmul_params(ideal: IdealLlama) -> int:
    """Weights that take part in a matmul per token (the embedding lookup does not)."""
    d, hd, f = ideal.d, ideal.head_dim, ideal.ffn
    per_layer = d * ideal.heads * hd * 2 + d * ideal.kv_heads * hd * 2 + 3 * d * f
    return ideal.layers * per_layer + d * ideal.vocab


def flops_per_token(ideal: IdealLlama, seq: int) -> float:
    """Training FLOPs per token: 6 x matmul params + 12 x layers x seq x width (attention scores and
    values, forward and backward); a frozen base needs no weight gradients: 4 x its matmul params, plus
    6 x the adapters'."""
    attention = 12 * ideal.layers * seq * ideal.d
    if not ideal.lora_rank:
        return 6 * matmul_params(ideal) + attention
    adapters = ideal.layers * ideal.lora_rank * (2 * ideal.d + ideal.heads * ideal.head_dim
                                                 + ideal.kv_heads * ideal.head_dim)
    return 4 * matmul_params(ideal) + 6 * adapters + attention
