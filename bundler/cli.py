"""The ``bundler`` command: parsing and printing only; the work happens in the layers below.

Exit codes are a contract scripts rely on: 0 success, 2 usage error, 3 not found, 4 integrity or
safety rejection, 5 storage unreachable or denied, 1 anything else. Each command imports what it
needs when it runs, so ``bundler unpack`` never imports the store layer, let alone botocore (a test
checks the imported modules).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from bundler import __version__
from bundler.errors import BundlerError, ConfigError, LocalFileNotFoundError

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
    except OSError as exc:
        raise BundlerError(f"cannot open {path}: {exc.strerror or exc}") from None
    with f:
        yield f


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` complete or not at all (``-``: stdout)."""
    if path == "-":
        yield sys.stdout.buffer
        return
    if not Path(path).parent.is_dir():
        raise BundlerError(f"cannot write {path}: folder {Path(path).parent} does not exist; create it first")
    from bundler.fileio import atomic_writer

    with atomic_writer(path) as f:
        yield f


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
    from bundler.bundle import archive
    from bundler.keys import producer_facts

    with atomic_output(args.output) as out:
        result = archive.pack(Path(args.dir), out, settings=_settings(args), producer=producer_facts())
    _print_digest(result.digest, args.output)
    log.info("packed %d files (%d bytes) into %s (%d bytes)", len(result.manifest.files),
             result.manifest.total_size, args.output, result.compressed_size)
    return EXIT_OK


def cmd_unpack(args: argparse.Namespace) -> int:
    from bundler.bundle import archive

    with _open_input(args.file) as f:
        man = archive.unpack(
            f, Path(args.into), expected_digest=args.digest, settings=_settings(args), rewrite=relocator(args)
        )
    log.info("unpacked %d files (%d bytes) into %s", len(man.files), man.total_size, args.into)
    print(man.digest)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from bundler.bundle import archive

    with _open_input(args.file) as f:
        man = archive.verify(f, expected_digest=args.digest, settings=_settings(args))
    print(f"ok {man.digest} {len(man.files)} files {man.total_size} bytes")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from bundler.bundle import archive

    with _open_input(args.file) as f:
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

    store, settings = _store(args)
    with store:
        result = transfer.push(store, Path(args.dir), ref=args.ref, settings=settings, progress=_progress(args, "push"))
    print(result.digest)
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    from bundler.remote import transfer

    store, settings = _store(args)
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
    with store, atomic_output(args.output) as out:
        man = transfer.export(
            store, out, digest=args.digest, ref=args.ref, settings=settings, progress=_progress(args, "export")
        )
    _print_digest(man.digest, args.output)
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from bundler.remote import transfer

    store, settings = _store(args)
    if not Path(args.file).is_file():
        raise LocalFileNotFoundError(f"bundle file {args.file} does not exist")
    with store:
        result = transfer.import_file(
            store, args.file, ref=args.ref, settings=settings, progress=_progress(args, "import")
        )
    print(result.digest)
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    from bundler.errors import NotFoundError
    from bundler.remote import refs, transfer
    from bundler.stores import LocalStore

    store, settings = _store(args)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        # Like S3's NoSuchBucket: a typo in the path must not look like an empty store.
        raise NotFoundError(f"store folder {store.root} does not exist; check --remote / BUNDLER_REMOTE")
    with store:
        listing = transfer.list_remote(store)
        ref_docs = []
        for name, info in listing.refs:
            try:
                ref = refs.read_ref(store, name, settings)
                target = {"digest": ref.digest, "bundle_size": ref.size}
            except Exception as exc:  # a bad ref is shown as such, not fatal to the listing
                target = {"error": str(exc)}
            ref_docs.append({"name": name, "modified": _date(info), **target})
    bundles = [{"digest": d, "size": i.size, "modified": _date(i)} for d, i in listing.bundles]
    if args.json:
        print(json.dumps({"refs": ref_docs, "bundles": bundles}, indent=2))
        return EXIT_OK
    print(f"refs ({len(ref_docs)}):")
    for doc in ref_docs:
        print(f"  {doc['name']:<40} -> {doc.get('digest', doc.get('error'))}  {doc['modified']}")
    print(f"bundles ({len(bundles)}):")
    for doc in bundles:
        print(f"  {doc['digest']}  {doc['size']:>12}  {doc['modified']}")
    return EXIT_OK


