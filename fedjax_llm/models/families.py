"""Registry of Hugging Face architectures: config.json -> spec, spec -> config.json, and name maps.

Each family is data: a name table mapping HF state-dict names to our param paths (with the layout:
"T" transposes torch's [out, in] Linear weight to our [in, out] kernel, "=" copies), the checkpoint
tensors we deliberately skip, and a config parser that rejects what our modules do not implement,
naming the field and its value.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

from fedjax_llm.errors import ModelError
from fedjax_llm.models.spec import ACTIVATIONS, BertSpec, BowSpec, GPT2Spec, LlamaSpec, ModelSpec

CLS_SUFFIX = "ForSequenceClassification"


class HFConfigError(ModelError):
    """A config.json the registry cannot honour; the message names the file, field and value."""


# (HF tensor name, our param path, layout); "{i}" runs over layers. A row whose path is not in the
# spec's param tree (a bias the spec has not, a tied lm_head, an absent classifier) is skipped.
LLAMA_NAMES = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", "="),
    ("model.layers.{i}.input_layernorm.weight", "layers/{i}/input_layernorm/scale", "="),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/self_attn/q_proj/kernel", "T"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/{i}/self_attn/q_proj/bias", "="),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/{i}/self_attn/k_proj/kernel", "T"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/{i}/self_attn/k_proj/bias", "="),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/{i}/self_attn/v_proj/kernel", "T"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/{i}/self_attn/v_proj/bias", "="),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/self_attn/o_proj/kernel", "T"),
    ("model.layers.{i}.post_attention_layernorm.weight",
     "layers/{i}/post_attention_layernorm/scale", "="),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/{i}/mlp/gate_proj/kernel", "T"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/{i}/mlp/up_proj/kernel", "T"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/{i}/mlp/down_proj/kernel", "T"),
    ("model.norm.weight", "norm/scale", "="),
    ("lm_head.weight", "lm_head/kernel", "T"),
)
# GPT-2's Conv1D weights are [in, out] already: no transposes except a separate lm_head.
GPT2_NAMES = (
    ("transformer.wte.weight", "wte/embedding", "="),
    ("transformer.wpe.weight", "wpe/embedding", "="),
    ("transformer.h.{i}.ln_1.weight", "h/{i}/ln_1/scale", "="),
    ("transformer.h.{i}.ln_1.bias", "h/{i}/ln_1/bias", "="),
    ("transformer.h.{i}.attn.c_attn.weight", "h/{i}/attn/c_attn/kernel", "="),
    ("transformer.h.{i}.attn.c_attn.bias", "h/{i}/attn/c_attn/bias", "="),
    ("transformer.h.{i}.attn.c_proj.weight", "h/{i}/attn/c_proj/kernel", "="),
    ("transformer.h.{i}.attn.c_proj.bias", "h/{i}/attn/c_proj/bias", "="),
    ("transformer.h.{i}.ln_2.weight", "h/{i}/ln_2/scale", "="),
    ("transformer.h.{i}.ln_2.bias", "h/{i}/ln_2/bias", "="),
    ("transformer.h.{i}.mlp.c_fc.weight", "h/{i}/mlp/c_fc/kernel", "="),
    ("transformer.h.{i}.mlp.c_fc.bias", "h/{i}/mlp/c_fc/bias", "="),
    ("transformer.h.{i}.mlp.c_proj.weight", "h/{i}/mlp/c_proj/kernel", "="),
    ("transformer.h.{i}.mlp.c_proj.bias", "h/{i}/mlp/c_proj/bias", "="),
    ("transformer.ln_f.weight", "ln_f/scale", "="),
    ("transformer.ln_f.bias", "ln_f/bias", "="),
    ("lm_head.weight", "lm_head/kernel", "T"),
)
# BertModel names; BertForSequenceClassification puts them under "bert." and adds the classifier.
BERT_NAMES = (
    ("embeddings.word_embeddings.weight", "embeddings/word/embedding", "="),
    ("embeddings.position_embeddings.weight", "embeddings/position/embedding", "="),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type/embedding", "="),
    ("embeddings.LayerNorm.weight", "embeddings/norm/scale", "="),
    ("embeddings.LayerNorm.bias", "embeddings/norm/bias", "="),
    ("encoder.layer.{i}.attention.self.query.weight", "layers/{i}/query/kernel", "T"),
    ("encoder.layer.{i}.attention.self.query.bias", "layers/{i}/query/bias", "="),
    ("encoder.layer.{i}.attention.self.key.weight", "layers/{i}/key/kernel", "T"),
    ("encoder.layer.{i}.attention.self.key.bias", "layers/{i}/key/bias", "="),
    ("encoder.layer.{i}.attention.self.value.weight", "layers/{i}/value/kernel", "T"),
    ("encoder.layer.{i}.attention.self.value.bias", "layers/{i}/value/bias", "="),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers/{i}/attention_output/kernel", "T"),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers/{i}/attention_output/bias", "="),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers/{i}/attention_norm/scale", "="),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers/{i}/attention_norm/bias", "="),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers/{i}/intermediate/kernel", "T"),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers/{i}/intermediate/bias", "="),
    ("encoder.layer.{i}.output.dense.weight", "layers/{i}/output/kernel", "T"),
    ("encoder.layer.{i}.output.dense.bias", "layers/{i}/output/bias", "="),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers/{i}/output_norm/scale", "="),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers/{i}/output_norm/bias", "="),
    ("pooler.dense.weight", "pooler/kernel", "T"),
    ("pooler.dense.bias", "pooler/bias", "="),
)
BERT_CLS_NAMES = tuple(("bert." + hf, ours, lay) for hf, ours, lay in BERT_NAMES) + (
    ("classifier.weight", "classifier/kernel", "T"),
    ("classifier.bias", "classifier/bias", "="),
)
# Decoder *ForSequenceClassification: the same base names, a bias-free score head, no lm_head.
_SCORE = (("score.weight", "score/kernel", "T"),)
LLAMA_CLS_NAMES = tuple(r for r in LLAMA_NAMES if r[0] != "lm_head.weight") + _SCORE
GPT2_CLS_NAMES = tuple(r for r in GPT2_NAMES if r[0] != "lm_head.weight") + _SCORE

# Checkpoint tensors that are buffers, not weights (rotary tables, GPT-2's causal mask, BERT ids).
LLAMA_IGNORE = (r".*rotary_emb\.inv_freq",)
GPT2_IGNORE = (r"(transformer\.)?h\.\d+\.(attn|crossattention)\.(masked_)?bias",)
BERT_IGNORE = (r"(bert\.)?embeddings\.(position_ids|token_type_ids)",)


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF architecture: its spec parser and writer, name table, skipped buffers, PEFT task."""

    architecture: str
    model_type: str
    parse: Callable[[dict, str, str], ModelSpec]  # (config, architecture, where) -> spec
    to_config: Callable[[Any, str], dict]         # (spec, architecture) -> config.json fields
    names: tuple[tuple[str, str, str], ...]
    ignore: tuple[str, ...]
    peft_task: str
    base_prefix: str = ""  # a checkpoint of the bare base model lacks this prefix

    def ignored(self, name: str, spec: ModelSpec) -> bool:
        """True for a checkpoint tensor we skip on purpose: a buffer, a tied lm_head copy, or the
        lm_head of a causal LM loaded as a classifier (whose score head replaces it)."""
        no_head = getattr(spec, "tie_embeddings", False) or (
            self.architecture.endswith(CLS_SUFFIX) and self.model_type != "bert")
        return ((no_head and name == "lm_head.weight")
                or any(re.fullmatch(p, name) for p in self.ignore))


