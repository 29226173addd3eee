"""Tables of settings (rows) by summaries over seeds (columns), as Markdown and CSV.

A column is a header and a function of a Group; the report's tables and the studies' tables are lists
of such columns, so every table formats numbers the same way: mean ± sample std over seeds.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np

from fedjax_llm.report import group as G
from fedjax_llm.report.group import Group, Metric
from fedjax_llm.report.load import Run

DASH = "–"
DP_FIELDS = ("delta", "noise_multiplier", "sampling", "sampling_q", "sample_size", "population")


@dataclasses.dataclass
class Column:
    header: str
    cell: Callable[[Group], str]


def mean_std_text(values: Sequence[Optional[float]], fmt: str = ".3f") -> str:
    """'0.512 ± 0.049' over the finite values; one value alone has no spread; none: a dash."""
    mean, std, n = G.mean_std(values)
    if n == 0:
        return DASH
    return f"{mean:{fmt}}" if n == 1 else f"{mean:{fmt}} ± {std:{fmt}}"


def rounds_to_text(hits: Sequence[Optional[int]]) -> str:
    """Mean round over the seeds that reached the target, and how many did."""
    reached = [h for h in hits if h is not None]
    if not reached:
        return f"not reached (0/{len(hits)})"
    return f"{np.mean(reached):.1f} ({len(reached)}/{len(hits)} seeds)"


def same_text(values: Sequence) -> str:
    """The value the runs share, or the distinct values joined by ' / '."""
    distinct = []
    for v in values:
        if v is not None and v not in distinct:
            distinct.append(v)
    return " / ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in distinct) or DASH


# --------------------------------------------------------------------------------- column makers


def label_col(header: str = "setting") -> Column:
    return Column(header, lambda g: g.label)


def seeds_col() -> Column:
    return Column("seeds", lambda g: ", ".join(str(s) for s in g.seeds))


def final_col(m: Metric, header: Optional[str] = None) -> Column:
    return Column(header or f"final {m.label}", lambda g: mean_std_text([G.final(r, m.key) for r in g.runs], m.fmt))


def best_col(m: Metric, header: Optional[str] = None) -> Column:
    return Column(header or f"best {m.label}", lambda g: mean_std_text([G.best(r, m) for r in g.runs], m.fmt))


def rounds_to_col(m: Metric, target: float, header: Optional[str] = None) -> Column:
    sign = "≥" if m.higher_better else "≤"
    return Column(header or f"rounds to {m.label} {sign} {target:{m.fmt}}",
                  lambda g: rounds_to_text([G.rounds_to(r, m, target) for r in g.runs]))


def total_col(key: str, header: str, fmt: str = ".1f", scale: float = 1.0) -> Column:
    def cell(g: Group) -> str:
        return mean_std_text([r.totals.get(key) / scale if r.totals.get(key) is not None else None
                              for r in g.runs], fmt)
    return Column(header, cell)


def mean_col(key: str, header: str, fmt: str = ".0f") -> Column:
    """The plain mean over runs of a total (the studies' 'seconds per run')."""
    def cell(g: Group) -> str:
        mean, _, n = G.mean_std([r.totals.get(key) for r in g.runs])
        return f"{mean:{fmt}}" if n else DASH
    return Column(header, cell)


def shared_col(key: str, header: str) -> Column:
    return Column(header, lambda g: same_text([r.totals.get(key) for r in g.runs]))


# ---------------------------------------------------------------------------------- the tables


def metric_columns(metrics: Sequence[Metric]) -> list[Column]:
    cols = [label_col(), seeds_col()]
    for m in metrics:
        cols += [final_col(m), best_col(m)]
    return cols


def cost_columns(metrics: Sequence[Metric], targets: dict[str, float], dp: bool) -> list[Column]:
    cols = [label_col()]
    cols += [rounds_to_col(m, targets[m.key]) for m in metrics if targets.get(m.key) is not None]
    cols += [total_col("bytes", "MB on the wire (up + down)", ".1f", 1e6),
             total_col("comm_s", "simulated comm. s", ".2f"), total_col("wall_s", "wall s (rounds)", ".1f")]
    if dp:
        cols += [total_col("epsilon", "epsilon", ".3f"), shared_col("delta", "delta"),
                 shared_col("sampling_q", "q"), shared_col("sample_size", "sample size"),
                 shared_col("population", "population"), shared_col("noise_multiplier", "noise multiplier")]
    return cols


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def rows(groups: Sequence[Group], columns: Sequence[Column]) -> list[list[str]]:
    """Header row then one row of cell texts per group."""
    return [[c.header for c in columns]] + [[c.cell(g) for c in columns] for g in groups]


def md_table(table: Sequence[Sequence[str]]) -> str:
    """A Markdown table from a header row and body rows."""
    head, *body = table
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def markdown(groups: Sequence[Group], columns: Sequence[Column]) -> str:
    return md_table(rows(groups, columns))


# ------------------------------------------------------------------------------------------- CSV


def _num(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(x) if isinstance(x, float) else str(x)


def summary_csv(path: str, groups: Sequence[Group], metrics: Sequence[Metric], targets: dict) -> None:
    """One row per setting: every mean and std as its own number column (machine-readable)."""
    fields, out = ["setting", "seeds", "runs"], []
    for g in groups:
        row = dict(setting=g.label, seeds=" ".join(str(s) for s in g.seeds), runs=len(g.runs))
        for m in metrics:
            for what, fn in (("final", lambda r, m=m: G.final(r, m.key)), ("best", lambda r, m=m: G.best(r, m))):
                mean, std, n = G.mean_std([fn(r) for r in g.runs])
                row.update({f"{what}_{m.key}_mean": mean, f"{what}_{m.key}_std": std})
            if targets.get(m.key) is not None:
                hits = [G.rounds_to(r, m, targets[m.key]) for r in g.runs]
                reached = [h for h in hits if h is not None]
                row.update({f"target_{m.key}": targets[m.key], f"rounds_to_{m.key}_mean":
                            float(np.mean(reached)) if reached else None, f"rounds_to_{m.key}_reached": len(reached)})
        for key in ("bytes", "comm_s", "wall_s", "tokens", "epsilon"):
            mean, std, n = G.mean_std([r.totals.get(key) for r in g.runs])
            row.update({f"{key}_mean": mean, f"{key}_std": std})
        for key in DP_FIELDS:  # the shared value as a number; differing values as 'a / b' text
            distinct = {repr(r.totals.get(key)) for r in g.runs}
            row[key] = g.runs[0].totals.get(key) if len(distinct) == 1 else same_text(
                [r.totals.get(key) for r in g.runs])
        out.append(row)
        fields += [k for k in row if k not in fields]
    _write_csv(path, fields, out)


def runs_csv(path: str, runs: Sequence[Run], labels: dict[int, str], metrics: Sequence[Metric],
             targets: dict, root: str = "") -> None:
    """One row per run directory (pooled or not): where the numbers come from."""
    fields = ["run", "setting", "seed", "status", "detail", "last_round"]
    out = []
    for i, r in enumerate(runs):
        row = dict(run=os.path.relpath(r.path, root) if root else r.path, setting=labels.get(i, ""), seed=r.seed,
                   status=r.status, detail=r.detail, last_round=r.last_round)
        for m in metrics:
            row[f"final_{m.key}"] = G.final(r, m.key)
            row[f"best_{m.key}"] = G.best(r, m)
            if targets.get(m.key) is not None:
                row[f"rounds_to_{m.key}"] = G.rounds_to(r, m, targets[m.key])
        row.update({k: r.totals.get(k) for k in ("bytes", "comm_s", "wall_s", "tokens", "epsilon", *DP_FIELDS)})
        out.append(row)
        fields += [k for k in row if k not in fields]
    _write_csv(path, fields, out)


def _write_csv(path: str, fields: list[str], out: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for row in out:
            w.writerow([_num(row.get(k)) for k in fields])
