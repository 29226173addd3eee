"""Splits example indices across clients (natural, Dirichlet, IID) and holds out a per-client eval set.

Pure numpy; every function draws from the `rng` it is given. Each partition is disjoint, covers the
input indices exactly and leaves no client empty (else ValueError naming the client and the key).
Returned index arrays are sorted.
"""
from __future__ import annotations

import heapq

import numpy as np

CLIENTS_KEY = "clouds.members.<cloud>.clients"


def _check_nonempty(parts: list[np.ndarray], n: int, clients_key: str) -> list[np.ndarray]:
    for i, p in enumerate(parts):
        if len(p) == 0:
            raise ValueError(f"client {i} of {len(parts)} gets no example ({n} examples in all); "
                             f"lower {clients_key}")
    return parts


def _check_aligned(indices: np.ndarray, other: np.ndarray, name: str) -> None:
    if len(other) != len(indices):
        raise ValueError(f"{name} has {len(other)} entries for {len(indices)} indices")


def partition_iid(indices: np.ndarray, n_clients: int, rng: np.random.Generator, *,
                  clients_key: str = CLIENTS_KEY) -> list[np.ndarray]:
    """Uniformly random split into n_clients near-equal parts."""
    indices = np.asarray(indices)
    parts = np.array_split(rng.permutation(indices), n_clients)
    return _check_nonempty([np.sort(p) for p in parts], len(indices), clients_key)


def partition_dirichlet(indices: np.ndarray, labels: np.ndarray, n_clients: int, alpha: float,
                        rng: np.random.Generator, min_size: int = 1, *, max_tries: int = 1000,
                        clients_key: str = CLIENTS_KEY) -> list[np.ndarray]:
    """Per label, client shares ~ Dir(alpha); smaller alpha = more label skew (Hsu et al. 2019, arXiv:1909.06335).

    Draws are repeated (at most max_tries) until every client holds at least min_size examples.
    """
    indices, labels = np.asarray(indices), np.asarray(labels)
    _check_aligned(indices, labels, "labels")
    if alpha <= 0:
        raise ValueError(f"partition.alpha: must be > 0, got {alpha}")
    if len(indices) < n_clients * min_size:
        raise ValueError(f"client {len(indices) // min_size} of {n_clients} cannot get {min_size} examples "
                         f"({len(indices)} examples in all); lower {clients_key}")
    by_label = [rng.permutation(indices[labels == u]) for u in np.unique(labels)]
    for _ in range(max_tries):
        cuts = []
        sizes = np.zeros(n_clients, np.int64)
        for idx in by_label:
            share = rng.dirichlet(np.full(n_clients, alpha))
            cut = (np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            sizes += np.diff(np.concatenate([[0], cut, [len(idx)]]))
            cuts.append(cut)
        if sizes.min() >= min_size:
            pieces = [np.split(idx, cut) for idx, cut in zip(by_label, cuts)]
            return [np.sort(np.concatenate([p[i] for p in pieces])) for i in range(n_clients)]
    raise ValueError(f"partition.alpha={alpha}: after {max_tries} draws some client still has fewer than "
                     f"{min_size} examples; raise partition.alpha or lower {clients_key}")


def partition_natural(indices: np.ndarray, groups: np.ndarray, n_clients: int,
                      rng: np.random.Generator, *, clients_key: str = CLIENTS_KEY) -> list[np.ndarray]:
    """Keeps each group on one client, packing groups largest-first onto the least-loaded client.

    With fewer groups than clients, the largest group is split in random halves until there are enough.
    """
    indices, groups = np.asarray(indices), np.asarray(groups)
    _check_aligned(indices, groups, "groups")
    if len(indices) < n_clients:
        return _check_nonempty(
            [np.sort(indices[i:i + 1]) for i in range(n_clients)], len(indices), clients_key)
    _, inverse = np.unique(groups, return_inverse=True)
    blocks = [indices[inverse == g] for g in range(inverse.max() + 1)] if len(indices) else []
    while len(blocks) < n_clients:
        largest = max(range(len(blocks)), key=lambda i: len(blocks[i]))
        shuffled = rng.permutation(blocks.pop(largest))
        half = len(shuffled) // 2
        blocks += [shuffled[:half], shuffled[half:]]
    order = rng.permutation(len(blocks))                           # random tie-break among equal sizes
    order = order[np.argsort([-len(blocks[i]) for i in order], kind="stable")]
    heap = [(0, c) for c in range(n_clients)]                      # (load, client): least loaded first
    assigned: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for b in order:
        load, c = heapq.heappop(heap)
        assigned[c].append(blocks[b])
        heapq.heappush(heap, (load + len(blocks[b]), c))
    parts = [np.sort(np.concatenate(a)) if a else indices[:0] for a in assigned]
    return _check_nonempty(parts, len(indices), clients_key)


def split_eval(indices: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval): eval gets round(fraction * n), at least 1 when fraction > 0 and n >= 2; train is never empty."""
    indices = np.asarray(indices)
    n = len(indices)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.eval_fraction: must be in [0, 1), got {fraction}")
    n_eval = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, int(round(fraction * n))))
    shuffled = rng.permutation(indices)
    return np.sort(shuffled[n_eval:]), np.sort(shuffled[:n_eval])
