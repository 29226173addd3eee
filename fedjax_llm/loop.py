"""The training loop of one run: build the federation, restore or start, loop rounds, checkpoint, sum up.

`train_run(plan, control, ...)` reads top to bottom:

    build     data, the sealed channel (keys), the federation; any user error stops here, nothing written
    restore   the newest valid checkpoint (a damaged one is moved aside) and its metrics records
    commit    only now does the directory become (or stay) this run's: config, .hydra/, history, log
    loop      rounds; each completed round is recorded atomically with respect to a stop (RunControl)
    summary   summary.json, the last write

In a multi-process run every process runs this loop on the same config; `RunFiles` lets only the
primary process write, checkpoints are written by all of them together (orbax), and a stop is decided
together at a round boundary.
"""
from __future__ import annotations

import logging
import os
import time
import types
from typing import Any, Optional

from fedjax_llm import distributed, rundir
from fedjax_llm.config import TrainConfig
from fedjax_llm.errors import DataError, ModelError, RunStopped, UserError
from fedjax_llm.lifecycle import RunControl, StopTraining

log = logging.getLogger("fedjax_llm")


class RunFiles:
    """The run directory's files as this process may write them: all of them on the primary process,
    none elsewhere (reads are the same everywhere)."""

    def __init__(self, run_dir: str, primary: bool):
        from fedjax_llm.metrics import MetricsLog

        self.run_dir, self.primary = run_dir, primary
        self.metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))

    def commit(self, plan: rundir.Plan, cfg: TrainConfig, hydra_files: Optional[dict], run_log: Any) -> None:
        if not self.primary:
            return
        if plan.kind == "new":
            if hydra_files:
                rundir.write_hydra_files(self.run_dir, hydra_files)
            rundir.write_config(self.run_dir, cfg)
        elif plan.stored is not None and plan.stored.run.rounds != cfg.run.rounds:
            rundir.write_config(self.run_dir, cfg)
        if run_log is not None:
            run_log.open()
        rundir.append_history(self.run_dir, "start", action=plan.kind, rounds=cfg.run.rounds,
                              command=rundir.command_line())

    def history(self, event: str, **fields: Any) -> None:
        if self.primary:
            rundir.append_history(self.run_dir, event, **fields)

    def rewrite_metrics(self, records: list) -> None:
        if self.primary:
            self.metrics.rewrite(records)

    def append_metrics(self, record: dict) -> None:
        if self.primary:
            self.metrics.append(record)

    def summary(self, summary: dict) -> None:
        if self.primary:
            from fedjax_llm.metrics import write_json

            write_json(os.path.join(self.run_dir, rundir.SUMMARY), summary)


def _eval_due(cfg: TrainConfig, rnd: int) -> bool:
    return rnd % cfg.run.eval_every == 0 or rnd == cfg.run.rounds


def _build(cfg: TrainConfig, run_dir: str, procs: distributed.Processes):
    """(data, federation, channel info, privacy ledger); user errors are raised as such."""
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.models.params import count_params
    from fedjax_llm.secure.privacy import Privacy
    from fedjax_llm.secure.round import make_channel
    from fedjax_llm.server import Federation

    try:
        data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    except (ValueError, OSError) as e:
        raise e if isinstance(e, UserError) else DataError(str(e)) from e
    log.info("data: %d clients in %d clouds, %d train / %d eval examples, vocab %d, %d truncated, "
             "%d excluded", data.num_clients, len(data.cloud_names), int(data.num_train_examples().sum()),
             sum(len(e) for e in data.eval_idx), data.vocab_size, data.num_truncated, data.excluded)
    if procs.primary:  # the primary makes the run's identities; the others load them
        channel, channel_info = make_channel(cfg.secure, data.cloud_names, run_dir, cfg.name)
    distributed.barrier("fedjax_llm:keys")
    if not procs.primary:
        channel, channel_info = make_channel(cfg.secure, data.cloud_names, run_dir, cfg.name)
    log.info("channel: %s", channel_info)
    try:
        fed = Federation(cfg, data, channel=channel)
    except (ValueError, OSError) as e:
        raise e if isinstance(e, UserError) else ModelError(f"model: {e}") from e
    privacy = Privacy(cfg, data) if cfg.secure.dp.enabled else None
    log.info("model: %d trainable / %d frozen params; cohort %d clients, layout %s on %d %s device(s)",
             count_params(fed.init_params), count_params(fed.frozen), fed.cohort_size,
             fed.layout.shape, fed.mesh.size, fed.mesh.devices.flat[0].platform)
    return data, fed, channel_info, privacy


