"""The ``bundler`` command: parsing and printing only; the work happens in the layers below.

Exit codes are a contract scripts rely on: 0 success, 2 usage error, 3 not found, 4 integrity or
safety rejection, 5 storage unreachable or denied, 1 anything else. Each command imports what it
needs when it runs, so ``bundler unpack`` never imports the store layer, let alone botocore (a test
checks the imported modules), and ``main`` builds the parser of that command only (``build_parser``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from bundler import __version__
from bundler.errors import BundlerError, ConfigError, LocalFileNotFoundError, NotFoundError

log = logging.getLogger("bundler")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the caller's block
    except FileNotFoundError:
        raise LocalFileNotFoundError(f"bundle file {path} does not exist") from None
    except IsADirectoryError:
        raise _is_a_directory(path) from None
    except OSError as exc:
        raise BundlerError(f"cannot open {path}: {exc.strerror or exc}") from None
    with f:
        yield f


def _is_a_directory(path: str) -> ConfigError:
    return ConfigError(f"{path} is a directory, not a bundle file; give the .tar.zst file "
                       "(`bundler pack` or `bundler export` makes one)")


@contextlib.contextmanager
def _naming_the_file(path: str) -> Iterator[None]:
    """A bundle file the reader rejects is named in the message, with what to do about it.

    The reader does not know where its bytes came from (a store, a file, stdin); the command does,
    so it prefixes the path and, for a corrupt or foreign file, says how to get a good one.
    """
    from bundler.errors import BundleError, ManifestError, NotABundleError, UnsafeMemberError

    try:
        yield
    except BundleError as exc:
        hint = ""
        if isinstance(exc, NotABundleError | ManifestError):
            hint = "; copy or export it again"
        elif isinstance(exc, UnsafeMemberError):
            hint = "; give a bundle made by `bundler pack` or `bundler export`"
        name = "stdin" if path == "-" else path
        raise type(exc)(f"{name}: {exc}{hint}") from exc


class _OutputFile:
    """The file behind ``-o``: a failed write names the file the user gave, not our temp file."""

    def __init__(self, f: BinaryIO, path: str) -> None:
        self._f, self._path = f, path

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            raise _cannot_write(self._path, exc) from None


def _cannot_write(path: str, exc: OSError) -> BundlerError:
    """``cannot write PATH: WHAT; WHAT TO DO`` for a local write that failed (exit 1)."""
    import errno

    why = {
        errno.ENOSPC: "the disk is full; free space or write it elsewhere",
        errno.EDQUOT: "the disk quota is exceeded; free space or write it elsewhere",
        errno.EROFS: "the filesystem is read-only; write it elsewhere",
        errno.EACCES: "permission denied; write it to a folder you may write to",
        errno.EPERM: "permission denied; write it to a folder you may write to",
        errno.EISDIR: "it is a directory; give a file path",
        errno.EFBIG: "the file is over the size limit of this process or filesystem; write it elsewhere",
        errno.ENOENT: f"folder {Path(path).parent} does not exist; create it first",
        errno.ENOTDIR: f"a part of {Path(path).parent} is not a folder; choose another path",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return BundlerError(f"cannot write {path}: {why}")


@contextlib.contextmanager
def atomic_output(path: str, *, force: bool = False) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` complete or not at all (``-``: stdout, never a terminal).

    An existing file is replaced only with ``force``: the output is often a copy on removable
    media on its way to an air-gapped cluster, and losing it silently is losing data.
    """
    if path == "-":
        if sys.stdout.isatty():
            raise ConfigError("stdout is a terminal; redirect it or give -o FILE")
        yield sys.stdout.buffer
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"-o {path} is a directory; give a file path, e.g. {target / 'cache.tar.zst'}")
    if not target.parent.is_dir():
        raise BundlerError(f"cannot write {path}: folder {target.parent} does not exist; create it first")
    if not force and (target.exists() or target.is_symlink()):
        raise ConfigError(f"{path} exists; give --force to replace it, or choose another -o FILE")
    from bundler.fileio import atomic_writer

    in_block = False
    try:
        with atomic_writer(path) as f:
            in_block = True
            yield _OutputFile(f, path)  # type: ignore[misc]
            in_block = False
    except OSError as exc:
        if in_block:  # not ours to explain: the command's own block failed
            raise
        raise _cannot_write(path, exc) from None


def relocator(args: argparse.Namespace):
    """Triton group files hold absolute paths; rewrite them for where they land (unless --raw).

    Without this, a Triton cache unpacked anywhere but its original path is silently cold: Triton
    treats a group whose children are missing as a miss and recompiles every kernel.
    """
    if getattr(args, "raw", False):
        return None
    from bundler.relocate import GroupFileRewriter

    return GroupFileRewriter()


def _print_digest(digest: str, output: str) -> None:
    """The digest goes to stdout, unless stdout carries the bundle itself (``-o -``)."""
    print(digest, file=sys.stderr if output == "-" else sys.stdout)


