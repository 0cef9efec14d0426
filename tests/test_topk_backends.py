"""The top-k / distance-weighted contract on every backend that implements it
(issue #17): each backend whose rules include "topk" (``fastmine._backends``)
must reproduce ``fastmine.reference_topk`` -- the indices exactly on
integer-valued data (mining values are then exact, so ties are real ties and go
to the smallest index), the selected values within the mining precision on
random data, the same distance-weighted draws for the same seed, the masks
always, and the gradients of the exact distances.

A backend joins this suite by adding "topk" (and "distance_weighted") to its
``Backend.rules``; sizes stay small so that ``triton`` under the interpreter
and ``cuda-emulated`` run it on a CPU.  FASTMINE_TEST_DEVICE=cuda runs the
backends on CUDA tensors (the reference stays on the CPU).
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

import fastmine
from fastmine import _backends, _philox
from fastmine import reference_topk as rt
from fastmine.reference import mining_values

# "torch" (the reference run through the op) is included: it checks the op path
# and that these tests pass on the oracle itself.
DEVICE = torch.device(os.environ.get("FASTMINE_TEST_DEVICE", "cpu"))
TOPK_BACKENDS = [b for b in fastmine.available_backends(DEVICE)
                 if "topk" in _backends.get(b).rules]
DW_BACKENDS = [b for b in TOPK_BACKENDS if "distance_weighted" in _backends.get(b).rules]

# (pos, neg, distance, margin) of the deterministic rules.
RULES = [("easy", "hard", "euclidean", None), ("hard", "easy", "squared_euclidean", None),
         ("easy", "semihard", "euclidean", None), ("hard", "semihard", "squared_euclidean", 2.0),
         ("easy", "hard", "cosine", None), ("hard", "semihard", "cosine", 0.25)]
KS = [(1, 1), (2, 5), (7, 3)]
REFS = ["self", "self_ids", "bank", "bank_ids"]


def _dev(t):
    return None if t is None else t.to(DEVICE)


def _cpu(res):
    return type(res)(*(t.cpu() for t in res))


def _topk(backend, x, y, r=None, ry=None, **kw):
    """fastmine.mine_topk of ``backend`` on DEVICE; the result on the CPU (differentiable:
    the inputs may be CPU leaves)."""
    kw = {k: _dev(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return _cpu(fastmine.mine_topk(_dev(x), _dev(y), _dev(r), _dev(ry), backend=backend, **kw))


def _mine(backend, x, y, r=None, ry=None, **kw):
    return _cpu(fastmine.mine(_dev(x), _dev(y), _dev(r), _dev(ry), backend=backend, **kw))


def _integer_data(n, d, m, seed, classes=4, scale=1.0):
    """Small integers (times ``scale``, a power of two: still exact) in [-3, 3]:
    every Gram value, squared norm and squared distance is exact in every float
    dtype used, so selections are exact and ties are real ties.  Few distinct
    values: many exact ties, which must go to the smallest index."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, d), generator=g).double() * scale
    y = torch.randint(0, classes, (n,), generator=g)
    r = ry = None
    if m is not None:
        r = torch.randint(-3, 4, (m, d), generator=g).double() * scale
        ry = torch.randint(0, classes, (m,), generator=g)
    return x, y, r, ry


