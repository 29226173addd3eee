"""Text generation from a run directory: KV-cached greedy or nucleus sampling, before vs after training.

    python -m fedjax_llm.generate RUN_DIR --prompt "How are you?" [--prompt ...] [--max-new-tokens 48]
        [--top-p 0.9 --temperature 0.8 --seed 0 | --greedy] [--step N] [--before]

For a classification run (data.task=classify) it prints each text's three most probable labels instead.

Prompts are laid out as in training and answers end where training ended a response: BOS prompt SEP
... EOS with our BPE (model.family=llama); [bos] prompt ... eos with an imported Hugging Face causal
LM's own tokenizer (model=hf: Llama, Qwen2, Mistral or GPT-2). Nucleus sampling follows
Holtzman et al. (2020): keep the smallest set of tokens whose probability reaches top_p. The loop is
one jit per (batch, prompt length, max new tokens); temperature and top_p are traced, not static.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.data.encode import is_hf_tokenizer, pad_id as tokenizer_pad_id
from fedjax_llm.data.tokenizer import BOS, EOS, PAD, SEP
from fedjax_llm.models.decode import decode_fns
from fedjax_llm.models.params import Params, merge_lora
from fedjax_llm.models.spec import ModelSpec


def top_p_filter(logits_BxV: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits outside the nucleus set to -inf; the most likely token always stays (top_p -> 0: greedy)."""
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of strictly more likely tokens
    keep_BxV = (before_BxV < top_p).at[:, 0].set(True)
    threshold_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1)
    return jnp.where(logits_BxV >= threshold_B[:, None], logits_BxV, -jnp.inf)


