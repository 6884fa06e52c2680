"""Hooks into compilers' own caches. Each submodule imports its compiler; this package does not.

* ``bundler.integrations.triton``: cached ``triton.autotune`` and kernel-cache capture (public).
* ``triton_cache``: the recording cache manager; ``triton_remote``: a ``TRITON_REMOTE_CACHE_BACKEND``.
  Group-file relocation needs no Triton import and lives in ``bundler.relocate``.
"""
