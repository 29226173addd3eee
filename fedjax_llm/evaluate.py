"""Held-out evaluation of the global model: loss and perplexity, global and per cloud, in one pass."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.client import token_nll
from fedjax_llm.data.federated import FederatedData, eval_batches


def perplexity(loss: float | None) -> float | None:
    """exp(mean token loss), capped at exp(50) so a diverged model still logs a number."""
    return None if loss is None else float(math.exp(min(loss, 50.0)))


class Evaluator:
    """Scores each eval example once; per-cloud figures are sums over that cloud's examples."""

    def __init__(self, apply_fn: Callable, data: FederatedData, max_examples: int, batch_size: int):
        per_cloud = [data.eval_indices(c, max_examples) for c in range(len(data.cloud_names))]
        self.cloud_of = np.concatenate([np.full(len(ix), c) for c, ix in enumerate(per_cloud)])
        self.indices = np.concatenate(per_cloud).astype(np.int64)
        self.num_examples = len(self.indices)
        if self.num_examples:
            tokens, mask = eval_batches(data, self.indices, batch_size)
            self.tokens, self.mask = jnp.asarray(tokens), jnp.asarray(mask)

        def per_example(params, frozen, tokens_MxBxT, mask_MxBxT):
            def one(xs):
                tokens, mask = xs
                logits = apply_fn(params, frozen, tokens[:, :-1], None)
                weights = mask[:, 1:]
                return jnp.sum(token_nll(logits, tokens[:, 1:]) * weights, axis=1), jnp.sum(weights, axis=1)

            loss_MxB, ntok_MxB = jax.lax.map(one, (tokens_MxBxT, mask_MxBxT))
            return loss_MxB.reshape(-1), ntok_MxB.reshape(-1)

        self._score = jax.jit(per_example)

    def __call__(self, params, frozen, cloud_names: Sequence[str]) -> dict:
        if not self.num_examples:
            return dict(eval_loss=None, eval_ppl=None, clouds={n: {} for n in cloud_names})
        loss, ntok = jax.device_get(self._score(params, frozen, self.tokens, self.mask))
        loss, ntok = loss[: self.num_examples], ntok[: self.num_examples]
        clouds = {}
        for c, name in enumerate(cloud_names):
            sel = self.cloud_of == c
            n = float(ntok[sel].sum())
            value = float(loss[sel].sum() / n) if n else None
            clouds[name] = dict(eval_loss=value, eval_ppl=perplexity(value))
        total = float(loss.sum() / max(ntok.sum(), 1.0))
        return dict(eval_loss=total, eval_ppl=perplexity(total), clouds=clouds)
