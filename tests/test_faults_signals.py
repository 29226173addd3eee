"""Fault injection over a run directory, part 1: processes killed or stopped at any moment.

Each case ends in a run whose final params (the raw checkpoint arrays, bitwise) and per-round metrics
equal an uninterrupted run's, with every round in metrics.jsonl exactly once. SIGKILL and SIGTERM land
at seeded random moments, SIGKILL and SIGINT also during compilation and SIGKILL during a checkpoint
write; SIGTERM and SIGINT must end the run within seconds with exit 143 / 130, no traceback, and the
last completed round checkpointed.
"""
import os
import random
import signal
import time

import pytest

from tests.conftest import FAULT_ROUNDS
from tests.runtools import (assert_same_run, file_has, newest_round, records, run_train, start_train, stop,
                            wait_for)

ROUNDS = FAULT_ROUNDS
STARTUP_S = 0.25


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_env, tiny_run_args):
    """An uninterrupted run (and how long it took)."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    t0 = time.time()
    proc = run_train(tiny_run_args + [f"hydra.run.dir={run_dir}"], train_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, time.time() - t0


def _finish(tiny_run_args, train_env, run_dir):
    proc = run_train(tiny_run_args + [f"hydra.run.dir={run_dir}"], train_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sigkill_and_sigterm_at_random_moments_then_rerun_equals_uninterrupted(tmp_path, train_env, tiny_run_args,
                                                                              reference):
    ref_dir = reference[0]
    run_dir = str(tmp_path / "run")
    rng = random.Random(1234)
    interrupted = 0
    for attempt, sig in enumerate([signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM]):
        # each start is stopped a random moment after a random round of those left was recorded
        target = rng.randint(min(max(newest_round(run_dir), 0), ROUNDS - 2), ROUNDS - 2)
        log = str(tmp_path / f"log{attempt}")
        started = time.time()
        proc = start_train(tiny_run_args + [f"hydra.run.dir={run_dir}"], train_env, log)
        wait_for(lambda: newest_round(run_dir) >= target, proc)
        # not within the interpreter's own start-up (~50 ms, before any of our code runs): there the
        # signal's default action applies (exit -15), with nothing written yet
        time.sleep(max(rng.uniform(0.0, 0.6), started + STARTUP_S - time.time()))
        code = stop(proc, sig)
        interrupted += code != 0
        assert code in (0, -signal.SIGKILL, 128 + signal.SIGTERM), open(log).read()[-3000:]
        assert "Traceback" not in open(log).read()
    assert interrupted >= 2
    _finish(tiny_run_args, train_env, run_dir)  # resumes (or says the run is complete)
    assert_same_run(ref_dir, run_dir, ROUNDS)


def test_sigkill_during_a_checkpoint_write(tmp_path, train_env, tiny_run_args, reference):
    run_dir = str(tmp_path / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    proc = start_train(tiny_run_args + [f"hydra.run.dir={run_dir}"], train_env, str(tmp_path / "log"))
    writing = lambda: os.path.isdir(ckpts) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))
    try:
        assert wait_for(writing, proc, poll=0.002), "no checkpoint write was seen in progress"
    finally:
        stop(proc, signal.SIGKILL)
    _finish(tiny_run_args, train_env, run_dir)
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts))
    assert_same_run(reference[0], run_dir, ROUNDS)


@pytest.mark.parametrize("delay", [STARTUP_S, 1.0])
def test_sigterm_while_the_process_starts_exits_143_with_one_line(tmp_path, train_env, tiny_run_args, delay):
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "log")
    proc = start_train(tiny_run_args + [f"hydra.run.dir={run_dir}"], train_env, log)
    time.sleep(delay)
    assert stop(proc, signal.SIGTERM) == 128 + signal.SIGTERM
    text = open(log).read()
    assert "Traceback" not in text and "SIGTERM" in text, text
    assert not os.path.exists(os.path.join(run_dir, "checkpoints")), os.listdir(run_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_checkpoints_the_last_round_and_exits_cleanly(tmp_path, train_env, tiny_run_args, reference,
                                                                    sig):
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "log")
    # checkpoint.every=3: round 1 is completed but not checkpointed when the signal comes
    run_args = tiny_run_args + ["checkpoint.every=3"]
    proc = start_train(run_args + [f"hydra.run.dir={run_dir}"], train_env, log)
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
    _finish(run_args, train_env, run_dir)
    assert_same_run(reference[0], run_dir, ROUNDS)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_signal_during_compilation(tmp_path, train_env, tiny_run_args, reference, sig):
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "log")
    proc = start_train(tiny_run_args + [f"hydra.run.dir={run_dir}"], train_env, log)
    try:
        assert wait_for(lambda: file_has(log, " - model: "), proc), open(log).read()[-3000:]
        time.sleep(0.2)  # the first jit (round-0 evaluation) compiles now
    finally:
        t0 = time.time()
        code = stop(proc, sig)
        seconds = time.time() - t0
    output = open(log).read()
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL), output[-3000:]
    assert seconds < 10, seconds  # compiling does not delay the stop
    assert "Traceback" not in output and "Segmentation" not in output, output[-3000:]
    _finish(tiny_run_args, train_env, run_dir)
    assert_same_run(reference[0], run_dir, ROUNDS)


def test_a_second_process_on_the_same_directory_is_refused(tmp_path, train_env, tiny_run_args):
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "log")
    proc = start_train(tiny_run_args + ["run.rounds=30", f"hydra.run.dir={run_dir}"], train_env, log)
    try:
        assert wait_for(lambda: newest_round(run_dir) >= 0, proc), open(log).read()[-3000:]
        second = run_train(tiny_run_args + ["run.rounds=30", f"hydra.run.dir={run_dir}"], train_env)
    finally:
        stop(proc, signal.SIGKILL)
    assert second.returncode == 2
    assert "is in use by pid" in second.stderr and "Traceback" not in second.stderr, second.stderr[-2000:]
