"""The aggregator's network side: it registers clouds and keeps their outboxes and its inbox.

Calls (fedjax_llm/deploy/protocol.py) arrive on gRPC threads: a hello registers a cloud (refused when
its key is not trusted, the hello is replayed or stale, or a config key that must agree differs, named);
a heartbeat or any call marks it alive; a poll waits for the cloud's next message, a fetch streams it
sealed for that cloud, an upload of the current round is filed in the inbox (once, however often it is
retried). The round thread (deploy/aggregator_service.py) publishes to outboxes and collects from the
inbox with bounded waits that stop early for a cloud that went silent or re-registered.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
import time
from typing import Iterable, Iterator, Optional

import grpc

from fedjax_llm.clouds import wire as wirelib
from fedjax_llm.clouds.grpc_transport import Refused
from fedjax_llm.clouds.link import Link
from fedjax_llm.clouds.message import MessageError
from fedjax_llm.deploy import protocol as dp
from fedjax_llm.files import atomic_write_text, read_json
from fedjax_llm.secure.seal import ReplayGuard, UnknownSenderError, WrongRunError, peek_header

log = logging.getLogger("fedjax_llm.aggregator")
FACTS = "federation.json"
AGGREGATOR = "aggregator"


@dataclasses.dataclass
class Peer:
    """The aggregator's view of one registered cloud (one session)."""

    name: str
    session: str
    run_id: str
    guard: ReplayGuard
    outbox: list            # [(kind, round, payload, fields)], its messages of this session in order; a
                            # payload older than the newest one fetched in full is released (None)
    last_seen: float
    facts: dict


def _counting(frames: Iterable[bytes], box: list) -> Iterator[bytes]:
    for f in frames:
        box[0] += len(f)
        yield f


