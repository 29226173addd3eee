"""deploy=local: `fedjax-llm-train deploy=local ...` runs the same run as separate processes on loopback.

    RUN_DIR/config.yaml, .hydra/, history.jsonl, train.log   the launcher's record of the run
    RUN_DIR/keys/<party>/        each party's own keys and the trust list (fedjax-llm-keys init), made
                                 once when secure.seal or transport.tls is on and deploy.keys_dir is unset
    RUN_DIR/aggregator/          the aggregator's run directory (metrics.jsonl, summary.json, checkpoints/)
    RUN_DIR/<cloud>/             each cloud's run directory (rounds.jsonl, checkpoints/ of its CloudState)
    RUN_DIR/logs/<party>.log     each process's console output
    RUN_DIR/metrics.jsonl, summary.json   the aggregator's, copied when the run completes

The launcher starts `fedjax-llm-serve aggregator` and one `fedjax-llm-serve cloud --name C` per cloud
with the stored config (`--from RUN_DIR`) and a free port, waits for them, and stops them all on
SIGINT / SIGTERM (each party checkpoints and exits) or when one fails (its error line is reported).
A rerun of the same command resumes every party from its own checkpoint.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from fedjax_llm import rundir
from fedjax_llm.errors import RunStopped, UserError
from fedjax_llm.lifecycle import RunControl

log = logging.getLogger("fedjax_llm")
STOP_WAIT_S = 60.0
LOGS = "logs"


class PartyFailed(UserError, RuntimeError):
    """A party's process ended with an error; the message is that party's own error line."""


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def party_command(role: str, name: Optional[str], run_dir: str, port: int, keys_dir: Optional[str]) -> list[str]:
    party = "aggregator" if role == "aggregator" else name
    cmd = [sys.executable, "-m", "fedjax_llm.deploy.serve", role] + (["--name", name] if name else [])
    cmd += ["--from", run_dir, f"hydra.run.dir={os.path.join(run_dir, party)}", f"deploy.port={port}"]
    return cmd + ([f"deploy.keys_dir={keys_dir}"] if keys_dir else [])


def _last_error(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no output"
    errors = [ln for ln in lines if "error:" in ln]
    return (errors or lines or ["no output"])[-1]


def stop_all(procs: dict[str, subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    """Signals every running child, waits up to STOP_WAIT_S, kills what is left; every child is reaped."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + STOP_WAIT_S
    for name, p in procs.items():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", name, STOP_WAIT_S)
            p.kill()
            p.wait()


def run_local(cfg, run_dir: str, control: RunControl, hydra_files: Optional[dict] = None) -> dict:
    """Runs (or resumes) `cfg` as a local deployment in run_dir; returns the aggregator's summary."""
    from fedjax_llm.deploy.keys import init_keys
    from fedjax_llm.deploy.parties import check_deployable
    from fedjax_llm.files import read_json
    from fedjax_llm.train import RunLog
    from fedjax_llm.validation import validate

    cfg = validate(cfg)
    check_deployable(cfg)
    plan = rundir.plan_run(run_dir, cfg, must_hold_run=cfg.resume is not None)
    if plan.kind == "complete":
        log.info("%s", plan.message)
        return plan.summary or {}
    run_dir = plan.run_dir
    with rundir.RunDirLock(run_dir):
        handler = RunLog(os.path.join(run_dir, "train.log"))
        logging.getLogger().addHandler(handler)
        procs: dict[str, subprocess.Popen] = {}
        try:
            if plan.kind == "new":
                if hydra_files:
                    rundir.write_hydra_files(run_dir, hydra_files)
                rundir.write_config(run_dir, cfg)
            handler.open()
            clouds = list(cfg.clouds.members)
            keys_dir = cfg.deploy.keys_dir
            if (cfg.secure.seal or cfg.transport.tls.enabled) and not keys_dir:
                keys_dir = os.path.join(run_dir, "keys")
                if not os.path.isdir(os.path.join(keys_dir, "aggregator")):
                    init_keys([*clouds, "aggregator"], keys_dir, tls=cfg.transport.tls.enabled)
            port = cfg.deploy.port or free_port(cfg.deploy.host)
            rundir.append_history(run_dir, "start", action=plan.kind, rounds=cfg.run.rounds,
                                  command=rundir.command_line(), deploy="local", port=port)
            os.makedirs(os.path.join(run_dir, LOGS), exist_ok=True)

            def stop_children() -> str:
                stop_all(procs)
                rundir.append_history(run_dir, "stopped")
                return (f"stopped the deployment's {len(procs)} processes; each party checkpointed its last "
                        f"round; resume with: {rundir.resume_command(run_dir)}")

            control.on_stop(stop_children)
            for role, name in [("aggregator", None)] + [("cloud", c) for c in clouds]:
                party = name or "aggregator"
                out = open(os.path.join(run_dir, LOGS, f"{party}.log"), "a")
                procs[party] = subprocess.Popen(party_command(role, name, run_dir, port, keys_dir), stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)
                out.close()
            log.info("deploy=local: aggregator on %s:%d and clouds %s (pids %s); logs in %s", cfg.deploy.host,
                     port, clouds, {k: p.pid for k, p in procs.items()}, os.path.join(run_dir, LOGS))
            _wait(procs, run_dir, control)
            summary_path = os.path.join(run_dir, "aggregator", rundir.SUMMARY)
            summary = read_json(summary_path, "summary")
            shutil.copyfile(os.path.join(run_dir, "aggregator", "metrics.jsonl"), os.path.join(run_dir, "metrics.jsonl"))
            shutil.copyfile(summary_path, os.path.join(run_dir, rundir.SUMMARY))
            rundir.append_history(run_dir, "complete", round=summary.get("rounds_completed"))
            log.info("deploy=local: complete; the aggregator's run directory is %s", os.path.join(run_dir, "aggregator"))
            return summary
        finally:
            if any(p.poll() is None for p in procs.values()):
                stop_all(procs)
            logging.getLogger().removeHandler(handler)
            handler.close()


def _wait(procs: dict[str, subprocess.Popen], run_dir: str, control: RunControl) -> None:
    """Until every child exited 0; a failing child stops the others and raises its error line."""
    while True:
        codes = {k: p.poll() for k, p in procs.items()}
        failed = {k: c for k, c in codes.items() if c not in (None, 0)}
        if failed:
            name, code = next(iter(failed.items()))
            line = _last_error(os.path.join(run_dir, LOGS, f"{name}.log"))
            stop_all(procs)
            cls = RunStopped if code == 1 else PartyFailed
            raise cls(f"deploy=local: {name} exited with {code}: {line} (its log: "
                      f"{os.path.join(run_dir, LOGS, name + '.log')})")
        if all(c == 0 for c in codes.values()):
            return
        if codes.get("aggregator") == 0:  # the clouds end once they fetched `done`
            deadline = time.monotonic() + STOP_WAIT_S
            while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
                time.sleep(0.2)
            if any(p.poll() is None for p in procs.values()):
                stop_all(procs)
            return
        time.sleep(0.2)
