"""Hugging Face checkpoints in and out: load_hf, save_hf (full or LoRA-merged) and PEFT adapters.

Weights stream one tensor at a time in both directions (read, convert to the target dtype and layout,
place; or fetch, transpose, write), so a model never sits twice in host memory. Tokenizer files
travel with the weights. Everything runs offline on local directories.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fedjax_llm.files import read_json
from fedjax_llm.models.families import (FAMILIES, SEQ_CLS, Family, HFConfigError, expand_names,
                                        family_for_config, family_for_spec)
from fedjax_llm.models.params import (ModelFns, Params, abstract_params, init_trainable,
                                      merge_lora, model_fns)
from fedjax_llm.models.spec import LoRASpec, ModelSpec, check_spec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
DEFAULT_SHARD_BYTES = 2 * 2**30
READ_BLOCK_BYTES = 16 * 2**20  # bytes per block read or written: bounds the transients
_DROP_FROM_CONFIG = ("architectures", "_name_or_path", "transformers_version", "torch_dtype",
                     "dtype", "rope_scaling", "auto_map")


@dataclasses.dataclass
class HFInfo:
    """What load_hf found: the family, the raw config, skipped buffers and freshly drawn leaves."""

    architecture: str
    config: dict
    spec: ModelSpec
    files: list[str]
    ignored: list[str]       # checkpoint tensors skipped on purpose (buffers, tied lm_head)
    initialized: list[str]   # our param paths drawn fresh (adapters, a new classifier)
    tokenizer: Any = None    # transformers tokenizer from the same directory, or None


def _flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _unflatten(flat: dict[str, Any]) -> Params:
    out: Params = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (a Hugging Face checkpoint directory needs it)")
    return read_json(str(file), f"Hugging Face {file.name}")


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or the single *.safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected model.safetensors or model.safetensors."
                                f"index.json, found {[f.name for f in files]} (PyTorch .bin "
                                "checkpoints are not read: convert them to safetensors)")
    with safe_open(str(files[0]), framework="numpy") as f:
        return {name: files[0] for name in f.keys()}


def _host_buffer(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised 64-byte aligned array, which jnp.from_dlpack adopts on CPU without a copy."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _to_device(x: np.ndarray) -> jax.Array:
    """Hands a host buffer to JAX: adopted on CPU (DLPack, no copy); copied for bf16 or accelerators."""
    if jax.default_backend() == "cpu" and x.dtype != ml_dtypes.bfloat16:
        return jnp.from_dlpack(x)
    return jax.device_put(x)


def _read_converted(file: Path, name: str, layout: str, target: Any) -> jax.Array:
    """One tensor read in row blocks, each transposed and cast straight into the final buffer.

    The file is reopened per block: pages a safe_open memory map has touched stay resident until
    it closes, and holding one open across the whole read doubled the peak RSS in a 400 MB test.
    """
    with safe_open(str(file), framework="numpy") as f:
        shape = tuple(f.get_slice(name).get_shape())
    expected = tuple(target.shape[::-1] if layout == "T" else target.shape)
    if shape != expected:
        raise ValueError(f"{file.name}: tensor {name!r} has shape {shape}; the config implies "
                         f"{expected} (our {tuple(target.shape)}, layout {layout})")
    out = _host_buffer(tuple(target.shape), _NP_DTYPES[str(target.dtype)])
    rows = shape[0] if shape else 1
    step = max(1, READ_BLOCK_BYTES // max(1, 4 * int(np.prod(shape[1:]))))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        with safe_open(str(file), framework="numpy") as f:
            block = f.get_slice(name)[r0:r1] if shape else f.get_tensor(name)
        if layout == "T":
            np.copyto(out[:, r0:r1], block.T, casting="unsafe")
        elif shape:
            np.copyto(out[r0:r1], block, casting="unsafe")
        else:
            np.copyto(out, block, casting="unsafe")
    return _to_device(out)


def load_tokenizer(path: str | Path) -> Any:
    """transformers.AutoTokenizer from a local directory (offline), or None if it has no files."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is there
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _resolve_spec(config: dict, where: str, lora: Optional[LoRASpec], param_dtype: str,
                  compute_dtype: str, num_labels: Optional[int]) -> tuple[Family, ModelSpec, bool]:
    """(family, spec, head_is_new): num_labels turns a BertModel or causal-LM checkpoint into its
    *ForSequenceClassification, whose head is then drawn fresh."""
    family = family_for_config(config, where)
    new_head = False
    if num_labels is not None:
        new_head = family.architecture in SEQ_CLS
        if not new_head and family.architecture not in SEQ_CLS.values():
            raise HFConfigError(f"{where}: num_labels={num_labels} needs one of {sorted(SEQ_CLS)} "
                                f"or their classifiers, got {family.architecture}")
        family = FAMILIES[SEQ_CLS.get(family.architecture, family.architecture)]
    spec = family.parse(config, family.architecture, where)
    if num_labels is not None:
        extra = {"output": "logits"} if family.model_type == "bert" else {}
        spec = dataclasses.replace(spec, num_labels=num_labels, **extra)
    spec = dataclasses.replace(spec, lora=lora, param_dtype=param_dtype,
                               compute_dtype=compute_dtype)
    check_spec(spec)
    return family, spec, new_head


