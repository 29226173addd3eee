"""Run outputs: one JSON line per round in metrics.jsonl, and summary.json at the end.

Each line is appended and fsync'ed once the round is complete; the checkpoint of a round carries the
records up to it, so a resumed run rewrites metrics.jsonl from them (atomically) and the file never
holds a duplicated, missing or half-written round for long. Write failures (full or read-only disk)
raise RunDirError naming the file.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

from fedjax_llm.errors import RunDirError
from fedjax_llm.files import atomic_write_text, describe_os_error


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends round records; on resume drops records past the restored round."""

    def __init__(self, path: str):
        self.path = path

    def records(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill mid-write ends the usable log
        return out

    def truncate(self, last_round: int) -> None:
        """Keeps records with round <= last_round (rewritten atomically)."""
        self.rewrite([r for r in self.records() if r.get("round", 0) <= last_round])

    def reset(self) -> None:
        self.rewrite([])

    def append(self, record: dict) -> None:
        line = json.dumps(_clean(record), sort_keys=True) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise RunDirError(f"cannot append round {record.get('round')} to "
                              f"{describe_os_error(e, self.path)}; the last checkpoint is intact, so fix "
                              "that and rerun to resume") from e

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replaces the file with `records` (atomically)."""
        atomic_write_text(self.path, "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in records))


def clean(value: Any) -> Any:
    """The JSON-safe form a record is written in (NaN/Inf -> None, numpy scalars -> numbers)."""
    return _clean(value)


def write_json(path: str, data: dict) -> None:
    """Writes `data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")
