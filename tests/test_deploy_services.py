"""The deployed services end to end on loopback (issue 11, section 3), each against the simulation:

- `fedjax-llm-train deploy=local` (aggregator + 3 cloud processes, sealed over gRPC) ends with the
  simulation's global model bit for bit and the same per-round metrics (training and evaluation; the
  transport's byte counts differ by the deployment's own framing), also with secure aggregation;
- with secure aggregation the aggregator never holds a cloud's update: every update it opened is a
  masked ring vector, unlike the cloud's update in the clear or its fixed-point encoding;
- a cloud killed mid-round (after it shared its secure-aggregation keys) is left out once it falls
  silent, named in the metrics, its mask recovered; restarted, it rejoins from its own checkpoint, and
  the run equals a simulation that drops that cloud's messages in exactly those rounds;
- the aggregator killed mid-round and restarted: the clouds reconnect, the round is redone once, and the
  run equals the uninterrupted simulation (here unsealed, the plain transport).

Every wait is bounded, every process is reaped (runtools.stop), ports are chosen free.
"""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_llm.clouds.message import leaf_paths
from fedjax_llm.deploy.keys import init_keys
from fedjax_llm.deploy.launch import free_port
from tests.runtools import file_has, final_arrays, records, run_train, stop, strip_timing, wait_for

