"""Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017): each party runs its own half of the protocol, the server its own.

Semi-honest variant over the complete graph (SecAgg+, Bell et al. CCS 2020, would restrict pairs to a
sparse graph). One session computes one sum:

    round 0  party  advertise() -> (c_pk, s_pk)           server  make_roster(ads): >= t parties
    round 1  party  share_keys(roster) -> {v: E(shares)}  server  route(): U2 = the parties that shared
             party  receive_shares(U2, {u: E(shares)})
    round 2  party  mask(x) -> y                          server  U3 = the parties whose y arrived
    round 3  party  reveal(U3) -> shares                  server  unmask_sum(): the sum over U3

y_u = x_u + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) in the ring (secure/ring.py);
s_uv comes from X25519 agreement + HKDF, the PRG is AES-256-CTR. Each party t-of-n Shamir-shares its
pairwise private key and self-mask seed; the shares travel through the server encrypted (AES-GCM under a
key agreed from the two parties' c keys, bound to the session and both names). For a dropped party the
survivors reveal shares of its pairwise key, for a survivor shares of b_u, never both for one party.
All keys, seeds and coefficients come from `randbytes` (the OS CSPRNG by default), never from a JAX key,
so masks cannot be recomputed from a checkpoint.

`setup`/`mask`/`unmask` run every party's half in one process (a cloud's clients, tests and
benchmarks); across clouds the same halves run in each party (secure/protocol.py carries them).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedjax_llm.secure.ring import (FIELD_BYTES, PRIME, SecAggError, SecAggParams, decode, encode,
                                    encode_masked, lagrange_at_zero, prg, prg_scratch, shamir_combine,
                                    shamir_split)

__all__ = [  # the protocol, and the ring's names its callers use
    "Party", "Roster", "SecAggSession", "make_roster", "route", "unmask_sum", "setup", "mask", "unmask",
    "SecAggError", "SecAggParams", "FIELD_BYTES", "PRIME", "encode", "decode", "prg", "prg_scratch",
    "shamir_split", "shamir_combine", "lagrange_at_zero", "X25519PrivateKey"]

_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
KEY_BYTES = 32
SHARE_CT_BYTES = 2 * FIELD_BYTES + 16  # two field elements and the AES-GCM tag
SELF, PAIRWISE = "self", "pairwise"


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, None, b"fedjax_llm/secagg/v1\0" + info).derive(secret)


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(**_RAW)


def _private_int(key: X25519PrivateKey) -> int:
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return int.from_bytes(raw, "big")


@dataclasses.dataclass(frozen=True)
class Roster:
    """Round 0's outcome, public: who may take part (fixed order: Shamir x = index + 1) and the keys of
    those that advertised."""

    session_id: bytes
    parties: tuple[str, ...]
    c_pub: Mapping[str, bytes]
    s_pub: Mapping[str, bytes]
    params: SecAggParams

    def index(self, party: str) -> int:
        try:
            return self.parties.index(party)
        except ValueError:
            raise SecAggError(f"secagg: party {party!r} is not in this session ({list(self.parties)})") from None

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(u for u in self.parties if u in self.s_pub)


def _pair_seed(own: X25519PrivateKey, peer_pub: bytes, roster, u: str, v: str) -> bytes:
    a, b = sorted((u, v), key=roster.index)
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    return _hkdf(shared, roster.session_id + b"\0pair\0" + a.encode() + b"\0" + b.encode())


def _share_box(own_c: X25519PrivateKey, peer_c: bytes, session_id: bytes, u: str, v: str) -> AESGCM:
    shared = own_c.exchange(X25519PublicKey.from_public_bytes(peer_c))
    return AESGCM(_hkdf(shared, session_id + b"\0share\0" + u.encode() + b"\0" + v.encode()))


def _short(n: int, t: int, got: int, what: str, missing) -> str:
    return (f"secagg: only {got} of {n} parties {what} (threshold {t}): {n - got} dropped, more than "
            f"n - t = {n - t}; the sum cannot be recovered (missing: {sorted(missing)})")


# ----- one party's half ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Party:
    """One party's secrets for one session; they never leave the party and are never checkpointed."""

    name: str
    session_id: bytes
    params: SecAggParams
    c_sk: X25519PrivateKey   # encrypts shares in transit
    s_sk: X25519PrivateKey   # pairwise mask agreement
    b_seed: bytes            # self-mask seed
    roster: Optional[Roster] = None
    holders: tuple[str, ...] = ()   # U2: the parties that shared keys; pairwise masks run over them
    shares: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # owner -> (s_y, b_y)
    masked: bool = False
    revealed: dict[str, str] = dataclasses.field(default_factory=dict)  # owner -> SELF | PAIRWISE

    @classmethod
    def new(cls, name: str, params: SecAggParams, session_id: bytes = b"",
            randbytes: Callable[[int], bytes] = os.urandom) -> "Party":
        return cls(name, bytes(session_id), params, X25519PrivateKey.from_private_bytes(randbytes(32)),
                   X25519PrivateKey.from_private_bytes(randbytes(32)), randbytes(32))

    def advertise(self) -> tuple[bytes, bytes]:
        """Round 0: (c_pk, s_pk)."""
        return _public(self.c_sk), _public(self.s_sk)

    def share_keys(self, roster: Roster, randbytes: Callable[[int], bytes] = os.urandom) -> dict[str, bytes]:
        """Round 1: the encrypted shares of s_sk and b_u for every other member (this party keeps its own)."""
        u = self.name
        if roster.session_id != self.session_id or roster.s_pub.get(u) != _public(self.s_sk):
            raise SecAggError(f"secagg: party {u!r}: the roster is for another session or lacks its key")
        self.roster = roster
        n, t = len(roster.parties), self.params.threshold
        s_sh = shamir_split(_private_int(self.s_sk), n, t, randbytes)
        b_sh = shamir_split(int.from_bytes(self.b_seed, "big"), n, t, randbytes)
        out = {}
        for v in roster.members:
            k = roster.index(v)
            body = s_sh[k][1].to_bytes(FIELD_BYTES, "big") + b_sh[k][1].to_bytes(FIELD_BYTES, "big")
            if v == u:
                self.shares[u] = (s_sh[k][1], b_sh[k][1])
                continue
            aad = roster.session_id + b"\0" + u.encode() + b"\0" + v.encode()
            out[v] = _share_box(self.c_sk, roster.c_pub[v], roster.session_id, u, v).encrypt(bytes(12), body, aad)
        return out

    def receive_shares(self, holders: Sequence[str], routed: Mapping[str, bytes]) -> None:
        """Round 1, as routed by the server: decrypts and keeps the shares of every other party in U2."""
        u, roster = self.name, self.roster
        if roster is None:
            raise SecAggError(f"secagg: party {u!r} received shares before sharing its own keys")
        if u not in holders:
            raise SecAggError(f"secagg: party {u!r} is not among the parties that shared keys {list(holders)}")
        for v in holders:
            if v == u:
                continue
            if v not in routed:
                raise SecAggError(f"secagg: party {u!r}: no share from {v!r}, which the server listed in U2")
            aad = roster.session_id + b"\0" + v.encode() + b"\0" + u.encode()
            try:
                body = _share_box(self.c_sk, roster.c_pub[v], roster.session_id, v, u).decrypt(
                    bytes(12), bytes(routed[v]), aad)
            except (InvalidTag, KeyError, ValueError):
                raise SecAggError(f"secagg: party {u!r}: the share from {v!r} fails authentication") from None
            self.shares[v] = (int.from_bytes(body[:FIELD_BYTES], "big"), int.from_bytes(body[FIELD_BYTES:], "big"))
        self.holders = tuple(v for v in roster.parties if v in holders)

    def mask(self, vector) -> np.ndarray:
        """Round 2: encode(clip(vector)) + self mask + signed pairwise masks with U2, in the ring."""
        u, params, roster = self.name, self.params, self.roster
        if u not in self.holders:
            raise SecAggError(f"secagg: party {u!r} holds no shares of this session; it cannot mask")
        if self.masked:
            raise SecAggError(f"secagg: party {u!r} already masked an input in this session; masks are "
                              f"one-time pads, run setup again for a new input")
        x = np.asarray(vector)
        if x.ndim != 1:
            raise SecAggError(f"secagg: party {u!r}: input must be a flat vector, got shape {x.shape}")
        dim, dt, i = x.shape[0], params.dtype, roster.index(u)
        total, scratch = prg(self.b_seed, dim, dt).copy(), prg_scratch(dim, dt)
        for v in self.holders:
            if v != u:
                m = prg(_pair_seed(self.s_sk, roster.s_pub[v], roster, u, v), dim, dt, scratch)
                (np.add if i < roster.index(v) else np.subtract)(total, m, out=total)
        self.masked = True
        return encode_masked(x, total, params)

    def reveal(self, survivors: Sequence[str]) -> dict[str, tuple[str, int]]:
        """Round 3: for each party of U2 its share of b (a survivor) or of s_sk (dropped), never both."""
        u, t = self.name, self.params.threshold
        n = len(self.roster.parties) if self.roster else 0
        outside = sorted(set(survivors) - set(self.holders))
        if outside:
            raise SecAggError(f"secagg: party {u!r}: survivors {outside} did not share keys in this session")
        if len(set(survivors)) < t:
            raise SecAggError(_short(n, t, len(set(survivors)), "sent masked inputs", set(self.roster.parties)
                                     - set(survivors)) + f"; party {u!r} reveals nothing")
        out = {}
        for owner in self.holders:
            kind = SELF if owner in survivors else PAIRWISE
            if self.revealed.get(owner, kind) != kind:
                raise SecAggError(
                    f"secagg: party {owner!r} was treated as dropped in this session; revealing its self-mask "
                    f"seed too would expose its input" if kind == SELF else
                    f"secagg: party {owner!r} had its self-mask seed revealed in this session; revealing its "
                    f"pairwise key too would expose its input")
            self.revealed[owner] = kind
            out[owner] = (kind, self.shares[owner][0 if kind == PAIRWISE else 1])
        return out


