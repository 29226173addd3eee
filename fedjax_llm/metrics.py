"""Run outputs: one JSON line per round in metrics.jsonl, and summary.json at the end."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable


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
        keep = [r for r in self.records() if r.get("round", 0) <= last_round]
        self._write_all(keep)

    def reset(self) -> None:
        self._write_all([])

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record), sort_keys=True) + "\n")
            f.flush()

    def _write_all(self, records: Iterable[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(_clean(r), sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean(data), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
