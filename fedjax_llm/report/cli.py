"""fedjax-llm-report DIR [DIR ...]: tables, figures and one offline HTML page for runs and sweeps.

    fedjax-llm-report multirun/topics/2026-12-02_10-00-00            # a Hydra sweep -> DIR/report/
    fedjax-llm-report outputs/a/RUN outputs/b/RUN --out /tmp/ab       # several runs or sweeps
    fedjax-llm-report SWEEP --target eval_acc=0.6 --group-by client.lr

Writes OUT/report.html (self-contained), OUT/report.md, OUT/summary.csv (one row per setting),
OUT/runs.csv (one row per run directory) and OUT/plots/*.png.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
from typing import Optional, Sequence

from fedjax_llm.report import group as G
from fedjax_llm.report import plots, tables
from fedjax_llm.report.load import load_runs
from fedjax_llm.report.page import FigureRef, Page, Table, to_html, to_markdown

METRICS_NOTE = ("final: the last evaluated round of each run; best: each run's best evaluated round; "
                "both as mean ± sample std (ddof 1) over the seeds listed.")
COST_NOTE = ("rounds to a target: the first evaluated round that reaches it, averaged over the seeds that "
             "did (k/n seeds). MB on the wire: 10^6 bytes of the messages between the clouds and the "
             "aggregator, up and down, summed over rounds. Simulated comm.: the sum over rounds of the "
             "slowest cloud's downlink + uplink time on its modelled link. Wall s: the training rounds' "
             "wall time, evaluation excluded.")


def provenance() -> str:
    """The git commit of this fedjax_llm checkout (with -dirty for local changes), if it is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def resolve_targets(groups, metrics, given: Optional[dict] = None) -> tuple[dict, list[str]]:
    """Rounds-to-target levels of the evaluation metrics (given ones first), and how each was chosen."""
    given = dict(given or {})
    targets, notes = {}, []
    for m in metrics:
        if not m.key.startswith("eval_"):
            continue
        if m.key in given:
            targets[m.key], why = float(given.pop(m.key)), "--target"
        else:
            targets[m.key] = G.default_target(groups, m)
            why = f"default: within {G.TARGET_SHARE:.0%} of the best setting's mean final value"
        if targets[m.key] is not None:
            notes.append(f"{m.label} target {targets[m.key]:{m.fmt}} ({why})")
    for key in given:
        notes.append(f"--target {key}: no run logged this metric; ignored")
    return targets, notes


