"""Federated aggregation of LoRA adapters: naive, FFA-LoRA, FedEx-LoRA and FlexLoRA.

Inputs are adapter trees as models/params.py lays them out (`.../q_proj/lora_a` [in, r], `lora_b`
[r, out], product scale * A @ B) stacked on a client axis K, with weights [K] (0 = absent: such an entry
never influences a result, even when it holds NaN). Other trainable leaves (task heads) are averaged.
Averaging A and B separately is not averaging the products: mean(A_k) mean(B_k) != mean(A_k B_k).
The three other schemes make the global model equal the average of the clients' products (FFA-LoRA,
FedEx-LoRA) or its best rank-r approximation (FlexLoRA). Every function is pure and jittable.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

Params = dict
Scale = Union[float, jax.Array]  # adapter scale alpha / r: a scalar, or one per client [K]
ADAPTER_LEAVES = ("lora_a", "lora_b")


def _is_module(node: Any) -> bool:
    return isinstance(node, dict) and "lora_a" in node and "lora_b" in node


def _probs(weights_K: jax.Array) -> jax.Array:
    """Weights normalised to sum 1 (all zero when every entry is absent)."""
    w = jnp.maximum(jnp.asarray(weights_K, jnp.float32), 0.0)
    return w / jnp.where(w.sum() > 0, w.sum(), 1.0)


def _bcast(v_K: jax.Array, x_K: jax.Array) -> jax.Array:
    return v_K.reshape((-1,) + (1,) * (x_K.ndim - 1))


def _mean(x_K: jax.Array, p_K: jax.Array) -> jax.Array:
    """sum_k p_k x_k over present entries (absent NaNs cannot leak in)."""
    x = jnp.where(_bcast(p_K > 0, x_K), x_K.astype(jnp.float32), 0.0)
    return jnp.sum(x * _bcast(p_K, x_K), axis=0).astype(x_K.dtype)


def _product_mean(a_KxIxR: jax.Array, b_KxRxO: jax.Array, p_K: jax.Array,
                  scale_K: jax.Array) -> jax.Array:
    """sum_k p_k scale_k A_k B_k [in, out] in float32."""
    coef_K = jnp.where(p_K > 0, p_K * scale_K, 0.0)
    a = jnp.where(_bcast(p_K > 0, a_KxIxR), a_KxIxR.astype(jnp.float32), 0.0)
    b = jnp.where(_bcast(p_K > 0, b_KxRxO), b_KxRxO.astype(jnp.float32), 0.0)
    return jnp.einsum("k,kir,kro->io", coef_K, a, b)


def _scales(scale: Scale, k: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (k,))


def _map(tree: Params, on_module: Callable[[dict], dict], on_leaf: Callable[[Any], Any]) -> Params:
    """Rebuilds tree: adapter modules through on_module, other leaves through on_leaf."""
    if _is_module(tree):
        rest = {k: _map(v, on_module, on_leaf) for k, v in tree.items() if k not in ADAPTER_LEAVES}
        return {**rest, **on_module(tree)}
    if isinstance(tree, dict):
        return {k: _map(v, on_module, on_leaf) for k, v in tree.items()}
    return on_leaf(tree)


def _kernels(tree: Params, on_module: Callable[[dict], jax.Array]) -> Params:
    """{path to module: {"kernel": on_module(module)}} for every adapter module (a sub-tree of frozen)."""
    out = {}
    for k, v in tree.items():
        if _is_module(v):
            out[k] = {"kernel": on_module(v)}
        elif isinstance(v, dict):
            sub = _kernels(v, on_module)
            if sub:
                out[k] = sub
    return out


def adapter_paths(tree: Params, prefix: str = "") -> list[str]:
    """Paths of the modules holding lora_a/lora_b ("layers/0/self_attn/q_proj", ...)."""
    out = []
    for k, v in tree.items():
        if _is_module(v):
            out.append(f"{prefix}{k}")
        elif isinstance(v, dict):
            out += adapter_paths(v, f"{prefix}{k}/")
    return out


def _check(adapters_K: Params, weights_K: jax.Array, where: str) -> None:
    k = jnp.shape(weights_K)[0]
    for path, leaf in jax.tree_util.tree_leaves_with_path(adapters_K):
        if leaf.shape[:1] != (k,):
            name = "/".join(str(getattr(p, "key", p)) for p in path)
            raise ValueError(f"lora_agg.{where}: {name} has shape {leaf.shape}; expected a leading "
                             f"client axis of {k} (the length of weights)")
    if not adapter_paths(adapters_K):
        raise ValueError(f"lora_agg.{where}: the tree holds no lora_a/lora_b adapters")


# ----- naive --------------------------------------------------------------------------------------
def naive(adapters_K: Params, weights_K: jax.Array) -> Params:
    """A and B averaged separately (FedAvg on adapters, as most frameworks do): inexact."""
    _check(adapters_K, weights_K, "naive")
    p_K = _probs(weights_K)
    return jax.tree.map(lambda x: _mean(x, p_K), adapters_K)


# ----- FFA-LoRA (Sun et al., ICLR 2024) -----------------------------------------------------------
def ffa_labels(trainable: Params) -> Params:
    """"frozen" on every lora_a leaf, "trained" elsewhere (an optax.multi_transform label tree)."""
    return _map(trainable, lambda m: {"lora_a": "frozen", "lora_b": "trained"}, lambda _: "trained")


def freeze_a(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """The client optimizer with A's updates set to exactly zero, so A stays at its initialisation."""
    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, ffa_labels)


