"""Round-engine benchmark: tokens/s of the engine's round vs a loop of per-client jitted scans vs
centralized training on the same tokens, in one process, with ratios.

    python experiments/bench_round.py                       # every workload
    python experiments/bench_round.py --workloads W-tiny --rounds 5
    python experiments/bench_round.py --scaling             # W-tiny-lora at K=64/128/256: s/round, peak RSS

(a) engine  = Federation.run_round: host batch gather, downlink/uplink serialization, the jitted
              sharded/chunked client compute and the jitted server step: everything a round does.
(b) loop    = a Python loop over clients, each a jitted lax.scan of S optimizer steps, then a jitted
              weighted-delta accumulation: the straightforward way to write FedAvg in JAX.
(c) central = one jitted lax.scan of K*S steps of batch B over the same tokens: no federation at all.
(d) ideal   = (b) with a minimal Llama step written plainly in experiments/ideal_llama.py, independent of
              fedjax_llm.models (no masks, dropout or split/merge; same shapes and optimizer).
(e) ideal central = (c) with that step.
Each figure is the median of --rounds timed rounds after one warm-up round (compilation excluded); the
runners take turns round by round, so a drift in the machine's speed moves them alike. The first
(compiling) round of the engine and of the ideal loop is printed apart ("1st ... s").
MFU: model FLOPs per token (ideal_llama.flops_per_token: 6 x matmul params + 12 x layers x seq x width;
4 x the matmul params of a frozen base) x tokens/s, against the f32 matmul rate (2048^3) measured in the
same process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ideal_llama import IdealLlama, count, flops_per_token  # noqa: E402

from fedjax_llm import config as C  # noqa: E402
from fedjax_llm.validation import validate  # noqa: E402
from fedjax_llm.client import client_optimizer, make_lm_loss  # noqa: E402
from fedjax_llm.data.federated import FederatedData  # noqa: E402
from fedjax_llm.models.spec import SIZES  # noqa: E402
from fedjax_llm.server import Federation  # noqa: E402

WORKLOADS = {
    # name: (size, vocab, seq, K, S, B, lora)
    "W-tiny": ("w-tiny", 512, 64, 8, 4, 16, False),
    "W-tiny-lora": ("w-tiny", 512, 64, 8, 4, 16, True),
    "W-small": ("w-small", 8192, 128, 8, 2, 8, False),
}


@dataclasses.dataclass
class Workload:
    name: str
    size: str
    vocab: int
    seq: int
    K: int
    S: int
    B: int
    lora: bool

    @property
    def tokens_per_round(self) -> int:  # tokens fed to the model per round (inputs, all positions)
        return self.K * self.S * self.B * (self.seq - 1)


def make_config(w: Workload, chunk: int) -> C.TrainConfig:
    cfg = C.TrainConfig()
    cfg.model = C.ModelConfig(size=w.size, lora=C.LoRAConfig(enabled=w.lora, rank=8, alpha=16.0,
                                                             targets=["q_proj", "v_proj"]))
    cfg.data = C.DataConfig(seq_len=w.seq, vocab_size=w.vocab)
    per_cloud = [w.K // 2, w.K - w.K // 2]
    cfg.clouds = C.CloudsConfig(members={f"cloud{i}": C.CloudConfig(clients=n) for i, n in enumerate(per_cloud)})
    cfg.client = C.ClientConfig(local_steps=w.S, batch_size=w.B, optimizer="adamw", lr=1e-3,
                                grad_clip=1.0, clients_per_chunk=chunk)
    cfg.checkpoint = C.CheckpointConfig(enabled=False)
    return validate(cfg)


class _FixedTokenizer:
    def __init__(self, vocab: int):
        self.vocab = vocab

    def get_vocab_size(self) -> int:
        return self.vocab


def synthetic_data(w: Workload, seed: int = 0) -> FederatedData:
    """K clients with exactly S*B random sequences each, so every round sees every example once."""
    rng = np.random.default_rng(seed)
    n = w.K * w.S * w.B
    tokens = rng.integers(4, w.vocab, size=(n, w.seq), dtype=np.int32)
    per = w.S * w.B
    half = w.K // 2
    return FederatedData(
        tokens=tokens, loss_mask=np.ones((n, w.seq), np.float32),
        train_idx=[np.arange(i * per, (i + 1) * per) for i in range(w.K)],
        eval_idx=[np.zeros(0, np.int64) for _ in range(w.K)],
        client_names=[f"c{i}" for i in range(w.K)],
        client_cloud=np.array([0] * half + [1] * (w.K - half), np.int32), cloud_names=["cloud0", "cloud1"],
        tokenizer=_FixedTokenizer(w.vocab), num_truncated=0, excluded=0)


def _median_rate(fn, tokens: int, rounds: int) -> tuple[float, float]:
    fn()  # warm-up: compilation
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return tokens / med, med


def engine_runner(w: Workload, chunk: int):
    fed = Federation(make_config(w, chunk), synthetic_data(w))
    box = {"state": fed.init_state()}

    def one():
        box["state"], _ = fed.run_round(box["state"])
        jax.block_until_ready(box["state"].params)

    return one, fed


def loop_runner(w: Workload, fed: Federation):
    """Independent baseline: per-client jitted scan + jitted accumulation, Python loop over clients."""
    cfg = make_config(w, 1)
    opt = client_optimizer(cfg.client)
    loss_fn = make_lm_loss(fed.fns.apply)
    grad = jax.grad(lambda p, f, t, m: loss_fn(p, f, {"tokens": t, "loss_mask": m}, None)[0])
    frozen = fed.frozen
    data = fed.data
    tokens = jnp.asarray(data.tokens.reshape(w.K, w.S, w.B, w.seq))
    mask = jnp.asarray(data.loss_mask.reshape(w.K, w.S, w.B, w.seq))
    weights = [float(len(ix)) for ix in data.train_idx]

    @jax.jit
    def train_client(params, toks_SxBxT, mask_SxBxT):
        def step(carry, xs):
            p, s = carry
            g = grad(p, frozen, *xs)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), (toks_SxBxT, mask_SxBxT))
        return p

    @jax.jit
    def accumulate(acc, new, params, w_i):
        return jax.tree.map(lambda a, n, p: a + w_i * (n - p), acc, new, params)

    @jax.jit
    def apply_mean(params, acc, total):
        return jax.tree.map(lambda p, a: p + a / total, params, acc)

    box = {"params": fed.init_state().params}

    def one():
        params = box["params"]
        acc = jax.tree.map(jnp.zeros_like, params)
        for k in range(w.K):
            acc = accumulate(acc, train_client(params, tokens[k], mask[k]), params, weights[k])
        box["params"] = apply_mean(params, acc, sum(weights))
        jax.block_until_ready(box["params"])

    return one


def central_runner(w: Workload, fed: Federation):
    """One model, K*S scanned steps of batch B over the same tokens."""
    opt = client_optimizer(make_config(w, 1).client)
    loss_fn = make_lm_loss(fed.fns.apply)
    grad = jax.grad(lambda p, f, t, m: loss_fn(p, f, {"tokens": t, "loss_mask": m}, None)[0])
    frozen = fed.frozen
    tokens = jnp.asarray(fed.data.tokens.reshape(w.K * w.S, w.B, w.seq))
    mask = jnp.asarray(fed.data.loss_mask.reshape(w.K * w.S, w.B, w.seq))

    @jax.jit
    def train(params, state):
        def step(carry, xs):
            p, s = carry
            u, s = opt.update(grad(p, frozen, *xs), s, p)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(step, (params, state), (tokens, mask))[0]

    params = fed.init_state().params
    box = {"carry": (params, opt.init(params))}

    def one():
        box["carry"] = train(*box["carry"])
        jax.block_until_ready(box["carry"])

    return one


def ideal_model(w: Workload) -> IdealLlama:
    d, layers, heads, kv, ffn = SIZES[w.size]
    return IdealLlama(vocab=w.vocab, d=d, layers=layers, heads=heads, kv_heads=kv, ffn=ffn,
                      lora_rank=8 if w.lora else 0)


def _ideal_parts(w: Workload, fed: Federation):
    ideal = ideal_model(w)
    params = ideal.init(jax.random.key(0))
    assert count(params) == count(fed.init_state().params) + count(fed.frozen), \
        ("the ideal model must have the engine's parameters", count(params), count(fed.init_state().params) + count(fed.frozen))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.0))
    trainable, frozen = ideal.split(params)
    return ideal, opt, trainable, frozen, jnp.asarray(fed.data.tokens)


def ideal_loop_runner(w: Workload, fed: Federation):
    """(d): per-client jitted scan of the plain step, weighted deltas, Python loop over clients."""
    ideal, opt, trainable, frozen, tokens = _ideal_parts(w, fed)
    step = ideal.train_step(opt)
    tokens = tokens.reshape(w.K, w.S, w.B, w.seq)

    @jax.jit
    def train_client(params, toks_SxBxT):
        carry, _ = jax.lax.scan(lambda c, t: (step(c, frozen, t), None), (params, opt.init(params)), toks_SxBxT)
        return carry[0]

    @jax.jit
    def accumulate(acc, new, params):
        return jax.tree.map(lambda a, n, p: a + (n - p), acc, new, params)

    @jax.jit
    def apply_mean(params, acc):
        return jax.tree.map(lambda p, a: p + a / w.K, params, acc)

    box = {"params": trainable}

    def one():
        params = box["params"]
        acc = jax.tree.map(jnp.zeros_like, params)
        for k in range(w.K):
            acc = accumulate(acc, train_client(params, tokens[k]), params)
        box["params"] = apply_mean(params, acc)
        jax.block_until_ready(box["params"])

    return one


def ideal_central_runner(w: Workload, fed: Federation):
    """(e): one jitted scan of K*S plain steps."""
    ideal, opt, trainable, frozen, tokens = _ideal_parts(w, fed)
    step = ideal.train_step(opt)
    tokens = tokens.reshape(w.K * w.S, w.B, w.seq)

    @jax.jit
    def train(carry):
        return jax.lax.scan(lambda c, t: (step(c, frozen, t), None), carry, tokens)[0]

    box = {"carry": (trainable, opt.init(trainable))}

    def one():
        box["carry"] = train(box["carry"])
        jax.block_until_ready(box["carry"])

    return one


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """f32 GFLOP/s of an n^3 matmul in this process (best of reps)."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    best = min(_timed(lambda: jax.block_until_ready(f(a, a))) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved_rates(runners: dict, tokens: int, rounds: int) -> tuple[dict, dict]:
    """Warms every runner up (its first call, compilation included, is timed apart), then times them
    round-robin, one round each per pass, so a machine whose speed drifts over minutes (a shared VM)
    moves every runner alike; returns ({name: tokens/s of the median round}, {name: first-call s})."""
    first = {}
    for name, fn in runners.items():
        first[name] = _timed(fn)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            times[name].append(_timed(fn))
    return {name: tokens / statistics.median(t) for name, t in times.items()}, first


