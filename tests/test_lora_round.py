"""LoRA schemes in the round engine against NumPy: per-client ranks, FedEx-LoRA, FlexLoRA, FFA, naive.

Each test trains one real round (two levels: clients -> clouds -> aggregator), collects every
client's update, rebuilds the clients' final (rank-truncated) factors from it, and checks the new
global model against a float64 NumPy reference computed from those factors alone.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm import participation
from fedjax_llm.aggregate import lora_round
from fedjax_llm.cloud import round_inputs
from fedjax_llm.client import client_optimizer, make_local_update, make_task_loss
from fedjax_llm.config import ConfigError
from fedjax_llm.validation import validate
from fedjax_llm.data.federated import build_federated_data
from fedjax_llm.models.build import split_leaves
from fedjax_llm.round import make_round_compute
from fedjax_llm.server import Federation
from tests.conftest import compose_config

RANKS = [2, 4, 8]  # clients cycle through these; the padded width (model.lora.rank) is 8
TOL = dict(rtol=2e-4, atol=2e-6)


def _cfg(tmp, scheme, ranks=RANKS, extra=()):
    over = ["task=dialog", "debug=tiny", "model=nano_lora", f"data.tokenizer_cache={tmp}",
            "data.max_eval_examples=8", "client.local_steps=2", "client.lr=3e-2",
            f"model.lora.aggregation={scheme}"]
    if ranks:
        over.append(f"model.lora.client_ranks=[{','.join(map(str, ranks))}]")
    return validate(compose_config(over + list(extra)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    cfg = _cfg(tmp, "naive")
    return tmp, build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)


def _collecting(fed):
    """Swaps in, for every cloud, the same compiled compute that also returns every client's update,
    and records each cloud's inputs and result."""
    cfg = fed.cfg
    local = make_local_update(make_task_loss(cfg.data.task, fed.fns.apply), client_optimizer(cfg.client),
                              fed.algo.pieces)
    seen = []
    clouds = []
    for cloud in fed.clouds:
        compute = make_round_compute(local, fed.algo.reducer, fed.algo.transform, 1, fed.mesh,
                                     cloud.engine.layout, collect=True)

        def wrapped(*args, compute=compute):
            result = compute(*args)
            seen.append((args[3], result))
            return result

        clouds.append(dataclasses.replace(cloud, engine=dataclasses.replace(cloud.engine, run=wrapped)))
    fed.clouds = clouds
    return seen


def _np(x):
    return np.asarray(x, np.float64)


