"""The planner's devices and layouts: what a run gets (device kind, count, hosts, a clients x model mesh).

`DEVICES` holds vendor figures (memory per device, dense peak FLOP/s); `make_layout` checks a layout
given on the command line, `local_layout` describes this process's own devices (run.plan_only).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from fedjax_llm import plan_model as pm
from fedjax_llm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator kind: memory per device and dense peak FLOP/s (vendor figures)."""

    name: str
    platform: str              # the jax backend that runs it: gpu | tpu | cpu
    memory: float              # bytes per device
    bf16_flops: Optional[float]
    f32_flops: Optional[float]
    source: str


def _host_memory() -> float:
    try:
        with open("/proc/meminfo") as f:
            return float(next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemTotal:")))
    except (OSError, StopIteration):
        return 0.0


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h200", "gpu", 141e9, 989e12, 67e12, "NVIDIA H200 SXM datasheet: 141 GB HBM3e, 989 TFLOP/s dense BF16"),
    Device("a100-80gb", "gpu", 80e9, 312e12, 19.5e12, "NVIDIA A100 80GB SXM datasheet: 80 GB HBM2e, 312 TFLOP/s dense BF16"),
    Device("tpu-v5e", "tpu", 16 * 2 ** 30, 197e12, None, "Cloud TPU v5e docs: 16 GiB HBM2, 197 TFLOP/s BF16 per chip"),
    Device("cpu", "cpu", _host_memory(), None, None, "this machine: MemTotal of /proc/meminfo"),
)}
USABLE = 0.9  # of device memory: headroom for the runtime, workspaces and fragmentation (an assumption)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The devices a run gets: `devices` of one kind on `hosts` hosts, as a clients x model mesh.

    clients: the engine's axis today; each position trains its share of a cloud's cohort.
    model: M > 1 is section 2's axis, assumed FSDP-style: the frozen base (and for full fine-tuning the
    trainable weights, their gradients and optimizer state) split M ways, one layer gathered at a
    time. A client's batch stays whole on every device of its model group (activations and compute
    per device as with M = 1) unless `batch_over_model`, where each device takes B/M of its rows. The
    engine's model axis is left to XLA's partitioner, which on CPU splits the activations about M ways
    (compiled temp bytes of nano on 4 host devices: 89.6 / 53.0 / 30.2 MB at M = 1 / 2 / 4), so a
    split batch is the default with M > 1.
    """

    device: Device
    devices: int = 1
    hosts: int = 1
    clients: int = 1
    model: int = 1
    usable: float = USABLE
    batch_over_model: bool = False

    @property
    def budget(self) -> float:
        return self.device.memory * self.usable

    def describe(self) -> str:
        mesh = f"clients={self.clients} x model={self.model}"
        per_host = f", {self.devices // self.hosts} per host" if self.hosts > 1 else ""
        split = ", batch split over model" if self.batch_over_model and self.model > 1 else ""
        return (f"{self.devices} x {self.device.name} ({pm.human_bytes(self.device.memory)}, "
                f"{self.usable:.0%} usable = {pm.human_bytes(self.budget)}) on {self.hosts} host(s){per_host}; "
                f"mesh {mesh}{split}")


def make_layout(device: str = "cpu", devices: int = 1, hosts: int = 1, model: int = 1,
                memory: Optional[float] = None, usable: Optional[float] = None,
                batch_over_model: Optional[bool] = None) -> Layout:
    """A checked Layout; errors name the option."""
    if device not in DEVICES:
        raise ConfigError(f"--device: {device!r} is not one of {sorted(DEVICES)} (or give --memory BYTES)")
    kind = DEVICES[device]
    if memory is not None:
        kind = dataclasses.replace(kind, memory=float(memory), source=f"--memory {memory:g}")
    for name, value in (("--devices", devices), ("--hosts", hosts), ("--model-axis", model)):
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if devices % hosts:
        raise ConfigError(f"--hosts: {hosts} does not divide --devices {devices}")
    if devices % model:
        raise ConfigError(f"--model-axis: {model} does not divide --devices {devices}")
    if not 0 < (usable if usable is not None else USABLE) <= 1:
        raise ConfigError(f"--usable: must be in (0, 1], got {usable}")
    split = model > 1 if batch_over_model is None else batch_over_model
    return Layout(kind, devices, hosts, devices // model, model, usable if usable is not None else USABLE, split)


def _table_kind(platform: str, device_kind: str) -> Optional[str]:
    """The DEVICES entry a jax device_kind names ('NVIDIA H200', 'NVIDIA A100-SXM4-80GB', 'TPU v5 lite')."""
    k = device_kind.lower()
    if platform == "gpu" and "h200" in k:
        return "h200"
    if platform == "gpu" and "a100" in k and "80" in k:
        return "a100-80gb"
    if platform == "tpu" and ("v5 lite" in k or "v5e" in k):
        return "tpu-v5e"
    return None


def local_layout(devices: int = 0, model: int = 1) -> Layout:
    """This process's devices as a Layout: their kind and count, and on an accelerator the memory its
    allocator may use (memory_stats' bytes_limit, all of it counted as usable)."""
    import jax

    here = jax.devices()
    platform = jax.default_backend()
    n = devices or len(here)
    if platform == "cpu":
        return make_layout("cpu", n, 1, model)
    name = _table_kind(platform, here[0].device_kind)
    limit = (here[0].memory_stats() or {}).get("bytes_limit")
    kind = DEVICES[name] if name else Device(here[0].device_kind, platform, 0.0, None, None, "this process")
    if limit:
        kind = dataclasses.replace(kind, memory=float(limit), source="this process: memory_stats bytes_limit")
    if not kind.memory:
        raise ConfigError(f"run.plan_only: {here[0].device_kind} reports no memory limit; use fedjax-llm-plan "
                          "--memory BYTES")
    if n % model:
        raise ConfigError(f"run.mesh.model: {model} does not divide the {n} devices")
    return Layout(kind, n, jax.process_count(), n // model, model, 1.0 if limit else USABLE, model > 1)
