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


def _load_eval_set(ev, data: FederatedData, max_examples: int, batch_size: int) -> None:
    """Sets ev.indices (the clouds' eval examples, cloud by cloud), ev.cloud_of, ev.num_examples and
    the padded [M, B, T] ev.tokens / ev.mask shared by both evaluators."""
    per_cloud = [data.eval_indices(c, max_examples) for c in range(len(data.cloud_names))]
    ev.cloud_of = np.concatenate([np.full(len(ix), c) for c, ix in enumerate(per_cloud)])
    ev.indices = np.concatenate(per_cloud).astype(np.int64)
    ev.num_examples = len(ev.indices)
    if ev.num_examples:
        tokens, mask = eval_batches(data, ev.indices, batch_size)
        ev.tokens, ev.mask = jnp.asarray(tokens), jnp.asarray(mask)


class Evaluator:
    """Scores each eval example once; per-cloud figures are sums over that cloud's examples."""

    def __init__(self, apply_fn: Callable, data: FederatedData, max_examples: int, batch_size: int):
        _load_eval_set(self, data, max_examples, batch_size)

        def per_example(params, frozen, tokens_MxBxT, mask_MxBxT):
            def one(xs):
                tokens, mask = xs
                logits = apply_fn(params, frozen, tokens[:, :-1], None)
                weights = mask[:, 1:]
                return jnp.sum(token_nll(logits, tokens[:, 1:]) * weights, axis=1), jnp.sum(weights, axis=1)

            loss_MxB, ntok_MxB = jax.lax.map(one, (tokens_MxBxT, mask_MxBxT))
            return loss_MxB.reshape(-1), ntok_MxB.reshape(-1)

        self._score = jax.jit(per_example)

    def scores(self, params, frozen) -> tuple[np.ndarray, np.ndarray]:
        """(summed token loss, target tokens) of every eval example, in `indices` order."""
        loss, ntok = jax.device_get(self._score(params, frozen, self.tokens, self.mask))
        return loss[: self.num_examples], ntok[: self.num_examples]

    def __call__(self, params, frozen, cloud_names: Sequence[str], scored=None) -> dict:
        """The figures; `scored` (this model's `scores`, when the caller has them) skips a second pass."""
        if not self.num_examples:
            return dict(eval_loss=None, eval_ppl=None, clouds={n: {} for n in cloud_names})
        loss, ntok = scored if scored is not None else self.scores(params, frozen)
        clouds = {}
        for c, name in enumerate(cloud_names):
            sel = self.cloud_of == c
            n = float(ntok[sel].sum())
            value = float(loss[sel].sum() / n) if n else None
            clouds[name] = dict(eval_loss=value, eval_ppl=perplexity(value))
        total = float(loss.sum() / max(ntok.sum(), 1.0))
        return dict(eval_loss=total, eval_ppl=perplexity(total), clouds=clouds)


def classification_scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy and macro-F1 (the mean per-class F1 over classes present in labels or predictions)."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if not len(labels):
        return dict(accuracy=None, macro_f1=None)
    f1 = []
    for c in np.union1d(labels, predicted):
        tp = np.sum((predicted == c) & (labels == c))
        fp = np.sum((predicted == c) & (labels != c))
        fn = np.sum((predicted != c) & (labels == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return dict(accuracy=float(np.mean(labels == predicted)), macro_f1=float(np.mean(f1)))


class ClassifyEvaluator:
    """Classification counterpart of `Evaluator`: eval loss, accuracy and macro-F1, global and per cloud."""

    def __init__(self, apply_fn: Callable, data: FederatedData, max_examples: int, batch_size: int):
        from fedjax_llm.client import label_nll
        from fedjax_llm.data.federated import eval_labels
        _load_eval_set(self, data, max_examples, batch_size)
        if self.num_examples:
            tokens = self.tokens
            self.labels = eval_labels(data, self.indices)
            padded = np.zeros(tokens.shape[0] * tokens.shape[1], np.int32)
            padded[: self.num_examples] = self.labels
            self.labels_MxB = jnp.asarray(padded.reshape(tokens.shape[:2]))

        def per_example(params, frozen, tokens_MxBxT, mask_MxBxT, labels_MxB):
            def one(xs):
                tokens, mask, labels = xs
                logits = apply_fn(params, frozen, tokens, None, attention_mask=mask)
                nll, _ = jax.vmap(lambda l, y: label_nll(l[None], y[None], jnp.ones(1)))(logits, labels)
                return nll, jnp.argmax(logits, axis=-1)

            nll_MxB, pred_MxB = jax.lax.map(one, (tokens_MxBxT, mask_MxBxT, labels_MxB))
            return nll_MxB.reshape(-1), pred_MxB.reshape(-1)

        self._score = jax.jit(per_example)

    def predictions(self, params, frozen) -> tuple[np.ndarray, np.ndarray]:
        """(per-example loss, predicted label) over the eval set, in `indices` order."""
        nll, pred = jax.device_get(self._score(params, frozen, self.tokens, self.mask, self.labels_MxB))
        return nll[: self.num_examples], pred[: self.num_examples]

    scores = predictions

    def __call__(self, params, frozen, cloud_names: Sequence[str], scored=None) -> dict:
        """The figures; `scored` (this model's `predictions`, when the caller has them) skips a second pass."""
        if not self.num_examples:
            return dict(eval_loss=None, eval_acc=None, eval_f1=None, clouds={n: {} for n in cloud_names})
        nll, pred = scored if scored is not None else self.predictions(params, frozen)
        clouds = {}
        for c, name in enumerate(cloud_names):
            sel = self.cloud_of == c
            s = classification_scores(self.labels[sel], pred[sel])
            clouds[name] = dict(eval_loss=float(nll[sel].mean()) if sel.any() else None,
                                eval_acc=s["accuracy"], eval_f1=s["macro_f1"])
        s = classification_scores(self.labels, pred)
        return dict(eval_loss=float(nll.mean()), eval_acc=s["accuracy"], eval_f1=s["macro_f1"], clouds=clouds)


def make_evaluator(task: str, apply_fn: Callable, data: FederatedData, max_examples: int, batch_size: int):
    cls = ClassifyEvaluator if task == "classify" else Evaluator
    return cls(apply_fn, data, max_examples, batch_size)
