"""Builds the federated population (clouds -> clients -> train/eval examples) and per-round client batches.

Randomness comes from np.random.SeedSequence([seed, salt, ...]) with a fixed salt per use, so the same
seed gives the same population whatever else changes; batch order depends only on (cursors, data_seed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from fedjax_llm.config import CloudsConfig, DataConfig, PartitionConfig
from fedjax_llm.data.corpus import Example, load_chatterbot, load_jsonl
from fedjax_llm.data.encode import (encode_classify, encode_dialogue_hf, is_hf_tokenizer, pad_id,
                                    tokenizer_vocab_size)
from fedjax_llm.data.partition import partition_dirichlet, partition_iid, partition_natural, split_eval
from fedjax_llm.data.tokenizer import encode_examples, load_or_train_tokenizer

_SALT_PARTITION = 1001   # fixed per use: changing one never shifts another's stream
_SALT_EVAL = 1002


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


@dataclasses.dataclass
class FederatedData:
    tokens: np.ndarray           # [N, T] int32, every kept example (train and eval)
    loss_mask: np.ndarray        # [N, T] float32
    train_idx: list[np.ndarray]  # per client (population P), sorted indices into tokens
    eval_idx: list[np.ndarray]   # per client
    client_names: list[str]      # "<cloud>/<i>", i counted from 0 within the cloud
    client_cloud: np.ndarray     # [P] int32 index into cloud_names; clients ordered cloud by cloud
    cloud_names: list[str]
    tokenizer: Any               # tokenizers.Tokenizer (our BPE) or a transformers tokenizer
    num_truncated: int
    excluded: int                # examples no cloud selected (not in tokens)
    examples: list[Example] = dataclasses.field(default_factory=list)  # row i of tokens, for inspection
    labels: Optional[np.ndarray] = None   # [N] int32 for data.task=classify (loss_mask = attention mask)
    label_names: list[str] = dataclasses.field(default_factory=list)  # label id -> data.label_field value

    @property
    def vocab_size(self) -> int:
        """Tokenizer vocabulary size (a trained BPE's is <= data.vocab_size when merges run out)."""
        return tokenizer_vocab_size(self.tokenizer)

    @property
    def num_labels(self) -> Optional[int]:
        return len(self.label_names) if self.labels is not None else None

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)

    @property
    def num_clients(self) -> int:
        return len(self.train_idx)

    def num_train_examples(self) -> np.ndarray:
        return np.array([len(t) for t in self.train_idx], np.int64)

    def eval_indices(self, cloud: int | None, max_examples: int) -> np.ndarray:
        """Union of the clients' eval sets (all, or one cloud's); above max_examples (> 0), evenly spaced picks."""
        if cloud is not None and not 0 <= cloud < len(self.cloud_names):
            raise ValueError(f"cloud {cloud} out of range for {len(self.cloud_names)} clouds {self.cloud_names}")
        parts = [e for e, c in zip(self.eval_idx, self.client_cloud) if cloud is None or c == cloud]
        idx = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        if max_examples > 0 and len(idx) > max_examples:
            idx = idx[np.arange(max_examples) * len(idx) // max_examples]  # stratified over sources
        return idx


def _load(data_cfg: DataConfig) -> list[Example]:
    if data_cfg.source == "chatterbot":
        return load_chatterbot(data_cfg.languages, data_cfg.categories)
    if data_cfg.source == "jsonl":
        if not data_cfg.path:
            raise ValueError("data.path: data.source=jsonl needs data.path=FILE.jsonl")
        return load_jsonl(data_cfg.path)
    raise ValueError(f"data.source: {data_cfg.source!r} is not one of ('chatterbot', 'jsonl')")


def _field(examples: Sequence[Example], idx: np.ndarray, field: str, key: str) -> np.ndarray:
    """meta[field] of each example in idx; a missing field names the config key that chose it."""
    out = []
    for i in idx:
        ex = examples[i]
        if field not in ex.meta:
            raise ValueError(f"{key}={field!r}: example {i} has no such field (its fields: {sorted(ex.meta)})")
        out.append(ex.meta[field])
    return np.array(out, dtype=object)


def _cloud_owner(examples: Sequence[Example], clouds_cfg: CloudsConfig, field: str) -> np.ndarray:
    """[N] index of the cloud whose select list holds meta[field], -1 when none does."""
    owner_of: dict[str, int] = {}
    for c, (name, cloud) in enumerate(clouds_cfg.members.items()):
        for v in cloud.select:
            if v in owner_of and owner_of[v] != c:
                other = list(clouds_cfg.members)[owner_of[v]]
                raise ValueError(f"clouds.members.{name}.select: {v!r} is also selected by clouds.members.{other}")
            owner_of[v] = c
    values = _field(examples, np.arange(len(examples)), field, "partition.cloud_field")
    present = set(values.tolist())
    for name, cloud in clouds_cfg.members.items():
        for v in cloud.select:
            if v not in present:
                raise ValueError(f"clouds.members.{name}.select: {v!r} matches no example's "
                                 f"{field!r} (partition.cloud_field); present: {sorted(present)}")
    return np.array([owner_of.get(v, -1) for v in values], np.int64)


def _partition(examples, idx, n_clients, partition_cfg: PartitionConfig, rng, clients_key):
    p = partition_cfg
    if p.kind == "natural":
        groups = _field(examples, idx, p.client_field, "partition.client_field")
        return partition_natural(idx, groups, n_clients, rng, clients_key=clients_key)
    if p.kind == "dirichlet":
        labels = _field(examples, idx, p.label_field, "partition.label_field")
        return partition_dirichlet(idx, labels, n_clients, p.alpha, rng, clients_key=clients_key)
    if p.kind == "iid":
        return partition_iid(idx, n_clients, rng, clients_key=clients_key)
    raise ValueError(f"partition.kind: {p.kind!r} is not one of ('natural', 'dirichlet', 'iid')")


def build_federated_data(data_cfg: DataConfig, partition_cfg: PartitionConfig, clouds_cfg: CloudsConfig,
                         seed: int) -> FederatedData:
    """Loads, assigns examples to clouds and clients, holds out eval, trains the tokenizer on train, encodes."""
    cloud_names = list(clouds_cfg.members)
    if not cloud_names:
        raise ValueError("clouds.members: at least one cloud is needed")
    n_per_cloud = [clouds_cfg.members[n].clients for n in cloud_names]
    client_names = [f"{n}/{i}" for n, k in zip(cloud_names, n_per_cloud) for i in range(k)]
    client_cloud = np.repeat(np.arange(len(cloud_names), dtype=np.int32), n_per_cloud)
    examples = _load(data_cfg)
    total = len(examples)

    selecting = [n for n in cloud_names if clouds_cfg.members[n].select]
    if selecting and len(selecting) != len(cloud_names):
        raise ValueError(f"clouds.members: either every cloud sets select or none does; only {selecting} do")
    if selecting:  # one pool per cloud: (indices, its clients' global ids, key to change)
        owner = _cloud_owner(examples, clouds_cfg, partition_cfg.cloud_field)
        examples = [e for e, o in zip(examples, owner) if o >= 0]
        owner = owner[owner >= 0]
        pools = [(np.nonzero(owner == c)[0], np.nonzero(client_cloud == c)[0], f"clouds.members.{name}.clients")
                 for c, name in enumerate(cloud_names)]
    else:          # one shared pool, clients handed to clouds in order
        pools = [(np.arange(total), np.arange(len(client_names)), "clouds.members.*.clients")]

    train_idx: list[np.ndarray] = [np.zeros(0, np.int64)] * len(client_names)
    eval_idx: list[np.ndarray] = list(train_idx)
    for p, (idx, clients, key) in enumerate(pools):
        if len(idx) < len(clients):
            raise ValueError(f"client {client_names[clients[len(idx)]]} gets no example: {len(idx)} examples "
                             f"for {len(clients)} clients; use fewer clients ({key})")
        try:
            parts = _partition(examples, idx, len(clients), partition_cfg, _rng(seed, _SALT_PARTITION, p), key)
        except ValueError as e:
            raise ValueError(f"clients {client_names[clients[0]]}..{client_names[clients[-1]]}: {e}") from None
        for c, part in zip(clients, parts):
            train_idx[c], eval_idx[c] = split_eval(part, data_cfg.eval_fraction, _rng(seed, _SALT_EVAL, c))
    for c, t in enumerate(train_idx):
        if len(t) == 0:
            raise ValueError(f"client {client_names[c]} has no training example; use fewer clients "
                             f"(clouds.members.{cloud_names[client_cloud[c]]}.clients)")

    tokenizer = _tokenizer(data_cfg, examples, train_idx)
    labels, label_names = None, []
    if data_cfg.task == "classify":
        values = _field(examples, np.arange(len(examples)), data_cfg.label_field, "data.label_field")
        label_names = sorted(set(values.tolist()))
        labels = np.searchsorted(np.array(label_names, dtype=object), values).astype(np.int32)
        enc = encode_classify(tokenizer, examples, data_cfg.seq_len)
    elif is_hf_tokenizer(tokenizer):
        enc = encode_dialogue_hf(tokenizer, examples, data_cfg.seq_len)
    else:
        enc = encode_examples(tokenizer, examples, data_cfg.seq_len)
    return FederatedData(tokens=enc.tokens, loss_mask=enc.loss_mask, train_idx=train_idx, eval_idx=eval_idx,
                         client_names=client_names, client_cloud=client_cloud, cloud_names=cloud_names,
                         tokenizer=tokenizer, num_truncated=enc.num_truncated,
                         excluded=total - len(examples), examples=examples, labels=labels,
                         label_names=label_names)


def _tokenizer(data_cfg: DataConfig, examples: Sequence[Example], train_idx: list[np.ndarray]) -> Any:
    """A Hugging Face tokenizer from data.tokenizer_path, else a BPE trained on the train split only."""
    if data_cfg.tokenizer_path:
        from fedjax_llm.models.build import resolve_path
        from fedjax_llm.models.hf_io import load_tokenizer
        path = resolve_path(data_cfg.tokenizer_path, need="")
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise ValueError(f"data.tokenizer_path: {path} holds no tokenizer files")
        return tokenizer
    texts = [t for i in np.sort(np.concatenate(train_idx))
             for t in (examples[i].prompt, examples[i].response) if t]
    return load_or_train_tokenizer(texts, data_cfg.vocab_size, data_cfg.tokenizer_cache)


@dataclasses.dataclass
class RoundBatches:
    tokens: np.ndarray      # [K, S, B, T] int32
    loss_mask: np.ndarray   # [K, S, B, T] float32, 0 on padded rows
    step_mask: np.ndarray   # [K, S] bool, False = step skipped (the optimizer must not move)
    cursors: np.ndarray     # [P] int64 new cursors
    labels: Optional[np.ndarray] = None  # [K, S, B] int32 for classification


def _visit(train: np.ndarray, client: int, start: int, count: int, data_seed: int) -> np.ndarray:
    """Examples at positions start..start+count-1 of client's stream of per-epoch permutations."""
    n = len(train)
    out = np.empty(count, np.int64)
    pos = start
    while pos < start + count:
        epoch, slot = divmod(pos, n)
        take = min(n - slot, start + count - pos)
        perm = _rng(data_seed, client, epoch).permutation(n) if n > 1 else np.zeros(1, np.int64)
        out[pos - start:pos - start + take] = train[perm[slot:slot + take]]
        pos += take
    return out


def round_batches(fd: FederatedData, client_ids: np.ndarray, cursors: np.ndarray, steps: int, batch_size: int,
                  data_seed: int, local_epochs: float = 0.0, materialize: Optional[np.ndarray] = None) -> RoundBatches:
    """Stacks the cohort's next local batches to [K, S, B, T]; local_epochs > 0 masks rows and steps past the budget.
    `materialize` ([K] bool) gathers only those clients' examples (the others' rows stay padding, their
    cursors still advance): a process of a multi-process run builds only the clients on its devices."""
    client_ids = np.asarray(client_ids, np.int64).reshape(-1)
    new_cursors = np.array(cursors, np.int64, copy=True)
    K, S, B = len(client_ids), steps, batch_size
    if S < 1 or B < 1:
        raise ValueError(f"client.local_steps and client.batch_size must be >= 1, got {S} and {B}")
    if new_cursors.shape != (fd.num_clients,):
        raise ValueError(f"cursors has shape {new_cursors.shape}, expected ({fd.num_clients},)")
    if K and (client_ids.min() < 0 or client_ids.max() >= fd.num_clients):
        raise ValueError(f"client ids must be in [0, {fd.num_clients}), got {client_ids.tolist()}")
    if len(np.unique(client_ids)) != K:
        raise ValueError(f"client ids repeat within a round: {client_ids.tolist()}")

    n_K = fd.num_train_examples()[client_ids]
    if local_epochs > 0:
        budget_K = np.maximum(1, np.round(local_epochs * n_K)).astype(np.int64)
        steps_K = np.minimum(S, -(-budget_K // B))
        count_K = np.minimum(budget_K, steps_K * B)
    else:
        steps_K = np.full(K, S, np.int64)
        count_K = np.full(K, S * B, np.int64)

    idx_KxSB = np.zeros((K, S * B), np.int64)
    build = np.ones(K, bool) if materialize is None else np.asarray(materialize, bool)
    for k, c in enumerate(client_ids):
        if build[k]:
            idx_KxSB[k, :count_K[k]] = _visit(fd.train_idx[c], int(c), int(new_cursors[c]), int(count_K[k]), data_seed)
        new_cursors[c] += count_K[k]
    rows_KxSB = (np.arange(S * B)[None, :] < count_K[:, None]) & build[:, None]
    T = fd.tokens.shape[1]
    tokens = np.where(rows_KxSB[..., None], fd.tokens[idx_KxSB], fd.pad_id).astype(np.int32)
    loss_mask = fd.loss_mask[idx_KxSB] * rows_KxSB[..., None]
    labels = None if fd.labels is None else (fd.labels[idx_KxSB] * rows_KxSB).reshape(K, S, B).astype(np.int32)
    return RoundBatches(tokens=tokens.reshape(K, S, B, T), loss_mask=loss_mask.reshape(K, S, B, T),
                        step_mask=np.arange(S)[None, :] < steps_K[:, None], cursors=new_cursors,
                        labels=labels)


def eval_batches(fd: FederatedData, indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Eval examples as [M, B, T] batches; the last one is padded with PAD rows whose mask is 0."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if batch_size < 1:
        raise ValueError(f"run.eval_batch_size: must be >= 1, got {batch_size}")
    M, T = -(-len(indices) // batch_size), fd.tokens.shape[1]
    idx_MB = np.zeros(M * batch_size, np.int64)
    idx_MB[:len(indices)] = indices
    rows_MB = np.arange(M * batch_size) < len(indices)
    tokens = np.where(rows_MB[:, None], fd.tokens[idx_MB], fd.pad_id).astype(np.int32)
    loss_mask = fd.loss_mask[idx_MB] * rows_MB[:, None]
    return tokens.reshape(M, batch_size, T), loss_mask.reshape(M, batch_size, T).astype(np.float32)


def eval_labels(fd: FederatedData, indices: np.ndarray) -> np.ndarray:
    """Labels of the eval examples, in eval_batches' order (classification only)."""
    return fd.labels[np.asarray(indices, np.int64).reshape(-1)]