def _settings(args: argparse.Namespace):
    from bundler.config import Settings

    overrides = {}
    if getattr(args, "level", None) is not None:
        overrides["zstd_level"] = args.level
    return Settings.from_env(**overrides)


# --- local bundle files --------------------------------------------------------------------------


def cmd_pack(args: argparse.Namespace) -> int:
    # The writer itself, not ``archive``: that would import the reading half too (reader,
    # prefetch, queue), ~3 ms of every ``bundler pack`` for code it never runs.
    from bundler.bundle import writer
    from bundler.keys import producer_facts

    _check_not_inside(args.output, args.dir)
    with atomic_output(args.output, force=args.force) as out:
        result = writer.pack(Path(args.dir), out, settings=_settings(args), producer=producer_facts())
    _print_digest(result.digest, args.output)
    log.info("packed %d files (%d bytes) into %s (%d bytes)", len(result.manifest.files),
             result.manifest.total_size, args.output, result.compressed_size)
    return EXIT_OK


def _check_not_inside(output: str, folder: str) -> None:
    """Refuse ``pack DIR -o DIR/x.tar.zst``: the bundle would hold our own temp file (and the last
    output), so it would differ on every run and grow with each one."""
    if output == "-":
        return
    top = Path(folder).resolve()
    if top.is_dir() and Path(output).resolve().is_relative_to(top):
        raise ConfigError(f"-o {output} is inside {folder}, the folder being packed: the bundle would contain "
                          "itself; write it outside that folder")


def cmd_unpack(args: argparse.Namespace) -> int:
    from bundler.bundle import archive

    with _open_input(args.file) as f, _naming_the_file(args.file):
        man = archive.unpack(
            f, Path(args.into), expected_digest=args.digest, settings=_settings(args), rewrite=relocator(args)
        )
    log.info("unpacked %d files (%d bytes) into %s", len(man.files), man.total_size, args.into)
    print(man.digest)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from bundler.bundle import archive

    with _open_input(args.file) as f, _naming_the_file(args.file):
        man = archive.verify(f, expected_digest=args.digest, settings=_settings(args))
    print(f"ok {man.digest} {len(man.files)} files {man.total_size} bytes")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from bundler.bundle import archive

    with _open_input(args.file) as f, _naming_the_file(args.file):
        man = archive.read_manifest(f, settings=_settings(args))
    summary = man.summary()
    if args.files or args.json:
        summary["file_list"] = [{"path": r.path, "size": r.size, "sha256": r.sha256} for r in man.files]
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"digest:     {summary['digest']}")
    print(f"format:     {summary['format']}")
    print(f"files:      {summary['files']}")
    print(f"total size: {summary['total_size']} bytes")
    for key, value in sorted(summary["producer"].items()):
        print(f"producer.{key}: {value}")
    for record in man.files if args.files else ():
        print(f"  {record.size:>12}  {record.sha256[:12]}  {record.path}")
    return EXIT_OK


# --- commands that talk to a store ---------------------------------------------------------------


def _store(args: argparse.Namespace):
    from bundler.stores import open_store

    settings = _settings(args)
    return open_store(args.remote, settings), settings


def _progress(args: argparse.Namespace, description: str):
    from bundler.progress import for_transfer

    return for_transfer(description, quiet=args.quiet)


def cmd_push(args: argparse.Namespace) -> int:
    from bundler.remote import transfer

    if not args.allow_empty and Path(args.dir).is_dir() and not _has_files(Path(args.dir)):
        raise ConfigError(
            f"{args.dir} holds no files, so the bundle would be empty (under TRITON_INTERPRET=1 Triton writes no "
            "kernel cache; the autotune records are in $BUNDLER_CACHE_DIR/autotune). Push another folder, use "
            "`bundler warm`, or pass --allow-empty"
        )
    store, settings = _store(args)
    with store:
        result = transfer.push(store, Path(args.dir), ref=args.ref, settings=settings, progress=_progress(args, "push"))
    print(result.digest)
    return EXIT_OK


def _has_files(top: Path) -> bool:
    return any(files for _, _, files in os.walk(top))


def cmd_pull(args: argparse.Namespace) -> int:
    from bundler.remote import transfer

    store, settings = _store(args)
    _check_store_exists(store)
    with store:
        result = transfer.pull(
            store, Path(args.into), digest=args.digest, ref=args.ref, settings=settings,
            rewrite=relocator(args), progress=_progress(args, "pull"),
        )
    print(result.digest)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from bundler.remote import transfer

    store, settings = _store(args)
    _check_store_exists(store)
    with store, atomic_output(args.output, force=args.force) as out:
        man = transfer.export(
            store, out, digest=args.digest, ref=args.ref, settings=settings, progress=_progress(args, "export")
        )
    _print_digest(man.digest, args.output)
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from bundler.remote import transfer

    store, settings = _store(args)
    with contextlib.ExitStack() as stack:
        path = _spooled_stdin(stack) if args.file == "-" else args.file
        if Path(path).is_dir():
            raise _is_a_directory(path)
        if not Path(path).is_file():
            raise LocalFileNotFoundError(f"bundle file {path} does not exist")
        with store, _naming_the_file(args.file):
            result = transfer.import_file(
                store, path, ref=args.ref, settings=settings, progress=_progress(args, "import")
            )
    print(result.digest)
    return EXIT_OK


