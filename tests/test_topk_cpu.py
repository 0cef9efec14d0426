"""The compiled CPU top-k / distance-weighted kernel (fastmine::mine_topk_cpu,
csrc/cpu/mine_topk_cpu.cpp): what is specific to it.  The cross-backend suite
(tests/test_topk_backends.py) checks every backend against
fastmine/reference_topk.py; here: every rule, distance, id mode and dtype
against the reference on data whose mining values are exact, the tiling and
threading paths (the block override, 1 vs 2 threads), k beyond the admissible
count and up to the kernel's bound, the distance-weighted prune (picks equal to
the reference's where the keys have no near-ties), k = 1 against the CPU
`mine` kernel, gradients, and the argument and data checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmine
from fastmine import _backends, _philox
from fastmine import reference_topk as rt
from fastmine._contract import DISTANCES, NEG_STRATEGIES, POS_STRATEGIES
from _cpu_overrides import cpu_overrides

pytestmark = pytest.mark.skipif("cpu" not in fastmine.available_backends()
                                or "topk" not in _backends.get("cpu").rules,
                                reason="the compiled CPU top-k kernel is not loaded")

K_MAX = 1024  # mine_topk_cpu.cpp kMaxK: min(k, M) per side

# (pos, neg, margin): every deterministic rule.
RULES = [("easy", "hard", None), ("hard", "easy", None), ("easy", "semihard", None),
         ("hard", "semihard", 2.5), ("easy", "semihard", 1.0)]
REFS = ["self", "self_ids", "bank", "bank_ids"]


def _int_data(n, d, m=None, seed=0, dtype=torch.float64, classes=3, lo=-3, hi=4, scale=1.0):
    """Integer-valued rows (times a power-of-two `scale`): every dot product and
    mining value is exact in float32 and float64, so the kernel and the
    reference rank the same numbers and indices must match exactly (ties
    included: integer data has many)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(lo, hi, (n, d), generator=g).to(dtype) * scale
    y = torch.randint(0, classes, (n,), generator=g)
    r = ry = None
    if m is not None:
        r = torch.randint(lo, hi, (m, d), generator=g).to(dtype) * scale
        ry = torch.randint(0, classes, (m,), generator=g)
    return x, y, r, ry