def ffa_split(trainable: Params) -> tuple[Params, Params]:
    """(B and heads: trained and sent; A: joins the frozen base). combine() of the two (or of A and
    the base) restores the tree, so apply sees the same model and A gets no gradient at all."""
    if _is_module(trainable):
        rest, a = ffa_split({k: v for k, v in trainable.items() if k != "lora_a"})
        return rest, {**a, "lora_a": trainable["lora_a"]}
    if not isinstance(trainable, dict):
        return trainable, {}
    rest, a = {}, {}
    for k, v in trainable.items():
        r_k, a_k = ffa_split(v) if isinstance(v, dict) else (v, {})
        if not (isinstance(r_k, dict) and not r_k):
            rest[k] = r_k
        if a_k:
            a[k] = a_k
    return rest, a


def a_unchanged(global_adapters: Params, adapters_K: Params) -> jax.Array:
    """[K] True where every lora_a of the client equals the global one bitwise."""
    g = _kernels(global_adapters, lambda m: m["lora_a"])
    c = _kernels(adapters_K, lambda m: m["lora_a"])
    same = jax.tree.map(lambda a, a_K: jnp.all(a_K == a[None], axis=tuple(range(1, a_K.ndim))), g, c)
    return jnp.all(jnp.stack(jax.tree.leaves(same)), axis=0)


def ffa(global_adapters: Params, adapters_K: Params, weights_K: jax.Array) -> Params:
    """A kept bitwise from the global model, B averaged: exact, as mean_k A B_k = A mean_k B_k."""
    _check(adapters_K, weights_K, "ffa")
    p_K = _probs(weights_K)
    mean = jax.tree.map(lambda x: _mean(x, p_K), adapters_K)

    def keep_a(g, m):
        if _is_module(g):
            return {**{k: keep_a(g[k], m[k]) for k in g if k not in ADAPTER_LEAVES},
                    "lora_a": g["lora_a"], "lora_b": m["lora_b"]}
        return {k: keep_a(g[k], m[k]) for k in g} if isinstance(g, dict) else m

    return keep_a(global_adapters, mean)


