"""Test-only backend "cuda-emulated": the CUDA backend's torch launcher and
kernels (csrc/cuda/mine_cuda.cu + mine_kernels.cuh), built for the CPU over the
host CUDA emulation (csrc/cuda/emulation) and registered so that every suite
parametrized over ``fastmine.available_backends()`` -- the contract suite, the
hand tables, the property tests, opcheck -- also runs the CUDA code on CI,
which has no GPU.  The build (torch.utils.cpp_extension.load, about a minute,
cached by torch under TORCH_EXTENSIONS_DIR) happens on first use.

It is not a user-facing backend: conftest.py registers it for the tests only.
Selection runs the emulated kernels; the backward is fastmine._pairs', as for
the real "cuda" backend (the CUDA backward kernels are covered by the
self-test, tests/test_cuda_emulation.py).
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

from fastmine import _backends, _pairs
from fastmine._contract import DISTANCES, NEG_STRATEGIES, POS_STRATEGIES

NAME = "cuda-emulated"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMULATION_DIR = os.path.join(ROOT, "tests", "csrc", "emulation")

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


def torch_nvcc_defines() -> list:
    """The -D flags torch's BuildExtension gives nvcc (no implicit __half
    conversions, ...), so that emulated builds see the kernels as the extension does."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return [f for f in COMMON_NVCC_FLAGS if f.startswith("-D")]


# Looked up once, at import: why_unavailable runs inside torch.compile'd code,
# where file-system calls would break the graph.
CUDA_INCLUDE = cuda_include()
CXX = shutil.which(os.environ.get("CXX", "c++"))  # the compiler torch's cpp_extension uses
_TOOLCHAIN_PROBLEM = ("no CUDA toolkit headers (cuda_fp16.h) found" if CUDA_INCLUDE is None
                      else "no C++ compiler" if CXX is None else "")


def include_dirs() -> list:
    """Include directories of every emulated build (kernels, shared headers, toolkit)."""
    return [os.path.join(CSRC, "include"), os.path.join(CSRC, "cuda"), EMULATION_DIR, CUDA_INCLUDE]


def emulation_cflags() -> list:
    """Compiler flags of every emulated build: the emulation switch, torch's nvcc
    defines, no FMA contraction (host references must match bit for bit)."""
    return ["-ffp-contract=off", "-DFASTMINE_CUDA_EMULATION", *torch_nvcc_defines(),
            "-Wno-attributes", "-Wno-unknown-pragmas"]


def why_unavailable(device: torch.device) -> str:
    if device.type != "cpu":
        return f"backend {NAME!r} runs on CPU tensors, got tensors on {device}"
    return _TOOLCHAIN_PROBLEM


def load():
    """Build (or load from torch's cache) the emulated launcher; returns the op."""
    global _op, _error
    if _op is not None:
        return _op
    if _error is not None:
        raise RuntimeError(_error)
    from torch.utils.cpp_extension import load as load_extension
    emu = EMULATION_DIR
    try:
        load_extension(
            name="fastmine_cuda_emulated",
            sources=[os.path.join(emu, "mine_cuda_emulated.cpp"),
                     os.path.join(emu, "cuda_emulation.cpp")],
            extra_include_paths=include_dirs(),
            extra_cflags=["-O2", *emulation_cflags()],
            is_python_module=False, verbose=False)
    except Exception as exc:  # report once, clearly, in every test that needs it
        _error = f"building the emulated CUDA launcher failed: {exc}"
        raise
    _op = torch.ops.fastmine_cuda_emulated.mine_select
    return _op


def select(x, labels, r, ref_labels, query_ids, ref_ids, pos, neg, distance, margin):
    return load()(x, labels, r, ref_labels, query_ids, ref_ids,
                  POS_STRATEGIES[pos], NEG_STRATEGIES[neg], DISTANCES[distance], margin)


def register() -> None:
    _backends.register_python(NAME, select, _pairs.pair_distance_backward, why_unavailable)
