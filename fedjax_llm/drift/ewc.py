"""The continual-learning remedy: an EWC penalty with a federated Fisher, in the manner of FedCurv.

Each client adds (lambda / 2) sum_i F_i (theta_i - theta*_i)^2 to its loss, where theta* is the global
model at the end of the previous phase and F the diagonal Fisher information of every earlier phase,
summed (online EWC: Kirkpatrick et al., PNAS 2017; Schwarz et al., 2018). The Fisher is federated as
in FedCurv (Shoham et al., 2019): every client accumulates its squared task gradients during its local
steps (client.py, `grad_sq`) and sends their mean with its update; clouds average their clients'
uniformly and the aggregator averages the clouds' by client count. Within a phase the aggregator keeps a
running mean of these per-round estimates; at the phase's last round it adds it to the consolidated F,
and the next round's global model becomes theta* (clients read it as the global params they start from,
the aggregator takes it as `params` in its next update). F is broadcast divided by its largest entry, so
lambda is the strength on the parameter that mattered most, whatever the model's gradient scale (a mean
normalisation made lambda depend on how sparse the Fisher is: the bag-of-embeddings model's embedding
rows of unseen tokens have none, and any lambda froze it).

Why this remedy: the penalty is a loss term of the client step (pure JAX, vmapped with the clients and
traced once), it needs no client to keep data beyond the round (a replay buffer stores examples on
every client, and stays on the device between phases), and it applies to any trainable parameters:
LoRA adapters and the classifier head of MiniLM as well as the bag-of-embeddings baseline, which has no
low-rank subspace for an O-LoRA-style projection to protect. Its cost: the Fisher and anchor travel
down with the model (3x the downlink) and the Fisher estimate up with each update (2x the uplink).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.aggregate.base import Aggregator
from fedjax_llm.aggregate.fedavg import weighted_mean
from fedjax_llm.client import ClientPiece
from fedjax_llm.types import CloudAggregate, Params

NAME = "ewc"


def ewc_penalty(params: Params, anchor: Params, fisher: Params, lam: float) -> jax.Array:
    """(lam / 2) sum F (params - anchor)^2 over every leaf, in float32."""
    terms = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square((p - a).astype(jnp.float32))), params, anchor, fisher)
    return 0.5 * lam * sum(jax.tree.leaves(terms), jnp.float32(0))


def ewc_piece(lam: float) -> ClientPiece:
    """The client side: the penalty in the loss, and the mean squared task gradient as its aux output."""

    def loss(params, global_params, b):
        anchor = jax.tree.map(lambda a, g: jnp.where(b["fresh"], g, a), b["anchor"], global_params)
        return ewc_penalty(params, anchor, b["fisher"], lam)

    def finish(delta, steps, lr, state, b, grad_sq):
        del lr, b
        return delta, jax.tree.map(lambda s: s / jnp.maximum(steps, 1.0), grad_sq), state

    return ClientPiece(name=NAME, loss=loss, finish=finish, grad_sq=True)


def _zeros(params: Params) -> Params:
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def ewc_aggregator(inner: Aggregator, phase_ends: Sequence[int]) -> Aggregator:
    """Wraps an aggregator: its update as it is, plus the Fisher consolidated at each phase end in
    `phase_ends` (rounds) and the anchor taken at the start of the next phase."""
    ends = jnp.asarray(np.asarray(phase_ends, np.int32))

    def init(params: Params) -> dict:
        return dict(inner=inner.init(params), fisher=_zeros(params), anchor=jax.tree.map(jnp.asarray, params),
                    running=_zeros(params), seen=jnp.float32(0), rounds=jnp.int32(0), fresh=jnp.bool_(False))

    def update(msgs: CloudAggregate, state: dict, params: Optional[Params] = None):
        inner_msgs = msgs.replace(aux={k: v for k, v in msgs.aux.items() if k != NAME})
        update, inner_state = inner.update(inner_msgs, state["inner"], params)
        anchor = jax.tree.map(lambda a, p: jnp.where(state["fresh"], p.astype(jnp.float32), a), state["anchor"], params)
        clients = jnp.where(msgs.weight > 0, msgs.clients, 0.0)
        arrived = jnp.sum(clients) > 0
        estimate = weighted_mean(msgs.aux[NAME], clients)
        running = jax.tree.map(lambda r, e: r + jnp.where(arrived, e, 0.0), state["running"], estimate)
        seen = state["seen"] + arrived.astype(jnp.float32)
        rounds = state["rounds"] + 1
        end = jnp.any(rounds == ends)
        fisher = jax.tree.map(lambda f, r: jnp.where(end, f + r / jnp.maximum(seen, 1.0), f), state["fisher"], running)
        running = jax.tree.map(lambda r: jnp.where(end, 0.0, r), running)
        new = dict(inner=inner_state, fisher=fisher, anchor=anchor, running=running,
                   seen=jnp.where(end, 0.0, seen), rounds=rounds, fresh=end)
        return update, new

    def broadcast(state: dict) -> dict:
        top = jnp.max(jnp.stack([jnp.max(f) for f in jax.tree.leaves(state["fisher"])]))
        scale = jnp.where(top > 0, 1.0 / jnp.maximum(top, 1e-30), 0.0)
        own = dict(fisher=jax.tree.map(lambda f: f * scale, state["fisher"]), anchor=state["anchor"],
                   fresh=state["fresh"])
        return {**inner.broadcast(state["inner"]), NAME: own}

    return Aggregator(init=init, update=update, broadcast=broadcast)
