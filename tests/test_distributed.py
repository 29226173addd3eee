"""Several processes as one run (jax.distributed on localhost, CPU collectives over gloo).

The same run as (a) 1 process x 1 device, (b) 1 process x 4 devices, (c) 2 processes x 2 devices, with
SCAFFOLD (per-client state) and sealed messages:
- (b) and (c) run the same per-client program (after one round every client's state was bitwise equal);
  only the sum across the 4 devices is reduced in another order (gloo between processes, XLA within one),
  so the global model, and from round 2 the clients' states, are equal within 1e-6 of each array's
  largest entry (measured 9.4e-8 for the global model after one round);
- (a) and (b) compile the clients' scan for 3 iterations vs 1, which XLA:CPU fuses differently: last-bit
  differences per client, within 1e-6 with SGD clients. (With AdamW they grow to about 1e-5 after one round:
  Adam's first step is about lr * sign(g), so near-zero gradient entries amplify last bits; that is why
  this comparison uses SGD.)
A run killed in every process resumes bitwise; only process 0 writes; processes that disagree on the
config, or cannot reach the coordinator, stop with one line before anything compiles.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.runtools import final_arrays, newest_round, one_error_line, records, stop, strip_timing, wait_for

TOL = 1e-6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(base, devices):
    env = dict(base)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cmd(args):
    return [sys.executable, "-m", "fedjax_llm.train", *args]


def _one(args, env, devices):
    proc = subprocess.run(_cmd(args), env=_env(env, devices), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _start_pair(args, env, tmp_path, tag, port=None):
    port = port or _port()
    procs = []
    for i in range(2):
        log = open(tmp_path / f"{tag}{i}.log", "w")
        extra = ["run.distributed=explicit", f"run.coordinator_address=localhost:{port}", "run.num_processes=2",
                 f"run.process_id={i}", "run.distributed_timeout_s=180"]  # slow starts on a loaded machine
        procs.append(subprocess.Popen(_cmd(args + extra), env=_env(env, 2), stdout=log, stderr=subprocess.STDOUT))
    return procs


def _pair(args, env, tmp_path, tag):
    procs = _start_pair(args, env, tmp_path, tag)
    codes = [p.wait(timeout=900) for p in procs]
    logs = [open(tmp_path / f"{tag}{i}.log").read() for i in range(2)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    return logs


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    return ["task=dialog", "debug=tiny", "algorithm=scaffold", "client.optimizer=sgd", "client.lr=0.1",
            "run.rounds=2", "checkpoint.every=1", f"data.tokenizer_cache={cache}", "data.max_eval_examples=32"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, train_env, args):
    root = tmp_path_factory.mktemp("layouts")
    _one(args + [f"hydra.run.dir={root / 'a'}"], train_env, 1)
    _one(args + [f"hydra.run.dir={root / 'b'}"], train_env, 4)
    logs = _pair(args + [f"hydra.run.dir={root / 'c'}"], train_env, root, "c")
    return {k: str(root / k) for k in "abc"}, logs


def _norm_rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30)) if x.size else 0.0


@pytest.mark.slow
def test_one_run_on_three_layouts_gives_the_same_model(layouts):
    dirs, _ = layouts
    arrays = {k: final_arrays(d)[1] for k, d in dirs.items()}
    assert any("scaffold" in k and ".clouds." in f".{k}" for k in arrays["c"])  # per-client c_i are compared too
    for pair in (("b", "c"), ("a", "b")):
        x, y = arrays[pair[0]], arrays[pair[1]]
        assert sorted(x) == sorted(y)
        floats = [k for k in x if np.issubdtype(x[k].dtype, np.floating)]
        model = max(_norm_rel(x[k], y[k]) for k in floats if ".aggregator.params." in f".{k}")
        assert model <= TOL, (pair, model)
        # SCAFFOLD's c_i (and the server's c) are (x - y_i) / (S * lr) minus nearly equal terms: the
        # cancellation magnifies the global model's last-bit difference (measured up to 9.7e-5 after 2 rounds)
        state = max(_norm_rel(x[k], y[k]) for k in floats)
        assert state <= 1e-3, (pair, state)
    ra, rb, rc = (records(dirs[k]) for k in "abc")
    assert [r["round"] for r in rc] == [0, 1, 2]
    for r1, r2 in zip(rb, rc):
        s1, s2 = strip_timing(r1), strip_timing(r2)
        for key in ("eval_loss", "train_loss"):
            if s1.get(key) is not None:
                assert abs(s1[key] - s2[key]) <= TOL * abs(s1[key]), (key, s1[key], s2[key])
        assert s1.get("clients") == s2.get("clients") and s1.get("bytes_on_wire") == s2.get("bytes_on_wire")


@pytest.mark.slow
def test_only_process_0_writes_and_logs_name_the_process(layouts):
    dirs, logs = layouts
    history = [json.loads(line) for line in open(os.path.join(dirs["c"], "history.jsonl"))]
    assert [h["event"] for h in history] == ["start", "complete"] and len({h["pid"] for h in history}) == 1
    assert "[process 0/2]" in logs[0] and "[process 1/2]" in logs[1]
    assert [r["round"] for r in records(dirs["c"])] == [0, 1, 2]  # each round once
    assert json.load(open(os.path.join(dirs["c"], "summary.json")))["processes"] == 2


@pytest.mark.slow
def test_killing_every_process_then_resuming_equals_the_uninterrupted_run(tmp_path, train_env, args, layouts):
    dirs, _ = layouts
    run_dir = str(tmp_path / "run")
    procs = _start_pair(args + [f"hydra.run.dir={run_dir}"], train_env, tmp_path, "k")
    try:
        assert wait_for(lambda: newest_round(run_dir) >= 1 and os.path.isdir(os.path.join(run_dir, "checkpoints", "1")),
                        procs[0])
    finally:
        for p in procs:
            stop(p, signal.SIGKILL)
    _pair(args + [f"hydra.run.dir={run_dir}"], train_env, tmp_path, "r")
    ref, got = final_arrays(dirs["c"]), final_arrays(run_dir)
    assert ref[0] == got[0] == 2
    assert all(ref[1][k].tobytes() == got[1][k].tobytes() for k in ref[1])
    assert [strip_timing(r) for r in records(dirs["c"])] == [strip_timing(r) for r in records(run_dir)]


@pytest.mark.slow
def test_processes_that_disagree_on_the_config_stop_before_compiling(tmp_path, train_env, args):
    port = _port()
    procs = []
    for i, lr in enumerate(("0.1", "0.2")):
        extra = ["run.distributed=explicit", f"run.coordinator_address=localhost:{port}", "run.num_processes=2",
                 f"run.process_id={i}", f"client.lr={lr}", f"hydra.run.dir={tmp_path / 'run'}"]
        procs.append(subprocess.Popen(_cmd(args + extra), env=_env(train_env, 2), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[Gloo]")]
        assert len(lines) == 1 and "processes [1] run another config than process 0" in lines[0], err[-2000:]
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_an_unreachable_coordinator_is_one_line(tmp_path, train_env):
    port = _port()  # nobody listens there
    proc = subprocess.run(_cmd(["task=dialog", "debug=tiny", "run.distributed=explicit",
                                f"run.coordinator_address=localhost:{port}", "run.num_processes=2",
                                "run.process_id=1", "run.distributed_timeout_s=5",
                                f"hydra.run.dir={tmp_path / 'run'}"]),
                          env=_env(train_env, 1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = one_error_line("\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith(("[Gloo]", "E0000",
                                                                                                 "W0000", "I0000"))))
    assert f"could not join the other processes at localhost:{port}" in line, line


@pytest.mark.slow
def test_a_model_axis_across_two_processes_equals_one_process_bitwise(tmp_path, train_env, args):
    """run.mesh 2 client slots x 2 model shards: 1 process x 4 devices vs 2 processes x 2 devices.

    Each client slot's 2 model devices sit in one process, so the model axis's gathers stay inside a process
    and the only cross-process collective is the clients' sum, over 2 slots in both layouts: bitwise equal
    (checked on this machine: every array, SCAFFOLD's c_i included)."""
    mesh = ["run.mesh.clients=2", "run.mesh.model=2", "run.rounds=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    _one(args + mesh + [f"hydra.run.dir={one}"], train_env, 4)
    logs = _pair(args + mesh + [f"hydra.run.dir={two}"], train_env, tmp_path, "m")
    assert "mesh 2 clients x 2 model" in logs[0]
    ref, got = final_arrays(str(one)), final_arrays(str(two))
    assert ref[0] == got[0] == 1
    assert sorted(ref[1]) == sorted(got[1]) and any(".aggregator.params." in f".{k}" for k in ref[1])
    assert all(ref[1][k].tobytes() == got[1][k].tobytes() for k in ref[1])
    assert [strip_timing(r) for r in records(str(one))] == [strip_timing(r) for r in records(str(two))]
