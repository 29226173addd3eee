"""Hydra entry point: compose and validate the config, build the federation, loop rounds, checkpoint.

    python -m fedjax_llm.train                                 # the default experiment
    python -m fedjax_llm.train model.lora.enabled=true         # LoRA instead of full fine-tuning
    python -m fedjax_llm.train -m client.lr=1e-3,3e-3 seed=0,1 # a multirun sweep

The run directory holds config.yaml (resolved), metrics.jsonl (one line per round, round 0 is the
initial evaluation), summary.json and checkpoints/. Rerunning into the same directory (hydra.run.dir=DIR
or resume=DIR) continues from the newest valid checkpoint.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedjax_llm.config import TrainConfig, register_configs, to_train_config, validate

log = logging.getLogger("fedjax_llm")
CONF_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "conf"))


def _eval_due(cfg: TrainConfig, rnd: int) -> bool:
    return rnd % cfg.run.eval_every == 0 or rnd == cfg.run.rounds


def run(cfg: TrainConfig, run_dir: str) -> dict:
    """Trains (or resumes) into run_dir and returns the summary dict."""
    cfg = validate(cfg)  # before any data work or compilation
    import jax  # deferred: a bad config fails without touching devices

    for noisy in ("absl", "jax._src.xla_bridge"):  # orbax logs every step at INFO through absl
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from fedjax_llm.checkpoint import Checkpointer, tree_digest
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.metrics import MetricsLog, write_json
    from fedjax_llm.models.params import count_params
    from fedjax_llm.report.tensorboard import TensorBoardWriter
    from fedjax_llm.secure.privacy import Privacy
    from fedjax_llm.secure.round import make_channel
    from fedjax_llm.server import Federation, NonFiniteError

    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    t_start = time.perf_counter()
    data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    log.info("data: %d clients in %d clouds, %d train / %d eval examples, vocab %d, %d truncated, "
             "%d excluded", data.num_clients, len(data.cloud_names), int(data.num_train_examples().sum()),
             sum(len(e) for e in data.eval_idx), data.vocab_size, data.num_truncated, data.excluded)
    channel, channel_info = make_channel(cfg.secure, data.cloud_names, run_dir, cfg.name)
    log.info("channel: %s", channel_info)
    fed = Federation(cfg, data, channel=channel)
    privacy = Privacy(cfg, data) if cfg.secure.dp.enabled else None
    log.info("model: %d trainable / %d frozen params; cohort %d clients, layout %s on %d %s device(s)",
             count_params(fed.init_params), count_params(fed.frozen), fed.cohort_size,
             fed.layout.shape, fed.mesh.size, fed.mesh.devices.flat[0].platform)

    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), cfg.checkpoint.every,
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
        metrics.truncate(int(state.round))
        if privacy is not None:
            privacy.restore(meta.get("accountant"))
        log.info("resumed from round %d in %s", int(state.round), ckpt.directory)
    else:
        metrics.reset()
        metrics.append(dict(round=0, **fed.evaluate(state)))

    start = int(state.round)
    tb = TensorBoardWriter.open(run_dir, cfg, start, metrics.records())  # resumed: later events purged
    stopped_early = None
    history = [r for r in metrics.records() if r.get("eval_loss") is not None]
    bar = _progress(cfg, start)
    try:
        for rnd in range(start + 1, cfg.run.rounds + 1):
            if privacy is not None and privacy.would_exceed():
                log.warning("stopping before round %d: it would take epsilon past secure.dp.target_epsilon"
                            "=%g (now %.4f)", rnd, cfg.secure.dp.target_epsilon, privacy.epsilon())
                stopped_early = rnd - 1
                break
            state, record = fed.run_round(state)
            if privacy is not None:
                record.update(privacy.step(state))
            if _eval_due(cfg, rnd):
                t0 = time.perf_counter()
                ev = fed.evaluate(state)
                record["eval_s"] = time.perf_counter() - t0
                for name, values in ev.pop("clouds").items():
                    record["clouds"][name].update(values)
                record.update(ev)
                history.append(record)
            metrics.append(record)
            tb.log_round(record)
            if ckpt and (ckpt.should_save(rnd) or (privacy is not None and privacy.would_exceed())):
                extra = dict(accountant=privacy.state) if privacy is not None else {}
                ckpt.save(rnd, state, dict(frozen_digest=frozen_digest, name=cfg.name, **extra))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}" if record["train_loss"] else "-",
                                **_headline(history[-1] if history else None))
    except NonFiniteError:
        log.error("stopped at round %d; the last checkpoint holds the last finite model", int(state.round) + 1)
        raise
    finally:
        tb.close()
        if bar is not None:
            bar.close()

    records = metrics.records()
    rounds = [r for r in records if r["round"] >= 1]
    summary = dict(
        name=cfg.name, seed=cfg.seed, rounds=cfg.run.rounds, resumed_from=start if restored else None,
        trainable_params=count_params(state.params), frozen_params=count_params(fed.frozen),
        clouds=fed.cloud_names, clients=data.num_clients, cohort=fed.cohort_size,
        devices=fed.mesh.size, platform=fed.mesh.devices.flat[0].platform, layout=list(fed.layout.shape),
        initial_eval_loss=records[0].get("eval_loss") if records else None,
        initial_eval_ppl=records[0].get("eval_ppl") if records else None,
        final_eval_loss=history[-1]["eval_loss"] if history else None,
        final_eval_ppl=history[-1].get("eval_ppl") if history else None,
        final_train_loss=rounds[-1]["train_loss"] if rounds else None,
        eval_ppl_by_round={r["round"]: r.get("eval_ppl") for r in history},
        **_classification_summary(records[0] if records else None, history),
        tokens=sum(r["tokens"] for r in rounds), round_wall_s=sum(r["wall_s"] for r in rounds),
        bytes_up=sum(c["bytes_up"] for r in rounds for c in r["clouds"].values()),
        bytes_down=sum(c["bytes_down"] for r in rounds for c in r["clouds"].values()),
        comm_s=sum(r["comm_s"] for r in rounds),
        nonfinite_dropped=sum(r["nonfinite_dropped"] for r in rounds),
        stopped_early_after_round=stopped_early,
        privacy=privacy.summary() if privacy is not None else None,
        channel=channel_info,
        wall_s_this_process=time.perf_counter() - t_start,
        jax_version=jax.__version__)
    write_json(os.path.join(run_dir, "summary.json"), summary)
    if cfg.data.task == "classify":
        log.info("done: eval accuracy %s -> %s, macro-F1 %s -> %s in %.1fs", summary["initial_eval_acc"],
                 summary["final_eval_acc"], summary["initial_eval_f1"], summary["final_eval_f1"],
                 summary["wall_s_this_process"])
    else:
        log.info("done: eval ppl %s -> %s in %.1fs", summary["initial_eval_ppl"], summary["final_eval_ppl"],
                 summary["wall_s_this_process"])
    return summary


def _headline(record: Optional[dict]) -> dict:
    """The progress bar's eval figure: accuracy for classification, perplexity for language modelling."""
    if record is None:
        return {}
    if record.get("eval_acc") is not None:
        return dict(acc=f"{record['eval_acc']:.3f}")
    return dict(ppl=f"{record['eval_ppl']:.1f}") if record.get("eval_ppl") is not None else {}


def _classification_summary(initial: Optional[dict], history: list[dict]) -> dict:
    """Accuracy and macro-F1 at round 0 and at the end, and by round (classification runs only)."""
    if not history or "eval_acc" not in history[-1]:
        return {}
    return dict(initial_eval_acc=(initial or {}).get("eval_acc"), initial_eval_f1=(initial or {}).get("eval_f1"),
                final_eval_acc=history[-1]["eval_acc"], final_eval_f1=history[-1]["eval_f1"],
                eval_acc_by_round={r["round"]: r["eval_acc"] for r in history},
                eval_f1_by_round={r["round"]: r["eval_f1"] for r in history})


def _progress(cfg: TrainConfig, start: int) -> Optional[Any]:
    if not cfg.run.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.run.rounds, initial=start, desc=f"{cfg.name} rounds", unit="round")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def _hydra_main(dcfg: DictConfig) -> Optional[float]:
    cfg = to_train_config(dcfg)
    run_dir = cfg.resume or HydraConfig.get().runtime.output_dir
    summary = run(cfg, run_dir)
    return summary["final_eval_loss"]  # the objective a sweeper minimises


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
