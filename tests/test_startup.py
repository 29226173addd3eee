"""startup.prefer_huge_pages: the entry points re-execute once with glibc's huge-page tunable (same pid,
same arguments, signals blocked across the exec and unblocked by the start-up handler), and leave a
process alone when told to or when the machine cannot use it."""
import json
import os
import subprocess
import sys

import pytest

from fedjax_llm import startup

PROBE = r"""
import json, os, signal, sys
from fedjax_llm.startup import prefer_huge_pages
prefer_huge_pages()
blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
from fedjax_llm.lifecycle import exit_on_signals_while_starting
exit_on_signals_while_starting("probe")
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "blocked_at_start": blocked,
                  "blocked_after_handler": signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])}))
"""

supported = pytest.mark.skipif(not startup.wants_reexec({}, ["python"]),
                               reason="no glibc >= 2.35 with transparent huge pages here")


def _probe(env_extra: dict) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", startup.SWITCH)}
    env.update(env_extra)
    proc = subprocess.Popen([sys.executable, "-c", PROBE, "a=1", "b c"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return proc.pid, json.loads(out.strip().splitlines()[-1])


@supported
def test_the_process_restarts_once_with_the_tunable_same_pid_and_arguments():
    pid, seen = _probe({})
    assert seen["pid"] == pid and seen["argv"] == ["a=1", "b c"]
    assert seen["tunables"] == "glibc.malloc.hugetlb=1"
    assert seen["blocked_at_start"] and not seen["blocked_after_handler"]


@supported
def test_other_tunables_are_kept():
    _, seen = _probe({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert seen["tunables"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_switched_off_or_already_set_leaves_the_process_alone():
    _, seen = _probe({startup.SWITCH: "0"})
    assert seen["tunables"] is None and not seen["blocked_at_start"]
    _, seen = _probe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert seen["tunables"] == "glibc.malloc.hugetlb=0" and not seen["blocked_at_start"]


def test_old_glibc_or_thp_off_means_no_restart(monkeypatch):
    monkeypatch.setattr(startup.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not startup.wants_reexec({}, ["python"])
    monkeypatch.setattr(startup.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(startup, "THP_SETTING", "/nonexistent/thp")
    assert not startup.wants_reexec({}, ["python"])
