"""Sealed messages: authenticated encryption plus a sender signature for one hop between parties.

A fresh random salt per message feeds HKDF-SHA256 over the sender/recipient static X25519 secret, with
the whole header as `info`, into a per-message AEAD key and nonce base (the TLS 1.3 pattern, RFC 8446
§5.3), so no (key, nonce) pair ever repeats. The payload travels as bounded chunks; each chunk's AAD is
the header digest, its index, the chunk count and a final flag (the STREAM construction of Hoang et
al., CRYPTO 2015), so reordered, dropped, duplicated or truncated chunks are detected. Wire format:

    "FJSL" | version u8 | header length u32 | header JSON | Ed25519 signature over the header
    { chunk index u32 | AEAD(chunk) }  x count
    count u32 | AEAD(sha256(payload))                 the trailer (final flag set)
    Ed25519 signature over sha256(header) | sha256(every frame above)

The header is signed on its own so that the receiver authenticates routing fields before decrypting;
the final signature covers header and ciphertext. The payload hash rides inside the encrypted trailer,
not the clear header, so an eavesdropper cannot test guesses of the plaintext against it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import struct
from typing import Any, Iterable, Iterator, Optional

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedjax_llm.clouds.message import MessageError
from fedjax_llm.secure.keys import Identity, PublicIdentity, Trust

MAGIC, VERSION = b"FJSL", 1
CIPHERS = {"aes-256-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}
DEFAULT_CHUNK_BYTES = 1 << 20
TAG, SIG, SALT = 16, 64, 32
MAX_HEADER_BYTES = 1 << 16
_PRE = struct.Struct(">4sBI")
_IDX = struct.Struct(">I")
_AAD = struct.Struct(">32sIIB")
_SIG_HEADER = b"fedjax_llm/seal/v1/header\0"
_SIG_FINAL = b"fedjax_llm/seal/v1/final\0"
_KDF_INFO = b"fedjax_llm/seal/v1/key\0"


class SealError(MessageError):
    """A sealed message that is rejected; the round drops that cloud's message."""

class TamperedError(SealError):
    """Not a sealed message, an unreadable header, or a chunk/trailer that fails AEAD authentication."""

class BadSignatureError(SealError):
    """The header or final Ed25519 signature does not verify under the claimed sender's trusted key."""

class UnknownSenderError(SealError):
    """The claimed sender is not in the trust list."""

class WrongSenderError(SealError):
    """An authentic message from another party than the one expected on this hop."""

class WrongRecipientError(SealError):
    """An authentic message addressed to another party."""

class WrongRunError(SealError):
    """An authentic message from another run (or run attempt): a cross-run replay."""

class StaleRoundError(SealError):
    """An authentic message of a round older than the one being received."""

class FutureRoundError(SealError):
    """An authentic message of a round newer than the one being received."""

class ReplayError(SealError):
    """A (sender, recipient, round, seq) that was already accepted."""

class ChunkOrderError(SealError):
    """A chunk index other than the next expected one: a chunk dropped, reordered or duplicated."""

class TruncatedError(SealError):
    """The stream ended before the final signature."""

class StructureMismatchError(SealError):
    """The opened payload's pytree structure differs from the expected one (names the path)."""

class UnsupportedError(SealError):
    """An authentic message with a protocol version, cipher or compression this build does not know."""


@dataclasses.dataclass(frozen=True)
class SealHeader:
    """Clear, signed routing header; its bytes are also the KDF info and (hashed) every chunk's AAD."""

    run_id: str
    sender: str
    recipient: str
    round: int
    seq: int
    cipher: str
    chunk_bytes: int
    count: int
    length: int
    structure: str
    compression: str
    salt: str  # hex of the per-message random HKDF salt
    version: int = VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "SealHeader":
        try:
            d = json.loads(bytes(raw))
            h = cls(**d)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise TamperedError(f"secure.seal: header unreadable: {type(e).__name__}: {e}") from None
        ints = ("round", "seq", "chunk_bytes", "count", "length", "version")
        strs = ("run_id", "sender", "recipient", "cipher", "structure", "compression", "salt")
        if (any(type(getattr(h, f)) is not int for f in ints) or any(not isinstance(getattr(h, f), str)
                                                                     for f in strs)):
            raise TamperedError(f"secure.seal: header field types invalid: {d}")
        if h.chunk_bytes < 1 or h.length < 0 or h.count != _count(h.length, h.chunk_bytes) or h.seq < 0:
            raise TamperedError(f"secure.seal: header sizes inconsistent: length {h.length}, chunk_bytes "
                                f"{h.chunk_bytes}, count {h.count}, seq {h.seq}")
        return h

    def where(self) -> str:
        return f"round {self.round}, {self.sender!r} -> {self.recipient!r}, seq {self.seq}"


