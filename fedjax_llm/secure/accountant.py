"""Privacy accounting of DP-FedAvg rounds with Google's `dp-accounting` (RDP or PLD).

Each round is a sampled Gaussian mechanism: Poisson sampling of clients with rate q (add/remove-one
neighbours), or fixed-size sampling of m of N clients without replacement (replace-one neighbours;
RDP only, as dp-accounting's PLD accountant has no such event). The state is a small JSON-able dict
(rounds so far and a run-length history of (noise multiplier, rate) pairs), so it checkpoints; epsilon
is recomputed from the history: RDP (Mironov, CSF 2017; Mironov et al. 2019 for the subsampled
Gaussian) or privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import dp_accounting as dpa
from dp_accounting import pld, rdp

KINDS, SAMPLINGS = ("rdp", "pld"), ("poisson", "fixed")
_NR = dpa.NeighboringRelation


class Accountant(NamedTuple):
    """init() -> state; update(state, noise_multiplier, rate, rounds=1) -> state."""

    init: Callable[[], dict]
    update: Callable[..., dict]


def accountant(kind: str = "rdp", sampling: str = "poisson", *, population: Optional[int] = None,
               orders: Optional[Sequence[float]] = None, pld_discretization: float = 1e-4) -> Accountant:
    """`rate` in update is q for Poisson sampling, the cohort size m (of `population`) for fixed."""
    if kind not in KINDS or sampling not in SAMPLINGS:
        raise ValueError(f"secure.accountant: kind {kind!r} / sampling {sampling!r}; choose kind in "
                         f"{KINDS} and sampling in {SAMPLINGS}")
    if sampling == "fixed":
        if kind != "rdp":
            raise ValueError("secure.accountant: fixed-size sampling is supported by the RDP accountant "
                             "only (dp-accounting's PLD has no sampling-without-replacement event)")
        if not population or population < 1:
            raise ValueError("secure.accountant: fixed-size sampling needs population >= 1")

    def init() -> dict:
        return {"version": 1, "kind": kind, "sampling": sampling, "population": population,
                "orders": list(orders) if orders is not None else None,
                "pld_discretization": pld_discretization, "rounds": 0, "history": []}

    def update(state: dict, noise_multiplier: float, rate: float, rounds: int = 1) -> dict:
        _check_step(state, noise_multiplier, rate, rounds)
        history = [list(h) for h in state["history"]]
        if history and history[-1][0] == noise_multiplier and history[-1][1] == rate:
            history[-1][2] += rounds
        else:
            history.append([float(noise_multiplier), rate, int(rounds)])
        return {**state, "rounds": state["rounds"] + rounds, "history": history}

    return Accountant(init, update)


def _check_step(state: dict, noise_multiplier: float, rate: float, rounds: int) -> None:
    if noise_multiplier < 0 or rounds < 0:
        raise ValueError(f"secure.accountant: noise_multiplier {noise_multiplier} and rounds {rounds} "
                         f"must be >= 0")
    if state["sampling"] == "poisson" and not 0 < rate <= 1:
        raise ValueError(f"secure.accountant: Poisson sampling rate q must be in (0, 1], got {rate}")
    if state["sampling"] == "fixed" and not (int(rate) == rate and 1 <= rate <= state["population"]):
        raise ValueError(f"secure.accountant: cohort size {rate} must be an integer in "
                         f"[1, population={state['population']}]")


def round_event(state: dict, noise_multiplier: float, rate: float) -> dpa.DpEvent:
    """The DpEvent of one round under this state's sampling scheme."""
    if noise_multiplier == 0:
        return dpa.NonPrivateDpEvent()
    gauss = dpa.GaussianDpEvent(noise_multiplier)
    if state["sampling"] == "poisson":
        return dpa.PoissonSampledDpEvent(rate, gauss)
    return dpa.SampledWithoutReplacementDpEvent(state["population"], int(rate), gauss)


def build(state: dict, extra: Sequence[tuple[float, float, int]] = ()) -> dpa.PrivacyAccountant:
    """A dp-accounting accountant with the state's history (and `extra` rounds) composed."""
    relation = _NR.ADD_OR_REMOVE_ONE if state["sampling"] == "poisson" else _NR.REPLACE_ONE
    if state["kind"] == "rdp":
        acc = rdp.RdpAccountant(state["orders"], neighboring_relation=relation)
    else:
        acc = pld.PLDAccountant(relation, value_discretization_interval=state["pld_discretization"])
    for z, rate, count in list(state["history"]) + list(extra):
        if count:
            acc.compose(round_event(state, z, rate), int(count))
    return acc


def epsilon(state: dict, delta: float, extra: Sequence[tuple[float, float, int]] = ()) -> float:
    """Epsilon spent so far (plus `extra` hypothetical rounds) at the given delta."""
    if not 0 < delta < 1:
        raise ValueError(f"secure.accountant: delta must be in (0, 1), got {delta}")
    if state["rounds"] == 0 and not any(c for *_, c in extra):
        return 0.0
    return float(build(state, extra).get_epsilon(delta))


def next_round_exceeds(state: dict, target_epsilon: float, delta: float, noise_multiplier: float,
                       rate: float) -> bool:
    """Whether one more round with these settings would take epsilon above target_epsilon."""
    return epsilon(state, delta, [(noise_multiplier, rate, 1)]) > target_epsilon


def rounds_until(state: dict, target_epsilon: float, delta: float, noise_multiplier: float, rate: float,
                 limit: int = 10**7) -> int:
    """How many more rounds with these settings keep epsilon <= target_epsilon (at most `limit`)."""
    _check_step(state, noise_multiplier, rate, 1)
    if noise_multiplier == 0 or epsilon(state, delta) > target_epsilon:
        return 0
    if state["kind"] == "rdp":  # RDP adds up over rounds: one curve per round, then cheap conversions
        now, one = build(state), build({**state, "history": []}, [(noise_multiplier, rate, 1)])
        eps_after = lambda k: rdp.rdp_privacy_accountant.compute_epsilon(
            now.orders, now.rdp + k * one.rdp, delta)[0]
    else:
        eps_after = lambda k: epsilon(state, delta, [(noise_multiplier, rate, k)])
    fits = lambda k: k == 0 or eps_after(k) <= target_epsilon
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit if fits(limit) else _bisect(fits, lo, limit)
    return _bisect(fits, lo, hi)


def _bisect(fits, lo: int, hi: int) -> int:
    """Largest k in [lo, hi) with fits(k), given fits(lo) and not fits(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def classic_rdp_epsilon(state: dict, delta: float) -> float:
    """eps = min_a RDP(a) + log(1/delta)/(a - 1) (Mironov 2017, Prop. 3): the conversion TF Privacy
    tutorials printed; dp-accounting's own get_epsilon uses the tighter Canonne et al. 2020 bound."""
    if state["kind"] != "rdp":
        raise ValueError("secure.accountant: classic_rdp_epsilon needs an RDP state")
    acc = build(state)
    return float(min(r + math.log(1 / delta) / (a - 1) for a, r in zip(acc.orders, acc.rdp) if a > 1))
