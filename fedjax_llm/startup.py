"""Process start-up for the training and serving entry points: the memory allocator setting that XLA:CPU
runs fastest under, applied before anything else is imported.

XLA:CPU allocates every executable's temporary buffer afresh on each call (hundreds of MB for a W-small
round), and glibc serves such sizes with fresh mmap'd pages, so each round pays one page fault per 4 KiB
it touches: 193,000 faults and about 0.4 s of a 3.4 s W-small round on this project's 2-core CPU
(experiments/bench_xla_cpu.py). glibc >= 2.35 can back its allocations with transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), which cuts the faults 50-fold. glibc reads tunables only
when a process starts, so the entry points re-execute themselves once with the tunable set (same pid,
same arguments). Nothing else changes: results are bit for bit the same.

FEDJAX_LLM_HUGEPAGES=0 turns this off; a GLIBC_TUNABLES that already names glibc.malloc.hugetlb is
left as it is; so are kernels with transparent huge pages off and non-glibc platforms.
"""
from __future__ import annotations

import os
import platform
import signal
import sys

TUNABLE = "glibc.malloc.hugetlb"
SWITCH = "FEDJAX_LLM_HUGEPAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_has_hugetlb_tunable() -> bool:
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return False
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _kernel_allows_thp() -> bool:
    try:
        with open(THP_SETTING, encoding="ascii") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def wants_reexec(environ: dict, orig_argv: list[str]) -> bool:
    """True when this process should restart itself with the huge-page tunable set."""
    if environ.get(SWITCH, "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    if not orig_argv or not sys.platform.startswith("linux"):
        return False
    return _glibc_has_hugetlb_tunable() and _kernel_allows_thp()


def prefer_huge_pages(signals: tuple = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Re-executes the process with glibc's huge-page tunable when that helps (see the module doc).

    `signals` are blocked across the exec (a blocked signal stays pending through execve), so a SIGTERM
    in that instant reaches the new image's handler (lifecycle.exit_on_signals_while_starting unblocks
    them once it is installed) instead of killing the process without a word.
    """
    argv = list(getattr(sys, "orig_argv", []))
    if not wants_reexec(os.environ, argv):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1") if t)
    env[SWITCH] = "0"  # once is enough, whatever glibc makes of the tunable
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot re-execute (odd launcher): carry on without the tunable
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
