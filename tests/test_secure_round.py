"""The secure layer inside a round: sealing is lossless, tampered and replayed messages are rejected
without touching the model, secure aggregation equals the plaintext sum, DP-FedAvg clips, noises and
accounts, and a target epsilon stops training."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.clouds.channel import Channel
from fedjax_llm.config import ConfigError
from fedjax_llm.validation import validate
from fedjax_llm.data.federated import build_federated_data
from fedjax_llm.secure.round import dp_aggregator, dp_clip_piece, make_channel
from fedjax_llm.secure.secagg import SecAggError
from fedjax_llm.server import Federation, QuorumError
from fedjax_llm.types import CloudAggregate
from tests.conftest import compose_config

BASE = ["debug=tiny", "data.seq_len=16", "client.local_steps=2", "data.max_eval_examples=8"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


def _cfg(cache, *overrides):
    return validate(compose_config(BASE + [f"data.tokenizer_cache={cache}", *overrides]))


@pytest.fixture(scope="module")
def data(cache):
    cfg = _cfg(cache)
    return build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)


def _sealed(cfg, data, tmp_path):
    channel, _ = make_channel(cfg.secure, data.cloud_names, str(tmp_path), "test")
    return channel


def _same(a, b):
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class Tamper:
    """Wraps a channel; `edit(data, sender, recipient, round)` may change the bytes in flight."""

    def __init__(self, inner: Channel, edit):
        self.inner, self.edit, self.log = inner, edit, {}

    def channel(self) -> Channel:
        def send(tree, *, sender, recipient, round, meta=None):
            data = bytes(self.inner.send(tree, sender=sender, recipient=recipient, round=round, meta=meta))
            self.log[(sender, recipient, round)] = data
            return self.edit(data, sender, recipient, round, self.log)

        return Channel(send=send, receive=self.inner.receive)


def test_sealed_run_equals_unsealed_run(cache, data, tmp_path):
    cfg = _cfg(cache)
    plain = Federation(cfg, data)
    sealed = Federation(cfg, data, channel=_sealed(cfg, data, tmp_path))
    a, b = plain.init_state(), sealed.init_state()
    for _ in range(2):
        a, ma = plain.run_round(a)
        b, mb = sealed.run_round(b)
    assert _same(a.params, b.params)
    assert mb["bytes_on_wire"] > ma["bytes_on_wire"]  # headers, tags, signatures
    assert os.stat(tmp_path / "keys" / "aggregator.sign.pem").st_mode & 0o777 == 0o600


def _flip(target_sender, target_round=1, position=None):
    def edit(data, sender, recipient, rnd, log):
        if sender == target_sender and rnd == target_round:
            b = bytearray(data)
            i = len(b) // 2 if position is None else position
            b[i] ^= 0x01
            return bytes(b)
        return data
    return edit


def test_tampered_uplink_is_rejected_and_the_model_equals_the_round_without_that_cloud(cache, data, tmp_path):
    cfg = _cfg(cache)
    tamper = Tamper(_sealed(cfg, data, tmp_path), _flip("europe"))
    fed = Federation(cfg, data, channel=tamper.channel())
    state = fed.init_state()
    new, m = fed.run_round(state)
    assert "TamperedError" in m["clouds"]["europe"]["error"] and not m["clouds"]["europe"]["accepted"]
    ref = Federation(cfg, data)
    weights = ref.num_train.copy()
    weights[data.client_cloud == data.cloud_names.index("europe")] = 0
    ref.num_train = weights
    expected, _ = ref.run_round(state)
    assert _same(new.params, expected.params)


def test_replayed_uplink_is_rejected(cache, data, tmp_path):
    cfg = _cfg(cache)

    def replay(data_bytes, sender, recipient, rnd, log):
        if sender == "asia" and rnd == 2:
            return log[("asia", recipient, 1)]  # last round's genuine message
        return data_bytes

    fed = Federation(cfg, data, channel=Tamper(_sealed(cfg, data, tmp_path), replay).channel())
    s1, _ = fed.run_round(fed.init_state())
    _, m2 = fed.run_round(s1)
    err = m2["clouds"]["asia"]["error"]
    assert "StaleRoundError" in err or "ReplayError" in err, err


def test_quorum_stops_the_round_and_leaves_the_model(cache, data, tmp_path):
    cfg = _cfg(cache, "secure.quorum=3")
    fed = Federation(cfg, data, channel=Tamper(_sealed(cfg, data, tmp_path), _flip("asia")).channel())
    state = fed.init_state()
    before = jax.tree.map(np.asarray, state.params)
    with pytest.raises(QuorumError, match=r"round 1: only 2 of 3 clouds.*asia.*TamperedError"):
        fed.run_round(state)
    assert _same(before, state.params)


def test_secure_aggregation_equals_plaintext_within_fixed_point(cache, data):
    plain = Federation(_cfg(cache), data)
    secure = Federation(_cfg(cache, "secure.secagg.enabled=true"), data)
    state = plain.init_state()
    a, ma = plain.run_round(state)
    b, mb = secure.run_round(state)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    step = 2.0 ** -secure.cfg.secure.secagg.frac_bits
    assert 0 < diff < 10 * step  # masked, rounded to the fixed-point grid, and nothing more
    assert ma["clients"] == mb["clients"]


def test_secure_aggregation_survives_a_dropped_cloud_and_fails_past_the_threshold(cache, data, tmp_path):
    cfg = _cfg(cache, "secure.secagg.enabled=true")  # 3 clouds, threshold 2
    one = Federation(cfg, data, channel=Tamper(_sealed(cfg, data, tmp_path / "a"), _flip("asia")).channel())
    state = one.init_state()
    got, m = one.run_round(state)
    assert not m["clouds"]["asia"]["accepted"]
    ref = Federation(_cfg(cache), data)
    weights = ref.num_train.copy()
    weights[data.client_cloud == data.cloud_names.index("asia")] = 0
    ref.num_train = weights
    expected, _ = ref.run_round(state)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params)))
    assert diff < 10 * 2.0 ** -cfg.secure.secagg.frac_bits

    def two(data_bytes, sender, recipient, rnd, log):
        return _flip("asia")(_flip("europe")(data_bytes, sender, recipient, rnd, log), sender, recipient, rnd, log)

    cfg1 = dataclasses.replace(cfg, secure=dataclasses.replace(cfg.secure, quorum=1))
    both = Federation(cfg1, data, channel=Tamper(_sealed(cfg1, data, tmp_path / "b"), two).channel())
    with pytest.raises(SecAggError):
        both.run_round(both.init_state())


def test_dp_clip_piece_bounds_every_update():
    piece = dp_clip_piece()
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 100.0):
        delta = {"a": jnp.asarray(rng.normal(size=(5, 7)) * scale, jnp.float32), "b": jnp.asarray(rng.normal(size=3) * scale)}
        out, within, _ = piece.finish(delta, 1.0, 0.1, None, jnp.float32(0.5))
        norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(out))))
        original = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(delta))))
        assert norm <= 0.5 * (1 + 1e-6)
        assert bool(within) == (original <= 0.5)
        if original <= 0.5:
            assert _same(out, delta)


def test_dp_aggregator_noise_std_and_expected_count():
    from fedjax_llm.config import DPConfig
    cfg = DPConfig(enabled=True, clip=0.5, noise_multiplier=1.2)
    agg = dp_aggregator(cfg, expected_clients=8.0, key=jax.random.key(3), noise_at_clouds=False)
    zeros = {"w": jnp.zeros((2, 5000))}
    msgs = CloudAggregate(delta=zeros, weight=jnp.array([3.0, 5.0]), steps=jnp.ones(2), aux={"dp": jnp.ones(2)},
                          loss_sum=jnp.zeros(2), tokens=jnp.zeros(2), clients=jnp.array([3.0, 5.0]))
    state = agg.init(None)
    samples = []
    for _ in range(4):
        update, state = jax.jit(agg.update)(msgs, state, None)
        samples.append(np.asarray(update["w"]))
    samples = np.concatenate(samples)
    expected = 1.2 * 0.5 / 8.0  # z * C on the sum, divided by the expected clients
    assert np.std(samples) == pytest.approx(expected, rel=0.02)  # 20,000 draws: s.e. ~0.5 %
    assert abs(np.mean(samples)) < 5 * expected / np.sqrt(samples.size)
    # a real update: the mean of clipped updates is summed with weight = client count
    ones = CloudAggregate(delta={"w": jnp.ones((2, 3))}, weight=jnp.array([3.0, 5.0]), steps=jnp.ones(2),
                          aux={"dp": jnp.ones(2)}, loss_sum=jnp.zeros(2), tokens=jnp.zeros(2),
                          clients=jnp.array([3.0, 5.0]))
    quiet = dp_aggregator(DPConfig(enabled=True, clip=0.5, noise_multiplier=0.0), 8.0, jax.random.key(0), False)
    u, _ = quiet.update(ones, quiet.init(None), None)
    np.testing.assert_allclose(np.asarray(u["w"]), 1.0, rtol=1e-6)


def test_dp_run_logs_epsilon_matching_dp_accounting_and_stops_at_target(cache, tmp_path):
    import json

    import dp_accounting as dpa

    from fedjax_llm.train import run
    q, z = 0.67, 2.0  # epsilon 1.78, 2.50, 3.06 after rounds 1-3 (RDP, delta 1e-5)
    cfg = _cfg(cache, "secure.dp.enabled=true", "client.weighting=uniform", "participation.sampling=poisson",
               f"participation.fraction={q}", f"secure.dp.noise_multiplier={z}", "run.rounds=6",
               "checkpoint.enabled=false", "secure.dp.target_epsilon=3.0")
    summary = run(cfg, str(tmp_path))
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    rounds = [r for r in records if r["round"] >= 1]
    for r in rounds:
        acc = dpa.rdp.RdpAccountant()
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), r["round"])
        assert r["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert rounds[-1]["epsilon"] <= 3.0
    assert summary["stopped_early_after_round"] == len(rounds) < 6
    nxt = dpa.rdp.RdpAccountant()
    nxt.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), len(rounds) + 1)
    assert nxt.get_epsilon(1e-5) > 3.0  # it stopped because the next round would exceed the target


def test_dp_with_secure_aggregation_noises_at_the_clouds(cache, data):
    dp = ["secure.dp.enabled=true", "client.weighting=uniform", "secure.secagg.enabled=true"]
    quiet = Federation(_cfg(cache, *dp, "secure.dp.noise_multiplier=0.0"), data)
    noisy = Federation(_cfg(cache, *dp, "secure.dp.noise_multiplier=2.0"), data)
    assert noisy.algo.aggregator.broadcast(noisy.init_state().agg_state)["dp"] == pytest.approx(0.5)
    state = quiet.init_state()
    a, _ = quiet.run_round(state)
    b, _ = noisy.run_round(state)
    diff = np.concatenate([np.ravel(np.asarray(x) - np.asarray(y))
                           for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))])
    # noise on the sum: 3 clouds each add std z*C/sqrt(t=2); divided by the 9 expected clients
    assert noisy.expected_clients == 9
    expected = 2.0 * 0.5 * np.sqrt(3 / 2) / 9
    assert np.std(diff) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("overrides, key", [
    (["secure.secagg.enabled=true", "algorithm.cloud_rule=median"], "secure.secagg.enabled"),
    (["secure.dp.enabled=true"], "secure.dp.enabled"),
    (["secure.dp.enabled=true", "client.weighting=uniform", "algorithm=median"], "secure.dp.enabled"),
    (["secure.cipher=des"], "secure.cipher"),
    (["secure.quorum=4"], "secure.quorum"),
])
def test_secure_config_errors_name_the_keys(cache, overrides, key):
    with pytest.raises(ConfigError) as info:
        _cfg(cache, *overrides)
    assert str(info.value).startswith(key)
    if "median" in " ".join(overrides):
        assert "median" in str(info.value)


def test_secure_sums_in_clouds_match_numpy_weighted_means_and_fail_past_threshold():
    """Clients of each cloud mask their updates; the cloud's unmasked mean equals the NumPy weighted
    mean of the clients that arrived (to the fixed-point step); a cloud where more than n - t of its
    sampled clients dropped cannot unmask (SecAggError), the others are unaffected."""
    from fedjax_llm.config import SecAggConfig
    from fedjax_llm.secure.round import secure_mean_of_clients
    rng = np.random.default_rng(0)
    names = [f"c{j}/{i}" for j in range(3) for i in range(4)]
    cohort = np.array([0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11])          # client 7 not sampled
    weights = np.array([3, 1, 0, 2, 5, 0, 1, 0, 0, 4, 0], np.float32)  # 0: dropped after sampling
    deltas = {"w": rng.normal(size=(11, 5, 3)).astype(np.float32), "b": rng.normal(size=(11, 7)).astype(np.float32)}
    cfg = SecAggConfig(enabled=True, scope="clients", threshold=0.5)
    step = 2.0 ** -cfg.frac_bits * 40  # fixed-point step x scale (a cloud: 4 clients of weight 10)
    for c, slots in ((0, [0, 1, 2, 3]), (1, [4, 5, 6]), (2, [7, 8, 9, 10])):
        mine = jax.tree.map(lambda a: a[slots], deltas)
        parties = [names[cohort[i]] for i in slots]
        if c == 2:  # sampled 8, 9, 10, 11 (4 parties, t = 2); only client 10 answered -> unrecoverable
            with pytest.raises(SecAggError, match="only 1 of 4"):
                secure_mean_of_clients(cfg, mine, weights[slots], parties, 40.0, f"test/1/c{c}")
            continue
        mean, total = secure_mean_of_clients(cfg, mine, weights[slots], parties, 40.0, f"test/1/c{c}")
        w = weights[slots].astype(np.float64)
        assert total == pytest.approx(w.sum(), abs=step)
        for k in deltas:
            want = np.tensordot(w, deltas[k][slots].astype(np.float64), axes=1) / w.sum()
            np.testing.assert_allclose(mean[k], want, atol=4 * step)


@pytest.mark.parametrize("scope", ["clients", "both"])
def test_secure_aggregation_inside_clouds_equals_plaintext_with_dropouts(cache, data, scope):
    # Dropped clients masked nothing; the cloud still unmasks. Seed 7: in round 1 americas and asia
    # each lose one client (drawn from each cloud's own key), europe none.
    extra = ["participation.dropout=0.1", "seed=7"]
    plain = Federation(_cfg(cache, *extra), data)
    secure = Federation(_cfg(cache, *extra, "secure.secagg.enabled=true", f"secure.secagg.scope={scope}"), data)
    state = plain.init_state()
    a, ma = plain.run_round(state)
    b, mb = secure.run_round(state)
    assert ma["dropped"] == mb["dropped"] > 0
    assert all(c["error"] is None for c in mb["clouds"].values())  # this seed's dropouts stay within n - t
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    assert 0 < diff < 20 * 2.0 ** -secure.cfg.secure.secagg.frac_bits
    if scope == "clients":  # t = n inside each cloud: a cloud with any dropout cannot be unmasked
        strict = Federation(_cfg(cache, *extra, "secure.secagg.enabled=true", "secure.secagg.scope=clients",
                                 "secure.secagg.threshold=1.0"), data)
        _, mc = strict.run_round(state)
        failed = [n for n, c in mc["clouds"].items() if not c["accepted"]]
        assert failed and all("SecAggError" in mc["clouds"][n]["error"] for n in failed)
        assert len(failed) < len(mc["clouds"])  # the round went on with the other clouds
