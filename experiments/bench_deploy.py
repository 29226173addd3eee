"""Deployment benchmark (issue 11, section 4), every ratio from one run of this script:

    python experiments/bench_deploy.py                      # all four parts (about 15 minutes on 2 cores)
    python experiments/bench_deploy.py --parts transport link --mb 100

(share)     sealing's share of a simulated round, W-small of experiments/bench_round.py with 9 clients in
            3 clouds: plaintext channel, sealed with the downlink serialized and sealed per recipient
            (before), sealed with the downlink serialized once and sealed per recipient on threads (now).
            Reports s/round, seal+open s, their share of the round and the overhead vs plaintext.
(round)     the default task (task=topics) as one process vs deploy=local (aggregator + 3 clouds on
            loopback gRPC), sealed and unsealed: median round seconds (rounds 2.., metrics.jsonl wall_s).
(transport) one sealed message of --mb MB over loopback gRPC between two processes: MB/s end to end
            and each side's peak extra memory (VmHWM above the resting RSS) relative to the payload.
(link)      the link model (clouds/link.py) against a real shaped link: a receiver in a network namespace
            behind a veth pair shaped with `tc netem` (rate + delay; rate only with `tc tbf` when the
            kernel lacks netem), sealed messages of the default task's sizes and bigger, measured one-way
            times (same host clock) vs latency + bytes / bandwidth. Needs root and `ip netns`; skipped
            with the reason otherwise. Every namespace and link it makes is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
RUN_ID = "bench"


# ----- (share) sealing's share of a simulated round ------------------------------------------------------------
def bench_share(workload: str, rounds: int) -> None:
    import dataclasses

    import jax
    from bench_round import WORKLOADS, Workload, synthetic_data

    from fedjax_llm import config as C
    from fedjax_llm.clouds.channel import Channel
    from fedjax_llm.secure.round import make_channel
    from fedjax_llm.simulate import Federation
    from fedjax_llm.validation import validate

    w = Workload(workload, *WORKLOADS[workload])
    w.K = 9
    data = synthetic_data(w)
    data = dataclasses.replace(data, client_cloud=np.repeat(np.arange(3), 3).astype(np.int32),
                               cloud_names=["c0", "c1", "c2"])
    base = C.TrainConfig()  # bench_round.make_config's workload, three clouds of three clients
    base.model = C.ModelConfig(size=w.size, lora=C.LoRAConfig(enabled=w.lora, rank=8, alpha=16.0,
                                                              targets=["q_proj", "v_proj"]))
    base.data = C.DataConfig(seq_len=w.seq, vocab_size=w.vocab)
    base.client = C.ClientConfig(local_steps=w.S, batch_size=w.B, optimizer="adamw", lr=1e-3, grad_clip=1.0)
    base.checkpoint = C.CheckpointConfig(enabled=False)
    base.clouds = C.CloudsConfig(members={n: C.CloudConfig(clients=3) for n in data.cloud_names})
    print(f"\n(share) {workload}, 9 clients in 3 clouds, median of {rounds} rounds after a warm-up round")
    print("| channel | s / round | seal + open s | their share of the round | overhead vs plaintext |")
    print("|---|---|---|---|---|")
    plain = None
    for label, seal, once in (("plaintext", False, True), ("sealed, per recipient (before)", True, False),
                              ("sealed, serialize once (now)", True, True)):
        cfg = validate(dataclasses.replace(base, secure=C.SecureConfig(seal=seal)))
        channel, _ = make_channel(cfg.secure, data.cloud_names, tempfile.mkdtemp(), "bench")
        if not once:
            channel = Channel(send=channel.send, receive=channel.receive)  # no broadcast: one hop per cloud
        fed = Federation(cfg, data, channel=channel)
        state, _ = fed.run_round(fed.init_state())
        times, crypto = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            state, m = fed.run_round(state)
            jax.block_until_ready(state.aggregator.params)
            times.append(time.perf_counter() - t0)
            crypto.append(m["seal_s"] + m["open_s"])
        sec, cs = statistics.median(times), statistics.median(crypto)
        plain = plain or sec
        print(f"| {label} | {sec:.2f} | {cs:.2f} | {cs / sec:.1%} | "
              f"{'-' if sec is plain else f'{(sec - plain) / plain:+.1%}'} |", flush=True)


# ----- (round) deployed vs in-process round time -----------------------------------------------------------------
def _round_seconds(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    return [r["wall_s"] for r in recs if r["round"] >= 2 and "wall_s" in r]


def bench_round(rounds: int) -> None:
    tmp = tempfile.mkdtemp(prefix="bench_deploy_")
    args = ["task=topics", f"run.rounds={rounds}", f"run.eval_every={rounds}", "checkpoint.every=100"]
    print(f"\n(round) the default task (task=topics), {rounds} rounds, median wall_s of rounds 2..{rounds}")
    print("| run | s / round | vs in-process (same channel) | wall of the whole command s |")
    print("|---|---|---|---|")
    ref = {}
    for label, extra in (("in-process, sealed", []), ("deploy=local, sealed", ["deploy=local"]),
                         ("in-process, unsealed", ["secure.seal=false"]),
                         ("deploy=local, unsealed", ["deploy=local", "secure.seal=false"])):
        run = os.path.join(tmp, re.sub(r"\W+", "_", label))
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "fedjax_llm.train", *args, *extra, f"hydra.run.dir={run}"],
                             capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            print(f"| {label} | failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]} | | |")
            continue
        sec = statistics.median(_round_seconds(run))
        sealed = "unsealed" not in label
        if "in-process" in label:
            ref[sealed] = sec
        ratio = f"{sec / ref[sealed]:.2f}x" if "deploy" in label and sealed in ref else "-"
        print(f"| {label} | {sec:.2f} | {ratio} | {wall:.0f} |", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


# ----- (transport) one large sealed message over loopback gRPC ---------------------------------------------------
def _hwm_kib() -> tuple[int, int]:
    s = open("/proc/self/status").read()
    return (int(re.search(r"VmRSS:\s+(\d+)", s).group(1)), int(re.search(r"VmHWM:\s+(\d+)", s).group(1)))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _receiver(keys_dir: str, host: str, port_q, result_q, chunk_bytes: int, sealed: bool = True) -> None:
    """A process that opens every sealed message sent to it and reports when and how much memory."""
    from fedjax_llm.clouds import wire as wirelib
    from fedjax_llm.clouds.grpc_transport import serve
    from fedjax_llm.deploy.keys import load_party
    from fedjax_llm.secure.seal import ReplayGuard

    keys = load_party(keys_dir, "aggregator", ["east"])
    wire = wirelib.Wire("aggregator", keys.identity, keys.trust, sealed=sealed, max_bytes=2**34, chunk_bytes=chunk_bytes)
    guard = ReplayGuard()

    def handle(frames, peer):
        rss, _ = _hwm_kib()
        _reset_hwm()
        payload, h = wire.open(frames, run_id=RUN_ID, guard=guard, sender="east")
        done = time.time()
        _, hwm = _hwm_kib()
        result_q.put(dict(done=done, length=h["length"], extra_kib=hwm - rss))
        del payload
        return wire.frames(b"ok", recipient="east", run_id=RUN_ID)

    server, port = serve(host, 0, handle, chunk_bytes=chunk_bytes)
    port_q.put(port)
    time.sleep(3600)  # until terminated


class _Peer:
    """The receiving process (multiprocessing spawn, optionally inside a network namespace)."""

    def __init__(self, keys_dir: str, host: str, chunk_bytes: int, netns: str = "", sealed: bool = True):
        self.ctx = mp.get_context("spawn")
        self.port_q, self.result_q = self.ctx.Queue(), self.ctx.Queue()
        self.proc, self.sub = None, None
        if netns:  # the same function, started by a child python inside the namespace
            code = (f"import sys; sys.path.insert(0, {HERE!r}); import bench_deploy as b, json; "
                    f"b._receiver_stdio({keys_dir!r}, {host!r}, {chunk_bytes})")
            self.sub = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                                        stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
            self.port = int(self.sub.stdout.readline())
        else:
            self.proc = self.ctx.Process(target=_receiver, args=(keys_dir, host, self.port_q, self.result_q, chunk_bytes,
                                                                 sealed))
            self.proc.start()
            self.port = self.port_q.get(timeout=120)

    def result(self) -> dict:
        if self.sub is not None:
            return json.loads(self.sub.stdout.readline())
        return self.result_q.get(timeout=600)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.join(10)
        if self.sub is not None:
            self.sub.kill()
            self.sub.wait(10)


def _receiver_stdio(keys_dir: str, host: str, chunk_bytes: int) -> None:
    """_receiver talking over stdin/stdout (for a process started with `ip netns exec`)."""
    import queue
    import threading

    port_q, result_q = queue.Queue(), queue.Queue()
    threading.Thread(target=_receiver, args=(keys_dir, host, port_q, result_q, chunk_bytes), daemon=True).start()
    print(port_q.get(), flush=True)
    while True:
        print(json.dumps(result_q.get()), flush=True)


def _send(keys_dir: str, target: str, payload: bytes, chunk_bytes: int, attempts: int = 1, sealed: bool = True) -> float:
    """Sends `payload` (sealed) to the receiver at `target`; returns the wall time (time.time) it started."""
    from fedjax_llm.clouds import wire as wirelib
    from fedjax_llm.clouds.grpc_transport import Connection
    from fedjax_llm.config import DeployConfig, TransportConfig
    from fedjax_llm.deploy.keys import load_party

    if target not in _send.conns:  # one sender (its sequence numbers) and one channel per receiver
        keys = load_party(keys_dir, "east", ["aggregator"])
        _send.conns[target] = (
            wirelib.Wire("east", keys.identity, keys.trust, sealed=sealed, max_bytes=2**34, chunk_bytes=chunk_bytes),
            Connection(target, TransportConfig(deadline_s=600), DeployConfig(retries=attempts), chunk_bytes=chunk_bytes))
    wire, conn = _send.conns[target]
    t0 = time.time()
    conn.exchange(lambda: wire.frames(payload, recipient="aggregator", run_id=RUN_ID), len(payload), "bench",
                  lambda it: list(it))
    return t0


_send.conns = {}


def _keys() -> str:
    from fedjax_llm.deploy.keys import init_keys

    d = tempfile.mkdtemp(prefix="bench_keys_")
    init_keys(["east", "aggregator"], d)
    return d


def bench_transport(mb: int, chunk_bytes: int = 1 << 20) -> None:
    keys = _keys()
    payload = np.random.default_rng(0).integers(0, 256, mb * 10**6, np.uint8).tobytes()
    print(f"\n(transport) one {mb} MB message over loopback gRPC ({chunk_bytes >> 20} MiB chunks), sender and "
          "receiver in two processes")
    print("| message | MB/s end to end (reply included) | MB/s until opened | receiver peak extra / payload | "
          "sender peak extra / payload |")
    print("|---|---|---|---|---|")
    try:
        for sealed in (True, False):
            peer = _Peer(keys, "127.0.0.1", chunk_bytes, sealed=sealed)
            try:
                target = f"127.0.0.1:{peer.port}"
                _send(keys, target, os.urandom(1 << 20), chunk_bytes, attempts=6, sealed=sealed)  # connect, warm up
                peer.result()
                rss, _ = _hwm_kib()
                _reset_hwm()
                t0 = _send(keys, target, payload, chunk_bytes, sealed=sealed)
                t1 = time.time()
                _, hwm = _hwm_kib()
                got = peer.result()
                assert got["length"] == len(payload)
                print(f"| {'sealed' if sealed else 'plain (gRPC alone)'} | {len(payload) / 1e6 / (t1 - t0):.0f} | "
                      f"{len(payload) / 1e6 / (got['done'] - t0):.0f} | {got['extra_kib'] * 1024 / len(payload):.2f}x | "
                      f"{(hwm - rss) * 1024 / len(payload):.2f}x |", flush=True)
            finally:
                peer.close()
    finally:
        shutil.rmtree(keys, ignore_errors=True)


# ----- (link) the link model against a shaped veth pair -------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def _shape(dev: str, mbps: float, delay_ms: float, netns: str = "") -> str:
    """Shapes `dev`'s egress; returns 'netem' or 'tbf' (rate only, when the kernel has no netem)."""
    pre = ["ip", "netns", "exec", netns] if netns else []
    netem = _ip(*pre, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{delay_ms}ms",
                "rate", f"{mbps}mbit", "limit", "100000", check=False)
    if netem.returncode == 0:
        return "netem"
    burst = max(int(mbps * 1e6 / 8 / 250), 16000)  # a 4 ms bucket
    _ip(*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbps}mbit", "burst", str(burst),
        "latency", "400ms")
    return "tbf"