# ----- the server's half ----------------------------------------------------------------------------------
def make_roster(parties: Sequence[str], ads: Mapping[str, tuple[bytes, bytes]], params: SecAggParams,
                session_id: bytes) -> Roster:
    """Round 0 at the server: the advertised keys of at least t of `parties`."""
    parties = tuple(parties)
    if len(set(parties)) != len(parties):
        raise SecAggError(f"secagg: duplicate party names in {list(parties)}")
    params.check(len(parties))
    unknown = sorted(set(ads) - set(parties))
    if unknown:
        raise SecAggError(f"secagg: keys advertised by parties outside the session: {unknown}")
    for u, (c, s) in ads.items():
        if len(c) != KEY_BYTES or len(s) != KEY_BYTES:
            raise SecAggError(f"secagg: party {u!r} advertised keys of {len(c)} and {len(s)} bytes, expected 32")
    if len(ads) < params.threshold:
        raise SecAggError(_short(len(parties), params.threshold, len(ads), "advertised keys",
                                 set(parties) - set(ads)))
    order = [u for u in parties if u in ads]
    return Roster(bytes(session_id), parties, {u: bytes(ads[u][0]) for u in order},
                  {u: bytes(ads[u][1]) for u in order}, params)


def route(roster: Roster, sent: Mapping[str, Mapping[str, bytes]]) -> tuple[dict[str, dict[str, bytes]], tuple]:
    """Round 1 at the server: U2 (the members that sent shares) and, per member of U2, the
    ciphertexts addressed to it."""
    holders = tuple(u for u in roster.members if u in sent)
    if len(holders) < roster.params.threshold:
        raise SecAggError(_short(len(roster.parties), roster.params.threshold, len(holders), "shared keys",
                                 set(roster.parties) - set(holders)))
    routed = {v: {u: sent[u][v] for u in holders if u != v and v in sent[u]} for v in holders}
    return routed, holders


