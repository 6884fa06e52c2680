"""Move a process's warm caches without a bucket: one blob out, one blob in.

``save_artifacts()`` packs everything this process recorded (``bundler.recording``: autotune
records saved or hit, Triton kernel files compiled or found, bundles pulled) into one bundle, in
memory; ``load_artifacts(blob)`` verifies it and unpacks it into the local caches, relocating
Triton group files to this machine's cache path. The blob is an ordinary bundle, so it is
verified like one, ``tar --zstd -tf`` lists it, and ``bundler`` commands accept it as a file.

This is PyTorch's ``save_cache_artifacts()`` / ``load_cache_artifacts()`` for kernel-bundler's
caches: for air-gapped clusters and for handing a warm cache to a container image build.
"""

from __future__ import annotations

import io
import logging

from bundler import keys, recording
from bundler.bundle import archive
from bundler.bundle.manifest import Manifest
from bundler.config import Settings
from bundler.relocate import GroupFileRewriter

log = logging.getLogger(__name__)


def save_artifacts(*, settings: Settings | None = None) -> bytes:
    """A bundle (bytes) of every cache entry this process recorded; an empty bundle if none."""
    settings = settings if settings is not None else Settings.from_env()
    entries = recording.still_existing(recording.process_entries())
    out = io.BytesIO()
    result = archive.pack(entries, out, settings=settings, producer=keys.producer_facts())
    log.info("saved %d cache artifacts (%d bytes, bundle %s)", len(entries), result.compressed_size,
             result.digest[:12])
    return out.getvalue()


def load_artifacts(blob: bytes, *, settings: Settings | None = None) -> Manifest:
    """Unpack a ``save_artifacts()`` blob into the local caches; returns its verified manifest.

    Raises a ``BundleError`` (and changes nothing) if the blob is corrupt or hostile: unlike a
    fetch at job start, the caller handed us these bytes and should hear that they are bad.
    """
    settings = settings if settings is not None else Settings.from_env()
    manifest = archive.unpack(io.BytesIO(blob), recording.dest_mapping(settings), settings=settings,
                              rewrite=GroupFileRewriter())
    for record in manifest.files:
        recording.record_member(record.path, settings)
    log.info("loaded %d cache artifacts into %s and %s", len(manifest.files), settings.cache_dir,
             settings.triton_cache_dir)
    return manifest
