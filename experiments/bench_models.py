"""Peak host memory and seconds to import and export a Hugging Face Llama checkpoint.

    python experiments/bench_models.py                    # base-100m row: 125M params, 500 MB in f32
    python experiments/bench_models.py --size mini --vocab 8192

transformers writes a randomly initialised LlamaForCausalLM (untied, f32) into a temporary directory;
each measurement then runs in a fresh subprocess that reports resource.getrusage's ru_maxrss:
  load        load_hf(dir) in f32 (weights streamed tensor by tensor)
  load-bf16   load_hf(dir, param_dtype="bfloat16")
  export      load_hf, then save_hf to a new directory (export peak counted on top of the load)
  hf-load     transformers' own LlamaForCausalLM.from_pretrained(dir), for context
Ratios divide by the f32 parameter bytes: "peak" is the whole process, "added" is the peak minus the
RSS just before the measured step (interpreter, jax and imports excluded).

    python experiments/bench_models.py --rounds 5        # also: MiniLM federated rounds, LoRA vs full

--rounds N times the default task (conf/task/topics.yaml: all-MiniLM-L6-v2, 9 clients, 2 local steps
of 8 sequences of 48 tokens) in one process: LoRA (frozen base) and full fine-tuning of the same
pretrained model; median of N rounds after a warm-up round, tokens/s over the K x S x B x T tokens.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_write(args: argparse.Namespace) -> dict:
    """Writes the random checkpoint with transformers (torch CPU)."""
    import torch
    import transformers as tf

    from fedjax_llm.models.spec import SIZES
    d, layers, heads, kv, ffn = SIZES[args.size]
    config = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=d, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv,
                            intermediate_size=ffn, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(args.dir)
    return {"params": sum(p.numel() for p in model.parameters())}


def child_measure(args: argparse.Namespace) -> dict:
    """One measured step in this fresh process: load, load-bf16, export or hf-load."""
    if args.mode == "hf-load":
        import torch  # noqa: F401  (transformers needs it; imported before the baseline)
        import transformers as tf
        before = _rss_mb()
        t0 = time.perf_counter()
        tf.LlamaForCausalLM.from_pretrained(args.dir)
        return {"seconds": time.perf_counter() - t0, "before_mb": before, "peak_mb": _rss_mb()}

    import jax
    import jax.numpy as jnp

    from fedjax_llm.models.hf_io import load_hf, save_hf
    jnp.zeros(1).block_until_ready()  # start the backend before the baseline
    before = _rss_mb()
    t0 = time.perf_counter()
    dtype = "bfloat16" if args.mode == "load-bf16" else "float32"
    fns, trainable, _, info = load_hf(args.dir, param_dtype=dtype, tokenizer=False)
    jax.block_until_ready(trainable)
    out = {"seconds": time.perf_counter() - t0, "before_mb": before, "peak_mb": _rss_mb()}
    if args.mode == "export":
        out["before_mb"] = _rss_mb()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            save_hf(tmp, fns.spec, trainable, base_config=info.config)
            out["seconds"] = time.perf_counter() - t0
            out["peak_mb"] = _rss_mb()
    return out


def _run(args: list[str]) -> dict:
    """Runs this file as a child with args and returns the JSON line it prints last."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="base-100m", help="a row of fedjax_llm.models.spec.SIZES")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--modes", default="load,load-bf16,export,hf-load")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    p.add_argument("--rounds", type=int, default=0, help="also time N MiniLM rounds, LoRA vs full")
    p.add_argument("--rounds-only", action="store_true", help="only the MiniLM rounds")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "write":
        print(json.dumps(child_write(args)))
        return
    if args.child == "measure":
        print(json.dumps(child_measure(args)))
        return
    if args.rounds_only:
        bench_minilm_rounds(args.rounds or 5)
        return

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        n = _run(["--child", "write", "--dir", tmp, "--size", args.size,
                  "--vocab", str(args.vocab)])["params"]
        f32_mb = 4 * n / 2**20
        print(f"Llama {args.size}, vocab {args.vocab}: {n / 1e6:.1f}M params, {f32_mb:.0f} MiB "
              f"in f32 (written by transformers in {time.perf_counter() - t0:.1f} s)")
        print("| step | seconds | RSS before (MiB) | peak RSS (MiB) | peak / f32 bytes | "
              "added / f32 bytes |")
        print("|---|---|---|---|---|---|")
        results = {"params": n}
        for mode in args.modes.split(","):
            r = _run(["--child", "measure", "--mode", mode, "--dir", tmp])
            r.update(peak_ratio=r["peak_mb"] / f32_mb,
                     added_ratio=(r["peak_mb"] - r["before_mb"]) / f32_mb)
            results[mode] = r
            print(f"| {mode} | {r['seconds']:.2f} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_ratio']:.2f} | {r['added_ratio']:.2f} |", flush=True)
        if args.json:
            print(json.dumps(results))
    if args.rounds:
        bench_minilm_rounds(args.rounds)


def bench_minilm_rounds(rounds: int) -> None:
    """Round seconds and tokens/s of federated MiniLM: LoRA next to full fine-tuning."""
    import os
    import statistics

    import jax

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedjax_llm.config import register_configs, to_train_config
    from fedjax_llm.validation import validate
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.models.params import count_params
    from fedjax_llm.server import Federation
    from fedjax_llm.train import CONF_DIR

    register_configs()
    print(f"\nMiniLM federated rounds (task=topics), median of {rounds} after a warm-up")
    print("| fine-tuning | trainable params | bytes up per round | s/round | tokens/s | vs full |")
    print("|---|---|---|---|---|---|")
    full_tps = None
    for label, overrides in (("full", ["model.lora.enabled=false"]), ("LoRA r8 (q, v)", [])):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = validate(to_train_config(compose("train", overrides=["task=topics", *overrides])))
        data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
        fed = Federation(cfg, data)
        state, m = fed.run_round(fed.init_state())
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            state, m = fed.run_round(state)
            jax.block_until_ready(state.params)
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        c = cfg.client
        tokens = fed.cohort_size * c.local_steps * c.batch_size * cfg.data.seq_len
        tps = tokens / sec
        full_tps = full_tps or tps
        up = sum(v["bytes_up"] for v in m["clouds"].values())
        print(f"| {label} | {count_params(state.params):,} | {up / 1e6:.2f} MB | {sec:.2f} | {tps:,.0f} | "
              f"{tps / full_tps:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