def train_run(plan: rundir.Plan, control: RunControl, hydra_files: Optional[dict[str, str]] = None,
              run_log: Any = None, procs: distributed.Processes = distributed.Processes(0, 1)) -> dict:
    """Trains (or resumes) the run `plan` describes; returns the summary dict."""
    import jax

    from fedjax_llm.checkpoint import Checkpointer, CheckpointError, tree_digest
    from fedjax_llm.metrics import clean
    from fedjax_llm.report.tensorboard import TensorBoardWriter

    cfg, run_dir = plan.cfg, plan.run_dir
    t_start = time.perf_counter()
    data, fed, channel_info, privacy = _build(cfg, run_dir, procs)
    files = RunFiles(run_dir, procs.primary)

    ckpt = Checkpointer(os.path.join(run_dir, rundir.CHECKPOINTS), cfg.checkpoint.every,
                        cfg.checkpoint.keep, cfg.run.rounds) if cfg.checkpoint.enabled else None
    frozen_digest = tree_digest(fed.frozen)
    state = fed.init_state()
    restored = ckpt.restore(state) if ckpt else None
    if restored is not None:
        state, meta = restored
        if meta.get("frozen_digest") != frozen_digest:
            raise CheckpointError(f"{ckpt.directory}: the frozen base params differ from the ones the "
                                  "checkpoint was trained with (model or seed changed?)")
        if privacy is not None:
            privacy.restore(meta.get("accountant"))
    elif plan.kind == "resume" and plan.newest_step:
        log.warning("no checkpoint of %s could be used; starting the run over", run_dir)

    # Everything the user gave is usable: only now does the directory become (or stay) this run's.
    files.commit(plan, cfg, hydra_files, run_log)
    if restored is not None:
        if "records" in meta:
            records = list(meta["records"])
        else:  # a checkpoint written before records were kept in it
            records = [r for r in files.metrics.records() if r.get("round", 0) <= int(state.round)]
        files.rewrite_metrics(records)
        log.info("resumed from round %d in %s", int(state.round), ckpt.directory)
    else:
        records = [clean(dict(round=0, **fed.evaluate(state)))]
        files.rewrite_metrics(records)

    start = int(state.round)
    tb = TensorBoardWriter.open(run_dir, cfg, start, records)  # resumed: later events purged
    progress = types.SimpleNamespace(state=state, round=start, saved=start if restored else None)

    def checkpoint_meta() -> dict:
        extra = dict(accountant=privacy.state) if privacy is not None else {}
        return dict(frozen_digest=frozen_digest, name=cfg.name, records=records, **extra)

    def save(rnd: int, st: Any) -> None:
        ckpt.save(rnd, jax.device_get(st), checkpoint_meta())  # host values: every process writes the same
        progress.saved = rnd

    def save_last() -> str:
        """Checkpoints the last completed round if it is not on disk yet; says where things stand."""
        if ckpt is None:
            return (f"stopped after round {progress.round}; checkpoint.enabled=false, so this run cannot be "
                    "resumed")
        if progress.round == 0:
            return "stopped before round 1 completed; nothing to save (rerun the same command to start)"
        if progress.saved != progress.round:
            save(progress.round, progress.state)
        files.history("stopped", round=progress.round)
        return (f"stopped after round {progress.round} of {cfg.run.rounds}, which is checkpointed in "
                f"{ckpt.directory}; resume with: {rundir.resume_command(run_dir)}")

    if not procs.multi:
        control.on_stop(save_last)  # one process: the signal handler saves while a round still runs
    stopped_early = None
    bar = _progress(cfg, start) if procs.primary else None
    try:
        for rnd in range(start + 1, cfg.run.rounds + 1):
            if procs.multi:  # several processes stop together, at the same round boundary
                if distributed.any_process(control.stop_requested()):
                    raise StopTraining(save_last())
            elif control.stop_requested():  # one process: the signal handler has saved already
                raise StopTraining()
            if privacy is not None and privacy.would_exceed():
                log.warning("stopping before round %d: it would take epsilon past secure.dp.target_epsilon"
                            "=%g (now %.4f)", rnd, cfg.secure.dp.target_epsilon, privacy.epsilon())
                stopped_early = rnd - 1
                break
            new_state, record = fed.run_round(progress.state)
            if privacy is not None:
                record.update(privacy.step(new_state))
            if _eval_due(cfg, rnd):
                t0 = time.perf_counter()
                ev = fed.evaluate(new_state)
                record["eval_s"] = time.perf_counter() - t0
                for name, values in ev.pop("clouds").items():
                    record["clouds"][name].update(values)
                record.update(ev)
            record = clean(record)
            with control.commit():  # a signal now waits for this round to be recorded (and saved)
                files.append_metrics(record)
                records.append(record)
                tb.log_round(record)
                progress.state, progress.round = new_state, rnd
                if ckpt and (ckpt.should_save(rnd) or (privacy is not None and privacy.would_exceed())):
                    save(rnd, new_state)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}" if record["train_loss"] else "-",
                                **_headline(records))
    except RunStopped as e:
        with control.commit():
            where = save_last()
        raise type(e)(f"{e}; {where}") from e
    finally:
        tb.close()
        if bar is not None:
            bar.close()

    from fedjax_llm.models.params import count_params
    from fedjax_llm.summary import build_summary

    summary = build_summary(
        records, progress.round, name=cfg.name, seed=cfg.seed, rounds=cfg.run.rounds,
        resumed_from=start if restored else None, trainable_params=count_params(progress.state.params),
        frozen_params=count_params(fed.frozen), clouds=fed.cloud_names, clients=data.num_clients,
        cohort=fed.cohort_size, devices=fed.mesh.size, processes=procs.count,
        platform=fed.mesh.devices.flat[0].platform, layout=list(fed.layout.shape),
        stopped_early_after_round=stopped_early, privacy=privacy.summary() if privacy is not None else None,
        channel=channel_info, wall_s_this_process=time.perf_counter() - t_start, jax_version=jax.__version__)
    files.summary(summary)
    files.history("complete", round=progress.round)
    if cfg.data.task == "classify":
        log.info("done: eval accuracy %s -> %s, macro-F1 %s -> %s in %.1fs", summary["initial_eval_acc"],
                 summary["final_eval_acc"], summary["initial_eval_f1"], summary["final_eval_f1"],
                 summary["wall_s_this_process"])
    else:
        log.info("done: eval ppl %s -> %s in %.1fs", summary["initial_eval_ppl"], summary["final_eval_ppl"],
                 summary["wall_s_this_process"])
    return summary


def _headline(records: list[dict]) -> dict:
    from fedjax_llm.summary import headline

    evaluated = [r for r in records if r.get("eval_loss") is not None]
    return headline(evaluated[-1] if evaluated else None)


def _progress(cfg: TrainConfig, start: int) -> Optional[Any]:
    if not cfg.run.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.run.rounds, initial=start, desc=f"{cfg.name} rounds", unit="round")
