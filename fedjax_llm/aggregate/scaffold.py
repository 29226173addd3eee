"""SCAFFOLD (Karimireddy et al., ICML 2020), option II: control variates correct client drift.

Client i corrects each gradient by (c - c_i), and after K local steps with learning rate eta sets
c_i+ = c_i - c + (x - y_i) / (K eta). The server moves x by the mean delta (through its optimizer) and
c by |S|/N times the mean of (c_i+ - c_i) over the |S| clients that reported, N the population.
Each client's c_i lives in the server state across rounds (and in checkpoints).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_llm.aggregate.base import Aggregator
from fedjax_llm.aggregate.fedavg import weighted_mean
from fedjax_llm.client import ClientPiece
from fedjax_llm.types import CloudAggregate, Params

NAME = "scaffold"


def scaffold_piece() -> ClientPiece:
    """The client side: gradient correction and the option-II control-variate update."""

    def init_state(params: Params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def adjust_grads(grads, c_i, c):
        return jax.tree.map(lambda g, ci, cg: g + (cg - ci).astype(g.dtype), grads, c_i, c)

    def finish(delta, steps, lr, c_i, c):
        scale = 1.0 / (jnp.maximum(steps, 1.0) * lr)
        c_new = jax.tree.map(lambda ci, cg, d: ci - cg - d.astype(jnp.float32) * scale, c_i, c, delta)
        # A client that took no step keeps its control variate.
        c_new = jax.tree.map(lambda new, old: jnp.where(steps > 0, new, old), c_new, c_i)
        dc = jax.tree.map(lambda new, old: new - old, c_new, c_i)
        return delta, dc, c_new

    return ClientPiece(name=NAME, init_state=init_state, adjust_grads=adjust_grads, finish=finish)


class ScaffoldState(NamedTuple):
    c: Params  # the server control variate


def scaffold_aggregator(population: int) -> Aggregator:
    """The server side: weighted mean of deltas; c += (|S| / N) * mean over clients of dc."""

    def init(params: Params) -> ScaffoldState:
        return ScaffoldState(c=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update(msgs: CloudAggregate, state: ScaffoldState, params: Optional[Params] = None):
        del params
        clients = jnp.where(msgs.weight > 0, msgs.clients, 0.0)  # messages that arrived
        mean_dc = weighted_mean(msgs.aux[NAME], clients)          # uniform over reporting clients
        frac = jnp.sum(clients) / population
        c = jax.tree.map(lambda c, d: c + frac * d, state.c, mean_dc)
        return weighted_mean(msgs.delta, msgs.weight), ScaffoldState(c=c)

    def broadcast(state: ScaffoldState) -> dict:
        return {NAME: state.c}

    return Aggregator(init=init, update=update, broadcast=broadcast)
