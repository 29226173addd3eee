"""Secure aggregation by pairwise additive masking with double masking and dropout recovery.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017,
semi-honest variant over the complete graph (SecAgg+, Bell et al. CCS 2020, would restrict pairs to a
sparse graph). Values are clipped to [-clip_range, clip_range] and encoded to fixed point with
`frac_bits` fractional bits in Z_{2^ring_bits}. Party u sends y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv)
- sum_{v<u} PRG(s_uv); s_uv comes from X25519 agreement + HKDF, the PRG is AES-256-CTR. Each party's
self-mask seed b_u and pairwise private key are t-of-n Shamir-shared; for a dropped party the
survivors reveal shares of its pairwise key, for a survivor shares of b_u, never both.
Encoding plus mask addition is one jitted JAX function in Z_2^32 (the 2^64 ring runs in NumPy: JAX
without x64 has no uint64); PRG expansion and the server's ring sums are host NumPy, where the bytes are.

Shamir sharing is written here over the prime field GF(2^521 - 1) with Python integers: `cryptography`
offers no secret sharing, and it is polynomial arithmetic, not a cipher; its randomness comes from the
`randbytes` source (the OS CSPRNG by default). All keys, seeds and coefficients come from that source,
never from a JAX key, so masks cannot be recomputed from a checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # Mersenne prime: any 32-byte secret is a field element
FIELD_BYTES = 66
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


class SecAggError(ValueError):
    """A secure-aggregation configuration or run that cannot give a correct, private sum."""


@dataclasses.dataclass(frozen=True)
class SecAggParams:
    """t-of-n threshold, clipping range, fixed-point fractional bits and ring size (32 or 64 bits)."""

    threshold: int
    clip_range: float = 1.0
    frac_bits: int = 16
    ring_bits: int = 32

    @property
    def dtype(self):
        return np.uint32 if self.ring_bits == 32 else np.uint64

    @property
    def max_code(self) -> int:
        """Largest |fixed-point code| of one clipped value."""
        return int(np.ceil(float(np.float32(self.clip_range)) * 2.0**self.frac_bits))

    def check(self, n: int) -> None:
        """Raises SecAggError for a threshold or a ring that cannot hold the sum of n clipped inputs."""
        if self.ring_bits not in (32, 64):
            raise SecAggError(f"secagg.ring_bits: must be 32 or 64, got {self.ring_bits}")
        if not (self.clip_range > 0 and np.isfinite(self.clip_range)) or not 0 <= self.frac_bits <= 52:
            raise SecAggError(f"secagg: clip_range must be finite and > 0 and frac_bits in [0, 52], got "
                              f"clip_range={self.clip_range}, frac_bits={self.frac_bits}")
        if n < 2:
            raise SecAggError(f"secagg: needs at least 2 parties, got {n}")
        if not n // 2 < self.threshold <= n:
            raise SecAggError(f"secagg.threshold: {self.threshold} with {n} parties; must be in "
                              f"({n // 2}, {n}] so that any two reconstructing sets of parties overlap")
        bound = n * self.max_code
        if bound >= 2 ** (self.ring_bits - 1):
            raise SecAggError(
                f"secagg: overflow: {n} parties x clip_range {self.clip_range} x 2^{self.frac_bits} "
                f"(frac_bits) = {bound:.3g} codes, but ring_bits={self.ring_bits} holds signed sums "
                f"below 2^{self.ring_bits - 1} = {2.0 ** (self.ring_bits - 1):.3g}; lower clip_range or "
                f"frac_bits, or use ring_bits=64")

    @property
    def step(self) -> float:
        """The fixed-point step: each input is rounded to a multiple of it."""
        return 2.0 ** -self.frac_bits


# ----- Shamir secret sharing over GF(PRIME) ----------------------------------------------------------
def _rand_field(randbytes: Callable[[int], bytes]) -> int:
    return int.from_bytes(randbytes(FIELD_BYTES + 16), "big") % PRIME  # bias < 2^-128


def shamir_split(secret: int, n: int, t: int, randbytes=os.urandom) -> list[tuple[int, int]]:
    """n shares (x, f(x)), x = 1..n, of a random degree t-1 polynomial with f(0) = secret."""
    if not 0 <= secret < PRIME:
        raise SecAggError("secagg: Shamir secret outside the field")
    coeffs = [secret] + [_rand_field(randbytes) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients l_j with f(0) = sum_j l_j f(x_j) for any polynomial of degree < len(xs)."""
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num, den = num * xm % PRIME, den * (xm - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return out


def shamir_combine(shares: Sequence[tuple[int, int]]) -> int:
    """The secret from any t shares (x, y) with distinct x."""
    lam = lagrange_at_zero([x for x, _ in shares])
    return sum(l * y for l, (_, y) in zip(lam, shares)) % PRIME


# ----- fixed point and masks ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("frac_bits",))
def _mask32(x_D, mask_D, clip, frac_bits):
    """y = encode(x) + mask in Z_2^32: clip, scale by 2^frac_bits, round half to even, wrap."""
    q = jnp.round(jnp.clip(x_D.astype(jnp.float32), -clip, clip) * (2.0 ** frac_bits)).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(q, jnp.uint32) + mask_D


def encode(x, params: SecAggParams) -> np.ndarray:
    """Fixed-point codes of clipped x as ring elements (two's complement)."""
    if params.ring_bits == 32:
        return np.asarray(_mask32(jnp.asarray(x), jnp.zeros(np.shape(x), jnp.uint32),
                                  np.float32(params.clip_range), params.frac_bits))
    x = np.clip(np.asarray(x, np.float32).astype(np.float64), -params.clip_range, params.clip_range)
    return np.rint(x * 2.0 ** params.frac_bits).astype(np.int64).view(np.uint64)


def decode(codes, params: SecAggParams) -> np.ndarray:
    """Ring elements -> float64 values (exact for |sum| < 2^53 codes)."""
    signed = np.asarray(codes).view(np.int32 if params.ring_bits == 32 else np.int64)
    return signed.astype(np.float64) * params.step


@functools.lru_cache(maxsize=4)
def _zeros(nbytes: int) -> bytes:
    return bytes(nbytes)


def prg(seed: bytes, dim: int, dtype, scratch: Optional[bytearray] = None) -> np.ndarray:
    """`dim` ring elements of AES-256-CTR keystream under a one-time 32-byte seed (fixed zero IV).

    With `scratch` (from `prg_scratch`), the stream is written there and the returned view is valid
    until the next call with the same scratch: no allocation per mask.
    """
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    nbytes = dim * np.dtype(dtype).itemsize
    le = np.dtype(dtype).newbyteorder("<")
    if scratch is None:
        return np.frombuffer(enc.update(_zeros(nbytes)), dtype=le).astype(dtype, copy=False)
    enc.update_into(_zeros(nbytes), scratch)
    return np.frombuffer(scratch, dtype=le, count=dim).astype(dtype, copy=False)


def prg_scratch(dim: int, dtype) -> bytearray:
    """A reusable output buffer for `prg` (CTR's update_into wants one block of slack)."""
    return bytearray(dim * np.dtype(dtype).itemsize + 15)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, None, b"fedjax_llm/secagg/v1\0" + info).derive(secret)


