"""A cloud as a process: it loads only its own clients' data, connects to the aggregator and runs its half
of every round it is sent (cloud.py's `cloud_step`, the same function the simulation runs).

    hello     signed, with its config digest and facts; bounded retries (deploy.retries) at start-up
    poll      for its next message; fetch it (deadline grown with its size)
    global    evaluate the model when asked (its own held-out examples; the figures go up as sums), then
              train its clients from its state before that round; with secure aggregation across clouds
              keys -> shares -> routed shares first, reveal after
    save      its CloudState for the round, before the update leaves (write-ahead: a restart resumes
              from exactly what the aggregator may have counted)
    upload    the update (masked with secure aggregation)
    done      write summary.json and exit

A heartbeat thread keeps the aggregator informed while the cloud trains and notices a lost aggregator;
the cloud then re-registers (a new session) for up to deploy.reconnect_s. When the aggregator reopens a
round it had not finished (it restarted from a checkpoint), the cloud recomputes that round from its
state before it, so the update is the same and no round is applied twice.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any, Optional

import grpc

from fedjax_llm import rundir
from fedjax_llm.clouds import wire as wirelib
from fedjax_llm.clouds.grpc_transport import Connection, Refused, Unreachable
from fedjax_llm.clouds.message import MessageError
from fedjax_llm.deploy import parties
from fedjax_llm.deploy import protocol as dp
from fedjax_llm.deploy.keys import PartyKeys
from fedjax_llm.errors import RunStopped, UserError
from fedjax_llm.lifecycle import RunControl, StopTraining
from fedjax_llm.secure.seal import ReplayGuard

log = logging.getLogger("fedjax_llm.cloud")
AGGREGATOR = "aggregator"
ROUNDS_LOG = "rounds.jsonl"


class RegistrationRefused(UserError, RuntimeError):
    """The aggregator refused this cloud's hello (untrusted key, config mismatch, replay); names why."""


class SessionLost(Exception):
    """The aggregator does not know this session (it restarted) or cannot be reached: register again."""


class AggregatorLink:
    """This cloud's sessions with the aggregator: one hello per session, every call sealed under it."""

    def __init__(self, cfg, name: str, keys: Optional[PartyKeys]):
        s, d = cfg.secure, cfg.deploy
        self.cfg, self.name = cfg, name
        self.wire = wirelib.Wire(name, keys.identity if keys else None, keys.trust if keys else {}, sealed=s.seal,
                                 max_bytes=int(cfg.transport.max_message_mb * 2**20), cipher=s.cipher,
                                 chunk_bytes=s.chunk_bytes)
        self.target = f"{d.host}:{d.port}"
        self.conn = Connection(self.target, cfg.transport, d, chunk_bytes=s.chunk_bytes, tls=keys.tls if keys else None)
        self.run_id: Optional[str] = None
        self.guard = ReplayGuard()
        self.lost = threading.Event()

    def hello(self, agreement: dict, facts: dict, retries: Optional[int] = None) -> dict:
        session = dp.new_session()
        payload = dp.pack("hello", session=session, time=time.time(), agreement=agreement, facts=facts)
        try:
            reply = self.conn.exchange(
                lambda: self.wire.frames(payload, recipient=AGGREGATOR, run_id=dp.HELLO_SESSION), len(payload),
                "hello", lambda it: self.wire.open(it, run_id=dp.HELLO_SESSION, guard=None, sender=AGGREGATOR,
                                                   what="welcome")[0], retries)
        except Refused as e:
            raise RegistrationRefused(f"the aggregator at {self.target} refused cloud {self.name!r}: {e.reason}") from None
        kind, f = dp.peek(reply)
        if kind != "welcome" or f.get("cloud_session") != session:
            raise MessageError(f"welcome from the aggregator: expected a welcome for session {session}, got "
                               f"{kind!r} for {f.get('cloud_session')!r} (replayed?)")
        self.run_id, self.guard = dp.run_id(f["session"], session), ReplayGuard()
        self.lost.clear()
        return f

    def call(self, kind: str, tree: Any = None, reply_bytes: int = 0, retries: Optional[int] = None, **fields):
        """(reply payload, its kind, its fields); SessionLost when the aggregator no longer knows the session
        or cannot be reached."""
        run_id = self.run_id
        payload = dp.pack(kind, tree, **fields)
        try:
            reply = self.conn.exchange(
                lambda: self.wire.frames(payload, recipient=AGGREGATOR, run_id=run_id), len(payload) + reply_bytes,
                kind, lambda it: self.wire.open(it, run_id=run_id, guard=self.guard, sender=AGGREGATOR,
                                                what=f"reply to {kind}")[0], retries)
        except Refused as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                self.lost.set()
                raise SessionLost(e.reason) from None
            raise
        except Unreachable as e:
            self.lost.set()
            raise SessionLost(str(e)) from None
        k, f = dp.peek(reply)
        return reply, k, f


