"""Reads a finished (or running) run directory back: config, tokenizer, and the checkpointed model.

Generation and export start here. The tokenizer and the frozen base are rebuilt exactly as training
built them (same data, seed and cached BPE), and the checkpoint's recorded digest of the frozen base
is checked, so a changed corpus or seed fails loudly instead of pairing adapters with the wrong base.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from fedjax_llm.config import TrainConfig
from fedjax_llm.errors import RunDirError
from fedjax_llm.models.params import Params
from fedjax_llm.models.spec import ModelSpec


@dataclasses.dataclass
class LoadedRun:
    run_dir: str
    cfg: TrainConfig
    spec: ModelSpec          # as trained (with LoRA when the run used it)
    tokenizer: Any           # tokenizers.Tokenizer (PAD/BOS/EOS/SEP = 0..3)
    trainable: Params        # the checkpoint's global trainable params
    frozen: Params           # the frozen base ({} for full fine-tuning)
    initial: Params          # trainable params of the round-0 model
    round: int               # rounds completed by the checkpointed model
    label_names: list = dataclasses.field(default_factory=list)  # classification: label id -> name
    initial_frozen: Optional[Params] = None  # the round-0 base when training moved it (FedEx-LoRA)

    @property
    def initial_base(self) -> Params:
        """The frozen base of the round-0 model (pairs with `initial`)."""
        return self.frozen if self.initial_frozen is None else self.initial_frozen


def read_config(run_dir: str) -> TrainConfig:
    """The resolved TrainConfig a run wrote to RUN_DIR/config.yaml."""
    from fedjax_llm.rundir import read_stored_config

    return read_stored_config(run_dir)


def _checkpointer(cfg: TrainConfig, directory: str, step: Optional[int]):
    """A Checkpointer of the run; with `step`, one whose restore considers only that step."""
    from fedjax_llm.checkpoint import Checkpointer

    class OneStep(Checkpointer):
        def steps(self) -> list[int]:
            return [s for s in super().steps() if s == step]

    cls = Checkpointer if step is None else OneStep
    return cls(directory, cfg.checkpoint.every, cfg.checkpoint.keep, cfg.run.rounds)


def load_run(run_dir: str, step: Optional[int] = None) -> LoadedRun:
    """The newest valid checkpoint of run_dir (or round `step`), its tokenizer and frozen base."""
    from fedjax_llm.checkpoint import tree_digest
    from fedjax_llm.data.federated import build_federated_data
    from fedjax_llm.server import Federation

    cfg = read_config(run_dir)
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise RunDirError(f"{directory}: not found (was checkpoint.enabled=false?)")
    ckpt = _checkpointer(cfg, directory, step)
    available = sorted(ckpt.manager.all_steps())
    if not available:
        raise RunDirError(f"{directory}: no checkpoint (was checkpoint.enabled=false?)")
    if step is not None and step not in available:
        raise RunDirError(f"{directory}: no checkpoint for step {step}; available: {available}")
    data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    fed = Federation(cfg, data)
    state, meta = ckpt.restore(fed.init_state(), quarantine=False)  # reading changes nothing
    if meta.get("frozen_digest") != tree_digest(fed.frozen):
        raise RunDirError(f"{directory}: step {int(state.round)} was trained on another frozen base "
                          "than the one rebuilt from config.yaml (model, seed or data changed?)")
    trainable, frozen, initial = state.params, fed.frozen_of(state), fed.init_params  # FedEx: base moved
    initial_frozen = fed.frozen if frozen is not fed.frozen else None
    if cfg.model.lora.aggregation == "ffa":  # A trained nowhere but lives with the adapters on export
        from fedjax_llm.models.build import split_leaves
        from fedjax_llm.models.params import combine
        frozen, a = split_leaves(frozen, "lora_a")
        trainable, initial = combine(trainable, a), combine(initial, a)
    return LoadedRun(run_dir=run_dir, cfg=cfg, spec=fed.spec, tokenizer=data.tokenizer,
                     trainable=trainable, frozen=frozen, initial=initial, round=int(state.round),
                     label_names=list(data.label_names), initial_frozen=initial_frozen)
