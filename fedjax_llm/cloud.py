"""The cloud half of a round: a cloud samples its clients, trains them and sends its aggregate.

`cloud_step(cloud, state, msg) -> (update, state)` reads top to bottom:

    settle    keep last round's per-client states if the aggregator counted that update
    sample    this round's clients, dropouts and stragglers, from the cloud's own key
    inputs    their next batches (data cursors), client keys, weights and per-client states
    compute   one jitted, sharded computation over the cloud's clients (round.py)
    secure    secure aggregation among its clients (secure.secagg.scope=clients|both)
    noise     its share of the DP noise, from its own key (DP with secure aggregation)
    uplink    the aggregate in the clear, or masked (secure aggregation across clouds)

`Cloud` holds what is fixed for a run, `CloudState` what changes, so a checkpoint of the state is the
cloud's complete resume point. Nothing here reads another cloud's data, state or key.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from fedjax_llm import distributed, participation
from fedjax_llm.config import AttackConfig, ClientConfig, ParticipationConfig, SecureConfig
from fedjax_llm.data.federated import FederatedData, round_batches
from fedjax_llm.messages import CloudReport, CloudUpdate, GlobalMsg, MaskedUpdate, ProtocolError, error_bytes
from fedjax_llm.round import RoundInputs, RoundLayout, client_template, input_sharding
from fedjax_llm.secure import dp as dplib
from fedjax_llm.secure.protocol import CloudSecAgg
from fedjax_llm.secure.round import noise_share_std, secure_mean_of_clients, sum_vector
from fedjax_llm.secure.secagg import SecAggError
from fedjax_llm.types import ClientBatches, ClientHParams, CloudAggregate, Params

log = logging.getLogger(__name__)
_COHORT, _CLIENT_KEYS, _DP_NOISE = 11, 12, 13  # streams derived from the cloud's round key


@dataclasses.dataclass(frozen=True)
class Engine:
    """The compiled client compute a cloud runs (shared by clouds of the same layout) and its inputs."""

    run: Callable            # (trainable, frozen, broadcast, RoundInputs, hparams[, round, describe])
    local_update: Callable   # the one-client function it maps (for shapes)
    layout: RoundLayout
    mesh: Mesh
    frozen: Params
    hparams: ClientHParams
    loop: bool               # client.backend=loop: client by client, failures named
    rows: tuple = (0, 1 << 62)  # the padded slots [start, stop) on this process's devices (all of them in
                             # one process)
    shared_frozen: Any = None  # multi-process: the frozen base as a global array, replicated once


@dataclasses.dataclass(frozen=True)
class Cloud:
    """What is fixed for one cloud during a run."""

    name: str
    index: int                     # its position among the clouds (message order)
    members: np.ndarray            # [n] its clients' ids in `data`, in order
    client_names: tuple[str, ...]  # [n]
    weights: np.ndarray            # [n] float32 aggregation weight (examples, or 1)
    byzantine: np.ndarray          # [n] bool: simulated attackers
    capacity: int                  # cohort slots per round
    data: FederatedData
    engine: Engine
    client: ClientConfig
    participation: ParticipationConfig
    attack: AttackConfig
    secure: SecureConfig
    expected_clients: float        # DP-FedAvg's divisor, federation-wide and public
    secagg_scale: float            # public constant dividing secure-sum vectors across clouds
    secagg_parties: int            # t: shares of DP noise that carry the full noise


@struct.dataclass
class Pending:
    """The per-client states of this cloud's last update, kept once the aggregator counts it."""

    round: jax.Array    # int32: the round they were trained in (0: none)
    slots: jax.Array    # int32[m]: the cloud-local client of each slot, -1 = nothing to keep
    states: Any         # the algorithm's per-client state, leaves [m, ...]


@struct.dataclass
class CloudState:
    """Everything of the cloud's that changes between rounds; it checkpoints the cloud completely."""

    key: jax.Array          # uint32[2]: sampling, dropouts, stragglers, client keys, DP noise share
    cursors: np.ndarray     # [n] int64 examples each client has consumed
    data_seed: np.ndarray   # uint32: each client's per-epoch shuffles
    client_states: Any      # the algorithm's per-client state [n, ...] (SCAFFOLD's c_i), as counted
    pending: Pending
    last_round: jax.Array   # int32: the last round it trained; a global message up to it is a replay


Update = Union[CloudUpdate, MaskedUpdate]


def init_cloud_state(cloud: Cloud, key: jax.Array, data_seed: np.ndarray, client_states: Any) -> CloudState:
    """A cloud's state before round 1; `key` is its own (secure/protocol never sees it)."""
    m = cloud.capacity
    pending = Pending(round=jnp.int32(0), slots=np.full(m, -1, np.int32),
                      states=jax.tree.map(lambda s: jnp.zeros((m,) + s.shape[1:], s.dtype), client_states))
    return CloudState(key=jax.random.key_data(key), cursors=np.zeros(len(cloud.members), np.int64),
                      data_seed=np.asarray(data_seed, np.uint32), client_states=client_states,
                      pending=pending, last_round=jnp.int32(0))


