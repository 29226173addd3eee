"""Identities, sealed messages and the sealing channel: every tampering is rejected with its named error."""
import json
import os
import stat
import struct

import ml_dtypes
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization as ser

from fedjax_llm.clouds import message
from fedjax_llm.clouds.channel import plaintext_channel
from fedjax_llm.secure import compress as C
from fedjax_llm.secure import keys as K
from fedjax_llm.secure import seal as S
from fedjax_llm.secure.channel import ChannelState, sealed_channel

PARTIES = ["americas", "europe", "asia", "aggregator"]
CHUNK = 64


@pytest.fixture(scope="module")
def ids():
    return K.generate_identities(PARTIES)


@pytest.fixture(scope="module")
def trust(ids):
    return K.trust_of(ids)


def _seal(ids, trust, payload, *, sender="americas", recipient="aggregator", round=3, seq=0,
          run_id="run-1", **kw):
    return S.seal(payload, sender=ids[sender], recipient=trust[recipient], round=round, seq=seq,
                  run_id=run_id, chunk_bytes=kw.pop("chunk_bytes", CHUNK), **kw)


def _open(ids, trust, data, *, recipient="aggregator", round=3, run_id="run-1", sender="americas",
          replay=None):
    return S.open_sealed(data, recipient=ids[recipient], trust=trust, run_id=run_id, round=round,
                         sender=sender, replay=replay)


def _layout(data):
    """(header_end, [frame (start, end)] incl. trailer, signature start) computed from the wire format."""
    hlen = struct.unpack(">I", bytes(data[5:9]))[0]
    h = json.loads(bytes(data[9:9 + hlen]))
    pos = 9 + hlen + S.SIG
    frames = []
    for i in range(h["count"] + 1):
        size = 32 if i == h["count"] else min(h["chunk_bytes"], h["length"] - i * h["chunk_bytes"])
        frames.append((pos, pos + 4 + size + S.TAG))
        pos += 4 + size + S.TAG
    return 9 + hlen, frames, pos


def _flip(data, bit):
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# ----- keys ------------------------------------------------------------------------------------------
def test_key_files_are_private_and_reload_identically(tmp_path):
    made = K.generate_identities(["americas", "aggregator"], tmp_path)
    for name in made:
        for suffix in ("sign.pem", "kex.pem"):
            assert stat.S_IMODE(os.stat(tmp_path / f"{name}.{suffix}").st_mode) == 0o600
    loaded = K.load_identities(tmp_path, ["americas", "aggregator"])
    priv = lambda k: k.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    for name in made:
        assert priv(loaded[name].signing_key) == priv(made[name].signing_key)
        assert priv(loaded[name].agreement_key) == priv(made[name].agreement_key)
    assert K.load_trust(tmp_path / K.TRUST_FILE) == K.trust_of(made)
    assert "PRIVATE" not in repr(loaded["americas"]) and "_key" not in repr(loaded["americas"])
    # A message sealed with the reloaded keys opens with the original ones (resume reuses keys).
    trust = K.load_trust(tmp_path / K.TRUST_FILE)
    data = S.seal(b"hello", sender=loaded["americas"], recipient=trust["aggregator"], round=1, seq=0,
                  run_id="r")
    assert S.open_sealed(data, recipient=made["aggregator"], trust=K.trust_of(made), run_id="r",
                         round=1)[0] == b"hello"


