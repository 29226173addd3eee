"""Sharding the client axis over 4 host devices gives the same round as one device."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_four_device_mesh_equals_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "tests.sharded_check", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["devices"] == 4
    # each cloud lays out its own 3 clients: padded to 4 over 4 devices, to 2 x 2 over 2
    assert result["4x1"]["layout"] == [4, 1, 1] and result["4x1"]["mesh"] == 4
    assert result["4x9"]["layout"] == [4, 1, 1]
    assert result["2x2"]["layout"] == [2, 1, 2]
    for name in ("4x1", "4x9", "2x2"):
        assert result[name]["clients"] == 9
        assert result[name]["max_diff"] < 1e-5, (name, result[name])
