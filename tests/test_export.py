"""Export of tiny trained runs, loaded back with `transformers` and `peft` (the independent reference):
logits parity with our model on the checkpoint's params, tokenizer ids, and greedy generation."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from fedjax_llm import export, generate as gen  # noqa: E402
from fedjax_llm.data.tokenizer import BOS, EOS, PAD, SEP  # noqa: E402
from fedjax_llm.models.params import model_fns  # noqa: E402
from fedjax_llm.runs import load_run  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import compose_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
TOL = 1e-4
TEXTS = ["How are you?", "Quel est ton nom? Ça va.", "你好，世界", "  spaces\tand\nlines 123 🙂"]
RUNS = {  # GQA in both; tied embeddings in the full run; LoRA on attention and the MLP
    "full": ["model.n_kv_heads=2", "model.tie_embeddings=true"],
    "lora": ["model.n_kv_heads=2", "model.lora.enabled=true", "client.lr=0.05", "checkpoint.every=1",
             "model.lora.targets=[q_proj,v_proj,o_proj,down_proj]"],
}
# FedEx-LoRA with mixed ranks moves the frozen base every round; only test_fedex_* uses it
FEDEX = ["model.n_kv_heads=2", "model.lora.enabled=true", "client.lr=0.05", "checkpoint.every=1",
         "model.lora.aggregation=fedex", "model.lora.client_ranks=[2,8]"]


_EXPORTS: dict = {}


def _export(kind, tmp_path_factory, tokenizer_cache):
    """(run, export dir) of a 2-round smoke run, trained once per module and kind."""
    from fedjax_llm.train import run as train

    if kind not in _EXPORTS:
        root = tmp_path_factory.mktemp(kind)
        cfg = compose_config(["debug=smoke", "checkpoint.enabled=true", "run.rounds=2",
                              f"data.tokenizer_cache={tokenizer_cache}", *(RUNS.get(kind) or FEDEX)])
        train(cfg, str(root / "run"))
        run = load_run(str(root / "run"))
        export.export_loaded(run, root / "hf")
        _EXPORTS[kind] = run, root / "hf"
    return _EXPORTS[kind]


@pytest.fixture(scope="module", params=sorted(RUNS))
def exported(request, tmp_path_factory, tokenizer_cache):
    return _export(request.param, tmp_path_factory, tokenizer_cache)


@pytest.fixture(scope="module")
def lora_exported(tmp_path_factory, tokenizer_cache):
    return _export("lora", tmp_path_factory, tokenizer_cache)


def _tokens(run):
    rows, _ = gen.encode_prompts(run.tokenizer, TEXTS, run.cfg.data.seq_len)
    return np.where(rows == PAD, np.arange(rows.shape[1]) % 50 + 4, rows)  # no padding: full rows


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def test_transformers_loads_the_model_with_logits_parity(exported):
    run, out = exported
    tokens = _tokens(run)
    ours = np.asarray(model_fns(run.spec).apply(run.trainable, run.frozen, tokens))
    model = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings == run.spec.tie_embeddings
    assert np.abs(_torch_logits(model, tokens) - ours).max() < TOL
    meta = json.loads((out / "fedjax_llm_export.json").read_text())
    assert meta["round"] == 2 and meta["lora"] == (run.spec.lora is not None)
    assert (out / "adapter").is_dir() == (run.spec.lora is not None)


def test_peft_adapter_on_the_exported_base(lora_exported):
    run, out = lora_exported
    tokens = _tokens(run)
    ours = np.asarray(model_fns(run.spec).apply(run.trainable, run.frozen, tokens))
    base = tf.AutoModelForCausalLM.from_pretrained(out / "base").eval()
    base_logits = _torch_logits(base, tokens)
    model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    assert np.abs(_torch_logits(model, tokens) - ours).max() < TOL
    assert np.abs(base_logits - ours).max() > 10 * TOL  # the adapters matter
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]


def test_fedex_run_exports_its_moved_base(tmp_path_factory, tokenizer_cache):
    """FedEx-LoRA folds residuals into the base: the export's merged model, and PEFT's adapter on the
    exported base, both match our model on the moved base, which differs from the initial one."""
    run, out = _export("fedex", tmp_path_factory, tokenizer_cache)
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.server import Federation
    initial_base = Federation(run.cfg, build_federated_data(run.cfg.data, run.cfg.partition, run.cfg.clouds,
                                                            run.cfg.seed)).frozen
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(run.frozen), jax.tree.leaves(initial_base))]
    assert max(moved) > 0
    assert all(np.array_equal(np.asarray(a), np.asarray(b))  # generate --before pairs round 0 with this
               for a, b in zip(jax.tree.leaves(run.initial_base), jax.tree.leaves(initial_base)))
    tokens = _tokens(run)
    ours = np.asarray(model_fns(run.spec).apply(run.trainable, run.frozen, tokens))
    merged = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(_torch_logits(merged, tokens) - ours).max() < TOL
    base = tf.AutoModelForCausalLM.from_pretrained(out / "base").eval()
    model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    assert np.abs(_torch_logits(model, tokens) - ours).max() < TOL
    stale = np.asarray(model_fns(run.spec).apply(run.trainable, initial_base, tokens))
    assert np.abs(stale - ours).max() > 10 * TOL  # the residuals matter


def test_auto_tokenizer_encodes_like_ours(exported):
    run, out = exported
    tok = tf.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.sep_token_id) == (PAD, BOS, EOS, SEP)
    for text in TEXTS:
        want = run.tokenizer.encode(text, add_special_tokens=False).ids
        assert tok(text).input_ids == want
        assert tok.decode(want) == run.tokenizer.decode(want)


def test_transformers_greedy_generate_matches_ours(exported):
    """HF's generate (its own KV cache, EOS from generation_config) vs our cached greedy decoding."""
    run, out = exported
    model = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = tf.AutoTokenizer.from_pretrained(out, local_files_only=True)
    n = 12
    rows, lengths = gen.encode_prompts(run.tokenizer, TEXTS[:2], run.cfg.data.seq_len)
    ours, count = gen.generate(run.spec, run.trainable, run.frozen, rows, lengths, jax.random.key(0),
                               max_new_tokens=n, greedy=True)
    for i, text in enumerate(TEXTS[:2]):
        ids = [BOS, *tok(text).input_ids, SEP]
        with torch.no_grad():
            got = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        assert got[0, len(ids):].tolist() == ours[i, :count[i]].tolist()