def test_key_file_errors_name_file_and_party(tmp_path):
    K.generate_identities(["europe"], tmp_path, password=b"pw")
    assert K.load_identities(tmp_path, ["europe"], password=b"pw")["europe"].name == "europe"
    with pytest.raises(K.IdentityError, match="already exists"):
        K.generate_identities(["asia", "europe"], tmp_path)
    assert not (tmp_path / "asia.sign.pem").exists()  # a refused call writes nothing
    with pytest.raises(K.IdentityError, match=r"'asia'.*asia\.sign\.pem not found"):
        K.load_identities(tmp_path, ["asia"])
    K.generate_identities(["asia"], tmp_path)  # a second party joins: trust.json keeps europe
    assert sorted(K.load_trust(tmp_path / K.TRUST_FILE)) == ["asia", "europe"]
    os.chmod(tmp_path / "europe.kex.pem", 0o644)
    with pytest.raises(K.IdentityError, match=r"'europe'.*europe\.kex\.pem has mode 0644"):
        K.load_identities(tmp_path, ["europe"], password=b"pw")
    doc = json.loads((tmp_path / K.TRUST_FILE).read_text())
    doc["parties"]["europe"]["kex"] = "zz"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(K.IdentityError, match=r"bad\.json.*'europe'.*'kex'"):
        K.load_trust(tmp_path / "bad.json")
    with pytest.raises(K.IdentityError, match="party name"):
        K.generate_identities(["../etc"])


