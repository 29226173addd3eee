"""The secure layer in a round: sealed channel set-up, client-level DP-FedAvg, secure aggregation.

- `make_channel`: identities (generated into the run directory on first start, reloaded on resume)
  and the sealing channel that every cross-cloud hop goes through.
- DP-FedAvg as algorithm pieces: each client clips its update to C (`dp_clip_piece`); the aggregator
  sums, adds N(0, (z C)^2), divides by the expected number of clients and adapts C (`dp_aggregator`).
  With secure aggregation on, each cloud adds a share of the noise from its own key before its
  update leaves it (`noise_share_std`), so the aggregator never sees an un-noised sum.
- Secure sums: a party's vector is [its weighted update sum, its weight, ...] scaled by a public
  constant (`sum_vector`); the receiver unmasks only the total over the parties that arrived. Parties
  are a cloud's clients (`secure_mean_of_clients`, every party in the cloud's process) or the clouds
  (secure/protocol.py: each cloud runs its own half).
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
from fedjax_llm.secure import protocol, secagg
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


def noise_share_std(cfg: DPConfig, expected_clients: float, clip: float, min_parties: int) -> float:
    """Std of one cloud's share of the noise: any `min_parties` shares together carry the full std."""
    return dp_noise_std(cfg, expected_clients, clip) / math.sqrt(max(min_parties, 1))


# ----- secure sums: vectors in, sums out ----------------------------------------------------------------
def sum_vector(delta: Params, weight: float, scale: float, clip_range: float, noise: Optional[Params] = None,
               extra: Optional[Params] = None) -> tuple[np.ndarray, int]:
    """A party's plaintext vector [weight x delta (+ noise), weight, extra] / scale (float64; `scale`
    is a public constant that keeps values within the clipping range), and how many values lie outside."""
    summed = jax.tree.map(lambda d: np.asarray(d, np.float64) * float(weight), delta)
    if noise is not None:
        summed = jax.tree.map(lambda s, z: s + np.asarray(z, np.float64), summed, noise)
    flat = [np.ravel(x) for x in jax.tree.leaves(summed)]  # ravel_pytree's order, kept in float64
    more = [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(extra)] if extra is not None else []
    v = np.concatenate(flat + [np.array([float(weight)])] + more) / scale
    return v, int(np.sum(np.abs(v) > clip_range))


def split_sum(total: np.ndarray, scale: float, delta_like: Params, extra_like: Params = ()) -> tuple:
    """Inverse of summing `sum_vector`s: (summed update f32, total weight, summed extra f32)."""
    total = np.asarray(total) * scale
    f32 = lambda t: jax.tree.map(lambda d: np.zeros(np.shape(d), np.float32), t)  # noqa: E731
    _, unravel = ravel_pytree(f32(delta_like))
    D = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(delta_like))
    _, unravel_extra = ravel_pytree(f32(extra_like))
    return (unravel(np.asarray(total[:D], np.float32)), float(total[D]),
            unravel_extra(np.asarray(total[D + 1:], np.float32)))


def secure_mean_of_clients(cfg: SecAggConfig, deltas: Params, weights: np.ndarray, parties: Sequence[str],
                           scale: float, session: str) -> tuple[Params, float]:
    """Secure aggregation inside a cloud: its sampled clients (`parties`; weight 0 = dropped after
    sampling) mask their weighted updates and the cloud unmasks only the sum of those that arrived.
    Returns (their weighted mean, total weight); SecAggError when more than n - t dropped."""
    params = protocol.params_for(cfg, len(parties))
    session_ = secagg.setup(parties, params, session_id=session)
    like = jax.tree.map(lambda a: a[0], deltas)
    masked = {}
    for i, name in enumerate(parties):
        if weights[i] > 0:
            vector, _ = sum_vector(jax.tree.map(lambda a: a[i], deltas), float(weights[i]), scale, cfg.clip_range)
            masked[name] = secagg.mask(session_, name, vector)
    total, weight, _ = split_sum(secagg.unmask(session_, masked), scale, like)
    return jax.tree.map(lambda t: np.asarray(t, np.float32) / weight, total), weight
