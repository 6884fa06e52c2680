"""The bundle format: bytes and files only, no network.

``archive`` is the public face (pack, unpack, verify, read_manifest); ``manifest`` the table of
contents and the digest; ``tarformat`` the few tar headers; ``reader`` and ``prefetch`` the strict
streaming reader and its worker thread; ``writer`` deterministic packing; ``placement`` staging
and atomic, link-proof placement into a cache directory.
"""
