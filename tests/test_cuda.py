"""The hand-written CUDA backend (csrc/cuda): GPU correctness against the float64
reference (skipped without a GPU), the JIT fallback's error path (CPU), and a
compile check of the torch-free kernels with nvcc (slow; skipped without nvcc).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastmine
from fastmine import _extension

from _oracle import assert_matches_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = _extension.manifest()
HAS_GPU = torch.cuda.is_available()
needs_cuda_backend = pytest.mark.skipif(
    not (HAS_GPU and _extension.ensure_cuda_kernels()),
    reason="needs a CUDA device and fastmine's CUDA kernels")

DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
STRATEGIES = [("easy", "hard", None), ("hard", "easy", None), ("easy", "semihard", None),
              ("hard", "semihard", 0.3)]
# Selected mining distances agree with the float64 oracle within rtol (relative
# to the largest distance): the kernels accumulate in fp32 (fp64 for fp64).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def _data(n, d, classes, dtype, device="cuda", m=None):
    x = torch.randn(n, d, device=device, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (n,), device=device)
    if m is None:
        return x, y, None, None
    r = torch.randn(m, d, device=device, dtype=torch.float64).to(dtype)
    return x, y, r, torch.randint(0, classes, (m,), device=device)


@needs_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("pos,neg,margin", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,m,d", [(1, None, 5), (37, None, 3), (300, None, 64), (200, 1000, 129),
                                   (2048, None, 128)])
def test_exact_paths_match_reference(distance, pos, neg, margin, dtype, n, m, d):
    """fp64 and fp32 with matmul precision "highest" (exact FFMA paths), every strategy."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        x, y, r, ry = _data(n, d, 7, dtype, m=m)
        kw = dict(pos_strategy=pos, neg_strategy=neg, distance=distance, margin=margin)
        res = fastmine.mine(x, y, r, ry, backend="cuda", **kw)
        assert_matches_reference(res, x, y, r, ry, rtol=RTOL[dtype], **kw)
    finally:
        torch.set_float32_matmul_precision(prev)


@needs_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("pos,neg", [("easy", "hard"), ("hard", "easy")])
@pytest.mark.parametrize("dtype,precision", [(torch.float16, "highest"), (torch.bfloat16, "highest"),
                                             (torch.float32, "high")])
