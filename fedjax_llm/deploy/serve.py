"""fedjax-llm-serve: one deployed party, a Hydra app over the training config groups.

    fedjax-llm-serve aggregator task=topics deploy.port=50051 deploy.keys_dir=keys hydra.run.dir=runs/aggregator
    fedjax-llm-serve cloud --name east task=topics deploy.host=AGG_HOST deploy.port=50051 deploy.keys_dir=keys \
        hydra.run.dir=runs/east
    fedjax-llm-serve cloud --name east --from RUN_DIR [key=value ...]   # RUN_DIR/config.yaml, keys overridden

Each party has its own run directory (rundir.py: plan, lock, history, checkpoints; a rerun into it
resumes) and reads only its own key directory (deploy.keys_dir/<party>, deploy/keys.py). A cloud loads
only its own clients' data; the aggregator loads none. SIGINT / SIGTERM stop a party cleanly (130 / 143),
a user's mistake is one line on stderr (exit 2).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from fedjax_llm.lifecycle import exit_on_signals_while_starting

if __name__ == "__main__":  # python -m fedjax_llm.deploy.serve (the console script: fedjax_llm.deploy.main)
    from fedjax_llm.startup import prefer_huge_pages

    prefer_huge_pages()
    exit_on_signals_while_starting("fedjax-llm-serve")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedjax_llm import rundir
from fedjax_llm.config import TrainConfig, to_train_config
from fedjax_llm.errors import ConfigError
from fedjax_llm.lifecycle import RunControl, supervise
from fedjax_llm.train import CONF_DIR, JobFailed, RunLog

log = logging.getLogger("fedjax_llm")
PROG = "fedjax-llm-serve"
USAGE = f"usage: {PROG} aggregator|cloud [--name CLOUD] [--from RUN_DIR] [key=value ...]"
_ARGS: dict = {}


def serve_party(cfg: TrainConfig, role: str, name: Optional[str], run_dir: str, control: RunControl) -> dict:
    """Runs one party of `cfg` in run_dir until the run is complete; returns its summary."""
    from fedjax_llm.deploy.keys import load_party
    from fedjax_llm.deploy.parties import check_deployable
    from fedjax_llm.validation import validate

    from fedjax_llm import compile_cache

    cfg = validate(cfg)
    check_deployable(cfg)
    compile_cache.enable(cfg.run.compile_cache_dir)
    clouds = list(cfg.clouds.members)
    if role == "cloud" and name not in clouds:
        raise ConfigError(f"--name: {name!r} is not a cloud of this run (clouds.members: {clouds})")
    if cfg.deploy.port == 0:
        raise ConfigError(f"deploy.port: {PROG} {role} needs the aggregator's port (0 picks a free one only "
                          "under deploy=local)")
    party = "aggregator" if role == "aggregator" else name
    keys = None
    if cfg.secure.seal or cfg.transport.tls.enabled:
        keys = load_party(cfg.deploy.keys_dir, party, clouds if role == "aggregator" else ["aggregator"],
                          cfg.transport.tls)
    plan = rundir.plan_run(run_dir, cfg)
    if plan.kind == "complete":
        log.info("%s", plan.message)
        return plan.summary or {}
    with rundir.RunDirLock(plan.run_dir):
        handler = RunLog(os.path.join(plan.run_dir, "train.log"))
        logging.getLogger().addHandler(handler)
        log.info("%s (%s)", plan.message, party)
        service = None
        try:
            if role == "aggregator":
                from fedjax_llm.deploy.aggregator_service import AggregatorService
                service = AggregatorService(cfg, plan, keys, control)
            else:
                from fedjax_llm.deploy.cloud_service import CloudService
                service = CloudService(cfg, name, plan, keys, control)
            handler.open()
            return service.run()
        finally:
            if role == "aggregator" and service is not None:
                service.close()
            logging.getLogger().removeHandler(handler)
            handler.close()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def _hydra_main(dcfg: DictConfig) -> None:
    hc = HydraConfig.get()
    try:
        cfg = to_train_config(dcfg)
        if _ARGS.get("from"):
            cfg = rundir.resume_config(os.path.abspath(_ARGS["from"]), list(hc.overrides.task), dict(hc.runtime.choices))
        for noisy in ("absl", "jax._src.xla_bridge"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        supervise(lambda control: serve_party(cfg, _ARGS["role"], _ARGS.get("name"), hc.runtime.output_dir, control))
    except Exception as e:  # past Hydra's job runner, which would log it with a traceback first
        raise JobFailed(e) from e


def _pop_args(argv: list[str]) -> dict:
    """Takes the role, --name and --from off argv (the rest are Hydra overrides)."""
    out: dict = {}
    if len(argv) < 2 or argv[1] not in ("aggregator", "cloud"):
        raise ConfigError(f"the first argument is the party's role, aggregator or cloud ({USAGE})")
    out["role"] = argv.pop(1)
    for flag in ("--name", "--from"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a value ({USAGE})")
            out[flag[2:]] = argv[i + 1]
            del argv[i:i + 2]
    if out["role"] == "cloud" and not out.get("name"):
        raise ConfigError(f"--name: a cloud needs its name ({USAGE})")
    return out


def main() -> None:
    from fedjax_llm.cli import pop_verbose, report, run_main
    from fedjax_llm.config import register_configs
    from fedjax_llm.lifecycle import hard_exit, quiet_closed_loop_noise, raise_on_signals

    verbose = pop_verbose(sys.argv)
    try:
        _ARGS.update(_pop_args(sys.argv))
    except ConfigError as e:
        sys.exit(report(e, PROG, verbose))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    raise_on_signals()
    quiet_closed_loop_noise()
    register_configs()
    code = run_main(_hydra_main, PROG, verbose, unwrap=JobFailed)
    if code:
        hard_exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
