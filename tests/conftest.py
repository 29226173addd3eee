"""Shared fixtures: Hydra composition of conf/, a per-session tokenizer cache, and the environment and
arguments of the subprocess runs the fault-injection tests make."""
import os

# The hundreds of short training processes the tests start skip startup.prefer_huge_pages' re-exec: on
# this 2-core VM it made start-up-heavy files 15 % slower (test_cli_errors + test_rundir: 78 vs 68 s),
# while it pays off only in long rounds. tests/test_startup.py clears the switch and tests the re-exec.
os.environ.setdefault("FEDJAX_LLM_HUGEPAGES", "0")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from fedjax_llm.config import TrainConfig, register_configs, to_train_config  # noqa: E402
from fedjax_llm.train import CONF_DIR  # noqa: E402

register_configs()


def compose_config(overrides=()) -> TrainConfig:
    """conf/train.yaml composed with overrides, as a typed TrainConfig (not validated). Most tests
    exercise the dialog language-modelling task; pass task=topics for the default classification."""
    overrides = list(overrides)
    if not any(o.startswith(("task=", "+task=")) for o in overrides):
        overrides = ["task=dialog", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="train", overrides=list(overrides))
    return to_train_config(cfg)


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizers"))


FAULT_ROUNDS = 4


@pytest.fixture(scope="module")
def train_env(tmp_path_factory):
    """The environment of a `python -m fedjax_llm.train` subprocess: a compile cache of this module's own."""
    e = dict(os.environ)
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e.pop("HYDRA_FULL_ERROR", None)
    return e


@pytest.fixture(scope="module")
def tiny_run_args(tmp_path_factory):
    """A 4-round tiny dialog run checkpointing every round: seconds per start."""
    cache = tmp_path_factory.mktemp("tok")
    return ["task=dialog", "debug=tiny", f"data.tokenizer_cache={cache}", "data.max_eval_examples=32",
            f"run.rounds={FAULT_ROUNDS}", "checkpoint.every=1"]
