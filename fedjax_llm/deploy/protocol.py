"""What deployed parties say to each other, on top of the round's typed messages (messages.py and
secure/protocol.py). Every exchange is one call made by a cloud, answered by the aggregator:

    hello      cloud -> aggregator   signed: its name, a fresh session id, the digest of every config key
                                     that must agree, and the facts the aggregator cannot read without
                                     data (vocabulary, labels, example count) -> welcome (or refused)
    heartbeat  cloud -> aggregator   I am alive -> ack
    poll       cloud -> aggregator   what is my next message? -> a descriptor (its kind, round, size)
    fetch      cloud -> aggregator   that message -> the message (global, roster, routed, unmask, done)
    upload     cloud -> aggregator   eval figures, keyad, shares, update, reveal -> ack

After the hello both directions are sealed under the session `<aggregator session>:<cloud session>`,
so nothing captured in one session opens in another, and a replay within a session is refused by its
sequence number. A payload is `clouds.message.encode(tree, {"kind": ..., "json": fields})`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from typing import Any, Mapping, Optional

from fedjax_llm.clouds import message
from fedjax_llm.config import TrainConfig

HELLO_SESSION = "hello"          # the run id of hello and welcome (before a session exists)
HELLO_MAX_AGE_S = 300.0          # an older hello is refused (a replay across aggregator restarts)
TO_CLOUD = ("global", "roster", "routed", "unmask", "done")
FROM_CLOUD = ("eval", "keyad", "shares", "update", "reveal")

# Keys each party may set for itself: where it listens, its paths, its devices, its checkpoints.
LOCAL_KEYS = {"resume", "name", "run.progress", "run.tensorboard", "run.devices", "run.rounds", "run.eval_every",
              "data.path", "data.tokenizer_cache", "secure.keys_dir", "secure.trust_file", "run.compile_cache_dir",
              "run.distributed", "run.coordinator_address", "run.num_processes", "run.process_id",
              "run.distributed_timeout_s"}
LOCAL_PREFIXES = ("deploy.", "transport.", "checkpoint.", "run.mesh.")
HOLD_ENV = "FEDJAX_LLM_DEPLOY_HOLD"          # test hook: "<point>:<round>" makes a party stop there
RELEASE_ENV = "FEDJAX_LLM_DEPLOY_RELEASE"    # ... until this file exists (unset: until it is killed)


def hold(point: str, rnd: int) -> None:
    """Fault injection for tests: with FEDJAX_LLM_DEPLOY_HOLD=point:round, the party stops at that point
    (it logs the line a test waits for), until FEDJAX_LLM_DEPLOY_RELEASE names a file that exists."""
    if os.environ.get(HOLD_ENV) != f"{point}:{rnd}":
        return
    logging.getLogger("fedjax_llm").warning("holding at %s of round %d (%s, a test hook)", point, rnd, HOLD_ENV)
    release = os.environ.get(RELEASE_ENV)
    while not (release and os.path.exists(release)):
        time.sleep(0.1)


def new_session() -> str:
    return secrets.token_hex(8)


def run_id(aggregator_session: str, cloud_session: str) -> str:
    return f"{aggregator_session}:{cloud_session}"


def pack(kind: str, tree: Any = None, /, **fields: Any) -> bytes:
    """One payload: a pytree (or none) with its kind and JSON fields in the message header."""
    return message.encode({} if tree is None else tree, {"kind": kind, "json": json.dumps(fields, sort_keys=True)})


def peek(payload) -> tuple[str, dict]:
    """(kind, fields) of a payload, without decoding its arrays."""
    meta = message.read_header(payload).get("meta", {})
    try:
        return meta["kind"], json.loads(meta.get("json", "{}"))
    except (KeyError, ValueError) as e:
        raise message.MessageError(f"payload without a kind or with unreadable fields ({type(e).__name__})") from None


def unpack(payload, like: Any) -> Any:
    """The payload's tree, shaped like `like`, as views into the payload buffer (no copy)."""
    tree, _ = message.decode(payload, like, views=True)
    return tree


def agreement(cfg: TrainConfig) -> dict[str, str]:
    """key -> short digest of its value, for every config key the parties must agree on."""
    from fedjax_llm.rundir import flat_config

    out = {}
    for key, value in flat_config(cfg).items():
        if key in LOCAL_KEYS or key.startswith(LOCAL_PREFIXES) or (key.startswith("clouds.members.") and ".link." in key):
            continue
        out[key] = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out


def disagreement(mine: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """The keys whose values differ (or that only one side has), sorted."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def digest(agreed: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(agreed), sort_keys=True).encode()).hexdigest()


def facts_of(data, cfg: TrainConfig, cloud: str) -> dict:
    """What a cloud tells the aggregator at hello: the model's shape from its data, and its example count
    (public figures: the secure-sum scale is the federation's total weight)."""
    c = list(data.cloud_names).index(cloud)
    members = [i for i, k in enumerate(data.client_cloud) if k == c]
    examples = int(sum(len(data.train_idx[i]) for i in members))
    return dict(vocab_size=int(data.vocab_size), num_labels=data.num_labels, examples=examples, clients=len(members))


def model_facts(facts: Mapping[str, Any]) -> tuple:
    """The part of a cloud's facts that fixes the model's shape (every cloud must agree on it)."""
    return int(facts["vocab_size"]), facts.get("num_labels")


def weight_total(cfg: TrainConfig, examples: Mapping[str, int]) -> Optional[float]:
    """The secure-sum scale: every client's weight summed (None until every cloud reported)."""
    if cfg.client.weighting != "examples":
        return float(sum(m.clients for m in cfg.clouds.members.values()))
    if set(examples) != set(cfg.clouds.members):
        return None
    return float(sum(examples.values()))
