"""Fault injection over a run directory, part 2: damaged files, a full or read-only disk, and reruns the
user gets wrong. Each case ends in a run equal to an uninterrupted one (final params bitwise, every round
once in metrics.jsonl), or in a clean stop: one line naming the problem, non-zero exit, no traceback,
and the directory unchanged (compared file by file; `.lock` is rewritten by every start that locks)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import FAULT_ROUNDS
from tests.runtools import (assert_same_run, newest_round, one_error_line, records, run_train, start_train, stop,
                            tree_fingerprint, wait_for)

ROUNDS = FAULT_ROUNDS


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_env, tiny_run_args):
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    proc = run_train(tiny_run_args + [f"hydra.run.dir={run_dir}"], train_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def stopped_at_3(tmp_path_factory, train_env, tiny_run_args):
    """A run stopped by SIGTERM once round 3 of 4 is recorded (steps 1-3 on disk); tests copy it."""
    run_dir = str(tmp_path_factory.mktemp("stopped") / "run")
    log = str(tmp_path_factory.mktemp("log") / "log")
    proc = start_train(tiny_run_args + [f"hydra.run.dir={run_dir}"], train_env, log)
    try:
        assert wait_for(lambda: newest_round(run_dir) >= 3, proc), open(log).read()[-3000:]
    finally:
        stop(proc, signal.SIGTERM)
    assert records(run_dir)[-1]["round"] == 3, "the stop must land after round 3 and before round 4"
    return run_dir


def _copy(src, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _fingerprint(run_dir):
    return {k: v for k, v in tree_fingerprint(run_dir).items() if k != ".lock"}


def _rerun(tiny_run_args, train_env, run_dir, *extra):
    return run_train(tiny_run_args + [f"hydra.run.dir={run_dir}", *extra], train_env)


def _damage(path, mode):
    data = bytearray(open(path, "rb").read())
    if mode == "truncate":
        data = data[: len(data) // 2]
    else:
        i = len(data) // 2
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


def _step_files(step_dir):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs)


@pytest.mark.parametrize("mode", ["flip", "truncate"])
def test_corrupt_newest_step_is_moved_aside_and_the_run_completes(tmp_path, train_env, tiny_run_args, reference,
                                                                  stopped_at_3,
                                                                  mode):
    run_dir = _copy(stopped_at_3, tmp_path)
    step = os.path.join(run_dir, "checkpoints", "3")
    for path in _step_files(step):  # every file of the step: data, metadata, orbax's own
        if os.path.getsize(path) > 0:
            _damage(path, mode)
    proc = _rerun(tiny_run_args, train_env, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moved the unusable checkpoint step 3" in proc.stdout
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "corrupt", "3"))
    assert_same_run(reference, run_dir, ROUNDS)
    again = _rerun(tiny_run_args, train_env, run_dir)  # and it stays done
    assert again.returncode == 0 and "the run is complete" in again.stdout


def test_every_file_of_the_newest_step_damaged_alone_never_gives_another_model(tmp_path, stopped_at_3):
    """In process: each file of step 3 damaged on its own restores step 3 exactly (a file the restore
    does not need) or falls back to step 2 exactly; never anything else."""
    import jax
    import numpy as np

    from fedjax_llm.checkpoint import Checkpointer
    from tests.runtools import final_arrays

    like = _template(stopped_at_3)
    expected = {}
    for step in (2, 3):
        only = str(tmp_path / f"only{step}")
        shutil.copytree(stopped_at_3, only)
        for other in {1, 2, 3} - {step}:
            shutil.rmtree(os.path.join(only, "checkpoints", str(other)))
        expected[step] = [b for _, b in sorted(final_arrays(only)[1].items())]
    files = [f for f in _step_files(os.path.join(stopped_at_3, "checkpoints", "3")) if os.path.getsize(f) > 0]
    assert len(files) >= 8
    outcomes = []
    for i, victim in enumerate(files):
        run_dir = str(tmp_path / f"r{i}")
        shutil.copytree(stopped_at_3, run_dir)
        rel = os.path.relpath(victim, stopped_at_3)
        _damage(os.path.join(run_dir, rel), "flip")
        state, meta = Checkpointer(os.path.join(run_dir, "checkpoints"), 1, 3, ROUNDS).restore(like)
        outcomes.append(meta["round"])
        assert meta["round"] in (2, 3), rel
        got = [np.asarray(x) for x in jax.tree.leaves(state)]
        assert [g.tobytes() for g in got] == [e.tobytes() for e in expected[meta["round"]]], rel
        shutil.rmtree(run_dir)
    assert 2 in outcomes  # damage to the arrays or metadata was caught


def _template(run_dir):
    """The state structure of a run directory, built as training builds it."""
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.runs import read_config
    from fedjax_llm.server import Federation

    cfg = read_config(run_dir)
    data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    return Federation(cfg, data).init_state()


def test_every_step_corrupt_stops_cleanly_and_changes_nothing(tmp_path, train_env, tiny_run_args, stopped_at_3):
    run_dir = _copy(stopped_at_3, tmp_path)
    for step in ("1", "2", "3"):
        for path in _step_files(os.path.join(run_dir, "checkpoints", step)):
            if "/state/" in path and os.path.getsize(path) > 64:
                _damage(path, "flip")
    before = _fingerprint(run_dir)
    for _ in range(2):  # the same clear stop each time, nothing moved
        proc = _rerun(tiny_run_args, train_env, run_dir)
        assert proc.returncode == 2
        line = one_error_line(proc.stderr)
        assert "no usable checkpoint" in line and "step 1" in line and "step 3" in line, line
        assert _fingerprint(run_dir) == before


def test_truncated_or_damaged_metrics_are_rebuilt_from_the_checkpoint(tmp_path, train_env, tiny_run_args, reference,
                                                                     stopped_at_3):
    run_dir = _copy(stopped_at_3, tmp_path)
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    # a cut last line, and a duplicated middle round
    open(path, "w").write("".join(lines[:2] + lines[1:2] + lines[2:-1]) + lines[-1][: len(lines[-1]) // 2])
    proc = _rerun(tiny_run_args, train_env, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, run_dir, ROUNDS)


def test_changed_config_is_refused_listing_the_keys(tmp_path, train_env, tiny_run_args, stopped_at_3):
    run_dir = _copy(stopped_at_3, tmp_path)
    before = tree_fingerprint(run_dir)
    proc = _rerun(tiny_run_args, train_env, run_dir, "client.lr=0.5", "seed=7")
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "holds a run with another config" in line and "client.lr" in line and "seed: 0 -> 7" in line, line
    assert "resume=" in line
    assert tree_fingerprint(run_dir) == before


def test_extending_rounds_equals_the_longer_run(tmp_path, train_env, tiny_run_args, reference):
    run_dir = str(tmp_path / "run")
    proc = _rerun(tiny_run_args, train_env, run_dir, "run.rounds=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_train(["resume=" + run_dir, f"run.rounds={ROUNDS}"], train_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "changing run.rounds 2 -> 4" in proc.stdout
    assert_same_run(reference, run_dir, ROUNDS)
    assert json.load(open(os.path.join(run_dir, "summary.json")))["rounds_completed"] == ROUNDS


def test_rerunning_a_complete_run_changes_nothing(tmp_path, train_env, tiny_run_args, reference):
    run_dir = _copy(reference, tmp_path)
    before = tree_fingerprint(run_dir)
    for extra in ([f"hydra.run.dir={run_dir}"], None):
        proc = run_train(tiny_run_args + extra if extra else [f"resume={run_dir}"], train_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "the run is complete (4 of 4 rounds); nothing was changed" in proc.stdout
        assert "run.rounds=N" in proc.stdout
        assert tree_fingerprint(run_dir) == before


def test_resume_refuses_a_path_without_a_run(tmp_path, train_env):
    missing = tmp_path / "no" / "such"
    proc = run_train([f"resume={missing}"], train_env)
    assert proc.returncode == 2 and "resume=" in one_error_line(proc.stderr)
    assert not os.path.exists(missing) and not os.path.exists(tmp_path / "no" / "such")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    for run_args in ([f"resume={other}"], ["task=dialog", "debug=tiny", f"hydra.run.dir={other}"]):
        proc = run_train(run_args, train_env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        one_error_line(proc.stderr)
        assert sorted(os.listdir(other)) == ["mine.txt"]


def _write_jsonl(path, n=200):
    with open(path, "w") as f:
        for i in range(n):
            cloud = ("north", "south")[i % 2]
            f.write(json.dumps({"prompt": f"{cloud} question {i % 7}", "response": f"answer {i % 5} from {cloud}",
                                "cloud": cloud}) + "\n")


def test_a_failed_rerun_leaves_the_good_run_intact(tmp_path, train_env, tiny_run_args):
    data = tmp_path / "mine.jsonl"
    _write_jsonl(data)
    clouds = ["clouds=custom", "clouds.members.north={clients: 2, select: [north]}",
              "clouds.members.south={clients: 2, select: [south]}", "partition=iid", "partition.cloud_field=cloud"]
    jsonl = tiny_run_args + clouds + ["data=jsonl", "data.vocab_size=300", "run.rounds=2"]
    run_dir = str(tmp_path / "run")
    proc = run_train(jsonl + [f"data.path={data}", f"hydra.run.dir={run_dir}"], train_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = tree_fingerprint(run_dir)
    # another data file into the same directory: a different config, refused
    proc = run_train(jsonl + [f"data.path={tmp_path / 'missing.jsonl'}", f"hydra.run.dir={run_dir}"], train_env)
    assert proc.returncode == 2 and "data.path" in one_error_line(proc.stderr)
    # the same file, now malformed, under a longer run: the data error names file and line
    good = data.read_text()
    data.write_text(good.splitlines()[0] + "\n{not json\n")
    proc = run_train([f"resume={run_dir}", "run.rounds=3"], train_env)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert f"{data}:2" in line and "bad JSON" in line, line
    data.write_text("")
    proc = run_train([f"resume={run_dir}", "run.rounds=3"], train_env)
    assert proc.returncode == 2 and "has no records" in one_error_line(proc.stderr)
    after = {k: v for k, v in tree_fingerprint(run_dir).items() if k != ".lock"}
    assert after == {k: v for k, v in before.items() if k != ".lock"}
    data.write_text(good)  # the run still reads back
    gen = subprocess.run([sys.executable, "-m", "fedjax_llm.generate", run_dir, "--prompt", "north question 1",
                          "--greedy", "--max-new-tokens", "4"], env=train_env, capture_output=True, text=True,
                         timeout=600)
    assert gen.returncode == 0 and "round 2" in gen.stdout, gen.stderr[-2000:]
    # a new run with a bad file leaves nothing behind
    fresh = tmp_path / "fresh"
    data.write_text("{not json\n")
    proc = run_train(jsonl + [f"data.path={data}", f"hydra.run.dir={fresh}"], train_env)
    assert proc.returncode == 2 and f"{data}:1" in one_error_line(proc.stderr)
    assert not fresh.exists()


def _in_mount_namespace(script: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--mount", "bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=timeout)


def _can_mount() -> bool:
    try:
        return _in_mount_namespace("mount -t tmpfs -o size=1m tmpfs /mnt", timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_mounts = pytest.mark.skipif(not _can_mount(), reason="needs root and unshare --mount (tmpfs, bind mounts)")


def _shell_env(train_env):
    return " ".join(f"{k}={json.dumps(v)}" for k, v in train_env.items() if k.startswith(("JAX_", "XLA_", "HF_")))


@needs_mounts
def test_read_only_run_directory(tmp_path, train_env, tiny_run_args, reference, stopped_at_3):
    done, partial = _copy(reference, tmp_path), str(tmp_path / "partial")
    shutil.copytree(stopped_at_3, partial)
    before_done, before_partial = tree_fingerprint(done), tree_fingerprint(partial)
    py = f"{_shell_env(train_env)} {sys.executable}"
    common = " ".join(tiny_run_args)
    script = f"""