def _count(length: int, chunk_bytes: int) -> int:
    return -(-length // chunk_bytes)


class ReplayGuard:
    """Receiver-side set of accepted (sender, recipient, round, seq); older rounds are pruned."""

    def __init__(self, state: Optional[dict] = None):
        self._seen: dict[tuple[str, str], dict[int, set[int]]] = {}
        for key, rounds in (state or {}).items():
            s, r = key.split("->")
            self._seen[(s, r)] = {int(k): set(v) for k, v in rounds.items()}

    def seen(self, sender: str, recipient: str, round: int, seq: int) -> bool:
        return seq in self._seen.get((sender, recipient), {}).get(round, ())

    def accept(self, sender: str, recipient: str, round: int, seq: int) -> None:
        rounds = self._seen.setdefault((sender, recipient), {})
        rounds.setdefault(round, set()).add(seq)
        for old in [r for r in rounds if r < round]:  # older rounds are rejected as stale anyway
            del rounds[old]

    def state(self) -> dict:
        """JSON-serializable copy (for a checkpoint); `ReplayGuard(state)` restores it."""
        return {f"{s}->{r}": {str(k): sorted(v) for k, v in rounds.items()}
                for (s, r), rounds in self._seen.items()}


def _derive(own_kex, peer_pub, header_bytes: bytes, salt_hex: str) -> tuple[bytes, int]:
    """(32-byte AEAD key, 96-bit nonce base) of one message: HKDF over the static X25519 secret."""
    shared = own_kex.exchange(peer_pub)
    okm = HKDF(hashes.SHA256(), 32 + 12, bytes.fromhex(salt_hex), _KDF_INFO + header_bytes).derive(shared)
    return okm[:32], int.from_bytes(okm[32:], "big")


def nonce(nonce_base: int, index: int) -> bytes:
    """Chunk `index`'s 96-bit nonce: the per-message base XOR the index (RFC 8446 §5.3)."""
    return (nonce_base ^ index).to_bytes(12, "big")


def message_nonces(data: bytes, recipient: Identity, trust: Trust) -> tuple[bytes, list[bytes]]:
    """(AEAD key, [nonce per chunk and trailer]) of a sealed message; for audits and tests only."""
    _, hb = _split_header(_Reader([data]))
    h = SealHeader.from_bytes(hb)
    key, base = _derive(recipient.agreement_key, trust[h.sender].agreement_key, hb, h.salt)
    return key, [nonce(base, i) for i in range(h.count + 1)]


def _aad(header_digest: bytes, index: int, count: int) -> bytes:
    return _AAD.pack(header_digest, index, count, int(index == count))


def _header(length, sender, recipient, round, seq, run_id, structure, compression, cipher,
            chunk_bytes) -> SealHeader:
    if cipher not in CIPHERS:
        raise ValueError(f"secure.seal: cipher {cipher!r} unknown; choose one of {sorted(CIPHERS)}")
    if not 1 <= chunk_bytes < 2**31:
        raise ValueError(f"secure.seal: chunk_bytes must be in [1, 2^31), got {chunk_bytes}")
    return SealHeader(run_id=run_id, sender=sender.name, recipient=recipient.name, round=int(round),
                      seq=int(seq), cipher=cipher, chunk_bytes=chunk_bytes,
                      count=_count(length, chunk_bytes), length=length, structure=structure,
                      compression=compression, salt=os.urandom(SALT).hex())


def sealed_size(header: SealHeader) -> int:
    """Wire bytes of a message with this header."""
    return (_PRE.size + len(header.to_bytes()) + SIG + header.count * (_IDX.size + TAG) + header.length
            + _IDX.size + 32 + TAG + SIG)


# Hashes of large messages run beside the AEAD loop: hashlib releases the GIL, and SHA-256 (not AES-GCM,
# 15 GB/s with VAES here) is what bounds sealing at ~1.7 GB/s per pass. Hash tasks never wait on
# anything, so a pool of their own cannot deadlock with callers that seal on threads.
PARALLEL_HASH_MIN_BYTES = 1 << 20
_HASH_POOL: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _sha256_beside(data) -> "concurrent.futures.Future[bytes]":
    """sha256(data) computed on a worker thread."""
    global _HASH_POOL
    if _HASH_POOL is None:
        _HASH_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                           thread_name_prefix="seal-sha256")
    return _HASH_POOL.submit(lambda: hashlib.sha256(data).digest())


