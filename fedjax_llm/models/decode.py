"""KV-cache decoding of the causal LMs (Llama family, GPT-2) as pure functions over the param pytrees.

`decode_fns(spec)` gives `init_cache(batch, max_len)` and `forward(trainable, frozen, tokens_BxT, cache,
start_B) -> (logits_BxTxV, cache)`: prefill is one call at start 0, each decode step one token. The
cache has a fixed length, so a jitted generation loop compiles once per (batch, prompt, max) shape.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_llm.models.layers import check_length
from fedjax_llm.models.llama import KVCache
from fedjax_llm.models.params import Params, _mismatch, _nnx_keys, _skeleton, combine
from fedjax_llm.models.spec import GPT2Spec, LlamaSpec, ModelSpec

Cache = tuple[KVCache, ...]  # one KVCache per layer


@dataclasses.dataclass(frozen=True)
class DecodeFns:
    """init_cache(batch, max_len) -> Cache; forward(trainable, frozen, tokens_BxT, cache, start_B)."""

    spec: ModelSpec
    init_cache: Callable[[int, int], Cache]
    forward: Callable[..., tuple[jax.Array, Cache]]


@functools.lru_cache(maxsize=None)
def decode_fns(spec: ModelSpec) -> DecodeFns:
    """The cached forward of a causal LM: LlamaSpec (Llama, Qwen2, Mistral) or GPT2Spec.

    Classifiers (spec.num_labels) and other families raise: they have no next-token head.
    """
    if not isinstance(spec, (LlamaSpec, GPT2Spec)) or spec.num_labels:
        labels = getattr(spec, "num_labels", None)
        what = type(spec).__name__ + (f" with num_labels={labels}" if labels else "")
        raise NotImplementedError(f"models.decode: the KV cache needs a causal LM (LlamaSpec or "
                                  f"GPT2Spec without num_labels), got {what}")
    graphdef, adapters, base = _skeleton(spec)
    expected = combine(adapters, base)
    treedef = jax.tree.structure(expected)
    shapes = [x.shape for x in jax.tree.leaves(expected)]
    kv_heads = spec.n_kv_heads if isinstance(spec, LlamaSpec) else spec.n_heads
    hd, dtype = spec.resolved_head_dim, jnp.dtype(spec.compute_dtype)

    def init_cache(batch: int, max_len: int) -> Cache:
        check_length(spec, max_len)
        zeros = lambda: jnp.zeros((batch, max_len, kv_heads, hd), dtype)  # noqa: E731
        return tuple(KVCache(zeros(), zeros()) for _ in range(spec.n_layers))

    def forward(trainable: Params, frozen: Params, tokens_BxT: jax.Array, cache: Cache,
                start_B: jax.Array) -> tuple[jax.Array, Cache]:
        params = combine(trainable, frozen)
        leaves, got_treedef = jax.tree.flatten(params)
        if got_treedef != treedef or [x.shape for x in leaves] != shapes:
            raise ValueError("models.decode: param tree does not fit the spec: "
                             f"{_mismatch(expected, params)}")
        if len(cache) != spec.n_layers:
            raise ValueError(f"models.decode: cache has {len(cache)} layers, spec has {spec.n_layers}")
        model = nnx.merge(graphdef, _nnx_keys(params))
        return model.decode(tokens_BxT, cache, jnp.asarray(start_B, jnp.int32))

    return DecodeFns(spec=spec, init_cache=init_cache, forward=forward)