def _settle(state: CloudState, counted_round: int) -> Any:
    """Client states with the pending ones applied when the aggregator counted their round."""
    p = state.pending
    if int(p.round) == 0 or int(p.round) != counted_round:
        return state.client_states
    slots = np.asarray(p.slots)
    keep = np.flatnonzero(slots >= 0)
    return jax.tree.map(lambda old, new: old.at[slots[keep]].set(new[keep]), state.client_states, p.states)


def describe(cloud: Cloud, local: int) -> str:
    return f"cloud {cloud.name!r}, client {int(cloud.members[local])} ({cloud.client_names[local]})"


def round_inputs(cloud: Cloud, state: CloudState, cohort: participation.Cohort,
                 k_clients: jax.Array) -> tuple[RoundInputs, np.ndarray]:
    """The cohort's padded inputs (ids local to the cloud) and the clients' new data cursors. In a
    multi-process run only the slots on this process's devices get their examples gathered."""
    cfg, data = cloud.client, cloud.data
    ids, K, Kp = cohort.ids, len(cohort.ids), cloud.engine.layout.padded
    cursors = np.zeros(data.num_clients, np.int64)  # round_batches indexes cursors by data client id
    cursors[cloud.members] = state.cursors
    start, stop = cloud.engine.rows
    rb = round_batches(data, cloud.members[ids], cursors, cfg.local_steps, cfg.batch_size,
                       int(state.data_seed), cfg.local_epochs, materialize=(np.arange(K) >= start) & (np.arange(K) < stop))
    weights = np.where(cohort.dropped, 0, cloud.weights[ids]).astype(np.float32)
    attacked = cloud.byzantine[ids]
    tokens, labels = rb.tokens, rb.labels
    if cloud.attack.kind == "label_flip" and attacked.any():
        if labels is not None:  # classification: label y -> L - 1 - y
            labels = labels.copy()
            labels[attacked] = participation.flip_labels(labels[attacked], data.num_labels, 0)
        else:                   # language modelling: the target tokens
            tokens = tokens.copy()
            tokens[attacked] = participation.flip_labels(tokens[attacked], data.vocab_size)
    step_mask = rb.step_mask & (np.arange(cfg.local_steps)[None, :] < cohort.steps[:, None])
    keys = np.asarray(jax.random.key_data(jax.random.split(k_clients, len(cloud.members))))
    pad = lambda a: np.concatenate([a, np.zeros((Kp - K,) + a.shape[1:], a.dtype)])  # noqa: E731
    slots = np.concatenate([ids, np.zeros(Kp - K, np.int64)])
    task_inputs = {"tokens": pad(tokens), "loss_mask": pad(rb.loss_mask)}
    if labels is not None:
        task_inputs["labels"] = pad(labels)
    inputs = RoundInputs(batches=ClientBatches(inputs=task_inputs, step_mask=pad(step_mask)), keys=pad(keys[ids]),
                         weights=pad(weights), onehot=pad(np.ones((K, 1), np.float32)), attacked=pad(attacked),
                         state=jax.tree.map(lambda s: s[slots], state.client_states))
    return inputs, rb.cursors[cloud.members]


def _compute(cloud: Cloud, msg: GlobalMsg, inputs: RoundInputs, rnd: int, ids: np.ndarray):
    eng = cloud.engine
    args = (msg.params, eng.frozen, msg.broadcast)
    if eng.loop:
        name = lambda i: describe(cloud, ids[i]) if i < len(ids) else f"cloud {cloud.name!r}, padding slot {i}"  # noqa: E731
        return eng.run(*args, inputs, eng.hparams, rnd, name)
    if eng.shared_frozen is None:
        return eng.run(*args, jax.device_put(inputs, input_sharding(eng.mesh)), eng.hparams)
    # Several processes: each puts its own slots' rows; the result comes back to every host.
    params, broadcast, hparams = distributed.put_replicated((msg.params, msg.broadcast, eng.hparams), eng.mesh)
    rows = distributed.put_rows(inputs, input_sharding(eng.mesh), eng.layout.padded, eng.rows)
    return distributed.fetch(eng.run(params, eng.shared_frozen, broadcast, rows, hparams))


