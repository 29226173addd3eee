"""Finding and reading run directories: config.yaml, .hydra/overrides.yaml, metrics.jsonl, summary.json.

A directory that cannot be read is still returned, with a status saying why (in progress, failed,
no metrics, unreadable), so a report lists it instead of crashing on it.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import time
from typing import Any, Optional

import yaml

COMPLETE, STOPPED = "complete", "stopped early"
RUNNING, INCOMPLETE, FAILED = "in progress", "incomplete", "failed"
NO_METRICS, UNREADABLE = "no metrics", "unreadable"
USABLE = (COMPLETE, STOPPED)      # the statuses pooled into tables and plots by default
MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "history.jsonl",
           os.path.join(".hydra", "overrides.yaml"))
SKIP_DIRS = {"checkpoints", "keys", "tensorboard", ".hydra", "report", "__pycache__"}


@dataclasses.dataclass
class Run:
    """One run directory as read from disk (or a study's results.json entry)."""

    path: str
    status: str
    detail: str = ""                                   # why, in words: last round, error, age
    config: dict = dataclasses.field(default_factory=dict)        # dotted key -> value
    overrides: list = dataclasses.field(default_factory=list)     # Hydra command-line overrides
    records: list = dataclasses.field(default_factory=list)       # metrics.jsonl, one dict per round
    summary: Optional[dict] = None
    totals: dict = dataclasses.field(default_factory=dict)        # wall_s, bytes, comm_s, tokens, ...

    @property
    def seed(self) -> Optional[int]:
        return self.config.get("seed")

    @property
    def last_round(self) -> Optional[int]:
        return self.records[-1]["round"] if self.records else None

    @property
    def usable(self) -> bool:
        return self.status in USABLE


def flatten(tree: Any, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def is_run_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, m)) for m in MARKERS)


def find_run_dirs(path: str, depth: int = 4) -> list[str]:
    """Run directories at or below path (a run, a Hydra sweep, a folder of sweeps), in natural order."""
    if os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if is_run_dir(path):
        return [path]
    if depth <= 0 or not os.path.isdir(path):
        return []
    out = []
    for name in sorted(os.listdir(path), key=_natural):
        child = os.path.join(path, name)
        if os.path.isdir(child) and name not in SKIP_DIRS and not name.startswith("."):
            out += find_run_dirs(child, depth - 1)
    return out


def sweep_size(sweep_dir: str) -> Optional[int]:
    """How many jobs a Hydra multirun directory's sweep expands to (None when it cannot be told)."""
    path = os.path.join(sweep_dir, "multirun.yaml")
    if not os.path.isfile(path):
        return None
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        with open(path, encoding="utf-8") as f:
            task = yaml.safe_load(f)["hydra"]["overrides"]["task"]
        n = 1
        for o in OverridesParser.create().parse_overrides(list(task)):
            if o.is_sweep_override():
                n *= len(list(o.sweep_string_iterator()))
        return n
    except Exception:  # glob() sweeps need the config store; a report does not fail over a count
        return None


def read_records(path: str) -> tuple[list[dict], str]:
    """metrics.jsonl records up to the first unreadable line, and a note naming that line."""
    records, note = [], ""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
                raise ValueError("no integer 'round'")
        except ValueError as e:
            note = f"metrics.jsonl line {i} of {len(lines)} unreadable ({str(e)[:60]}); read up to it"
            break
        records.append(rec)
    return records, note


