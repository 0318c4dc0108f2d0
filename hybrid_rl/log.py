"""Console logging and progress bars, quiet in CI.

``setup_logging`` configures the ``hybrid_rl`` loggers (and no other: not the root logger). ``progress`` wraps tqdm:
rates and ETA on a terminal, nothing when quiet (``--quiet``, ``HYBRID_RL_QUIET=1`` or ``CI=true``).
``echo`` prints a line (the metrics console backend) without tearing an open progress bar; it is
silenced by ``--quiet`` only, so CI logs still show the periodic metric lines.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

_QUIET = False


def is_quiet() -> bool:
    return _QUIET or os.environ.get("HYBRID_RL_QUIET", "") == "1" or os.environ.get("CI", "").lower() == "true"


def setup_logging(level: str = "INFO", quiet: bool = False) -> None:
    """Log the ``hybrid_rl`` loggers to stderr as ``HH:MM:SS level name: message``; quiet mode keeps warnings
    and errors only.

    Only the project's own logger is configured: the root logger, its level and handlers, and every other
    library's logger are left as they are, so that calling a command in a host process (a notebook, a test,
    another tool's script) changes nothing of that process's logging but ours. Where the host has configured
    logging (the root logger has handlers), the records go to its handlers and no handler of ours is added;
    else one, once."""
    global _QUIET
    numeric = logging.WARNING if quiet else getattr(logging, str(level).upper(), None)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use one of DEBUG, INFO, WARNING, ERROR")
    _QUIET = quiet
    ours = logging.getLogger("hybrid_rl")
    if not logging.getLogger().handlers and not any(getattr(h, "_hybrid_rl", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._hybrid_rl = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
    ours.setLevel(numeric)


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "", unit: str = "it", **kw):
    """A tqdm bar with rate and ETA, disabled when quiet; usable as an iterator or with ``.update(n)``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=is_quiet(), dynamic_ncols=True, leave=False, **kw)


def echo(line: str) -> None:
    """Print ``line`` to stderr above any open progress bar; nothing when the run was set quiet."""
    if _QUIET or os.environ.get("HYBRID_RL_QUIET", "") == "1":
        return
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)
