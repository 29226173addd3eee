"""A run directory holds exactly one run. This module decides, before anything is written, what a start
may do with a directory: begin a new run, resume the run it holds, say the run is complete, or refuse.

Every decision is read-only: a refusal (another run's config, a directory holding other files, a
`resume=` path with no run, a directory in use or read-only) leaves the directory exactly as it was.
The writes a run makes to its directory go through here too: the config files of a new run (all at
once, only after its data and model were built), the lock that keeps two processes out of one
directory, and `history.jsonl`, one line per start and end, so the directory says what happened to it.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Optional

from fedjax_llm.config import TrainConfig, to_train_config
from fedjax_llm.errors import RunDirError
from fedjax_llm.files import atomic_write_text, describe_os_error, read_json

CONFIG = "config.yaml"
SUMMARY = "summary.json"
HISTORY = "history.jsonl"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
# What a start that failed before writing config.yaml may leave; such a directory still counts as empty.
LEFTOVERS = {LOCK, "keys", "train.log", ".hydra", HISTORY, "tensorboard"}
# Keys that do not change what a run computes, so a rerun may change them.
FREE_KEYS = {"resume", "run.progress", "data.tokenizer_cache", "checkpoint.keep", "run.tensorboard",
             "run.compile_cache_dir", "run.distributed", "run.coordinator_address", "run.process_id",
             "run.distributed_timeout_s"}


def resume_command(run_dir: str) -> str:
    return f"fedjax-llm-train resume={os.path.abspath(run_dir)}"


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """{'client.lr': 0.01, ...}: every leaf of the config under its dotted key."""
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


def config_diff(stored: TrainConfig, new: TrainConfig, ignore: set = FREE_KEYS) -> list[tuple[str, Any, Any]]:
    """(key, stored value, new value) for every key that differs, skipping `ignore` (and prefixes of it)."""
    a, b = flat_config(stored), flat_config(new)
    missing = object()
    diff = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        old, cur = a.get(key, missing), b.get(key, missing)
        if old != cur:
            diff.append((key, None if old is missing else old, None if cur is missing else cur))
    return diff


def read_stored_config(run_dir: str) -> TrainConfig:
    """The resolved config a run stored in RUN_DIR/config.yaml (validated)."""
    from omegaconf import OmegaConf

    from fedjax_llm.errors import ConfigError
    from fedjax_llm.validation import validate

    path = os.path.join(run_dir, CONFIG)
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError:
        raise RunDirError(f"{path}: not found; {run_dir!r} holds no fedjax_llm run") from None
    except Exception as e:  # a YAML error
        raise RunDirError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]}); the run's "
                          "config was damaged outside fedjax_llm") from None
    try:
        return validate(to_train_config(node))
    except ConfigError as e:
        raise RunDirError(f"{path}: the stored config no longer validates: {e}") from None
    except Exception as e:  # an OmegaConf type error: the file was edited or written by another version
        raise RunDirError(f"{path}: the stored config does not fit this version's schema: "
                          f"{str(e).splitlines()[0]}") from None


def checkpoint_steps_on_disk(run_dir: str) -> list[int]:
    """Step numbers of the checkpoint directories present (not verified), newest first."""
    directory = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(directory):
        return []
    return sorted((int(n) for n in os.listdir(directory)
                   if n.isdigit() and os.path.isdir(os.path.join(directory, n))), reverse=True)


def read_summary(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, SUMMARY)
    if not os.path.isfile(path):
        return None
    try:
        summary = read_json(path, "summary")
    except (OSError, ValueError):
        return None  # damaged: the run resumes from its final checkpoint and writes it again
    return summary if isinstance(summary, dict) else None


def rounds_done(summary: Optional[dict]) -> Optional[int]:
    """Rounds a finished run completed, from its summary (None when the summary is missing)."""
    if summary is None:
        return None
    done = summary.get("rounds_completed", summary.get("rounds"))
    return int(done) if done is not None else None


@dataclasses.dataclass
class Plan:
    """What a start will do with its directory."""

    kind: str                      # new | resume | complete
    run_dir: str
    cfg: TrainConfig               # the config the run will use
    stored: Optional[TrainConfig]  # the config found in the directory (None: new run)
    newest_step: int               # newest checkpoint step on disk (unverified; 0 if none)
    message: str                   # one line saying what will happen
    summary: Optional[dict] = None  # complete: the stored summary
    entries: frozenset = frozenset()  # names in the directory before this start


def plan_run(run_dir: str, cfg: TrainConfig, *, must_hold_run: bool = False) -> Plan:
    """Decides what starting `cfg` in `run_dir` does, writing nothing; raises RunDirError to refuse."""
    run_dir = os.path.abspath(run_dir)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir}: exists and is not a directory")
    entries = set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set()
    if CONFIG not in entries:
        if must_hold_run:
            require_run(run_dir)
        foreign = sorted(entries - LEFTOVERS - ({CHECKPOINTS} if not checkpoint_steps_on_disk(run_dir) else set()))
        if foreign:
            raise RunDirError(f"{run_dir}: holds files that are not a fedjax_llm run ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); choose a new or empty directory")
        return Plan("new", run_dir, cfg, None, 0, f"new run in {run_dir}", entries=frozenset(entries))

    stored = read_stored_config(run_dir)
    steps = checkpoint_steps_on_disk(run_dir)
    newest = steps[0] if steps else 0
    diff = config_diff(stored, cfg, FREE_KEYS | {"run.rounds"})
    if diff:
        shown = "; ".join(f"{k}: {_short(old)} -> {_short(new)}" for k, old, new in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise RunDirError(f"{run_dir} holds a run with another config: {shown}{more}. A run directory holds "
                          f"one run: start this config in a new directory (hydra.run.dir=NEW_DIR), or continue "
                          f"the stored run with `{resume_command(run_dir)}`")
    summary = read_summary(run_dir)
    done = rounds_done(summary)
    old_rounds, new_rounds = stored.run.rounds, cfg.run.rounds
    if summary is not None and summary.get("stopped_early_after_round") is not None:
        return Plan("complete", run_dir, stored, stored, newest,
                    f"{run_dir}: the run is complete: it stopped after round "
                    f"{summary['stopped_early_after_round']} because further rounds would exceed "
                    f"secure.dp.target_epsilon; nothing was changed", summary)
    finished = max(newest, done or 0)
    if new_rounds < finished:
        raise RunDirError(f"run.rounds={new_rounds}: {run_dir} already holds round {finished}; "
                          f"run.rounds can only grow")
    if done is not None and done >= new_rounds:
        return Plan("complete", run_dir, stored, stored, newest,
                    f"{run_dir}: the run is complete ({done} of {old_rounds} rounds); nothing was changed. "
                    f"To train further: `{resume_command(run_dir)} run.rounds=N` with N > {done}", summary)
    if new_rounds != old_rounds:
        message = f"{run_dir}: changing run.rounds {old_rounds} -> {new_rounds} (allowed: the rounds " \
                  f"already trained are kept), continuing from checkpoint {newest or 'none'}"
    else:
        message = f"{run_dir}: continuing the run from checkpoint {newest}" if newest else \
            f"{run_dir}: the run holds no checkpoint yet; starting it over with its stored config"
    return Plan("resume", run_dir, cfg, stored, newest, message, entries=frozenset(entries))


def require_run(run_dir: str) -> None:
    """Raises RunDirError unless run_dir holds a run (for resume=)."""
    if not os.path.isfile(os.path.join(run_dir, CONFIG)):
        where = "does not exist" if not os.path.isdir(run_dir) else "holds no fedjax_llm run (no config.yaml)"
        raise RunDirError(f"resume={run_dir}: the directory {where}; resume= continues an existing run. "
                          "To start a new run there, use hydra.run.dir=DIR instead")


def resume_config(run_dir: str, overrides: list[str], groups: dict) -> TrainConfig:
    """The stored config of the run in run_dir with the command line's key overrides applied (e.g.
    run.rounds=30); config-group choices (task=, model=) cannot change a stored run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from fedjax_llm.errors import ConfigError

    require_run(run_dir)
    node = OmegaConf.structured(read_stored_config(run_dir))
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key == "resume" or key.startswith("hydra.") or key == "hydra":
            continue
        if key in groups or "/" in key:
            raise ConfigError(f"{o.input_line}: resume= continues the run with its stored config, so config "
                              f"groups cannot change; set keys only (e.g. run.rounds=N)")
        if o.is_delete() or o.is_sweep_override():
            raise ConfigError(f"{o.input_line}: resume= takes plain key=value overrides only")
        try:
            OmegaConf.update(node, key, o.value(), merge=True)
        except Exception as e:  # unknown key or wrong type
            raise ConfigError(f"{o.input_line}: {str(e).splitlines()[0]}") from None
    return to_train_config(node)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


