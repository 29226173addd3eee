"""Continual-learning metrics of an accuracy matrix R (R[i, j]: the score on phase j's held-out set after
training through phase i; b[j]: the score of the initial model on it), higher is better.

    average accuracy  mean_j R[T-1, j]                                     (Lopez-Paz and Ranzato, 2017)
    backward transfer mean_{j<T-1} R[T-1, j] - R[j, j]                      (Lopez-Paz and Ranzato, 2017)
    forward transfer  mean_{j>0} R[j-1, j] - b[j]                          (Lopez-Paz and Ranzato, 2017)
    forgetting        mean_{j<T-1} max_{l<T-1} R[l, j] - R[T-1, j]          (Chaudhry et al., 2018)
    adaptation speed  per phase, rounds from its start until its held-out score reaches a target

For language modelling the matrix is the negative held-out loss (nats), so every sign reads the same.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from fedjax_llm.drift.schedule import Schedule


def average_accuracy(R: np.ndarray) -> float:
    return float(np.mean(np.asarray(R, float)[-1]))


def backward_transfer(R: np.ndarray) -> Optional[float]:
    R = np.asarray(R, float)
    T = len(R)
    return None if T < 2 else float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R: np.ndarray, b: np.ndarray) -> Optional[float]:
    R, b = np.asarray(R, float), np.asarray(b, float)
    T = len(R)
    return None if T < 2 else float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def forgetting(R: np.ndarray) -> Optional[float]:
    R = np.asarray(R, float)
    T = len(R)
    return None if T < 2 else float(np.mean([R[:T - 1, j].max() - R[T - 1, j] for j in range(T - 1)]))


def adaptation_rounds(rounds: Sequence[int], scores: np.ndarray, schedule: Schedule, target: float,
                      higher_is_better: bool = True) -> list[Optional[int]]:
    """Per phase t: rounds from its start until the first evaluation within it whose score on phase t's
    held-out set reaches `target` (1 = after its first round); None if it never does in the phase.
    `scores[k, t]` is the score on phase t at evaluation round `rounds[k]`."""
    out: list[Optional[int]] = []
    for t, (start, end) in enumerate(zip(schedule.starts, schedule.ends)):
        hit = None
        for rnd, row in zip(rounds, np.asarray(scores, float)):
            ok = row[t] >= target if higher_is_better else row[t] <= target
            if start <= rnd <= end and np.isfinite(row[t]) and ok:
                hit = int(rnd - start + 1)
                break
        out.append(hit)
    return out


def phase_scores(records: Sequence[dict], key: str) -> tuple[list[int], np.ndarray]:
    """(rounds, [K, T] scores) of the records that carry `key` (the evaluation rounds), None -> NaN."""
    rows = [r for r in records if r.get(key) is not None]
    return [int(r["round"]) for r in rows], np.array([[np.nan if v is None else v for v in r[key]] for r in rows], float)


def accuracy_matrix(records: Sequence[dict], schedule: Schedule, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(R [T, T] from the evaluation at each phase's last round, b [T] from round 0)."""
    rounds, scores = phase_scores(records, key)
    at = dict(zip(rounds, scores))
    missing = [e for e in (0, *schedule.ends) if e not in at]
    if missing:
        raise ValueError(f"{key}: no evaluation at rounds {missing} (phase ends are always evaluated)")
    return np.stack([at[e] for e in schedule.ends]), at[0]


def continual_summary(records: Sequence[dict], schedule: Schedule, target: float, task: str) -> dict:
    """summary.json's `continual` block: the matrix and every metric above."""
    classify = task == "classify"
    key = "eval_phase_acc" if classify else "eval_phase_loss"
    rounds, scores = phase_scores(records, key)
    done = [e for e in schedule.ends if e in rounds]
    T = len(done)  # phases completed (a run stopped early reports those)
    if T == 0 or 0 not in rounds:
        return dict(phases=list(schedule.names), completed_phases=0)
    sub = Schedule(schedule.names[:T], schedule.starts[:T], schedule.ends[:T])
    R, b = accuracy_matrix(records, sub, key)
    R, b = R[:, :T], b[:T]
    sign = 1.0 if classify else -1.0
    if classify:
        speed = adaptation_rounds(rounds, scores, sub, target)
    else:
        _, ppl = phase_scores(records, "eval_phase_ppl")
        speed = adaptation_rounds(rounds, ppl, sub, target, higher_is_better=False)
    return dict(phases=list(schedule.names), completed_phases=T, phase_ends=list(sub.ends),
                matrix_key=key, matrix=R.tolist(), initial=b.tolist(),
                **({"average_accuracy": average_accuracy(R)} if classify else {"average_loss": float(np.mean(R[-1]))}),
                forgetting=forgetting(sign * R), backward_transfer=backward_transfer(sign * R),
                forward_transfer=forward_transfer(sign * R, sign * b), target=target,
                adaptation_rounds=speed)
