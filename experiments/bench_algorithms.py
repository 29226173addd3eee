"""Algorithm benchmark: each algorithm's round tokens/s relative to FedAvg, and robust rules' cost.

    python experiments/bench_algorithms.py                 # both tables
    python experiments/bench_algorithms.py --skip-rules    # only the per-algorithm round table

Round table: W-tiny and W-tiny-lora (see bench_round.py), K=8 clients in one cloud (so Krum with f=1
is valid), the engine's full `Federation.run_round`, median of --rounds after a warm-up, all in one
process; ratio = algorithm tokens/s / FedAvg tokens/s on the same workload.
Rule table: seconds per jitted call of each robust rule on K stacked updates the size of W-tiny's
LoRA adapters and of the full W-tiny model, K = 8, 64, 256.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_round import WORKLOADS, Workload, _median_rate, make_config, synthetic_data  # noqa: E402

from fedjax_llm import config as C  # noqa: E402
from fedjax_llm.validation import validate  # noqa: E402
from fedjax_llm.algorithms import make_rule  # noqa: E402
from fedjax_llm.client import init_client_state  # noqa: E402
from fedjax_llm.models.params import count_params, init_model  # noqa: E402
from fedjax_llm.models.spec import LoRASpec, llama_spec  # noqa: E402
from fedjax_llm.server import Federation  # noqa: E402

ALGORITHMS = {
    "fedavg": {}, "fedprox": dict(prox_mu=0.01), "scaffold": dict(scaffold=True), "fednova": dict(fednova=True),
    "fedavgm": dict(server_optimizer="momentum"), "fedadam": dict(server_optimizer="adam", server_lr=1e-2),
    "fedyogi": dict(server_optimizer="yogi", server_lr=1e-2),
    "fedadagrad": dict(server_optimizer="adagrad", server_lr=1e-2),
    "median": dict(client_rule="median"), "trimmed_mean": dict(client_rule="trimmed_mean"),
    "krum": dict(client_rule="krum"), "multi_krum": dict(client_rule="multi_krum", multi_krum_m=3),
    "norm_bound": dict(client_rule="norm_bound"),
}


def one_cloud(w: Workload, algo: dict) -> C.TrainConfig:
    cfg = make_config(w, 0)
    cfg.clouds = C.CloudsConfig(members={"cloud0": C.CloudConfig(clients=w.K)})
    cfg.algorithm = C.AlgorithmConfig(name="bench", **algo)
    return validate(cfg)


def round_table(names, rounds: int) -> None:
    print(f"{'workload':<14}{'algorithm':<14}{'tok/s':>10}{'vs fedavg':>11}{'client state/client':>22}")
    for wname in ("W-tiny", "W-tiny-lora"):
        w = Workload(wname, *WORKLOADS[wname])
        data = synthetic_data(w)
        data = dataclasses.replace(data, client_cloud=np.zeros(w.K, np.int32), cloud_names=["cloud0"])
        base = None
        for name in names:
            fed = Federation(one_cloud(w, ALGORITHMS[name]), data)
            box = {"s": fed.init_state()}

            def one():
                box["s"], _ = fed.run_round(box["s"])
                jax.block_until_ready(box["s"].params)

            rate, _ = _median_rate(one, w.tokens_per_round, rounds)
            base = base or rate
            per_client = count_params(init_client_state(fed.algo.pieces, fed.init_params)) * 4
            print(f"{wname:<14}{name:<14}{rate:>10,.0f}{rate / base:>10.2f}x{per_client / 1e3:>19,.1f} kB",
                  flush=True)


def rule_table(rounds: int) -> None:
    lora = llama_spec("w-tiny", 512, lora=LoRASpec(rank=8, targets=("q_proj", "v_proj")))
    full = llama_spec("w-tiny", 512)
    print(f"\n{'rule':<14}{'update':<12}" + "".join(f"{'K=' + str(k):>12}" for k in (8, 64, 256)))
    for spec_name, spec in (("lora", lora), ("full", full)):
        _, trainable, _ = init_model(spec, jax.random.key(0))
        for name in ("median", "trimmed_mean", "krum", "multi_krum", "norm_bound", "mean"):
            rule = jax.jit(make_rule(name, C.AlgorithmConfig(multi_krum_m=3)))
            cells = []
            for k in (8, 64, 256):
                updates = jax.tree.map(lambda p: jax.random.normal(jax.random.key(k), (k,) + p.shape, p.dtype),
                                       trainable)
                weights = jnp.ones(k)
                jax.block_until_ready(rule(updates, weights))
                times = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    jax.block_until_ready(rule(updates, weights))
                    times.append(time.perf_counter() - t0)
                cells.append(statistics.median(times))
                del updates
            label = f"{spec_name} ({count_params(trainable) / 1e3:.0f}k)"
            print(f"{name:<14}{label:<12}" + "".join(f"{t:>11.4f}s" for t in cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS))
    ap.add_argument("--skip-rules", action="store_true")
    ap.add_argument("--skip-rounds", action="store_true")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
          f"median of {args.rounds} after a warm-up")
    if not args.skip_rounds:
        names = ["fedavg"] + [a for a in args.algorithms if a != "fedavg"]
        round_table(names, args.rounds)
    if not args.skip_rules:
        rule_table(args.rounds)


if __name__ == "__main__":
    main()
