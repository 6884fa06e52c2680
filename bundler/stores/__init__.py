"""Object stores: ``open_store(url)`` picks the backend from the URL.

=====================================================  ==============================================
URL                                                    store
=====================================================  ==============================================
``s3://bucket/prefix``                                 :class:`~bundler.stores.s3.S3Store` (AWS chain)
``s3://bucket/prefix?endpoint=http://127.0.0.1:9000``  S3-compatible server at that endpoint
``  &addressing=path&region=us-east-1``                path-style bucket addressing, signing region
``file:///abs/path`` or ``/abs/path`` or ``rel/path``  :class:`~bundler.stores.local.LocalStore`
=====================================================  ==============================================

The S3 query parameters are documented in :mod:`bundler.stores.s3`. This package stays
import-cheap: boto3 loads only when an S3 store makes its first request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bundler.config import Settings, redact_url, refuse_credentials
from bundler.errors import ConfigError
from bundler.stores.base import ObjectInfo, Store
from bundler.stores.local import LocalStore

if TYPE_CHECKING:  # pragma: no cover
    from bundler.stores.s3 import S3Store

__all__ = ["LocalStore", "ObjectInfo", "S3Store", "Store", "open_store"]


def open_store(url: str | None = None, settings: Settings | None = None) -> Store:
    """The store for ``url``, or for ``settings.remote`` (``BUNDLER_REMOTE``) when ``url`` is None."""
    settings = settings or Settings.from_env()
    url = url or settings.remote
    if not url:
        raise ConfigError(
            "no store configured: pass --remote URL or set BUNDLER_REMOTE "
            "(s3://bucket/prefix, or file:///path for a local folder)"
        )
    refuse_credentials(url)
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        from bundler.stores.s3 import S3Store

        return S3Store.from_url(url, settings)
    if scheme in ("", "file"):
        return LocalStore.from_url(url)
    raise ConfigError(
        f"unsupported store URL {redact_url(url)!r} (scheme {scheme!r}): use s3://bucket/prefix, file:///path or a plain path"
    )


def __getattr__(name: str) -> Any:
    # S3Store lives behind a lazy attribute so `import bundler.stores` never imports its module.
    if name == "S3Store":
        from bundler.stores.s3 import S3Store

        return S3Store
    raise AttributeError(f"module 'bundler.stores' has no attribute {name!r}")
