"""The aggregator as a process: it listens (deploy/hub.py), builds the model without data once a cloud has
said what its vocabulary and labels are, and drives the rounds, each wait bounded:

    wait      clouds to register: every cloud before this process's first round (deploy.start_timeout_s
              at most), afterwards the live ones; at least secure.quorum
    publish   GlobalMsg to each live cloud, asking for the eval figures of the previous round when due
    eval      the clouds' figures of that model -> the previous round's record is complete: append, save
    secagg    keys -> roster -> shares -> routed shares (secure aggregation across clouds)
    collect   updates until each recipient sent one, is dead or re-registered, or deploy.round_timeout_s
    unmask    the survivors' shares -> the secure sum
    step      aggregator_step -> the new global model and the round's metrics (who was missing and why)

Its run directory is a training run's (rundir.py): config.yaml, metrics.jsonl, summary.json,
history.jsonl, train.log, checkpoints/ of its AggregatorState (+ the accountant), and federation.json
(the model's shape and the clouds' example counts, so a restart rebuilds without any hello).
"""
from __future__ import annotations

import logging
import os
import time
import types
from typing import Optional

import numpy as np

from fedjax_llm import rundir
from fedjax_llm.aggregator import QuorumError, aggregator_step, open_round, verify
from fedjax_llm.clouds import wire as wirelib
from fedjax_llm.clouds.grpc_transport import serve
from fedjax_llm.clouds.message import MessageError
from fedjax_llm.deploy import parties
from fedjax_llm.deploy import protocol as dp
from fedjax_llm.deploy.hub import AGGREGATOR, Hub, read_facts, write_facts
from fedjax_llm.deploy.keys import PartyKeys
from fedjax_llm.errors import CheckpointError, RunStopped
from fedjax_llm.evaluate import combine, empty_figures
from fedjax_llm.lifecycle import RunControl, StopTraining
from fedjax_llm.secure import protocol as sp
from fedjax_llm.secure.secagg import SecAggError

log = logging.getLogger("fedjax_llm.aggregator")


