"""Fault injection over a run directory, part 1: processes killed or stopped at any moment.

Each case ends in a run whose final params (the raw checkpoint arrays, bitwise) and per-round metrics
equal an uninterrupted run's, with every round in metrics.jsonl exactly once. SIGKILL lands at seeded
random moments, during a checkpoint write and during compilation; SIGTERM and SIGINT must end the run
within seconds with exit 143 / 130, no traceback, and the last completed round checkpointed.
"""
import os
import random
import signal
import time

import pytest

from tests.runtools import (assert_same_run, file_has, newest_round, records, run_train, start_train, stop,
                            wait_for)

ROUNDS = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e.pop("HYDRA_FULL_ERROR", None)
    return e


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    return ["task=dialog", "debug=tiny", f"data.tokenizer_cache={cache}", "data.max_eval_examples=32",
            f"run.rounds={ROUNDS}", "checkpoint.every=1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env, args):
    """An uninterrupted run (and how long it took)."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    t0 = time.time()
    proc = run_train(args + [f"hydra.run.dir={run_dir}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, time.time() - t0


def _finish(args, env, run_dir):
    proc = run_train(args + [f"hydra.run.dir={run_dir}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sigkill_at_random_moments_then_rerun_equals_uninterrupted(tmp_path, env, args, reference):
    ref_dir, ref_s = reference
    run_dir = str(tmp_path / "run")
    rng = random.Random(1234)
    kills = 0
    for attempt in range(3):  # three starts, each SIGKILLed at a random moment (or finishing first)
        proc = start_train(args + [f"hydra.run.dir={run_dir}"], env, str(tmp_path / f"log{attempt}"))
        time.sleep(rng.uniform(0.5, ref_s))
        kills += stop(proc, signal.SIGKILL) == -signal.SIGKILL
    assert kills >= 1
    _finish(args, env, run_dir)  # resumes (or says the run is complete)
    assert_same_run(ref_dir, run_dir, ROUNDS)


def test_sigkill_during_a_checkpoint_write(tmp_path, env, args, reference):
    run_dir = str(tmp_path / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    proc = start_train(args + [f"hydra.run.dir={run_dir}"], env, str(tmp_path / "log"))
    writing = lambda: os.path.isdir(ckpts) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))
    try:
        assert wait_for(writing, proc, poll=0.002), "no checkpoint write was seen in progress"
    finally:
        stop(proc, signal.SIGKILL)
    _finish(args, env, run_dir)
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))
    assert_same_run(reference[0], run_dir, ROUNDS)


def test_sigkill_during_compilation(tmp_path, env, args, reference):
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "log")
    proc = start_train(args + [f"hydra.run.dir={run_dir}"], env, log)
    try:
        assert wait_for(lambda: file_has(log, " - model: "), proc), open(log).read()[-3000:]
    finally:
        stop(proc, signal.SIGKILL)  # the first jit (round-0 evaluation) compiles now
    _finish(args, env, run_dir)
    assert_same_run(reference[0], run_dir, ROUNDS)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_checkpoints_the_last_round_and_exits_cleanly(tmp_path, env, args, reference, sig):
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "log")
    # checkpoint.every=3: round 1 is completed but not checkpointed when the signal comes
    run_args = args + ["checkpoint.every=3"]
    proc = start_train(run_args + [f"hydra.run.dir={run_dir}"], env, log)
    try:
        assert wait_for(lambda: newest_round(run_dir) >= 1, proc), open(log).read()[-3000:]
    finally:
        t0 = time.time()
        code = stop(proc, sig)
        seconds = time.time() - t0
    output = open(log).read()
    assert code == 128 + sig, output[-3000:]
    assert seconds < 30, seconds
    assert "Traceback" not in output and "Segmentation" not in output, output[-3000:]
    stopped = [ln for ln in output.splitlines() if "stopped after round" in ln]
    assert len(stopped) == 1 and "resume with: fedjax-llm-train resume=" in stopped[0], output[-2000:]
    done = records(run_dir)[-1]["round"]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", str(done))), "the last completed round is saved"
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    _finish(run_args, env, run_dir)
    assert_same_run(reference[0], run_dir, ROUNDS)


def test_sigint_during_compilation_exits_at_once(tmp_path, env, args, reference):
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "log")
    proc = start_train(args + [f"hydra.run.dir={run_dir}"], env, log)
    try:
        assert wait_for(lambda: file_has(log, " - model: "), proc), open(log).read()[-3000:]
        time.sleep(0.2)
    finally:
        t0 = time.time()
        code = stop(proc, signal.SIGINT)
        seconds = time.time() - t0
    output = open(log).read()
    assert code == 130, output[-3000:]
    assert seconds < 10, seconds  # compiling does not delay the stop
    assert "Traceback" not in output and "Segmentation" not in output, output[-3000:]
    _finish(args, env, run_dir)
    assert_same_run(reference[0], run_dir, ROUNDS)


def test_a_second_process_on_the_same_directory_is_refused(tmp_path, env, args):
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "log")
    proc = start_train(args + ["run.rounds=30", f"hydra.run.dir={run_dir}"], env, log)
    try:
        assert wait_for(lambda: newest_round(run_dir) >= 0, proc), open(log).read()[-3000:]
        second = run_train(args + ["run.rounds=30", f"hydra.run.dir={run_dir}"], env)
    finally:
        stop(proc, signal.SIGKILL)
    assert second.returncode == 2
    assert "is in use by pid" in second.stderr and "Traceback" not in second.stderr, second.stderr[-2000:]
