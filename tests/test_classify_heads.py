"""Sequence-classification heads on decoders (vs transformers' *ForSequenceClassification) and the
bag-of-embeddings classifier (vs a hand-written NumPy forward)."""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedjax_llm.models import (BowSpec, GPT2Spec, LlamaSpec, LoRASpec, check_spec,  # noqa: E402
                               count_params, init_model, model_fns)
from fedjax_llm.models.families import HFConfigError, family_for_spec  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
TOL, LABELS, PAD, T = 1e-4, 3, 0, 9
LENGTHS = (9, 5, 1)  # real tokens per row; right padding with PAD after them
SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
             num_labels=LABELS, pad_token_id=PAD)


def hf_cases() -> dict:
    """name: (classifier class, causal-LM class, config); GQA, q/k/v bias + tied, window, GPT-2."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    return {
        "llama_gqa": (tf.LlamaForSequenceClassification, tf.LlamaForCausalLM, tf.LlamaConfig(
            **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=500.0,
            rms_norm_eps=1e-3)),
        "qwen2_bias_tied": (tf.Qwen2ForSequenceClassification, tf.Qwen2ForCausalLM,
                            tf.Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=1,
                                           tie_word_embeddings=True)),
        "mistral_window": (tf.MistralForSequenceClassification, tf.MistralForCausalLM,
                           tf.MistralConfig(**SMALL, num_attention_heads=6, num_key_value_heads=2,
                                            head_dim=12, sliding_window=64)),
        "gpt2": (tf.GPT2ForSequenceClassification, tf.GPT2LMHeadModel, tf.GPT2Config(
            vocab_size=97, n_embd=48, n_layer=2, n_head=2, n_positions=32, num_labels=LABELS,
            pad_token_id=PAD, bos_token_id=1, eos_token_id=1)),
    }


def torch_model(case: str, causal_lm: bool = False, seed: int = 0):
    """The case's HF model with O(1) random weights (as tests/test_hf_io.py draws them)."""
    import torch
    cls, lm_cls, config = hf_cases()[case]
    torch.manual_seed(seed)
    model = (lm_cls if causal_lm else cls)(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                norm = any(s in name for s in ("norm", "ln_"))
                p.copy_(1 + 0.2 * z if norm and name.endswith("weight") else 0.3 * z)
            elif "embed" in name or "wte" in name or "wpe" in name:
                p.copy_(z)
            else:  # Conv1D (GPT-2) is [in, out], Linear [out, in]
                p.copy_(z / np.sqrt(p.shape[0] if ".c_" in name else p.shape[1]))
    return model


def padded_inputs(seed: int = 1) -> dict[str, np.ndarray]:
    """Tokens 1..96 on real positions, PAD after them: HF's pad_token_id rule and our mask agree."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, 97, (len(LENGTHS), T)), PAD)
    return {"input_ids": ids, "attention_mask": mask}


def torch_logits(model, x: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in x.items()}).logits.numpy()


def our_logits(fns, trainable, frozen, x: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(jax.jit(fns.apply)(trainable, frozen, jnp.asarray(x["input_ids"], jnp.int32),
                                         attention_mask=jnp.asarray(x["attention_mask"])))


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa", "mistral_window", "qwen2_bias_tied"])
def test_parity_with_transformers(case, tmp_path):
    """*ForSequenceClassification -> ours: logits of the last real token within 1e-4."""
    from fedjax_llm.models.hf_io import load_hf
    model = torch_model(case)
    model.save_pretrained(tmp_path)
    x = padded_inputs()
    fns, trainable, frozen, info = load_hf(tmp_path, tokenizer=False)
    assert info.architecture == type(model).__name__ and info.initialized == []
    assert fns.spec.num_labels == LABELS and set(trainable) >= {"score"} and frozen == {}
    ours = our_logits(fns, trainable, frozen, x)
    err = max_err(ours, torch_logits(model, x))
    print(f"{case}: max |ours - transformers| = {err:.2e}")
    assert ours.shape == (len(LENGTHS), LABELS) and err < TOL


def test_round_trip_bitwise_and_back_to_transformers(tmp_path):
    """Qwen2 classifier: import -> export -> import is bitwise; the export loads in transformers."""
    from transformers import AutoModelForSequenceClassification

    from fedjax_llm.models.hf_io import load_hf, save_hf
    torch_model("qwen2_bias_tied").save_pretrained(tmp_path / "hf")
    fns, trainable, frozen, info = load_hf(tmp_path / "hf", tokenizer=False)
    save_hf(tmp_path / "out", fns.spec, trainable, base_config=info.config)
    fns2, trainable2, _, info2 = load_hf(tmp_path / "out", tokenizer=False)
    assert fns2.spec == fns.spec and info2.architecture == "Qwen2ForSequenceClassification"
    assert_trees_equal(trainable2, trainable)
    back, loading = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not any(loading.values()), loading
    x = padded_inputs(seed=4)
    assert max_err(torch_logits(back.eval(), x), our_logits(fns, trainable, frozen, x)) < TOL


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa"])
def test_causal_lm_with_num_labels_draws_a_fresh_score(case, tmp_path):
    """load_hf(CausalLM dir, num_labels=N): base weights loaded, lm_head skipped, score drawn fresh
    (trainable beside LoRA adapters); with that score copied in, transformers agrees."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from fedjax_llm.models.hf_io import load_hf
    torch_model(case, causal_lm=True).save_pretrained(tmp_path)
    lora = LoRASpec(rank=2, alpha=4.0, targets=("c_attn",) if case == "gpt2" else ("q_proj",))
    fns, trainable, frozen, info = load_hf(tmp_path, num_labels=LABELS, lora=lora,
                                           key=jax.random.key(7), tokenizer=False)
    assert info.architecture.endswith("ForSequenceClassification")
    assert "score/kernel" in info.initialized and "score" in trainable and "score" not in frozen
    assert "lm_head" not in frozen
    assert info.ignored == ([] if case == "gpt2" else ["lm_head.weight"])  # GPT-2's is tied
    kernel = np.asarray(trainable["score"]["kernel"])
    assert kernel.shape == (48, LABELS) and 0 < kernel.std() < 0.1

    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=LABELS,
                                                             pad_token_id=PAD).eval()
    with torch.no_grad():
        ref.score.weight.copy_(torch.tensor(kernel.T))
    x = padded_inputs(seed=2)
    assert max_err(our_logits(fns, trainable, frozen, x), torch_logits(ref, x)) < TOL