def bench_link(chunk_bytes: int = 1 << 20) -> None:
    from fedjax_llm.clouds.link import Link

    print("\n(link) the link model (clouds/link.py) vs a veth pair into a network namespace")
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        print("skipped: needs root, `ip` and `tc`")
        return
    ns, host_dev, ns_dev = "fjl-bench", "fjl-h0", "fjl-n0"
    made = _ip("ip", "netns", "add", ns, check=False)
    if made.returncode != 0:
        print(f"skipped: `ip netns add` failed: {made.stderr.strip()}")
        return
    peer, keys = None, None
    try:
        _ip("ip", "link", "add", host_dev, "type", "veth", "peer", "name", ns_dev)
        _ip("ip", "link", "set", ns_dev, "netns", ns)
        _ip("ip", "addr", "add", "10.231.0.1/30", "dev", host_dev)
        _ip("ip", "link", "set", host_dev, "up")
        for cmd in (["ip", "addr", "add", "10.231.0.2/30", "dev", ns_dev], ["ip", "link", "set", ns_dev, "up"],
                    ["ip", "link", "set", "lo", "up"], ["sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0"]):
            _ip("ip", "netns", "exec", ns, *cmd, check=False)
        keys = _keys()
        peer = _Peer(keys, "10.231.0.2", chunk_bytes, netns=ns)
        target = f"10.231.0.2:{peer.port}"
        print("| link (model) | shaping | message MB | measured one-way s | model s | measured / model |")
        print("|---|---|---|---|---|---|")
        for mbps, delay in ((200.0, 75.0), (400.0, 40.0)):
            for dev, where in ((host_dev, ""), (ns_dev, ns)):
                _ip(*(["ip", "netns", "exec", where] if where else []), "tc", "qdisc", "del", "dev", dev, "root",
                    check=False)
                kind = _shape(dev, mbps, delay, where)
            link = Link(mbps, delay if kind == "netem" else 0.0)
            _send(keys, target, os.urandom(4 << 20), chunk_bytes, attempts=6)  # connection up, window grown
            peer.result()
            for mb in (0.32, 4.2, 30.0):
                payload = os.urandom(int(mb * 1e6))
                runs = []
                for _ in range(3):
                    t0 = _send(keys, target, payload, chunk_bytes)
                    runs.append(peer.result()["done"] - t0)
                got, want = statistics.median(runs), link.transfer_seconds(len(payload))
                print(f"| {mbps:g} Mbit/s, {link.latency_ms:g} ms | {kind} | {mb:g} | {got:.3f} | {want:.3f} | "
                      f"{got / want:.2f} |", flush=True)
        if kind == "tbf":
            print("(this kernel has no netem qdisc: rate shaped with tbf, no delay added, the model's latency set to 0)")
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"skipped: {e}: {getattr(e, 'stderr', '') or ''}".strip())
    finally:
        if peer is not None:
            peer.close()
        _ip("ip", "link", "del", host_dev, check=False)
        _ip("ip", "netns", "del", ns, check=False)
        if keys:
            shutil.rmtree(keys, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="*", default=["share", "round", "transport", "link"],
                    choices=["share", "round", "transport", "link"])
    ap.add_argument("--workload", default="W-small", help="(share) a workload of experiments/bench_round.py")
    ap.add_argument("--rounds", type=int, default=3, help="(share) measured rounds")
    ap.add_argument("--task-rounds", type=int, default=5, help="(round) rounds of each run")
    ap.add_argument("--mb", type=int, default=100, help="(transport) message size")
    args = ap.parse_args()
    print(f"cpu cores: {os.cpu_count()}; load average at start: {os.getloadavg()[0]:.1f}")
    if "share" in args.parts:
        bench_share(args.workload, args.rounds)
    if "round" in args.parts:
        bench_round(args.task_rounds)
    if "transport" in args.parts:
        bench_transport(args.mb)
    if "link" in args.parts:
        bench_link()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