# ----- session ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Party:
    """One party's secrets and the plaintext shares it holds of everyone's secrets (simulation)."""

    c_sk: X25519PrivateKey   # encrypts shares in transit
    s_sk: X25519PrivateKey   # pairwise mask agreement
    b_seed: bytes            # self-mask seed
    shares: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # owner -> (s_y, b_y)


@dataclasses.dataclass
class SecAggSession:
    """One aggregation (one round): fresh keys, exchanged shares, and what has been revealed.

    Simulation of every party in one process: `_private` holds what each party would keep locally.
    `traffic` counts protocol bytes (keys, encrypted shares, masked vectors, revealed shares).
    """

    params: SecAggParams
    parties: tuple[str, ...]
    session_id: bytes
    s_pub: dict[str, bytes]
    _private: dict[str, _Party] = dataclasses.field(repr=False)
    masked: set = dataclasses.field(default_factory=set)
    revealed: dict[str, str] = dataclasses.field(default_factory=dict)  # party -> "self" | "pairwise"
    traffic: dict[str, int] = dataclasses.field(default_factory=dict)

    def index(self, party: str) -> int:
        try:
            return self.parties.index(party)
        except ValueError:
            raise SecAggError(f"secagg: party {party!r} is not in this session ({list(self.parties)})") from None


