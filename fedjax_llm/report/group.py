"""Runs -> settings: runs are grouped by the config keys that differ between them (seeds pooled), and
each group's metrics are summarised over its seeds (mean and sample standard deviation)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from fedjax_llm.report.load import Run, finite, wire_bytes

# Keys that never make two runs different settings: the seed (pooled), paths and bookkeeping.
IGNORED = {"seed", "resume", "run.progress", "run.tensorboard", "run.devices", "data.tokenizer_cache",
           "secure.keys_dir", "secure.trust_file"}
IGNORED_PREFIXES = ("checkpoint.", "hydra.")


TARGET_SHARE = 0.1  # default rounds-to-target level: within 10 % of the best setting's mean final value


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    label: str                       # axis and column wording
    higher_better: bool
    fmt: str = ".3f"


METRICS = {m.key: m for m in [
    Metric("eval_acc", "accuracy", True, ".3f"),
    Metric("eval_f1", "macro-F1", True, ".3f"),
    Metric("eval_ppl", "perplexity", False, ".1f"),
    Metric("eval_loss", "eval loss", False, ".3f"),
    Metric("train_loss", "train loss", False, ".3f"),
]}


@dataclasses.dataclass
class Group:
    label: str
    runs: list                       # the runs pooled into the figures (usable ones, by default)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


def _ignored(key: str) -> bool:
    return key in IGNORED or key.startswith(IGNORED_PREFIXES)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ between runs (ignored keys left out), in config order."""
    keys: dict[str, None] = {}
    for r in runs:
        keys.update(dict.fromkeys(r.config))
    return [k for k in keys if not _ignored(k) and len({repr(r.config.get(k)) for r in runs}) > 1]


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def labels(runs: Sequence[Run], by: Optional[Sequence[str]] = None) -> tuple[dict[int, tuple], dict[tuple, str]]:
    """Each run's setting key (by index) and each setting's label: the Hydra overrides that differ
    between runs when they tell the settings apart one to one, else the differing config keys."""
    keyed = [r for r in runs if r.config]
    keys = list(by) if by else varying_keys(keyed)
    setting = {i: tuple(repr(r.config.get(k)) for k in keys) for i, r in enumerate(runs) if r.config}
    config_label = {}
    for i, key in setting.items():
        cfg = runs[i].config
        parts = [f"{k}={_short(cfg.get(k))}" for k in keys]
        config_label[key] = " ".join(parts[:4]) + (f" (+{len(parts) - 4} keys)" if len(parts) > 4 else "")
    if not by and keyed and all(r.overrides for r in keyed):
        ov = override_labels(runs, setting)
        by_key: dict[tuple, set] = {}
        for i, key in setting.items():
            by_key.setdefault(key, set()).add(ov[i])
        names = [next(iter(v)) for v in by_key.values()]
        if all(len(v) == 1 for v in by_key.values()) and len(set(names)) == len(names) and all(names):
            return setting, {k: next(iter(v)) for k, v in by_key.items()}
    if not keys:
        names = sorted({str(r.config.get("name", "")) for r in keyed})
        return setting, {k: " ".join(names) or "all runs" for k in config_label}
    return setting, config_label


def override_labels(runs: Sequence[Run], setting: dict[int, tuple]) -> dict[int, str]:
    """Each run's Hydra overrides that make a difference: a config key whose value differs between
    runs (shown as overridden, or as its config value where a run did not override it), or a config
    group choice (model=bow) that differs; the seed and bookkeeping keys left out."""
    parsed = {i: {_override_key(o): o.split("=", 1)[1].replace("\\", "") if "=" in o else ""
                  for o in runs[i].overrides} for i in setting}
    keys: dict[str, None] = {}
    for ov in parsed.values():
        keys.update(dict.fromkeys(k for k in ov if not _ignored(k)))
    shown = []
    for k in keys:
        in_config = all(k in runs[i].config for i in setting)
        values = {repr(runs[i].config.get(k)) if in_config else parsed[i].get(k) for i in setting}
        if len(values) > 1:
            shown.append((k, in_config))
    return {i: " ".join(f"{k}={parsed[i][k] if k in parsed[i] else _short(runs[i].config.get(k))}"
                        for k, _ in shown) for i in setting}


def group_runs(runs: Sequence[Run], include: Callable[[Run], bool] = lambda r: r.usable,
               by: Optional[Sequence[str]] = None) -> tuple[list[Group], dict[int, str]]:
    """Settings in order of first appearance with their included runs, and every run's setting label."""
    setting, label = labels(runs, by)
    groups: dict[tuple, Group] = {}
    for i, r in enumerate(runs):
        if i in setting and include(r):
            groups.setdefault(setting[i], Group(label[setting[i]], [])).runs.append(r)
    return list(groups.values()), {i: label[k] for i, k in setting.items()}


