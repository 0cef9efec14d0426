"""The top-k / distance-weighted reference (fastmine/reference_topk.py), against
oracles written here.

* Top-k: a per-anchor Python sort by (key, index) over the admissible
  references, on float64 values that are exact for the integer-valued data
  used (so exact ties are real and must go to the smallest index).
* k = 1 equals ``fastmine.mine(..., backend="torch")`` bit for bit.
* Distance-weighted: the pick frequencies over 20,000 seeds against the exact
  probabilities w / sum(w), computed here from float64 distances (chi-square
  per anchor, p > 0.001); k = 2 against the exact without-replacement law
  p_a p_b / (1 - p_a).  A self-check computes the same statistic for wrong
  laws (exponent D + 1, no cutoff clamp, no nonzero-loss cutoff, draws with
  replacement) and requires them to be rejected, so the test has the power to
  fail.  The 20,000 seeds run as one batch (Philox keys as [S, 1, 1] tensors).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import fastmine
from fastmine import _philox as px
from fastmine import reference_topk as rt
from fastmine.reference import mining_values

DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
STRATEGIES = [("easy", "hard", None), ("hard", "easy", None), ("easy", "semihard", None),
              ("hard", "semihard", None), ("easy", "semihard", 0.5), ("hard", "semihard", 1.0),
              ("easy", "easy", None), ("hard", "hard", None)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every problem here is tiny: one intra-op thread (restored afterwards), so
    that a loaded machine's OpenMP contention cannot turn each 24 x 5 matmul
    into tens of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- data -----------------------------------------------------------------------

def _integer_rows(n, d, distance, gen):
    """Small-integer rows whose mining values are exact in float32: entries in
    {-1, 0, 1} (Euclidean), or exactly four +-1 entries (cosine: |x| = 2, so
    x / |x| and 1 - a.b / 4 are exact).  Many exact ties."""
    if distance == "cosine":
        x = torch.zeros(n, d)
        for i in range(n):
            cols = torch.randperm(d, generator=gen)[:4]
            x[i, cols] = torch.randint(0, 2, (4,), generator=gen).float() * 2 - 1
        return x
    return torch.randint(-1, 2, (n, d), generator=gen).float()


def _problem(variant, distance, dtype, gen, n=14, m=11, d=6, classes=3):
    """(x, y, r, ry, query_ids, ref_ids) for the four reference set-ups."""
    x = _integer_rows(n, d, distance, gen).to(dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    if variant == "batch":
        return x, y, None, None, None, None
    if variant == "batch_ids":  # rows 2k, 2k+1 are views of one sample
        return x, y, None, None, torch.arange(n) // 2, None
    r = _integer_rows(m, d, distance, gen).to(dtype)
    ry = torch.randint(0, classes, (m,), generator=gen)
    if variant == "bank":
        return x, y, r, ry, None, None
    qid = torch.arange(n)
    rid = torch.randint(0, n, (m,), generator=gen)  # some bank rows are stored anchors
    return x, y, r, ry, qid, rid


# --- the independent oracle -------------------------------------------------------

def _exact_values(x, r, distance):
    """float64 mining values, exact for _integer_rows: squared differences, or
    1 - a.b / 4 for the cosine rows (|a| = |b| = 2)."""
    a, b = x.double(), r.double()
    if distance == "cosine":
        assert bool(((a * a).sum(1) == 4).all()) and bool(((b * b).sum(1) == 4).all())
        return 1 - (a @ b.T) / 4
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _oracle_topk(x, y, r, ry, qid, rid, k_pos, k_neg, pos, neg, distance, margin):
    """Per anchor, a Python sort by (key, index) of the admissible references."""
    if r is None:
        r, ry = x, y
        qid = torch.arange(x.shape[0]) if qid is None else qid
        rid = qid
    v = _exact_values(x, r, distance).tolist()
    n, m = x.shape[0], r.shape[0]
    pos_out, neg_out = [], []
    for i in range(n):
        def ok(j):
            return qid is None or int(qid[i]) != int(rid[j])
        same = [j for j in range(m) if ok(j) and int(ry[j]) == int(y[i])]
        diff = [j for j in range(m) if ok(j) and int(ry[j]) != int(y[i])]
        sign = -1.0 if pos == "hard" else 1.0  # farthest first: sort by (-v, j)
        p = sorted(same, key=lambda j: (sign * v[i][j], j))
        if neg == "semihard":
            if p:
                v_ap = v[i][p[0]]
                if margin is None:
                    hi = math.inf
                elif distance == "euclidean":
                    hi = (math.sqrt(v_ap) + margin) ** 2
                else:
                    hi = v_ap + margin
                diff = [j for j in diff if v_ap < v[i][j] < hi]
            else:
                diff = []
        sign = -1.0 if neg == "easy" else 1.0
        q = sorted(diff, key=lambda j: (sign * v[i][j], j))
        pos_out.append((p[:k_pos] + [-1] * k_pos)[:k_pos])
        neg_out.append((q[:k_neg] + [-1] * k_neg)[:k_neg])
    exact_d = torch.tensor(v, dtype=torch.float64)
    if distance == "euclidean":
        exact_d = exact_d.sqrt()
    return torch.tensor(pos_out).view(n, k_pos), torch.tensor(neg_out).view(n, k_neg), exact_d


def _check_distances(idx, dist, exact_d):
    want = torch.where(idx >= 0, exact_d.gather(1, idx.clamp_min(0)), torch.zeros(()))
    torch.testing.assert_close(dist.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["batch", "batch_ids", "bank", "bank_ids"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("pos,neg,margin", STRATEGIES)
def test_topk_matches_independent_oracle(variant, distance, pos, neg, margin):
    # a fixed seed per case (str hashes are salted per process: zlib.crc32 is not)
    case = repr((variant, distance, pos, neg, margin)).encode()
    gen = torch.Generator().manual_seed(zlib.crc32(case))
    for dtype in (torch.float32, torch.float64):
        x, y, r, ry, qid, rid = _problem(variant, distance, dtype, gen)
        for k_pos, k_neg in ((1, 1), (2, 5), (6, 3)):
            res = rt.mine_topk(x, y, r, ry, k_pos=k_pos, k_neg=k_neg, pos_strategy=pos,
                               neg_strategy=neg, distance=distance, margin=margin,
                               query_ids=qid, ref_ids=rid)
            want_p, want_n, exact_d = _oracle_topk(x, y, r, ry, qid, rid, k_pos, k_neg, pos, neg,
                                                   distance, margin)
            assert torch.equal(res.pos_idx, want_p), (dtype, k_pos)
            assert torch.equal(res.neg_idx, want_n), (dtype, k_neg)
            assert res.pos_dist.dtype == dtype and res.pos_dist.shape == (x.shape[0], k_pos)
            _check_distances(res.pos_idx, res.pos_dist, exact_d)
            _check_distances(res.neg_idx, res.neg_dist, exact_d)


def test_oracle_data_has_ties_and_short_rows():
    """The oracle test is only meaningful if its data has exact ties among the
    selected candidates and rows with fewer admissible references than k."""
    gen = torch.Generator().manual_seed(0)
    x, y, *_ = _problem("batch", "euclidean", torch.float32, gen)
    v = _exact_values(x, x, "euclidean")
    same = y[:, None] == y[None, :]
    row_ties = [len(set(v[i][same[i]].tolist())) < int(same[i].sum()) for i in range(len(y))]
    assert sum(row_ties) >= 3
    res = rt.mine_topk(x, y, k_pos=6, k_neg=3)
    assert bool((res.pos_idx[:, -1] == -1).any())


# --- k = 1 is fastmine.mine ----------------------------------------------------------

@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("pos,neg,margin", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_k1_equals_mine_torch(distance, pos, neg, margin, dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(24, 5, generator=gen).to(dtype)
    y = torch.randint(0, 4, (24,), generator=gen)
    r = torch.randn(17, 5, generator=gen).to(dtype)
    ry = torch.randint(0, 4, (17,), generator=gen)
    qid, rid = torch.arange(24), torch.randint(0, 24, (17,), generator=gen)
    for args, kw in (((x, y), {}), ((x, y), {"query_ids": torch.arange(24) // 3}),
                     ((x, y, r, ry), {}), ((x, y, r, ry), {"query_ids": qid, "ref_ids": rid})):
        want = fastmine.mine(*args, pos_strategy=pos, neg_strategy=neg, distance=distance,
                             margin=margin, backend="torch", **kw)
        got = rt.mine_topk(*args, pos_strategy=pos, neg_strategy=neg, distance=distance,
                           margin=margin, **kw)
        assert torch.equal(got.pos_idx[:, 0], want.pos_idx)
        assert torch.equal(got.neg_idx[:, 0], want.neg_idx)
        assert torch.equal(got.pos_dist[:, 0], want.pos_dist)
        assert torch.equal(got.neg_dist[:, 0], want.neg_dist)


def test_topk_prefix_of_larger_k():
    """The first k' columns of a top-k are the top-k' (the order is the strategy's)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=gen)
    y = torch.randint(0, 3, (30,), generator=gen)
    for pos, neg, margin in STRATEGIES:
        big = rt.mine_topk(x, y, k_pos=7, k_neg=9, pos_strategy=pos, neg_strategy=neg,
                           margin=margin)
        small = rt.mine_topk(x, y, k_pos=2, k_neg=4, pos_strategy=pos, neg_strategy=neg,
                             margin=margin)
        assert torch.equal(big.pos_idx[:, :2], small.pos_idx)
        assert torch.equal(big.neg_idx[:, :4], small.neg_idx)


# --- invariants, short rows, gradients ----------------------------------------------

def _check_invariants(res, y, ry, qid, rid, k_pos, k_neg):
    for idx, want_same in ((res.pos_idx, True), (res.neg_idx, False)):
        for i, row in enumerate(idx.tolist()):
            picked = [j for j in row if j >= 0]
            assert row == picked + [-1] * (len(row) - len(picked)), "-1 must be trailing"
            assert len(set(picked)) == len(picked), "a reference picked twice"
            for j in picked:
                assert (int(ry[j]) == int(y[i])) == want_same, "label mask violated"
                if qid is not None:
                    assert int(qid[i]) != int(rid[j]), "same-sample pair selected"
    assert bool((res.pos_dist[res.pos_idx < 0] == 0).all())
    assert bool((res.neg_dist[res.neg_idx < 0] == 0).all())


@pytest.mark.parametrize("neg", ["hard", "easy", "semihard", "distance_weighted"])
def test_masks_never_violated(neg):
    gen = torch.Generator().manual_seed(11)
    x = torch.nn.functional.normalize(torch.randn(40, 3, generator=gen), dim=1)
    y = torch.randint(0, 3, (40,), generator=gen)
    qid = torch.arange(40) // 2
    r = torch.nn.functional.normalize(torch.randn(25, 3, generator=gen), dim=1)
    ry = torch.randint(0, 3, (25,), generator=gen)
    rid = torch.randint(0, 20, (25,), generator=gen)
    for seed in range(5):
        for args, ids in (((x, y), (qid, qid)), ((x, y, r, ry), (qid, rid))):
            kw = {"query_ids": ids[0]}
            if len(args) == 4:
                kw["ref_ids"] = ids[1]
            res = rt.mine_topk(*args, k_pos=4, k_neg=30, neg_strategy=neg, seed=seed,
                               nonzero_loss_cutoff=1.6, **kw)
            ref_y = y if len(args) == 2 else ry
            _check_invariants(res, y, ref_y, ids[0], ids[1], 4, 30)


def test_fewer_admissible_than_k():
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    y = torch.tensor([0, 0, 1, 2])
    res = rt.mine_topk(x, y, k_pos=3, k_neg=4)
    assert res.pos_idx.tolist() == [[1, -1, -1], [0, -1, -1], [-1, -1, -1], [-1, -1, -1]]
    assert res.neg_idx.tolist() == [[2, 3, -1, -1], [2, 3, -1, -1], [1, 0, 3, -1], [2, 1, 0, -1]]
    assert res.pos_dist.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert res.neg_dist.tolist() == [[3, 10, 0, 0], [2, 9, 0, 0], [2, 3, 7, 0], [7, 9, 10, 0]]
    # semi-hard: no positive -> no negative; an empty bank -> all -1
    semi = rt.mine_topk(x, y, k_pos=2, k_neg=2, neg_strategy="semihard")
    assert semi.neg_idx.tolist() == [[2, 3], [2, 3], [-1, -1], [-1, -1]]
    empty = rt.mine_topk(x, y, x[:0], y[:0], k_pos=2, k_neg=3)
    assert empty.pos_idx.shape == (4, 2) and bool((empty.pos_idx == -1).all())
    assert empty.neg_dist.shape == (4, 3) and bool((empty.neg_dist == 0).all())
    none = rt.mine_topk(x[:0], y[:0], k_pos=2, k_neg=3)
    assert none.pos_idx.shape == (0, 2) and none.neg_dist.shape == (0, 3)


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradients_by_plain_autograd(distance):
    """The distances are the exact pair distances, differentiable w.r.t. both
    sides (gradcheck, float64); padded slots get exactly zero gradient."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 3])
    ry = torch.tensor([0, 1, 1, 2, 0, 2, 2])

    def f(x_, r_):
        res = rt.mine_topk(x_, y, r_, ry, k_pos=3, k_neg=3, distance=distance)
        return res.pos_dist, res.neg_dist

    assert torch.autograd.gradcheck(f, (x, r))
    res = rt.mine_topk(x, y, r, ry, k_pos=3, k_neg=3, distance=distance)
    assert bool((res.pos_idx[8] == -1).all())  # class 3 has no positive in the bank
    gx, = torch.autograd.grad(res.pos_dist[8].sum() + 0 * res.pos_dist.sum(), x)
    assert bool((gx == 0).all())


def test_argument_checks():
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="euclidean"):
        rt.mine_topk(x, y, neg_strategy="distance_weighted", distance="cosine")
    with pytest.raises(ValueError, match="cutoff"):
        rt.mine_topk(x, y, neg_strategy="distance_weighted", cutoff=0.0)
    with pytest.raises(ValueError, match="nonzero_loss_cutoff"):
        rt.mine_topk(x, y, neg_strategy="distance_weighted", nonzero_loss_cutoff=-1.0)
    with pytest.raises(ValueError, match="margin"):
        rt.mine_topk(x, y, neg_strategy="distance_weighted", margin=0.1)
    with pytest.raises(ValueError, match="k_neg"):
        rt.mine_topk(x, y, k_neg=0)
    with pytest.raises(TypeError, match="k_pos"):
        rt.mine_topk(x, y, k_pos=1.5)
    with pytest.raises(ValueError, match="neg_strategy"):
        rt.mine_topk(x, y, neg_strategy="weighted")


# --- distance-weighted ---------------------------------------------------------------

CUTOFF, NZLC, DIM = 0.5, 1.4, 5


def _exact_weights(x, r, cutoff=CUTOFF, nzlc=NZLC, dim=DIM, clamp=True, zero_far=True):
    """w(d) = dc^(2-D) (1 - dc^2/4)^((3-D)/2), dc = max(d, cutoff), from float64
    direct-difference distances; 0 where dc >= min(nzlc, 2).  The keyword
    switches build the wrong laws of the self-check."""
    d = (x.double()[:, None, :] - r.double()[None, :, :]).norm(dim=-1)
    dc = d.clamp_min(cutoff) if clamp else d
    w = dc ** (2 - dim) * (1 - dc ** 2 / 4) ** ((3 - dim) / 2)
    far = dc >= min(nzlc, 2.0) if zero_far else dc >= 2.0
    return torch.where(far, torch.zeros_like(w), w), d


def _dw_problem():
    """8 anchors on S^4 and a 16-row bank: 8 near-copies (d ~ 0.1-0.45, below
    the cutoff) of the anchors with another label, and 8 random rows (many
    beyond the nonzero-loss cutoff); one same-sample pair excluded by ids."""
    gen = torch.Generator().manual_seed(2017)
    unit = torch.nn.functional.normalize
    x = unit(torch.randn(8, DIM, generator=gen, dtype=torch.float64), dim=1)
    near = unit(x + 0.15 * torch.randn(8, DIM, generator=gen, dtype=torch.float64), dim=1)
    far = unit(torch.randn(8, DIM, generator=gen, dtype=torch.float64), dim=1)
    r = torch.cat([near, far])
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ry = torch.cat([(y + 1) % 4, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])])
    qid = torch.arange(8)
    rid = torch.arange(100, 116)
    rid[9] = 2  # bank row 9 is a stored copy of anchor 2
    return x, y, r, ry, qid, rid


def _admissible(y, ry, qid, rid):
    return (y[:, None] != ry[None, :]) & (qid[:, None] != rid[None, :])


def _seeds(s):
    """s distinct seeds spread over the 64-bit range (both key words vary)."""
    return [(t * 0x9E3779B97F4A7C15 + 12345) % 2 ** 64 for t in range(s)]


def _batched_picks(x, r, adm, seeds, k):
    """neg_idx [S, N, k] for S seeds at once, through the reference's own key
    and top-k functions (checked against mine_topk for some seeds below)."""
    keys = torch.tensor([px.split_seed(s) for s in seeds], dtype=torch.int64)
    v = mining_values(x, r, "euclidean")
    key, positive = rt.distance_weighted_keys(v, x.shape[1], CUTOFF, NZLC,
                                              (keys[:, 0, None, None], keys[:, 1, None, None]))
    return rt.topk_by_key(key, adm & positive, k, largest=True)


def _chi2_pvalue(observed, expected, min_expected=5.0):
    """Pearson chi-square p-value; cells expected < min_expected are pooled.
    expected sums to observed's total.  Returns (p, chi2, df)."""
    obs, exp = observed.double(), expected.double()
    small = exp < min_expected
    if bool(small.any()):
        obs = torch.cat([obs[~small], obs[small].sum().view(1)])
        exp = torch.cat([exp[~small], exp[small].sum().view(1)])
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):  # mass where the law has none
        return 0.0, math.inf, int(keep.sum()) - 1
    obs, exp = obs[keep], exp[keep]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    if df <= 0:
        return 1.0, chi2, df
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(chi2 / 2, dtype=torch.float64)))
    return p, chi2, df


