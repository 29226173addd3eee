"""fedjax-llm-plan: will a run fit its devices, and what does one round cost, before it is queued.

    fedjax-llm-plan [--device h200|a100-80gb|tpu-v5e|cpu] [--memory BYTES] [--devices N] [--hosts H]
                    [--model-axis M] [--[no-]batch-over-model] [--usable F] [--source auto|analytic|compiled]
                    [--hlo-flops] [--measure] [--num-labels N] [--json FILE] [--verbose] OVERRIDES...

OVERRIDES are the training app's (`conf/train.yaml` composed and validated the same way). The round
is built on abstract shapes only (`plan_build`): no weight is read and no data is loaded, so an hf model
needs only its config.json. For each cloud the planner prints per-device bytes (params, optimizer and
client state, activations, temporaries, the peak and whether it fits), FLOPs per round, and the bytes of
every hop (the downlink to the cloud and its uplink, sealed as the run would seal them). Figures come
from the compiled round's `memory_analysis()` / `cost_analysis()` where the target backend is present
(with this machine's devices), and otherwise from the analytic model (`plan_model`, formulas in its
docstring). The device layout is an input (`Layout`: devices, their memory, hosts, a clients x model
mesh), so a model axis (run.mesh.model) and multi-process layouts plug in; with M > 1 the compiled
analysis places the round as the engine does (FSDP-style shardings of the base and the global params).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional

from fedjax_llm import plan_model as pm
from fedjax_llm.config import TrainConfig
from fedjax_llm.errors import ConfigError
from fedjax_llm.plan_devices import DEVICES, USABLE, Layout, local_layout, make_layout

PROG = "fedjax-llm-plan"


@dataclasses.dataclass
class CloudCost:
    """One cloud's round on the layout: per-device bytes, FLOPs and its two hops."""

    name: str
    capacity: int
    layout: tuple[int, int, int]   # devices x chunks x chunk (the clients axis)
    memory: pm.Memory
    fits: bool
    fits_remat: bool
    largest_chunk: Optional[int]
    largest_chunk_remat: Optional[int]
    peak_one: float                 # peak with one client per chunk (client.clients_per_chunk=1)
    peak_one_remat: float
    flops: float
    down: tuple[int, int]           # (payload, wire) bytes, aggregator -> cloud
    up: tuple[int, int]             # cloud -> aggregator
    compiled: Optional[dict] = None
    measured: Optional[int] = None
    hlo_flops: Optional[float] = None


@dataclasses.dataclass
class Plan:
    model: str
    counts: pm.ParamCounts
    param_dtype: str
    compute_dtype: str
    layout: Layout
    source: str
    clouds: list[CloudCost]
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.clouds)

    @property
    def peak(self) -> float:
        return max(c.memory.peak for c in self.clouds)

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.clouds)

    def compute_seconds(self) -> Optional[float]:
        """A lower bound: the busiest device's FLOPs at the device's peak rate for the compute dtype."""
        d = self.layout.device
        peak = d.bf16_flops if self.compute_dtype == "bfloat16" else d.f32_flops
        if not peak:
            return None
        share = self.layout.clients * (self.layout.model if self.layout.batch_over_model else 1)
        return sum(c.flops for c in self.clouds) / share / peak

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["layout"]["device"] = dataclasses.asdict(self.layout.device)
        out.update(fits=self.fits, peak=self.peak, flops=self.flops, compute_seconds=self.compute_seconds())
        for c, cc in zip(out["clouds"], self.clouds):
            c["memory"]["peak"], c["memory"]["peak_remat"] = cc.memory.peak, cc.memory.peak_remat
        return out


def _describe_model(ab: Any) -> str:
    cfg, spec = ab.cfg, ab.spec
    name = cfg.model.path if cfg.model.family == "hf" else f"{cfg.model.family} {cfg.model.size}"
    lora = cfg.model.lora
    tuned = (f"LoRA r{lora.rank} on {', '.join(lora.targets)} ({lora.aggregation})" if lora.enabled
             else "full fine-tuning")
    return f"{type(spec).__name__} {name}; {tuned}; {cfg.data.task}, seq {cfg.data.seq_len}"


