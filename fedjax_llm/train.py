"""Hydra entry point: compose and validate the config, decide what to do with the run directory, build
the federation, loop rounds, checkpoint.

    python -m fedjax_llm.train                                 # the default experiment
    python -m fedjax_llm.train model.lora.enabled=true         # LoRA instead of full fine-tuning
    python -m fedjax_llm.train -m client.lr=1e-3,3e-3 seed=0,1 # a multirun sweep
    python -m fedjax_llm.train resume=RUN_DIR [run.rounds=N]   # continue (or extend) a run as stored

The run directory holds config.yaml (resolved), metrics.jsonl (one line per round, round 0 is the
initial evaluation), summary.json, history.jsonl (one line per start and end), train.log and
checkpoints/. A directory holds one run: rerunning into it (hydra.run.dir=DIR or resume=DIR) continues
from the newest valid checkpoint, says a complete run is complete, and refuses another config. SIGINT
or SIGTERM checkpoint the last completed round and exit 130 / 143; a user's mistake is one line on
stderr (`--verbose` or HYDRA_FULL_ERROR=1 for the traceback).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
import types
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedjax_llm import rundir
from fedjax_llm.config import TrainConfig, register_configs, to_train_config
from fedjax_llm.errors import DataError, ModelError, RunStopped, UserError
from fedjax_llm.lifecycle import RunControl, StopTraining, quiet_closed_loop_noise, raise_on_signals, supervise
from fedjax_llm.validation import validate

log = logging.getLogger("fedjax_llm")
CONF_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "conf"))
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def _eval_due(cfg: TrainConfig, rnd: int) -> bool:
    return rnd % cfg.run.eval_every == 0 or rnd == cfg.run.rounds


def run(cfg: TrainConfig, run_dir: str, control: Optional[RunControl] = None,
        hydra_files: Optional[dict[str, str]] = None) -> dict:
    """Trains (or resumes) into run_dir and returns the summary dict. Refuses, changing nothing, a
    directory holding another run, other files, or (with cfg.resume) no run; a complete run is left as
    it is and its stored summary returned."""
    cfg = validate(cfg)  # before any data work or compilation
    if cfg.deploy.mode == "local":  # the same run as one process per party (fedjax_llm/deploy/launch.py)
        from fedjax_llm.deploy.launch import run_local
        return run_local(cfg, run_dir, control or RunControl(), hydra_files)
    plan = rundir.plan_run(run_dir, cfg, must_hold_run=cfg.resume is not None)
    if plan.kind == "complete":
        log.info("%s", plan.message)
        return plan.summary or {}
    failed = False
    with rundir.RunDirLock(plan.run_dir):
        handler = RunLog(os.path.join(plan.run_dir, "train.log"))
        logging.getLogger().addHandler(handler)
        log.info("%s", plan.message)
        try:
            return _train(plan, control or RunControl(), hydra_files, handler)
        except BaseException:
            failed = True
            raise
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
            if failed and plan.kind == "new":
                _remove_failed_start(plan)


class RunLog(logging.handlers.MemoryHandler):
    """RUN_DIR/train.log, held in memory until the run has accepted its data and model (`open()`), so a
    start that fails before then leaves the directory's log as it was."""

    def __init__(self, path: str):
        super().__init__(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        self.path = path
        self.setLevel(logging.INFO)

    def open(self) -> None:
        target = logging.FileHandler(self.path, encoding="utf-8")
        target.setFormatter(logging.Formatter(LOG_FORMAT))
        self.setTarget(target)
        self.flush()

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return self.target is not None

    def close(self) -> None:
        target = self.target
        if target is None:
            self.buffer = []  # never opened: the lines are dropped with the failed start
        super().close()
        if target is not None:
            target.close()


def _remove_failed_start(plan: rundir.Plan) -> None:
    """A new run that failed before storing its config removes what this start created (a directory that
    held the user's keys keeps them); the error message is the record of what went wrong."""
    import shutil

    if os.path.exists(os.path.join(plan.run_dir, rundir.CONFIG)):
        return
    for name in set(os.listdir(plan.run_dir)) - plan.entries:
        path = os.path.join(plan.run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _train(plan: rundir.Plan, control: RunControl, hydra_files: Optional[dict[str, str]],
           run_log: Optional[RunLog] = None) -> dict:
    cfg, run_dir = plan.cfg, plan.run_dir
    import jax  # deferred: a bad config fails without touching devices

    for noisy in ("absl", "jax._src.xla_bridge"):  # orbax logs every step at INFO through absl
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from fedjax_llm.checkpoint import Checkpointer, tree_digest
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.metrics import MetricsLog, clean, write_json
    from fedjax_llm.models.params import count_params
    from fedjax_llm.report.tensorboard import TensorBoardWriter
    from fedjax_llm.secure.privacy import Privacy
    from fedjax_llm.secure.round import make_channel
    from fedjax_llm.server import Federation

    t_start = time.perf_counter()
    try:
        data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    except (ValueError, OSError) as e:
        raise e if isinstance(e, UserError) else DataError(str(e)) from e
    log.info("data: %d clients in %d clouds, %d train / %d eval examples, vocab %d, %d truncated, "
             "%d excluded", data.num_clients, len(data.cloud_names), int(data.num_train_examples().sum()),
             sum(len(e) for e in data.eval_idx), data.vocab_size, data.num_truncated, data.excluded)
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

    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    ckpt = Checkpointer(os.path.join(run_dir, rundir.CHECKPOINTS), cfg.checkpoint.every,
                        cfg.checkpoint.keep, cfg.run.rounds) if cfg.checkpoint.enabled else None
    frozen_digest = tree_digest(fed.frozen)
    state = fed.init_state()
    restored = ckpt.restore(state) if ckpt else None
    if restored is not None:
        state, meta = restored
        if meta.get("frozen_digest") != frozen_digest:
            from fedjax_llm.checkpoint import CheckpointError
            raise CheckpointError(f"{ckpt.directory}: the frozen base params differ from the ones the "
                                  "checkpoint was trained with (model or seed changed?)")
        if privacy is not None:
            privacy.restore(meta.get("accountant"))
    elif plan.kind == "resume" and plan.newest_step:
        log.warning("no checkpoint of %s could be used; starting the run over", run_dir)

    # Everything the user gave is usable: only now does the directory become (or stay) this run's.
    if plan.kind == "new":
        if hydra_files:
            rundir.write_hydra_files(run_dir, hydra_files)
        rundir.write_config(run_dir, cfg)
    elif plan.stored is not None and plan.stored.run.rounds != cfg.run.rounds:
        rundir.write_config(run_dir, cfg)
    if run_log is not None:
        run_log.open()
    rundir.append_history(run_dir, "start", action=plan.kind, rounds=cfg.run.rounds,
                          command=rundir.command_line())

    if restored is not None:
        if "records" in meta:
            records = list(meta["records"])
            metrics.rewrite(records)
        else:  # a checkpoint written before records were kept in it
            metrics.truncate(int(state.round))
            records = metrics.records()
        log.info("resumed from round %d in %s", int(state.round), ckpt.directory)
    else:
        records = [clean(dict(round=0, **fed.evaluate(state)))]
        metrics.rewrite(records)

    start = int(state.round)
    tb = TensorBoardWriter.open(run_dir, cfg, start, records)  # resumed: later events purged
    progress = types.SimpleNamespace(state=state, round=start, saved=start if restored else None)

    def checkpoint_meta() -> dict:
        extra = dict(accountant=privacy.state) if privacy is not None else {}
        return dict(frozen_digest=frozen_digest, name=cfg.name, records=records, **extra)

    def save_last() -> str:
        """Checkpoints the last completed round if it is not on disk yet; says where things stand."""
        if ckpt is None:
            return (f"stopped after round {progress.round}; checkpoint.enabled=false, so this run cannot be "
                    "resumed")
        if progress.round == 0:
            return "stopped before round 1 completed; nothing to save (rerun the same command to start)"
        if progress.saved != progress.round:
            ckpt.save(progress.round, progress.state, checkpoint_meta())
            progress.saved = progress.round
        rundir.append_history(run_dir, "stopped", round=progress.round)
        return (f"stopped after round {progress.round} of {cfg.run.rounds}, which is checkpointed in "
                f"{ckpt.directory}; resume with: {rundir.resume_command(run_dir)}")

    control.on_stop(save_last)
    stopped_early = None
    bar = _progress(cfg, start)
    try:
        for rnd in range(start + 1, cfg.run.rounds + 1):
            if control.stop_requested():
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
                metrics.append(record)
                records.append(record)
                tb.log_round(record)
                progress.state, progress.round = new_state, rnd
                if ckpt and (ckpt.should_save(rnd) or (privacy is not None and privacy.would_exceed())):
                    ckpt.save(rnd, new_state, checkpoint_meta())
                    progress.saved = rnd
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

    from fedjax_llm.summary import build_summary

    summary = build_summary(
        records, progress.round, name=cfg.name, seed=cfg.seed, rounds=cfg.run.rounds,
        resumed_from=start if restored else None, trainable_params=count_params(progress.state.params),
        frozen_params=count_params(fed.frozen), clouds=fed.cloud_names, clients=data.num_clients,
        cohort=fed.cohort_size, devices=fed.mesh.size, platform=fed.mesh.devices.flat[0].platform,
        layout=list(fed.layout.shape), stopped_early_after_round=stopped_early,
        privacy=privacy.summary() if privacy is not None else None, channel=channel_info,
        wall_s_this_process=time.perf_counter() - t_start, jax_version=jax.__version__)
    write_json(os.path.join(run_dir, rundir.SUMMARY), summary)
    rundir.append_history(run_dir, "complete", round=progress.round)
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


def _hydra_record(dcfg: DictConfig, hc: Any) -> dict[str, str]:
    """The files Hydra itself would write to .hydra/ (we write them once the run has started)."""
    return {"config.yaml": OmegaConf.to_yaml(dcfg),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(hc)})),
            "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task)))}


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def _hydra_main(dcfg: DictConfig) -> Optional[float]:
    hc = HydraConfig.get()
    output_dir = hc.runtime.output_dir
    try:
        cfg = to_train_config(dcfg)
        if cfg.resume:
            run_dir = os.path.abspath(os.path.expanduser(cfg.resume))
            cfg = rundir.resume_config(run_dir, list(hc.overrides.task), dict(hc.runtime.choices))
        else:
            run_dir = output_dir
        record = _hydra_record(dcfg, hc) if not cfg.resume else None
        summary = supervise(lambda control: run(cfg, run_dir, control, hydra_files=record))
    except Exception as e:  # past Hydra's job runner, which would log it with a traceback first
        raise JobFailed(e) from e
    finally:
        _remove_if_empty(output_dir)
    return summary.get("final_eval_loss")  # the objective a sweeper minimises


class JobFailed(BaseException):
    """Carries a job's exception out of Hydra (which handles `Exception`s by logging them)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _remove_if_empty(path: str) -> None:
    """Hydra creates the output directory before the job runs; a job that wrote nothing removes it."""
    try:
        os.rmdir(path)
    except OSError:
        pass


def main() -> None:
    """Console script: one line per user error, exit 130 / 143 on SIGINT / SIGTERM."""
    from fedjax_llm.cli import pop_verbose, run_main

    verbose = pop_verbose(sys.argv)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; run_main prints one line (or the traceback)
    raise_on_signals()
    quiet_closed_loop_noise()
    register_configs()
    code = run_main(_hydra_main, "fedjax-llm-train", verbose, unwrap=JobFailed)
    if code:  # the error is printed: leave before library threads (orbax's, after a failed write) add noise
        from fedjax_llm.lifecycle import hard_exit

        hard_exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
