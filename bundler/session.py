"""Per-compile bundles: ``begin_compile`` fetches one, ``end_compile`` pushes one.

A *compile* is whatever the caller calls one (a model's ``torch.compile``, a script's kernels); it
is named by ``keys.compile_key(code=...)``, the comment-blind hash of its source plus the version
salt. The ref ``compile-<key>`` in the store points at the bundle that compile produced, unless
``BUNDLER_REF`` names another ref: then every session of the job pulls that one and pushes to it
on a miss, which is how a job starts from what ``bundler warm --ref NAME`` prebaked in CI. Under
``bundler warm`` itself (``BUNDLER_WARM=1``) sessions pull but never push: the command pushes the
union of everything the run left in the caches, once, when it succeeded.

Life of a session::

    with bundler.compile_session(code=model_source):    # or begin_compile(...) / end_compile()
        run_the_model()

1. ``begin`` starts a background thread and returns at once; the thread derives the compile key
   (which imports Triton and, on GPUs, asks the driver for the target: about a second) and fetches
   the ref's bundle, so both overlap with whatever the job does next (importing torch, building
   the model). ``ref_name``, ``sync`` and ``end`` wait for the key, within the pull budget.
   Every reader of the local caches (``AutotuneCache``, the Triton cache manager) first waits for
   that fetch (``recording.wait_for_pending``), at most ``settings.pull_budget`` seconds from begin.
2. On a hit the bundle is unpacked into the local caches (Triton group files relocated to this
   machine's paths) and the time it saves (the autotuning time recorded in its autotune records)
   is reported. Nothing is uploaded at the end, as in Inductor's bundler: the bundle already
   describes this compile.
3. On a miss (no ref, store down, corrupt or hostile bundle, budget exceeded) the job compiles as
   if there were no cache, with one logged warning for anything worse than "not there yet", and
   every cache entry recorded meanwhile (autotune records saved or hit, Triton kernel files made
   or found) is collected. ``end`` packs them into one bundle and pushes it with the ref.
   A store error (not a corrupt bundle) trips the remote's shared read or write breaker
   (``bundler.remote.health``): its warning is the only one, and later sessions and per-kernel
   lookups skip the dead store instead of each paying a timeout.

Switches (``Settings``): ``bundles`` turns sessions on (they need ``local_cache``, which the
settings enforce, and a ``remote``); ``local_cache`` and ``remote_autotune`` govern the per-kernel
cache independently. A disabled session is a cheap no-op, so callers never need to check; settings
that do not parse (a bad ``BUNDLER_*`` variable) disable it with a warning instead of raising.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bundler import deadline, keys, logs, recording
from bundler.config import Settings
from bundler.errors import BundleError, ConfigError, DeadlineExceededError, NotFoundError, StoreError

log = logging.getLogger(__name__)

REF_PREFIX = "compile-"


class CompileSession:
    """One compile's bundle: fetched at :meth:`begin`, pushed at :meth:`end` when it was a miss."""

    def __init__(
        self,
        *,
        code: str | None = None,
        code_hash: str | None = None,
        settings: Settings | None = None,
        store: Any = None,
    ) -> None:
        if (code is None) == (code_hash is None):
            raise TypeError("a compile session takes exactly one of code= or code_hash=")
        self.settings, usable = _settings_or_off(settings, "compile session")
        self._code, self._code_hash = code, code_hash
        self._store = store
        self.enabled = bool(usable and self.settings.bundles and (store is not None or self.settings.remote))
        self.key: str | None = None  # set by the fetch thread; _keyed tells when it is settled
        self._keyed = threading.Event()
        self._hit = False
        self.time_saved_ns = 0
        self.pulled: Any = None  # transfer.PullResult on a hit
        self.pushed: Any = None  # transfer.PushResult after a successful push
        self._recorder = recording.Recorder()
        self._fetcher: threading.Thread | None = None
        self._deadline = 0.0
        self._fetch_deadline: deadline.Deadline | None = None  # cancelled when the job stops waiting
        self._pulled_names: frozenset[str] = frozenset()
        self._state = "new"
        self._started = 0.0
        logs.from_env()
        if self.enabled and self.settings.ref is not None and not _valid_ref(self.settings.ref):
            self.enabled = False

    @property
    def hit(self) -> bool:
        """Whether the bundle was found and unpacked; waits for the fetch (see :meth:`sync`)."""
        return self.sync()

    @property
    def ref_name(self) -> str:
        """``BUNDLER_REF`` when set, else ``compile-<key>``; waits for the fetch thread to derive the key
        (within the pull budget): the key is also recorded in the ref pushed, and it decides a miss."""
        if self.key is None and self.enabled and self._state != "new":
            self._keyed.wait(max(0.0, self._deadline - time.monotonic()))
        if self.key is None:
            raise RuntimeError("the compile key is known once an enabled session has begun and derived it")
        return self.settings.ref or f"{REF_PREFIX}{self.key}"

    @property
    def _label(self) -> str:
        """The key's first characters, for log lines (the key may still be unknown)."""
        return self.key[:12] if self.key else "(key not derived)"

    # begin -------------------------------------------------------------------------------------

    def begin(self) -> CompileSession:
        """Start collecting, and start deriving the key and fetching in a thread. Returns self."""
        if self._state != "new":
            raise RuntimeError(f"compile session already {self._state}")
        self._state = "open"
        self._started = time.monotonic()
        if not self.enabled:
            log.debug("compile session off (bundles=%s, remote=%s)", self.settings.bundles, self.settings.remote)
            return self
        budget = self._budget_left()
        self._deadline = time.monotonic() + budget
        self._fetch_deadline = deadline.Deadline(
            budget, f"the pull budget (BUNDLER_PULL_BUDGET={self.settings.pull_budget:g})"
        )
        recording.attach(self._recorder)
        self._fetcher = threading.Thread(target=self._derive_key_and_fetch, name="bundler-fetch", daemon=True)
        self._fetcher.start()
        recording.add_waiter(self.sync)
        return self

    def _store_handle(self) -> Any:
        if self._store is None:
            from bundler.remote.health import shared_store

            self._store = shared_store(self.settings)
        return self._store

    def _derive_key_and_fetch(self) -> None:
        """The fetch thread: the key costs a Triton import, so it is derived here, not in begin.

        It runs marked as a fetch thread (``recording.fetching``): deriving the key can start Triton's
        driver, which reads the Triton cache through our cache manager, and that read must not wait
        for pending fetches, this one included.
        """
        with recording.fetching(), deadline.scope(self._fetch_deadline or deadline.current()):
            try:
                self.key = keys.compile_key(code=self._code, code_hash=self._code_hash, tag=self.settings.tag)
            except Exception as exc:  # the cache is an accelerator: nothing here may fail the job
                log.warning("compile session: could not derive its key (%s: %s); compiling without a bundle",
                            type(exc).__name__, logs.one_line(exc))
                log.debug("compile key failed", exc_info=exc)
                return
            finally:
                self._keyed.set()
            self._fetch()
            self._fetch_deadline = None

    def _remote_usable(self, action: str) -> bool:
        """Whether the failure policy lets ``action`` requests through to ``settings.remote``.

        Sessions share the per-kernel cache's view of the remote's health (``remote.health``): a
        store that failed one of them is skipped by all. A session given its own store and no
        ``settings.remote`` has no shared state.
        """
        from bundler.remote import health

        return not self.settings.remote or health.remote_usable(self.settings, action)

    def _budget_left(self) -> float:
        """What is left of the process's store wait budget (the whole budget without a remote)."""
        from bundler.remote import health

        return health.budget_left(self.settings) if self.settings.remote else self.settings.pull_budget

    def _remote_failed(self, action: str, key: str, exc: BaseException) -> None:
        """Trip the shared breaker for ``action`` (its warning is the only one this failure gets)."""
        from bundler.remote import health as shared
        from bundler.remote import layout

        if self.settings.remote:
            shared.remote_failed(self.settings, action, layout.ref_key(key), exc)
        else:
            log.warning("compile %s: could not %s its bundle in %s (%s: %s); compiling without the remote",
                        self._label, action, getattr(self._store, "url", "the store"), type(exc).__name__,
                        logs.one_line(exc, 80))
            log.debug("%s failed", action, exc_info=exc)

    def _fetch(self) -> None:
        """Pull into the local caches; any failure means "miss"."""
        from bundler.relocate import GroupFileRewriter
        from bundler.remote import transfer

        if not self._remote_usable("read"):
            log.info("compile %s: reads from %s failed earlier in this process; compiling without a bundle",
                     self._label, self.settings.remote)
            return
        try:
            result = transfer.pull(
                self._store_handle(),
                recording.dest_mapping(self.settings),
                ref=self.ref_name,
                settings=self.settings,
                rewrite=GroupFileRewriter(),
                node_state=self.settings.cache_dir / "pulled",
            )
        except NotFoundError:
            log.info("compile %s: no bundle yet; compiling, and the result will be pushed", self.key[:12])
            return
        except DeadlineExceededError:
            return  # the job stopped waiting; sync() already reported it, once
        except StoreError as exc:  # the store failed, not the bundle: later reads skip it too
            self._remote_failed("read", self.ref_name, exc)
            log.info("compile %s: could not fetch its bundle; compiling without it", self.key[:12])
            return
        except BundleError as exc:  # the object's fault, not the store's: this run's push repairs it
            log.warning("compile %s: bundle of ref %s is unusable (%s); compiling, the push at the end replaces it",
                        self.key[:12], self.ref_name, logs.one_line(exc, 70))
            log.debug("unusable bundle", exc_info=exc)
            return
        except Exception as exc:  # the cache is an accelerator: nothing here may fail the job
            log.warning("compile %s: could not fetch its bundle (%s: %s); compiling without it",
                        self.key[:12], type(exc).__name__, logs.one_line(exc, 90))
            log.debug("fetch failed", exc_info=exc)
            return
        self.pulled = result
        self._pulled_names = frozenset(record.path for record in result.manifest.files)
        try:
            self.time_saved_ns = self._register_pulled(result.manifest)
        except Exception as exc:  # the bundle is unpacked: a bookkeeping failure must not turn it into a miss
            log.warning("compile %s: bundle %s unpacked, but recording its files failed (%s: %s)",
                        self.key[:12], result.digest[:12], type(exc).__name__, logs.one_line(exc, 60))
            log.debug("recording pulled files failed; they may be missing from saved artifacts", exc_info=exc)
        self._hit = True
        log.info("compile %s: bundle %s unpacked (%d files), saving about %.1f s of autotuning",
                 self.key[:12], result.digest[:12], len(result.manifest.files), self.time_saved_ns / 1e9)

    def _register_pulled(self, manifest: Any) -> int:
        """Record the pulled files for the process (artifacts) and sum their autotuning time.

        A file gone already (a concurrent cache clean) is left out with one warning: the bundle
        was still a hit, and the job compiles that one kernel again if it needs it.
        """
        saved = 0
        vanished: list[str] = []
        for record in manifest.files:
            try:
                path = recording.record_member(record.path, self.settings, into=self._recorder)
            except OSError:
                vanished.append(record.path)
                continue
            if record.path.startswith(f"{recording.AUTOTUNE_ROOT}/"):
                saved += _time_taken_ns(path)
        if vanished:
            log.warning("compile %s: %d unpacked file(s) vanished before they could be recorded (first: %s); "
                        "a cache clean running meanwhile?", self._label, len(vanished), vanished[0])
        return saved

    # during ------------------------------------------------------------------------------------

    def sync(self) -> bool:
        """Wait for the fetch (at most until the pull budget runs out); True on a hit.

        After the budget the session proceeds as a miss. A fetch that finishes later still lands
        in the cache safely (unpacking is atomic), it is just too late to count.
        """
        fetcher = self._fetcher
        if fetcher is threading.current_thread() or recording.in_fetch():
            return self._hit  # the fetch itself (or another session's) asking: waiting would wait for itself
        if fetcher is not None and fetcher.is_alive():
            started = time.monotonic()
            fetcher.join(max(0.0, self._deadline - started))
            if self.settings.remote and self.key is not None:  # waited on the store, not on the key
                from bundler.remote import health

                health.spend(self.settings, time.monotonic() - started)
            if fetcher.is_alive():
                self._fetcher = None  # given up: later calls neither wait nor warn again
                self._give_up_fetch()
                recording.remove_waiter(self.sync)
        return self._hit

    def _give_up_fetch(self) -> None:
        """The budget ran out: stop the download, and mark the store down (the one warning).

        Cancelling the fetch's deadline makes its stream reads stop at their next check, so the
        thread neither keeps downloading nor holds the node's pull lock for other processes.
        """
        if self.key is None:  # still deriving the key (importing Triton): the store is not to blame
            log.warning("compile session: deriving its key took longer than the pull budget (%g s, "
                        "BUNDLER_PULL_BUDGET); compiling without a bundle", self.settings.pull_budget)
            return
        if self._fetch_deadline is not None:
            self._fetch_deadline.cancel()
        exc = DeadlineExceededError(
            f"no bundle within the pull budget (BUNDLER_PULL_BUDGET={self.settings.pull_budget:g})"
        )
        self._remote_failed("read", f"{REF_PREFIX}{self.key or 'unknown'}", exc)

    def put(self, path: str | os.PathLike[str], data: bytes | None = None) -> None:
        """Add a local-cache file to this session's bundle (``data``: its bytes, else read at push)."""
        entry = _entry(path, data, self.settings)
        if entry is not None:
            self._recorder.add(*entry)

    # end ---------------------------------------------------------------------------------------

    def end(self) -> Any:
        """Stop collecting; push what a miss (or a hit that still compiled) produced. Returns the PushResult or None.

        A hit whose job still compiled or tuned something the bundle lacked (a renamed script, a
        new shape) pushes a follow-up bundle holding the pulled files and the new ones, and moves
        the ref to it, so the next node does none of that work again. The push runs under the
        failure policy: the job waits for it at most for what is left of the pull budget.

        Ending a session that is not open (ended already, or never begun) does nothing: the cache
        never raises into the job.
        """
        if self._state != "open":
            log.debug("compile session %s is %s, not open; nothing to end", self._label, self._state)
            return None
        self._state = "ended"
        if not self.enabled:
            return None
        try:
            return self._end()
        finally:
            self._log_summary()

    def _log_summary(self) -> None:
        """The one INFO line a session leaves: what a job's log needs to tell a warm start from a cold one."""
        outcome, files, size = "miss", 0, 0
        if self._hit and self.pulled is not None:
            outcome, files, size = "hit", len(self.pulled.manifest.files), self.pulled.manifest.total_size
        elif self.pushed is not None:
            files, size = len(self.pushed.manifest.files), self.pushed.manifest.total_size
        pushed = f", pushed {self.pushed.digest[:12]}" if self.pushed is not None else ""
        log.info("compile %s: %s (ref %s), %d files, %d bytes, %.2f s, saved %.1f s of tuning%s",
                 self._label, outcome, self.settings.ref or (f"{REF_PREFIX}{self._label}" if self.key else "-"),
                 files, size, time.monotonic() - self._started, self.time_saved_ns / 1e9, pushed)

    def _end(self) -> Any:
        self.sync()
        recording.remove_waiter(self.sync)
        recording.detach(self._recorder)
        if self.key is None:
            log.info("compile session: no key was derived within the pull budget; no bundle to push")
            return None
        entries = recording.still_existing(self._recorder.entries())
        new = sorted(name for name in entries if name not in self._pulled_names)
        if self._hit and not new:
            return None
        if not entries:
            log.info("compile %s: nothing was compiled or tuned; no bundle to push", self.key[:12])
            return None
        if self._hit:
            entries = {**self._pulled_entries(), **entries}
            log.info("compile %s: the bundle was a hit, but %d file(s) were made anew (first: %s); pushing "
                     "a follow-up bundle", self.key[:12], len(new), new[0])
        if self.settings.warm:
            log.info("compile %s: running under `bundler warm`, which pushes when the command ends", self.key[:12])
            return None
        if not self._remote_usable("write"):
            log.info("compile %s: the remote %s is not usable for writes in this process; not pushing",
                     self.key[:12], self.settings.remote)
            return None
        if not _may_sign(self.settings):
            log.info("compile %s: this node holds only public keys (BUNDLER_TRUSTED_KEYS); it reads signed "
                     "bundles but does not push", self.key[:12])
            return None
        self.pushed = self._push(entries)
        return self.pushed

    def _pulled_entries(self) -> dict[str, recording.Source]:
        """The pulled bundle's members as they lie in the local caches now (for a follow-up push)."""
        found: dict[str, recording.Source] = {}
        for name in self._pulled_names:
            try:
                found[name] = recording.source_for(name, recording.local_path(name, self.settings))
            except (OSError, KeyError):
                continue  # cleaned meanwhile: the follow-up bundle simply lacks it
        return recording.still_existing(found)

    def _push(self, entries: dict[str, recording.Source]) -> Any:
        from bundler.remote import health, transfer

        extra = {**transfer.run_facts(), "compile_key": self.key, "entries": len(entries),
                 "time_taken_ns": _entries_time_ns(entries)}

        def push() -> Any:
            return transfer.push(self._store_handle(), entries, ref=self.ref_name, ref_extra=extra,
                                 settings=self.settings)

        result = health.guarded(self.settings, "write", self.ref_name, push)
        if result is None:
            log.info("compile %s: bundle not pushed; the next run compiles again", self.key[:12])
            return None
        log.info("compile %s: pushed bundle %s (%d files, %d bytes%s)", self.key[:12], result.digest[:12],
                 len(entries), result.size, "" if result.uploaded else ", already in the store")
        return result

    def __enter__(self) -> CompileSession:
        return self.begin() if self._state == "new" else self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._state != "open":  # ended inside the block (``end_compile()``): nothing left to do
            return
        if exc_type is not None:
            # A failed compile produced nothing worth sharing; stop without pushing.
            self._state = "ended"
            recording.remove_waiter(self.sync)
            recording.detach(self._recorder)
            return
        self.end()