def make_plan(cfg: TrainConfig, layout: Layout, *, source: str = "auto", vocab_size: Optional[int] = None,
              num_labels: Optional[int] = None, hlo_flops: bool = False, measure: bool = False) -> Plan:
    """The plan of one round of `cfg` on `layout` (see the module docstring)."""
    t0 = time.perf_counter()
    import jax

    from fedjax_llm import plan_build as pb
    from fedjax_llm.plan_wire import hop_bytes
    from fedjax_llm.clouds.transport import AGGREGATOR

    present = jax.default_backend() == layout.device.platform
    needed = layout.clients * layout.model
    why_not = (None if present and len(jax.devices()) >= needed else
               f"this process has {len(jax.devices())} {jax.default_backend()} device(s), the layout needs "
               f"{needed} {layout.device.platform}")
    if source not in ("auto", "analytic", "compiled"):
        raise ConfigError(f"--source: {source!r} is not one of ('auto', 'analytic', 'compiled')")
    if source == "compiled" and why_not:
        raise ConfigError(f"--source compiled: not available here: {why_not}")
    compiled_on = source != "analytic" and not why_not
    if measure and not (compiled_on and layout.device.platform == "cpu"):
        raise ConfigError("--measure: needs the compiled source on cpu (--device cpu)")

    ab = pb.build(cfg, vocab_size=vocab_size, num_labels=num_labels, clients_axis=layout.clients,
                  platform=layout.device.platform)
    spec, c = ab.spec, cfg.client
    counts = pm.param_counts(spec, ffa=cfg.model.lora.aggregation == "ffa")
    T = pm.tokens_seen(cfg.data.seq_len, cfg.data.task)
    rows = pm.ceil_div(c.batch_size, layout.model) if layout.batch_over_model else c.batch_size
    one_client = pb.tree_bytes(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), ab.pop_state))
    server = pb.tree_bytes(ab.opt_state) + pb.tree_bytes(ab.agg_state)
    plan = Plan(model=_describe_model(ab), counts=counts, param_dtype=spec.param_dtype,
                compute_dtype=spec.compute_dtype, layout=layout,
                source="compiled" if compiled_on else "analytic", clouds=[])
    if why_not and source != "analytic":
        plan.notes.append(f"analytic figures: {why_not}")
    if cfg.secure.secagg.enabled:
        plan.notes.append("secure.secagg: the key-exchange and share messages of secure aggregation are not "
                          "planned; the uplink shown is the update in the clear")
    compiled: dict = {}  # clouds of one layout share the engine's compiled compute (as Federation does)
    for cloud in ab.clouds:
        lay = cloud.layout
        slots = lay.num_chunks * lay.chunk
        outputs = ab.outputs[cloud.name]
        agg = pb.tree_bytes(ab.updates[cloud.name].aggregate)
        per_slot = (outputs - agg) / slots

        def memory(chunk: int, lay=lay) -> pm.Memory:
            n = pm.ceil_div(pm.ceil_div(lay.num_clients, lay.num_devices), chunk) * chunk
            return pm.round_memory(spec, counts=counts, T=T, seq_len=cfg.data.seq_len, batch=rows,
                                   steps=c.local_steps, chunk=chunk, slots=n, optimizer=c.optimizer,
                                   momentum=c.momentum, labels=cfg.data.task == "classify",
                                   client_state_bytes=one_client, broadcast_bytes=pb.tree_bytes(ab.broadcast),
                                   server_bytes=server, output_bytes=agg + n * per_slot, model_axis=layout.model,
                                   input_rows=c.batch_size)

        mem = memory(lay.chunk)
        per_device = pm.ceil_div(lay.num_clients, lay.num_devices)
        rnd = cfg.secure.compression != "none"
        down = hop_bytes(ab.global_msg, secure=cfg.secure, sender=AGGREGATOR, recipient=cloud.name, round=1, seq=0,
                         run_name=cfg.name, compress=cfg.secure.compress_downlink and rnd)
        up = hop_bytes(ab.updates[cloud.name], secure=cfg.secure, sender=cloud.name, recipient=AGGREGATOR,
                       round=1, seq=0, run_name=cfg.name, compress=rnd)
        flops = pm.round_flops(spec, T, c.batch_size, c.local_steps, lay.padded, counts.trainable)
        cost = CloudCost(
            name=cloud.name, capacity=cloud.capacity, layout=lay.shape, memory=mem,
            fits=mem.peak <= layout.budget, fits_remat=mem.peak_remat <= layout.budget,
            largest_chunk=pm.largest_chunk(lambda k: memory(k).peak <= layout.budget, per_device),
            largest_chunk_remat=pm.largest_chunk(lambda k: memory(k).peak_remat <= layout.budget, per_device),
            peak_one=memory(1).peak, peak_one_remat=memory(1).peak_remat, flops=flops, down=down, up=up)
        if compiled_on:
            mesh = pb.mesh_for(layout.clients, layout.model)
            if lay not in compiled:
                compiled[lay] = pb.compile_round(ab, cloud, mesh)
            comp = compiled[lay]
            cost.compiled = dict(arguments=comp.arguments, outputs=comp.outputs, temp=comp.temp, alias=comp.alias,
                                 peak=comp.peak + server, flops=comp.flops * mesh.size,  # XLA's is per device
                                 flops_reported=comp.flops_reported,
                                 server_peak=comp.server_peak, server_flops=comp.server_flops)
            cost.fits = cost.compiled["peak"] <= layout.budget
            if measure:
                if ("measured", lay) not in compiled:
                    compiled["measured", lay] = pb.measure_round(ab, cloud, mesh)
                cost.measured = compiled["measured", lay]
        if hlo_flops:
            cost.hlo_flops = pb.hlo_flops(ab, cloud)
        plan.clouds.append(cost)
    plan.seconds = time.perf_counter() - t0
    return plan


