"""Held-out evaluation of the global model: each cloud scores its own held-out examples, the figures are
summed per cloud, and the run's metrics combine them (global and per cloud).

A cloud's figures are sums (loss and token counts; for classification correct answers and per-class
true/false positives and false negatives), so the aggregator combines them exactly, whether the clouds
run in this process (the simulation) or in their own (a deployment): macro-F1 over summed per-class
counts is the macro-F1 over all examples. Each cloud's examples are scored in batches of their own, so a
cloud's figures do not depend on which process scores them.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.client import token_nll
from fedjax_llm.data.federated import FederatedData, eval_batches, eval_labels

Figures = dict  # one cloud's sums: {"loss_sum", "count"} (+ {"correct", "tp", "fp", "fn"} for classify)


def perplexity(loss: float | None) -> float | None:
    """exp(mean token loss), capped at exp(50) so a diverged model still logs a number."""
    return None if loss is None else float(math.exp(min(loss, 50.0)))


def _eval_sets(data: FederatedData, max_examples: int, clouds: Optional[Sequence[int]]) -> list[np.ndarray]:
    """Each cloud's eval examples (empty for a cloud outside `clouds`)."""
    keep = range(len(data.cloud_names)) if clouds is None else clouds
    return [data.eval_indices(c, max_examples) if c in keep else np.zeros(0, np.int64)
            for c in range(len(data.cloud_names))]


def macro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> Optional[float]:
    """Mean per-class F1 over the classes present in the labels or the predictions."""
    present = (tp + fp + fn) > 0
    if not present.any():
        return None
    return float(np.mean([2 * t / (2 * t + p + n) for t, p, n in zip(tp[present], fp[present], fn[present])]))


def classification_scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy and macro-F1 (the mean per-class F1 over classes present in labels or predictions)."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if not len(labels):
        return dict(accuracy=None, macro_f1=None)
    classes = np.union1d(labels, predicted)
    tp, fp, fn = (np.array([np.sum(f(c)) for c in classes]) for f in (
        lambda c: (predicted == c) & (labels == c), lambda c: (predicted == c) & (labels != c),
        lambda c: (predicted != c) & (labels == c)))
    return dict(accuracy=float(np.mean(labels == predicted)), macro_f1=macro_f1(tp, fp, fn))


def empty_figures(task: str, num_labels: Optional[int]) -> Figures:
    out = dict(loss_sum=np.float64(0), count=np.float64(0))
    if task == "classify":
        L = int(num_labels or 0)
        out.update(correct=np.int64(0), tp=np.zeros(L, np.int64), fp=np.zeros(L, np.int64), fn=np.zeros(L, np.int64))
    return out


def cloud_metrics(task: str, f: Figures) -> dict:
    """One cloud's (or the union's) eval metrics from its figures."""
    n = float(f["count"])
    loss = float(f["loss_sum"]) / n if n else None
    if task != "classify":
        return dict(eval_loss=loss, eval_ppl=perplexity(loss))
    return dict(eval_loss=loss, eval_acc=float(f["correct"]) / n if n else None,
                eval_f1=macro_f1(np.asarray(f["tp"]), np.asarray(f["fp"]), np.asarray(f["fn"])) if n else None)


def combine(task: str, figures: Mapping[str, Optional[Figures]], cloud_names: Sequence[str]) -> dict:
    """The run's eval metrics from each cloud's figures (None: the cloud did not report), in cloud order."""
    got = [figures[n] for n in cloud_names if figures.get(n) is not None]
    if not got:
        return dict(**cloud_metrics(task, dict(loss_sum=0.0, count=0.0)), clouds={n: {} for n in cloud_names})
    clouds = {n: cloud_metrics(task, figures.get(n) or dict(loss_sum=0.0, count=0.0)) for n in cloud_names}
    total = {k: sum((np.asarray(f[k]) for f in got[1:]), np.asarray(got[0][k])) for k in got[0]}
    return dict(**cloud_metrics(task, total), clouds=clouds)


