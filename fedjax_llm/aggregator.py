"""The aggregator half of a round: it opens each round with the global model and moves the model
with the clouds' updates that arrived.

    open_round(agg, state) -> GlobalMsg
    aggregator_step(agg, state, updates, errors, secure_total=None) -> (state, metrics)
        verify   each update answers this round and is no replay; a refused one is named
        stop     non-finite clients under run.on_nonfinite=stop; fewer than secure.quorum clouds
        stack    the clouds' aggregates [C, ...] (weight 0: absent), or their secure sum [1, ...]
        server   the algorithm's aggregator, then the server optimizer (one jit)
        record   which clouds counted, and the round's metrics

`AggregatorSpec` is what is fixed for a run, `AggregatorState` what changes (global params, server
optimizer and aggregator state, which clouds counted when). The aggregator holds no client data and no
cloud's key; with secure aggregation across clouds it sees only their sum (secure/protocol.py).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_llm.algorithms import Algorithm
from fedjax_llm.errors import RunStopped
from fedjax_llm.evaluate import perplexity
from fedjax_llm.messages import CloudUpdate, GlobalMsg, MaskedUpdate, ProtocolError, check_round, error_text
from fedjax_llm.secure.round import split_sum
from fedjax_llm.secure.secagg import SecAggParams
from fedjax_llm.types import CloudAggregate

log = logging.getLogger(__name__)
Update = CloudUpdate | MaskedUpdate


class NonFiniteError(RunStopped):
    """A NaN/Inf update or model under run.on_nonfinite=stop; the global model was not changed."""


class QuorumError(RunStopped):
    """Fewer clouds' updates were accepted than secure.quorum; the global model was not changed."""


@dataclasses.dataclass(frozen=True)
class SecureSumSpec:
    """Secure aggregation across clouds as the aggregator knows it: ring, public scale, shapes."""

    params: SecAggParams
    scale: float
    template: CloudAggregate   # zeros shaped like one cloud's aggregate


@dataclasses.dataclass(frozen=True)
class AggregatorSpec:
    """What is fixed for the aggregator during a run."""

    cloud_names: tuple[str, ...]
    client_names: tuple[tuple[str, ...], ...]  # per cloud, for naming clients in metrics and errors
    client_offsets: tuple[int, ...]            # per cloud, the id of its first client
    algo: Algorithm
    server_step: Callable                      # jit(algorithms.server_update)
    quorum: int
    on_nonfinite: str
    secure: Optional[SecureSumSpec] = None


@struct.dataclass
class AggregatorState:
    round: jax.Array        # rounds completed, int32
    params: Any             # global trainable params
    opt_state: Any          # server optimizer state
    agg_state: Any          # aggregator state (SCAFFOLD's c, the DP clip and key, ...)
    counted: jax.Array      # int32[C]: per cloud, the last round its update counted (its replay record)


def init_aggregator_state(agg: AggregatorSpec, params: Any) -> AggregatorState:
    return AggregatorState(round=jnp.int32(0), params=params, opt_state=agg.algo.server_opt.init(params),
                           agg_state=agg.algo.aggregator.init(params),
                           counted=np.zeros(len(agg.cloud_names), np.int32))


def open_round(agg: AggregatorSpec, state: AggregatorState) -> GlobalMsg:
    """The downlink of the next round (the same message for every cloud)."""
    return GlobalMsg(round=jnp.int32(int(state.round) + 1), params=state.params,
                     broadcast=agg.algo.aggregator.broadcast(state.agg_state), counted=state.counted)


def verify(agg: AggregatorSpec, state: AggregatorState, updates: Mapping[str, Optional[Update]],
           errors: Mapping[str, Optional[str]]) -> tuple[dict, dict]:
    """Refuses updates for another round or replayed (a cloud counts at most once per round)."""
    rnd = int(state.round) + 1
    ok, why = {}, dict(errors)
    for c, name in enumerate(agg.cloud_names):
        u = updates.get(name)
        if u is not None:
            try:
                check_round(u.report.round, rnd, int(np.asarray(state.counted)[c]), f"round {rnd}, cloud {name!r}")
            except ProtocolError as e:
                log.warning("round %d: update of cloud %r refused: %s", rnd, name, e)
                why[name], u = why.get(name) or f"{name}->aggregator: ProtocolError: {e}", None
        ok[name] = u
    return ok, why


def _client(agg: AggregatorSpec, c: int, local: int) -> str:
    return (f"cloud {agg.cloud_names[c]!r}, client {agg.client_offsets[c] + local} "
            f"({agg.client_names[c][local]})")


def _flagged(agg: AggregatorSpec, updates: Mapping[str, Optional[Update]], field: str, named) -> list:
    out = []
    for c, name in enumerate(agg.cloud_names):
        u = updates.get(name)
        if u is not None:
            r = u.report
            out += [named(c, int(i)) for i in np.asarray(r.slot_client)[np.asarray(getattr(r, field), bool)]]
    return out


