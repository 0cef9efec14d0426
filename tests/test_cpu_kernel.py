"""The CPU kernel's internal paths (csrc/cpu/mine_cpu.cpp), each forced by its
test hook, must give the same indices bit for bit:

* semi-hard in one sweep (positives' v_ap from the class members, one fused
  GEMM sweep, exact window afterwards) against the two-sweep path
  (semihard = "one" / "two"), on float data with duplicated rows
  (exact ties) and near-ties -- not only on the integer data of the property
  tests, where every rounding is exact;
* any tile shape (block = "BM,BUFFER_KIB") on integer data, where the
  selection is exact, against the torch reference.

The hooks are the kernel overrides (csrc/cpu/overrides.h), set per block of
code by tests/_cpu_overrides.py; the op that sets them is tested last.
"""
import os
import subprocess
import sys

import pytest
import torch

import fastmine
from _cpu_overrides import cpu_overrides

pytestmark = pytest.mark.skipif("cpu" not in fastmine.available_backends(torch.device("cpu")),
                                reason="the compiled CPU backend is not built")


def _problem(seed, n, m, d, classes, dtype, dup_frac=0.25, refs=True, ids=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    if refs:
        r = torch.randn(m, d, generator=g, dtype=torch.float64)
        ry = torch.randint(0, classes, (m,), generator=g)
        # Duplicates: copy some anchors into the bank (same or other label), and
        # some bank rows onto others: exact ties of v, within and across classes.
        k = int(dup_frac * m)
        dst = torch.randperm(m, generator=g)[:k]
        r[dst[: k // 2]] = x[torch.randint(0, n, (k // 2,), generator=g)]
        r[dst[k // 2:]] = r[torch.randint(0, m, (k - k // 2,), generator=g)]
        # Near-ties: tiny perturbations of duplicates (differences at rounding level).
        r[dst[:4]] += 1e-7 * torch.randn(min(4, k), d, generator=g, dtype=torch.float64)
    else:
        k = int(dup_frac * n)
        dst = torch.randperm(n, generator=g)[:k]
        x[dst] = x[torch.randint(0, n, (k,), generator=g)]
        r = ry = None
    kw = {}
    if ids:
        kw["query_ids"] = torch.randint(0, n, (n,), generator=g)
        kw["ref_ids"] = torch.randint(0, n, (m,), generator=g)
    return (x.to(dtype), y, None if r is None else r.to(dtype), ry, kw)


def _mine(path, args, kw):
    x, y, r, ry, ids = args
    with cpu_overrides(semihard=path):
        return fastmine.mine(x, y, r, ry, backend="cpu", neg_strategy="semihard", **ids, **kw)


CASES = [
    # (n, m, d, classes, refs, ids)
    (300, 700, 32, 60, True, False),    # bank, small classes
    (300, 700, 7, 5, True, True),       # bank, large classes, ids; d not a multiple of 16
    (257, 257, 130, 40, False, False),  # the batch as references (self-pairs excluded)
    (64, 5000, 128, 600, True, False),  # several reference chunks
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("pos,margin", [("easy", None), ("easy", 0.2), ("hard", None),
                                        ("hard", 1.0)])
def test_semihard_one_sweep_equals_two_sweeps(case, dtype, distance, pos, margin):
    n, m, d, classes, refs, ids = case
    args = _problem(hash(case) % 1000, n, m, d, classes, dtype, refs=refs, ids=ids)
    kw = dict(pos_strategy=pos, distance=distance, margin=margin)
    one = _mine("one", args, kw)
    two = _mine("two", args, kw)
    assert torch.equal(one.pos_idx, two.pos_idx)
    assert torch.equal(one.neg_idx, two.neg_idx)
    # Not vacuous: anchors with a semi-hard negative (with a small margin, few).
    assert (two.neg_idx >= 0).float().mean() > 0.05


def test_semihard_duplicates_of_the_positive_are_excluded():
    # A negative identical to the positive has v_an == v_ap: not semi-hard
    # (strict v_an > v_ap) on either path, although the one-sweep path computes
    # v_ap from a different dot-product order than the sweep.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 64, generator=g)
    y = torch.arange(50) % 10
    r = torch.cat([x + 0.01 * torch.randn(50, 64, generator=g), x + 0.01 * torch.randn(50, 64, generator=g)])
    ry = torch.cat([y, (y + 1) % 10])
    r[50:] = r[:50]  # every positive candidate has a different-class twin
    for path in ("one", "two"):
        res = _mine(path, (x, y, r, ry, {}), dict(distance="euclidean"))
        assert torch.equal(res.pos_idx, torch.arange(50))
        assert not (res.neg_idx == res.pos_idx + 50).any()


@pytest.mark.parametrize("block", ["1,1", "7,3", "64,1024", "256,256", "512,4096"])
@pytest.mark.parametrize("neg", ["hard", "semihard", "easy"])
@pytest.mark.parametrize("path", ["one", "two"])
def test_tile_shapes_exact_on_integer_data(block, neg, path):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-3, 4, (300, 5), generator=g).float()
    y = torch.randint(0, 6, (300,), generator=g)
    r = torch.randint(-3, 4, (900, 5), generator=g).float()
    ry = torch.randint(0, 6, (900,), generator=g)
    for kw in (dict(pos_strategy="easy"), dict(pos_strategy="hard"),
               dict(pos_strategy="easy", margin=1.5) if neg == "semihard" else {}):
        kw = dict(kw, neg_strategy=neg)
        want = fastmine.mine(x.double(), y, r.double(), ry, backend="torch", **kw)
        with cpu_overrides(block=block, semihard=path):
            got = fastmine.mine(x, y, r, ry, backend="cpu", **kw)
        assert torch.equal(got.pos_idx, want.pos_idx), kw
        assert torch.equal(got.neg_idx, want.neg_idx), kw


def test_cpu_kernel_preset_smoke(tmp_path):
    # The --cpu-kernel preset of benchmarks/mine.py (issue #16's table), one cell,
    # one timed call: every (provider, threads) row is there, with a floor ratio.
    from benchmarks import mine as M
    res = M.main(["--cpu-kernel", "--device", "cpu", "--n", "8192", "--d", "32", "--repeats", "1",
                  "--warmup", "0", "--out", str(tmp_path / "run"), "--no-progress"])
    threads = res["config"]["threads"]
    assert threads[-1] == 1
    got = {(r["strategy"], r["threads"]) for r in res["results"]}
    assert got == {(s, t) for s in ("floor", "easy/hard", "easy/semihard") for t in threads}
    assert all(r["t_over_floor"] > 0 for r in res["results"])
    md = (tmp_path / "run" / "table.md").read_text()
    assert "| 8192, 32 |" in md and "easy/semihard (1t)" in md
    for t in threads:  # the standard per-thread reports, which the report module regenerates
        assert (tmp_path / "run" / f"threads-{t}" / "results.md").exists()


def test_cpu_overrides_op_sets_checks_and_restores():
    # fastmine::_set_cpu_overrides returns what was in force and sets only what it
    # is given; a bad value names its argument and sets nothing.
    op = torch.ops.fastmine._set_cpu_overrides
    with cpu_overrides(block="", semihard="", noise=""):
        assert op() == ["", "", ""]
        assert op(block="64,256") == ["", "", ""]
        assert op(semihard="two", noise="scalar") == ["64,256", "", ""]
        for kw, name in ((dict(block="64"), "block"), (dict(block="0,256"), "block"),
                         (dict(block="64,256,1"), "block"), (dict(semihard="three"), "semihard"),
                         (dict(noise="avx512", block=""), "noise")):
            with pytest.raises(ValueError, match=name):
                op(**kw)
        assert op() == ["64,256", "two", "scalar"]
        with cpu_overrides(block="8,1", noise=""):
            assert op() == ["8,1", "two", ""]
        assert op() == ["64,256", "two", "scalar"]


def _in_fresh_process(env, code):
    env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", "import torch, fastmine\n" + code], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cpu_overrides_read_from_the_environment_at_first_use():
    # A fresh process (a benchmark's subprocess) starts from the variables.
    env = dict(FASTMINE_CPU_BLOCK="33,3", FASTMINE_CPU_SEMIHARD="one", FASTMINE_CPU_NOISE="avx2")
    p = _in_fresh_process(env, "print(torch.ops.fastmine._set_cpu_overrides())")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[-2] == "['33,3', 'one', 'avx2']"
    # A bad variable is an error naming it, at the first kernel call.
    p = _in_fresh_process(dict(FASTMINE_CPU_SEMIHARD="both"),
                          "fastmine.mine(torch.randn(6, 3), torch.arange(6) % 2, backend='cpu')")
    assert p.returncode != 0 and "FASTMINE_CPU_SEMIHARD" in p.stderr, p.stderr
