"""The README's own-data walk-through runs literally as written, and debug=tiny is tiny for every task."""
import json
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _walkthrough() -> str:
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- walkthrough:own-data -->\s*```bash\n(.*?)```\s*<!-- /walkthrough -->", text, re.S)
    assert m, "the README lost its own-data walk-through block"
    return m.group(1)


@pytest.mark.slow
def test_own_data_walkthrough_runs_as_written(tmp_path):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the venv's bin/
    env.pop("HYDRA_FULL_ERROR", None)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "xla")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", _walkthrough()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "prompt:     when is my appointment" in proc.stdout
    finals = []
    for run in ("runs/mydata", "runs/mydata_cli"):
        records = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        assert [r["round"] for r in records] == list(range(6))
        assert set(records[-1]["clouds"]) == {"clinic", "bank"} and records[-1]["clients"] == 5
        assert records[-1]["eval_ppl"] < records[0]["eval_ppl"] / 10  # the small dialogue set is learnt
        finals.append(records[-1]["eval_ppl"])
    assert finals[0] == finals[1]  # the YAML file and the command line define the same clouds
    bank = [r["clouds"]["bank"] for r in records[1:]]
    assert all(c["comm_s"] > 0 for c in bank)


def test_debug_tiny_gives_the_default_task_a_tiny_model(tmp_path):
    from fedjax_llm.train import run
    from fedjax_llm.validation import validate
    from tests.conftest import compose_config

    cfg = validate(compose_config(["task=topics", "debug=tiny", "run.rounds=1",
                                   f"data.tokenizer_cache={tmp_path / 'tok'}"]))
    assert cfg.model.family == "llama" and cfg.model.path is None and cfg.data.tokenizer_path is None
    assert cfg.data.task == "classify" and cfg.model.lora.enabled  # the task stays the task
    summary = run(cfg, str(tmp_path / "run"))
    assert summary["frozen_params"] < 1_000_000  # not MiniLM's 22.7M
    assert summary["final_eval_acc"] is not None
