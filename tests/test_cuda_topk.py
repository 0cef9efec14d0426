"""The CUDA top-k / distance-weighted kernels (csrc/cuda/mine_topk_kernels.cuh,
mine_topk_cuda.cu; docs/topk.md, "CUDA"), run on the CPU by the host CUDA
emulation as backend "cuda-emulated" (tests/_cuda_emulated.py), and on a GPU
by the tests marked ``gpu`` (skipped without one).

What is specific to these kernels: every compile-time list bound (k = 1 .. 64)
and the choice of bounds for unequal k_pos / k_neg, the merges of the lanes of
a row (warp shuffles) and of the splits of the reference axis (M spanning
many 64-wide tiles, with and without several tiles per split), ties to the
smallest index on integer-valued data, the noise words drawn in the kernel
(against fastmine._philox.pair_bits), the prune, the k bound's error, the
data checks, and a call without host synchronisation.  The cross-backend
suite (tests/test_topk_backends.py) covers the rest of the contract.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmine
from fastmine import _backends, _philox
from fastmine import reference_topk as rt

import _cuda_emulated
from test_sync_free import no_sync  # noqa: F401  (fixture)

EMU = _cuda_emulated.NAME
pytestmark = pytest.mark.skipif(_cuda_emulated.why_unavailable(torch.device("cpu")) != "",
                                reason=_cuda_emulated.why_unavailable(torch.device("cpu")))

GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")

SEED = 0x9E3779B97F4A7C15


def _int_data(n, m, d=3, classes=3, seed=0, dtype=torch.float32, device="cpu"):
    """Integer-valued rows (exact mining values, many exact ties) and labels;
    the references are an [m, d] bank (m None: the batch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    if m is None:
        return x.to(device), y.to(device), None, None
    r = torch.randint(-3, 4, (m, d), generator=g).to(dtype)
    ry = torch.randint(0, classes, (m,), generator=g)
    return x.to(device), y.to(device), r.to(device), ry.to(device)


def _unit_data(n, m, d=4, classes=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    r = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    ry = torch.randint(0, classes, (m,), generator=g)
    return x, y, r, ry


def _kw(pos, neg, dist, margin, k_pos, k_neg):
    return dict(k_pos=k_pos, k_neg=k_neg, pos_strategy=pos, neg_strategy=neg, distance=dist,
                margin=margin, seed=SEED if neg == "distance_weighted" else None)


def _assert_equal_to_reference(x, y, r, ry, backend, **kw):
    got = fastmine.mine_topk(x, y, r, ry, backend=backend, **kw)
    exp = rt.mine_topk(x.cpu(), y.cpu(), None if r is None else r.cpu(),
                       None if ry is None else ry.cpu(), **kw)
    assert torch.equal(got.pos_idx.cpu(), exp.pos_idx), (kw, got.pos_idx, exp.pos_idx)
    assert torch.equal(got.neg_idx.cpu(), exp.neg_idx), (kw, got.neg_idx, exp.neg_idx)
    for a, b in ((got.pos_dist, exp.pos_dist), (got.neg_dist, exp.neg_dist)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.cpu().double(), b.double(), rtol=1e-5, atol=1e-6)
    return got


def test_backend_claims_the_rules(monkeypatch):
    assert _backends.get(EMU).rules == frozenset(_backends.RULES)
    # "cuda" claims them exactly when its loaded kernels registered the op
    has = _backends._op_registered("fastmine::mine_topk_cuda")
    assert (_backends.get("cuda").rules == frozenset(_backends.RULES)) == has
    assert _backends._op_registered("fastmine::mine_topk_cuda_emulated")
    assert not _backends._op_registered("fastmine::mine_topk_no_such_backend")
    # a CUDA build loaded later (the JIT) is picked up on the next lookup
    monkeypatch.setitem(_backends._REGISTRY, "cuda", _backends.Backend(
        "cuda", _backends._REGISTRY["cuda"].unavailable))
    monkeypatch.setattr(_backends, "_op_registered", lambda name: False)
    assert _backends.get("cuda").rules == frozenset()
    monkeypatch.setattr(_backends, "_op_registered",
                        lambda name: name == "fastmine::mine_topk_cuda")
    assert _backends.get("cuda").rules == frozenset(_backends.RULES)


# ------------------------------------------------------------ every list bound
DET_RULES = [("easy", "hard", "euclidean", None), ("hard", "easy", "squared_euclidean", None),
             ("easy", "semihard", "squared_euclidean", None),
             ("hard", "semihard", "euclidean", 2.0)]


@pytest.mark.parametrize("k_pos,k_neg", [(1, 1), (2, 2), (3, 4), (1, 5), (8, 1), (9, 16),
                                         (17, 32), (33, 64), (64, 3)])
@pytest.mark.parametrize("pos,neg,dist,margin", DET_RULES)
def test_every_bound_equals_reference_on_integer_data(k_pos, k_neg, pos, neg, dist, margin):
    # 3 classes over 150 references: rows with fewer admissible references
    # than k end with -1 for the large k; M = 150 spans three tiles (splits).
    x, y, r, ry = _int_data(20, 150, seed=k_pos * 100 + k_neg)
    _assert_equal_to_reference(x, y, r, ry, EMU, **_kw(pos, neg, dist, margin, k_pos, k_neg))


@pytest.mark.parametrize("k", [1, 4, 64])
def test_batch_as_references_and_ids(k):
    x, y, _, _ = _int_data(70, None, seed=k)  # 70 rows: two anchor blocks, two tiles
    for pos, neg, dist, margin in DET_RULES:
        kw = _kw(pos, neg, dist, margin, k, k)
        _assert_equal_to_reference(x, y, None, None, EMU, **kw)
        got = fastmine.mine_topk(x, y, query_ids=torch.arange(70) // 2, backend=EMU, **kw)
        exp = rt.mine_topk(x, y, query_ids=torch.arange(70) // 2, **kw)
        assert torch.equal(got.pos_idx, exp.pos_idx) and torch.equal(got.neg_idx, exp.neg_idx)


def test_cosine_and_dtypes():
    x, y, r, ry = _unit_data(24, 140, d=5, seed=3)
    for dtype in (torch.float64, torch.float32):
        _assert_equal_to_reference(x.to(dtype), y, r.to(dtype), ry, EMU,
                                   **_kw("hard", "semihard", "cosine", 0.4, 3, 5))
    # half precision: the kernels mine in float32 from the float16 rows, as the
    # reference does; distinct values on a coarse grid make the picks exact.
    xi, yi, ri, rib = _int_data(24, 140, d=4, seed=4)
    _assert_equal_to_reference(xi.half(), yi, ri.half(), rib, EMU,
                               **_kw("easy", "hard", "euclidean", None, 4, 6))
    _assert_equal_to_reference(xi.bfloat16(), yi, ri.bfloat16(), rib, EMU,
                               **_kw("hard", "easy", "squared_euclidean", None, 2, 3))


def test_merges_across_splits_and_tiles_per_split():
    # One anchor block, 600 references = 10 tiles: with K = 64 the splits are
    # capped at 4 (several tiles per thread and per split), with K = 2 each
    # tile is its own split (default 132 SMs): both merges must give the same.
    x, y, r, ry = _int_data(9, 600, d=3, classes=2, seed=5)
    for k in (2, 64):
        for pos, neg, dist, margin in DET_RULES[:2]:
            _assert_equal_to_reference(x, y, r, ry, EMU, **_kw(pos, neg, dist, margin, k, k))


def test_k1_equals_mine():
    x, y, r, ry = _int_data(30, 130, seed=6)
    for pos, neg, dist, margin in DET_RULES:
        t = fastmine.mine_topk(x, y, r, ry, backend=EMU, **_kw(pos, neg, dist, margin, 1, 1))
        m = fastmine.mine(x, y, r, ry, pos_strategy=pos, neg_strategy=neg, distance=dist,
                          margin=margin, backend=EMU)
        assert torch.equal(t.pos_idx[:, 0], m.pos_idx) and torch.equal(t.neg_idx[:, 0], m.neg_idx)
        assert torch.equal(t.pos_dist[:, 0], m.pos_dist)


# ------------------------------------------------------------- distance-weighted
def test_noise_words_in_the_kernel_are_pair_bits():
    # Every anchor is at squared distance exactly 1 from every reference
    # (|x|^2 + |r|^2 - 2 x.r = 1 with r = (1, 1, 0)), and D = 3 makes
    # log w = -1/2 log 1 + 0 = 0: the key is the noise g alone, so the k_neg =
    # 64 picks are the references in decreasing order of their uniforms --
    # whose 23 bits are the words' top bits, x >> 9.  Any error in the counter
    # (i, j >> 2), the key split of the seed or the word j & 3 reorders them.
    anchors = torch.tensor([[1., 0., 0.], [0., 1., 0.], [1., 1., 1.], [2., 1., 0.]])
    x = anchors.repeat(3, 1)  # 12 rows: distinct Philox rows, same weights
    y = torch.zeros(12, dtype=torch.long)
    m = 150  # three tiles, one ragged; quads straddle no tile
    r = torch.tensor([1., 1., 0.]).repeat(m, 1)
    ry = torch.ones(m, dtype=torch.long)
    for seed in (SEED, 1, 2 ** 64 - 1):
        got = fastmine.mine_topk(x, y, r, ry, k_neg=64, neg_strategy="distance_weighted",
                                 seed=seed, backend=EMU)
        bits = _philox.pair_bits(_philox.split_seed(seed), torch.arange(12)[:, None],
                                 torch.arange(m)[None, :])
        u = bits >> 9  # U is increasing in it, g in U
        order = torch.sort(-u, dim=1, stable=True).indices[:, :64]
        assert torch.equal(got.neg_idx, order), seed
        assert (got.pos_idx == -1).all()


@pytest.mark.parametrize("k_neg", [1, 2, 7, 64])
@pytest.mark.parametrize("dim", [3, 16, 128])
def test_distance_weighted_equals_reference(k_neg, dim):
    # Unit rows; with D = 128 the prune skips most of the noise.  Keys agree
    # within float32 ulps, so a pick may differ only at a near-tie of the
    # reference's float64 keys.
    x, y, r, ry = _unit_data(16, 200, d=dim, seed=dim + k_neg)
    kw = _kw("easy", "distance_weighted", "euclidean", None, 2, k_neg)
    for cutoff, nlc in ((0.5, 1.4), (0.2, 2.5)):
        kw.update(cutoff=cutoff, nonzero_loss_cutoff=nlc)
        got = fastmine.mine_topk(x, y, r, ry, backend=EMU, **kw)
        exp = rt.mine_topk(x, y, r, ry, **kw)
        assert torch.equal(got.pos_idx, exp.pos_idx)
        if not torch.equal(got.neg_idx, exp.neg_idx):
            v = rt.mining_values(x, r, "euclidean")
            key, _ = rt.distance_weighted_keys(v, dim, cutoff, nlc, _philox.split_seed(SEED))
            for i, t in zip(*torch.nonzero(got.neg_idx != exp.neg_idx, as_tuple=True)):
                a, b = int(got.neg_idx[i, t]), int(exp.neg_idx[i, t])
                assert a >= 0 and b >= 0, (i, t, a, b)
                assert abs(key[i, a] - key[i, b]) <= 1e-5 * abs(key[i, b]), (i, t, a, b)
        # never a same-class or zero-weight pick
        sel = got.neg_idx.clamp_min(0)
        ok = (ry[sel] != y[:, None]) & (got.neg_dist < min(nlc, 2.0))
        assert (ok | (got.neg_idx < 0)).all()


def test_distance_weighted_self_refs_and_ids_and_k1_mine():
    x, y, _, _ = _unit_data(40, 1, d=8, seed=9)[:2] + (None, None)
    kw = _kw("hard", "distance_weighted", "euclidean", None, 3, 5)
    for ids in (None, torch.arange(40) // 2):
        got = fastmine.mine_topk(x, y, query_ids=ids, backend=EMU, **kw)
        exp = rt.mine_topk(x, y, query_ids=ids, **kw)
        assert torch.equal(got.pos_idx, exp.pos_idx) and torch.equal(got.neg_idx, exp.neg_idx)
    m = fastmine.mine(x, y, neg_strategy="distance_weighted", seed=SEED, backend=EMU)
    t = fastmine.mine_topk(x, y, k_neg=1, neg_strategy="distance_weighted", seed=SEED,
                           backend=EMU)
    assert torch.equal(m.neg_idx, t.neg_idx[:, 0])


def test_gradients_flow_through_the_backend_backward():
    x, y, r, ry = _unit_data(12, 70, d=5, seed=10, dtype=torch.float64)
    x.requires_grad_()
    r.requires_grad_()
    kw = _kw("easy", "distance_weighted", "euclidean", None, 2, 3)
    got = fastmine.mine_topk(x, y, r, ry, backend=EMU, **kw)
    (got.pos_dist.sum() + 2 * got.neg_dist.sum()).backward()
    gx, gr = x.grad.clone(), r.grad.clone()
    x.grad = r.grad = None
    exp = rt.mine_topk(x, y, r, ry, **kw)
    (exp.pos_dist.sum() + 2 * exp.neg_dist.sum()).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gr, r.grad)


# ---------------------------------------------------------------- checks, syncs
def test_k_bound_error_names_the_argument():
    x, y, r, ry = _int_data(5, 80, seed=11)
    with pytest.raises(RuntimeError, match=r"k_neg must be in \[1, 64\] for backend 'cuda'"):
        fastmine.mine_topk(x, y, r, ry, k_neg=65, backend=EMU)
    with pytest.raises(RuntimeError, match=r"k_pos must be in \[1, 64\] for backend 'cuda'"):
        fastmine.mine_topk(x, y, r, ry, k_pos=100, backend=EMU)


def test_data_checks_and_empty_inputs():
    x, y, r, ry = _int_data(6, 10, seed=12)
    bad = r.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="ref_emb contains NaN or Inf"):
        fastmine.mine_topk(x, y, bad, ry, k_neg=2, backend=EMU)
    res = fastmine.mine_topk(x, y, r[:0], ry[:0], k_pos=2, k_neg=3, backend=EMU)
    assert res.pos_idx.shape == (6, 2) and (res.pos_idx == -1).all() and (res.neg_idx == -1).all()
    assert (res.pos_dist == 0).all() and (res.neg_dist == 0).all()
    res = fastmine.mine_topk(x[:0], y[:0], r, ry, k_pos=2, k_neg=3, backend=EMU)
    assert res.neg_idx.shape == (0, 3)


@pytest.mark.parametrize("neg", ["hard", "semihard", "distance_weighted"])
def test_topk_and_backward_never_sync(neg, no_sync):  # noqa: F811
    x, y, r, ry = _unit_data(24, 30, d=8, seed=13)
    x.requires_grad_()
    with no_sync:
        res = fastmine.mine_topk(x, y, r, ry, k_pos=2, k_neg=3, neg_strategy=neg,
                                 seed=SEED if neg == "distance_weighted" else None,
                                 query_ids=torch.arange(24), ref_ids=torch.arange(30),
                                 backend=EMU)
        (res.pos_dist.sum() + res.neg_dist.sum()).backward()
    assert x.grad is not None


# ---------------------------------------------------------------------- GPU
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("k_pos,k_neg", [(1, 1), (3, 8), (1, 64), (33, 17)])
@pytest.mark.parametrize("pos,neg,dist,margin", DET_RULES)
def test_gpu_equals_reference_on_integer_data(k_pos, k_neg, pos, neg, dist, margin):
    x, y, r, ry = _int_data(300, 2000, d=8, seed=k_pos + k_neg, device="cuda")
    _assert_equal_to_reference(x, y, r, ry, "cuda", **_kw(pos, neg, dist, margin, k_pos, k_neg))


@gpu
@pytest.mark.gpu
def test_gpu_noise_words_are_pair_bits():
    anchors = torch.tensor([[1., 0., 0.], [0., 1., 0.], [1., 1., 1.], [2., 1., 0.]])
    x = anchors.repeat(50, 1).cuda()
    y = torch.zeros(200, dtype=torch.long, device="cuda")
    r = torch.tensor([1., 1., 0.]).repeat(1000, 1).cuda()
    ry = torch.ones(1000, dtype=torch.long, device="cuda")
    got = fastmine.mine_topk(x, y, r, ry, k_neg=64, neg_strategy="distance_weighted", seed=SEED,
                             backend="cuda")
    bits = _philox.pair_bits(_philox.split_seed(SEED), torch.arange(200)[:, None],
                             torch.arange(1000)[None, :])
    order = torch.sort(-(bits >> 9), dim=1, stable=True).indices[:, :64]
    assert torch.equal(got.neg_idx.cpu(), order)


@gpu
@pytest.mark.gpu
def test_gpu_topk_never_syncs():
    x, y, r, ry = _unit_data(256, 4096, d=64, seed=14)
    x, y, r, ry = x.cuda().requires_grad_(), y.cuda(), r.cuda(), ry.cuda()
    fastmine.mine_topk(x, y, r, ry, k_neg=8, neg_strategy="distance_weighted", seed=1,
                       backend="cuda")  # warm-up (allocator, SM count)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = fastmine.mine_topk(x, y, r, ry, k_pos=2, k_neg=8, neg_strategy="distance_weighted",
                                 seed=1, backend="cuda")
        res.neg_dist.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
