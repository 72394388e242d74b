"""Framework chatter at start-up: each framework's home silences its own logs with the framework's
own switches, unless SLIMM_VERBOSE=1 (the CLI's --verbose). Our own warnings are never touched."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator

VERBOSE_ENV = "SLIMM_VERBOSE"

# start-ups change process-wide state (environment variables, fd 2) for the length of an import
startup_lock = threading.RLock()


def verbose() -> bool:
    """Show the frameworks' own logs (SLIMM_VERBOSE set to anything but empty or 0)."""
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set log-level variables a framework reads while it loads, then restore the environment:
    another framework may read the same name differently (Paddle's GLOG_v is a verbosity that
    prints more as it grows, MindSpore's a level that prints less). A variable the user set wins."""
    if verbose():
        yield
        return
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def ignore_warnings(module: str) -> None:
    """Python warnings raised from inside `module` (and its submodules) are not shown."""
    if not verbose():
        warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")


def quiet_logger(name: str, level: int = logging.ERROR) -> None:
    """A framework's Python logger shows errors only."""
    if not verbose():
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """fd 2 to /dev/null for the length of the block, for C++ code that writes there directly
    (a Python-level redirect does not reach it). Nothing Python raises is lost: exceptions carry
    their message."""
    if verbose():
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
