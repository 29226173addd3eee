"""FedAvg (McMahan et al., AISTATS 2017): the example-weighted mean of updates, and server optimizers.

FedOpt (Reddi et al., ICLR 2021) is the same mean followed by an optax optimizer on the server, applied
to the pseudo-gradient `-mean_delta`; plain FedAvg is that optimizer being SGD with learning rate 1.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_llm.aggregate.base import Aggregator
from fedjax_llm.config import AggregatorConfig
from fedjax_llm.types import Params


class FedAvgState(NamedTuple):
    """FedAvg keeps no state; the empty tuple still checkpoints and threads like any other."""


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


def fedavg() -> Aggregator:
    """The FedAvg aggregator over stacked updates."""

    def init(params: Params) -> FedAvgState:
        del params
        return FedAvgState()

    def update(updates_N, weights_N, state, params: Optional[Params] = None):
        del params
        return weighted_mean(updates_N, weights_N), state

    return Aggregator(init=init, update=update)


def server_optimizer(cfg: AggregatorConfig) -> optax.GradientTransformation:
    """The optimizer the server applies to the pseudo-gradient -aggregate."""
    if cfg.server_optimizer == "sgd":
        return optax.sgd(cfg.server_lr)
    if cfg.server_optimizer == "momentum":
        return optax.sgd(cfg.server_lr, momentum=cfg.server_momentum)
    if cfg.server_optimizer == "adam":
        return optax.adam(cfg.server_lr, b1=cfg.server_b1, b2=cfg.server_b2, eps=cfg.server_eps)
    raise ValueError(f"aggregator.server_optimizer: unknown {cfg.server_optimizer!r}")


def make_aggregator(cfg: AggregatorConfig) -> Aggregator:
    if cfg.name == "fedavg":
        return fedavg()
    raise ValueError(f"aggregator.name: unknown aggregator {cfg.name!r}")
