"""The secure layer in a round: sealed channel set-up, client-level DP-FedAvg, secure aggregation.

- `make_channel`: identities (generated into the run directory on first start, reloaded on resume)
  and the sealing channel that every cross-cloud hop goes through.
- DP-FedAvg as algorithm pieces: each client clips its update to C (`dp_clip_piece`); the aggregator
  sums, adds N(0, (z C)^2), divides by the expected number of clients and adapts C (`dp_aggregator`).
  With secure aggregation on, the clouds add the noise in shares before masking, so the aggregator
  never sees an un-noised sum.
- `SecureSum`: each party masks [its weighted update sum, its weight] (scaled by a public constant)
  with pairwise masks; the receiver unmasks only the total over the parties that arrived. Parties are
  the clouds (the aggregator sums them) or a cloud's clients (the cloud sums them).
"""
from __future__ import annotations

import math
import os
import secrets
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_llm.aggregate.base import Aggregator
from fedjax_llm.client import ClientPiece
from fedjax_llm.clouds.channel import Channel, plaintext_channel
from fedjax_llm.config import DPConfig, SecAggConfig, SecureConfig
from fedjax_llm.secure import dp as dplib
from fedjax_llm.secure import secagg
from fedjax_llm.secure.channel import sealed_channel
from fedjax_llm.secure.keys import TRUST_FILE, generate_identities, load_identities, load_trust
from fedjax_llm.types import CloudAggregate, Params

AGGREGATOR = "aggregator"
DP = "dp"


def make_channel(cfg: SecureConfig, cloud_names: Sequence[str], run_dir: str, name: str) -> tuple[Channel, dict]:
    """The channel for a run: sealed with per-run identities, or plaintext when secure.seal=false."""
    if not cfg.seal:
        return plaintext_channel(), dict(sealed=False)
    keys_dir = cfg.keys_dir or os.path.join(run_dir, "keys")
    parties = list(cloud_names) + [AGGREGATOR]
    if os.path.exists(os.path.join(keys_dir, TRUST_FILE)):
        identities = load_identities(keys_dir, parties)  # resume: the same keys
    else:
        identities = generate_identities(parties, keys_dir)
    trust = load_trust(cfg.trust_file or os.path.join(keys_dir, TRUST_FILE))
    # A fresh run id per process start: a message of a killed attempt can never replay into this one.
    run_id = f"{name}-{secrets.token_hex(8)}"
    channel = sealed_channel(identities, trust, run_id, cfg.cipher, cfg.chunk_bytes, cfg.compression,
                             compress_recipients=None if cfg.compress_downlink else {AGGREGATOR})
    return channel, dict(sealed=True, run_id=run_id, keys_dir=keys_dir, cipher=cfg.cipher)


# ----- DP-FedAvg -------------------------------------------------------------------------------------
def dp_clip_piece() -> ClientPiece:
    """Client side of DP-FedAvg: clip the update to the broadcast bound C; report if it was within C."""

    def finish(delta, steps, lr, state, clip):
        del steps, lr
        norm = dplib.global_norm(delta)
        scale = jnp.where(norm > clip, clip / jnp.maximum(norm, 1e-30), 1.0)
        clipped = jax.tree.map(lambda x: (x * scale).astype(x.dtype), delta)
        return clipped, (norm <= clip).astype(jnp.float32), state

    return ClientPiece(name=DP, finish=finish)


def dp_aggregator(cfg: DPConfig, expected_clients: float, key: jax.Array, noise_at_clouds: bool) -> Aggregator:
    """Server side of DP-FedAvg over cloud messages (delta = mean of clipped updates, weight = count)."""
    sigma_b = cfg.count_stddev or expected_clients / 20.0
    z = dplib.update_noise_multiplier(cfg.noise_multiplier, sigma_b) if cfg.adaptive else cfg.noise_multiplier

    def init(params: Params) -> dplib.DPClipState:
        del params
        return dplib.DPClipState(jnp.float32(cfg.clip), jax.random.key_data(key), jnp.int32(0))

    def update(msgs: CloudAggregate, state: dplib.DPClipState, params=None):
        del params
        present = msgs.weight > 0
        total = jax.tree.map(lambda d: jnp.tensordot(jnp.where(present, msgs.weight, 0.0),
                                                     jnp.where(present.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0),
                                                     axes=1), msgs.delta)
        k, k_sum, k_count = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        if not noise_at_clouds:
            total = jax.tree.map(jnp.add, total, dplib.gaussian_like(k_sum, total, z * state.clip))
        update = jax.tree.map(lambda t: t / expected_clients, total)
        clip = state.clip
        if cfg.adaptive:
            within = jnp.sum(jnp.where(present, msgs.clients * msgs.aux[DP], 0.0))
            noisy = (within + sigma_b * jax.random.normal(k_count)) / expected_clients
            clip = clip * jnp.exp(-cfg.clip_lr * (noisy - cfg.target_quantile))
        return update, dplib.DPClipState(clip.astype(jnp.float32), jax.random.key_data(k), state.count + 1)

    def broadcast(state) -> dict:
        return {DP: state.clip}

    return Aggregator(init=init, update=update, broadcast=broadcast)


def dp_noise_std(cfg: DPConfig, expected_clients: float, clip: float) -> float:
    """Std of the Gaussian noise on the sum for the current clip (the update's share when adaptive)."""
    sigma_b = cfg.count_stddev or expected_clients / 20.0
    z = dplib.update_noise_multiplier(cfg.noise_multiplier, sigma_b) if cfg.adaptive else cfg.noise_multiplier
    return z * clip


