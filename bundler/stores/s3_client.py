"""One shared botocore S3 client per process and configuration.

Why shared: a client owns a connection pool and an endpoint resolver; building one costs tens of
milliseconds and a new TLS handshake per connection, so every store and thread with the same
configuration uses the same client (clients are thread-safe; boto3 sessions are not, so a session
lives only for the duration of one client's construction, under the lock).

Why rebuilt after fork: a forked child must not share its parent's sockets, and the lock may have
been held by a parent thread at fork time. ``os.register_at_fork`` resets both in the child; the
pid check covers interpreters where that hook cannot run.

botocore is imported here, inside :func:`_build`, so importing kernel-bundler never pays for it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from bundler import __version__
from bundler.config import Settings
from bundler.stores.s3_errors import ErrorContext, translated


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Everything that makes two clients different; the cache key.

    ``endpoint_url`` / ``region`` of None leave the choice to the AWS configuration chain
    (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``, profiles, ``~/.aws/config``).
    ``addressing`` is ``"path"``, ``"virtual"`` or None (botocore's automatic choice).
    """

    endpoint_url: str | None
    region: str | None
    addressing: str | None
    connect_timeout: float
    read_timeout: float
    max_attempts: int
    retry_mode: str
    max_pool_connections: int

    @classmethod
    def make(
        cls, settings: Settings, *, endpoint_url: str | None, region: str | None, addressing: str | None
    ) -> ClientConfig:
        return cls(
            endpoint_url=endpoint_url,
            region=region,
            addressing=addressing,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_attempts=settings.max_attempts,
            retry_mode=settings.retry_mode,
            # Every ranged-GET or part-upload worker needs its own connection, plus one spare for
            # the caller's own requests (HEAD, complete, abort) so they never queue behind workers.
            max_pool_connections=max(10, settings.max_concurrency + 1),
        )


_lock = threading.Lock()
_clients: dict[ClientConfig, Any] = {}
_pid = os.getpid()


def _reset_after_fork() -> None:
    global _lock, _pid
    _lock = threading.Lock()
    _clients.clear()
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def get_client(config: ClientConfig) -> Any:
    """The process-wide client for ``config``, built on first use."""
    if _pid != os.getpid():
        _reset_after_fork()
    with _lock:
        client = _clients.get(config)
        if client is None:
            client = _clients[config] = _build(config)
        return client


def clear_clients() -> None:
    """Forget every cached client, e.g. after credentials in the environment changed."""
    with _lock:
        _clients.clear()


def _build(config: ClientConfig) -> Any:
    # botocore alone: boto3 adds s3transfer and resource machinery we never use, ~50 ms per
    # process (measured in benchmarks/bench_pull.py's profile). botocore's session resolves the
    # same credential chain, profiles, region and AWS_ENDPOINT_URL* settings.
    import botocore.session
    from botocore.config import Config

    botocore_config = Config(
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        # total_max_attempts counts the first request; Config's "max_attempts" would count retries only.
        retries={"total_max_attempts": config.max_attempts, "mode": config.retry_mode},
        max_pool_connections=config.max_pool_connections,
        s3={"addressing_style": config.addressing} if config.addressing else None,
        # Uploads name their checksum (SHA256) explicitly; we do not want botocore's default
        # CRC32 on every request, which some S3-compatible servers reject. Reads are verified
        # one level up, against the content hash in the key, and ranged GETs cannot carry a
        # whole-object checksum anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_appid=f"kernel-bundler-{__version__}",
    )
    session = botocore.session.get_session()
    return session.create_client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region, config=botocore_config
    )


@dataclasses.dataclass(frozen=True)
class S3Object:
    """One object addressed through one client: what every request and every error message needs."""

    client: Any
    bucket: str
    key: str
    ctx: ErrorContext

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        """Run an S3 API operation (``"GetObject"``, ...) on this object; failures come out as StoreError."""
        from botocore import xform_name

        with translated(operation, self.key, self.ctx):
            return getattr(self.client, xform_name(operation))(Bucket=self.bucket, Key=self.key, **params)
