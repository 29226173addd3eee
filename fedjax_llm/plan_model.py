"""The planner's analytic model: parameters, per-device bytes and FLOPs of one round, from formulas.

Used where the target backend is absent (a GPU or TPU plan made on a CPU) and as the check of the
compiled analysis where it is present. Symbols: L layers, D width, N query heads, K kv heads, h head
dim, F ffn width, V vocab, r LoRA rank, T tokens per sequence the model sees (seq_len - 1 for
language modelling, which predicts tokens[1:] from tokens[:-1]; seq_len for classification), B
batch, S local steps, c compute-dtype bytes, p param-dtype bytes (2 for bfloat16, 4 for float32).

Parameters (`arch`, `param_counts`; equal to `models.params.count_params` of the real model):
- a linear map d_in -> d_out has d_in*d_out weights (+ d_out bias); Llama/Qwen2/Mistral per layer:
  q D->N h, k and v D->K h, o N h->D, gate and up D->F, down F->D, two RMSNorm scales (D each),
  Qwen2 adds q/k/v biases; GPT-2: c_attn D->3D, c_proj D->D, c_fc D->F, mlp c_proj F->D (all biased),
  two LayerNorms (2D each); BERT: query/key/value/attention_output D->D, intermediate D->F, output
  F->D (biased), two LayerNorms; embeddings V*D (GPT-2 + positions*D, BERT + (positions + types)*D
  and a LayerNorm); heads: lm_head D*V unless tied, a score D*labels (decoders), BERT's pooler D*D+D
  and classifier (D+1)*labels.
- LoRA (Hu et al., 2021) on a d_in -> d_out map adds r*(d_in + d_out): A [d_in, r], B [r, d_out]
  (GPT-2's target c_proj adapts both attention and MLP c_proj, as PEFT's suffix match does). With LoRA
  the base is frozen and the adapters plus any task head train; FFA-LoRA moves every A to the frozen
  side. Trainable leaves are stored in model.param_dtype (the engine has no separate adapter dtype).

Per-device memory of the round compute (the engine as built: `round.py`, one cloud's compute at a
time, its clients padded to devices x chunks x chunk, one chunk of clients trained at once):
- params: frozen base bytes + the global trainable params, both replicated without a model axis;
  with a model axis M (run.mesh.model, FSDP-style as the engine shards it): base / M plus the
  largest layer gathered twice (this one and the next) in compute dtype.
- optimizer and client state, per client of a chunk: its local copy of the trainable params, their
  gradients and the optimizer state (AdamW/Adam: mu and nu, 2x trainable in param dtype, as optax's
  scale_by_adam keeps them; SGD with momentum 1x, without 0x); plus per device the reducer's f32
  per-cloud sums (1x trainable in f32), the broadcast, the server's optimizer and aggregator state and
  each of the device's clients' algorithm state (SCAFFOLD's c_i: 1x trainable in f32). The state
  sizes besides the optimizer's come from the algorithm's own init functions on abstract shapes.
- activations, per token of a local step and per client of a chunk, what the backward pass keeps
  (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer Models", count
  the same tensors; here norms and softmax run in f32 as the modules do):
    Llama layer: 2 RMSNorms x (4D f32 input + cD output) + q,k,v (Nh + 2Kh)c + RoPE'd q,k (Nh + Kh)c
                 + scores 13NT (+ cNT if c < 4) + context Nh c + SwiGLU gate, up, silu 3Fc + product Fc
    GPT-2 layer: 2 LayerNorms x (4D + cD) + c_attn 3Dc + scores + context Dc + GELU in/out 2Fc
    BERT layer:  q,k,v 3Dc + scores + context Dc + 2 LayerNorms x (4D + cD) + GELU in/out 2Fc
    scores: jax.nn.dot_product_attention's XLA implementation (no flash kernel) keeps the full T x T
    logits, their exp and the probabilities in f32 and the causal mask (1 byte): 13NT, plus the
    probabilities in compute dtype when c < 4; + per adapted projection r c (x A), + 1 byte per
    element of every active dropout mask. A matmul input (a norm output cD, the context Nh c, the
    SwiGLU product Fc) is kept only when the matmul's weight or its adapter trains: with LoRA the
    frozen ones need no weight gradient, and XLA drops what nothing reads.
    top: embedding output Dc (+ its LayerNorm), final norm 4D + cD, and for a causal LM the f32
    logits and log-softmax 2 x 4V per token (the gradient of the logits, 4V, is a temporary).
  With per-layer rematerialisation (jax.checkpoint around each layer; not in the engine today, shown
  as what it would give): L x Dc (each layer's input) + one layer's activations + top.
- temporaries: the gradient of the logits 4V per token, the device's input batches (S B seq_len x
  (4 token + 4 mask bytes), labels), and the round's outputs (f32 per-cloud aggregate, per-client
  figures and states; the per-cloud f32 sums are the outputs' buffer, counted once, in the state).
  Peak = params + state + activations + temporaries. The optimizer update adds no copy: XLA fuses
  the elementwise update into the old params' and state's buffers (on CPU a copy per client would
  overstate a state-dominated round by 26 %: full w-tiny, AdamW, 3 x 24 tokens per step).
- how it was checked: the inventory above is what jax's autodiff saves (jax.ad_checkpoint's
  saved_residuals lists it) minus what XLA drops; on CPU it lands within 20 % of XLA's compiled
  memory analysis and of the peak resident memory measured while the round runs (tests/test_plan.py,
  README "Planning a run"). On GPU and TPU, XLA may rematerialise by itself when a program exceeds
  device memory, so there the figure without remat is an upper bound.

FLOPs per round (a multiply-add is 2 FLOPs; Kaplan et al., 2020, section 2.1, for 2 per weight per
token forward and 4 backward):
- per token, forward: 2 x every matmul weight (lm_head or tied embedding included, lookups not),
  + 2r(d_in + d_out) per adapter, + attention 4 T N h per layer (QK^T and PV over the full T x T
  scores; causal masking saves no work in XLA's implementation);
- backward: a trained weight costs 4 per token (input and weight gradients), a frozen one 2 (input
  gradient only; adapters sit in every layer, so the gradient flows through the whole frozen base),
  attention 8 T N h per layer. Full fine-tuning is 6 x weights x tokens, LoRA 4 x base + 6 x adapters;
- classifier heads act once per sequence; tokens per round count every padded client slot, since
  padded slots run the same compute: sum over clouds of (padded slots x S x B x T).
The optimizer's elementwise work (about 10 FLOPs per trainable weight per step) is added; norms,
softmax and activations (a few FLOPs per element) are not, and XLA's cost analysis counts them, which
bounds the gap on small models (tests/test_plan.py: within 20 % on nano and w-small).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from fedjax_llm.models.spec import BertSpec, BowSpec, GPT2Spec, LlamaSpec, ModelSpec

F32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
OPTIMIZER_COPIES = {"adamw": 2, "adam": 2}  # optimizer state per trainable weight (sgd: momentum or 0)
OPTIMIZER_FLOPS = 10                          # per trainable weight per step (AdamW's elementwise update)


@dataclasses.dataclass(frozen=True)
class Proj:
    """A linear map of the model, `count` times (once per layer, or once for a head)."""

    name: str        # the LoRA target name (models.spec projection names) or the head's name
    d_in: int
    d_out: int
    bias: bool
    count: int
    per_sequence: bool = False  # a classifier head: applied once per sequence, not per token
    head: bool = False          # a task head: trains under LoRA too (HeadParam)


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the formulas need of a model: its linear maps, lookups and attention shape."""

    family: str          # llama | gpt2 | bert | bow
    layers: int
    d: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    projs: tuple[Proj, ...]
    lookups: int         # embedding-table weights (no FLOPs)
    other: int           # norms and similar weights outside the linear maps
    logits: int          # per-token logits width (causal LM), 0 for a classifier
    tied_logits: bool    # the LM head reuses the embedding: matmul FLOPs, no extra weights
    dropouts: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (attention probs, hidden, embedding) rates