def unmask_sum(roster: Roster, holders: Sequence[str], masked: Mapping[str, np.ndarray],
               reveals: Mapping[str, Mapping[str, tuple[str, int]]]) -> np.ndarray:
    """Round 3 at the server: the sum (float64, to the fixed-point step) of the inputs in `masked`,
    from the shares that at least t parties of U3 revealed."""
    params, n, t = roster.params, len(roster.parties), roster.params.threshold
    unknown = sorted(set(masked) - set(holders))
    if unknown:
        raise SecAggError(f"secagg: masked inputs from parties outside the session: {unknown}")
    sent = [u for u in holders if u in masked]
    dropped = [u for u in holders if u not in masked]
    late = sorted(set(reveals) - set(sent))
    if late:
        raise SecAggError(f"secagg: survivors {late} sent no masked input")
    answering = [v for v in sent if v in reveals]
    if len(answering) < t:
        raise SecAggError(_short(n, t, len(answering), "answered the unmasking round", set(roster.parties)
                                 - set(answering)))
    dims = {np.shape(masked[u]) for u in sent}
    if len(dims) != 1:
        raise SecAggError(f"secagg: masked inputs differ in shape: {sorted(dims)}")
    (dim,) = dims.pop()
    responders = answering[:t]
    lam = lagrange_at_zero([roster.index(v) + 1 for v in responders])

    def recover(owner: str, kind: str) -> bytes:
        ys = []
        for v in responders:
            got = reveals[v].get(owner)
            if got is None or got[0] != kind:
                raise SecAggError(f"secagg: party {v!r} revealed {got[0] if got else 'nothing'} for {owner!r}, "
                                  f"expected its {kind} share")
            ys.append(got[1])
        return (sum(l * y for l, y in zip(lam, ys)) % PRIME).to_bytes(32, "big")

    dt = params.dtype
    total = np.array(masked[sent[0]], dt)
    for u in sent[1:]:
        np.add(total, np.asarray(masked[u], dt), out=total)
    scratch = prg_scratch(dim, dt)
    for u in sent:
        np.subtract(total, prg(recover(u, SELF), dim, dt, scratch), out=total)
    for u in dropped:
        s_sk = X25519PrivateKey.from_private_bytes(recover(u, PAIRWISE))
        if _public(s_sk) != roster.s_pub[u]:
            raise SecAggError(f"secagg: shares of dropped party {u!r}'s key are inconsistent")
        i = roster.index(u)
        for v in sent:  # y_v holds +p_uv if v < u else -p_uv; remove it
            m = prg(_pair_seed(s_sk, roster.s_pub[v], roster, u, v), dim, dt, scratch)
            (np.subtract if roster.index(v) < i else np.add)(total, m, out=total)
    return decode(total, params)


