"""Encodings beyond the BPE dialogue rows of `tokenizer.encode_examples`: classification rows (ours
or a Hugging Face tokenizer) and dialogue rows with a Hugging Face tokenizer.

Every encoding returns `Encoded(tokens [N, T], loss_mask [N, T], num_truncated)`, right-padded. For
classification `loss_mask` is the attention mask (1 on real tokens) and the label lives beside it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fedjax_llm.data.corpus import Example
from fedjax_llm.data.tokenizer import BOS, EOS, PAD, Encoded


def classify_text(example: Example) -> str:
    """The text a classifier reads: the prompt, then the response (both carry the topic)."""
    return " ".join(t for t in (example.prompt, example.response) if t)


def is_hf_tokenizer(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "convert_tokens_to_ids")  # transformers' tokenizers, not `tokenizers`'


def tokenizer_vocab_size(tokenizer: Any) -> int:
    return len(tokenizer) if is_hf_tokenizer(tokenizer) else tokenizer.get_vocab_size()


def pad_id(tokenizer: Any) -> int:
    if is_hf_tokenizer(tokenizer):
        return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return PAD


def encode_classify(tokenizer: Any, examples: Sequence[Example], seq_len: int) -> Encoded:
    """One row per example: the tokenizer's own special tokens ([CLS] ... [SEP] for BERT) or
    BOS text EOS for our BPE, truncated from the right."""
    texts = [classify_text(e) for e in examples]
    n = len(texts)
    tokens = np.full((n, seq_len), pad_id(tokenizer), np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    truncated = 0
    if is_hf_tokenizer(tokenizer):
        rows = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        cut = [r[:seq_len - 1] + [r[-1]] if len(r) > seq_len else r for r in rows]  # keep [SEP]/EOS
    else:
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        rows = [[BOS, *e.ids, EOS] for e in encode(texts, add_special_tokens=False)]
        cut = [r[:seq_len - 1] + [EOS] if len(r) > seq_len else r for r in rows]
    for i, (r, c) in enumerate(zip(rows, cut)):
        truncated += len(r) > seq_len
        tokens[i, :len(c)] = c
        mask[i, :len(c)] = 1.0
    return Encoded(tokens, mask, int(truncated))


def encode_dialogue_hf(tokenizer: Any, examples: Sequence[Example], seq_len: int) -> Encoded:
    """Causal-LM rows with a Hugging Face tokenizer: [bos] prompt response eos, loss on the response
    and eos; the prompt is cut from the left and the response from the right when too long."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError("data.tokenizer_path: the tokenizer has neither an eos nor a sep token to end a response")
    n = len(examples)
    tokens = np.full((n, seq_len), pad_id(tokenizer), np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    truncated = 0
    enc = lambda ts: tokenizer(list(ts), add_special_tokens=False)["input_ids"]
    prompts, responses = enc(e.prompt for e in examples), enc(e.response for e in examples)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        room = seq_len - len(bos)
        keep_p = min(len(p), max(room // 2, room - len(r) - 1))
        keep_r = min(len(r), room - keep_p)
        has_eos = keep_p + keep_r < room
        truncated += keep_p < len(p) or keep_r < len(r) or not has_eos
        row = bos + p[len(p) - keep_p:] + r[:keep_r] + ([eos] if has_eos else [])
        tokens[i, :len(row)] = row
        mask[i, len(bos) + keep_p:len(row)] = 1.0
    return Encoded(tokens, mask, int(truncated))
