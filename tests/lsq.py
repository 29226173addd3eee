"""A least-squares federated problem run through the engine's own pieces, for algorithm tests.

Clients hold (x, y) rows; the loss is the masked mean of 0.5 (x.w - y)^2, so gradients have a closed
form and a plain NumPy implementation of each paper can be compared step for step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedjax_llm.algorithms import build_algorithm, server_update
from fedjax_llm.client import client_optimizer, init_client_state, make_local_update
from fedjax_llm.config import AlgorithmConfig, AttackConfig, ClientConfig
from fedjax_llm.round import AXIS, RoundInputs, make_loop_compute, make_round_compute, plan_layout
from fedjax_llm.types import ClientBatches, ClientHParams


@dataclasses.dataclass
class Problem:
    x: list[np.ndarray]        # per client [n_k, d]
    y: list[np.ndarray]        # per client [n_k]
    cloud: np.ndarray          # [K] cloud of each client
    steps: np.ndarray          # [K] local steps each client makes (stragglers make fewer)
    max_steps: int
    lr: float

    @property
    def K(self) -> int:
        return len(self.x)

    @property
    def weights(self) -> np.ndarray:
        return np.array([len(v) for v in self.y], np.float64)

    def grad(self, k: int, w: np.ndarray) -> np.ndarray:
        """Closed-form gradient of client k's mean loss."""
        x, y = self.x[k], self.y[k]
        return x.T @ (x @ w - y) / len(y)

    def optimum(self) -> np.ndarray:
        """Minimiser of the example-weighted global objective sum_k n_k f_k."""
        X, Y = np.concatenate(self.x), np.concatenate(self.y)
        return np.linalg.lstsq(X, Y, rcond=None)[0]


def make_problem(seed=0, d=4, sizes=(6, 4, 8, 5), clouds=(0, 0, 1, 1), steps=(3, 3, 3, 2), lr=0.05,
                 heterogeneity=1.0) -> Problem:
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k, n in enumerate(sizes):
        scale = 1.0 + heterogeneity * k  # different curvature per client: FedAvg drifts
        x = rng.normal(size=(n, d)) * scale
        w_k = rng.normal(size=d) * (1 + heterogeneity)
        xs.append(x)
        ys.append(x @ w_k + 0.1 * rng.normal(size=n))
    return Problem(xs, ys, np.array(clouds), np.array(steps), max(steps), lr)


def lsq_loss(trainable, frozen, inputs, key):
    del frozen, key
    r = inputs["x"] @ trainable["w"] - inputs["y"]
    m = inputs["m"]
    loss_sum = jnp.sum(0.5 * r * r * m)
    n = jnp.sum(m)
    return loss_sum / jnp.maximum(n, 1.0), (loss_sum, n)


def _batches(p: Problem) -> ClientBatches:
    """Every step is the client's full batch; rows padded to the largest client and masked."""
    B, d, S = max(len(v) for v in p.y), p.x[0].shape[1], p.max_steps
    x = np.zeros((p.K, S, B, d), np.float32)
    y = np.zeros((p.K, S, B), np.float32)
    m = np.zeros((p.K, S, B), np.float32)
    for k in range(p.K):
        n = len(p.y[k])
        x[k, :, :n], y[k, :, :n], m[k, :, :n] = p.x[k], p.y[k], 1.0
    step_mask = np.arange(S)[None, :] < p.steps[:, None]
    return ClientBatches(inputs={"x": x, "y": y, "m": m}, step_mask=step_mask)


def run_engine(p: Problem, algo_cfg: AlgorithmConfig, rounds: int, chunk: int = 1, backend: str = "vmap",
               attack: AttackConfig = AttackConfig(), attacked=None):
    """Runs `rounds` rounds through the engine's round compute and server update; returns per-round
    (params, server opt state, aggregator state, client states) as NumPy."""
    algo = build_algorithm(algo_cfg, attack, population=p.K)
    opt = client_optimizer(ClientConfig(optimizer="sgd", lr=p.lr, grad_clip=0.0))
    local_update = make_local_update(lsq_loss, opt, algo.pieces)
    C = int(p.cloud.max()) + 1
    if backend == "loop":
        compute = make_loop_compute(local_update, algo.reducer, algo.transform, C, lambda i: f"client {i}")
    else:
        mesh = Mesh(np.array(jax.devices()[:1]), (AXIS,))
        layout = plan_layout(p.K, 1, chunk)
        compute = make_round_compute(local_update, algo.reducer, algo.transform, C, mesh, layout)
    server = jax.jit(lambda *a: server_update(algo, *a))
    params = {"w": jnp.zeros(p.x[0].shape[1], jnp.float32)}
    opt_state, agg_state = algo.server_opt.init(params), algo.aggregator.init(params)
    one = init_client_state(algo.pieces, params)
    client_states = jax.tree.map(lambda a: jnp.zeros((p.K,) + a.shape, a.dtype), one)
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), p.K)))
    attacked = np.zeros(p.K, bool) if attacked is None else np.asarray(attacked)
    history = []
    for _ in range(rounds):
        inputs = RoundInputs(batches=_batches(p), keys=keys, weights=p.weights.astype(np.float32),
                             onehot=np.eye(C, dtype=np.float32)[p.cloud], attacked=attacked,
                             state=client_states)
        broadcast = algo.aggregator.broadcast(agg_state)
        result = compute(params, {}, broadcast, inputs, ClientHParams(lr=jnp.float32(p.lr)))
        params, opt_state, agg_state, _, ok = server(params, opt_state, agg_state, result.clouds)
        assert bool(ok)
        client_states = result.state
        history.append(jax.tree.map(np.asarray, (params, opt_state, agg_state, client_states)))
    return history
