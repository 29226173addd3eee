"""XLA:CPU options against each other and against torch on this host, ratios from one invocation.

    python experiments/bench_xla_cpu.py                 # about 12 minutes on a 2-core CPU
    python experiments/bench_xla_cpu.py --rounds 3 --settings default onednn

Each XLA setting runs in its own process (XLA reads XLA_FLAGS and the allocator tunables at start-up)
and reports:
- f32 matmul GFLOP/s (best of several) at 2048^3 and at W-small's two shapes (a projection,
  [1016 x 256] x [256 x 688], and the lm_head, [1016 x 256] x [256 x 8192]);
- the engine's W-small round (experiments/bench_round.py's workload: 8 clients x 2 AdamW steps of
  8 x 128 tokens, full fine-tuning) in tokens/s, median of --rounds rounds after a warm-up, then the
  median over --passes interleaved sweeps (this VM's speed drifts by 10-15 % over minutes);
- minor page faults per round (fresh pages the round's buffers touched);
- a digest of the matmul results and of the global model after the timed rounds, so a setting that
  changes results shows it (those cannot become defaults: the bitwise references would move).
Then torch (the CPU wheel, its own threads) runs the same matmuls and the same W-small round as a loop of
clients over transformers' LlamaForCausalLM (AdamW, global-norm clip 1.0, FedAvg of the deltas).
Writes experiments/results/xla_cpu/{results.json, table.md}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(2048, 2048, 2048), (1016, 256, 688), (1016, 256, 8192)]
SETTINGS = {  # name: (XLA_FLAGS, GLIBC_TUNABLES)
    "default": ("", ""),
    "no-hugepages": ("", "glibc.malloc.hugetlb=0"),
    "onednn": ("--xla_cpu_use_onednn=true", ""),
    "onednn-custom-call": ("--xla_cpu_experimental_onednn_custom_call=true", ""),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", ""),
    "vector-512": ("--xla_cpu_prefer_vector_width=512", ""),
    "concurrency-scheduler": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", ""),
    "one-eigen-thread": ("--xla_cpu_multi_thread_eigen=false", ""),
}


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def jax_child(rounds: int) -> dict:
    import resource

    import jax
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import bench_round as br

    out, h = {"matmul_gflops": []}, hashlib.sha256()
    for m, k, n in SHAPES:
        a = jax.random.normal(jax.random.key(1), (m, k))
        b = jax.random.normal(jax.random.key(2), (k, n))
        f = jax.jit(lambda x, y: x @ y)
        h.update(np.asarray(f(a, b)).tobytes())
        out["matmul_gflops"].append(2 * m * k * n / _best(lambda: f(a, b).block_until_ready(), 8) / 1e9)
    out["matmul_digest"] = h.hexdigest()[:12]
    w = br.Workload("W-small", *br.WORKLOADS["W-small"])
    one, fed = br.engine_runner(w, 0)
    one()  # compiles
    times, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    out["faults_per_round"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / rounds
    out["engine_tokens_per_s"] = w.tokens_per_round / statistics.median(times)
    out["engine_digest"] = _digest_after(fed)
    return out


def _digest_after(fed) -> str:
    """The global model after two rounds from a fresh state (what a setting computes, not how fast)."""
    from fedjax_llm.checkpoint import tree_digest

    state = fed.init_state()
    for _ in range(2):
        state, _ = fed.run_round(state)
    return tree_digest(state.params)[:12]


def torch_child(rounds: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import bench_round as br
    from fedjax_llm.models.spec import SIZES

    torch.manual_seed(0)
    out = {"threads": torch.get_num_threads(), "matmul_gflops": []}
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        out["matmul_gflops"].append(2 * m * k * n / _best(lambda: a @ b, 8) / 1e9)
    w = br.Workload("W-small", *br.WORKLOADS["W-small"])
    d, layers, heads, kv, ffn = SIZES[w.size]
    cfg = LlamaConfig(vocab_size=w.vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=ffn, max_position_embeddings=w.seq,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    data = torch.from_numpy(br.synthetic_data(w).tokens.astype("int64")).reshape(w.K, w.S, w.B, w.seq)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}

    def one_round():
        acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for c in range(w.K):
            model.load_state_dict(global_state)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
            for s in range(w.S):
                batch = data[c, s]
                loss = model(input_ids=batch[:, :-1], labels=None).logits
                loss = torch.nn.functional.cross_entropy(loss.reshape(-1, w.vocab), batch[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            for k, v in model.state_dict().items():
                acc[k] += v - global_state[k]
        for k in global_state:
            global_state[k] += acc[k] / w.K

    one_round()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        one_round()
        times.append(time.perf_counter() - t0)
    out["loop_tokens_per_s"] = w.tokens_per_round / statistics.median(times)
    return out


def _run_child(kind: str, rounds: int, xla_flags: str = "", tunables: str = "") -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"], env["FEDJAX_LLM_HUGEPAGES"] = xla_flags, "0" if tunables else "1"
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--rounds", str(rounds)],
                          env=env, capture_output=True, text=True, timeout=1800)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{kind} child ({xla_flags or 'default'}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=2,
                    help="sweeps over the settings, interleaved; each figure is the median over passes")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "xla_cpu"))
    args = ap.parse_args()
    if args.child:
        if args.child == "jax":
            from fedjax_llm.startup import prefer_huge_pages

            prefer_huge_pages()  # what the console scripts do (a no-op when FEDJAX_LLM_HUGEPAGES=0)
        result = jax_child(args.rounds) if args.child == "jax" else torch_child(args.rounds)
        print("RESULT " + json.dumps(result), flush=True)
        return
    runs = {name: [] for name in args.settings}
    for _ in range(args.passes):  # the VM's speed drifts by 10-15 % over minutes: interleave, then take medians
        for name in args.settings:
            runs[name].append(_run_child("jax", args.rounds, *SETTINGS[name]))
    results = {}
    for name, rs in runs.items():
        r = dict(rs[0])
        r["matmul_gflops"] = [statistics.median(x["matmul_gflops"][i] for x in rs) for i in range(len(SHAPES))]
        r["engine_tokens_per_s_all"] = [x["engine_tokens_per_s"] for x in rs]
        r["engine_tokens_per_s"] = statistics.median(r["engine_tokens_per_s_all"])
        r["faults_per_round"] = statistics.median(x["faults_per_round"] for x in rs)
        r["same_across_passes"] = len({(x["matmul_digest"], x["engine_digest"]) for x in rs}) == 1
        results[name] = r
    results["torch"] = _run_child("torch", args.rounds)
    base = results.get("default") or next(iter(results.values()))
    shapes = ["x".join(map(str, s)) for s in SHAPES]
    rows = ["| setting | " + " | ".join(f"matmul {s} GFLOP/s" for s in shapes)
            + " | W-small tok/s (each pass) | vs default | faults / round | same results as default |",
            "|---" * (len(shapes) + 5) + "|"]
    for name, r in results.items():
        tok = r.get("engine_tokens_per_s") or r["loop_tokens_per_s"]
        same = ("—" if name == "torch" else
                "yes" if (r["matmul_digest"], r["engine_digest"]) == (base["matmul_digest"], base["engine_digest"])
                else "no")
        faults = f"{r['faults_per_round']:,.0f}" if "faults_per_round" in r else "—"
        label = f"torch {r['threads']} threads (transformers loop)" if name == "torch" else \
            f"{name} `{' '.join(x for x in SETTINGS[name] if x) or 'as shipped'}`"
        each = " (" + ", ".join(f"{x:,.0f}" for x in r["engine_tokens_per_s_all"]) + ")" if name != "torch" else ""
        rows.append(f"| {label} | " + " | ".join(f"{g:.0f}" for g in r["matmul_gflops"])
                    + f" | {tok:,.0f}{each} | {tok / base['engine_tokens_per_s']:.2f}x | {faults} | {same} |")
    table = "\n".join(rows)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(f"`python experiments/bench_xla_cpu.py --rounds {args.rounds} --passes {args.passes}`\n\n{table}\n")


if __name__ == "__main__":
    main()
