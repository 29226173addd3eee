"""The planner's abstract build: the engine's own round, on shapes only.

`build(cfg, ...)` makes what `Federation` makes for a run, with `ShapeDtypeStruct` leaves in place of
weights and data: the model spec (an hf model needs only its config.json), the algorithm, the client
function, each cloud's cohort slots and layout, and the messages of a round (from `jax.eval_shape` of
the aggregator's and the round's own functions). Where the target backend is present, `compile_round`
lowers and compiles the real jitted round compute and server step on those shapes and reads XLA's
memory and cost analyses; `measure_round` runs the compiled round once on zeros and reads the process's
peak resident memory (CPU only).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_llm import participation
from fedjax_llm.algorithms import Algorithm, build_algorithm, server_update
from fedjax_llm.client import client_optimizer, init_population_state, make_local_update, make_task_loss
from fedjax_llm.config import CloudConfig, TrainConfig
from fedjax_llm.messages import ERROR_BYTES, CloudReport, CloudUpdate, GlobalMsg
from fedjax_llm.models.build import freeze_lora_a, spec_from_config
from fedjax_llm.models.params import abstract_params, model_fns
from fedjax_llm.models.spec import ModelSpec
from fedjax_llm.round import (AXIS, MODEL, RoundInputs, RoundLayout, default_chunk, fsdp_grads, fsdp_shardings,
                              make_round_compute, plan_layout)
from fedjax_llm.types import ClientBatches, ClientHParams, CloudAggregate

S = jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True)
class CloudPlan:
    """One cloud as the round sees it: its clients, cohort slots per round and their layout."""

    name: str
    index: int
    clients: int
    capacity: int
    layout: RoundLayout
    config: CloudConfig


@dataclasses.dataclass
class Abstract:
    """A run's round on abstract shapes."""

    cfg: TrainConfig
    spec: ModelSpec
    trainable: Any          # ShapeDtypeStruct trees
    frozen: Any
    algo: Algorithm
    local_update: Any
    population: int
    pop_state: Any          # every client's algorithm state, leaves [P, ...]
    broadcast: Any
    agg_state: Any
    opt_state: Any
    clouds: list[CloudPlan]
    global_msg: GlobalMsg
    updates: dict[str, CloudUpdate]
    num_labels: Optional[int]
    outputs: dict[str, int] = dataclasses.field(default_factory=dict)  # per cloud: one device's output bytes


def _bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree of arrays or ShapeDtypeStructs."""
    return _bytes(tree)


def _key_shape() -> tuple[int, ...]:
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def round_inputs(ab: Abstract, layout: RoundLayout) -> RoundInputs:
    """Abstract RoundInputs of one cloud compute: what cloud.round_inputs builds, as shapes."""
    c = ab.cfg
    Kp, St, B, T = layout.padded, c.client.local_steps, c.client.batch_size, c.data.seq_len
    task = {"tokens": S((Kp, St, B, T), jnp.int32), "loss_mask": S((Kp, St, B, T), jnp.float32)}
    if c.data.task == "classify":
        task["labels"] = S((Kp, St, B), jnp.int32)
    state = jax.tree.map(lambda s: S((Kp,) + tuple(s.shape[1:]), s.dtype), ab.pop_state)
    return RoundInputs(batches=ClientBatches(inputs=task, step_mask=S((Kp, St), jnp.bool_)),
                       keys=S((Kp,) + _key_shape(), jnp.uint32), weights=S((Kp,), jnp.float32),
                       onehot=S((Kp, 1), jnp.float32), attacked=S((Kp,), jnp.bool_), state=state)


def hparams() -> ClientHParams:
    return ClientHParams(lr=S((), jnp.float32))


def _single_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), (AXIS,))


def make_compute(ab: Abstract, layout: RoundLayout, mesh: Mesh):
    """The engine's jitted round compute for one cloud of this layout (as Federation._engine builds it;
    with a model axis, the clients' gradients are laid out FSDP-style as the engine lays them)."""
    s = ab.cfg.secure.secagg
    collect = s.enabled and s.scope != "clouds"
    local_update = ab.local_update
    if MODEL in mesh.axis_names:
        local_update = make_local_update(make_task_loss(ab.cfg.data.task, model_fns(ab.spec).apply),
                                         client_optimizer(ab.cfg.client), ab.algo.pieces, fsdp_grads(mesh))
    return make_round_compute(local_update, ab.algo.reducer, ab.algo.transform, 1, mesh, layout, collect=collect)


