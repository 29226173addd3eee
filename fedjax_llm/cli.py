"""How the command-line tools end: a user's mistake is one line on stderr and a non-zero exit; a bug
keeps its traceback. `--verbose` (or HYDRA_FULL_ERROR=1) shows the traceback of every error.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable, Optional

from fedjax_llm.errors import UserError
from fedjax_llm.lifecycle import Interrupted, exit_code

VERBOSE_FLAG = "--verbose"


def pop_verbose(argv: list[str]) -> bool:
    """Removes --verbose from argv (in place); True when it was there or HYDRA_FULL_ERROR=1 is set."""
    found = VERBOSE_FLAG in argv
    while VERBOSE_FLAG in argv:
        argv.remove(VERBOSE_FLAG)
    return found or os.environ.get("HYDRA_FULL_ERROR") == "1"


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " ".join(lines)


def _omegaconf_line(e: Optional[BaseException]) -> Optional[str]:
    """'KEY: what is wrong' for OmegaConf's errors, which carry the key apart from the message."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if not isinstance(e, OmegaConfBaseException):
        return None
    key = getattr(e, "full_key", None)
    text = getattr(e, "msg", None) or str(e) or type(e).__name__
    msg = text.splitlines()[0]
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and key and "not in" in msg:
        from fedjax_llm.config import unknown_key_message

        return unknown_key_message(str(key))
    return f"{key}: {msg}" if key and not msg.startswith(str(key)) else msg


def describe(e: BaseException) -> Optional[str]:
    """The one line to print for an error a user can fix; None for anything else (a bug)."""
    if isinstance(e, UserError):
        return _one_line(str(e))
    from hydra.errors import HydraException, MissingConfigException

    line = _omegaconf_line(e)
    if line is not None:
        return _one_line(line)
    if isinstance(e, ValueError) and _raised_in_hydra(e):  # command-line misuse Hydra reports itself
        return _one_line(str(e))
    if isinstance(e, HydraException):
        cause = _omegaconf_line(e.__cause__)
        if cause is not None:
            return _one_line(cause)
        text = str(e).split("Config search path")[0]
        if isinstance(e, MissingConfigException):
            text = text.replace("In 'train': ", "")
        return _one_line(text)
    return None


def _raised_in_hydra(e: BaseException) -> bool:
    tb = e.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and f"{os.sep}hydra{os.sep}" in last.tb_frame.f_code.co_filename


def code_for(e: BaseException) -> int:
    if isinstance(e, Interrupted):
        return exit_code(e.signum)
    if isinstance(e, UserError):
        return e.exit_code
    return 2  # Hydra and OmegaConf configuration errors


def report(e: BaseException, prog: str, verbose: bool) -> int:
    """Prints the error as one line (or with its traceback when verbose, or when it is a bug); returns
    the exit code."""
    if isinstance(e, SystemExit):
        raise e
    if isinstance(e, (Interrupted, KeyboardInterrupt)):
        signum = e.signum if isinstance(e, Interrupted) else 2
        print(f"{prog}: interrupted ({'SIGINT' if signum == 2 else 'SIGTERM'}) before training started; "
              "nothing was written", file=sys.stderr)
        return exit_code(signum)
    line = describe(e)
    if line is None or verbose:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    if line is None:
        return 1
    logging.getLogger("fedjax_llm").debug("error: %s", line)
    print(f"{prog}: error: {line}", file=sys.stderr)
    return code_for(e)


def run_main(fn: Callable[[], object], prog: str, verbose: bool, unwrap: type = ()) -> int:
    """Calls fn and turns every error into an exit code (one line for user errors); an `unwrap`
    exception is reported as the error it carries (its `.error`)."""
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 - this is the top of the program
        if unwrap and isinstance(e, unwrap):
            e = e.error
        return report(e, prog, verbose)
    return result if isinstance(result, int) else 0


def train() -> None:
    """The fedjax-llm-train console script: signals are handled before the heavy imports start."""
    from fedjax_llm.startup import prefer_huge_pages

    prefer_huge_pages()
    from fedjax_llm.lifecycle import exit_on_signals_while_starting

    exit_on_signals_while_starting("fedjax-llm-train")
    from fedjax_llm.train import main

    main()