# ----- sealing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cipher", sorted(S.CIPHERS))
@pytest.mark.parametrize("n", [0, 1, CHUNK, 3 * CHUNK + 5])
def test_round_trip_bytes_and_stream(ids, trust, cipher, n):
    payload = os.urandom(n)
    data = _seal(ids, trust, payload, cipher=cipher)
    out, h = _open(ids, trust, data)
    assert out == payload and h.cipher == cipher and h.count == -(-n // CHUNK)
    # Streams in odd pieces on both sides give the same wire bytes' meaning.
    pieces = [payload[i:i + 7] for i in range(0, n, 7)]
    wire = b"".join(S.seal_stream(pieces, length=n, sender=ids["americas"], recipient=trust["aggregator"],
                                  round=3, seq=0, run_id="run-1", cipher=cipher, chunk_bytes=CHUNK))
    h2, chunks = S.open_stream([wire[i:i + 13] for i in range(0, len(wire), 13)],
                               recipient=ids["aggregator"], trust=trust, run_id="run-1", round=3)
    chunks = list(chunks)
    assert b"".join(chunks) == payload and all(len(c) <= CHUNK for c in chunks)


def test_every_bit_flip_is_rejected(ids, trust):
    data = bytes(_seal(ids, trust, os.urandom(3 * CHUNK + 10)))
    header_end, frames, sig = _layout(data)
    regions = {  # region -> (bit positions, allowed errors)
        "preamble+header": (range(0, header_end * 8), S.SealError),
        "header signature": (range(header_end * 8, (header_end + S.SIG) * 8), S.BadSignatureError),
        "final signature": (range(sig * 8, len(data) * 8), S.BadSignatureError),
    }
    for i, (a, b) in enumerate(frames):
        regions[f"frame {i} index"] = (range(a * 8, (a + 4) * 8), S.ChunkOrderError)
        regions[f"frame {i} ciphertext"] = (range((a + 4) * 8, (b - S.TAG) * 8), S.TamperedError)
        regions[f"frame {i} tag"] = (range((b - S.TAG) * 8, b * 8), S.TamperedError)
    tried = 0
    for name, (bits, allowed) in regions.items():
        for bit in bits:
            with pytest.raises(allowed):
                _open(ids, trust, _flip(data, bit), replay=S.ReplayGuard())
            tried += 1
    assert tried == len(data) * 8  # every bit of the message, each region with its named error
    print(f"bit flips tried: {tried} over {len(regions)} regions of a {len(data)}-byte message")


def test_named_errors_for_routing_rounds_and_replays(ids, trust):
    data = _seal(ids, trust, b"x" * 100)
    with pytest.raises(S.StaleRoundError, match="round 3 is older"):
        _open(ids, trust, data, round=4)
    with pytest.raises(S.FutureRoundError, match="round 3 is newer"):
        _open(ids, trust, data, round=2)
    with pytest.raises(S.WrongRecipientError, match="addressed to 'aggregator'"):
        _open(ids, trust, data, recipient="europe")
    with pytest.raises(S.WrongSenderError, match="expected 'asia'"):
        _open(ids, trust, data, sender="asia")
    with pytest.raises(S.WrongRunError, match="run-2"):
        _open(ids, trust, data, run_id="run-2")
    guard = S.ReplayGuard()
    _open(ids, trust, data, replay=guard)
    with pytest.raises(S.ReplayError, match="seq 0"):
        _open(ids, trust, data, replay=guard)
    restored = S.ReplayGuard(json.loads(json.dumps(guard.state())))  # survives a checkpoint
    with pytest.raises(S.ReplayError):
        _open(ids, trust, data, replay=restored)
    _open(ids, trust, _seal(ids, trust, b"y", seq=1), replay=restored)  # a new seq is accepted


def test_unknown_sender_and_swapped_keys(ids, trust):
    outsider = K.new_identity("mallory")
    with pytest.raises(S.UnknownSenderError, match="'mallory'"):
        _open(ids, trust, S.seal(b"x", sender=outsider, recipient=trust["aggregator"], round=3, seq=0,
                                 run_id="run-1"), sender=None)
    eu, am = ids["europe"], ids["americas"]
    forged = {  # claims to be americas; signed and/or encrypted with europe's keys
        "signed by europe": (K.Identity("americas", eu.signing_key, eu.agreement_key), S.BadSignatureError),
        "europe's signing key only": (K.Identity("americas", eu.signing_key, am.agreement_key),
                                      S.BadSignatureError),
        "europe's agreement key only": (K.Identity("americas", am.signing_key, eu.agreement_key),
                                        S.TamperedError),
    }
    for name, (ident, err) in forged.items():
        data = S.seal(b"x" * 200, sender=ident, recipient=trust["aggregator"], round=3, seq=0,
                      run_id="run-1", chunk_bytes=CHUNK)
        with pytest.raises(err):
            _open(ids, trust, data)


def test_truncation_reorder_drop_duplicate(ids, trust):
    data = bytes(_seal(ids, trust, os.urandom(4 * CHUNK)))
    header_end, frames, sig = _layout(data)
    cuts = [0, 5, 9, header_end - 1, header_end + 10] + [a for a, _ in frames] + \
           [a + 30 for a, _ in frames] + [sig, sig + 63]
    for cut in cuts:
        with pytest.raises(S.TruncatedError):
            _open(ids, trust, data[:cut])
    head, f, tail = data[:frames[0][0]], [data[a:b] for a, b in frames], data[sig:]
    variants = {
        "reordered": head + f[0] + f[2] + f[1] + b"".join(f[3:]) + tail,
        "dropped": head + f[0] + b"".join(f[2:]) + tail,
        "dropped last": head + b"".join(f[:3]) + f[4] + tail,
        "duplicated": head + f[0] + f[1] + f[1] + b"".join(f[2:]) + tail,
    }
    for name, bad in variants.items():
        with pytest.raises(S.ChunkOrderError):
            _open(ids, trust, bad)
    # Relabelling swapped chunks with their new positions does not help: the index is in the AAD.
    relabel = lambda frame, i: struct.pack(">I", i) + frame[4:]
    with pytest.raises(S.TamperedError, match="chunk 1 of 4 fails authentication"):
        _open(ids, trust, head + f[0] + relabel(f[2], 1) + relabel(f[1], 2) + b"".join(f[3:]) + tail)
    with pytest.raises(S.TamperedError, match="unexpected bytes"):
        _open(ids, trust, data + b"\0")
    # A stream cut at a frame boundary is a truncation, not a valid shorter message.
    h, it = S.open_stream([data[:frames[2][0]]], recipient=ids["aggregator"], trust=trust,
                          run_id="run-1", round=3)
    with pytest.raises(S.TruncatedError, match="chunk 2 of 4"):
        list(it)


def test_seal_stream_is_lazy(ids, trust):
    """Sealing consumes input one chunk ahead at most: frame k is out before chunk k + 2 is read."""
    consumed = []

    def pieces():
        for i in range(6):
            consumed.append(i)
            yield bytes([i]) * CHUNK

    frames = S.seal_stream(pieces(), length=6 * CHUNK, sender=ids["americas"],
                           recipient=trust["aggregator"], round=3, seq=0, run_id="run-1", chunk_bytes=CHUNK)
    next(frames)  # the header
    for k in range(6):
        next(frames)
        assert len(consumed) == k + 1


def test_nonces_never_repeat_under_one_key_pair(ids, trust):
    pairs, nonces = set(), set()
    n = 300
    for i in range(n):  # same sender, recipient, round and seq every time: only the salt differs
        data = _seal(ids, trust, b"z" * (2 * CHUNK + 1))
        key, ns = S.message_nonces(data, ids["aggregator"], trust)
        assert len(ns) == 4
        pairs.update((key, x) for x in ns)
        nonces.update(ns)
    assert len(pairs) == len(nonces) == 4 * n


def test_every_error_is_a_message_error():
    errors = [v for v in vars(S).values() if isinstance(v, type) and issubclass(v, S.SealError)]
    assert len(errors) >= 14 and all(issubclass(e, message.MessageError) for e in errors)


# ----- channel ---------------------------------------------------------------------------------------
def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"layers": {"0": {"kernel": rng.normal(size=(40, 64)).astype(np.float32)},
                       "1": {"kernel": rng.normal(size=(40, 64)).astype(ml_dtypes.bfloat16)}},
            "weight": np.float32(123457.0), "count": np.array(7, np.int32)}