def bench_workload(w: Workload, rounds: int, chunks: list[int]) -> dict:
    out = {"workload": w.name, "tokens_per_round": w.tokens_per_round}
    runners, fed = {}, None
    for chunk in chunks:
        one, fed_c = engine_runner(w, chunk)
        fed = fed or fed_c
        runners[f"engine_chunk{chunk or 'auto'}"] = one
        out.setdefault("engine_layout", list(fed_c.layout.shape))
    runners.update(loop=loop_runner(w, fed), central=central_runner(w, fed), ideal=ideal_loop_runner(w, fed),
                   ideal_central=ideal_central_runner(w, fed))
    rates, first = _interleaved_rates(runners, w.tokens_per_round, rounds)
    out.update(rates)
    out["engine"] = rates[f"engine_chunk{chunks[0] or 'auto'}"]  # the first chunk setting is the engine's default
    out["first_round_s"] = {"engine": first[f"engine_chunk{chunks[0] or 'auto'}"], "loop": first["loop"],
                            "ideal": first["ideal"]}
    out["engine/loop"] = out["engine"] / out["loop"]
    out["engine/central"] = out["engine"] / out["central"]
    out["engine/ideal"] = out["engine"] / out["ideal"]
    out["engine/ideal_central"] = out["engine"] / out["ideal_central"]
    out["peak_gflops"] = matmul_peak()
    out["flops_per_token"] = flops_per_token(ideal_model(w), w.seq - 1)
    for name in ("engine", "ideal", "ideal_central"):
        out[f"mfu_{name}"] = out[name] * out["flops_per_token"] / (out["peak_gflops"] * 1e9)
    return out