def _pair_seed(own: X25519PrivateKey, peer_pub: bytes, session: SecAggSession, u: str, v: str) -> bytes:
    a, b = sorted((u, v), key=session.index)
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    return _hkdf(shared, session.session_id + b"\0pair\0" + a.encode() + b"\0" + b.encode())


def _share_box(own_c: X25519PrivateKey, peer_c: bytes, session_id: bytes, u: str, v: str) -> AESGCM:
    shared = own_c.exchange(X25519PublicKey.from_public_bytes(peer_c))
    return AESGCM(_hkdf(shared, session_id + b"\0share\0" + u.encode() + b"\0" + v.encode()))


def setup(parties: Sequence[str], params: SecAggParams, *, session_id: bytes | str = b"",
          randbytes: Callable[[int], bytes] = os.urandom) -> SecAggSession:
    """Key advertisement and share exchange (Bonawitz rounds 0-1) for one aggregation.

    `session_id` (e.g. run id + round) separates sessions; keys are fresh per session anyway.
    """
    parties = tuple(parties)
    if len(set(parties)) != len(parties):
        raise SecAggError(f"secagg: duplicate party names in {list(parties)}")
    n, t = len(parties), params.threshold
    params.check(n)
    sid = session_id.encode() if isinstance(session_id, str) else bytes(session_id)
    priv = {u: _Party(X25519PrivateKey.from_private_bytes(randbytes(32)),
                      X25519PrivateKey.from_private_bytes(randbytes(32)), randbytes(32)) for u in parties}
    c_pub = {u: p.c_sk.public_key().public_bytes(**_RAW) for u, p in priv.items()}
    s_pub = {u: p.s_sk.public_key().public_bytes(**_RAW) for u, p in priv.items()}
    session = SecAggSession(params, parties, sid, s_pub, priv)
    session.traffic.update(keys=n * 64 + n * n * 64, shares=0, masked=0, revealed=0)
    for u in parties:  # u splits its pairwise key and self-mask seed, encrypts share v for v
        p = priv[u]
        s_secret = int.from_bytes(p.s_sk.private_bytes(serialization.Encoding.Raw,
                                                       serialization.PrivateFormat.Raw,
                                                       serialization.NoEncryption()), "big")
        s_sh = shamir_split(s_secret, n, t, randbytes)
        b_sh = shamir_split(int.from_bytes(p.b_seed, "big"), n, t, randbytes)
        for k, v in enumerate(parties):
            body = s_sh[k][1].to_bytes(FIELD_BYTES, "big") + b_sh[k][1].to_bytes(FIELD_BYTES, "big")
            aad = sid + b"\0" + u.encode() + b"\0" + v.encode()
            if v != u:  # the server relays the ciphertext; v decrypts and keeps the shares
                ct = _share_box(p.c_sk, c_pub[v], sid, u, v).encrypt(bytes(12), body, aad)
                session.traffic["shares"] += 2 * len(ct)
                body = _share_box(priv[v].c_sk, c_pub[u], sid, u, v).decrypt(bytes(12), ct, aad)
            priv[v].shares[u] = (int.from_bytes(body[:FIELD_BYTES], "big"),
                                 int.from_bytes(body[FIELD_BYTES:], "big"))
    return session


