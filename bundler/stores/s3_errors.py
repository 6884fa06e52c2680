"""Turn botocore's exceptions into ours, with a message that says what to do next.

botocore reports the same user mistake many ways (a 403 with ``InvalidAccessKeyId``, a
``NoCredentialsError`` before any request, a ``SignatureDoesNotMatch``); the person reading a CI log
needs one sentence naming the bucket, the key, the endpoint and the setting to fix. botocore is
imported inside the functions so this module stays import-cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator

from bundler.config import Settings
from bundler.errors import (
    AccessDeniedError,
    NoSuchBucketError,
    NotFoundError,
    NotFoundOrDeniedError,
    ObjectReplacedError,
    StoreError,
    StoreUnreachableError,
)

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "ExpiredTokenException",
}
_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
#: What a 403 to a read of one key looks like; HEAD has no body, so botocore's code is the status.
_FORBIDDEN_CODES = {"AccessDenied", "Forbidden", "403", ""}
_KEY_READS = {"HeadObject", "GetObject"}
_MISSING_OR_DENIED = (
    "S3 answers 403 for a missing key to callers without s3:ListBucket; if the object exists, allow "
    "s3:GetObject on it for these credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID)"
)

logger = logging.getLogger(__name__)
_HOW_TO_CONFIGURE = (
    "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
    "credentials), or AWS_PROFILE naming a profile in ~/.aws/credentials"
)


class ForbiddenAsMissing:
    """Warns once per store that a 403 to a read was taken for a missing key.

    Why: S3 answers 403, not 404, to a HEAD or GET of a missing key when the caller lacks
    s3:ListBucket, so every miss of a reader with a tight policy looks like "denied". Reading it as
    a miss keeps misses cheap (no breaker trips, pushes proceed), but a real permission problem
    would then pass as a cold cache; one warning per store says so without flooding the log.
    """

    def __init__(self, where: str) -> None:
        self._where = where
        self._lock = threading.Lock()
        self._warned = False

    def note(self, action: str, target: str) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        logger.warning(
            "%s: %s %s answered 403, read as a missing key: %s. Later 403s to reads from this store are "
            "read the same way without another warning; if cached objects keep missing, check that policy",
            self._where, action, target, _MISSING_OR_DENIED,
        )


@dataclasses.dataclass(frozen=True)
class ErrorContext:
    """Where a request went, for messages: the bucket, the endpoint and the timeouts in force.

    ``forbidden_as_missing`` is the store's warn-once for 403s read as misses (None: no warning).
    """

    bucket: str
    endpoint: str
    settings: Settings
    forbidden_as_missing: ForbiddenAsMissing | None = dataclasses.field(default=None, compare=False)

    def timeouts(self) -> str:
        s = self.settings
        return (
            f"BUNDLER_CONNECT_TIMEOUT={s.connect_timeout:g}s, BUNDLER_READ_TIMEOUT={s.read_timeout:g}s, "
            f"BUNDLER_MAX_ATTEMPTS={s.max_attempts}"
        )


def error_code(exc: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a ClientError; ("", 0) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code, status


def is_transient_stream_error(exc: BaseException) -> bool:
    """A body that broke off mid-transfer (reset, truncation, read timeout): worth re-requesting."""
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    transient = (
        ResponseStreamingError,
        IncompleteReadError,
        ReadTimeoutError,
        ConnectionClosedError,
        Urllib3Error,
        ConnectionError,
    )
    return isinstance(exc, transient)


def to_store_error(exc: BaseException, action: str, key: str | None, ctx: ErrorContext) -> StoreError | None:
    """Our exception for ``exc`` raised by ``action`` (``GetObject``, ...) on ``key``; None if not botocore's."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        CredentialRetrievalError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    where = f"s3://{ctx.bucket}/{key}" if key is not None else f"s3://{ctx.bucket}"
    target = f"{where} at {ctx.endpoint}"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return AccessDeniedError(f"{action} {target}: no usable AWS credentials ({exc}); {_HOW_TO_CONFIGURE}")
    if isinstance(exc, (EndpointConnectionError, ReadTimeoutError, ConnectionClosedError)) or (
        is_transient_stream_error(exc) and not isinstance(exc, ClientError)
    ):
        return StoreUnreachableError(
            f"{action} {target}: the store did not answer ({exc}) with {ctx.timeouts()}; check the "
            "endpoint URL and the network, or raise those settings for a slow link"
        )
    if isinstance(exc, ClientError):
        return _from_client_error(exc, action, key, target, ctx)
    if isinstance(exc, BotoCoreError):
        return StoreError(f"{action} {target} failed: {exc}")
    return None


