"""Model architecture specs: Llama-family sizes, GPT-2, BERT and bag-of-embeddings specs, LoRA.

A size is a row of `SIZES`; config fields that are not None override the row. Nothing here imports
jax, so configs can be validated before any device work starts.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

# name: (d_model, n_layers, n_heads, n_kv_heads, ffn_dim)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "w-tiny": (128, 2, 4, 4, 344),     # benchmark workload W-tiny
    "nano": (128, 4, 4, 2, 384),       # default experiment: ~1.3M params at vocab 2048
    "w-small": (256, 4, 8, 8, 688),    # benchmark workload W-small
    "micro": (384, 6, 6, 2, 1024),
    "mini": (512, 8, 8, 4, 1376),
    "base-100m": (768, 12, 12, 4, 2048),
}

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# GPT-2 follows PEFT's suffix match: "c_proj" adapts both attn.c_proj and mlp.c_proj.
GPT2_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
BERT_LORA_TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")
DTYPES = ("float32", "bfloat16")
# Hugging Face hidden_act / activation_function values that the GPT-2 and BERT modules implement.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
BERT_OUTPUTS = ("hidden", "pooled", "logits")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Low-rank adapters W + (alpha / rank) * A @ B on the named projections (Hu et al., 2021)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """Decoder-only Llama-family architecture (also Qwen2 via qkv_bias, Mistral via GQA).

    num_labels makes it *ForSequenceClassification: no lm_head, a bias-free `score` head instead.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: Optional[int] = None  # None: d_model // n_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    lora: Optional[LoRASpec] = None  # None: full fine-tuning
    sliding_window: Optional[int] = None  # attention is full: apply rejects longer sequences
    num_labels: Optional[int] = None  # set: logits [B, num_labels] from `score` on the last token

    def max_len(self) -> tuple[str, Optional[int]]:
        """(config field, longest sequence the model computes exactly); None: unbounded."""
        return "sliding_window", self.sliding_window

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection that LoRA may target."""
        hd = self.resolved_head_dim
        return {
            "q_proj": (self.d_model, self.n_heads * hd),
            "k_proj": (self.d_model, self.n_kv_heads * hd),
            "v_proj": (self.d_model, self.n_kv_heads * hd),
            "o_proj": (self.n_heads * hd, self.d_model),
            "gate_proj": (self.d_model, self.ffn_dim),
            "up_proj": (self.d_model, self.ffn_dim),
            "down_proj": (self.ffn_dim, self.d_model),
        }

    def param_count(self) -> int:
        """Parameters of the base model (adapters excluded)."""
        proj = sum(i * o for i, o in self.projection_shapes().values())
        bias = 0
        if self.qkv_bias:
            bias = (self.n_heads + 2 * self.n_kv_heads) * self.resolved_head_dim
        per_layer = proj + bias + 2 * self.d_model
        return self.n_layers * per_layer + _heads(self) + self.d_model


@dataclasses.dataclass(frozen=True)
class GPT2Spec:
    """GPT-2 (GPT2LMHeadModel): learned positions, pre-LayerNorm blocks, fused c_attn, GELU MLP.

    num_labels makes it GPT2ForSequenceClassification (bias-free `score` on the last real token).
    """

    vocab_size: int
    n_positions: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    activation: str = "gelu_new"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    embd_dropout: float = 0.0   # the three HF dropouts act only when apply gets a dropout_key
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    lora: Optional[LoRASpec] = None
    num_labels: Optional[int] = None

    def max_len(self) -> tuple[str, Optional[int]]:
        return "n_positions", self.n_positions

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.n_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection that LoRA may target (c_proj: the attention one)."""
        d = self.d_model
        return {"c_attn": (d, 3 * d), "c_proj": (d, d), "c_fc": (d, self.ffn_dim)}

    def param_count(self) -> int:
        d, f = self.d_model, self.ffn_dim
        per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        return self.n_layers * per_layer + _heads(self) + self.n_positions * d + 2 * d


def _heads(spec: Union[LlamaSpec, GPT2Spec]) -> int:
    """Token embedding plus lm_head (untied) or the score head (classifier: no lm_head)."""
    embed = spec.vocab_size * spec.d_model
    if spec.num_labels:
        return embed + spec.d_model * spec.num_labels
    return embed * (1 if spec.tie_embeddings else 2)


