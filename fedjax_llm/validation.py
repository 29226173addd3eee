"""Start-up validation of a TrainConfig: values, combinations, and derived values (client counts
from shares). Every error is a `ConfigError` naming the key; nothing here touches a device or loads
data (an hf model's config.json is read, so an unsupported architecture fails here).
"""
from __future__ import annotations

import dataclasses
import logging
import math

from fedjax_llm.config import RULES, TrainConfig
from fedjax_llm.distributed import validate_layout
from fedjax_llm.errors import ConfigError
from fedjax_llm.models.spec import check_spec


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"{value!r} is not one of {choices}")


def _resolve_shares(cfg: TrainConfig) -> TrainConfig:
    """Turns clouds given as a share of clouds.total_clients into client counts: largest remainder, so
    the counts add up to round(sum of shares x total); a cloud whose share rounds to no client fails."""
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
    exact = {n: s * total for n, s in shares.items()}
    counts = {n: int(math.floor(x + 1e-9)) for n, x in exact.items()}
    target = int(round(sum(exact.values())))
    by_remainder = sorted(exact, key=lambda n: (-(exact[n] - counts[n]), list(members).index(n)))
    for name in by_remainder[:max(0, target - sum(counts.values()))]:
        counts[name] += 1
    empty = [n for n, k in counts.items() if k == 0]
    _require(not empty, "clouds.total_clients",
             f"{total} clients split by shares leave {empty} without a client (share "
             f"{shares[empty[0]] if empty else 0} x {total} = {exact[empty[0]] if empty else 0:.2f}); "
             f"raise clouds.total_clients to at least {math.ceil(1 / min(shares.values()))} or the shares")
    resolved = {n: dataclasses.replace(c, clients=counts[n]) if n in counts else c for n, c in members.items()}
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
    validate_layout(r)
    _require(r.mesh.clients >= 0, "run.mesh.clients", f"must be >= 0 (0 = every device / model), got {r.mesh.clients}")
    _require(r.mesh.model >= 1, "run.mesh.model", f"must be >= 1, got {r.mesh.model}")
    _require(not (r.mesh.clients and r.devices and r.mesh.clients != r.devices), "run.mesh.clients",
             f"{r.mesh.clients} disagrees with run.devices={r.devices} (set one of them)")
    if r.mesh.model > 1:
        _require(cfg.client.backend == "vmap", "run.mesh.model",
                 f"> 1 shards the model inside the jitted round; client.backend={cfg.client.backend!r} runs "
                 "clients one by one outside it")

    k = cfg.checkpoint
    _require(k.every >= 1, "checkpoint.every", f"must be >= 1, got {k.every}")
    _require(k.keep >= 1, "checkpoint.keep", f"must be >= 1, got {k.keep}")
    _validate_drift(cfg)
    _validate_deploy(cfg)
    return cfg


def _validate_drift(cfg: TrainConfig) -> None:
    """The drift schedule's shape (its labels are checked against the data when it is loaded)."""
    d = cfg.drift
    _one_of(d.remedy, "drift.remedy", ("none", "ewc"))
    _require(d.ewc_lambda >= 0, "drift.ewc_lambda", f"must be >= 0, got {d.ewc_lambda}")
    if not d.enabled:
        _require(d.remedy == "none", "drift.remedy", f"={d.remedy} needs drift.enabled=true (a schedule of phases)")
        return
    _require(len(d.phases) >= 1, "drift.phases", "drift.enabled=true needs at least one phase")
    _require(bool(d.label_field), "drift.label_field", "must name an example field")
    for t, phase in enumerate(d.phases):
        key = f"drift.phases.{t}"
        _require(phase.rounds >= 1, f"{key}.rounds", f"must be >= 1, got {phase.rounds}")
        _require(bool(phase.clouds), f"{key}.clouds", "lists no cloud, so no client would train in this phase")
        for name, pc in phase.clouds.items():
            _require(name in cfg.clouds.members, f"{key}.clouds.{name}",
                     f"not a cloud; clouds.members are {sorted(cfg.clouds.members)}")
            for label, frac in pc.keep.items():
                _require(0 < frac <= 1, f"{key}.clouds.{name}.keep.{label}", f"must be in (0, 1], got {frac}")
                _require(not pc.labels or label in pc.labels, f"{key}.clouds.{name}.keep.{label}",
                         f"{label!r} is not among this phase's labels {list(pc.labels)}")
    total = sum(p.rounds for p in d.phases)
    if total > cfg.run.rounds:  # allowed: a run may be extended later (resume=DIR run.rounds=N)
        logging.getLogger("fedjax_llm").warning(
            "drift.phases: their rounds add up to %d, past run.rounds=%d; the phases after round %d run only "
            "if the run is extended", total, cfg.run.rounds, cfg.run.rounds)
    if d.remedy == "ewc":
        _require(cfg.model.lora.aggregation != "fedex", "drift.remedy",
                 "=ewc cannot be combined with model.lora.aggregation=fedex (its base residual is aggregator state)")


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


def _validate_deploy(cfg: TrainConfig) -> None:
    dp, t = cfg.deploy, cfg.transport
    _one_of(dp.mode, "deploy.mode", ("none", "local"))
    _require(0 <= dp.port <= 65535, "deploy.port", f"must be in [0, 65535], got {dp.port}")
    for key in ("round_timeout_s", "start_timeout_s", "heartbeat_s", "dead_after_s", "backoff_s", "backoff_max_s",
                "reconnect_s", "poll_s"):
        _require(getattr(dp, key) > 0, f"deploy.{key}", f"must be > 0, got {getattr(dp, key)}")
    _require(dp.dead_after_s > dp.heartbeat_s, "deploy.dead_after_s",
             f"must exceed deploy.heartbeat_s={dp.heartbeat_s}, got {dp.dead_after_s}")
    _require(dp.retries >= 1, "deploy.retries", f"must be >= 1, got {dp.retries}")
    _require(t.max_message_mb > 0, "transport.max_message_mb", f"must be > 0, got {t.max_message_mb}")
    _require(t.deadline_s > 0, "transport.deadline_s", f"must be > 0, got {t.deadline_s}")
    _require(t.min_rate_mbps > 0, "transport.min_rate_mbps", f"must be > 0, got {t.min_rate_mbps}")
