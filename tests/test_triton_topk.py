"""The Triton top-k / distance-weighted kernels (fastmine/_triton_topk.py) beyond
the cross-backend suite: the split-M merge, tiles with and without the
distance-weighted prune, k beyond a tile and beyond a row's candidates, padding
columns, the in-kernel noise words against fastmine._philox, the k bound.

Under the interpreter (tests/conftest.py), so sizes stay small: N, M <= 64,
D <= 16, and tiles of 16 so that these sizes still span several tiles.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmine
from fastmine import _extension, _philox
from fastmine import reference_topk as rt
from fastmine.reference import mining_values

from test_sync_free import no_sync  # noqa: F401  (the fixture: syncing entry points raise)

ft = pytest.importorskip("fastmine._triton")
if ft.triton is None:
    pytest.skip("triton is not installed", allow_module_level=True)
from fastmine import _triton_topk as ftk  # noqa: E402

ON_GPU = torch.cuda.is_available() and not ft.INTERPRETED
if not (ON_GPU or ft.INTERPRETED):
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
needs_op = pytest.mark.skipif(not _extension.loaded(), reason="compiled extension not loaded")

TILE16 = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def _ints(rows, d, g):
    """Small integers: every dot product exact, so ties are real and indices must match."""
    return torch.randint(-2, 3, (rows, d), generator=g).to(torch.float32).to(DEVICE)


def _labels(rows, classes, g):
    return torch.randint(0, classes, (rows,), generator=g).to(DEVICE)


def _unit(rows, d, g):
    return F.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1).to(DEVICE)


def _ref_select(x, y, r, ry, qid, rid, k_pos, k_neg, pos, neg, distance, margin=None,
                cutoff=0.5, nlc=1.4, seed=0):
    return rt.select_topk(x.double(), y, r.double(), ry, qid, rid, k_pos, k_neg, pos, neg,
                          distance, margin, cutoff, nlc, seed)


def _assert_dw_close(got, x, y, r, ry, qid, rid, k, seed, cutoff=0.5, nlc=1.4):
    """Distance-weighted picks against the reference: the same -1 pattern, every
    pick admissible, and the reference's float64 key of each pick within 1e-4 of
    the reference's own pick at that rank (keys agree within float32 ulps; a
    different pick is allowed only at such a near-tie)."""
    want = _ref_select(x, y, r, ry, qid, rid, 1, k, "easy", "distance_weighted", "euclidean",
                       cutoff=cutoff, nlc=nlc, seed=seed)[1]
    assert torch.equal(got >= 0, want >= 0)
    v = mining_values(x.double(), r.double(), "euclidean")
    key, positive = rt.distance_weighted_keys(v, x.shape[1], cutoff, nlc, _philox.split_seed(seed))
    ok = (y[:, None] != ry[None, :]) & positive
    if qid is not None:
        ok &= qid[:, None] != rid[None, :]
    has = got >= 0
    g, w = got.clamp_min(0), want.clamp_min(0)
    assert bool(ok.gather(1, g)[has].all()), "a pick breaks the label, same-sample or w > 0 mask"
    diff = (key.gather(1, g) - key.gather(1, w))[has].abs()
    assert diff.numel() == 0 or float(diff.max()) <= 1e-4, float(diff.max())
    assert int((got != want).sum()) <= max(1, got.numel() // 50)  # near-ties are rare


# --- every rule against the reference, integer data (exact) -----------------

@pytest.mark.parametrize("pos,neg,margin,distance,mode", [
    ("easy", "hard", None, "squared_euclidean", "batch"),
    ("hard", "easy", None, "euclidean", "refs"),
    ("easy", "semihard", None, "euclidean", "ids"),
    ("hard", "semihard", 3.0, "squared_euclidean", "batch"),
    ("easy", "semihard", 2.0, "euclidean", "refs"),
])
def test_rules_equal_reference_with_splits(pos, neg, margin, distance, mode):
    """k = 3 / 5 over 3 tiles of 16 (M = 45: padding columns), 1 and 3 splits:
    the indices equal the reference's exactly, ties included."""
    g = torch.Generator().manual_seed(1)
    n, m, d = 16, 45, 5
    x, y = _ints(n, d, g), _labels(n, 3, g)
    if mode == "batch":
        r, ry = x, y
        qid = rid = torch.arange(n, device=DEVICE)
    else:
        r, ry = _ints(m, d, g), _labels(m, 3, g)
        qid = rid = None
        if mode == "ids":  # references 0..n-1 are the anchors' own copies
            r[:n], ry[:n] = x, y
            qid, rid = torch.arange(n, device=DEVICE), torch.arange(m, device=DEVICE)
    want = _ref_select(x, y, r, ry, qid, rid, 3, 5, pos, neg, distance, margin)
    for splits in (1, 3):
        got = ftk.select_topk(x, y, r, ry, qid, rid, 3, 5, pos, neg, distance, margin, 0.5, 1.4,
                              0, splits=splits, config=TILE16)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), splits


