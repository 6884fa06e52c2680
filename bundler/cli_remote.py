"""``bundler push | pull | export | import | ls``: the commands that talk to a store.

Kept apart from cli.py so that the local commands (pack, unpack, verify, inspect) never import
the store layer, and through it boto3.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bundler.cli import EXIT_OK, _digest, _print_digest, _settings, add_raw_flag, atomic_output, relocator


def _store(args: argparse.Namespace):
    from bundler.stores import open_store

    settings = _settings(args)
    return open_store(args.remote, settings), settings


def _progress(args: argparse.Namespace, description: str):
    from bundler.progress import for_transfer

    return for_transfer(description, quiet=args.quiet)


def cmd_push(args: argparse.Namespace) -> int:
    from bundler import transfer

    store, settings = _store(args)
    with store:
        result = transfer.push(store, Path(args.dir), ref=args.ref, settings=settings, progress=_progress(args, "push"))
    print(result.digest)
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    from bundler import transfer

    store, settings = _store(args)
    with store:
        result = transfer.pull(
            store, Path(args.into), digest=args.digest, ref=args.ref, settings=settings,
            rewrite=relocator(args), progress=_progress(args, "pull"),
        )
    print(result.digest)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from bundler import transfer

    store, settings = _store(args)
    with store, atomic_output(args.output) as out:
        man = transfer.export(
            store, out, digest=args.digest, ref=args.ref, settings=settings, progress=_progress(args, "export")
        )
    _print_digest(man.digest, args.output)
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from bundler import transfer
    from bundler.errors import NotFoundError

    store, settings = _store(args)
    if not Path(args.file).is_file():
        raise NotFoundError(f"bundle file {args.file} does not exist")
    with store:
        result = transfer.import_file(
            store, args.file, ref=args.ref, settings=settings, progress=_progress(args, "import")
        )
    print(result.digest)
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    from bundler import refs, transfer
    from bundler.errors import NotFoundError
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


def add_commands(command) -> None:
    def remote(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--remote",
            help="store URL: s3://bucket/prefix[?endpoint=URL&addressing=path] or file:///path "
            "(default: $BUNDLER_REMOTE)",
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