def _from_client_error(
    exc: BaseException, action: str, key: str | None, target: str, ctx: ErrorContext
) -> StoreError:
    code, status = error_code(exc)
    message = str(getattr(exc, "response", {}).get("Error", {}).get("Message", "")) or code or str(status)
    if code == "NoSuchBucket":
        return NoSuchBucketError(
            f"bucket {ctx.bucket!r} does not exist at {ctx.endpoint}; create it or fix the bucket "
            "in the remote URL (--remote / BUNDLER_REMOTE)"
        )
    if code in _CREDENTIAL_CODES:
        return AccessDeniedError(
            f"{action} {target}: the credentials were rejected ({code}: {message}); {_HOW_TO_CONFIGURE}"
        )
    if action in _KEY_READS and code in _FORBIDDEN_CODES and (status == 403 or code):
        if ctx.forbidden_as_missing is not None:
            ctx.forbidden_as_missing.note(action, target)
        return NotFoundOrDeniedError(
            f"{key!r} not found in s3://{ctx.bucket} at {ctx.endpoint} (403: the key is missing, or these "
            f"credentials may not read it); {_MISSING_OR_DENIED}"
        )
    if code in ("AccessDenied", "AllAccessDisabled", "Forbidden") or status == 403:
        return AccessDeniedError(
            f"{action} {target}: access denied ({code or status}); check that these credentials "
            f"(AWS_PROFILE / AWS_ACCESS_KEY_ID) are allowed {_needed(action, ctx.bucket)} in the IAM or "
            "bucket policy"
        )
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException") or (
        status == 301
    ):
        region = getattr(exc, "response", {}).get("Error", {}).get("Region") or "the bucket's region"
        return StoreError(
            f"{action} {target}: the bucket lives in another region ({code or status}: {message}); add "
            f"?region={region} to the remote URL or set AWS_DEFAULT_REGION"
        )
    if code in _NOT_FOUND_CODES or status == 404:
        return NotFoundError(f"{key!r} not found in s3://{ctx.bucket} at {ctx.endpoint}")
    if code in _THROTTLE_CODES or status == 503:
        return StoreUnreachableError(
            f"{action} {target}: the store is throttling requests ({code or status}) and still was after "
            f"{ctx.settings.max_attempts} attempts; retry later, spread the load, or set "
            "BUNDLER_RETRY_MODE=adaptive / raise BUNDLER_MAX_ATTEMPTS"
        )
    if code == "PreconditionFailed" and action == "GetObject":
        return ObjectReplacedError(
            f"{action} {target}: the object was replaced while it was being read; retry the read"
        )
    if status >= 500:
        return StoreError(
            f"{action} {target}: server error {status} {code}: {message} after {ctx.settings.max_attempts} "
            "attempts; retry later or check the server's health"
        )
    return StoreError(f"{action} {target} failed: {code or status}: {message}")


def _needed(action: str, bucket: str) -> str:
    """The permission ``action`` needs, and on what: listing is granted on the bucket, not on keys."""
    permission = _permission(action)
    if permission in ("ListBucket", "ListBucketMultipartUploads"):
        return (f"s3:{permission} on the bucket (arn:aws:s3:::{bucket}, with the store's prefix in its "
                "s3:prefix condition)")
    return f"s3:{permission} on the bucket and key"


def _permission(action: str) -> str:
    """The IAM action behind an API call (multipart pieces need PutObject; HEAD needs GetObject)."""
    return {
        "HeadObject": "GetObject",
        "ListObjectsV2": "ListBucket",
        "CreateMultipartUpload": "PutObject",
        "UploadPart": "PutObject",
        "CompleteMultipartUpload": "PutObject",
        "AbortMultipartUpload": "AbortMultipartUpload",
        "ListMultipartUploads": "ListBucketMultipartUploads",
    }.get(action, action)


@contextlib.contextmanager
def translated(action: str, key: str | None, ctx: ErrorContext) -> Iterator[None]:
    """Run a block of S3 calls, re-raising botocore failures as our StoreError family."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        mapped = to_store_error(exc, action, key, ctx)
        if mapped is None:
            raise
        raise mapped from exc