def arch(spec: ModelSpec) -> Arch:
    """The model's linear maps and sizes, by family."""
    if isinstance(spec, LlamaSpec):
        d, n, k, h, f, L = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.resolved_head_dim, spec.ffn_dim, spec.n_layers
        b = spec.qkv_bias
        projs = [Proj("q_proj", d, n * h, b, L), Proj("k_proj", d, k * h, b, L), Proj("v_proj", d, k * h, b, L),
                 Proj("o_proj", n * h, d, False, L), Proj("gate_proj", d, f, False, L),
                 Proj("up_proj", d, f, False, L), Proj("down_proj", f, d, False, L)]
        if spec.num_labels:
            projs.append(Proj("score", d, spec.num_labels, False, 1, per_sequence=True, head=True))
        elif not spec.tie_embeddings:
            projs.append(Proj("lm_head", d, spec.vocab_size, False, 1))
        return Arch("llama", L, d, n, k, h, f, tuple(projs), lookups=spec.vocab_size * d, other=(2 * L + 1) * d,
                    logits=0 if spec.num_labels else spec.vocab_size,
                    tied_logits=spec.tie_embeddings and not spec.num_labels)
    if isinstance(spec, GPT2Spec):
        d, f, L = spec.d_model, spec.ffn_dim, spec.n_layers
        projs = [Proj("c_attn", d, 3 * d, True, L), Proj("c_proj", d, d, True, L), Proj("c_fc", d, f, True, L),
                 Proj("c_proj", f, d, True, L)]
        if spec.num_labels:
            projs.append(Proj("score", d, spec.num_labels, False, 1, per_sequence=True, head=True))
        elif not spec.tie_embeddings:
            projs.append(Proj("lm_head", d, spec.vocab_size, False, 1))
        return Arch("gpt2", L, d, spec.n_heads, spec.n_heads, d // spec.n_heads, f, tuple(projs),
                    lookups=(spec.vocab_size + spec.n_positions) * d, other=(4 * L + 2) * d,
                    logits=0 if spec.num_labels else spec.vocab_size,
                    tied_logits=spec.tie_embeddings and not spec.num_labels,
                    dropouts=(spec.attn_dropout, spec.resid_dropout, spec.embd_dropout))
    if isinstance(spec, BertSpec):
        d, f, L = spec.d_model, spec.ffn_dim, spec.n_layers
        projs = [Proj(name, d, d, True, L) for name in ("query", "key", "value", "attention_output")]
        projs += [Proj("intermediate", d, f, True, L), Proj("output", f, d, True, L),
                  Proj("pooler", d, d, True, 1, per_sequence=True)]
        if spec.num_labels:
            projs.append(Proj("classifier", d, spec.num_labels, True, 1, per_sequence=True, head=True))
        return Arch("bert", L, d, spec.n_heads, spec.n_heads, d // spec.n_heads, f, tuple(projs),
                    lookups=(spec.vocab_size + spec.max_positions + spec.type_vocab_size) * d,
                    other=(4 * L + 2) * d, logits=0, tied_logits=False,
                    dropouts=(spec.attn_dropout, spec.hidden_dropout, spec.hidden_dropout))
    if isinstance(spec, BowSpec):
        projs = [Proj("hidden", spec.d_model, spec.hidden, True, 1, per_sequence=True)] if spec.hidden else []
        projs.append(Proj("out", spec.hidden or spec.d_model, spec.num_labels, True, 1, per_sequence=True))
        return Arch("bow", 0, spec.d_model, 0, 0, 0, 0, tuple(projs), lookups=spec.vocab_size * spec.d_model,
                    other=0, logits=0, tied_logits=False)
    raise TypeError(f"plan: no analytic model for {type(spec).__name__}")


