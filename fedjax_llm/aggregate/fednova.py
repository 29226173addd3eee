"""FedNova (Wang et al., NeurIPS 2020): normalised averaging for clients with unequal local steps.

Clients send their update divided by their own number of steps tau_i; the server rescales the
weighted mean of those by tau_eff = sum_i p_i tau_i, so clients that ran longer do not dominate.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_llm.aggregate.base import Aggregator
from fedjax_llm.aggregate.fedavg import EmptyState, weighted_mean
from fedjax_llm.client import ClientPiece
from fedjax_llm.types import CloudAggregate, Params


def fednova_piece() -> ClientPiece:
    """The client side: delta / tau_i (tau_i = steps actually taken)."""

    def finish(delta, steps, lr, state, broadcast):
        del lr, broadcast
        inv = 1.0 / jnp.maximum(steps, 1.0)
        return jax.tree.map(lambda d: d * inv.astype(d.dtype), delta), (), state

    return ClientPiece(name="fednova", finish=finish)


def fednova_aggregator() -> Aggregator:
    """The server side: tau_eff * weighted mean of the normalised deltas."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(msgs: CloudAggregate, state, params: Optional[Params] = None):
        del params
        tau_eff = jnp.sum(msgs.weight * msgs.steps) / jnp.maximum(jnp.sum(msgs.weight), 1e-12)
        mean = weighted_mean(msgs.delta, msgs.weight)
        return jax.tree.map(lambda m: m * tau_eff.astype(m.dtype), mean), state

    return Aggregator(init=init, update=update)