def mask(session: SecAggSession, party: str, vector) -> np.ndarray:
    """Party's masked input: encode(clip(vector)) + self mask + signed pairwise masks, in the ring."""
    u, params = party, session.params
    i = session.index(u)
    if u in session.masked:
        raise SecAggError(f"secagg: party {u!r} already masked an input in this session; masks are "
                          f"one-time pads, run setup again for a new input")
    x = np.asarray(vector)
    if x.ndim != 1:
        raise SecAggError(f"secagg: party {u!r}: input must be a flat vector, got shape {x.shape}")
    p, dim, dt = session._private[u], x.shape[0], params.dtype
    total, scratch = prg(p.b_seed, dim, dt).copy(), prg_scratch(dim, dt)
    for j, v in enumerate(session.parties):
        if v != u:
            m = prg(_pair_seed(p.s_sk, session.s_pub[v], session, u, v), dim, dt, scratch)
            (np.add if i < j else np.subtract)(total, m, out=total)
    session.masked.add(u)
    if params.ring_bits == 32:
        y = np.asarray(_mask32(jnp.asarray(x), jnp.asarray(total), np.float32(params.clip_range),
                               params.frac_bits))
    else:
        y = encode(x, params) + total
    session.traffic["masked"] += y.nbytes
    return y


def unmask(session: SecAggSession, masked: Mapping[str, np.ndarray],
           survivors: Optional[Sequence[str]] = None) -> np.ndarray:
    """Sum of the inputs in `masked` (float64, to the fixed-point step), removing every mask.

    Parties absent from `masked` dropped before sending; `survivors` (default: all of `masked`) answer
    the unmasking round with their shares. Needs at least `threshold` of them.
    """
    params, parties = session.params, session.parties
    n, t = len(parties), params.threshold
    sent = [u for u in parties if u in masked]
    unknown = sorted(set(masked) - set(parties))
    if unknown:
        raise SecAggError(f"secagg: masked inputs from parties outside the session: {unknown}")
    dropped = [u for u in parties if u not in masked]
    answering = list(sent if survivors is None else survivors)
    late = sorted(set(answering) - set(sent))
    if late:
        raise SecAggError(f"secagg: survivors {late} sent no masked input")
    if len(answering) < t:
        raise SecAggError(f"secagg: only {len(answering)} of {n} parties answered the unmasking round "
                          f"(threshold {t}): {n - len(answering)} dropped, more than n - t = {n - t}; "
                          f"the sum cannot be recovered (missing: {sorted(set(parties) - set(answering))})")
    for u in sent:
        if session.revealed.get(u) == "pairwise":
            raise SecAggError(f"secagg: party {u!r} was treated as dropped in this session; revealing its "
                              f"self-mask seed too would expose its input")
    for u in dropped:
        if session.revealed.get(u) == "self":
            raise SecAggError(f"secagg: party {u!r} had its self-mask seed revealed in this session; "
                              f"revealing its pairwise key too would expose its input")
    dims = {np.shape(masked[u]) for u in sent}
    if len(dims) != 1:
        raise SecAggError(f"secagg: masked inputs differ in shape: {sorted(dims)}")
    (dim,) = dims.pop()
    responders = answering[:t]
    xs = [session.index(v) + 1 for v in responders]
    lam = lagrange_at_zero(xs)

    def recover(owner: str, which: int) -> bytes:  # which: 0 pairwise key, 1 self-mask seed
        ys = [session._private[v].shares[owner][which] for v in responders]
        return (sum(l * y for l, y in zip(lam, ys)) % PRIME).to_bytes(32, "big")

    session.traffic["revealed"] += len(answering) * n * FIELD_BYTES
    dt = params.dtype  # host-side ring sums: the inputs and the PRG streams are host arrays already
    total = np.array(masked[sent[0]], dt)
    for u in sent[1:]:
        np.add(total, np.asarray(masked[u], dt), out=total)
    scratch = prg_scratch(dim, dt)
    for u in sent:
        session.revealed[u] = "self"
        np.subtract(total, prg(recover(u, 1), dim, dt, scratch), out=total)
    for u in dropped:
        session.revealed[u] = "pairwise"
        s_sk = X25519PrivateKey.from_private_bytes(recover(u, 0))
        if s_sk.public_key().public_bytes(**_RAW) != session.s_pub[u]:
            raise SecAggError(f"secagg: shares of dropped party {u!r}'s key are inconsistent")
        i = session.index(u)
        for v in sent:  # y_v holds +p_uv if v < u else -p_uv; remove it
            m = prg(_pair_seed(s_sk, session.s_pub[v], session, u, v), dim, dt, scratch)
            (np.subtract if session.index(v) < i else np.add)(total, m, out=total)
    return decode(total, params)
