"""Typed experiment configs (Hydra structured configs): the schema of every key a user can set.

Every knob is a typed field with a default here; Hydra merges `conf/` YAML onto `TrainConfig`, so a
wrong type fails while composing, and `to_train_config` refuses any key the schema does not declare
(however it was added: `+key=`, `++key=` or a YAML file). `fedjax_llm.validation.validate` then checks
values and combinations, naming the key, before any data is loaded or anything is compiled.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import field
from typing import Any, Dict, List, Optional

from fedjax_llm.errors import ConfigError


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
    # name -> CloudConfig. Typed Any for Hydra so a cloud can be added on the command line
    # (clouds.members.north='{clients: 2, select: [north]}'); to_train_config checks every member's keys
    # and types against CloudConfig (the `values` metadata) and converts it.
    members: Dict[str, Any] = field(default_factory=dict, metadata={"values": CloudConfig})
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
class MeshConfig:
    clients: int = 0               # devices on the clients axis (0 = run.devices, or every device / model)
    model: int = 1                 # devices over which the frozen base (and, with full fine-tuning, the
                                   # params each client trains) is sharded, FSDP-style: each weight split
                                   # along its largest divisible dimension, gathered by XLA where used


@dataclasses.dataclass
class RunConfig:
    rounds: int = 18
    eval_every: int = 1            # rounds between evaluations (the last round always evaluates)
    eval_batch_size: int = 64
    on_nonfinite: str = "drop"     # drop: NaN/Inf clients are excluded and counted | stop
    progress: bool = True          # tqdm bar with round, loss and ETA
    devices: int = 0               # devices on the clients mesh axis (0 = all local devices)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    tensorboard: bool = True       # TensorBoard event files in RUN_DIR/tensorboard (process 0 only)
    distributed: str = "auto"      # several processes as one run (jax.distributed): off | auto (when SLURM with
                                   # > 1 task, Open MPI or JAX_COORDINATOR_ADDRESS is detected) | explicit
    coordinator_address: Optional[str] = None  # explicit: HOST:PORT of process 0
    num_processes: int = 0         # explicit: how many processes
    process_id: int = -1           # explicit: this process's index (0 is the one that writes the run dir)
    distributed_timeout_s: int = 120  # how long to wait for every process to join
    compile_cache_dir: Optional[str] = "auto"  # persistent XLA compilation cache: a rerun or the next job
                                   # of a sweep skips compiling; auto = $XDG_CACHE_HOME (or ~/.cache)/
                                   # fedjax_llm/xla; null = off; the JAX_COMPILATION_CACHE_DIR variable wins
    plan_only: bool = False        # print the planner's figures for this config on this process's devices
                                   # (memory per device, FLOPs and message bytes per round) and exit
                                   # without training or writing a run directory (fedjax-llm-plan: any device)


@dataclasses.dataclass
class CheckpointConfig:
    enabled: bool = True
    every: int = 5                 # rounds between checkpoints (the last round always saves)
    keep: int = 3                  # newest checkpoints kept


@dataclasses.dataclass
class PhaseCloudConfig:
    labels: List[str] = field(default_factory=list)  # values of drift.label_field its clients train on in
                                   # this phase (empty = every value)
    keep: Dict[str, float] = field(default_factory=dict)  # label shift: value -> fraction of its
                                   # examples kept in this phase (the others are hidden), in (0, 1]


@dataclasses.dataclass
class PhaseConfig:
    name: str = ""                 # shown in metrics and plots (default: phase<i>)
    rounds: int = 1                # rounds the phase lasts
    clouds: Dict[str, Any] = field(default_factory=dict, metadata=dict(values=PhaseCloudConfig))
                                   # cloud -> what its clients hold in this phase; a cloud not listed
                                   # has no data (it has not joined yet, or has left)


@dataclasses.dataclass
class DriftConfig:
    """Continuous adaptation: the clients' data change over rounds in phases (fedjax_llm/drift/)."""

    enabled: bool = False
    label_field: str = "category"  # the example field the phases select on (category, language, ...)
    phases: List[PhaseConfig] = field(default_factory=list)  # in order; their rounds add up to run.rounds
    target: float = 0.5            # adaptation speed: rounds until a phase's held-out accuracy reaches
                                   # this (language modelling: perplexity at or below it)
    remedy: str = "none"           # none | ewc: an EWC / FedCurv penalty anchoring the parameters that
                                   # mattered in earlier phases (drift/ewc.py)
    ewc_lambda: float = 1.0        # ewc: penalty strength on the Fisher divided by its largest entry


@dataclasses.dataclass
class TLSConfig:
    """Mutual TLS beneath the seal on the gRPC transport (every message is sealed either way)."""

    enabled: bool = False
    ca: Optional[str] = None       # PEM of the CA that signed every party's certificate
                                   # (default: <party key dir>/tls/ca.crt, from fedjax-llm-keys init --tls)
    cert: Optional[str] = None     # this party's certificate (default: <party key dir>/tls/<party>.crt)
    key: Optional[str] = None      # its private key (default: <party key dir>/tls/<party>.key)


