"""The Store contract on S3 and S3-compatible servers (MinIO, Ceph RGW, R2, moto, ...).

URL form::

    s3://BUCKET[/PREFIX][?endpoint=URL&addressing=path|virtual|auto&region=NAME]

``endpoint``
    The server's base URL, e.g. ``http://127.0.0.1:9000`` for a local MinIO. Without it the AWS
    configuration chain decides (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, profile
    ``endpoint_url``, else AWS itself).
``addressing``
    ``path`` puts the bucket in the URL path (``http://host/bucket/key``), which most self-hosted
    servers need; ``virtual`` puts it in the host name; ``auto`` (default) lets botocore choose.
``region``
    The signing region; default from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile.

Credentials always come from the AWS chain (environment, ``AWS_PROFILE``, SSO, instance role), never
from the URL, so URLs can be logged: a URL with ``user:secret@`` in it is refused (without echoing
the secret). A parameter given with an empty value is refused too, rather than silently meaning
"the AWS default". Timeouts, retries and transfer sizes come from
:class:`~bundler.config.Settings`.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from bundler.config import Settings, redact_url, refuse_credentials
from bundler.errors import ConfigError, NotFoundError
from bundler.progress import NULL_PROGRESS, Progress
from bundler.stores import s3_read, s3_write
from bundler.stores.base import ObjectInfo, Store
from bundler.stores.s3_client import ClientConfig, S3Object, get_client
from bundler.stores.s3_errors import ErrorContext, ForbiddenAsMissing, translated

logger = logging.getLogger(__name__)

_QUERY_KEYS = {"endpoint", "addressing", "region"}
_ADDRESSING = {"path", "virtual", "auto"}
#: botocore's own rule for bucket names (it refuses anything else at the first request).
_BUCKET = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


class S3Store(Store):
    """Objects under ``prefix/`` in ``bucket``; the botocore client is shared and built on first use."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing: str | None = None,
        settings: Settings | None = None,
        url: str | None = None,
    ) -> None:
        if not bucket:
            raise ConfigError("an S3 store needs a bucket: use s3://BUCKET/PREFIX")
        if not _BUCKET.match(bucket):
            refuse_credentials(f"s3://{bucket}/")
            shown = "the bucket part of the URL" if ":" in bucket or "@" in bucket else repr(bucket)  # a secret?
            raise ConfigError(
                f"{shown} is not a bucket name: use letters, digits, '.', '-' and '_' (s3://BUCKET/PREFIX); "
                "a server goes in ?endpoint=http://host:port"
            )
        if addressing not in (None, *_ADDRESSING):
            raise ConfigError(f"addressing={addressing!r}: use path, virtual or auto")
        if endpoint_url is not None:
            _check_endpoint(endpoint_url)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings or Settings.from_env()
        self.url = url or f"s3://{bucket}/{self.prefix}"
        self._forbidden_as_missing = ForbiddenAsMissing(self.url)
        self._config = ClientConfig.make(
            self.settings,
            endpoint_url=endpoint_url or None,
            region=region or None,
            addressing=None if addressing == "auto" else addressing,
        )

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None) -> S3Store:
        """Parse ``s3://bucket/prefix?endpoint=...&addressing=...&region=...`` (see the module docs)."""
        refuse_credentials(url)
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - _QUERY_KEYS
        if parts.scheme != "s3" or unknown or parts.fragment:
            raise ConfigError(
                f"{redact_url(url)!r} is not a valid S3 store URL"
                + (f" (unknown parameter {', '.join(sorted(unknown))})" if unknown else "")
                + ": use s3://BUCKET/PREFIX with optional ?endpoint=URL&addressing=path|virtual|auto&region=NAME"
            )
        single = {name: values[-1] for name, values in query.items()}
        blank = sorted(name for name, value in single.items() if not value.strip())
        if blank:
            raise ConfigError(
                f"{url!r} gives {', '.join(f'{name}=' for name in blank)} with no value, which would silently fall "
                "back to the default (for endpoint=, AWS itself instead of your server); give a value or leave the "
                "parameter out"
            )
        return cls(
            parts.netloc,
            parts.path,
            endpoint_url=single.get("endpoint"),
            region=single.get("region"),
            addressing=single.get("addressing"),
            settings=settings,
            url=url,
        )

    # --- plumbing ------------------------------------------------------------------------------

    @property
    def _client(self) -> Any:
        try:
            return get_client(self._config)
        except ValueError as exc:  # botocore's verdict on a malformed endpoint URL
            raise ConfigError(
                f"cannot use endpoint {self._config.endpoint_url!r} for {self.url}: {exc}; "
                "write it as http(s)://host[:port]"
            ) from None
        except Exception as exc:
            from botocore.exceptions import BotoCoreError

            if isinstance(exc, BotoCoreError):  # e.g. ProfileNotFound for a bad AWS_PROFILE
                raise ConfigError(
                    f"cannot configure S3 access for {self.url}: {exc}; check AWS_PROFILE and ~/.aws/config"
                ) from None
            raise

    @property
    def _ctx(self) -> ErrorContext:
        endpoint = self._config.endpoint_url or self._client.meta.endpoint_url
        return ErrorContext(bucket=self.bucket, endpoint=endpoint, settings=self.settings,
                            forbidden_as_missing=self._forbidden_as_missing)

    def _full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _object(self, key: str) -> S3Object:
        return S3Object(client=self._client, bucket=self.bucket, key=self._full_key(key), ctx=self._ctx)

    def connect(self) -> None:
        """Build the client now (botocore's import, its models), ahead of the first request."""
        self._client  # noqa: B018 - the property builds and caches the client

    # --- the five primitives -------------------------------------------------------------------

    def open_read(self, key: str, *, progress: Progress = NULL_PROGRESS) -> BinaryIO:
        return s3_read.open_object(self._object(key), self.settings, progress)

    def write(
        self,
        key: str,
        stream: BinaryIO,
        *,
        size: int | None = None,
        if_absent: bool = False,
        progress: Progress = NULL_PROGRESS,
    ) -> bool:
        return s3_write.upload(
            self._object(key), stream, size=size, if_absent=if_absent, settings=self.settings, progress=progress
        )

    def head(self, key: str) -> ObjectInfo | None:
        """None for a missing key. S3 answers HEAD without a body, so a missing bucket also reads as None,
        and so does a 403, which is S3's answer for a missing key to callers without s3:ListBucket."""
        try:
            response = self._object(key).call("HeadObject")
        except NotFoundError:
            return None
        return ObjectInfo(key=key, size=int(response["ContentLength"]), modified=response.get("LastModified"))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        with translated("ListObjectsV2", root + prefix, self._ctx):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                for item in page.get("Contents", ()):
                    yield ObjectInfo(key=item["Key"][len(root) :], size=int(item["Size"]), modified=item["LastModified"])

    def delete(self, key: str) -> None:
        self._object(key).call("DeleteObject")

    # --- housekeeping --------------------------------------------------------------------------

    def abort_stale_uploads(self, older_than: float | dt.timedelta, *, dry_run: bool = False) -> list[str]:
        """Abort multipart uploads under this store's prefix started more than ``older_than`` ago.

        Why: an upload whose process was killed (OOM, SIGKILL, a lost node) never completes or
        aborts; its parts are invisible to readers but billed until a bucket lifecycle rule
        (``AbortIncompleteMultipartUpload``) removes them, and many buckets have none. ``bundler gc``
        calls this. Keep ``older_than`` well above the longest upload (an hour is plenty): a
        younger upload may be a live push that aborting would fail. ``older_than`` is seconds or a
        timedelta. Returns the keys (relative to the store) of the uploads aborted; an upload
        that completed or was aborted by someone else meanwhile is skipped. ``dry_run`` aborts
        nothing and returns the keys of the uploads it would abort (what ``bundler gc`` without
        ``--yes`` shows).
        """
        age = older_than if isinstance(older_than, dt.timedelta) else dt.timedelta(seconds=older_than)
        if age < dt.timedelta(0):
            raise ConfigError(f"older_than={older_than!r}: an age cannot be negative")
        cutoff = dt.datetime.now(dt.timezone.utc) - age
        root = f"{self.prefix}/" if self.prefix else ""
        stale: list[tuple[str, str]] = []
        paginator = self._client.get_paginator("list_multipart_uploads")
        with translated("ListMultipartUploads", root, self._ctx):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
                for upload in page.get("Uploads", ()):
                    if upload["Key"].startswith(root) and upload["Initiated"] <= cutoff:
                        stale.append((upload["Key"][len(root) :], upload["UploadId"]))
        if dry_run:
            return [key for key, _ in stale]
        aborted = []
        for key, upload_id in stale:
            try:
                self._object(key).call("AbortMultipartUpload", UploadId=upload_id)
            except NotFoundError:
                continue  # completed or aborted meanwhile
            logger.info("aborted multipart upload %s of %s in %s, left by an interrupted push",
                        upload_id, key, self.url)
            aborted.append(key)
        return aborted


def _check_endpoint(endpoint: str) -> None:
    """``?endpoint=`` must be ``http(s)://host[:port]``; caught here, before any request, with the fix."""
    refuse_credentials(endpoint, "the endpoint")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"endpoint={endpoint!r} is not a server URL: write it as http(s)://host[:port], e.g. "
            "?endpoint=http://127.0.0.1:9000"
        )
