"""PNG figures of grouped runs: a metric against rounds, cumulative bytes and simulated communication
time (mean line, band = ± one sample std over seeds), per-cloud curves, and epsilon against a metric.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
backend switch), so a report can be made on a headless machine or inside another program.
"""
from __future__ import annotations

import math
import textwrap
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from fedjax_llm.report import group as G
from fedjax_llm.report.group import Group, Metric

X_LABELS = {
    "round": "round",
    "bytes": "cumulative MB on the wire (up + down, all clouds)",
    "comm_s": "cumulative simulated communication time (s)",
}
X_SCALE = {"round": 1.0, "bytes": 1e6, "comm_s": 1.0}
DPI = 110


def _color(i: int):
    from matplotlib import colormaps

    return colormaps["tab10" if i < 10 else "tab20"](i % 20)


def _legend_name(g: Group, width: int = 90, lines: int = 2) -> str:
    """The setting's label wrapped to at most `lines` lines, with its number of seeds."""
    wrapped = textwrap.wrap(f"{g.label} (n={len(g.runs)})", width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def _legend_below(fig: Figure, ax, height: float) -> None:
    """The legend under the panels, in as many columns as the labels fit (7 pt: ~16 characters an
    inch); the figure grows by its height so the panels keep theirs."""
    handles, names = ax.get_legend_handles_labels()
    if not handles:
        return
    longest = max(len(line) for n in names for line in n.split("\n"))
    ncol = max(1, min(len(handles), 4, int(fig.get_figwidth() * 16 // (longest + 6))))
    lines = sum(max(n.count("\n") + 1 for n in names[i:i + ncol]) for i in range(0, len(names), ncol))
    fig.set_figheight(height + 0.18 * lines + 0.2)
    fig.legend(handles, names, loc="outside lower center", ncol=ncol, fontsize=7, frameon=False)


def _band(ax, x, c: dict, color, label: Optional[str], marker: str = "o", linestyle: str = "-") -> None:
    ax.plot(x, c["mean"], color=color, label=label, marker=marker, markersize=3, linewidth=1.5, linestyle=linestyle)
    std = np.nan_to_num(c["std"], nan=0.0)
    if np.any(std > 0):
        ax.fill_between(x, c["mean"] - std, c["mean"] + std, color=color, alpha=0.18, linewidth=0)


def _y_axis(ax, m: Metric) -> None:
    ax.set_ylabel(f"{m.label} ({'higher' if m.higher_better else 'lower'} is better)")
    if m.key == "eval_ppl":  # log scale, plain numbers on the ticks
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3)


def metric_figure(path: str, groups: Sequence[Group], m: Metric, xs: Sequence[str] = ("round", "bytes", "comm_s"),
                  title: Optional[str] = None) -> str:
    """m against each of xs, one panel each, one line per setting; writes a PNG to path."""
    width = max(7.0, 4.6 * len(xs) + 1.0)
    fig = Figure(figsize=(width, 4.0), layout="constrained")
    axes = fig.subplots(1, len(xs), sharey=True, squeeze=False)[0]
    for ax, x in zip(axes, xs):
        for i, g in enumerate(groups):
            c = G.curve(g, m.key, x)
            if len(c["x"]):
                _band(ax, c["x"] / X_SCALE[x], c, _color(i), _legend_name(g, 110 if len(xs) > 1 else 90)
                      if ax is axes[-1] else None)
        ax.set_xlabel(X_LABELS[x])
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _y_axis(ax, m)
        if ax is not axes[0]:
            ax.set_ylabel("")
    _legend_below(fig, axes[-1], 4.0)
    fig.suptitle("\n".join(textwrap.wrap(title or f"{m.label}: mean ± std over seeds", int(width * 12))), fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path


def cloud_figure(path: str, groups: Sequence[Group], m: Metric, cloud_names: Sequence[str]) -> Optional[str]:
    """m of each cloud's held-out data against rounds, one panel per setting; None when no cloud has m."""
    keys = {c: f"clouds/{c}/{m.key}" for c in cloud_names}
    shown = [g for g in groups if any(G.series(r, k)[0] for r in g.runs for k in keys.values())]
    if not shown:
        return None
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.4 * cols + 1.6, 3.4 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
    for ax, g in zip(axes, shown):
        for j, cloud in enumerate(cloud_names):
            c = G.curve(g, keys[cloud], "round")
            if len(c["x"]):
                _band(ax, c["x"], c, _color(j), cloud)
        ax.set_title("\n".join(textwrap.wrap(f"{g.label} (n={len(g.runs)})", 50)), fontsize=8)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _y_axis(ax, m)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, title="cloud", title_fontsize=7)
    fig.suptitle(f"{m.label} per cloud (each cloud's held-out examples): mean ± std over seeds", fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path


def epsilon_figure(path: str, groups: Sequence[Group], m: Metric) -> Optional[str]:
    """m against the epsilon spent so far, for settings with DP; settings without DP as dashed levels."""
    dp = [g for g in groups if any(G.series(r, "epsilon")[0] for r in g.runs)]
    if not dp:
        return None
    fig = Figure(figsize=(8.6, 4.4), layout="constrained")
    ax = fig.subplots()
    deltas = set()
    for i, g in enumerate(groups):
        color = _color(i)
        if g in dp:
            c = G.curve(g, m.key, "epsilon")
            _band(ax, c["x"], c, color, _legend_name(g))
            eps = [r.totals.get("epsilon") for r in g.runs]
            fin = [G.final(r, m.key) for r in g.runs]
            (ex, exs, _), (fy, fys, _) = G.mean_std(eps), G.mean_std(fin)
            ax.errorbar([ex], [fy], xerr=[np.nan_to_num(exs)], yerr=[np.nan_to_num(fys)], color=color,
                        marker="s", markersize=6, capsize=3)
            deltas.update(r.totals.get("delta") for r in g.runs)
        else:
            level = G.mean_std([G.final(r, m.key) for r in g.runs])[0]
            if math.isfinite(level):
                ax.axhline(level, color=color, linestyle="--", linewidth=1,
                           label=_legend_name(Group(f"{g.label}: no DP (epsilon = ∞), final", g.runs)))
    delta = ", ".join(f"{d:g}" for d in sorted(d for d in deltas if d is not None))
    ax.set_xlabel(f"epsilon spent so far (delta = {delta})")
    _y_axis(ax, m)
    _legend_below(fig, ax, 4.4)
    fig.suptitle(f"{m.label} against privacy spent, per evaluated round (mean ± std over seeds; square: "
                 "final round, bars: ± std)", fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path


def matrix_figure(path: str, groups: Sequence[Group], key: str, phase_names: Sequence[str], title: str,
                  value_label: str = "held-out accuracy") -> Optional[str]:
    """Continual learning's accuracy matrix, one heatmap per setting: cell (i, j) is the mean over
    seeds (± std) of each run's `totals[key][i][j]`, the score on phase j's held-out set after phase i."""
    shown = [g for g in groups if any(r.totals.get(key) for r in g.runs)]
    if not shown:
        return None
    T = len(phase_names)
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(1.1 * T * cols + 1.8, 1.0 * T * rows + 1.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for ax, g in zip(axes, shown):
        stack = np.array([r.totals[key] for r in g.runs if r.totals.get(key)], float)
        mean, std = stack.mean(axis=0), stack.std(axis=0, ddof=1) if len(stack) > 1 else np.zeros(stack.shape[1:])
        image = ax.imshow(mean, vmin=0.0, vmax=1.0, cmap="viridis")
        for i in range(mean.shape[0]):
            for j in range(mean.shape[1]):
                text = f"{mean[i, j]:.2f}" + (f"\n±{std[i, j]:.2f}" if len(stack) > 1 else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if mean[i, j] < 0.55 else "black")
        ax.set_xticks(range(T), [f"{n}\nset" for n in phase_names], fontsize=7)
        ax.set_yticks(range(mean.shape[0]), [f"after {n}" for n in phase_names[:mean.shape[0]]], fontsize=7)
        ax.set_xlabel("held-out set of phase", fontsize=8)
        ax.set_title("\n".join(textwrap.wrap(f"{g.label} (n={len(stack)})", 40)), fontsize=8)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[:len(shown)]), shrink=0.8, label=value_label)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path


def final_vs_setting_figure(path: str, lines: Sequence[tuple[str, Sequence[Group]]], xs: Sequence[float],
                            tick_labels: Sequence[str], m: Metric, xlabel: str, title: str,
                            levels: Sequence[tuple[str, float]] = (), log_x: bool = True,
                            last_apart: bool = False) -> str:
    """Final m of each setting against a numeric setting (one line per (label, groups aligned with xs):
    mean over seeds, band and bars = ± one sample std); `levels` are dotted reference lines;
    `last_apart` dashes the segment to the last x (a stand-in position, such as infinity's)."""
    fig = Figure(figsize=(7.6, 4.4), layout="constrained")
    ax = fig.subplots()
    x = np.asarray(xs, float)
    for i, (label, groups) in enumerate(lines):
        finals = [G.mean_std([G.final(r, m.key) for r in g.runs]) for g in groups]
        c = dict(mean=np.asarray([f[0] for f in finals]), std=np.asarray([f[1] for f in finals]))
        n = "/".join(map(str, sorted({len(g.runs) for g in groups})))
        name = f"{label} (n={n} seed{'' if n == '1' else 's'})"
        if last_apart and len(x) > 1:
            _band(ax, x[:-1], dict(mean=c["mean"][:-1], std=c["std"][:-1]), _color(i), name)
            _band(ax, x[-2:], dict(mean=c["mean"][-2:], std=c["std"][-2:]), _color(i), None, linestyle="--")
        else:
            _band(ax, x, c, _color(i), name)
        ax.errorbar(x, c["mean"], yerr=np.nan_to_num(c["std"]), color=_color(i), linestyle="none", capsize=3)
    for j, (label, level) in enumerate(levels):
        ax.axhline(level, color="0.45", linestyle=(0, (1, 2 + j)), linewidth=1, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xticks(list(xs), list(tick_labels))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    _y_axis(ax, m)
    _legend_below(fig, ax, 4.4)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path
