"""LoRA aggregation schemes in the round engine: per-client ranks, FedEx-LoRA and FlexLoRA.

Pure pieces around lora_agg.py's math, shaped like every other algorithm part:
- `lora_piece` is the client side. Client k trains only its first r_k rank components (the others
  start at zero and their gradients are masked), and under fedex/flex it reports its adapter product
  as one more delta leaf, `lora_ab`, next to `lora_a`/`lora_b`: flex sends scale A_k B_k - scale A_g B_g;
  a fedex client, whose base also holds the components past r_k (so it starts from exactly the global
  model), sends the change of its model, scale A_k B_k - scale A_g,r_k B_g,r_k.
  Every reducer level then averages these with the same weights as the factors, so the aggregator
  sees the exact mean: of the clients' products (flex) or of their models (fedex).
- `lora_aggregator` wraps the usual aggregator. It strips `lora_ab` and hands the rest on. Under
  `fedex` it then adds the residual: the exact product mean minus the product of the averaged factors.
  The residual is summed across rounds into the frozen base, which every client receives with the
  broadcast. Under `flex` it replaces the adapters by the best rank-r_max factorisation (SVD) of the
  product mean. A client of rank r_k then starts from the top r_k components.
Under ffa and flex a client truncated to r_k counts its missing components as zeros: the result is the
product average of the clients' truncated models (so FFA with mixed ranks stays exact). Under fedex the
missing components join that client's frozen base instead, so every client starts from the global
model and the new global model is exactly the average of the clients' models.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.aggregate.base import Aggregator
from fedjax_llm.aggregate.fedavg import weighted_mean
from fedjax_llm.aggregate.lora_agg import fold_residual
from fedjax_llm.client import ClientPiece
from fedjax_llm.models.build import split_leaves

Params = Any
NAME = "lora"          # the piece's key in client state and broadcast
PRODUCT = "lora_ab"    # the delta leaf holding a client's product delta [in, out]
SCHEMES = ("naive", "ffa", "fedex", "flex")
PRODUCT_SCHEMES = ("fedex", "flex")
HOLDER_MEAN_SCHEMES = ("naive", "fedex")  # factors averaged per rank component over its holders
COVERAGE = "lora_coverage"                # delta leaf [r_max]: 1 where the client holds the component
DEAD_NORM = 3 ** -0.5  # column norm of a fresh lora_a (U(-1/sqrt(in), 1/sqrt(in)) over in rows)


def mask_rank(tree: Params, rank: jax.Array) -> Params:
    """Every lora_a column and lora_b row at index >= rank set to zero (rank may be traced)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = mask_rank(v, rank)
        elif k == "lora_a":
            out[k] = jnp.where(jnp.arange(v.shape[-1]) < rank, v, jnp.zeros((), v.dtype))
        elif k == "lora_b":
            out[k] = jnp.where((jnp.arange(v.shape[-2]) < rank)[:, None], v, jnp.zeros((), v.dtype))
        else:
            out[k] = v
    return out


def divide_components(tree: Params, held_R: jax.Array) -> Params:
    """lora_a columns and lora_b rows divided by held_R (left as they are where held_R is 0)."""
    div = jnp.where(held_R > 0, held_R, 1.0)
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = divide_components(v, held_R)
        elif k == "lora_a":
            out[k] = (v.astype(jnp.float32) / div).astype(v.dtype)
        elif k == "lora_b":
            out[k] = (v.astype(jnp.float32) / div[:, None]).astype(v.dtype)
        else:
            out[k] = v
    return out


def _modules(tree: Params, prefix: tuple = ()) -> list[tuple[tuple, dict]]:
    """(path, module) of every dict holding both lora_a and lora_b."""
    found = []
    for k, v in tree.items():
        if isinstance(v, dict):
            if "lora_a" in v and "lora_b" in v:
                found.append((prefix + (k,), v))
            else:
                found += _modules(v, prefix + (k,))
    return found


