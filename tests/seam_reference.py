"""Reference rounds for the cloud/aggregator seam (issue 11, section 1).

`python -m tests.seam_reference --write tests/data/seam_reference.json` ran once on the single-object
`Federation` (before the round was split into a cloud half and an aggregator half) and stored, per tiny
config, a digest of the final global params, per-leaf statistics and the round metrics after two rounds.
`tests/test_halves.py` replays the same configs through the public surface (`Federation`, `init_state`,
`run_round`) and compares: bit for bit where this machine's XLA gives the bits the reference machine
gave (a fixed canary computation and equal digests), else to float tolerance on the leaf statistics.

Machines that round differently get their own bitwise entry (`--write FILE --add-machine`, stored under
`machine()`), recorded from a tree that passed this test on the reference machine: the entry for the 2-core AMD EPYC
(AVX-512) was recorded from commit 69eaa3d, whose CI run passed it.

Every config here keeps its randomness where the split left it: full participation (no sampling,
dropout or stragglers, which now come from each cloud's own key), models without dropout (client keys
are now drawn per cloud), and no DP noise at the clouds (now from each cloud's own key).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

BASE = ["debug=tiny", "data.seq_len=16", "data.max_eval_examples=8", "client.local_steps=2"]
LORA = ["model=nano_lora", "client.lr=3e-2", "model.lora.targets=[q_proj,k_proj,v_proj,o_proj]"]  # as before debug=tiny set q, v
CONFIGS = {
    "fedavg": [],
    "fedadam": ["algorithm=fedadam"],
    "scaffold": ["algorithm=scaffold"],
    "fednova_prox": ["algorithm=fednova", "algorithm.prox_mu=0.1"],
    "median": ["algorithm=median"],
    "sign_flip": ["attack.kind=sign_flip", "attack.fraction=0.34"],
    "secagg_clouds": ["secure.secagg.enabled=true"],
    "secagg_clients": ["secure.secagg.enabled=true", "secure.secagg.scope=clients"],
    "secagg_both": ["secure.secagg.enabled=true", "secure.secagg.scope=both"],
    "dp_central": ["secure.dp.enabled=true", "client.weighting=uniform", "secure.dp.adaptive=true",
                   "secure.dp.count_stddev=1.0"],
    "lora_naive": LORA,
    "lora_fedex_mixed": LORA + ["model.lora.aggregation=fedex", "model.lora.client_ranks=[2,4,8]"],
    "lora_flex_secagg": LORA + ["model.lora.aggregation=flex", "secure.secagg.enabled=true"],
}
ROUNDS = 2
METRIC_KEYS = ("train_loss", "tokens", "update_norm", "clients", "sampled", "dropped", "stragglers",
               "nonfinite_dropped", "attacked_clients")


def canary() -> str:
    """Digest of a fixed jitted computation: equal digests mean this XLA build and CPU round alike."""
    from fedjax_llm.checkpoint import tree_digest
    x = jnp.sin(jnp.arange(64 * 96, dtype=jnp.float32).reshape(64, 96) / 7.0)
    y = jax.jit(lambda a: jnp.tanh(a @ a.T) @ a + jax.nn.log_softmax(a, -1))(x)
    return tree_digest(y)


def machine() -> str:
    """The CPU and software that decide XLA:CPU's rounding: model, cache size, vector ISA, core count, jax.

    XLA:CPU compiles for the host it runs on (vector width, cache-size-dependent matmul blocking), so
    two machines can agree on `canary()` and still round a training round differently."""
    model = cache = ""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                model = model or (value if key == "model name" else "")
                cache = cache or (value if key == "cache size" else "")
                if key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = ",".join(sorted(flags & {"avx2", "fma", "avx512f", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile", "avx_vnni"}))
    return f"{model}|{cache}|{isa}|{os.cpu_count()}|jax {jax.__version__}"


def leaf_stats(tree) -> dict:
    from fedjax_llm.clouds.message import leaf_paths
    out = {}
    for path, leaf in leaf_paths(tree):
        a = np.asarray(leaf, np.float64)
        out[path] = [float(a.sum()), float(np.sqrt((a * a).sum())), [float(v) for v in a.ravel()[:6]]]
    return out


def run(name: str, cache: str) -> dict:
    from fedjax_llm.checkpoint import tree_digest
    from fedjax_llm.validation import validate
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.server import Federation
    from tests.conftest import compose_config

    cfg = validate(compose_config(BASE + CONFIGS[name] + [f"data.tokenizer_cache={cache}"]))
    data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    fed = Federation(cfg, data)
    state = fed.init_state()
    metrics = []
    for _ in range(ROUNDS):
        state, m = fed.run_round(state)
        row = {k: m[k] for k in METRIC_KEYS}
        row["clouds"] = {n: {"train_loss": c["train_loss"], "clients": c["clients"]} for n, c in m["clouds"].items()}
        metrics.append(row)
    return dict(digest=tree_digest(state.params), frozen_digest=tree_digest(fed.frozen_of(state)),
                leaves=leaf_stats(state.params), metrics=metrics)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", required=True)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--add-machine", action="store_true",
                    help="keep --write's reference and add this machine's digests and metrics under machine()")
    args = ap.parse_args(argv)
    import tempfile
    cache = tempfile.mkdtemp(prefix="seam-tok-")
    if args.add_machine:
        with open(args.write, encoding="utf-8") as f:
            out = json.load(f)
        entry = out.setdefault("machines", {}).setdefault(machine(), {})
        for name in args.only or CONFIGS:
            print(name, file=sys.stderr, flush=True)
            r = run(name, cache)
            entry[name] = {k: r[k] for k in ("digest", "frozen_digest", "metrics")}
    else:
        out = {"canary": canary(), "jax": jax.__version__, "rounds": ROUNDS, "configs": {}}
        for name in args.only or CONFIGS:
            print(name, file=sys.stderr, flush=True)
            out["configs"][name] = run(name, cache)
    os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
    with open(args.write, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
