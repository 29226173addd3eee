"""The data schedule of a continuous-adaptation run (`drift.*`): rounds in phases, and in each phase
what each cloud's clients hold. Three kinds of drift are expressed by one rule per phase and cloud:
new labels arrive (a phase lists labels an earlier one did not), a cloud joins late (it is not listed
in the early phases: its clients hold nothing), and label shift (`keep`: a label keeps only a fraction
of its examples).

Everything is a pure function of (DriftConfig, FederatedData, seed): the phase of a round, which
examples each phase shows, each phase's training view of the data. The phase is therefore a function
of the round the checkpoint holds; checkpoints also record it (loop.py) and a resume checks it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from fedjax_llm.config import DriftConfig
from fedjax_llm.data.federated import FederatedData

_SALT_KEEP = 1003  # np.random.SeedSequence([seed, salt]): one uniform draw per example for `keep`


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Phase boundaries: phase t covers rounds starts[t]..ends[t] (1-based, inclusive)."""

    names: tuple[str, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    @property
    def num_phases(self) -> int:
        return len(self.names)

    def phase_at(self, rnd: int) -> int:
        """The phase whose data round `rnd` trains on (round 0, the initial evaluation: phase 0; past
        the last phase's end: the last phase, so an extended run keeps its final data)."""
        return int(np.searchsorted(np.asarray(self.ends), max(int(rnd), 1), side="left").clip(0, self.num_phases - 1))


def make_schedule(cfg: DriftConfig) -> Schedule:
    rounds = [p.rounds for p in cfg.phases]
    ends = np.cumsum(rounds).astype(int)
    return Schedule(names=tuple(p.name or f"phase{i}" for i, p in enumerate(cfg.phases)),
                    starts=tuple(int(e - r + 1) for e, r in zip(ends, rounds)), ends=tuple(int(e) for e in ends))


def example_labels(data: FederatedData, label_field: str) -> np.ndarray:
    """[N] the value of `label_field` of every example (object array)."""
    out = []
    for i, ex in enumerate(data.examples):
        if label_field not in ex.meta:
            raise ValueError(f"drift.label_field={label_field!r}: example {i} has no such field "
                             f"(its fields: {sorted(ex.meta)})")
        out.append(ex.meta[label_field])
    return np.array(out, dtype=object)


def example_clouds(data: FederatedData) -> np.ndarray:
    """[N] the cloud index of the client holding each example (train or held out), -1 for none."""
    out = np.full(len(data.tokens), -1, np.int64)
    for c, (train, held) in enumerate(zip(data.train_idx, data.eval_idx)):
        out[train] = data.client_cloud[c]
        out[held] = data.client_cloud[c]
    return out


def visibility(cfg: DriftConfig, data: FederatedData, seed: int) -> np.ndarray:
    """[T, N] bool: example n is in phase t's data (its cloud listed, its label listed, kept by `keep`).
    A phase's label or cloud that matches nothing is an error naming the key."""
    labels, clouds = example_labels(data, cfg.label_field), example_clouds(data)
    present = set(labels.tolist())
    u = np.random.default_rng(np.random.SeedSequence([int(seed), _SALT_KEEP])).random(len(labels))
    out = np.zeros((len(cfg.phases), len(labels)), bool)
    for t, phase in enumerate(cfg.phases):
        for name, pc in phase.clouds.items():
            key = f"drift.phases.{t}.clouds.{name}"
            if name not in data.cloud_names:
                raise ValueError(f"{key}: {name!r} is not a cloud; the clouds are {data.cloud_names}")
            missing = sorted(set(pc.labels) - present)
            if missing:
                raise ValueError(f"{key}.labels: {missing} match no example's {cfg.label_field!r} "
                                 f"(drift.label_field); present: {sorted(present)}")
            mine = clouds == data.cloud_names.index(name)
            if pc.labels:
                mine &= np.isin(labels, np.array(pc.labels, dtype=object))
            keep = np.array([pc.keep.get(v, 1.0) for v in labels.tolist()])
            out[t] |= mine & (u < keep)
    return out


def phase_view(data: FederatedData, visible_N: np.ndarray) -> FederatedData:
    """The data as clients hold it in one phase: each client's training examples restricted to the
    visible ones (held-out sets unchanged; per-phase held-out sets are scored by phases.py)."""
    return dataclasses.replace(data, train_idx=[t[visible_N[t]] for t in data.train_idx])


def check_phases(visible: np.ndarray, data: FederatedData, names: Sequence[str]) -> Optional[str]:
    """None, or why a phase cannot run (no client trains on anything, or nothing held out to score)."""
    train = np.zeros(len(data.tokens), bool)
    train[np.concatenate(data.train_idx)] = True
    held = np.zeros_like(train)
    held[np.concatenate(data.eval_idx)] = True
    for t, name in enumerate(names):
        if not (visible[t] & train).any():
            return f"drift.phases.{t} ({name}): no client holds a training example in this phase"
        if not (visible[t] & held).any():
            return f"drift.phases.{t} ({name}): no held-out example in this phase (raise data.eval_fraction)"
    return None
