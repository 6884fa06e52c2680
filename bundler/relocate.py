"""Relocation of Triton's group files (``__grp__<kernel>.json``), with no Triton import.

It lives below the recording, session and artifacts layers, which all handle group files, so
that none of them imports from ``bundler.integrations``; the CLI uses it too.

Triton's ``FileCacheManager.put_group`` writes ``{"child_paths": {name: ABSOLUTE_PATH}}`` and its
``get_group`` treats a child path that does not exist as a miss (Triton 3.9 returns None; 3.6 drops
the child, and the kernel then recompiles because its ``.json`` metadata is gone). A cache copied
to another directory is therefore silently cold: on the H200 that cost 12.8 s instead of 0.5 s
(``shared/fixtures/README.md``).

So bundles never hold absolute paths:

* :func:`to_portable` (pack side) replaces every child path by its file name. Triton always writes
  a group's children into the group's own ``<cache>/<hash>/`` directory, so the name is enough.
* :class:`GroupFileRewriter` (unpack side, the ``archive.unpack`` ``rewrite=`` hook) turns names back
  into absolute paths under the directory the group file is being written to.

Both steps rebuild child paths from a bare file name inside the group's own directory, so a
hostile group file cannot point Triton at a file elsewhere on the machine; a child whose name is
unusable makes the whole group invalid, which Triton reads as a miss and recompiles. Bytes that
are not a group file Triton could have written (not JSON, nested absurdly deep, or over
:data:`MAX_GROUP_BYTES`) are left as they are, which Triton also reads as a miss.

``RemoteCacheManager`` group files hold a *list* of names, not paths; they need no rewriting and
pass through unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

GROUP_PREFIX = "__grp__"

#: Real group files name a handful of children (well under 1 KiB); anything much larger is not one
#: and is not worth parsing (a hostile one could cost seconds of CPU or memory).
MAX_GROUP_BYTES = 1 << 20


def is_group_file(name: str) -> bool:
    """True for a Triton group file name or a path ending in one (``.../__grp__add.json``).

    Asked of every member an unpack writes, so the cheap test (the extension) comes first.
    """
    if not name.endswith(".json"):
        return False
    if os.sep != "/":
        name = name.replace(os.sep, "/")
    return name.rpartition("/")[2].startswith(GROUP_PREFIX)


def _child_name(path: object) -> str | None:
    if not isinstance(path, str):
        return None
    if "/" not in path and "\\" not in path:  # a bundle's own form: a bare name (nearly every call)
        return None if path in ("", ".", "..") else path
    path = path.replace("\\", "/")
    if ".." in path.split("/"):
        return None  # not something Triton writes; normpath would quietly turn "a/b/.." into "a"
    name = posixpath.basename(posixpath.normpath(path))
    return None if name in ("", ".", "/") else name


def _rewrite(data: bytes, place: Callable[[str], str]) -> bytes:
    if len(data) > MAX_GROUP_BYTES:
        log.warning("group file of %d bytes is too large to be Triton's; left as is (a cache miss)", len(data))
        return data
    try:
        group = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the stack
        log.debug("group file is not JSON; left as is (Triton treats it as a miss)")
        return data
    children = group.get("child_paths") if isinstance(group, dict) else None
    if not isinstance(children, dict):
        return data  # a RemoteCacheManager list of names, or nothing to relocate
    names = {key: _child_name(path) for key, path in children.items()}
    if any(name is None for name in names.values()):
        log.warning("Triton group file has an unusable child path; it will read as a cache miss")
        group["child_paths"] = None
    else:
        group["child_paths"] = {key: place(name) for key, name in names.items()}
    return json.dumps(group, sort_keys=True).encode("utf-8")


def to_portable(data: bytes) -> bytes:
    """Group file bytes with each child path reduced to its file name (what a bundle stores).

    Sorted keys make the bytes depend only on the group's content, so the same kernels give the
    same bundle digest whatever directory they were compiled in.
    """
    return _rewrite(data, lambda name: name)


def to_local(data: bytes, directory: str | Path) -> bytes:
    """Group file bytes with each child placed in ``directory`` (where the group file lives)."""
    folder = os.fspath(directory)  # once per group file, not per child: 180 group files an unpack
    return _rewrite(data, lambda name: os.path.join(folder, name))


class GroupFileRewriter:
    """The ``archive.unpack`` rewrite hook that makes unpacked Triton kernels findable.

    ``unpack`` verifies each member against the manifest first, then hands the group files this
    object wants to ``__call__`` with their final path, before the atomic move into place.
    """

    def wants(self, name: str) -> bool:
        return is_group_file(name)

    def __call__(self, name: str, data: bytes, target: Path) -> bytes:
        return to_local(data, os.path.dirname(target))
