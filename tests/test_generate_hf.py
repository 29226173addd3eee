"""Generation with imported Hugging Face causal LMs (Qwen2, Mistral, GPT-2) against `transformers`.

References: HF's own `generate` (its KV cache, unpadded single prompts) for greedy tokens, our
uncached full forward for every cached logit, and on a tiny trained hf run the CLI's round-0 answer
against `transformers` greedy decoding of the original checkpoint. Tiny random checkpoints are written
to tmp_path with torch (CPU); nothing is downloaded.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from fedjax_llm import generate as gen  # noqa: E402
from fedjax_llm.models import GPT2Spec, LoRASpec, init_model  # noqa: E402
from fedjax_llm.models.decode import decode_fns  # noqa: E402
from fedjax_llm.models.hf_io import load_hf  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import compose_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
V, EOS_ID, PAD_ID, N_NEW, TOL = 89, 5, 0, 12, 1e-4
SMALL = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
             bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
CASES = {  # GQA with q/k/v bias (Qwen2), GQA with head_dim != hidden/heads (Mistral), GPT-2
    "qwen2_gqa_bias": (tf.Qwen2ForCausalLM, tf.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)),
    "mistral_gqa_hd12": (tf.MistralForCausalLM, tf.MistralConfig(
        **SMALL, num_attention_heads=6, num_key_value_heads=2, head_dim=12, sliding_window=64)),
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(
        vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=32, bos_token_id=1,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID)),
}
PROMPTS = [[1, 17, 42, 8, 63, 30, 11], [1, 77, 23]]  # different lengths: right-padded on our side


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """O(1) random weights (HF's 0.02-std init leaves greedy logits nearly tied)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                is_norm = any(s in name for s in ("norm", "ln_"))
                p.copy_(1 + 0.2 * z if is_norm and name.endswith("weight") else 0.3 * z)
            elif "embed" in name or "wte" in name or "wpe" in name:
                p.copy_(z)
            else:  # Conv1D (GPT-2) is [in, out], Linear [out, in]
                p.copy_(z / np.sqrt(p.shape[0] if ".c_" in name else p.shape[1]))
    return model.eval()


def hf_checkpoint(case: str, path, seed: int = 0) -> torch.nn.Module:
    cls, config = CASES[case]
    torch.manual_seed(seed)
    model = randomize(cls(config), seed)
    model.save_pretrained(path)
    return model


def hf_greedy(model: torch.nn.Module, ids: list[int], n: int, eos_id: int) -> list[int]:
    """transformers' greedy generate of one unpadded prompt: the new tokens (ends at eos, if hit)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos_id,
                             pad_token_id=PAD_ID)
    return out[0, len(ids):].tolist()


def padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(p) for p in prompts], np.int32)
    rows = np.full((len(prompts), lengths.max()), PAD_ID, np.int32)
    for i, p in enumerate(prompts):
        rows[i, :len(p)] = p
    return rows, lengths


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_equals_transformers_generate_and_cached_logits_equal_full_forward(case, tmp_path):
    model = hf_checkpoint(case, tmp_path)
    fns, trainable, frozen, info = load_hf(tmp_path, tokenizer=False)
    assert info.architecture == type(model).__name__
    rows, lengths = padded(PROMPTS)
    run = lambda eos: gen.generate(fns.spec, trainable, frozen, rows, lengths,  # noqa: E731
                                   jax.random.key(0), max_new_tokens=N_NEW, greedy=True,
                                   eos_id=eos, pad_id=PAD_ID)
    ours, count = run(EOS_ID)
    assert count.max() == N_NEW  # at least one row ran the full length
    first_seen = [t for j, t in enumerate(ours[0, :4].tolist()) if t not in ours[0, :j]]
    stop_id = first_seen[-1]  # the eos of a second pass: row 0 then stops within 4 tokens
    for eos in (EOS_ID, stop_id):
        got, count = run(eos)
        for i, prompt in enumerate(PROMPTS):
            assert got[i, :count[i]].tolist() == hf_greedy(model, prompt, N_NEW, eos), (eos, i)
            assert (got[i, count[i]:] == PAD_ID).all()
    assert count[0] <= 4 and got[0, count[0] - 1] == stop_id

    # Teacher-force the first pass's tokens (PAD after an EOS is as good an input) through the
    # cache, one step at a time; every cached logit vs the full uncached forward of the sequence.
    dec = decode_fns(fns.spec)
    forward = jax.jit(dec.forward)
    b, n = len(PROMPTS), N_NEW
    logits, cache = forward(trainable, frozen, rows, dec.init_cache(b, rows.shape[1] + n),
                            np.zeros(b, np.int32))
    cached = [[np.asarray(logits)[i, :lengths[i]]] for i in range(b)]
    for j in range(n - 1):
        step, cache = forward(trainable, frozen, ours[:, j:j + 1], cache, lengths + j)
        for i in range(b):
            cached[i].append(np.asarray(step)[i])
    full_rows, _ = padded([p + ours[i, :n - 1].tolist() for i, p in enumerate(PROMPTS)])
    full = np.asarray(jax.jit(fns.apply)(trainable, frozen, full_rows))
    for i in range(b):
        got = np.concatenate(cached[i])
        assert got.shape[0] == lengths[i] + n - 1
        assert np.abs(got - full[i, :got.shape[0]]).max() < TOL, case
        assert ours[i, 0] == np.argmax(got[lengths[i] - 1])  # the first token reads the prompt's end


def test_gpt2_cache_with_unmerged_lora_equals_full_forward():
    """GPT-2 with live LoRA adapters (untied head): rows of different prompt lengths prefill
    together, then step one token each at its own learned position; every logit vs the full forward."""
    spec = GPT2Spec(vocab_size=V, n_positions=24, d_model=32, n_layers=2, n_heads=4, ffn_dim=40,
                    tie_embeddings=False, lora=LoRASpec(rank=2, targets=("c_attn", "c_fc")))
    fns, trainable, frozen = init_model(spec, jax.random.key(0))
    rng = np.random.default_rng(0)
    trainable = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32),
                             trainable)  # B != 0, so the adapters matter
    b, t, lengths = 3, 16, np.array([5, 1, 9], np.int32)
    tokens = rng.integers(0, V, (b, t)).astype(np.int32)
    full = np.asarray(jax.jit(fns.apply)(trainable, frozen, tokens))
    dec = decode_fns(spec)
    forward = jax.jit(dec.forward)
    prompt = np.where(np.arange(9)[None] < lengths[:, None], tokens[:, :9], PAD_ID)
    logits, cache = forward(trainable, frozen, prompt, dec.init_cache(b, spec.n_positions),
                            np.zeros(b, np.int32))
    worst = max(np.abs(np.asarray(logits)[i, :n] - full[i, :n]).max() for i, n in enumerate(lengths))
    for j in range(t - lengths.min()):
        pos = np.minimum(lengths + j, t - 1)  # rows past t re-feed their last token: not compared
        step, cache = forward(trainable, frozen, tokens[np.arange(b), pos][:, None], cache, lengths + j)
        live = lengths + j < t
        worst = max(worst, np.abs(np.asarray(step)[live, 0] - full[live, pos[live]]).max())
    assert worst < TOL, worst


def test_gpt2_max_length_and_classifier_are_refused(tmp_path):
    hf_checkpoint("gpt2", tmp_path)
    fns, trainable, frozen, _ = load_hf(tmp_path, tokenizer=False)
    rows, lengths = padded(PROMPTS)
    with pytest.raises(ValueError, match="exceeds the model's n_positions = 32"):
        gen.generate(fns.spec, trainable, frozen, rows, lengths, jax.random.key(0),
                     max_new_tokens=32 - rows.shape[1] + 1, greedy=True)
    cls_spec = load_hf(tmp_path, tokenizer=False, num_labels=3, key=jax.random.key(0))[0].spec
    with pytest.raises(NotImplementedError, match="GPT2Spec with num_labels=3"):
        decode_fns(cls_spec)


# --- generate.main on tiny hf runs -------------------------------------------------------------

TEXTS = ["How are you? I am fine, thank you.", "What is your name? My name is Bot.",
         "Bonjour, comment ça va ?", "Hola, ¿qué tal?", "Tell me a joke about computers."]


def hf_tokenizer(path) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE (300 ids; <pad> <s> </s> = 0, 1, 2) saved beside the weights, as model=hf reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def test_encode_prompts_hf_is_the_training_layout(tmp_path):
    """A prompt row is encode_dialogue_hf's row up to where its loss (the response) starts; a long
    prompt keeps its end, as many tokens as training keeps before a one-token response."""
    from fedjax_llm.data.corpus import Example
    from fedjax_llm.data.encode import encode_dialogue_hf

    tok = hf_tokenizer(tmp_path)
    prompts, seq_len = ["How are you?", "Tell me a joke about computers, please, right now."], 12
    rows, lengths = gen.encode_prompts_hf(tok, prompts, seq_len)
    end = tok.eos_token_id
    train = encode_dialogue_hf(tok, [Example(p, "", {}) for p in prompts], seq_len)
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    for i in range(2):
        start = int(np.argmax(train.loss_mask[i] > 0))
        assert rows[i, :lengths[i]].tolist() == train.tokens[i, :start].tolist()
        assert train.tokens[i, start] == end
        assert rows[i].tolist()[:lengths[i]] == [tok.bos_token_id, *ids[i][len(ids[i]) - lengths[i] + 1:]]
    assert lengths[0] == 1 + len(ids[0]) and lengths[1] == seq_len - 1  # cut on the left
    short = encode_dialogue_hf(tok, [Example(prompts[0], "fine", {})], seq_len)
    assert rows[0, :lengths[0]].tolist() == short.tokens[0, :lengths[0]].tolist()
    assert short.loss_mask[0, lengths[0]] == 1 and short.loss_mask[0, lengths[0] - 1] == 0
    assert rows.shape[1] == lengths.max() and (rows[0, lengths[0]:] == tok.pad_token_id).all()


E2E = {  # case: (config edits besides the tokenizer's ids, LoRA targets)
    "gpt2": ({"n_positions": 48}, "[c_attn,c_fc]"),
    "qwen2_gqa_bias": ({}, "[q_proj,v_proj,down_proj]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(E2E))
def test_cli_on_a_lora_run_matches_transformers_before_training(case, tmp_path, capsys):
    """1 round of LoRA on a tiny checkpoint + its BPE: the CLI prints both rounds, and round 0 (B = 0,
    the checkpoint itself) equals transformers' greedy generate of the training-layout prompt."""
    from fedjax_llm.train import run as train

    ckpt = tmp_path / case
    tok = hf_tokenizer(ckpt)
    cls, config = CASES[case]
    edits, targets = E2E[case]
    config = type(config)(**{**config.to_dict(), **edits, "vocab_size": len(tok),
                             "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                             "pad_token_id": tok.pad_token_id})
    torch.manual_seed(0)
    model = randomize(cls(config), 0)
    model.save_pretrained(ckpt)
    run_dir = str(tmp_path / "run")
    train(compose_config(["debug=smoke", "model=hf", f"model.path={ckpt}", "run.rounds=1",
                          "checkpoint.enabled=true", "model.lora.enabled=true",
                          f"model.lora.targets={targets}", "client.lr=0.5"]), run_dir)

    prompts, n = ["How are you?", "Bonjour"], 8
    assert gen.main([run_dir, "--prompt", prompts[0], "--prompt", prompts[1], "--greedy",
                     "--max-new-tokens", str(n), "--before"]) == 0
    out = capsys.readouterr().out
    assert "round 1 of 1, greedy" in out and out.count("round 0:") == 2
    for p in prompts:
        ids = [tok.bos_token_id, *tok(p, add_special_tokens=False).input_ids]
        new = hf_greedy(model, ids, n, tok.eos_token_id)
        want = tok.decode([t for t in new if t != tok.eos_token_id], skip_special_tokens=True)
        assert f"prompt:     {p}\nround 0:    {want}\nround 1:    " in out
    after = [line[len("round 1:    "):] for line in out.splitlines() if line.startswith("round 1:")]
    before = [line[len("round 0:    "):] for line in out.splitlines() if line.startswith("round 0:")]
    assert after != before  # one round of LoRA at lr 0.5 moved the greedy answers
    if case == "gpt2":  # learned positions bound the length: a clean message, no traceback
        with pytest.raises(SystemExit, match="exceeds the model's n_positions"):
            gen.main([run_dir, "--prompt", prompts[0], "--greedy", "--max-new-tokens", "100000"])


def test_cli_names_an_encoder_architecture(tmp_path):
    """A BERT run with data.task=lm fails before any data or weights are rebuilt, naming BertModel."""
    from omegaconf import OmegaConf

    bert = tmp_path / "bert"
    tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=24, num_attention_heads=2,
                               intermediate_size=32, num_hidden_layers=1,
                               max_position_embeddings=32)).save_pretrained(bert)
    cfg = compose_config(["debug=smoke", "model=hf", f"model.path={bert}"])
    assert cfg.data.task == "lm"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    with pytest.raises(SystemExit, match="fine-tuned BertModel .* not a causal LM"):
        gen.main([str(tmp_path / "run"), "--prompt", "hi", "--greedy"])
