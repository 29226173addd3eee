"""Plain-pytree view of the NNX models: init, the pure apply function, LoRA merging, counting.

Everything outside this package sees `Params`: nested dicts with str keys (layer indices "0", "1",
...) whose paths mirror Hugging Face names. The NNX module only exists inside `apply`'s trace.
The spec's type picks the module (LlamaSpec: Llama/Qwen2/Mistral, GPT2Spec: GPT-2, BertSpec: BERT,
BowSpec: the bag-of-embeddings classifier).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_llm.models.bert import Bert, HeadParam
from fedjax_llm.models.bow import Bow
from fedjax_llm.models.gpt2 import GPT2
from fedjax_llm.models.layers import check_length
from fedjax_llm.models.llama import Llama
from fedjax_llm.models.lora import INIT_RULES, init_scale
from fedjax_llm.models.spec import (BertSpec, BowSpec, GPT2Spec, LlamaSpec, ModelSpec,
                                    check_spec)

# spec type -> NNX module built from it.
MODULES: dict[type, Callable[[Any, nnx.Rngs], nnx.Module]] = {
    LlamaSpec: Llama, GPT2Spec: GPT2, BertSpec: Bert, BowSpec: Bow}
# Trained even under LoRA: the adapters, and task heads that start random.
TRAINABLE_WITH_LORA = nnx.Any(nnx.LoRAParam, HeadParam)

Params = dict  # nested dicts with str keys only, leaves jax arrays (or ShapeDtypeStruct)


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """The pure forward of one spec.

    Causal LMs: apply(trainable, frozen, tokens_BxT, dropout_key=None, attention_mask=None) ->
    logits_BxTxV (float32); with spec.num_labels logits_BxL of the last real token of each row.
    BowSpec: apply(trainable, frozen, tokens_BxT, dropout_key=None, attention_mask=None) ->
    logits_BxL.
    BERT: apply(trainable, frozen, tokens_BxT, dropout_key=None, attention_mask=None,
    token_type_ids=None) -> spec.output (hidden_BxTxD, pooled_BxD or logits_BxL; float32).
    """

    spec: ModelSpec
    apply: Callable[..., jax.Array]


def _str_keys(tree: Any) -> Any:
    """NNX pure dict (int layer keys) -> Params (str keys)."""
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _nnx_keys(tree: Any) -> Any:
    """Params (str keys) -> NNX pure dict, where list indices are ints."""
    if isinstance(tree, dict):
        return {(int(k) if k.isdigit() else k): _nnx_keys(v) for k, v in tree.items()}
    return tree


def combine(trainable: Params, frozen: Params) -> Params:
    """Deep union of two disjoint param trees (e.g. LoRA adapters + frozen base)."""
    out = dict(frozen)
    for k, v in trainable.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = combine(v, out[k])
        elif k in out:
            raise ValueError(f"models.params.combine: path component {k!r} is in both trees")
        else:
            out[k] = v
    return out


def _flat_shapes(tree: Params, prefix: str = "") -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_shapes(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = tuple(v.shape)
    return out


def _mismatch(expected: Params, got: Params) -> str:
    """Human-readable difference between two param trees' paths and shapes."""
    want, have = _flat_shapes(expected), _flat_shapes(got)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shape = sorted(f"{p}: expected {want[p]}, got {have[p]}"
                   for p in set(want) & set(have) if want[p] != have[p])
    return f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {shape[:5]}"


@functools.lru_cache(maxsize=None)
def _skeleton(spec: ModelSpec) -> tuple[nnx.GraphDef, Params, Params]:
    """(graphdef, abstract adapters and heads, abstract base) of spec, traced without allocating."""
    check_spec(spec)
    module = MODULES[type(spec)]
    model = nnx.eval_shape(lambda: module(spec, nnx.Rngs(params=0, lora=1)))
    graphdef, adapters, base = nnx.split(model, TRAINABLE_WITH_LORA, nnx.Param)
    return graphdef, _str_keys(nnx.to_pure_dict(adapters)), _str_keys(nnx.to_pure_dict(base))


@functools.lru_cache(maxsize=None)
def model_fns(spec: ModelSpec) -> ModelFns:
    """Builds the pure apply function once per spec, so jit caches are shared across init calls."""
    graphdef, adapters, base = _skeleton(spec)
    expected = combine(adapters, base)
    treedef = jax.tree.structure(expected)
    shapes = [x.shape for x in jax.tree.leaves(expected)]

    def apply(trainable: Params, frozen: Params, tokens_BxT: jax.Array,
              dropout_key: Optional[jax.Array] = None, **inputs: jax.Array) -> jax.Array:
        check_length(spec, tokens_BxT.shape[1])
        params = combine(trainable, frozen)
        leaves, got_treedef = jax.tree.flatten(params)
        if got_treedef != treedef or [x.shape for x in leaves] != shapes:
            raise ValueError("models.apply: param tree does not fit the spec: "
                             f"{_mismatch(expected, params)}")
        model = nnx.merge(graphdef, _nnx_keys(params))
        return model(tokens_BxT, dropout_key, **inputs)

    return ModelFns(spec=spec, apply=apply)


