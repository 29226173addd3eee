"""Secure-layer benchmark, one process: seal/open throughput and secure-aggregation cost.

    python experiments/bench_secure.py                 # everything (a few minutes on 2 CPU cores)
    python experiments/bench_secure.py --quick         # small sizes only, seconds

(a) seal/open MB/s of `secure.seal` (bytes API: header + signatures + chunked AEAD, 1 MiB chunks) for
    payloads of 1 KB .. 64 MB and both ciphers, median of repeats; overhead = wire bytes - payload.
(b) secure aggregation (`secure.secagg`, complete graph) vs parties n, dropout rate and parameter
    count: seconds of setup (keys + Shamir shares, all parties), masking (mean per party and all
    parties one after another), unmasking at the server; bytes of keys+shares, masked uploads and
    revealed shares. Threshold t = max(n // 2 + 1, n - ceil(0.3 n)), so 30 % dropouts are tolerated.
    Each run checks the unmasked sum against the plaintext fixed-point sum.
(c) share of round time: the W-small workload of experiments/bench_round.py (3 clouds) run by the
    engine with a plaintext channel, a sealing channel, sealing + secure aggregation across clouds, and
    sealing + secure aggregation across clouds and among each cloud's clients; median round seconds of each and the overhead relative to the plaintext round.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np

from fedjax_llm.secure import keys as K
from fedjax_llm.secure import seal as S
from fedjax_llm.secure import secagg as SA


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_seal(sizes: list[int]) -> None:
    ids = K.generate_identities(["cloud", "aggregator"])
    trust = K.trust_of(ids)
    print("\n(a) seal / open, bytes API, 1 MiB chunks")
    print("| payload | cipher | seal MB/s | open MB/s | wire overhead bytes |")
    print("|---|---|---|---|---|")
    for size in sizes:
        payload = os.urandom(size)
        reps = max(3, min(200, (64 << 20) // max(size, 1) // 4))
        for cipher in S.CIPHERS:
            kw = dict(sender=ids["cloud"], recipient=trust["aggregator"], round=1, seq=0, run_id="bench",
                      cipher=cipher)
            data = S.seal(payload, **kw)
            t_seal = _median_time(lambda: S.seal(payload, **kw), reps)
            t_open = _median_time(lambda: S.open_sealed(data, recipient=ids["aggregator"], trust=trust,
                                                        run_id="bench", round=1), reps)
            mb = size / 1e6
            print(f"| {_fmt_bytes(size)} | {cipher} | {mb / t_seal:,.1f} | {mb / t_open:,.1f} | "
                  f"{len(data) - size} |", flush=True)


def _fmt_bytes(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{int(n)} B"


def bench_secagg(parties: list[int], dropouts: list[float], dims: list[int]) -> None:
    print("\n(b) secure aggregation (Bonawitz et al. 2017), ring 2^32, 16 fractional bits, clip 1.0")
    print("| n | t | dropped | params | setup s | mask s/party | mask s all | unmask s | "
          "keys+shares | masked up | revealed | max err / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in parties:
        t = max(n // 2 + 1, n - math.ceil(0.3 * n))
        params = SA.SecAggParams(threshold=t, clip_range=1.0, frac_bits=16, ring_bits=32)
        names = [f"p{i}" for i in range(n)]
        for dim in dims:
            warm = SA.setup(["w0", "w1", "w2"], SA.SecAggParams(threshold=2))  # compiles the jitted mask
            SA.unmask(warm, {u: SA.mask(warm, u, np.zeros(dim, np.float32)) for u in ["w0", "w1"]})
            X = rng.uniform(-1, 1, (n, dim)).astype(np.float32)
            for rate in dropouts:
                n_drop = int(round(rate * n))
                t0 = time.perf_counter()
                session = SA.setup(names, params, session_id=f"bench/{n}/{dim}/{rate}")
                t_setup = time.perf_counter() - t0
                alive = sorted(rng.choice(n, n - n_drop, replace=False).tolist())
                t0 = time.perf_counter()
                masked = {names[i]: SA.mask(session, names[i], X[i]) for i in alive}
                t_mask = time.perf_counter() - t0
                t0 = time.perf_counter()
                total = SA.unmask(session, masked)
                t_unmask = time.perf_counter() - t0
                ref = np.rint(X[alive].astype(np.float64) * 2.0**16).sum(0) * 2.0**-16
                err = float(np.max(np.abs(total - ref))) / params.step
                tr = session.traffic
                print(f"| {n} | {t} | {n_drop} | {dim:,} | {t_setup:.2f} | {t_mask / len(alive):.3f} | "
                      f"{t_mask:.2f} | {t_unmask:.2f} | {_fmt_bytes(tr['keys'] + tr['shares'])} | "
                      f"{_fmt_bytes(tr['masked'])} | {_fmt_bytes(tr['revealed'])} | {err:.0f} |", flush=True)
                del masked, session


def bench_round_share(rounds: int, workload: str = "W-small") -> None:
    """Round seconds with the plaintext channel, sealed, and sealed + secure aggregation."""
    import dataclasses
    import sys
    import tempfile

    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_round import WORKLOADS, Workload, make_config, synthetic_data

    from fedjax_llm import config as C
    from fedjax_llm.validation import validate
    from fedjax_llm.secure.round import make_channel
    from fedjax_llm.server import Federation

    w = Workload(workload, *WORKLOADS[workload])
    w.K = 9  # three clouds of three clients
    data = synthetic_data(w)
    data = dataclasses.replace(data, client_cloud=np.repeat(np.arange(3), 3).astype(np.int32),
                               cloud_names=["c0", "c1", "c2"])
    base = make_config(w, 0)
    base.clouds = C.CloudsConfig(members={n: C.CloudConfig(clients=3) for n in data.cloud_names})
    print(f"\n(c) share of round time, {workload} (K=9 in 3 clouds), median of {rounds} rounds after a warm-up")
    print(f"{'channel':<26}{'s/round':>9}{'seal+open s':>13}{'overhead':>10}")
    plain_s = None
    for label, seal, scope in (("plaintext", False, None), ("sealed", True, None),
                               ("sealed + secagg (clouds)", True, "clouds"),
                               ("sealed + secagg (both)", True, "both")):
        g = C.SecAggConfig(enabled=scope is not None, scope=scope or "clouds")
        cfg = dataclasses.replace(base, secure=C.SecureConfig(seal=seal, secagg=g))
        cfg = validate(cfg)
        channel, _ = make_channel(cfg.secure, data.cloud_names, tempfile.mkdtemp(), "bench")
        fed = Federation(cfg, data, channel=channel)
        state, _ = fed.run_round(fed.init_state())  # warm-up: compilation
        times, crypto = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            state, m = fed.run_round(state)
            jax.block_until_ready(state.params)
            times.append(time.perf_counter() - t0)
            crypto.append(m["seal_s"] + m["open_s"])
        sec = statistics.median(times)
        plain_s = plain_s or sec
        print(f"{label:<26}{sec:>9.2f}{statistics.median(crypto):>13.3f}{(sec - plain_s) / plain_s:>9.1%}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--skip-seal", action="store_true")
    ap.add_argument("--skip-secagg", action="store_true")
    ap.add_argument("--skip-round", action="store_true")
    ap.add_argument("--round-only", action="store_true", help="only (c)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sizes = [1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
    parties, dropouts, dims = [3, 10, 30, 100], [0.0, 0.1, 0.3], [10_000, 100_000, 1_000_000]
    if args.quick:
        sizes, parties, dims = sizes[:3], [3, 10], dims[:1]
    print(f"cpu cores: {os.cpu_count()}")
    if not args.skip_seal and not args.round_only:
        bench_seal(sizes)
    if not args.skip_secagg and not args.round_only:
        bench_secagg(parties, dropouts, dims)
    if not args.skip_round:
        bench_round_share(args.rounds)


if __name__ == "__main__":
    main()