def next_token(logits_BxV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
               greedy: bool) -> jax.Array:
    """Argmax (greedy) or a draw from softmax(logits / temperature) restricted to the top_p nucleus."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
    return jax.random.categorical(key, top_p_filter(scaled_BxV, top_p), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("spec", "max_new_tokens", "greedy"))
def _generate(spec: ModelSpec, trainable: Params, frozen: Params, prompt_BxP: jax.Array,
              lengths_B: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
              eos_id: jax.Array, pad_id: jax.Array, max_new_tokens: int,
              greedy: bool) -> tuple[jax.Array, jax.Array]:
    fns = decode_fns(spec)
    b, p = prompt_BxP.shape
    n = max_new_tokens
    cache = fns.init_cache(b, p + n)
    logits_BxPxV, cache = fns.forward(trainable, frozen, prompt_BxP, cache, jnp.zeros(b, jnp.int32))
    last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    first_B = next_token(last_BxV, jax.random.fold_in(key, 0), temperature, top_p, greedy)
    out_BxN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first_B)

    def cond(carry):
        j, _, _, done_B = carry
        return (j < n) & ~jnp.all(done_B)

    def body(carry):
        j, out_BxN, cache, done_B = carry
        prev_B = out_BxN[:, j - 1]  # token j-1 sits at position length + j - 1 and predicts token j
        logits_Bx1xV, cache = fns.forward(trainable, frozen, prev_B[:, None], cache, lengths_B + j - 1)
        tok_B = next_token(logits_Bx1xV[:, 0], jax.random.fold_in(key, j), temperature, top_p, greedy)
        tok_B = jnp.where(done_B, pad_id, tok_B)
        return j + 1, out_BxN.at[:, j].set(tok_B), cache, done_B | (tok_B == eos_id)

    _, out_BxN, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out_BxN, cache, first_B == eos_id))
    is_eos_BxN = out_BxN == eos_id  # first hit is the real EOS even when pad_id == eos_id
    count_B = jnp.where(is_eos_BxN.any(axis=1), jnp.argmax(is_eos_BxN, axis=1) + 1, n)
    return out_BxN, count_B


def generate(spec: ModelSpec, trainable: Params, frozen: Params, prompt_BxP: np.ndarray,
             lengths_B: np.ndarray, key: jax.Array, *, max_new_tokens: int, greedy: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, eos_id: int = EOS,
             pad_id: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, N] with eos_id kept and pad_id after it, tokens generated per row, EOS included).

    prompt_BxP is right-padded; row b's prompt is its first lengths_B[b] tokens. Same key, same draw.
    eos_id/pad_id default to our BPE's; an imported model passes its tokenizer's.
    """
    lengths_B = np.asarray(lengths_B, np.int32)
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if lengths_B.min() < 1 or lengths_B.max() > prompt_BxP.shape[1]:
        raise ValueError(f"generate: prompt lengths {lengths_B.tolist()} must be in [1, "
                         f"{prompt_BxP.shape[1]}] (the padded prompt width)")
    field, limit = spec.max_len()
    if limit is not None and prompt_BxP.shape[1] + max_new_tokens > limit:
        raise ValueError(f"generate: prompt width {prompt_BxP.shape[1]} + max_new_tokens "
                         f"{max_new_tokens} exceeds the model's {field} = {limit}; ask for fewer tokens")
    if not greedy and (temperature <= 0 or not 0 <= top_p <= 1):
        raise ValueError(f"generate: need temperature > 0 and top_p in [0, 1], got {temperature}, "
                         f"{top_p} (use greedy=True for argmax)")
    tokens, count = _generate(spec, trainable, frozen, jnp.asarray(prompt_BxP, jnp.int32),
                              jnp.asarray(lengths_B), key, jnp.float32(temperature),
                              jnp.float32(top_p), jnp.int32(eos_id), jnp.int32(pad_id),
                              max_new_tokens=max_new_tokens, greedy=greedy)
    return np.asarray(tokens), np.asarray(count)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, width] rows BOS prompt SEP (right-padded) and their lengths; long prompts keep their end,
    as training's truncation does."""
    rows = np.full((len(prompts), width), PAD, np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for i, text in enumerate(prompts):
        ids = tokenizer.encode(text, add_special_tokens=False).ids[-(width - 2):] if width > 2 else []
        row = [BOS, *ids, SEP]
        rows[i, :len(row)], lengths[i] = row, len(row)
    return rows, lengths


def decode_answer(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of the generated ids up to (not including) the first EOS."""
    ids = [int(t) for t in ids]
    if EOS in ids:
        ids = ids[:ids.index(EOS)]
    return tokenizer.decode([t for t in ids if t > SEP], skip_special_tokens=True)


def end_id_hf(tokenizer: Any) -> int:
    """The id training appends after a response with a HF tokenizer (encode_dialogue_hf): eos, else sep."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise ValueError("generate: the tokenizer has neither an eos nor a sep token to end an answer")
    return int(end)


def encode_prompts_hf(tokenizer: Any, prompts: Sequence[str], seq_len: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Rows [bos] prompt (right-padded to the longest) and their lengths, cut where training's
    encode_dialogue_hf starts a response: that encoder with an empty response, so the layout is
    training's and a long prompt keeps its last seq_len - len(bos) - 1 tokens (cut on the left)."""
    from fedjax_llm.data.corpus import Example
    from fedjax_llm.data.encode import encode_dialogue_hf

    enc = encode_dialogue_hf(tokenizer, [Example(p, "", {}) for p in prompts], seq_len)
    lengths = np.argmax(enc.loss_mask > 0, axis=1).astype(np.int32)  # first response slot: the eos
    if lengths.min() < 1:
        empty = [p for p, n in zip(prompts, lengths) if n < 1]
        raise ValueError(f"generate: prompts {empty!r} encode to no tokens (the tokenizer adds no bos)")
    width = int(lengths.max())
    real_BxW = np.arange(width)[None, :] < lengths[:, None]  # drop the eos the encoder appended
    rows = np.where(real_BxW, enc.tokens[:, :width], tokenizer_pad_id(tokenizer))
    return rows.astype(np.int32), lengths


def decode_answer_hf(tokenizer: Any, ids: Sequence[int], eos_id: int) -> str:
    """Text of the generated ids up to (not including) the first eos, special tokens dropped."""
    ids = [int(t) for t in ids]
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 48
    greedy: bool = False
    temperature: float = 0.8
    top_p: float = 0.9
    seed: int = 0


def answers(spec: ModelSpec, trainable: Params, frozen: Params, tokenizer: Any,
            prompts: Sequence[str], prompt_width: int, sampling: Sampling) -> list[str]:
    """One answer per prompt; LoRA is merged into the base first (same function, fewer matmuls).

    Our BPE tokenizer: BOS prompt SEP rows of prompt_width, answers end at EOS. A Hugging Face
    tokenizer: rows laid out as encode_dialogue_hf (prompt_width = data.seq_len), answers end at the
    eos training appended, padding with its pad id.
    """
    if spec.lora is not None:
        trainable, frozen = merge_lora(spec, trainable, frozen), {}
        spec = dataclasses.replace(spec, lora=None)
    if is_hf_tokenizer(tokenizer):
        rows, lengths = encode_prompts_hf(tokenizer, prompts, prompt_width)
        eos, pad = end_id_hf(tokenizer), tokenizer_pad_id(tokenizer)
        decode = functools.partial(decode_answer_hf, tokenizer, eos_id=eos)
    else:
        rows, lengths = encode_prompts(tokenizer, prompts, prompt_width)
        eos, pad, decode = EOS, PAD, functools.partial(decode_answer, tokenizer)
    tokens, count = generate(spec, trainable, frozen, rows, lengths, jax.random.key(sampling.seed),
                             max_new_tokens=sampling.max_new_tokens, greedy=sampling.greedy,
                             temperature=sampling.temperature, top_p=sampling.top_p, eos_id=eos,
                             pad_id=pad)
    return [decode(t[:c]) for t, c in zip(tokens, count)]


def check_causal_lm(cfg: Any, run_dir: str) -> None:
    """Raises SystemExit unless the run trained a model with a next-token head (before any loading).

    model.family=llama is ours; model=hf must name a causal-LM architecture in its config.json (a
    BERT encoder or a *ForSequenceClassification checkpoint cannot continue a prompt).
    """
    family = cfg.model.family
    if family == "llama":
        return
    if family != "hf":
        raise SystemExit(f"generate: {run_dir} trained a model.family={family} model, which has no "
                         "next-token head; generation needs model.family=llama or a causal LM (model=hf)")
    from fedjax_llm.models.build import resolve_path
    from fedjax_llm.models.families import FAMILIES, family_for_config

    where = os.path.join(resolve_path(cfg.model.path), "config.json")
    with open(where, encoding="utf-8") as f:
        found = family_for_config(json.load(f), where)
    causal = sorted(a for a, fam in FAMILIES.items() if fam.peft_task == "CAUSAL_LM")
    if found.architecture not in causal:
        raise SystemExit(f"generate: {run_dir} fine-tuned {found.architecture} ({where}) with "
                         f"data.task={cfg.data.task}; it is not a causal LM and has no next-token head "
                         f"to generate with. Generation supports {causal} and model.family=llama")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script: a user's mistake is one line on stderr (--verbose: with the traceback)."""
    from fedjax_llm.cli import pop_verbose, run_main

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = pop_verbose(args)
    return run_main(lambda: _main(args), "fedjax-llm-generate", verbose)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedjax_llm.generate", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (config.yaml, checkpoints/)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--step", type=int, default=None, help="checkpoint round (default: newest)")
    parser.add_argument("--before", action="store_true",
                        help="also answer with the initial (round-0) model")
    args = parser.parse_args(argv)

    from fedjax_llm.runs import load_run, read_config

    cfg = read_config(args.run_dir)
    if cfg.data.task != "classify":
        check_causal_lm(cfg, args.run_dir)  # fail before rebuilding the data and the model
    run = load_run(args.run_dir, args.step)
    if run.cfg.data.task == "classify":
        return _print_labels(run, args.prompt, args.before)
    sampling = Sampling(args.max_new_tokens, args.greedy, args.temperature, args.top_p, args.seed)
    width = run.cfg.data.seq_len
    try:
        after = answers(run.spec, run.trainable, run.frozen, run.tokenizer, args.prompt, width, sampling)
        before = (answers(run.spec, run.initial, run.initial_base, run.tokenizer, args.prompt, width, sampling)
                  if args.before else None)
    except ValueError as e:  # a request the model cannot serve (length limit, empty prompt): no traceback
        raise SystemExit(f"generate: {args.run_dir}: {e}") from None
    mode = "greedy" if args.greedy else f"top_p={args.top_p} temperature={args.temperature} seed={args.seed}"
    print(f"# {args.run_dir}: round {run.round} of {run.cfg.run.rounds}, {mode}")
    for i, prompt in enumerate(args.prompt):
        print(f"\nprompt:     {prompt}")
        if before is not None:
            print(f"round 0:    {before[i]}")
        print(f"round {run.round}:{' ' * max(1, 5 - len(str(run.round)))}{after[i]}")
    return 0


def classify(run: Any, trainable: Params, texts: Sequence[str], top: int = 3,
             frozen: Optional[Params] = None) -> list[list[tuple[str, float]]]:
    """The `top` most probable labels (name, probability) of each text under a classification run
    (on the run's frozen base unless `frozen` is given)."""
    from fedjax_llm.data.corpus import Example
    from fedjax_llm.data.encode import encode_classify
    from fedjax_llm.models.params import model_fns

    enc = encode_classify(run.tokenizer, [Example(t, "", {}) for t in texts], run.cfg.data.seq_len)
    base = run.frozen if frozen is None else frozen
    logits = model_fns(run.spec).apply(trainable, base, jnp.asarray(enc.tokens), None,
                                       attention_mask=jnp.asarray(enc.loss_mask))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    return [[(run.label_names[j], float(p[j])) for j in np.argsort(-p)[:top]] for p in probs]


def _print_labels(run: Any, prompts: Sequence[str], before: bool) -> int:
    after = classify(run, run.trainable, prompts)
    first = classify(run, run.initial, prompts, frozen=run.initial_base) if before else None
    show = lambda ranked: ", ".join(f"{name} {p:.2f}" for name, p in ranked)  # noqa: E731
    print(f"# {run.run_dir}: round {run.round} of {run.cfg.run.rounds}, {run.cfg.data.label_field} classifier")
    for i, prompt in enumerate(prompts):
        print(f"\ntext:       {prompt}")
        if first is not None:
            print(f"round 0:    {show(first[i])}")
        print(f"round {run.round}:{' ' * max(1, 5 - len(str(run.round)))}{show(after[i])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
