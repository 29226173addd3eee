"""Builds a federated algorithm from config as a composition of pieces.

    FedAvg      = mean reducer + FedAvg aggregator + server SGD(lr 1)
    FedProx     = + proximal client loss term
    SCAFFOLD    = + control-variate client piece and the SCAFFOLD aggregator
    FedNova     = + step-normalising client piece and the FedNova aggregator
    FedAvgM / FedAdam / FedYogi / FedAdagrad = FedAvg with that server optimizer
    robust      = a rule per cloud over its clients (buffered reducer) and/or across clouds
Byzantine attacks and norm bounding are per-client transforms applied inside the jitted round.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm.aggregate import lora_round, robust
from fedjax_llm.aggregate.base import Aggregator, Reducer, Rule, buffered_reducer, weighted_mean_reducer
from fedjax_llm.aggregate.fedavg import rule_aggregator, server_optimizer, weighted_mean
from fedjax_llm.aggregate.fednova import fednova_aggregator, fednova_piece
from fedjax_llm.aggregate.fedprox import prox_piece
from fedjax_llm.aggregate.scaffold import scaffold_aggregator, scaffold_piece
from fedjax_llm.client import ClientPiece
from fedjax_llm.config import AlgorithmConfig, AttackConfig, DPConfig
from fedjax_llm.types import ClientOutput

# (output, client key, attacked flag) -> output; runs per client inside the jitted round
ClientTransform = Callable[[ClientOutput, jax.Array, jax.Array], ClientOutput]


class LoRAScheme(NamedTuple):
    """How LoRA adapters are aggregated: scheme (lora_round.SCHEMES), scale alpha / r, rank per client."""

    scheme: str
    scale: float
    ranks: np.ndarray
    r_max: int


class Algorithm(NamedTuple):
    name: str
    pieces: tuple[ClientPiece, ...]
    reducer: Reducer
    aggregator: Aggregator
    server_opt: optax.GradientTransformation
    transform: ClientTransform


def make_rule(name: str, a: AlgorithmConfig) -> Rule:
    """The rule named by algorithm.client_rule / algorithm.cloud_rule."""
    if name == "mean":
        return weighted_mean
    if name == "median":
        return robust.coordinate_median
    if name == "trimmed_mean":
        return robust.trimmed_mean(a.trim_beta)
    if name == "krum":
        return robust.multi_krum(a.krum_f, 1)
    if name == "multi_krum":
        return robust.multi_krum(a.krum_f, a.multi_krum_m)
    if name == "norm_bound":
        return robust.norm_bounded_mean(a.norm_bound)
    raise ValueError(f"algorithm rule: unknown rule {name!r}")


def make_transform(a: AlgorithmConfig, attack: AttackConfig) -> ClientTransform:
    """Byzantine behaviour of attacked clients, then norm bounding when the cloud rule asks for it."""

    def transform(out: ClientOutput, key: jax.Array, attacked: jax.Array) -> ClientOutput:
        delta = out.delta
        if attack.kind in ("sign_flip", "scale", "gaussian"):
            if attack.kind == "sign_flip":
                bad = jax.tree.map(lambda d: -attack.scale * d, delta)
            elif attack.kind == "scale":
                bad = jax.tree.map(lambda d: attack.scale * d, delta)
            else:
                leaves, treedef = jax.tree.flatten(delta)
                keys = jax.random.split(jax.random.fold_in(key, 0x5EED), len(leaves))
                bad = treedef.unflatten([attack.noise_std * jax.random.normal(k, d.shape, d.dtype)
                                         for k, d in zip(keys, leaves)])
            delta = jax.tree.map(lambda b, d: jnp.where(attacked, b, d), bad, delta)
        if a.client_rule == "norm_bound":
            delta = robust.clip_to_norm(delta, a.norm_bound)
        return out.replace(delta=delta)

    return transform


def build_algorithm(a: AlgorithmConfig, attack: AttackConfig, population: int,
                    dp: Optional[DPConfig] = None, expected_clients: float = 0.0,
                    dp_key: Optional[jax.Array] = None, dp_noise_at_clouds: bool = False,
                    lora: Optional[LoRAScheme] = None, ewc: Optional[tuple[float, tuple[int, ...]]] = None) -> Algorithm:
    """The algorithm for a run; with `dp` enabled, DP-FedAvg's clipping and noised sum take the
    place of the weighted mean (validate() has ruled out the rules and pieces it cannot combine with).
    `lora` adds per-client ranks and the FedEx-LoRA / FlexLoRA product schemes (lora_round.py);
    `ewc` = (lambda, phase end rounds) adds the continual-learning penalty (drift/ewc.py)."""
    pieces: list[ClientPiece] = []
    if a.prox_mu > 0:
        pieces.append(prox_piece(a.prox_mu))
    if a.scaffold:
        pieces.append(scaffold_piece())
    if a.fednova:
        pieces.append(fednova_piece())

    if a.client_rule in ("mean", "norm_bound"):  # norm bounding is a per-client transform
        reducer = weighted_mean_reducer()
    else:
        reducer = buffered_reducer(make_rule(a.client_rule, a))

    if dp is not None and dp.enabled:
        from fedjax_llm.secure.round import dp_aggregator, dp_clip_piece
        pieces.append(dp_clip_piece())
        aggregator = dp_aggregator(dp, expected_clients, dp_key, dp_noise_at_clouds)
    elif a.scaffold:
        aggregator = scaffold_aggregator(population)
    elif a.fednova:
        aggregator = fednova_aggregator()
    else:
        aggregator = rule_aggregator(make_rule(a.cloud_rule, a))

    if lora is not None and (lora.scheme in lora_round.PRODUCT_SCHEMES or len(set(lora.ranks.tolist())) > 1):
        pieces.append(lora_round.lora_piece(lora.scheme, lora.scale, lora.ranks, lora.r_max))
        aggregator = lora_round.lora_aggregator(aggregator, lora.scheme, lora.scale)

    if ewc is not None:
        from fedjax_llm.drift.ewc import ewc_aggregator, ewc_piece
        pieces.append(ewc_piece(ewc[0]))
        aggregator = ewc_aggregator(aggregator, ewc[1])

    opt = server_optimizer(a.server_optimizer, a.server_lr, a.server_momentum, a.server_b1,
                           a.server_b2, a.server_eps)
    return Algorithm(name=a.name, pieces=tuple(pieces), reducer=reducer, aggregator=aggregator,
                     server_opt=opt, transform=make_transform(a, attack))


def server_update(algo: Algorithm, params, opt_state, agg_state, msgs):
    """The server half of a round: aggregate the cloud messages, then step the server optimizer.

    Returns (params, opt_state, agg_state, update_norm, finite); pure and jittable.
    """
    update, agg_state = algo.aggregator.update(msgs, agg_state, params)
    pseudo_grad = jax.tree.map(jnp.negative, update)
    updates, opt_state = algo.server_opt.update(pseudo_grad, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((new_params, agg_state))]
    finite = jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
    return new_params, opt_state, agg_state, optax.tree.norm(update), finite