def _spooled_stdin(stack: contextlib.ExitStack) -> str:
    """``import -``: stdin copied to a private temp file named ``stdin`` (the name the ref records).

    The import reads its file twice over (verify, then upload from a spool), and a pipe cannot be
    read twice; a terminal is refused, as it would only wait for typed bytes.
    """
    import shutil
    import tempfile

    if sys.stdin is None or sys.stdin.isatty():
        raise ConfigError("stdin is a terminal; redirect a bundle file into it (`bundler import - < FILE`) "
                          "or give the FILE")
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bundler-import-"))
    path = os.path.join(folder, "stdin")
    with open(path, "wb") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
    return path


def cmd_ls(args: argparse.Namespace) -> int:
    from bundler.remote import transfer

    store, settings = _store(args)
    _check_store_exists(store)
    with store:
        listing = transfer.list_remote(store)
        ref_docs = [{**_ref_doc(store, name, settings), "modified": _date(info)} for name, info in listing.refs]
    bundles = [{"digest": d, "size": i.size, "modified": _date(i)} for d, i in listing.bundles]
    if args.json:
        print(json.dumps({"refs": ref_docs, "bundles": bundles}, indent=2))
        return EXIT_OK
    print(f"refs ({len(ref_docs)}):")
    for doc in ref_docs:
        print(f"  {doc['name']:<40} -> {doc.get('digest', doc.get('error'))}  {doc['modified']}")
        if "digest" in doc:
            print(f"      {_ref_line(doc)}")
    print(f"bundles ({len(bundles)}):")
    for doc in bundles:
        print(f"  {doc['digest']}  {doc['size']:>12}  {doc['modified']}")
    return EXIT_OK


class _StoreFolderMissing(NotFoundError):
    """A missing folder store: ``bundler ls`` would only say the same again (see _with_next_step)."""


def _check_store_exists(store) -> None:  # noqa: ANN001 - any Store
    """A folder store that does not exist is said so (exit 3), not read as an empty store.

    Like S3's NoSuchBucket: a typo in the path must not look like a missing ref.
    """
    from bundler.stores import LocalStore

    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise _StoreFolderMissing(f"store folder {store.root} does not exist; check --remote / BUNDLER_REMOTE "
                                  "(a push or an import creates it)")


def _ref_doc(store, name: str, settings) -> dict:  # noqa: ANN001 - Store, Settings
    """A ref as ``ls`` / ``show`` print it; a ref that does not read is shown with its error."""
    from bundler.remote import refs

    try:
        ref = refs.read_ref(store, name, settings)
    except Exception as exc:  # noqa: BLE001 - a bad ref is shown as such, not fatal to the listing
        return {"name": name, "error": str(exc).splitlines()[0][:200]}
    extra = dict(ref.extra)
    return {
        "name": name, "digest": ref.digest, "bundle_size": ref.size, "created": ref.created,
        "version": ref.version, "signed": ref.signature is not None, "producer": dict(ref.producer),
        "extra": extra, "host": extra.get("host"), "command": extra.get("command"),
        "compile_key": extra.get("compile_key"), "entries": extra.get("entries", extra.get("files")),
        "tuning_s": round(int(extra.get("time_taken_ns") or 0) / 1e9, 3),
    }


def _ref_line(doc: dict) -> str:
    """One line of who made a ref: producer, compile key, entries, tuning time saved."""
    parts = [f"by {doc.get('host') or '?'}"]
    if doc.get("command"):
        command = doc["command"]
        parts.append(f"({command if len(command) <= 50 else command[:47] + '...'})")
    if doc.get("compile_key"):
        parts.append(f"key {doc['compile_key'][:12]}")
    parts.append(f"{doc.get('entries') if doc.get('entries') is not None else '?'} entries")
    parts.append(f"tuning {doc['tuning_s']:.1f} s")
    return "  ".join(parts)