S = 20000


@pytest.fixture(scope="module")
def dw_samples():
    x, y, r, ry, qid, rid = _dw_problem()
    adm = _admissible(y, ry, qid, rid)
    seeds = _seeds(S)
    picks = _batched_picks(x, r, adm, seeds, 2)  # [S, N, 2]
    return x, y, r, ry, qid, rid, adm, seeds, picks


def test_dw_batched_path_is_mine_topk(dw_samples):
    x, y, r, ry, qid, rid, adm, seeds, picks = dw_samples
    for t in list(range(0, S, 997)):
        res = rt.mine_topk(x, y, r, ry, k_neg=2, neg_strategy="distance_weighted", seed=seeds[t],
                           cutoff=CUTOFF, nonzero_loss_cutoff=NZLC, query_ids=qid, ref_ids=rid)
        assert torch.equal(res.neg_idx, picks[t])
        one = rt.mine_topk(x, y, r, ry, neg_strategy="distance_weighted", seed=seeds[t],
                           cutoff=CUTOFF, nonzero_loss_cutoff=NZLC, query_ids=qid, ref_ids=rid)
        assert torch.equal(one.neg_idx[:, 0], picks[t, :, 0])  # k = 1 is the first draw


def _law_k1(x, r, adm, **wrong):
    w, _ = _exact_weights(x, r, **wrong)
    w = torch.where(adm, w, torch.zeros_like(w))
    return w / w.sum(1, keepdim=True)