def _modules(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            if "lora_b" in v:
                out[prefix + (k,)] = v
            else:
                out.update(_modules(v, prefix + (k,)))
    return out


def _round(fed, state):
    seen = _collecting(fed)
    new, _ = fed.run_round(state)
    deltas, weights, ranks = [], [], []
    for inputs, result in seen:  # cloud by cloud; the real slots have their cloud's one-hot set
        real = np.asarray(inputs.onehot)[:, 0] > 0
        d, w = jax.device_get(result.deltas)
        deltas.append(jax.tree.map(lambda a: np.asarray(a)[real], d))
        weights.append(np.asarray(w, np.float64)[real])
        ranks.append(np.asarray(inputs.state["lora"])[real])
    deltas = jax.tree.map(lambda *a: np.concatenate(a), *deltas)
    w, ranks = np.concatenate(weights), np.concatenate(ranks)
    return new, deltas, w / w.sum(), ranks, len(w)


def _client_factors(scheme, g, d, k, rank):
    """Client k's final factors (float64) from the global module g and its delta d."""
    r = np.arange(g["lora_b"].shape[0]) < rank
    b = _np(g["lora_b"]) + _np(d["lora_b"][k])
    a = _np(g["lora_a"]) + _np(d["lora_a"][k]) if "lora_a" in d else None
    if scheme in ("naive", "fedex"):  # deltas of unheld components are zero: the client's model has none
        a, b = a * r[None, :], b * r[:, None]
    return a, b


@pytest.mark.parametrize("scheme", ["fedex", "flex", "ffa", "naive"])
def test_one_round_with_mixed_ranks_matches_numpy(data, scheme):
    tmp, fdata = data
    cfg = _cfg(tmp, scheme)
    fed = Federation(cfg, fdata)
    state = fed.init_state()
    assert np.array_equal(np.asarray(state.client_states["lora"]),
                          [RANKS[i % 3] for i in range(fdata.num_clients)])
    new, deltas, p, ranks, K = _round(fed, state)
    assert set(ranks) == set(RANKS)
    scale = cfg.model.lora.alpha / cfg.model.lora.rank
    frozen0, frozen1 = fed.frozen_of(state), fed.frozen_of(new)
    checked = 0
    for path, g in _modules(state.params).items():
        d, g1 = deltas, new.params
        for key in path:
            d, g1 = d[key], g1[key]
        base_a = frozen0
        for key in path:
            base_a = base_a[key]
        factors = []
        for k in range(K):
            a, b = _client_factors(scheme, g, d, k, ranks[k])
            a = _np(base_a["lora_a"]) if a is None else a  # FFA: the frozen A
            # every client trained only its first r_k components
            assert not np.any(a[:, ranks[k]:]) or scheme == "ffa"
            assert not np.any(b[ranks[k]:])
            factors.append((a, b))
        target = sum(p[k] * scale * a @ b for k, (a, b) in enumerate(factors) if p[k] > 0)
        if scheme == "fedex":
            # every client started from the global model (its missing components in its base), so the
            # new model is the global one plus the mean change of the clients' models
            start = lambda k: scale * (_np(g["lora_a"]) * (np.arange(8) < ranks[k])) @ _np(g["lora_b"])  # noqa: E731
            target = scale * _np(g["lora_a"]) @ _np(g["lora_b"]) + sum(
                p[k] * (scale * a @ b - start(k)) for k, (a, b) in enumerate(factors) if p[k] > 0)
            kern = lambda f: _np(_get(f, path)["kernel"])  # noqa: E731
            moved = kern(frozen1) - kern(frozen0) + scale * _np(g1["lora_a"]) @ _np(g1["lora_b"])
            np.testing.assert_allclose(moved, target, **TOL)  # exact: adapters + residual = product mean
            # the client's own product leaf agrees with its factors (it trained the truncated model)
            for k, (a, b) in enumerate(factors):
                np.testing.assert_allclose(_np(d[lora_round.PRODUCT][k]) + start(k), scale * a @ b, **TOL)
        elif scheme == "flex":
            u, s, vt = np.linalg.svd(target)
            best = (u[:, :8] * s[:8]) @ vt[:8]
            np.testing.assert_allclose(scale * _np(g1["lora_a"]) @ _np(g1["lora_b"]), best, **TOL)
            sv = np.linalg.svd(scale * _np(g1["lora_a"]) @ _np(g1["lora_b"]), compute_uv=False)
            assert np.all(np.diff(np.linalg.norm(_np(g1["lora_a"]), axis=0)) <= 1e-6)  # ordered components
            assert sv[0] > 0
        elif scheme == "ffa":
            assert "lora_a" not in g1  # A lives in the frozen base
            np.testing.assert_allclose(scale * _np(base_a["lora_a"]) @ _np(g1["lora_b"]), target, **TOL)
        else:  # naive: each component is the weighted mean of its holders' factors
            for j in range(8):
                held = np.array([p[k] * (ranks[k] > j) for k in range(K)])
                want_a = sum(held[k] * factors[k][0][:, j] for k in range(K)) / held.sum()
                np.testing.assert_allclose(_np(g1["lora_a"])[:, j], want_a, **TOL)
            approx = scale * _np(g1["lora_a"]) @ _np(g1["lora_b"])
            assert np.linalg.norm(approx - target) > 1e-3 * np.linalg.norm(target)  # inexact, as documented
        checked += 1
    assert checked >= 2


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_fedex_clients_start_from_the_global_model(data):
    """After a FedEx round every client, whatever its rank, trains from exactly the global model: the
    summed residual and the components past its rank are in its base. With lr 0 a rank-2 client's loss
    is the global model's loss, which differs from the loss on the original base."""
    tmp, fdata = data
    fed = Federation(_cfg(tmp, "fedex"), fdata)
    state, _ = fed.run_round(fed.init_state())
    residual = state.agg_state["residual"]
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(residual)) > 0
    cfg = fed.cfg
    local = jax.jit(make_local_update(make_task_loss(cfg.data.task, fed.fns.apply), client_optimizer(cfg.client),
                                      fed.algo.pieces))
    cloud = fed.clouds[0]
    cohort = participation.sample_cloud(cfg.participation, len(cloud.members), cloud.capacity,
                                        cfg.client.local_steps, jax.random.key(3), 1, cloud.name)
    inputs, _ = round_inputs(cloud, state.clouds[cloud.name], cohort, jax.random.key(4))
    slot = int(np.flatnonzero(np.asarray(inputs.state["lora"])[:len(cohort.ids)] == 2)[0])
    one = jax.tree.map(lambda x: x[slot], inputs)
    bc = fed.algo.aggregator.broadcast(state.agg_state)
    out, _ = local(state.params, fed.frozen, one.batches, jax.random.key(0), fed.hparams.replace(lr=jnp.float32(0)),
                   one.weights, one.state, bc)
    loss = make_task_loss(cfg.data.task, fed.fns.apply)
    step_loss = lambda params, frozen, s: float(loss(params, frozen, jax.tree.map(  # noqa: E731
        lambda x: x[s], one.batches.inputs), None)[1][0])
    assert abs(step_loss(state.params, fed.frozen_of(state), 0) - step_loss(state.params, fed.frozen, 0)) > 1e-4
    steps = int(np.asarray(one.batches.step_mask).sum())
    per_step = [step_loss(state.params, fed.frozen_of(state), s) for s in range(steps)]
    np.testing.assert_allclose(float(out.loss_sum), sum(per_step), rtol=1e-5)


