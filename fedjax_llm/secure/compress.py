"""Optional lossy compression of a pytree before sealing: bf16 casts or per-leaf symmetric int8.

The wire form is a flat dict keyed by leaf path, so it serializes with `clouds.message` as it is. Only
floating leaves with at least `min_size` elements are compressed: scalars such as aggregation weights,
token counts and small norm vectors stay exact. int8 stores round(x / s) with s = max|x| / 127 per leaf
(symmetric linear quantization, as in Jacob et al., CVPR 2018, without a zero point).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_dtypes
import numpy as np

from fedjax_llm.clouds.message import leaf_paths

METHODS = ("none", "bf16", "int8")
SCALE_SUFFIX = "#scale"


@dataclasses.dataclass(frozen=True)
class Compression:
    """method: none | bf16 | int8; leaves with fewer than min_size elements are sent exactly."""

    method: str = "none"
    min_size: int = 1024

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"secure.compression: method {self.method!r} unknown; choose one of {METHODS}")
        if self.min_size < 1:
            raise ValueError(f"secure.compression: min_size must be >= 1, got {self.min_size}")

    def tag(self) -> str:
        """'none' or 'method/min_size': what the sealed header carries, so the receiver decodes alike."""
        return "none" if self.method == "none" else f"{self.method}/{self.min_size}"

    @classmethod
    def from_tag(cls, tag: str) -> "Compression":
        method, _, size = tag.partition("/")
        try:
            return cls(method, int(size)) if size else cls(method)
        except ValueError as e:
            raise ValueError(f"compression tag {tag!r} unreadable: {e}") from None

    def applies(self, dtype, size: int) -> bool:
        dtype = np.dtype(dtype)
        if self.method == "none" or size < self.min_size or not _is_float(dtype):
            return False
        return not (self.method == "bf16" and dtype.itemsize <= 2)  # bf16/f16 leaves stay as they are


def _is_float(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def _int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32)
    amax = np.max(np.abs(x)) if x.size else x.dtype.type(0)
    scale = (amax / 127).astype(np.float32)
    q = np.rint(x / scale) if scale > 0 else np.zeros_like(x)
    return np.clip(q, -127, 127).astype(np.int8), scale


def compress(tree: Any, spec: Compression = Compression()) -> dict[str, np.ndarray]:
    """Pytree -> {path: array} wire form; int8 leaves add a float32 scale under path + '#scale'."""
    wire = {}
    for path, leaf in leaf_paths(tree):
        a = np.asarray(jax.device_get(leaf))
        if not spec.applies(a.dtype, a.size):
            wire[path] = a
        elif spec.method == "bf16":
            wire[path] = a.astype(ml_dtypes.bfloat16)
        else:
            wire[path], wire[path + SCALE_SUFFIX] = _int8(a)
    return wire


def wire_like(like: Any, spec: Compression = Compression()) -> dict[str, jax.ShapeDtypeStruct]:
    """The structure `compress(tree, spec)` has for a tree shaped like `like`, to decode against."""
    out = {}
    for path, leaf in leaf_paths(like):
        shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
        if not spec.applies(dtype, int(np.prod(shape))):
            out[path] = jax.ShapeDtypeStruct(shape, dtype)
        elif spec.method == "bf16":
            out[path] = jax.ShapeDtypeStruct(shape, ml_dtypes.bfloat16)
        else:
            out[path] = jax.ShapeDtypeStruct(shape, np.int8)
            out[path + SCALE_SUFFIX] = jax.ShapeDtypeStruct((), np.float32)
    return out


def decompress(wire: dict[str, np.ndarray], like: Any, spec: Compression = Compression()) -> Any:
    """Wire form -> a tree with `like`'s structure and dtypes."""
    leaves = []
    for path, leaf in leaf_paths(like):
        dtype, a = np.dtype(leaf.dtype), np.asarray(wire[path])
        if spec.applies(dtype, a.size) and spec.method == "int8":
            a = a.astype(np.float32) * np.asarray(wire[path + SCALE_SUFFIX], np.float32)
        leaves.append(a.astype(dtype, copy=False))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def compression_error(tree: Any, restored: Any) -> dict[str, dict[str, float]]:
    """Per leaf path: max abs error and relative L2 error ||a - b|| / ||a|| of a round trip."""
    out = {}
    for (path, a), (_, b) in zip(leaf_paths(tree), leaf_paths(restored)):
        a = np.asarray(a, np.float64)
        d = np.asarray(b, np.float64) - a
        ref = float(np.linalg.norm(a))
        err = float(np.linalg.norm(d))
        out[path] = {"max_abs": float(np.max(np.abs(d))) if d.size else 0.0,
                     "rel_l2": err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))}
    return out