def test_cosine_and_default_tiles():
    """Cosine (not exact on integers: compared on random data, no near-ties at
    this size) and the launcher's own tile/split choice."""
    g = torch.Generator().manual_seed(2)
    x, y, r, ry = _unit(24, 6, g), _labels(24, 3, g), _unit(50, 6, g), _labels(50, 3, g)
    got = ftk.select_topk(x, y, r, ry, None, None, 2, 4, "easy", "hard", "cosine", None,
                          0.5, 1.4, 0)
    want = _ref_select(x, y, r, ry, None, None, 2, 4, "easy", "hard", "cosine")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- the split-M merge ------------------------------------------------------

@pytest.mark.parametrize("neg", ["hard", "distance_weighted"])
def test_split_merge_equals_no_split(neg):
    """2 and 4 splits (the merge kernel, ties across split boundaries on
    integer data) give exactly the single-split lists, for k = 7."""
    g = torch.Generator().manual_seed(3)
    n, m, d = 16, 61, 4
    if neg == "hard":
        x, y, r, ry = _ints(n, d, g), _labels(n, 2, g), _ints(m, d, g), _labels(m, 2, g)
    else:
        x, y, r, ry = _unit(n, d, g), _labels(n, 2, g), _unit(m, d, g), _labels(m, 2, g)
    args = (x, y, r, ry, None, None, 7, 7, "hard", neg, "euclidean", None, 0.5, 1.4, 2 ** 63 + 5)
    one = ftk.select_topk(*args, splits=1, config=TILE16)
    for splits in (2, 4):
        got = ftk.select_topk(*args, splits=splits, config=TILE16)
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1]), splits
    if neg == "hard":
        want = _ref_select(*args[:11])
        assert torch.equal(one[0], want[0]) and torch.equal(one[1], want[1])
    else:
        _assert_dw_close(one[1], x, y, r, ry, None, None, 7, 2 ** 63 + 5)


# --- k beyond a tile, beyond the candidates, and the bound ------------------------

def test_k_beyond_tile_and_short_rows():
    """k = 40 and 64 (K_MAX) with 16-wide tiles and rows with fewer candidates
    than k: the full sorted lists, trailing -1."""
    g = torch.Generator().manual_seed(4)
    n, m, d = 16, 50, 3
    x, y, r, ry = _ints(n, d, g), _labels(n, 3, g), _ints(m, d, g), _labels(m, 3, g)
    for k_pos, k_neg, pos, neg in ((40, 64, "hard", "easy"),):
        got = ftk.select_topk(x, y, r, ry, None, None, k_pos, k_neg, pos, neg,
                              "squared_euclidean", None, 0.5, 1.4, 0, splits=2, config=TILE16)
        want = _ref_select(x, y, r, ry, None, None, k_pos, k_neg, pos, neg, "squared_euclidean")
        assert got[0].shape == (n, k_pos) and got[1].shape == (n, k_neg)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert bool((got[0] == -1).any()) and bool((got[1] == -1).any())  # short rows exist


def test_k_bound_names_the_argument():
    x = torch.randn(4, 3, device=DEVICE)
    y = torch.tensor([0, 0, 1, 1], device=DEVICE)
    with pytest.raises(ValueError, match="k_neg <= 64.*k_neg=65"):
        ftk.select_topk(x, y, x, y, None, None, 1, 65, "easy", "hard", "euclidean", None,
                        0.5, 1.4, 0)
    if _extension.loaded():
        with pytest.raises(ValueError, match="k_pos <= 64.*k_pos=100"):
            fastmine.mine_topk(x, y, k_pos=100, backend="triton")


def test_empty_inputs():
    x = torch.randn(3, 4, device=DEVICE)
    y = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    p, q = ftk.select_topk(x, y, x[:0], y[:0], None, None, 2, 3, "easy", "hard", "euclidean",
                           None, 0.5, 1.4, 0)
    assert p.shape == (3, 2) and q.shape == (3, 3) and bool((p == -1).all() and (q == -1).all())


# --- distance-weighted: the noise, the prune -----------------------------------

