"""KV-cache decoding vs the full forward, greedy vs an uncached argmax loop, nucleus sampling, and the
generate CLI on a tiny trained run."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_llm import generate as gen
from fedjax_llm.data.tokenizer import BOS, EOS, SEP
from fedjax_llm.models import LlamaSpec, LoRASpec, init_model
from fedjax_llm.models.decode import decode_fns

sys.path.insert(0, os.path.dirname(__file__))
from conftest import compose_config  # noqa: E402

GQA_LORA = LlamaSpec(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                     head_dim=16, qkv_bias=True, tie_embeddings=True, rope_theta=500.0,
                     lora=LoRASpec(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
SMALL_VOCAB = LlamaSpec(vocab_size=11, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


def _model(spec, seed=0, gain=1.0):
    """A random model whose trainable leaves are perturbed (non-zero LoRA B), matrices scaled by gain.

    The perturbation is drawn in NumPy: eager jax ops would compile once per leaf shape."""
    fns, trainable, frozen = init_model(spec, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    gain = 1.0 if spec.lora is not None else gain

    def perturb(x):
        x = np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(x * gain if x.ndim == 2 else x)

    return fns, jax.tree.map(perturb, trainable), frozen


def test_cached_logits_equal_full_forward_at_every_position():
    """Rows of different prompt lengths prefill together, then decode one token at a time each at
    its own position; every logit matches the full-sequence forward."""
    fns, tr, fr = _model(GQA_LORA)
    B, T = 3, 14
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, GQA_LORA.vocab_size)
    full = np.asarray(jax.jit(fns.apply)(tr, fr, tokens))
    dec = decode_fns(GQA_LORA)
    forward = jax.jit(dec.forward)
    lengths = np.array([5, 1, 9])
    padded = np.where(np.arange(9)[None] < lengths[:, None], np.asarray(tokens[:, :9]), 0)
    logits, cache = forward(tr, fr, padded, dec.init_cache(B, 2 * T), np.zeros(B, np.int32))
    worst = 0.0
    for b in range(B):
        worst = max(worst, np.abs(np.asarray(logits)[b, :lengths[b]] - full[b, :lengths[b]]).max())
    checked = lengths.sum()
    for j in range(T - lengths.min()):  # rows past T decode filler tokens that are not compared
        pos = lengths + j
        live = pos < T
        step_tokens = np.where(live, np.asarray(tokens)[np.arange(B), np.minimum(pos, T - 1)], 0)
        logits, cache = forward(tr, fr, step_tokens[:, None].astype(np.int32), cache, pos)
        diff = np.abs(np.asarray(logits)[live, 0] - full[np.arange(B)[live], pos[live]])
        worst, checked = max(worst, diff.max()), checked + live.sum()
    assert checked == B * T
    assert worst < 1e-5, worst


PROMPTS = np.random.default_rng(0).integers(4, 11, size=(4, 6)).astype(np.int32)
LENGTHS = np.array([6, 3, 1, 4])
N_NEW = 10


def _argmax_loop(fns, tr, fr, prompt):
    """Reference: re-run the full forward on the whole sequence for every new token, no cache."""
    apply = jax.jit(fns.apply)
    seq = list(prompt)
    for _ in range(N_NEW):
        padded = np.zeros((1, PROMPTS.shape[1] + N_NEW), np.int32)
        padded[0, :len(seq)] = seq  # causal: the padding after the sequence does not matter
        tok = int(np.argmax(np.asarray(apply(tr, fr, padded))[0, len(seq) - 1]))
        seq.append(tok)
        if tok == EOS:
            break
    return seq[len(prompt):]


def test_greedy_equals_uncached_argmax_loop_and_stops_at_eos():
    fns, tr, fr = _model(SMALL_VOCAB, seed=5, gain=20.0)
    tokens, count = gen.generate(SMALL_VOCAB, tr, fr, PROMPTS, LENGTHS, jax.random.key(0),
                                 max_new_tokens=N_NEW, greedy=True)
    for b in range(len(PROMPTS)):
        assert tokens[b, :count[b]].tolist() == _argmax_loop(fns, tr, fr, PROMPTS[b, :LENGTHS[b]])
        assert not tokens[b, count[b]:].any()  # PAD after EOS
    assert (count < N_NEW).any() and (count == N_NEW).any()  # rows stopped at EOS, one ran out


def test_top_p_to_zero_is_greedy_and_same_seed_same_sample():
    _, tr, fr = _model(SMALL_VOCAB, seed=2, gain=3.0)  # same shapes as above: no recompilation
    run = lambda key, **kw: gen.generate(SMALL_VOCAB, tr, fr, PROMPTS, LENGTHS, key,  # noqa: E731
                                         max_new_tokens=N_NEW, **kw)[0]
    greedy = run(jax.random.key(0), greedy=True)
    for seed in (0, 1):
        np.testing.assert_array_equal(run(jax.random.key(seed), top_p=1e-6, temperature=0.7), greedy)
    a = run(jax.random.key(7), top_p=0.95, temperature=1.5)
    np.testing.assert_array_equal(a, run(jax.random.key(7), top_p=0.95, temperature=1.5))
    assert not np.array_equal(a, run(jax.random.key(8), top_p=0.95, temperature=1.5))
    assert not np.array_equal(a, greedy)


def test_top_p_filter_keeps_the_numpy_nucleus():
    logits = np.random.default_rng(0).normal(size=(3, 20)).astype(np.float32) * 2
    for p in (0.3, 0.8, 0.99):
        kept = np.isfinite(np.asarray(gen.top_p_filter(jnp.asarray(logits), p)))
        for row, k in zip(logits, kept):
            probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
            order = np.argsort(-probs)
            n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest set reaching p
            assert set(np.flatnonzero(k)) == set(order[:n])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer_cache):
    from fedjax_llm.train import run

    run_dir = str(tmp_path_factory.mktemp("run"))
    cfg = compose_config(["debug=smoke", "checkpoint.enabled=true", "checkpoint.every=1",
                          "run.rounds=2", "client.lr=0.05",
                          "model.lora.enabled=true", f"data.tokenizer_cache={tokenizer_cache}"])
    run(cfg, run_dir)
    return run_dir


def test_cli_answers_before_and_after(lora_run, capsys):
    from fedjax_llm.runs import load_run

    prompts = ["How are you?", "What is your name?"]
    assert gen.main([lora_run, "--prompt", prompts[0], "--prompt", prompts[1], "--greedy",
                     "--max-new-tokens", "8", "--before"]) == 0
    out = capsys.readouterr().out
    assert "round 2 of 2, greedy" in out and out.count("round 0:") == 2
    run = load_run(lora_run)
    assert run.round == 2
    sampling = gen.Sampling(max_new_tokens=8, greedy=True)
    after = gen.answers(run.spec, run.trainable, run.frozen, run.tokenizer, prompts,
                        run.cfg.data.seq_len, sampling)
    before = gen.answers(run.spec, run.initial, run.frozen, run.tokenizer, prompts,
                         run.cfg.data.seq_len, sampling)
    for p, a, b in zip(prompts, after, before):
        assert f"prompt:     {p}\nround 0:    {b}\nround 2:    {a}\n" in out + "\n"
    assert after != before  # two rounds of LoRA at lr 0.05 changed the greedy answers

    rows, lengths = gen.encode_prompts(run.tokenizer, ["hi"], 8)
    assert rows[0, 0] == BOS and rows[0, lengths[0] - 1] == SEP
    assert load_run(lora_run, step=1).round == 1
    with pytest.raises(Exception, match="no checkpoint for step 7; available: \\[1, 2\\]"):
        load_run(lora_run, step=7)
