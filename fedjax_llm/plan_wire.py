"""Bytes of a message on the wire, from its abstract pytree: the planner's count of what a hop carries.

A message is `clouds.message.encode`'s safetensors payload (8-byte length, a JSON header padded with
spaces to a multiple of 8, then the raw tensors), optionally compressed first (`secure.compress`), and
with `secure.seal=true` wrapped by `secure.seal` (preamble, signed header, one 4-byte index and 16-byte
tag per chunk, trailer, signatures: `seal.sealed_size`). The header text is built here as safetensors
builds it (entries ordered by dtype, largest first, then by name), so the byte count is exact without
materialising a tensor; tests/test_plan.py checks it against real encodes and a real sealed round.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

from fedjax_llm.clouds.message import leaf_paths, structure_digest
from fedjax_llm.config import SecureConfig
from fedjax_llm.secure import compress as C
from fedjax_llm.secure.seal import SALT, SealHeader, sealed_size

_META_KEY = "fedjax_llm"
_ST_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
              "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64"}
RUN_ID_HEX = 16  # secure.round.make_channel: run id = f"{name}-{secrets.token_hex(8)}"


@functools.lru_cache(maxsize=None)
def _dtype_rank() -> dict[str, int]:
    """safetensors' order of dtypes in a header (it sorts by its dtype enum, largest first): read off a
    save of one 0-d tensor per dtype, so a different safetensors version cannot silently change it."""
    from safetensors.numpy import save

    arrays = {name: np.zeros((), np.dtype(name)) for name in _ST_DTYPES}
    data = save(arrays)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    order = [k for k in header if k != "__metadata__"]
    return {name: i for i, name in enumerate(order)}


def _entry(name: str, dtype: str, shape: tuple[int, ...], start: int, end: int) -> str:
    dims = ",".join(str(int(d)) for d in shape)
    return (f'{json.dumps(name, ensure_ascii=False)}:{{"dtype":"{_ST_DTYPES[dtype]}","shape":[{dims}],'
            f'"data_offsets":[{start},{end}]}}')


def encoded_size(tree: Any, meta: Optional[Mapping[str, str]] = None) -> int:
    """len(clouds.message.encode(tree, meta)) from shapes and dtypes alone."""
    leaves = []
    dtypes = {}
    for path, leaf in leaf_paths(tree):
        dtype = np.dtype(leaf.dtype).name
        dtypes[path] = dtype
        wire = "uint16" if np.dtype(leaf.dtype) == ml_dtypes.bfloat16 else dtype  # bf16 travels as its bits
        shape = tuple(int(d) for d in np.shape(leaf))
        leaves.append((path, wire, shape, int(np.prod(shape, dtype=np.int64)) * np.dtype(wire).itemsize))
    header = {"structure": structure_digest(tree), "dtypes": dtypes,
              "meta": {str(k): str(v) for k, v in (meta or {}).items()}}
    meta_text = json.dumps(json.dumps(header, sort_keys=True), ensure_ascii=False)
    rank = _dtype_rank()
    leaves.sort(key=lambda x: (rank[x[1]], x[0]))
    parts, offset = [f'"__metadata__":{{"{_META_KEY}":{meta_text}}}'], 0
    for path, wire, shape, nbytes in leaves:
        parts.append(_entry(path, wire, shape, offset, offset + nbytes))
        offset += nbytes
    text_bytes = len(("{" + ",".join(parts) + "}").encode("utf-8"))
    return 8 + text_bytes + (-text_bytes) % 8 + offset


def hop_bytes(tree: Any, *, secure: SecureConfig, sender: str, recipient: str, round: int, seq: int,
              run_name: str, compress: bool) -> tuple[int, int]:
    """(payload bytes, wire bytes) of one hop as the run's channel sends it (sealed or plaintext)."""
    if not secure.seal:
        meta = {"sender": sender, "recipient": recipient, "round": str(round)}
        n = encoded_size(tree, meta)
        return n, n
    spec = C.Compression(secure.compression) if compress else C.Compression()
    wire = tree if spec.method == "none" else C.wire_like(tree, spec)
    payload = encoded_size(wire)
    header = SealHeader(run_id=f"{run_name}-{'0' * RUN_ID_HEX}", sender=sender, recipient=recipient, round=int(round),
                        seq=int(seq), cipher=secure.cipher, chunk_bytes=secure.chunk_bytes,
                        count=-(-payload // secure.chunk_bytes), length=payload, structure=structure_digest(tree),
                        compression=spec.tag(), salt="0" * (2 * SALT))
    return payload, sealed_size(header)
