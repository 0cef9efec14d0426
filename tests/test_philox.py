"""The noise definition (fastmine/_philox.py; docs/contract.md, "Random sampling").

Known answers first (the Philox4x32-10 vectors of the Random123 distribution,
also checked by TensorFlow's XLA stateful-random tests and D. E. Shaw
Research's counter-based-engine KAT), then the int64 arithmetic against Python
big integers, the uint32 -> U -> Gumbel mapping, and, under the Triton
interpreter, bit equality with ``tl.philox`` / ``tl.randint4x`` on a grid of
(anchor row, reference row) pairs.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from fastmine import _philox as px

M32 = 0xFFFFFFFF

# Random123 kat_vectors, "philox4x32 10": counter words, key words, output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _philox_bigint(ctr, key, rounds=10):
    """Philox4x32 in Python integers, written from the paper (independent of the
    int64 splitting in fastmine._philox): one element at a time."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers(ctr, key, expected):
    out = px.philox4x32(*ctr, *key)
    assert tuple(int(w) for w in out) == expected
    assert _philox_bigint(ctr, key) == expected  # the test's own oracle is right too


def test_known_answers_batched_and_keys_as_tensors():
    """The three vectors in one broadcast call, keys as tensors: no element
    depends on its neighbours or on the batch shape."""
    c = torch.tensor([k[0] for k in KAT], dtype=torch.int64)  # [3, 4]
    k = torch.tensor([k[1] for k in KAT], dtype=torch.int64)  # [3, 2]
    out = torch.stack(px.philox4x32(c[:, 0], c[:, 1], c[:, 2], c[:, 3], k[:, 0], k[:, 1]), 1)
    assert out.tolist() == [list(e) for _, _, e in KAT]


def test_matches_bigint_on_random_inputs():
    """Random 32-bit counters and keys, including the extremes, 1 and 10 rounds
    (a wrong carry in the 16-bit split shows up within a few hundred draws)."""
    g = torch.Generator().manual_seed(1)
    vals = torch.randint(0, 2 ** 32, (500, 6), dtype=torch.int64, generator=g)
    vals[:8] = torch.tensor([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, M32, M32 - 1])[:, None]
    for rounds in (1, 10):
        out = torch.stack(px.philox4x32(*vals.unbind(1), rounds=rounds), 1)
        want = [_philox_bigint(tuple(r[:4]), tuple(r[4:]), rounds) for r in vals.tolist()]
        assert out.tolist() == [list(w) for w in want]


def test_mulhilo_exact_at_the_edges():
    b = torch.tensor([0, 1, 0xFFFF, 0x10000, 0x1FFFF, 0x7FFFFFFF, 0x80000000, M32],
                     dtype=torch.int64)
    for a in (px.PHILOX_M0, px.PHILOX_M1, M32):
        hi, lo = px._mulhilo32(a, b)
        assert hi.tolist() == [(a * v) >> 32 for v in b.tolist()]
        assert lo.tolist() == [(a * v) & M32 for v in b.tolist()]


def test_pair_layout():
    """x_ij = word (j & 3) of Philox((j >> 2, i, 0, 0), (seed_lo, seed_hi))."""
    seed = 0x0123456789ABCDEF
    k0, k1 = px.split_seed(seed)
    assert (k0, k1) == (0x89ABCDEF, 0x01234567)
    rows = torch.arange(5)[:, None]
    cols = torch.arange(11)[None, :]
    x = px.pair_bits((k0, k1), rows, cols)
    assert x.shape == (5, 11)
    for i in range(5):
        for j in range(11):
            assert int(x[i, j]) == _philox_bigint((j >> 2, i, 0, 0), (k0, k1))[j & 3]
    # batched seeds broadcast: [S, 1, 1] keys against [N, 1] x [1, M] pairs
    seeds = [seed, 7, 2 ** 64 - 1]
    keys = torch.tensor([px.split_seed(s) for s in seeds], dtype=torch.int64)
    xs = px.pair_bits((keys[:, 0, None, None], keys[:, 1, None, None]), rows, cols)
    for s, xb in zip(seeds, xs):
        assert torch.equal(xb, px.pair_bits(px.split_seed(s), rows, cols))