def build(cfg: TrainConfig, *, vocab_size: Optional[int] = None, num_labels: Optional[int] = None,
          clients_axis: int = 1, platform: str = "gpu") -> Abstract:
    """The run's round on shapes. vocab_size defaults to data.vocab_size (a trained BPE's upper bound; an
    hf model has its own); num_labels (classification) to len(data.categories), else 2. `platform` picks
    the default clients per chunk, as the engine does for its devices."""
    if cfg.data.task == "classify" and num_labels is None:
        num_labels = len(cfg.data.categories) or 2
    if cfg.data.task != "classify":
        num_labels = None
    spec = spec_from_config(cfg, vocab_size or cfg.data.vocab_size, num_labels)
    trainable, frozen = abstract_params(spec)
    if cfg.model.lora.aggregation == "ffa":
        trainable, frozen = freeze_lora_a(trainable, frozen)
    names = list(cfg.clouds.members)
    sizes = [cfg.clouds.members[n].clients for n in names]
    client_cloud = np.repeat(np.arange(len(names), dtype=np.int32), sizes)
    population = int(sum(sizes))
    from fedjax_llm.simulate import lora_scheme  # the run's LoRA scheme, exactly as the engine derives it

    g = cfg.secure.secagg
    algo = build_algorithm(cfg.algorithm, cfg.attack, population, dp=cfg.secure.dp,
                           expected_clients=participation.expected_clients(cfg, client_cloud),
                           dp_key=jax.random.key(0), dp_noise_at_clouds=g.enabled,
                           lora=lora_scheme(cfg, population))
    local_update = make_local_update(make_task_loss(cfg.data.task, model_fns(spec).apply),
                                     client_optimizer(cfg.client), algo.pieces)
    pop_state = jax.eval_shape(lambda p: init_population_state(algo.pieces, p, population), trainable)
    agg_state = jax.eval_shape(algo.aggregator.init, trainable)
    broadcast = jax.eval_shape(algo.aggregator.broadcast, agg_state)
    opt_state = jax.eval_shape(algo.server_opt.init, trainable)
    chunk = cfg.client.clients_per_chunk or default_chunk(platform)
    caps = participation.per_cloud_capacity(cfg, sizes)
    clouds = [CloudPlan(n, i, sizes[i], caps[i], plan_layout(caps[i], clients_axis, chunk), cfg.clouds.members[n])
              for i, n in enumerate(names)]
    msg = GlobalMsg(round=S((), jnp.int32), params=trainable, broadcast=broadcast, counted=S((len(names),), jnp.int32))
    ab = Abstract(cfg=cfg, spec=spec, trainable=trainable, frozen=frozen, algo=algo, local_update=local_update,
                  population=population, pop_state=pop_state, broadcast=broadcast, agg_state=agg_state,
                  opt_state=opt_state, clouds=clouds, global_msg=msg, updates={}, num_labels=num_labels)
    traced: dict[RoundLayout, Any] = {}
    for cl in clouds:
        one = device_layout(cl.layout)
        if one not in traced:  # one trace per distinct per-device program
            compute = make_compute(ab, one, _single_mesh())
            traced[one] = jax.eval_shape(compute, trainable, frozen, broadcast, round_inputs(ab, one), hparams())
        ab.outputs[cl.name] = _bytes(traced[one])
        ab.updates[cl.name] = _cloud_update(cl, traced[one])
    return ab


def _cloud_update(cloud: CloudPlan, out: Any) -> CloudUpdate:
    """The cloud's uplink as shapes: the round compute's per-cloud aggregate (from eval_shape of the
    real compute; it does not depend on the layout) and the cloud's report of its slots."""
    agg = jax.tree.map(lambda s: S(tuple(s.shape[1:]), s.dtype), out.clouds)
    m = cloud.capacity
    flag = S((m,), jnp.bool_)
    report = CloudReport(round=S((), jnp.int32), slot_client=S((m,), jnp.int32), dropped=flag, straggler=flag,
                         nonfinite=flag, attacked=flag, error=S((ERROR_BYTES,), jnp.uint8))
    return CloudUpdate(report=report, aggregate=CloudAggregate(**{f.name: getattr(agg, f.name)
                                                                  for f in dataclasses.fields(agg)}))


def device_layout(layout: RoundLayout) -> RoundLayout:
    """One device's share of a layout: the per-device program, which is the same on every device."""
    return RoundLayout(layout.num_chunks * layout.chunk, 1, layout.num_chunks, layout.chunk)


# ----- compiled on the present backend -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Compiled:
    """XLA's analyses of one cloud's round compute and of the server step, per device."""

    arguments: int
    outputs: int
    temp: int
    alias: int
    flops: float            # whole round compute: the cost analysis' figure x local steps x chunks
    flops_reported: float   # as XLA reports it (every while-loop body counted once)
    server_peak: int        # the server step's arguments + outputs + temp
    server_flops: float

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs + self.temp - self.alias


