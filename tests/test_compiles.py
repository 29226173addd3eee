"""Compilation: one jitted round compute shared by every cloud of one size, and nothing compiled again
after the first round (checked with JAX's own compilation log). Clouds of different sizes compile one
compute each: padding the smaller ones to the largest would trade a compilation for padded slots'
compute in every round."""
import logging

import jax
import pytest

from fedjax_llm.data.federated import build_federated_data
from fedjax_llm.server import Federation
from fedjax_llm.validation import validate
from tests.conftest import compose_config


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Compiling "):  # "Compiling jit(NAME) with global shapes ..."
            self.names.append(msg.split()[1])


@pytest.fixture
def compiles():
    handler, logger = _Compiles(), logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        yield handler
    finally:
        jax.config.update("jax_log_compiles", previous)
        logger.removeHandler(handler)


@pytest.mark.parametrize("extra", [[], ["algorithm=scaffold"], ["secure.secagg.enabled=true", "secure.dp.enabled=true",
                                                                      "client.weighting=uniform"],
                                   ["clouds.members.europe.clients_per_round=2", "algorithm=fedprox"]])
def test_one_round_compute_for_every_cloud_and_no_recompilation(compiles, tokenizer_cache, extra):
    cfg = validate(compose_config(["debug=tiny", f"data.tokenizer_cache={tokenizer_cache}", *extra]))
    data = build_federated_data(cfg.data, cfg.partition, cfg.clouds, cfg.seed)
    fed = Federation(cfg, data)
    state = fed.init_state()
    compiles.names.clear()
    state, _ = fed.run_round(state)
    first = list(compiles.names)
    # one compiled round compute per cloud size (three clients each, or two sampled in europe), shared
    # by the clouds of that size
    sizes = {cloud.capacity for cloud in fed.clouds}
    assert len(sizes) == (2 if any("clients_per_round" in e for e in extra) else 1)
    assert first.count("jit(compute)") == len(sizes), first
    for rnd in (2, 3):
        compiles.names.clear()
        state, _ = fed.run_round(state)
        assert compiles.names == [], (rnd, compiles.names)
    fed.evaluate(state)
    compiles.names.clear()
    fed.evaluate(state)
    assert compiles.names == []