def test_peft_adapter_of_a_decoder_classifier(tmp_path):
    """LoRA Llama classifier == PeftModel(LlamaForSequenceClassification) with our adapter."""
    import peft

    from fedjax_llm.models.hf_io import load_hf, save_peft_adapter
    model = torch_model("llama_gqa")
    model.save_pretrained(tmp_path / "base")
    lora = LoRASpec(rank=4, alpha=12.0, targets=("q_proj", "v_proj"))
    fns, trainable, frozen, _ = load_hf(tmp_path / "base", lora=lora, tokenizer=False)
    rng = np.random.default_rng(5)  # non-zero B and a moved score, so both matter
    trainable = jax.tree.map(lambda a: a + jnp.asarray(0.3 * rng.standard_normal(a.shape),
                                                       a.dtype), trainable)
    x = padded_inputs()
    ours = our_logits(fns, trainable, frozen, x)
    assert max_err(ours, torch_logits(model, x)) > 1e-2
    save_peft_adapter(tmp_path / "adapter", fns.spec, trainable, str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    assert max_err(torch_logits(peft_model, x), ours) < TOL


# Tiny specs for the JAX-only tests: GQA + bias Llama, untied GPT-2.
LLAMA = LlamaSpec(vocab_size=41, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24,
                  qkv_bias=True, num_labels=LABELS)
GPT2 = GPT2Spec(vocab_size=41, n_positions=16, d_model=16, n_layers=2, n_heads=2, ffn_dim=24,
                tie_embeddings=False, num_labels=LABELS)


def _noisy(tree, seed: int):
    """O(1) weights, so a wrong token choice changes the logits visibly."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)


@pytest.mark.parametrize("spec", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_padding_does_not_change_logits(spec):
    """Right padding (any pad ids, any amount) leaves each row's logits as without padding; without
    a mask the last position is classified."""
    fns, trainable, frozen = init_model(spec, jax.random.key(0))
    trainable = _noisy(trainable, 1)
    assert set(trainable) >= {"score"} and "lm_head" not in trainable
    apply = jax.jit(fns.apply)
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 41, n) for n in (6, 2, 4)]
    width = 11
    tokens = np.stack([np.concatenate([r, rng.integers(0, 41, width - len(r))]) for r in rows])
    mask = (np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
    padded = np.asarray(apply(trainable, frozen, jnp.asarray(tokens, jnp.int32),
                              attention_mask=jnp.asarray(mask)))
    assert padded.shape == (3, LABELS) and padded.dtype == np.float32
    for i, r in enumerate(rows):
        alone = np.asarray(apply(trainable, frozen, jnp.asarray(r[None], jnp.int32)))
        np.testing.assert_allclose(padded[i], alone[0], atol=1e-5, rtol=1e-5)
    last = np.asarray(apply(trainable, frozen, jnp.asarray(tokens, jnp.int32)))
    full = np.asarray(apply(trainable, frozen, jnp.asarray(tokens, jnp.int32),
                            attention_mask=jnp.ones_like(jnp.asarray(mask))))
    np.testing.assert_array_equal(last, full)
    assert max_err(last, padded) > 1e-3


@pytest.mark.parametrize("spec", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_score_trains_under_lora(spec):
    """With LoRA the score head sits in trainable beside the adapters and receives gradients."""
    targets = ("q_proj",) if isinstance(spec, LlamaSpec) else ("c_attn",)
    spec = dataclasses.replace(spec, lora=LoRASpec(rank=2, alpha=4.0, targets=targets))
    fns, trainable, frozen = init_model(spec, jax.random.key(0))
    assert "score" in trainable and "score" not in frozen and "lm_head" not in frozen
    assert count_params(frozen) + count_params(trainable["score"]) == spec.param_count()
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    mask = jnp.array([[1] * 6, [1] * 3 + [0] * 3])
    loss = lambda tr: jnp.sum(fns.apply(tr, frozen, tokens, attention_mask=mask) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(trainable)
    assert float(jnp.abs(grads["score"]["kernel"]).sum()) > 0


def test_export_family_must_match_the_head():
    assert family_for_spec(LLAMA).architecture == "Qwen2ForSequenceClassification"
    assert family_for_spec(GPT2).architecture == "GPT2ForSequenceClassification"
    assert family_for_spec(dataclasses.replace(LLAMA, qkv_bias=False, num_labels=None)
                           ).architecture == "LlamaForCausalLM"
    with pytest.raises(HFConfigError, match="num_labels=3 does not fit"):
        family_for_spec(GPT2, "GPT2LMHeadModel")
    with pytest.raises(HFConfigError, match="BowSpec"):
        family_for_spec(BowSpec(vocab_size=5, d_model=2, num_labels=2))
    with pytest.raises(ValueError, match="model.num_labels"):
        check_spec(dataclasses.replace(LLAMA, num_labels=0))


# ---------------------------------------------------------------------------- bag of embeddings

def _bow_params(spec: BowSpec, seed: int) -> dict:
    """Explicit weights for every leaf of spec, drawn in NumPy."""
    rng = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    d, h, n = spec.d_model, spec.hidden, spec.num_labels
    params = {"embed": {"embedding": w(spec.vocab_size, d)},
              "out": {"kernel": w(h or d, n), "bias": w(n)}}
    if h:
        params["hidden"] = {"kernel": w(d, h), "bias": w(h)}
    return params


def _numpy_bow(params: dict, tokens_BxT: np.ndarray, mask_BxT: np.ndarray) -> np.ndarray:
    """Hand-written forward in float64: mean of the real tokens' rows, ReLU layer, linear."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    out = []
    for tokens, mask in zip(tokens_BxT, mask_BxT):
        x = np.mean([p["embed"]["embedding"][t] for t, m in zip(tokens, mask) if m], axis=0)
        if "hidden" in p:
            x = np.maximum(x @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0.0)
        out.append(x @ p["out"]["kernel"] + p["out"]["bias"])
    return np.array(out)


@pytest.mark.parametrize("hidden", [0, 5])
def test_bow_matches_numpy_and_ignores_padding(hidden):
    spec = BowSpec(vocab_size=7, d_model=4, num_labels=3, hidden=hidden)
    fns, trainable, frozen = init_model(spec, jax.random.key(0))
    params = _bow_params(spec, seed=hidden)
    assert jax.tree.structure(params) == jax.tree.structure(trainable) and frozen == {}
    assert count_params(params) == spec.param_count()
    tokens = np.array([[1, 2, 2, 6, 0, 0], [3, 0, 0, 0, 0, 0], [5, 4, 3, 2, 1, 0]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    apply = jax.jit(fns.apply)
    logits = np.asarray(apply(params, {}, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    assert logits.shape == (3, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, _numpy_bow(params, tokens, mask), atol=1e-5, rtol=1e-5)
    # other pad ids (and none trimmed) do not matter; no mask averages every token
    repadded = np.where(mask == 1, tokens, 6)
    np.testing.assert_allclose(np.asarray(apply(params, {}, jnp.asarray(repadded),
                                                attention_mask=jnp.asarray(mask))), logits,
                               atol=1e-6)
    alone = np.asarray(apply(params, {}, jnp.asarray(tokens[1:2, :1])))
    np.testing.assert_allclose(alone[0], logits[1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(apply(params, {}, jnp.asarray(tokens))),
                               _numpy_bow(params, tokens, np.ones_like(mask)), atol=1e-5)


def test_bow_rejects_lora_and_bad_sizes():
    spec = BowSpec(vocab_size=7, d_model=4, num_labels=3, lora=LoRASpec())
    with pytest.raises(ValueError, match=r"model\.lora"):
        check_spec(spec)
    with pytest.raises(ValueError, match=r"model\.lora"):
        model_fns(spec)
    with pytest.raises(ValueError, match=r"model\.hidden"):
        check_spec(BowSpec(vocab_size=7, d_model=4, num_labels=3, hidden=-1))
    with pytest.raises(ValueError, match=r"model\.num_labels"):
        check_spec(BowSpec(vocab_size=7, d_model=4, num_labels=0))


def test_bow_trains_in_bfloat16():
    """bf16 params and compute still give f32 logits and finite gradients for every leaf."""
    spec = BowSpec(vocab_size=11, d_model=8, num_labels=2, hidden=4, param_dtype="bfloat16",
                   compute_dtype="bfloat16")
    fns, trainable, frozen = init_model(spec, jax.random.key(1))
    tokens = jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32)
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    labels = jnp.array([0, 1])

    def loss(tr):
        logits = fns.apply(tr, frozen, tokens, attention_mask=mask)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    assert all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in jax.tree.leaves(grads))
