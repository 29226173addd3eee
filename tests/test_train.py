"""The Hydra app end to end, in subprocesses: outputs, exact resume after SIGKILL, multirun, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedjax_llm.checkpoint import Checkpointer

TIMING = {"wall_s", "tokens_per_s", "eval_s", "seal_s", "open_s"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["HYDRA_FULL_ERROR"] = "1"
    return e


@pytest.fixture(scope="module")
def base_args(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    return ["task=dialog", "debug=tiny", f"data.tokenizer_cache={cache}", "data.max_eval_examples=32",
            "checkpoint.every=1"]


def _cmd(args):
    return [sys.executable, "-m", "fedjax_llm.train", *args]


def _run(args, env, timeout=600):
    return subprocess.run(_cmd(args), env=env, capture_output=True, text=True, timeout=timeout)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _strip(record):
    out = {k: v for k, v in record.items() if k not in TIMING}
    if "clouds" in out:
        out["clouds"] = {n: {k: v for k, v in c.items() if k not in TIMING} for n, c in out["clouds"].items()}
    return out


def _final_state(run_dir):
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), 1, 3, 0)
    step = ck.steps()[0]
    meta_state = ck.manager.restore(step)  # no template: raw arrays keyed by flat path
    return step, meta_state


def test_run_writes_config_metrics_summary_and_checkpoints(tmp_path, env, base_args):
    run_dir = str(tmp_path / "run")
    proc = _run(base_args + ["run.rounds=3", f"hydra.run.dir={run_dir}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", ".hydra/config.yaml"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    records = _records(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    for r in records[1:]:
        for key in ("train_loss", "eval_loss", "eval_ppl", "tokens", "wall_s", "comm_s"):
            assert r[key] is not None, key
        for cloud in ("americas", "europe", "asia"):
            c = r["clouds"][cloud]
            assert c["bytes_up"] > 0 and c["bytes_down"] > 0 and c["comm_s"] > 0
            assert c["eval_ppl"] is not None and c["train_loss"] is not None
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["final_eval_loss"] == records[-1]["eval_loss"]
    assert summary["final_eval_ppl"] < summary["initial_eval_ppl"]
    assert Checkpointer(os.path.join(run_dir, "checkpoints"), 1, 3, 3).steps() == [3, 2, 1]


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, env, base_args):
    rounds = 6
    args = base_args + [f"run.rounds={rounds}"]
    straight = str(tmp_path / "straight")
    proc = _run(args + [f"hydra.run.dir={straight}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = str(tmp_path / "killed")
    p = subprocess.Popen(_cmd(args + [f"hydra.run.dir={killed}"]), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = os.path.exists(os.path.join(killed, "checkpoints", "2", "meta"))
            if done or p.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    records = _records(killed)
    assert 2 <= records[-1]["round"] < rounds, "the kill must land mid-run"

    proc = _run(args + [f"hydra.run.dir={killed}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from round" in proc.stdout + proc.stderr

    a_step, a = _final_state(straight)
    b_step, b = _final_state(killed)
    assert a_step == b_step == rounds
    la, lb = a["state"], b["state"]
    assert sorted(la) == sorted(lb)
    for k in la:
        assert np.asarray(la[k]).tobytes() == np.asarray(lb[k]).tobytes(), k
    assert a["meta"]["digest"] == b["meta"]["digest"]
    assert [_strip(r) for r in _records(straight)] == [_strip(r) for r in _records(killed)]


@pytest.mark.slow
def test_multirun_sweeps_seeds(tmp_path, env, base_args):
    sweep = str(tmp_path / "sweep")
    proc = _run(["-m"] + base_args + ["run.rounds=1", "seed=0,1", f"hydra.sweep.dir={sweep}",
                                      "checkpoint.enabled=false"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finals = [json.load(open(os.path.join(sweep, str(i), "summary.json")))["final_eval_loss"] for i in (0, 1)]
    assert finals[0] != finals[1]  # seeds change the model init and sampling


def test_missing_jsonl_path_fails_naming_the_file(tmp_path, env, base_args):
    missing = str(tmp_path / "nope.jsonl")
    proc = _run(base_args + ["data=jsonl", f"data.path={missing}", f"hydra.run.dir={tmp_path / 'r'}"], env)
    assert proc.returncode != 0
    assert missing in proc.stderr and "data.path" in proc.stderr


def test_jsonl_with_cloud_field_gives_a_natural_partition(tmp_path, env, base_args):
    path = tmp_path / "mine.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    with open(path, "w") as f:
        for i in range(240):
            cloud = ["north", "south"][i % 2]
            text = " ".join(rng.choice(words, size=6))
            f.write(json.dumps({"prompt": f"{cloud} says", "response": text, "cloud": cloud,
                                "client": f"{cloud}-{i % 3}"}) + "\n")
    run_dir = str(tmp_path / "r")
    # A user's own clouds file in their own config directory, added to Hydra's search path.
    (tmp_path / "myconf" / "clouds").mkdir(parents=True)
    (tmp_path / "myconf" / "clouds" / "two.yaml").write_text(
        "members:\n  north: {clients: 3, select: [north]}\n  south: {clients: 3, select: [south]}\n")
    clouds = ["clouds=two", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]"]
    proc = _run(base_args + ["data=jsonl", f"data.path={path}", "data.vocab_size=300",
                             "partition.cloud_field=cloud", "partition.client_field=client",
                             "run.rounds=1", f"hydra.run.dir={run_dir}"] + clouds, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = _records(run_dir)[-1]
    assert set(last["clouds"]) == {"north", "south"} and last["clients"] == 6
