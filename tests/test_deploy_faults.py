"""Deployed parties dying mid-round (issue 11, section 3), each against the simulation:

- a cloud killed mid-round (after it shared its secure-aggregation keys) is left out once it falls
  silent, named in the metrics, its mask recovered; restarted, it rejoins from its own checkpoint, and
  the run equals a simulation that drops that cloud's update in exactly that round (with SCAFFOLD too:
  its clients' c_i continue from the checkpoint);
- the aggregator killed mid-round and restarted: the clouds reconnect, the round is redone once, and the
  run equals the uninterrupted simulation (here unsealed, the plain transport).

Every wait is bounded, every process is reaped (runtools.stop), ports are chosen free.
"""
import json
import os
import signal

import jax
import numpy as np
import pytest

from fedjax_llm.clouds.message import leaf_paths
from tests.deploytools import (CLOUDS, ROUNDS, assert_deployment_equals, base, deployment, sims)  # noqa: F401
from tests.runtools import file_has, final_arrays, records, stop, wait_for

pytestmark = pytest.mark.slow


# ----- parties dying ---------------------------------------------------------------------------------------
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
