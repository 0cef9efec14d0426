"""The CPU kernels' overrides for a block of test code (docs/ops.md, "CPU kernel
overrides"; csrc/cpu/overrides.h): force a tile shape, a semi-hard path or a
noise form through the op ``fastmine::_set_cpu_overrides``, and restore what was
in force on exit (also on an exception).

    with cpu_overrides(block="8,1", semihard="two"):
        fastmine.mine(..., backend="cpu")

Each argument takes the string of its environment variable (FASTMINE_CPU_BLOCK
= "BM,BUFFER_KIB", FASTMINE_CPU_SEMIHARD = "one" | "two", FASTMINE_CPU_NOISE =
"avx2" | "scalar"); "" is the kernels' default, None leaves it as it is.  The
variables themselves are read once, at the first kernel call of a process.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def cpu_overrides(block: Optional[str] = None, semihard: Optional[str] = None,
                  noise: Optional[str] = None) -> Iterator[None]:
    before = torch.ops.fastmine._set_cpu_overrides(block, semihard, noise)
    try:
        yield
    finally:
        torch.ops.fastmine._set_cpu_overrides(*before)