@dataclasses.dataclass
class TransportConfig:
    """How deployed parties exchange sealed messages (gRPC; fedjax_llm/clouds/grpc_transport.py)."""

    max_message_mb: float = 1024.0  # largest message a party accepts; checked on the sealed header,
                                   # before any chunk is read
    deadline_s: float = 30.0       # base deadline of every call
    min_rate_mbps: float = 8.0     # deadlines grow with the payload: deadline_s + bytes / this rate
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclasses.dataclass
class DeployConfig:
    """The aggregator and the clouds as separate processes (fedjax_llm/deploy/)."""

    mode: str = "none"             # none: every party in one process (the simulation) | local:
                                   # fedjax-llm-train starts the aggregator and one process per cloud
    host: str = "127.0.0.1"        # the aggregator's address: it listens there, clouds connect to it
    port: int = 0                  # 0: a free port (deploy=local); fedjax-llm-serve needs one
    keys_dir: Optional[str] = None  # per-party key directories (fedjax-llm-keys init --out DIR); a party
                                   # reads only DIR/<party>/ (default with deploy=local: RUN_DIR/keys)
    round_timeout_s: float = 600.0  # the aggregator waits this long for a round's updates, then
                                   # aggregates those that arrived (at least secure.quorum)
    start_timeout_s: float = 300.0  # a round waits this long for clouds not registered yet (never for
                                   # one known dead)
    heartbeat_s: float = 2.0       # a cloud's heartbeat period
    dead_after_s: float = 10.0     # silent this long: the peer counts as dead
    retries: int = 6               # attempts of a call before the peer counts as unreachable
    backoff_s: float = 0.5         # first wait between attempts, doubling up to backoff_max_s
    backoff_max_s: float = 8.0
    reconnect_s: float = 120.0     # a cloud keeps trying to reach a lost aggregator this long
    poll_s: float = 2.0            # one poll for the aggregator's next message waits at most this long
    audit_dir: Optional[str] = None  # the aggregator writes every payload it opened here (audits, tests)


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
    drift: DriftConfig = field(default_factory=DriftConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)


def register_configs() -> None:
    """Registers the schema that conf/train.yaml extends (name: train_schema)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    node = OmegaConf.structured(TrainConfig)
    # Clouds are a user's own names: let the command line add them and their keys without '+';
    # to_train_config checks every member against CloudConfig, so a misspelt key still fails.
    OmegaConf.set_struct(node.clouds.members, False)
    ConfigStore.instance().store(name="train_schema", node=node)


def to_train_config(cfg: Any) -> TrainConfig:
    """OmegaConf (DictConfig) -> typed TrainConfig; a plain TrainConfig passes through. A key the schema
    does not declare raises ConfigError naming it (Hydra lets `+key=` add keys to a structured config)."""
    if isinstance(cfg, TrainConfig):
        return cfg
    from omegaconf import OmegaConf

    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False), TrainConfig)
    if unknown:
        raise ConfigError("; ".join(unknown))
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    out = OmegaConf.to_object(merged)
    members = {name: _as_config(CloudConfig, member, f"clouds.members.{name}")
               for name, member in out.clouds.members.items()}
    phases = [dataclasses.replace(p, clouds={n: _as_config(PhaseCloudConfig, v, f"drift.phases.{i}.clouds.{n}")
                                             for n, v in p.clouds.items()}) for i, p in enumerate(out.drift.phases)]
    return dataclasses.replace(out, clouds=dataclasses.replace(out.clouds, members=members),
                               drift=dataclasses.replace(out.drift, phases=phases))


def _as_config(schema: type, value: Any, key: str) -> Any:
    """A `schema` dataclass from a plain dict (checked key by key), or the dataclass itself."""
    if isinstance(value, schema):
        return value
    from omegaconf import OmegaConf

    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of {schema.__name__} keys, got {value!r}")
    unknown = unknown_keys(value, schema, key + ".")
    if unknown:
        raise ConfigError("; ".join(unknown))
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))
    except Exception as e:  # a value of the wrong type
        full = getattr(e, "full_key", "")
        raise ConfigError(f"{key}.{full}: {str(e).splitlines()[0]}" if full else f"{key}: {e}") from None


def unknown_key_message(full_key: str) -> str:
    """'client.lrr: not a config key; did you mean client.lr?' for a dotted key the schema lacks."""
    parts, schema, i = full_key.split("."), TrainConfig, 0
    generic = f"{full_key}: not a config key"
    while i < len(parts) - 1:
        kind = typing.get_type_hints(schema).get(parts[i])
        if kind is not None and typing.get_origin(kind) in (dict, Dict):
            values = {f.name: f.metadata.get("values") for f in dataclasses.fields(schema)}.get(parts[i])
            kind, i = values or typing.get_args(kind)[1], i + 2  # parts[i + 1] names a member (a cloud)
        else:
            i += 1
        if kind is None or not dataclasses.is_dataclass(kind):
            return generic
        schema = kind
    if i != len(parts) - 1:
        return generic
    prefix = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    found = unknown_keys({parts[-1]: None}, schema, prefix)
    return found[0] if found else generic


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """'KEY: not a config key (did you mean ...?)' for every key of the plain dict `node` that the
    dataclass `schema` does not declare, recursing into nested configs and Dict[str, Config] values."""
    if not isinstance(node, dict):
        return []
    hints = typing.get_type_hints(schema)
    values_of = {f.name: f.metadata.get("values") for f in dataclasses.fields(schema)}
    out = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; {prefix or 'top-level '}keys are " \
                f"{sorted(hints)}"
            out.append(f"{full}: not a config key{hint}")
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            out += unknown_keys(value, kind, full + ".")
        elif typing.get_origin(kind) in (dict, Dict) and isinstance(value, dict):
            inner = values_of.get(key) or typing.get_args(kind)[1]
            if dataclasses.is_dataclass(inner):
                for name, member in value.items():
                    out += unknown_keys(member, inner, f"{full}.{name}.")
        elif typing.get_origin(kind) in (list, List) and isinstance(value, list):
            inner = typing.get_args(kind)[0]
            if dataclasses.is_dataclass(inner):  # drift.phases[i]
                for i, member in enumerate(value):
                    out += unknown_keys(member, inner, f"{full}.{i}.")
    return out