def _k1_pvalues(picks, p):
    n, m = p.shape
    out = []
    for i in range(n):
        counts = torch.bincount(picks[:, i, 0], minlength=m)
        out.append(_chi2_pvalue(counts, S * p[i])[0])
    return out


def test_dw_problem_exercises_cutoffs(dw_samples):
    """Every anchor has a reference below the cutoff and one beyond the
    nonzero-loss cutoff among its admissible ones, and several with w > 0."""
    x, y, r, ry, qid, rid, adm, *_ = dw_samples
    _, d = _exact_weights(x, r)
    for i in range(x.shape[0]):
        di = d[i][adm[i]]
        assert bool((di < CUTOFF).any()) and bool((di >= NZLC).any())
        assert int(((di < NZLC)).sum()) >= 3
    assert not bool(adm[2, 9])  # the same-sample pair is excluded


def test_dw_k1_frequencies_match_exact_probabilities(dw_samples):
    x, y, r, ry, qid, rid, adm, seeds, picks = dw_samples
    p = _law_k1(x, r, adm)
    assert bool((picks[:, :, 0] >= 0).all())
    # never a reference with zero probability: other class, w = 0, same sample
    hit = torch.zeros_like(p, dtype=torch.bool)
    hit.scatter_(1, picks[:, :, 0].T, True)
    assert not bool((hit & (p == 0)).any())
    pvals = _k1_pvalues(picks, p)
    assert min(pvals) > 1e-3, pvals


