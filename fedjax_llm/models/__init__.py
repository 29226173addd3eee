"""Llama, GPT-2, BERT and bag-of-embeddings models as plain param pytrees plus one pure apply."""
from fedjax_llm.models.bert import Bert
from fedjax_llm.models.bow import Bow
from fedjax_llm.models.gpt2 import GPT2
from fedjax_llm.models.llama import Llama
from fedjax_llm.models.lora import LoRALinear
from fedjax_llm.models.params import (ModelFns, Params, abstract_params, combine, count_params,
                                      init_model, init_trainable, merge_lora, model_fns)
from fedjax_llm.models.spec import (LORA_TARGETS, SIZES, BertSpec, BowSpec, GPT2Spec, LlamaSpec,
                                    LoRASpec, ModelSpec, check_spec, llama_spec)

__all__ = [
    "LORA_TARGETS", "SIZES", "Bert", "BertSpec", "Bow", "BowSpec", "GPT2", "GPT2Spec", "Llama",
    "LlamaSpec", "LoRALinear", "LoRASpec", "ModelFns", "ModelSpec", "Params", "abstract_params",
    "check_spec",
    "combine", "count_params", "init_model", "init_trainable", "llama_spec", "merge_lora",
    "model_fns",
]