def _adapted(spec: ModelSpec, p: Proj) -> bool:
    return spec.lora is not None and not p.head and p.name in spec.lora.targets


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    trainable: int   # what clients train and messages carry (before the algorithm adds to it)
    frozen: int      # the frozen base (0 for full fine-tuning)
    adapters: int    # LoRA weights (A and B), 0 without LoRA


def param_counts(spec: ModelSpec, ffa: bool = False) -> ParamCounts:
    """Trainable and frozen parameter counts from the formulas of the module docstring."""
    a = arch(spec)
    weights = lambda p: p.count * (p.d_in * p.d_out + (p.d_out if p.bias else 0))  # noqa: E731
    base = sum(weights(p) for p in a.projs) + a.lookups + a.other
    if spec.lora is None:
        return ParamCounts(trainable=base, frozen=0, adapters=0)
    r = spec.lora.rank
    lora_a = sum(p.count * p.d_in * r for p in a.projs if _adapted(spec, p))
    lora_b = sum(p.count * r * p.d_out for p in a.projs if _adapted(spec, p))
    heads = sum(weights(p) for p in a.projs if p.head)
    trainable = lora_b + heads + (0 if ffa else lora_a)
    return ParamCounts(trainable=trainable, frozen=base - heads + (lora_a if ffa else 0), adapters=lora_a + lora_b)


def tokens_seen(seq_len: int, task: str) -> int:
    """T: positions the model computes per sequence (lm: predicts tokens[1:] from tokens[:-1])."""
    return seq_len - 1 if task == "lm" else seq_len