def test_dw_k1_self_check_rejects_wrong_laws(dw_samples):
    """The statistic has power: the correct sampler's counts are rejected
    (some anchor p < 1e-3) against the law with exponent D + 1, without the
    cutoff clamp, and without the nonzero-loss cutoff."""
    x, y, r, ry, qid, rid, adm, seeds, picks = dw_samples
    for wrong in ({"dim": DIM + 1}, {"clamp": False}, {"zero_far": False}):
        pvals = _k1_pvalues(picks, _law_k1(x, r, adm, **wrong))
        assert min(pvals) < 1e-3, (wrong, pvals)


def _pair_law(p_row, with_replacement=False):
    """P(first = a, second = b), a != b: p_a p_b / (1 - p_a) (Gumbel-top-2, i.e.
    sequential draws without replacement), or the wrong law p_a p_b / (1 - sum p^2)."""
    outer = p_row[:, None] * p_row[None, :]
    outer.fill_diagonal_(0)
    if with_replacement:
        return outer / outer.sum()
    return outer / (1 - p_row[:, None]).clamp_min(1e-300)


def _k2_pvalues(picks, p, with_replacement=False):
    n, m = p.shape
    out = []
    for i in range(n):
        a, b = picks[:, i, 0], picks[:, i, 1]
        assert bool((b >= 0).all()) and bool((a != b).all())
        counts = torch.bincount(a * m + b, minlength=m * m)
        law = _pair_law(p[i], with_replacement).flatten()
        out.append(_chi2_pvalue(counts, S * law)[0])
    return out


