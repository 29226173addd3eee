"""Shared fixtures: Hydra composition of conf/ and a per-session tokenizer cache."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from fedjax_llm.config import TrainConfig, register_configs, to_train_config
from fedjax_llm.train import CONF_DIR

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
