"""A run's drift as the federation uses it: which phase a round trains on, the data view of each phase,
and each evaluation's scores on every phase's held-out set (the rows of the accuracy matrix).

Phase t's held-out set is the held-out examples its schedule shows (the clients' eval examples whose
cloud and label phase t lists, thinned by `keep`); all of them are scored in the evaluator's one pass
over the union, so the per-phase figures cost no extra forward pass.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from fedjax_llm.config import DriftConfig
from fedjax_llm.data.federated import FederatedData
from fedjax_llm.drift.schedule import Schedule, check_phases, make_schedule, phase_view, visibility


class Drift:
    """What is fixed for a drifting run: the schedule, each phase's visible examples and data view."""

    def __init__(self, cfg: DriftConfig, data: FederatedData, seed: int, task: str):
        self.cfg, self.task = cfg, task
        self.schedule: Schedule = make_schedule(cfg)
        self.visible = visibility(cfg, data, seed)  # [T, N]
        problem = check_phases(self.visible, data, self.schedule.names)
        if problem:
            raise ValueError(problem)
        self.views = [phase_view(data, v) for v in self.visible]

    def phase_at(self, rnd: int) -> int:
        return self.schedule.phase_at(rnd)

    def view(self, phase: int) -> FederatedData:
        return self.views[phase]

    def masks(self, indices: np.ndarray) -> np.ndarray:
        """[T, M] bool: eval example m (data index indices[m]) is in phase t's held-out set."""
        return self.visible[:, np.asarray(indices, np.int64)]

    def evaluate(self, evaluator, scored, rnd: int) -> dict:
        """The record's per-phase figures from the evaluator's per-example `scored` output."""
        masks = self.masks(evaluator.indices) if evaluator.num_examples else np.zeros((self.schedule.num_phases, 0), bool)
        phase = self.phase_at(rnd)
        if self.task == "classify":
            _, pred = scored
            correct = np.asarray(pred) == np.asarray(evaluator.labels)
            acc = [float(correct[m].mean()) if m.any() else None for m in masks]
            return dict(phase=phase, eval_phase_acc=acc, eval_current_acc=acc[phase])
        loss, ntok = (np.asarray(x, np.float64) for x in scored)
        mean = [float(loss[m].sum() / ntok[m].sum()) if ntok[m].sum() > 0 else None for m in masks]
        ppl = [None if v is None else float(math.exp(min(v, 50.0))) for v in mean]
        return dict(phase=phase, eval_phase_loss=mean, eval_phase_ppl=ppl, eval_current_ppl=ppl[phase])


def make_drift(cfg: DriftConfig, data: FederatedData, seed: int, task: str) -> Optional[Drift]:
    return Drift(cfg, data, seed, task) if cfg.enabled else None
