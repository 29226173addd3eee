"""Secure aggregation across clouds as messages: each cloud runs its half, the aggregator its own.

The rounds of `secure.secagg` (Bonawitz et al., 2017) as typed pytrees with fixed shapes (C clouds),
which cross the transport sealed like every other message:

    cloud      KeyAd        -> aggregator    round 0: this round's public keys
    aggregator RosterMsg    -> clouds        who advertised, and their keys
    cloud      SharesMsg    -> aggregator    round 1: its Shamir shares, encrypted for each other cloud
    aggregator RoutedMsg    -> each cloud    the shares addressed to it; U2 = who shared
    cloud      MaskedUpdate -> aggregator    round 2: its masked sum (messages.py; cloud.py masks it)
    aggregator UnmaskRequest-> clouds        U3 = whose masked sum arrived
    cloud      RevealMsg    -> aggregator    round 3: shares of U3's self masks and of the others' keys

A cloud that dies after masking is recovered from the other clouds' shares of its pairwise key.
A cloud's secrets (`CloudSecAgg`) live only for the round, in the cloud; the aggregator holds only the
public roster.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from flax import struct

from fedjax_llm.config import SecAggConfig
from fedjax_llm.messages import MaskedUpdate, ProtocolError
from fedjax_llm.secure import secagg
from fedjax_llm.secure.secagg import FIELD_BYTES, KEY_BYTES, PAIRWISE, SELF, SHARE_CT_BYTES, Roster

_KINDS = {SELF: 1, PAIRWISE: 2}


def params_for(cfg: SecAggConfig, n: int) -> secagg.SecAggParams:
    """Ring parameters and threshold t for n parties (t > n / 2, so reconstructing sets overlap)."""
    t = max(n // 2 + 1, math.ceil(cfg.threshold * n))
    params = secagg.SecAggParams(threshold=t, clip_range=cfg.clip_range, frac_bits=cfg.frac_bits,
                                 ring_bits=cfg.ring_bits)
    params.check(n)
    return params


def session_id(rnd: int) -> bytes:
    return f"clouds/round {rnd}".encode()


@struct.dataclass
class KeyAd:
    round: jax.Array
    c_pk: jax.Array          # uint8[32]
    s_pk: jax.Array          # uint8[32]


@struct.dataclass
class RosterMsg:
    round: jax.Array
    present: jax.Array       # bool[C]: advertised keys
    c_pk: jax.Array          # uint8[C, 32]
    s_pk: jax.Array          # uint8[C, 32]


@struct.dataclass
class SharesMsg:
    round: jax.Array
    present: jax.Array       # bool[C]: rows holding a ciphertext
    ct: jax.Array            # uint8[C, SHARE_CT_BYTES]: row v is for cloud v


@struct.dataclass
class RoutedMsg:
    round: jax.Array
    holders: jax.Array       # bool[C]: U2
    ct: jax.Array            # uint8[C, SHARE_CT_BYTES]: row u is from cloud u


@struct.dataclass
class UnmaskRequest:
    round: jax.Array
    survivors: jax.Array     # bool[C]: U3


@struct.dataclass
class RevealMsg:
    round: jax.Array
    kind: jax.Array          # int8[C]: 1 share of the self-mask seed, 2 of the pairwise key, 0 none
    share: jax.Array         # uint8[C, FIELD_BYTES]


def _check(msg, rnd: int, where: str) -> None:
    if int(np.asarray(msg.round)) != rnd:
        raise ProtocolError(f"{where}: secure-aggregation message for round {int(np.asarray(msg.round))}, "
                            f"expected round {rnd}")


def _u8(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, np.uint8).copy()


def _names(mask, clouds: Sequence[str]) -> tuple[str, ...]:
    return tuple(c for c, on in zip(clouds, np.asarray(mask, bool)) if on)


def _roster(clouds: Sequence[str], msg: RosterMsg, params: secagg.SecAggParams, rnd: int) -> Roster:
    on = _names(msg.present, clouds)
    ads = {c: (bytes(np.asarray(msg.c_pk[i], np.uint8)), bytes(np.asarray(msg.s_pk[i], np.uint8)))
           for i, c in enumerate(clouds) if c in on}
    return secagg.make_roster(clouds, ads, params, session_id(rnd))


# ----- the cloud's half ------------------------------------------------------------------------------------
class CloudSecAgg:
    """One cloud's party in one round's secure sum; its secrets never leave it and are not checkpointed."""

    def __init__(self, cloud: str, clouds: Sequence[str], params: secagg.SecAggParams, rnd: int):
        self.clouds, self.round, self.params = list(clouds), rnd, params
        self.where = f"round {rnd}, cloud {cloud!r}"
        self.party = secagg.Party.new(cloud, params, session_id(rnd))

    def advertise(self) -> KeyAd:
        c_pk, s_pk = self.party.advertise()
        return KeyAd(round=np.int32(self.round), c_pk=_u8(c_pk), s_pk=_u8(s_pk))

    def share(self, msg: RosterMsg) -> SharesMsg:
        _check(msg, self.round, self.where)
        sent = self.party.share_keys(_roster(self.clouds, msg, self.params, self.round))
        C = len(self.clouds)
        ct = np.zeros((C, SHARE_CT_BYTES), np.uint8)
        for v, raw in sent.items():
            ct[self.clouds.index(v)] = _u8(raw)
        present = np.array([c in sent for c in self.clouds])
        return SharesMsg(round=np.int32(self.round), present=present, ct=ct)

    def receive(self, msg: RoutedMsg) -> bool:
        _check(msg, self.round, self.where)
        holders = _names(msg.holders, self.clouds)
        routed = {u: bytes(np.asarray(msg.ct[i], np.uint8)) for i, u in enumerate(self.clouds)
                  if u in holders and u != self.party.name}
        self.party.receive_shares(holders, routed)
        return True

    def mask(self, vector: np.ndarray) -> np.ndarray:
        return self.party.mask(vector)

    def reveal(self, msg: UnmaskRequest) -> RevealMsg:
        _check(msg, self.round, self.where)
        shares = self.party.reveal(_names(msg.survivors, self.clouds))
        C = len(self.clouds)
        kind, share = np.zeros(C, np.int8), np.zeros((C, FIELD_BYTES), np.uint8)
        for owner, (k, y) in shares.items():
            i = self.clouds.index(owner)
            kind[i], share[i] = _KINDS[k], _u8(y.to_bytes(FIELD_BYTES, "big"))
        return RevealMsg(round=np.int32(self.round), kind=kind, share=share)


# ----- the aggregator's half -------------------------------------------------------------------------------
def roster(clouds: Sequence[str], ads: Mapping[str, Optional[KeyAd]], params: secagg.SecAggParams,
           rnd: int) -> tuple[Roster, RosterMsg]:
    """Round 0: the clouds whose keys arrived (at least t, else SecAggError)."""
    C = len(clouds)
    c_pk, s_pk, present = np.zeros((C, KEY_BYTES), np.uint8), np.zeros((C, KEY_BYTES), np.uint8), np.zeros(C, bool)
    for i, c in enumerate(clouds):
        ad = ads.get(c)
        if ad is not None:
            _check(ad, rnd, f"round {rnd}, aggregator, keys of {c!r}")
            c_pk[i], s_pk[i], present[i] = np.asarray(ad.c_pk), np.asarray(ad.s_pk), True
    msg = RosterMsg(round=np.int32(rnd), present=present, c_pk=c_pk, s_pk=s_pk)
    return _roster(clouds, msg, params, rnd), msg


def route(roster_: Roster, shares: Mapping[str, Optional[SharesMsg]], rnd: int) -> tuple[tuple, dict]:
    """Round 1: U2 and, per cloud of U2, the ciphertexts addressed to it."""
    clouds = list(roster_.parties)
    sent = {}
    for u, msg in shares.items():
        if msg is not None and u in roster_.members:
            _check(msg, rnd, f"round {rnd}, aggregator, shares of {u!r}")
            sent[u] = {v: bytes(np.asarray(msg.ct[i], np.uint8)) for i, v in enumerate(clouds)
                       if bool(msg.present[i])}
    routed, holders = secagg.route(roster_, sent)
    out = {}
    for v in holders:
        ct = np.zeros((len(clouds), SHARE_CT_BYTES), np.uint8)
        for u, raw in routed[v].items():
            ct[clouds.index(u)] = _u8(raw)
        out[v] = RoutedMsg(round=np.int32(rnd), holders=np.array([c in holders for c in clouds]), ct=ct)
    return holders, out


def request(clouds: Sequence[str], holders: Sequence[str], updates: Mapping[str, Optional[MaskedUpdate]],
            rnd: int) -> UnmaskRequest:
    """Round 3's question: U3, the clouds of U2 whose masked sum arrived."""
    return UnmaskRequest(round=np.int32(rnd), survivors=np.array(
        [c in holders and updates.get(c) is not None for c in clouds]))


def unmask(roster_: Roster, holders: Sequence[str], updates: Mapping[str, Optional[MaskedUpdate]],
           reveals: Mapping[str, Optional[RevealMsg]], rnd: int) -> np.ndarray:
    """The sum over U3 of the clouds' vectors (float64), from the shares that arrived."""
    clouds = list(roster_.parties)
    names = {k: v for v, k in _KINDS.items()}
    masked = {c: np.asarray(u.masked) for c, u in updates.items() if u is not None and c in holders}
    got = {}
    for v, msg in reveals.items():
        if msg is None:
            continue
        _check(msg, rnd, f"round {rnd}, aggregator, shares revealed by {v!r}")
        got[v] = {clouds[i]: (names[int(k)], int.from_bytes(bytes(np.asarray(msg.share[i], np.uint8)), "big"))
                  for i, k in enumerate(np.asarray(msg.kind)) if int(k) in names}
    return secagg.unmask_sum(roster_, holders, masked, got)