@pytest.mark.parametrize("override,key", [
    (["model.lora.aggregation=fedex", "algorithm.server_optimizer=adam"], "algorithm.server_optimizer"),
    (["model.lora.aggregation=flex", "algorithm.client_rule=median"], "algorithm.client_rule"),
    (["model.lora.aggregation=flex", "secure.dp.enabled=true"], "secure.dp.enabled"),
    (["model.lora.aggregation=fedex", "algorithm=scaffold"], "algorithm.scaffold"),
    (["model.lora.client_ranks=[2,16]"], "model.lora.client_ranks[1]"),
    (["model.lora.aggregation=bogus"], "model.lora.aggregation"),
])
def test_bad_lora_scheme_configs_fail_at_start_up_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["task=dialog", "debug=tiny", "model=nano_lora", *override]))
    assert str(info.value).startswith(key), str(info.value)


def test_client_ranks_need_lora(tmp_path):
    with pytest.raises(ConfigError, match="model.lora.client_ranks"):
        validate(compose_config(["task=dialog", "debug=tiny", "model.lora.client_ranks=[2]"]))


def test_refactor_revives_dead_components():
    """A rank-deficient product keeps trainable directions: A gets unit-scaled U columns, B zeros."""
    rng = np.random.default_rng(0)
    target = rng.normal(size=(12, 2)) @ rng.normal(size=(2, 10))  # rank 2 < r_max 4
    a, b = lora_round.refactor(jnp.asarray(target, jnp.float32), 4, 2.0, lora_round.DEAD_NORM)
    np.testing.assert_allclose(2.0 * _np(a) @ _np(b), target, rtol=1e-4, atol=1e-5)
    assert np.all(np.linalg.norm(_np(a), axis=0) > 0.5) and not np.any(_np(b)[2:])
    assert not split_leaves({"x": {"lora_ab": 1}}, "lora_ab")[0]


@pytest.mark.slow
def test_fedex_run_resumes_bitwise(tmp_path, data):
    """The FedEx residual (aggregator state) and the per-client ranks (client state) are checkpointed:
    2 rounds + a resumed third equal 3 straight rounds bitwise, base included."""
    from fedjax_llm.runs import load_run
    from fedjax_llm.train import run as train
    tmp, _ = data
    for scheme in ("fedex",):
        over = ["task=dialog", "debug=tiny", "model=nano_lora", f"data.tokenizer_cache={tmp}", "data.max_eval_examples=8",
                "client.local_steps=2", f"model.lora.aggregation={scheme}", "model.lora.client_ranks=[2,8]",
                "checkpoint.enabled=true", "checkpoint.every=1", "run.progress=false", "secure.seal=false"]
        train(compose_config(over + ["run.rounds=3"]), str(tmp_path / scheme / "straight"))
        train(compose_config(over + ["run.rounds=2"]), str(tmp_path / scheme / "resumed"))
        summary = train(compose_config(over + ["run.rounds=3"]), str(tmp_path / scheme / "resumed"))
        assert summary["resumed_from"] == 2
        a, b = load_run(str(tmp_path / scheme / "straight")), load_run(str(tmp_path / scheme / "resumed"))
        same = lambda x, y: all(np.array_equal(np.asarray(p), np.asarray(q))  # noqa: E731
                                for p, q in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
        assert a.round == b.round == 3 and same(a.trainable, b.trainable) and same(a.frozen, b.frozen)