def _valid_ref(name: str) -> bool:
    """Whether ``BUNDLER_REF`` is a usable ref name; a bad one turns sessions off with one warning."""
    from bundler.remote import layout

    try:
        layout.check_name(name)
    except ConfigError as exc:
        log.warning("compile session off: BUNDLER_REF %s", logs.one_line(exc, 150))
        return False
    return True


def _may_sign(settings: Settings) -> bool:
    """False on a verify-only node: its unsigned ref would be refused by every other reader."""
    if not settings.signing_configured:
        return True
    from bundler.remote import signing

    try:
        keys = signing.keyring(settings)
    except ConfigError as exc:
        log.warning("compile session: cannot load the signing keys (%s); not pushing", logs.one_line(exc))
        log.debug("signing keys", exc_info=exc)
        return False
    return not keys.enabled or keys.can_sign


def _settings_or_off(settings: Settings | None, what: str) -> tuple[Settings, bool]:
    """``settings``, else the environment's; defaults and False when the environment is invalid.

    A bad ``BUNDLER_*`` variable must cost a warning, not the job (DESIGN.md, failure policy).
    """
    if settings is not None:
        return settings, True
    try:
        return Settings.from_env(), True
    except ConfigError as exc:
        log.warning("%s off: %s", what, exc)
        return Settings(bundles=False), False