def _date(info) -> str | None:
    return info.modified.isoformat(timespec="seconds") if info.modified else None


def cmd_keygen(args: argparse.Namespace) -> int:
    from bundler.remote import signing

    try:
        public = signing.generate_ed25519(args.path)
    except FileExistsError as exc:
        raise ConfigError(f"{exc}; a key in use must not be replaced silently") from None
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bundler",
        description="Pack, verify and ship GPU compile caches as content-addressed bundles.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kernel-bundler {__version__}")
    _add_output_flags(parser, verbose=0, quiet=False)
    # A subcommand's flags default to SUPPRESS so they do not overwrite what came before it.
    common = argparse.ArgumentParser(add_help=False, formatter_class=_HelpFormatter)
    _add_output_flags(common, verbose=argparse.SUPPRESS, quiet=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog="bundler")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("pack", cmd_pack, "pack a cache directory into a bundle file; prints its digest")
    p.add_argument("dir", help="directory to pack")
    p.add_argument("-o", "--output", required=True, help="bundle file to write ('-' for stdout)")
    p.add_argument("--level", type=int, help="zstd level (default BUNDLER_ZSTD_LEVEL or 3)")

    p = command("unpack", cmd_unpack, "verify a bundle file and extract it into a directory")
    p.add_argument("file", help="bundle file ('-' for stdin)")
    p.add_argument("--into", required=True, help="destination directory")
    p.add_argument("--digest", type=_digest, help="reject the bundle unless it has this digest")
    add_raw_flag(p)

    p = command("verify", cmd_verify, "check a bundle file completely without extracting it")
    p.add_argument("file", help="bundle file ('-' for stdin)")
    p.add_argument("--digest", type=_digest, help="reject the bundle unless it has this digest")

    p = command("inspect", cmd_inspect, "print a bundle's manifest summary")
    p.add_argument("file", help="bundle file ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.add_argument("--files", action="store_true", help="list every file")

    def remote(p: argparse.ArgumentParser) -> None:
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

    def target(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("digest", nargs="?", type=_digest, help="bundle digest (64 hex characters)")
        group.add_argument("--ref", help="ref name pointing at the bundle")

    p = command("push", cmd_push, "pack a directory and upload it; prints the digest")
    p.add_argument("dir", help="directory to pack")
    p.add_argument("--ref", help="point this ref name at the bundle")
    remote(p)

    p = command("pull", cmd_pull, "download, verify and unpack a bundle into a directory")
    target(p)
    p.add_argument("--into", required=True, help="destination directory")
    add_raw_flag(p)
    remote(p)

    p = command("export", cmd_export, "save a bundle from the store to a file, for offline transfer")
    target(p)
    p.add_argument("-o", "--output", required=True, help="file to write ('-' for stdout)")
    remote(p)

    p = command("import", cmd_import, "verify a bundle file and upload it to the store")
    p.add_argument("file", help="bundle file")
    p.add_argument("--ref", help="point this ref name at the bundle")
    remote(p)

    p = command("ls", cmd_ls, "list refs and bundles in the store")
    p.add_argument("--json", action="store_true", help="print JSON")
    remote(p)

    p = command("keygen", cmd_keygen, "write a new Ed25519 signing key pair (PATH and PATH.pub)")
    p.add_argument("path", help="where to write the private key (mode 0600); the public key goes to PATH.pub")
    return parser


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


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bundler: %(levelname)s: %(message)s"))
    root = logging.getLogger("bundler")
    root.addHandler(handler)
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return _within_timeout(args)
    except BundlerError as exc:
        print(f"bundler: error: {exc}", file=sys.stderr)
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
