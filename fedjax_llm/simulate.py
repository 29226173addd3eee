"""The federation in one process: the cloud half and the aggregator half of a round, wired over the
in-process transport. A deployment runs the same halves in separate processes; this is the reference
it must equal.

`Federation` builds what is fixed for a run (data, model, algorithm, every cloud's `Cloud`, the
aggregator's `AggregatorSpec`, the transport); `FederationState` holds the aggregator's state and each
cloud's, one pytree that checkpoints and resumes bit for bit. One round, `run_round(state)`:

    aggregator  open_round -> GlobalMsg                     -> every cloud
    [secure aggregation across clouds: keys, then encrypted shares routed by the aggregator]
    each cloud  cloud_step -> CloudUpdate | MaskedUpdate    -> aggregator
    [secure aggregation across clouds: who arrived, the survivors' shares, the unmasked sum]
    aggregator  aggregator_step -> new global model, metrics
"""
from __future__ import annotations

import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from fedjax_llm import aggregator as agg_half
from fedjax_llm import distributed, participation
from fedjax_llm.aggregate.lora_round import client_ranks, effective_frozen
from fedjax_llm.aggregator import AggregatorSpec, AggregatorState, SecureSumSpec
from fedjax_llm.algorithms import Algorithm, LoRAScheme, build_algorithm, server_update
from fedjax_llm.client import client_optimizer, init_population_state, make_local_update, make_task_loss
from fedjax_llm.cloud import Cloud, CloudState, Engine, cloud_step, init_cloud_state, update_template
from fedjax_llm.clouds.channel import Channel, plaintext_channel
from fedjax_llm.clouds.link import Link
from fedjax_llm.clouds.transport import AGGREGATOR, InProcessTransport, new_stats, refuse
from fedjax_llm.config import TrainConfig
from fedjax_llm.data.federated import FederatedData
from fedjax_llm.evaluate import make_evaluator
from fedjax_llm.messages import MessageError
from fedjax_llm.models.build import build_model, freeze_lora_a
from fedjax_llm.round import AXIS, default_chunk, make_loop_compute, make_round_compute, plan_layout
from fedjax_llm.secure import protocol
from fedjax_llm.secure.secagg import SecAggError
from fedjax_llm.types import ClientHParams

_CLOUD_KEYS = 0xC10D  # cloud c's key: fold_in(fold_in(root, _CLOUD_KEYS), c); the aggregator never holds it