@pytest.mark.parametrize("n,m,d", [(300, None, 64), (500, 3000, 96), (16384, None, 128)])
def test_tensor_core_paths_match_reference(distance, pos, neg, dtype, precision, n, m, d):
    """fp16/bf16 (WMMA) and fp32 under "high" precision (tf32): the oracle runs on the
    rounded inputs, the kernel's fp32 accumulation (tf32 products) is within rtol."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        x, y, r, ry = _data(n, d, 50, dtype, m=m)
        kw = dict(pos_strategy=pos, neg_strategy=neg, distance=distance)
        res = fastmine.mine(x, y, r, ry, backend="cuda", **kw)
        # tf32 rounds each product's inputs to 10 mantissa bits.
        rtol = 2e-3 if dtype == torch.float32 else RTOL[dtype]
        assert_matches_reference(res, x, y, r, ry, rtol=rtol, **kw)
    finally:
        torch.set_float32_matmul_precision(prev)


@needs_cuda_backend
@pytest.mark.gpu
def test_large_float32_semihard_with_ids():
    """N = 16384 references, several reference splits, same-sample exclusion by ids."""
    torch.set_float32_matmul_precision("highest")
    x, y, r, ry = _data(4096, 64, 100, torch.float32, m=16384)
    qid = torch.arange(4096, device="cuda")
    rid = torch.arange(16384, device="cuda") % 8192
    kw = dict(pos_strategy="easy", neg_strategy="semihard", distance="euclidean", margin=0.5,
              query_ids=qid, ref_ids=rid)
    res = fastmine.mine(x, y, r, ry, backend="cuda", **kw)
    assert_matches_reference(res, x, y, r, ry, rtol=1e-5, **kw)


@needs_cuda_backend
@pytest.mark.gpu
def test_ties_go_to_smallest_index():
    """Duplicated reference rows: exact ties must pick the first copy."""
    x = torch.randint(-2, 3, (64, 16), device="cuda").float()
    r = torch.cat([x, x, x])  # three identical copies
    y = torch.arange(64, device="cuda") % 4
    ry = torch.cat([y, y, y])
    res = fastmine.mine(x, y, r, ry, backend="cuda", pos_strategy="easy", neg_strategy="hard")
    ref = fastmine.mine(x.double(), y, r.double(), ry, backend="torch")
    assert torch.equal(res.pos_idx, ref.pos_idx) and torch.equal(res.neg_idx, ref.neg_idx)


@needs_cuda_backend
@pytest.mark.gpu
def test_empty_and_no_candidates():
    x, y, _, _ = _data(10, 4, 1, torch.float32)
    res = fastmine.mine(x, y, backend="cuda")  # one class: no negatives
    assert bool((res.neg_idx == -1).all()) and not bool(res.valid.any())
    r = torch.empty(0, 4, device="cuda")
    res = fastmine.mine(x, y, r, torch.empty(0, dtype=torch.long, device="cuda"), backend="cuda")
    assert bool((res.pos_idx == -1).all())


@needs_cuda_backend
@pytest.mark.gpu
def test_opcheck_mine_select_cuda():
    x, y, _, _ = _data(50, 8, 4, torch.float32)
    for args in [(x, y, x, y, None, None, 0, 0, 0, None),
                 (x, y, x, y, torch.arange(50, device="cuda"), torch.arange(50, device="cuda"),
                  1, 1, 2, 0.2)]:
        torch.library.opcheck(torch.ops.fastmine.mine_select.default, args)


@needs_cuda_backend
@pytest.mark.gpu
def test_cuda_rejects_bad_arguments():
    x, y, _, _ = _data(8, 4, 2, torch.float32)
    with pytest.raises(RuntimeError, match="labels"):
        torch.ops.fastmine.mine_select(x, y[:3], x, y, None, None, 0, 0, 0, None)
    with pytest.raises(RuntimeError, match="ref_emb"):
        torch.ops.fastmine.mine_select(x, y, x.cpu(), y, None, None, 0, 0, 0, None)


def _grads(backend, x, y, r=None, ry=None, **kw):
    """(indices, distances, dL/dx, dL/dr) of a mining call and a fixed loss."""
    x = x.detach().clone().requires_grad_()
    r = None if r is None else r.detach().clone().requires_grad_()
    res = fastmine.mine(x, y, r, ry, backend=backend, **kw)
    w = torch.linspace(0.5, 1.5, x.shape[0], device=x.device, dtype=x.dtype)
    ((w * res.pos_dist).sum() - (w.flip(0) * res.neg_dist).sum()).backward()
    return res, x.grad, (None if r is None else r.grad)


@needs_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("refs", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_matches_torch_backend(distance, refs, deterministic, dtype):
    """The C++ CUDA backward (pair_backward_kernel; atomic, or the sorted
    fixed-order segment sum) equals the reference backend's gradients, for the
    batch as references (both halves into dL/dx) and for a reference set; few
    classes, so that many anchors share a reference row."""
    torch.set_float32_matmul_precision("highest")
    x, y, r, ry = _data(300, 40, 3, dtype, m=120 if refs else None)
    kw = dict(pos_strategy="hard", neg_strategy="hard", distance=distance)
    torch.use_deterministic_algorithms(deterministic)
    try:
        res, gx, gr = _grads("cuda", x, y, r, ry, **kw)
    finally:
        torch.use_deterministic_algorithms(False)
    want, wx, wr = _grads("torch", x, y, r, ry, **kw)
    assert torch.equal(res.pos_idx, want.pos_idx) and torch.equal(res.neg_idx, want.neg_idx)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.pos_dist, want.pos_dist, **tol)
    torch.testing.assert_close(gx, wx, **tol)
    if refs:
        torch.testing.assert_close(gr, wr, **tol)


@needs_cuda_backend
@pytest.mark.gpu
def test_deterministic_backward_is_bitwise_reproducible():
    """Under torch.use_deterministic_algorithms(True) the reference rows are
    summed in a fixed order (pairs sorted by row): identical bits on every run,
    also when thousands of anchors pick the same few reference rows."""
    x, y, r, ry = _data(4000, 64, 2, torch.float32, m=8)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_grads("cuda", x, y, r, ry, pos_strategy="hard")[1:] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    for gx, gr in runs[1:]:
        assert torch.equal(gx, runs[0][0]) and torch.equal(gr, runs[0][1])


@needs_cuda_backend
@pytest.mark.gpu
def test_memory_bank_without_grad_costs_no_bank_sized_memory():
    """A bank that needs no gradient: forward + backward allocate O(N * D) and
    O(M) (the row terms), never a copy or a gradient of the [M, D] bank."""
    bank = torch.randn(200_000, 64, device="cuda")          # 51 MiB, no grad
    bank_y = torch.randint(0, 100, (200_000,), device="cuda")
    x = torch.randn(64, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 100, (64,), device="cuda")
    fastmine.mine(x, y, bank, bank_y, backend="cuda").pos_dist.sum().backward()  # warm-up
    torch.cuda.synchronize()
    x.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fastmine.mine(x, y, bank, bank_y, backend="cuda")
    (res.pos_dist - res.neg_dist).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 4 * 2**20, f"{extra / 2**20:.1f} MiB beyond the inputs (bank: 51 MiB)"
    assert bank.grad is None and x.grad is not None


@needs_cuda_backend
@pytest.mark.gpu
def test_opcheck_mine_cuda():
    """fastmine::mine with backend "cuda": schema, fake, autograd registration and
    the backward through fastmine::mine_backward_cuda."""
    x, y, r, ry = _data(50, 8, 4, torch.float32, m=30)
    x.requires_grad_()
    r.requires_grad_()
    ids = torch.arange(50, device="cuda"), torch.arange(30, device="cuda") % 7
    for args in [(x, y, None, None, None, None, 0, 0, 0, None, "cuda"),
                 (x, y, r, ry, ids[0], ids[1], 1, 1, 2, 0.2, "cuda")]:
        torch.library.opcheck(torch.ops.fastmine.mine.default, args)


@needs_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("refs", [False, True])
def test_cuda_mine_and_backward_never_sync(deterministic, refs):
    """No host synchronisation in a backend="cuda" forward + backward: the data
    checks are device flags asserted asynchronously, labels/ids are read as
    int64 (no compaction), the batch as references is a flag (no arange), the
    SM count is cached, and the deterministic backward sorts on the device."""
    x, y, r, ry = _data(256, 32, 8, torch.float32, m=500 if refs else None)
    x.requires_grad_()
    if refs:
        r.requires_grad_()
    kw = dict(neg_strategy="semihard", distance="cosine", margin=0.3)
    if refs:
        kw.update(query_ids=torch.randint(0, 50, (256,), device="cuda", dtype=torch.int32),
                  ref_ids=torch.randint(0, 50, (500,), device="cuda", dtype=torch.int32))
    torch.use_deterministic_algorithms(deterministic)
    try:
        fastmine.mine(x, y, r, ry, backend="cuda", **kw).pos_dist.sum().backward()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            res = fastmine.mine(x, y, r, ry, backend="cuda", **kw)
            (res.pos_dist - res.neg_dist).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.use_deterministic_algorithms(False)
    torch.cuda.synchronize()


@needs_cuda_backend
@pytest.mark.gpu
def test_bad_rows_fail_asynchronously_on_cuda():
    """A NaN row is caught by the row-terms kernel's flag and reported by a
    device-side assertion at the next synchronisation (no sync in the call);
    the same call on good rows passes.  Run in subprocesses: a device-side
    assertion poisons the CUDA context."""
    code = ("import torch, fastmine\n"
            "x = torch.randn(16, 4, device='cuda'); x[3, 1] = float('nan')\n"
            "y = torch.arange(16, device='cuda') % 2\n"
            "res = fastmine.mine(x, y, backend='cuda')\n"
            "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    # torch's CUDA _assert_async drops the message (it is kept on CPU tensors)
    assert "device-side assert" in proc.stderr, proc.stderr[-3000:]
    ok = code.replace("x[3, 1] = float('nan')", "pass")
    proc = subprocess.run([sys.executable, "-c", ok], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the flag is clear on good rows


def _graph_backends():
    out = ["cuda"] if (HAS_GPU and _extension.ensure_cuda_kernels()) else []
    if HAS_GPU and "triton" in fastmine.available_backends("cuda"):
        out.append("triton")
    return out or ["cuda"]  # (skipped below without a GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", _graph_backends())
def test_cuda_graph_captures_a_triplet_loss_step(backend):
    """A losses.TripletMarginLoss forward + backward step is captured in a CUDA
    graph (possible only without host syncs) and replays correctly on new data."""
    if backend not in fastmine.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available")
    loss_fn = fastmine.losses.TripletMarginLoss(margin=0.2, backend=backend)
    x = torch.randn(128, 32, device="cuda", requires_grad=True)
    y = torch.randint(0, 8, (128,), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton autotuning, allocator) off the capture
        for _ in range(3):
            x.grad = None
            loss_fn(x, y).backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = loss_fn(x, y)
        static_loss.backward()
    static_grad = x.grad
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, device="cuda", generator=g))
            y.copy_(torch.randint(0, 8, y.shape, device="cuda", generator=g))
        graph.replay()
        torch.cuda.synchronize()
        x_ref = x.detach().clone().requires_grad_()
        want = fastmine.losses.TripletMarginLoss(margin=0.2, backend="torch")(x_ref, y)
        want.backward()
        torch.testing.assert_close(static_loss, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(static_grad, x_ref.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ CPU-runnable


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch message")
def test_jit_raises_clear_error_without_cuda_torch(monkeypatch):
    monkeypatch.setattr(_extension, "_jit_error", None)
    monkeypatch.setattr(_extension, "_jit_loaded", False)
    with pytest.raises(_extension.JitBuildError, match="CPU-only build"):
        _extension.load_cuda_extension()
    # The failure is remembered: a second call raises the same error at once.
    with pytest.raises(_extension.JitBuildError, match="CPU-only build"):
        _extension.load_cuda_extension()


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch message")
def test_cuda_backend_reports_why(monkeypatch):
    monkeypatch.setenv("FASTMINE_JIT", "1")
    monkeypatch.setattr(_extension, "_jit_error", None)
    monkeypatch.setattr(_extension, "_jit_loaded", False)
    assert not _extension.ensure_cuda_kernels()
    assert "CPU-only build" in _extension.cuda_why_missing()
    monkeypatch.setenv("FASTMINE_JIT", "0")
    assert "FASTMINE_JIT=1" in _extension.cuda_why_missing()
    with pytest.raises(RuntimeError, match="cuda"):
        fastmine.mine(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), backend="cuda")


def test_jit_sources_exist():
    csrc = _extension.source_dir()
    full = _extension.jit_sources(csrc, with_ops=True)
    assert any(p.endswith("mine_cuda.cu") for p in full)
    assert any(p.endswith("fastmine_ops.cpp") for p in full)
    assert not any(p.endswith("python_module.cpp") for p in full)  # a library, not a module
    assert all(p.endswith(".cu") for p in _extension.jit_sources(csrc, with_ops=False))


def test_availability_queries_never_build(monkeypatch):
    """available_backends(), backend="auto" and the why-missing messages never
    start the JIT build, even with FASTMINE_JIT=1 and a GPU (made to look
    present): only an explicit backend="cuda" may."""
    def build(*args, **kwargs):
        raise AssertionError("an availability query started the JIT build")

    monkeypatch.setenv("FASTMINE_JIT", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "load_cuda_extension", build)
    monkeypatch.setattr(_extension, "_jit_error", None)
    monkeypatch.setattr(_extension, "_jit_loaded", False)
    monkeypatch.setattr(_extension, "_built_with_cuda", lambda: False)  # as a CPU build of _C
    monkeypatch.setattr(_extension, "check_toolchain", lambda: None)   # the build could run
    fastmine.available_backends()
    fastmine.available_backends("cuda")
    assert fastmine.mine(torch.randn(8, 3), torch.randint(0, 2, (8,))).valid.any()  # auto
    _extension.why_missing()
    _extension.cuda_why_missing()
    _extension.cuda_kernels_loaded()
    _extension.build_info()
    # The explicit request does reach the build (so the patch above can tell).
    from fastmine import _backends
    with pytest.raises(AssertionError, match="started the JIT build"):
        _backends.resolve("cuda", torch.device("cuda"))


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def _torch_nvcc_flags():
    """The flags torch's BuildExtension gives nvcc for every CUDA extension, among
    them -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__,
    which remove __half(float)-style conversions: the kernels must compile so."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return list(COMMON_NVCC_FLAGS)


