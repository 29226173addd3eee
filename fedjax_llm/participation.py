"""Who takes part in a round and how: sampling, dropout, stragglers, Byzantine clients.

Host-side and cheap. Each cloud samples its own clients with its own key (kept in its checkpointed
state), so a resumed run samples exactly the same clients and no other party can predict the draws.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from fedjax_llm.config import AttackConfig, ParticipationConfig, TrainConfig

# Distinct streams derived from a cloud's round key.
_SAMPLE, _DROPOUT, _STRAGGLE, _STEPS = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Cohort:
    """A round's participants, ordered cloud by cloud."""

    ids: np.ndarray       # [K] client ids
    dropped: np.ndarray   # [K] bool: trains, but its update never arrives
    steps: np.ndarray     # [K] int: local steps this client makes (fewer for stragglers)


def _poisson_cap(n: int, q: float) -> int:
    """Cohort slots for Poisson sampling: n*q plus 6 standard deviations (overflow odds < 1e-9)."""
    return min(n, int(math.ceil(n * q + 6.0 * math.sqrt(n * q * (1.0 - q)) + 1)))


def per_cloud_capacity(cfg: TrainConfig, cloud_sizes: list[int]) -> list[int]:
    """Static number of cohort slots per cloud, so every round has the same shapes."""
    p = cfg.participation
    out = []
    for name, n in zip(cfg.clouds.members, cloud_sizes):
        if p.sampling == "fixed":
            out.append(cfg.clouds.members[name].clients_per_round or n)
        elif p.sampling == "fraction":
            out.append(max(1, round(p.fraction * n)))
        else:
            out.append(_poisson_cap(n, p.fraction))
    return out


def sample_cloud(p: ParticipationConfig, size: int, capacity: int, local_steps: int, key: jax.Array,
                 rnd: int, cloud: str) -> Cohort:
    """One cloud's clients for a round (ids local to the cloud, 0..size-1), then dropouts and
    stragglers among them; every draw comes from `key`, which only the cloud holds."""
    k_sample = jax.random.fold_in(key, _SAMPLE)
    members = np.arange(size)
    if p.sampling == "poisson":
        ids = members[np.asarray(jax.random.bernoulli(k_sample, p.fraction, (size,)))]
        if len(ids) > capacity:
            raise RuntimeError(f"round {rnd}, cloud {cloud!r}: Poisson sampling drew {len(ids)} clients, "
                               f"above its {capacity} slots (odds below 1e-9); rerun with another seed")
    elif capacity < size:
        ids = np.sort(members[np.asarray(jax.random.choice(k_sample, size, (capacity,), replace=False))])
    else:
        ids = members
    K = len(ids)
    dropped = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, _DROPOUT), p.dropout, (K,)))
    slow = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, _STRAGGLE), p.straggler_fraction, (K,)))
    fewer = np.asarray(jax.random.randint(jax.random.fold_in(key, _STEPS), (K,), p.straggler_min_steps,
                                          local_steps + 1))
    steps = np.where(slow, fewer, local_steps).astype(np.int64)
    return Cohort(ids=ids.astype(np.int64), dropped=dropped.astype(bool), steps=steps)


def sample_cohort(cfg: TrainConfig, client_cloud: np.ndarray, key: jax.Array, rnd: int) -> Cohort:
    """The whole federation's cohort (global ids), cloud c drawing with fold_in(key, c): the
    distribution each round has when every cloud samples its own clients with its own key."""
    sizes = [int(np.sum(client_cloud == c)) for c in range(len(cfg.clouds.members))]
    caps = per_cloud_capacity(cfg, sizes)
    parts = []
    for c, (name, n, cap) in enumerate(zip(cfg.clouds.members, sizes, caps)):
        one = sample_cloud(cfg.participation, n, cap, cfg.client.local_steps, jax.random.fold_in(key, c), rnd, name)
        parts.append(Cohort(ids=np.flatnonzero(client_cloud == c)[one.ids], dropped=one.dropped, steps=one.steps))
    return Cohort(ids=np.concatenate([q.ids for q in parts]).astype(np.int64),
                  dropped=np.concatenate([q.dropped for q in parts]),
                  steps=np.concatenate([q.steps for q in parts]))


def expected_clients(cfg: TrainConfig, client_cloud: np.ndarray) -> float:
    """Expected number of clients per round (DP-FedAvg divides its noised sum by this)."""
    sizes = [int(np.sum(client_cloud == c)) for c in range(len(cfg.clouds.members))]
    if cfg.participation.sampling == "poisson":
        return float(sum(sizes) * cfg.participation.fraction)
    return float(sum(per_cloud_capacity(cfg, sizes)))


def sampling_rate(cfg: TrainConfig, client_cloud: np.ndarray) -> float:
    """Per-client inclusion probability q per round, for privacy accounting (the largest of the
    clouds' rates under per-cloud fixed-size sampling: a bound for every client)."""
    if cfg.participation.sampling == "poisson":
        return float(cfg.participation.fraction)
    sizes = [int(np.sum(client_cloud == c)) for c in range(len(cfg.clouds.members))]
    return max(m / n for m, n in zip(per_cloud_capacity(cfg, sizes), sizes))


def cohort_capacity(cfg: TrainConfig, client_cloud: np.ndarray) -> int:
    sizes = [int(np.sum(client_cloud == c)) for c in range(len(cfg.clouds.members))]
    return sum(per_cloud_capacity(cfg, sizes))


def byzantine_clients(attack: AttackConfig, client_cloud: np.ndarray, cloud_names: list[str],
                      key: jax.Array) -> np.ndarray:
    """[P] bool: the clients that misbehave for the whole run (a fixed share of each cloud, or one cloud)."""
    flags = np.zeros(len(client_cloud), bool)
    if attack.kind == "none":
        return flags
    if attack.cloud is not None:
        flags[client_cloud == cloud_names.index(attack.cloud)] = True
        return flags
    for c in range(len(cloud_names)):
        members = np.flatnonzero(client_cloud == c)
        m = int(round(attack.fraction * len(members)))
        if m:
            pick = np.asarray(jax.random.choice(jax.random.fold_in(key, c), len(members), (m,), replace=False))
            flags[members[pick]] = True
    return flags


def flip_labels(tokens: np.ndarray, vocab_size: int, first_regular: int = 4) -> np.ndarray:
    """Label-flipping for language data: regular token t becomes first + (V - 1 - t), specials kept."""
    flipped = first_regular + (vocab_size - 1 - tokens)
    return np.where(tokens >= first_regular, flipped, tokens).astype(tokens.dtype)
