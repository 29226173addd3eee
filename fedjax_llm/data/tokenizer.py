"""Byte-level BPE trained on the training split (cached on disk), and encoding to fixed-shape arrays.

Layout of one row: BOS prompt SEP response EOS PAD...; the model predicts tokens[:, 1:] from
tokens[:, :-1], weighted by loss_mask[:, 1:], so only response tokens and the EOS are targets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fedjax_llm.data.corpus import Example

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>")  # ids 0..3, in this order


def cache_path(texts: Sequence[str], vocab_size: int, cache_dir: str) -> str:
    """{cache_dir}/bpe-{sha256(texts, vocab_size)[:16]}-{vocab_size}.json (length-prefixed, so unambiguous)."""
    h = hashlib.sha256(f"bpe-v1|{vocab_size}|{len(texts)}|".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return os.path.join(os.path.expanduser(cache_dir), f"bpe-{h.hexdigest()[:16]}-{vocab_size}.json")


def _train(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Trains a byte-level BPE whose first ids are the special tokens and whose alphabet is all 256 bytes."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def load_or_train_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: str) -> tokenizers.Tokenizer:
    """Loads the cached tokenizer for (texts, vocab_size), or trains one and writes it atomically."""
    path = cache_path(texts, vocab_size, cache_dir)
    if os.path.exists(path):
        tok = tokenizers.Tokenizer.from_file(path)
    else:
        tok = _train(texts, vocab_size)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bpe-", suffix=".tmp", dir=os.path.dirname(path))
        os.close(fd)
        try:
            tok.save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise ValueError(f"data.tokenizer_cache: {path} maps {s!r} to {tok.token_to_id(s)}, expected {i}; "
                             "delete the file to retrain")
    return tok


@dataclasses.dataclass(frozen=True)
class Encoded:
    tokens: np.ndarray      # [N, T] int32, right-padded with PAD
    loss_mask: np.ndarray   # [N, T] float32, 1 where the token is a target (response and EOS)
    num_truncated: int


def fit_lengths(n_prompt: int, n_response: int, seq_len: int) -> tuple[int, int, bool]:
    """(prompt tokens kept from the right, response tokens kept from the left, EOS kept).

    When the row is too long the prompt keeps at most half of the room, more only if the response
    (with its EOS) leaves it free; the response is cut from the right and the EOS kept only if it fits.
    """
    room = seq_len - 2                      # BOS and SEP are always there
    if n_prompt + n_response + 1 <= room:
        return n_prompt, n_response, True
    keep_p = min(n_prompt, max(room // 2, room - n_response - 1))
    keep_r = min(n_response, room - keep_p)
    return keep_p, keep_r, keep_p + keep_r < room


def encode_examples(tokenizer: tokenizers.Tokenizer, examples: Sequence[Example], seq_len: int) -> Encoded:
    """Encodes BOS prompt SEP response EOS, right-padded / truncated to seq_len, with the target mask."""
    if seq_len < 4:
        raise ValueError(f"data.seq_len: must be >= 4, got {seq_len}")
    n = len(examples)
    unique = list(dict.fromkeys(t for e in examples for t in (e.prompt, e.response)))  # dialogue turns repeat
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)         # fast: no offsets
    ids_of = {t: enc.ids for t, enc in zip(unique, encode(unique, add_special_tokens=False))}
    tokens_NxT = np.full((n, seq_len), PAD, np.int32)
    mask_NxT = np.zeros((n, seq_len), np.float32)
    truncated = 0
    for i in range(n):
        p, r = ids_of[examples[i].prompt], ids_of[examples[i].response]
        keep_p, keep_r, eos = fit_lengths(len(p), len(r), seq_len)
        truncated += (keep_p < len(p)) or (keep_r < len(r)) or not eos
        row = [BOS, *p[len(p) - keep_p:], SEP, *r[:keep_r]] + ([EOS] if eos else [])
        tokens_NxT[i, :len(row)] = row
        mask_NxT[i, keep_p + 2:len(row)] = 1.0
    return Encoded(tokens_NxT, mask_NxT, int(truncated))
