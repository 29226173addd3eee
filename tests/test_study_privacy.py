"""The privacy study: its smoke run end to end, its tables against results.json recomputed with NumPy, and its
noise multipliers against dp-accounting called directly (not through fedjax_llm.secure.accountant)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "study_privacy.py")
COMMITTED = os.path.join(ROOT, "experiments", "results", "privacy")


def direct_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """dp-accounting's RDP accountant, Poisson-sampled Gaussian composed `rounds` times (add/remove one)."""
    acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    return acc.get_epsilon(delta)


def check_noise_multipliers(saved: dict) -> None:
    """Each z reaches its target epsilon after the study's rounds, and is the smallest such z (to 1e-4)."""
    d = saved["design"]
    assert saved["noise_multipliers"]["inf"] == 0.0
    for key, z in saved["noise_multipliers"].items():
        if key == "inf":
            continue
        target = float(key)
        eps = direct_epsilon(z, d["q"], d["rounds"], d["delta"])
        assert target * 0.99 <= eps <= target, (key, z, eps)
        assert direct_epsilon(z - 2e-4, d["q"], d["rounds"], d["delta"]) > target, (key, z)


def check_tables(saved: dict, out: str) -> None:
    """table.csv's means and sample stds, and table.md's cells, recomputed from results.json."""
    with open(os.path.join(out, "table.csv"), newline="", encoding="utf-8") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    table = open(os.path.join(out, "table.md"), encoding="utf-8").read()
    settings = 0
    for arm, by_eps in saved["results"].items():
        for key, runs in by_eps.items():
            row = rows[f"{arm}, ε={'∞' if key == 'inf' else key}"]
            settings += 1
            for metric, field in (("acc", "final_eval_acc"), ("f1", "final_eval_f1")):
                finals = np.array([r[metric][-1] for r in runs], float)
                assert float(row[f"{field}_mean"]) == pytest.approx(finals.mean(), abs=1e-12)
                if len(finals) > 1:
                    assert float(row[f"{field}_std"]) == pytest.approx(finals.std(ddof=1), abs=1e-12)
                    cell = f"{finals.mean():.3f} ± {finals.std(ddof=1):.3f}"
                else:
                    assert row[f"{field}_std"] == ""
                    cell = f"{finals.mean():.3f}"
                assert f"| {cell} |" in table, (arm, key, metric, cell)
            assert float(row["noise_multiplier"]) == saved["noise_multipliers"][key]
            assert int(row["population"]) == saved["design"]["population"]
            assert float(row["sampling_q"]) == saved["design"]["q"]
            for r in runs:  # the epsilon each run's own accountant logged after its last round
                assert len(r["scored_rounds"]) == len(r["acc"]) and r["scored_rounds"][-1] == saved["design"]["rounds"]
                if key == "inf":
                    assert r["final_epsilon"] is None
                else:
                    assert float(key) * 0.99 <= r["final_epsilon"] <= float(key) + 1e-9
    assert len(rows) == settings


@pytest.mark.slow
def test_smoke_runs_every_arm_and_its_tables_and_noise_check_out(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path), "--cache", ""], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    saved = json.load(open(tmp_path / "results.json"))
    assert list(saved["results"]) == ["pretrained-lora", "scratch", "bow"]
    assert all(list(by_eps) == ["3", "inf"] for by_eps in saved["results"].values())
    assert saved["design"]["population"] == 30 and saved["population"]["0"]["clients"] == 30
    assert all(0 <= a <= 1 for by_eps in saved["results"].values() for runs in by_eps.values() for a in runs[0]["acc"])
    check_tables(saved, str(tmp_path))
    check_noise_multipliers(saved)
    for name in ("accuracy_vs_epsilon.png", "accuracy_by_round.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --collect trains nothing: the same results from the run directories, a removed run listed as not run
    shutil.rmtree(tmp_path / "runs" / "bow" / "epsinf" / "server_lr1" / "seed0")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--collect", "--out", str(tmp_path), "--cache", ""],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    collected = json.load(open(tmp_path / "results.json"))
    assert collected["missing"] == [dict(arm="bow", epsilon="inf", seed=0)]
    del saved["results"]["bow"]["inf"]
    assert collected["results"] == saved["results"]
    assert "Not run (the study stopped before them; rerun the command to add them): bow ε=∞ seed 0." in \
        (tmp_path / "table.md").read_text()
    check_tables(collected, str(tmp_path))


def test_committed_results_tables_and_noise_multipliers():
    """The committed study: >= 100 clients, >= 3 seeds per setting, every arm at every epsilon, tables
    equal to results.json recomputed, z as the accountant says; `--render` rewrites table.md byte for byte."""
    saved = json.load(open(os.path.join(COMMITTED, "results.json")))
    d = saved["design"]
    assert d["population"] >= 100 and d["q"] < 1
    assert saved["git_commit"] and saved["command"].startswith("python experiments/study_privacy.py")
    for by_eps in saved["results"].values():
        assert sorted(by_eps) == sorted(["1", "3", "8", "inf"])
        assert all(len({r["seed"] for r in runs}) >= 3 for runs in by_eps.values())
    check_tables(saved, COMMITTED)
    check_noise_multipliers(saved)


def test_render_reproduces_the_committed_table(tmp_path):
    shutil.copy(os.path.join(COMMITTED, "results.json"), tmp_path / "results.json")
    proc = subprocess.run([sys.executable, SCRIPT, "--render", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "table.md").read_text() == open(os.path.join(COMMITTED, "table.md")).read()
    assert (tmp_path / "accuracy_vs_epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arm_settings_are_the_committed_tuning_picks():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import study_privacy

    picks = json.load(open(os.path.join(COMMITTED, "tuning.json")))["picks"]
    tuned = json.load(open(os.path.join(COMMITTED, "tuning_dp.json")))
    server, applied = tuned["picks"], tuned["applied"]
    assert set(picks) == set(server) == set(study_privacy.ARMS)
    for arm, p in picks.items():
        assert (study_privacy.ARMS[arm].lr, study_privacy.ARMS[arm].clip) == (p["lr"], p["clip"]), arm
        assert study_privacy.ARMS[arm].server_lr == applied[arm], arm
        assert study_privacy.server_lr(arm, "inf") == 1.0
    saved = json.load(open(os.path.join(COMMITTED, "results.json")))
    for arm, a in saved["arms"].items():  # what the committed runs used
        assert (a["lr"], a["clip"]) == (picks[arm]["lr"], picks[arm]["clip"])
        assert a["server_lr"] == {**applied[arm], "inf": 1.0}
        assert all(applied[arm][k] == p for k, p in server[arm].items())
