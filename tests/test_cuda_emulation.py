"""The CUDA kernels, executed on the CPU.

CI has no GPU, so the CUDA kernels (csrc/cuda/mine_kernels.cuh) would otherwise
only be compiled.  Here the same kernel source is built with the host C++
compiler against the CUDA emulation (tests/csrc/emulation: threads as fibers,
real barrier / warp-shuffle / WMMA semantics, see cuda_emulation.h) and the
GPU self-test program (tests/csrc/selftest.cu: every variant x distance x
strategy, forward and backward, exact indices against a host reference) runs:

* under every scheduling policy of the emulator;
* with each ``__syncthreads()`` of the kernels removed in turn (fault
  injection), which the self-test must then fail: the barriers are all needed,
  and the tests can tell;
* under AddressSanitizer + UBSan, the CPU counterpart of compute-sanitizer's
  memcheck (out-of-bounds global or shared memory is an error).

The emulator's own checks (its collectives equal the plain computation, and the
misuses it promises to report are reported) run from emulation_checks.cpp.
What this cannot see -- hardware memory ordering, bank conflicts, speed,
device-compiler bugs -- needs the GPU run of tests/test_cuda.py.
"""
import concurrent.futures
import os
import re
import subprocess
import sys

import pytest
import torch

import _cuda_emulated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
KERNELS = os.path.join(CUDA_DIR, "mine_kernels.cuh")

# Checks the self-test makes (see selftest.cu: 5 variants; update when its
# case list changes).  Asserting the exact count catches silently skipped cases.
SELFTEST_CHECKS = 922

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_cuda_emulated.why_unavailable(torch.device("cpu")) != "",
                       reason="needs a C++ compiler and the CUDA toolkit's headers"),
]