def cmd_show(args: argparse.Namespace) -> int:
    from bundler.remote import refs

    store, settings = _store(args)
    _check_store_exists(store)
    with store:
        ref = refs.read_ref(store, args.ref, settings)
        doc = {**_ref_doc(store, args.ref, settings), **ref.body(), "signature": ref.signature}
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    for key in ("name", "digest", "bundle_size", "created", "version", "signed", "compile_key", "entries", "tuning_s"):
        print(f"{key + ':':<14}{doc.get(key)}")
    for key, value in sorted(doc["producer"].items()):
        print(f"producer.{key}: {value}")
    for key, value in sorted(doc["extra"].items()):
        print(f"extra.{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    from bundler.remote import layout

    store, _ = _store(args)
    _check_store_exists(store)
    key = layout.ref_key(args.ref)
    with store:
        if not store.exists(key):
            raise NotFoundError(f"ref {args.ref} ({key}) is not in {store.url}")
        store.delete(key)
    log.info("deleted ref %s; its bundle stays until `bundler gc` finds no ref naming it", args.ref)
    print(args.ref)
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    import datetime as dt

    from bundler.remote import gc

    policy = gc.Policy(
        keep_last=args.keep_last,
        older_than=gc.parse_duration(args.older_than, "--older-than") if args.older_than else None,
        grace=gc.parse_duration(args.grace, "--grace") if args.grace else gc.DEFAULT_GRACE_S,
    )
    store, _ = _store(args)
    _check_store_exists(store)
    with store:
        refs_found, bundles = gc.gather(store)
        plan = gc.plan(refs_found, bundles, policy, dt.datetime.now(dt.timezone.utc))
        outcome = gc.execute(store, plan) if args.yes else None
        uploads = gc.stale_uploads(store, policy, abort=args.yes)
    if args.json:
        print(json.dumps({"plan": plan.to_json(), "executed": outcome.to_json() if outcome else None,
                          "stale_uploads": uploads.to_json() if uploads else None}, indent=2))
        return EXIT_OK
    verb = "deleted" if outcome else "would delete"
    for ref, why in plan.delete_refs:
        print(f"{verb} ref    {ref.name}  ({why})")
    for bundle in plan.delete_bundles:
        print(f"{verb} bundle {bundle.digest}  {bundle.size} bytes  (no ref names it)")
    for name, why in outcome.spared if outcome else ():
        print(f"kept {name} after all: {why}")
    for odd in plan.odd_refs:
        print(f"odd ref {odd.key} (left alone): {odd.problem}")
    for key in uploads.keys if uploads else ():
        print(f"{'aborted' if outcome else 'would abort'} multipart upload of {key}  (a push that never finished)")
    kept = len(plan.keep_bundles) + (len(outcome.spared) if outcome else 0)
    print(f"{len(plan.delete_refs)} refs and {len(plan.delete_bundles)} bundles ({plan.freed_bytes} bytes) "
          f"{'deleted' if outcome else 'to delete'}; {len(plan.keep_refs)} refs and {kept} bundles kept"
          + (f"; {len(plan.odd_refs)} odd refs left alone" if plan.odd_refs else "")
          + _uploads_summary(uploads)
          + ("" if outcome else ". This was a dry run: add --yes to delete"))
    return EXIT_OK


def _uploads_summary(uploads) -> str:  # noqa: ANN001 - gc.StaleUploads | None
    if uploads is None:
        return "; no multipart uploads to check in a folder store"
    if uploads.error:
        return f"; stale multipart uploads not {'aborted' if uploads.aborted else 'listed'} ({uploads.error})"
    age = f"older than {uploads.older_than / 3600:g}h"
    return f"; {len(uploads.keys)} multipart uploads {age} {'aborted' if uploads.aborted else 'to abort'}"


def cmd_cache(args: argparse.Namespace) -> int:
    import shutil
    import time

    settings = _settings(args)
    root = settings.cache_dir
    older = _duration(args.older_than) if args.older_than else None
    if args.prune and older is None:
        raise ConfigError("--prune needs --older-than DURATION (for example 30d): what counts as old is yours to say")
    now = time.time()
    doc: dict = {"cache_dir": str(root), "folders": {}, "pruned": []}
    for name in ("autotune", "pulled", "refs-seen"):
        folder = root / name
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
        old = [e for e in entries if older is not None and now - _mtime(e) > older]
        doc["folders"][name] = {"entries": len(entries), "bytes": sum(_size(e) for e in entries),
                                "old": len(old)}
        if args.prune and name != "refs-seen":  # refs-seen is replay protection: never pruned
            for entry in old:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                doc["pruned"].append(str(entry))
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(f"{root}:")
    for name, facts in doc["folders"].items():
        note = f", {facts['old']} older than {args.older_than}" if older is not None else ""
        print(f"  {name + '/':<11} {facts['entries']:>7} entries {facts['bytes']:>12} bytes{note}")
    if args.prune:
        print(f"pruned {len(doc['pruned'])} entries (refs-seen/ is never pruned: it is replay protection)")
    return EXIT_OK


def _duration(text: str) -> float:
    from bundler.remote import gc

    return gc.parse_duration(text, "--older-than")


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        return path.lstat().st_size
    except OSError:
        return 0


def cmd_warm(args: argparse.Namespace) -> int:
    from bundler import session

    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigError("warm needs a command after '--', for example: bundler warm --ref NAME -- python train.py")
    store, settings = _store(args)
    roots = session.warm_roots(settings)
    for extra in args.with_ or ():
        roots.update(_integration_roots(extra, settings))
    with store:
        result = session.warm(command, ref=args.ref, settings=settings, store=store, roots=roots,
                              everything=args.all)
    doc = {"exit_code": result.exit_code, "ref": args.ref,
           "pulled": result.pulled.digest if result.pulled else None,
           "pushed": result.pushed.digest if result.pushed else None,
           "added": len(result.added), "left_out": result.left_out}
    if args.json:
        print(json.dumps(doc, indent=2))
    elif result.pushed or result.pulled:
        print((result.pushed or result.pulled).digest)
    return result.exit_code


def _integration_roots(name: str, settings) -> dict[str, Path]:  # noqa: ANN001 - Settings
    """``--with NAME``: the cache folders integration ``bundler.integrations.NAME`` declares for warm.

    The hook is a function ``warm_roots(settings) -> {bundle root: folder}`` in that module; an
    integration without one cannot be warmed this way yet.
    """
    import importlib

    try:
        module = importlib.import_module(f"bundler.integrations.{name}")
    except ImportError as exc:
        raise ConfigError(f"--with {name}: no integration bundler.integrations.{name} ({exc})") from None
    hook = getattr(module, "warm_roots", None)
    if hook is None:
        raise ConfigError(f"--with {name}: bundler.integrations.{name} declares no warm_roots(settings) yet")
    return dict(hook(settings))


def _date(info) -> str | None:
    return info.modified.isoformat(timespec="seconds") if info.modified else None


def cmd_explain(args: argparse.Namespace) -> int:
    """The torch.compile integration's verdict for this machine: hit (exit 0), or miss / refused (exit 3)
    with the nearest bundle and every fact that differs (``torch 2.13.0 here, 2.12.1 in the bundle``)."""
    from bundler.integrations import torch as torch_cache

    settings = _settings(args)
    if args.remote:
        settings = settings.replace(remote=args.remote)
    verdict = torch_cache.explain(settings=settings, ref=args.ref, tag=args.tag)
    print(verdict)
    return EXIT_OK if verdict.startswith("hit") else EXIT_NOT_FOUND


def cmd_keygen(args: argparse.Namespace) -> int:
    from bundler.remote import signing

    try:
        public = signing.generate_ed25519(args.path)
    except FileExistsError as exc:
        raise ConfigError(f"{exc}; a key in use must not be replaced silently") from None
    except OSError as exc:
        raise _cannot_write(exc.filename if isinstance(exc.filename, str) else args.path, exc) from None
    print(public)
    print(f"writers: BUNDLER_SIGNING_KEY_FILE={args.path}; readers: BUNDLER_TRUSTED_KEYS={public} "
          f"(or {args.path}.pub)", file=sys.stderr)
    return EXIT_OK


# --- parser --------------------------------------------------------------------------------------


def _digest(value: str) -> str:
    from bundler.bundle.manifest import check_digest

    try:
        return check_digest(value.lower())
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized without ``shutil.get_terminal_size``.

    argparse builds a formatter for every ``add_argument`` (to check metavars), and its default
    one imports shutil, and with it bz2 and lzma: ~2.5 ms added to every command for nothing.
    Same answer: ``$COLUMNS``, else the terminal on stdout, else 80.
    """

    def __init__(self, prog: str, **kwargs) -> None:  # noqa: ANN003 - argparse's own keywords
        if kwargs.get("width") is None:
            kwargs["width"] = _terminal_columns() - 2  # what argparse does with shutil's answer
        super().__init__(prog, **kwargs)


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, as shutil computes it."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The command line: every verb, or with ``verb`` only that one's subcommand.

    Why only one: argparse builds every subcommand's parser up front, whether it runs or not,
    each an ``ArgumentParser`` that asks gettext for its titles (gettext looks for catalogs on
    disk each time): ~12 ms of CPU for all sixteen against ~4 ms for one, on every command.
    ``main`` passes the verb only when it can tell which one runs; ``bundler --help`` and typos
    see them all.
    """
    parser = argparse.ArgumentParser(
        prog="bundler",
        description="Pack, verify and ship GPU compile caches as content-addressed bundles.",
        formatter_class=_EpilogFormatter,
        epilog=_epilog(),
    )
    parser.add_argument("--version", action="version", version=f"kernel-bundler {__version__}")
    _add_output_flags(parser, verbose=0, quiet=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog="bundler")
    for name in (verb,) if verb else VERBS:
        func, summary, add_arguments = VERBS[name]
        example = EXAMPLES.get(name)
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=_EpilogFormatter,
                           epilog=f"example:\n  {example}\n\n{EXIT_CODES}" if example else EXIT_CODES)
        # A subcommand's flags default to SUPPRESS so they do not overwrite what came before it.
        # Added here rather than through a parent parser: one ArgumentParser fewer, same help.
        _add_output_flags(p, verbose=argparse.SUPPRESS, quiet=argparse.SUPPRESS)
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def _verb_to_build(argv: Sequence[str]) -> str | None:
    """The verb ``argv`` runs, when argparse is sure to read it so; else None (build them all).

    Only ``-v``/``-q`` may come first: any other word before the verb (``--help``, ``--version``,
    ``--``, ``-``, an abbreviated or unknown option) can change what argparse does, and its
    messages (main help, "invalid choice", did-you-mean) must list every verb.
    """
    for arg in argv:
        if arg in ("--verbose", "--quiet") or (arg[:1] == "-" and len(arg) > 1 and set(arg[1:]) <= {"v", "q"}):
            continue
        return arg if arg in VERBS else None
    return None