def load_hf(path: str | Path, *, lora: Optional[LoRASpec] = None, param_dtype: str = "float32",
            compute_dtype: str = "float32", key: Optional[jax.Array] = None,
            num_labels: Optional[int] = None, max_seq_len: Optional[int] = None,
            ignore_unexpected: Sequence[str] = (), tokenizer: bool = True,
            ) -> tuple[ModelFns, Params, Params, HFInfo]:
    """(fns, trainable, frozen, info) from a HF checkpoint directory; adapters drawn from `key`.

    Split as init_model's: without LoRA everything is trainable; with LoRA the base is frozen and
    adapters (and a classifier) train. Unknown tensors fail unless a regex of ignore_unexpected
    matches them; max_seq_len fails early when the model would not compute it exactly.
    """
    path = Path(path)
    where = str(path / "config.json")
    config = _read_json(path / "config.json")
    family, spec, new_head = _resolve_spec(config, where, lora, param_dtype, compute_dtype,
                                           num_labels)
    field, limit = spec.max_len()
    if max_seq_len is not None and limit is not None and max_seq_len > limit:
        raise HFConfigError(f"{where}: `{field}` = {limit} binds at max_seq_len={max_seq_len}; "
                            "this model attends to the full sequence only")
    trainable_abs, frozen_abs = (_flatten(t) for t in abstract_params(spec))
    full_abs = {**trainable_abs, **frozen_abs}
    base_paths = {p for p in full_abs if not p.endswith(("/lora_a", "/lora_b"))}
    fresh_ok = {p for p in base_paths if new_head and p.startswith(("classifier/", "score/"))}
    rows = expand_names(family, spec, base_paths)
    by_name = {hf: (ours, layout) for hf, ours, layout in rows}

    files = _tensor_files(path)
    plan, ignored, unexpected = [], [], []
    for name, file in files.items():
        hf = name if name in by_name else family.base_prefix + name
        if hf in by_name:
            plan.append((name, file, *by_name[hf]))
        elif family.ignored(name, spec) or any(re.fullmatch(p, name) for p in ignore_unexpected):
            ignored.append(name)
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors for {family.architecture}: "
                         f"{sorted(unexpected)[:8]} ({len(unexpected)} in all); pass "
                         "ignore_unexpected=[regex, ...] to skip them")
    found = {ours for *_, ours, _ in plan}
    missing = [hf for hf, (ours, _) in by_name.items() if ours not in found | fresh_ok]
    if missing:
        raise ValueError(f"{path}: missing weight {missing[0]!r} for {family.architecture} "
                         f"({len(missing)} missing in all: {missing[:5]})")

    loaded = {ours: _read_converted(file, name, layout, full_abs[ours])
              for name, file, ours, layout in plan}
    initialized = sorted(p for p in trainable_abs if p not in loaded)
    if initialized:
        fresh = _flatten(init_trainable(spec, jax.random.key(0) if key is None else key))
        loaded.update({p: fresh[p] for p in initialized})
    trainable = _unflatten({p: loaded[p] for p in trainable_abs})
    frozen = _unflatten({p: loaded[p] for p in frozen_abs})
    info = HFInfo(architecture=family.architecture, config=config, spec=spec,
                  files=sorted({str(f) for f in files.values()}), ignored=sorted(ignored),
                  initialized=initialized, tokenizer=load_tokenizer(path) if tokenizer else None)
    return model_fns(spec), trainable, frozen, info