@struct.dataclass
class FederationState:
    """The aggregator's state and every cloud's, in cloud order: one pytree, one checkpoint."""

    aggregator: AggregatorState
    clouds: dict  # name -> CloudState
    names: tuple = struct.field(pytree_node=False, default=())

    @property
    def round(self) -> jax.Array:
        return self.aggregator.round

    @property
    def params(self) -> Any:
        return self.aggregator.params

    @property
    def opt_state(self) -> Any:
        return self.aggregator.opt_state

    @property
    def agg_state(self) -> Any:
        return self.aggregator.agg_state

    @property
    def client_states(self) -> Any:
        """Every client's algorithm state as its cloud last counted it, [P, ...] in client order."""
        parts = [self.clouds[n].client_states for n in self.names]
        return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)

    @property
    def data_cursors(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.clouds[n].cursors) for n in self.names])


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
    """Every party of a run in one process: `init_state`, `run_round`, `evaluate`."""

    def __init__(self, cfg: TrainConfig, data: FederatedData, *, mesh: Optional[Mesh] = None,
                 channel: Optional[Channel] = None, algorithm: Optional[Algorithm] = None):
        self.cfg = cfg
        self.mesh = mesh or make_mesh(cfg.run.devices)
        self.channel = channel or plaintext_channel()
        self.cloud_names = list(data.cloud_names)
        self.root = jax.random.key(cfg.seed)
        self.k_model, self.k_data, _, k_attack, k_dp = jax.random.split(self.root, 5)
        self.expected_clients = participation.expected_clients(cfg, data.client_cloud)
        g = cfg.secure.secagg
        self.algo = algorithm or build_algorithm(
            cfg.algorithm, cfg.attack, data.num_clients, dp=cfg.secure.dp, expected_clients=self.expected_clients,
            dp_key=k_dp, dp_noise_at_clouds=g.enabled, lora=lora_scheme(cfg, data.num_clients))
        self.fns, self.init_params, self.frozen, self.spec = build_model(cfg, data.vocab_size, data.num_labels,
                                                                         self.k_model)
        if cfg.model.lora.aggregation == "ffa":
            self.init_params, self.frozen = freeze_lora_a(self.init_params, self.frozen)
        self.hparams = ClientHParams(lr=jnp.float32(cfg.client.lr))
        self.byzantine = participation.byzantine_clients(cfg.attack, data.client_cloud, self.cloud_names, k_attack)
        self.cohort_size = participation.cohort_capacity(cfg, data.client_cloud)
        self.local_update = make_local_update(make_task_loss(cfg.data.task, self.fns.apply),
                                              client_optimizer(cfg.client), self.algo.pieces)
        self.transport = InProcessTransport(self.channel, {n: Link.from_config(cfg.clouds.members[n].link)
                                                           for n in self.cloud_names})
        self._engines: dict = {}
        self._server_step = jax.jit(lambda *a: server_update(self.algo, *a))
        self._data = data
        self.num_train = data.num_train_examples()  # builds the clouds and the aggregator
        self.evaluator = make_evaluator(cfg.data.task, self.fns.apply, data, cfg.data.max_eval_examples,
                                        cfg.run.eval_batch_size)

    # ----- what is fixed for the run --------------------------------------------------------------------
    @property
    def data(self) -> FederatedData:
        return self._data

    @data.setter
    def data(self, data: FederatedData) -> None:
        self._data = data
        self._build()

    @property
    def num_train(self) -> np.ndarray:
        return self._num_train

    @num_train.setter
    def num_train(self, num_train: np.ndarray) -> None:
        """Clients' example counts (their FedAvg weights under client.weighting=examples)."""
        self._num_train = np.asarray(num_train).copy()
        self._build()

    def _engine(self, capacity: int) -> Engine:
        """The compiled compute for a cloud of `capacity` slots (clouds of one size share it)."""
        cfg = self.cfg
        chunk = cfg.client.clients_per_chunk or default_chunk(self.mesh.devices.flat[0].platform)
        layout = plan_layout(capacity, self.mesh.size, chunk)
        if layout not in self._engines:
            collect = cfg.secure.secagg.enabled and cfg.secure.secagg.scope != "clouds"
            loop = cfg.client.backend == "loop"
            multi = jax.process_count() > 1
            if loop and multi:
                raise ValueError("client.backend=loop runs clients one by one in one process; a multi-process "
                                 "run needs client.backend=vmap")
            if loop:
                run = make_loop_compute(self.local_update, self.algo.reducer, self.algo.transform, 1, collect=collect)
            else:
                run = make_round_compute(self.local_update, self.algo.reducer, self.algo.transform, 1, self.mesh,
                                         layout, collect=collect)
            rows = distributed.local_rows(self.mesh, layout.padded) if multi else (0, 1 << 62)
            shared = distributed.put_replicated(self.frozen, self.mesh) if multi else None
            self._engines[layout] = Engine(run, self.local_update, layout, self.mesh, self.frozen, self.hparams, loop,
                                           rows, shared)
        return self._engines[layout]

    def _build(self) -> None:
        cfg, data = self.cfg, self._data
        weights = self._num_train if cfg.client.weighting == "examples" else np.ones(data.num_clients)
        sizes = [int(np.sum(data.client_cloud == c)) for c in range(len(self.cloud_names))]
        caps = participation.per_cloud_capacity(cfg, sizes)
        g = cfg.secure.secagg
        across = g.enabled and g.scope != "clients"
        secagg_params = protocol.params_for(g, len(self.cloud_names)) if across else None
        scale = float(np.sum(data.num_train_examples() if cfg.client.weighting == "examples"
                             else np.ones(data.num_clients)))
        self.clouds = []
        for c, name in enumerate(self.cloud_names):
            members = np.flatnonzero(data.client_cloud == c)
            self.clouds.append(Cloud(
                name=name, index=c, members=members, client_names=tuple(data.client_names[i] for i in members),
                weights=np.asarray(weights, np.float32)[members], byzantine=self.byzantine[members],
                capacity=caps[c], data=data, engine=self._engine(caps[c]), client=cfg.client,
                participation=cfg.participation, attack=cfg.attack, secure=cfg.secure,
                expected_clients=self.expected_clients, secagg_scale=scale,
                secagg_parties=secagg_params.threshold if secagg_params else 1))
        self.layout = max((cl.engine.layout for cl in self.clouds), key=lambda lay: lay.padded)
        secure = None
        if across:  # the aggregator's template of a cloud's aggregate, to unflatten the secure sum
            plain = self._spec(None)
            first = agg_half.open_round(plain, self._init_aggregator(plain))
            first_cloud = self.clouds[0]
            template = update_template(first_cloud, self._init_clouds([first_cloud])[first_cloud.name], first)
            secure = SecureSumSpec(params=secagg_params, scale=scale, template=template)
        self.aggregator = self._spec(secure)
        self._initial = FederationState(aggregator=self._init_aggregator(self.aggregator),
                                        clouds=self._init_clouds(self.clouds), names=tuple(self.cloud_names))

    def _spec(self, secure: Optional[SecureSumSpec]) -> AggregatorSpec:
        offsets = tuple(int(cl.members[0]) if len(cl.members) else 0 for cl in self.clouds)
        return AggregatorSpec(cloud_names=tuple(self.cloud_names), client_names=tuple(cl.client_names for cl in self.clouds),
                              client_offsets=offsets, algo=self.algo, server_step=self._server_step,
                              quorum=self.cfg.secure.quorum, on_nonfinite=self.cfg.run.on_nonfinite, secure=secure)

    # ----- state ---------------------------------------------------------------------------------------
    def _init_clouds(self, clouds: list[Cloud]) -> dict[str, CloudState]:
        """Each cloud's state before round 1: its key folded from the seed with its index (no other
        party holds it), its clients' initial algorithm state, the data order seed."""
        population = init_population_state(self.algo.pieces, self.init_params, self._data.num_clients)
        data_seed = np.asarray(jax.random.bits(self.k_data, dtype=jnp.uint32))
        k_clouds = jax.random.fold_in(self.root, _CLOUD_KEYS)
        return {cl.name: init_cloud_state(cl, jax.random.fold_in(k_clouds, cl.index), data_seed,
                                          jax.tree.map(lambda s: s[cl.members], population)) for cl in clouds}

    def _init_aggregator(self, spec: AggregatorSpec) -> AggregatorState:
        return agg_half.init_aggregator_state(spec, self.init_params)

    def init_state(self) -> FederationState:
        """Every party's state before round 1 (built with the parties, so starting a run compiles nothing)."""
        return self._initial.replace(clouds=dict(self._initial.clouds))

    # ----- one round -----------------------------------------------------------------------------------
    def run_round(self, state: FederationState) -> tuple[FederationState, dict]:
        """One federated round; returns the new state and this round's metrics."""
        t0 = time.perf_counter()
        spec, names = self.aggregator, self.cloud_names
        rnd = int(state.round) + 1
        stats = {n: new_stats() for n in names}
        hop = lambda tree, sender, recipient: self.transport.hop(  # noqa: E731
            tree, sender=sender, recipient=recipient, round=rnd, stats=stats)

        down = agg_half.open_round(spec, state.aggregator)
        got = {n: hop(down, AGGREGATOR, n) for n in names}
        parties, session = {}, None
        if spec.secure is not None:
            parties, session = self._share_keys(rnd, got, hop, stats)

        clouds, updates = dict(state.clouds), {}
        for cloud in self.clouds:
            n, msg = cloud.name, got[cloud.name]
            if msg is None or (spec.secure is not None and n not in parties):
                updates[n] = None
                continue
            update, clouds[n] = cloud_step(cloud, state.clouds[n], msg, parties.get(n))
            updates[n] = hop(update, n, AGGREGATOR)

        errors = {n: s["error"] for n, s in stats.items()}
        updates, errors = agg_half.verify(spec, state.aggregator, updates, errors)
        total = self._unmask(rnd, session, parties, updates, hop, stats) if session is not None else None
        new_agg, metrics = agg_half.aggregator_step(spec, state.aggregator, updates, errors, total)
        new_state = FederationState(aggregator=new_agg, clouds=clouds, names=state.names)
        return new_state, _with_transport(metrics, stats, time.perf_counter() - t0)

    def _share_keys(self, rnd: int, got: dict, hop, stats: dict) -> tuple[dict, tuple]:
        """Secure aggregation's rounds 0-1: keys advertised, shares routed; the clouds of U2 with their parties."""
        names, params = self.cloud_names, self.aggregator.secure.params
        parties = {n: protocol.CloudSecAgg(n, names, params, rnd) for n in names if got[n] is not None}
        ads = {n: hop(p.advertise(), n, AGGREGATOR) for n, p in parties.items()}
        roster, roster_msg = protocol.roster(names, ads, params, rnd)
        shares = {}
        for n in roster.members:
            out = _party(stats, n, parties[n].share, hop(roster_msg, AGGREGATOR, n))
            shares[n] = None if out is None else hop(out, n, AGGREGATOR)
        holders, routed = protocol.route(roster, shares, rnd)
        kept = {n: parties[n] for n in holders if _party(stats, n, parties[n].receive, hop(routed[n], AGGREGATOR, n))}
        return kept, (roster, holders)

    def _unmask(self, rnd: int, session: tuple, parties: dict, updates: dict, hop, stats: dict) -> np.ndarray:
        """Secure aggregation's round 3: the survivors reveal shares, the aggregator unmasks their sum."""
        roster, holders = session
        request = protocol.request(self.cloud_names, holders, updates, rnd)
        reveals = {}
        for n, p in parties.items():
            if updates.get(n) is not None:
                out = _party(stats, n, p.reveal, hop(request, AGGREGATOR, n))
                reveals[n] = None if out is None else hop(out, n, AGGREGATOR)
        return protocol.unmask(roster, holders, updates, reveals, rnd)

    # ----- the global model ----------------------------------------------------------------------------
    def frozen_of(self, state: FederationState) -> Any:
        """The frozen base the global model of `state` runs on (FedEx-LoRA moves it each round)."""
        return effective_frozen(self.frozen, state.agg_state)

    def evaluate(self, state: FederationState) -> dict:
        """Eval loss and perplexity of the global model, global and per cloud."""
        return self.evaluator(state.params, self.frozen_of(state), self.cloud_names)


