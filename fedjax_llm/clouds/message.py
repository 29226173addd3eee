"""Pytrees to bytes and back, without pickle: safetensors payload plus a structure digest.

Every leaf is stored under its key path ("layers/0/mlp/up_proj/kernel") with dtype and shape; bf16 is
carried as its uint16 bit pattern and restored bit for bit. Decoding against an expected structure
rejects any mismatch, naming the path.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

_META_KEY = "fedjax_llm"  # the one safetensors metadata key: its map order is not stable


class MessageError(ValueError):
    """A message that cannot be decoded into the expected pytree."""


def _key_str(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """[(path, leaf)] in tree-flatten order, paths joined with '/'."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(_key_str(k) for k in path), leaf) for path, leaf in flat]


def _describe(tree: Any) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(p, np.dtype(x.dtype).name, tuple(int(d) for d in x.shape)) for p, x in leaf_paths(tree)]


def structure_digest(tree: Any) -> str:
    """sha256 over the tree definition and every leaf's path, dtype and shape."""
    treedef = jax.tree_util.tree_structure(tree)
    text = json.dumps([str(treedef), _describe(tree)])
    return hashlib.sha256(text.encode()).hexdigest()


def encode(tree: Any, meta: Mapping[str, str] | None = None) -> bytes:
    """Serializes a pytree of arrays; the bytes are a deterministic function of the tree and meta."""
    arrays, dtypes = {}, {}
    for path, leaf in leaf_paths(tree):
        a = np.asarray(jax.device_get(leaf))
        dtypes[path] = a.dtype.name
        if a.dtype == ml_dtypes.bfloat16:
            a = a.view(np.uint16)
        arrays[path] = np.require(a, requirements='C')  # keeps 0-d arrays 0-d
    header = {"structure": structure_digest(tree), "dtypes": dtypes,
              "meta": {str(k): str(v) for k, v in (meta or {}).items()}}
    return st_save(arrays, metadata={_META_KEY: json.dumps(header, sort_keys=True)})


def read_header(data: bytes) -> dict:
    """Our header (structure digest, dtypes, user meta) of an encoded message, without the arrays."""
    if len(data) < 8:
        raise MessageError(f"message truncated: {len(data)} bytes, shorter than the 8-byte header size")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise MessageError(f"message truncated: header claims {n} bytes, {len(data) - 8} present")
    try:
        header = json.loads(json.loads(data[8:8 + n])["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise MessageError(f"message header unreadable: {type(e).__name__}: {e}") from None
    return header


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
              "U8": np.uint8, "BOOL": np.bool_}


def _views(data) -> dict[str, np.ndarray]:
    """The arrays of a safetensors payload as views into its buffer (no copy)."""
    mv = memoryview(data).cast("B")
    n = int.from_bytes(mv[:8], "little")
    out = {}
    for name, t in json.loads(bytes(mv[8:8 + n])).items():
        if name == "__metadata__":
            continue
        dt = np.dtype(_ST_DTYPES[t["dtype"]])
        begin, end = t["data_offsets"]
        if not 0 <= begin <= end <= len(mv) - 8 - n or (end - begin) % dt.itemsize:
            raise ValueError(f"tensor {name!r}: offsets {begin}..{end} outside the payload")
        a = np.frombuffer(mv, dt, count=(end - begin) // dt.itemsize, offset=8 + n + begin)
        out[name] = a.reshape(t["shape"])
    return out


def decode(data: bytes, like: Any, views: bool = False) -> tuple[Any, dict[str, str]]:
    """Bytes -> (pytree shaped like `like`, metadata); raises MessageError naming what differs. With
    `views`, the arrays are views into `data` (no copy: pass a buffer nothing else will change)."""
    header = read_header(data)
    expected = structure_digest(like)
    found = header.get("structure")
    try:
        arrays = _views(data) if views else st_load(data)
    except Exception as e:  # safetensors raises its own error types for corrupt payloads
        raise MessageError(f"message payload unreadable: {e}") from None
    dtypes = header.get("dtypes", {})
    leaves = []
    for path, dtype, shape in _describe(like):
        if path not in arrays:
            raise MessageError(f"structure mismatch: path {path!r} missing from the message")
        a = arrays[path]
        if dtypes.get(path) == "bfloat16":
            a = a.view(ml_dtypes.bfloat16)
        if a.dtype.name != dtype or tuple(a.shape) != shape:
            raise MessageError(f"structure mismatch at {path!r}: expected {dtype}{list(shape)}, "
                               f"got {a.dtype.name}{list(a.shape)}")
        leaves.append(a)
    extra = sorted(set(arrays) - {p for p, _, _ in _describe(like)})
    if extra:
        raise MessageError(f"structure mismatch: unexpected path {extra[0]!r} in the message")
    if found != expected:
        raise MessageError(f"structure digest mismatch: expected {expected[:16]}, got {str(found)[:16]}")
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
    return tree, dict(header.get("meta", {}))