def _write_safetensors(file: Path, tensors: list[tuple[str, Any, str]]) -> None:
    """Writes (name, leaf, layout) as one safetensors file, fetching one leaf at a time.

    safetensors.numpy.save_file needs every tensor in host memory at once; the header only needs
    shapes and dtypes, so we write it first and then stream the data in row blocks.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, leaf, layout in tensors:
        shape = list(leaf.shape[::-1] if layout == "T" else leaf.shape)
        nbytes = leaf.size * leaf.dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[str(leaf.dtype)], "shape": shape,
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, leaf, layout in tensors:
            x = np.asarray(jax.device_get(leaf))  # a view on CPU
            x = x.T if layout == "T" else x
            step = max(1, READ_BLOCK_BYTES // max(1, x.itemsize * int(np.prod(x.shape[1:]))))
            for r0 in range(0, x.shape[0] if x.ndim else 1, step):
                np.ascontiguousarray(x[r0:r0 + step] if x.ndim else x).tofile(f)
            del x


def _split_adapters(params: Params) -> tuple[Params, Params]:
    """(lora_a/lora_b leaves, everything else) of one combined tree."""
    flat = _flatten(params)
    lora = {p: v for p, v in flat.items() if p.endswith(("/lora_a", "/lora_b"))}
    return _unflatten(lora), _unflatten({p: v for p, v in flat.items() if p not in lora})


def _export_config(family: Family, spec: ModelSpec, dtype: str, base: Optional[dict]) -> dict:
    config = {k: v for k, v in (base or {}).items() if k not in _DROP_FROM_CONFIG}
    config.update(family.to_config(spec, family.architecture))
    config.update(architectures=[family.architecture], model_type=family.model_type, dtype=dtype)
    return config


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer files present in src to dst; returns their names."""
    copied = [f for f in TOKENIZER_FILES if (Path(src) / f).is_file()]
    for f in copied:
        shutil.copyfile(Path(src) / f, Path(dst) / f)
    return copied


