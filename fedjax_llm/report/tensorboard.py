"""TensorBoard event files of a run: every metrics.jsonl number as a scalar at step = round, per-cloud
numbers under clouds/<cloud>/, and the run's config on the hparams plugin; written with tensorboardX
(no TensorFlow) into RUN_DIR/tensorboard by process 0 only.

A resumed run purges the events past the round it resumed from (TensorBoard's SessionLog.START with
purge_step, the way metrics.jsonl is truncated), so no step is shown twice; a fresh start into an old
directory deletes the old event files, as metrics.jsonl is reset.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Iterable, Optional

DIRNAME = "tensorboard"
EVENTS = "events.out.tfevents.*"


def scalars(record: dict) -> dict[str, float]:
    """tag -> value of every finite number in one metrics.jsonl record (bools and lists left out)."""
    out = {}
    for key, value in record.items():
        if key == "round":
            continue
        if key == "clouds" and isinstance(value, dict):
            for cloud, values in value.items():
                for k, v in values.items():
                    if (x := _number(v)) is not None:
                        out[f"clouds/{cloud}/{k}"] = x
        elif (x := _number(value)) is not None:
            out[key] = x
    return out


def _number(v: Any) -> Optional[float]:
    """v as the float metrics.jsonl holds (numpy and 0-d array scalars unwrapped), or None."""
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        v = v.item()
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def hparams(cfg) -> dict[str, Any]:
    """The config flattened to dotted keys with values the hparams plugin takes (str, bool, number)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif value is None:
            flat[prefix] = "None"
        elif isinstance(value, (str, bool, int, float)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value, sort_keys=True, default=str)

    walk("", dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))
    return flat


def headline_tags(cfg) -> list[str]:
    """The scalar tags the hparams table shows beside each run's hyper-parameters."""
    evals = ["eval_acc", "eval_f1"] if cfg.data.task == "classify" else ["eval_ppl"]
    return [*evals, "eval_loss", "train_loss"] + (["epsilon"] if cfg.secure.dp.enabled else [])


class TensorBoardWriter:
    """Writes one run's rounds as TensorBoard scalars; a no-op when disabled or not process 0."""

    def __init__(self, writer=None):
        self._writer = writer

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    @classmethod
    def open(cls, run_dir: str, cfg, start_round: int, history: Iterable[dict] = ()) -> "TensorBoardWriter":
        """The writer of run_dir resuming after start_round; `history` (the metrics.jsonl records so far)
        is written when the directory holds no events yet (a fresh run, or TensorBoard newly enabled)."""
        if not cfg.run.tensorboard or not _is_main_process():
            return cls(None)
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams as hparams_summaries

        logdir = os.path.join(run_dir, DIRNAME)
        old = sorted(glob.glob(os.path.join(logdir, EVENTS)))
        fresh = start_round == 0 or not old
        if fresh:
            for path in old:
                os.remove(path)
        # File names are events.out.tfevents.<second>.<host><suffix>, read back in name order: the
        # sequence number keeps a resume within the same second after the files it purges.
        writer = SummaryWriter(logdir, purge_step=None if fresh else start_round + 1, flush_secs=30,
                               filename_suffix=f".{0 if fresh else len(old):04d}.{os.getpid()}")
        tb = cls(writer)
        if fresh:
            for summary in hparams_summaries(hparams(cfg), {tag: 0.0 for tag in headline_tags(cfg)}):
                writer.file_writer.add_summary(summary)
            for record in history:
                if int(record.get("round", 0)) <= start_round:
                    tb.log_round(record, flush=False)
            writer.flush()
        return tb

    def log_round(self, record: dict, flush: bool = True) -> None:
        if self._writer is None:
            return
        step = int(record["round"])
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, step)
        if flush:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _is_main_process() -> bool:
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is a dependency; the writer itself does not need it
        return True
    return jax.process_index() == 0


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] as TensorBoard shows it (purged steps dropped, a step written twice
    listed twice), via tensorboard's own reader (the `tensorboard` package, a test dependency)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_hparams(logdir: str) -> Optional[dict[str, Any]]:
    """The hparams plugin's session-start hyper-parameters of a run's events, or None."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams").get("_hparams_/session_start_info")
    if content is None:
        return None
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    out = {}
    for key, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind) if kind else None
    return out
