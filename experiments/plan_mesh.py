"""The planner against the engine's model axis (run.mesh) on 4 host devices: analytic vs compiled.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python experiments/plan_mesh.py   # about 2 minutes

nano and nano + LoRA (task=dialog, one cloud of 4 clients, 4 AdamW steps of 16 x 64 tokens) on meshes
clients x model = 4 x 1, 2 x 2, 1 x 4: per-device argument bytes, bytes beyond the arguments and FLOPs
per round, from the analytic model (default with M > 1: each batch split over the model axis) and from
XLA's analysis of the engine's round placed as the engine places it. Writes
experiments/results/plan/mesh.md.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ONE = ["task=dialog", "clouds=custom", "+clouds.members.solo={clients: 4}", "partition=iid"]
CONFIGS = {"nano": ["model=nano"], "nano + LoRA q,k,v,o": ["model=nano_lora"]}
MESHES = ((4, 1), (2, 2), (1, 4))


def main() -> None:
    import jax

    from fedjax_llm.plan import compose, make_layout, make_plan
    from fedjax_llm.plan_model import human_bytes as hb

    if len(jax.devices()) < 4:
        raise SystemExit("plan_mesh: needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    rows = []
    for name, overrides in CONFIGS.items():
        cfg = compose(ONE + overrides)
        for clients, model in MESHES:
            c = make_plan(cfg, make_layout("cpu", clients * model, 1, model), source="compiled").clouds[0]
            m, x = c.memory, c.compiled
            extra, cx = m.peak - m.arguments, x["temp"] + x["outputs"]
            rows.append(f"| {name} | {clients} x {model} | {hb(m.arguments)} / {hb(x['arguments'])} | "
                        f"{hb(extra)} / {hb(cx)} ({100 * (extra - cx) / cx:+.0f} %) | "
                        f"{c.flops:.3g} / {x['flops']:.3g} |")
            print(rows[-1], flush=True)
    table = ("| config | mesh clients x model | arguments per device: analytic / compiled | beyond arguments: "
             "analytic / compiled | FLOPs per round: analytic / compiled |\n|---|---|---|---|---|\n" + "\n".join(rows))
    out = os.path.join(ROOT, "experiments", "results", "plan", "mesh.md")
    with open(out, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
