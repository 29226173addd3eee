"""Config composition and start-up validation: each bad value fails naming its key."""
import glob
import os

import pytest
from hydra.errors import ConfigCompositionException

from fedjax_llm.config import ConfigError, TrainConfig
from fedjax_llm.validation import validate
from fedjax_llm.train import CONF_DIR, run
from tests.conftest import compose_config


def test_default_config_composes_to_a_valid_typed_config():
    cfg = compose_config()
    assert isinstance(cfg, TrainConfig)
    validate(cfg)
    assert list(cfg.clouds.members) == ["americas", "europe", "asia"]
    assert sum(c.clients for c in cfg.clouds.members.values()) == 9
    assert cfg.model.size == "nano" and not cfg.model.lora.enabled


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONF_DIR, "experiment", "*.yaml"))))
def test_every_experiment_file_composes_and_validates(path):
    name = os.path.splitext(os.path.basename(path))[0]
    cfg = compose_config([f"experiment={name}"])
    validate(cfg)
    assert cfg.name == name


def _error(overrides):
    with pytest.raises(Exception) as info:
        validate(compose_config(overrides))
    return info.value, str(info.value)


def test_unknown_key_is_rejected_naming_it():
    err, text = _error(["model.hidden_size=64"])
    assert isinstance(err, ConfigCompositionException) and "hidden_size" in text


def test_wrong_type_is_rejected_naming_the_key():
    err, text = _error(["client.lr=fast"])
    assert isinstance(err, ConfigCompositionException) and "client.lr" in text


@pytest.mark.parametrize("overrides, key", [
    (["client.lr=-0.1"], "client.lr"),
    (["clouds.members.asia.clients=0", "clouds.members.europe.clients=0",
      "clouds.members.americas.clients=2"], "clouds.members"),
    (["model.lora.enabled=true", "model.lora.rank=1000"], "model.lora.rank"),
    (["model.lora.enabled=true", "model.lora.targets=[q_proj,attn]"], "model.lora.targets"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["data.source=jsonl"], "data.path"),
    (["partition.kind=random"], "partition.kind"),
    (["client.backend=threads"], "client.backend"),
    (["run.rounds=0"], "run.rounds"),
    (["clouds.members.asia.clients_per_round=9"], "clouds.members.asia.clients_per_round"),
    (["model.compute_dtype=float16"], "model.compute_dtype"),
])
def test_bad_values_raise_config_error_naming_the_key(overrides, key):
    err, text = _error(overrides)
    assert isinstance(err, ConfigError)
    assert text.startswith(key), text


def test_bad_config_fails_before_any_work(tmp_path):
    cfg = compose_config(["client.lr=-1"])
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="client.lr"):
        run(cfg, str(run_dir))
    assert not run_dir.exists()  # nothing loaded, built or compiled


def test_cloud_shares_resolve_to_client_counts():
    cfg = validate(compose_config(["clouds=shared", "clouds.total_clients=20", "clouds.members.east.share=0.5",
                                   "clouds.members.central.share=0.3", "clouds.members.west.share=0.2"]))
    assert [c.clients for c in cfg.clouds.members.values()] == [10, 6, 4]


@pytest.mark.parametrize("overrides, key", [
    (["clouds.members.east.share=0.5"], "clouds.total_clients"),
    (["clouds.total_clients=10", "clouds.members.east.share=0.7", "clouds.members.west.share=0.6"],
     "clouds.members"),
    (["clouds.total_clients=10", "clouds.members.east.share=1.5"], "clouds.members.east.share"),
])
def test_bad_shares_name_the_key(overrides, key):
    err, text = _error(["clouds=shared"] + overrides)
    assert isinstance(err, ConfigError) and text.startswith(key), text