def _pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="directory to pack")
    p.add_argument("-o", "--output", required=True, help="bundle file to write ('-' for stdout)")
    _force_flag(p)
    p.add_argument("--level", type=_zstd_level, help="zstd level (default BUNDLER_ZSTD_LEVEL or 3)")


def _force_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace the -o file if it exists (refused by default)")


def _zstd_level(value: str) -> int:
    from bundler.config import ZSTD_MAX_LEVEL, ZSTD_MIN_LEVEL

    try:
        level = int(value)
    except ValueError:
        level = ZSTD_MAX_LEVEL + 1
    if not ZSTD_MIN_LEVEL <= level <= ZSTD_MAX_LEVEL:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a zstd level: give an integer from {ZSTD_MIN_LEVEL} to {ZSTD_MAX_LEVEL} "
            "(negative levels are its fast modes, 3 is the default)")
    return level


def _unpack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="bundle file ('-' for stdin)")
    p.add_argument("--into", required=True, help="destination directory")
    p.add_argument("--digest", type=_digest, help="reject the bundle unless it has this digest")
    add_raw_flag(p)


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="bundle file ('-' for stdin)")
    p.add_argument("--digest", type=_digest, help="reject the bundle unless it has this digest")


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="bundle file ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.add_argument("--files", action="store_true", help="list every file")