# ----- every party in one process ---------------------------------------------------------------------
@dataclasses.dataclass
class SecAggSession:
    """One aggregation with every party's half in this process: `_private` is what each party keeps
    locally; `traffic` counts protocol bytes (keys, encrypted shares, masked vectors, revealed shares)."""

    params: SecAggParams
    parties: tuple[str, ...]
    roster: Roster
    holders: tuple[str, ...]
    _private: dict[str, Party] = dataclasses.field(repr=False)
    traffic: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def session_id(self) -> bytes:
        return self.roster.session_id

    @property
    def s_pub(self) -> Mapping[str, bytes]:
        return self.roster.s_pub

    def index(self, party: str) -> int:
        return self.roster.index(party)


def setup(parties: Sequence[str], params: SecAggParams, *, session_id: bytes | str = b"",
          randbytes: Callable[[int], bytes] = os.urandom) -> SecAggSession:
    """Rounds 0-1 for parties that all live in this process; `session_id` (e.g. run id + round)
    separates sessions, whose keys are fresh anyway."""
    parties = tuple(parties)
    sid = session_id.encode() if isinstance(session_id, str) else bytes(session_id)
    if len(set(parties)) != len(parties):
        raise SecAggError(f"secagg: duplicate party names in {list(parties)}")
    params.check(len(parties))
    private = {u: Party.new(u, params, sid, randbytes) for u in parties}
    roster = make_roster(parties, {u: p.advertise() for u, p in private.items()}, params, sid)
    routed, holders = route(roster, {u: p.share_keys(roster, randbytes) for u, p in private.items()})
    for v in holders:
        private[v].receive_shares(holders, routed[v])
    n = len(parties)
    traffic = dict(keys=n * 2 * KEY_BYTES * (1 + n), masked=0, revealed=0,
                   shares=2 * sum(len(ct) for cts in routed.values() for ct in cts.values()))
    return SecAggSession(params, parties, roster, holders, private, traffic)


def mask(session: SecAggSession, party: str, vector) -> np.ndarray:
    """Party's masked input (round 2)."""
    session.index(party)
    y = session._private[party].mask(vector)
    session.traffic["masked"] += y.nbytes
    return y


def unmask(session: SecAggSession, masked: Mapping[str, np.ndarray],
           survivors: Optional[Sequence[str]] = None) -> np.ndarray:
    """Sum of the inputs in `masked` (float64, to the fixed-point step), removing every mask.

    Parties absent from `masked` dropped before sending; `survivors` (default: all of `masked`) answer
    the unmasking round with their shares. Needs at least `threshold` of them.
    """
    unknown = sorted(set(masked) - set(session.parties))
    if unknown:
        raise SecAggError(f"secagg: masked inputs from parties outside the session: {unknown}")
    sent = [u for u in session.holders if u in masked]
    answering = list(sent if survivors is None else survivors)
    late = sorted(set(answering) - set(sent))
    if late:
        raise SecAggError(f"secagg: survivors {late} sent no masked input")
    reveals = {v: session._private[v].reveal(sent) for v in answering}
    session.traffic["revealed"] += len(answering) * len(session.holders) * FIELD_BYTES
    return unmask_sum(session.roster, session.holders, masked, reveals)