class CloudService:
    def __init__(self, cfg, name: str, plan: rundir.Plan, keys: Optional[PartyKeys], control: RunControl):
        from fedjax_llm.checkpoint import Checkpointer

        self.cfg, self.name, self.plan, self.run_dir, self.control = cfg, name, plan, plan.run_dir, control
        self.fed, data = parties.cloud_party(cfg, name)
        self.index = list(self.fed.cloud_names).index(name)
        self.cloud = self.fed.clouds[self.index]
        self.facts = dp.facts_of(data, cfg, name)
        log.info("cloud %r: %d clients, %d train / %d eval examples, vocab %d", name, self.facts["clients"],
                 self.facts["examples"], len(self.fed.evaluator.indices), data.vocab_size)
        self.link = AggregatorLink(cfg, name, keys)
        keep = max(cfg.checkpoint.keep, cfg.checkpoint.every + 2)
        self.ckpt = Checkpointer(os.path.join(self.run_dir, rundir.CHECKPOINTS), 1, keep, cfg.run.rounds)
        init = self.fed.init_state()
        self.initial = init.clouds[name]
        from fedjax_llm.aggregator import open_round
        self.global_like = open_round(self.fed.aggregator, init.aggregator)
        restored = self.ckpt.restore(self.initial)
        self.states = {0: self.initial} if restored is None else {int(restored[1]["round"]): restored[0]}
        self.after, self.pushed = 0, None
        self.trained = max(self.states)
        self._stop_beat = threading.Event()

    # ----- the session ---------------------------------------------------------------------------------------
    def _register(self, first: bool) -> None:
        d = self.cfg.deploy
        if first:
            welcome = self.link.hello(dp.agreement(self.cfg), self.facts)
        else:
            until, wait = time.monotonic() + d.reconnect_s, d.backoff_s
            while True:
                try:
                    welcome = self.link.hello(dp.agreement(self.cfg), self.facts, retries=1)
                    break
                except Unreachable as e:
                    if time.monotonic() >= until or self.control.stop_requested():
                        raise Unreachable(f"lost the aggregator at {self.link.target} for longer than "
                                          f"deploy.reconnect_s={d.reconnect_s:g}: {e}") from None
                    time.sleep(wait)
                    wait = min(2 * wait, d.backoff_max_s)
        self.after = 0
        log.info("cloud %r registered with the aggregator at %s (session %s, it has completed round %s)",
                 self.name, self.link.target, self.link.run_id, welcome.get("round", 0) - 1 if welcome.get("round") else 0)

    def _heartbeat(self) -> None:
        while not self._stop_beat.wait(self.cfg.deploy.heartbeat_s):
            if self.link.lost.is_set() or self.link.run_id is None:
                continue
            try:
                self.link.call("heartbeat", retries=1)
            except (SessionLost, Refused, MessageError) as e:
                log.warning("heartbeat to the aggregator failed: %s", e)

    def _next(self) -> tuple[str, int, bytearray, dict]:
        """The next message for this cloud: (kind, round, payload, fields)."""
        if self.pushed is not None:
            out, self.pushed = self.pushed, None
            return out
        while True:
            if self.control.stop_requested():
                raise StopTraining()
            _, kind, f = self.link.call("poll", after=self.after)
            if kind != "next":
                continue
            payload, kind, fields = self.link.call("fetch", reply_bytes=int(f["bytes"]), seq=int(f["seq"]))
            self.after = int(f["seq"]) + 1
            return kind, int(f["round"]), payload, fields

    def _expect(self, kind: str, rnd: int) -> Optional[bytearray]:
        """The payload of this round's `kind`, or None when the aggregator moved on (that message is kept)."""
        got = self._next()
        if got[0] == kind and got[1] == rnd:
            return got[2]
        self.pushed = got
        log.warning("round %d: expected %s, the aggregator sent %s of round %d; leaving round %d", rnd, kind,
                    got[0], got[1], rnd)
        return None

    def run(self) -> dict:
        beat = threading.Thread(target=self._heartbeat, name="fedjax-llm-heartbeat", daemon=True)
        self._register(first=True)
        rundir.append_history(self.run_dir, "start", action=self.plan.kind, rounds=self.cfg.run.rounds,
                              command=rundir.command_line(), role=f"cloud {self.name}")
        if self.plan.kind == "new":
            rundir.write_config(self.run_dir, self.cfg)
        self.control.on_stop(lambda: f"stopped; its state after round {self.trained} is checkpointed in "
                                     f"{self.ckpt.directory}")
        beat.start()
        try:
            while True:
                try:
                    kind, rnd, payload, fields = self._next()
                    if kind == "done":
                        return self._done(fields)
                    if kind == "global":
                        self._round(rnd, payload, fields)
                    else:
                        log.warning("ignoring %s of round %d outside its round", kind, rnd)
                except SessionLost as e:
                    log.warning("lost the session with the aggregator (%s); registering again", e)
                    self.pushed = None
                    self._register(first=False)
        finally:
            self._stop_beat.set()

    # ----- one round -----------------------------------------------------------------------------------------
    def _state_before(self, rnd: int):
        """Its state as input to round `rnd`: the newest one at or before round rnd - 1."""
        older = [k for k in self.states if k <= rnd - 1]
        if older:
            return max(older), self.states[max(older)]
        restored = self.ckpt.restore(self.initial, max_step=rnd - 1)
        if restored is not None:
            return int(restored[1]["round"]), restored[0]
        return 0, self.initial

    def _upload(self, kind: str, tree: Any, rnd: int, **fields) -> bool:
        try:
            self.link.call(kind, tree, round=rnd, **fields)
            return True
        except Refused as e:
            log.warning("round %d: the aggregator refused this cloud's %s: %s", rnd, kind, e.reason)
            return False

    def _round(self, rnd: int, payload: bytearray, fields: dict) -> None:
        from fedjax_llm.cloud import cloud_step
        from fedjax_llm.evaluate import empty_figures

        msg = dp.unpack(payload, self.global_like)
        if fields.get("scale") and fields["scale"] != self.cloud.secagg_scale:  # the federation's public total
            self.cloud = dataclasses.replace(self.cloud, secagg_scale=float(fields["scale"]))
        if fields.get("evaluate") is not None:
            figures = self.fed.evaluator.figures(msg.params, _frozen_for(self.fed, msg))[self.name]
            figures = figures or empty_figures(self.cfg.data.task, self.fed.data.num_labels)
            self._upload("eval", figures, rnd, of=int(fields["evaluate"]))
            self._log(dict(round=int(fields["evaluate"]), eval_loss_sum=float(figures["loss_sum"]),
                           eval_count=float(figures["count"])))
        if fields.get("final"):
            return
        since, state = self._state_before(rnd)
        party = None
        spec = self.fed.aggregator.secure
        if spec is not None:
            party = self._share_keys(rnd, spec)
            if party is None:
                return
        update, new_state = cloud_step(self.cloud, state, msg, party)
        with self.control.commit():  # write-ahead: saved before the update leaves the cloud
            self.ckpt.delete_after(rnd - 1)
            self.ckpt.save(rnd, new_state, dict(round=rnd, cloud=self.name, trained_from=since))
            self.states = {k: v for k, v in self.states.items() if k < rnd and k >= rnd - self.ckpt_keep()}
            self.states[rnd] = new_state
            self.trained = rnd
        dp.hold("upload", rnd)
        sent = self._upload("update", update, rnd)
        report = update.report
        self._log(dict(round=rnd, trained_from=since, clients=int((report.slot_client >= 0).sum()), sent=sent,
                       masked=party is not None))
        log.info("round %d: trained %d clients from its state after round %d; update %s", rnd,
                 int((report.slot_client >= 0).sum()), since, "sent" if sent else "refused")
        if party is not None and sent:
            req = self._expect("unmask", rnd)
            if req is not None:
                from fedjax_llm.secure.secagg import SecAggError
                try:
                    reveal = party.reveal(dp.unpack(req, parties.secagg_like("unmask", len(self.fed.cloud_names))))
                except SecAggError as e:
                    log.warning("round %d: refused to reveal shares: %s", rnd, e)
                    return
                self._upload("reveal", reveal, rnd)

    def ckpt_keep(self) -> int:
        return max(self.cfg.checkpoint.keep, self.cfg.checkpoint.every + 2)

    def _share_keys(self, rnd: int, spec):
        """Keys, shares, routed shares: this round's party, or None when it could not join the secure sum."""
        from fedjax_llm.secure.protocol import CloudSecAgg
        from fedjax_llm.secure.secagg import SecAggError

        C = len(self.fed.cloud_names)
        party = CloudSecAgg(self.name, self.fed.cloud_names, spec.params, rnd)
        if not self._upload("keyad", party.advertise(), rnd):
            return None
        try:
            roster = self._expect("roster", rnd)
            if roster is None or not self._upload("shares", party.share(dp.unpack(roster, parties.secagg_like("roster", C))), rnd):
                return None
            routed = self._expect("routed", rnd)
            if routed is None:
                return None
            party.receive(dp.unpack(routed, parties.secagg_like("routed", C)))
        except (SecAggError, MessageError) as e:
            log.warning("round %d: this cloud cannot join the secure sum: %s: %s", rnd, type(e).__name__, e)
            return None
        return party

    def _log(self, record: dict) -> None:
        with open(os.path.join(self.run_dir, ROUNDS_LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def _done(self, fields: dict) -> dict:
        from fedjax_llm.metrics import write_json

        status, reason = fields.get("status"), fields.get("reason", "")
        if status != "complete":
            raise RunStopped(f"the aggregator stopped the run: {reason or status}")
        summary = dict(complete=True, cloud=self.name, rounds_completed=self.cfg.run.rounds,
                       last_round_trained=self.trained, **self.facts)
        write_json(os.path.join(self.run_dir, rundir.SUMMARY), summary)
        rundir.append_history(self.run_dir, "complete", round=self.trained)
        log.info("cloud %r: the run is complete (its last round trained: %d)", self.name, self.trained)
        return summary


def _frozen_for(fed, msg) -> Any:
    """The frozen base the global model of `msg` runs on (FedEx-LoRA's residual comes with the broadcast)."""
    from fedjax_llm.aggregate.lora_round import NAME, fold_residual

    b = msg.broadcast
    residual = b.get(NAME, {}).get("residual") if isinstance(b, dict) else None
    return fold_residual(fed.frozen, residual) if residual else fed.frozen