# ----- secure aggregation across clouds ---------------------------------------------------------------
class SecureSum:
    """Per round: set up pairwise masks between the clouds, mask each cloud's vector, unmask the sum.

    A cloud's vector is [its summed update (weight x mean delta), its weight] divided by `scale`, a
    public constant (the population's total weight), so every value stays within clip_range.
    """

    def __init__(self, cfg: SecAggConfig, cloud_names: Sequence[str], scale: float):
        self.names = list(cloud_names)
        n = len(self.names)
        self.t = max(n // 2 + 1, math.ceil(cfg.threshold * n))
        self.params = secagg.SecAggParams(threshold=self.t, clip_range=cfg.clip_range,
                                          frac_bits=cfg.frac_bits, ring_bits=cfg.ring_bits)
        self.params.check(n)
        self.scale = float(scale)
        self.session = None

    def start(self, session_id: str) -> None:
        self.session = secagg.setup(self.names, self.params, session_id=session_id)

    def vector(self, delta: Params, weight: float, noise: Optional[Params] = None) -> tuple[np.ndarray, int]:
        """A party's plaintext vector [weight x delta (+ noise), weight] / scale, and how many of its
        values lie outside the clipping range."""
        summed = jax.tree.map(lambda d: np.asarray(d, np.float64) * float(weight), delta)
        if noise is not None:
            summed = jax.tree.map(lambda s, z: s + np.asarray(z, np.float64), summed, noise)
        flat = [np.ravel(x) for x in jax.tree.leaves(summed)]  # ravel_pytree's order, kept in float64
        v = np.concatenate(flat + [np.array([float(weight)])]) / self.scale
        return v, int(np.sum(np.abs(v) > self.params.clip_range))

    def mask(self, cloud: str, vector: np.ndarray) -> np.ndarray:
        return secagg.mask(self.session, cloud, vector)

    def unmask(self, masked: dict[str, np.ndarray], like: Params) -> tuple[Params, float]:
        """(summed update over the parties that arrived, their total weight); raises SecAggError when
        too few arrived to reconstruct the dropped parties' masks. `like` shapes the update."""
        total = secagg.unmask(self.session, masked, survivors=list(masked)) * self.scale
        _, unravel = ravel_pytree(jax.tree.map(lambda d: np.asarray(d, np.float32), like))
        return unravel(np.asarray(total[:-1], np.float32)), float(total[-1])


def secure_sums_in_clouds(cfg: SecAggConfig, agg: CloudAggregate, deltas: Params, weights: np.ndarray,
                          cohort_ids: np.ndarray, client_names: Sequence[str], client_cloud: np.ndarray,
                          cloud_names: Sequence[str], client_weights: np.ndarray,
                          session_prefix: str) -> tuple[CloudAggregate, dict[int, Exception]]:
    """Secure aggregation inside each cloud: the cohort's clients of a cloud mask their weighted
    updates and the cloud unmasks only their sum, which replaces the in-memory reduction.

    `deltas`/`weights` are the per-client updates of the cohort (weight 0: dropped after sampling).
    Returns the aggregate with each cloud's mean replaced and {cloud index: SecAggError} for clouds
    where more than n - t of their sampled clients dropped (their sum cannot be recovered).
    """
    like = jax.tree.map(lambda a: a[0], deltas)
    cloud_of = np.asarray(client_cloud)[cohort_ids]
    means, failed = [], {}
    for c, name in enumerate(cloud_names):
        slots = np.flatnonzero(cloud_of == c)
        mean = jax.tree.map(lambda a: np.asarray(a[c]), agg.delta)
        arrived = [i for i in slots if weights[i] > 0]
        if len(slots) < 2 or not arrived:  # one party: its sum is its update; none: nothing to hide
            means.append(mean)
            continue
        parties = [client_names[cohort_ids[i]] for i in slots]
        scale = float(np.sum(np.asarray(client_weights)[np.asarray(client_cloud) == c]))
        ss = SecureSum(cfg, parties, scale=scale)
        ss.start(f"{session_prefix}/{name}")
        masked = {}
        for i in arrived:
            vector, _ = ss.vector(jax.tree.map(lambda a: a[i], deltas), float(weights[i]))
            masked[client_names[cohort_ids[i]]] = ss.mask(client_names[cohort_ids[i]], vector)
        try:
            total, weight = ss.unmask(masked, like)
        except secagg.SecAggError as e:
            failed[c] = e
            means.append(mean)
            continue
        means.append(jax.tree.map(lambda t: np.asarray(t, np.float32) / weight, total))
    stacked = jax.tree.map(lambda *a: np.stack(a), *means)
    weight = np.where(np.isin(np.arange(len(cloud_names)), list(failed)), 0, agg.weight).astype(np.float32)
    return agg.replace(delta=stacked, weight=weight), failed


def noise_at_clouds(agg: CloudAggregate, total_std: float, key: jax.Array, min_arrivals: int) -> CloudAggregate:
    """DP when only clients are securely aggregated: each cloud noises its weighted sum before it
    leaves, with std total_std / sqrt(min_arrivals), so any min_arrivals clouds carry the full noise."""
    std = total_std / math.sqrt(max(min_arrivals, 1))
    rows = []
    for c in range(int(np.shape(agg.weight)[0])):
        w = float(agg.weight[c])
        delta = jax.tree.map(lambda a: np.asarray(a[c]), agg.delta)
        if w > 0:
            noise = dplib.gaussian_like(jax.random.fold_in(key, c), delta, std)
            delta = jax.tree.map(lambda d, z: ((d * w + np.asarray(z)) / w).astype(d.dtype), delta, noise)
        rows.append(delta)
    return agg.replace(delta=jax.tree.map(lambda *a: np.stack(a), *rows))