def _field(c: dict, name: str, where: str, default: Any = dataclasses.MISSING) -> Any:
    if name in c and c[name] is not None:
        return c[name]
    if default is dataclasses.MISSING:
        raise HFConfigError(f"{where}: required field `{name}` is missing")
    return default


def _reject(where: str, name: str, value: Any, why: str) -> HFConfigError:
    return HFConfigError(f"{where}: unsupported `{name}` = {value!r}: {why}")


def _rope_theta(c: dict, where: str) -> float:
    """theta of plain RoPE from rope_parameters (transformers 5) or rope_theta/rope_scaling (4.x)."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise _reject(where, "rope_scaling", params or scaling, "expected one dict")
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        field = "rope_parameters" if params else "rope_scaling"
        raise HFConfigError(f"{where}: unsupported `{field}` = {params or scaling!r}: rope type "
                            f"{kind!r} is not implemented, only plain RoPE ('default'); both "
                            "`rope_scaling` (transformers 4) and `rope_parameters` (5) are read")
    factor = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise _reject(where, "partial_rotary_factor", factor, "only full rotary embeddings")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def _num_labels(c: dict, architecture: str, where: str) -> Optional[int]:
    """Classes of a *ForSequenceClassification config (len(id2label), else num_labels), or None."""
    if not architecture.endswith(CLS_SUFFIX):
        return None
    return len(c["id2label"]) if c.get("id2label") else _field(c, "num_labels", where, 2)


def _labels(num_labels: Optional[int]) -> dict:
    """id2label/label2id as transformers writes them by default; {} without a classifier."""
    if not num_labels:
        return {}
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
            "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}


def _sliding_window(c: dict, architecture: str) -> Optional[int]:
    """The window that HF would apply (Mistral always; Qwen2 only with use_sliding_window)."""
    if architecture.startswith("Mistral"):
        return c.get("sliding_window")
    if architecture.startswith("Qwen2") and (
            c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or ())):
        return c.get("sliding_window")
    return None


def _parse_llama(c: dict, architecture: str, where: str) -> LlamaSpec:
    """LlamaSpec from a Llama, Qwen2 (q/k/v bias) or Mistral (GQA, sliding window) config, causal LM
    or sequence classifier."""
    if _field(c, "hidden_act", where, "silu") != "silu":
        raise _reject(where, "hidden_act", c["hidden_act"], "the Llama family implements 'silu'")
    if c.get("attention_bias"):
        raise _reject(where, "attention_bias", c["attention_bias"],
                      "biases on q/k/v and o_proj are not implemented (o_proj has no bias)")
    if c.get("mlp_bias"):
        raise _reject(where, "mlp_bias", c["mlp_bias"], "MLP biases are not implemented")
    if c.get("attention_dropout"):
        raise _reject(where, "attention_dropout", c["attention_dropout"], "must be 0")
    d, heads = _field(c, "hidden_size", where), _field(c, "num_attention_heads", where)
    head_dim = c.get("head_dim")
    window = _sliding_window(c, architecture)
    return LlamaSpec(
        vocab_size=_field(c, "vocab_size", where), d_model=d,
        n_layers=_field(c, "num_hidden_layers", where), n_heads=heads,
        n_kv_heads=_field(c, "num_key_value_heads", where, heads),
        ffn_dim=_field(c, "intermediate_size", where),
        head_dim=None if head_dim in (None, d // heads) else head_dim,
        rope_theta=_rope_theta(c, where), norm_eps=float(_field(c, "rms_norm_eps", where, 1e-6)),
        qkv_bias=architecture.startswith("Qwen2"),
        tie_embeddings=bool(_field(c, "tie_word_embeddings", where, False)),
        sliding_window=window, num_labels=_num_labels(c, architecture, where))


def _llama_config(spec: LlamaSpec, architecture: str) -> dict:
    window = {"Mistral": {"sliding_window": spec.sliding_window},
              "Qwen2": {"sliding_window": spec.sliding_window,
                        "use_sliding_window": spec.sliding_window is not None}}
    window = next((w for k, w in window.items() if architecture.startswith(k)), {})
    return {**window, **_labels(spec.num_labels), "hidden_size": spec.d_model,
            "num_hidden_layers": spec.n_layers,
            "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_kv_heads,
            "intermediate_size": spec.ffn_dim, "head_dim": spec.resolved_head_dim,
            "vocab_size": spec.vocab_size, "rms_norm_eps": spec.norm_eps, "hidden_act": "silu",
            "rope_theta": spec.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
            "tie_word_embeddings": spec.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0}


def _parse_gpt2(c: dict, architecture: str, where: str) -> GPT2Spec:
    """GPT2Spec from a GPT2LMHeadModel / GPT2ForSequenceClassification config; variants of the
    attention scaling are rejected."""
    act = _field(c, "activation_function", where, "gelu_new")
    if act not in ACTIVATIONS:
        raise _reject(where, "activation_function", act, f"implemented: {ACTIVATIONS}")
    for name, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                     ("add_cross_attention", False)):
        if bool(c.get(name, ok)) != ok:
            raise _reject(where, name, c[name], f"only {ok} is implemented")
    d = _field(c, "n_embd", where)
    return GPT2Spec(
        vocab_size=_field(c, "vocab_size", where), n_positions=_field(c, "n_positions", where),
        d_model=d, n_layers=_field(c, "n_layer", where), n_heads=_field(c, "n_head", where),
        ffn_dim=_field(c, "n_inner", where, 4 * d), activation=act,
        norm_eps=float(_field(c, "layer_norm_epsilon", where, 1e-5)),
        tie_embeddings=bool(_field(c, "tie_word_embeddings", where, True)),
        embd_dropout=float(_field(c, "embd_pdrop", where, 0.1)),
        resid_dropout=float(_field(c, "resid_pdrop", where, 0.1)),
        attn_dropout=float(_field(c, "attn_pdrop", where, 0.1)),
        num_labels=_num_labels(c, architecture, where))


def _gpt2_config(spec: GPT2Spec, architecture: str) -> dict:
    return {**_labels(spec.num_labels), "vocab_size": spec.vocab_size,
            "n_positions": spec.n_positions, "n_embd": spec.d_model,
            "n_layer": spec.n_layers, "n_head": spec.n_heads, "n_inner": spec.ffn_dim,
            "activation_function": spec.activation, "layer_norm_epsilon": spec.norm_eps,
            "tie_word_embeddings": spec.tie_embeddings, "embd_pdrop": spec.embd_dropout,
            "resid_pdrop": spec.resid_dropout, "attn_pdrop": spec.attn_dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}


def _parse_bert(c: dict, architecture: str, where: str) -> BertSpec:
    """BertSpec (absolute positions, encoder only); the classifier when the architecture has one."""
    act = _field(c, "hidden_act", where, "gelu")
    if act not in ACTIVATIONS:
        raise _reject(where, "hidden_act", act, f"implemented: {ACTIVATIONS}")
    pos = c.get("position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise _reject(where, "position_embedding_type", pos, "only 'absolute' is implemented")
    for name in ("is_decoder", "add_cross_attention"):
        if c.get(name):
            raise _reject(where, name, c[name], "only the bidirectional encoder is implemented")
    hidden_dropout = float(_field(c, "hidden_dropout_prob", where, 0.1))
    num_labels = _num_labels(c, architecture, where)
    return BertSpec(
        vocab_size=_field(c, "vocab_size", where),
        max_positions=_field(c, "max_position_embeddings", where, 512),
        type_vocab_size=_field(c, "type_vocab_size", where, 2),
        d_model=_field(c, "hidden_size", where), n_layers=_field(c, "num_hidden_layers", where),
        n_heads=_field(c, "num_attention_heads", where),
        ffn_dim=_field(c, "intermediate_size", where), activation=act,
        norm_eps=float(_field(c, "layer_norm_eps", where, 1e-12)), hidden_dropout=hidden_dropout,
        attn_dropout=float(_field(c, "attention_probs_dropout_prob", where, 0.1)),
        classifier_dropout=float(_field(c, "classifier_dropout", where, hidden_dropout)),
        num_labels=num_labels, output="logits" if num_labels else "hidden")


def _bert_config(spec: BertSpec, architecture: str) -> dict:
    out = {"vocab_size": spec.vocab_size, "max_position_embeddings": spec.max_positions,
           "type_vocab_size": spec.type_vocab_size, "hidden_size": spec.d_model,
           "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
           "intermediate_size": spec.ffn_dim, "hidden_act": spec.activation,
           "layer_norm_eps": spec.norm_eps, "hidden_dropout_prob": spec.hidden_dropout,
           "attention_probs_dropout_prob": spec.attn_dropout,
           "classifier_dropout": spec.classifier_dropout, "position_embedding_type": "absolute"}
    return {**out, **_labels(spec.num_labels)}


_LLAMA = dict(parse=_parse_llama, to_config=_llama_config, names=LLAMA_NAMES, ignore=LLAMA_IGNORE,
              peft_task="CAUSAL_LM")
_LLAMA_CLS = {**_LLAMA, "names": LLAMA_CLS_NAMES, "peft_task": "SEQ_CLS"}
FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    Family("LlamaForCausalLM", "llama", **_LLAMA),
    Family("Qwen2ForCausalLM", "qwen2", **_LLAMA),
    Family("MistralForCausalLM", "mistral", **_LLAMA),
    Family("LlamaForSequenceClassification", "llama", **_LLAMA_CLS),
    Family("Qwen2ForSequenceClassification", "qwen2", **_LLAMA_CLS),
    Family("MistralForSequenceClassification", "mistral", **_LLAMA_CLS),
    Family("GPT2LMHeadModel", "gpt2", _parse_gpt2, _gpt2_config, GPT2_NAMES, GPT2_IGNORE,
           "CAUSAL_LM"),
    Family("GPT2ForSequenceClassification", "gpt2", _parse_gpt2, _gpt2_config, GPT2_CLS_NAMES,
           GPT2_IGNORE, "SEQ_CLS"),
    Family("BertModel", "bert", _parse_bert, _bert_config, BERT_NAMES, BERT_IGNORE,
           "FEATURE_EXTRACTION"),
    Family("BertForSequenceClassification", "bert", _parse_bert, _bert_config, BERT_CLS_NAMES,
           BERT_IGNORE, "SEQ_CLS", base_prefix="bert."),
)}
# A base or causal-LM architecture -> its sequence classifier (load_hf(..., num_labels=N)).
SEQ_CLS: dict[str, str] = {
    "BertModel": "BertForSequenceClassification",
    "LlamaForCausalLM": "LlamaForSequenceClassification",
    "Qwen2ForCausalLM": "Qwen2ForSequenceClassification",
    "MistralForCausalLM": "MistralForSequenceClassification",
    "GPT2LMHeadModel": "GPT2ForSequenceClassification",
}


def family_for_config(config: dict, where: str) -> Family:
    """The family named by config.json's `architectures`; raises naming the value otherwise."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise HFConfigError(f"{where}: field `architectures` = {archs!r}: expected a list naming "
                            f"one of {sorted(FAMILIES)}")
    if archs[0] not in FAMILIES:
        raise HFConfigError(f"{where}: unsupported `architectures` = {archs!r}; supported: "
                            f"{sorted(FAMILIES)}")
    return FAMILIES[archs[0]]


