"""Each algorithm, round by round, against a NumPy implementation written from its paper.

The problem is least squares (tests/lsq.py) with 4 clients in 2 clouds, one straggler, full-batch
local SGD; the engine runs it through its own round compute, reducers, aggregators and optax server
optimizers. FedAdam / FedYogi / FedAdagrad follow Reddi et al. (2021) Algorithm 2 with optax's
documented variants: bias-corrected moments (Adam, Yogi; Yogi's accumulators start at 1e-6) and
Adagrad's eps inside the square root.
"""
import jax
import numpy as np
import pytest

from fedjax_llm.config import AlgorithmConfig
from tests.lsq import make_problem, run_engine

ROUNDS = 3


def _local(p, k, w, grad):
    """Client k's local SGD from w with gradient function grad(y); returns the final iterate."""
    y = w.copy()
    for _ in range(p.steps[k]):
        y = y - p.lr * grad(y)
    return y


def _mean(p, values):
    wts = p.weights
    return sum(wk * v for wk, v in zip(wts, values)) / wts.sum()


def fedavg_reference(p, server_step, mu=0.0):
    """FedAvg / FedProx clients, then server_step(w, mean_delta, state) -> (w, state)."""
    w, state, out = np.zeros(p.x[0].shape[1]), None, []
    for _ in range(ROUNDS):
        deltas = [_local(p, k, w, lambda y, k=k: p.grad(k, y) + mu * (y - w)) - w for k in range(p.K)]
        w, state = server_step(w, _mean(p, deltas), state)
        out.append((w.copy(), state))
    return out


def sgd_step(lr):
    return lambda w, d, s: (w + lr * d, s)


def momentum_step(lr, beta):
    def step(w, d, v):
        g = -d
        v = g if v is None else g + beta * v
        return w - lr * v, v
    return step


def adam_step(lr, b1, b2, eps):
    def step(w, d, s):
        m, v, t = s if s is not None else (0.0, 0.0, 0)
        g, t = -d, t + 1
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
        return w - lr * mh / (np.sqrt(vh) + eps), (m, v, t)
    return step


def yogi_step(lr, b1, b2, eps):
    def step(w, d, s):
        m, v, t = s if s is not None else (1e-6, 1e-6, 0)
        g, t = -d, t + 1
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * np.sign(v - g * g) * g * g
        mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
        return w - lr * mh / (np.sqrt(vh) + eps), (m, v, t)
    return step


def adagrad_step(lr, eps):
    def step(w, d, s):
        g = -d
        s = (0.0 if s is None else s) + g * g
        return w - lr * np.where(s > 0, g / np.sqrt(s + eps), 0.0), s
    return step


def scaffold_reference(p):
    """Karimireddy et al. (2020) Algorithm 1, option II, all clients sampled (|S| = N)."""
    d = p.x[0].shape[1]
    w, c, ck, out = np.zeros(d), np.zeros(d), [np.zeros(d) for _ in range(p.K)], []
    for _ in range(ROUNDS):
        deltas, dcs, new_ck = [], [], []
        for k in range(p.K):
            y = _local(p, k, w, lambda y, k=k: p.grad(k, y) - ck[k] + c)
            c_plus = ck[k] - c + (w - y) / (p.steps[k] * p.lr)
            deltas.append(y - w)
            dcs.append(c_plus - ck[k])
            new_ck.append(c_plus)
        w = w + _mean(p, deltas)
        c = c + np.mean(dcs, axis=0)
        ck = new_ck
        out.append((w.copy(), c.copy(), np.stack(ck)))
    return out


def fednova_reference(p):
    """Wang et al. (2020): normalised updates d_k = delta_k / tau_k, scaled by tau_eff."""
    w, out = np.zeros(p.x[0].shape[1]), []
    pk = p.weights / p.weights.sum()
    for _ in range(ROUNDS):
        normed = [(_local(p, k, w, lambda y, k=k: p.grad(k, y)) - w) / p.steps[k] for k in range(p.K)]
        tau_eff = float(np.dot(pk, p.steps))
        w = w + tau_eff * sum(pk[k] * normed[k] for k in range(p.K))
        out.append((w.copy(),))
    return out