def mesh_for(clients: int, model: int = 1) -> Mesh:
    """The engine's mesh (simulate.make_mesh): clients, or clients x model with a model axis."""
    devices = jax.devices()
    n = clients * model
    if n > len(devices):
        raise ValueError(f"plan: the compiled analysis needs {n} {jax.default_backend()} devices, this process "
                         f"has {len(devices)}")
    if model == 1:
        return Mesh(np.array(devices[:n]), (AXIS,))
    return Mesh(np.array(devices[:n]).reshape(clients, model), (AXIS, MODEL))


def _placements(ab: Abstract, layout: RoundLayout, mesh: Mesh) -> tuple:
    """(tree, sharding tree) per argument of the round compute, as cloud.placed_args lays them out: a
    model axis splits the frozen base and the global params FSDP-style, the inputs are split by client."""
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    like = lambda tree, sharding: jax.tree.map(lambda _: sharding, tree)  # noqa: E731
    model = MODEL in mesh.axis_names
    inputs = round_inputs(ab, layout)
    return ((ab.trainable, fsdp_shardings(ab.trainable, mesh) if model else like(ab.trainable, rep)),
            (ab.frozen, fsdp_shardings(ab.frozen, mesh) if model else like(ab.frozen, rep)),
            (ab.broadcast, like(ab.broadcast, rep)), (inputs, like(inputs, split)), (hparams(), like(hparams(), rep)))


def lower_round(ab: Abstract, cloud: CloudPlan, mesh: Mesh):
    """The real round compute for `cloud`, lowered on abstract inputs laid out as the engine lays them."""
    compute = make_compute(ab, cloud.layout, mesh)
    args = [jax.tree.map(lambda s, sh: S(s.shape, s.dtype, sharding=sh), tree, shardings)
            for tree, shardings in _placements(ab, cloud.layout, mesh)]
    return compute.lower(*args)


def _flops(analysis: Any) -> float:
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def compile_round(ab: Abstract, cloud: CloudPlan, mesh: Mesh) -> Compiled:
    """XLA's memory and cost analysis of the compiled round compute and server step."""
    compiled = lower_round(ab, cloud, mesh).compile()
    mem = compiled.memory_analysis()
    reported = _flops(compiled.cost_analysis())
    trips = ab.cfg.client.local_steps * cloud.layout.num_chunks
    stacked = jax.tree.map(lambda s: S((len(ab.clouds),) + tuple(s.shape), s.dtype),
                           ab.updates[cloud.name].aggregate)
    server = jax.jit(lambda *a: server_update(ab.algo, *a)).lower(
        ab.trainable, ab.opt_state, ab.agg_state, stacked).compile()
    smem = server.memory_analysis()
    return Compiled(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                    temp=mem.temp_size_in_bytes, alias=mem.alias_size_in_bytes, flops=reported * trips,
                    flops_reported=reported,
                    server_peak=smem.argument_size_in_bytes + smem.output_size_in_bytes + smem.temp_size_in_bytes,
                    server_flops=_flops(server.cost_analysis()))


def hlo_flops(ab: Abstract, cloud: CloudPlan) -> float:
    """FLOPs of the round from XLA's cost analysis of the lowered (unoptimised) module, times the loop
    trips: an independent count from the real round's HLO, available without the target backend."""
    one = dataclasses.replace(cloud, layout=device_layout(cloud.layout))
    lowered = lower_round(ab, one, _single_mesh())
    trips = ab.cfg.client.local_steps * cloud.layout.num_chunks
    return _flops(lowered.cost_analysis()) * trips * cloud.layout.num_devices


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def measure_round(ab: Abstract, cloud: CloudPlan, mesh: Mesh) -> int:
    """Peak resident bytes the compiled round adds while it runs on zeros: one warm-up run (the runtime's
    one-time allocations: thread pools, scratch), then the high-water mark is reset through
    /proc/self/clear_refs (Linux) and a second run is measured. Run under MALLOC_MMAP_THRESHOLD_=65536
    so that freed buffers leave the resident set and the figure is the compute's own."""
    compiled = lower_round(ab, cloud, mesh).compile()
    args = [jax.tree.map(lambda s, sh: jax.device_put(jnp.zeros(s.shape, s.dtype), sh), tree, shardings)
            for tree, shardings in _placements(ab, cloud.layout, mesh)]
    warm = jax.jit(lambda x: jax.lax.fori_loop(0, 2, lambda i, y: jnp.tanh(y @ y), x))
    jax.block_until_ready(warm(jnp.ones((512, 512), jnp.float32)))  # the runtime's thread pools and scratch
    before = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = jax.block_until_ready(compiled(*args))
    peak = _status()["VmHWM"] - before
    del out
    return peak
