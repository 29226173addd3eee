"""Tests for fedjax_llm.data against independent references: YAML counted by hand, hand-built rows, counting."""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
import yaml

from fedjax_llm.config import CloudConfig, CloudsConfig, DataConfig, PartitionConfig
from fedjax_llm.data import corpus, federated, tokenizer as tok_mod
from fedjax_llm.data import (BOS, EOS, PAD, SEP, Example, FederatedData, build_federated_data, encode_examples,
                             eval_batches, load_chatterbot, load_jsonl, load_or_train_tokenizer,
                             partition_dirichlet, partition_iid, partition_natural, round_batches, split_eval)

SELECT = {"americas": ["english"],
          "europe": ["italian", "spanish", "portuguese", "french", "german", "dutch", "swedish"],
          "asia": ["chinese", "traditionalchinese", "japanese", "korean"]}


def _clouds(select=SELECT, clients=3) -> CloudsConfig:
    return CloudsConfig(members={n: CloudConfig(clients=clients, select=list(s)) for n, s in select.items()})


def _write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


# ---------------------------------------------------------------- corpus

def test_chatterbot_pairs_match_yaml_count():
    path = os.path.join(corpus.chatterbot_root(), "english", "greetings.yml")
    with open(path, encoding="utf-8") as f:
        convs = yaml.safe_load(f)["conversations"]
    expected = sum(len(c) - 1 for c in convs)             # every turn in this file is a string
    got = load_chatterbot(["english"], ["greetings"])
    assert len(got) == expected
    assert (got[0].prompt, got[0].response) == (convs[0][0], convs[0][1])
    assert dict(got[0].meta) == {"language": "english", "category": "greetings", "source": "english/greetings"}


def test_chatterbot_selection_errors_name_key():
    with pytest.raises(ValueError, match=r"data\.languages.*klingon.*english"):
        load_chatterbot(["klingon"])
    with pytest.raises(ValueError, match=r"data\.categories.*nonsense.*greetings"):
        load_chatterbot(["english"], ["nonsense"])


def test_conversation_pairs_skip_non_string_turns():
    assert corpus.conversation_pairs(["a", 5, "b", "c", None]) == [("b", "c")]
    assert corpus.conversation_pairs(["a", "b", "c"]) == [("a", "b"), ("b", "c")]
    assert corpus.conversation_pairs("not a list") == []


# ---------------------------------------------------------------- jsonl

def test_jsonl_forms_and_meta(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Hi", "response": "Hello", "client": "u1", "cloud": "eu", "label": "greet", "score": 3},
        "",
        {"text": "a whole document", "flag": True, "nested": {"x": 1}, "none": None},
    ])
    got = load_jsonl(path)
    assert got[0] == Example("Hi", "Hello", {"client": "u1", "cloud": "eu", "label": "greet", "score": "3"})
    assert got[1] == Example("", "a whole document", {"flag": "true"})


@pytest.mark.parametrize("lines, pattern", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "resp'], r":2: bad JSON"),
    (['{"prompt": "a", "response": "b"}', '', '{"prompt": "a"}'], r":3: missing field 'response'"),
    (['{"client": "x"}'], r":1: missing field"),
    (['{"text": 7}'], r":1: .*'text' must be a string"),
    (['[1, 2]'], r":1: expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, pattern):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=pattern) as e:
        load_jsonl(path)
    assert "bad.jsonl" in str(e.value)


def test_jsonl_missing_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.path.*nope\.jsonl"):
        load_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"data\.path.*empty\.jsonl.*no records"):
        load_jsonl(_write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))


# ---------------------------------------------------------------- tokenizer

TEXTS = ["Hello, how are you doing today?", "I am fine, thank you very much.",
         "こんにちは、お元気ですか？", "元気です、ありがとう。", "سلام، حال شما چطور است؟", "خوبم، ممنون."] * 20


