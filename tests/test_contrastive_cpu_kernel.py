"""The CPU contrastive kernel's own machinery (csrc/cpu/contrastive_cpu.cpp,
csrc/cpu/fast_exp.h; docs/contrastive.md, "The CPU kernel"):

* the one-pass backward when the references are the batch (dQ_I += (G_IJ +
  H_IJ) Q_J) against the two-pass one (explicit references r = q with ids
  that exclude the diagonal: dq + dr) and against the "chunked" spec, in
  float64, over ids / labels / sizes / block sizes that stress the masks;
* exp_f32 (the vectorised float32 exp) against float64 exp and torch.exp over
  a dense grid and the range edges, and bit-identical across the ISA builds;
* float32: close to the float64 reference (also at tau = 0.01), gradients
  bit-identical across runs and thread counts;
* the int32 label / id codes: labels outside int32 give the same result.
"""
import ctypes
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmine import _ops
from fastmine import contrastive as C
from test_contrastive import SPECS, _cases, _close, _data, _loss_and_grads

pytestmark = pytest.mark.skipif(not _ops.has_contrastive_ops(),
                                reason="compiled extension not built")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64
KERNEL_SPECS = ["supcon", "supcon_t001", "ntxent", "ntxent_t05", "ms", "ms_mined",
                "ms_mined_args"]


def _loss(name):
    cls, kw = SPECS[name]
    return cls(**kw, backend="cpu")


def _fwd(loss, q, r, y, ry, qid, rid, block):
    return torch.ops.fastmine.contrastive(q, r, y, ry, qid, rid, *loss._op_args(), block)


def _bwd(loss, gamma, q, r, y, ry, qid, rid, block, stats, ref_grad):
    return torch.ops.fastmine.contrastive_backward(gamma, q, r, y, ry, qid, rid,
                                                   *loss._op_args(), block, stats, ref_grad)


