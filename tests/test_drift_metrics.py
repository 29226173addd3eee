"""Continual-learning metrics against matrices worked out by hand, and the per-phase held-out scores
against a NumPy recount."""
import math
import types

import numpy as np
import pytest

from fedjax_llm.drift.metrics import (accuracy_matrix, adaptation_rounds, average_accuracy, backward_transfer,
                                      continual_summary, forgetting, forward_transfer)
from fedjax_llm.drift.schedule import Schedule

# R[i, j]: accuracy on phase j's held-out set after phase i; b: the initial model's
R = np.array([[0.8, 0.1, 0.0],
              [0.5, 0.7, 0.2],
              [0.4, 0.6, 0.9]])
B = np.array([0.05, 0.10, 0.10])


def test_metrics_of_a_hand_computed_matrix():
    assert average_accuracy(R) == pytest.approx((0.4 + 0.6 + 0.9) / 3)
    # BWT: ((0.4 - 0.8) + (0.6 - 0.7)) / 2
    assert backward_transfer(R) == pytest.approx(-0.25)
    # FWT: ((0.1 - 0.10) + (0.2 - 0.10)) / 2
    assert forward_transfer(R, B) == pytest.approx(0.05)
    # forgetting: phase 0 best 0.8 -> 0.4, phase 1 best 0.7 -> 0.6: (0.4 + 0.1) / 2
    assert forgetting(R) == pytest.approx(0.25)


def test_forgetting_takes_the_best_earlier_score_not_the_diagonal():
    # phase 0 peaks after phase 1 (0.9), not when it was learnt (0.6): Chaudhry's max over l < T-1
    M = np.array([[0.6, 0.0, 0.0], [0.9, 0.8, 0.0], [0.3, 0.5, 0.7]])
    assert forgetting(M) == pytest.approx(((0.9 - 0.3) + (0.8 - 0.5)) / 2)
    assert backward_transfer(M) == pytest.approx(((0.3 - 0.6) + (0.5 - 0.8)) / 2)


def test_one_phase_has_no_transfer_or_forgetting():
    one = np.array([[0.7]])
    assert average_accuracy(one) == pytest.approx(0.7)
    assert backward_transfer(one) is None and forward_transfer(one, [0.1]) is None and forgetting(one) is None


SCHED = Schedule(names=("a", "b", "c"), starts=(1, 3, 5), ends=(2, 4, 6))


def _records():
    """Evaluations at every round of a 3-phase run of 2 rounds each, the rows of R at phase ends."""
    rows = {0: B, 1: [0.3, 0.0, 0.0], 2: R[0], 3: [0.6, 0.4, 0.1], 4: R[1], 5: [0.5, 0.6, 0.3], 6: R[2]}
    return [dict(round=r, eval_phase_acc=list(map(float, v))) for r, v in rows.items()]


def test_adaptation_rounds_count_from_each_phase_start():
    rounds = [r["round"] for r in _records()]
    scores = np.array([r["eval_phase_acc"] for r in _records()])
    # phase a reaches 0.5 at round 2 (its 2nd round), b at round 4 (0.7; 0.4 at round 3 is short),
    # c never within rounds 5-6 at 0.95
    assert adaptation_rounds(rounds, scores, SCHED, 0.5) == [2, 2, 2]
    assert adaptation_rounds(rounds, scores, SCHED, 0.35) == [2, 1, 2]
    assert adaptation_rounds(rounds, scores, SCHED, 0.95) == [None, None, None]
    # lower is better (perplexity): phase a's score 0.3 at round 1 is at or below 0.3
    assert adaptation_rounds(rounds, scores, SCHED, 0.3, higher_is_better=False)[0] == 1


def test_summary_reads_the_matrix_at_phase_ends():
    got, b = accuracy_matrix(_records(), SCHED, "eval_phase_acc")
    np.testing.assert_allclose(got, R)
    np.testing.assert_allclose(b, B)
    s = continual_summary(_records(), SCHED, 0.5, "classify")
    assert s["completed_phases"] == 3 and s["phase_ends"] == [2, 4, 6]
    assert s["average_accuracy"] == pytest.approx(average_accuracy(R))
    assert s["forgetting"] == pytest.approx(0.25) and s["backward_transfer"] == pytest.approx(-0.25)
    assert s["forward_transfer"] == pytest.approx(0.05) and s["adaptation_rounds"] == [2, 2, 2]


def test_summary_of_a_run_stopped_mid_schedule_covers_the_phases_it_finished():
    s = continual_summary(_records()[:5], SCHED, 0.5, "classify")  # rounds 0..4
    assert s["completed_phases"] == 2
    np.testing.assert_allclose(s["matrix"], R[:2, :2])
    assert s["backward_transfer"] == pytest.approx(0.5 - 0.8)


def test_language_modelling_uses_the_negative_loss():
    L = np.array([[2.0, 5.0], [3.0, 2.5]])  # held-out loss (lower is better)
    recs = [dict(round=0, eval_phase_loss=[6.0, 6.0], eval_phase_ppl=[math.exp(6.0)] * 2),
            dict(round=1, eval_phase_loss=list(L[0]), eval_phase_ppl=list(np.exp(L[0]))),
            dict(round=2, eval_phase_loss=list(L[1]), eval_phase_ppl=list(np.exp(L[1])))]
    sched = Schedule(names=("a", "b"), starts=(1, 2), ends=(1, 2))
    s = continual_summary(recs, sched, math.exp(2.6), "lm")
    assert s["average_loss"] == pytest.approx(2.75)
    assert s["forgetting"] == pytest.approx(3.0 - 2.0)        # loss rose by 1 nat on phase a
    assert s["backward_transfer"] == pytest.approx(-(3.0 - 2.0))
    assert s["forward_transfer"] == pytest.approx(-(5.0 - 6.0))  # phase b's loss fell 1 nat before it began
    assert s["adaptation_rounds"] == [1, 1]


def test_phase_scores_match_a_numpy_recount():
    from fedjax_llm.drift.phases import Drift

    rng = np.random.default_rng(0)
    N, T = 40, 3
    drift = Drift.__new__(Drift)
    drift.task, drift.schedule = "classify", SCHED
    drift.visible = rng.random((T, N)) < 0.5
    indices = rng.permutation(N)[:25]
    labels, pred = rng.integers(0, 4, 25), rng.integers(0, 4, 25)
    ev = types.SimpleNamespace(indices=indices, num_examples=25, labels=labels)
    out = drift.evaluate(ev, (None, pred), rnd=3)
    for t in range(T):
        hits = [pred[m] == labels[m] for m in range(25) if drift.visible[t, indices[m]]]
        assert out["eval_phase_acc"][t] == pytest.approx(sum(hits) / len(hits))
    assert out["phase"] == 1 and out["eval_current_acc"] == out["eval_phase_acc"][1]
    drift.task = "lm"
    loss, ntok = rng.random(25) * 10, rng.integers(1, 5, 25).astype(float)
    out = drift.evaluate(ev, (loss, ntok), rnd=6)
    for t in range(T):
        sel = [m for m in range(25) if drift.visible[t, indices[m]]]
        assert out["eval_phase_loss"][t] == pytest.approx(loss[sel].sum() / ntok[sel].sum())
    assert out["eval_current_ppl"] == pytest.approx(math.exp(out["eval_phase_loss"][2]))