def _seal_frames(header: SealHeader, chunks: Iterable[Any], sender: Identity,
                 recipient: PublicIdentity, alloc, payload_sha256: Optional[bytes] = None,
                 payload_sha256_beside: Optional[concurrent.futures.Future] = None) -> Iterator[memoryview]:
    """Writes the wire form into buffers from `alloc(n)`, one chunk at a time, yielding each.
    `payload_sha256`: the payload's digest when the caller already has it (one payload, many recipients);
    `payload_sha256_beside`: the same, still being computed on another thread."""
    hb, length, count, chunk_bytes = header.to_bytes(), header.length, header.count, header.chunk_bytes
    key, base = _derive(sender.agreement_key, recipient.agreement_key, hb, header.salt)
    aead = CIPHERS[header.cipher](key)
    hd = hashlib.sha256(hb).digest()
    head = _PRE.pack(MAGIC, VERSION, len(hb)) + hb + sender.signing_key.sign(_SIG_HEADER + hb)
    out = alloc(len(head))
    out[:] = head
    yield out
    frames_hash, payload_hash = hashlib.sha256(), hashlib.sha256()

    def frame(index: int, plain) -> memoryview:
        out = alloc(_IDX.size + len(plain) + TAG)
        _IDX.pack_into(out, 0, index)
        aead.encrypt_into(nonce(base, index), plain, _aad(hd, index, count), out[_IDX.size:])
        frames_hash.update(out)
        return out

    index, seen, buf = 0, 0, bytearray()
    for piece in chunks:
        mv = memoryview(piece).cast("B")
        seen += len(mv)
        if seen > length:
            raise ValueError(f"secure.seal: {header.where()}: payload longer than the declared {length} bytes")
        pos = 0
        while pos < len(mv):
            want = min(chunk_bytes, length - index * chunk_bytes)
            if not buf and len(mv) - pos >= want:  # whole chunk inside this piece: no copy
                plain, pos = mv[pos:pos + want], pos + want
            else:  # gather a chunk across pieces: the one extra chunk of memory
                take = min(want - len(buf), len(mv) - pos)
                buf += mv[pos:pos + take]
                pos += take
                if len(buf) < want:
                    continue
                plain = buf
            if payload_sha256 is None and payload_sha256_beside is None:
                payload_hash.update(plain)
            yield frame(index, plain)
            index, buf = index + 1, bytearray()
    if seen != length:
        raise ValueError(f"secure.seal: {header.where()}: payload gave {seen} bytes, declared {length}")
    if payload_sha256 is None:
        payload_sha256 = payload_hash.digest() if payload_sha256_beside is None else payload_sha256_beside.result()
    yield frame(count, payload_sha256)
    out = alloc(SIG)
    out[:] = sender.signing_key.sign(_SIG_FINAL + hd + frames_hash.digest())
    yield out


def seal_stream(chunks: Iterable[Any], *, length: int, sender: Identity, recipient: PublicIdentity,
                round: int, seq: int, run_id: str, structure: str = "", compression: str = "none",
                cipher: str = "aes-256-gcm", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                ) -> Iterator[bytearray]:
    """Seals `length` payload bytes given as any byte pieces; yields wire frames one chunk at a time."""
    header = _header(length, sender, recipient, round, seq, run_id, structure, compression, cipher,
                     chunk_bytes)
    for mv in _seal_frames(header, chunks, sender, recipient, lambda n: memoryview(bytearray(n))):
        yield mv.obj


def seal(payload, *, sender: Identity, recipient: PublicIdentity, round: int, seq: int, run_id: str,
         structure: str = "", compression: str = "none", cipher: str = "aes-256-gcm",
         chunk_bytes: int = DEFAULT_CHUNK_BYTES, payload_sha256: Optional[bytes] = None) -> bytearray:
    """Seals one bytes-like payload for `recipient`, written in place into one bytearray (no copies).
    `payload_sha256` (hashlib.sha256(payload).digest()) saves hashing a payload sealed for many recipients."""
    mv = memoryview(payload).cast("B")
    header = _header(len(mv), sender, recipient, round, seq, run_id, structure, compression, cipher,
                     chunk_bytes)
    buf = bytearray(sealed_size(header))
    beside = None
    if payload_sha256 is None and len(mv) >= PARALLEL_HASH_MIN_BYTES:
        beside = _sha256_beside(mv)
    for _ in _seal_frames(header, [mv], sender, recipient, _slicer(buf), payload_sha256, beside):
        pass
    return buf


