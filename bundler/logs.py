"""The package's log output: one ``bundler:`` prefix, and a handler only when the user asks for one.

Why a module: a job's log mixes many libraries, so every line we emit must say it is ours
(``bundler: WARNING: ...``), and an application that configures ``logging`` itself must not see our
lines twice. So the package attaches a handler to the ``bundler`` logger only when ``BUNDLER_LOG``
names a level (jobs), or when the command line configures its own (``bundler -v``); otherwise
records propagate to whatever the application set up, untouched.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

#: The one format every handler of ours uses: the prefix makes our lines greppable in a job's log.
FORMAT = "bundler: %(levelname)s: %(message)s"

_LOGGER = "bundler"
_MARK = "_bundler_handler"
_lock = threading.Lock()


def formatter() -> logging.Formatter:
    return logging.Formatter(FORMAT)


def attach(level: int | str, stream=None) -> logging.Handler:  # noqa: ANN001 - any text stream
    """Give the ``bundler`` logger one stderr handler at ``level`` (replacing one we attached before)."""
    logger = logging.getLogger(_LOGGER)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter())
    setattr(handler, _MARK, True)
    with _lock:
        for old in [h for h in logger.handlers if getattr(h, _MARK, False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
    return handler


def from_env(env=None) -> logging.Handler | None:  # noqa: ANN001 - a mapping like os.environ
    """Honour ``BUNDLER_LOG`` once per process: attach a handler at that level, else do nothing.

    Called by the code paths a job enters (a compile session, the autotune cache), so setting the
    variable is all a job needs. A level name that is not one of logging's is ignored with one
    line on stderr: logging must not be the thing that fails a job.
    """
    global _configured
    env = os.environ if env is None else env
    raw = (env.get("BUNDLER_LOG") or "").strip().upper()
    if not raw or _configured == raw:
        return None
    _configured = raw
    from bundler.config import LOG_LEVELS

    if raw not in LOG_LEVELS:
        print(f"bundler: WARNING: BUNDLER_LOG={raw!r} is not a level ({', '.join(LOG_LEVELS)}); ignored",
              file=sys.stderr)
        return None
    return attach(raw)


_configured: str | None = None


def one_line(text: object, limit: int = 120) -> str:
    """``text`` cut to its first line and ``limit`` characters, for a warning (details go to DEBUG)."""
    first = str(text).splitlines()[0] if str(text) else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


#: Messages :func:`warn_once` has given in this process.
_warned: set[str] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """Warn about a condition that holds for the whole process (a setting, a missing feature) once,
    not at every cache lookup it affects."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)
