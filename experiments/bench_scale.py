"""Cluster-scale benchmark: the same run as 2 processes x 1 device (jax.distributed on localhost, CPU
collectives over gloo) and as 1 process x 2 devices, with ratios from one invocation; plus the
planner's time for the 7B plan.

    python experiments/bench_scale.py                     # about 5 minutes on a 2-core CPU
    python experiments/bench_scale.py --rounds 6 --clients 16

Each layout trains the same workload (`WORKLOAD` plus --clients clients in one cloud, --rounds rounds)
through `python -m fedjax_llm.train` semantics: this file re-runs itself as the child (`--child`), which
wraps `cloud.round_inputs` and `distributed.put_rows` to count bytes and then calls the training app's
`main()` unchanged. Per layout it reports:
- round time: the median of metrics.jsonl's `wall_s` over rounds 2.. (round 1 compiles);
- per process: peak RSS (getrusage of the process itself), the bytes of the cohort's host arrays that
  `cloud.round_inputs` wrote (its own slots' batches, and the small per-slot vectors and client state
  whole: what the process holds on the host per round), and the bytes of the rows it put on its own devices (1 process: the whole cohort; 2 processes:
  `distributed.put_rows`' local rows);
- the final train loss of both layouts (the same run: equal up to the reduction order).
Then `fedjax-llm-plan +plan=flowertune_mistral7b --device h200` is timed end to end (a fresh
process: imports, config composition, the abstract build of the 7B round, the printout).
Writes experiments/results/scale/{results.json, scale.md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOAD = ["task=dialog", "debug=tiny", "data.seq_len=64", "client.local_steps=4", "client.batch_size=16",
            "clouds=custom", "partition=iid", "run.eval_every=1000", "data.max_eval_examples=32",
            "checkpoint.enabled=false", "run.tensorboard=false", "run.compile_cache_dir=null", "run.progress=false"]


# ----- the child: one process of one layout --------------------------------------------------------------
def _nbytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def child(report: str, args: list[str]) -> None:
    """Runs the training app on `args`, counting the cohort inputs' bytes; writes `report` (JSON)."""
    from fedjax_llm import cloud, distributed

    seen = {"host": [], "device": []}
    round_inputs, put_rows = cloud.round_inputs, distributed.put_rows

    def counted_round_inputs(*a, **k):
        inputs, cursors = round_inputs(*a, **k)
        # written bytes: the batches' rows of this process's slots (round_inputs leaves the others as
        # zero pages it never writes) and every other leaf whole
        start, stop = a[0].engine.rows
        padded = a[0].engine.layout.padded
        share = (min(stop, padded) - start) / padded
        seen["host"].append(int(_nbytes(inputs.batches) * share) + _nbytes(inputs.replace(batches=None)))
        if _processes() == 1:
            seen["device"].append(_nbytes(inputs))  # one process: the whole cohort goes to its devices
        return inputs, cursors

    def counted_put_rows(tree, sharding, padded, rows):
        import jax
        import numpy as np

        start, stop = rows
        seen["device"].append(int(sum(np.asarray(x)[start:stop].nbytes for x in jax.tree.leaves(tree))))
        return put_rows(tree, sharding, padded, rows)

    cloud.round_inputs, distributed.put_rows = counted_round_inputs, counted_put_rows
    sys.argv = ["fedjax_llm.train", *args]
    from fedjax_llm.train import main

    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        with open(report, "w") as f:
            json.dump(dict(code=code, host_input_bytes=max(seen["host"], default=0),
                           device_input_bytes=max(seen["device"], default=0), rounds_seen=len(seen["host"]),
                           peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), f)
    sys.exit(code)


def _processes() -> int:
    import jax

    return jax.process_count()


