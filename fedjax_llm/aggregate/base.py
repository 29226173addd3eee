"""Aggregation interfaces, optax style: pure init/update pairs over stacked updates.

Two levels meet in a round:
- a `Reducer` folds a cloud's clients into one `CloudAggregate`, chunk by chunk inside the jitted round
  (so thousands of clients stream through bounded memory), and across devices. The default keeps
  running weighted sums (the mean); `buffered_reducer` keeps every client's delta and applies a rule
  (median, Krum, ...) per cloud at the end;
- an `Aggregator` reduces the stacked cloud messages `[C, ...]` into the global update, with its own
  state (control variates, ...) threaded by the caller, and says what clients receive besides the
  params (`broadcast`).
New algorithms are new reducers, aggregators, client pieces or server optimizers; the round function
does not change.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_llm.types import ClientOutput, CloudAggregate, Params

AggState = Any
Rule = Callable[[Params, jax.Array], Params]  # (updates_N, weights_N) -> update; weight 0 = absent


class Aggregator(NamedTuple):
    """`init(params) -> state`; `update(msgs_N, state, params) -> (update, state)`; `broadcast(state)`.

    `msgs_N` is a `CloudAggregate` whose leaves carry a leading axis N; a message with weight 0 is
    absent (rejected, dropped or empty) and must not influence the result. All are jittable.
    """

    init: Callable[[Params], AggState]
    update: Callable[[CloudAggregate, AggState, Optional[Params]], tuple[Params, AggState]]
    broadcast: Callable[[AggState], dict] = lambda state: {}


class Reducer(NamedTuple):
    """Streaming fold of client outputs into per-cloud aggregates inside the jitted round.

    `init(template, num_clouds, slots) -> acc` (template: one client's ClientOutput; slots: clients
    per device); `accumulate(acc, outputs_n, onehot_nxC) -> acc` for a chunk of n clients whose
    absent members already have weight 0; `combine(acc, axis_name)` merges device accumulators inside
    `shard_map`; `finalize(acc) -> CloudAggregate` with a leading cloud axis C.
    """

    init: Callable[[ClientOutput, int, int], Any]
    accumulate: Callable[[Any, ClientOutput, jax.Array], Any]
    combine: Callable[[Any, str], Any]
    finalize: Callable[[Any], CloudAggregate]


def scatter_sum(onehot_nxC: jax.Array, values_n: jax.Array) -> jax.Array:
    """out[c, ...] = sum_k onehot[k, c] * values[k, ...], in float32."""
    flat = values_n.reshape(values_n.shape[0], -1).astype(jnp.float32)
    return (onehot_nxC.T @ flat).reshape((onehot_nxC.shape[1],) + values_n.shape[1:])


def _per_cloud(x_C: jax.Array, leaf: jax.Array) -> jax.Array:
    return x_C.reshape((-1,) + (1,) * (leaf.ndim - 1))


def _safe_div(total: jax.Array, count: jax.Array) -> jax.Array:
    return total / jnp.where(count > 0, count, 1.0)


def weighted_mean_reducer() -> Reducer:
    """Per-cloud example-weighted mean of client deltas as running f32 sums (FedAvg's fold); aux
    outputs are averaged uniformly over present clients, steps weighted like the deltas."""

    def init(template: ClientOutput, num_clouds: int, slots: int):
        del slots
        zeros = lambda x: jnp.zeros((num_clouds,) + x.shape, jnp.float32)
        scalar = jnp.zeros((num_clouds,), jnp.float32)
        return CloudAggregate(delta=jax.tree.map(zeros, template.delta), weight=scalar, steps=scalar,
                              aux=jax.tree.map(zeros, template.aux), loss_sum=scalar, tokens=scalar,
                              clients=scalar)

    def accumulate(acc: CloudAggregate, out: ClientOutput, onehot_nxC: jax.Array) -> CloudAggregate:
        w_nxC = onehot_nxC * out.weight[:, None]
        present_nxC = onehot_nxC * (out.weight > 0)[:, None]
        return CloudAggregate(
            delta=jax.tree.map(lambda a, d: a + scatter_sum(w_nxC, d), acc.delta, out.delta),
            weight=acc.weight + jnp.sum(w_nxC, axis=0),
            steps=acc.steps + w_nxC.T @ out.steps,
            aux=jax.tree.map(lambda a, d: a + scatter_sum(present_nxC, d), acc.aux, out.aux),
            loss_sum=acc.loss_sum + present_nxC.T @ out.loss_sum,
            tokens=acc.tokens + present_nxC.T @ out.tokens,
            clients=acc.clients + jnp.sum(present_nxC, axis=0))

    def combine(acc: CloudAggregate, axis_name: str) -> CloudAggregate:
        return jax.lax.psum(acc, axis_name)

    def finalize(acc: CloudAggregate) -> CloudAggregate:
        by_weight = lambda s: _safe_div(s, _per_cloud(acc.weight, s))
        by_clients = lambda s: _safe_div(s, _per_cloud(acc.clients, s))
        return acc.replace(delta=jax.tree.map(by_weight, acc.delta), steps=by_weight(acc.steps),
                           aux=jax.tree.map(by_clients, acc.aux))

    return Reducer(init=init, accumulate=accumulate, combine=combine, finalize=finalize)


def buffered_reducer(rule: Rule) -> Reducer:
    """Keeps each client's delta and applies `rule` per cloud at the end (robust rules need them all).

    Memory is one delta per client slot, so pair it with LoRA or modest cohorts. Everything but the
    delta (weights, steps, aux, losses) is folded exactly as in the mean reducer.
    """
    mean = weighted_mean_reducer()

    def init(template: ClientOutput, num_clouds: int, slots: int):
        buf = lambda x: jnp.zeros((slots,) + x.shape, x.dtype)
        return dict(sums=mean.init(template, num_clouds, slots),
                    delta=jax.tree.map(buf, template.delta), weight=jnp.zeros((slots,), jnp.float32),
                    onehot=jnp.zeros((slots, num_clouds), jnp.float32), pos=jnp.zeros((), jnp.int32))

    def accumulate(acc, out: ClientOutput, onehot_nxC: jax.Array):
        put = lambda b, x: jax.lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), acc["pos"], 0)
        return dict(sums=mean.accumulate(acc["sums"], out, onehot_nxC),
                    delta=jax.tree.map(put, acc["delta"], out.delta),
                    weight=put(acc["weight"], out.weight), onehot=put(acc["onehot"], onehot_nxC),
                    pos=acc["pos"] + out.weight.shape[0])

    def combine(acc, axis_name: str):
        gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
        return dict(sums=mean.combine(acc["sums"], axis_name), delta=jax.tree.map(gather, acc["delta"]),
                    weight=gather(acc["weight"]), onehot=gather(acc["onehot"]), pos=acc["pos"])

    def finalize(acc) -> CloudAggregate:
        sums = mean.finalize(acc["sums"])
        weights_CxN = (acc["weight"][:, None] * acc["onehot"]).T
        robust = jax.vmap(rule, in_axes=(None, 0))(acc["delta"], weights_CxN)
        return sums.replace(delta=jax.tree.map(lambda x: x.astype(jnp.float32), robust))

    return Reducer(init=init, accumulate=accumulate, combine=combine, finalize=finalize)
