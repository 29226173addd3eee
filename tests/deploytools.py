"""Shared pieces of the deployed-services tests: the tiny deployed config, the simulation's reference runs,
the comparison of a deployment with the simulation, and parties started one by one."""
import os
import subprocess
import sys

import pytest

from fedjax_llm.deploy.keys import init_keys
from fedjax_llm.deploy.launch import free_port
from tests.runtools import final_arrays, records, run_train, stop, strip_timing

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


