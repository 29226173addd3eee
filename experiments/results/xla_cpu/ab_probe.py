import sys, time, statistics, resource
sys.path.insert(0, "/work/main/experiments")
import jax
import bench_round as br
for name in sys.argv[1:]:
    w = br.Workload(name, *br.WORKLOADS[name])
    one, fed = br.engine_runner(w, 0)
    one(); ts = []; f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        t0 = time.perf_counter(); one(); ts.append(time.perf_counter() - t0)
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(name, f"{w.tokens_per_round/statistics.median(ts):,.0f} tok/s, {(f1-f0)/5:,.0f} faults/round, {statistics.median(ts):.3f} s/round", flush=True)