def _build(out, sources, extra=()):
    cmd = [_cuda_emulated.CXX, "-std=c++17", "-Wall", "-Wno-unused-parameter",
           *_cuda_emulated.emulation_cflags(),
           *[f"-I{d}" for d in _cuda_emulated.include_dirs()], *extra]
    proc = subprocess.run(cmd + list(sources) + ["-o", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return str(out)


def _run(binary, timeout=900, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([binary], capture_output=True, text=True, timeout=timeout, env=e)


def _counts(stdout):
    m = re.search(r"(\d+) passed, (\d+) failed", stdout)
    assert m, stdout[-3000:]
    return int(m.group(1)), int(m.group(2))


SELFTEST_SOURCES = _cuda_emulated.SELFTEST_SOURCES  # tests/csrc/selftest.cu over the emulation


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("emu") / "selftest", SELFTEST_SOURCES, ["-O2"])


ASAN_FLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
              "-fno-omit-frame-pointer"]


@pytest.mark.parametrize("sanitized", [False, True], ids=["O2", "asan"])
def test_emulator_checks(tmp_path, sanitized):
    """Shuffles, barriers and WMMA compute what the hardware does, the kernels'
    tf32 path rounds its inputs (rna) and the tf32 mma ignores unrounded bits; a
    divergent barrier, an invalid launch and a misaligned WMMA load are reported
    (also under AddressSanitizer, which must accept the emulator's stack switching)."""
    binary = _build(tmp_path / "checks",
                    _cuda_emulated.CHECKS_SOURCES,
                    ASAN_FLAGS if sanitized else ["-O2"])
    # 12 checks; under ASan the 256-bit alignment check is off (cuda_emulation.h).
    expected = (11, 0) if sanitized else (12, 0)
    for schedule in ("forward", "depth", "shuffle:3"):
        proc = _run(binary, FASTMINE_EMU_SCHEDULE=schedule)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
        assert _counts(proc.stdout) == expected, proc.stdout


@pytest.mark.parametrize("schedule", ["forward", "reverse", "depth", "shuffle:1"])
def test_selftest_passes_under_emulation(selftest, schedule):
    proc = _run(selftest, FASTMINE_EMU_SCHEDULE=schedule)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert _counts(proc.stdout) == (SELFTEST_CHECKS, 0)


def test_selftest_passes_on_emulated_sm75(tmp_path):
    """The FFMA fallback that GPUs without bf16/tf32 tensor cores (sm_75) compile
    for the bf16 and tf32 variants (fp16 keeps WMMA): the tensor-core paths are
    what the other runs execute."""
    binary = _build(tmp_path / "selftest75", SELFTEST_SOURCES, ["-O2", "-DFASTMINE_EMU_ARCH=750"])
    proc = _run(binary, FASTMINE_EMU_SCHEDULE="shuffle:5")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert _counts(proc.stdout) == (SELFTEST_CHECKS, 0)


def _barrier_lines():
    with open(KERNELS) as f:
        return [i for i, line in enumerate(f, 1)
                if "__syncthreads()" in line and not line.lstrip().startswith("//")]


def test_every_barrier_is_needed(selftest):
    """Removing any one __syncthreads() of the kernels makes the self-test fail
    under some scheduling policy (most under all of them): each barrier guards
    a real hazard, and a lost barrier would be caught."""
    lines = _barrier_lines()
    assert len(lines) >= 9, lines  # the kernels have 9 today

    def caught(line):
        for schedule in ("depth", "shuffle:1", "forward"):  # depth catches every one today
            proc = _run(selftest, FASTMINE_EMU_SCHEDULE=schedule, FASTMINE_SELFTEST_MAX_FAILS="1",
                        FASTMINE_EMU_DROP_BARRIER=f"mine_kernels.cuh:{line}")
            if proc.returncode != 0:
                return True
        return False

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        survivors = [line for line, ok in zip(lines, pool.map(caught, lines)) if not ok]
    assert not survivors, f"barriers at mine_kernels.cuh lines {survivors} are never needed"


def test_dropping_a_barrier_line_without_one_changes_nothing(selftest):
    """The fault injection is specific: naming a line without a barrier leaves
    the self-test passing (so the failures above are due to the dropped barrier)."""
    proc = _run(selftest, FASTMINE_EMU_SCHEDULE="depth", FASTMINE_SELFTEST_MAX_FAILS="1",
                FASTMINE_EMU_DROP_BARRIER="mine_kernels.cuh:1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _counts(proc.stdout) == (SELFTEST_CHECKS, 0)


def test_selftest_under_address_sanitizer(tmp_path):
    """Global and shared-memory accesses of the kernels stay in bounds, with no
    undefined behaviour.  The self-test's buffers are exactly sized, and the ASan
    build caps __shared__ alignment at 16 bytes so that GCC guards those arrays
    too; ASan's redzones catch overruns past an array's end (an access that lands
    inside another live object is not seen)."""
    binary = _build(tmp_path / "selftest_asan", SELFTEST_SOURCES, ASAN_FLAGS)
    proc = _run(binary, timeout=1200, ASAN_OPTIONS="detect_leaks=1",
                FASTMINE_EMU_SCHEDULE="shuffle:2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert _counts(proc.stdout) == (SELFTEST_CHECKS, 0)
    assert "runtime error" not in proc.stderr, proc.stderr[-4000:]


# A stand-in for the CUDA runtime that a CUDA build of torch loads into the
# process's global symbol scope (libtorch_global_deps.so -> libcudart), as it
# behaves on a machine without a GPU driver: every call fails.
_STANDIN_CUDART = r"""
extern "C" {
static const char kMessage[] = "stand-in libcudart: CUDA driver version is insufficient";
int cudaMalloc(void**, unsigned long) { return 35; }
int cudaFree(void*) { return 35; }
int cudaMemcpy(void*, const void*, unsigned long, int) { return 35; }
int cudaMemcpyAsync(void*, const void*, unsigned long, int, void*) { return 35; }
int cudaMemset(void*, int, unsigned long) { return 35; }
int cudaMemsetAsync(void*, int, unsigned long, void*) { return 35; }
int cudaDeviceSynchronize(void) { return 35; }
int cudaStreamSynchronize(void*) { return 35; }
int cudaGetLastError(void) { return 35; }
int cudaPeekAtLastError(void) { return 35; }
const char* cudaGetErrorName(int) { return kMessage; }
const char* cudaGetErrorString(int) { return kMessage; }
int cudaGetDeviceCount(int*) { return 35; }
int cudaDeviceGetAttribute(int*, int, int) { return 35; }
}
"""

_RUN_WITH_STANDIN = r"""
import ctypes, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)  # first in the global scope
assert ctypes.CDLL(None).cudaGetLastError() == 35  # the stand-in is what the process sees
sys.path.insert(0, sys.argv[2])
import torch, fastmine, _cuda_emulated
g = torch.Generator().manual_seed(0)
x = torch.randn(40, 6, generator=g, dtype=torch.float64)
y = torch.randint(0, 4, (40,), generator=g)
ids = torch.arange(40)
kw = dict(query_ids=ids, ref_ids=ids, pos_strategy="easy")
_cuda_emulated.register()
for neg in ("hard", "semihard"):
    got = fastmine.mine(x, y, x, y, neg_strategy=neg, backend="cuda-emulated", **kw)
    want = fastmine.mine(x, y, x, y, neg_strategy=neg, backend="torch", **kw)
    assert torch.equal(got.pos_idx, want.pos_idx) and torch.equal(got.neg_idx, want.neg_idx), neg
print("emulated launcher ok")
"""


def test_emulated_runtime_is_not_interposed_by_a_real_libcudart(tmp_path):
    """The emulated launcher (the "cuda-emulated" backend) keeps calling the
    emulation's runtime API when a real CUDA runtime is in the process: a CUDA
    build of torch loads libcudart into the global symbol scope, where it would
    otherwise win over the emulated library's exported cudaDeviceGetAttribute,
    cudaMemsetAsync, cudaGetLastError (the backend then failed on CPU machines
    with "CUDA driver version is insufficient for CUDA runtime version").  A
    stand-in libcudart whose every call fails is loaded first, globally; the
    emulated selection must still equal the reference.  .ci/cuda_torch_check
    runs the whole suite against a real CUDA build of torch."""
    src = tmp_path / "standin_cudart.cpp"
    src.write_text(_STANDIN_CUDART)
    lib = tmp_path / "libstandin_cudart.so"
    proc = subprocess.run([_cuda_emulated.CXX, "-shared", "-fPIC", str(src), "-o", str(lib)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", _RUN_WITH_STANDIN, str(lib),
                           os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "emulated launcher ok" in proc.stdout
