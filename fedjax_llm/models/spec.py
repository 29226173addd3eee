"""Model architecture specs: one table of Llama-family sizes plus LoRA settings.

A size is a row of `SIZES`; config fields that are not None override the row. Nothing here imports
jax, so configs can be validated before any device work starts.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

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
DTYPES = ("float32", "bfloat16")


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
    """Decoder-only Llama-family architecture (also Qwen2 via qkv_bias, Mistral via GQA)."""

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
        heads = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + heads + self.d_model


def llama_spec(size: str, vocab_size: int, lora: Optional[LoRASpec] = None,
               **overrides: object) -> LlamaSpec:
    """Builds a spec from a row of SIZES; overrides that are None keep the row's value."""
    if size not in SIZES:
        raise ValueError(f"model.size: unknown size {size!r}; expected one of {sorted(SIZES)}")
    d, layers, heads, kv, ffn = SIZES[size]
    fields = dict(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaSpec(vocab_size=vocab_size, lora=lora, **fields)  # type: ignore[arg-type]


def check_spec(spec: LlamaSpec, prefix: str = "model") -> None:
    """Raises ValueError naming the config key when the architecture is impossible."""
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


def _check_lora(spec: LlamaSpec, lora: LoRASpec, prefix: str) -> None:
    if not lora.targets:
        raise ValueError(f"{prefix}.targets: empty; name at least one of {LORA_TARGETS}")
    shapes = spec.projection_shapes()
    for t in lora.targets:
        if t not in shapes:
            raise ValueError(f"{prefix}.targets: unknown projection {t!r}; expected some of {LORA_TARGETS}")
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