def _entry(path: str | os.PathLike[str], data: bytes | None, settings: Settings) -> tuple[str, recording.Source] | None:
    """The (member name, source) to record for a ``put``; None, with a warning, if it cannot be."""
    name = recording.member_name(path, settings)
    if name is None:
        log.warning("put(%s): not inside the local caches; not bundled", logs.one_line(path, 80))
        log.debug("local caches: %s, %s", settings.cache_dir, settings.triton_cache_dir)
        return None
    if data is not None:
        return name, data
    try:
        return name, recording.source_for(name, path)
    except OSError as exc:  # removed or unreadable since it was written
        log.warning("put(%s): cannot read it (%s); not bundled", logs.one_line(path, 80), exc.strerror or type(exc).__name__)
        return None


def _time_taken_ns(source: recording.Source) -> int:
    """The autotuning time an autotune record says it cost (0 when unreadable)."""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        return int(json.loads(data).get("time_taken_ns") or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def _entries_time_ns(entries: dict[str, recording.Source]) -> int:
    prefix = f"{recording.AUTOTUNE_ROOT}/"
    return sum(_time_taken_ns(source) for name, source in entries.items() if name.startswith(prefix))


# --- the module-level API (one stack of sessions per process) ---------------------------------------

#: Open sessions, oldest first, each with the thread that began it (``end_compile`` is per thread).
_sessions: list[tuple[CompileSession, int]] = []
_sessions_lock = threading.Lock()


def _new_sessions_lock() -> None:
    # A forked child (a DataLoader worker) must not inherit a lock a parent thread held.
    global _sessions_lock
    _sessions_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_sessions_lock)


