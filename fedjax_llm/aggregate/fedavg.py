"""FedAvg (McMahan et al., AISTATS 2017) and FedOpt's server optimizers (Reddi et al., ICLR 2021).

The global update is the example-weighted mean of the cloud messages; the server applies an optax
optimizer to the pseudo-gradient `-update`. Plain FedAvg is SGD with learning rate 1, FedAvgM adds
momentum, FedAdam / FedYogi / FedAdagrad swap in those optimizers.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_llm.aggregate.base import Aggregator, Rule
from fedjax_llm.types import CloudAggregate, Params


class EmptyState(NamedTuple):
    """For aggregators that keep no state; still checkpoints and threads like any other."""


def weighted_mean(updates_N: Params, weights_N: jax.Array) -> Params:
    """sum_i w_i u_i / sum_i w_i over the leading axis; all-zero weights give a zero update."""
    w = weights_N.astype(jnp.float32)
    total = jnp.sum(w)
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)

    def mean(u):
        # where() keeps NaN/Inf of absent (zero-weight) entries out of the sum.
        present = (w > 0).reshape((-1,) + (1,) * (u.ndim - 1))
        safe = jnp.where(present, u.astype(jnp.float32), 0.0)
        return (jnp.tensordot(w, safe, axes=1) * scale).astype(u.dtype)

    return jax.tree.map(mean, updates_N)


def rule_aggregator(rule: Rule) -> Aggregator:
    """A stateless aggregator applying `rule` to the stacked messages' deltas and weights."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(msgs: CloudAggregate, state, params: Optional[Params] = None):
        del params
        return rule(msgs.delta, msgs.weight), state

    return Aggregator(init=init, update=update)


def fedavg() -> Aggregator:
    """The FedAvg aggregator: the weighted mean of the messages."""
    return rule_aggregator(weighted_mean)


def server_optimizer(name: str, lr: float, momentum: float = 0.9, b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation:
    """The optimizer the server applies to the pseudo-gradient -aggregate (eps is FedOpt's tau)."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=momentum)
    if name == "adam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    if name == "yogi":
        return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
    if name == "adagrad":
        return optax.adagrad(lr, initial_accumulator_value=0.0, eps=eps)
    raise ValueError(f"algorithm.server_optimizer: unknown optimizer {name!r}")