class Hub:
    """Everything the gRPC threads and the round thread share: peers, outboxes, inbox, round stats."""

    def __init__(self, cfg, wire: wirelib.Wire, agreed: dict):
        self.cfg, self.wire, self.agreed = cfg, wire, agreed
        self.session = dp.new_session()
        self.peers: dict[str, Peer] = {}
        self.cond = threading.Condition()
        self.inbox: dict[tuple[str, str, int], tuple[bytearray, dict]] = {}
        self.round = 0                    # the round whose messages are accepted
        self.seen_sessions: set[str] = set()
        self.model_facts: Optional[tuple] = None
        self.examples: dict[str, int] = {}
        self.stats: dict[str, dict] = {}
        self.links = {n: Link.from_config(cfg.clouds.members[n].link) for n in cfg.clouds.members}
        self.audit = cfg.deploy.audit_dir
        self.fetched: set[tuple[str, int]] = set()   # (cloud session, outbox seq) streamed in full

    # ----- what the gRPC threads call ---------------------------------------------------------------------
    def handle(self, frames: Iterator[bytes], addr: str) -> Iterable[bytes]:
        it = iter(frames)
        first = next(it, None)
        if first is None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty call")
        sender, run_id = self._route(first, addr)
        box = [0]
        rest = _counting(itertools.chain([first], it), box)
        if run_id == dp.HELLO_SESSION:
            return self._hello(rest, sender, addr)
        with self.cond:
            peer = self.peers.get(sender)
        if peer is None or peer.run_id != run_id:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"session {run_id!r} of {sender!r} is not current "
                          f"(aggregator session {self.session}); register again")
        payload = self._open(rest, run_id, peer.guard, sender, addr)
        kind, fields = dp.peek(payload)
        with self.cond:
            peer.last_seen = time.monotonic()
        if kind == "heartbeat":
            return self._reply(peer, dp.pack("ack"))
        if kind == "poll":
            return self._reply(peer, self._poll(peer, int(fields.get("after", 0))))
        if kind == "fetch":
            return self._fetch(peer, int(fields["seq"]))
        if kind in dp.FROM_CLOUD:
            self._file(peer, kind, fields, payload, box[0])
            return self._reply(peer, dp.pack("ack"))
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown message kind {kind!r} from {sender!r}")

    def _route(self, first: bytes, addr: str) -> tuple[str, str]:
        """(claimed sender, session) from the first frame, before anything is authenticated."""
        try:
            if self.wire.sealed:
                h = peek_header(first)
                return h.sender, h.run_id
            h = json.loads(bytes(first[4:]))
            return str(h["sender"]), str(h["run_id"])
        except (MessageError, ValueError, KeyError, TypeError) as e:
            log.warning("refused a call from %s: unreadable first frame (%s)", addr, e)
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unreadable message header: {e}") from None

    def _open(self, frames, run_id, guard, sender, addr, what="message") -> bytearray:
        try:
            payload, _ = self.wire.open(frames, run_id=run_id, guard=guard, sender=sender, what=f"{what} from {sender!r}")
        except wirelib.MessageTooLarge as e:
            log.warning("refused %s from %s (%s): %s", what, sender, addr, e)
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except MessageError as e:
            log.warning("refused %s from %s (%s): %s: %s", what, sender, addr, type(e).__name__, e)
            code = grpc.StatusCode.PERMISSION_DENIED if isinstance(e, (UnknownSenderError, WrongRunError)) \
                else grpc.StatusCode.INVALID_ARGUMENT
            raise Refused(code, f"{type(e).__name__}: {e}") from None
        if self.audit:
            os.makedirs(self.audit, exist_ok=True)
            with open(os.path.join(self.audit, f"{time.time_ns()}-{sender}.bin"), "wb") as f:
                f.write(payload)
        return payload

    def _hello(self, frames, sender: str, addr: str) -> Iterable[bytes]:
        payload = self._open(frames, dp.HELLO_SESSION, None, None, addr, "hello")
        kind, f = dp.peek(payload)
        where = f"hello from {sender!r} ({addr})"

        def refuse(code, why):
            log.warning("refused %s: %s", where, why)
            raise Refused(code, why)

        if kind != "hello":
            refuse(grpc.StatusCode.INVALID_ARGUMENT, f"expected a hello, got {kind!r}")
        if sender not in self.cfg.clouds.members:
            refuse(grpc.StatusCode.PERMISSION_DENIED, f"{sender!r} is not a cloud of this run "
                                                      f"({sorted(self.cfg.clouds.members)})")
        session, sent = str(f.get("session", "")), float(f.get("time", 0))
        if abs(time.time() - sent) > dp.HELLO_MAX_AGE_S:
            refuse(grpc.StatusCode.PERMISSION_DENIED, f"hello is {time.time() - sent:.0f}s old (replayed?)")
        differ = dp.disagreement(self.agreed, f.get("agreement", {}))
        if differ:
            refuse(grpc.StatusCode.FAILED_PRECONDITION, f"config differs from the aggregator's at "
                   f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}; every party must run the same "
                   f"config for these keys")
        facts = f.get("facts", {})
        shape = dp.model_facts(facts)
        with self.cond:
            if session in self.seen_sessions:
                refuse(grpc.StatusCode.PERMISSION_DENIED, f"session {session} was already registered (replayed hello)")
            if self.model_facts is not None and shape != self.model_facts:
                refuse(grpc.StatusCode.FAILED_PRECONDITION, f"its data gives vocabulary and labels {shape}, the "
                       f"federation's are {self.model_facts} (data.tokenizer_path, data.label_field)")
            self.seen_sessions.add(session)
            self.model_facts = self.model_facts or shape
            self.examples[sender] = int(facts.get("examples", 0))
            old = self.peers.get(sender)
            self.peers[sender] = Peer(sender, session, dp.run_id(self.session, session), ReplayGuard(), [],
                                      time.monotonic(), facts)
            self.cond.notify_all()
        log.info("cloud %r connected from %s (session %s%s)", sender, addr, session,
                 f", replacing session {old.session}" if old else "")
        reply = dp.pack("welcome", session=self.session, cloud_session=session, round=self.round)
        return self.wire.frames(reply, recipient=sender, run_id=dp.HELLO_SESSION)

    def _reply(self, peer: Peer, payload: bytes) -> Iterable[bytes]:
        return self.wire.frames(payload, recipient=peer.name, run_id=peer.run_id)

    def _poll(self, peer: Peer, after: int) -> bytes:
        deadline = time.monotonic() + self.cfg.deploy.poll_s
        with self.cond:
            while len(peer.outbox) <= after and self.peers.get(peer.name) is peer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return dp.pack("none")
                self.cond.wait(left)
            if self.peers.get(peer.name) is not peer:
                return dp.pack("none")
            kind, rnd, payload, fields = peer.outbox[after]
        return dp.pack("next", seq=after, kind=kind, round=rnd, bytes=len(payload or b""), fields=fields)

    def _fetch(self, peer: Peer, seq: int) -> Iterable[bytes]:
        with self.cond:
            if not 0 <= seq < len(peer.outbox):
                raise Refused(grpc.StatusCode.OUT_OF_RANGE, f"no message {seq} for {peer.name!r}")
            kind, rnd, payload, _ = peer.outbox[seq]
        if payload is None:
            raise Refused(grpc.StatusCode.OUT_OF_RANGE, f"message {seq} ({kind} of round {rnd}) for {peer.name!r} "
                          "was released once a later one was fetched")
        box = [0]
        frames = self.wire.frames(payload, recipient=peer.name, run_id=peer.run_id)

        def counted():
            yield from _counting(frames, box)
            with self.cond:
                self.fetched.add((peer.session, seq))
                for i in range(seq):  # the cloud asks for message seq only once it holds every earlier one
                    k, r, _, f = peer.outbox[i]
                    peer.outbox[i] = (k, r, None, f)
                self.cond.notify_all()
                st = self.stats.get(peer.name)
                if st is not None and kind != "done":
                    st["bytes_down"] += box[0]
                    st["comm_s"] += self.links[peer.name].transfer_seconds(box[0])
        return counted()

    def _file(self, peer: Peer, kind: str, fields: dict, payload: bytearray, nbytes: int) -> None:
        rnd = int(fields.get("round", -1))
        with self.cond:
            if rnd != self.round:
                why = f"{kind} for round {rnd}, the aggregator is in round {self.round}"
                log.warning("refused an upload of %r: %s", peer.name, why)
                raise Refused(grpc.StatusCode.ABORTED, why)
            key = (peer.name, kind, rnd)
            if key not in self.inbox:  # a retried upload is filed once
                self.inbox[key] = (payload, fields)
                st = self.stats.get(peer.name)
                if st is not None:
                    st["bytes_up"] += nbytes
                    st["comm_s"] += self.links[peer.name].transfer_seconds(nbytes)
            self.cond.notify_all()

    # ----- what the round thread calls ----------------------------------------------------------------------
    def alive(self, name: str) -> bool:
        p = self.peers.get(name)
        return p is not None and time.monotonic() - p.last_seen <= self.cfg.deploy.dead_after_s

    def publish(self, names: Iterable[str], kind: str, rnd: int, payload: bytes, **fields) -> dict[str, Peer]:
        """Appends one message to each named cloud's outbox; returns the sessions it went to."""
        with self.cond:
            out = {}
            for n in names:
                peer = self.peers.get(n)
                if peer is not None:
                    peer.outbox.append((kind, rnd, payload, fields))
                    out[n] = peer
            self.cond.notify_all()
        return out

    def collect(self, kind: str, rnd: int, sent: dict[str, Peer], until: float) -> tuple[dict, dict]:
        """({cloud: (payload, fields)} that arrived, {cloud: why not}) for the clouds in `sent`; waits
        until each has answered, is dead, has a new session, or `until` (monotonic) passed."""
        got, why = {}, {}
        with self.cond:
            while True:
                now = time.monotonic()
                for n, peer in sent.items():
                    if n in got or n in why:
                        continue
                    if (n, kind, rnd) in self.inbox:
                        got[n] = self.inbox[(n, kind, rnd)]
                    elif self.peers.get(n) is not peer:
                        why[n] = f"{n}: reconnected during round {rnd} (new session); no {kind} for it"
                    elif now - peer.last_seen > self.cfg.deploy.dead_after_s:
                        why[n] = (f"{n}: lost: nothing heard for {now - peer.last_seen:.1f}s "
                                  f"(deploy.dead_after_s={self.cfg.deploy.dead_after_s:g}); no {kind} in round {rnd}")
                if len(got) + len(why) == len(sent):
                    return got, why
                if now >= until:
                    for n in sent:
                        if n not in got and n not in why:
                            why[n] = (f"{n}: no {kind} within deploy.round_timeout_s="
                                      f"{self.cfg.deploy.round_timeout_s:g} in round {rnd}")
                    return got, why
                self.cond.wait(min(0.5, until - now))

    def wait_clouds(self, everyone: bool, until: float, quorum: int, stop) -> list[str]:
        """The registered, live clouds: once every cloud is (`everyone`: this process's first round) or
        once `quorum` are; at `until` (or on `stop()`) whoever is there."""
        names = list(self.cfg.clouds.members)
        with self.cond:
            while True:
                live = [n for n in names if self.alive(n)]
                if (len(live) == len(names) or (not everyone and len(live) >= quorum)
                        or time.monotonic() >= until or stop()):
                    return live
                self.cond.wait(0.2)

    def wait_fetched(self, sent: dict[str, Peer], until: float) -> None:
        """Until each peer fetched the last message of its outbox (or is gone, or `until`)."""
        with self.cond:
            while time.monotonic() < until:
                if all(self.peers.get(n) is not p or not self.alive(n) or (p.session, len(p.outbox) - 1) in self.fetched
                       for n, p in sent.items()):
                    return
                self.cond.wait(0.2)

    def new_round(self, rnd: int) -> None:
        with self.cond:
            self.round = rnd
            self.inbox = {k: v for k, v in self.inbox.items() if k[2] >= rnd}
            self.stats = {n: dict(bytes_down=0, bytes_up=0, comm_s=0.0, seal_s=0.0, open_s=0.0, error=None)
                          for n in self.cfg.clouds.members}


def write_facts(run_dir: str, facts: dict) -> None:
    atomic_write_text(os.path.join(run_dir, FACTS), json.dumps(facts, indent=2, sort_keys=True) + "\n")


def read_facts(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, FACTS)
    return read_json(path, "federation facts") if os.path.exists(path) else None