# ----- FedEx-LoRA (Singhal et al., 2024) -----------------------------------------------------------
def fedex(adapters_K: Params, weights_K: jax.Array, scale: float,
          residual_K: Optional[Params] = None) -> tuple[Params, Params]:
    """(mean adapters, residual per adapted kernel) with scale mean(A) mean(B) + residual equal to
    mean_k scale A_k B_k; fold the residual into the frozen base (fold_residual).

    residual_K (optional, [K, in, out] at kernel paths) is each entry's own residual, e.g. a cloud's
    over its clients: the result then equals the one-level aggregate over all clients (total covariance).
    The residual is a weighted covariance, so client deltas give the same residual as full adapters.
    """
    _check(adapters_K, weights_K, "fedex")
    p_K = _probs(weights_K)
    mean = jax.tree.map(lambda x: _mean(x, p_K), adapters_K)
    k = p_K.shape[0]

    def residual(m):
        prod = _product_mean(m["lora_a"], m["lora_b"], p_K, _scales(scale, k))
        a, b = _mean(m["lora_a"], p_K), _mean(m["lora_b"], p_K)
        return prod - scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))

    res = _kernels(adapters_K, residual)
    if residual_K is not None:
        res = jax.tree.map(lambda r, r_K: r + _mean(r_K.astype(jnp.float32), p_K), res, residual_K)
    return mean, res


def fold_residual(frozen: Params, residual: Params) -> Params:
    """frozen with each residual added to its kernel (in float32, cast back to the kernel's dtype)."""
    def add(f, r):
        out = dict(f)
        for k, v in r.items():
            if k not in f:
                raise ValueError(f"lora_agg.fold_residual: {k!r} is not in the frozen tree")
            out[k] = add(f[k], v) if isinstance(v, dict) else (
                f[k].astype(jnp.float32) + v).astype(f[k].dtype)
        return out
    return add(frozen, residual)


# ----- FlexLoRA (Bai et al., 2024) -----------------------------------------------------------------
def rank_mask(ranks_K: jax.Array, r_max: int) -> jax.Array:
    """[K, r_max] True on the first r_k rank components of each client."""
    return jnp.arange(r_max)[None, :] < jnp.asarray(ranks_K)[:, None]


def truncate_to_rank(adapters: Params, rank: jax.Array, rescale: Scale = 1.0) -> Params:
    """One client's view of SVD-form global adapters (flexlora's output): its top `rank` components,
    each factor times sqrt(rescale) (= sqrt(global_scale / scale_k) when the client's scale differs).
    rank may be traced, so a client applies it at the start of its local update."""
    def cut(m):
        keep_R = jnp.arange(m["lora_a"].shape[-1]) < rank
        root = jnp.sqrt(jnp.asarray(rescale, jnp.float32))
        return {"lora_a": (jnp.where(keep_R, m["lora_a"], 0) * root).astype(m["lora_a"].dtype),
                "lora_b": (jnp.where(keep_R[:, None], m["lora_b"], 0) * root).astype(m["lora_b"].dtype)}
    return _map(adapters, cut, lambda x: x)


def pad_rank(adapters: Params, r_max: int) -> Params:
    """A client's rank-r adapters zero-padded to r_max (the product is unchanged; with zero padding,
    gradients of the padded columns of A and rows of B stay zero, so training keeps it)."""
    def pad(m):
        a, b = m["lora_a"], m["lora_b"]
        r = a.shape[-1]
        if r > r_max:
            raise ValueError(f"lora_agg.pad_rank: rank {r} exceeds r_max={r_max}")
        pa = [(0, 0)] * (a.ndim - 1) + [(0, r_max - r)]
        pb = [(0, 0)] * (b.ndim - 2) + [(0, r_max - r), (0, 0)]
        return {"lora_a": jnp.pad(a, pa), "lora_b": jnp.pad(b, pb)}
    return _map(adapters, pad, lambda x: x)


def product_mean(adapters_K: Params, weights_K: jax.Array, scale: Scale) -> Params:
    """{module: {"kernel": sum_k p_k scale_k A_k B_k}}: the exact average of the clients' deltas."""
    _check(adapters_K, weights_K, "product_mean")
    p_K = _probs(weights_K)
    k = p_K.shape[0]
    return _kernels(adapters_K, lambda m: _product_mean(m["lora_a"], m["lora_b"], p_K,
                                                        _scales(scale, k)))