cd {tmp_path}
for d in {done} {partial}; do mount --bind $d $d; mount -o remount,bind,ro $d; done
set +e
{py} -m fedjax_llm.train {common} hydra.run.dir={done} > done.out 2> done.err; echo $? > done.rc
{py} -m fedjax_llm.train {common} hydra.run.dir={partial} > partial.out 2> partial.err; echo $? > partial.rc
{py} -m fedjax_llm.generate {done} --prompt hello --greedy --max-new-tokens 4 > gen.out 2> gen.err; echo $? > gen.rc
"""
    proc = _in_mount_namespace(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda name: (tmp_path / name).read_text()
    assert read("done.rc").strip() == "0" and "the run is complete" in read("done.out"), read("done.err")[-2000:]
    assert read("partial.rc").strip() == "2", read("partial.err")[-2000:]
    line = one_error_line(read("partial.err"))
    assert "read-only file system" in line and partial in line, line
    assert read("gen.rc").strip() == "0" and "round 4" in read("gen.out"), read("gen.err")[-2000:]
    assert tree_fingerprint(done) == before_done and tree_fingerprint(partial) == before_partial


@needs_mounts
def test_full_disk_stops_cleanly_then_resumes_exactly(tmp_path, train_env, tiny_run_args, reference):
    py = f"{_shell_env(train_env)} {sys.executable}"
    common = " ".join(tiny_run_args)
    disk, out = "/mnt/disk", tmp_path / "out"
    out.mkdir()
    script = f"""
mkdir -p {disk}
mount -t tmpfs -o size=3m tmpfs {disk}
set +e
{py} -m fedjax_llm.train {common} hydra.run.dir={disk}/run > {out}/full.out 2> {out}/full.err; echo $? > {out}/full.rc
set -e
cp -a {disk}/run {out}/at_full
mount -o remount,size=64m {disk}
set +e
{py} -m fedjax_llm.train {common} hydra.run.dir={disk}/run > {out}/again.out 2> {out}/again.err
echo $? > {out}/again.rc
set -e
cp -a {disk}/run {out}/final
"""
    proc = _in_mount_namespace(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda name: (out / name).read_text()
    assert read("full.rc").strip() == "2", read("full.out")[-2000:] + read("full.err")[-2000:]
    line = one_error_line(read("full.err"))
    assert "no space left on the device" in line and "rerun" in line, line
    at_full = str(out / "at_full")
    rounds = [r["round"] for r in records(at_full)]
    assert rounds == list(range(len(rounds))) and 1 <= rounds[-1] < ROUNDS, rounds
    assert read("again.rc").strip() == "0", read("again.err")[-3000:]
    assert_same_run(reference, str(out / "final"), ROUNDS)
