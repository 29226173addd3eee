"""Client-level DP-FedAvg pieces: per-client L2 clipping, Gaussian noise on the sum, adaptive clipping.

McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018: each client's
update is clipped to global L2 norm C and N(0, (z C)^2) is added to the SUM of clipped updates; divide
by the expected (not the realized) number of clients for the mean. Adaptive clipping follows Andrew et
al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021: C moves geometrically
toward the target quantile of update norms, using a noised count of unclipped clients; the update
noise multiplier is raised so that the pair costs the same privacy as noise multiplier z alone.
All functions are pure JAX with explicit keys; the PRNG key lives in the state, so it checkpoints.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over every leaf of one client's update (float32)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _clip_one(update, clip):
    norm = global_norm(update)
    scale = jnp.where(norm > clip, clip / jnp.maximum(norm, 1e-30), 1.0)
    clipped = jax.tree.map(lambda x: jnp.where(norm > clip, (x * scale).astype(x.dtype), x), update)
    return clipped, norm


@jax.jit
def clip_by_l2(updates_K: Any, clip) -> tuple[Any, jax.Array]:
    """Clips each client's update (leading axis K) to global L2 norm `clip`; returns (clipped, norms_K).

    Updates already within the bound are returned bit for bit unchanged.
    """
    return jax.vmap(_clip_one, in_axes=(0, None))(updates_K, jnp.asarray(clip, jnp.float32))


def gaussian_like(key: jax.Array, tree: Any, std) -> Any:
    """Independent N(0, std^2) noise shaped like `tree` (one subkey per leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [(std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                                        for k, x in zip(keys, leaves)])


class DPClipState(NamedTuple):
    """Clip value C, raw PRNG key data (uint32[2]) split every update, and updates so far."""

    clip: jax.Array
    key: jax.Array
    count: jax.Array


class DPAggregation(NamedTuple):
    """init(key) -> state; update(updates_K, state, present_K=None) -> (noised_sum, state, info).

    `info` (per-client norms, exact unclipped fraction under fixed clipping) is a diagnostic for the
    trusted aggregator, not a private release.
    """

    init: Callable[[jax.Array], DPClipState]
    update: Callable[..., tuple[Any, DPClipState, dict]]


@dataclasses.dataclass(frozen=True)
class AdaptiveClip:
    """Andrew et al. 2021: target quantile gamma, geometric learning rate eta_C, count noise sigma_b."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: Optional[float] = None  # default expected_clients / 20, as the paper recommends


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the update's share of a total noise multiplier z."""
    if noise_multiplier <= 0:
        return 0.0
    rest = noise_multiplier ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"secure.dp: count_stddev {count_stddev} too small for noise_multiplier "
                         f"{noise_multiplier}: need 2 * count_stddev > noise_multiplier")
    return rest ** -0.5


def dp_sum(clip: float, noise_multiplier: float, *, adaptive: Optional[AdaptiveClip] = None,
           expected_clients: Optional[int] = None) -> DPAggregation:
    """Clipped sum of client updates plus Gaussian noise; fixed C, or adaptive C when `adaptive` is set.

    Privacy of each round is that of the sampled Gaussian mechanism with noise multiplier
    `noise_multiplier` (account it with `secure.accountant`), also in the adaptive case.
    """
    if clip <= 0 or noise_multiplier < 0:
        raise ValueError(f"secure.dp: clip must be > 0 and noise_multiplier >= 0, got {clip}, "
                         f"{noise_multiplier}")
    z_update, sigma_b = float(noise_multiplier), 0.0
    if adaptive is not None:
        if not expected_clients or expected_clients < 1:
            raise ValueError("secure.dp: adaptive clipping needs expected_clients >= 1")
        if not 0 < adaptive.target_quantile < 1:
            raise ValueError(f"secure.dp: target_quantile must be in (0, 1), got {adaptive.target_quantile}")
        sigma_b = adaptive.count_stddev if adaptive.count_stddev is not None else expected_clients / 20
        z_update = update_noise_multiplier(noise_multiplier, sigma_b) if noise_multiplier > 0 else 0.0

    def init(key: jax.Array) -> DPClipState:
        raw = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        return DPClipState(jnp.float32(clip), jnp.asarray(raw, jnp.uint32), jnp.int32(0))

    @jax.jit
    def update(updates_K, state: DPClipState, present_K=None):
        K = jax.tree.leaves(updates_K)[0].shape[0]
        present_K = jnp.ones(K, bool) if present_K is None else present_K.astype(bool)
        key, k_sum, k_count = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        clipped_K, norms_K = clip_by_l2(updates_K, state.clip)
        total = jax.tree.map(lambda x: jnp.sum(jnp.where(present_K.reshape((K,) + (1,) * (x.ndim - 1)),
                                                         x, 0), axis=0), clipped_K)
        noised = jax.tree.map(jnp.add, total, gaussian_like(k_sum, total, z_update * state.clip))
        unclipped = jnp.sum((norms_K <= state.clip) & present_K).astype(jnp.float32)
        new_clip = state.clip
        noisy_frac = unclipped / jnp.maximum(jnp.sum(present_K), 1)
        if adaptive is not None:
            noisy_frac = (unclipped + sigma_b * jax.random.normal(k_count)) / expected_clients
            new_clip = state.clip * jnp.exp(-adaptive.learning_rate * (noisy_frac - adaptive.target_quantile))
        info = dict(norms=norms_K, clip=state.clip, unclipped_fraction=noisy_frac,
                    noise_std=z_update * state.clip)
        new_state = DPClipState(new_clip.astype(jnp.float32), jax.random.key_data(key), state.count + 1)
        return noised, new_state, info

    return DPAggregation(init, update)