def family_for_spec(spec: ModelSpec, architecture: Optional[str] = None) -> Family:
    """The family to export spec as: `architecture` if given, else the natural one for the spec."""
    if isinstance(spec, BowSpec):
        raise HFConfigError("BowSpec (bag of embeddings) has no Hugging Face architecture")
    if architecture is None:
        if isinstance(spec, LlamaSpec):
            architecture = ("Qwen2ForCausalLM" if spec.qkv_bias else
                            "MistralForCausalLM" if spec.sliding_window else "LlamaForCausalLM")
        elif isinstance(spec, GPT2Spec):
            architecture = "GPT2LMHeadModel"
        else:
            architecture = "BertModel"
        architecture = SEQ_CLS[architecture] if spec.num_labels else architecture
    if architecture not in FAMILIES:
        raise HFConfigError(f"architecture {architecture!r} is not one of {sorted(FAMILIES)}")
    family = FAMILIES[architecture]
    if isinstance(spec, LlamaSpec) and spec.qkv_bias != architecture.startswith("Qwen2"):
        raise HFConfigError(f"{architecture}: qkv_bias={spec.qkv_bias} does not fit; only Qwen2 "
                            "has q/k/v biases")
    if (isinstance(spec, (LlamaSpec, GPT2Spec))
            and bool(spec.num_labels) != architecture.endswith(CLS_SUFFIX)):
        raise HFConfigError(f"{architecture}: num_labels={spec.num_labels} does not fit; a "
                            f"classifier exports as *{CLS_SUFFIX}, a causal LM as *ForCausalLM")
    return family


def expand_names(family: Family, spec: ModelSpec, paths: set[str]) -> list[tuple[str, str, str]]:
    """The family's table for spec's layers, restricted to rows whose path is in `paths`."""
    rows = []
    for hf, ours, layout in family.names:
        layers = range(spec.n_layers) if "{i}" in hf else (None,)
        for i in layers:
            row = (hf.format(i=i), ours.format(i=i), layout) if i is not None else (hf, ours, layout)
            if row[1] in paths:
                rows.append(row)
    covered = {r[1] for r in rows}
    if covered != paths:
        raise RuntimeError(f"{family.architecture}: name table misses params "
                           f"{sorted(paths - covered)[:5]}")
    return rows