def _slicer(buf: bytearray):
    """alloc(n) handing out consecutive slices of one preallocated buffer."""
    view, pos = memoryview(buf), 0

    def alloc(n: int) -> memoryview:
        nonlocal pos
        pos += n
        return view[pos - n:pos]

    return alloc


class _Reader:
    """Exact-length reads over an iterable of byte pieces; zero-copy when a read fits in one piece."""

    def __init__(self, pieces: Iterable[Any]):
        self._it, self._cur, self._pos, self.offset = iter(pieces), memoryview(b""), 0, 0
        self.what = "the preamble"

    def _next(self) -> bool:
        for piece in self._it:
            mv = memoryview(piece).cast("B")
            if len(mv):
                self._cur, self._pos = mv, 0
                return True
        return False

    def read(self, n: int):
        if self._pos == len(self._cur) and n:
            self._next()  # a fresh piece may hold the whole read
        if len(self._cur) - self._pos >= n:
            out = self._cur[self._pos:self._pos + n]
            self._pos += n
            self.offset += n
            return out
        out = bytearray(self._cur[self._pos:])
        while len(out) < n:
            if not self._next():
                raise TruncatedError(f"secure.seal: stream ended inside {self.what} at byte "
                                     f"{self.offset + len(out)} ({n - len(out)} bytes short)")
            take = min(n - len(out), len(self._cur))
            out += self._cur[:take]
            self._pos = take
        self.offset += n
        return memoryview(out)

    def rest(self) -> int:
        extra = len(self._cur) - self._pos
        while self._next():
            extra += len(self._cur)
        return extra


