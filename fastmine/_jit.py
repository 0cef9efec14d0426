"""Just-in-time build of the CUDA kernels (csrc/cuda) when the installed
extension was built without them.

Opt-in: ``backend="cuda"`` tries it once per process only when the environment
variable ``FASTMINE_JIT=1`` is set (a build takes minutes and needs a CUDA
toolkit, so it never starts silently); :func:`load_cuda_extension` can also be
called directly.  The build uses ``torch.utils.cpp_extension.load`` with ninja
and caches in torch's extension directory (``TORCH_EXTENSIONS_DIR``), so later
processes load the cached library in seconds (one library per torch
major.minor, see :func:`library_name`).  Target GPUs follow
``TORCH_CUDA_ARCH_LIST`` as in setup.py.  When fastmine._C is missing, or
was refused because it was built against another torch (fastmine._extension),
the JIT library also defines the op schema and the CPU kernel.

Sources are looked up in this order: ``$FASTMINE_SOURCE_DIR`` (a ``csrc``
folder), ``fastmine/_csrc`` (shipped inside wheels by setup.py), the
checkout's ``csrc`` (editable installs).
"""
from __future__ import annotations

import glob
import os
import re
from typing import List, Optional

import torch

_loaded = False
_error: Optional[BaseException] = None


class JitBuildError(RuntimeError):
    """The CUDA kernels cannot be JIT-built here; the message says why."""


def _source_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ.get("FASTMINE_SOURCE_DIR", ""), os.path.join(here, "_csrc"),
                  os.path.join(os.path.dirname(here), "csrc")]
    for cand in candidates:
        if cand and os.path.isfile(os.path.join(cand, "cuda", "mine_cuda.cu")):
            return cand
    raise JitBuildError(
        "fastmine's C++/CUDA sources were not found (looked in "
        f"{[c for c in candidates if c]}); set FASTMINE_SOURCE_DIR to a checkout's csrc/ folder")


def check_toolchain() -> None:
    """Raise JitBuildError unless torch has CUDA, a toolkit (nvcc) and ninja exist."""
    if torch.version.cuda is None:
        raise JitBuildError(
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): the CUDA "
            "kernels need a CUDA build of torch (see https://pytorch.org/get-started/locally/)")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise JitBuildError(
            "no CUDA toolkit found: install one matching torch's CUDA "
            f"{torch.version.cuda} and set CUDA_HOME (nvcc must be at $CUDA_HOME/bin/nvcc)")
    if not cpp_extension.is_ninja_available():
        raise JitBuildError("the JIT build needs ninja: `pip install ninja`")


def _sources(root: str, with_schema: bool) -> List[str]:
    cu = sorted(p for p in glob.glob(os.path.join(root, "cuda", "*.cu"))
                if os.path.basename(p) != "selftest.cu")  # the self-test is a program
    if not with_schema:
        return cu
    # No compiled extension: the JIT library also defines the op schema and the
    # CPU kernel (python_module.cpp is left out: the library is not a Python module).
    return ([os.path.join(root, "fastmine_ops.cpp")]
            + sorted(glob.glob(os.path.join(root, "cpu", "*.cpp"))) + cu)


def library_name(with_schema: bool) -> str:
    """The JIT library's name, hence its cache folder in TORCH_EXTENSIONS_DIR.

    It names the torch major.minor: torch's cache is keyed by sources and flags
    only, and a library cached under another torch would not load (its C++ ABI
    is bound to the torch it was built with, as for fastmine._C)."""
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    tag = f"_torch{m.group(1)}_{m.group(2)}" if m else ""
    return "fastmine_cuda_jit" + ("_full" if with_schema else "") + tag


def load_cuda_extension(verbose: bool = False) -> None:
    """Compile (or load from torch's cache) the CUDA kernels and register them
    as the CUDA implementation of ``torch.ops.fastmine.mine_select``.

    Idempotent: the first failure is remembered and re-raised.  Raises
    :class:`JitBuildError` (a RuntimeError) with the reason when torch has no
    CUDA, no toolkit or ninja is found, or the sources are missing.
    """
    global _loaded, _error
    if _loaded:
        return
    if _error is not None:
        raise _error
    try:
        check_toolchain()
        root = _source_dir()
        from torch.utils.cpp_extension import load

        from . import _extension

        with_schema = not _extension.loaded()
        load(name=library_name(with_schema),
             sources=_sources(root, with_schema),
             extra_include_paths=[os.path.join(root, "include"), os.path.join(root, "cuda")],
             extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
             extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                                "-DFASTMINE_WITH_CUDA"],
             extra_ldflags=["-fopenmp"] if with_schema else [],
             is_python_module=False, verbose=verbose)
        _loaded = True
    except JitBuildError as exc:
        _error = exc
        raise
    except Exception as exc:  # compiler errors etc.: keep the cause
        _error = JitBuildError(f"JIT build of fastmine's CUDA kernels failed: {exc}")
        _error.__cause__ = exc
        raise _error


def loaded() -> bool:
    """True once :func:`load_cuda_extension` succeeded in this process."""
    return _loaded


def last_error() -> Optional[BaseException]:
    """The remembered failure of :func:`load_cuda_extension`, if any."""
    return _error
