"""Llama-family models as plain param pytrees plus one pure apply function."""
from fedjax_llm.models.llama import Llama
from fedjax_llm.models.lora import LoRALinear
from fedjax_llm.models.params import (ModelFns, Params, abstract_params, combine, count_params,
                                      init_model, merge_lora, model_fns)
from fedjax_llm.models.spec import (LORA_TARGETS, SIZES, LlamaSpec, LoRASpec, check_spec,
                                    llama_spec)

__all__ = [
    "LORA_TARGETS", "SIZES", "Llama", "LlamaSpec", "LoRALinear", "LoRASpec", "ModelFns", "Params",
    "abstract_params", "check_spec", "combine", "count_params", "init_model", "llama_spec",
    "merge_lora", "model_fns",
]