def _close(got, want, tol=2e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def problem():
    return make_problem()


CASES = {
    "fedavg": (AlgorithmConfig(), lambda p: fedavg_reference(p, sgd_step(1.0))),
    "fedavg_server_lr": (AlgorithmConfig(server_lr=0.7), lambda p: fedavg_reference(p, sgd_step(0.7))),
    "fedprox": (AlgorithmConfig(prox_mu=0.3), lambda p: fedavg_reference(p, sgd_step(1.0), mu=0.3)),
    "fedavgm": (AlgorithmConfig(server_optimizer="momentum", server_momentum=0.7),
                lambda p: fedavg_reference(p, momentum_step(1.0, 0.7))),
    "fedadam": (AlgorithmConfig(server_optimizer="adam", server_lr=0.1, server_b1=0.9, server_b2=0.99,
                                server_eps=1e-3),
                lambda p: fedavg_reference(p, adam_step(0.1, 0.9, 0.99, 1e-3))),
    "fedyogi": (AlgorithmConfig(server_optimizer="yogi", server_lr=0.1, server_b1=0.9, server_b2=0.99,
                                server_eps=1e-3),
                lambda p: fedavg_reference(p, yogi_step(0.1, 0.9, 0.99, 1e-3))),
    "fedadagrad": (AlgorithmConfig(server_optimizer="adagrad", server_lr=0.1, server_eps=1e-3),
                   lambda p: fedavg_reference(p, adagrad_step(0.1, 1e-3))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fedavg_family_matches_numpy_round_by_round(problem, name):
    algo_cfg, reference = CASES[name]
    got = run_engine(problem, algo_cfg, ROUNDS)
    want = reference(problem)
    for r in range(ROUNDS):
        params, opt_state, _, _ = got[r]
        w_ref, state_ref = want[r]
        _close(params["w"], w_ref)
        if name in ("fedadam", "fedyogi"):  # server optimizer state, not just the params
            m, v, t = state_ref
            adam = opt_state[0]
            _close(adam.mu["w"], m)
            _close(adam.nu["w"], v)
            assert int(adam.count) == t == r + 1
        if name == "fedavgm":
            _close(opt_state[0].trace["w"], state_ref)
        if name == "fedadagrad":
            _close(opt_state[0].sum_of_squares["w"], state_ref)


@pytest.mark.parametrize("chunk, backend", [(1, "vmap"), (2, "vmap"), (4, "vmap"), (1, "loop")])
def test_scaffold_matches_numpy_including_control_variates(problem, chunk, backend):
    got = run_engine(problem, AlgorithmConfig(scaffold=True), ROUNDS, chunk=chunk, backend=backend)
    want = scaffold_reference(problem)
    for r in range(ROUNDS):
        params, _, agg_state, client_states = got[r]
        w_ref, c_ref, ck_ref = want[r]
        _close(params["w"], w_ref)
        _close(agg_state.c["w"], c_ref)
        _close(client_states["scaffold"]["w"], ck_ref)


def test_fednova_matches_numpy_with_a_straggler(problem):
    assert len(set(problem.steps)) > 1  # unequal local steps is the point
    got = run_engine(problem, AlgorithmConfig(fednova=True), ROUNDS)
    want = fednova_reference(problem)
    for r in range(ROUNDS):
        _close(got[r][0]["w"], want[r][0])


def test_fednova_differs_from_fedavg_only_when_steps_differ():
    even = make_problem(steps=(3, 3, 3, 3))
    a = run_engine(even, AlgorithmConfig(), 2)[-1][0]["w"]
    b = run_engine(even, AlgorithmConfig(fednova=True), 2)[-1][0]["w"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scaffold_reaches_the_optimum_where_fedavg_drifts():
    """Non-IID least squares with many local steps: FedAvg's fixed point is off the global optimum
    (client drift); SCAFFOLD's corrections remove the drift."""
    p = make_problem(seed=3, d=3, sizes=(20, 20, 20, 20), steps=(25, 25, 25, 25), lr=0.01, heterogeneity=1.5)
    w_star = p.optimum()
    rounds = 150
    fedavg = run_engine(p, AlgorithmConfig(), rounds)
    scaffold = run_engine(p, AlgorithmConfig(scaffold=True), rounds)
    err = lambda h: float(np.linalg.norm(h[-1][0]["w"] - w_star) / np.linalg.norm(w_star))
    # FedAvg has converged (it no longer moves) but to the wrong point.
    assert np.linalg.norm(fedavg[-1][0]["w"] - fedavg[-2][0]["w"]) < 1e-4
    assert err(fedavg) > 0.05
    assert err(scaffold) < 1e-3


def test_scaffold_with_lora_keeps_no_base_sized_state(tmp_path):
    """Under LoRA the per-client control variates have the adapters' shapes, not the base model's."""
    from fedjax_llm.algorithms import build_algorithm
    from fedjax_llm.client import init_client_state
    from fedjax_llm.config import AttackConfig
    from fedjax_llm.models.params import count_params, init_model
    from fedjax_llm.models.spec import LoRASpec, llama_spec

    spec = llama_spec("w-tiny", 512, lora=LoRASpec(rank=4, targets=("q_proj", "v_proj")))
    _, trainable, frozen = init_model(spec, jax.random.key(0))
    algo = build_algorithm(AlgorithmConfig(scaffold=True), AttackConfig(), population=8)
    state = init_client_state(algo.pieces, trainable)
    assert count_params(state) == count_params(trainable) < count_params(frozen) / 50
