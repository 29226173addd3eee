"""Smoke tests of the studies (pretrained vs scratch, LoRA schemes): every arm runs and the table and plot are written."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_study_smoke_writes_results_table_and_plot(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "study_pretrained.py"), "--smoke",
                           "--out", str(tmp_path), "--cache", ""], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))["results"]
    assert sorted(results) == sorted(["pretrained-lora-fl", "scratch-fl", "bow-fl", "pretrained-central",
                                      "pretrained-local"])
    for arm, runs in results.items():
        assert len(runs[0]["acc"]) == 3 and all(0 <= a <= 1 for a in runs[0]["acc"]), arm
    assert len(results["pretrained-local"][0]["per_client_final_acc"]) == 9
    table = (tmp_path / "table.md").read_text()
    assert all(arm in table for arm in results)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_lora_schemes_study_smoke(tmp_path):
    """The LoRA-scheme study's exact-product arms run end to end (1 seed, 2 rounds) and write the table."""
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "study_lora_schemes.py"), "--smoke",
                           "--arms", "fedex", "flex-mixed", "--out", str(tmp_path), "--cache", ""], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))["results"]
    assert list(results) == ["fedex", "flex-mixed"]
    assert all(0 <= a <= 1 for runs in results.values() for a in runs[0]["acc"])
    assert "flex-mixed" in (tmp_path / "table.md").read_text()