def begin_compile(
    *, code: str | None = None, code_hash: str | None = None, settings: Settings | None = None
) -> CompileSession:
    """Open a compile session for ``code`` (or its ``code_hash``) and make it the current one."""
    session = CompileSession(code=code, code_hash=code_hash, settings=settings).begin()
    with _sessions_lock:
        _sessions.append((session, threading.get_ident()))
    return session


def put(path: str | os.PathLike[str], data: bytes | None = None) -> None:
    """Add a local-cache file to every open session and to the process's artifacts.

    Call it for cache files your own code writes or finds (``data``: its bytes, else the file is
    read at push time). The autotune cache and the Triton integration call the equivalent
    themselves, for hits as well as writes, so a new model that reuses old kernels bundles them.
    """
    session = current()
    settings, usable = _settings_or_off(session.settings if session is not None else None, "put")
    entry = _entry(path, data, settings) if usable else None
    if entry is not None:
        recording.record(*entry)


def end_compile() -> Any:
    """End the current session (see :meth:`CompileSession.end`); None when none is open.

    The current session is the last one this thread began: with sessions open on several threads
    (a server compiling per request), one thread's ``end_compile`` must not end another's, which
    would push it early and leave this one open and recording for good. A thread that began none
    ends the last one begun anywhere (a session begun on the main thread, ended by a worker).
    """
    with _sessions_lock:
        session = _current_locked()
        _forget_locked(session)
    return session.end() if session is not None else None


