"""Cluster plumbing that runs here: a joblib sweep runs its jobs as parallel processes, the SLURM
launcher config composes, and the persistent compilation cache serves a rerun."""
import json
import os
import subprocess
import sys

import pytest


def _train(args, env, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "fedjax_llm.train", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_as_parallel_processes(tmp_path, train_env):
    sweep = tmp_path / "sweep"
    proc = _train(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "task=dialog", "debug=tiny",
                   "seed=0,1", f"hydra.sweep.dir={sweep}", f"data.tokenizer_cache={tmp_path / 'tok'}"],
                  train_env, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts = []
    for job in ("0", "1"):
        assert json.load(open(sweep / job / "summary.json"))["rounds_completed"] == 2
        starts += [json.loads(line) for line in open(sweep / job / "history.jsonl") if '"start"' in line]
    pids = {s["pid"] for s in starts}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not the launcher's


def test_slurm_launcher_config_composes(tmp_path, train_env):
    proc = _train(["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
                   "--cfg", "hydra", "-p", "hydra.launcher"], train_env, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "SlurmLauncher" in text and "nodes: 2" in text and "tasks_per_node: 4" in text
    assert "signal_delay_s: 120" in text


def test_compile_cache_serves_a_rerun(tmp_path, train_env):
    env = {k: v for k, v in train_env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cache = tmp_path / "xla"
    args = ["task=dialog", "debug=tiny", "run.rounds=1", f"run.compile_cache_dir={cache}",
            f"data.tokenizer_cache={tmp_path / 'tok'}"]
    first = _train(args + [f"hydra.run.dir={tmp_path / 'a'}"], env, str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    entries = sorted(os.listdir(cache))
    assert len(entries) >= 3  # the evaluation, the clients' round and the server step at least
    second = _train(args + [f"hydra.run.dir={tmp_path / 'b'}"], env, str(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(os.listdir(cache)) == entries  # every compilation of the rerun was a cache hit
