"""One exception family per concern, each carrying the CLI exit code that reports it.

Callers catch :class:`BundlerError` to catch everything of ours; the CLI maps ``exit_code`` to the
process status so scripts can tell a miss (3) from a hostile bundle (4) from a dead store (5).
Messages name the object, the key and the next step, because the person reading them is usually
looking at a CI log, not at our source.
"""

from __future__ import annotations


class BundlerError(Exception):
    """Base of every error kernel-bundler raises on purpose."""

    exit_code = 1


class ConfigError(BundlerError):
    """A setting, URL or argument that cannot be used as given."""

    exit_code = 2


# --- bundles -------------------------------------------------------------------------------------


class BundleError(BundlerError):
    """A bundle was rejected: corrupt, truncated, hostile, or not the one that was asked for.

    Nothing in the destination changes when this is raised.
    """

    exit_code = 4


class NotABundleError(BundleError):
    """The bytes are not a zstd-compressed tar stream (or stop before the tar ends)."""


class ManifestError(BundleError):
    """MANIFEST.json is missing, not first, malformed, or of an unknown format version."""


class UnsafeMemberError(BundleError):
    """A member would escape the destination or is not a plain file (link, device, FIFO, ...)."""


class IntegrityError(BundleError):
    """Bytes do not match what the manifest or the requested digest promised."""


class LimitExceededError(BundleError):
    """The bundle is larger, or has more members, than the configured limits allow."""


class SignatureError(BundleError):
    """A signature is missing or wrong while a signing key is configured."""


# --- stores --------------------------------------------------------------------------------------


class StoreError(BundlerError):
    """An object store failed to do what was asked."""

    exit_code = 5


class NotFoundError(StoreError):
    """The key (bundle, ref, autotune record) does not exist in the store.

    A miss, not a failure: it never trips a store's breaker.
    """

    exit_code = 3


class NotFoundOrDeniedError(NotFoundError):
    """S3 answered 403 to a read of one key: the key is missing, or these credentials may not read it.

    S3 gives a caller without s3:ListBucket a 403, not a 404, for a missing key, so for a job this
    is a miss like any other. Code that must not act on incomplete knowledge (``bundler gc``, which
    has just listed the key) treats it as the failure it then is.
    """


class StoreUnreachableError(StoreError):
    """The store did not answer within the configured time budget, or refused the connection."""


class DeadlineExceededError(StoreUnreachableError):
    """The operation's deadline (``BUNDLER_PULL_BUDGET``, ``--timeout``) passed while it waited."""


class ObjectReplacedError(StoreError):
    """The object was replaced by a new write while it was being read (S3 ``If-Match`` failed).

    Not a sick store: the key holds a whole, newer object, so reading it again from the start
    succeeds. Callers that stream a bundle restart the download on it instead of tripping a breaker.
    """


class AccessDeniedError(StoreError):
    """Credentials are missing, invalid, or lack permission for the action on the key."""


class NoSuchBucketError(StoreError):
    """The bucket in the remote URL does not exist at the endpoint."""


class LocalCacheError(BundlerError):
    """The local cache directory could not be written (full disk, permissions, read-only FS)."""


class LocalFileNotFoundError(BundlerError):
    """A local file named on the command line or by the caller does not exist.

    Not a :class:`StoreError`: a missing local file says nothing about the store's health, so it
    must never trip a store breaker. Exits 3 like any other "not found".
    """

    exit_code = 3
