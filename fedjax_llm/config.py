"""Typed experiment configs (Hydra structured configs) and their start-up validation.

Every knob is a typed field with a default here; Hydra merges `conf/` YAML onto `TrainConfig`, so an
unknown key or a wrong type fails while composing. `validate` then checks values and combinations and
raises `ConfigError` naming the key, before any data is loaded or anything is compiled.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Dict, List, Optional

from fedjax_llm.models.spec import check_spec


class ConfigError(ValueError):
    """A config value or combination that cannot run; the message names the key."""


@dataclasses.dataclass
class LoRAConfig:
    enabled: bool = False          # True: clients train adapters only, the base stays frozen
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    aggregation: str = "naive"     # naive: A and B averaged apart (inexact: mean(AB) != mean(A)mean(B))
                                   # ffa: FFA-LoRA (Sun et al., 2024), A frozen at its random init and
                                   # never sent; B averaged, which is the exact average of the products
                                   # fedex: FedEx-LoRA (Singhal et al., 2024), A and B averaged and the
                                   # residual mean(AB) - mean(A)mean(B) folded into the frozen base
                                   # (sent down every round as dense kernels)
                                   # flex: FlexLoRA (Bai et al., 2024), the product mean re-factorised
                                   # by SVD at rank `rank`; a client of rank r_k gets the top r_k
    client_ranks: List[int] = field(default_factory=list)  # rank of client i: client_ranks[i % len]
                                   # (each <= rank, the padded width); empty = every client at rank


@dataclasses.dataclass
class ModelConfig:
    family: str = "llama"          # llama: sized from SIZES | hf: a Hugging Face directory | bow
    path: Optional[str] = None     # hf: checkpoint directory (config.json + safetensors); "pkg:MOD/sub"
                                   # names a folder inside an installed package (the shipped MiniLM)
    init: str = "pretrained"       # hf: pretrained weights | random (the architecture, freshly drawn)
    size: str = "nano"             # llama: a row of fedjax_llm.models.spec.SIZES
    d_model: Optional[int] = None  # the fields below override the size row when set
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    param_dtype: str = "float32"   # float32 | bfloat16
    compute_dtype: str = "float32"
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclasses.dataclass
class DataConfig:
    task: str = "lm"               # lm: next-token loss (response only for dialog) | classify: a label
                                   # per example (data.label_field) from the text prompt + response
    label_field: str = "category"  # classify: the example field holding the label
    tokenizer_path: Optional[str] = None  # a HF tokenizer directory (default for model.family=hf:
                                   # model.path) instead of training a BPE on the train split
    source: str = "chatterbot"     # chatterbot | jsonl
    path: Optional[str] = None     # jsonl: file of {"prompt","response"} or {"text"} records
    languages: List[str] = field(default_factory=list)   # chatterbot: empty = every language
    categories: List[str] = field(default_factory=list)  # chatterbot: empty = every category
    seq_len: int = 64              # tokens per example, prompt + response (padded / truncated)
    vocab_size: int = 1024         # byte-level BPE vocabulary trained on the training split
    tokenizer_cache: str = "~/.cache/fedjax_llm/tokenizers"
    eval_fraction: float = 0.1     # held out per client; the global eval set is their union
    max_eval_examples: int = 128   # eval examples per cloud (0 = all); the global set is their union


@dataclasses.dataclass
class PartitionConfig:
    kind: str = "natural"          # natural | dirichlet | iid
    alpha: float = 0.5             # dirichlet concentration (smaller = more skew)
    label_field: str = "category"  # dirichlet: the label whose mix is skewed
    client_field: str = "source"   # natural: examples sharing this field stay on one client
    cloud_field: str = "language"  # clouds.members.*.select lists values of this field


@dataclasses.dataclass
class LinkConfig:
    bandwidth_mbps: float = 100.0  # link between the cloud and the global aggregator
    latency_ms: float = 50.0


@dataclasses.dataclass
class CloudConfig:
    clients: int = 3               # clients hosted by this cloud
    share: float = 0.0             # > 0: clients = round(share * clouds.total_clients) instead
    clients_per_round: int = 0     # sampled each round (0 = all)
    select: List[str] = field(default_factory=list)  # values of partition.cloud_field it owns
    link: LinkConfig = field(default_factory=LinkConfig)


@dataclasses.dataclass
class CloudsConfig:
    members: Dict[str, CloudConfig] = field(default_factory=dict)
    total_clients: int = 0         # population split by the members' shares (when they use share)


@dataclasses.dataclass
class ClientConfig:
    local_steps: int = 4           # S: optimizer steps per client per round
    batch_size: int = 16           # B: examples per step
    local_epochs: float = 0.0      # > 0: min(local_steps, ceil(local_epochs * n / B)) steps, rest masked
    optimizer: str = "adamw"       # adamw | adam | sgd (client optimizer, from optax)
    lr: float = 1.5e-3
    momentum: float = 0.0          # sgd only
    weight_decay: float = 0.0
    grad_clip: float = 1.0         # global-norm clip per step (0 = off)
    backend: str = "vmap"          # vmap (jitted, sharded) | loop (debugging and reference)
    clients_per_chunk: int = 0     # clients vmapped together per scan step (0 = auto per backend)
    weighting: str = "examples"    # examples | uniform


RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bound")


@dataclasses.dataclass
class AlgorithmConfig:
    """A federated algorithm as a composition: client terms, per-cloud and cross-cloud rules, and a
    server optimizer. conf/algorithm/*.yaml name the classic combinations."""

    name: str = "fedavg"           # label written to outputs
    prox_mu: float = 0.0           # FedProx proximal term (0 = off)
    scaffold: bool = False         # SCAFFOLD control variates (option II), kept per client
    fednova: bool = False          # FedNova normalised averaging (unequal local steps)
    client_rule: str = "mean"      # how a cloud combines its clients: one of RULES
    cloud_rule: str = "mean"       # how the aggregator combines clouds: one of RULES
    trim_beta: float = 0.2         # trimmed_mean: fraction trimmed at each end
    krum_f: int = 1                # krum / multi_krum: Byzantine entries tolerated
    multi_krum_m: int = 2          # multi_krum: lowest-score entries averaged
    norm_bound: float = 1.0        # norm_bound: max L2 norm of an update
    server_optimizer: str = "sgd"  # sgd | momentum | adam | yogi | adagrad (FedAvg, FedAvgM, FedOpt)
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_b1: float = 0.9
    server_b2: float = 0.99
    server_eps: float = 1e-3       # FedOpt's tau


@dataclasses.dataclass
class ParticipationConfig:
    sampling: str = "fixed"        # fixed: clouds.members.*.clients_per_round | fraction | poisson
    fraction: float = 1.0          # fraction: per-cloud share sampled; poisson: inclusion probability
    dropout: float = 0.0           # probability a sampled client's update never arrives
    straggler_fraction: float = 0.0  # share of sampled clients that make fewer local steps
    straggler_min_steps: int = 1   # stragglers make a uniform number of steps in [min, local_steps]


@dataclasses.dataclass
class AttackConfig:
    kind: str = "none"             # none | sign_flip | scale | gaussian | label_flip
    fraction: float = 0.0          # share of each cloud's clients that are Byzantine (fixed per run)
    cloud: Optional[str] = None    # or: every client of this cloud is Byzantine
    scale: float = 10.0            # sign_flip sends -scale * delta; scale sends scale * delta
    noise_std: float = 1.0         # gaussian: the update is replaced by N(0, noise_std^2)


@dataclasses.dataclass
class DPConfig:
    """Client-level DP-FedAvg (McMahan et al., 2018) with an accountant from dp-accounting."""

    enabled: bool = False
    clip: float = 0.5              # C: per-client L2 bound (initial value when adaptive)
    noise_multiplier: float = 1.0  # z: noise std = z * C on the sum of clipped updates
    adaptive: bool = False         # adaptive clipping toward a quantile (Andrew et al., 2021)
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0      # noise on the unclipped count (0 = expected clients / 20)
    delta: float = 1e-5
    accountant: str = "rdp"        # rdp | pld
    target_epsilon: float = 0.0    # > 0: stop before a round would exceed it


@dataclasses.dataclass
class SecAggConfig:
    """Secure aggregation across clouds (Bonawitz et al., 2017): the aggregator sees only the sum."""

    enabled: bool = False
    scope: str = "clouds"          # clouds: the aggregator sums clouds | clients: each cloud sums its
                                   # clients | both
    threshold: float = 0.6         # share of clouds whose Shamir shares suffice to unmask (t = ceil)
    clip_range: float = 1.0        # fixed-point range of the masked values (normalised update sums)
    frac_bits: int = 20
    ring_bits: int = 32            # 32 | 64


@dataclasses.dataclass
class SecureConfig:
    seal: bool = True              # seal every cross-cloud message (X25519 + HKDF + AEAD + Ed25519)
    cipher: str = "aes-256-gcm"    # aes-256-gcm | chacha20-poly1305
    chunk_bytes: int = 1048576     # sealed payloads travel as authenticated chunks of this size
    compression: str = "none"      # none | bf16 | int8 (lossy; uplink only unless compress_downlink)
    compress_downlink: bool = False
    keys_dir: Optional[str] = None   # default: <run dir>/keys, generated on first start
    trust_file: Optional[str] = None  # peers' public keys (default: <keys dir>/trust.json)
    quorum: int = 1                # clouds whose update must be accepted for a round to count
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    dp: DPConfig = field(default_factory=DPConfig)


@dataclasses.dataclass
class RunConfig:
    rounds: int = 18
    eval_every: int = 1            # rounds between evaluations (the last round always evaluates)
    eval_batch_size: int = 64
    on_nonfinite: str = "drop"     # drop: NaN/Inf clients are excluded and counted | stop
    progress: bool = True          # tqdm bar with round, loss and ETA
    devices: int = 0               # devices on the clients mesh axis (0 = all local devices)
    tensorboard: bool = True       # TensorBoard event files in RUN_DIR/tensorboard (process 0 only)


@dataclasses.dataclass
class CheckpointConfig:
    enabled: bool = True
    every: int = 5                 # rounds between checkpoints (the last round always saves)
    keep: int = 3                  # newest checkpoints kept


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    name: str = "default"
    resume: Optional[str] = None   # a run directory to continue (default: this run's directory)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    clouds: CloudsConfig = field(default_factory=CloudsConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def register_configs() -> None:
    """Registers the schema that conf/train.yaml extends (name: train_schema)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: Any) -> TrainConfig:
    """OmegaConf (DictConfig) -> typed TrainConfig; a plain TrainConfig passes through."""
    if isinstance(cfg, TrainConfig):
        return cfg
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"{value!r} is not one of {choices}")


def _resolve_shares(cfg: TrainConfig) -> TrainConfig:
    """Turns clouds given as a share of clouds.total_clients into client counts."""
    members = cfg.clouds.members
    shares = {n: c.share for n, c in members.items() if c.share}
    if not shares:
        return cfg
    total = cfg.clouds.total_clients
    _require(total >= 1, "clouds.total_clients", f"clouds {sorted(shares)} set share, so it must be >= 1")
    for name, share in shares.items():
        _require(0 < share <= 1, f"clouds.members.{name}.share", f"must be in (0, 1], got {share}")
    _require(sum(shares.values()) <= 1 + 1e-9, "clouds.members",
             f"shares add up to {sum(shares.values()):.3f} > 1")
    resolved = {n: dataclasses.replace(c, clients=max(1, round(c.share * total))) if c.share else c
                for n, c in members.items()}
    return dataclasses.replace(cfg, clouds=dataclasses.replace(cfg.clouds, members=resolved))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks values and combinations and returns the config with derived values resolved (client
    counts from shares); raises ConfigError naming the key. Touches no device."""
    _require(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    cfg = _validate_model_and_task(cfg)
    d = cfg.data
    _one_of(d.source, "data.source", ("chatterbot", "jsonl"))
    if d.source == "jsonl":
        _require(bool(d.path), "data.path", "data.source=jsonl needs data.path=FILE.jsonl")
    _require(d.seq_len >= 4, "data.seq_len", f"must be >= 4, got {d.seq_len}")
    _require(d.vocab_size >= 300, "data.vocab_size",
             f"must be >= 300 (256 bytes + special tokens), got {d.vocab_size}")
    _require(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    _require(d.max_eval_examples >= 0, "data.max_eval_examples", "must be >= 0")

    p = cfg.partition
    _one_of(p.kind, "partition.kind", ("natural", "dirichlet", "iid"))
    if p.kind == "dirichlet":
        _require(p.alpha > 0, "partition.alpha", f"must be > 0, got {p.alpha}")

    cfg = _resolve_shares(cfg)
    members = cfg.clouds.members
    _require(len(members) >= 1, "clouds.members", "at least one cloud is needed")
    total_clients = sum(c.clients for c in members.values())
    _require(len(members) <= total_clients, "clouds.members",
             f"{len(members)} clouds but only {total_clients} clients in total")
    with_select = [n for n, c in members.items() if c.select]
    _require(not with_select or len(with_select) == len(members), "clouds.members",
             f"either every cloud sets select or none does; only {with_select} do")
    for name, c in members.items():
        key = f"clouds.members.{name}"
        _require(c.clients >= 1, f"{key}.clients", f"must be >= 1, got {c.clients}")
        _require(0 <= c.clients_per_round <= c.clients, f"{key}.clients_per_round",
                 f"must be in [0, clients={c.clients}], got {c.clients_per_round}")
        _require(c.link.bandwidth_mbps > 0, f"{key}.link.bandwidth_mbps", "must be > 0")
        _require(c.link.latency_ms >= 0, f"{key}.link.latency_ms", "must be >= 0")

    c = cfg.client
    _require(c.local_steps >= 1, "client.local_steps", f"must be >= 1, got {c.local_steps}")
    _require(c.batch_size >= 1, "client.batch_size", f"must be >= 1, got {c.batch_size}")
    _require(c.local_epochs >= 0, "client.local_epochs", f"must be >= 0, got {c.local_epochs}")
    _one_of(c.optimizer, "client.optimizer", ("adamw", "adam", "sgd"))
    _require(c.lr > 0, "client.lr", f"must be > 0, got {c.lr}")
    _require(0 <= c.momentum < 1, "client.momentum", f"must be in [0, 1), got {c.momentum}")
    _require(c.weight_decay >= 0, "client.weight_decay", f"must be >= 0, got {c.weight_decay}")
    _require(c.grad_clip >= 0, "client.grad_clip", f"must be >= 0, got {c.grad_clip}")
    _one_of(c.backend, "client.backend", ("vmap", "loop"))
    _require(c.clients_per_chunk >= 0, "client.clients_per_chunk", "must be >= 0 (0 = auto)")
    _one_of(c.weighting, "client.weighting", ("examples", "uniform"))

    _validate_algorithm(cfg)
    _validate_participation(cfg)
    _validate_attack(cfg)
    _validate_secure(cfg)

    r = cfg.run
    _require(r.rounds >= 1, "run.rounds", f"must be >= 1, got {r.rounds}")
    _require(r.eval_every >= 1, "run.eval_every", f"must be >= 1, got {r.eval_every}")
    _require(r.eval_batch_size >= 1, "run.eval_batch_size", "must be >= 1")
    _one_of(r.on_nonfinite, "run.on_nonfinite", ("drop", "stop"))
    _require(r.devices >= 0, "run.devices", "must be >= 0 (0 = all)")

    k = cfg.checkpoint
    _require(k.every >= 1, "checkpoint.every", f"must be >= 1, got {k.every}")
    _require(k.keep >= 1, "checkpoint.keep", f"must be >= 1, got {k.keep}")
    return cfg


def _validate_model_and_task(cfg: TrainConfig) -> TrainConfig:
    """Model family and task; for hf models reads config.json so an unsupported architecture or
    field fails here, naming model.path and the field. Resolves data.tokenizer_path."""
    m, d = cfg.model, cfg.data
    _one_of(m.family, "model.family", ("llama", "hf", "bow"))
    _one_of(d.task, "data.task", ("lm", "classify"))
    _require(bool(d.label_field), "data.label_field", "must name an example field")
    if m.family == "hf":
        _require(bool(m.path), "model.path", "model.family=hf needs model.path=DIR (a Hugging Face checkpoint)")
        _one_of(m.init, "model.init", ("pretrained", "random"))
        if not d.tokenizer_path:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, tokenizer_path=m.path))
    _validate_lora(cfg)
    if m.family == "bow":
        _require(d.task == "classify", "model.family", "=bow is a classifier; set data.task=classify")
        _require(not m.lora.enabled, "model.lora.enabled", "LoRA has no layers to adapt in model.family=bow")
    from fedjax_llm.models.build import spec_from_config  # reads only config.json
    try:
        check_spec(spec_from_config(cfg, vocab_size=d.vocab_size, num_labels=2 if d.task == "classify" else None))
    except (ValueError, OSError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(("model.", "data.")) else f"model.path: {msg}") from None
    return cfg


def _validate_lora(cfg: TrainConfig) -> None:
    lo, a = cfg.model.lora, cfg.algorithm
    _one_of(lo.aggregation, "model.lora.aggregation", ("naive", "ffa", "fedex", "flex"))
    if lo.aggregation != "naive" or lo.client_ranks:
        key = "model.lora.aggregation" if lo.aggregation != "naive" else "model.lora.client_ranks"
        _require(lo.enabled, key, "needs model.lora.enabled=true")
    for i, r in enumerate(lo.client_ranks):
        _require(1 <= r <= lo.rank, f"model.lora.client_ranks[{i}]",
                 f"= {r} must be in [1, model.lora.rank={lo.rank}] (rank is the padded width)")
    if lo.aggregation not in ("fedex", "flex"):
        return
    why = f"model.lora.aggregation={lo.aggregation!r} makes the model the exact product mean"
    _require(a.server_optimizer == "sgd" and a.server_lr == 1.0, "algorithm.server_optimizer",
             f"={a.server_optimizer!r} (server_lr={a.server_lr}): {why}, so the server must apply it as "
             "is (sgd, server_lr=1)")
    for level in ("client_rule", "cloud_rule"):
        _require(getattr(a, level) == "mean", f"algorithm.{level}",
                 f"={getattr(a, level)!r}: {why}, which needs weighted means at every level")
    for flag in ("scaffold", "fednova"):
        _require(not getattr(a, flag), f"algorithm.{flag}", f"cannot be combined with {why.split(' makes')[0]}")
    _require(not cfg.secure.dp.enabled, "secure.dp.enabled",
             f"cannot be combined with {why.split(' makes')[0]}: the product terms are not clipped")


def _validate_algorithm(cfg: TrainConfig) -> None:
    a = cfg.algorithm
    _one_of(a.client_rule, "algorithm.client_rule", RULES)
    _one_of(a.cloud_rule, "algorithm.cloud_rule", RULES)
    _one_of(a.server_optimizer, "algorithm.server_optimizer", ("sgd", "momentum", "adam", "yogi", "adagrad"))
    _require(a.server_lr > 0, "algorithm.server_lr", f"must be > 0, got {a.server_lr}")
    _require(a.prox_mu >= 0, "algorithm.prox_mu", f"must be >= 0, got {a.prox_mu}")
    _require(0 <= a.trim_beta < 0.5, "algorithm.trim_beta", f"must be in [0, 0.5), got {a.trim_beta}")
    _require(a.krum_f >= 0, "algorithm.krum_f", f"must be >= 0, got {a.krum_f}")
    _require(a.multi_krum_m >= 1, "algorithm.multi_krum_m", f"must be >= 1, got {a.multi_krum_m}")
    _require(a.norm_bound > 0, "algorithm.norm_bound", f"must be > 0, got {a.norm_bound}")
    _require(not (a.scaffold and a.fednova), "algorithm.scaffold",
             "and algorithm.fednova are both set; choose one")
    for flag in ("scaffold", "fednova"):
        if getattr(a, flag):
            for level in ("client_rule", "cloud_rule"):
                rule = getattr(a, level)
                _require(rule in ("mean", "norm_bound"), f"algorithm.{flag}",
                         f"needs averaged updates, but algorithm.{level}={rule!r}")
    sizes = {name: (c.clients_per_round or c.clients) for name, c in cfg.clouds.members.items()}
    for level, counts in (("client_rule", sizes), ("cloud_rule", {"clouds": len(sizes)})):
        rule = getattr(a, level)
        for where, n in counts.items():
            if rule == "krum" or rule == "multi_krum":
                _require(n >= 2 * a.krum_f + 3, f"algorithm.{level}",
                         f"{rule} with algorithm.krum_f={a.krum_f} needs >= {2 * a.krum_f + 3} entries, "
                         f"{where} has {n}")
            if rule == "multi_krum":
                _require(a.multi_krum_m <= n - a.krum_f, "algorithm.multi_krum_m",
                         f"{a.multi_krum_m} exceeds n - krum_f = {n - a.krum_f} for {where}")


def _validate_participation(cfg: TrainConfig) -> None:
    p = cfg.participation
    _one_of(p.sampling, "participation.sampling", ("fixed", "fraction", "poisson"))
    _require(0 < p.fraction <= 1, "participation.fraction", f"must be in (0, 1], got {p.fraction}")
    _require(0 <= p.dropout < 1, "participation.dropout", f"must be in [0, 1), got {p.dropout}")
    _require(0 <= p.straggler_fraction <= 1, "participation.straggler_fraction",
             f"must be in [0, 1], got {p.straggler_fraction}")
    _require(1 <= p.straggler_min_steps <= cfg.client.local_steps, "participation.straggler_min_steps",
             f"must be in [1, client.local_steps={cfg.client.local_steps}], got {p.straggler_min_steps}")
    if p.sampling != "fixed":
        fixed = [n for n, c in cfg.clouds.members.items() if c.clients_per_round]
        _require(not fixed, "participation.sampling",
                 f"={p.sampling!r} conflicts with clouds.members.{fixed[0] if fixed else ''}.clients_per_round")


def _validate_attack(cfg: TrainConfig) -> None:
    t = cfg.attack
    _one_of(t.kind, "attack.kind", ("none", "sign_flip", "scale", "gaussian", "label_flip"))
    _require(0 <= t.fraction <= 1, "attack.fraction", f"must be in [0, 1], got {t.fraction}")
    if t.cloud is not None:
        _require(t.cloud in cfg.clouds.members, "attack.cloud",
                 f"{t.cloud!r} is not one of the clouds {list(cfg.clouds.members)}")
    if t.kind != "none":
        _require(t.fraction > 0 or t.cloud is not None, "attack.kind",
                 f"={t.kind!r} needs attack.fraction > 0 or attack.cloud")


def _validate_secure(cfg: TrainConfig) -> None:
    s, a = cfg.secure, cfg.algorithm
    _one_of(s.cipher, "secure.cipher", ("aes-256-gcm", "chacha20-poly1305"))
    _require(s.chunk_bytes >= 1024, "secure.chunk_bytes", f"must be >= 1024, got {s.chunk_bytes}")
    _one_of(s.compression, "secure.compression", ("none", "bf16", "int8"))
    n = len(cfg.clouds.members)
    _require(1 <= s.quorum <= n, "secure.quorum", f"must be in [1, {n} clouds], got {s.quorum}")
    mean_only = {"algorithm.client_rule": a.client_rule, "algorithm.cloud_rule": a.cloud_rule}
    g = s.secagg
    if g.enabled:
        _one_of(g.scope, "secure.secagg.scope", ("clouds", "clients", "both"))
        if g.scope != "clients":
            _require(n >= 2, "secure.secagg.enabled", "across clouds needs at least 2 clouds")
        if g.scope != "clouds":
            _require(a.client_rule in ("mean", "norm_bound"), "secure.secagg.scope",
                     f"={g.scope!r}: a cloud sees only its clients' sum, so algorithm.client_rule="
                     f"{a.client_rule!r} cannot run")
            small = [name for name, c in cfg.clouds.members.items() if (c.clients_per_round or c.clients) < 2]
            _require(not small, "secure.secagg.scope", f"={g.scope!r} needs >= 2 clients per round in {small}")
        _require(0 < g.threshold <= 1, "secure.secagg.threshold", f"must be in (0, 1], got {g.threshold}")
        _one_of(g.ring_bits, "secure.secagg.ring_bits", (32, 64))
        _require(g.clip_range > 0, "secure.secagg.clip_range", "must be > 0")
        if g.scope != "clients":
            _require(a.cloud_rule == "mean", "secure.secagg.enabled",
                     f"the aggregator sees only the sum, so algorithm.cloud_rule={a.cloud_rule!r} cannot run")
        for flag in ("scaffold", "fednova"):
            _require(not getattr(a, flag), "secure.secagg.enabled",
                     f"sums only the update and weight; algorithm.{flag}=true needs more")
    d = s.dp
    if d.enabled:
        _require(d.clip > 0, "secure.dp.clip", f"must be > 0, got {d.clip}")
        _require(d.noise_multiplier >= 0, "secure.dp.noise_multiplier", "must be >= 0")
        _require(0 < d.delta < 1, "secure.dp.delta", f"must be in (0, 1), got {d.delta}")
        _one_of(d.accountant, "secure.dp.accountant", ("rdp", "pld"))
        _require(0 < d.target_quantile < 1, "secure.dp.target_quantile", "must be in (0, 1)")
        _require(cfg.client.weighting == "uniform", "secure.dp.enabled",
                 f"DP-FedAvg bounds each client's contribution: set client.weighting=uniform "
                 f"(got {cfg.client.weighting!r})")
        for key, rule in mean_only.items():
            _require(rule == "mean", "secure.dp.enabled", f"clips and sums updates; {key}={rule!r} cannot run")
        for flag in ("scaffold", "fednova"):
            _require(not getattr(a, flag), "secure.dp.enabled", f"is not defined with algorithm.{flag}=true")
        _require(cfg.participation.dropout == 0, "secure.dp.enabled",
                 "accounts Poisson or fixed-size sampling; participation.dropout must be 0")
        if d.adaptive:
            sizes = [c.clients for c in cfg.clouds.members.values()]
            if cfg.participation.sampling == "poisson":
                expected = sum(sizes) * cfg.participation.fraction
            elif cfg.participation.sampling == "fraction":
                expected = sum(max(1, round(cfg.participation.fraction * n)) for n in sizes)
            else:
                expected = sum(c.clients_per_round or c.clients for c in cfg.clouds.members.values())
            sigma_b = d.count_stddev or expected / 20
            _require(2 * sigma_b > d.noise_multiplier, "secure.dp.count_stddev",
                     f"adaptive clipping needs 2 * count_stddev > noise_multiplier={d.noise_multiplier}; "
                     f"it is {sigma_b:.3g} (0 means expected clients / 20 = {expected / 20:.3g})")
        if d.accountant == "pld":
            _require(cfg.participation.sampling == "poisson", "secure.dp.accountant",
                     "pld supports Poisson sampling only (participation.sampling=poisson)")
