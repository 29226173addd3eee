"""Run as a script under XLA_FLAGS=--xla_force_host_platform_device_count=4: one round with the frozen base
(LoRA) or the trained params (full fine-tuning) split over a model axis, against the same round on one
device; prints the largest relative difference and each device's bytes of the frozen base."""
import dataclasses
import json
import sys

import jax
import numpy as np

from fedjax_llm.data.federated import build_federated_data
from fedjax_llm.server import Federation
from tests.conftest import compose_config


def _run(cfg, data, clients, model):
    run = dataclasses.replace(cfg.run, devices=0, mesh=dataclasses.replace(cfg.run.mesh, clients=clients, model=model))
    fed = Federation(dataclasses.replace(cfg, run=run), data)
    state, metrics = fed.run_round(fed.init_state())
    placed = fed.clouds[0].engine.placed_frozen
    per_device = 0
    if placed:
        per_device = sum(int(np.prod(s.data.shape)) * s.data.dtype.itemsize
                         for leaf in jax.tree.leaves(placed) for s in leaf.addressable_shards
                         if s.device == fed.mesh.devices.flat[0])
    return [np.asarray(x) for x in jax.tree.leaves(state.params)], metrics, dict(fed.mesh.shape), per_device


def main(cache: str) -> None:
    out = {"devices": len(jax.devices())}
    for name, extra in (("lora", ["model=nano_lora"]), ("full", [])):
        cfg = compose_config(["debug=tiny", "data.seq_len=24", "client=sgd", "client.lr=0.5", "client.local_steps=2",
                              "client.batch_size=3", f"data.tokenizer_cache={cache}", *extra])
        data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
        base, base_metrics, _, _ = _run(cfg, data, 1, 1)
        frozen_bytes = 0
        for clients, model in ((2, 2), (1, 4)):
            leaves, metrics, shape, per_device = _run(cfg, data, clients, model)
            rel = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)) for a, b in zip(leaves, base))
            out[f"{name}_{clients}x{model}"] = {"rel": rel, "mesh": shape, "frozen_bytes_per_device": per_device,
                                               "loss": [metrics["train_loss"], base_metrics["train_loss"]]}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
