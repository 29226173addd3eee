"""The planner checked on this CPU, and FlowerTune's LLM protocol planned on three clusters.

    python experiments/plan_check.py                 # both parts (about 6 minutes on a 2-core CPU)
    python experiments/plan_check.py --small         # analytic vs compiled vs measured only
    python experiments/plan_check.py --flowertune    # the Mistral-7B table and the planner's time

--small plans nano, nano + LoRA (q, k, v, o), w-small and w-small + LoRA (q, v) (task=dialog, one cloud
of 3 clients, 4 AdamW steps of 16 x 64 tokens), and full w-tiny on 2 steps of 3 x 24 tokens (its
params, gradients and AdamW state outweigh its activations) on this CPU, each in a fresh process run with
MALLOC_MMAP_THRESHOLD_=65536 (freed buffers leave the resident set at once): the analytic figures, XLA's
memory and cost analysis of the compiled round, and the resident memory the round adds while it runs.
--flowertune plans `+plan=flowertune_mistral7b` (config.json only) on 1 x H200, 8 x A100-80GB
and a 4-host TPU v5e-16 with and without a model axis, and times the command end to end.
Writes experiments/results/plan/{small.md, flowertune.md, results.json}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMALL = {"nano": ["model=nano"], "nano + LoRA q,k,v,o": ["model=nano_lora"], "w-small": ["model=w_small"],
         "w-small + LoRA q,v": ["model=w_small", "model.lora.enabled=true"],
         "w-tiny, 3 x 24 tokens per step": ["debug=tiny", "data.seq_len=24", "client.local_steps=2",
                                            "client.batch_size=3"]}
BASE = ["task=dialog", "clouds=custom", "+clouds.members.solo={clients: 3}", "partition=iid"]
LAYOUTS = [  # (label, device, devices, hosts, model axis, batch split over the model axis)
    ("1 x H200", "h200", 1, 1, 1, False),
    ("8 x A100-80GB", "a100-80gb", 8, 1, 1, False),
    ("8 x A100-80GB", "a100-80gb", 8, 1, 8, False),
    ("8 x A100-80GB", "a100-80gb", 8, 1, 8, True),
    ("TPU v5e-16, 4 hosts", "tpu-v5e", 16, 4, 1, False),
    ("TPU v5e-16, 4 hosts", "tpu-v5e", 16, 4, 4, True),
    ("TPU v5e-16, 4 hosts", "tpu-v5e", 16, 4, 16, True),
]
ONE = """
import json, sys
from fedjax_llm.plan import compose, make_layout, make_plan
c = make_plan(compose(json.loads(sys.argv[1])), make_layout("cpu"), source="compiled", measure=True).clouds[0]
m = c.memory
print(json.dumps(dict(analytic=dict(arguments=m.arguments, extra=m.peak - m.arguments, peak=m.peak, flops=c.flops),
                      compiled=c.compiled, measured=c.measured)))
"""


def _pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.0f} %"


def small() -> tuple[dict, str]:
    from fedjax_llm.plan_model import human_bytes as hb

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    out, rows = {}, []
    for name, overrides in SMALL.items():
        done = subprocess.run([sys.executable, "-c", ONE, json.dumps(BASE + overrides)], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name}: the planner failed:\n{done.stderr[-3000:]}")
        r = out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        a, c = r["analytic"], r["compiled"]
        compiled_extra = c["temp"] + c["outputs"]
        rows.append(f"| {name} | {hb(a['arguments'])} / {hb(c['arguments'])} | {hb(a['extra'])} / "
                    f"{hb(compiled_extra)} / {hb(r['measured'])} | {_pct(a['extra'], compiled_extra)}, "
                    f"{_pct(a['extra'], r['measured'])} | {hb(a['peak'])} / {hb(c['peak'])} / "
                    f"{hb(c['arguments'] + r['measured'])} | {a['flops']:.3g} / {c['flops']:.3g} "
                    f"({_pct(a['flops'], c['flops'])}) |")
        print(rows[-1], flush=True)
    head = ("| config | arguments: analytic / compiled | beyond arguments: analytic / compiled / measured | "
            "analytic vs compiled, vs measured | peak: analytic / compiled / measured | FLOPs per round: "
            "analytic / compiled |\n|---|---|---|---|---|---|")
    return out, head + "\n" + "\n".join(rows) + "\n"


def flowertune() -> tuple[dict, str]:
    from fedjax_llm.plan import compose, make_layout, make_plan
    from fedjax_llm.plan_model import human_bytes as hb

    env = dict(os.environ, PYTHONPATH=ROOT)
    timing = {}
    for label, extra in (("plan", []), ("plan with --hlo-flops", ["--hlo-flops"])):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fedjax_llm.plan", "+plan=flowertune_mistral7b",
                               "--device", "h200", *extra], env=env, cwd=ROOT, capture_output=True, text=True)
        timing[label] = time.perf_counter() - t0
        print(done.stdout, f"{label}: {timing[label]:.1f} s wall, exit {done.returncode}", sep="\n", flush=True)
    cfg = compose(["+plan=flowertune_mistral7b"])
    plans, rows = [], []
    for label, device, n, hosts, m, split in LAYOUTS:
        plan = make_plan(cfg, make_layout(device, n, hosts, m, batch_over_model=split))
        c, mem = plan.clouds[0], plan.clouds[0].memory
        plans.append(plan.to_dict())
        mesh = f"{n // m} x {m}" + (", batch split" if split and m > 1 else "")
        best = lambda k: str(k) if k else "none"  # noqa: E731
        rows.append(f"| {label} | {mesh} | {c.layout[2]} | {hb(mem.params)} | {hb(mem.state)} | "
                    f"{hb(mem.activations)} ({hb(mem.scores)}) | {hb(mem.peak)} | {'yes' if c.fits else 'no'} | "
                    f"{hb(c.peak_one)} / {hb(c.peak_one_remat)} | {best(c.largest_chunk)} / "
                    f"{best(c.largest_chunk_remat)} | {plan.flops:.3g} | {plan.compute_seconds():.0f} s |")
        print(rows[-1], flush=True)
    c = plans[0]["clouds"][0]
    head = ("| layout | mesh clients x model | clients per chunk (engine default) | params | optimizer + "
            "client state | activations (attention scores) | peak | fits | peak at 1 client per chunk: as "
            "built / per-layer remat | largest clients per chunk that fits: as built / remat | FLOPs per "
            "round | compute at peak bf16 rate |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    tail = (f"\nMessages per round and cloud (sealed, the same on every layout): down {hb(c['down'][1])} "
            f"({c['down'][1]:,} B), up {hb(c['up'][1])} ({c['up'][1]:,} B). Planner time: "
            f"{timing['plan']:.0f} s end to end ({timing['plan with --hlo-flops']:.0f} s with --hlo-flops).\n")
    return dict(layouts=plans, timing=timing), head + "\n" + "\n".join(rows) + "\n" + tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--flowertune", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "plan"))
    args = ap.parse_args()
    both = not (args.small or args.flowertune)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    if args.small or both:
        results["small"], table = small()
        open(os.path.join(args.out, "small.md"), "w").write(table)
    if args.flowertune or both:
        results["flowertune"], table = flowertune()
        open(os.path.join(args.out, "flowertune.md"), "w").write(table)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