def test_split_seed_range():
    assert px.split_seed(2 ** 64 - 1) == (M32, M32)
    for bad in (-1, 2 ** 64):
        with pytest.raises(ValueError, match="seed"):
            px.split_seed(bad)


def test_draw_seed_follows_manual_seed():
    torch.manual_seed(123)
    a = px.draw_seed()
    torch.manual_seed(123)
    assert px.draw_seed() == a
    assert 0 <= a < 2 ** 64
    assert len({px.draw_seed() for _ in range(20)}) == 20
    assert any(px.draw_seed() >= 2 ** 63 for _ in range(64))  # the full 64-bit range


def test_uniform_mapping_exact_and_open():
    x = torch.tensor([0, 511, 512, 2 ** 31, M32 - 511, M32], dtype=torch.int64)
    u = px.uniform_from_bits(x)
    assert u.dtype == torch.float32
    want = [(2 * (v >> 9) + 1) / 2 ** 24 for v in x.tolist()]
    assert u.double().tolist() == want  # exact in float32
    assert u.min().item() == 2.0 ** -24 and u.max().item() == 1 - 2.0 ** -24
    assert ((1 - u).double() == 1 - u.double()).all()  # 1 - U exact too
    # every value strictly inside (0, 1), on a large sample
    xs = torch.randint(0, 2 ** 32, (1 << 16,), dtype=torch.int64)
    us = px.uniform_from_bits(xs)
    assert bool(((us > 0) & (us < 1)).all())


def test_gumbel_bounds_and_distribution():
    ext = px.uniform_from_bits(torch.tensor([0, M32], dtype=torch.int64))
    for dt in (torch.float32, torch.float64):
        g = px.gumbel_from_uniform(ext, dt)
        assert px.G_MIN < g[0].item() < -2.81 and 16.63 < g[1].item() < px.G_MAX
    assert math.isclose(px.gumbel_from_uniform(ext, torch.float64)[1].item(),
                        -math.log(-math.log1p(-2.0 ** -24)), rel_tol=1e-12)
    # the noise over a grid of pairs is standard Gumbel: mean = Euler's gamma,
    # variance = pi^2 / 6 (10^5 samples: standard errors 0.004 and 0.02)
    g = px.pair_gumbel(2024, torch.arange(100)[:, None], torch.arange(1000)[None, :],
                       torch.float64)
    assert abs(g.mean().item() - 0.5772156649) < 0.02
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.08
    # and the uniforms are uniform: the 16 equal bins of U, chi-square, p > 1e-3
    u = px.pair_uniform(99, torch.arange(100)[:, None], torch.arange(1000)[None, :])
    counts = torch.bincount((u * 16).long().flatten(), minlength=16).double()
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    assert chi2 < 37.7  # chi2(15) quantile at 1 - 1e-3


def test_runs_on_other_devices_when_present():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rows, cols = torch.arange(7)[:, None], torch.arange(13)[None, :]
    cpu = px.pair_bits(px.split_seed(5), rows, cols)
    gpu = px.pair_bits(px.split_seed(5), rows.cuda(), cols.cuda())
    assert torch.equal(cpu, gpu.cpu())


# --- Triton's built-ins compute the same words ---------------------------------

def _triton_or_skip():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a CUDA device")
    triton = pytest.importorskip("triton")
    return triton, triton.language


def _kernels():
    triton, tl = _triton_or_skip()

    @triton.jit
    def words_kernel(out_philox, out_randint, seed, N, M, BN: tl.constexpr, BM: tl.constexpr):
        # one program: every (i, j) of an N x M grid; output [N, M] of word (j & 3)
        i = tl.arange(0, BN)[:, None]
        j = tl.arange(0, BM)[None, :]
        ok = (i < N) & (j < M)
        # tl.philox: counters (j >> 2, i, 0, 0) as uint32
        c0 = (j >> 2).to(tl.uint32)
        c1 = (i + 0 * j).to(tl.uint32)
        z = c0 * 0
        a0, a1, a2, a3 = tl.philox(seed, c0, c1, z, z)
        lane = j & 3
        w = tl.where(lane == 0, a0, tl.where(lane == 1, a1, tl.where(lane == 2, a2, a3)))
        tl.store(out_philox + i * M + j, w.to(tl.int64) & 0xFFFFFFFF, mask=ok)
        # tl.randint4x: int64 offset (i << 32) | (j >> 2)
        off = (i.to(tl.int64) << 32) | (j >> 2).to(tl.int64)
        b0, b1, b2, b3 = tl.randint4x(seed, off)
        v = tl.where(lane == 0, b0, tl.where(lane == 1, b1, tl.where(lane == 2, b2, b3)))
        tl.store(out_randint + i * M + j, v.to(tl.uint32).to(tl.int64) & 0xFFFFFFFF, mask=ok)

    return triton, words_kernel