# ----- FLOPs ----------------------------------------------------------------------------------------
def flops_per_sequence(spec: ModelSpec, T: int) -> float:
    """Forward + backward FLOPs of one training sequence of T positions (module docstring)."""
    a = arch(spec)
    full = spec.lora is None
    total = 0.0
    for p in a.projs:
        rows = 1 if p.per_sequence else T
        w = p.count * p.d_in * p.d_out
        trained = full or p.head
        total += rows * w * (6 if trained else 4)
        if _adapted(spec, p):
            total += rows * 6 * p.count * spec.lora.rank * (p.d_in + p.d_out)
    if a.tied_logits:
        total += T * a.d * a.logits * 6 if full else T * a.d * a.logits * 4
    total += a.layers * 12 * T * T * a.heads * a.head_dim  # 4 forward + 8 backward per query-key pair
    return total


def round_flops(spec: ModelSpec, T: int, sequences_per_step: int, steps: int, slots: int,
                trainable: int) -> float:
    """FLOPs of one round: every padded client slot runs S steps of B sequences plus its optimizer."""
    per_step = sequences_per_step * flops_per_sequence(spec, T) + OPTIMIZER_FLOPS * trainable
    return float(slots * steps * per_step)


# ----- activations ----------------------------------------------------------------------------------
def _kept_inputs(spec: ModelSpec, a: Arch, names: tuple[str, ...]) -> bool:
    """A matmul input is kept when any matmul reading it trains its weight or an adapter."""
    if spec.lora is None:
        return True
    return any(_adapted(spec, p) for p in a.projs if p.name in names and p.count == a.layers)


def _score_bytes(a: Arch, T: int, c: int) -> int:
    """Per token of a layer: the attention logits, their exp and the probabilities in f32, the mask,
    and the probabilities cast to the compute dtype (c < 4): what jax.nn.dot_product_attention keeps."""
    return 3 * F32 * a.heads * T + a.heads * T + (c * a.heads * T if c < F32 else 0)


def score_bytes(spec: ModelSpec, T: int, sequences: int) -> float:
    """The attention scores' share of activation_bytes (no remat)."""
    a = arch(spec)
    return float(sequences * T * a.layers * _score_bytes(a, T, DTYPE_BYTES[spec.compute_dtype]))


def _layer_bytes(spec: ModelSpec, a: Arch, T: int, c: int) -> float:
    """Bytes the backward pass keeps per token of one layer (module docstring)."""
    d, n, k, h, f = a.d, a.heads, a.kv_heads, a.head_dim, a.ffn
    keep = lambda *names: _kept_inputs(spec, a, names)  # noqa: E731
    scores = _score_bytes(a, T, c)
    p_attn, p_hidden, _ = a.dropouts
    masks = (n * T if p_attn > 0 else 0) + (2 * d if p_hidden > 0 else 0)
    if a.family == "llama":
        norms = 2 * F32 * d + c * d * (keep("q_proj", "k_proj", "v_proj") + keep("gate_proj", "up_proj"))
        attn = (n * h + 2 * k * h) * c + (n * h + k * h) * c + scores + n * h * c * keep("o_proj")
        body = norms + attn + 3 * f * c + f * c * keep("down_proj")
    elif a.family == "gpt2":
        norms = 2 * F32 * d + c * d * (keep("c_attn") + keep("c_fc"))
        body = norms + 3 * d * c + scores + d * c * keep("c_proj") + f * c + f * c * keep("c_proj")
    else:  # bert: post-norm, the LayerNorm outputs feed the next matmuls
        norms = 2 * (F32 * d + c * d)
        body = norms + 3 * d * c + scores + d * c * keep("attention_output") + f * c + f * c * keep("output")
    lora = 0
    if spec.lora is not None:
        for p in a.projs:
            if _adapted(spec, p) and p.count == a.layers:
                lora += spec.lora.rank * c + (p.d_in if spec.lora.dropout > 0 else 0)
    return body + masks + lora


def activation_bytes(spec: ModelSpec, T: int, sequences: int, remat: bool = False) -> float:
    """Bytes of activations kept for the backward pass of one client's local step."""
    a = arch(spec)
    c = DTYPE_BYTES[spec.compute_dtype]
    if a.family == "bow":
        return float(sequences * T * a.d * c)
    layer = _layer_bytes(spec, a, T, c)
    embed_norm = (F32 * a.d + c * a.d) if a.family == "bert" else 0
    top = a.d * c + embed_norm + (F32 * a.d + c * a.d) + 2 * F32 * a.logits
    if a.dropouts[2] > 0:
        top += a.d
    per_token = (a.layers * a.d * c + layer) if remat else a.layers * layer
    return float(sequences * T * (per_token + top))


