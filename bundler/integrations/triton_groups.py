"""Triton group-file relocation: kept importable here for code written before it moved.

The implementation is :mod:`bundler.relocate`, which sits below the recording layer so that
recording, sessions and artifacts need nothing from ``bundler.integrations``.
"""

from __future__ import annotations

from bundler.relocate import (
    GROUP_PREFIX,
    MAX_GROUP_BYTES,
    GroupFileRewriter,
    is_group_file,
    to_local,
    to_portable,
)

__all__ = ["GROUP_PREFIX", "MAX_GROUP_BYTES", "GroupFileRewriter", "is_group_file", "to_local", "to_portable"]
