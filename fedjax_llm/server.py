"""The federation: one readable round over explicit state.

`Federation` holds what is fixed for a run (data, model functions, frozen params, the algorithm, the
compiled round, channel, links); `ServerState` holds everything that changes, so `run_round(state)` is
a function of its argument and a checkpoint of the state resumes exactly. One round:

    key -> cohort                      sampled per cloud; dropouts, stragglers (participation.py)
    downlink  params + broadcast -> bytes -> each cloud     (the cloud boundary: channel.send/receive)
    compute   clients train, per-cloud reduction            (one jit, sharded over devices)
    uplink    each cloud's aggregate -> bytes -> aggregator
    server    aggregator over clouds + server optimizer     (one jit)
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from fedjax_llm import participation
from fedjax_llm.algorithms import Algorithm, LoRAScheme, build_algorithm, server_update
from fedjax_llm.aggregate.lora_round import client_ranks, effective_frozen
from fedjax_llm.client import client_optimizer, init_population_state, make_local_update, make_task_loss
from fedjax_llm.clouds.channel import Channel, plaintext_channel
from fedjax_llm.clouds.link import Link
from fedjax_llm.clouds.message import MessageError
from fedjax_llm.config import TrainConfig
from fedjax_llm.data.federated import FederatedData, round_batches
from fedjax_llm.errors import RunStopped
from fedjax_llm.evaluate import make_evaluator, perplexity
from fedjax_llm.models.build import build_model, freeze_lora_a
from fedjax_llm.secure.round import SecureSum, dp_noise_std, noise_at_clouds, secure_sums_in_clouds
from fedjax_llm.round import (AXIS, RoundInputs, default_chunk, input_sharding, make_loop_compute,
                              make_round_compute, plan_layout)
from fedjax_llm.types import ClientBatches, ClientHParams, CloudAggregate

log = logging.getLogger(__name__)
AGGREGATOR = "aggregator"
_COHORT, _CLIENT_KEYS = 11, 12  # streams derived from a round key


class NonFiniteError(RunStopped):
    """A NaN/Inf update or model under run.on_nonfinite=stop; the global model was not changed."""


class QuorumError(RunStopped):
    """Fewer clouds' updates were accepted than secure.quorum; the global model was not changed."""


@struct.dataclass
class ServerState:
    """Everything that changes between rounds; checkpointed as a whole."""

    round: jax.Array          # rounds completed, int32
    params: Any               # global trainable params
    opt_state: Any            # server optimizer state
    agg_state: Any            # aggregator state (e.g. SCAFFOLD's server control variate)
    client_states: Any        # the algorithm's per-client state, leaves [P, ...] ({} for FedAvg)
    key: jax.Array            # uint32[2] raw PRNG key, split every round
    data_cursors: np.ndarray  # [P] int64 examples consumed per client
    data_seed: np.ndarray     # uint32 scalar, fixes each client's per-epoch shuffles


def lora_scheme(cfg: TrainConfig, population: int) -> Optional[LoRAScheme]:
    """The run's LoRA aggregation scheme and per-client ranks (None without LoRA)."""
    lo = cfg.model.lora
    if not lo.enabled:
        return None
    return LoRAScheme(lo.aggregation, lo.alpha / lo.rank, client_ranks(list(lo.client_ranks), lo.rank, population),
                      lo.rank)


def make_mesh(num_devices: int = 0) -> Mesh:
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"run.devices: asked for {n} devices, only {len(devices)} available")
    return Mesh(np.array(devices[:n]), (AXIS,))