def _last_error(run_dir: str) -> str:
    """The last ERROR line of the run's Hydra job log(s), if any."""
    found = ""
    for log in sorted(glob.glob(os.path.join(run_dir, "*.log"))):
        try:
            with open(log, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if "][ERROR]" in line or "Traceback" in line:
                        found = line.strip().split("] - ", 1)[-1][:200]
        except OSError:
            pass
    return found


def lock_holder(run_dir: str) -> Optional[str]:
    """Who holds RUN_DIR/.lock (a training process holds it with flock for the life of the run): their
    'pid N on HOST', '' when nobody does, None when the directory has no lock file (an older run)."""
    path = os.path.join(run_dir, ".lock")
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        try:  # a shared probe, released at once (a run starting in that instant would be told 'in use')
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return ""
    finally:
        os.close(fd)


def last_event(run_dir: str) -> Optional[dict]:
    """The last line of RUN_DIR/history.jsonl (start, stopped, complete), if any."""
    try:
        with open(os.path.join(run_dir, "history.jsonl"), encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def totals(records: list[dict]) -> dict:
    """Sums over the training rounds (round >= 1): wall and simulated communication seconds, bytes on
    the wire (up + down, every cloud), tokens; and the last epsilon with its sampling figures."""
    rounds = [r for r in records if r.get("round", 0) >= 1]

    def total(key):
        vals = [r.get(key) for r in rounds if isinstance(r.get(key), (int, float))]
        return float(sum(vals)) if vals else None

    out = dict(wall_s=total("wall_s"), comm_s=total("comm_s"), tokens=total("tokens"),
               bytes=float(sum(wire_bytes(r) for r in rounds)) if rounds else None)
    dp = [r for r in rounds if r.get("epsilon") is not None]
    if dp:
        last = dp[-1]
        out.update({k: last.get(k) for k in ("epsilon", "delta", "noise_multiplier", "sampling_q",
                                             "sample_size", "population", "sampling")})
    return out


def wire_bytes(record: dict) -> float:
    """Bytes one round moved between the clouds and the aggregator (up + down, every cloud)."""
    if isinstance(record.get("bytes_on_wire"), (int, float)):
        return float(record["bytes_on_wire"])
    clouds = record.get("clouds") or {}
    return float(sum((c.get("bytes_up") or 0) + (c.get("bytes_down") or 0) for c in clouds.values()))


def load_run(run_dir: str, stale_after_s: float = 1800.0, now: Optional[float] = None) -> Run:
    """Reads one run directory; never raises for a broken one (its status and detail say what is wrong)."""
    now = time.time() if now is None else now
    run = Run(path=run_dir, status=UNREADABLE)
    try:
        for name in ("config.yaml", os.path.join(".hydra", "config.yaml")):
            path = os.path.join(run_dir, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    run.config = flatten(yaml.safe_load(f) or {})
                break
        path = os.path.join(run_dir, ".hydra", "overrides.yaml")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                run.overrides = [str(o) for o in (yaml.safe_load(f) or [])]
    except (OSError, yaml.YAMLError) as e:
        run.detail = f"config unreadable: {type(e).__name__}: {str(e)[:160]}"
        return run
    metrics = os.path.join(run_dir, "metrics.jsonl")
    note = ""
    if os.path.isfile(metrics):
        try:
            run.records, note = read_records(metrics)
        except (OSError, UnicodeDecodeError) as e:
            run.detail = f"metrics.jsonl unreadable: {e}"
            return run
    path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                run.summary = json.load(f)
        except (OSError, ValueError) as e:
            note = "; ".join(filter(None, [note, f"summary.json unreadable ({e})"]))
    run.totals = totals(run.records)
    error = _last_error(run_dir)
    planned = run.config.get("run.rounds")
    last = run.last_round
    holder, event = lock_holder(run_dir), last_event(run_dir)
    if not run.records:
        run.status = FAILED if error else NO_METRICS
        run.detail = error or note or ("metrics.jsonl empty" if os.path.isfile(metrics) else "no metrics.jsonl")
        note = "" if run.detail == note else note
    elif run.summary is not None and (run.summary.get("stopped_early_after_round") is not None):
        run.status = STOPPED
        run.detail = (f"stopped after round {run.summary['stopped_early_after_round']} of {planned}: the next "
                      "round would have passed secure.dp.target_epsilon")
    elif run.summary is not None and (planned is None or last >= planned):
        run.status = COMPLETE
        run.detail = f"{last} rounds"
    elif holder:
        run.status, run.detail = RUNNING, f"round {last} of {planned}; running ({holder})"
    elif holder == "" and event is not None and event.get("event") == "stopped":
        run.status = INCOMPLETE
        run.detail = (f"stopped by a signal after round {event.get('round', last)} of {planned}; resume with "
                      f"fedjax-llm-train resume={os.path.abspath(run_dir)}")
    elif holder == "" and event is not None and event.get("event") == "start":
        run.status = FAILED
        run.detail = (f"after round {last} of {planned}: the process ended without finishing (an error or a "
                      f"kill){': ' + error if error else ''}")
    elif error:
        run.status, run.detail = FAILED, f"after round {last} of {planned}: {error}"
    else:
        age = now - os.path.getmtime(metrics)
        run.status = RUNNING if age < stale_after_s else INCOMPLETE
        run.detail = f"round {last} of {planned}, metrics.jsonl last written {_age(age)} ago"
    if note:
        run.detail = f"{run.detail}; {note}"
    return run


def load_runs(paths: list[str], stale_after_s: float = 1800.0) -> tuple[list[Run], list[str]]:
    """Every run under the given paths, and notes (missing paths, sweeps with jobs not started)."""
    runs, notes, seen = [], [], set()
    for p in paths:
        if not os.path.exists(p):
            notes.append(f"{p}: does not exist")
            continue
        found = find_run_dirs(p)
        if not found:
            notes.append(f"{p}: no run directory (config.yaml, metrics.jsonl or .hydra/) found")
        inside = os.path.realpath(p)
        for sweep in sorted({os.path.dirname(d) for d in found if os.path.realpath(d) != inside} | {p}):
            expected = sweep_size(sweep)
            started = sum(os.path.dirname(d) == sweep for d in found)
            if expected is not None and started < expected:
                notes.append(f"{sweep}: {started} of {expected} sweep jobs have a directory; the other "
                             f"{expected - started} have not started, or failed before training (a failed "
                             "start removes its directory)")
        for d in found:
            real = os.path.realpath(d)
            if real not in seen:
                seen.add(real)
                runs.append(load_run(d, stale_after_s))
    return runs, notes


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
