"""Run as a script under XLA_FLAGS=--xla_force_host_platform_device_count=4: one round with the frozen base
(LoRA) or the trained params (full fine-tuning) split over a model axis (run.mesh), against the same round
on one device; prints the largest relative difference, each device's bytes of the frozen base and of the
global params as placed, and the compiled round's per-device argument and temporary bytes."""
import dataclasses
import json
import sys

import jax
import numpy as np

from fedjax_llm import cloud as cloud_mod
from fedjax_llm.data.federated import build_federated_data
from fedjax_llm.server import Federation
from tests.conftest import compose_config


def _bytes_on_first_device(tree, device) -> int:
    return sum(int(np.prod(s.data.shape)) * s.data.dtype.itemsize
               for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def _run(cfg, data, clients, model):
    run = dataclasses.replace(cfg.run, devices=0, mesh=dataclasses.replace(cfg.run.mesh, clients=clients, model=model))
    fed = Federation(dataclasses.replace(cfg, run=run), data)
    seen = []
    original = cloud_mod.placed_args
    cloud_mod.placed_args = lambda *a: seen.append(original(*a)) or seen[-1]
    try:
        new_state, metrics = fed.run_round(fed.init_state())
    finally:
        cloud_mod.placed_args = original
    eng, first = fed.clouds[0].engine, fed.mesh.devices.flat[0]
    args = seen[0]  # cloud 0's round as placed: params, frozen, broadcast, inputs, hparams
    on_first = lambda tree: _bytes_on_first_device(tree if model > 1 else jax.device_put(tree, first), first)
    mem = eng.run.lower(*args).compile().memory_analysis()
    out = {"mesh": dict(fed.mesh.shape), "loss": metrics["train_loss"], "frozen_bytes": on_first(args[1]),
           "params_bytes": on_first(args[0]), "argument_bytes": int(mem.argument_size_in_bytes),
           "temp_bytes": int(mem.temp_size_in_bytes)}
    return [np.asarray(x) for x in jax.tree.leaves(new_state.params)], out


def main(cache: str) -> None:
    result = {"devices": len(jax.devices())}
    for name, extra in (("lora", ["model=nano_lora"]), ("full", [])):
        cfg = compose_config(["debug=tiny", "data.seq_len=24", "client=sgd", "client.lr=0.5", "client.local_steps=2",
                              "client.batch_size=3", f"data.tokenizer_cache={cache}", *extra])
        data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
        base, result[f"{name}_1x1"] = _run(cfg, data, 1, 1)
        for clients, model in ((2, 2), (1, 4)):
            leaves, out = _run(cfg, data, clients, model)
            out["rel"] = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                             for a, b in zip(leaves, base))
            result[f"{name}_{clients}x{model}"] = out
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