class Federation:
    """Fixed pieces of a run plus `init_state` and `run_round`."""

    def __init__(self, cfg: TrainConfig, data: FederatedData, *, mesh: Optional[Mesh] = None,
                 channel: Optional[Channel] = None, algorithm: Optional[Algorithm] = None):
        self.cfg, self.data = cfg, data
        self.mesh = mesh or make_mesh(cfg.run.devices)
        self.channel = channel or plaintext_channel()
        self.cloud_names = list(data.cloud_names)
        self.links = [Link.from_config(cfg.clouds.members[n].link) for n in self.cloud_names]
        self.k_model, self.k_data, self.k_run, k_attack, k_dp = jax.random.split(jax.random.key(cfg.seed), 5)
        self.expected_clients = participation.expected_clients(cfg, data.client_cloud)
        secure = cfg.secure
        self.algo = algorithm or build_algorithm(
            cfg.algorithm, cfg.attack, data.num_clients, dp=secure.dp, expected_clients=self.expected_clients,
            dp_key=k_dp, dp_noise_at_clouds=secure.secagg.enabled, lora=lora_scheme(cfg, data.num_clients))
        self.secure_sum = None  # secure aggregation across clouds
        g = secure.secagg
        self.client_weights = data.num_train_examples() if cfg.client.weighting == "examples" else np.ones(data.num_clients)
        if g.enabled and g.scope != "clients":
            self.secure_sum = SecureSum(g, self.cloud_names, scale=float(np.sum(self.client_weights)))
        self.secagg_in_clouds = g.enabled and g.scope != "clouds"
        self.fns, self.init_params, self.frozen, self.spec = build_model(cfg, data.vocab_size, data.num_labels,
                                                                         self.k_model)
        if cfg.model.lora.aggregation == "ffa":
            self.init_params, self.frozen = freeze_lora_a(self.init_params, self.frozen)
        self.hparams = ClientHParams(lr=jnp.float32(cfg.client.lr))
        self.num_train = data.num_train_examples()
        self.byzantine = participation.byzantine_clients(cfg.attack, data.client_cloud, self.cloud_names,
                                                         k_attack)
        self.cohort_size = participation.cohort_capacity(cfg, data.client_cloud)
        platform = self.mesh.devices.flat[0].platform
        chunk = cfg.client.clients_per_chunk or default_chunk(platform)
        self.layout = plan_layout(self.cohort_size, self.mesh.size, chunk)
        local_update = make_local_update(make_task_loss(cfg.data.task, self.fns.apply), client_optimizer(cfg.client),
                                         self.algo.pieces)
        C = len(self.cloud_names)
        if cfg.client.backend == "loop":
            self._compute = make_loop_compute(local_update, self.algo.reducer, self.algo.transform, C,
                                              self._describe_slot, collect=self.secagg_in_clouds)
        else:
            self._compute = make_round_compute(local_update, self.algo.reducer, self.algo.transform, C,
                                               self.mesh, self.layout, collect=self.secagg_in_clouds)
        self._server_step = jax.jit(lambda *a: server_update(self.algo, *a))
        self.evaluator = make_evaluator(cfg.data.task, self.fns.apply, data, cfg.data.max_eval_examples,
                                        cfg.run.eval_batch_size)
        self._cohort: np.ndarray = np.zeros(0, np.int64)

    # ----- state -----------------------------------------------------------------------------
    def init_state(self) -> ServerState:
        params = self.init_params
        P = self.data.num_clients
        client_states = init_population_state(self.algo.pieces, params, P)
        return ServerState(round=jnp.int32(0), params=params, opt_state=self.algo.server_opt.init(params),
                           agg_state=self.algo.aggregator.init(params), client_states=client_states,
                           key=jax.random.key_data(self.k_run),
                           data_cursors=np.zeros(P, np.int64),
                           data_seed=np.asarray(jax.random.bits(self.k_data, dtype=jnp.uint32)))

    # ----- one round -------------------------------------------------------------------------
    def sample_cohort(self, key: jax.Array, rnd: int = 0) -> participation.Cohort:
        return participation.sample_cohort(self.cfg, self.data.client_cloud, key, rnd)

    def _describe_slot(self, i: int) -> str:
        if i >= len(self._cohort):
            return f"padding slot {i}"
        cid = int(self._cohort[i])
        return (f"cloud {self.cloud_names[self.data.client_cloud[cid]]!r}, "
                f"client {cid} ({self.data.client_names[cid]})")

    def _round_inputs(self, state: ServerState, cohort: participation.Cohort, k_clients: jax.Array,
                      received: np.ndarray):
        cfg = self.cfg.client
        ids = cohort.ids
        rb = round_batches(self.data, ids, state.data_cursors, cfg.local_steps, cfg.batch_size,
                           int(state.data_seed), cfg.local_epochs)
        K, Kp = len(ids), self.layout.padded
        cloud_of = self.data.client_cloud[ids]
        arrived = (received[cloud_of] > 0) & ~cohort.dropped
        weights = self.num_train[ids] if cfg.weighting == "examples" else np.ones(K)
        weights = np.where(arrived, weights, 0).astype(np.float32)
        attacked = self.byzantine[ids]
        tokens, labels = rb.tokens, rb.labels
        if self.cfg.attack.kind == "label_flip" and attacked.any():
            if labels is not None:  # classification: label y -> L - 1 - y
                labels = labels.copy()
                labels[attacked] = participation.flip_labels(labels[attacked], self.data.num_labels, 0)
            else:                   # language modelling: the target tokens
                tokens = tokens.copy()
                tokens[attacked] = participation.flip_labels(tokens[attacked], self.data.vocab_size)
        step_mask = rb.step_mask & (np.arange(cfg.local_steps)[None, :] < cohort.steps[:, None])
        step_mask &= (received[cloud_of] > 0)[:, None]
        keys = np.asarray(jax.random.key_data(jax.random.split(k_clients, self.data.num_clients)))
        onehot = np.eye(len(self.cloud_names), dtype=np.float32)[cloud_of]
        pad = lambda a: np.concatenate([a, np.zeros((Kp - K,) + a.shape[1:], a.dtype)])
        slots = np.concatenate([ids, np.zeros(Kp - K, np.int64)])
        task_inputs = {"tokens": pad(tokens), "loss_mask": pad(rb.loss_mask)}
        if labels is not None:
            task_inputs["labels"] = pad(labels)
        batches = ClientBatches(inputs=task_inputs, step_mask=pad(step_mask))
        inputs = RoundInputs(batches=batches, keys=pad(keys[ids]), weights=pad(weights), onehot=pad(onehot),
                             attacked=pad(attacked),
                             state=jax.tree.map(lambda s: s[slots], state.client_states))
        return inputs, rb.cursors, slots

    def _hop(self, tree, like, sender: str, recipient: str, rnd: int, link: Link, stats: dict):
        """Send one tree across the boundary; returns the tree the recipient accepted, or None.

        Adds bytes on the wire, simulated link seconds and measured seal/open seconds to `stats`.
        """
        t0 = time.perf_counter()
        data = self.channel.send(tree, sender=sender, recipient=recipient, round=rnd)
        t1 = time.perf_counter()
        stats["bytes_down" if sender == AGGREGATOR else "bytes_up"] += len(data)
        stats["comm_s"] += link.transfer_seconds(len(data))
        stats["seal_s"] += t1 - t0
        try:
            out, _ = self.channel.receive(data, like=like, sender=sender, recipient=recipient, round=rnd)
            return out
        except MessageError as e:
            log.warning("round %d: message %s -> %s rejected: %s", rnd, sender, recipient, e)
            stats["error"] = stats["error"] or f"{sender}->{recipient}: {type(e).__name__}: {e}"
            return None
        finally:
            stats["open_s"] += time.perf_counter() - t1

    def run_round(self, state: ServerState) -> tuple[ServerState, dict]:
        """One federated round; returns the new state and this round's metrics."""
        t0 = time.perf_counter()
        rnd = int(state.round) + 1
        key, k_round = jax.random.split(jax.random.wrap_key_data(state.key))
        cohort = self.sample_cohort(jax.random.fold_in(k_round, _COHORT), rnd)
        self._cohort = cohort.ids
        C = len(self.cloud_names)
        clouds = [dict(bytes_down=0, bytes_up=0, comm_s=0.0, seal_s=0.0, open_s=0.0, error=None)
                  for _ in range(C)]

        # Downlink: the global model (and what the algorithm broadcasts) crosses into every cloud.
        down = {"params": state.params, "broadcast": self.algo.aggregator.broadcast(state.agg_state)}
        received, down_in = np.ones(C, np.float32), None
        for c, name in enumerate(self.cloud_names):
            tree = self._hop(down, down, AGGREGATOR, name, rnd, self.links[c], clouds[c])
            received[c] = tree is not None
            if tree is not None and down_in is None:
                down_in = tree  # every cloud decodes the same bytes; one copy feeds the compute
        down_in = down if down_in is None else down_in

        inputs, cursors, slots = self._round_inputs(state, cohort, jax.random.fold_in(k_round, _CLIENT_KEYS),
                                                    received)
        args = (down_in["params"], self.frozen, down_in["broadcast"])
        if self.cfg.client.backend == "loop":
            result = self._compute(*args, inputs, self.hparams, rnd)
        else:
            result = self._compute(*args, jax.device_put(inputs, input_sharding(self.mesh)), self.hparams)
        K = len(cohort.ids)
        weights = np.asarray(inputs.weights)[:K]
        finite = np.asarray(result.finite)[:K]
        bad = [self._describe_slot(i) for i in np.flatnonzero(~finite & (weights > 0))]
        if bad and self.cfg.run.on_nonfinite == "stop":
            raise NonFiniteError(f"round {rnd}: non-finite update or loss from {'; '.join(bad)} "
                                 f"(run.on_nonfinite=stop; the global model is unchanged)")

        # Uplink: each cloud's aggregate crosses to the global aggregator.
        agg = jax.device_get(result.clouds)
        if self.secagg_in_clouds:
            deltas, client_weights = jax.device_get(result.deltas)
            agg, failed = secure_sums_in_clouds(
                self.cfg.secure.secagg, agg, deltas, client_weights, cohort.ids, self.data.client_names,
                self.data.client_cloud, self.cloud_names, self.client_weights,
                f"{getattr(self.channel, 'run_id', 'plain')}/{rnd}")
            for c, err in failed.items():
                log.warning("round %d: secure aggregation inside cloud %r failed: %s", rnd, self.cloud_names[c], err)
                clouds[c]["error"] = f"{self.cloud_names[c]}: {type(err).__name__}: {err}"
                received[c] = 0  # nothing of this cloud's can count this round
        if self.cfg.secure.dp.enabled and self.cfg.secure.secagg.enabled and self.secure_sum is None:
            clip = float(self.algo.aggregator.broadcast(state.agg_state)["dp"])
            agg = noise_at_clouds(agg, dp_noise_std(self.cfg.secure.dp, self.expected_clients, clip),
                                  jax.random.fold_in(k_round, 1000), self.cfg.secure.quorum)
        if self.secure_sum is not None:
            stacked, arrived = self._uplink_secure(rnd, agg, received, clouds, state, k_round)
        else:
            stacked, arrived = self._uplink(rnd, agg, received, clouds)
        quorum = self.cfg.secure.quorum
        if arrived < quorum:
            errors = "; ".join(f"{n}: {c['error']}" for n, c in zip(self.cloud_names, clouds) if c["error"])
            raise QuorumError(f"round {rnd}: only {arrived} of {C} clouds' updates were accepted, below "
                              f"secure.quorum={quorum} ({errors or 'no cloud had clients'}); the global "
                              f"model is unchanged")

        new_params, opt_state, agg_state, update_norm, ok = self._server_step(
            state.params, state.opt_state, state.agg_state, stacked)
        if not bool(ok):
            raise NonFiniteError(f"round {rnd}: the aggregated global model is not finite "
                                 f"(update norm {float(update_norm)}); it was not applied")
        # Only clients whose update counted keep their new per-client state.
        accepted = np.array([received[c] > 0 and clouds[c]["error"] is None for c in range(C)], np.float32)
        counted = finite & (weights > 0) & (accepted[self.data.client_cloud[cohort.ids]] > 0)
        ids = cohort.ids

        def keep_counted(old, new):
            mask = counted.reshape((-1,) + (1,) * (new.ndim - 1))
            return old.at[ids].set(jnp.where(mask, new[:K], old[ids]))

        client_states = jax.tree.map(keep_counted, state.client_states, result.state)
        new_state = state.replace(round=jnp.int32(rnd), params=new_params, opt_state=opt_state,
                                  agg_state=agg_state, client_states=client_states,
                                  key=jax.random.key_data(key), data_cursors=cursors)
        metrics = self._round_metrics(rnd, agg, accepted, clouds, bad, cohort, float(update_norm),
                                      time.perf_counter() - t0)
        return new_state, metrics

    def _uplink(self, rnd, agg: CloudAggregate, received, clouds) -> tuple[CloudAggregate, int]:
        """Each cloud's aggregate crosses in its own message; a rejected one counts with weight 0."""
        like = jax.tree.map(lambda a: a[0], agg)
        rows = []
        for c, name in enumerate(self.cloud_names):
            tree = jax.tree.map(lambda a: a[c], agg)
            got = None
            if received[c]:
                got = self._hop(tree, like, name, AGGREGATOR, rnd, self.links[c], clouds[c])
            rows.append(got if got is not None else tree.replace(weight=np.float32(0)))
        stacked = jax.tree.map(lambda *a: np.stack(a), *rows)
        return stacked, int(np.sum(stacked.weight > 0))

    def _uplink_secure(self, rnd, agg: CloudAggregate, received, clouds, state, k_round):
        """Secure aggregation across clouds: each cloud sends its masked [update sum, weight]; the
        aggregator learns only their total over the clouds that arrived. With DP on, each cloud adds
        its share of the noise first, so no un-noised sum exists outside a cloud."""
        ss = self.secure_sum
        ss.start(f"{getattr(self.channel, 'run_id', 'plain')}/{rnd}")
        like = jax.tree.map(lambda a: a[0], agg)
        dp = self.cfg.secure.dp
        noise_std = 0.0
        if dp.enabled:
            clip = float(self.algo.aggregator.broadcast(state.agg_state)["dp"])
            noise_std = dp_noise_std(dp, self.expected_clients, clip) / np.sqrt(ss.t)
        masked, clipped, public = {}, 0, []
        for c, name in enumerate(self.cloud_names):
            if not received[c]:
                continue
            msg = jax.tree.map(lambda a: a[c], agg)
            noise = None
            if noise_std > 0:
                from fedjax_llm.secure.dp import gaussian_like
                noise = gaussian_like(jax.random.fold_in(k_round, 1000 + c), msg.delta, noise_std)
            vector, outside = ss.vector(msg.delta, float(msg.weight), noise)
            clipped += outside
            tree = {"masked": ss.mask(name, vector), "loss_sum": msg.loss_sum, "tokens": msg.tokens,
                    "clients": msg.clients, "steps": msg.steps}
            got = self._hop(tree, tree, name, AGGREGATOR, rnd, self.links[c], clouds[c])
            if got is not None:
                masked[name] = got["masked"]
                public.append(got)
        if clipped:
            log.warning("round %d: %d values fell outside secure.secagg.clip_range and were clipped", rnd, clipped)
        total, weight = ss.unmask(masked, like.delta)  # raises SecAggError below the threshold
        mean = jax.tree.map(lambda t: t / weight if weight > 0 else t * 0, total)
        sums = {k: np.float32(sum(float(p[k]) for p in public)) for k in ("loss_sum", "tokens", "clients")}
        steps = np.float32(np.mean([float(p["steps"]) for p in public])) if public else np.float32(0)
        one = CloudAggregate(delta=mean, weight=np.float32(weight), steps=steps, aux=like.aux, **sums)
        return jax.tree.map(lambda a: np.asarray(a)[None], one), len(masked)

    def _round_metrics(self, rnd, agg, accepted, clouds, bad, cohort, update_norm, wall_s) -> dict:
        """Per-cloud figures come from each cloud's own aggregate; `accepted` marks the clouds whose
        update reached the model."""
        loss_sum, tokens = np.asarray(agg.loss_sum), np.asarray(agg.tokens)
        clients = np.asarray(agg.clients) * accepted
        per_cloud = {}
        for c, name in enumerate(self.cloud_names):
            train_loss = float(loss_sum[c] / tokens[c]) if tokens[c] > 0 else None
            per_cloud[name] = dict(train_loss=train_loss, train_ppl=perplexity(train_loss),
                                   clients=int(clients[c]), accepted=bool(accepted[c]), **clouds[c])
        total_tokens = float(tokens.sum())
        train_loss = float(loss_sum.sum() / total_tokens) if total_tokens else None
        names = lambda mask: [self.data.client_names[i] for i in cohort.ids[mask]]
        return dict(
            round=rnd, train_loss=train_loss, train_ppl=perplexity(train_loss),
            tokens=total_tokens, tokens_per_s=total_tokens / wall_s, wall_s=wall_s,
            comm_s=max(c["comm_s"] for c in clouds), seal_s=sum(c["seal_s"] for c in clouds),
            open_s=sum(c["open_s"] for c in clouds), bytes_on_wire=sum(c["bytes_up"] + c["bytes_down"] for c in clouds),
            update_norm=update_norm, clients=int(clients.sum()), sampled=len(cohort.ids),
            dropped=int(cohort.dropped.sum()), stragglers=int((cohort.steps < self.cfg.client.local_steps).sum()),
            attacked_clients=names(self.byzantine[cohort.ids]),
            nonfinite_dropped=len(bad), nonfinite_clients=bad, clouds=per_cloud)

    def frozen_of(self, state: ServerState) -> Any:
        """The frozen base the global model of `state` runs on (FedEx-LoRA moves it each round)."""
        return effective_frozen(self.frozen, state.agg_state)

    def evaluate(self, state: ServerState) -> dict:
        """Eval loss and perplexity of the global model, global and per cloud."""
        return self.evaluator(state.params, self.frozen_of(state), self.cloud_names)
