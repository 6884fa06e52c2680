"""kernel-bundler: portable GPU compile caches.

The package root stays import-cheap on purpose: it runs inside every training process, so the
heavy pieces (boto3, the Triton integration) load only when the public name that needs them is
first touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it; resolved lazily by __getattr__ below.
_LAZY = {
    "begin_compile": "bundler.session",
    "end_compile": "bundler.session",
    "put": "bundler.session",
    "sync": "bundler.session",
    "compile_session": "bundler.session",
    "CompileSession": "bundler.session",
    "save_artifacts": "bundler.artifacts",
    "load_artifacts": "bundler.artifacts",
    "AutotuneCache": "bundler.autotune",
    "open_store": "bundler.stores",
    "Settings": "bundler.config",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    # ruff: noqa: F401 - names re-exported lazily through __getattr__
    from bundler.artifacts import load_artifacts, save_artifacts
    from bundler.autotune import AutotuneCache
    from bundler.config import Settings
    from bundler.session import CompileSession, begin_compile, compile_session, end_compile, put, sync
    from bundler.stores import open_store


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bundler' has no attribute {name!r}")
    import importlib  # here, not at the top: most processes never ask for a lazy name

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