def test_tokenizer_roundtrip_and_special_ids(tmp_path):
    tok = load_or_train_tokenizer(TEXTS, 400, str(tmp_path))
    assert [tok.token_to_id(s) for s in ("<pad>", "<bos>", "<eos>", "<sep>")] == [PAD, BOS, EOS, SEP] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= 400
    for text in TEXTS[:6] + ["Unseen words: zebra 🦓 ñandú", "未知の文字列です", "کتابخانه جدید"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_tokenizer_cache_hit_does_not_retrain(tmp_path, monkeypatch):
    tok1 = load_or_train_tokenizer(TEXTS, 400, str(tmp_path))
    (path,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    assert os.path.basename(path).startswith("bpe-") and path.endswith("-400.json")
    before = (os.stat(path).st_mtime_ns, open(path, "rb").read())

    def no_training(*a, **k):
        raise AssertionError("retrained on a cache hit")
    monkeypatch.setattr(tok_mod, "_train", no_training)
    tok2 = load_or_train_tokenizer(TEXTS, 400, str(tmp_path))
    assert (os.stat(path).st_mtime_ns, open(path, "rb").read()) == before
    assert tok2.get_vocab() == tok1.get_vocab()
    monkeypatch.undo()

    load_or_train_tokenizer(TEXTS, 320, str(tmp_path))   # another vocab size: another file
    load_or_train_tokenizer(TEXTS[:-1], 400, str(tmp_path))  # other texts: another file
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith(".json"))
    assert len(names) == 3 and sum(n.endswith("-320.json") for n in names) == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """256 bytes + 4 specials = 260: no merges, so each ASCII character is exactly one token."""
    return load_or_train_tokenizer(["abcdefgh uvwxyz"], 260, str(tmp_path_factory.mktemp("bytetok")))


def test_encode_layout_and_truncation(byte_tok):
    c = {ch: byte_tok.token_to_id(ch) for ch in "abcdefghuvwxyz"}
    examples = [Example("ab", "cd", {}), Example("", "ab", {}), Example("abcdefgh", "xyz", {}),
                Example("abcdefgh", "x", {}), Example("ab", "uvwxyz", {})]
    enc = encode_examples(byte_tok, examples, 8)
    expected_tokens = [
        [BOS, c["a"], c["b"], SEP, c["c"], c["d"], EOS, PAD],
        [BOS, SEP, c["a"], c["b"], EOS, PAD, PAD, PAD],
        [BOS, c["f"], c["g"], c["h"], SEP, c["x"], c["y"], c["z"]],        # prompt cut to half, no EOS
        [BOS, c["e"], c["f"], c["g"], c["h"], SEP, c["x"], EOS],           # short response leaves room
        [BOS, c["a"], c["b"], SEP, c["u"], c["v"], c["w"], c["x"]],        # response cut on the right
    ]
    expected_mask = [[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1],
                     [0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]
    np.testing.assert_array_equal(enc.tokens, np.array(expected_tokens, np.int32))
    np.testing.assert_array_equal(enc.loss_mask, np.array(expected_mask, np.float32))
    assert enc.tokens.dtype == np.int32 and enc.loss_mask.dtype == np.float32
    assert enc.num_truncated == 3


# ---------------------------------------------------------------- partitions

def _assert_partition(parts, indices):
    allp = np.concatenate(parts)
    assert len(allp) == len(indices) and np.array_equal(np.sort(allp), np.sort(indices))
    assert all(len(p) > 0 for p in parts)


def _synthetic(n=2000, n_labels=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.permutation(n) + 7000, rng.integers(0, n_labels, n)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural"])
def test_partitions_disjoint_cover_and_reproducible(kind):
    indices, labels = _synthetic()
    def run(seed):
        rng = np.random.default_rng(seed)
        if kind == "iid":
            return partition_iid(indices, 7, rng)
        if kind == "dirichlet":
            return partition_dirichlet(indices, labels, 7, 0.5, rng)
        return partition_natural(indices, labels, 7, rng)
    parts = run(3)
    _assert_partition(parts, indices)
    assert all(np.array_equal(a, b) for a, b in zip(parts, run(3)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, run(4))) or kind == "natural"
    if kind == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_natural_keeps_groups_whole_and_splits_when_too_few():
    indices = np.arange(100) * 3
    groups = np.array(["g%d" % (i % 9) for i in range(100)])
    parts = partition_natural(indices, groups, 4, np.random.default_rng(0))
    _assert_partition(parts, indices)
    owner = {int(i): c for c, p in enumerate(parts) for i in p}
    for g in set(groups):
        assert len({owner[int(i)] for i in indices[groups == g]}) == 1, g
    sizes = sorted(len(p) for p in parts)                 # 9 groups of 11-12 packed onto 4 clients
    assert sizes[-1] - sizes[0] <= 12
    parts = partition_natural(indices, np.zeros(100), 5, np.random.default_rng(0))  # 1 group, 5 clients
    _assert_partition(parts, indices)


def _mean_tv(parts, labels_of, n_labels):
    glob = np.bincount(np.concatenate([labels_of[p] for p in parts]), minlength=n_labels)
    glob = glob / glob.sum()
    tvs = [0.5 * np.abs(np.bincount(labels_of[p], minlength=n_labels) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tvs))


def test_dirichlet_skew_grows_as_alpha_falls():
    indices, labels = _synthetic(n=3000, n_labels=10)
    labels_of = np.zeros(indices.max() + 1, np.int64)
    labels_of[indices] = labels
    tv = {a: np.mean([_mean_tv(partition_dirichlet(indices, labels, 10, a, np.random.default_rng(s)), labels_of, 10)
                      for s in range(4)]) for a in (100.0, 1.0, 0.05)}
    assert tv[100.0] < 0.1 < tv[1.0] < tv[0.05], tv
    assert tv[0.05] > 0.6, tv


def test_dirichlet_min_size_and_error():
    indices, labels = _synthetic(n=1000)
    parts = partition_dirichlet(indices, labels, 8, 0.3, np.random.default_rng(1), min_size=40)
    _assert_partition(parts, indices)
    assert min(map(len, parts)) >= 40
    with pytest.raises(ValueError, match=r"partition\.alpha"):
        partition_dirichlet(indices, labels, 50, 0.01, np.random.default_rng(1), min_size=15, max_tries=20)


def test_partition_too_few_examples_names_client():
    for fn in (lambda: partition_iid(np.arange(3), 5, np.random.default_rng(0)),
               lambda: partition_natural(np.arange(3), np.arange(3), 5, np.random.default_rng(0)),
               lambda: partition_dirichlet(np.arange(3), np.zeros(3), 5, 1.0, np.random.default_rng(0))):
        with pytest.raises(ValueError, match=r"client 3 of 5.*clouds\.members"):
            fn()


@pytest.mark.parametrize("n, fraction, n_eval", [(10, 0.1, 1), (2, 0.1, 1), (1, 0.5, 0), (3, 0.9, 2),
                                                 (40, 0.25, 10), (10, 0.0, 0)])
def test_split_eval_sizes(n, fraction, n_eval):
    indices = np.arange(n) + 100
    train, ev = split_eval(indices, fraction, np.random.default_rng(0))
    assert len(ev) == n_eval and len(train) == n - n_eval >= 1
    assert np.array_equal(np.sort(np.concatenate([train, ev])), indices)


# ---------------------------------------------------------------- federated population

@pytest.fixture(scope="module")
def default_fd(tmp_path_factory):
    """The default experiment's population, built once; records the texts the tokenizer was trained on."""
    seen = {}
    def spy(texts, vocab_size, cache_dir):
        seen["texts"] = list(texts)
        return load_or_train_tokenizer(texts, vocab_size, cache_dir)
    cfg = DataConfig(tokenizer_cache=str(tmp_path_factory.mktemp("tok")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(federated, "load_or_train_tokenizer", spy)
        fd = build_federated_data(cfg, PartitionConfig(), _clouds(), seed=0)
    return fd, seen["texts"]


def test_default_population_clouds_and_clients(default_fd):
    fd, _ = default_fd
    assert fd.cloud_names == ["americas", "europe", "asia"]
    assert fd.client_names[:4] == ["americas/0", "americas/1", "americas/2", "europe/0"]
    np.testing.assert_array_equal(fd.client_cloud, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    wanted = collections.Counter(e.meta["language"] for e in load_chatterbot())
    for c, (tr, ev) in enumerate(zip(fd.train_idx, fd.eval_idx)):
        langs = {fd.examples[i].meta["language"] for i in np.concatenate([tr, ev])}
        assert langs <= set(SELECT[fd.cloud_names[fd.client_cloud[c]]])
        assert len(tr) > 0 and len(ev) > 0 and not set(tr) & set(ev)
        sources = {fd.examples[i].meta["source"] for i in np.concatenate([tr, ev])}
        others = {fd.examples[i].meta["source"] for o in range(fd.num_clients) if o != c
                  for i in np.concatenate([fd.train_idx[o], fd.eval_idx[o]])}
        assert not sources & others                        # natural partition: sources stay whole
    everything = np.sort(np.concatenate(fd.train_idx + fd.eval_idx))
    np.testing.assert_array_equal(everything, np.arange(len(fd.tokens)))
    n_selected = sum(wanted[lang] for langs in SELECT.values() for lang in langs)
    assert len(fd.tokens) == n_selected and fd.excluded == sum(wanted.values()) - n_selected
    assert fd.tokens.shape == (n_selected, 64) and fd.vocab_size <= 2048


def test_tokenizer_trained_on_train_split_only(default_fd):
    fd, texts = default_fd
    train = [t for i in np.concatenate(fd.train_idx) for t in (fd.examples[i].prompt, fd.examples[i].response)]
    assert collections.Counter(texts) == collections.Counter(train)


def test_eval_indices_cap(default_fd):
    fd, _ = default_fd
    europe = fd.eval_indices(1, 0)
    np.testing.assert_array_equal(europe, np.sort(np.concatenate(fd.eval_idx[3:6])))
    capped = fd.eval_indices(None, 50)
    assert len(capped) == 50 and set(capped) <= set(np.concatenate(fd.eval_idx))
    np.testing.assert_array_equal(capped, fd.eval_indices(None, 50))


def _jsonl_population(tmp_path, n_per_cloud=(12, 8), extra=()):
    records = [{"prompt": f"q{c}{i}", "response": f"answer {c} {i}", "cloud": c, "client": f"u{i % 4}"}
               for c, n in zip("ab", n_per_cloud) for i in range(n)] + list(extra)
    return DataConfig(source="jsonl", path=_write_jsonl(tmp_path / "pop.jsonl", records), vocab_size=300,
                      seq_len=16, tokenizer_cache=str(tmp_path / "tok"))


def _part(kind="natural", **kw) -> PartitionConfig:
    return PartitionConfig(kind=kind, cloud_field="cloud", client_field="client", **kw)


def test_jsonl_population_reproducible_and_excluded(tmp_path):
    cfg = _jsonl_population(tmp_path, extra=[{"text": "orphan", "cloud": "z", "client": "u9"}])
    clouds = _clouds({"x": ["a"], "y": ["b"]}, clients=2)
    fd1 = build_federated_data(cfg, _part("iid"), clouds, seed=5)
    fd2 = build_federated_data(cfg, _part("iid"), clouds, seed=5)
    assert fd1.excluded == 1 and len(fd1.tokens) == 20
    assert all(np.array_equal(a, b) for a, b in zip(fd1.train_idx + fd1.eval_idx, fd2.train_idx + fd2.eval_idx))
    shared = build_federated_data(cfg, _part("iid"), _clouds({"x": [], "y": []}, clients=2), 5)
    assert shared.excluded == 0 and len(shared.tokens) == 21 and shared.num_clients == 4


def test_population_errors_name_the_key(tmp_path):
    cfg = _jsonl_population(tmp_path)
    with pytest.raises(ValueError, match=r"clouds\.members\.y\.select.*'klingon'"):
        build_federated_data(cfg, _part(), _clouds({"x": ["a"], "y": ["klingon"]}), 0)
    with pytest.raises(ValueError, match=r"client y/8 .*fewer clients"):
        build_federated_data(cfg, _part("iid"), _clouds({"x": ["a"], "y": ["b"]}, clients=10), 0)
    with pytest.raises(ValueError, match=r"partition\.cloud_field='region'"):
        build_federated_data(cfg, PartitionConfig(cloud_field="region"), _clouds({"x": ["a"], "y": ["b"]}), 0)
    with pytest.raises(ValueError, match=r"partition\.label_field"):
        build_federated_data(cfg, _part("dirichlet"), _clouds({"x": ["a"], "y": ["b"]}), 0)


# ---------------------------------------------------------------- round batches

def _toy_fd(sizes=(12, 5, 3), T=4) -> FederatedData:
    """Row i of tokens starts with 100 + i, so a batch shows which examples it holds."""
    n = sum(sizes) + 2                                    # two extra rows used only as eval
    tokens = np.zeros((n, T), np.int32)
    tokens[:, 0] = 100 + np.arange(n)
    tokens[:, 1] = 7
    mask = np.zeros((n, T), np.float32)
    mask[:, 1] = 1.0
    starts = np.cumsum((0,) + sizes)
    train = [np.arange(starts[i], starts[i + 1]) for i in range(len(sizes))]
    return FederatedData(tokens=tokens, loss_mask=mask, train_idx=train,
                         eval_idx=[np.array([n - 2]), np.array([n - 1]), np.zeros(0, np.int64)],
                         client_names=["a/0", "a/1", "b/0"], client_cloud=np.array([0, 0, 1], np.int32),
                         cloud_names=["a", "b"], tokenizer=None, num_truncated=0, excluded=0)


def _perm(seed, client, epoch, n):
    return np.random.default_rng(np.random.SeedSequence([seed, client, epoch])).permutation(n)


def test_round_batches_one_epoch_each_example_once():
    fd = _toy_fd()
    cursors = np.zeros(3, np.int64)
    rb = round_batches(fd, np.array([0]), cursors, steps=3, batch_size=4, data_seed=11)
    ids = rb.tokens[0, :, :, 0].reshape(-1) - 100
    assert sorted(ids.tolist()) == list(range(12))
    np.testing.assert_array_equal(ids, fd.train_idx[0][_perm(11, 0, 0, 12)])
    np.testing.assert_array_equal(rb.cursors, [12, 0, 0])
    np.testing.assert_array_equal(cursors, [0, 0, 0])                   # input not mutated
    assert rb.step_mask.all() and rb.loss_mask[..., 1].all() and rb.tokens.shape == (1, 3, 4, 4)
    again = round_batches(fd, np.array([0]), cursors, 3, 4, 11)
    np.testing.assert_array_equal(again.tokens, rb.tokens)
    nxt = round_batches(fd, np.array([0]), rb.cursors, 3, 4, 11)
    assert sorted((nxt.tokens[0, :, :, 0].reshape(-1) - 100).tolist()) == list(range(12))


def test_round_batches_wraps_into_next_epoch():
    fd = _toy_fd()
    rb = round_batches(fd, np.array([2, 1]), np.array([0, 3, 1]), steps=2, batch_size=2, data_seed=4)
    # client 2 (n=3, cursor 1): slots 1, 2 of epoch 0 then 0, 1 of epoch 1.
    want2 = fd.train_idx[2][np.r_[_perm(4, 2, 0, 3)[1:3], _perm(4, 2, 1, 3)[0:2]]]
    want1 = fd.train_idx[1][np.r_[_perm(4, 1, 0, 5)[3:5], _perm(4, 1, 1, 5)[0:2]]]
    np.testing.assert_array_equal(rb.tokens[0, :, :, 0].reshape(-1) - 100, want2)
    np.testing.assert_array_equal(rb.tokens[1, :, :, 0].reshape(-1) - 100, want1)
    np.testing.assert_array_equal(rb.cursors, [0, 7, 5])


def test_round_batches_local_epochs_masks_rows_and_steps():
    fd = _toy_fd()
    rb = round_batches(fd, np.array([1, 0, 2]), np.zeros(3, np.int64), steps=4, batch_size=2, data_seed=0,
                       local_epochs=1.0)
    # client 1: n=5 -> 5 examples, 3 steps (2+2+1), step 4 skipped; client 0: n=12 -> capped at 4 full steps;
    # client 2: n=3 -> 2 steps (2+1).
    np.testing.assert_array_equal(rb.step_mask, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    rows = np.array([[[1, 1], [1, 1], [1, 0], [0, 0]], [[1, 1]] * 4, [[1, 1], [1, 0], [0, 0], [0, 0]]])
    np.testing.assert_array_equal(rb.loss_mask[..., 1], rows)
    np.testing.assert_array_equal(rb.tokens[..., 0] != PAD, rows.astype(bool))
    assert not rb.loss_mask[rows == 0].any() and not rb.tokens[rows == 0].any()
    assert sorted((rb.tokens[0, ..., 0][rows[0] == 1] - 100).tolist()) == fd.train_idx[1].tolist()
    np.testing.assert_array_equal(rb.cursors, [8, 5, 3])
    rb2 = round_batches(fd, np.array([2]), np.zeros(3, np.int64), 4, 2, 0, local_epochs=2.0)
    np.testing.assert_array_equal(rb2.step_mask, [[1, 1, 1, 0]])      # 6 examples over two epochs
    np.testing.assert_array_equal(rb2.cursors, [0, 0, 6])


def test_round_batches_rejects_repeated_clients():
    with pytest.raises(ValueError, match="repeat"):
        round_batches(_toy_fd(), np.array([1, 1]), np.zeros(3, np.int64), 1, 1, 0)


def test_eval_batches_pad_last_batch():
    fd = _toy_fd()
    idx = np.array([0, 5, 9, 13, 20])
    tokens, mask = eval_batches(fd, idx, 2)
    assert tokens.shape == (3, 2, 4) and mask.shape == (3, 2, 4)
    np.testing.assert_array_equal(tokens[..., 0].reshape(-1), [100, 105, 109, 113, 120, PAD])
    np.testing.assert_array_equal(mask[..., 1].reshape(-1), [1, 1, 1, 1, 1, 0])
    assert not tokens[2, 1].any()