def _remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--remote",
        help="store URL: s3://bucket/prefix[?endpoint=URL&addressing=path] or file:///path "
        "(default: $BUNDLER_REMOTE)",
    )
    p.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS",
        help="give up (exit 5) when the whole command has not finished in this many seconds, "
        "however the store behaves: slow bodies, retries and all (default: no limit)",
    )


def _target_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("digest", nargs="?", type=_digest, help="bundle digest (64 hex characters)")
    group.add_argument("--ref", help="ref name pointing at the bundle")


def _push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="directory to pack")
    p.add_argument("--ref", help="point this ref name at the bundle")
    p.add_argument("--allow-empty", action="store_true",
                   help="push even when the directory holds no files (refused by default: an empty bundle is a mistake)")
    _remote_flags(p)


def _warm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", required=True, help="the ref to pull first and move to the new bundle (the job's BUNDLER_REF)")
    p.add_argument("--all", action="store_true",
                   help="bundle every file in the cache folders, not only what was pulled or the run wrote")
    p.add_argument("--with", dest="with_", action="append", metavar="INTEGRATION",
                   help="also warm the cache folders an integration declares (e.g. torch, once it has warm_roots)")
    p.add_argument("--json", action="store_true", help="print what happened as JSON")
    _remote_flags(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command to run (after --)")


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    _target_arguments(p)
    p.add_argument("--into", required=True, help="destination directory")
    add_raw_flag(p)
    _remote_flags(p)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    _target_arguments(p)
    p.add_argument("-o", "--output", required=True, help="file to write ('-' for stdout)")
    _force_flag(p)
    _remote_flags(p)


def _import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="bundle file ('-' for stdin)")
    p.add_argument("--ref", help="point this ref name at the bundle")
    _remote_flags(p)


def _ls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    _remote_flags(p)


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="ref name (see `bundler ls`)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _remote_flags(p)


def _rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="ref name (see `bundler ls`)")
    _remote_flags(p)


def _gc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-last", type=int, metavar="N",
                   help="keep the newest N refs of each prefix (the part before the last '/'), whatever their age")
    p.add_argument("--older-than", metavar="DURATION",
                   help="delete refs not written for DURATION (e.g. 30d, 12h), except those --keep-last keeps")
    p.add_argument("--grace", metavar="DURATION",
                   help="delete unreferenced bundles only when older than this (default 1h: a push in flight is "
                   "safe; must be over 10m, the window in which a push does not refresh a stored bundle)")
    p.add_argument("--yes", action="store_true",
                   help="delete (and, on S3, abort multipart uploads over max(grace, 1h) old); "
                   "without it gc only prints the plan")
    p.add_argument("--json", action="store_true", help="print the plan (and what was deleted) as JSON")
    _remote_flags(p)


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--older-than", metavar="DURATION", help="count (and with --prune delete) entries older than this")
    p.add_argument("--prune", action="store_true", help="delete autotune/ and pulled/ entries older than --older-than")
    p.add_argument("--json", action="store_true", help="print JSON")


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", help="ref prefix naming the job (default BUNDLER_REF, else 'torch')")
    p.add_argument("--tag", help="user salt (default BUNDLER_TAG)")
    _remote_flags(p)


