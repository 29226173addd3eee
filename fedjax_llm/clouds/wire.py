"""One message between two deployed parties as a stream of frames, each its own transport message.

Sealed (`secure.seal=true`): the frames of `secure.seal.seal_stream`, a header frame, one frame per
authenticated chunk, the trailer and the final signature. Plain (`secure.seal=false`, for trusted
networks and tests): a JSON header frame, then the payload in chunks. Either way the receiver reads the
header first and refuses a message above the size limit before reading any chunk, writes the chunks
into one buffer of the announced length (the only full copy it holds) and, when sealed, accepts it only
once the final signature verifies. The sender holds the payload once and one frame at a time.
"""
from __future__ import annotations

import itertools
import json
import threading
from typing import Iterable, Iterator, Optional

from fedjax_llm.clouds.message import MessageError
from fedjax_llm.secure.keys import Identity, Trust
from fedjax_llm.secure.seal import (DEFAULT_CHUNK_BYTES, ReplayError, ReplayGuard, SealError, TruncatedError,
                                    open_stream, peek_header, seal_stream)

PLAIN_MAGIC = b"FJPT"


class MessageTooLarge(MessageError):
    """A message whose announced size is above transport.max_message_mb; refused before its chunks."""


class FramingError(MessageError):
    """Frames that do not form one message (missing header, wrong length, trailing frames)."""


class Wire:
    """How one party turns payloads into frames and frames back into payloads, for a session (run_id).
    `identity` is this party's (None when unsealed); `trust` the peers' public keys."""

    def __init__(self, me: str, identity: Optional[Identity], trust: Trust, *, sealed: bool, max_bytes: int,
                 cipher: str = "aes-256-gcm", chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.me, self.identity, self.trust, self.sealed = me, identity, trust, sealed
        self.max_bytes, self.cipher, self.chunk_bytes = int(max_bytes), cipher, int(chunk_bytes)
        self._seq: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def _next_seq(self, recipient: str, run_id: str) -> int:
        with self._lock:
            seq = self._seq.get((recipient, run_id), 0)
            self._seq[(recipient, run_id)] = seq + 1
            return seq

    def frames(self, payload, *, recipient: str, run_id: str, structure: str = "") -> Iterator[bytes]:
        """The frames of one message from this party to `recipient` (round 0: rounds live in the payload)."""
        mv = memoryview(payload).cast("B")
        seq = self._next_seq(recipient, run_id)
        if self.sealed:
            return (bytes(f) for f in seal_stream([mv], length=len(mv), sender=self.identity,
                                                  recipient=self.trust[recipient], round=0, seq=seq, run_id=run_id,
                                                  structure=structure, cipher=self.cipher, chunk_bytes=self.chunk_bytes))
        head = PLAIN_MAGIC + json.dumps(dict(sender=self.me, recipient=recipient, run_id=run_id, seq=seq,
                                             length=len(mv), structure=structure)).encode()
        chunks = (bytes(mv[i:i + self.chunk_bytes]) for i in range(0, len(mv), self.chunk_bytes))
        return itertools.chain([head], chunks)

    def open(self, frames: Iterable[bytes], *, run_id: str, guard: Optional[ReplayGuard],
             sender: Optional[str] = None, what: str = "message") -> tuple[bytearray, dict]:
        """(payload, header) of the message in `frames` addressed to this party; raises MessageError
        (SealError, MessageTooLarge, FramingError) naming why it was refused."""
        it = iter(frames)
        try:
            first = next(it)
        except StopIteration:
            raise FramingError(f"{what}: no frame arrived") from None
        if self.sealed:
            return self._open_sealed(first, it, run_id, guard, sender, what)
        return self._open_plain(first, it, run_id, guard, sender, what)

    def _limit(self, length: int, who: str, what: str) -> None:
        if length > self.max_bytes:
            raise MessageTooLarge(f"transport.max_message_mb: {what} from {who!r} announces "
                                  f"{length / 2**20:.3g} MB, above the limit of {self.max_bytes / 2**20:.3g} MB; "
                                  f"refused before reading it")

    def _open_sealed(self, first, rest, run_id, guard, sender, what) -> tuple[bytearray, dict]:
        try:
            h = peek_header(first)
        except SealError as e:
            raise type(e)(f"{what}: {e}") from None
        self._limit(h.length, h.sender, what)
        _, chunks = open_stream(itertools.chain([first], rest), recipient=self.identity, trust=self.trust,
                                run_id=run_id, round=0, sender=sender, replay=guard)
        out, pos = bytearray(h.length), 0
        for piece in chunks:  # every chunk authenticated; the message only once the iterator ends
            out[pos:pos + len(piece)] = piece
            pos += len(piece)
        return out, dict(sender=h.sender, recipient=h.recipient, seq=h.seq, structure=h.structure, length=h.length)

    def _open_plain(self, first, rest, run_id, guard, sender, what) -> tuple[bytearray, dict]:
        if not bytes(first[:4]) == PLAIN_MAGIC:
            raise FramingError(f"{what}: not a message of this protocol (a sealed message to an unsealed party?)")
        try:
            h = json.loads(bytes(first[4:]))
            length, seq = int(h["length"]), int(h["seq"])
        except (ValueError, KeyError, TypeError) as e:
            raise FramingError(f"{what}: header unreadable ({type(e).__name__}: {e})") from None
        who = h.get("sender")
        self._limit(length, who, what)
        if h.get("recipient") != self.me or h.get("run_id") != run_id or (sender is not None and who != sender):
            raise FramingError(f"{what}: from {who!r} to {h.get('recipient')!r} in session {h.get('run_id')!r}; "
                               f"expected {sender or 'a peer'!r} to {self.me!r} in {run_id!r}")
        if guard is not None and guard.seen(who, self.me, 0, seq):
            raise ReplayError(f"{what}: from {who!r}, seq {seq}: already accepted (replay)")
        out, pos = bytearray(length), 0
        for piece in rest:
            if pos + len(piece) > length:
                raise FramingError(f"{what}: more bytes than the {length} announced")
            out[pos:pos + len(piece)] = piece
            pos += len(piece)
        if pos != length:
            raise TruncatedError(f"{what}: {pos} of {length} bytes arrived")
        if guard is not None:
            guard.accept(who, self.me, 0, seq)
        return out, dict(sender=who, recipient=self.me, seq=seq, structure=h.get("structure", ""), length=length)
