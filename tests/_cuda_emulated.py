"""Test-only backend "cuda-emulated": the CUDA backend's torch launcher and
kernels (csrc/cuda/mine_cuda.cu + mine_kernels.cuh), built for the CPU over the
host CUDA emulation (tests/csrc/emulation) and registered so that every suite
parametrized over ``fastmine.available_backends()`` -- the contract suite, the
hand tables, the property tests, opcheck -- also runs the CUDA code on CI,
which has no GPU.  The build (torch.utils.cpp_extension.load, about a minute,
cached by torch under TORCH_EXTENSIONS_DIR) happens on first use.

It is not a user-facing backend: conftest.py registers it for the tests only.
The emulated build registers the C++ implementation of backend "cuda" --
mine_cuda.cu's forward (selection, exact pair distances, data checks) and
backward (atomic, or sorted fixed-order under deterministic algorithms) -- as
the ops fastmine::mine_cuda_emulated and fastmine::mine_backward_cuda_emulated
for CPU tensors, which fastmine::mine runs for backend="cuda-emulated" exactly
as it runs fastmine::mine_cuda for backend="cuda"; likewise
csrc/cuda/mine_topk_cuda.cu's fastmine::mine_topk_cuda_emulated for
fastmine::mine_topk (the rules "topk" and "distance_weighted").
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Optional

import torch

from fastmine import _backends, _extension

NAME = "cuda-emulated"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The build: fastmine/_build_manifest.json, part "cuda_emulation" (test-only
# sources under tests/csrc/emulation, which the sdist does not ship) on top of
# the CUDA kernels' part "cuda".
MANIFEST = _extension.manifest()
EMULATION = MANIFEST["cuda_emulation"]


def _paths(rel) -> list:
    return [os.path.join(ROOT, p) for p in rel]


EMULATION_DIR = _paths(EMULATION["include_dirs"])[0]
RUNTIME_SOURCES = _paths(EMULATION["runtime"])
SELFTEST_SOURCES = _paths(EMULATION["selftest"]) + RUNTIME_SOURCES
CHECKS_SOURCES = _paths(EMULATION["checks"]) + RUNTIME_SOURCES
LAUNCHER_SOURCES = _paths(EMULATION["launcher"]) + RUNTIME_SOURCES

_op = None
_error: Optional[str] = None


def cuda_include() -> Optional[str]:
    """The CUDA toolkit's include directory (the emulation compiles its host-side
    cuda_fp16.h / cuda_bf16.h / cuda_runtime_api.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None


# Looked up once, at import: why_unavailable runs inside torch.compile'd code,
# where file-system calls would break the graph.
CUDA_INCLUDE = cuda_include()
CXX = shutil.which(os.environ.get("CXX", "c++"))  # the compiler torch's cpp_extension uses
_TOOLCHAIN_PROBLEM = (
    "the test-only C++ sources (tests/csrc) are absent (an unpacked sdist)"
    if not all(os.path.isfile(p) for p in LAUNCHER_SOURCES + SELFTEST_SOURCES + CHECKS_SOURCES)
    else "no CUDA toolkit headers (cuda_fp16.h) found" if CUDA_INCLUDE is None
    else "no C++ compiler" if CXX is None else "")


def include_dirs() -> list:
    """Include directories of every emulated build (shared headers, kernels,
    emulation, toolkit)."""
    return _paths(MANIFEST["include_dirs"] + MANIFEST["cuda"]["include_dirs"]
                  + EMULATION["include_dirs"]) + [CUDA_INCLUDE]


def emulation_cflags() -> list:
    """Compiler flags of every emulated build: the emulation switch, torch's nvcc
    defines (no implicit __half conversions, ... as the extension sees the
    kernels), no FMA contraction (host references must match bit for bit)."""
    defines = EMULATION["defines"] + MANIFEST["cuda"]["torch_nvcc_defines"]
    return [*EMULATION["cxx_flags"], *[f"-D{d}" for d in defines]]


def why_unavailable(device: torch.device) -> str:
    if device.type != "cpu":
        return f"backend {NAME!r} runs on CPU tensors, got tensors on {device}"
    return _TOOLCHAIN_PROBLEM


LIBRARY = "fastmine_cuda_emulated"
# A build takes about a minute (a few on 2 busy cores); a lock this old is left
# over from a build that was killed.
STALE_LOCK_S = 900


def _remove_stale_build_lock(name: str) -> None:
    """torch's JIT build holds a lock file in the build directory while it
    compiles and removes it when done.  A killed build (Ctrl-C, a test timeout)
    leaves it behind, and every later load waits on it forever
    (``file_baton.wait``): remove a lock older than any build takes."""
    from torch.utils import cpp_extension
    lock = os.path.join(cpp_extension._get_build_directory(name, verbose=False), "lock")
    try:
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
    except FileNotFoundError:
        pass


def load():
    """Build (or load from torch's cache) the emulated launcher; returns the op."""
    global _op, _error
    if _op is not None:
        return _op
    if _error is not None:
        raise RuntimeError(_error)
    from torch.utils.cpp_extension import load as load_extension
    _remove_stale_build_lock(LIBRARY)
    try:
        load_extension(
            name=LIBRARY,
            sources=LAUNCHER_SOURCES,
            extra_include_paths=include_dirs(),
            extra_cflags=emulation_cflags(),
            is_python_module=False, verbose=False)
    except Exception as exc:  # report once, clearly, in every test that needs it
        _error = f"building the emulated CUDA launcher failed: {exc}"
        raise
    _op = torch.ops.fastmine.mine_cuda_emulated
    return _op


def _unavailable_or_load(device: torch.device) -> str:
    """The backend's availability check; on a usable device it also loads the
    emulated ops (building them on first use, then a no-op), since fastmine::mine
    finds its implementation by name.  A failed build raises (the tests that
    need the backend then fail, instead of silently skipping it)."""
    why = why_unavailable(device)
    if why:
        return why
    load()
    return ""


def register() -> None:
    # The emulated launcher always includes csrc/cuda/mine_topk_cuda.cu: the
    # op fastmine::mine_topk_cuda_emulated (top-k and distance-weighted).
    _backends.register(_backends.Backend(NAME, _unavailable_or_load, frozenset(_backends.RULES)))