def _get(tree: Params, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _nest(items: list[tuple[tuple, Any]]) -> Params:
    out: dict = {}
    for path, value in items:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _product(m: dict, scale: float) -> jax.Array:
    return scale * (m["lora_a"].astype(jnp.float32) @ m["lora_b"].astype(jnp.float32))


def product_deltas(final: Params, global_params: Params, scale: float) -> Params:
    """{module: {"lora_ab": scale A_final B_final - scale A_global B_global}} in float32."""
    return _nest([(path + (PRODUCT,), _product(m, scale) - _product(_get(global_params, path), scale))
                  for path, m in _modules(final)])


def residual_template(params: Params) -> Params:
    """Zero float32 {module: {"kernel": [in, out]}}: the part of the base FedEx-LoRA has moved."""
    return _nest([(path + ("kernel",), jnp.zeros((m["lora_a"].shape[0], m["lora_b"].shape[1]), jnp.float32))
                  for path, m in _modules(params)])


def _tails(params: Params, rank: jax.Array, scale: float) -> Params:
    """{module: {"kernel": scale A B - scale A_r B_r}}: what a rank-r view of params leaves out."""
    cut = mask_rank(params, rank)
    return _nest([(path + ("kernel",), _product(m, scale) - _product(_get(cut, path), scale))
                  for path, m in _modules(params)])


def lora_piece(scheme: str, scale: float, ranks: np.ndarray, r_max: int) -> ClientPiece:
    """The client side of `scheme` for a population whose client i trains rank ranks[i] <= r_max."""
    ranks = np.asarray(ranks, np.int32)
    holder_mean = scheme in HOLDER_MEAN_SCHEMES
    mixed = bool(ranks.min() < r_max)

    def start(params, frozen, rank, broadcast):
        if scheme == "fedex":
            frozen = fold_residual(frozen, broadcast["residual"])
            if mixed:  # the components past r_k join this client's base: it starts from the global model
                frozen = fold_residual(frozen, _tails(params, rank, scale))
        return mask_rank(params, rank), frozen

    def finish(delta, steps, lr, rank, broadcast):
        # Components the client does not hold are left alone (not pulled towards zero), and the
        # aggregator divides each component by the weight of its holders.
        return (mask_rank(delta, rank) if holder_mean else delta), {}, rank

    def extra_delta(final, global_params, rank):
        extra = {}
        if scheme == "fedex":  # the change of the client's model: against the rank-r_k start
            extra = product_deltas(final, mask_rank(global_params, rank), scale)
        elif scheme == "flex":  # the client's product, relative to the global one (FlexLoRA averages products)
            extra = product_deltas(final, global_params, scale)
        if holder_mean:
            extra[COVERAGE] = (jnp.arange(r_max) < rank).astype(jnp.float32)
        return extra

    return ClientPiece(
        name=NAME,
        init_state=lambda params: jnp.zeros((), jnp.int32),
        init_population=lambda params, population: jnp.asarray(ranks[:population]),
        start=start,
        adjust_grads=lambda grads, rank, broadcast: mask_rank(grads, rank),
        finish=finish,
        extra_delta=extra_delta)


def client_ranks(cycle: list[int], r_max: int, population: int) -> np.ndarray:
    """Rank of each client: client i gets cycle[i % len(cycle)] (all r_max when cycle is empty)."""
    if not cycle:
        return np.full(population, r_max, np.int32)
    return np.asarray([cycle[i % len(cycle)] for i in range(population)], np.int32)


def refactor(target_IxO: jax.Array, r_max: int, scale: float, dead_norm: float) -> tuple[jax.Array, jax.Array]:
    """(A [in, r_max], B [r_max, out]) with scale A B the best rank-r_max approximation of target.

    Components are ordered by singular value and split evenly (A = U sqrt(S/scale), B = sqrt(S/scale)
    V^T), so a client's top r_k components are its first r_k. A component past the numerical rank
    gets A = U * dead_norm and B = 0: the product is unchanged and the component can still learn
    (with A and B both zero its gradients would be zero forever).
    """
    u, s, vt = jnp.linalg.svd(target_IxO.astype(jnp.float32), full_matrices=False)
    u, s, vt = u[:, :r_max], s[:r_max], vt[:r_max]
    root = jnp.sqrt(s / scale)
    # numerical rank as numpy.linalg.matrix_rank counts it: smaller values are float32 round-off
    alive = s > s[0] * max(target_IxO.shape) * jnp.finfo(jnp.float32).eps
    a = u * jnp.where(alive, root, dead_norm)[None, :]
    b = jnp.where(alive, root, 0.0)[:, None] * vt
    return a, b


def lora_aggregator(inner: Aggregator, scheme: str, scale: float) -> Aggregator:
    """`inner` on everything but the product leaves, then the fedex residual or the flex SVD.

    Assumes the server applies the update as is (server SGD with learning rate 1, checked in config):
    the exact product mean is a statement about the model the server ends up with.
    """

    def init(params):
        residual = residual_template(params) if scheme == "fedex" else {}
        return {"inner": inner.init(params), "residual": residual}

    def update(msgs, state, params: Optional[Params] = None):
        delta = dict(msgs.delta)
        coverage = delta.pop(COVERAGE, None)
        rest, products = split_leaves(delta, PRODUCT)
        upd, inner_state = inner.update(msgs.replace(delta=rest), state["inner"], params)
        if coverage is not None:  # holder means: component j of every factor over its holders only
            held = weighted_mean(coverage, msgs.weight)
            upd = mask_rank(divide_components(upd, held), jnp.sum(held > 0))
        if scheme not in PRODUCT_SCHEMES:  # per-client ranks only: the factor means are the update
            return upd, {"inner": inner_state, "residual": state["residual"]}
        mean_products = weighted_mean(products, msgs.weight)
        copy = lambda tree: jax.tree.map(lambda x: x, tree)  # fresh dicts, edited below  # noqa: E731
        upd, residual = copy(upd), copy(state["residual"])
        for path, m in _modules(params):
            target = _product(m, scale) + _get(mean_products, path)[PRODUCT]
            u = _get(upd, path)
            a1 = m["lora_a"].astype(jnp.float32) + u["lora_a"].astype(jnp.float32)
            b1 = m["lora_b"].astype(jnp.float32) + u["lora_b"].astype(jnp.float32)
            if scheme == "fedex":
                r = _get(residual, path)
                r["kernel"] = r["kernel"] + (target - scale * (a1 @ b1))
            else:
                r_max = m["lora_a"].shape[-1]
                a1, b1 = refactor(target, r_max, scale, dead_norm=DEAD_NORM)
                u["lora_a"] = (a1 - m["lora_a"]).astype(m["lora_a"].dtype)
                u["lora_b"] = (b1 - m["lora_b"]).astype(m["lora_b"].dtype)
        return upd, {"inner": inner_state, "residual": residual}

    def broadcast(state):
        out = dict(inner.broadcast(state["inner"]))
        out[NAME] = {"residual": state["residual"]}
        return out

    return Aggregator(init=init, update=update, broadcast=broadcast)


def effective_frozen(frozen: Params, agg_state: Any) -> Params:
    """The frozen base the global model runs on: FedEx-LoRA's summed residuals folded in."""
    residual = agg_state.get("residual") if isinstance(agg_state, dict) else None
    return fold_residual(frozen, residual) if residual else frozen
