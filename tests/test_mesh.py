"""run.mesh: a model axis splits the frozen base (LoRA) or the trained params (full fine-tuning) over
devices, FSDP-style; the round equals the one-device round and each device holds 1/M of the weights."""
import json
import os
import subprocess
import sys

import pytest

from fedjax_llm.errors import ConfigError
from fedjax_llm.simulate import make_mesh
from fedjax_llm.validation import validate
from tests.conftest import compose_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_check", str(tmp_path_factory.mktemp("tok"))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "full"])
@pytest.mark.parametrize("clients,model", [(2, 2), (1, 4)])
def test_model_axis_round_equals_one_device(result, name, clients, model):
    one, split = result[f"{name}_1x1"], result[f"{name}_{clients}x{model}"]
    assert split["mesh"] == {"clients": clients, "model": model}
    # The split matmuls add partial products in another order (and the gathered weights feed the same
    # ops), so equality holds to float32 rounding, not bitwise: measured 1e-7 (full) and 8e-7 (LoRA).
    assert split["rel"] < 1e-5, split
    assert split["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,what", [("lora", "frozen_bytes"), ("full", "params_bytes")])
@pytest.mark.parametrize("clients,model", [(2, 2), (1, 4)])
def test_each_device_holds_one_mth_of_the_weights(result, name, what, clients, model):
    one, split = result[f"{name}_1x1"], result[f"{name}_{clients}x{model}"]
    assert one[what] > 0
    # every weight of the tiny Llama has a dimension that 2 and 4 divide: exactly 1/M per device
    assert split[what] * model == one[what], (one, split)
    # the compiled round's arguments (weights, inputs, client state) per device fall by about M too
    assert split["argument_bytes"] < one["argument_bytes"] / model * 1.1, (one, split)
    assert split["temp_bytes"] < one["temp_bytes"], (one, split)


def test_mesh_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="run.mesh.model"):
        validate(compose_config(["debug=tiny", "run.mesh.model=0"]))
    with pytest.raises(ConfigError, match="run.mesh.model"):
        validate(compose_config(["debug=tiny", "run.mesh.model=2", "client.backend=loop"]))
    with pytest.raises(ConfigError, match="run.mesh.clients"):
        validate(compose_config(["debug=tiny", "run.mesh.clients=2", "run.devices=3"]))
    with pytest.raises(ConfigError, match=r"run.mesh: .*needs 4 devices, 1 available"):
        make_mesh(0, 4)
