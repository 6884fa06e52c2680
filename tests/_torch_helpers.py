"""Shared by the in-process torch tests (the ``inductor_dir`` fixture lives in conftest.py)."""

from __future__ import annotations

import torch


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inductor compiles a matrix product to an extern kernel: no C++ build, a cold compile in seconds."""
    return a @ b