def test_dw_k2_matches_without_replacement_law(dw_samples):
    x, y, r, ry, qid, rid, adm, seeds, picks = dw_samples
    p = _law_k1(x, r, adm)
    assert abs(float(_pair_law(p[0]).sum()) - 1) < 1e-12
    pvals = _k2_pvalues(picks, p)
    assert min(pvals) > 1e-3, pvals
    wrong = _k2_pvalues(picks, p, with_replacement=True)
    assert min(wrong) < 1e-3, wrong


def test_dw_reproducible_and_seed_none():
    x, y, r, ry, qid, rid = _dw_problem()
    kw = dict(k_neg=3, neg_strategy="distance_weighted", query_ids=qid, ref_ids=rid)
    a = rt.mine_topk(x, y, r, ry, seed=42, **kw)
    assert torch.equal(a.neg_idx, rt.mine_topk(x, y, r, ry, seed=42, **kw).neg_idx)
    others = [rt.mine_topk(x, y, r, ry, seed=s, **kw).neg_idx for s in (43, 2 ** 63, 2 ** 64 - 1)]
    assert any(not torch.equal(a.neg_idx, o) for o in others)
    torch.manual_seed(5)
    b = rt.mine_topk(x, y, r, ry, **kw)
    torch.manual_seed(5)
    assert torch.equal(b.neg_idx, rt.mine_topk(x, y, r, ry, **kw).neg_idx)
    torch.manual_seed(5)
    assert torch.equal(b.neg_idx, rt.mine_topk(x, y, r, ry, seed=px.draw_seed(), **kw).neg_idx)


