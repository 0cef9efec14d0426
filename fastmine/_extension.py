"""Loading the compiled extension; importing fastmine never fails without it."""
from __future__ import annotations

from typing import Optional

import torch

_C = None
_load_error: Optional[BaseException] = None
try:  # importing the module registers the fastmine:: C++ ops with torch
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # not built (e.g. a plain source checkout)
    _load_error = exc


def loaded() -> bool:
    """True when the compiled extension (CPU kernel, and CUDA if built) is importable."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was built with the CUDA kernels."""
    return loaded() and "cuda=on" in _C.build_info()


def why_missing() -> str:
    """A human-readable reason the extension is unavailable ('' when loaded)."""
    if loaded():
        return ""
    return (f"the compiled extension fastmine._C is not available ({_load_error}); "
            "build it with `pip install --no-build-isolation -e .`")


def build_info() -> str:
    return _C.build_info() if loaded() else "not built"


def select_op():
    """torch.ops.fastmine.mine_select (CPU, and CUDA when built)."""
    return torch.ops.fastmine.mine_select
