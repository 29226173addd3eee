"""The persistent XLA compilation cache: compiled rounds are kept on disk, so a rerun, a resume or the
next job of a sweep loads them instead of compiling (`run.compile_cache_dir`)."""
from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger(__name__)
ENV = "JAX_COMPILATION_CACHE_DIR"


def cache_dir(setting: Optional[str]) -> Optional[str]:
    """Where the cache lives: the environment variable if set, else the setting ('auto' = the user's
    cache directory), else None (off)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    if not setting:
        return None
    if setting == "auto":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        setting = os.path.join(base, "fedjax_llm", "xla")
    return os.path.abspath(os.path.expanduser(setting))


def enable(setting: Optional[str]) -> Optional[str]:
    """Turns the cache on (before anything compiles); returns its directory. A directory that cannot be
    created turns it off with a warning: a cache must never stop a run."""
    import jax

    path = cache_dir(setting)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("run.compile_cache_dir: cannot create %s (%s); compiling without a cache", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path
