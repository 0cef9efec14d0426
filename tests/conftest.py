"""Test configuration.

TRITON_INTERPRET=1 must be set before triton is imported anywhere, so that the
Triton kernels run on CPU tensors under the interpreter (CI has no GPU).  On a
machine with a GPU, run with FASTMINE_TEST_GPU=1 to test the compiled kernels
on the device instead (the interpreter is then left off).
"""
import os

if os.environ.get("FASTMINE_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastmine  # noqa: E402,F401

# The CUDA backend's launcher and kernels, run on the CPU by the host CUDA
# emulation: suites parametrized over fastmine.available_backends() include it
# (tests/_cuda_emulated.py; skipped where no CUDA toolkit headers exist).
import _cuda_emulated  # noqa: E402

_cuda_emulated.register()


@pytest.fixture(autouse=True)
def _seed_and_restore():
    torch.manual_seed(0)
    yield
    torch.use_deterministic_algorithms(False)
