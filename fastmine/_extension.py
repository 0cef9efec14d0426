"""Loading the compiled extension; importing fastmine never fails without it."""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

try:  # written by setup.py next to the compiled extension (absent in a plain checkout)
    from ._build_config import TORCH_VERSION as BUILT_WITH_TORCH
except ImportError:
    BUILT_WITH_TORCH: Optional[str] = None


def _major_minor(version: str) -> Optional[tuple]:
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def abi_mismatch(built: Optional[str], running: str) -> str:
    """Why an extension built against torch `built` must not be loaded under
    torch `running` ('' when it may: same major.minor, or `built` unknown).

    The extension's C++ ABI is bound to the torch it was compiled against;
    loading it under another torch X.Y crashes or fails with undefined
    symbols, so fastmine refuses it and names both versions instead."""
    if built is None or _major_minor(built) == _major_minor(running):
        return ""
    want = ".".join(map(str, _major_minor(built) or ()))
    return (f"the compiled extension fastmine._C was built against torch {built}, but torch {running} "
            f"is running, and a compiled extension only loads under the torch major.minor it was built "
            f"with: rebuild fastmine against this torch (`pip install --no-build-isolation -e .` in a "
            f"checkout, or `pip install --no-build-isolation --no-deps --force-reinstall` its sdist) "
            f"or install torch {want}.x")


_C = None
_load_error: Optional[BaseException] = None
_refused = abi_mismatch(BUILT_WITH_TORCH, torch.__version__)
if not _refused:
    try:  # importing the module registers the fastmine:: C++ ops with torch
        from . import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # not built (e.g. a plain source checkout)
        _load_error = exc


def loaded() -> bool:
    """True when the compiled extension (CPU kernel, and CUDA if built) is importable."""
    return _C is not None


def _built_with_cuda() -> bool:
    return loaded() and "cuda=on" in _C.build_info()


def jit_enabled() -> bool:
    """True when FASTMINE_JIT=1: backend="cuda" may JIT-build missing CUDA kernels."""
    return os.environ.get("FASTMINE_JIT", "0").lower() in ("1", "on", "true")


def has_cuda_kernels() -> bool:
    """True when CUDA kernels are registered for fastmine::mine_select.

    That is: the extension was built with them, or they were JIT-built in this
    process (fastmine._jit).  With FASTMINE_JIT=1, a CUDA torch on a machine
    with a GPU and no built kernels, the first call tries the JIT build once;
    its failure is remembered (see :func:`cuda_why_missing`) and gives False.
    """
    if _built_with_cuda():
        return True
    from . import _jit

    if _jit.loaded():
        return True
    if jit_enabled() and _jit.last_error() is None and torch.cuda.is_available():
        try:
            _jit.load_cuda_extension()
        except _jit.JitBuildError:
            return False
        return True
    return False


def cuda_why_missing() -> str:
    """Why no CUDA kernels are available ('' when they are), for error messages."""
    if _built_with_cuda():
        return ""
    from . import _jit

    if _jit.loaded():
        return ""
    if _jit.last_error() is not None:
        return str(_jit.last_error())
    base = _refused or "fastmine was built without its CUDA kernels"
    if not jit_enabled():
        if _refused:
            return base + "; or set FASTMINE_JIT=1 to compile the CUDA kernels for this torch on first use"
        return (base + "; rebuild with a CUDA torch and toolkit (FASTMINE_CUDA=1), or set "
                "FASTMINE_JIT=1 to compile them on first use")
    try:
        _jit.check_toolchain()
    except _jit.JitBuildError as exc:
        return f"{base} and the JIT build cannot run: {exc}"
    return base + " (JIT build not attempted: no CUDA device is visible)"


def why_missing() -> str:
    """A human-readable reason the extension is unavailable ('' when loaded)."""
    if loaded():
        return ""
    if _refused:
        return _refused
    return (f"the compiled extension fastmine._C is not available ({_load_error}); "
            "build it with `pip install --no-build-isolation -e .`")


def build_info() -> str:
    """Compiler/OpenMP/CUDA flags of the compiled extension and the torch it was
    built against ('not built' without it);
    '; cuda=jit' is appended once the CUDA kernels were JIT-built in this process."""
    from . import _jit

    if loaded():
        info = _C.build_info() + (f"; torch={BUILT_WITH_TORCH}" if BUILT_WITH_TORCH else "")
    else:
        info = "not loaded (torch ABI mismatch)" if _refused else "not built"
    return info + "; cuda=jit" if _jit.loaded() else info