if ft.triton is not None:
    tl = ft.tl

    @ft.triton.jit
    def _noise_probe_kernel(WORDS, G, seed, row0, j0, N, M,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Store the kernel's words and Gumbel noise for anchor rows row0 + s and
        columns j0 + t: the exact helpers _topk_fwd_kernel calls."""
        rows = row0 + tl.arange(0, BLOCK_M)
        words = ftk._noise_words(seed, rows, j0, BLOCK_M, BLOCK_N)
        offs = tl.arange(0, BLOCK_M)[:, None] * M + tl.arange(0, BLOCK_N)[None, :]
        tl.store(WORDS + offs, words.to(tl.int64) & 0xFFFFFFFF)
        tl.store(G + offs, ftk._gumbel(words))

    @ft.triton.jit
    def _log_weight_probe_kernel(V, OUT, POS, DW, a, b, BLOCK: tl.constexpr):
        """Store _dw_log_weight of V [BLOCK] (thresholds DW [2])."""
        t = tl.arange(0, BLOCK)
        lw, pos = ftk._dw_log_weight(tl.load(V + t), tl.load(DW), tl.load(DW + 1), a, b)
        tl.store(OUT + t, lw)
        tl.store(POS + t, pos.to(tl.int32))


@pytest.mark.parametrize("seed", [0, 1, 0x89ABCDEF, 2 ** 63, 0x0123456789ABCDEF, 2 ** 64 - 1])
def test_noise_words_equal_pair_bits(seed):
    """The in-kernel words are the contract's x_ij (fastmine._philox.pair_bits) bit
    for bit, at row/column offsets beyond one quad and one word, for seeds up to
    2^64 - 1; g within float32 ulps of the float64 -log(-log U)."""
    bm, bn, row0, j0 = 8, 16, 2 ** 20 + 3, 4 * 12345
    words = torch.empty((bm, bn), dtype=torch.int64, device=DEVICE)
    gum = torch.empty((bm, bn), dtype=torch.float32, device=DEVICE)
    _noise_probe_kernel[(1,)](words, gum, seed, row0, j0, bm, bn, BLOCK_M=bm, BLOCK_N=bn)
    rows = torch.arange(row0, row0 + bm)[:, None]
    cols = torch.arange(j0, j0 + bn)[None, :]
    want = _philox.pair_bits(_philox.split_seed(seed), rows, cols)
    assert torch.equal(words.cpu(), want)
    g64 = _philox.gumbel_from_uniform(_philox.uniform_from_bits(want), torch.float64)
    assert torch.allclose(gum.cpu().double(), g64, rtol=0, atol=4e-6)
    assert float(gum.max()) <= _philox.G_MAX and float(gum.min()) >= _philox.G_MIN


def test_log_weight_equals_the_contract():
    """_dw_log_weight (sampling.h dw_log_weight) against the float64 reference,
    including the clamp at cutoff^2 and w = 0 from min(nonzero_loss_cutoff, 2)^2."""
    v = torch.linspace(0.0, 4.5, 64, dtype=torch.float32, device=DEVICE)
    for dim, cutoff, nlc in ((16, 0.5, 1.4), (3, 0.2, 3.0), (128, 0.3, 1.9)):
        dw, a, b = ftk._dw_params(dim, torch.float32, cutoff, nlc, DEVICE)
        out = torch.empty(64, dtype=torch.float32, device=DEVICE)
        pos = torch.empty(64, dtype=torch.int32, device=DEVICE)
        _log_weight_probe_kernel[(1,)](v, out, pos, dw, a, b, BLOCK=64)
        want, positive = rt.distance_weighted_log_weight(v.cpu(), dim, cutoff, nlc)
        assert torch.equal(pos.cpu().bool(), positive)
        got = out.cpu().double()[positive]
        assert bool((got == float("-inf")).eq(~positive[positive]).all())
        assert torch.allclose(got, want[positive], rtol=4e-6, atol=4e-6)
        assert bool((out.cpu()[~positive] == float("-inf")).all())


def test_prune_taken_and_not(monkeypatch):
    """A block whose lists hold large keys after the first tile (each anchor's
    copy, of another label, at distance ~0.05 with cutoff 0.02: log w ~ 40 at
    D = 16) skips the noise of the later tiles: 1 noise tile of 4 with the
    prune, 4 without; same picks, equal to the reference."""
    g = torch.Generator().manual_seed(5)
    n, m, d = 16, 64, 16
    x = _unit(n, d, g).float()
    y = (torch.arange(n) % 4).to(DEVICE)
    r = _unit(m, d, g).float()
    ry = _labels(m, 4, g)
    r[:n] = F.normalize(x.double() + 0.02 * torch.randn(n, d, generator=g, dtype=torch.float64)
                        .to(DEVICE), dim=1).float()
    ry[:n] = (y + 1) % 4
    calls = []
    noise_words = ftk._noise_words
    monkeypatch.setattr(ftk, "_noise_words", lambda *a: calls.append(1) or noise_words(*a))
    seed = 2 ** 64 - 3
    args = (x, y, r, ry, None, None, 1, 1, "easy", "distance_weighted", "euclidean", None,
            0.02, 1.4, seed)
    picks = {}
    for prune in (True, False):
        calls.clear()
        picks[prune] = ftk.select_topk(*args, splits=1, config=TILE16, prune=prune)[1]
        assert len(calls) == (1 if prune else m // 16), (prune, len(calls))
    assert torch.equal(picks[True], picks[False])
    assert torch.equal(picks[True][:, 0], torch.arange(n, device=DEVICE))  # the near copy
    _assert_dw_close(picks[True], x, y, r, ry, None, None, 1, seed, cutoff=0.02)


def test_distance_weighted_matches_reference_every_mode():
    """k_neg = 1 and 6, batch (self excluded) and references with ids, several
    seeds, M = 45 (a padded quad and a padded tile)."""
    g = torch.Generator().manual_seed(6)
    n, m, d = 16, 45, 8
    x, y, r, ry = _unit(n, d, g).float(), _labels(n, 3, g), _unit(m, d, g).float(), _labels(m, 3, g)
    r[:n], ry[:n] = x, y
    qid, rid = torch.arange(n, device=DEVICE), torch.arange(m, device=DEVICE)
    for seed, k in ((0, 1), (987654321, 6), (2 ** 64 - 1, 6)):
        for refs in (False, True):
            rr, rry = (r, ry) if refs else (x, y)
            rid_ = rid if refs else qid
            got = ftk.select_topk(x, y, rr, rry, qid, rid_, 1, k, "easy", "distance_weighted",
                                  "euclidean", None, 0.5, 1.4, seed, config=TILE16)[1]
            _assert_dw_close(got, x, y, rr, rry, qid, rid_, k, seed)


# --- dtypes, through the op, gradients --------------------------------------------

@needs_op
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_through_the_op(dtype):
    """fp16/bf16/fp64 on integer data: the op's indices and exact distances equal
    the torch backend's; distance-weighted keys in float32 for fp64 too."""
    g = torch.Generator().manual_seed(7)
    x, y = _ints(20, 6, g).to(dtype), _labels(20, 3, g)
    kw = dict(k_pos=2, k_neg=4, pos_strategy="hard", neg_strategy="semihard", margin=4.0)
    got = fastmine.mine_topk(x, y, backend="triton", **kw)
    want = fastmine.mine_topk(x, y, backend="torch", **kw)
    for name in ("pos_idx", "neg_idx", "pos_dist", "neg_dist"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    if dtype == torch.float64:
        xn = F.normalize(x, dim=1)
        kw = dict(k_neg=3, neg_strategy="distance_weighted", seed=11)
        got = fastmine.mine_topk(xn, y, backend="triton", **kw)
        qid = torch.arange(20, device=DEVICE)
        _assert_dw_close(got.neg_idx, xn, y, xn, y, qid, qid, 3, 11)


@needs_op
def test_gradients_and_mine_column_zero():
    """Gradients through fastmine::mine_topk's C++ autograd (the triton backward
    per pair) equal the torch backend's; mine(..., distance_weighted) is column 0."""
    g = torch.Generator().manual_seed(8)
    x0, y, r0, ry = _ints(16, 4, g).double(), _labels(16, 3, g), _ints(30, 4, g).double(), \
        _labels(30, 3, g)
    grads = {}
    for backend in ("triton", "torch"):
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        res = fastmine.mine_topk(x, y, r, ry, k_pos=2, k_neg=3, backend=backend)
        (res.pos_dist.sum() - 0.5 * res.neg_dist.square().sum()).backward()
        grads[backend] = (res.pos_idx, res.neg_idx, x.grad, r.grad)
    for a, b in zip(grads["triton"], grads["torch"]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    xn = F.normalize(x0, dim=1)
    top = fastmine.mine_topk(xn, y, k_neg=2, neg_strategy="distance_weighted", seed=3,
                             backend="triton")
    one = fastmine.mine(xn, y, neg_strategy="distance_weighted", seed=3, backend="triton")
    assert torch.equal(one.neg_idx, top.neg_idx[:, 0]) and torch.equal(one.pos_idx,
                                                                        top.pos_idx[:, 0])


@needs_op
@pytest.mark.parametrize("neg,margin", [("semihard", 0.5), ("distance_weighted", None)])
def test_never_syncs(neg, margin, no_sync):
    """mine_topk + backward with the syncing Tensor entry points patched to raise
    (tests/test_sync_free.py's guard): what a CUDA call must not do."""
    g = torch.Generator().manual_seed(9)
    x = _unit(16, 6, g).float().requires_grad_()
    y = _labels(16, 3, g)
    kw = dict(k_pos=2, k_neg=3, neg_strategy=neg, margin=margin, seed=5, backend="triton")
    with no_sync:
        res = fastmine.mine_topk(x, y, **kw)
        (res.pos_dist.sum() - res.neg_dist.sum()).backward()
    want = fastmine.mine_topk(x, y, **kw)
    assert torch.equal(res.pos_idx, want.pos_idx) and torch.equal(res.neg_idx, want.neg_idx)
