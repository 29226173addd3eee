"""Aggregation interfaces, optax style: pure init/update pairs over stacked updates.

Two levels meet in a round:
- a `Reducer` folds a cloud's clients into one `CloudAggregate`, chunk by chunk inside the jitted round
  (so thousands of clients stream through bounded memory), and across devices;
- an `Aggregator` reduces the stacked cloud messages `[C, ...]` into the global update, with its own
  state (momentum, control variates, privacy noise keys, ...) threaded by the caller.
New algorithms are new reducers, aggregators or client terms; the round function does not change.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_llm.types import ClientOutput, CloudAggregate, Params

AggState = Any


class Aggregator(NamedTuple):
    """`init(params) -> state`; `update(updates_N, weights_N, state, params) -> (update, state)`.

    `updates_N` is a pytree whose leaves carry a leading axis N (clouds or clients); `weights_N` is
    `[N]` and a weight of 0 means the entry is absent (dropped, rejected or padding) and must not
    influence the result. Both functions are jittable.
    """

    init: Callable[[Params], AggState]
    update: Callable[[Params, jax.Array, AggState, Optional[Params]], tuple[Params, AggState]]


class Reducer(NamedTuple):
    """Streaming fold of client outputs into per-cloud aggregates inside the jitted round.

    `init(template, num_clouds) -> acc`; `accumulate(acc, outputs_n, onehot_nxC) -> acc` for a chunk
    of n clients (`outputs_n.weight` is already 0 for absent clients); `combine(acc, axis_name)`
    merges per-device accumulators inside `shard_map`; `finalize(acc) -> CloudAggregate` with a
    leading cloud axis C.
    """

    init: Callable[[Params, int], Any]
    accumulate: Callable[[Any, ClientOutput, jax.Array], Any]
    combine: Callable[[Any, str], Any]
    finalize: Callable[[Any], CloudAggregate]


def _scatter_sum(onehot_nxC: jax.Array, values_n: jax.Array) -> jax.Array:
    """Sums `values_n[k, ...]` into clouds: out[c, ...] = sum_k onehot[k, c] * values[k, ...]."""
    flat = values_n.reshape(values_n.shape[0], -1).astype(jnp.float32)
    return (onehot_nxC.T @ flat).reshape((onehot_nxC.shape[1],) + values_n.shape[1:])


def weighted_mean_reducer() -> Reducer:
    """Per-cloud example-weighted mean of client deltas, kept as running f32 sums (FedAvg's fold)."""

    def init(template: Params, num_clouds: int):
        zeros = lambda x: jnp.zeros((num_clouds,) + x.shape, jnp.float32)
        scalar = jnp.zeros((num_clouds,), jnp.float32)
        return CloudAggregate(delta=jax.tree.map(zeros, template), weight=scalar, loss_sum=scalar,
                              tokens=scalar, clients=scalar)

    def accumulate(acc: CloudAggregate, out: ClientOutput, onehot_nxC: jax.Array) -> CloudAggregate:
        w_nxC = onehot_nxC * out.weight[:, None]
        present_nxC = onehot_nxC * (out.weight > 0)[:, None]
        return CloudAggregate(
            delta=jax.tree.map(lambda a, d: a + _scatter_sum(w_nxC, d), acc.delta, out.delta),
            weight=acc.weight + jnp.sum(w_nxC, axis=0),
            loss_sum=acc.loss_sum + present_nxC.T @ out.loss_sum,
            tokens=acc.tokens + present_nxC.T @ out.tokens,
            clients=acc.clients + jnp.sum(present_nxC, axis=0))

    def combine(acc: CloudAggregate, axis_name: str) -> CloudAggregate:
        return jax.lax.psum(acc, axis_name)

    def finalize(acc: CloudAggregate) -> CloudAggregate:
        denom = jnp.where(acc.weight > 0, acc.weight, 1.0)
        mean = lambda s: s / denom.reshape((-1,) + (1,) * (s.ndim - 1))
        return acc.replace(delta=jax.tree.map(mean, acc.delta))

    return Reducer(init=init, accumulate=accumulate, combine=combine, finalize=finalize)