def _keygen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="where to write the private key (mode 0600); the public key goes to PATH.pub")


#: Every verb, in the order ``bundler --help`` lists them: what runs it, its one-line help, and
#: what declares its arguments (called only when its subcommand is built; see ``build_parser``).
VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None]]] = {
    "pack": (cmd_pack, "pack a cache directory into a bundle file; prints its digest", _pack_arguments),
    "unpack": (cmd_unpack, "verify a bundle file and extract it into a directory", _unpack_arguments),
    "verify": (cmd_verify, "check a bundle file completely without extracting it", _verify_arguments),
    "inspect": (cmd_inspect, "print a bundle's manifest summary", _inspect_arguments),
    "push": (cmd_push, "pack a directory and upload it; prints the digest", _push_arguments),
    "warm": (cmd_warm, "pull a ref into the caches, run a command, push what it added to the ref", _warm_arguments),
    "pull": (cmd_pull, "download, verify and unpack a bundle into a directory", _pull_arguments),
    "export": (cmd_export, "save a bundle from the store to a file, for offline transfer", _export_arguments),
    "import": (cmd_import, "verify a bundle file and upload it to the store", _import_arguments),
    "ls": (cmd_ls, "list refs (with who made them) and bundles in the store", _ls_arguments),
    "show": (cmd_show, "print everything a ref records: bundle, producer, versions, command, counts",
             _show_arguments),
    "rm": (cmd_rm, "delete a ref (its bundle goes at the next `bundler gc` if no other ref names it)",
           _rm_arguments),
    "gc": (cmd_gc, "delete old refs and unreferenced bundles; a dry run unless --yes", _gc_arguments),
    "cache": (cmd_cache, "show this machine's BUNDLER_CACHE_DIR (autotune/, pulled/, refs-seen/)",
              _cache_arguments),
    "explain": (cmd_explain, "say whether this machine's torch.compile caches would hit, and why not",
                _explain_arguments),
    "keygen": (cmd_keygen, "write a new Ed25519 signing key pair (PATH and PATH.pub)", _keygen_arguments),
}


EXIT_CODES = """exit codes:
  0 success   2 usage error   3 not found   4 integrity or safety rejection
  5 storage unreachable or denied   1 anything else   (warm: the command's own exit code)"""

#: One example per verb, printed by ``bundler VERB --help`` and ``bundler --help``.
EXAMPLES = {
    "pack": "bundler pack ~/.triton/cache -o cache.tar.zst",
    "unpack": "bundler unpack cache.tar.zst --into ~/.triton/cache",
    "verify": "bundler verify cache.tar.zst --digest HEX",
    "inspect": "bundler inspect cache.tar.zst --files",
    "push": "bundler push ~/.triton/cache --ref llama-70b/h100",
    "warm": "bundler warm --ref llama-70b/h100 -- python train.py --steps 1",
    "pull": "bundler pull --ref llama-70b/h100 --into ~/.triton/cache",
    "export": "bundler export --ref llama-70b/h100 -o offline.tar.zst",
    "import": "bundler import offline.tar.zst --ref llama-70b/h100",
    "ls": "bundler ls --json",
    "show": "bundler show llama-70b/h100",
    "rm": "bundler rm llama-70b/old",
    "gc": "bundler gc --keep-last 5 --older-than 30d --yes",
    "cache": "bundler cache --older-than 30d --prune",
    "explain": "bundler explain --ref llama-train",
    "keygen": "bundler keygen ~/.config/kernel-bundler/signing.pem",
}


def _epilog() -> str:
    from bundler.config import _ENV_NAMES

    examples = "\n".join(f"  {line}" for line in EXAMPLES.values())
    names = sorted(set(_ENV_NAMES.values()))
    env = "\n".join("  " + " ".join(names[i:i + 3]) for i in range(0, len(names), 3))
    return (f"examples:\n{examples}\n\n{EXIT_CODES}\n\nenvironment (documented in bundler.config.Settings):\n{env}\n"
            "  AWS_* (credentials, profile, AWS_ENDPOINT_URL), as boto3 reads them")