def scaling_child(k: int, rounds: int) -> None:
    """Runs in a subprocess: W-tiny-lora with K clients; prints s/round and peak RSS."""
    w = Workload("W-tiny-lora", *WORKLOADS["W-tiny-lora"])
    w.K = k
    one, fed = engine_runner(w, 0)
    rate, sec = _median_rate(one, w.tokens_per_round, rounds)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print("SCALING " + json.dumps({"K": k, "tokens_per_s": rate, "s_per_round": sec,
                                   "s_per_client": sec / k, "peak_rss_gib": rss,
                                   "layout": list(fed.layout.shape)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunks", type=int, nargs="*", default=[0, 2, 8],
                    help="clients_per_chunk settings for the engine (0 = auto; the first is reported as 'engine')")
    ap.add_argument("--scaling", action="store_true", help="W-tiny-lora at K=64,128,256 in subprocesses")
    ap.add_argument("--scaling-k", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--child-k", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_k:
        return scaling_child(args.child_k, args.rounds)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{len(jax.devices())}, "
          f"{os.cpu_count()} CPUs; median of {args.rounds} rounds after a warm-up")
    header = (f"{'workload':<14}{'engine tok/s':>14}{'loop tok/s':>12}{'central tok/s':>15}{'eng/loop':>10}"
              f"{'eng/central':>13}{'eng/ideal':>11}{'eng/ideal-c':>13}{'MFU eng':>9}{'MFU ideal':>11}{'MFU ideal-c':>13}"
              f"{'1st eng s':>10}{'1st ideal':>10}  chunks")
    rows = []
    for name in args.workloads:
        w = Workload(name, *WORKLOADS[name])
        r = bench_workload(w, args.rounds, args.chunks)
        rows.append(r)
        chunk_rates = " ".join(f"{k[12:]}={v:,.0f}" for k, v in r.items() if k.startswith("engine_chunk"))
        print(f"{name:<14}{r['engine']:>14,.0f}{r['loop']:>12,.0f}{r['central']:>15,.0f}"
              f"{r['engine/loop']:>9.2f}x{r['engine/central']:>12.2f}x{r['engine/ideal']:>10.2f}x"
              f"{r['engine/ideal_central']:>12.2f}x{r['mfu_engine']:>9.1%}{r['mfu_ideal']:>11.1%}"
              f"{r['mfu_ideal_central']:>13.1%}{r['first_round_s']['engine']:>10.1f}{r['first_round_s']['ideal']:>10.1f}"
              f"  {chunk_rates}  (f32 matmul {r['peak_gflops']:.0f} GFLOP/s)", flush=True)
    if rows:
        print(header)
    if args.scaling:
        for k in args.scaling_k:
            proc = subprocess.run([sys.executable, __file__, "--child-k", str(k), "--rounds", str(args.rounds)],
                                  capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("SCALING ")]
            if not line:
                print(f"K={k}: failed\n{proc.stderr[-2000:]}")
                continue
            s = json.loads(line[-1][8:])
            print(f"W-tiny-lora K={s['K']:<4} {s['tokens_per_s']:>10,.0f} tok/s  {s['s_per_round']:.2f} s/round  "
                  f"{1e3 * s['s_per_client']:.1f} ms/client  peak RSS {s['peak_rss_gib']:.2f} GiB  layout {s['layout']}",
                  flush=True)
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    from fedjax_llm.startup import prefer_huge_pages

    prefer_huge_pages()  # as the console scripts do: the engine and its baselines run under the same allocator
    main()
