"""Data: corpus loading, byte-level BPE, client partitions, and per-round federated batches."""
from fedjax_llm.data.corpus import Example, load_chatterbot, load_jsonl
from fedjax_llm.data.federated import (FederatedData, RoundBatches, build_federated_data, eval_batches,
                                       round_batches)
from fedjax_llm.data.partition import partition_dirichlet, partition_iid, partition_natural, split_eval
from fedjax_llm.data.tokenizer import (BOS, EOS, PAD, SEP, Encoded, encode_examples,
                                       load_or_train_tokenizer)

__all__ = [
    "Example", "load_chatterbot", "load_jsonl",
    "PAD", "BOS", "EOS", "SEP", "Encoded", "encode_examples", "load_or_train_tokenizer",
    "partition_iid", "partition_dirichlet", "partition_natural", "split_eval",
    "FederatedData", "RoundBatches", "build_federated_data", "round_batches", "eval_batches",
]