def sync() -> None:
    """Wait for every open session's fetch, each bounded by its pull budget."""
    recording.wait_for_pending()


def current() -> CompileSession | None:
    """The last session this thread began, else the last one begun on any thread."""
    with _sessions_lock:
        return _current_locked()


def _current_locked() -> CompileSession | None:
    me = threading.get_ident()
    mine = (session for session, thread in reversed(_sessions) if thread == me)
    return next(mine, _sessions[-1][0] if _sessions else None)


def _forget_locked(session: CompileSession | None) -> None:
    _sessions[:] = [pair for pair in _sessions if pair[0] is not session]


@contextlib.contextmanager
def compile_session(
    *, code: str | None = None, code_hash: str | None = None, settings: Settings | None = None
) -> Iterator[CompileSession]:
    """``with compile_session(code=src) as s:`` = begin_compile ... end_compile (no push on error)."""
    session = begin_compile(code=code, code_hash=code_hash, settings=settings)
    try:
        with session:
            yield session
    finally:
        with _sessions_lock:
            _forget_locked(session)


# --- bundler warm: a prebake around any command ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WarmResult:
    """What ``bundler warm`` did: the command's exit code, what it pulled and pushed, what the run added."""

    exit_code: int
    pulled: Any = None  # transfer.PullResult, when the ref existed
    pushed: Any = None  # transfer.PushResult, when something was pushed
    added: tuple[str, ...] = ()  # members the run created or changed
    left_out: int = 0  # files in the caches before the run, neither pulled nor touched (see ``everything``)