def _nvcc_compile(tmp_path, source, flags):
    """nvcc -c <source> (a path) with torch's nvcc flags, the manifest's include
    directories, plus `flags`; must succeed."""
    out = tmp_path / (os.path.basename(source) + ".o")
    includes = MANIFEST["include_dirs"] + MANIFEST["cuda"]["include_dirs"]
    cmd = [NVCC, *_torch_nvcc_flags(), *flags, *[f"-I{os.path.join(ROOT, d)}" for d in includes],
           "-c", source, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert out.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_selftest_compiles_with_nvcc(tmp_path):
    """Every kernel template the extension instantiates (variants.cuh) compiles, for
    sm_90 (tensor-core paths) and sm_75 (no bf16/tf32 tensor cores: FFMA fallback),
    with the flags torch builds extensions with."""
    selftest, = MANIFEST["cuda_selftest"]["sources"]
    _nvcc_compile(tmp_path, os.path.join(ROOT, selftest),
                  ["-std=c++17", "-gencode", "arch=compute_90,code=sm_90",
                   "-gencode", "arch=compute_75,code=sm_75"])


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("launcher", ["mine_cuda.cu", "mine_topk_cuda.cu"])
def test_torch_launcher_compiles_with_nvcc(tmp_path, launcher):
    """csrc/cuda/mine_cuda.cu and mine_topk_cuda.cu (top-k: every list bound of
    mine_topk_kernels.cuh is instantiated there) -- argument checks, dispatch,
    workspace and the TORCH_LIBRARY_IMPL registration -- compile with nvcc against the installed
    torch's headers, as setup.py / the JIT build would compile it (torch's nvcc
    flags, and C++20, the standard the installed torch's BuildExtension passes to
    nvcc; sm_90).

    The CPU wheel ships the c10/cuda headers but not the one header a CUDA build
    of torch generates, c10/cuda/impl/cuda_cmake_macros.h; the test writes it
    (one define, as in a CUDA build).  Nothing is linked: this is a compile check.
    """
    from torch.utils.cpp_extension import include_paths
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    _nvcc_compile(tmp_path, os.path.join(ROOT, "csrc", "cuda", launcher),
                  ["-std=c++20", "-O3", "-lineinfo", "-gencode", "arch=compute_90,code=sm_90",
                   f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C",
                   "-DFASTMINE_WITH_CUDA", "-I", str(tmp_path / "shim"),
                   *[f"-I{p}" for p in include_paths()]])


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="nvcc or cmake not found")
def test_cmake_cuda_configure(tmp_path):
    """The CUDA-only CMake configure (no Torch) finds nvcc and generates the self-test."""
    proc = subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(tmp_path), "-DFASTMINE_WITH_TORCH=OFF",
         "-DFASTMINE_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={NVCC}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cache = (tmp_path / "CMakeCache.txt").read_text()
    assert "CMAKE_CUDA_ARCHITECTURES:STRING=80;90" in cache
    assert (tmp_path / "CMakeFiles" / "fastmine_cuda_selftest.dir").is_dir()