def _bits(tree):
    return [np.asarray(x).tobytes() for _, x in message.leaf_paths(tree)]


@pytest.mark.parametrize("cipher", sorted(S.CIPHERS))
def test_channel_is_bitwise_lossless_and_matches_plaintext(ids, trust, cipher):
    tree = _tree()
    ch = sealed_channel(ids, trust, "run-1", cipher=cipher, chunk_bytes=1000)
    plain = plaintext_channel()
    for rnd, (s, r) in enumerate([("aggregator", "europe"), ("europe", "aggregator")], start=1):
        got, meta = ch.receive(ch.send(tree, sender=s, recipient=r, round=rnd), like=tree, sender=s,
                               recipient=r, round=rnd)
        ref, _ = plain.receive(plain.send(tree, sender=s, recipient=r, round=rnd), like=tree, sender=s,
                               recipient=r, round=rnd)
        assert _bits(got) == _bits(tree) == _bits(ref)
        assert [x.dtype for _, x in message.leaf_paths(got)] == [np.asarray(x).dtype for _, x in
                                                                 message.leaf_paths(tree)]
        assert meta["sender"] == s and meta["round"] == str(rnd)


def test_channel_structure_mismatch_names_path_and_replay(ids, trust):
    ch = sealed_channel(ids, trust, "run-1")
    tree, other = _tree(), _tree()
    other["layers"]["0"]["kernel"] = np.zeros((40, 65), np.float32)
    with pytest.raises(S.StructureMismatchError, match="layers/0/kernel"):
        ch.receive(ch.send(other, sender="asia", recipient="aggregator", round=1), like=tree,
                   sender="asia", recipient="aggregator", round=1)
    data = ch.send(tree, sender="asia", recipient="aggregator", round=1)
    ch.receive(data, like=tree, sender="asia", recipient="aggregator", round=1)
    with pytest.raises(S.ReplayError):
        ch.receive(data, like=tree, sender="asia", recipient="aggregator", round=1)
    # A channel restored from its checkpointed state keeps sequence numbers and replay records.
    state = ChannelState()
    ch1 = sealed_channel(ids, trust, "run-1", state=state)
    data = ch1.send(tree, sender="asia", recipient="aggregator", round=2)
    ch1.receive(data, like=tree, sender="asia", recipient="aggregator", round=2)
    ch2 = sealed_channel(ids, trust, "run-1", state=ChannelState.from_dict(json.loads(
        json.dumps(state.to_dict()))))
    with pytest.raises(S.ReplayError):
        ch2.receive(data, like=tree, sender="asia", recipient="aggregator", round=2)
    nxt = ch2.send(tree, sender="asia", recipient="aggregator", round=2)
    assert ch2.receive(nxt, like=tree, sender="asia", recipient="aggregator", round=2)[1]["seq"] == "1"