def build_report(paths: Sequence[str], out: str, targets: Optional[dict] = None,
                 group_by: Optional[Sequence[str]] = None, include_incomplete: bool = False,
                 stale_after_s: float = 1800.0, title: Optional[str] = None,
                 command: Optional[str] = None) -> dict:
    """Reads every run under paths and writes the report into out; returns what it wrote and counted."""
    runs, notes = load_runs(list(paths), stale_after_s)
    include = (lambda r: bool(r.records)) if include_incomplete else (lambda r: r.usable)
    groups, labels = G.group_runs(runs, include, group_by)
    metrics = G.present_metrics(groups)
    targets, target_notes = resolve_targets(groups, metrics, targets)
    dp = G.uses_dp(groups)
    plot_dir = os.path.join(out, "plots")
    os.makedirs(plot_dir, exist_ok=True)

    figures = []
    for m in metrics:
        figures.append(FigureRef(f"{m.label} against round, cumulative bytes on the wire and simulated "
                                 "communication time; line: mean over seeds, band: ± one std",
                                 plots.metric_figure(os.path.join(plot_dir, f"{m.key}.png"), groups, m)))
    primary = next((m for m in metrics if m.key.startswith("eval_")), None)
    if primary is not None:
        path = plots.cloud_figure(os.path.join(plot_dir, f"{primary.key}_per_cloud.png"), groups, primary,
                                  G.clouds(groups))
        if path:
            figures.append(FigureRef(f"{primary.label} of each cloud's held-out examples, per setting", path))
        if dp:
            path = plots.epsilon_figure(os.path.join(plot_dir, f"epsilon_vs_{primary.key}.png"), groups, primary)
            figures.append(FigureRef(f"{primary.label} against the epsilon spent (settings without DP as "
                                     "dashed levels)", path))

    root = os.path.commonpath([os.path.abspath(r.path) for r in runs]) if runs else ""
    if len(runs) == 1:
        root = os.path.dirname(root)
    pooled = {id(r) for g in groups for r in g.runs}
    run_rows = [["run", "setting", "seed", "status", "pooled", "last round", "detail"]]
    for i, r in enumerate(runs):
        run_rows.append([os.path.relpath(os.path.abspath(r.path), root) if root else r.path, labels.get(i, "–"),
                         "–" if r.seed is None else str(r.seed), r.status, "yes" if id(r) in pooled else "no",
                         "–" if r.last_round is None else str(r.last_round), r.detail])
    settings = [["setting", "seeds", "runs"]] + [
        [g.label, ", ".join(str(s) for s in g.seeds),
         " ".join(os.path.relpath(os.path.abspath(r.path), root) if root else r.path for r in g.runs)]
        for g in groups]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    if not groups:
        notes.append("no run to pool: none is complete" + ("" if include_incomplete else
                     " (--include-incomplete pools runs that are in progress or stopped too)"))
    page = Page(
        title=title or "fedjax_llm report",
        meta=[("generated", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
              ("command", command or "build_report(...)"),
              ("inputs", " ".join(os.path.abspath(p) for p in paths)),
              ("pooled", "every run with metrics" if include_incomplete else "complete runs (and runs stopped "
               "early by secure.dp.target_epsilon)"),
              ("report code", f"fedjax_llm {provenance()}")],
        counts=counts,
        tables=[Table("Settings (runs grouped by the config keys that differ; seeds pooled)", settings),
                Table("Final and best metrics (mean ± std over seeds)",
                      tables.rows(groups, tables.metric_columns(metrics)), METRICS_NOTE),
                Table("Rounds to target, communication, time" + (" and privacy" if dp else ""),
                      tables.rows(groups, tables.cost_columns(metrics, targets, dp)),
                      "; ".join(target_notes) + ". " + COST_NOTE + (
                          " q: a client's per-round sampling probability; sample size: clients drawn per round "
                          "(– under Poisson sampling); population: the clients it is drawn from." if dp else ""))],
        figures=figures,
        runs=Table("", run_rows),
        notes=notes)
    written = dict(html=os.path.join(out, "report.html"), markdown=os.path.join(out, "report.md"),
                   summary_csv=os.path.join(out, "summary.csv"), runs_csv=os.path.join(out, "runs.csv"))
    with open(written["html"], "w", encoding="utf-8") as f:
        f.write(to_html(page))
    with open(written["markdown"], "w", encoding="utf-8") as f:
        f.write(to_markdown(page, out))
    tables.summary_csv(written["summary_csv"], groups, metrics, targets)
    tables.runs_csv(written["runs_csv"], runs, labels, metrics, targets, root)
    return dict(written, figures=[f.path for f in figures], counts=counts, groups=[g.label for g in groups],
                notes=notes)


def _target(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target: expected METRIC=VALUE (e.g. eval_acc=0.6), got {text!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fedjax-llm-report", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("dirs", nargs="+", help="run directories, Hydra multirun sweep directories, or folders of them")
    ap.add_argument("--out", help="output folder (default: DIR/report for one DIR, else ./report)")
    ap.add_argument("--target", type=_target, action="append", default=[], metavar="METRIC=VALUE",
                    help="rounds-to-target level, e.g. eval_acc=0.6 (default: within 10%% of the best "
                         "setting's mean final value: 0.9x for accuracy, 1.1x for perplexity or loss)")
    ap.add_argument("--group-by", nargs="+", metavar="KEY", help="group by these config keys only (dotted, e.g. "
                    "client.lr); default: every key that differs between runs, seed pooled")
    ap.add_argument("--include-incomplete", action="store_true",
                    help="also pool runs in progress, stopped or failed, up to their last round")
    ap.add_argument("--stale-minutes", type=float, default=30.0,
                    help="for run directories without a lock file (older runs): an unfinished run whose "
                         "metrics.jsonl is older than this is 'incomplete', else 'in progress' (default 30)")
    ap.add_argument("--title", help="page title")
    args = ap.parse_args(argv)
    out = args.out or (os.path.join(args.dirs[0], "report") if len(args.dirs) == 1 else "report")
    command = " ".join(shlex.quote(a) for a in ["fedjax-llm-report", *(sys.argv[1:] if argv is None else argv)])
    res = build_report(args.dirs, out, dict(args.target), args.group_by, args.include_incomplete,
                       args.stale_minutes * 60, args.title, command)
    counts = ", ".join(f"{n} {s}" for s, n in res["counts"].items()) or "no runs"
    print(f"{sum(res['counts'].values())} runs ({counts}) in {len(res['groups'])} settings")
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"wrote {res['html']} ({len(res['figures'])} figures embedded), {res['markdown']}, "
          f"{res['summary_csv']}, {res['runs_csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
