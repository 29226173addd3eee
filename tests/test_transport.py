"""The in-process transport's broadcast (clouds/transport.py, secure/channel.py): the global model serialized
once and sealed per recipient opens, for every cloud, to what one sealed hop per cloud gives, with the
same byte counts; a wrong shared digest is caught by every recipient."""
import numpy as np

from fedjax_llm.clouds.channel import Channel
from fedjax_llm.clouds.link import Link
from fedjax_llm.clouds.transport import AGGREGATOR, InProcessTransport, new_stats
from fedjax_llm.secure import keys as K
from fedjax_llm.secure import seal as S
from fedjax_llm.secure.channel import sealed_channel

CLOUDS = ["east", "central", "west"]


def _tree():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((300, 70)).astype(np.float32), "step": np.int32(7),
            "b": rng.standard_normal(5).astype(np.float32)}


def _channel(**kw):
    ids = K.generate_identities([*CLOUDS, AGGREGATOR])
    return sealed_channel(ids, K.trust_of(ids), "run", chunk_bytes=4096, **kw)


def _transport(channel):
    return InProcessTransport(channel, {n: Link(100.0, 10.0) for n in CLOUDS})


def test_a_broadcast_opens_for_every_cloud_as_one_hop_per_cloud_does():
    tree = _tree()
    channel = _channel()
    once, each = {n: new_stats() for n in CLOUDS}, {n: new_stats() for n in CLOUDS}
    got = _transport(channel).broadcast(tree, sender=AGGREGATOR, recipients=CLOUDS, round=1, stats=once)
    plain = _transport(Channel(channel.send, channel.receive))  # the reference: one send per cloud
    want = plain.broadcast(tree, sender=AGGREGATOR, recipients=CLOUDS, round=2, stats=each)
    for n in CLOUDS:
        assert once[n]["error"] is None and each[n]["error"] is None
        for k in tree:
            assert np.asarray(got[n][k]).tobytes() == np.asarray(tree[k]).tobytes() == \
                np.asarray(want[n][k]).tobytes(), (n, k)
        assert once[n]["bytes_down"] == each[n]["bytes_down"] > 4 * tree["w"].size
        assert once[n]["comm_s"] == each[n]["comm_s"] and once[n]["seal_s"] > 0 and once[n]["open_s"] > 0
    again = _transport(channel).broadcast(tree, sender=AGGREGATOR, recipients=CLOUDS, round=3, stats=once)
    assert all(again[n] is not None for n in CLOUDS)  # sequence numbers moved on: no replay refused


def test_a_broadcast_sealed_under_a_wrong_payload_digest_is_refused_by_every_recipient(monkeypatch):
    tree = _tree()
    channel = _channel()
    real = S.seal
    monkeypatch.setattr("fedjax_llm.secure.channel.seal",
                        lambda payload, **kw: real(payload, **{**kw, "payload_sha256": b"\0" * 32}))
    stats = {n: new_stats() for n in CLOUDS}
    got = _transport(channel).broadcast(tree, sender=AGGREGATOR, recipients=CLOUDS, round=1, stats=stats)
    assert all(got[n] is None for n in CLOUDS)
    assert all("TamperedError" in stats[n]["error"] and "sha256" in stats[n]["error"] for n in CLOUDS), stats


def test_a_broadcast_compressed_for_some_recipients_only_falls_back_to_one_send_each():
    tree = _tree()
    channel = _channel(compression="bf16", compress_recipients=["east"])
    stats = {n: new_stats() for n in CLOUDS}
    got = _transport(channel).broadcast(tree, sender=AGGREGATOR, recipients=CLOUDS, round=1, stats=stats)
    assert np.asarray(got["west"]["w"]).tobytes() == tree["w"].tobytes()       # exact
    assert not np.array_equal(np.asarray(got["east"]["w"]), tree["w"])          # bf16 on the way
    assert np.allclose(np.asarray(got["east"]["w"]), tree["w"], rtol=1e-2)
    assert stats["east"]["bytes_down"] < stats["west"]["bytes_down"]


def test_a_broadcast_to_one_recipient_is_one_hop():
    tree = _tree()
    stats = {c: new_stats() for c in CLOUDS}
    got = _transport(_channel()).broadcast(tree, sender=AGGREGATOR, recipients=CLOUDS[:1], round=1, stats=stats)
    assert list(got) == CLOUDS[:1] and stats[CLOUDS[0]]["bytes_down"] > 0 and stats[CLOUDS[1]]["bytes_down"] == 0