def logits_grad_bytes(spec: ModelSpec, T: int, sequences: int) -> float:
    """The f32 gradient of the logits, alive at the start of the backward pass."""
    return float(sequences * T * F32 * arch(spec).logits)


def gathered_layer_bytes(spec: ModelSpec) -> float:
    """One layer's weights in compute dtype: what an FSDP-style model axis gathers at a time."""
    a = arch(spec)
    c = DTYPE_BYTES[spec.compute_dtype]
    per_layer = sum(p.d_in * p.d_out for p in a.projs if p.count == a.layers and a.layers)
    biggest_head = max([p.d_in * p.d_out for p in a.projs if p.count == 1] + [a.lookups if a.tied_logits else 0])
    return float(c * max(per_layer, biggest_head))


# ----- per-client optimizer state -------------------------------------------------------------------
def optimizer_copies(optimizer: str, momentum: float) -> int:
    """Optimizer state per trainable weight, in param dtype (optax's defaults)."""
    if optimizer in OPTIMIZER_COPIES:
        return OPTIMIZER_COPIES[optimizer]
    return 1 if momentum else 0


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device bytes of the round compute by term, and its peak."""

    params: float
    state: float          # optimizer and client state
    activations: float
    temporaries: float
    scores: float         # the attention scores' share of the activations
    remat_activations: float
    arguments: float      # what the compiled round takes as arguments (params, broadcast, inputs, states)
    outputs: float

    @property
    def peak(self) -> float:
        return self.params + self.state + self.activations + self.temporaries

    @property
    def peak_remat(self) -> float:
        return self.params + self.state + self.remat_activations + self.temporaries


def round_memory(spec: ModelSpec, *, counts: ParamCounts, T: int, seq_len: int, batch: int, steps: int,
                 chunk: int, slots: int, optimizer: str, momentum: float, labels: bool,
                 client_state_bytes: float, broadcast_bytes: float, server_bytes: float, output_bytes: float,
                 model_axis: int = 1, input_rows: Optional[int] = None) -> Memory:
    """Per-device bytes of one cloud's round compute (module docstring). `slots` are the device's client
    slots (chunks x chunk), `client_state_bytes` one client's algorithm state, `server_bytes` the
    aggregator's optimizer and algorithm state, `output_bytes` the round's outputs, `batch` the rows each
    device computes and `input_rows` (default `batch`) the rows of input it holds."""
    p = DTYPE_BYTES[spec.param_dtype]
    full = counts.frozen == 0
    shard = model_axis if model_axis > 1 else 1
    trainable = counts.trainable * p / (shard if full else 1)
    frozen = counts.frozen * p / shard
    gathered = 2 * gathered_layer_bytes(spec) if shard > 1 else 0.0
    params = frozen + trainable + gathered
    opt = optimizer_copies(optimizer, momentum)
    per_client = (2 + opt) * trainable          # local params, gradients, optimizer state
    accumulators = F32 * counts.trainable / (shard if full else 1)
    inputs = slots * steps * (input_rows or batch) * (seq_len * 8 + (4 if labels else 0))  # whole per device
    state = chunk * per_client + accumulators + slots * client_state_bytes + broadcast_bytes + server_bytes
    acts = chunk * activation_bytes(spec, T, batch)
    remat = chunk * activation_bytes(spec, T, batch, remat=True)
    rest = output_bytes - min(accumulators, output_bytes)  # the sums are the outputs' buffer (no second copy)
    temps = chunk * logits_grad_bytes(spec, T, batch) + inputs + rest
    arguments = params - gathered + broadcast_bytes + inputs + slots * client_state_bytes
    return Memory(params=params, state=state, activations=acts, temporaries=temps,
                  scores=chunk * score_bytes(spec, T, batch), remat_activations=remat, arguments=arguments, outputs=output_bytes)


def largest_chunk(fits: "callable", per_device: int) -> Optional[int]:
    """The largest clients-per-chunk in [1, per_device] for which fits(chunk) holds (None: not even 1)."""
    best, lo, hi = None, 1, per_device
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def human_bytes(n: float) -> str:
    """'14.5 GB' (decimal units, as device memory is sold)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{1 if abs(n) >= 10 * scale else 2}f} {unit}"
    return f"{int(n)} B"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0


def sci(x: float) -> str:
    return f"{x:.3g}" if x < 1e4 else f"{x / 10 ** math.floor(math.log10(x)):.2f}e{math.floor(math.log10(x))}"