def save_hf(path: str | Path, spec: ModelSpec, params: Params, *,
            architecture: Optional[str] = None, base_config: Optional[dict] = None,
            tokenizer_dir: Optional[str | Path] = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Writes config.json and model.safetensors (sharded with an index past max_shard_bytes).

    params is the whole tree (combine(trainable, frozen)); LoRA adapters are merged into their
    kernels first. base_config (e.g. HFInfo.config) carries fields we do not model (token ids).
    """
    path = Path(path)
    family = family_for_spec(spec, architecture)
    if spec.lora is not None:
        params = merge_lora(spec, *_split_adapters(params))
        spec = dataclasses.replace(spec, lora=None)
    flat = _flatten(params)
    want = {p: tuple(x.shape) for p, x in _flatten(abstract_params(spec)[0]).items()}
    got = {p: tuple(x.shape) for p, x in flat.items()}
    if want != got:
        bad = sorted(set(want) ^ set(got)) + sorted(p for p in want if got.get(p, want[p]) != want[p])
        raise ValueError(f"save_hf: params do not fit {type(spec).__name__}: {bad[:5]}")
    dtypes = {str(x.dtype) for x in flat.values()}
    if len(dtypes) != 1 or not dtypes <= set(_ST_DTYPES):
        raise ValueError(f"save_hf: expected one dtype of {tuple(_ST_DTYPES)}, got {dtypes}")
    tensors = [(hf, flat[ours], layout) for hf, ours, layout in expand_names(family, spec, set(flat))]

    shards: list[list[tuple[str, Any, str]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t[1].size * t[1].dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        _write_safetensors(path / "model.safetensors", shards[0])
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            _write_safetensors(path / name, shard)
        index = {"metadata": {"total_size": sum(x.size * x.dtype.itemsize for _, x, _ in tensors)},
                 "weight_map": {hf: name for name, shard in zip(names, shards) for hf, _, _ in shard}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = _export_config(family, spec, dtypes.pop(), base_config)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, path)
    return path


def _peft_names(family: Family, spec: ModelSpec) -> dict[str, tuple[str, str]]:
    """Our param path -> (HF name, layout), plus module path -> (HF module name, "module")."""
    full = dataclasses.replace(spec, lora=None)
    paths = set(_flatten(abstract_params(full)[0]))
    out = {}
    for hf, ours, layout in expand_names(family, full, paths):
        out[ours] = (hf, layout)
        if ours.endswith("/kernel"):
            out[ours.rsplit("/", 1)[0]] = (hf.rsplit(".", 1)[0], "module")
    return out


def _target_modules(adapted: set[str], linear: set[str]) -> list[str]:
    """PEFT target_modules: short names when PEFT's suffix match selects exactly `adapted`."""
    short = {m.rsplit(".", 1)[-1] for m in adapted}
    hit = {m for m in linear if any(m == s or m.endswith("." + s) for s in short)}
    return sorted(short) if hit == adapted else sorted(adapted)


def save_peft_adapter(path: str | Path, spec: ModelSpec, trainable: Params,
                      base_model_name_or_path: str, *, architecture: Optional[str] = None) -> Path:
    """adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained.

    lora_a [in, r] -> lora_A.weight [r, in]; lora_b [r, out] -> lora_B.weight [out, r]; a task
    head in trainable goes to modules_to_save.
    """
    if spec.lora is None:
        raise ValueError("save_peft_adapter: spec.lora is None; there are no adapters to save")
    path = Path(path)
    family = family_for_spec(spec, architecture)
    names = _peft_names(family, spec)
    tensors, adapted, heads = {}, set(), set()
    for p, x in _flatten(trainable).items():
        module, leaf = p.rsplit("/", 1)
        x = np.asarray(jax.device_get(x))
        if leaf in ("lora_a", "lora_b"):
            hf_module = names[module][0]
            adapted.add(hf_module)
            tensors[f"base_model.model.{hf_module}.lora_{leaf[-1].upper()}.weight"] = x.T.copy()
        else:
            hf, layout = names[p]
            heads.add(hf.rsplit(".", 1)[0])
            tensors[f"base_model.model.{hf}"] = x.T.copy() if layout == "T" else x
    lora = spec.lora
    linear = {hf for hf, layout in names.values() if layout == "module"}
    config = {"peft_type": "LORA", "task_type": family.peft_task,
              "base_model_name_or_path": base_model_name_or_path, "r": lora.rank,
              "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": _target_modules(adapted, linear), "bias": "none",
              "fan_in_fan_out": family.model_type == "gpt2", "modules_to_save": sorted(heads) or None,
              "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def load_peft_adapter(path: str | Path, spec: ModelSpec, *,
                      architecture: Optional[str] = None) -> Params:
    """The trainable tree (adapters, heads) of spec from a PEFT LoRA adapter directory."""
    path = Path(path)
    config = _read_json(path / "adapter_config.json")
    lora = spec.lora
    if lora is None or (config.get("r"), float(config.get("lora_alpha"))) != (lora.rank, lora.alpha):
        raise ValueError(f"{path / 'adapter_config.json'}: r={config.get('r')}, lora_alpha="
                         f"{config.get('lora_alpha')} do not match spec.lora={lora}")
    names = _peft_names(family_for_spec(spec, architecture), spec)
    lookup = {}  # PEFT name -> (our path, transpose?)
    for ours, (hf, layout) in names.items():
        if layout == "module":
            lookup[f"base_model.model.{hf}.lora_A.weight"] = (f"{ours}/lora_a", True)
            lookup[f"base_model.model.{hf}.lora_B.weight"] = (f"{ours}/lora_b", True)
        else:
            lookup[f"base_model.model.{hf}"] = (ours, layout == "T")
    want = _flatten(abstract_params(spec)[0])
    out = {}
    with safe_open(str(path / "adapter_model.safetensors"), framework="numpy") as f:
        for name in f.keys():
            ours, transpose = lookup.get(name, (None, False))
            if ours not in want:
                raise ValueError(f"{path}: adapter tensor {name!r} has no place in {spec}")
            x = f.get_tensor(name)
            x = x.T if transpose else x
            out[ours] = jax.device_put(np.asarray(x, _NP_DTYPES[str(want[ours].dtype)]))
    missing = sorted(set(want) - set(out))
    if missing:
        raise ValueError(f"{path}: adapter misses {missing[:5]}")
    return _unflatten(out)