def test_cli_merged_and_step(lora_exported, tmp_path, capsys):
    """--merged writes the merged model only; --step exports an older round."""
    run, _ = lora_exported
    out = tmp_path / "merged"
    assert export.main([run.run_dir, "--out", str(out), "--merged", "--step", "1"]) == 0
    assert f"model: {out}" in capsys.readouterr().out
    assert not (out / "adapter").exists() and not (out / "base").exists()
    assert json.loads((out / "fedjax_llm_export.json").read_text())["round"] == 1
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_minilm_lora_classifier_run_exports_to_transformers_and_peft(tmp_path, tokenizer_cache):
    """The default task's run (MiniLM + LoRA, topic classifier) exported: BertForSequenceClassification
    and PeftModel on the exported base give our logits; labels and the tokenizer come along."""
    import numpy as np
    import peft
    import torch
    import transformers as tf

    from fedjax_llm.train import run as train
    cfg = compose_config(["task=topics", "debug=smoke", "checkpoint.enabled=true", "run.rounds=1",
                          "client.lr=0.05", "data.max_eval_examples=8"])
    train(cfg, str(tmp_path / "run"))
    run = load_run(str(tmp_path / "run"))
    written = export.export_loaded(run, tmp_path / "hf")
    text = ["what is the stock market", "tell me a joke about computers"]
    tok = tf.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    enc = tok(text, padding="max_length", max_length=cfg.data.seq_len, return_tensors="np")
    ours = np.asarray(run_logits(run, enc["input_ids"], enc["attention_mask"]))
    model = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    assert model.config.id2label[3] == run.label_names[3] and len(run.label_names) == 16
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(enc["input_ids"]),
                       attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    assert np.max(np.abs(theirs - ours)) < 1e-4
    base = tf.AutoModelForSequenceClassification.from_pretrained(written["base"]).eval()
    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(base, written["adapter"]).eval()(
            input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    assert np.max(np.abs(peft_logits - ours)) < 1e-4
    from fedjax_llm.generate import classify  # the CLI's label view agrees with transformers' argmax
    ranked = classify(run, run.trainable, text)
    assert [r[0][0] for r in ranked] == [model.config.id2label[int(i)] for i in theirs.argmax(-1)]


def run_logits(run, ids, mask):
    from fedjax_llm.models.params import model_fns
    return model_fns(run.spec).apply(run.trainable, run.frozen, ids, None, attention_mask=mask)