class AggregatorService:
    def __init__(self, cfg, plan: rundir.Plan, keys: Optional[PartyKeys], control: RunControl):
        self.cfg, self.plan, self.run_dir, self.control = cfg, plan, plan.run_dir, control
        s = cfg.secure
        self.wire = wirelib.Wire(AGGREGATOR, keys.identity if keys else None, keys.trust if keys else {},
                                 sealed=s.seal, max_bytes=int(cfg.transport.max_message_mb * 2**20),
                                 cipher=s.cipher, chunk_bytes=s.chunk_bytes)
        self.hub = Hub(cfg, self.wire, dp.agreement(cfg))
        self.server, self.port = serve(cfg.deploy.host, cfg.deploy.port, self.hub.handle, chunk_bytes=s.chunk_bytes,
                                       tls=keys.tls if keys else None)
        log.info("aggregator listening on %s:%d (session %s, %s)", cfg.deploy.host, self.port, self.hub.session,
                 "sealed" if s.seal else "unsealed")

    def close(self) -> None:
        self.server.stop(grace=1.0)

    # ----- start-up ------------------------------------------------------------------------------------------
    def _facts(self) -> dict:
        """The federation's facts: stored, or from the clouds' hellos (bounded by deploy.start_timeout_s)."""
        cfg, hub = self.cfg, self.hub
        stored = read_facts(self.run_dir)
        if stored is not None:
            with hub.cond:
                hub.model_facts = (int(stored["vocab_size"]), stored["num_labels"])
            return stored
        until = time.monotonic() + cfg.deploy.start_timeout_s
        need_all = cfg.secure.secagg.enabled and cfg.secure.secagg.scope != "clients"
        with hub.cond:
            while hub.model_facts is None or (need_all and dp.weight_total(cfg, hub.examples) is None):
                if time.monotonic() >= until:
                    have = sorted(hub.examples)
                    raise QuorumError(f"deploy.start_timeout_s={cfg.deploy.start_timeout_s:g}: "
                                      f"{'no cloud' if not have else 'only ' + ', '.join(have)} registered"
                                      f"{'; secure aggregation across clouds needs every cloud s example count' if need_all and have else ''}")
                if self.control.stop_requested():
                    raise StopTraining()
                hub.cond.wait(0.2)
            vocab, labels = hub.model_facts
            facts = dict(vocab_size=vocab, num_labels=labels, examples=dict(hub.examples),
                         scale=dp.weight_total(cfg, hub.examples) if need_all else None)
        return facts

    def run(self) -> dict:
        try:
            return self._run()
        except RunStopped as e:  # the clouds stop too, with the reason
            self._say_done("stopped", str(e))
            raise

    def _run(self) -> dict:
        import jax

        from fedjax_llm.checkpoint import Checkpointer, tree_digest
        from fedjax_llm.metrics import MetricsLog, clean, write_json
        from fedjax_llm.models.params import count_params
        from fedjax_llm.secure.privacy import Privacy
        from fedjax_llm.summary import build_summary

        cfg, run_dir, hub = self.cfg, self.run_dir, self.hub
        t_start = time.perf_counter()
        facts = self._facts()
        fed = parties.aggregator_party(cfg, facts["vocab_size"], facts["num_labels"], facts.get("scale"))
        self.fed, spec = fed, fed.aggregator
        privacy = Privacy(cfg, fed.data) if cfg.secure.dp.enabled else None
        ckpt = Checkpointer(os.path.join(run_dir, rundir.CHECKPOINTS), cfg.checkpoint.every, cfg.checkpoint.keep,
                            cfg.run.rounds) if cfg.checkpoint.enabled else None
        frozen_digest = tree_digest(fed.frozen)
        state = fed.init_state().aggregator
        restored = ckpt.restore(state) if ckpt else None
        records = []
        if restored is not None:
            state, meta = restored
            if meta.get("frozen_digest") != frozen_digest:
                raise CheckpointError(f"{ckpt.directory}: the frozen base params differ from the ones the "
                                      "checkpoint was trained with (model or seed changed?)")
            if privacy is not None:
                privacy.restore(meta.get("accountant"))
            records = list(meta["records"])
        if self.plan.kind == "new":
            rundir.write_config(run_dir, cfg)
        write_facts(run_dir, facts)
        rundir.append_history(run_dir, "start", action=self.plan.kind, rounds=cfg.run.rounds,
                              command=rundir.command_line(), role="aggregator")
        metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
        metrics.rewrite(records)
        start = int(state.round)
        log.info("model: %d trainable / %d frozen params; %s round %d", count_params(fed.init_params),
                 count_params(fed.frozen), "resuming after" if restored else "starting at", start if restored else 1)
        names, task = list(fed.cloud_names), cfg.data.task
        eval_like = empty_figures(task, fed.data.num_labels)
        update_like = {n: parties.update_like(fed, c) for c, n in enumerate(names)}
        progress = types.SimpleNamespace(state=state, round=start, saved=start if restored else None,
                                         accountant=dict(privacy.state) if privacy is not None else None)

        def checkpoint_meta() -> dict:  # the accountant as of the committed round
            extra = dict(accountant=progress.accountant) if privacy is not None else {}
            return dict(frozen_digest=frozen_digest, name=cfg.name, records=records, facts=facts, **extra)

        def save_last() -> str:
            if ckpt is None or progress.round == 0:
                return f"stopped after round {progress.round}"
            if progress.saved != progress.round:
                ckpt.save(progress.round, progress.state, checkpoint_meta())
                progress.saved = progress.round
            rundir.append_history(run_dir, "stopped", round=progress.round)
            return f"stopped after round {progress.round} of {cfg.run.rounds}, checkpointed in {ckpt.directory}"

        def commit(record: dict, rnd: int, new_state) -> None:
            record = clean(record)
            with self.control.commit():
                metrics.append(record)
                records.append(record)
                progress.state, progress.round = new_state, rnd
                progress.accountant = dict(privacy.state) if privacy is not None else None
                if ckpt and rnd > 0 and (ckpt.should_save(rnd) or (privacy is not None and privacy.would_exceed())):
                    ckpt.save(rnd, new_state, checkpoint_meta())
                    progress.saved = rnd

        self.control.on_stop(save_last)
        current = state                                # the newest state (its record may still wait)
        pending = None if records else {"round": 0}   # the record waiting for the clouds' eval figures
        stopped_early, first = None, True
        for rnd in range(start + 1, cfg.run.rounds + 2):
            if self.control.stop_requested():
                raise StopTraining()
            final = rnd > cfg.run.rounds
            if not final and privacy is not None and privacy.would_exceed():
                log.warning("stopping before round %d: it would take epsilon past secure.dp.target_epsilon", rnd)
                stopped_early, final = rnd - 1, True
            dp.hold("publish", rnd)
            hub.new_round(rnd)
            live = self._wait_clouds(first)
            first = False
            t0 = time.perf_counter()
            until = time.monotonic() + cfg.deploy.round_timeout_s
            msg = open_round(spec, current)
            sent = hub.publish(live, "global", rnd, dp.pack("global", msg, round=rnd, final=final,
                                                           evaluate=pending["round"] if pending else None,
                                                           saved=progress.saved or 0, scale=facts.get("scale")))
            log.info("round %d: %s to %s", rnd, "final model" if final else "global model", sorted(sent))
            if pending is not None:
                t_eval = time.perf_counter()
                got, why = hub.collect("eval", rnd, sent, until)
                for n, reason in why.items():
                    log.warning("round %d: no eval figures from %s", pending["round"], reason)
                ev = combine(task, {n: dp.unpack(p, eval_like) for n, (p, _) in got.items()}, names)
                record = pending
                if record["round"] == 0:
                    record.update(ev)
                else:
                    record["eval_s"] = time.perf_counter() - t_eval
                    for name, values in ev.pop("clouds").items():
                        record["clouds"][name].update(values)
                    record.update(ev)
                commit(record, record["round"], current)
                pending = None
            if final:
                break
            current, record = self._round(rnd, spec, current, sent, until, update_like, t0)
            if privacy is not None:
                record.update(privacy.step(current))
            if rnd % cfg.run.eval_every == 0 or rnd == cfg.run.rounds:
                pending = record   # recorded (and saved) once the clouds' eval of its model arrives
            else:
                commit(record, rnd, current)

        summary = build_summary(
            records, progress.round, name=cfg.name, seed=cfg.seed, rounds=cfg.run.rounds,
            resumed_from=start if restored else None, trainable_params=count_params(progress.state.params),
            frozen_params=count_params(fed.frozen), clouds=names, clients=fed.data.num_clients,
            cohort=fed.cohort_size, devices=fed.mesh.size, platform=fed.mesh.devices.flat[0].platform,
            layout=list(fed.layout.shape), stopped_early_after_round=stopped_early,
            privacy=privacy.summary() if privacy is not None else None,
            channel=dict(sealed=cfg.secure.seal, transport="grpc", tls=cfg.transport.tls.enabled,
                         session=hub.session), deployed=True,
            wall_s_this_process=time.perf_counter() - t_start, jax_version=jax.__version__)
        write_json(os.path.join(run_dir, rundir.SUMMARY), summary)
        rundir.append_history(run_dir, "complete", round=progress.round)
        self._say_done("complete")
        return summary

    def _wait_clouds(self, first: bool) -> list[str]:
        cfg = self.cfg
        live = self.hub.wait_clouds(first, time.monotonic() + cfg.deploy.start_timeout_s, cfg.secure.quorum,
                                    self.control.stop_requested)
        if len(live) < cfg.secure.quorum:
            raise QuorumError(f"only {len(live)} clouds ({', '.join(live) or 'none'}) connected within "
                              f"deploy.start_timeout_s={cfg.deploy.start_timeout_s:g}, below secure.quorum="
                              f"{cfg.secure.quorum}")
        return live

    def _round(self, rnd: int, spec, state, sent: dict, until: float, update_like: dict, t0: float):
        """One round after the GlobalMsg went out: (new aggregator state, the round's metrics)."""
        from fedjax_llm.simulate import with_transport

        hub, names = self.hub, list(spec.cloud_names)
        errors: dict = {}
        published = set(sent)
        total, session = None, None
        if spec.secure is not None:
            sent, session = self._share_keys(rnd, spec, sent, until, errors)
        got, why = hub.collect("update", rnd, sent, until)
        errors.update(why)
        dp.hold("aggregate", rnd)
        updates = {}
        for n in names:
            if n in got:
                try:
                    updates[n] = dp.unpack(got[n][0], update_like[n])
                except MessageError as e:
                    errors[n] = f"{n}->aggregator: {type(e).__name__}: {e}"
            updates.setdefault(n, None)
            errors.setdefault(n, None if n in published else f"{n}: not connected at the start of round {rnd}")
        for n, reason in errors.items():
            if reason:
                log.warning("round %d: %s", rnd, reason)
        updates, errors = verify(spec, state, updates, errors)
        if session is not None:
            total = self._unmask(rnd, session, updates, errors)
        new_state, metrics = aggregator_step(spec, state, updates, errors, total)
        for n, reason in errors.items():
            if reason and hub.stats[n]["error"] is None:
                hub.stats[n]["error"] = reason
        record = with_transport(metrics, hub.stats, time.perf_counter() - t0)
        log.info("round %d: %d of %d clouds counted, train loss %s", rnd, sum(c["accepted"] for c in
                 metrics["clouds"].values()), len(names), metrics["train_loss"])
        return new_state, record

    def _share_keys(self, rnd: int, spec, sent: dict, until: float, errors: dict):
        """Keys -> roster -> shares -> routed: (the clouds of U2 with their sessions, (roster, holders))."""
        hub, names, params = self.hub, list(spec.cloud_names), spec.secure.params
        C = len(names)
        got, why = hub.collect("keyad", rnd, sent, until)
        errors.update(why)
        ads = {n: dp.unpack(p, parties.secagg_like("keyad", C)) for n, (p, _) in got.items()}
        try:
            roster, roster_msg = sp.roster(names, ads, params, rnd)
            to = hub.publish(roster.members, "roster", rnd, dp.pack("roster", roster_msg, round=rnd))
            got, why = hub.collect("shares", rnd, to, until)
            errors.update(why)
            shares = {n: dp.unpack(p, parties.secagg_like("shares", C)) for n, (p, _) in got.items()}
            holders, routed = sp.route(roster, shares, rnd)
        except SecAggError as e:
            raise QuorumError(f"round {rnd}: secure aggregation across clouds cannot start: {e}") from e
        kept = {}
        for n in holders:
            kept.update(hub.publish([n], "routed", rnd, dp.pack("routed", routed[n], round=rnd)))
        return kept, (roster, holders)

    def _unmask(self, rnd: int, session, updates: dict, errors: dict) -> np.ndarray:
        roster, holders = session
        names = list(roster.parties)
        request = sp.request(names, holders, updates, rnd)
        survivors = [n for n, on in zip(names, np.asarray(request.survivors)) if on]
        to = self.hub.publish(survivors, "unmask", rnd, dp.pack("unmask", request, round=rnd))
        got, why = self.hub.collect("reveal", rnd, to, time.monotonic() + self.cfg.deploy.round_timeout_s)
        errors.update({n: errors.get(n) or r for n, r in why.items()})
        reveals = {n: dp.unpack(p, parties.secagg_like("reveal", len(names))) for n, (p, _) in got.items()}
        try:
            return sp.unmask(roster, holders, updates, reveals, rnd)
        except SecAggError as e:
            raise QuorumError(f"round {rnd}: the secure sum cannot be unmasked: {e}") from e

    def _say_done(self, status: str, reason: str = "") -> None:
        """Tells every connected cloud the run ended, and waits (briefly) until they fetched it."""
        hub = self.hub
        with hub.cond:
            peers = list(hub.peers)
        sent = hub.publish(peers, "done", 0, dp.pack("done", status=status, reason=reason))
        hub.wait_fetched(sent, time.monotonic() + 2 * self.cfg.deploy.poll_s + 2)