@pytest.mark.parametrize("method", ["bf16", "int8"])
def test_compression_error_bounds_and_exact_small_leaves(ids, trust, method):
    tree = _tree()
    ch = sealed_channel(ids, trust, "run-1", compression=method, compress_recipients={"aggregator"},
                        compression_min_size=100)
    data = ch.send(tree, sender="europe", recipient="aggregator", round=1)
    got, _ = ch.receive(data, like=tree, sender="europe", recipient="aggregator", round=1)
    # The signed header carries the method and min_size: a receiver configured otherwise decodes alike.
    again, _ = sealed_channel(ids, trust, "run-1").receive(data, like=tree, sender="europe",
                                                            recipient="aggregator", round=1)
    assert _bits(again) == _bits(got)
    err = C.compression_error(tree, got)
    k = np.asarray(tree["layers"]["0"]["kernel"])
    if method == "bf16":  # round to nearest: relative error <= 2^-9 per value
        assert err["layers/0/kernel"]["rel_l2"] <= 2.0 ** -9
        assert got["layers"]["1"]["kernel"].tobytes() == tree["layers"]["1"]["kernel"].tobytes()
    else:  # int8: |error| <= scale / 2
        assert err["layers/0/kernel"]["max_abs"] <= np.abs(k).max() / 127 / 2 * (1 + 1e-6)
        assert err["layers/1/kernel"]["rel_l2"] < 0.02
    assert err["layers/0/kernel"]["rel_l2"] > 0
    assert got["weight"] == tree["weight"] and got["count"] == 7  # scalars stay exact
    plain_size = len(ch.send(tree, sender="aggregator", recipient="europe", round=1))  # not compressed
    assert len(data) < plain_size * (0.75 if method == "bf16" else 0.5)
    down, _ = ch.receive(ch.send(tree, sender="aggregator", recipient="europe", round=1), like=tree,
                         sender="aggregator", recipient="europe", round=1)
    assert _bits(down) == _bits(tree)


def test_hashes_computed_beside_the_aead_loop_change_nothing(ids, trust, monkeypatch):
    """seal() hashes the payload, and open_sealed() the frames, on a worker thread for large messages;
    with the threshold at 0 every message takes that path: round trips against the sequential stream
    path both ways, and every flipped bit is still refused with its named error."""
    monkeypatch.setattr(S, "PARALLEL_HASH_MIN_BYTES", 0)
    calls = []
    beside = S._sha256_beside
    monkeypatch.setattr(S, "_sha256_beside", lambda data: calls.append(len(data)) or beside(data))
    for n in (1, CHUNK, 3 * CHUNK + 5):
        test_round_trip_bytes_and_stream(ids, trust, "aes-256-gcm", n)
    assert calls  # the worker-thread path ran
    payload = os.urandom(2 * CHUNK + 3)
    wire = b"".join(S.seal_stream([payload], length=len(payload), sender=ids["americas"],
                                  recipient=trust["aggregator"], round=3, seq=0, run_id="run-1",
                                  chunk_bytes=CHUNK))  # sequential hashes on the sealing side
    assert _open(ids, trust, wire)[0] == payload  # opened with the frames hashed beside
    test_every_bit_flip_is_rejected(ids, trust)