def aggregator_step(agg: AggregatorSpec, state: AggregatorState, updates: Mapping[str, Optional[Update]],
                    errors: Mapping[str, Optional[str]], secure_total: Optional[np.ndarray] = None
                    ) -> tuple[AggregatorState, dict]:
    """Moves the global model with the updates that arrived (None: refused or missing, with the
    reason in `errors`); `secure_total` is their unmasked sum under secure aggregation across clouds."""
    rnd, names = int(state.round) + 1, agg.cloud_names
    updates, errors = verify(agg, state, updates, errors)
    for name, u in updates.items():
        if u is not None and error_text(u.report):
            errors[name] = errors.get(name) or error_text(u.report)
    bad = _flagged(agg, updates, "nonfinite", lambda c, i: _client(agg, c, i))
    if bad and agg.on_nonfinite == "stop":
        raise NonFiniteError(f"round {rnd}: non-finite update or loss from {'; '.join(bad)} "
                             f"(run.on_nonfinite=stop; the global model is unchanged)")

    usable = {n: u for n, u in updates.items() if u is not None and not errors.get(n)}
    if secure_total is None:
        stacked, arrived = _stack(agg, usable)
    else:
        stacked, arrived = _secure_row(agg, secure_total, usable)
    if arrived < agg.quorum:
        why = "; ".join(f"{n}: {errors[n]}" for n in names if errors.get(n))
        raise QuorumError(f"round {rnd}: only {arrived} of {len(names)} clouds' updates were accepted, below "
                          f"secure.quorum={agg.quorum} ({why or 'no cloud had clients'}); the global "
                          f"model is unchanged")

    new_params, opt_state, agg_state, update_norm, ok = agg.server_step(
        state.params, state.opt_state, state.agg_state, stacked)
    if not bool(ok):
        raise NonFiniteError(f"round {rnd}: the aggregated global model is not finite "
                             f"(update norm {float(update_norm)}); it was not applied")
    accepted = np.array([n in usable for n in names])
    counted = np.where(accepted, rnd, np.asarray(state.counted)).astype(np.int32)
    new_state = state.replace(round=jnp.int32(rnd), params=new_params, opt_state=opt_state,
                              agg_state=agg_state, counted=counted)
    return new_state, _metrics(agg, rnd, updates, errors, accepted, bad, float(update_norm))


def _figures(u: Optional[Update]) -> tuple:
    """(loss_sum, tokens, clients) of an update as sent, float32 (zeros when none arrived)."""
    if u is None:
        return np.float32(0), np.float32(0), np.float32(0)
    a = u.aggregate if isinstance(u, CloudUpdate) else u
    return np.float32(a.loss_sum), np.float32(a.tokens), np.float32(a.clients)


def _stack(agg: AggregatorSpec, usable: Mapping[str, CloudUpdate]) -> tuple[CloudAggregate, int]:
    """The clouds' aggregates on a leading axis, in cloud order; an absent cloud weighs 0."""
    if not usable:
        return None, 0
    like = next(iter(usable.values())).aggregate
    absent = jax.tree.map(np.zeros_like, like).replace(weight=np.float32(0))
    rows = [usable[n].aggregate if n in usable else absent for n in agg.cloud_names]
    stacked = jax.tree.map(lambda *a: np.stack(a), *rows)
    return stacked, int(np.sum(stacked.weight > 0))


def _secure_row(agg: AggregatorSpec, total: np.ndarray, usable: Mapping[str, MaskedUpdate]):
    """One row from the unmasked sum [sum of w x delta, total weight, sum of clients x aux] / scale."""
    spec = agg.secure
    summed, weight, aux_sum = split_sum(total, spec.scale, spec.template.delta, spec.template.aux)
    mean = jax.tree.map(lambda t: t / weight if weight > 0 else t * 0, summed)
    public = list(usable.values())
    sums = {k: np.float32(sum(float(getattr(p, k)) for p in public)) for k in ("loss_sum", "tokens", "clients")}
    clients = float(sums["clients"])
    aux = jax.tree.map(lambda a: (a / clients if clients > 0 else a * 0).astype(np.float32), aux_sum)
    steps = np.float32(np.mean([float(p.steps) for p in public])) if public else np.float32(0)
    one = CloudAggregate(delta=mean, weight=np.float32(weight), steps=steps, aux=aux, **sums)
    return jax.tree.map(lambda a: np.asarray(a)[None], one), len(usable)


def _metrics(agg: AggregatorSpec, rnd: int, updates, errors, accepted, bad, update_norm: float) -> dict:
    """Per-cloud figures come from each cloud's update as it arrived; `accepted` marks the clouds whose
    update reached the model."""
    loss_sum, tokens, clients = (np.array(x, np.float32) for x in
                                 zip(*[_figures(updates.get(n)) for n in agg.cloud_names]))
    clients = clients * accepted
    per_cloud = {}
    for c, name in enumerate(agg.cloud_names):
        train_loss = float(loss_sum[c] / tokens[c]) if tokens[c] > 0 else None
        per_cloud[name] = dict(train_loss=train_loss, train_ppl=perplexity(train_loss), clients=int(clients[c]),
                               accepted=bool(accepted[c]), error=errors.get(name))
    total_tokens = float(tokens.sum())
    train_loss = float(loss_sum.sum() / total_tokens) if total_tokens else None
    reports = [u.report for u in updates.values() if u is not None]
    count = lambda field: int(sum(np.sum(np.asarray(getattr(r, field), bool)) for r in reports))  # noqa: E731
    return dict(round=rnd, train_loss=train_loss, train_ppl=perplexity(train_loss), tokens=total_tokens,
                update_norm=update_norm, clients=int(clients.sum()),
                sampled=int(sum(np.sum(np.asarray(r.slot_client) >= 0) for r in reports)),
                dropped=count("dropped"), stragglers=count("straggler"),
                attacked_clients=_flagged(agg, updates, "attacked", lambda c, i: agg.client_names[c][i]),
                nonfinite_dropped=len(bad), nonfinite_clients=bad, clouds=per_cloud)
