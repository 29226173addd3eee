"""The run's model from its config: a sized Llama, a Hugging Face checkpoint (pretrained or the same
architecture drawn fresh), or a bag-of-embeddings classifier.

`spec_from_config` only reads config.json, so start-up validation can reject an unsupported
architecture before any weight is read; `build_model` returns (fns, trainable, frozen, spec) split
as training needs it (with LoRA the base is frozen and the adapters and any task head train).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
from pathlib import Path
from typing import Any, Optional

import jax

from fedjax_llm.files import read_json
from fedjax_llm.models.spec import LoRASpec, ModelSpec, llama_spec

PACKAGE_PREFIX = "pkg:"


def resolve_path(path: str, need: str = "config.json") -> str:
    """A local directory holding `need`; "pkg:MODULE/sub/dir" names a folder inside an installed package."""
    if path.startswith(PACKAGE_PREFIX):
        module, _, sub = path[len(PACKAGE_PREFIX):].partition("/")
        try:
            root = importlib.resources.files(module)
        except ModuleNotFoundError:
            raise FileNotFoundError(f"{path}: package {module!r} is not installed") from None
        path = str(Path(str(root)) / sub)
    path = os.path.expanduser(path)
    if need and not os.path.isfile(os.path.join(path, need)):
        raise FileNotFoundError(f"{path}: no {need} (a Hugging Face checkpoint directory is needed)")
    return path


def lora_spec(cfg: Any) -> Optional[LoRASpec]:
    lo = cfg.model.lora
    if not lo.enabled:
        return None
    return LoRASpec(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=tuple(lo.targets))


def spec_from_config(cfg: Any, vocab_size: int, num_labels: Optional[int]) -> ModelSpec:
    """The spec training will use; num_labels (classification) adds a task head."""
    m = cfg.model
    if m.family == "llama":
        extra = {"num_labels": num_labels} if num_labels else {}
        return llama_spec(m.size, vocab_size, lora=lora_spec(cfg), d_model=m.d_model, n_layers=m.n_layers,
                          n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, ffn_dim=m.ffn_dim,
                          head_dim=m.head_dim, rope_theta=m.rope_theta, norm_eps=m.norm_eps,
                          qkv_bias=m.qkv_bias, tie_embeddings=m.tie_embeddings,
                          param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, **extra)
    if m.family == "bow":
        from fedjax_llm.models.bow import BowSpec
        return BowSpec(vocab_size=vocab_size, d_model=m.d_model or 64, num_labels=num_labels or 2,
                       hidden=m.ffn_dim or 0, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype)
    if m.family == "hf":
        from fedjax_llm.models.hf_io import _resolve_spec
        path = resolve_path(m.path)
        where = os.path.join(path, "config.json")
        config = read_json(where, "Hugging Face config.json")
        _, spec, _ = _resolve_spec(config, where, lora_spec(cfg), m.param_dtype, m.compute_dtype, num_labels)
        field, limit = spec.max_len()
        if limit is not None and cfg.data.seq_len > limit:
            raise ValueError(f"data.seq_len: {cfg.data.seq_len} exceeds the model's {field} = {limit} ({where})")
        return spec
    raise ValueError(f"model.family: {m.family!r} is not one of ('llama', 'hf', 'bow')")


def build_model(cfg: Any, vocab_size: int, num_labels: Optional[int], key: jax.Array):
    """(fns, trainable, frozen, spec); hf + init=pretrained streams the checkpoint's weights (a new
    classification head and LoRA adapters are drawn from `key`), everything else is drawn from `key`."""
    from fedjax_llm.models.params import init_model
    m = cfg.model
    spec = spec_from_config(cfg, vocab_size, num_labels)
    if m.family == "hf" and m.init == "pretrained":
        from fedjax_llm.models.hf_io import load_hf
        fns, trainable, frozen, info = load_hf(resolve_path(m.path), lora=lora_spec(cfg), param_dtype=m.param_dtype,
                                               compute_dtype=m.compute_dtype, key=key, num_labels=num_labels,
                                               max_seq_len=cfg.data.seq_len, tokenizer=False)
        if info.spec != spec:  # the same parse, so this only trips on a changed registry
            raise ValueError(f"model.path: spec mismatch between config.json and the loaded checkpoint: "
                             f"{dataclasses.asdict(info.spec)} vs {dataclasses.asdict(spec)}")
        return fns, trainable, frozen, spec
    fns, trainable, frozen = init_model(spec, key)
    return fns, trainable, frozen, spec


def split_leaves(tree: Any, name: str) -> tuple[Any, Any]:
    """(tree without the leaves called `name`, a tree of only those); combine() joins them back."""
    if not isinstance(tree, dict):
        return tree, {}
    rest, only = {}, {}
    for k, v in tree.items():
        if k == name and not isinstance(v, dict):
            only[k] = v
            continue
        r, o = split_leaves(v, name)
        if not (isinstance(r, dict) and not r and isinstance(v, dict)):
            rest[k] = r
        if o:
            only[k] = o
    return rest, only


def freeze_lora_a(trainable: Any, frozen: Any) -> tuple[Any, Any]:
    """FFA-LoRA: every lora_a moves from the trained (and sent) tree to the frozen base."""
    from fedjax_llm.models.params import combine
    rest, a = split_leaves(trainable, "lora_a")
    return rest, combine(a, frozen)