def test_dw_weight_thresholds_on_the_mining_value():
    """Zero weight at d >= nonzero_loss_cutoff (as mined), and at d >= 2 even when
    nonzero_loss_cutoff > 2; the clamp makes d < cutoff weigh as d = cutoff."""
    x = torch.zeros(1, 2, dtype=torch.float64)
    r = torch.tensor([[1.4, 0.0], [1.39, 0.0], [2.0, 0.0], [2.5, 0.0], [0.1, 0.0], [0.4, 0.0],
                      [0.5, 0.0]], dtype=torch.float64)
    v = mining_values(x, r, "euclidean")
    log_w, positive = rt.distance_weighted_log_weight(v, 2, 0.5, 1.4)
    assert positive[0].tolist() == [False, True, False, False, True, True, True]
    assert log_w[0, 4] == log_w[0, 5] == log_w[0, 6]  # all clamped to d = 0.5
    _, positive3 = rt.distance_weighted_log_weight(v, 2, 0.5, 3.0)
    assert positive3[0].tolist() == [True, True, False, False, True, True, True]
    # the value itself: D = 7 at d = 1.2, against w(d) written out
    lw, _ = rt.distance_weighted_log_weight(torch.tensor([1.44], dtype=torch.float64), 7, 0.5, 1.4)
    assert math.isclose(float(lw[0]), math.log(1.2 ** -5 * (1 - 0.36) ** -2), rel_tol=1e-12)
    # cutoff >= min(nonzero_loss_cutoff, 2) would give nothing weight: rejected
    y, ry = torch.tensor([0]), torch.tensor([1] * 7)
    for cut, nlc in ((1.5, 1.4), (1.4, 1.4), (2.0, 3.0)):
        with pytest.raises(ValueError, match=r"cutoff must be < min\(nonzero_loss_cutoff, 2\)"):
            rt.mine_topk(x, y, r, ry, neg_strategy="distance_weighted", cutoff=cut,
                         nonzero_loss_cutoff=nlc, seed=0)
    # only far references: -1; one admissible reference: always it
    res = rt.mine_topk(x, y, r[[0, 2, 3]], ry[:3], k_neg=2, neg_strategy="distance_weighted",
                       seed=0)
    assert res.neg_idx.tolist() == [[-1, -1]]
    res = rt.mine_topk(x, y, r[[0, 1, 2]], ry[:3], k_neg=2, neg_strategy="distance_weighted",
                       seed=3)
    assert res.neg_idx.tolist() == [[1, -1]]


def test_dw_gradients():
    x, y, r, ry, qid, rid = _dw_problem()
    x = x.clone().requires_grad_(True)
    r = r.clone().requires_grad_(True)
    res = rt.mine_topk(x, y, r, ry, k_pos=2, k_neg=3, neg_strategy="distance_weighted", seed=9,
                       query_ids=qid, ref_ids=rid)
    (res.neg_dist.sum() + res.pos_dist.sum()).backward()
    ok = res.neg_idx >= 0
    i, t = ok.nonzero(as_tuple=True)
    j = res.neg_idx[i, t]
    u = (x.detach()[i] - r.detach()[j])
    gx = torch.zeros_like(x).index_add_(0, i, u / u.norm(dim=1, keepdim=True))
    ok_p = res.pos_idx >= 0
    ip, tp = ok_p.nonzero(as_tuple=True)
    jp = res.pos_idx[ip, tp]
    up = (x.detach()[ip] - r.detach()[jp])
    gx.index_add_(0, ip, up / up.norm(dim=1, keepdim=True))
    torch.testing.assert_close(x.grad, gx)