class RunDirLock:
    """An exclusive lock on RUN_DIR/.lock for the life of a run (released by the OS if the process dies)."""

    def __init__(self, run_dir: str):
        self.run_dir = os.path.abspath(run_dir)
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunDirLock":
        path = os.path.join(self.run_dir, LOCK)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot use the run directory: {describe_os_error(e, path)}; a complete run "
                              "in a read-only directory can be read (generate, export), not continued") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise RunDirError(f"{self.run_dir} is in use by {holder}; wait for it to finish or stop it "
                              "(two processes must not write one run)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def write_config(run_dir: str, cfg: TrainConfig) -> None:
    """Stores the resolved config (atomically)."""
    from omegaconf import OmegaConf

    atomic_write_text(os.path.join(run_dir, CONFIG), OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def write_hydra_files(run_dir: str, files: dict[str, str]) -> None:
    """Hydra's record of a new run (.hydra/config.yaml, hydra.yaml, overrides.yaml), written by us only
    once the run has started, so a failed rerun never replaces a good run's copies."""
    directory = os.path.join(run_dir, ".hydra")
    os.makedirs(directory, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(os.path.join(directory, name), text)


def append_history(run_dir: str, event: str, **fields: Any) -> None:
    """One JSON line in RUN_DIR/history.jsonl (best effort: a full disk must not hide the real error)."""
    record = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), event=event, pid=os.getpid(), **fields)
    try:
        fd = os.open(os.path.join(run_dir, HISTORY), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def command_line() -> str:
    """The command that started this process, as a user would type it."""
    return " ".join(["fedjax-llm-train"] + sys.argv[1:])
