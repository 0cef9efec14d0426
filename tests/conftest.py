"""Test configuration.

TRITON_INTERPRET=1 must be set before triton is imported anywhere, so that the
Triton kernels run on CPU tensors under the interpreter (CI has no GPU).  On a
machine with a GPU, run with FASTMINE_TEST_GPU=1 to test the compiled kernels
on the device instead (the interpreter is then left off).
"""
import contextlib
import os
import random

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


@contextlib.contextmanager
def _shuffled_triton_programs(seed: int):
    """Run every Triton launch's programs in a shuffled order (interpreter only).

    The interpreter runs a launch's programs one after another in grid order,
    so atomics never race and any accumulation order is the same on every
    run: a run-to-run determinism check cannot fail there.  A GPU schedules
    the programs in no fixed order.  Within this context each launch runs its
    programs in an order drawn from ``random.Random(seed)`` (tl.program_id of
    the k-th program run is perm[k]), so sums made with atomics change with
    the seed, and a result that must be deterministic can be checked against
    several orders on the CPU.
    """
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    rng = random.Random(seed)
    launch = {}

    def set_grid_dim(nx, ny, nz):
        perm = list(range(nx * ny * nz))
        rng.shuffle(perm)
        launch.update(dims=(nx, ny, nz), perm=perm)
        type(builder).set_grid_dim(builder, nx, ny, nz)

    def set_grid_idx(x, y, z):
        _, ny, nz = launch["dims"]
        k = launch["perm"][(x * ny + y) * nz + z]
        type(builder).set_grid_idx(builder, k // (ny * nz), k // nz % ny, k % nz)

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield
    finally:
        del builder.set_grid_dim, builder.set_grid_idx


@pytest.fixture
def shuffled_triton_programs():
    """``with shuffled_triton_programs(seed): ...`` -- see _shuffled_triton_programs."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("shuffles the Triton interpreter's program order (TRITON_INTERPRET=1)")
    pytest.importorskip("triton")
    return _shuffled_triton_programs