def _fill(abstract: Params, key: jax.Array) -> Params:
    """Initial values by leaf name (lora.INIT_RULES), one RNG draw per distribution.

    Drawing each leaf separately costs ~0.5 s of XLA compile per leaf on CPU; slicing one draw
    does not.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [path[-1].key for path, _ in leaves]
    values: list[Optional[jax.Array]] = [None] * len(leaves)
    for rule, draw_key in (("normal", key), ("uniform", jax.random.fold_in(key, 1))):
        idx = [i for i, n in enumerate(names) if INIT_RULES[n] == rule]
        total = sum(leaves[i][1].size for i in idx)
        if not total:
            continue
        if rule == "normal":
            flat = jax.random.normal(draw_key, (total,), jnp.float32)
        else:
            flat = jax.random.uniform(draw_key, (total,), jnp.float32, minval=-1.0)
        offset = 0
        for i in idx:
            x = leaves[i][1]
            chunk = flat[offset:offset + x.size].reshape(x.shape) * init_scale(names[i], x.shape)
            values[i], offset = chunk.astype(x.dtype), offset + x.size
    for i, (_, x) in enumerate(leaves):
        if values[i] is None:
            const = jnp.ones if INIT_RULES[names[i]] == "ones" else jnp.zeros
            values[i] = const(x.shape, x.dtype)
    return jax.tree.unflatten(treedef, values)


def _init_params(spec: ModelSpec, key: jax.Array) -> tuple[Params, Params]:
    # Separate keys for base and adapters: base weights do not depend on whether LoRA is on.
    _, adapters, base = _skeleton(spec)
    base_key, lora_key = jax.random.split(key)
    base = _fill(base, base_key)
    adapters = _fill(adapters, lora_key) if adapters else {}
    return (combine(adapters, base), {}) if spec.lora is None else (adapters, base)


@functools.lru_cache(maxsize=None)
def _jitted_init(spec: ModelSpec) -> Callable[[jax.Array], tuple[Params, Params]]:
    return jax.jit(functools.partial(_init_params, spec))


def init_model(spec: ModelSpec, key: jax.Array) -> tuple[ModelFns, Params, Params]:
    """(fns, trainable, frozen): all nnx.Param trainable without LoRA; else adapters (and heads)."""
    fns = model_fns(spec)
    trainable, frozen = _jitted_init(spec)(key)
    return fns, trainable, frozen


@functools.lru_cache(maxsize=None)
def _jitted_trainable_init(spec: ModelSpec) -> Callable[[jax.Array], Params]:
    _, adapters, _ = _skeleton(spec)
    return jax.jit(lambda key: _fill(adapters, jax.random.split(key)[1]) if adapters else {})


def init_trainable(spec: ModelSpec, key: jax.Array) -> Params:
    """Adapters and task heads exactly as init_model(spec, key) draws them, without the base."""
    return _jitted_trainable_init(spec)(key)


def abstract_params(spec: ModelSpec) -> tuple[Params, Params]:
    """ShapeDtypeStruct trees of (trainable, frozen), without allocating any weights."""
    return jax.eval_shape(functools.partial(_init_params, spec), jax.random.key(0))


def merge_lora(spec: ModelSpec, trainable: Params, frozen: Params) -> Params:
    """Base params with W + scale * A @ B folded in: full params of the same spec with lora=None.

    Trainable leaves that are not adapters (task heads) are kept as they are.
    """
    if spec.lora is None:
        return combine(trainable, frozen)
    scale = spec.lora.scale

    def fold(adapters: Params, base: Params) -> Params:
        out = dict(base)
        for k, v in adapters.items():
            if k == "lora_a" or k == "lora_b":
                continue
            out[k] = fold(v, base[k]) if isinstance(v, dict) and k in base else v
        if "lora_a" in adapters:
            kernel = base["kernel"]
            a, b = adapters["lora_a"].astype(jnp.float32), adapters["lora_b"].astype(jnp.float32)
            delta = a @ b
            out["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
        return out

    return fold(trainable, frozen)


def count_params(tree: Any) -> int:
    """Number of scalars in a param tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
