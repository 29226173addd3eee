"""The sealing channel: the `clouds.channel.Channel` seam with every hop encrypted, signed and checked.

send: tree -> (optional compression) -> `clouds.message.encode` -> `seal`; receive: `open_sealed` ->
decode against `like` -> decompress; broadcast: one encode and one payload digest, then `seal` per
recipient on threads. With compression "none" the payload is exactly the plaintext
channel's, so a sealed run and an unsealed run produce bitwise identical models.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Mapping, Optional

from fedjax_llm.clouds import message
from fedjax_llm.clouds.channel import Channel
from fedjax_llm.secure import compress as C
from fedjax_llm.secure.keys import Identity, IdentityError, Trust
from fedjax_llm.secure.seal import (CIPHERS, DEFAULT_CHUNK_BYTES, ReplayGuard,
                                    StructureMismatchError, UnsupportedError, open_sealed, seal)


@dataclasses.dataclass(frozen=True)
class SealConfig:
    """Parameters of a sealed channel (the integrator maps `secure.*` config keys onto these)."""

    cipher: str = "aes-256-gcm"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    compression: str = "none"
    compression_min_size: int = 1024

    def __post_init__(self):
        if self.cipher not in CIPHERS:
            raise ValueError(f"secure.cipher: {self.cipher!r} unknown; choose one of {sorted(CIPHERS)}")
        if not 1 <= self.chunk_bytes < 2**31:
            raise ValueError(f"secure.chunk_bytes: must be in [1, 2^31), got {self.chunk_bytes}")
        C.Compression(self.compression, self.compression_min_size)  # validates


@dataclasses.dataclass
class ChannelState:
    """Mutable per-channel bookkeeping: next sequence number per hop and the receiver's replay record."""

    next_seq: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    replay: ReplayGuard = dataclasses.field(default_factory=ReplayGuard)

    def to_dict(self) -> dict:
        """JSON-serializable, for a checkpoint; `ChannelState.from_dict` restores it."""
        return {"next_seq": {f"{s}->{r}": n for (s, r), n in self.next_seq.items()},
                "replay": self.replay.state()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ChannelState":
        seqs = {tuple(k.split("->")): int(v) for k, v in d.get("next_seq", {}).items()}
        return cls(next_seq=seqs, replay=ReplayGuard(d.get("replay", {})))


def sealed_channel(identities: Mapping[str, Identity], trust: Trust, run_id: str,
                   cipher: str = "aes-256-gcm", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   compression: str = "none", *, compression_min_size: int = 1024,
                   compress_recipients: Optional[Collection[str]] = None,
                   state: Optional[ChannelState] = None) -> Channel:
    """A Channel whose messages are sealed from sender to recipient (see `secure.seal`).

    `identities` holds the private keys of the parties this process speaks for (in the simulated
    federation: all of them); `trust` the public keys of every party it accepts messages from.
    `compress_recipients` limits compression to hops towards those parties (None: every hop). Pass a
    `run_id` unique to this run attempt (e.g. run dir + resume count) or checkpoint `state`: replay
    protection holds across everything one ChannelState has seen.
    """
    cfg = SealConfig(cipher, chunk_bytes, compression, compression_min_size)
    spec = C.Compression(cfg.compression, cfg.compression_min_size)
    st = state if state is not None else ChannelState()

    def _identity(name: str, role: str, rnd: int) -> Identity:
        if name not in identities:
            raise IdentityError(f"secure.channel: round {rnd}: no private key for {role} {name!r} in "
                                f"this process (have {sorted(identities)})")
        return identities[name]

    def send(tree, *, sender, recipient, round, meta=None):
        ident = _identity(sender, "sender", round)
        if recipient not in trust:
            raise IdentityError(f"secure.channel: round {round}: recipient {recipient!r} is not in "
                                f"the trust list ({sorted(trust)})")
        seq = st.next_seq.get((sender, recipient), 0)
        st.next_seq[(sender, recipient)] = seq + 1
        hop = spec if compress_recipients is None or recipient in compress_recipients else C.Compression()
        wire = tree if hop.method == "none" else C.compress(tree, hop)
        payload = message.encode(wire, meta)
        return seal(payload, sender=ident, recipient=trust[recipient], round=round, seq=seq,
                    run_id=run_id, structure=message.structure_digest(tree), compression=hop.tag(),
                    cipher=cfg.cipher, chunk_bytes=cfg.chunk_bytes)

    def broadcast(tree, *, sender, recipients, round, meta=None):
        """{recipient: sealed bytes}: serialized and hashed once, sealed per recipient on threads (hashlib
        releases the GIL); the same bytes per recipient as `send` would give, up to the random salt."""
        hops = {C.Compression() if compress_recipients is not None and r not in compress_recipients else spec
                for r in recipients}
        if len(hops) > 1 or len(recipients) < 2:  # compressed for some recipients only: one send each
            return {r: send(tree, sender=sender, recipient=r, round=round, meta=meta) for r in recipients}
        ident = _identity(sender, "sender", round)
        for r in recipients:
            if r not in trust:
                raise IdentityError(f"secure.channel: round {round}: recipient {r!r} is not in the trust "
                                    f"list ({sorted(trust)})")
        seqs = {}
        for r in recipients:
            seqs[r] = st.next_seq.get((sender, r), 0)
            st.next_seq[(sender, r)] = seqs[r] + 1
        hop = hops.pop()
        payload = message.encode(tree if hop.method == "none" else C.compress(tree, hop), meta)
        structure, digest = message.structure_digest(tree), hashlib.sha256(payload).digest()

        def one(r):
            return seal(payload, sender=ident, recipient=trust[r], round=round, seq=seqs[r], run_id=run_id,
                        structure=structure, compression=hop.tag(), cipher=cfg.cipher,
                        chunk_bytes=cfg.chunk_bytes, payload_sha256=digest)

        with ThreadPoolExecutor(min(len(recipients), os.cpu_count() or 1)) as pool:
            return dict(zip(recipients, pool.map(one, recipients)))

    def receive(data, *, like, sender, recipient, round):
        ident = _identity(recipient, "recipient", round)
        payload, h = open_sealed(data, recipient=ident, trust=trust, run_id=run_id, round=round,
                                 sender=sender, replay=st.replay)
        try:
            got_spec = C.Compression.from_tag(h.compression)
        except ValueError as e:
            raise UnsupportedError(f"secure.channel: {h.where()}: {e}") from None
        wire_like = like if got_spec.method == "none" else C.wire_like(like, got_spec)
        try:
            wire, meta = message.decode(payload, wire_like)
        except message.MessageError as e:
            raise StructureMismatchError(f"secure.channel: {h.where()}: {e}") from None
        expected = message.structure_digest(like)
        if h.structure != expected:
            raise StructureMismatchError(f"secure.channel: {h.where()}: structure digest "
                                         f"{h.structure[:16]} in the header, expected {expected[:16]}")
        tree = wire if got_spec.method == "none" else C.decompress(wire, like, got_spec)
        routing = {"sender": h.sender, "recipient": h.recipient, "round": str(h.round), "seq": str(h.seq)}
        return tree, {**meta, **routing}

    return Channel(send=send, receive=receive, broadcast=broadcast)
