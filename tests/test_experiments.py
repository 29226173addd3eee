"""Smoke tests: every experiment file, and every algorithm file, runs end to end on a tiny model."""
import glob
import json
import os
import subprocess
import sys

import pytest

from fedjax_llm.train import CONF_DIR


def _names(group):
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONF_DIR, group, "*.yaml")))


def _sweep(tmp_path, *args):
    # Smoke runs are compile-bound on CPU: XLA's lowest backend optimisation compiles ~35 % faster.
    env = dict(os.environ, HYDRA_FULL_ERROR="1", XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-m", "fedjax_llm.train", "-m", *args, "debug=smoke",
                           f"data.tokenizer_cache={tmp_path / 'tok'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = sorted(glob.glob(str(tmp_path / "sweep" / "*" / "summary.json")))
    return [json.load(open(p)) for p in runs]


@pytest.mark.slow
def test_every_experiment_file_runs(tmp_path):
    summaries = _sweep(tmp_path, "experiment=glob(*)")
    assert sorted(s["name"] for s in summaries) == _names("experiment")
    for s in summaries:
        assert s["final_eval_loss"] is not None and s["tokens"] > 0, s["name"]


@pytest.mark.slow
def test_default_task_runs_minilm_lora_classification(tmp_path):
    """The default task (MiniLM + LoRA topic classification) end to end, one tiny round."""
    (s,) = _sweep(tmp_path, "task=topics", "data.max_eval_examples=16")
    assert s["name"] == "topics" and s["final_eval_loss"] is not None and s["tokens"] > 0
    assert 0.0 <= s["final_eval_acc"] <= 1.0 and 0.0 <= s["final_eval_f1"] <= 1.0
