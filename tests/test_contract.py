"""The mining contract, run on every backend available here.

On CPU that is 'torch' (the reference itself: these tests then check the
reference against its own definition and the exact-distance path), 'cpu' (the
compiled kernel) and 'triton' (under TRITON_INTERPRET=1).  On a GPU machine,
FASTMINE_TEST_DEVICE=cuda runs the same suite on CUDA tensors.
Sizes stay small: the Triton interpreter is slow.
"""
import os

import pytest
import torch

import fastmine
from fastmine import reference

from _oracle import assert_exact_pair_distances, assert_matches_reference

DEVICE = torch.device(os.environ.get("FASTMINE_TEST_DEVICE", "cpu"))
BACKENDS = fastmine.available_backends(DEVICE)
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
STRATEGIES = [  # (pos, neg, margin)
    ("easy", "hard", None), ("easy", "semihard", None), ("easy", "semihard", 0.3),
    ("easy", "easy", None), ("hard", "hard", None), ("hard", "semihard", None),
    ("hard", "semihard", 0.5), ("hard", "easy", None),
]


def _batch(n, d, classes, dtype=torch.float64, device=DEVICE):
    x = torch.randn(n, d, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randint(0, classes, (n,), device=device)
    return x, y


def test_backends_present():
    assert "torch" in BACKENDS
    if fastmine.build_info() != "not built":
        assert "cpu" in BACKENDS or DEVICE.type != "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("pos,neg,margin", STRATEGIES)
@pytest.mark.parametrize("refs", ["batch", "refs", "refs+ids"])
def test_matches_reference_float64(backend, distance, pos, neg, margin, refs):
    x, y = _batch(37, 9, 4)
    kw = dict(pos_strategy=pos, neg_strategy=neg, distance=distance, margin=margin)
    if refs == "batch":
        r = ry = None
    else:
        r, ry = _batch(29, 9, 4)
        if refs == "refs+ids":
            # The first 10 references are copies of anchors 0..9: same sample ids.
            r[:10] = x[:10]
            ry[:10] = y[:10]
            kw["query_ids"] = torch.arange(37, device=DEVICE)
            kw["ref_ids"] = torch.cat([torch.arange(10), torch.arange(100, 119)]).to(DEVICE)
    res = fastmine.mine(x, y, r, ry, backend=backend, **kw)
    assert_matches_reference(res, x, y, r, ry, **kw)
    if refs == "refs+ids":  # the anchor's own copy is never chosen
        own = torch.arange(10, device=DEVICE)
        assert not bool((res.pos_idx[:10] == own).any())


def assert_semihard_selection(res, x, y, pos, margin, distance):
    """A batch's semi-hard selection from low-precision inputs, against a float64
    recomputation on the same (rounded) inputs, within the documented precision.

    The contract (docs/contract.md, Precision): inputs stay as given (exact in
    float64), their dot products accumulate in float32, so every mining value v
    (squared distance, or 1 - cos) is within ``tol`` of the float64 one; the
    window d_ap < d_an < d_ap + margin is applied to the backend's own v.  So,
    for each anchor with the backend's positive p (itself within tol of the
    oracle's best):

    * a selected negative lies in the window widened by tol on each side;
    * it is the nearest admissible: no negative clearly inside the window (by
      more than tol) is nearer than it by more than tol;
    * -1 only when no negative lies clearly inside the window.

    Only picks that a rounding flip at a window edge or a near-tie can explain
    are tolerated; the checks are in the mining value v (d = sqrt(v) for
    "euclidean", so the window's upper bound is (sqrt(v_ap) + margin)^2).
    """
    n, d = x.shape
    x64 = x.detach().double()
    v = reference.mining_values(x64, x64, distance)
    eps32 = torch.finfo(torch.float32).eps
    # |error of a float32 Gram value| <= ~(D + 2) eps32 (|a|^2 + |b|^2); doubled, as
    # both sides of each comparison (v_an and the window from v_ap) carry it.
    scale = 1.0 if distance == "cosine" else 2 * float((x64 * x64).sum(1).max())
    tol = 4 * (d + 2) * eps32 * scale
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    same = y[:, None] == y[None, :]
    pos_mask, neg_mask = same & ~eye, ~same
    inf = torch.tensor(float("inf"), dtype=v.dtype, device=v.device)

    pidx, nidx = res.pos_idx, res.neg_idx
    has_pos = pos_mask.any(1)
    assert torch.equal(pidx >= 0, has_pos), "pos_idx: -1 pattern differs"
    assert not bool((nidx[~has_pos] >= 0).any()), "a semi-hard negative without a positive"
    rows = torch.nonzero(has_pos)[:, 0]
    p = pidx[rows]
    assert bool(pos_mask[rows, p].all()), "a positive of another class (or the anchor itself)"
    v_pos = v[rows].masked_fill(~pos_mask[rows], -inf if pos == "hard" else inf)
    best = v_pos.amax(1) if pos == "hard" else v_pos.amin(1)
    v_ap = v[rows, p]
    assert bool(((v_ap - best).abs() <= tol).all()), "positive not the best within tol"

    def upper(v_ap):  # the window's upper bound on v
        if margin is None:
            return torch.full_like(v_ap, float("inf"))
        if distance == "euclidean":
            return (v_ap.clamp_min(0).sqrt() + margin) ** 2
        return v_ap + margin

    vr, negs = v[rows], neg_mask[rows]
    inside = negs & (vr > (v_ap + tol)[:, None]) & (vr < (upper(v_ap - tol) - tol)[:, None])
    near = negs & (vr > (v_ap - tol)[:, None]) & (vr < (upper(v_ap + tol) + tol)[:, None])
    q = nidx[rows]
    chosen = q >= 0
    assert torch.equal(chosen | ~inside.any(1), torch.ones_like(chosen)), (
        "-1 although a negative lies clearly inside the window")
    qc = q[chosen]
    assert bool(near[chosen].gather(1, qc[:, None]).all()), "negative outside the window"
    v_an = vr[chosen].gather(1, qc[:, None])[:, 0]
    nearest = vr[chosen].masked_fill(~inside[chosen], inf).amin(1)
    assert bool((v_an <= nearest + tol).all()), (
        f"not the nearest admissible: by {float((v_an - nearest).max()):.3g} (tol {tol:.3g})")
    assert int(chosen.sum()) >= 3  # the batch exercises the window


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("distance", DISTANCES)
def test_low_precision_dtypes(backend, dtype, distance):
    x, y = _batch(45, 16, 5, dtype=dtype)
    for pos, neg, margin in (("easy", "hard", None), ("hard", "semihard", 0.2)):
        res = fastmine.mine(x, y, pos_strategy=pos, neg_strategy=neg, distance=distance,
                            margin=margin, backend=backend)
        # Selected mining distances agree with the float64 oracle up to the
        # dtype's rounding of the inputs' dot products.
        rtol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
        if neg == "semihard":  # a rounding flip at the window edge changes the pick
            assert_semihard_selection(res, x, y, pos, margin, distance)
            assert_exact_pair_distances(res, x, None, distance)
            continue
        assert_matches_reference(res, x, y, rtol=rtol, pos_strategy=pos, neg_strategy=neg,
                                 distance=distance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_take_smallest_index(backend):
    # Integer coordinates: every distance is exact in every dtype, so ties are real.
    base = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [-1., 0.], [0., -1.], [2., 0.]])
    x = base.repeat(3, 1).to(DEVICE)   # rows i, i+6, i+12 are duplicates
    y = torch.tensor([0, 0, 0, 1, 1, 1] * 3, device=DEVICE)
    for dtype in (torch.float64, torch.float32):
        for distance in ("euclidean", "squared_euclidean"):
            for pos, neg in (("easy", "hard"), ("hard", "easy"), ("easy", "semihard")):
                kw = dict(pos_strategy=pos, neg_strategy=neg, distance=distance)
                got = fastmine.mine(x.to(dtype), y, backend=backend, **kw)
                want = fastmine.mine(x.double(), y, backend="torch", **kw)
                assert torch.equal(got.pos_idx, want.pos_idx), (dtype, distance, pos, neg)
                assert torch.equal(got.neg_idx, want.neg_idx), (dtype, distance, pos, neg)
    # Sanity of the oracle itself: anchor 0's easy positive is its duplicate at index 6
    # (distance 0), and its nearest negative among the tied (-1,0),(0,-1) rows is 3.
    want = fastmine.mine(x.double(), y, backend="torch")
    assert int(want.pos_idx[0]) == 6 and int(want.neg_idx[0]) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_singletons_and_one_class(backend):
    x, _ = _batch(12, 5, 1)
    y = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5], device=DEVICE)  # 1 and 3 are singletons
    res = fastmine.mine(x, y, backend=backend)
    assert res.pos_idx[2] == -1 and res.pos_idx[6] == -1
    assert not res.valid[2] and not res.valid[6]
    assert res.pos_dist[2] == 0 and res.pos_dist[6] == 0
    semi = fastmine.mine(x, y, neg_strategy="semihard", backend=backend)
    assert semi.neg_idx[2] == -1 and semi.neg_idx[6] == -1  # no positive -> no semi-hard negative
    one = fastmine.mine(x, torch.zeros(12, dtype=torch.long, device=DEVICE), backend=backend)
    assert bool((one.neg_idx == -1).all()) and not bool(one.valid.any())
    assert bool((one.neg_dist == 0).all()) and bool((one.pos_idx >= 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_shapes(backend):
    empty = fastmine.mine(torch.zeros(0, 4, device=DEVICE),
                          torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert empty.pos_idx.shape == (0,) and empty.pos_dist.shape == (0,)
    one = fastmine.mine(torch.randn(1, 4, device=DEVICE),
                        torch.zeros(1, dtype=torch.long, device=DEVICE), backend=backend)
    assert one.pos_idx.tolist() == [-1] and one.neg_idx.tolist() == [-1]
    no_refs = fastmine.mine(torch.randn(3, 4, device=DEVICE),
                            torch.zeros(3, dtype=torch.long, device=DEVICE),
                            torch.zeros(0, 4, device=DEVICE),
                            torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert no_refs.pos_idx.tolist() == [-1] * 3
    x, y = _batch(20, 1, 3)  # D = 1
    assert_matches_reference(fastmine.mine(x, y, backend=backend), x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_label_dtypes(backend):
    big = torch.randn(40, 20, dtype=torch.float64, device=DEVICE)
    x = big[::2, ::3]  # strided rows and columns
    y = torch.randint(0, 3, (20,), device=DEVICE, dtype=torch.int32)
    assert not x.is_contiguous()
    assert_matches_reference(fastmine.mine(x, y, backend=backend), x, y)
    huge = y.long() * (2 ** 40) - 7  # labels outside int32 must still compare exactly
    assert_matches_reference(fastmine.mine(x, huge, backend=backend), x, huge)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_self_exclusion_and_custom_ids(backend):
    x, y = _batch(16, 4, 2)
    x[8:] = x[:8]  # rows i and i+8 are two views of the same sample
    y[8:] = y[:8]
    default = fastmine.mine(x, y, backend=backend)
    assert bool((default.pos_idx != torch.arange(16, device=DEVICE)).all())
    assert bool((default.pos_dist[default.pos_idx >= 0] == 0).all())  # picks the twin
    ids = torch.arange(16, device=DEVICE) % 8  # declare the twins the same sample
    res = fastmine.mine(x, y, query_ids=ids, backend=backend)
    picked = res.pos_idx.clamp_min(0)
    assert bool((ids[picked] != ids)[res.pos_idx >= 0].all())
    assert_matches_reference(res, x, y, query_ids=ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_gradcheck(backend, distance):
    x = torch.randn(14, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    r = torch.randn(10, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 3, (14,), device=DEVICE)
    ry = torch.randint(0, 3, (10,), device=DEVICE)
    for pos, neg in (("easy", "hard"), ("hard", "semihard")):
        def batch(x):
            res = fastmine.mine(x, y, pos_strategy=pos, neg_strategy=neg, distance=distance,
                                backend=backend)
            return res.pos_dist, res.neg_dist

        def refs(x, r):
            res = fastmine.mine(x, y, r, ry, pos_strategy=pos, neg_strategy=neg,
                                distance=distance, backend=backend)
            return res.pos_dist, res.neg_dist

        assert torch.autograd.gradcheck(batch, (x,))
        assert torch.autograd.gradcheck(refs, (x, r))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicate_embeddings_have_finite_gradients(backend, distance):
    x = torch.randn(4, 3, dtype=torch.float64, device=DEVICE).repeat(2, 1).requires_grad_()
    y = torch.tensor([0, 1, 0, 1] * 2, device=DEVICE)
    res = fastmine.mine(x, y, distance=distance, backend=backend)
    assert bool((res.pos_dist.abs() < 1e-7).all())  # each row's easy positive is its twin
    (res.pos_dist.sum() + res.neg_dist.sum()).backward()
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_distances_are_exact_for_near_pairs(backend):
    # Far from the origin, two rows 1e-3 apart: the Gram expansion in float32
    # loses everything (|x|^2 ~ 1e6, eps * 1e6 ~ 0.1 >> 1e-6), the direct
    # difference does not.
    x = torch.full((2, 8), 300.0, dtype=torch.float32, device=DEVICE)
    x[1, 0] += 1e-3
    x = torch.cat([x, -x])
    y = torch.tensor([0, 0, 1, 1], device=DEVICE)
    res = fastmine.mine(x, y, backend=backend)
    assert res.pos_idx.tolist() == [1, 0, 3, 2]
    true = float((x[0].double() - x[1].double()).norm())  # ~9.8e-4 after fp32 rounding
    torch.testing.assert_close(res.pos_dist, torch.full((4,), true, device=DEVICE),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    x, y = _batch(10, 3, 2)
    x0, y0 = x.clone(), y.clone()
    fastmine.mine(x, y, distance="cosine", backend=backend)
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_block_batch_requiring_grad(backend):
    """Several row blocks (parallel workers) with inputs that require grad."""
    x = torch.randn(300, 8, device=DEVICE, requires_grad=True)
    r = torch.randn(200, 8, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 6, (300,), device=DEVICE)
    ry = torch.randint(0, 6, (200,), device=DEVICE)
    for refs in ((None, None), (r, ry)):
        res = fastmine.mine(x, y, *refs, neg_strategy="semihard", backend=backend)
        assert_matches_reference(res, x, y, *refs, rtol=1e-5, neg_strategy="semihard")
        (res.pos_dist - res.neg_dist).sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(r.grad).all())