def warm_roots(settings: Settings) -> dict[str, Path]:
    """The caches ``bundler warm`` fills and bundles, by bundle root: our autotune records and Triton's
    kernel cache, the same folders (and member names) a compile session uses."""
    return recording.dest_mapping(settings)


def snapshot(roots: Mapping[str, Path]) -> dict[str, tuple[int, int]]:
    """``member name -> (size, mtime_ns)`` of every regular file under ``roots`` (tree capture).

    Walking the folders, rather than recording what the job touched, sees everything the command
    did, in any process, through any integration: warm needs no cooperation from the job.
    Links and special files are left out, as the bundle format refuses them.
    """
    found: dict[str, tuple[int, int]] = {}
    for root, top in roots.items():
        top = Path(top)
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(folder, d)))
            for name in files:
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                rel = Path(path).relative_to(top).as_posix()
                found[f"{root}/{rel}"] = (st.st_size, st.st_mtime_ns)
    return found


def warm(
    command: Sequence[str],
    *,
    ref: str,
    settings: Settings,
    store: Any,
    roots: Mapping[str, Path] | None = None,
    everything: bool = False,
    run: Callable[[Sequence[str], dict[str, str]], int] | None = None,
) -> WarmResult:
    """Pull ``ref`` into the caches, run ``command`` against them, push what they hold for it.

    The steps, and why each:

    1. Pull ``ref`` (if it exists) into ``roots`` with the node's pull state, so the sessions the
       command opens find it already unpacked and download nothing.
    2. Snapshot the folders, run the command with ``BUNDLER_REF=ref`` (its sessions pull the same
       ref, and a job later started with the same setting pulls what this run pushes),
       ``BUNDLER_WARM=1`` (its sessions leave pushing to us: one bundle, not one per session) and
       the cache folders exported, so it uses exactly these.
    3. If the command failed, push nothing (a failed run's caches are not worth sharing) and
       return its exit code.
    4. Otherwise push the union of the pulled files and every file the run added or changed
       (``everything``: every file in the folders) as one bundle and move ``ref`` to it, unless
       the run added nothing to what was pulled.
    Store errors raise (a CI prebake should fail loudly); an unusable bundle behind ``ref`` is
    warned about and rebuilt by the run.
    """
    from bundler.relocate import GroupFileRewriter
    from bundler.remote import layout, transfer

    layout.check_name(ref)
    roots = dict(roots or warm_roots(settings))
    pulled = None
    try:
        pulled = transfer.pull(store, roots, ref=ref, settings=settings, rewrite=GroupFileRewriter(),
                               node_state=settings.cache_dir / "pulled")
        log.info("warm: pulled %s (bundle %s, %d files)", ref, pulled.digest[:12], len(pulled.manifest.files))
    except NotFoundError:
        log.info("warm: ref %s does not exist yet; the run starts cold", ref)
    except BundleError as exc:
        log.warning("warm: the bundle of ref %s is unusable (%s); the run rebuilds it", ref, logs.one_line(exc, 80))
        log.debug("unusable bundle", exc_info=exc)
    pulled_names = {r.path for r in pulled.manifest.files} if pulled is not None else set()
    before = snapshot(roots)
    env = {**os.environ, "BUNDLER_REF": ref, "BUNDLER_WARM": "1",
           "BUNDLER_CACHE_DIR": str(settings.cache_dir), "TRITON_CACHE_DIR": str(settings.triton_cache_dir)}
    if settings.remote:
        env["BUNDLER_REMOTE"] = settings.remote
    code = (run or _run_command)(command, env)
    if code != 0:
        log.warning("warm: the command exited with %d; nothing pushed", code)
        return WarmResult(code, pulled)
    after = snapshot(roots)
    added = tuple(sorted(name for name, facts in after.items() if before.get(name) != facts))
    wanted = set(after) if everything else (pulled_names & set(after)) | set(added)
    left_out = len(set(after) - wanted)
    if left_out:
        log.info("warm: %d file(s) were in the caches before the run and are not bundled (--all bundles them)",
                 left_out)
    if not added and pulled is not None:
        log.info("warm: the run added nothing to %s; the ref stays at %s", ref, pulled.digest[:12])
        return WarmResult(code, pulled, None, added, left_out)
    entries: dict[str, recording.Source] = {}
    for name in sorted(wanted):
        try:
            entries[name] = recording.source_for(name, roots[name.split("/", 1)[0]] / name.split("/", 1)[1])
        except OSError:
            continue  # removed since the snapshot
    if not entries:
        log.warning("warm: the command left nothing in the caches (%s); nothing pushed",
                    ", ".join(str(p) for p in roots.values()))
        return WarmResult(code, pulled, None, added, left_out)
    import shlex

    extra = {"warm": True, "command": shlex.join(command)[:500], "entries": len(entries), "added": len(added),
             "time_taken_ns": _entries_time_ns(entries), "base": pulled.digest if pulled is not None else None}
    pushed = transfer.push(store, entries, ref=ref, ref_extra=extra, settings=settings)
    log.info("warm: pushed bundle %s to %s (%d files, %d new or changed)", pushed.digest[:12], ref, len(entries),
             len(added))
    return WarmResult(code, pulled, pushed, added, left_out)


def _run_command(command: Sequence[str], env: dict[str, str]) -> int:
    import subprocess

    try:
        return subprocess.run(list(command), env=env, check=False).returncode
    except FileNotFoundError:
        raise ConfigError(f"warm: command {command[0]!r} not found; check the part after '--'") from None
