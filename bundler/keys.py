"""Hashing only: content hashes, a comment-blind code hash, the version salt and the compile key.

Every cache key kernel-bundler derives goes through this module, so "what makes two results
interchangeable" is answered in one place:

* :func:`code_hash` ignores comments and layout, because generated kernels carry run ids, dates
  and file paths in comments, and those must not turn a warm cache cold.
* :func:`version_salt` mixes in everything outside the code that changes what a compile produces:
  the Triton version, the backend (GPU target and compiler versions, or the interpreter), the
  bundle format version and the user's tag (``BUNDLER_TAG``). Any of them changing is a miss,
  never a stale load.

Triton is imported lazily and only here: ``import bundler`` must stay cheap inside training
processes, and the package works (as a plain CPU-side tool) where Triton is not installed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import platform
import re
import sys
from collections.abc import Callable

from bundler.bundle.manifest import FORMAT_VERSION

log = logging.getLogger(__name__)

#: Version of the bundle format, defined once in ``bundler.bundle.manifest``; part of every compile key
#: so a format change never reads an old bundle.
BUNDLE_FORMAT_VERSION = FORMAT_VERSION

_COMMENT = re.compile(r"#.*$", re.MULTILINE)


# --- content hashes ------------------------------------------------------------------------------


def hash_parts(*parts: str) -> str:
    """One sha256 over several strings, unambiguously.

    Each part is length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` cannot collide the way a
    plain ``"-".join`` would.
    """
    digest = hashlib.sha256()
    for part in parts:
        raw = part.encode("utf-8")
        digest.update(b"%d:" % len(raw))
        digest.update(raw)
    return digest.hexdigest()


def canonical_json(value: object) -> str:
    """Stable JSON for hashing: sorted keys, no whitespace, tuples as lists.

    Raises TypeError for values JSON cannot represent, rather than hashing a ``repr`` that may hold
    a memory address and so never hit again.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


# --- code ----------------------------------------------------------------------------------------


def code_hash(source: str) -> str:
    """sha256 of Python source with comments, blank lines and intra-line spacing ignored.

    Steps:
    1. Tokenize, dropping COMMENT tokens (run ids and paths live there) and NL tokens (blank lines
       and line breaks inside brackets), and blanking INDENT text (2 vs 4 spaces is the same code).
    2. Hash the remaining (type, text) pairs. Python's meaning depends only on this token stream,
       so equal streams are equal programs; string literals and docstrings are kept verbatim.
    3. Source that does not tokenize (not Python, or truncated) falls back to stripping ``#...``
       to the end of each line and dropping blank lines, which is what Inductor does.
    """
    import tokenize  # here, not at the top: ``bundler pack`` imports this module and never hashes code

    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        parts = [f"{tok.type}\x1f{'' if tok.type == tokenize.INDENT else tok.string}" for tok in tokens
                 if tok.type not in (tokenize.COMMENT, tokenize.NL)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        log.debug("source does not tokenize as Python; hashing it with '#' comments stripped")
        stripped = _COMMENT.sub("", source)
        parts = ["text", *(line.rstrip() for line in stripped.splitlines() if line.strip())]
    return hash_parts(*parts)


_hash_source = code_hash  # compile_key's ``code_hash`` argument shadows the function's name


# --- versions and backend ------------------------------------------------------------------------


@functools.cache
def triton_version() -> str | None:
    """The installed Triton's version, or None when Triton is not installed.

    Cached: every kernel's autotune key asks, and each metadata lookup scans ``site-packages``.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return None


def interpreter_backend() -> str:
    """The backend value used where kernels run on the CPU (no GPU, or ``TRITON_INTERPRET=1``).

    Interpreter results are CPU timings, so they must never be mistaken for a GPU's: the machine
    architecture is the only fact that matters for them.
    """
    return f"cpu-interpreter-{platform.machine() or 'unknown'}"


class _SettledOnce:
    """Caches a function's answer once it is *settled*; an answer it could only guess is asked again.

    ``backend_hash`` falls back to the interpreter value when asking the driver fails, and a
    failure can be passing (the driver asked from a thread that may not wait, a driver still
    starting): caching that guess would key a GPU job as the CPU interpreter for the whole process.
    """

    def __init__(self, compute: Callable[[], tuple[str, bool]]) -> None:
        self._compute = compute
        self._value: str | None = None
        functools.update_wrapper(self, compute)

    def __call__(self) -> str:
        value = self._value
        if value is None:
            value, settled = self._compute()
            if settled:
                self._value = value
        return value

    def cache_clear(self) -> None:
        self._value = None


@_SettledOnce
def backend_hash() -> tuple[str, bool]:
    """Identify the compile target: GPU target plus compiler versions, or the CPU interpreter.

    With a GPU this is Triton's own ``make_backend(target).hash()`` (for CUDA: the ptxas version and
    the compute capability; for ROCm: the LLVM/ROCm versions and the gfx arch), the same value
    Inductor puts into its autotune keys. Without Triton, or under ``TRITON_INTERPRET=1``, it is
    :func:`interpreter_backend`, and so it is when asking the driver fails (no GPU: "0 active
    drivers", a missing libcuda). Called as ``backend_hash()``, it returns the string and caches it
    for the process (asking the driver costs tens of milliseconds and the answer cannot change),
    except a fallback that came from a failure, which is asked again next time.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return interpreter_backend(), True
    try:
        from triton import knobs

        if knobs.runtime.interpret:
            return interpreter_backend(), True
        from triton.compiler.compiler import make_backend

        target = _target_without_driver() or _driver_target()
        return f"{target.backend}-{target.arch}-{target.warp_size}-{make_backend(target).hash()}", True
    except Exception as exc:  # no GPU: "0 active drivers", missing libcuda, ...
        log.debug("no active Triton GPU driver (%s); keying as the CPU interpreter", exc)
        return interpreter_backend(), False


def _target_without_driver():  # noqa: ANN202 - a triton GPUTarget
    """The CUDA target from an already-imported torch, without starting Triton's driver.

    Starting the driver builds Triton's ``cuda_utils`` helper with the C compiler when it is not
    cached, and that happens before a session records anything, so the helper never reached the
    bundle and every warm start compiled it again (seen on an H200 with Triton 3.6,
    benchmarks/gpu_results.md). ``make_backend(target).hash()`` needs only the target.
    """
    torch = sys.modules.get("torch")
    if torch is None or getattr(torch.version, "hip", None) or not torch.cuda.is_available():
        return None
    from triton.backends.compiler import GPUTarget

    major, minor = torch.cuda.get_device_capability()
    return GPUTarget("cuda", major * 10 + minor, 32)


def _driver_target():  # noqa: ANN202 - a triton GPUTarget
    from triton.runtime.driver import driver

    return driver.active.get_current_target()


def version_salt(tag: str | None = None, *, triton: str | None = None, backend: str | None = None) -> str:
    """Everything outside the code that decides whether a cached result still applies.

    ``triton`` and ``backend`` default to the running process's values; passing them lets a CI job
    compute the key of another machine (and lets tests prove that each one changes the key).
    """
    facts = {
        "triton": triton if triton is not None else (triton_version() or "none"),
        "backend": backend if backend is not None else backend_hash(),
        "format": BUNDLE_FORMAT_VERSION,
        "tag": tag or "",
    }
    return hash_parts("version-salt-v1", canonical_json(facts))


def compile_key(*, code: str | None = None, code_hash: str | None = None, tag: str | None = None,
                salt: str | None = None) -> str:
    """The key of one compile's bundle: the comment-stripped code hash plus the version salt.

    Exactly one of ``code`` (the source being compiled) and ``code_hash`` (a hash the caller already
    has, e.g. Inductor's) must be given. ``salt`` defaults to ``version_salt(tag)``.
    """
    if (code is None) == (code_hash is None):
        raise TypeError("compile_key() takes exactly one of code= or code_hash=")
    digest = _hash_source(code) if code is not None else code_hash
    return hash_parts("compile-key-v1", str(digest), salt if salt is not None else version_salt(tag))


def producer_facts() -> dict[str, str]:
    """Facts about the packing environment for a bundle's manifest (and so its digest).

    The bundle layer takes them as an argument instead of asking: it knows bytes and files, not
    which compiler produced them.
    """
    from bundler import __version__

    facts = {
        "bundler": __version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "platform": f"{platform.system().lower()}-{platform.machine()}",
    }
    triton = triton_version()
    if triton is not None:
        facts["triton"] = triton
    return facts
