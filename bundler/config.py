"""Every setting kernel-bundler reads, parsed from the environment in this one module.

Why one module: a training job is configured through environment variables set by a launcher the
user may not control, so every knob must be discoverable in one place, typed, and validated with
an error that names the variable. Code elsewhere takes a :class:`Settings` argument (defaulting to
``Settings.from_env()``) instead of calling ``os.environ``, which keeps tests hermetic.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bundler.errors import ConfigError
from bundler.frozen import Frozen

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: Compiled by ``re`` on first use (0.4 ms at import otherwise, in every command): few set a size.
_SIZE = r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$"
#: Bounds for seconds, compared directly rather than with ``math.isfinite``: ``math`` is a shared
#: library here, ~1 ms of every command to load, and a comparison also refuses NaN.
_INF = float("inf")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: zstd's own level range (``ZSTD_minCLevel()`` .. ``ZSTD_maxCLevel()``); zstd silently clamps
#: anything outside it, so a typo such as 99 would not mean what it says.
ZSTD_MIN_LEVEL, ZSTD_MAX_LEVEL = -(1 << 17), 22
_LIMIT_HINTS = {
    "BUNDLER_MAX_BUNDLE_BYTES": " (a size such as 16GiB): 0 or less would refuse every bundle",
    "BUNDLER_MAX_MEMBERS": ": 0 or less would refuse every bundle",
    "BUNDLER_ZSTD_LEVEL": " (zstd's range; negative levels are its fast modes, 3 is the default)",
    "BUNDLER_ZSTD_THREADS": " (0 = one per CPU)",
}
#: A user:password@ (or user@) part right after the scheme, up to the last '@' before any query:
#: secret keys may hold '/' and '@', so the first '/' does not end it.
_USERINFO = r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@:]*)(:[^?#]*)?@"


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


def parse_size(name: str, raw: str) -> int:
    """Accept plain bytes or a binary-unit suffix (``16GiB``, ``512M``, ``64k``)."""
    match = re.match(_SIZE, raw, re.IGNORECASE)
    if not match:
        raise ConfigError(f"{name}={raw!r} is not a size; use bytes or a suffix such as 64MiB or 16GiB")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


def _parse_int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def _parse_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not 0 < value < _INF:
        raise ConfigError(f"{name}={raw!r} must be a finite number of seconds greater than zero")
    return value


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs (``user:***@host``)."""
    return re.sub(_USERINFO, lambda m: f"{m.group(1)}{m.group(2)}{':***' if m.group(3) else ''}@", url, count=1)


def refuse_credentials(url: str, what: str = "the remote URL") -> None:
    """Refuse a store URL that carries credentials (``s3://KEY:SECRET@bucket``), without echoing them.

    Why refuse rather than use them: a URL is printed in logs, errors, ``ps`` output and CI job
    settings, so a secret in it leaks; credentials come from the AWS chain instead, which also
    rotates them.
    """
    if re.match(_USERINFO, url):
        raise ConfigError(
            f"{what} {redact_url(url)} carries credentials (user:secret@), which kernel-bundler does not take "
            "from URLs: a URL ends up in logs. Remove them, and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE instead (and rotate that secret if the URL was shared)"
        )


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kernel-bundler"


def _default_triton_cache_dir() -> Path:
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
    return Path(home) / ".triton" / "cache"


