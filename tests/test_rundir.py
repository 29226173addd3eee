"""What a start may do with a run directory (in process, no training): new, resume, complete or refuse;
config differences listed by key; resume= overrides; unknown keys; cloud shares; the directory lock."""
import dataclasses
import json
import os

import pytest

from fedjax_llm.config import ConfigError, to_train_config, unknown_key_message
from fedjax_llm.errors import RunDirError
from fedjax_llm.rundir import RunDirLock, config_diff, plan_run, resume_config, write_config
from fedjax_llm.validation import validate
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def cfg():
    return validate(compose_config(["debug=tiny"]))


def _stored_run(tmp_path, cfg, steps=(), summary=None):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(str(run_dir), cfg)
    for s in steps:
        (run_dir / "checkpoints" / str(s)).mkdir(parents=True)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return str(run_dir)


def test_new_run_in_a_missing_or_empty_directory(tmp_path, cfg):
    assert plan_run(str(tmp_path / "a" / "b"), cfg).kind == "new"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.log").write_text("a failed start\n")  # what a failed start may leave
    assert plan_run(str(tmp_path / "c"), cfg).kind == "new"


def test_a_directory_with_other_files_is_refused(tmp_path, cfg):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"holds files that are not a fedjax_llm run \(notes.txt\)"):
        plan_run(str(tmp_path), cfg)


def test_resume_needs_a_run(tmp_path, cfg):
    with pytest.raises(RunDirError, match="does not exist; resume= continues an existing run"):
        plan_run(str(tmp_path / "nope"), cfg, must_hold_run=True)
    with pytest.raises(RunDirError, match=r"holds no fedjax_llm run \(no config.yaml\)"):
        plan_run(str(tmp_path), cfg, must_hold_run=True)


def test_same_config_resumes_and_a_complete_run_is_left_alone(tmp_path, cfg):
    run_dir = _stored_run(tmp_path, cfg, steps=(1,))
    plan = plan_run(run_dir, cfg)
    assert plan.kind == "resume" and plan.newest_step == 1
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"rounds_completed": cfg.run.rounds}))
    plan = plan_run(run_dir, cfg)
    assert plan.kind == "complete" and "nothing was changed" in plan.message and "run.rounds=N" in plan.message


def test_a_different_config_is_refused_naming_each_key(tmp_path, cfg):
    run_dir = _stored_run(tmp_path, cfg)
    other = dataclasses.replace(cfg, seed=5, client=dataclasses.replace(cfg.client, lr=0.5))
    with pytest.raises(RunDirError) as info:
        plan_run(run_dir, other)
    text = str(info.value)
    assert "client.lr: 0.0015 -> 0.5" in text and "seed: 0 -> 5" in text and "resume=" in text


def test_keys_that_do_not_change_results_may_differ(tmp_path, cfg):
    run_dir = _stored_run(tmp_path, cfg)
    other = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=True),
                                data=dataclasses.replace(cfg.data, tokenizer_cache="/elsewhere"))
    assert config_diff(cfg, other) == []
    assert plan_run(run_dir, other).kind == "resume"


def test_rounds_may_grow_but_not_below_what_was_trained(tmp_path, cfg):
    run_dir = _stored_run(tmp_path, cfg, steps=(1, 2), summary={"rounds_completed": 2})
    longer = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, rounds=5))
    plan = plan_run(run_dir, longer)
    assert plan.kind == "resume" and "changing run.rounds 2 -> 5" in plan.message
    shorter = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, rounds=1))
    with pytest.raises(RunDirError, match="already holds round 2; run.rounds can only grow"):
        plan_run(run_dir, shorter)


def test_resume_config_applies_keys_and_refuses_groups(tmp_path, cfg):
    run_dir = _stored_run(tmp_path, cfg)
    out = resume_config(run_dir, ["resume=" + run_dir, "run.rounds=9", "run.progress=true"], {"task": "topics"})
    assert out.run.rounds == 9 and out.run.progress and out.client == cfg.client
    with pytest.raises(ConfigError, match="task=dialog: resume= continues the run with its stored config"):
        resume_config(run_dir, ["task=dialog"], {"task": "topics"})
    with pytest.raises(ConfigError, match="client.lrr"):
        resume_config(run_dir, ["client.lrr=3"], {})


def test_unknown_keys_are_named_with_a_suggestion():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"seed": 1, "client": {"lrr": 1}, "no_such": 2,
                             "clouds": {"members": {"x": {"clients": 2, "lnk": {}}}}})
    with pytest.raises(ConfigError) as info:
        to_train_config(node)
    text = str(info.value)
    assert "client.lrr: not a config key; did you mean client.lr?" in text
    assert "no_such: not a config key" in text
    assert "clouds.members.x.lnk: not a config key; did you mean clouds.members.x.link?" in text
    assert unknown_key_message("model.lora.rnak") == "model.lora.rnak: not a config key; did you mean model.lora.rank?"


def test_clouds_defined_as_plain_dicts_become_typed():
    cfg = to_train_config(compose_config(["clouds=custom", "clouds.members.north={clients: 2, select: [english]}",
                                          "+clouds.members.south={clients: 1, link: {bandwidth_mbps: 5}}"]))
    north, south = cfg.clouds.members["north"], cfg.clouds.members["south"]
    assert north.clients == 2 and north.select == ["english"] and north.link.latency_ms == 50.0
    assert south.link.bandwidth_mbps == 5.0 and type(south).__name__ == "CloudConfig"


@pytest.mark.parametrize("total,shares,expected", [
    (10, [0.2] * 5, [2] * 5),
    (7, [0.5, 0.3, 0.2], [4, 2, 1]),      # 3.5, 2.1, 1.4: floors 3, 2, 1; the 7th client to the largest rest
    (20, [0.5, 0.3, 0.2], [10, 6, 4]),
])
def test_shares_split_the_total_by_largest_remainder(total, shares, expected):
    names = [f"c{i}" for i in range(len(shares))]
    overrides = ["clouds=custom", f"clouds.total_clients={total}"] + [
        f"clouds.members.{n}={{share: {s}}}" for n, s in zip(names, shares)]
    cfg = validate(compose_config(overrides))
    assert [cfg.clouds.members[n].clients for n in names] == expected


def test_shares_that_leave_a_cloud_empty_fail():
    overrides = ["clouds=custom", "clouds.total_clients=2"] + [f"clouds.members.c{i}={{share: 0.2}}" for i in range(5)]
    expected = r"clouds.total_clients: 2 clients split by shares leave \['c2', 'c3', 'c4'\] without a client"
    with pytest.raises(ConfigError, match=expected):
        validate(compose_config(overrides))


def test_one_process_at_a_time(tmp_path):
    with RunDirLock(str(tmp_path)):
        with pytest.raises(RunDirError, match=f"{tmp_path} is in use by pid {os.getpid()}"):
            with RunDirLock(str(tmp_path)):
                pass
    with RunDirLock(str(tmp_path)):  # released
        pass