pytestmark = pytest.mark.slow
CLOUDS = ["east", "central", "west"]
ROUNDS = 3
TRANSPORT = {"bytes_down", "bytes_up", "bytes_on_wire", "comm_s"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    return ["task=topics", "debug=tiny", f"data.tokenizer_cache={cache}", f"run.rounds={ROUNDS}", "checkpoint.every=1",
            "deploy.round_timeout_s=120", "deploy.start_timeout_s=120", "deploy.heartbeat_s=0.5",
            "deploy.dead_after_s=5", "deploy.poll_s=1", "deploy.reconnect_s=120"]


@pytest.fixture(scope="module")
def sims(base, train_env, tmp_path_factory):
    """The simulation's run directory per extra overrides (run once each)."""
    done = {}

    def get(*extra):
        if extra not in done:
            d = str(tmp_path_factory.mktemp("sim"))
            out = run_train([*base, *extra, f"hydra.run.dir={d}"], train_env)
            assert out.returncode == 0, out.stderr[-3000:]
            done[extra] = d
        return done[extra]
    return get


def _aggregator_arrays(run_dir: str) -> dict:
    """{path: array} of the global model in a run's newest checkpoint (simulation or aggregator)."""
    _, flat = final_arrays(run_dir)
    out = {}
    for k, v in flat.items():
        path = k.split(".", 1)[1]
        if path.startswith("aggregator."):
            path = path[len("aggregator."):]
        elif path.startswith("clouds."):
            continue
        out[path] = v
    return out


def _without_transport(r: dict) -> dict:
    r = {k: v for k, v in strip_timing(r).items() if k not in TRANSPORT}
    if "clouds" in r:
        r["clouds"] = {n: {k: v for k, v in c.items() if k not in TRANSPORT} for n, c in r["clouds"].items()}
    return r


def assert_deployment_equals(sim_dir: str, agg_dir: str) -> None:
    a, b = _aggregator_arrays(sim_dir), _aggregator_arrays(agg_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    ra, rb = records(sim_dir), records(agg_dir)
    assert [r["round"] for r in rb] == list(range(ROUNDS + 1))
    assert [_without_transport(r) for r in ra] == [_without_transport(r) for r in rb]


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


# ----- parties dying ---------------------------------------------------------------------------------------
class Deployment:
    """The aggregator and the clouds started one by one (fedjax-llm-serve), so a test can kill and restart any."""

    def __init__(self, tmp, args: list[str], env: dict, sealed: bool = True):
        self.dir, self.env, self.port = str(tmp), dict(env), free_port("127.0.0.1")
        self.args = [*args, f"deploy.port={self.port}"]
        if sealed:
            init_keys([*CLOUDS, "aggregator"], os.path.join(self.dir, "keys"))
            self.args.append(f"deploy.keys_dir={os.path.join(self.dir, 'keys')}")
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}

    def log(self, party: str) -> str:
        return os.path.join(self.dir, f"{party}.{self.starts[party]}.log")

    def start(self, party: str, hold: str = "", release: str = "") -> subprocess.Popen:
        role = ["aggregator"] if party == "aggregator" else ["cloud", "--name", party]
        self.starts[party] = self.starts.get(party, 0) + 1
        env = dict(self.env, **({"FEDJAX_LLM_DEPLOY_HOLD": hold, "FEDJAX_LLM_DEPLOY_RELEASE": release} if hold else {}))
        out = open(self.log(party), "w")
        self.procs[party] = subprocess.Popen(
            [sys.executable, "-m", "fedjax_llm.deploy.serve", *role, *self.args,
             f"hydra.run.dir={os.path.join(self.dir, party)}"], env=env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return self.procs[party]

    def wait_all(self, timeout: float = 600) -> None:
        for party, p in self.procs.items():
            try:
                code = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            assert code == 0, f"{party} ended with {code}:\n" + open(self.log(party), errors="replace").read()[-4000:]

    def close(self) -> None:
        for p in self.procs.values():
            stop(p)


@pytest.fixture
def deployment(tmp_path, base, train_env):
    made = []

    def make(*extra, sealed=True):
        d = Deployment(tmp_path, [*base, *extra], train_env, sealed)
        made.append(d)
        return d
    yield make
    for d in made:
        d.close()


def _simulate_with_drops(cfg_args: list[str], drops: dict) -> tuple[dict, list[dict]]:
    """The simulation in this process, with the given (cloud, round) -> 'down' | 'up' messages dropped:
    'down' the cloud never got that round's model, 'up' its update never arrived."""
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.messages import CloudUpdate, GlobalMsg, MaskedUpdate
    from fedjax_llm.server import Federation
    from fedjax_llm.validation import validate
    from tests.conftest import compose_config

    cfg = validate(compose_config(cfg_args))
    fed = Federation(cfg, build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed))
    hop = fed.transport.hop

    def dropping(tree, *, sender, recipient, round, stats, like=None):
        cloud = recipient if sender == "aggregator" else sender
        how = drops.get((cloud, round))
        if (how == "down" and isinstance(tree, GlobalMsg)) or (how == "up" and isinstance(tree, (CloudUpdate, MaskedUpdate))):
            stats[cloud]["error"] = stats[cloud]["error"] or "dropped"
            return None
        return hop(tree, sender=sender, recipient=recipient, round=round, stats=stats, like=like)

    fed.transport.hop = dropping
    state, out = fed.init_state(), []
    for _ in range(ROUNDS):
        state, m = fed.run_round(state)
        out.append(m)
    return {p.replace("/", "."): np.asarray(v) for p, v in leaf_paths(jax.device_get(state.aggregator))}, out


@pytest.mark.parametrize("extra", [("secure.secagg.enabled=true",), ("algorithm=scaffold",)], ids=["secagg", "scaffold"])
def test_a_cloud_killed_mid_round_is_left_out_then_rejoins_from_its_checkpoint(deployment, base, extra):
    d = deployment(*extra)
    release = os.path.join(d.dir, "release")
    d.start("aggregator", hold="publish:3", release=release)  # round 3 waits for the test, not for west
    for c in CLOUDS:
        d.start(c, hold="upload:2" if c == "west" else "")
    assert wait_for(lambda: file_has(d.log("west"), "holding at upload of round 2"), d.procs["west"], timeout=300), \
        open(d.log("west")).read()[-3000:]
    stop(d.procs["west"], signal.SIGKILL)     # trained and checkpointed round 2, its update never sent
    assert wait_for(lambda: file_has(d.log("aggregator"), "holding at publish of round 3"), d.procs["aggregator"],
                    timeout=120), open(d.log("aggregator")).read()[-3000:]   # round 2 ended without west
    d.start("west")
    assert wait_for(lambda: open(d.log("aggregator")).read().count("cloud 'west' connected") == 2,
                    d.procs["aggregator"], timeout=300)
    open(release, "w").close()
    d.wait_all()
    agg = os.path.join(d.dir, "aggregator")
    rec = records(agg)
    west2 = rec[2]["clouds"]["west"]
    assert not west2["accepted"] and west2["error"].startswith("west: lost: nothing heard for") and \
        "deploy.dead_after_s=5" in west2["error"], west2
    assert rec[2]["clients"] == 6 and all(rec[r]["clouds"]["west"]["accepted"] for r in (1,))
    trained = [json.loads(ln) for ln in open(os.path.join(d.dir, "west", "rounds.jsonl")) if '"sent"' in ln]
    assert [(r["round"], r["trained_from"]) for r in trained] == [(1, 0), (3, 2)], trained  # from its checkpoint
    assert rec[3]["clouds"]["west"]["accepted"] and rec[3]["clients"] == 9
    drops = {("west", 2): "up"}
    want, sim = _simulate_with_drops([*base, *extra], drops)
    got = {k.split(".", 1)[1]: v for k, v in final_arrays(agg)[1].items()}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k
    for r, m in zip(rec[1:], sim):
        assert (r["train_loss"], r["update_norm"], r["clients"]) == (m["train_loss"], m["update_norm"], m["clients"])
        assert {n: c["accepted"] for n, c in r["clouds"].items()} == {n: c["accepted"] for n, c in m["clouds"].items()}


def test_the_aggregator_killed_mid_round_restarts_and_no_round_is_lost_or_applied_twice(deployment, sims):
    d = deployment("secure.seal=false", sealed=False)
    d.start("aggregator", hold="aggregate:2")
    for c in CLOUDS:
        d.start(c)
    assert wait_for(lambda: file_has(d.log("aggregator"), "holding at aggregate of round 2"), d.procs["aggregator"],
                    timeout=300), open(d.log("aggregator")).read()[-3000:]
    stop(d.procs["aggregator"], signal.SIGKILL)   # every update of round 2 received, none applied
    d.start("aggregator")
    d.wait_all()
    agg = os.path.join(d.dir, "aggregator")
    history = [json.loads(ln) for ln in open(os.path.join(agg, "history.jsonl"))]
    assert [h["event"] for h in history] == ["start", "start", "complete"] and history[1]["action"] == "resume"
    for c in CLOUDS:
        assert file_has(d.log(c), "registering again")
        trained = [json.loads(ln)["round"] for ln in open(os.path.join(d.dir, c, "rounds.jsonl")) if '"sent"' in ln]
        assert trained.count(2) == 2 and trained.count(3) == 1, trained  # round 2 recomputed once, after the restart
    assert_deployment_equals(sims("secure.seal=false"), agg)