class Settings(Frozen):
    """All knobs, with the environment variable that sets each one.

    Storage
        remote (``BUNDLER_REMOTE``): store URL, ``s3://bucket/prefix`` or ``file:///path``. No remote
            means purely local operation.
        connect_timeout / read_timeout (``BUNDLER_CONNECT_TIMEOUT`` / ``BUNDLER_READ_TIMEOUT``,
            seconds): per-request socket limits; with ``max_attempts`` they bound how long a dead
            endpoint can stall a job start.
        max_attempts (``BUNDLER_MAX_ATTEMPTS``): botocore attempts per request, first one included.
        retry_mode (``BUNDLER_RETRY_MODE``): botocore retry mode, ``standard`` or ``adaptive``.
        multipart_threshold / multipart_chunksize (``BUNDLER_MULTIPART_THRESHOLD`` /
            ``BUNDLER_MULTIPART_CHUNKSIZE``): above the threshold, uploads go multipart and downloads
            use parallel ranged GETs of ``chunksize`` each.
        max_concurrency (``BUNDLER_MAX_CONCURRENCY``): threads for multipart and ranged transfers.

    Bundles
        zstd_level (``BUNDLER_ZSTD_LEVEL``): compression level; 3 is zstd's default and fast.
        zstd_threads (``BUNDLER_ZSTD_THREADS``): compression threads, 0 = one per CPU.
        long_window_log (``BUNDLER_LONG_WINDOW_LOG``): long-distance matching window (2**N bytes)
            used when packing; 0 disables it. Real caches repeat kernels inside Inductor's pickles
            far apart, which plain level 3 (a 2 MiB window) cannot see. 24 (16 MiB) by default:
            every reader must hold a window this large, and a 128 MiB window (27) made
            decompression of a 170 MB bundle 1.6x slower for 0.6% smaller output; 27 pays where
            pickles repeat kernels tens of MB apart and storage or bandwidth is what counts.
        max_window_log (``BUNDLER_MAX_WINDOW_LOG``): the largest window a frame may demand when
            unpacking, so a hostile frame cannot make us allocate gigabytes.
        max_bundle_bytes (``BUNDLER_MAX_BUNDLE_BYTES``) / max_members (``BUNDLER_MAX_MEMBERS``):
            limits on what one bundle may unpack to, checked before bytes are written.
        max_manifest_bytes (``BUNDLER_MAX_MANIFEST_BYTES``): the largest MANIFEST.json a reader
            loads (about 150,000 files at the 32 MiB default). It bounds a reader's memory before
            any digest is checked: parsing may cost up to ~8x this, never more.
        max_ratio (``BUNDLER_MAX_RATIO``): how many times its compressed size a bundle may
            expand to, beyond a first 8 MiB; checked while decompressing, so a few KB that inflate
            to gigabytes (a zstd bomb) stop early instead of filling the staging folder. Real
            caches expand 3-30x.
        signing_key (``BUNDLER_SIGNING_KEY``): HMAC-SHA256 shared secret, or several separated by
            commas (the first signs, all verify: rotation). With any signing setting, refs and remote
            autotune records are signed on write, unsigned or wrongly signed ones are rejected on
            read, and the Triton remote cache backend (unsigned raw objects) loads nothing. Set but
            empty is an error, not "off": a launcher that blanks it must not turn checks off.
        signing_key_file (``BUNDLER_SIGNING_KEY_FILE``): an Ed25519 private key (PEM) that writers
            sign with; it also verifies. Needs the ``cryptography`` package. See docs/signing.md.
        trusted_keys (``BUNDLER_TRUSTED_KEYS``): comma-separated Ed25519 public keys that readers
            accept, each ``ed25519:<base64>`` or a file (PEM, ``ssh-ed25519`` line); readers need
            no secret at all. Several keys: rotation.
        ref_max_age (``BUNDLER_REF_MAX_AGE``, seconds): refuse refs whose signed version (a write
            time) is older than this, bounding how long an old signed ref can be replayed to a
            node that has never seen a newer one. Unset: no age limit.
        signing_scope (``BUNDLER_SIGNING_SCOPE``): a name for the store and prefix a key signs
            for (``prod``, ``team-a/staging``). Writers put it into every ref they sign; readers
            with it set refuse a ref signed for another scope, so a ref copied from a staging
            prefix into production's, both signed with one key, is refused. Unset: not checked.

    Local caches and switches
        cache_dir (``BUNDLER_CACHE_DIR``): root of our local cache (autotune records, bundle
            staging); default ``$XDG_CACHE_HOME/kernel-bundler``.
        triton_cache_dir (``TRITON_CACHE_DIR``): Triton's kernel cache, bundled by compile sessions.
        tag (``BUNDLER_TAG``): user salt mixed into every key; change it to invalidate everything.
        local_cache (``BUNDLER_LOCAL_CACHE``): per-kernel autotune records on local disk.
        remote_autotune (``BUNDLER_REMOTE_AUTOTUNE``): per-kernel autotune records in the store.
        bundles (``BUNDLER_BUNDLES``): per-compile bundles; requires the local cache, and follows
            ``BUNDLER_LOCAL_CACHE`` when unset.
        pull_budget (``BUNDLER_PULL_BUDGET``, seconds): the most ``begin_compile`` may spend fetching
            before it gives up and lets the job compile.

    Journeys and logging
        ref (``BUNDLER_REF``): the ref every compile session of the job pulls, and pushes to on a
            miss, instead of its own ``compile-<key>``. It is how a job uses what CI prebaked with
            ``bundler warm --ref NAME``: set the same name in both and nothing else changes.
        strict (``BUNDLER_STRICT``): a warm start that still compiled a graph, tuned a kernel or
            built C++ fails with a message naming what missed (the torch.compile integration), so
            CI catches a broken bake. Judged by PyTorch's own counters, never by timings.
        torch_backports (``BUNDLER_TORCH_BACKPORTS``, default on): torch sessions apply upstream
            Inductor fixes a warm start needs where the installed torch lacks them (today
            pytorch#172819: coordinate descent re-run on every warm start); ``0`` leaves torch as is.
        warm (``BUNDLER_WARM``): set by ``bundler warm`` for the command it runs. Sessions then
            pull as usual but leave pushing to ``bundler warm``, which pushes the union of what was
            pulled and what the run added once the command succeeded (one bundle, one ref move).
        log (``BUNDLER_LOG``): a level name (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``). When set,
            a job's ``bundler`` logger gets its own stderr handler at that level, lines prefixed
            ``bundler:``; unset, the package adds no handler, so applications that configure
            logging themselves see each line once.
    """

    remote: str | None = None
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    max_attempts: int = 3
    retry_mode: str = "standard"
    multipart_threshold: int = 64 << 20
    multipart_chunksize: int = 16 << 20
    max_concurrency: int = 8

    zstd_level: int = 3
    zstd_threads: int = 0
    long_window_log: int = 24
    max_window_log: int = 27
    max_bundle_bytes: int = 16 << 30
    max_members: int = 1_000_000
    max_manifest_bytes: int = 32 << 20
    max_ratio: int = 1000
    signing_key: str | None = None  # left out of repr(): a secret
    signing_key_file: Path | None = None
    trusted_keys: tuple[str, ...] = ()
    ref_max_age: float | None = None
    signing_scope: str = ""

    cache_dir: Path = None  # type: ignore[assignment]  # None: _default_cache_dir(), computed per instance
    triton_cache_dir: Path = None  # type: ignore[assignment]  # None: _default_triton_cache_dir()
    tag: str = ""
    local_cache: bool = True
    remote_autotune: bool = True
    bundles: bool = True
    pull_budget: float = 60.0
    ref: str | None = None
    warm: bool = False
    strict: bool = False
    torch_backports: bool = True
    log: str | None = None

    def __init__(self, **values: Any) -> None:
        """Keyword arguments only, one per field above; a field left out takes its default."""
        unknown = values.keys() - _ENV_NAMES.keys()
        if unknown:
            raise TypeError(f"Settings() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        cls = type(self)
        for name in _ENV_NAMES:
            object.__setattr__(self, name, values[name] if name in values else getattr(cls, name, None))
        # ``None`` only stands for the computed default; callers pass plain strings too, and the
        # rest of the code joins paths with ``/``.
        object.__setattr__(self, "cache_dir", Path(self.cache_dir if self.cache_dir is not None else _default_cache_dir()))
        object.__setattr__(self, "triton_cache_dir", Path(
            self.triton_cache_dir if self.triton_cache_dir is not None else _default_triton_cache_dir()))
        self._check()

    def _check(self) -> None:
        if isinstance(self.trusted_keys, str):  # one key passed as a plain string, as the variable reads
            object.__setattr__(self, "trusted_keys", _nonempty_list("BUNDLER_TRUSTED_KEYS", self.trusted_keys))
        _check_signing(self)
        if self.log is not None and self.log.upper() not in LOG_LEVELS:
            raise ConfigError(f"BUNDLER_LOG={self.log!r} is not a level; use one of {', '.join(LOG_LEVELS)}")
        if self.bundles and not self.local_cache:
            raise ConfigError(
                "BUNDLER_BUNDLES=1 needs BUNDLER_LOCAL_CACHE=1: bundles unpack into the local cache; "
                "turn bundles off or the local cache on"
            )
        for name, seconds in (
            ("BUNDLER_CONNECT_TIMEOUT", self.connect_timeout),
            ("BUNDLER_READ_TIMEOUT", self.read_timeout),
            ("BUNDLER_PULL_BUDGET", self.pull_budget),
        ):
            if not 0 < seconds <= 86400:
                raise ConfigError(f"{name}={seconds} must be between 0 and 86400 seconds")
        if self.multipart_chunksize < (64 << 10) or self.multipart_threshold < 1:
            raise ConfigError(
                f"BUNDLER_MULTIPART_CHUNKSIZE={self.multipart_chunksize} must be at least 64KiB "
                "(S3 itself needs 5MiB parts) and BUNDLER_MULTIPART_THRESHOLD positive"
            )
        if not 1 <= self.max_concurrency <= 256:
            raise ConfigError(f"BUNDLER_MAX_CONCURRENCY={self.max_concurrency} must be between 1 and 256")
        if not 1 <= self.max_attempts <= 20:
            raise ConfigError(f"BUNDLER_MAX_ATTEMPTS={self.max_attempts} must be between 1 and 20")
        if self.retry_mode not in ("standard", "adaptive", "legacy"):
            raise ConfigError(f"BUNDLER_RETRY_MODE={self.retry_mode!r}: use standard or adaptive")
        if not (4 << 10) <= self.max_manifest_bytes <= (1 << 30):
            raise ConfigError(f"BUNDLER_MAX_MANIFEST_BYTES={self.max_manifest_bytes} must be between 4KiB and 1GiB")
        if not 2 <= self.max_ratio <= 1_000_000:
            raise ConfigError(f"BUNDLER_MAX_RATIO={self.max_ratio} must be between 2 and 1000000")
        for name, value, low, high in (
            ("BUNDLER_MAX_BUNDLE_BYTES", self.max_bundle_bytes, 1, None),
            ("BUNDLER_MAX_MEMBERS", self.max_members, 1, None),
            ("BUNDLER_ZSTD_LEVEL", self.zstd_level, ZSTD_MIN_LEVEL, ZSTD_MAX_LEVEL),
            ("BUNDLER_ZSTD_THREADS", self.zstd_threads, 0, 256),
        ):
            if value < low or (high is not None and value > high):
                allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ConfigError(f"{name}={value} must be {allowed}{_LIMIT_HINTS.get(name, '')}")
        if self.remote is not None:
            refuse_credentials(self.remote, "BUNDLER_REMOTE")
        if not 10 <= self.max_window_log <= 31:
            raise ConfigError(f"BUNDLER_MAX_WINDOW_LOG={self.max_window_log} must be between 10 and 31")
        if self.long_window_log and not 10 <= self.long_window_log <= self.max_window_log:
            raise ConfigError(
                f"BUNDLER_LONG_WINDOW_LOG={self.long_window_log} must be 0 or between 10 and "
                f"BUNDLER_MAX_WINDOW_LOG ({self.max_window_log}), or readers could not unpack it"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); keyword overrides win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name, var in _ENV_NAMES.items():
            raw = env.get(var)
            if raw is None or (not raw.strip() and name not in _BLANK_IS_AN_ERROR):
                continue  # set to "" or blanks: a launcher's way of unsetting, not a value
            values[name] = _PARSERS[name](var, raw)
        values.update(overrides)
        if "local_cache" in values:
            # Bundles need the local cache, so BUNDLER_LOCAL_CACHE=0 alone turns them off too
            # instead of being a contradiction the user must resolve with a second variable.
            values.setdefault("bundles", values["local_cache"])
        return cls(**values)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> Settings:
        """A copy with ``changes`` (``dataclasses.replace``), checked like any new Settings."""
        return type(self)(**{**dict(zip(self._fields, self._values(), strict=True)), **changes})  # type: ignore[arg-type]

    @property
    def signing_configured(self) -> bool:
        """True when any signing setting is present: documents read must then be signed."""
        return bool(self.signing_key or self.signing_key_file or self.trusted_keys)


#: Values that are published, never secret: pasted into BUNDLER_SIGNING_KEY they would make the
#: HMAC key public (an Ed25519 public key line, an OpenSSH key, a PEM file's text).
_NOT_A_SECRET = ("ed25519:", "ssh-ed25519 ", "-----BEGIN")


def _check_signing(settings: Settings) -> None:
    """Empty signing values are errors: an empty key would otherwise mean "no checks" silently."""
    if settings.signing_key is not None and any(not s.strip() for s in settings.signing_key.split(",")):
        raise ConfigError(
            "BUNDLER_SIGNING_KEY is set but empty (or has an empty entry between commas): that would turn "
            "signature checks off without a word; set the secret(s), or unset the variable to run unsigned"
        )
    for secret in (settings.signing_key or "").split(","):
        if secret.strip().startswith(_NOT_A_SECRET):
            raise ConfigError(
                "BUNDLER_SIGNING_KEY holds what looks like a public key or a key file's text "
                f"({secret.strip()[:14]}...): it is an HMAC secret, so anyone who knows that value could sign. "
                "Give Ed25519 public keys to readers in BUNDLER_TRUSTED_KEYS, the private key file to "
                "writers in BUNDLER_SIGNING_KEY_FILE, and keep BUNDLER_SIGNING_KEY for a shared secret"
            )
    if settings.signing_key_file is not None and not str(settings.signing_key_file).strip():
        raise ConfigError("BUNDLER_SIGNING_KEY_FILE is set but empty; name the Ed25519 private key file or unset it")
    if any(not entry.strip() for entry in settings.trusted_keys):
        raise ConfigError(
            "BUNDLER_TRUSTED_KEYS has an empty entry; list Ed25519 public keys (ed25519:<base64> or key files) "
            "separated by commas, or unset it"
        )
    age = settings.ref_max_age
    if age is not None and not 0 < age < _INF:
        raise ConfigError(f"BUNDLER_REF_MAX_AGE={age} must be a positive number of seconds")


#: The level names ``BUNDLER_LOG`` accepts (``logging``'s own).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _str(_name: str, raw: str) -> str:
    return raw


def _opt_str(_name: str, raw: str) -> str | None:
    return raw or None


def _path(_name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _as_triton_reads_it(_name: str, raw: str) -> Path:
    """``TRITON_CACHE_DIR`` exactly as Triton uses it: Triton does not expand ``~``, so a value set
    without a shell (a YAML file, a pod spec) names a folder called ``~`` in the working directory,
    and expanding it here would unpack every bundle where Triton never looks."""
    return Path(raw)


def _nonempty_str(name: str, raw: str) -> str:
    """For secrets and keys: set-but-empty is a mistake (a blanked variable), never "off"."""
    if not raw.strip():
        raise ConfigError(f"{name} is set but empty; set a value or unset the variable (empty does not mean off)")
    return raw


def _nonempty_path(name: str, raw: str) -> Path:
    return _path(name, _nonempty_str(name, raw))


def _nonempty_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(entry.strip() for entry in _nonempty_str(name, raw).split(","))


#: Variables for which set-but-blank is refused rather than read as unset: a launcher that blanks
#: a signing setting (or the replay bound) must not turn a check off without a word.
_BLANK_IS_AN_ERROR = frozenset({"signing_key", "signing_key_file", "trusted_keys", "ref_max_age"})

_ENV_NAMES = {
    "remote": "BUNDLER_REMOTE",
    "connect_timeout": "BUNDLER_CONNECT_TIMEOUT",
    "read_timeout": "BUNDLER_READ_TIMEOUT",
    "max_attempts": "BUNDLER_MAX_ATTEMPTS",
    "retry_mode": "BUNDLER_RETRY_MODE",
    "multipart_threshold": "BUNDLER_MULTIPART_THRESHOLD",
    "multipart_chunksize": "BUNDLER_MULTIPART_CHUNKSIZE",
    "max_concurrency": "BUNDLER_MAX_CONCURRENCY",
    "zstd_level": "BUNDLER_ZSTD_LEVEL",
    "zstd_threads": "BUNDLER_ZSTD_THREADS",
    "long_window_log": "BUNDLER_LONG_WINDOW_LOG",
    "max_window_log": "BUNDLER_MAX_WINDOW_LOG",
    "max_bundle_bytes": "BUNDLER_MAX_BUNDLE_BYTES",
    "max_members": "BUNDLER_MAX_MEMBERS",
    "max_manifest_bytes": "BUNDLER_MAX_MANIFEST_BYTES",
    "max_ratio": "BUNDLER_MAX_RATIO",
    "signing_key": "BUNDLER_SIGNING_KEY",
    "signing_key_file": "BUNDLER_SIGNING_KEY_FILE",
    "trusted_keys": "BUNDLER_TRUSTED_KEYS",
    "ref_max_age": "BUNDLER_REF_MAX_AGE",
    "signing_scope": "BUNDLER_SIGNING_SCOPE",
    "cache_dir": "BUNDLER_CACHE_DIR",
    "triton_cache_dir": "TRITON_CACHE_DIR",
    "tag": "BUNDLER_TAG",
    "local_cache": "BUNDLER_LOCAL_CACHE",
    "remote_autotune": "BUNDLER_REMOTE_AUTOTUNE",
    "bundles": "BUNDLER_BUNDLES",
    "pull_budget": "BUNDLER_PULL_BUDGET",
    "ref": "BUNDLER_REF",
    "warm": "BUNDLER_WARM",
    "strict": "BUNDLER_STRICT",
    "torch_backports": "BUNDLER_TORCH_BACKPORTS",
    "log": "BUNDLER_LOG",
}
Settings._fields = tuple(_ENV_NAMES)  # every field has a variable: the fields Frozen compares
Settings._hidden = frozenset({"signing_key"})  # a secret: never in a repr or a log line

_PARSERS = {
    "remote": _opt_str,
    "connect_timeout": _parse_float,
    "read_timeout": _parse_float,
    "max_attempts": _parse_int,
    "retry_mode": _str,
    "multipart_threshold": parse_size,
    "multipart_chunksize": parse_size,
    "max_concurrency": _parse_int,
    "zstd_level": _parse_int,
    "zstd_threads": _parse_int,
    "long_window_log": _parse_int,
    "max_window_log": _parse_int,
    "max_bundle_bytes": parse_size,
    "max_members": _parse_int,
    "max_manifest_bytes": parse_size,
    "max_ratio": _parse_int,
    "signing_key": _nonempty_str,
    "signing_key_file": _nonempty_path,
    "trusted_keys": _nonempty_list,
    "ref_max_age": _parse_float,
    "signing_scope": _str,
    "cache_dir": _path,
    "triton_cache_dir": _as_triton_reads_it,
    "tag": _str,
    "local_cache": parse_bool,
    "remote_autotune": parse_bool,
    "bundles": parse_bool,
    "pull_budget": _parse_float,
    "ref": _opt_str,
    "warm": parse_bool,
    "strict": parse_bool,
    "torch_backports": parse_bool,
    "log": _opt_str,
}
