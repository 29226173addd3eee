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
from typing import Any, Optional

from fedjax_llm.lifecycle import exit_on_signals_while_starting

if __name__ == "__main__":  # python -m fedjax_llm.train (the console script installs it in cli.train)
    from fedjax_llm.startup import prefer_huge_pages

    prefer_huge_pages()
    exit_on_signals_while_starting("fedjax-llm-train")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedjax_llm import compile_cache, distributed, rundir
from fedjax_llm.config import TrainConfig, register_configs, to_train_config
from fedjax_llm.lifecycle import RunControl, quiet_closed_loop_noise, raise_on_signals, supervise
from fedjax_llm.loop import train_run
from fedjax_llm.validation import validate

log = logging.getLogger("fedjax_llm")
CONF_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "conf"))
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def run(cfg: TrainConfig, run_dir: str, control: Optional[RunControl] = None,
        hydra_files: Optional[dict[str, str]] = None) -> dict:
    """Trains (or resumes) into run_dir and returns the summary dict. Refuses, changing nothing, a
    directory holding another run, other files, or (with cfg.resume) no run; a complete run is left as
    it is and its stored summary returned. With several processes (run.distributed) every process calls
    this with the same config; only process 0 writes the directory. With deploy.mode=local the run is one
    process per party (fedjax_llm/deploy/launch.py)."""
    cfg = validate(cfg)  # before any data work or compilation; a bad config touches no device
    for noisy in ("absl", "jax._src.xla_bridge"):  # orbax logs every step at INFO through absl
        logging.getLogger(noisy).setLevel(logging.WARNING)
    compile_cache.enable(cfg.run.compile_cache_dir)
    if cfg.run.plan_only:  # one process plans; nothing is trained or written
        from fedjax_llm.plan import format_plan, plan_for_run

        plan = plan_for_run(cfg)
        print(format_plan(plan), flush=True)
        return {"plan_fits": plan.fits}
    if cfg.deploy.mode == "local":  # the same run as one process per party (fedjax_llm/deploy/launch.py)
        from fedjax_llm.deploy.launch import run_local
        return run_local(cfg, run_dir, control or RunControl(), hydra_files)
    procs = distributed.start(cfg.run)  # before any device is touched
    distributed.agree(rundir.flat_config(cfg), procs)
    control = control or RunControl()
    control.collective = procs.multi
    plan = rundir.plan_run(run_dir, cfg, must_hold_run=cfg.resume is not None)
    distributed.barrier("fedjax_llm:planned")  # every process decided before the primary writes
    if plan.kind == "complete":
        log.info("%s", plan.message)
        return plan.summary or {}
    if not procs.primary:
        log.info("%s", plan.message)
        return train_run(plan, control, None, None, procs)
    failed = False
    with rundir.RunDirLock(plan.run_dir):
        handler = RunLog(os.path.join(plan.run_dir, "train.log"))
        logging.getLogger().addHandler(handler)
        log.info("%s", plan.message)
        try:
            return train_run(plan, control, hydra_files, handler, procs)
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
