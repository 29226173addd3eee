"""Clean stops on SIGINT and SIGTERM (Ctrl-C, and what SLURM and Kubernetes send before a kill).

Training runs in a worker thread; the main thread only waits and handles signals, so a signal is
acted on within a fraction of a second even while XLA compiles or a jitted round runs (Python signal
handlers cannot interrupt C++). On the first signal the main thread takes the commit lock (waiting
for a checkpoint write in progress to finish), so the worker can no longer record a round, asks the
run to checkpoint its last completed round if that round was not saved yet, logs one line saying so
and how to resume, and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM) through
`os._exit`: no traceback, and no interpreter teardown racing XLA's threads. A second signal exits at
once. Rounds computed but not yet recorded are dropped; a rerun recomputes them exactly.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional, TypeVar

log = logging.getLogger("fedjax_llm")
T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
COMMIT_WAIT_S = 120.0  # longest wait for a checkpoint write in progress before exiting without it


class StopTraining(Exception):
    """Raised in the worker at a commit point once a stop was requested; ends the loop quietly."""


class Interrupted(BaseException):
    """A signal arrived outside a supervised run (e.g. while Hydra composes the config)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class RunControl:
    """What the training loop shares with the thread that handles signals."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._finalize: Optional[Callable[[], str]] = None
        # Several processes: they must stop at the same round, so the loop decides (collectively, at a
        # round boundary) and saves; the signal only asks.
        self.collective = False

    def request_stop(self) -> None:
        self._stop.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        """Records one completed round atomically with respect to a stop: raises StopTraining instead."""
        with self._lock:
            if self._stop.is_set():
                raise StopTraining()
            yield

    def on_stop(self, finalize: Callable[[], str]) -> None:
        """`finalize` saves what must not be lost and returns the line to log; the main thread calls it
        with the commit lock held."""
        self._finalize = finalize

    def stop(self, signum: int) -> str:
        """Main thread: stop the loop at its next commit point and finalize. Returns the line to log."""
        self._stop.set()
        name = signal.Signals(signum).name
        if not self._lock.acquire(timeout=COMMIT_WAIT_S):
            return f"{name}: a checkpoint write did not finish within {COMMIT_WAIT_S:.0f} s; exiting without it"
        if self._finalize is None:
            return f"{name} before training started; nothing to save"
        try:
            return f"{name}: {self._finalize()}"
        except Exception as e:  # e.g. a full disk while checkpointing: say so, exit anyway
            return f"{name}: could not checkpoint the last completed round ({type(e).__name__}: {e})"


def hard_exit(code: int, line: Optional[str] = None) -> None:
    """Logs `line`, flushes every handler and stream, and leaves without interpreter teardown."""
    if line:
        log.warning(line)
    for handler in logging.getLogger().handlers + log.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def supervise(target: Callable[[RunControl], T]) -> T:
    """Runs target(control) in a worker thread; on SIGINT/SIGTERM stops it cleanly and exits the process.
    Returns target's result or re-raises its exception in the calling (main) thread."""
    control = RunControl()
    outcome: dict = {}
    pending: list[int] = []

    def work() -> None:
        try:
            outcome["value"] = target(control)
        except BaseException as e:  # re-raised in the main thread
            outcome["error"] = e

    def handler(signum: int, frame: object) -> None:
        if pending:  # a second signal: leave now
            hard_exit(exit_code(signum), f"{signal.Signals(signum).name} again: exiting at once; the last "
                                          "checkpoint on disk is intact")
        pending.append(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    worker = threading.Thread(target=work, name="fedjax-llm-run", daemon=True)
    worker.start()
    try:
        while True:
            worker.join(0.1)
            if pending and not control.collective:
                hard_exit(exit_code(pending[0]), control.stop(pending[0]))
            if pending:
                control.request_stop()  # the loop stops every process at the next round boundary
            if not worker.is_alive():
                break
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    error = outcome.get("error")
    if isinstance(error, StopTraining):  # a signal here, or (several processes) at another process
        signum = pending[0] if pending else signal.SIGTERM
        name = signal.Signals(signum).name if pending else "stopped with the other processes"
        hard_exit(exit_code(signum), f"{name}: {error}" if str(error) else name)
    if error is not None:
        raise error
    return outcome["value"]


def quiet_closed_loop_noise() -> None:
    """After a failed checkpoint write, orbax's worker threads may still post to an asyncio loop that
    is closed, and each prints a traceback; those go to the log at DEBUG, every other thread error as
    before."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(args.exc_value):
            log.debug("ignored in thread %s: %s", getattr(args.thread, "name", "?"), args.exc_value)
            return
        default(args)

    threading.excepthook = hook
    default_unraisable = sys.unraisablehook

    def unraisable(args: "sys.UnraisableHookArgs") -> None:  # the same, when raised in a finalizer
        if isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(args.exc_value):
            log.debug("ignored: %s", args.exc_value)
            return
        default_unraisable(args)

    sys.unraisablehook = unraisable


def exit_on_signals_while_starting(prog: str) -> None:
    """Installed first thing by the console scripts, before jax, Hydra and the rest are imported: a signal
    while the process starts ends it at once with one line and 128 + the signal number (nothing has been
    written yet). `raise_on_signals` and `supervise` replace it once they can do better."""

    def handler(signum: int, frame: object) -> None:
        print(f"{prog}: interrupted ({signal.Signals(signum).name}) while starting; nothing was written",
              file=sys.stderr)
        hard_exit(exit_code(signum))

    for s in SIGNALS:
        signal.signal(s, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # blocked across startup.prefer_huge_pages' exec


def raise_on_signals() -> None:
    """Outside a supervised run, SIGINT and SIGTERM raise Interrupted (reported as one line)."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    for s in SIGNALS:
        signal.signal(s, handler)
