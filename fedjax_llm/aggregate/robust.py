"""Robust aggregation rules over a stacked axis of updates, jittable, weight 0 = absent.

Coordinate-wise median and trimmed mean (Yin et al., ICML 2018), Krum and Multi-Krum (Blanchard et
al., NeurIPS 2017), norm bounding (Sun et al., 2019). Robust rules count present entries and ignore
the size of their weights: one client, one vote.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_llm.aggregate.fedavg import weighted_mean
from fedjax_llm.types import Params


def _present(weights_N: jax.Array) -> jax.Array:
    return weights_N > 0


NETWORK_MAX = 16  # up to this many entries, sort with a comparator network instead of jnp.sort
# (above it the network's O(n log^2 n) elementwise ops make compile time and memory grow past jnp.sort's;
# at 64 clients of a 527k-parameter model XLA:CPU ran out of memory)


def batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators of Batcher's odd-even merge sort for n a power of two (O(n log^2 n) of them)."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def sort_axis0(x: jax.Array) -> jax.Array:
    """Sorts along the leading axis. For up to NETWORK_MAX clients a sorting network of elementwise
    min/max is far faster on XLA:CPU than jnp.sort over a short strided axis (8 clients: ~80x)."""
    n = x.shape[0]
    if n > NETWORK_MAX or n < 2:
        return jnp.sort(x, axis=0)
    size = 1 << (n - 1).bit_length()
    rows = [x[i] for i in range(n)] + [jnp.full(x.shape[1:], jnp.inf, x.dtype)] * (size - n)
    for a, b in batcher_pairs(size):
        rows[a], rows[b] = jnp.minimum(rows[a], rows[b]), jnp.maximum(rows[a], rows[b])
    return jnp.stack(rows[:n])


def _sorted_with_absent_last(u: jax.Array, present_N: jax.Array) -> jax.Array:
    mask = present_N.reshape((-1,) + (1,) * (u.ndim - 1))
    return sort_axis0(jnp.where(mask, u.astype(jnp.float32), jnp.inf))


def coordinate_median(updates_N: Params, weights_N: jax.Array) -> Params:
    """Per-coordinate median of the present updates (mean of the two middle values when even)."""
    present = _present(weights_N)
    n = jnp.sum(present)
    lo, hi = jnp.maximum((n - 1) // 2, 0), jnp.maximum(n // 2, 0)

    def med(u):
        s = _sorted_with_absent_last(u, present)
        value = 0.5 * (jnp.take(s, lo, axis=0) + jnp.take(s, hi, axis=0))
        return jnp.where(n > 0, value, 0.0).astype(u.dtype)

    return jax.tree.map(med, updates_N)


def trimmed_mean(beta: float):
    """Per coordinate, drops the floor(beta * n) largest and smallest present values and averages."""

    def rule(updates_N: Params, weights_N: jax.Array) -> Params:
        present = _present(weights_N)
        n = jnp.sum(present)
        k = jnp.floor(beta * n).astype(jnp.int32)
        pos = jnp.arange(weights_N.shape[0])
        keep = (pos >= k) & (pos < n - k)
        count = jnp.maximum(jnp.sum(keep), 1)

        def tmean(u):
            s = _sorted_with_absent_last(u, present)
            m = keep.reshape((-1,) + (1,) * (u.ndim - 1))
            return (jnp.sum(jnp.where(m, s, 0.0), axis=0) / count).astype(u.dtype)

        return jax.tree.map(tmean, updates_N)

    return rule


def pairwise_sq_distances(updates_N: Params) -> jax.Array:
    """[N, N] squared L2 distances between whole (flattened) updates, via Gram matrices."""
    leaves = [x.reshape(x.shape[0], -1).astype(jnp.float32) for x in jax.tree.leaves(updates_N)]
    gram = sum(x @ x.T for x in leaves)
    sq = jnp.diag(gram)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def krum_scores(updates_N: Params, weights_N: jax.Array, f: int) -> jax.Array:
    """Krum score per entry: summed squared distance to its n - f - 2 nearest present neighbours."""
    present = _present(weights_N)
    N = weights_N.shape[0]
    n = jnp.sum(present)
    d = pairwise_sq_distances(updates_N)
    valid = present[:, None] & present[None, :] & ~jnp.eye(N, dtype=bool)
    d = jnp.sort(jnp.where(valid, d, jnp.inf), axis=1)
    m = jnp.maximum(n - f - 2, 1)
    take = jnp.arange(N)[None, :] < m
    scores = jnp.sum(jnp.where(take & jnp.isfinite(d), d, 0.0), axis=1)
    return jnp.where(present, scores, jnp.inf)


def multi_krum(f: int, m: int):
    """Averages the m entries with the lowest Krum scores; m = 1 is Krum."""

    def rule(updates_N: Params, weights_N: jax.Array) -> Params:
        scores = krum_scores(updates_N, weights_N, f)
        rank = jnp.argsort(jnp.argsort(scores))
        chosen = (rank < m) & jnp.isfinite(scores)
        return weighted_mean(updates_N, chosen.astype(jnp.float32))

    return rule


def clip_to_norm(update: Params, max_norm: float) -> Params:
    """Scales one update so its global L2 norm is at most max_norm."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(update)))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda x: (x * scale).astype(x.dtype), update)


def norm_bounded_mean(max_norm: float):
    """Clips every update to norm max_norm, then takes the weighted mean."""

    def rule(updates_N: Params, weights_N: jax.Array) -> Params:
        clipped = jax.vmap(lambda u: clip_to_norm(u, max_norm))(updates_N)
        return weighted_mean(clipped, weights_N)

    return rule