def cloud_step(cloud: Cloud, state: CloudState, msg: GlobalMsg,
               secure: Optional[CloudSecAgg] = None) -> tuple[Update, CloudState]:
    """One round of this cloud: the message to send to the aggregator and the cloud's next state.
    With `secure` (this round's party in secure aggregation across clouds) the update is masked."""
    rnd, sec = int(msg.round), cloud.secure
    where = f"round {rnd}, cloud {cloud.name!r}"
    across = sec.secagg.enabled and sec.secagg.scope != "clients"
    if rnd <= int(state.last_round):
        raise ProtocolError(f"{where}: global message replayed (round {int(state.last_round)} already trained)")
    if across and secure is None:
        raise ProtocolError(f"{where}: secure aggregation across clouds is on but this round has no "
                            f"secure-aggregation party; the update does not leave the cloud in the clear")
    client_states = _settle(state, int(np.asarray(msg.counted)[cloud.index]))
    state = state.replace(client_states=client_states)

    key, k_round = jax.random.split(jax.random.wrap_key_data(state.key))
    cohort = participation.sample_cloud(cloud.participation, len(cloud.members), cloud.capacity,
                                        cloud.client.local_steps, jax.random.fold_in(k_round, _COHORT), rnd, cloud.name)
    ids, K = cohort.ids, len(cohort.ids)
    inputs, cursors = round_inputs(cloud, state, cohort, jax.random.fold_in(k_round, _CLIENT_KEYS))
    result = _compute(cloud, msg, inputs, rnd, ids)

    weights, finite = np.asarray(inputs.weights)[:K], np.asarray(result.finite)[:K]
    agg = jax.tree.map(lambda a: np.asarray(a)[0], jax.device_get(result.clouds))  # its one row
    error = ""
    if sec.secagg.enabled and sec.secagg.scope != "clouds" and K >= 2 and np.any(weights > 0):
        deltas, client_weights = jax.device_get(result.deltas)
        try:
            mean, _ = secure_mean_of_clients(sec.secagg, jax.tree.map(lambda a: a[:K], deltas),
                                             np.asarray(client_weights)[:K], [cloud.client_names[i] for i in ids],
                                             float(np.sum(cloud.weights)), f"{cloud.name}/round {rnd}")
            agg = agg.replace(delta=mean)
        except SecAggError as e:
            log.warning("%s: secure aggregation among its clients failed: %s", where, e)
            error = f"{cloud.name}: {type(e).__name__}: {e}"
            agg = agg.replace(weight=np.float32(0))

    noise = None
    if sec.dp.enabled and sec.secagg.enabled:  # its share of the DP noise, from its own key only
        std = noise_share_std(sec.dp, cloud.expected_clients, float(np.asarray(msg.broadcast["dp"])),
                              cloud.secagg_parties if across else sec.quorum)
        noise = dplib.gaussian_like(jax.random.fold_in(k_round, _DP_NOISE), agg.delta, std)
        w = float(agg.weight)
        if not across and w > 0:  # sent in the clear: the noised sum, as a mean
            agg = agg.replace(delta=jax.tree.map(lambda d, z: ((d * w + np.asarray(z)) / w).astype(d.dtype),
                                                 agg.delta, noise))

    S = cloud.client.local_steps
    counted = finite & (weights > 0) & (not error)
    report = _report(cloud, rnd, ids, cohort, ~finite & (weights > 0), error, S)
    pending = Pending(round=jnp.int32(rnd), slots=_slots(cloud.capacity, ids, counted),
                      states=jax.tree.map(lambda s: s[:cloud.capacity], result.state))
    new_state = state.replace(key=jax.random.key_data(key), cursors=cursors, pending=pending,
                              last_round=jnp.int32(rnd))
    if secure is None:
        return CloudUpdate(report=report, aggregate=agg), new_state
    extra = jax.tree.map(lambda a: np.asarray(a, np.float64) * float(agg.clients), agg.aux)
    vector, outside = sum_vector(agg.delta, float(agg.weight), cloud.secagg_scale, sec.secagg.clip_range,
                                 noise, extra)
    if outside:
        log.warning("%s: %d values fell outside secure.secagg.clip_range and were clipped", where, outside)
    masked = MaskedUpdate(report=report, masked=secure.mask(vector), loss_sum=agg.loss_sum, tokens=agg.tokens,
                          clients=agg.clients, steps=agg.steps)
    return masked, new_state


def _slots(m: int, ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = np.full(m, -1, np.int32)
    out[:len(ids)] = np.where(keep, ids, -1)
    return out


def _report(cloud: Cloud, rnd: int, ids, cohort, nonfinite, error: str, local_steps: int) -> CloudReport:
    m, K = cloud.capacity, len(ids)
    flag = lambda x: np.concatenate([np.asarray(x, bool), np.zeros(m - K, bool)])  # noqa: E731
    return CloudReport(round=np.int32(rnd), slot_client=_slots(m, ids, np.ones(K, bool)),
                       dropped=flag(cohort.dropped), straggler=flag(cohort.steps < local_steps),
                       nonfinite=flag(nonfinite), attacked=flag(cloud.byzantine[ids]), error=error_bytes(error))


def update_template(cloud: Cloud, state: CloudState, msg: GlobalMsg) -> CloudAggregate:
    """Zeros shaped like this cloud's aggregate (what a receiver expects), from the shapes alone."""
    one = participation.Cohort(ids=np.zeros(1, np.int64), dropped=np.zeros(1, bool),
                               steps=np.full(1, cloud.client.local_steps, np.int64))
    inputs, _ = round_inputs(cloud, state, one, jax.random.key(0))
    eng = cloud.engine
    out = client_template(eng.local_update, msg.params, eng.frozen, inputs, eng.hparams, msg.broadcast)
    zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, np.float32), t)  # noqa: E731
    scalar = np.float32(0)
    return CloudAggregate(delta=zeros(out.delta), weight=scalar, steps=scalar, aux=zeros(out.aux),
                          loss_sum=scalar, tokens=scalar, clients=scalar)
