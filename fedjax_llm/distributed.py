"""Several processes as one run, on `jax.distributed` (JAX's multi-controller runtime).

Every process runs the same program on the same config: it loads the corpus, runs both halves of each
round and keeps the same global model. Only the clients' compute spans processes: the clients mesh
holds every process's devices, each process builds the batches of the cohort slots that live on its
own devices (`local_rows`, `put_rows`), and the per-cloud sums come back replicated. The server step
and evaluation then run on each process's own device with identical inputs, so the global model is
the same everywhere. Only the primary process (index 0) writes the run directory; checkpoints are
written with orbax's multi-process support, which every process calls.

`run.distributed`: `off` (one process), `auto` (initialize when a cluster is detected: SLURM with more
than one task, Open MPI, or JAX_COORDINATOR_ADDRESS; otherwise one process), `explicit`
(`run.coordinator_address`, `run.num_processes`, `run.process_id`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any

import numpy as np

from fedjax_llm.errors import ConfigError, UserError

log = logging.getLogger(__name__)
PER_PROCESS_KEYS = {"run.process_id", "run.coordinator_address", "run.distributed", "run.distributed_timeout_s"}


class DistributedError(UserError):
    """The processes of a run could not start together or disagree; the message says which."""


@dataclasses.dataclass(frozen=True)
class Processes:
    index: int
    count: int

    @property
    def primary(self) -> bool:
        return self.index == 0

    @property
    def multi(self) -> bool:
        return self.count > 1


def _cluster_detected() -> bool:
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
            or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def start(run_cfg: Any) -> Processes:
    """Joins the run's processes (before any device is touched) and returns this one's place."""
    import jax

    mode = run_cfg.distributed
    if mode == "off" or (mode == "auto" and not _cluster_detected()):
        return Processes(0, 1)
    kwargs: dict = dict(initialization_timeout=run_cfg.distributed_timeout_s)
    if mode == "explicit":
        kwargs.update(coordinator_address=run_cfg.coordinator_address, num_processes=run_cfg.num_processes,
                      process_id=run_cfg.process_id)
        _check_coordinator(run_cfg)  # JAX's client aborts the process on these; say it in one line instead
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # jax raises several types; the message is what the user needs
        where = run_cfg.coordinator_address or "the cluster's coordinator"
        raise DistributedError(f"run.distributed={mode}: could not join the other processes at {where} within "
                               f"run.distributed_timeout_s={run_cfg.distributed_timeout_s}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    procs = Processes(jax.process_index(), jax.process_count())
    _prefix_logs(procs)
    log.info("process %d of %d, %d local / %d global devices", procs.index, procs.count,
             jax.local_device_count(), jax.device_count())
    return procs


def _check_coordinator(run_cfg: Any) -> None:
    """Process 0 must be able to listen on the coordinator's port; the others must reach it in time."""
    host, _, port = str(run_cfg.coordinator_address).rpartition(":")
    if not port.isdigit():
        raise DistributedError(f"run.coordinator_address: {run_cfg.coordinator_address!r} is not HOST:PORT")
    if run_cfg.process_id == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", int(port)))
            except OSError as e:
                raise DistributedError(f"run.coordinator_address: process 0 cannot listen on port {port} "
                                       f"({e.strerror}); choose a free port") from None
        return
    deadline = time.monotonic() + run_cfg.distributed_timeout_s
    while True:
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"run.distributed=explicit: could not join the other processes at {run_cfg.coordinator_address} "
                    f"within run.distributed_timeout_s={run_cfg.distributed_timeout_s}: nothing answers there "
                    f"({e.strerror or e}); start process 0 first, or check the address") from None
            time.sleep(0.5)


def validate_layout(run_cfg: Any) -> None:
    """Start-up checks of the distributed keys (no device is touched)."""
    if run_cfg.distributed not in ("off", "auto", "explicit"):
        raise ConfigError(f"run.distributed: {run_cfg.distributed!r} is not one of ('off', 'auto', 'explicit')")
    if run_cfg.distributed == "explicit":
        if not run_cfg.coordinator_address:
            raise ConfigError("run.coordinator_address: run.distributed=explicit needs HOST:PORT of process 0")
        if run_cfg.num_processes < 1:
            raise ConfigError(f"run.num_processes: must be >= 1 with run.distributed=explicit, "
                              f"got {run_cfg.num_processes}")
        if not 0 <= run_cfg.process_id < run_cfg.num_processes:
            raise ConfigError(f"run.process_id: must be in [0, run.num_processes={run_cfg.num_processes}), "
                              f"got {run_cfg.process_id}")
    if run_cfg.distributed_timeout_s < 1:
        raise ConfigError(f"run.distributed_timeout_s: must be >= 1, got {run_cfg.distributed_timeout_s}")


class _ProcessPrefix(logging.Filter):
    def __init__(self, procs: Processes):
        super().__init__()
        self.prefix = f"[process {procs.index}/{procs.count}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _prefix_logs(procs: Processes) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ProcessPrefix(procs))


def barrier(name: str) -> None:
    """Every process waits here until all arrive (no-op in one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(flat_config: dict, procs: Processes) -> None:
    """Raises DistributedError (before anything compiles) unless every process runs the same config,
    apart from the keys that name the process itself."""
    if not procs.multi:
        return
    from jax.experimental import multihost_utils

    shared = {k: v for k, v in flat_config.items() if k not in PER_PROCESS_KEYS}
    digest = np.frombuffer(hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))
    differ = [i for i in range(procs.count) if not np.array_equal(every[i], every[0])]
    if differ:
        raise DistributedError(f"processes {differ} run another config than process 0 (compare their "
                               "overrides); every process of a run must be given the same config")


def any_process(flag: bool) -> bool:
    """True when `flag` is true on any process (a collective: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32)))))


# ----- arrays across processes ---------------------------------------------------------------------------
def local_rows(mesh: Any, padded: int) -> tuple[int, int]:
    """The slots [start, stop) of a padded client axis sharded over `mesh` that this process holds."""
    import jax

    devices = list(mesh.devices.flat)
    per = padded // len(devices)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    if not mine:
        return 0, 0
    return mine[0] * per, (mine[-1] + 1) * per


def put_rows(tree: Any, sharding: Any, padded: int, rows: tuple[int, int]) -> Any:
    """Global arrays [padded, ...] sharded on the client axis, from this process's rows of each leaf."""
    import jax

    start, stop = rows
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        sharding, np.asarray(a)[start:stop], (padded,) + np.shape(a)[1:]), tree)


def put_replicated(tree: Any, mesh: Any) -> Any:
    """Global arrays replicated on every device of `mesh`, from the same host values on every process."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    sharding = NamedSharding(mesh, P())

    def one(a: Any) -> Any:
        host = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree)


def fetch(tree: Any) -> Any:
    """Host copies of global arrays: a replicated one from a local shard, a sharded one gathered."""
    import jax
    from jax.experimental import multihost_utils

    def one(a: Any) -> Any:
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return np.asarray(jax.device_get(a))
        if a.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree.map(one, tree)