# ---------------------------------------------------------------------------------------- per run


def get(record: dict, key: str) -> Optional[float]:
    """A number of a metrics.jsonl record: 'eval_acc', or 'clouds/<cloud>/eval_acc'."""
    value: Any = record
    for part in key.split("/"):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if finite(value) else None


def series(run: Run, key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the records where key has a finite value."""
    pairs = [(r["round"], v) for r in run.records if (v := get(r, key)) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def cumulative(run: Run, what: str) -> dict[int, float]:
    """round -> 'bytes' on the wire or simulated 'comm_s' summed over rounds 1..round (round 0: 0)."""
    total, out = 0.0, {}
    for r in run.records:
        if r["round"] >= 1:
            total += wire_bytes(r) if what == "bytes" else (get(r, what) or 0.0)
        out[r["round"]] = total
    return out


def final(run: Run, key: str) -> Optional[float]:
    _, values = series(run, key)
    return values[-1] if values else None


def best(run: Run, metric: Metric) -> Optional[float]:
    _, values = series(run, metric.key)
    return (max(values) if metric.higher_better else min(values)) if values else None


def rounds_to(run: Run, metric: Metric, target: float) -> Optional[int]:
    """The first evaluated round whose value reaches target (None if none does)."""
    for rnd, v in zip(*series(run, metric.key)):
        if (v >= target) if metric.higher_better else (v <= target):
            return rnd
    return None


# -------------------------------------------------------------------------------------- per group


def mean_std(values: Sequence[Optional[float]]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof 1; NaN for one value) of the finite values, and their count."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def curve(group: Group, key: str, x: str = "round") -> dict[str, np.ndarray]:
    """Per evaluated round: x ('round', cumulative 'bytes' or 'comm_s', or 'epsilon'), the mean and std
    over the seeds that have that round, and their count n."""
    by_round: dict[int, list] = {}
    xs: dict[int, list] = {}
    for run in group.runs:
        cum = cumulative(run, x) if x in ("bytes", "comm_s") else None
        eps = dict(zip(*series(run, "epsilon"))) if x == "epsilon" else None
        for rnd, v in zip(*series(run, key)):
            if x == "epsilon" and rnd not in eps and rnd != 0:
                continue
            by_round.setdefault(rnd, []).append(v)
            xs.setdefault(rnd, []).append(rnd if x == "round" else cum.get(rnd, 0.0) if cum is not None
                                          else eps.get(rnd, 0.0))
    rounds = sorted(by_round)
    stats = [mean_std(by_round[r]) for r in rounds]
    return dict(round=np.asarray(rounds), x=np.asarray([np.mean(xs[r]) for r in rounds]),
                mean=np.asarray([s[0] for s in stats]), std=np.asarray([s[1] for s in stats]),
                n=np.asarray([s[2] for s in stats]))


def present_metrics(groups: Sequence[Group]) -> list[Metric]:
    """The known metrics that some pooled run logged, in METRICS order."""
    return [m for m in METRICS.values() if any(series(r, m.key)[0] for g in groups for r in g.runs)]


def clouds(groups: Sequence[Group]) -> list[str]:
    """Cloud names in config order (clouds.members), then any others the records name."""
    names: dict[str, None] = {}
    for g in groups:
        for r in g.runs:
            names.update(dict.fromkeys(k.split(".")[2] for k in r.config if k.startswith("clouds.members.")
                                       and k.count(".") >= 3))
    for g in groups:
        for r in g.runs:
            for rec in r.records:
                names.update(dict.fromkeys(rec.get("clouds") or {}))
    return list(names)


def default_target(groups: Sequence[Group], metric: Metric) -> Optional[float]:
    """Within TARGET_SHARE of the best setting's mean final value (0.9x for accuracy, 1.1x for
    perplexity): how fast each setting gets close to the best result of the comparison."""
    means = [mean_std([final(r, metric.key) for r in g.runs])[0] for g in groups]
    means = [m for m in means if math.isfinite(m)]
    if not means:
        return None
    return max(means) * (1 - TARGET_SHARE) if metric.higher_better else min(means) * (1 + TARGET_SHARE)


def uses_dp(groups: Sequence[Group]) -> bool:
    return any(series(r, "epsilon")[0] for g in groups for r in g.runs)
