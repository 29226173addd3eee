"""Run as a script under XLA_FLAGS=--xla_force_host_platform_device_count=4: compares one round on a
4-device clients mesh (9 clients, so padding is needed) with the same round on one device."""
import dataclasses
import json
import sys

import jax
import numpy as np

from fedjax_llm.data.federated import build_federated_data
from fedjax_llm.server import Federation
from tests.conftest import compose_config


def main(cache: str) -> None:
    cfg = compose_config(["debug=tiny", "data.seq_len=24", "client=sgd", "client.lr=0.5",
                          "client.local_steps=2", "client.batch_size=3", f"data.tokenizer_cache={cache}"])
    data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    result = {"devices": len(jax.devices())}
    base = None
    for devices, chunk in [(1, 0), (4, 1), (4, 9), (2, 2)]:
        run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, devices=devices),
                                      client=dataclasses.replace(cfg.client, clients_per_chunk=chunk))
        fed = Federation(run_cfg, data)
        state, metrics = fed.run_round(fed.init_state())
        leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
        if base is None:
            base = leaves
        diff = max(float(np.abs(a - b).max()) for a, b in zip(leaves, base))
        result[f"{devices}x{chunk}"] = {"layout": list(fed.layout.shape), "max_diff": diff,
                                        "clients": metrics["clients"], "mesh": fed.mesh.size}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