# ----- the parent ------------------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def run_layout(label: str, processes: int, devices: int, args: list[str], work: str) -> dict:
    """One layout: `processes` processes with `devices` devices each; returns its figures."""
    run_dir = os.path.join(work, label)
    port = _port()
    procs, reports = [], []
    t0 = time.perf_counter()
    for i in range(processes):
        extra = ["run.distributed=off"] if processes == 1 else [
            "run.distributed=explicit", f"run.coordinator_address=localhost:{port}",
            f"run.num_processes={processes}", f"run.process_id={i}", "run.distributed_timeout_s=120"]
        reports.append(os.path.join(work, f"{label}.{i}.json"))
        log = open(os.path.join(work, f"{label}.{i}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", reports[-1], "--",
                                       *args, *extra, f"hydra.run.dir={run_dir}"], env=_env(devices), cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=1800) for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        logs = [open(os.path.join(work, f"{label}.{i}.log")).read()[-3000:] for i in range(processes)]
        raise SystemExit(f"{label}: exit codes {codes}\n" + "\n".join(logs))
    per_process = [json.load(open(r)) for r in reports]
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    rounds = [r for r in records if r.get("round", 0) >= 1 and "wall_s" in r]
    timed = [r["wall_s"] for r in rounds if r["round"] >= 2]
    return dict(label=label, processes=processes, devices_per_process=devices, wall_s=wall,
                round_s=statistics.median(timed), round_s_min=min(timed), round_s_all=[r["wall_s"] for r in rounds],
                final_train_loss=rounds[-1]["train_loss"], per_process=per_process)


def time_planner() -> dict:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedjax_llm.plan", "+plan=flowertune_mistral7b",
                           "--device", "h200"], env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    verdict = [ln for ln in done.stdout.splitlines() if ln.startswith(("verdict", "source"))]
    return dict(seconds=seconds, exit=done.returncode, lines=verdict)


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8, help="clients per round, in one cloud")
    ap.add_argument("--no-planner", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "scale"))
    a = ap.parse_args()
    args = WORKLOAD + [f"+clouds.members.solo={{clients: {a.clients}}}", f"run.rounds={a.rounds}"]
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as work:
        one = run_layout("1proc_x_2dev", 1, 2, args, work)
        two = run_layout("2proc_x_1dev", 2, 1, args, work)
    ratio = two["round_s"] / one["round_s"]
    ratio_min = two["round_s_min"] / one["round_s_min"]
    host = [p["host_input_bytes"] for p in two["per_process"]]
    rows = [f"| {r['label']} | {r['round_s']:.2f} ({r['round_s_min']:.2f}) | "
            + ", ".join(f"{_mib(p['peak_rss'])}" for p in r["per_process"]) + " | "
            + ", ".join(_mib(p["host_input_bytes"]) for p in r["per_process"]) + " | "
            + ", ".join(_mib(p["device_input_bytes"]) for p in r["per_process"]) + f" | {r['final_train_loss']:.6f} |"
            for r in (one, two)]
    table = ("| layout | s / round: median (min), rounds 2.. | peak RSS per process | cohort host arrays per process "
             "| rows put on own devices per process | final train loss |\n|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    lines = [f"workload: {' '.join(args)}", table,
             f"round time, 2 processes x 1 device / 1 process x 2 devices: {ratio:.2f}x of the medians, "
             f"{ratio_min:.2f}x of the minima (goal <= 1.3x)",
             f"cohort host arrays, each of 2 processes / the 1 process: "
             f"{max(host) / one['per_process'][0]['host_input_bytes']:.2f}x; rows put on own devices: "
             f"{max(p['device_input_bytes'] for p in two['per_process']) / one['per_process'][0]['device_input_bytes']:.2f}x",
             f"peak RSS, each of 2 processes / the 1 process: "
             f"{max(p['peak_rss'] for p in two['per_process']) / one['per_process'][0]['peak_rss']:.2f}x"]
    results = dict(workload=args, layouts=[one, two], round_time_ratio=ratio, round_time_ratio_min=ratio_min,
                   load_average=os.getloadavg())
    if not a.no_planner:
        results["planner"] = plan = time_planner()
        lines.append(f"planner, fedjax-llm-plan +plan=flowertune_mistral7b --device h200: "
                     f"{plan['seconds']:.1f} s end to end (exit {plan['exit']}; goal < 120 s)")
    text = "\n".join(lines)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(a.out, "scale.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sep = sys.argv.index("--")
        child(sys.argv[2], sys.argv[sep + 1:])
    else:
        main()
