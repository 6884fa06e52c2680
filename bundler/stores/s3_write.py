"""S3 uploads: one PutObject for small bodies, a parallel multipart upload for large ones.

Every upload carries a SHA256 checksum (per part for multipart) that the server verifies before it
stores anything, and a failed multipart upload is aborted, so nothing partial stays in the bucket.

Create-only writes (``if_absent``) send ``If-None-Match: *``: the server refuses with 412 (or 409
when two conditional writes collide) if the key exists, atomically. Servers without conditional
writes answer 501; for those we fall back to HEAD-then-write, which has a race window: two writers
can both see "absent" and both write. For content-addressed objects (bundles) both write the same
bytes, so the race is harmless; for other keys the last writer wins. Servers that silently ignore
the header behave the same way, and cannot be detected without an extra request per write.
One more corner: if a conditional write succeeds but its response is lost, botocore's retry gets
412 and we report False although this call created the object; the object is still whole.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, BinaryIO

from bundler.config import Settings
from bundler.errors import NotFoundError, StoreError
from bundler.progress import Progress
from bundler.stores.s3_client import S3Object
from bundler.stores.s3_errors import error_code
from bundler.stores.streams import read_up_to

logger = logging.getLogger(__name__)

CHECKSUM = "SHA256"
#: S3's limit on parts per upload; the part size grows to fit when the size is known.
MAX_PARTS = 10_000

# Endpoints that answered 501 to If-None-Match: later writes go straight to HEAD-then-write.
_no_conditional_writes: set[str] = set()
_no_conditional_lock = threading.Lock()


def upload(
    obj: S3Object, stream: BinaryIO, *, size: int | None, if_absent: bool, settings: Settings, progress: Progress
) -> bool:
    """Write ``stream`` to ``obj``; False when ``if_absent`` found the key already there."""
    threshold = settings.multipart_threshold
    progress.start(total=size)
    try:
        if size is not None and size > threshold:
            head = b""  # known to be large: stream it in parts, never buffer the threshold
        else:
            head = read_up_to(stream, threshold + 1)
            if len(head) <= threshold:
                return _put(obj, head, if_absent, progress)
        chunksize = max(settings.multipart_chunksize, -(-(size or 0) // MAX_PARTS))
        return _multipart(obj, _chunks(head, stream, chunksize), if_absent, settings, progress)
    finally:
        progress.close()


def _chunks(head: bytes, stream: BinaryIO, chunksize: int) -> Iterator[bytes]:
    """``head`` then the rest of ``stream``, cut into parts of exactly ``chunksize`` (last one shorter)."""
    offset = 0
    while len(head) - offset >= chunksize:
        yield head[offset : offset + chunksize]
        offset += chunksize
    rest = head[offset:]
    while True:
        part = rest + read_up_to(stream, chunksize - len(rest))
        rest = b""
        if part:
            yield part
        if len(part) < chunksize:
            return


# --- single PUT ----------------------------------------------------------------------------------


def _put(obj: S3Object, data: bytes, if_absent: bool, progress: Progress) -> bool:
    def put(**condition: str) -> None:
        obj.call("PutObject", Body=data, ChecksumAlgorithm=CHECKSUM, **condition)

    created = _conditional(obj, if_absent, put)
    if created:
        progress.update(len(data))
    return created


def _conditional(obj: S3Object, if_absent: bool, send: Any) -> bool:
    """Run ``send`` as a plain write, a conditional write, or HEAD-then-write; True if it wrote.

    ``send(**condition)`` performs the final request of the write (PutObject or
    CompleteMultipartUpload), with ``IfNoneMatch="*"`` in ``condition`` when asked.
    """
    if not if_absent:
        send()
        return True
    if obj.ctx.endpoint not in _no_conditional_writes:
        try:
            send(IfNoneMatch="*")
            return True
        except StoreError as exc:
            code, status = error_code(exc.__cause__) if exc.__cause__ else ("", 0)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or (not code and status in (409, 412)):
                return False
            if code != "NotImplemented" and status != 501:
                raise
            logger.warning(
                "%s does not support conditional writes (If-None-Match); create-only writes fall back "
                "to HEAD-then-write, which two concurrent writers can both pass",
                obj.ctx.endpoint,
            )
            with _no_conditional_lock:
                _no_conditional_writes.add(obj.ctx.endpoint)
    if _exists(obj):
        return False
    send()
    return True


def _exists(obj: S3Object) -> bool:
    try:
        obj.call("HeadObject")
    except NotFoundError:
        return False
    return True


# --- multipart -----------------------------------------------------------------------------------


def _multipart(obj: S3Object, parts: Iterator[bytes], if_absent: bool, settings: Settings, progress: Progress) -> bool:
    """Upload parts in parallel, complete, and abort on every path that did not complete."""
    upload_id = obj.call("CreateMultipartUpload", ChecksumAlgorithm=CHECKSUM)["UploadId"]
    completed = False
    try:
        done = _upload_parts(obj, upload_id, parts, settings, progress)

        def complete(**condition: str) -> None:
            obj.call("CompleteMultipartUpload", UploadId=upload_id, MultipartUpload={"Parts": done}, **condition)

        completed = _conditional(obj, if_absent, complete)
        return completed
    finally:
        if not completed:
            _abort(obj, upload_id)


def _upload_parts(
    obj: S3Object, upload_id: str, parts: Iterator[bytes], settings: Settings, progress: Progress
) -> list[dict[str, Any]]:
    """Send parts with at most ``max_concurrency`` in flight (so memory stays bounded); in part order."""
    concurrency = max(1, settings.max_concurrency)
    done: list[dict[str, Any]] = []
    pending: set[Future[dict[str, Any]]] = set()

    def send(number: int, data: bytes) -> dict[str, Any]:
        response = obj.call(
            "UploadPart", UploadId=upload_id, PartNumber=number, Body=data, ChecksumAlgorithm=CHECKSUM
        )
        progress.update(len(data))
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": response["ChecksumSHA256"]}

    def collect(futures: set[Future[dict[str, Any]]]) -> None:
        for future in futures:
            done.append(future.result())

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bundler-s3-put") as pool:
        try:
            for number, data in enumerate(parts, start=1):
                if len(pending) >= concurrency:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    collect(finished)
                pending.add(pool.submit(send, number, data))
            finished, pending = wait(pending)
            collect(finished)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return sorted(done, key=lambda part: part["PartNumber"])


def _abort(obj: S3Object, upload_id: str) -> None:
    """Best effort: a leftover upload is invisible to readers but costs storage until a lifecycle rule."""
    try:
        obj.call("AbortMultipartUpload", UploadId=upload_id)
    except StoreError as exc:
        logger.warning(
            "could not abort multipart upload %s of s3://%s/%s (%s); add an AbortIncompleteMultipartUpload "
            "lifecycle rule to the bucket to clean such leftovers",
            upload_id,
            obj.bucket,
            obj.key,
            exc,
        )