def svd_refactor(delta_IxO: jax.Array, r_pad: int, rank: int, ranks_K: jax.Array,
                 scale_K: jax.Array, global_scale: float) -> tuple[dict, dict]:
    """Global {lora_a, lora_b} with global_scale A B = the best rank-`rank` approximation of delta
    (Eckart-Young), and per-client [K, ...] factors holding its top r_k components with scale_k.

    Split: A = U sqrt(S / scale), B = sqrt(S / scale) V^T; components past the rank are zero, so
    every tree keeps the padded width r_pad.
    """
    if not 1 <= rank <= r_pad <= min(delta_IxO.shape):
        raise ValueError(f"lora_agg.svd_refactor: need 1 <= rank={rank} <= r_pad={r_pad} <= "
                         f"min{tuple(delta_IxO.shape)}")
    u, s, vt = jnp.linalg.svd(delta_IxO.astype(jnp.float32), full_matrices=False)
    u, vt = u[:, :r_pad], vt[:r_pad]
    s_r = jnp.where(jnp.arange(r_pad) < rank, s[:r_pad], 0.0)
    root = jnp.sqrt(s_r / global_scale)
    glob = {"lora_a": u * root[None, :], "lora_b": root[:, None] * vt}
    root_KxR = jnp.sqrt(jnp.where(rank_mask(ranks_K, r_pad), s_r[None], 0.0) / scale_K[:, None])
    clients = {"lora_a": u[None] * root_KxR[:, None, :], "lora_b": root_KxR[:, :, None] * vt[None]}
    return glob, clients


def flexlora(adapters_K: Params, weights_K: jax.Array, ranks_K: jax.Array, scale: Scale,
             rank: Optional[int] = None, global_scale: Optional[float] = None,
             ) -> tuple[Params, Params]:
    """(global adapters, per-client adapters [K, ...]) from the SVD of mean_k scale_k A_k B_k.

    Clients have ranks r_k <= r_pad (zero-padded to the common width r_pad, see pad_rank); the global
    adapters are the best rank-`rank` (default r_pad) approximation of the product average, split
    with global_scale (default: scale, which must then be a scalar); client k receives the top r_k
    components of the same SVD for the next round, split with its own scale_k. Heads are averaged.
    """
    _check(adapters_K, weights_K, "flexlora")
    p_K = _probs(weights_K)
    k = p_K.shape[0]
    scale_K = _scales(scale, k)
    if global_scale is None:
        if jnp.ndim(scale) != 0:
            raise ValueError("lora_agg.flexlora: per-client scales need an explicit global_scale")
        global_scale = scale
    ranks_K = jnp.asarray(ranks_K)

    def recurse(tree):
        if _is_module(tree):
            a, b = tree["lora_a"], tree["lora_b"]
            r_pad = a.shape[-1]
            delta = _product_mean(a, b, p_K, scale_K)
            g, c = svd_refactor(delta, r_pad, r_pad if rank is None else rank, ranks_K, scale_K,
                                global_scale)
            g = {n: g[n].astype(tree[n].dtype) for n in ADAPTER_LEAVES}
            c = {n: c[n].astype(tree[n].dtype) for n in ADAPTER_LEAVES}
            rest = {n: recurse(v) for n, v in tree.items() if n not in ADAPTER_LEAVES}
            return {**{n: r[0] for n, r in rest.items()}, **g}, {**{n: r[1] for n, r in rest.items()}, **c}
        if isinstance(tree, dict):
            both = {n: recurse(v) for n, v in tree.items()}
            return {n: r[0] for n, r in both.items()}, {n: r[1] for n, r in both.items()}
        mean = _mean(tree, p_K)
        return mean, jnp.broadcast_to(mean, tree.shape)

    return recurse(adapters_K)


# ----- for tests and reports ----------------------------------------------------------------------
def effective_delta(adapters: Params, scale: float, residual: Optional[Params] = None) -> Params:
    """{module: {"kernel": scale A B (+ residual)}}: what the adapters add to the base kernels."""
    delta = _kernels(adapters, lambda m: scale * (m["lora_a"].astype(jnp.float32)
                                                  @ m["lora_b"].astype(jnp.float32)))
    return delta if residual is None else jax.tree.map(jnp.add, delta, residual)
