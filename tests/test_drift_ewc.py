"""The EWC / FedCurv remedy against a NumPy reference of the paper's procedure: clients' squared task
gradients, the federated Fisher consolidated at phase ends, the anchor taken at the next phase's start,
the penalty in every local step; through the engine's vmapped round and its loop backend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from fedjax_llm.algorithms import build_algorithm, server_update
from fedjax_llm.client import client_optimizer, make_local_update
from fedjax_llm.config import AlgorithmConfig, AttackConfig, ClientConfig
from fedjax_llm.drift.ewc import ewc_penalty
from fedjax_llm.round import AXIS, RoundInputs, make_loop_compute, make_round_compute, plan_layout
from fedjax_llm.types import ClientHParams
from tests.lsq import _batches, lsq_loss, make_problem

LAM, ENDS, ROUNDS = 0.7, (2, 4), 6


def test_penalty_matches_numpy():
    rng = np.random.default_rng(0)
    p = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    a = {k: rng.normal(size=v.shape) for k, v in p.items()}
    f = {k: rng.random(v.shape) for k, v in p.items()}
    want = 0.5 * LAM * sum(np.sum(f[k] * (p[k] - a[k]) ** 2) for k in p)
    got = ewc_penalty(jax.tree.map(jnp.asarray, p), jax.tree.map(jnp.asarray, a), jax.tree.map(jnp.asarray, f), LAM)
    assert float(got) == pytest.approx(want, rel=1e-5)


def numpy_reference(p):
    """FedAvg (server lr 1) + online EWC with a federated Fisher, round by round: the global w and F."""
    d = p.x[0].shape[1]
    w, F, anchor, running, seen, fresh, rounds = np.zeros(d), np.zeros(d), np.zeros(d), np.zeros(d), 0, False, 0
    out = []
    C = int(p.cloud.max()) + 1
    for _ in range(ROUNDS):
        Fn = F / F.max() if F.max() > 0 else np.zeros(d)
        anchor_eff = w if fresh else anchor
        deltas, aux = [], []
        for k in range(p.K):
            wk, sq = w.copy(), np.zeros(d)
            for _ in range(p.steps[k]):
                g = p.grad(k, wk)
                sq += g * g
                wk = wk - p.lr * (g + LAM * Fn * (wk - anchor_eff))
            deltas.append(wk - w)
            aux.append(sq / p.steps[k])
        cloud_delta, cloud_w, cloud_aux, cloud_n = [], [], [], []
        for c in range(C):
            ks = np.flatnonzero(p.cloud == c)
            cloud_w.append(p.weights[ks].sum())
            cloud_delta.append(sum(p.weights[k] * deltas[k] for k in ks) / cloud_w[-1])
            cloud_aux.append(np.mean([aux[k] for k in ks], axis=0))
            cloud_n.append(len(ks))
        update = sum(wc * dc for wc, dc in zip(cloud_w, cloud_delta)) / sum(cloud_w)
        estimate = sum(n * a for n, a in zip(cloud_n, cloud_aux)) / sum(cloud_n)
        if fresh:
            anchor = w.copy()
        running, seen, rounds = running + estimate, seen + 1, rounds + 1
        fresh = rounds in ENDS
        if fresh:
            F, running, seen = F + running / seen, np.zeros(d), 0
        w = w + update
        out.append((w.copy(), F.copy(), anchor.copy()))
    return out


def run_engine(p, backend):
    algo = build_algorithm(AlgorithmConfig(), AttackConfig(), population=p.K, ewc=(LAM, ENDS))
    local_update = make_local_update(lsq_loss, client_optimizer(ClientConfig(optimizer="sgd", lr=p.lr, grad_clip=0.0)),
                                     algo.pieces)
    C = int(p.cloud.max()) + 1
    if backend == "loop":
        compute = make_loop_compute(local_update, algo.reducer, algo.transform, C, lambda i: f"client {i}")
    else:
        layout = plan_layout(p.K, 1, 2)
        compute = make_round_compute(local_update, algo.reducer, algo.transform, C,
                                     Mesh(np.array(jax.devices()[:1]), (AXIS,)), layout)
    server = jax.jit(lambda *a: server_update(algo, *a))
    params = {"w": jnp.zeros(p.x[0].shape[1], jnp.float32)}
    opt_state, agg_state = algo.server_opt.init(params), algo.aggregator.init(params)
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), p.K)))
    out = []
    for _ in range(ROUNDS):
        inputs = RoundInputs(batches=_batches(p), keys=keys, weights=p.weights.astype(np.float32),
                             onehot=np.eye(C, dtype=np.float32)[p.cloud], attacked=np.zeros(p.K, bool), state={})
        result = compute(params, {}, algo.aggregator.broadcast(agg_state), inputs, ClientHParams(lr=jnp.float32(p.lr)))
        params, opt_state, agg_state, _, ok = server(params, opt_state, agg_state, result.clouds)
        assert bool(ok)
        out.append((np.asarray(params["w"]), np.asarray(agg_state["fisher"]["w"]), np.asarray(agg_state["anchor"]["w"])))
    return out


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_ewc_fedavg_matches_numpy_round_by_round(backend):
    p = make_problem(seed=3, steps=(3, 3, 3, 2))  # a straggler: its masked step adds no squared gradient
    want, got = numpy_reference(p), run_engine(p, backend)
    for r, ((w, F, a), (gw, gF, ga)) in enumerate(zip(want, got), start=1):
        np.testing.assert_allclose(gF, F, rtol=2e-5, atol=1e-6, err_msg=f"Fisher after round {r}")
        np.testing.assert_allclose(ga, a, rtol=2e-5, atol=1e-6, err_msg=f"anchor after round {r}")
        np.testing.assert_allclose(gw, w, rtol=2e-5, atol=1e-6, err_msg=f"params after round {r}")
    assert np.all(want[0][1] == 0) and np.all(want[1][1] > 0)  # consolidated only at the first phase end
    assert not np.allclose(want[-1][0], numpy_reference_without_penalty(p))  # the penalty changed the path


def numpy_reference_without_penalty(p):
    global LAM
    keep, LAM = LAM, 0.0
    try:
        return numpy_reference(p)[-1][0]
    finally:
        LAM = keep