def _party(stats: dict, cloud: str, step, msg):
    """A cloud's protocol step on a message that reached it; None when there was none or the step
    failed (the reason is kept: that cloud drops out of the secure sum)."""
    if msg is None:
        return None
    try:
        return step(msg)
    except (SecAggError, MessageError) as e:
        refuse(stats[cloud], f"{cloud}: {type(e).__name__}: {e}")
        return None


def _with_transport(metrics: dict, stats: dict, wall_s: float) -> dict:
    """The aggregator's metrics with the transport's figures, in metrics.jsonl's order."""
    clouds = {n: {**{k: c[k] for k in ("train_loss", "train_ppl", "clients", "accepted")},
                  **{k: v for k, v in stats[n].items() if k != "error"}, "error": c["error"] or stats[n]["error"]}
              for n, c in metrics["clouds"].items()}
    values = list(stats.values())
    head = {k: metrics[k] for k in ("round", "train_loss", "train_ppl", "tokens")}
    return dict(**head, tokens_per_s=metrics["tokens"] / wall_s, wall_s=wall_s,
                comm_s=max(s["comm_s"] for s in values), seal_s=sum(s["seal_s"] for s in values),
                open_s=sum(s["open_s"] for s in values),
                bytes_on_wire=sum(s["bytes_up"] + s["bytes_down"] for s in values),
                **{k: v for k, v in metrics.items() if k not in head and k != "clouds"}, clouds=clouds)
