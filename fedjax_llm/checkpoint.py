"""Orbax checkpoints of the whole round state, verified on restore.

The state is saved as a flat {path: array} item plus a JSON item holding the round and a sha256 digest
of every leaf. Restore walks from the newest step down: a step that fails to load or whose digest does
not match is skipped with a warning, so a corrupt or partial latest checkpoint falls back to the
previous one; when no step is valid the run stops with `CheckpointError` rather than loading garbage.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedjax_llm.clouds.message import leaf_paths

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a state that must not be written."""


def tree_digest(tree: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, leaf in leaf_paths(tree):
        a = np.require(np.asarray(jax.device_get(leaf)), requirements='C')
        h.update(f"{path}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


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
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, rnd: int) -> bool:
        return rnd % self.every == 0 or rnd == self.last_round

    def save(self, rnd: int, state: Any, meta: Optional[dict] = None) -> None:
        """Writes `state` as step `rnd`; refuses a state holding NaN/Inf."""
        if not _all_finite(state):
            raise CheckpointError(f"round {rnd}: refusing to checkpoint a state with NaN/Inf values")
        info = dict(meta or {}, round=rnd, digest=tree_digest(state))
        self.manager.save(rnd, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flat(state)), meta=ocp.args.JsonSave(info)), force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps(), reverse=True)

    def restore(self, like: Any) -> Optional[tuple[Any, dict]]:
        """Newest valid (state, meta) shaped like `like`; None when there is no checkpoint at all."""
        steps = self.steps()
        if not steps:
            return None
        treedef = jax.tree_util.tree_structure(like)
        failures = []
        for step in steps:
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_flat(like)), meta=ocp.args.JsonRestore()))
                flat, meta = got["state"], dict(got["meta"])
                leaves = [flat[k] for k in _flat(like)]
                state = jax.tree_util.tree_unflatten(treedef, leaves)
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                failures.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
                log.warning("checkpoint step %d in %s unreadable, trying an older one: %s",
                            step, self.directory, failures[-1])
                continue
            digest = tree_digest(state)
            if digest != meta.get("digest"):
                failures.append(f"step {step}: digest mismatch (stored {str(meta.get('digest'))[:12]}, "
                                f"computed {digest[:12]})")
                log.warning("checkpoint step %d in %s is corrupt (%s); trying an older one",
                            step, self.directory, failures[-1])
                continue
            if step != steps[0]:
                log.warning("resumed from step %d, not the newest step %d", step, steps[0])
            return state, meta
        raise CheckpointError(f"no valid checkpoint in {self.directory}: " + "; ".join(failures)
                              + ". Move the directory away to start over.")