@dataclasses.dataclass(frozen=True)
class BertSpec:
    """BERT encoder (BertModel) with pooler; num_labels adds BertForSequenceClassification's head.

    output picks what apply returns: "hidden" [B, T, D], "pooled" [B, D] or "logits" [B, num_labels].
    """

    vocab_size: int
    max_positions: int
    type_vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    activation: str = "gelu"
    norm_eps: float = 1e-12
    hidden_dropout: float = 0.0  # HF dropouts act only when apply gets a dropout_key
    attn_dropout: float = 0.0
    classifier_dropout: float = 0.0
    num_labels: Optional[int] = None
    output: str = "hidden"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    lora: Optional[LoRASpec] = None

    def max_len(self) -> tuple[str, Optional[int]]:
        return "max_position_embeddings", self.max_positions

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.n_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        d, f = self.d_model, self.ffn_dim
        return {"query": (d, d), "key": (d, d), "value": (d, d), "attention_output": (d, d),
                "intermediate": (d, f), "output": (f, d)}

    def param_count(self) -> int:
        d, f = self.d_model, self.ffn_dim
        per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        embed = (self.vocab_size + self.max_positions + self.type_vocab_size) * d + 2 * d
        head = (d + 1) * self.num_labels if self.num_labels else 0
        return self.n_layers * per_layer + embed + d * d + d + head


@dataclasses.dataclass(frozen=True)
class BowSpec:
    """Bag-of-embeddings classifier (models/bow.py): masked mean of token embeddings, an optional
    ReLU hidden layer of width `hidden` (0: none), then a linear layer to num_labels."""

    vocab_size: int
    d_model: int
    num_labels: int
    hidden: int = 0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    lora: Optional[LoRASpec] = None  # must stay None: the model is small enough to train fully

    def max_len(self) -> tuple[str, Optional[int]]:
        return "max_len", None

    def param_count(self) -> int:
        d, h, n = self.d_model, self.hidden, self.num_labels
        body = (d * h + h + h * n) if h else d * n
        return self.vocab_size * d + body + n


ModelSpec = Union[LlamaSpec, GPT2Spec, BertSpec, BowSpec]