def _ids(refs, n, m):
    if refs == "self_ids":
        return dict(query_ids=torch.arange(n) // 2)  # pairs of rows are one sample
    if refs == "bank_ids":
        return dict(query_ids=torch.arange(n), ref_ids=torch.arange(m) + n // 2)
    return {}


def _cast(dtype, *ts):
    return [None if t is None else t.to(dtype) for t in ts]


def _nonzero_rows(x):
    """Cosine needs non-zero rows: replace zero rows by a fixed integer row."""
    zero = (x == 0).all(dim=1)
    x = x.clone()
    x[zero] = 1.0
    return x


# ------------------------------------------------------------- exact on integer data
@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("pos,neg,dist,margin", RULES)
@pytest.mark.parametrize("refs", REFS)
def test_integer_data_exact_indices(backend, pos, neg, dist, margin, refs):
    bank = refs.startswith("bank")
    n, m, d = 19, (23 if bank else None), 5
    x, y, r, ry = _integer_data(n, d, m, seed=zlib.crc32(f"{pos}{neg}{dist}{refs}".encode()) % 1000)
    if dist == "cosine":  # cos values are not exact: only the no-near-tie rows compare
        x = _nonzero_rows(x)
        r = None if r is None else _nonzero_rows(r)
    ids = _ids(refs, n, m or n)
    dtypes = [torch.float64, torch.float32]
    for dtype in dtypes:
        xc, rc = _cast(dtype, x, r)
        for k_pos, k_neg in KS:
            kw = dict(k_pos=k_pos, k_neg=k_neg, pos_strategy=pos, neg_strategy=neg,
                      distance=dist, margin=margin)
            got = _topk(backend, xc, y, rc, ry, **kw, **ids)
            want = rt.mine_topk(xc, y, rc, ry, **kw, **ids)
            if dist == "cosine":
                _assert_same_values(got, want, xc, rc, dist, rtol=1e-5)
                continue
            assert torch.equal(got.pos_idx, want.pos_idx), (dtype, k_pos, k_neg)
            assert torch.equal(got.neg_idx, want.neg_idx), (dtype, k_pos, k_neg)
            assert got.pos_dist.dtype == dtype and got.neg_dist.dtype == dtype
            # sums of small integers are exact; sqrt is correctly rounded in the
            # kernels but torch's CPU sqrt is not always (float64 sqrt(51) is 1 ulp
            # off on AMD EPYC): within 1 ulp
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(got.pos_dist, want.pos_dist, rtol=eps, atol=0)
            torch.testing.assert_close(got.neg_dist, want.neg_dist, rtol=eps, atol=0)


# ---------------------------------------------- random data: values within precision
def _picked_values(v, idx):
    """v[i, idx[i, t]] (float64), and NaN where idx = -1."""
    out = torch.full(idx.shape, float("nan"), dtype=torch.float64)
    ok = idx >= 0
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    out[ok] = v.double()[rows[ok], idx[ok]]
    return out


def _assert_masks(res, y, ry, n, m, ids, self_refs):
    """Every pick respects the label and same-sample masks and is unique in its row."""
    qid = ids.get("query_ids", torch.arange(n) if self_refs else None)
    rid = ids.get("ref_ids", qid if self_refs else None)
    for idx, same in ((res.pos_idx, True), (res.neg_idx, False)):
        ok = idx >= 0
        rows = torch.arange(n)[:, None].expand_as(idx)[ok]
        cols = idx[ok]
        assert bool(((y[rows] == ry[cols]) == same).all())
        if qid is not None:
            assert bool((qid[rows] != rid[cols]).all())
        # -1 only trails, and picks are distinct within a row
        assert bool((ok[:, :-1] | ~ok[:, 1:]).all())
        for i in range(n):
            picks = idx[i][idx[i] >= 0]
            assert picks.unique().numel() == picks.numel()


def _assert_same_values(got, want, x, r, dist, rtol):
    """The t-th selected mining value of every row equals the reference's within
    rtol (so indices may differ only at near-ties), and -1 sits at the same slots."""
    rr = x if r is None else r
    v = mining_values(x.double(), rr.double(), dist)
    for g_idx, w_idx in ((got.pos_idx, want.pos_idx), (got.neg_idx, want.neg_idx)):
        assert torch.equal(g_idx >= 0, w_idx >= 0)
        gv, wv = _picked_values(v, g_idx), _picked_values(v, w_idx)
        ok = w_idx >= 0
        torch.testing.assert_close(gv[ok], wv[ok], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("pos,neg,dist,margin", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_data_within_precision(backend, pos, neg, dist, margin, dtype):
    g = torch.Generator().manual_seed(3)
    n, m, d = 21, 34, 6
    x = torch.randn(n, d, generator=g, dtype=dtype)
    r = torch.randn(m, d, generator=g, dtype=dtype)
    y, ry = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    if neg == "semihard" and margin is not None and dist != "cosine":
        margin = 6.0  # random Gaussian rows: a window that holds several negatives
    kw = dict(k_pos=3, k_neg=4, pos_strategy=pos, neg_strategy=neg, distance=dist,
              margin=margin)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for rr, rry, ids in ((None, None, {}), (r, ry, dict(query_ids=torch.arange(n),
                                                        ref_ids=torch.arange(m) + 10))):
        got = _topk(backend, x, y, rr, rry, **kw, **ids)
        want = rt.mine_topk(x, y, rr, rry, **kw, **ids)
        if neg == "semihard":  # the window moves with d_ap: compare the window's owner too
            assert torch.equal(got.pos_idx[:, 0] >= 0, want.pos_idx[:, 0] >= 0)
        _assert_same_values(got, want, x, rr, dist, rtol)
        _assert_masks(got, y, y if rr is None else rry, n, n if rr is None else m, ids,
                      self_refs=rr is None)
        # the distances are those of the selected pairs, recomputed exactly
        exp_pos = rt.pair_distances(x, x if rr is None else rr, got.pos_idx, dist)
        exp_neg = rt.pair_distances(x, x if rr is None else rr, got.neg_idx, dist)
        torch.testing.assert_close(got.pos_dist, exp_pos, rtol=rtol, atol=rtol)
        torch.testing.assert_close(got.neg_dist, exp_neg, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("pos,neg,dist,margin", RULES[:4])
def test_k1_equals_mine_on_the_backend(backend, pos, neg, dist, margin):
    x, y, r, ry = _integer_data(17, 4, 20, seed=11)
    for rr, rry in ((None, None), (r, ry)):
        top = _topk(backend, x, y, rr, rry, pos_strategy=pos, neg_strategy=neg,
                    distance=dist, margin=margin)
        one = _mine(backend, x, y, rr, rry, pos_strategy=pos, neg_strategy=neg, distance=dist,
                    margin=margin)
        assert torch.equal(top.pos_idx[:, 0], one.pos_idx)
        assert torch.equal(top.neg_idx[:, 0], one.neg_idx)
        torch.testing.assert_close(top.pos_dist[:, 0], one.pos_dist, rtol=0, atol=0)
        torch.testing.assert_close(top.neg_dist[:, 0], one.neg_dist, rtol=0, atol=0)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_selects_the_reference_values(backend, dtype):
    """fp16/bf16 inputs are mined in float32: the selected values equal the
    reference's on the same rounded inputs within the fp32 accumulation bound."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 8, generator=g).to(dtype)
    y = torch.randint(0, 3, (20,), generator=g)
    kw = dict(k_pos=2, k_neg=3, pos_strategy="easy", neg_strategy="hard")
    got = _topk(backend, x, y, **kw)
    want = rt.mine_topk(x.double(), y, **kw)
    assert got.pos_dist.dtype == dtype
    _assert_same_values(got, want, x, None, "euclidean", rtol=1e-5)


# ----------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("dist", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("refs", ["self", "bank_ids"])
def test_gradients_equal_the_reference(backend, dist, refs):
    bank = refs == "bank_ids"
    x, y, r, ry = _integer_data(11, 4, 13 if bank else None, seed=5)
    x = _nonzero_rows(x + 0.25 * torch.arange(4.0))  # no zero distance, exact values
    r = None if r is None else _nonzero_rows(r - 0.5)
    ids = _ids(refs, 11, 13)
    x.requires_grad_()
    if bank:
        r.requires_grad_()
    kw = dict(k_pos=3, k_neg=2, pos_strategy="hard", neg_strategy="hard", distance=dist)
    gen = torch.Generator().manual_seed(9)
    wp, wn = torch.rand(11, 3, generator=gen, dtype=x.dtype), torch.rand(11, 2, generator=gen,
                                                                        dtype=x.dtype)
    inputs = (x, r) if bank else (x,)
    got = _topk(backend, x, y, r, ry, **kw, **ids)
    want = rt.mine_topk(x, y, r, ry, **kw, **ids)
    if dist != "cosine":
        assert torch.equal(got.pos_idx, want.pos_idx) and torch.equal(got.neg_idx, want.neg_idx)
    else:  # compare the gradient of the backend's own picks with plain autograd of them
        want = rt.TopKResult(got.pos_idx, got.neg_idx,
                             rt.pair_distances(x, x if r is None else r, got.pos_idx, dist),
                             rt.pair_distances(x, x if r is None else r, got.neg_idx, dist))
    gg = torch.autograd.grad((got.pos_dist * wp).sum() + (got.neg_dist * wn).sum(), inputs)
    gw = torch.autograd.grad((want.pos_dist * wp).sum() + (want.neg_dist * wn).sum(), inputs)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ distance-weighted draws
def _dw_data(n, d, m, seed, classes=3):
    """Rows with coordinates in multiples of 1/8, scaled to norms near 1: the
    squared distances are exact dyadic rationals in every dtype, so the keys of
    two backends differ only by their float32 logarithms."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, d), generator=g).double() / 8
    y = torch.randint(0, classes, (n,), generator=g)
    r = ry = None
    if m is not None:
        r = torch.randint(-3, 4, (m, d), generator=g).double() / 8
        ry = torch.randint(0, classes, (m,), generator=g)
    return x, y, r, ry


def _dw_keys(x, r, seed, cutoff, nzlc):
    rr = x if r is None else r
    v = mining_values(x, rr, "euclidean")
    key, _ = rt.distance_weighted_keys(v, x.shape[1], cutoff, nzlc, _philox.split_seed(seed))
    return key


@pytest.mark.parametrize("backend", DW_BACKENDS)
@pytest.mark.parametrize("refs", REFS)
@pytest.mark.parametrize("seed", [0, 12345, 2 ** 63 + 7, 2 ** 64 - 1])
def test_distance_weighted_same_seed_same_picks(backend, refs, seed):
    """The same seed draws the same references as the reference backend; where a
    pick differs, the reference's float64 keys of the two candidates are within
    1e-5 (a float32 near-tie), never more."""
    bank = refs.startswith("bank")
    n, m, d = 24, (29 if bank else None), 6
    x, y, r, ry = _dw_data(n, d, m, seed=seed % 97)
    ids = _ids(refs, n, m or n)
    cutoff, nzlc = 0.3, 1.3
    key = _dw_keys(x, r, seed, cutoff, nzlc)
    differ = 0
    for dtype in (torch.float64, torch.float32):
        xc, rc = _cast(dtype, x, r)
        kw = dict(k_pos=2, k_neg=4, neg_strategy="distance_weighted", cutoff=cutoff,
                  nonzero_loss_cutoff=nzlc, seed=seed)
        got = _topk(backend, xc, y, rc, ry, **kw, **ids)
        want = rt.mine_topk(xc, y, rc, ry, **kw, **ids)
        assert torch.equal(got.pos_idx, want.pos_idx)
        assert torch.equal(got.neg_idx >= 0, want.neg_idx >= 0)
        kg, kw_ = _picked_values(key, got.neg_idx), _picked_values(key, want.neg_idx)
        ok = want.neg_idx >= 0
        torch.testing.assert_close(kg[ok], kw_[ok], rtol=1e-5, atol=1e-5)
        differ += int((got.neg_idx != want.neg_idx).sum())
        _assert_masks(got, y, y if r is None else ry, n, m or n, ids, self_refs=r is None)
        # w > 0 for every pick: d < nonzero_loss_cutoff
        picked = got.neg_dist.double()[got.neg_idx >= 0]
        assert bool((picked < nzlc).all())
    assert bool((want.neg_idx >= 0).any()), "the test data must have candidates"
    assert differ <= 2, f"{differ} picks differ: more than float32 near-ties explain"


@pytest.mark.parametrize("backend", DW_BACKENDS)
def test_distance_weighted_k1_is_mine_and_column0(backend):
    x, y, _, _ = _dw_data(30, 5, None, seed=2)
    kw = dict(neg_strategy="distance_weighted", seed=99)
    one = _mine(backend, x, y, **kw)
    top = _topk(backend, x, y, k_neg=3, **kw)
    assert torch.equal(one.neg_idx, top.neg_idx[:, 0])
    torch.manual_seed(1)
    a = _mine(backend, x, y, neg_strategy="distance_weighted")
    torch.manual_seed(1)
    b = _mine(backend, x, y, neg_strategy="distance_weighted")
    assert torch.equal(a.neg_idx, b.neg_idx)  # seed=None follows torch.manual_seed


@pytest.mark.parametrize("backend", DW_BACKENDS)
def test_distance_weighted_picks_follow_the_law(backend):
    """2,000 copies of one anchor in one call draw independent noise (the counter
    is the anchor's row): their k = 1 picks follow p_j ~ w_j (a frequency check
    per backend, 5 standard deviations; the exact chi-square test over 20,000
    seeds is on the reference, tests/test_topk_reference.py, and the backends
    draw the reference's picks for the same seed, test above)."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(1, 4, generator=g, dtype=torch.float64), dim=1)
    r = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    trials = 2000
    y, ry = torch.zeros(trials, dtype=torch.long), torch.ones(6, dtype=torch.long)
    lw, pos = rt.distance_weighted_log_weight(mining_values(x, r, "euclidean"), 4, 0.5, 1.4)
    p = torch.softmax(lw[0], dim=0)
    res = _topk(backend, x.expand(trials, 4).contiguous(), y, r, ry, k_pos=1,
                neg_strategy="distance_weighted", seed=4321)
    counts = torch.bincount(res.neg_idx[:, 0], minlength=6).double()
    assert int(counts.sum()) == trials
    assert bool((counts[~pos[0]] == 0).all())
    sd = (p * (1 - p) * trials).sqrt()
    assert bool(((counts - p * trials).abs() <= 5 * sd + 1).all()), (counts, p * trials)
