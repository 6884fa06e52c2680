"""Wrappers on private torch functions that several recorders share, and the recorders' lifecycle.

The torch session records what Inductor does while it is open (:mod:`torch_lookups`: the keys it
looks up; :mod:`torch_missdiff`: the components of the FX keys it computes). Each needs the same
plumbing, kept here once: the wrappers go in with the first running recorder and come out with
the last; a recorder starts and stops without ever raising into the job; delivery reads a tuple
replaced whole, so the compile path takes no lock.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any, ClassVar

log = logging.getLogger(__name__)

#: ``install(deliver)`` -> (``uninstall()``, what could be watched); raises only if nothing could.
Installer = Callable[[Callable[..., None]], tuple[Callable[[], None], Any]]


def parameters_if(func: Any, leading: tuple[str, ...], where: str) -> list[str] | None:
    """``func``'s parameter names when they start with ``leading`` (the torch we know), else None.

    A private torch function whose signature changed is not wrapped at all: a wrapper that reads
    its arguments by position could otherwise record the wrong thing, or break the call.
    """
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    if names[: len(leading)] != list(leading):
        log.debug("%s has parameters %s, not %s: not recorded", where, names, leading)
        return None
    return names


def replace(owner: Any, attr: str, original: Any, wrapper: Any, where: str) -> Callable[[], None]:
    """Put ``wrapper`` at ``owner.attr``; returns the undo, which restores ``original`` only while
    the wrapper is still ours (someone who wrapped it again since keeps theirs, which forwards to ours)."""
    setattr(owner, attr, wrapper)

    def undo() -> None:
        if owner.__dict__.get(attr) is wrapper:
            setattr(owner, attr, original)
        else:
            log.debug("%s was replaced since it was wrapped; left as it is", where)

    return undo


class SharedHooks:
    """One set of wrappers for all running recorders: installed with the first, removed with the last."""

    def __init__(self, install: Installer, nothing: Any) -> None:
        self._install = install
        self.nothing = nothing  # what is watched while nothing is installed
        self._lock = threading.Lock()
        self._recorders: tuple[Any, ...] = ()
        self._uninstall: Callable[[], None] | None = None
        self._watched = nothing

    def add(self, recorder: Any) -> Any:
        """Register ``recorder``; what the installed wrappers watch."""
        with self._lock:
            if not self._recorders:
                self._uninstall, self._watched = self._install(self.deliver)
            self._recorders = (*self._recorders, recorder)
            return self._watched

    def remove(self, recorder: Any) -> None:
        with self._lock:
            self._recorders = tuple(r for r in self._recorders if r is not recorder)
            if not self._recorders and self._uninstall is not None:
                uninstall, self._uninstall, self._watched = self._uninstall, None, self.nothing
                uninstall()

    def deliver(self, *args: Any) -> None:
        for recorder in self._recorders:  # a tuple, replaced whole: no lock on the compile path
            recorder.record(*args)


class Recorder:
    """Start/stop (or ``with``) around the job; never raises. ``watched``: what this torch let us
    wrap (the hooks' own notion: layers, or a flag), set by :meth:`start`."""

    hooks: ClassVar[SharedHooks]
    #: What a log line calls the recorded thing.
    what: ClassVar[str] = "torch calls"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = False
        self.watched: Any = self.hooks.nothing

    def start(self) -> Any:
        if self._running:
            return self
        try:
            self.watched = self.hooks.add(self)
            self._running = True
        except Exception as exc:  # noqa: BLE001 - a private torch API; never fail the job
            log.debug("%s not recorded: %s: %s", self.what, type(exc).__name__, exc)
        return self

    def stop(self) -> Any:
        if self._running:
            self._running = False
            try:
                self.hooks.remove(self)
            except Exception as exc:  # noqa: BLE001
                log.debug("could not remove the wrappers recording %s: %s: %s", self.what, type(exc).__name__, exc)
        return self

    def record(self, *args: Any) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