def _label_sets(n, g):
    """name -> labels [n]: classes of several sizes with singletons, one class,
    all singletons, and two classes, one of 2/3 of the batch (NT-Xent: a block of
    its anchors has more positive pairs than a tile holds, so pass 2 recomputes
    the tiles instead of replaying the recorded pairs; other blocks replay)."""
    mixed = torch.randint(0, 5, (n,), generator=g)
    mixed[:3] = torch.tensor([100, 101, 102])
    two = (torch.arange(n) >= 2 * n // 3).long()
    return {"mixed": mixed, "one_class": torch.zeros(n, dtype=torch.long),
            "singletons": torch.arange(n) * 3, "two_classes": two[torch.randperm(n, generator=g)]}


def _id_sets(n, g):
    """name -> ids [n] or None: none (i == j excluded), views (pairs share an id),
    scattered repeats."""
    return {"none": None, "views": torch.arange(n) // 2,
            "repeats": torch.randint(0, max(1, n // 3), (n,), generator=g)}


@pytest.mark.parametrize("block", [1, 5, 16, 256])
@pytest.mark.parametrize("name", KERNEL_SPECS)
def test_self_one_pass_backward_equals_two_pass_float64(name, block):
    """References = the batch: the one-pass backward (G + H on each tile) equals the
    two-pass one (r = q passed explicitly, the same-sample rule given as ids:
    dq + dr), with the upstream gradient gamma arbitrary (zeros included)."""
    loss = _loss(name)
    nonzero = 0
    for n in (23, 40):  # 23: no block but 1 divides it
        g = torch.Generator().manual_seed(n + block)
        q = F.normalize(torch.randn(n, 6, generator=g, dtype=F64), dim=1)
        gamma = torch.randn(n, generator=g, dtype=F64)
        gamma[::4] = 0
        for lname, y in _label_sets(n, g).items():
            for iname, ids in _id_sets(n, g).items():
                terms, stats = _fwd(loss, q, None, y, y, ids, ids, block)
                one, none = _bwd(loss, gamma, q, None, y, y, ids, ids, block, stats, False)
                assert none.numel() == 0
                ids2 = torch.arange(n) if ids is None else ids
                terms2, stats2 = _fwd(loss, q, q, y, y, ids2, ids2, block)
                assert torch.allclose(terms, terms2, rtol=1e-12, atol=1e-14), (lname, iname)
                assert torch.allclose(stats, stats2, rtol=1e-12, atol=1e-14,
                                      equal_nan=False), (lname, iname)
                dq, dr = _bwd(loss, gamma, q, q, y, y, ids2, ids2, block, stats, True)
                expect = dq + dr
                assert _close(one, expect, 1e-12), (lname, iname)
                assert torch.isfinite(one).all()
                nonzero += int(expect.abs().max() > 0)
    assert nonzero >= 6  # the comparisons are not all of zeros


@pytest.mark.parametrize("block", [1, 5, 256])
@pytest.mark.parametrize("name", KERNEL_SPECS)
def test_self_one_pass_equals_chunked_float64(name, block):
    """The module path (ref_emb None: the one-pass backward) against the "chunked"
    spec, on label and id sets beyond test_contrastive.py's."""
    cls, kw = SPECS[name]
    g = torch.Generator().manual_seed(block)
    n = 29
    emb = torch.randn(n, 5, generator=g, dtype=F64)
    for lname, y in _label_sets(n, g).items():
        for iname, ids in _id_sets(n, g).items():
            lc, gc = _loss_and_grads(cls, kw, "chunked", 7, emb, y, None, None, ids, None)
            lk, gk = _loss_and_grads(cls, kw, "cpu", block, emb, y, None, None, ids, None)
            assert float(lk) == pytest.approx(float(lc), rel=1e-10, abs=1e-300), (lname, iname)
            assert _close(gk[0], gc[0], 1e-10), (lname, iname)


# --------------------------------------------------------------------------- exp_f32

_KLO, _KHI = np.float32(-87.33654475), np.float32(88.72283172607)  # fast_exp.h's range
_EXP_SRC = """
#include "fast_exp.h"
extern "C" void exp_f32_array(const float* x, float* y, long n) {
  for (long i = 0; i < n; ++i) y[i] = fastmine::cpu::exp_f32(x[i]);
}
"""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture(scope="module")
def exp_libs(tmp_path_factory):
    """exp_f32 over an array, built with the manifest's flags: the default ISA and
    the -mavx2 / -mavx512f builds this CPU runs (the kernel's clones)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    with open(os.path.join(ROOT, "fastmine", "_build_manifest.json")) as fh:
        flags = json.load(fh)["cxx_flags"]
    d = tmp_path_factory.mktemp("fast_exp")
    src = d / "exp_check.cpp"
    src.write_text(_EXP_SRC)
    have = _cpu_flags()
    libs = {}
    for isa, extra in (("default", []), ("avx2", ["-mavx2"]), ("avx512f", ["-mavx512f"])):
        if extra and isa not in have:
            continue
        out = d / f"exp_{isa}.so"
        subprocess.run([cxx, *flags, "-std=c++17", "-shared", "-fPIC", *extra,
                        "-I", os.path.join(ROOT, "csrc", "cpu"), str(src), "-o", str(out)],
                       check=True)
        libs[isa] = ctypes.CDLL(str(out))
    return libs


def _exp_f32(lib, x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    lib.exp_f32_array(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p),
                      ctypes.c_long(x.size))
    return y


def _grid():
    """Every 61st float of [ln FLT_MIN, ln FLT_MAX] by bit pattern (~3.7e7 values, all
    binades), the reduction's half-way points (k + 1/2) ln 2, and the range edges."""
    pos = np.arange(0, np.float32(_KHI).view(np.uint32) + 1, 61, dtype=np.uint32)
    neg = np.arange(0, np.float32(-_KLO).view(np.uint32) + 1, 61, dtype=np.uint32)
    half = (np.arange(-126, 128) + 0.5) * np.log(2.0)
    edges = [_KLO, _KHI, np.nextafter(_KLO, np.float32(0)), np.nextafter(_KHI, np.float32(0)),
             0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0]
    x = np.concatenate([pos.view(np.float32), -neg.view(np.float32),
                        half.astype(np.float32), np.array(edges, np.float32)])
    return x[(x >= _KLO) & (x <= _KHI)]


def _ulps(y, ref64):
    """|y - ref| in units of the last place of the float32 rounding of ref."""
    r32 = ref64.astype(np.float32)
    ulp = np.nextafter(r32, np.float32(np.inf)).astype(np.float64) - r32.astype(np.float64)
    return np.abs(y.astype(np.float64) - ref64) / ulp


def test_exp_f32_error_bound(exp_libs):
    """fast_exp.h's bound: < 1 ulp of the exact e^x on [ln FLT_MIN, ln FLT_MAX]
    (an exhaustive check of every float there measured 0.9903 ulp); within 2 ulp
    of torch.exp (itself ~0.6 ulp)."""
    x = _grid()
    y = _exp_f32(exp_libs["default"], x)
    ref = np.exp(x.astype(np.float64))
    err = _ulps(y, ref)
    assert err.max() < 1.0, (float(err.max()), float(x[err.argmax()]))
    assert err.mean() < 0.35  # most results correctly rounded
    t = torch.exp(torch.from_numpy(x)).numpy()
    assert _ulps(y, t.astype(np.float64)).max() <= 2.0


def test_exp_f32_outside_the_range(exp_libs):
    """Below ln FLT_MIN: 0 (no subnormals; the exact value is < FLT_MIN); above
    ln FLT_MAX: +inf; -inf -> 0, +inf -> +inf."""
    lo = np.array([-np.inf, -1e30, -200.0, -103.9, -87.5, np.nextafter(_KLO, np.float32(-1e9))],
                  np.float32)
    hi = np.array([np.nextafter(_KHI, np.float32(1e9)), 88.8, 89.0, 1e4, np.inf], np.float32)
    lib = exp_libs["default"]
    assert (_exp_f32(lib, lo) == 0).all()
    assert (np.exp(lo.astype(np.float64)) < np.finfo(np.float32).tiny).all()
    assert np.isposinf(_exp_f32(lib, hi)).all()
    with np.errstate(over="ignore"):
        assert np.isposinf(np.exp(hi.astype(np.float64)).astype(np.float32)).all()
    assert _exp_f32(lib, np.array([0.0], np.float32))[0] == 1.0


def test_exp_f32_same_bits_in_every_isa_build(exp_libs):
    """-ffp-contract=off and plain float steps: the vectorised builds round as the
    default one (so the kernel's clones agree bit for bit)."""
    x = _grid()[::7]
    base = _exp_f32(exp_libs["default"], x).view(np.uint32)
    for isa, lib in exp_libs.items():
        assert np.array_equal(_exp_f32(lib, x).view(np.uint32), base), isa


# --------------------------------------------------------------------------- float32

@pytest.mark.parametrize("name", KERNEL_SPECS)
def test_float32_close_to_float64(name):
    """The vectorised float32 path (float32 tiles, exp_f32, float32 tile sums merged
    into double running sums) against the float64 reference: loss to 1e-5, gradients
    to 2e-5 of their largest entry (measured: <= 3e-6 on these data)."""
    cls, kw = SPECS[name]
    emb, y, ref, ry = _data(n=150, m=100, d=16, classes=12, dtype=torch.float32)
    for kind, *args in _cases(emb, y, ref, ry):
        ls, gs = _loss_and_grads(cls, kw, "cpu", 32, *args)
        args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        lr, gr = _loss_and_grads(cls, kw, "torch", 256, *args64)
        assert float(ls) == pytest.approx(float(lr), rel=1e-5), kind
        for a, b in zip(gs, gr):
            assert a.dtype == torch.float32
            assert _close(a.double(), b, 2e-5), kind


@pytest.mark.parametrize("cls", [C.SupConLoss, C.NTXentLoss])
def test_float32_small_temperature(cls):
    """tau = 0.01 with the excluded self pair s_ii = 1 (max over admissible pairs
    only: else every e^{x - max} underflows in float32): finite, and close to
    float64 in value and gradient, on both backward paths (self and references)."""
    emb, y, ref, ry = _data(n=60, m=40, d=16, classes=8, dtype=torch.float32)
    for kind, *args in _cases(emb * 3, y, ref, ry):
        ls, gs = _loss_and_grads(cls, {"temperature": 0.01}, "cpu", 16, *args)
        args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        lr, gr = _loss_and_grads(cls, {"temperature": 0.01}, "torch", 256, *args64)
        assert torch.isfinite(ls) and all(torch.isfinite(g).all() for g in gs), kind
        assert float(ls) == pytest.approx(float(lr), rel=1e-5), kind
        for a, b in zip(gs, gr):
            assert _close(a.double(), b, 1e-4), kind


@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms_mined"])
def test_float32_gradients_bit_identical(name):
    """The one-pass self backward and the two-pass one: fixed-order sums, so two runs
    (and thread counts 1, 2, 3) give the same bits."""
    cls, kw = SPECS[name]
    cases = _cases(*_data(n=300, m=200, d=8, dtype=torch.float32))
    threads = torch.get_num_threads()
    try:
        for kind, *args in cases:
            first = _loss_and_grads(cls, kw, "cpu", 32, *args)
            for t in (threads, 1, 2, 3):
                torch.set_num_threads(t)
                again = _loss_and_grads(cls, kw, "cpu", 32, *args)
                assert torch.equal(again[0], first[0]), kind
                assert all(torch.equal(a, b) for a, b in zip(again[1], first[1])), kind
    finally:
        torch.set_num_threads(threads)


def test_label_and_id_codes_beyond_int32():
    """Labels and ids are compared as int32 dense codes: int64 values outside int32
    (and negative ones) give bit-identical results to small ones."""
    emb, y, ref, ry = _data(n=30, m=20, classes=5, seed=3)
    qid, rid = torch.arange(30) // 2, torch.cat([torch.arange(4), 50 + torch.arange(16)])
    big = lambda v: v * (1 << 40) - (1 << 62)  # noqa: E731  (order-preserving, distinct)
    for name in ("supcon", "ntxent", "ms_mined"):
        cls, kw = SPECS[name]
        for args, args_big in (((emb, y, None, None, qid, None),
                                (emb, big(y), None, None, big(qid), None)),
                               ((emb, y, ref, ry, qid, rid),
                                (emb, big(y), ref, big(ry), big(qid), big(rid)))):
            a = _loss_and_grads(cls, kw, "cpu", 7, *args)
            b = _loss_and_grads(cls, kw, "cpu", 7, *args_big)
            assert torch.equal(a[0], b[0]), name
            assert all(torch.equal(u, v) for u, v in zip(a[1], b[1])), name


# --------------------------------------------------------------------------- vectorised

# The float32 tile loops of csrc/cpu/contrastive_cpu.cpp (FASTMINE_CPU_CLONES).
_TILE_LOOPS = ("supcon_tile", "ntxent_neg_tile", "ms_mine_tile", "ms_tile", "grad_tile")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_float32_tile_loops_are_vectorised_in_every_isa_clone():
    """The machine code of the loaded extension: every avx2 / avx512f clone of the
    float32 tile loops uses 256- / 512-bit registers (a loop GCC leaves scalar is
    still correct, so only this notices; tests/test_cpu_vectorised.py does the same
    for the mining loops)."""
    import importlib.util
    import re

    import fastmine

    clones = re.search(r"cpu_clones=([\w,]+)", fastmine.build_info())
    if clones is None or "avx2" not in clones.group(1).split(","):
        pytest.skip("no ISA clones in this build")
    path = importlib.util.find_spec("fastmine._C").origin
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], check=True,
                         capture_output=True, text=True).stdout
    header = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    name = re.compile(r"::(%s)<float[,>].*\[clone \.(avx2|avx512f)\]$" % "|".join(_TILE_LOOPS))
    want = {"avx2": "ymm", "avx512f": "zmm"}
    found, scalar, current = set(), [], None
    for line in asm.splitlines():
        m = header.match(line)
        if m:
            if current and want[current[1]] not in current[2]:
                scalar.append(current[:2])
            n = name.search(m.group(1))
            current = (n.group(1), n.group(2), set()) if n else None
            if n:
                found.add(n.group(1))
        elif current is not None:
            current[2].update(r for r in ("ymm", "zmm") if r in line)
    if current and want[current[1]] not in current[2]:
        scalar.append(current[:2])
    assert found == set(_TILE_LOOPS), found
    assert not scalar, sorted(set(scalar))
