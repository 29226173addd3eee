"""Orbax checkpoints of the whole round state, verified on restore.

The state is saved as a flat {path: array} item plus a JSON item holding the round, a sha256 digest of
every leaf, the run's metrics records up to that round, and a digest of that JSON itself. Restore walks
from the newest step down: a step that fails to load or whose digests do not match is skipped. When an
older step is valid, the bad newer ones are moved aside to `checkpoints/corrupt/<step>` (kept for
inspection, and out of the way of the rounds the run will save again); when no step is valid the run
stops with `CheckpointError` naming every step and why, and nothing is moved.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedjax_llm.clouds.message import leaf_paths
from fedjax_llm.errors import CheckpointError
from fedjax_llm.files import describe_os_error, is_disk_error

log = logging.getLogger(__name__)
CORRUPT = "corrupt"
# The layout of the checkpointed state: 2 = the aggregator's state and every cloud's (simulate.py);
# steps without it were written before the round was split into its two halves.
STATE_FORMAT = 2


class FormatError(CheckpointError):
    """A checkpoint written by another version of fedjax_llm, not a damaged one."""


def tree_digest(tree: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, leaf in leaf_paths(tree):
        a = np.require(np.asarray(jax.device_get(leaf)), requirements='C')
        h.update(f"{path}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def meta_digest(meta: dict) -> str:
    """sha256 of the metadata JSON (canonical form, without the digest fields themselves)."""
    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flat(tree: Any) -> dict[str, Any]:
    # '.'-joined keys: orbax treats '/' in item keys as nesting.
    return {f"{i:05d}.{p.replace('/', '.')}": leaf for i, (p, leaf) in enumerate(leaf_paths(tree))}


def _all_finite(tree: Any) -> bool:
    leaves = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]
    return all(bool(np.all(np.isfinite(a.astype(np.float32))))
               for a in leaves if jnp.issubdtype(a.dtype, jnp.inexact))  # bf16 included


class Checkpointer:
    """Saves every `every` rounds (and the last), keeps the newest `keep`, restores with fallback."""

    def __init__(self, directory: str, every: int, keep: int, last_round: int):
        self.directory = os.path.abspath(directory)
        self.every, self.last_round = every, last_round
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=False)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoints: {describe_os_error(e, self.directory)}") from None

    def should_save(self, rnd: int) -> bool:
        return rnd % self.every == 0 or rnd == self.last_round

    def save(self, rnd: int, state: Any, meta: Optional[dict] = None) -> None:
        """Writes `state` as step `rnd`; refuses a state holding NaN/Inf. A full or read-only disk raises
        CheckpointError naming the step; the steps already on disk stay valid."""
        if not _all_finite(state):
            raise CheckpointError(f"round {rnd}: refusing to checkpoint a state with NaN/Inf values")
        info = dict(meta or {}, round=rnd, format=STATE_FORMAT, digest=tree_digest(state))
        info["meta_digest"] = meta_digest(info)
        try:
            self.manager.save(rnd, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_flat(state)), meta=ocp.args.JsonSave(info)), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # orbax and tensorstore wrap OS errors in their own types
            raise CheckpointError(f"cannot write checkpoint step {rnd} in {self.directory}: "
                                  f"{_disk_reason(e)}; the older steps are intact, so fix that and rerun "
                                  "to resume") from e

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps(), reverse=True)

    def _load(self, step: int, like: Any, treedef: Any) -> tuple[Any, dict]:
        """(state, meta) of one step; raises ValueError saying why the step is unusable, FormatError when
        another version of fedjax_llm wrote it."""
        try:
            stored = dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        except Exception:  # damaged metadata: reported below with the arrays
            stored = {"format": STATE_FORMAT}
        if stored.get("format", 1) != STATE_FORMAT:
            raise FormatError(f"{self.directory}: step {step} was written by another version of fedjax_llm "
                              f"(state format {stored.get('format', 1)}; this version reads {STATE_FORMAT}); "
                              "read or resume it with that version, or start over in a new directory")
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_flat(like)), meta=ocp.args.JsonRestore()))
            flat, meta = got["state"], dict(got["meta"])
            leaves = [flat[k] for k in _flat(like)]
            state = jax.tree_util.tree_unflatten(treedef, leaves)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise ValueError(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
        digest = tree_digest(state)
        if digest != meta.get("digest"):
            raise ValueError(f"arrays do not match their digest (stored {str(meta.get('digest'))[:12]}, "
                             f"computed {digest[:12]})")
        if "meta_digest" in meta and meta["meta_digest"] != meta_digest(meta):
            raise ValueError("metadata does not match its digest")
        return state, meta

    def restore(self, like: Any, quarantine: bool = True) -> Optional[tuple[Any, dict]]:
        """Newest valid (state, meta) shaped like `like`; None when there is no checkpoint at all. With
        `quarantine`, the invalid steps newer than the one restored move to checkpoints/corrupt/."""
        steps = self.steps()
        if not steps:
            return None
        treedef = jax.tree_util.tree_structure(like)
        failures: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, meta = self._load(step, like, treedef)
            except ValueError as e:
                failures.append((step, str(e)))
                log.warning("checkpoint step %d in %s is unusable: %s", step, self.directory, e)
                continue
            for bad, why in failures:
                if quarantine:
                    moved = self._quarantine(bad)
                    log.warning("moved the unusable checkpoint step %d to %s (%s)", bad, moved, why)
            if failures:
                log.warning("resumed from checkpoint step %d, not the newest step %d", step, steps[0])
            return state, meta
        raise CheckpointError(f"no usable checkpoint in {self.directory}: "
                              + "; ".join(f"step {s}: {why}" for s, why in failures)
                              + ". Nothing was changed; to start this run over, move the checkpoints directory "
                              "away and rerun")

    def _quarantine(self, step: int) -> str:
        """Moves step `step` to checkpoints/corrupt/<step> (or <step>.N when that exists)."""
        target_dir = os.path.join(self.directory, CORRUPT)
        os.makedirs(target_dir, exist_ok=True)
        target, n = os.path.join(target_dir, str(step)), 1
        while os.path.exists(target):
            target, n = os.path.join(target_dir, f"{step}.{n}"), n + 1
        shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target


def _disk_reason(e: BaseException) -> str:
    """The reason a write failed, in words: 'no space left on the device' for a full disk."""
    first, seen = e, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if is_disk_error(e):
            return describe_os_error(e, getattr(e, "filename", None) or "checkpoint")
        text = str(e)
        for marker, why in (("No space left", "no space left on the device"),
                            ("Read-only file system", "read-only file system"),
                            ("Permission denied", "permission denied")):
            if marker in text:
                return why
        e = e.__cause__ or e.__context__
    return f"{type(first).__name__}: {str(first).splitlines()[0][:300] if str(first) else ''}"
