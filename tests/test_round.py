"""The round engine against independent references: per-client training loops and NumPy FedAvg."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_llm import participation
from fedjax_llm.data.federated import build_federated_data, round_batches
from fedjax_llm.server import Federation, NonFiniteError
from tests.conftest import compose_config

# SGD keeps the comparison with independent training tight: Adam divides by sqrt(v), which turns
# float rounding in near-zero gradients into lr-sized steps (see the AdamW test below).
TINY = ["debug=tiny", "data.seq_len=24", "client=sgd", "client.lr=0.5", "client.local_steps=3",
        "client.batch_size=3", "data.max_eval_examples=16"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    return compose_config(TINY + [f"data.tokenizer_cache={cache}"])


@pytest.fixture(scope="module")
def data(cfg):
    return build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)


@pytest.fixture(scope="module")
def fed(cfg, data):
    return Federation(cfg, data)


def _with(cfg, **sections):
    """A copy of cfg with some fields of some sections replaced."""
    out = cfg
    for section, fields in sections.items():
        out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **fields)})
    return out


def reference_round(fed: Federation, state):
    """One round written independently: a Python loop of plain optax steps per client, then the
    example-weighted mean of all client deltas (flat, ignoring the cloud hierarchy) in NumPy."""
    cfg = fed.cfg.client
    cohort, keys = [], []
    for c, name in enumerate(fed.cloud_names):  # each cloud samples and keys its clients from its own key
        _, k_round = jax.random.split(jax.random.wrap_key_data(state.clouds[name].key))
        members = np.flatnonzero(fed.data.client_cloud == c)
        local = participation.sample_cloud(fed.cfg.participation, len(members), len(members), cfg.local_steps,
                                           jax.random.fold_in(k_round, 11), 1, name).ids
        cohort.append(members[local])
        keys.append(jax.random.split(jax.random.fold_in(k_round, 12), len(members))[local])
    cohort, keys = np.concatenate(cohort), jnp.concatenate(keys)
    rb = round_batches(fed.data, cohort, state.data_cursors, cfg.local_steps, cfg.batch_size,
                       int(state.clouds[fed.cloud_names[0]].data_seed))
    inner = (optax.adamw(cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adamw"
             else optax.sgd(cfg.lr))
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), inner)

    def loss(params, tokens, mask, key):
        logits = fed.fns.apply(params, fed.frozen, tokens[:, :-1], key)
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.maximum(jnp.sum(mask[:, 1:]), 1)

    grad = jax.jit(jax.grad(loss))
    deltas = []
    for i in range(len(cohort)):
        params, opt_state = state.params, opt.init(state.params)
        step_keys = jax.random.split(keys[i], cfg.local_steps)
        for t in range(cfg.local_steps):
            if rb.step_mask[i, t]:
                g = grad(params, rb.tokens[i, t], rb.loss_mask[i, t], step_keys[t])
                updates, opt_state = opt.update(g, opt_state, params)
                params = optax.apply_updates(params, updates)
        deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, state.params))
    w = fed.num_train[cohort].astype(np.float64)
    mean = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d)) / w.sum(), *deltas)
    return jax.tree.map(lambda p, m: np.asarray(p) + m, state.params, mean)


def _assert_trees_close(a, b, atol):
    for (pa, xa), (pb, xb) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), atol=atol, rtol=0, err_msg=str(pa))


def test_engine_round_equals_independent_per_client_training(fed):
    state = fed.init_state()
    new_state, metrics = fed.run_round(state)
    _assert_trees_close(new_state.params, reference_round(fed, state), atol=1e-5)
    assert metrics["clients"] == fed.cohort_size == 9
    # the model moved
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new_state.params),
                                                           jax.tree.leaves(state.params)))
    assert moved > 1e-4


def test_adamw_round_matches_reference_up_to_adam_rounding(cfg, data):
    fed = Federation(_with(cfg, client=dict(optimizer="adamw", lr=3e-3)), data)
    state = fed.init_state()
    new_state, _ = fed.run_round(state)
    ref = reference_round(fed, state)
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                            for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref))])
    assert np.mean(diffs <= 1e-5) > 0.9999 and diffs.max() < 3e-3 / 9 * 3


def test_second_round_continues_from_state_and_matches_reference(fed):
    s1, _ = fed.run_round(fed.init_state())
    s2, _ = fed.run_round(s1)
    assert int(s2.round) == 2 and np.all(s2.data_cursors > s1.data_cursors)
    _assert_trees_close(s2.params, reference_round(fed, s1), atol=2e-5)


@pytest.mark.parametrize("chunk", [2, 4, 9])
def test_chunked_equals_unchunked(cfg, data, fed, chunk):
    other = Federation(_with(cfg, client=dict(clients_per_chunk=chunk)), data)
    assert other.layout.chunk == min(chunk, 3)  # each cloud computes its own 3 clients
    state = fed.init_state()
    a, _ = fed.run_round(state)
    b, _ = other.run_round(state)
    _assert_trees_close(a.params, b.params, atol=1e-5)


def test_loop_backend_equals_vmap_backend(cfg, data, fed):
    loop = Federation(_with(cfg, client=dict(backend="loop")), data)
    state = fed.init_state()
    a, ma = fed.run_round(state)
    b, mb = loop.run_round(state)
    _assert_trees_close(a.params, b.params, atol=1e-5)
    assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-5)


def test_same_seed_same_metrics_and_params(cfg, data, fed):
    again = Federation(cfg, data)
    s_a, s_b = fed.init_state(), again.init_state()
    for _ in range(2):
        s_a, m_a = fed.run_round(s_a)
        s_b, m_b = again.run_round(s_b)
    timing = ("wall_s", "tokens_per_s", "seal_s", "open_s")
    drop = lambda m: {k: ({n: {a: b for a, b in c.items() if a not in timing} for n, c in v.items()}
                          if k == "clouds" else v) for k, v in m.items() if k not in timing}
    assert drop(m_a) == drop(m_b)
    for x, y in zip(jax.tree.leaves(s_a.params), jax.tree.leaves(s_b.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_bytes_and_simulated_comm_time_follow_the_link_model(fed):
    from fedjax_llm.clouds import message
    state = fed.init_state()
    _, m = fed.run_round(state)
    model_bytes = len(message.encode(state.params))
    for c, name in enumerate(fed.cloud_names):
        link = fed.cfg.clouds.members[name].link
        cloud = m["clouds"][name]
        assert abs(cloud["bytes_down"] - model_bytes) < 4096  # payload + routing header
        assert cloud["bytes_up"] > model_bytes                # mean delta + weight and metrics
        expected = sum(link.latency_ms / 1e3 + n * 8 / (link.bandwidth_mbps * 1e6)
                       for n in (cloud["bytes_down"], cloud["bytes_up"]))
        assert cloud["comm_s"] == pytest.approx(expected)
    assert m["comm_s"] == pytest.approx(max(c["comm_s"] for c in m["clouds"].values()))


def _poisoned(data, client: int):
    """Data whose client `client` has NaN loss weights: its loss and update become NaN."""
    mask = data.loss_mask.copy()
    mask[data.train_idx[client]] = np.nan
    return dataclasses.replace(data, loss_mask=mask)


def test_nonfinite_client_is_dropped_named_and_never_reaches_the_model(cfg, data):
    bad = 4
    fed = Federation(cfg, _poisoned(data, bad))
    state = fed.init_state()
    new_state, m = fed.run_round(state)
    assert m["nonfinite_dropped"] == 1
    assert data.client_names[bad] in m["nonfinite_clients"][0]
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new_state.params))
    assert m["clients"] == fed.cohort_size - 1
    # Equal to FedAvg over the other clients: zero the bad client's weight in a clean federation.
    clean = Federation(cfg, data)
    weights = clean.num_train.copy()
    weights[bad] = 0
    clean.num_train = weights
    ref, _ = clean.run_round(state)
    _assert_trees_close(new_state.params, ref.params, atol=1e-6)


def test_nonfinite_client_stops_the_run_when_configured(cfg, data):
    bad = 7
    fed = Federation(_with(cfg, run=dict(on_nonfinite="stop")), _poisoned(data, bad))
    with pytest.raises(NonFiniteError, match=rf"round 1: .*{data.client_names[bad]}"):
        fed.run_round(fed.init_state())


def test_lora_round_leaves_frozen_base_untouched(cfg, data):
    lora = dataclasses.replace(cfg.model.lora, enabled=True, rank=4, targets=["q_proj", "v_proj"])
    lora_cfg = _with(cfg, model=dict(lora=lora))
    fed = Federation(lora_cfg, data)
    frozen_before = jax.tree.map(np.asarray, fed.frozen)
    state = fed.init_state()
    assert all("lora" in p for p, _ in _paths(state.params))
    assert not any("lora" in p for p, _ in _paths(fed.frozen))
    new_state, _ = fed.run_round(state)
    for (p, x), (_, y) in zip(_paths(frozen_before), _paths(fed.frozen)):
        assert np.array_equal(x, np.asarray(y)), p
    changed = [p for (p, x), (_, y) in zip(_paths(state.params), _paths(new_state.params))
               if not np.array_equal(np.asarray(x), np.asarray(y))]
    assert any(p.endswith("lora_b") for p in changed)
    _assert_trees_close(new_state.params, reference_round(fed, state), atol=1e-5)


def _paths(tree):
    from fedjax_llm.clouds.message import leaf_paths
    return leaf_paths(tree)


def test_sampled_cohort_is_per_cloud_and_keyed(cfg, data):
    clouds = dataclasses.replace(cfg.clouds, members={
        n: dataclasses.replace(c, clients_per_round=2) for n, c in cfg.clouds.members.items()})
    cfg2 = dataclasses.replace(cfg, clouds=clouds)
    fed = Federation(cfg2, data)
    assert fed.cohort_size == 6
    seen = set()
    sample = lambda r: participation.sample_cohort(cfg2, data.client_cloud, jax.random.key(r), r).ids  # noqa: E731
    for r in range(20):
        cohort = sample(r)
        assert len(cohort) == 6 and len(set(cohort)) == 6
        assert np.all(np.bincount(data.client_cloud[cohort], minlength=3) == 2)
        np.testing.assert_array_equal(cohort, sample(r))
        seen.update(cohort.tolist())
    assert seen == set(range(9))
    state, m = fed.run_round(fed.init_state())
    assert m["clients"] == 6


def test_loop_backend_names_the_failing_client_and_stage(cfg, data):
    """A client whose local training fails at run time is named with its cloud, id and stage."""
    from fedjax_llm import round as round_mod

    fed = Federation(_with(cfg, client=dict(backend="loop")), data)
    target = float(fed.num_train[5])

    def fail_on_weight(w):
        if float(w) == target:
            raise RuntimeError("disk quota exceeded while reading shard")
        return np.float32(0)

    from fedjax_llm.client import client_optimizer, make_lm_loss, make_local_update
    base = make_local_update(make_lm_loss(fed.fns.apply), client_optimizer(fed.cfg.client))

    def flaky(trainable, frozen, batches, key, hparams, weight, state, broadcast):
        out, state = base(trainable, frozen, batches, key, hparams, weight, state, broadcast)
        bump = jax.pure_callback(fail_on_weight, jax.ShapeDtypeStruct((), np.float32), weight)
        return out.replace(loss_sum=out.loss_sum + bump), state

    flaky_loop = round_mod.make_loop_compute(flaky, fed.algo.reducer, fed.algo.transform, 1)
    fed.clouds = [dataclasses.replace(c, engine=dataclasses.replace(c.engine, run=flaky_loop)) for c in fed.clouds]
    with pytest.raises(round_mod.ClientStageError,
                       match=rf"round 1, cloud '\w+', client 5 \({data.client_names[5]}\): stage local_update"):
        fed.run_round(fed.init_state())


def test_bf16_params_train_and_stay_bf16(cfg, data):
    fed = Federation(_with(cfg, model=dict(param_dtype="bfloat16", compute_dtype="bfloat16")), data)
    state, m = fed.run_round(fed.init_state())
    leaves = jax.tree.leaves(state.params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in leaves)
    assert m["nonfinite_dropped"] == 0 and np.isfinite(m["train_loss"])


def _rejecting_channel(rejects, reason):
    """A plaintext channel whose receiving side rejects the hops for which rejects(sender, recipient)."""
    from fedjax_llm.clouds.channel import Channel, plaintext_channel
    from fedjax_llm.clouds.message import MessageError

    plain = plaintext_channel()

    def receive(data_bytes, *, like, sender, recipient, round):
        if rejects(sender, recipient):
            raise MessageError(reason)
        return plain.receive(data_bytes, like=like, sender=sender, recipient=recipient, round=round)

    return Channel(send=plain.send, receive=receive)


def test_rejected_uplink_drops_that_cloud_and_equals_fedavg_of_the_rest(cfg, data):
    """The cloud boundary: a message the aggregator cannot open leaves its cloud out of the round."""
    channel = _rejecting_channel(lambda sender, recipient: sender == "europe",
                                 "payload tag mismatch (simulated tampering)")
    fed = Federation(cfg, data, channel=channel)
    state = fed.init_state()
    new_state, m = fed.run_round(state)
    assert "tampering" in m["clouds"]["europe"]["error"]
    assert m["clouds"]["americas"]["error"] is None
    # Reference: the same round with europe's clients weighted 0.
    clean = Federation(cfg, data)
    weights = clean.num_train.copy()
    weights[data.client_cloud == fed.cloud_names.index("europe")] = 0
    clean.num_train = weights
    ref, _ = clean.run_round(state)
    _assert_trees_close(new_state.params, ref.params, atol=1e-6)


def test_rejected_downlink_keeps_that_cloud_out_of_training(cfg, data):
    channel = _rejecting_channel(lambda sender, recipient: recipient == "asia",
                                 "wrong recipient key (simulated)")
    fed = Federation(cfg, data, channel=channel)
    _, m = fed.run_round(fed.init_state())
    assert m["clouds"]["asia"]["clients"] == 0 and m["clouds"]["asia"]["bytes_up"] == 0
    assert m["clients"] == 6 and "recipient" in m["clouds"]["asia"]["error"]
