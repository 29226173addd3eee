"""The arithmetic under secure aggregation: ring parameters, fixed point, mask expansion, Shamir.

Values are clipped to [-clip_range, clip_range] and encoded to fixed point with `frac_bits` fractional
bits in Z_{2^ring_bits}. Encoding plus mask addition is one jitted JAX function in Z_2^32 (the 2^64 ring
runs in NumPy: JAX without x64 has no uint64); the PRG (AES-256-CTR) and ring sums are host NumPy,
where the bytes are.

Shamir sharing is written here over the prime field GF(2^521 - 1) with Python integers: `cryptography`
offers no secret sharing, and it is polynomial arithmetic, not a cipher; its randomness comes from the
`randbytes` source (the OS CSPRNG by default).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PRIME = 2**521 - 1  # Mersenne prime: any 32-byte secret is a field element
FIELD_BYTES = 66


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


def encode_masked(x, mask_D: np.ndarray, params: SecAggParams) -> np.ndarray:
    """encode(clip(x)) + mask in the ring (jitted in Z_2^32)."""
    if params.ring_bits == 32:
        return np.asarray(_mask32(jnp.asarray(x), jnp.asarray(mask_D), np.float32(params.clip_range),
                                  params.frac_bits))
    return encode(x, params) + mask_D