def _ids(refs, n, m):
    if refs == "self_ids":
        return dict(query_ids=torch.arange(n) // 2)  # pairs of rows are one sample
    if refs == "bank_ids":
        return dict(query_ids=torch.arange(n), ref_ids=torch.arange(m) + n // 2)
    return {}


def _assert_same(res, exp, dist_tol=0.0):
    for name in ("pos_idx", "neg_idx"):
        a, b = getattr(res, name), getattr(exp, name)
        assert a.shape == b.shape and a.dtype == b.dtype == torch.int64, name
        assert torch.equal(a, b), (name, a, b)
    for name in ("pos_dist", "neg_dist"):
        a, b = getattr(res, name), getattr(exp, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=dist_tol, atol=dist_tol)


# ------------------------------------------------------------------ every rule
@pytest.mark.parametrize("pos,neg,margin", RULES)
@pytest.mark.parametrize("distance,dtype", [("euclidean", torch.float32),
                                            ("euclidean", torch.float64),
                                            ("squared_euclidean", torch.float32)])
@pytest.mark.parametrize("refs", REFS)
def test_equals_reference_on_exact_data(pos, neg, margin, distance, refs, dtype):
    bank = refs.startswith("bank")
    n, m = 23, 37
    x, y, r, ry = _int_data(n, 5, m if bank else None, seed=1, dtype=dtype)
    ids = _ids(refs, n, m)
    for k_pos, k_neg in ((1, 1), (3, 5), (16, 2)):  # 16 > every class: trailing -1
        kw = dict(k_pos=k_pos, k_neg=k_neg, pos_strategy=pos, neg_strategy=neg,
                  distance=distance, margin=margin, **ids)
        res = fastmine.mine_topk(x, y, r, ry, backend="cpu", **kw)
        _assert_same(res, rt.mine_topk(x, y, r, ry, **kw), dist_tol=1e-6 if dtype == torch.float32
                     else 1e-12)
    assert bool((res.pos_idx == -1).any())


def _near_tie_equal(idx, ref_idx, key, tol):
    """idx, ref_idx: [N, k] picks; key: [N, M] float64 reference keys.  Equal,
    except where the two picked references' keys differ by at most tol
    (relative): mining values closer than the precision may rank either way."""
    assert idx.shape == ref_idx.shape
    diff = idx != ref_idx
    if not bool(diff.any()):
        return
    rows, cols = diff.nonzero(as_tuple=True)
    a, b = idx[rows, cols], ref_idx[rows, cols]
    assert bool(((a >= 0) & (b >= 0)).all()), (idx, ref_idx)
    ka, kb = key[rows, a], key[rows, b]
    assert torch.allclose(ka, kb, rtol=tol, atol=tol), (rows, cols, ka, kb)


@pytest.mark.parametrize("pos,neg,margin", RULES[:4])
@pytest.mark.parametrize("refs", ["self", "bank_ids"])
def test_cosine_equals_reference_up_to_near_ties(pos, neg, margin, refs):
    # Cosine mining values are not exact on integer data; ranks agree except at
    # near-ties (within float32 mining precision).
    bank = refs.startswith("bank")
    n, m = 30, 41
    x, y, r, ry = _int_data(n, 6, m if bank else None, seed=2, dtype=torch.float32)
    ids = _ids(refs, n, m)
    kw = dict(k_pos=4, k_neg=6, pos_strategy=pos, neg_strategy=neg, distance="cosine",
              margin=None if margin is None else 0.1, **ids)
    res = fastmine.mine_topk(x, y, r, ry, backend="cpu", **kw)
    exp = rt.mine_topk(x.double(), y, None if r is None else r.double(), ry, **kw)
    v = rt.mining_values(x.double(), (x if r is None else r).double(), "cosine")
    _near_tie_equal(res.pos_idx, exp.pos_idx, v, 1e-5)
    if neg != "semihard":  # a near-tie of the positive moves the whole window
        _near_tie_equal(res.neg_idx, exp.neg_idx, v, 1e-5)


# --------------------------------------------------------- tiles and threads
def _block_cases():
    # Small problems take small_gram tiles; the large one (128 x 512 x 64 dot
    # products per tile) takes BLAS.  "8,1": 8-row blocks, 64-reference chunks;
    # "7,3": 109-reference chunks, so sub-chunks start off a multiple of 4 (a
    # quad of distance-weighted noise straddles two of them).
    return [(70, 150, 6, 1 / 8), (300, 700, 64, 1 / 32)]


@pytest.mark.parametrize("n,m,d,scale", _block_cases())
@pytest.mark.parametrize("neg", ["hard", "semihard", "distance_weighted"])
def test_tiles_and_threads_give_identical_results(n, m, d, scale, neg):
    # Dyadic data (small integers times a power of two): exact dot products on
    # every path, and distances below 2 so that distance-weighted has candidates.
    x, y, r, ry = _int_data(n, d, m, seed=3, dtype=torch.float32, lo=-2, hi=3, scale=scale)
    kw = dict(k_pos=3, k_neg=5, neg_strategy=neg, seed=77,
              query_ids=torch.arange(n), ref_ids=torch.arange(m) + n // 3)
    runs = []
    threads = torch.get_num_threads()
    try:
        for block, nthreads in ((None, 2), (None, 1), ("8,1", 2), ("8,1", 1), ("33,3", 2),
                                ("7,3", 1)):
            torch.set_num_threads(nthreads)
            with cpu_overrides(block=block or ""):
                runs.append(fastmine.mine_topk(x, y, r, ry, backend="cpu", **kw))
    finally:
        torch.set_num_threads(threads)
    for res in runs[1:]:
        _assert_same(res, runs[0])
    exp = rt.mine_topk(x, y, r, ry, **kw)
    if neg != "distance_weighted":  # exact data: the reference's picks too
        _assert_same(runs[0], exp, dist_tol=1e-6)
    else:  # keys in float32 here, float64 there: equal up to near-ties
        _near_tie_equal(runs[0].neg_idx, exp.neg_idx, _dw_keys(x, r, 77), 1e-5)
    assert bool((runs[0].neg_idx >= 0).any())


# ------------------------------------------------------------------ k bounds
def test_k_beyond_the_admissible_count_leaves_trailing_minus_one():
    x, y, r, ry = _int_data(10, 4, 13, seed=4, classes=2)
    res = fastmine.mine_topk(x, y, r, ry, k_pos=20, k_neg=2000, backend="cpu")  # k > M
    exp = rt.mine_topk(x, y, r, ry, k_pos=20, k_neg=2000)
    _assert_same(res, exp, dist_tol=1e-12)
    n_pos = (ry[None, :] == y[:, None]).sum(1)
    for i in range(10):
        assert bool((res.pos_idx[i, :n_pos[i]] >= 0).all())
        assert bool((res.pos_idx[i, n_pos[i]:] == -1).all())
        assert bool((res.pos_dist[i, n_pos[i]:] == 0).all())
        assert bool((res.neg_idx[i, 13 - n_pos[i]:] == -1).all())


@pytest.mark.parametrize("k", [64, K_MAX])
def test_k_up_to_the_bound(k):
    x, y, r, ry = _int_data(8, 3, K_MAX + 40, seed=5, classes=2)
    for pos, neg in (("easy", "hard"), ("hard", "easy")):
        kw = dict(k_pos=k, k_neg=k, pos_strategy=pos, neg_strategy=neg)
        _assert_same(fastmine.mine_topk(x, y, r, ry, backend="cpu", **kw),
                     rt.mine_topk(x, y, r, ry, **kw), dist_tol=1e-12)


def test_k_beyond_the_bound_is_an_error_naming_it():
    x, y, r, ry = _int_data(4, 3, K_MAX + 1, seed=6)
    with pytest.raises(ValueError, match=f"k_neg = {K_MAX + 1} .*at most {K_MAX}"):
        fastmine.mine_topk(x, y, r, ry, k_neg=K_MAX + 1, backend="cpu")
    with pytest.raises(ValueError, match=f"k_pos = {K_MAX + 5} .*at most {K_MAX}"):
        fastmine.mine_topk(x, y, r, ry, k_pos=K_MAX + 5, backend="cpu")
    # only min(k, M) counts: any k with fewer references is fine
    res = fastmine.mine_topk(x, y, r[:50], ry[:50], k_neg=5 * K_MAX, backend="cpu")
    assert res.neg_idx.shape == (4, 5 * K_MAX) and bool((res.neg_idx[:, 50:] == -1).all())


# ------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("pos,neg,margin", [("easy", "hard", None), ("hard", "semihard", 1.0)])
def test_dtypes(dtype, pos, neg, margin):
    x, y, r, ry = _int_data(40, 8, 90, seed=7, dtype=dtype)  # small integers: exact in fp16/bf16
    kw = dict(k_pos=3, k_neg=4, pos_strategy=pos, neg_strategy=neg, margin=margin)
    res = fastmine.mine_topk(x, y, r, ry, backend="cpu", **kw)
    exp = rt.mine_topk(x, y, r, ry, **kw)
    assert res.pos_dist.dtype == dtype and res.neg_dist.dtype == dtype
    _assert_same(res, exp, dist_tol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_distance_weighted_dtypes(dtype):
    # Dyadic rows (exact in every dtype) of norm < 1: the mining values are
    # exact, so the keys differ from the reference's by float32 rounding only.
    x, y, r, ry = _int_data(30, 8, 70, seed=8, dtype=dtype, lo=-2, hi=3, scale=1 / 8)
    kw = dict(k_neg=4, neg_strategy="distance_weighted", seed=2 ** 64 - 1)
    res = fastmine.mine_topk(x, y, r, ry, backend="cpu", **kw)
    exp = rt.mine_topk(x, y, r, ry, **kw)
    v = rt.mining_values(x, r, "euclidean")
    key, _ = rt.distance_weighted_keys(v, 8, 0.5, 1.4, _philox.split_seed(2 ** 64 - 1))
    _near_tie_equal(res.neg_idx, exp.neg_idx, key, 1e-5)
    assert res.neg_dist.dtype == dtype


# ------------------------------------------------------- distance-weighted
def _dw_keys(x, r, seed, cutoff=0.5, nzc=1.4):
    v = rt.mining_values(x, r, "euclidean")
    return rt.distance_weighted_keys(v, x.shape[1], cutoff, nzc, _philox.split_seed(seed))[0]


@pytest.mark.parametrize("d", [2, 3, 16, 128])
@pytest.mark.parametrize("refs", REFS)
def test_distance_weighted_equals_reference(d, refs):
    bank = refs.startswith("bank")
    n, m = 40, 200
    g = torch.Generator().manual_seed(d)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, 4, (n,), generator=g)
    r = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1) if bank else None
    ry = torch.randint(0, 4, (m,), generator=g) if bank else None
    ids = _ids(refs, n, m)
    for seed in (12345, 2 ** 63 + 5):
        for k_neg, cutoff, nzc in ((1, 0.5, 1.4), (6, 0.5, 1.4), (4, 0.3, 1.45)):
            kw = dict(k_pos=2, k_neg=k_neg, neg_strategy="distance_weighted", seed=seed,
                      cutoff=cutoff, nonzero_loss_cutoff=nzc, **ids)
            res = fastmine.mine_topk(x, y, r, ry, backend="cpu", **kw)
            exp = rt.mine_topk(x, y, r, ry, **kw)
            assert torch.equal(res.pos_idx, exp.pos_idx)
            key = _dw_keys(x, x if r is None else r, seed, cutoff, nzc)
            _near_tie_equal(res.neg_idx, exp.neg_idx, key, 1e-5)
            torch.testing.assert_close(res.neg_dist[res.neg_idx == exp.neg_idx],
                                       exp.neg_dist[res.neg_idx == exp.neg_idx])


@pytest.mark.parametrize("form", ["avx2", "scalar"])
def test_distance_weighted_noise_forms_agree(form):
    # The kernel computes the Philox words of 16 quads at once in the widest
    # form the CPU runs (AVX-512, AVX2, or scalar noise_words calls);
    # the noise override forces a narrower one.  Same words, so the same picks
    # exactly (the reference agreement of the default form is tested above).
    g = torch.Generator().manual_seed(21)
    x = F.normalize(torch.randn(50, 32, generator=g), dim=1)
    y = torch.randint(0, 5, (50,), generator=g)
    r = F.normalize(torch.randn(700, 32, generator=g), dim=1)
    ry = torch.randint(0, 5, (700,), generator=g)
    runs = {}
    for f in (None, form):
        with cpu_overrides(noise=f or ""):
            runs[f] = [fastmine.mine_topk(x, y, r, ry, k_neg=k, neg_strategy="distance_weighted",
                                          seed=2 ** 64 - 3, backend="cpu").neg_idx for k in (1, 7)]
    for a, b in zip(runs[None], runs[form]):
        assert torch.equal(a, b)
        assert bool((a >= 0).all())


def test_distance_weighted_few_candidates_trailing_minus_one():
    # nonzero_loss_cutoff small: most references have w = 0 and are never picked.
    g = torch.Generator().manual_seed(9)
    x = F.normalize(torch.randn(40, 4, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, 3, (40,), generator=g)
    kw = dict(k_neg=12, neg_strategy="distance_weighted", seed=5, cutoff=0.2,
              nonzero_loss_cutoff=0.6)
    res = fastmine.mine_topk(x, y, backend="cpu", **kw)
    exp = rt.mine_topk(x, y, **kw)
    _near_tie_equal(res.neg_idx, exp.neg_idx, _dw_keys(x, x, 5, 0.2, 0.6), 1e-5)
    assert torch.equal(res.neg_idx == -1, exp.neg_idx == -1)
    assert bool((res.neg_idx == -1).any()) and bool((res.neg_idx >= 0).any())
    assert bool((res.neg_dist[res.neg_idx == -1] == 0).all())
    d = torch.cdist(x, x)
    picked = res.neg_idx.clamp_min(0)
    ok = res.neg_idx >= 0
    assert bool((d.gather(1, picked)[ok] < 0.6 + 1e-9).all())  # w > 0 only
    assert bool((y.gather(0, picked.flatten()).view_as(picked)[ok]
                 != y[:, None].expand_as(picked)[ok]).all())


def _no_near_ties(key, k, gap):
    """Rows whose k + 1 largest finite keys are pairwise more than `gap` apart."""
    top = key.masked_fill(~torch.isfinite(key), float("-inf")).topk(k + 1, dim=1).values
    fin = torch.isfinite(top)
    gaps = (top[:, :-1] - top[:, 1:]).abs()
    return ((gaps > gap) | ~fin[:, 1:]).all(1)


@pytest.mark.parametrize("d,spread", [(128, 1.0), (128, 0.25), (32, 0.5)])
def test_prune_never_changes_a_pick(d, spread):
    # Many references, clustered so that log-weights spread over far more than
    # G_MAX = 16.64 (D = 128: lw moves by ~63 per unit of log d): the prune
    # (per pair and per sub-chunk) skips most candidates' noise.  On rows
    # without near-ties the picks must equal the reference's exactly.
    g = torch.Generator().manual_seed(d)
    n, m = 64, 2000
    centers = F.normalize(torch.randn(8, d, generator=g, dtype=torch.float64), dim=1)
    x = F.normalize(centers[torch.arange(n) % 8] + spread * torch.randn(n, d, generator=g,
                                                                       dtype=torch.float64)
                    / d ** 0.5, dim=1)
    ry = torch.randint(0, 8, (m,), generator=g)
    r = F.normalize(centers[ry] + spread * torch.randn(m, d, generator=g, dtype=torch.float64)
                    / d ** 0.5, dim=1)
    y = torch.arange(n) % 8
    ry = (ry + 1) % 8  # labels shifted: the nearest cluster holds negatives
    for k in (1, 8):
        kw = dict(k_neg=k, neg_strategy="distance_weighted", seed=2024, cutoff=0.1,
                  nonzero_loss_cutoff=1.99)
        res = fastmine.mine_topk(x, y, r, ry, backend="cpu", **kw)
        exp = rt.mine_topk(x, y, r, ry, **kw)
        key = _dw_keys(x, r, 2024, 0.1, 1.99).masked_fill(ry[None, :] == y[:, None],
                                                         float("-inf"))
        clean = _no_near_ties(key, k, 1e-4)
        assert int(clean.sum()) >= n // 2
        assert torch.equal(res.neg_idx[clean], exp.neg_idx[clean])
        _near_tie_equal(res.neg_idx, exp.neg_idx, key, 1e-5)


# ------------------------------------------------------- k = 1 and gradients
@pytest.mark.parametrize("pos,neg,margin", RULES[:4])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_k1_equals_the_cpu_mine_kernel(pos, neg, margin, distance):
    # Same tiles and the same key code as fastmine::mine's CPU kernel: equal
    # indices bit for bit, also on random (non-exact) data.
    g = torch.Generator().manual_seed(10)
    x = torch.randn(150, 16, generator=g)
    y = torch.randint(0, 5, (150,), generator=g)
    kw = dict(pos_strategy=pos, neg_strategy=neg, distance=distance,
              margin=None if margin is None else 0.2)
    a = fastmine.mine(x, y, backend="cpu", **kw)
    b = fastmine.mine_topk(x, y, backend="cpu", **kw)
    assert torch.equal(a.pos_idx, b.pos_idx[:, 0]) and torch.equal(a.neg_idx, b.neg_idx[:, 0])
    assert torch.equal(a.pos_dist, b.pos_dist[:, 0]) and torch.equal(a.neg_dist, b.neg_dist[:, 0])


def test_mine_distance_weighted_is_column_zero():
    g = torch.Generator().manual_seed(11)
    x = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    y = torch.randint(0, 4, (60,), generator=g)
    a = fastmine.mine(x, y, neg_strategy="distance_weighted", seed=3, backend="cpu")
    b = fastmine.mine_topk(x, y, k_neg=5, neg_strategy="distance_weighted", seed=3, backend="cpu")
    assert torch.equal(a.neg_idx, b.neg_idx[:, 0])
    assert _backends.resolve("auto", torch.device("cpu"),
                             _backends.rules_needed("distance_weighted", True)) == "cpu"


@pytest.mark.parametrize("bank", [False, True])
def test_gradients_equal_the_reference(bank):
    x, y, r, ry = _int_data(20, 5, 30 if bank else None, seed=12)
    x = (x / 4).requires_grad_()
    if bank:
        r = (r / 4).requires_grad_()
    w = torch.randn(20, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = []
    for backend in ("cpu", "torch"):
        res = fastmine.mine_topk(x, y, r, ry, k_pos=3, k_neg=4, neg_strategy="semihard",
                                 backend=backend)
        loss = (torch.cat([res.pos_dist, res.neg_dist], 1) * w).sum()
        grads.append(torch.autograd.grad(loss, [x] + ([r] if bank else [])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ checks
@pytest.mark.parametrize("where,value,match", [
    ("embeddings", float("nan"), "embeddings contains NaN or Inf"),
    ("ref_emb", float("inf"), "ref_emb contains NaN or Inf"),
    ("embeddings", 1e30, "embeddings row 2 has norm"),
])
def test_data_checks(where, value, match):
    x, y, r, ry = _int_data(6, 3, 7, seed=13, dtype=torch.float32)
    (x if where == "embeddings" else r)[2, 1] = value
    for neg in ("hard", "distance_weighted"):
        with pytest.raises(ValueError, match=match):
            fastmine.mine_topk(x, y, r, ry, k_neg=2, neg_strategy=neg, backend="cpu")


def test_cosine_zero_row_is_an_error():
    x, y, _, _ = _int_data(6, 3, seed=14, dtype=torch.float32)
    x[4] = 0
    with pytest.raises(ValueError, match="cosine distance needs rows with a direction: "
                                         "embeddings row 4"):
        fastmine.mine_topk(x, y, k_pos=2, distance="cosine", backend="cpu")


def test_raw_op_checks_its_arguments():
    x, y, _, _ = _int_data(6, 3, seed=15, dtype=torch.float32)
    names = ["emb", "labels", "ref_emb", "ref_labels", "qid", "rid", "k_pos", "k_neg", "pos",
             "neg", "distance", "margin", "cutoff", "nzc", "seed"]
    base = [x, y, None, None, None, None, 2, 2, POS_STRATEGIES["easy"], NEG_STRATEGIES["hard"],
            DISTANCES["euclidean"], None, 0.5, 1.4, 0]

    def call(**changes):
        return torch.ops.fastmine.mine_topk_cpu(*[changes.get(k, v) for k, v in zip(names, base)])

    assert call()[0].shape == (6, 2)
    with pytest.raises(ValueError, match="k_pos must be >= 1"):
        call(k_pos=0)
    with pytest.raises(ValueError, match="distance_weighted needs distance euclidean"):
        call(neg=NEG_STRATEGIES["distance_weighted"], distance=DISTANCES["cosine"])
    with pytest.raises(ValueError, match="nonzero_loss_cutoff must be a finite number > 0"):
        call(neg=NEG_STRATEGIES["distance_weighted"], nzc=float("nan"))
    with pytest.raises(RuntimeError, match="labels must be 1-D of length 6"):
        call(labels=y[:5])
    with pytest.raises(RuntimeError, match="margin must be >= 0"):
        call(margin=0.5)
