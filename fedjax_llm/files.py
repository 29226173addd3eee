"""Small file helpers every writer of a run directory shares: atomic, durable writes and JSON reads
whose errors name the file.

An atomic write goes to a temporary file in the same directory, is flushed and fsync'ed, then
renamed over the target, so a reader (or a rerun after a kill) sees the old file or the new one,
never half of one. A failed write removes its temporary file and raises `RunDirError` naming the
file and the reason (no space left, read-only file system).
"""
from __future__ import annotations

import errno
import json
import os
from typing import Any

from fedjax_llm.errors import RunDirError

_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def describe_os_error(e: OSError, path: str) -> str:
    """'PATH: no space left on the device' for the errors a full or read-only disk raises."""
    why = _DISK_ERRNOS.get(e.errno or 0, e.strerror or str(e))
    return f"{path}: {why}"


def is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and (e.errno in _DISK_ERRNOS)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Replaces `path` with `text` all at once (temporary file, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise RunDirError(f"cannot write {describe_os_error(e, path)}") from e
    _fsync_dir(directory)


def atomic_write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str, what: str = "JSON file") -> Any:
    """Parses a JSON file; invalid JSON raises ValueError naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a valid {what}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid {what}: invalid JSON at line {e.lineno} column {e.colno} "
                         f"({e.msg})") from None
