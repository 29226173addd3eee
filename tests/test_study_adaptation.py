"""Smoke test of the continuous-adaptation study: every arm runs a 3-phase schedule end to end and the
table, the accuracy-matrix plot and the per-phase plots are written from run directories."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_adaptation_study_smoke(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "study_adaptation.py"), "--smoke", "--out",
           str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["phases"] == ["start", "new", "more"]
    results = saved["results"]
    assert list(results) == ["minilm-lora", "minilm-lora+ewc", "bow", "bow+ewc"]
    for arm, runs in results.items():
        (run,) = runs
        # the summary's matrix is the per-phase accuracy of the metrics lines at the phase ends (1, 2, 3)
        rows = {r["round"]: r["eval_phase_acc"] for r in run["records"]}
        np.testing.assert_array_equal(run["continual"]["matrix"], [rows[1], rows[2], rows[3]], err_msg=arm)
        assert [r["phase"] for r in run["records"][1:]] == [0, 1, 2], arm
    table = (tmp_path / "out" / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in results) and "forgetting" in table
    for name in ("matrix.png", "phase0.png", "phase1.png", "phase2.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
