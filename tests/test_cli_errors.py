"""A user's mistake ends with one line on stderr naming the key or file and what to do, a non-zero exit
and no traceback; `--verbose` and HYDRA_FULL_ERROR=1 show the traceback. Each case runs the real
console entry point in a subprocess; none of them creates a run directory."""
import json
import os
import subprocess
import sys

import pytest

from tests.runtools import one_error_line


@pytest.fixture(scope="module")
def env():
    e = dict(os.environ)
    e.pop("HYDRA_FULL_ERROR", None)
    return e


def _train(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "fedjax_llm.train", *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "bad_hf").mkdir()
    (d / "bad_hf" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], }')
    (d / "malformed.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    (d / "empty.jsonl").write_text("\n\n")
    (d / "keys").mkdir()
    (d / "keys" / "trust.json").write_text('{"version": 1, "parties": {}}')
    (d / "nocloud.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n"
                                             for i in range(50)))
    return d


CASES = [
    # (overrides, exit code, text the line must contain)
    (["+no_such_knob=3"], 2, "no_such_knob: not a config key"),
    (["++no_such_knob=3"], 2, "no_such_knob: not a config key"),
    (["no_such_knob=3"], 2, "no_such_knob: not a config key"),
    (["client.lrr=3"], 2, "client.lrr: not a config key; did you mean client.lr?"),
    (["+client.lrr=3"], 2, "client.lrr: not a config key; did you mean client.lr?"),
    (["clouds.members.east.link.bandwith_mbps=9"], 2, "did you mean clouds.members.east.link.bandwidth_mbps?"),
    (["client.lr=abc"], 2, "client.lr: Value 'abc' of type 'str' could not be converted to Float"),
    (["client.lr=-1"], 2, "client.lr: must be > 0, got -1.0"),
    (["task=nosuch"], 2, "Could not find 'task/nosuch'"),
    (["clouds.total_clients=2", "clouds.members.east.share=0.2", "clouds.members.central.share=0.2",
      "clouds.members.west.share=0.2", "+clouds.members.north={share: 0.2}", "+clouds.members.south={share: 0.2}"],
     2, "clouds.total_clients: 2 clients split by shares leave"),
    (["model=hf", "model.path={inputs}/bad_hf"], 2, "{inputs}/bad_hf/config.json: not a valid Hugging Face "
                                                    "config.json: invalid JSON at line 1 column"),
    (["model=hf", "model.path={inputs}/no_such_dir"], 2, "model.path: {inputs}/no_such_dir: no config.json"),
    (["task=dialog", "data=jsonl", "data.path={inputs}/missing.jsonl"], 2, "data.path: no such file"),
    (["task=dialog", "data=jsonl", "data.path={inputs}/malformed.jsonl"], 2, "{inputs}/malformed.jsonl:2: bad JSON"),
    (["task=dialog", "data=jsonl", "data.path={inputs}/empty.jsonl"], 2, "has no records"),
    (["task=dialog", "data=jsonl", "data.path={inputs}/nocloud.jsonl", "partition.cloud_field=cloud"], 2,
     "partition.cloud_field='cloud': example 0 has no such field"),
    (["resume={inputs}/not_a_run"], 2, "resume={inputs}/not_a_run: the directory does not exist"),
    (["task=dialog", "secure.keys_dir={inputs}/keys"], 2, "secure.keys: party 'americas': key file"),
]


@pytest.mark.parametrize("overrides,code,expected", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_user_errors_are_one_line(tmp_path, env, files, overrides, code, expected):
    run_dir = tmp_path / "run"
    args = [o.replace("{inputs}", str(files)) for o in overrides] + [f"hydra.run.dir={run_dir}",
                                                                      "data.tokenizer_cache=" + str(tmp_path / "tok")]
    proc = _train(args, env, str(tmp_path))
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert line.startswith("fedjax-llm-train: error: ")
    assert expected.replace("{inputs}", str(files)) in line, line
    assert not run_dir.exists(), sorted(os.listdir(run_dir))  # a refused start leaves nothing behind
    assert not (tmp_path / "outputs").exists()


def test_verbose_and_hydra_full_error_show_the_traceback(tmp_path, env):
    for extra, e in ((["--verbose"], env), ([], {**env, "HYDRA_FULL_ERROR": "1"})):
        proc = _train(["client.lr=-1", f"hydra.run.dir={tmp_path / 'r'}", *extra], e, str(tmp_path))
        assert proc.returncode == 2
        assert "Traceback" in proc.stderr and "ConfigError: client.lr: must be > 0" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "fedjax-llm-train: error: client.lr: must be > 0, got -1.0"


def test_generate_and_export_errors_are_one_line(tmp_path, env):
    for module in ("generate", "export"):
        extra = ["--prompt", "hi"] if module == "generate" else ["--out", str(tmp_path / "out")]
        proc = subprocess.run([sys.executable, "-m", f"fedjax_llm.{module}", str(tmp_path / "nope"), *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        line = one_error_line(proc.stderr)
        assert f"fedjax-llm-{module}: error: " in line and "config.yaml: not found" in line, line