@pytest.mark.parametrize("seed", [0, 1, 0x89ABCDEF, 0x0123456789ABCDEF, 2 ** 64 - 1])
def test_triton_builtins_give_the_same_words(seed):
    triton, kernel = _kernels()
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    n, m = 5, 14
    out_p = torch.full((n, m), -1, dtype=torch.int64, device=device)
    out_r = torch.full((n, m), -1, dtype=torch.int64, device=device)
    kernel[(1,)](out_p, out_r, seed, n, m, BN=8, BM=16)
    want = px.pair_bits(px.split_seed(seed), torch.arange(n)[:, None], torch.arange(m)[None, :])
    assert torch.equal(out_p.cpu(), want)
    assert torch.equal(out_r.cpu(), want)


# --- the C++ form (csrc/include/fastmine/sampling.h) is the same definition -------

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CPP_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include "fastmine/sampling.h"
using namespace fastmine;
int main(int argc, char** argv) {
  const uint64_t seed = std::strtoull(argv[1], nullptr, 0);
  for (uint32_t i = 0; i < 5; ++i)
    for (uint32_t j = 0; j < 11; ++j) {
      uint32_t w[4];
      noise_words(seed, i, j >> 2, w);
      const uint32_t x = w[j & 3];
      std::printf("%u %u %a %a\n", i, j, (double)noise_uniform(x), (double)noise_gumbel(x));
    }
  const uint32_t ext[2] = {0u, 0xFFFFFFFFu};  // U = 2^-24 and 1 - 2^-24
  for (uint32_t x : ext)
    std::printf("x %u %a %a\n", x, (double)noise_uniform(x), (double)noise_gumbel(x));
  std::printf("gmax %a\n", (double)kGumbelMax);
  return 0;
}
"""


@pytest.mark.parametrize("seed", [0, 0x0123456789ABCDEF, 2 ** 64 - 1])
def test_cpp_header_matches(seed, tmp_path):
    import shutil
    import subprocess
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "noise.cpp"
    src.write_text(_CPP_MAIN)
    exe = tmp_path / "noise"
    subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", "-ffp-contract=off",
                    "-I", os.path.join(_ROOT, "csrc", "include"), str(src), "-o", str(exe)],
                   check=True, capture_output=True)
    lines = subprocess.run([str(exe), str(seed)], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    grid = [ln.split() for ln in lines if not ln.startswith(("x ", "gmax "))]
    rows = torch.tensor([int(g[0]) for g in grid])
    cols = torch.tensor([int(g[1]) for g in grid])
    u_cpp = torch.tensor([float.fromhex(g[2]) for g in grid], dtype=torch.float64)
    g_cpp = torch.tensor([float.fromhex(g[3]) for g in grid], dtype=torch.float64)
    u = px.uniform_from_bits(px.pair_bits(px.split_seed(seed), rows, cols))
    assert torch.equal(u_cpp, u.double())  # bit for bit
    g64 = px.gumbel_from_uniform(u, torch.float64)
    torch.testing.assert_close(g_cpp, g64, rtol=4e-6, atol=1e-6)  # float32 logs: a few ulps
    for ln in (ln.split() for ln in lines if ln.startswith("x ")):
        x = torch.tensor([int(ln[1])])
        u_ext = px.uniform_from_bits(x)
        assert float.fromhex(ln[2]) == float(u_ext)
        g_ext = float(px.gumbel_from_uniform(u_ext, torch.float64))
        assert math.isclose(float.fromhex(ln[3]), g_ext, rel_tol=4e-6)
        assert px.G_MIN < float.fromhex(ln[3]) < px.G_MAX
    gmax = [ln.split() for ln in lines if ln.startswith("gmax ")]
    assert float.fromhex(gmax[0][1]) == float(torch.tensor(px.G_MAX, dtype=torch.float32))  # mirrored
