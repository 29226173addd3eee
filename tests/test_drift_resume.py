"""A drifting run (with the EWC remedy) resumed mid-phase equals an uninterrupted one, bit for bit: the
final params and every metrics line (the per-phase scores included); its summary carries the accuracy
matrix as the metrics lines give it."""
import json
import os
import shutil

import numpy as np
import pytest

from tests.runtools import assert_same_run, records, run_train

pytestmark = pytest.mark.slow
ROUNDS = 4  # phases of 1, 2 and 1 rounds: round 2 is the middle of the second phase


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    return ["task=topics", "experiment=adaptation", "debug=tiny", f"data.tokenizer_cache={cache}",
            "drift.remedy=ewc", "drift.phases.0.rounds=1", "drift.phases.1.rounds=2", "drift.phases.2.rounds=1",
            f"run.rounds={ROUNDS}", "run.eval_every=2", "checkpoint.every=1", "checkpoint.keep=10"]


def test_resumed_mid_phase_equals_uninterrupted(tmp_path, train_env, args):
    ref = str(tmp_path / "ref")
    proc = run_train(args + [f"hydra.run.dir={ref}"], train_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(ref)
    assert [r.get("phase") for r in recs] == [0, 0, 1, 1, 2]
    # phase ends (1, 3, 4) are evaluated although run.eval_every=2; round 2 by eval_every
    assert [r["round"] for r in recs if r.get("eval_phase_acc")] == [0, 1, 2, 3, 4]
    assert all(len(r["eval_phase_acc"]) == 3 for r in recs if r.get("eval_phase_acc"))

    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    for step in (3, 4):  # back to the checkpoint of round 2, mid-phase
        shutil.rmtree(os.path.join(run, "checkpoints", str(step)))
    os.remove(os.path.join(run, "summary.json"))
    proc = run_train(args + [f"hydra.run.dir={run}"], train_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from round 2" in open(os.path.join(run, "train.log")).read()
    assert_same_run(ref, run, ROUNDS)

    summary = json.load(open(os.path.join(run, "summary.json")))["continual"]
    by_round = {r["round"]: r["eval_phase_acc"] for r in recs if r.get("eval_phase_acc")}
    np.testing.assert_array_equal(summary["matrix"], [by_round[1], by_round[3], by_round[4]])
    assert summary["initial"] == by_round[0] and summary["phase_ends"] == [1, 3, 4]
