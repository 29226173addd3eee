"""summary.json: what a finished run reached, from its per-round records (metrics.jsonl)."""
from __future__ import annotations

from typing import Any, Optional


def _classification(initial: Optional[dict], history: list[dict]) -> dict:
    """Accuracy and macro-F1 at round 0 and at the end, and by round (classification runs only)."""
    if not history or "eval_acc" not in history[-1]:
        return {}
    return dict(initial_eval_acc=(initial or {}).get("eval_acc"), initial_eval_f1=(initial or {}).get("eval_f1"),
                final_eval_acc=history[-1]["eval_acc"], final_eval_f1=history[-1]["eval_f1"],
                eval_acc_by_round={r["round"]: r["eval_acc"] for r in history},
                eval_f1_by_round={r["round"]: r["eval_f1"] for r in history})


def build_summary(records: list[dict], rounds_completed: int, **facts: Any) -> dict:
    """The summary of a run whose records are `records` (round 0 = the evaluation before training);
    `facts` (name, seed, model sizes, channel, ...) are copied in as they are."""
    rounds = [r for r in records if r["round"] >= 1]
    history = [r for r in records if r.get("eval_loss") is not None]
    first = records[0] if records else None
    return dict(
        facts, complete=True, rounds_completed=rounds_completed,
        initial_eval_loss=first.get("eval_loss") if first else None,
        initial_eval_ppl=first.get("eval_ppl") if first else None,
        final_eval_loss=history[-1]["eval_loss"] if history else None,
        final_eval_ppl=history[-1].get("eval_ppl") if history else None,
        final_train_loss=rounds[-1]["train_loss"] if rounds else None,
        eval_ppl_by_round={r["round"]: r.get("eval_ppl") for r in history},
        **_classification(first, history),
        tokens=sum(r["tokens"] for r in rounds), round_wall_s=sum(r["wall_s"] for r in rounds),
        bytes_up=sum(c["bytes_up"] for r in rounds for c in r["clouds"].values()),
        bytes_down=sum(c["bytes_down"] for r in rounds for c in r["clouds"].values()),
        comm_s=sum(r["comm_s"] for r in rounds),
        nonfinite_dropped=sum(r["nonfinite_dropped"] for r in rounds))


def headline(record: Optional[dict]) -> dict:
    """The progress bar's eval figure: accuracy for classification, perplexity for language modelling."""
    if record is None:
        return {}
    if record.get("eval_acc") is not None:
        return dict(acc=f"{record['eval_acc']:.3f}")
    return dict(ppl=f"{record['eval_ppl']:.1f}") if record.get("eval_ppl") is not None else {}