class Evaluator:
    """Scores the held-out examples of `clouds` (default: all), cloud by cloud in batches of its own,
    with one compiled batch function; `figures` gives each cloud's sums, `__call__` the combined metrics."""

    def __init__(self, task: str, apply_fn: Callable, data: FederatedData, max_examples: int, batch_size: int,
                 clouds: Optional[Sequence[int]] = None):
        self.task, self.cloud_names = task, list(data.cloud_names)
        self.num_labels = data.num_labels
        per_cloud = _eval_sets(data, max_examples, clouds)
        self.cloud_of = np.concatenate([np.full(len(ix), c) for c, ix in enumerate(per_cloud)])
        self.indices = np.concatenate(per_cloud).astype(np.int64)  # cloud by cloud
        self.num_examples = len(self.indices)
        self._batches = []  # per cloud: (tokens [M, B, T], mask, labels [M, B] or None, examples)
        for ix in per_cloud:
            if not len(ix):
                self._batches.append(None)
                continue
            tokens, mask = eval_batches(data, ix, batch_size)
            labels = None
            if task == "classify":
                padded = np.zeros(tokens.shape[0] * tokens.shape[1], np.int32)
                padded[:len(ix)] = eval_labels(data, ix)
                labels = padded.reshape(tokens.shape[:2])
            self._batches.append((tokens, mask, labels, len(ix)))
        self.labels = eval_labels(data, self.indices) if task == "classify" and self.num_examples else None
        self._score = jax.jit(_classify_batch(apply_fn) if task == "classify" else _lm_batch(apply_fn))

    def _per_example(self, params, frozen, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Cloud c's (per-example loss, token count or predicted label), in its eval order."""
        tokens, mask, labels, n = self._batches[c]
        outs = [self._score(params, frozen, tokens[m], mask[m], *(() if labels is None else (labels[m],)))
                for m in range(tokens.shape[0])]
        a, b = (np.concatenate(x)[:n] for x in zip(*jax.device_get(outs)))
        return a, b

    def scores(self, params, frozen) -> tuple[np.ndarray, np.ndarray]:
        """Per example over the eval set, in `indices` order: (loss, target tokens) for language modelling,
        (loss, predicted label) for classification. Each cloud's examples are scored in its own batches."""
        parts = [self._per_example(params, frozen, c) for c in range(len(self.cloud_names))
                 if self._batches[c] is not None]
        return tuple(np.concatenate(x) for x in zip(*parts)) if parts else (np.zeros(0), np.zeros(0, np.int64))

    predictions = scores  # classification: (per-example loss, predicted label)

    def figures(self, params, frozen, scored=None) -> dict[str, Optional[Figures]]:
        """Each cloud's sums over its eval examples (None for a cloud without any here); `scored` (this
        model's `scores`, when the caller has them) skips a second pass."""
        first_all, second_all = scored if scored is not None else self.scores(params, frozen)
        out = {}
        for c, name in enumerate(self.cloud_names):
            if self._batches[c] is None:
                out[name] = None
                continue
            sel = self.cloud_of == c
            first, second = np.asarray(first_all)[sel], np.asarray(second_all)[sel]
            f = dict(loss_sum=np.float64(np.sum(first, dtype=np.float64)))
            if self.task != "classify":
                f["count"] = np.float64(np.sum(second, dtype=np.float64))
            else:
                labels = self._batches[c][2].reshape(-1)[:len(second)]
                L = int(self.num_labels)
                f.update(count=np.float64(len(second)), correct=np.int64(np.sum(second == labels)),
                         tp=np.bincount(labels[second == labels], minlength=L).astype(np.int64),
                         fp=np.bincount(second[second != labels], minlength=L).astype(np.int64),
                         fn=np.bincount(labels[second != labels], minlength=L).astype(np.int64))
            out[name] = f
        return out

    def __call__(self, params, frozen, cloud_names: Optional[Sequence[str]] = None, scored=None) -> dict:
        return combine(self.task, self.figures(params, frozen, scored), cloud_names or self.cloud_names)


def _lm_batch(apply_fn: Callable) -> Callable:
    def score(params, frozen, tokens_BxT, mask_BxT):
        logits = apply_fn(params, frozen, tokens_BxT[:, :-1], None)
        weights = mask_BxT[:, 1:]
        return jnp.sum(token_nll(logits, tokens_BxT[:, 1:]) * weights, axis=1), jnp.sum(weights, axis=1)
    return score


def _classify_batch(apply_fn: Callable) -> Callable:
    from fedjax_llm.client import label_nll

    def score(params, frozen, tokens_BxT, mask_BxT, labels_B):
        logits = apply_fn(params, frozen, tokens_BxT, None, attention_mask=mask_BxT)
        nll, _ = jax.vmap(lambda l, y: label_nll(l[None], y[None], jnp.ones(1)))(logits, labels_B)
        return nll, jnp.argmax(logits, axis=-1)
    return score


def make_evaluator(task: str, apply_fn: Callable, data: FederatedData, max_examples: int, batch_size: int,
                   clouds: Optional[Sequence[int]] = None) -> Evaluator:
    return Evaluator(task, apply_fn, data, max_examples, batch_size, clouds)