class _EpilogFormatter(_HelpFormatter):
    """Keeps the epilog's line breaks (examples, exit codes); wraps the rest as argparse does."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out = []
        for line in text.splitlines():
            lead = indent + line[: len(line) - len(line.lstrip())]
            out.append(textwrap.fill(line.strip(), width, initial_indent=lead, subsequent_indent=lead + "  ")
                       if line.strip() else "")
        return "\n".join(out) + "\n"


def _add_output_flags(p: argparse.ArgumentParser, *, verbose: object, quiet: object) -> None:
    """-v/-q, accepted before or after the command."""
    p.add_argument("-v", "--verbose", action="count", default=verbose, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", default=quiet, help="only errors; no progress bars")


def add_raw_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--raw", action="store_true",
        help="write files exactly as bundled (by default Triton __grp__*.json paths are relocated)",
    )


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return seconds


def _within_timeout(args: argparse.Namespace) -> int:
    """Run the command; with ``--timeout``, in a worker thread the main thread stops waiting for.

    Socket timeouts bound each read, not a command: a store that trickles a byte a second, or a
    dead one behind botocore's retries, would hold a CI job for minutes. The command's deadline
    (:mod:`bundler.deadline`) makes its stream reads stop; the thread bounds what no read check
    can reach (a request that never answers). What an unpack staged is removed by its own cleanup,
    or swept by the next unpack once this process is gone.
    """
    seconds = getattr(args, "timeout", None)
    if not seconds:
        return args.func(args)
    import contextvars
    import threading

    from bundler import deadline
    from bundler.errors import DeadlineExceededError

    limit = deadline.Deadline(seconds, f"--timeout {seconds:g}")
    outcome: dict[str, object] = {}

    def work() -> None:
        with deadline.scope(limit):
            try:
                outcome["code"] = args.func(args)
            except BaseException as exc:  # handed to the main thread
                outcome["error"] = exc

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="bundler-command",
                              daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        limit.cancel()
        worker.join(2.0)  # a stream read notices the cancel within a second and cleans up
        raise DeadlineExceededError(
            f"bundler {args.command} did not finish within --timeout {seconds:g} s: the store at "
            f"{getattr(args, 'remote', None) or os.environ.get('BUNDLER_REMOTE', '(BUNDLER_REMOTE)')} is slow or "
            "not answering; nothing partial was placed. Retry later, or raise --timeout"
        )
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["code"]  # type: ignore[return-value]


#: Verbs that only read and write local files. They run without the cyclic garbage collector: they
#: make no cycles worth collecting, and its passes over a 1,600-file manifest's objects cost
#: ~10 ms of an unpack. It is back on when they return.
_LOCAL_VERBS = frozenset({"pack", "unpack", "verify", "inspect"})


def _configure_logging(verbose: int, quiet: bool) -> None:
    """-q / -v / -vv; without them ``BUNDLER_LOG`` (as in jobs), else warnings only."""
    from bundler import logs

    level: int | str = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    env_level = os.environ.get("BUNDLER_LOG", "").strip().upper()
    if not quiet and not verbose and env_level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        level = env_level
    logs.attach(level)


def _unknown_command(argv: Sequence[str]) -> str | None:
    """A one-line error with the nearest verb, for ``bundler pus``; None when the verb is known."""
    words = [a for a in argv if not a.startswith("-")]
    flags_before = [a for a in argv[: argv.index(words[0])]] if words else []
    if not words or any(f in ("-h", "--help", "--version") for f in flags_before):
        return None
    verbs = list(VERBS)
    if words[0] in verbs:
        return None
    import difflib  # only for a typo: ~2 ms of import that a known verb does not need

    close = difflib.get_close_matches(words[0], verbs, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown command '{words[0]}'{hint} (`bundler --help` lists them)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_verb_to_build(argv))
    unknown = _unknown_command(argv)
    if unknown:
        print(f"{parser.format_usage().rstrip()}\nbundler: error: {unknown}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    pause_gc = args.command in _LOCAL_VERBS and gc.isenabled()
    if pause_gc:
        gc.disable()
    try:
        return _within_timeout(args)
    except BundlerError as exc:
        print(f"bundler: error: {_with_next_step(exc)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`bundler inspect --files | head`): not an error worth a message.
        # Point stdout at devnull so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"bundler: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("bundler: interrupted", file=sys.stderr)
        return 130
    finally:
        if pause_gc:
            gc.enable()


def _with_next_step(exc: BundlerError) -> str:
    """Store misses name the command that shows what is there."""
    message = str(exc)
    if isinstance(exc, NotFoundError) and not isinstance(exc, _StoreFolderMissing) and "bundler ls" not in message:
        message += "; run `bundler ls` to see the refs and bundles in the store"
    return message


def run() -> None:
    """The console script: ``main``, then exit without tearing the interpreter down.

    Tearing down the modules costs ~6 ms per command, a tenth of a ``bundler unpack`` of a real
    cache. Nothing is lost by skipping it: by the time ``main`` returns, every file is closed,
    every temp file removed, every thread that writes joined (prefetching download threads may
    still be running; they only read), and log records were flushed as they were written; only
    stdout and stderr may still hold buffered text.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with the descriptor closed (`bundler ... >&-`)
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            sys.exit(code)  # the normal way out, which knows how to report a closed pipe
    os._exit(code)


if __name__ == "__main__":
    run()
