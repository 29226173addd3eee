"""Helpers for tests that run `python -m fedjax_llm.train` in subprocesses and compare run directories:
every wait is bounded, every process is reaped, and comparisons read the files a run wrote (the raw
checkpoint arrays, metrics.jsonl), not figures the code under test printed."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

import numpy as np

TIMING = {"wall_s", "tokens_per_s", "eval_s", "seal_s", "open_s"}
WAIT_S = 300  # longest wait for any one event


def train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedjax_llm.train", *args]


def run_train(args: list[str], env: dict, timeout: float = 600, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(args), env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def start_train(args: list[str], env: dict, log_path: str) -> subprocess.Popen:
    out = open(log_path, "w")
    return subprocess.Popen(train_cmd(args), env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(predicate: Callable[[], bool], proc: Optional[subprocess.Popen] = None, timeout: float = WAIT_S,
             poll: float = 0.02) -> bool:
    """True once predicate() holds; False if proc exits first or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60) -> int:
    """Sends `sig` (if still running) and reaps the process; returns its exit code (negative: killed)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(f"process {proc.pid} did not end within {timeout}s of signal {sig}")


def records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def file_has(path: str, text: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            return text in f.read()
    except FileNotFoundError:
        return False


def newest_round(run_dir: str) -> int:
    try:
        return records(run_dir)[-1]["round"]
    except (FileNotFoundError, IndexError, json.JSONDecodeError):
        return -1


def strip_timing(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in TIMING}
    if "clouds" in out:
        out["clouds"] = {n: {k: v for k, v in c.items() if k not in TIMING} for n, c in out["clouds"].items()}
    return out


def final_arrays(run_dir: str) -> tuple[int, dict]:
    """(step, {flat path: array}) of the newest checkpoint, restored raw (no template, no digest check)."""
    import orbax.checkpoint as ocp

    directory = os.path.join(run_dir, "checkpoints")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    step = max(manager.all_steps())
    got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        meta=ocp.args.JsonRestore()))
    return step, {k: np.asarray(v) for k, v in got["state"].items()}


def assert_same_run(ref_dir: str, run_dir: str, rounds: int) -> None:
    """run_dir ended with the same final model (bitwise) and the same per-round metrics as ref_dir."""
    a_step, a = final_arrays(ref_dir)
    b_step, b = final_arrays(run_dir)
    assert a_step == b_step == rounds, (a_step, b_step)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    ra, rb = records(ref_dir), records(run_dir)
    assert [r["round"] for r in rb] == list(range(rounds + 1)), [r["round"] for r in rb]
    assert [strip_timing(r) for r in ra] == [strip_timing(r) for r in rb]


def tree_fingerprint(path: str) -> dict[str, str]:
    """relative path -> sha256 of every file (and the names of directories) under path."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path) + "/"] = "dir"
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def one_error_line(stderr: str) -> str:
    """The single line a user error prints on stderr (asserts there is exactly one and no traceback)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]
