"""Who takes part in a round and how: sampling, dropout, stragglers, Byzantine clients.

Host-side and cheap; every draw comes from a jax.random key that the server state carries, so a
resumed run samples exactly the same clients.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from fedjax_llm.config import AttackConfig, ParticipationConfig, TrainConfig

# Distinct streams derived from one round key.
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


def sample_cohort(cfg: TrainConfig, client_cloud: np.ndarray, key: jax.Array, rnd: int) -> Cohort:
    """Draws this round's clients per cloud, then dropouts and stragglers among them."""
    p: ParticipationConfig = cfg.participation
    sizes = [int(np.sum(client_cloud == c)) for c in range(len(cfg.clouds.members))]
    caps = per_cloud_capacity(cfg, sizes)
    k_sample = jax.random.fold_in(key, _SAMPLE)
    ids = []
    for c, (n, cap) in enumerate(zip(sizes, caps)):
        members = np.flatnonzero(client_cloud == c)
        kc = jax.random.fold_in(k_sample, c)
        if p.sampling == "poisson":
            chosen = members[np.asarray(jax.random.bernoulli(kc, p.fraction, (n,)))]
            if len(chosen) > cap:
                raise RuntimeError(f"round {rnd}: Poisson sampling drew {len(chosen)} clients in cloud "
                                   f"{list(cfg.clouds.members)[c]!r}, above its {cap} slots "
                                   f"(odds below 1e-9); rerun with another seed")
        elif cap < n:
            chosen = np.sort(members[np.asarray(jax.random.choice(kc, n, (cap,), replace=False))])
        else:
            chosen = members
        ids.append(chosen)
    ids = np.concatenate(ids).astype(np.int64)
    K, S = len(ids), cfg.client.local_steps
    dropped = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, _DROPOUT), p.dropout, (K,)))
    slow = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, _STRAGGLE), p.straggler_fraction, (K,)))
    fewer = np.asarray(jax.random.randint(jax.random.fold_in(key, _STEPS), (K,), p.straggler_min_steps, S + 1))
    steps = np.where(slow, fewer, S).astype(np.int64)
    return Cohort(ids=ids, dropped=dropped.astype(bool), steps=steps)


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