def llama_spec(size: str, vocab_size: int, lora: Optional[LoRASpec] = None,
               **overrides: object) -> LlamaSpec:
    """Builds a spec from a row of SIZES; overrides that are None keep the row's value."""
    if size not in SIZES:
        raise ValueError(f"model.size: unknown size {size!r}; expected one of {sorted(SIZES)}")
    d, layers, heads, kv, ffn = SIZES[size]
    fields = dict(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaSpec(vocab_size=vocab_size, lora=lora, **fields)  # type: ignore[arg-type]


def check_spec(spec: ModelSpec, prefix: str = "model") -> None:
    """Raises ValueError naming the config key when the architecture is impossible."""
    if isinstance(spec, BowSpec):
        _check_bow(spec, prefix)
        return
    if not isinstance(spec, LlamaSpec):
        _check_encoder_or_gpt2(spec, prefix)
        return
    _check_num_labels(spec, prefix)
    if spec.n_heads % spec.n_kv_heads:
        raise ValueError(f"{prefix}.n_kv_heads: {spec.n_kv_heads} must divide n_heads={spec.n_heads}")
    if spec.head_dim is None and spec.d_model % spec.n_heads:
        raise ValueError(f"{prefix}.n_heads: {spec.n_heads} must divide d_model={spec.d_model} "
                         f"(or set {prefix}.head_dim)")
    if spec.resolved_head_dim % 2:
        raise ValueError(f"{prefix}.head_dim: RoPE needs an even head dim, got {spec.resolved_head_dim}")
    for name in ("param_dtype", "compute_dtype"):
        if getattr(spec, name) not in DTYPES:
            raise ValueError(f"{prefix}.{name}: {getattr(spec, name)!r} not in {DTYPES}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        if getattr(spec, name) <= 0:
            raise ValueError(f"{prefix}.{name}: must be > 0, got {getattr(spec, name)}")
    if spec.lora is not None:
        _check_lora(spec, spec.lora, f"{prefix}.lora")


def _check_encoder_or_gpt2(spec: Union[GPT2Spec, BertSpec], prefix: str) -> None:
    """check_spec for GPT2Spec and BertSpec: positive sizes, divisible heads, known names."""
    names = ["vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim"]
    names += ["n_positions"] if isinstance(spec, GPT2Spec) else ["max_positions", "type_vocab_size"]
    for name in names:
        if getattr(spec, name) <= 0:
            raise ValueError(f"{prefix}.{name}: must be > 0, got {getattr(spec, name)}")
    if spec.d_model % spec.n_heads:
        raise ValueError(f"{prefix}.n_heads: {spec.n_heads} must divide d_model={spec.d_model}")
    if spec.activation not in ACTIVATIONS:
        raise ValueError(f"{prefix}.activation: {spec.activation!r} not in {ACTIVATIONS}")
    for name in ("param_dtype", "compute_dtype"):
        if getattr(spec, name) not in DTYPES:
            raise ValueError(f"{prefix}.{name}: {getattr(spec, name)!r} not in {DTYPES}")
    if isinstance(spec, GPT2Spec):
        _check_num_labels(spec, prefix)
    if isinstance(spec, BertSpec):
        if spec.output not in BERT_OUTPUTS:
            raise ValueError(f"{prefix}.output: {spec.output!r} not in {BERT_OUTPUTS}")
        if spec.output == "logits" and not spec.num_labels:
            raise ValueError(f"{prefix}.num_labels: output='logits' needs num_labels > 0, "
                             f"got {spec.num_labels}")
    if spec.lora is not None:
        _check_lora(spec, spec.lora, f"{prefix}.lora")


def _check_num_labels(spec: Union[LlamaSpec, GPT2Spec], prefix: str) -> None:
    if spec.num_labels is not None and spec.num_labels <= 0:
        raise ValueError(f"{prefix}.num_labels: must be > 0 (or None), got {spec.num_labels}")


def _check_bow(spec: BowSpec, prefix: str) -> None:
    """check_spec for BowSpec: positive sizes, known dtypes, and no LoRA."""
    for name in ("vocab_size", "d_model", "num_labels"):
        if getattr(spec, name) <= 0:
            raise ValueError(f"{prefix}.{name}: must be > 0, got {getattr(spec, name)}")
    if spec.hidden < 0:
        raise ValueError(f"{prefix}.hidden: must be >= 0 (0: no hidden layer), got {spec.hidden}")
    for name in ("param_dtype", "compute_dtype"):
        if getattr(spec, name) not in DTYPES:
            raise ValueError(f"{prefix}.{name}: {getattr(spec, name)!r} not in {DTYPES}")
    if spec.lora is not None:
        raise ValueError(f"{prefix}.lora: the bag-of-embeddings model has no projections to adapt; "
                         "set lora to None (it trains all its weights)")


def _check_lora(spec: ModelSpec, lora: LoRASpec, prefix: str) -> None:
    shapes = spec.projection_shapes()
    if not lora.targets:
        raise ValueError(f"{prefix}.targets: empty; name at least one of {tuple(shapes)}")
    for t in lora.targets:
        if t not in shapes:
            raise ValueError(f"{prefix}.targets: unknown projection {t!r}; expected some of "
                             f"{tuple(shapes)}")
    if lora.rank <= 0:
        raise ValueError(f"{prefix}.rank: must be > 0, got {lora.rank}")
    for t in lora.targets:
        width = min(shapes[t])
        if lora.rank > width:
            raise ValueError(f"{prefix}.rank: {lora.rank} exceeds the width {width} of {t} "
                             f"(shape {shapes[t]})")
    if not 0.0 <= lora.dropout < 1.0:
        raise ValueError(f"{prefix}.dropout: must be in [0, 1), got {lora.dropout}")
    if lora.alpha <= 0:
        raise ValueError(f"{prefix}.alpha: must be > 0, got {lora.alpha}")


def projection_names(targets: Sequence[str]) -> tuple[str, ...]:
    return tuple(t for t in LORA_TARGETS if t in targets)
