"""The deployed services end to end on loopback (issue 11, section 3), each against the simulation:

- `fedjax-llm-train deploy=local` (aggregator + 3 cloud processes, sealed over gRPC) ends with the
  simulation's global model bit for bit and the same per-round metrics (training and evaluation; the
  transport's byte counts differ by the deployment's own framing), also with secure aggregation;
- with secure aggregation the aggregator never holds a cloud's update: every update it opened is a
  masked ring vector, unlike the cloud's update in the clear or its fixed-point encoding.

Parties dying mid-round: tests/test_deploy_faults.py. Every wait is bounded, every process reaped.
"""
import json
import os

import numpy as np
import pytest

from tests.deploytools import CLOUDS, ROUNDS, assert_deployment_equals, base, sims  # noqa: F401 (fixtures)
from tests.runtools import records, run_train

pytestmark = pytest.mark.slow


# ----- parity, and what the aggregator sees -----------------------------------------------------------------
@pytest.fixture(scope="module")
def local_runs(base, train_env, tmp_path_factory):
    done = {}

    def get(*extra):
        if extra not in done:
            d = tmp_path_factory.mktemp("deploy")
            out = run_train([*base, *extra, "deploy=local", f"deploy.audit_dir={d / 'audit'}", f"hydra.run.dir={d / 'run'}"],
                            train_env, timeout=900)
            assert out.returncode == 0, out.stderr[-3000:] + _logs(str(d / "run"))
            done[extra] = str(d)
        return done[extra]
    return get


def _logs(run_dir: str) -> str:
    out = ""
    for name in ["aggregator", *CLOUDS]:
        path = os.path.join(run_dir, "logs", f"{name}.log")
        if os.path.exists(path):
            out += f"\n== {name}\n" + "".join(open(path, errors="replace").readlines()[-15:])
    return out


@pytest.mark.parametrize("extra", [(), ("secure.secagg.enabled=true",)], ids=["sealed", "secagg"])
def test_a_local_deployment_equals_the_simulation(sims, local_runs, extra):
    d = local_runs(*extra)
    run = os.path.join(d, "run")
    assert_deployment_equals(sims(*extra), os.path.join(run, "aggregator"))
    for party in ["aggregator", *CLOUDS]:  # one directory per party, its own keys only
        assert os.path.isfile(os.path.join(run, party, "config.yaml"))
        assert sorted(f for f in os.listdir(os.path.join(run, "keys", party)) if f.endswith(".pem")) == \
            [f"{party}.kex.pem", f"{party}.sign.pem"]
    assert records(run) == records(os.path.join(run, "aggregator"))
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["rounds_completed"] == ROUNDS and summary["deployed"] and summary["channel"]["sealed"]
    for cloud in CLOUDS:  # each cloud trained every round from its own previous state
        trained = [json.loads(ln) for ln in open(os.path.join(run, cloud, "rounds.jsonl")) if '"sent"' in ln]
        assert [(r["round"], r["trained_from"], r["sent"]) for r in trained] == [(i, i - 1, True) for i in range(1, ROUNDS + 1)]


def _opened(audit_dir: str, kind: str) -> list[tuple[str, int, bytes]]:
    """(sender, round, payload) of every `kind` payload the aggregator opened."""
    from fedjax_llm.deploy import protocol as dp

    out = []
    for f in sorted(os.listdir(audit_dir)):
        data = open(os.path.join(audit_dir, f), "rb").read()
        k, fields = dp.peek(data)
        if k == kind:
            out.append((f.split("-", 1)[1][:-4], int(fields["round"]), data))
    return out


def test_with_secure_aggregation_the_aggregator_never_holds_a_clouds_update(local_runs):
    from safetensors.numpy import load

    from fedjax_llm.config import SecAggConfig
    from fedjax_llm.secure import protocol
    from fedjax_llm.secure.round import sum_vector
    from fedjax_llm.secure.secagg import encode

    plain, masked = _opened(os.path.join(local_runs(), "audit"), "update"), \
        _opened(os.path.join(local_runs("secure.secagg.enabled=true"), "audit"), "update")
    assert len(plain) == len(masked) == len(CLOUDS) * ROUNDS
    facts = json.load(open(os.path.join(local_runs("secure.secagg.enabled=true"), "run", "aggregator", "federation.json")))
    params = protocol.params_for(SecAggConfig(enabled=True), len(CLOUDS))
    clear = {}
    for sender, rnd, data in plain:  # the clouds' updates in the clear (the same training in both runs)
        arrays = load(data)
        delta = {k: v for k, v in arrays.items() if k.startswith("aggregate/delta/")}
        assert delta, sorted(arrays)
        windows = [v.tobytes()[i:i + 32] for v in delta.values() for i in (0, v.nbytes // 2) if v.nbytes >= 64]
        assert windows and all(w in data for w in windows)  # the search finds them where they are
        vector, _ = sum_vector({k: v for k, v in sorted(delta.items())}, float(arrays["aggregate/weight"]),
                               facts["scale"], 1.0)
        clear[(sender, rnd)] = (windows, encode(vector, params))
    for sender, rnd, data in masked:
        arrays = load(data)
        assert not any(k.startswith("aggregate/") for k in arrays) and "masked" in arrays
        windows, fixed = clear[(sender, rnd)]
        assert not any(w in data for w in windows), (sender, rnd)
        y = arrays["masked"]
        assert y.shape == fixed.shape and np.mean(y == fixed) < 1e-3, (sender, rnd)
        assert abs(float(np.mean(y / 2.0**32)) - 0.5) < 0.05  # uniform ring elements, not a small update




def test_sigterm_stops_every_party_of_a_local_deployment_and_a_rerun_resumes_it(sims, base, train_env, tmp_path):
    import re
    import signal

    from tests.runtools import newest_round, start_train, stop, wait_for

    run = str(tmp_path / "run")
    args = [*base, "deploy=local", f"hydra.run.dir={run}"]
    launcher = start_train(args, train_env, str(tmp_path / "launcher.log"))
    try:
        assert wait_for(lambda: newest_round(os.path.join(run, "aggregator")) >= 1, launcher, timeout=400), \
            open(tmp_path / "launcher.log").read()[-3000:]
    finally:
        code = stop(launcher, signal.SIGTERM)
    log = open(tmp_path / "launcher.log").read()
    assert code == 143, log[-3000:]
    pids = [int(p) for p in re.findall(r"'(?:aggregator|east|central|west)': (\d+)", log)]
    assert len(pids) == 4
    for pid in pids:  # every party stopped and was reaped
        assert not os.path.exists(f"/proc/{pid}") or "zombie" not in open(f"/proc/{pid}/status").read().lower()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    events = [json.loads(ln)["event"] for ln in open(os.path.join(run, "aggregator", "history.jsonl"))]
    assert events == ["start", "stopped"], events
    out = run_train(args, train_env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_deployment_equals(sims(), os.path.join(run, "aggregator"))
    assert [json.loads(ln)["event"] for ln in open(os.path.join(run, "history.jsonl"))] == \
        ["start", "stopped", "start", "complete"]