def format_plan(plan: Plan) -> str:
    """The plan as the console prints it."""
    hb, k = pm.human_bytes, plan.counts
    lines = [f"model: {plan.model}",
             f"  parameters: {k.trainable:,} trainable ({plan.param_dtype}), {k.frozen:,} frozen"
             + (f", {k.adapters:,} of them LoRA" if k.adapters else ""),
             f"layout: {plan.layout.describe()}",
             f"source: {plan.source} (planned in {plan.seconds:.1f} s)"]
    for c in plan.clouds:
        m = c.memory
        lines.append(f"cloud {c.name!r}: {c.capacity} clients per round, layout devices x chunks x chunk = "
                     f"{' x '.join(map(str, c.layout))}")
        lines.append("  per-device memory (analytic):")
        for label, value in (("params", m.params), ("optimizer + client state", m.state),
                             ("activations", m.activations), ("temporaries", m.temporaries)):
            share = f"  (attention scores {hb(m.scores)} of it)" if label == "activations" and m.scores else ""
            lines.append(f"    {label:<26}{hb(value):>12}{share}")
        verdict = "fits" if c.fits else "DOES NOT FIT"
        lines.append(f"    {'peak':<26}{hb(m.peak):>12}  -> {verdict} in {hb(plan.layout.budget)}")
        lines.append(f"    {'peak, per-layer remat':<26}{hb(m.peak_remat):>12}  (not in the engine yet: "
                     f"{'would fit' if c.fits_remat else 'would not fit'})")
        if c.largest_chunk != c.layout[2]:
            best = c.largest_chunk
            lines.append(f"    largest client.clients_per_chunk that fits: "
                         f"{best if best else 'none (not even 1 client)'}; with remat: "
                         f"{c.largest_chunk_remat or 'none'}")
            lines.append(f"    one client per chunk: peak {hb(c.peak_one)}, with remat {hb(c.peak_one_remat)}")
        if c.compiled:
            x = c.compiled
            lines.append(f"  compiled (XLA, {plan.layout.device.platform}): arguments {hb(x['arguments'])}, temp "
                         f"{hb(x['temp'])}, outputs {hb(x['outputs'])}, peak with server state {hb(x['peak'])}; "
                         f"server step peak {hb(x['server_peak'])}")
        if c.measured is not None:
            lines.append(f"  measured: the round added {hb(c.measured)} of resident memory while it ran")
        flops = f"  FLOPs per round: {pm.sci(c.flops)} analytic"
        if c.compiled:
            flops += f", {pm.sci(c.compiled['flops'])} compiled"
        if c.hlo_flops:
            flops += f", {pm.sci(c.hlo_flops)} from the round's HLO"
        lines.append(flops)
        seal = "sealed" if c.down[1] != c.down[0] else "plaintext"
        lines.append(f"  messages ({seal}): down aggregator -> {c.name} {hb(c.down[1])} ({c.down[1]:,} B), "
                     f"up {c.name} -> aggregator {hb(c.up[1])} ({c.up[1]:,} B)")
    secs = plan.compute_seconds()
    lines.append(f"round: {pm.sci(plan.flops)} FLOPs" + (f", compute >= {secs:.1f} s at the device's peak "
                                                          f"{plan.compute_dtype} rate" if secs else ""))
    lines.append(f"verdict: {'fits' if plan.fits else 'does not fit'} (peak {hb(plan.peak)} per device)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def compose(overrides: list[str]) -> TrainConfig:
    """conf/train.yaml with the overrides, typed and validated, as fedjax-llm-train composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedjax_llm.config import register_configs, to_train_config
    from fedjax_llm.train import CONF_DIR
    from fedjax_llm.validation import validate

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        dcfg = hydra_compose(config_name="train", overrides=list(overrides))
    return validate(to_train_config(dcfg))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Plan a run: per-device memory, FLOPs per round and "
                                "bytes per message, before it is queued.")
    p.add_argument("--device", default="cpu", help=f"one of {sorted(DEVICES)} (default cpu)")
    p.add_argument("--memory", type=float, help="bytes per device (instead of the device table's)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--hosts", type=int, default=1)
    p.add_argument("--model-axis", type=int, help="M of a clients x model mesh (default: the config's "
                   "run.mesh.model)")
    p.add_argument("--batch-over-model", action=argparse.BooleanOptionalAction, default=None,
                   help="the model axis also splits each batch's activations (default: on with M > 1, as the "
                   "engine's partitioner does)")
    p.add_argument("--usable", type=float, help=f"usable share of device memory (default {USABLE})")
    p.add_argument("--source", default="auto", help="auto | analytic | compiled")
    p.add_argument("--hlo-flops", action="store_true", help="also count FLOPs in the lowered round's HLO")
    p.add_argument("--measure", action="store_true", help="cpu: run the compiled round once, report its peak")
    p.add_argument("--num-labels", type=int, help="classification: labels (default len(data.categories) or 2)")
    p.add_argument("--json", help="also write the plan as JSON to this file")
    return p


def _config_model_axis(cfg: TrainConfig) -> int:
    """The config's model axis (run.mesh.model)."""
    return cfg.run.mesh.model


def plan_for_run(cfg: TrainConfig) -> Plan:
    """run.plan_only=true: the plan of `cfg` on this process's own devices (run.devices of them, all by
    default), from the compiled round where the engine can build it here."""
    return make_plan(cfg, local_layout(cfg.run.devices, _config_model_axis(cfg)))


def main(argv: Optional[list[str]] = None) -> int:
    """Console script; returns the exit code (0: fits, 3: does not fit, else an error)."""
    from fedjax_llm.cli import pop_verbose, run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = pop_verbose(argv)

    def run() -> int:
        args, overrides = _parser().parse_known_args(argv)
        bad = [o for o in overrides if o.startswith("-")]
        if bad:
            raise ConfigError(f"{bad[0]}: not an option of {PROG} (see --help); overrides are key=value")
        cfg = compose(overrides)
        model = args.model_axis if args.model_axis is not None else _config_model_axis(cfg)
        layout = make_layout(args.device, args.devices, args.hosts, model, args.memory, args.usable,
                             args.batch_over_model)
        plan = make_plan(cfg, layout, source=args.source, num_labels=args.num_labels,
                         hlo_flops=args.hlo_flops, measure=args.measure)
        print(format_plan(plan))
        if args.json:
            with open(os.path.expanduser(args.json), "w", encoding="utf-8") as f:
                json.dump(plan.to_dict(), f, indent=1, default=str)
        return 0 if plan.fits else 3

    return run_main(run, PROG, verbose)


if __name__ == "__main__":
    sys.exit(main())