def _split_header(reader: _Reader) -> tuple[bytes, bytes]:
    pre = reader.read(_PRE.size)
    magic, version, n = _PRE.unpack(pre)
    if magic != MAGIC:
        raise TamperedError(f"secure.seal: not a sealed message (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise UnsupportedError(f"secure.seal: protocol version {version}, this build speaks {VERSION}")
    if n > MAX_HEADER_BYTES:
        raise TamperedError(f"secure.seal: header length {n} exceeds {MAX_HEADER_BYTES}")
    reader.what = "the header"
    return bytes(pre), bytes(reader.read(n))


def peek_header(first_frame) -> SealHeader:
    """The header of a sealed message from its first frame, NOT authenticated (routing and size checks
    before opening; `open_stream` verifies it)."""
    _, hb = _split_header(_Reader([first_frame]))
    return SealHeader.from_bytes(hb)


def _open_header(stream, recipient, trust, run_id, round, sender, replay):
    """Reads and authenticates the header, then checks routing, round and replay (in that order)."""
    reader = _Reader(stream)
    _, hb = _split_header(reader)
    h = SealHeader.from_bytes(hb)
    if h.version != VERSION:
        raise TamperedError(f"secure.seal: {h.where()}: header version {h.version} != preamble {VERSION}")
    peer = trust.get(h.sender)
    if peer is None:
        raise UnknownSenderError(f"secure.seal: {h.where()}: sender {h.sender!r} is not in the trust list "
                                 f"({sorted(trust)})")
    reader.what = "the header signature"
    try:
        peer.verify_key.verify(bytes(reader.read(SIG)), _SIG_HEADER + hb)
    except InvalidSignature:
        raise BadSignatureError(f"secure.seal: {h.where()}: header signature does not verify under "
                                f"{h.sender!r}'s trusted key") from None
    if h.run_id != run_id:
        raise WrongRunError(f"secure.seal: {h.where()}: run id {h.run_id!r}, expected {run_id!r}")
    if h.recipient != recipient.name:
        raise WrongRecipientError(f"secure.seal: {h.where()}: addressed to {h.recipient!r}, "
                                  f"received by {recipient.name!r}")
    if sender is not None and h.sender != sender:
        raise WrongSenderError(f"secure.seal: {h.where()}: from {h.sender!r}, expected {sender!r}")
    if h.round < round:
        raise StaleRoundError(f"secure.seal: {h.where()}: round {h.round} is older than the round "
                              f"{round} being received")
    if h.round > round:
        raise FutureRoundError(f"secure.seal: {h.where()}: round {h.round} is newer than the round "
                               f"{round} being received")
    if replay is not None and replay.seen(h.sender, h.recipient, h.round, h.seq):
        raise ReplayError(f"secure.seal: {h.where()}: already accepted (replay)")
    if h.cipher not in CIPHERS:
        raise UnsupportedError(f"secure.seal: {h.where()}: cipher {h.cipher!r} unknown")
    key, base = _derive(recipient.agreement_key, peer.agreement_key, hb, h.salt)
    return reader, h, hb, CIPHERS[h.cipher](key), base, peer, replay


def open_stream(stream: Iterable[Any], *, recipient: Identity, trust: Trust, run_id: str, round: int,
                sender: Optional[str] = None, replay: Optional[ReplayGuard] = None,
                ) -> tuple[SealHeader, Iterator[bytearray]]:
    """Verifies the header now; returns it with an iterator of authenticated plaintext chunks.

    Each chunk is AEAD-verified before it is yielded, but the message as a whole is valid only once the
    iterator finishes (final signature, trailer, no trailing bytes, replay record): a consumer must
    discard what it received if iteration raises.
    """
    opened = _open_header(stream, recipient, trust, run_id, round, sender, replay)
    h = opened[1]
    return h, (mv.obj for mv in _open_frames(*opened, lambda n: memoryview(bytearray(n))))


def _open_frames(reader, h: SealHeader, hb, aead, base, peer, replay, alloc,
                 frames_sha256_beside: Optional[concurrent.futures.Future] = None) -> Iterator[memoryview]:
    """`frames_sha256_beside`: sha256 of every frame's bytes (index, ciphertext and tag, trailer
    included), computed on another thread over the contiguous message; the frames are still parsed and
    authenticated one by one here, and the digest is only used for the final signature."""
    hd = hashlib.sha256(hb).digest()
    frames_hash, payload_hash = hashlib.sha256(), hashlib.sha256()

    def frame(i: int, size: int) -> memoryview:
        reader.what = f"chunk {i} of {h.count}" if i < h.count else "the trailer"
        raw_idx = reader.read(_IDX.size)
        (got,) = _IDX.unpack(raw_idx)
        if got != i:
            if got < i:
                why = f"chunk {got} arrived again where {reader.what} was expected (duplicated)"
            elif got == h.count:
                why = f"the trailer arrived after only {i} of {h.count} chunks (chunk {i} dropped)"
            else:
                why = f"chunk {got} arrived where {reader.what} was expected (dropped or reordered)"
            raise ChunkOrderError(f"secure.seal: {h.where()}: {why}")
        ct = reader.read(size + TAG)
        if frames_sha256_beside is None:
            frames_hash.update(raw_idx)
            frames_hash.update(ct)
        out = alloc(size) if i < h.count else memoryview(bytearray(size))
        try:
            aead.decrypt_into(nonce(base, i), ct, _aad(hd, i, h.count), out)
        except InvalidTag:
            raise TamperedError(f"secure.seal: {h.where()}: {reader.what} fails authentication "
                                f"({h.cipher})") from None
        return out

    for i in range(h.count):
        plain = frame(i, min(h.chunk_bytes, h.length - i * h.chunk_bytes))
        payload_hash.update(plain)
        yield plain
    digest = frame(h.count, 32)
    if bytes(digest) != payload_hash.digest():
        raise TamperedError(f"secure.seal: {h.where()}: payload sha256 differs from the trailer")
    reader.what = "the final signature"
    try:
        frames_digest = frames_hash.digest() if frames_sha256_beside is None else frames_sha256_beside.result()
        peer.verify_key.verify(bytes(reader.read(SIG)), _SIG_FINAL + hd + frames_digest)
    except InvalidSignature:
        raise BadSignatureError(f"secure.seal: {h.where()}: final signature does not verify under "
                                f"{h.sender!r}'s trusted key") from None
    extra = reader.rest()
    if extra:
        raise TamperedError(f"secure.seal: {h.where()}: {extra} unexpected bytes after the signature")
    if replay is not None:
        replay.accept(h.sender, h.recipient, h.round, h.seq)


def open_sealed(data, *, recipient: Identity, trust: Trust, run_id: str, round: int,
                sender: Optional[str] = None, replay: Optional[ReplayGuard] = None,
                ) -> tuple[bytes, SealHeader]:
    """Verifies and decrypts a whole sealed message; returns (payload, header) only if all checks pass."""
    opened = _open_header([data], recipient, trust, run_id, round, sender, replay)
    h, hb = opened[1], opened[2]
    out = bytearray(h.length)
    start = _PRE.size + len(hb) + SIG  # the frames: from after the header's signature ...
    end = start + h.count * (_IDX.size + TAG) + h.length + _IDX.size + 32 + TAG  # ... to the final signature
    mv = memoryview(data).cast("B")
    beside = _sha256_beside(mv[start:end]) if len(mv) >= end and h.length >= PARALLEL_HASH_MIN_BYTES else None
    for _ in _open_frames(*opened, _slicer(out), beside):
        pass
    return bytes(out), h
