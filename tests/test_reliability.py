"""Inputs at the edge of the number range, and the boundary's argument checks.

Regression tests for the silent wrong answers and unclear errors found by
fuzzing (docs/contract.md, "Admissible rows" and "Errors").  Every backend:
an input is either rejected with an error naming the argument, or mined
correctly -- never a pick that breaks the label or same-sample masks.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

import fastmine
from fastmine._contract import sqnorm_bounds

BACKENDS = fastmine.available_backends()
Y = torch.tensor([0, 0, 1, 1, 2, 2])


def _assert_masks_hold(res, labels, ref_labels, query_ids=None, ref_ids=None):
    for sel, same in ((res.pos_idx, True), (res.neg_idx, False)):
        ok = sel >= 0
        assert ((ref_labels[sel[ok]] == labels[ok]) == same).all(), "pick breaks the label mask"
        if query_ids is not None:
            assert (ref_ids[sel[ok]] != query_ids[ok]).all(), "pick breaks the same-sample mask"


# --- 1. rows whose squared norm overflows the Gram terms ---------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,value,d", [(torch.float32, 1e19, 8), (torch.float32, 2e18, 128),
                                           (torch.bfloat16, 1e19, 8), (torch.float64, 1e154, 8)])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_overflowing_norms_are_rejected(backend, dtype, value, d, distance):
    x = torch.randn(6, d, dtype=torch.float64).to(dtype)
    big = x.clone()
    big[4] = value
    with pytest.raises(ValueError, match="embeddings row 4 has norm .* above the largest norm"):
        fastmine.mine(big, Y, distance=distance, backend=backend)
    with pytest.raises(ValueError, match="ref_emb row 4 has norm .* above the largest norm"):
        fastmine.mine(x, Y, big, Y, distance=distance, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_largest_admissible_norms_mine_correctly(backend, dtype, distance):
    """Rows just inside the bound: integer-valued directions scaled by a power of
    two, so the answer is the scaled integer problem's (exact indices)."""
    _, hi = sqnorm_bounds(dtype, distance)
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-3, 4, (10, 4), generator=g, dtype=torch.float64)
    base[base.abs().sum(1) == 0, 0] = 1  # cosine needs non-zero rows
    labels = torch.randint(0, 3, (10,), generator=g)
    scale = 2.0 ** math.floor(math.log2(math.sqrt(hi) / float(base.norm(dim=1).max())))
    big = (base * scale).to(dtype)
    want = fastmine.mine(base, labels, distance=distance, neg_strategy="semihard", backend="torch")
    got = fastmine.mine(big, labels, distance=distance, neg_strategy="semihard", backend=backend)
    assert torch.equal(got.pos_idx, want.pos_idx) and torch.equal(got.neg_idx, want.neg_idx)
    assert torch.isfinite(got.pos_dist).all() and torch.isfinite(got.neg_dist).all()


@st.composite
def _extreme_batch(draw):
    n = draw(st.integers(2, 9))
    d = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    emax = 160 if dtype == torch.float32 else 1100
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    # each row its own binary exponent, from far below to far above the bounds
    exps = torch.tensor(draw(st.lists(st.integers(-emax // 2, emax // 2), min_size=n, max_size=n)),
                        dtype=torch.float64)
    x = (x * torch.exp2(exps)[:, None]).to(dtype)
    labels = torch.randint(0, draw(st.integers(1, 3)), (n,), generator=g)
    return x, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=_extreme_batch(), neg=st.sampled_from(["hard", "semihard", "easy"]))
def test_extreme_magnitudes_never_break_the_masks(backend, distance, batch, neg):
    x, labels = batch
    if not torch.isfinite(x).all():
        return  # overflowed while scaling: the NaN/Inf check's business
    ids = torch.arange(x.shape[0])
    try:
        res = fastmine.mine(x, labels, distance=distance, neg_strategy=neg, backend=backend)
    except ValueError as e:
        assert "embeddings row" in str(e)
        lo, hi = sqnorm_bounds(x.dtype, distance)
        sq = x.double().pow(2).sum(1)
        assert ((sq > hi * 0.999) | (sq < lo * 1.001)).any(), f"rejected an admissible batch: {e}"
        return
    _assert_masks_hold(res, labels, labels, ids, ids)
    # an anchor that has a positive gets one (never a silent -1)
    has_pos = ((labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)).any(1)
    assert torch.equal(res.pos_idx >= 0, has_pos)
    assert torch.isfinite(res.pos_dist).all() and torch.isfinite(res.neg_dist).all()


# --- 2, 3. cosine: subnormal squared norms, D = 0 ---------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_rejects_subnormal_squared_norms(backend):
    x = torch.randn(6, 4)
    x[1] = 1e-22  # |x|^2 = 4e-44: subnormal in float32, the direction is lost
    with pytest.raises(ValueError, match="embeddings row 1 has norm 1.98e-22 .zero, D = 0"):
        fastmine.mine(x, Y, distance="cosine", backend=backend)
    x[1] = 1e-15  # |x|^2 = 4e-30: normal, with room for the products
    fastmine.mine(x, Y, distance="cosine", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_embeddings(backend):
    """D = 0: every Euclidean distance is 0 (ties: smallest index); cosine is an error."""
    x = torch.empty(6, 0)
    res = fastmine.mine(x, Y, backend=backend)
    assert res.pos_idx.tolist() == [1, 0, 3, 2, 5, 4]
    assert res.neg_idx.tolist() == [2, 2, 0, 0, 0, 0]
    assert (res.pos_dist == 0).all() and (res.neg_dist == 0).all()
    with pytest.raises(ValueError, match="embeddings row 0 has norm 0 .zero, D = 0"):
        fastmine.mine(x, Y, distance="cosine", backend=backend)


# --- 6. the reference applies the kernels' semi-hard rule -------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_semihard_window_on_the_mining_value(backend):
    """Two references whose squared distances differ in float32 but share one
    float32 square root: the window is applied to v, so the second is a
    semi-hard negative (d_an > d_ap holds in v)."""
    q = torch.tensor([[0.0, 0.0]])
    r = torch.tensor([[0.8048186898231506, 0.8070793747901917], [0.8095674514770508, 0.8023160099983215]])
    v = (r * r).sum(1)
    assert v[1] > v[0] and v.sqrt()[1] == v.sqrt()[0]  # the premise, in float32
    res = fastmine.mine(q, torch.tensor([0]), r, torch.tensor([0, 1]), neg_strategy="semihard",
                        backend=backend)
    assert res.pos_idx.tolist() == [0] and res.neg_idx.tolist() == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mining_ignores_autocast(backend):
    """Under bf16 autocast the old reference changed 152 of 512 semi-hard picks."""
    n = 512 if backend in ("torch", "cpu") else 96  # the emulators are slow
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, n // 8, (n,), generator=g)
    want = fastmine.mine(x, y, neg_strategy="semihard", margin=0.2, backend=backend)
    with torch.autocast("cpu", torch.bfloat16):
        got = fastmine.mine(x, y, neg_strategy="semihard", margin=0.2, backend=backend)
    assert torch.equal(got.pos_idx, want.pos_idx) and torch.equal(got.neg_idx, want.neg_idx)


# --- 8-11. argument types at the boundary -----------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32])
def test_unsigned_labels_are_accepted(dtype):
    x = torch.randn(6, 3)
    want = fastmine.mine(x, Y)
    got = fastmine.mine(x, Y.to(dtype), query_ids=torch.arange(6).to(dtype))
    assert torch.equal(got.pos_idx, want.pos_idx) and torch.equal(got.neg_idx, want.neg_idx)


@pytest.mark.parametrize("dtype", [torch.uint64, torch.bool])
def test_other_label_dtypes_list_the_accepted_ones(dtype):
    with pytest.raises(TypeError, match=r"labels must have an integer dtype \(int8, int16, int32, "
                                        r"int64, uint8, uint16, uint32\), got torch\.(uint64|bool)"):
        fastmine.mine(torch.randn(6, 3), Y.to(dtype))


@pytest.mark.parametrize("arg", ["pos_strategy", "neg_strategy", "distance", "backend"])
def test_unhashable_choices_are_named(arg):
    with pytest.raises(ValueError, match=f"{arg} must be one of"):
        fastmine.mine(torch.randn(6, 3), Y, **{arg: ["easy"]})


def test_sparse_and_nested_tensors_are_rejected():
    x = torch.randn(6, 3)
    with pytest.raises(TypeError, match="embeddings must be a dense .strided. tensor, got a torch.sparse_coo"):
        fastmine.mine(x.to_sparse(), Y)
    with pytest.raises(TypeError, match="ref_emb must be a dense .strided. tensor, got a torch.sparse_csr"):
        fastmine.mine(x, Y, x.to_sparse_csr(), Y)
    with pytest.raises(TypeError, match="labels must be a dense .strided. tensor"):
        fastmine.mine(x, Y.to_sparse())
    nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged)
    with pytest.raises(TypeError, match="embeddings must be a dense .strided. tensor, got a nested tensor"):
        fastmine.mine(nested, Y)


@pytest.mark.parametrize("margin", [np.float32(0.1), np.float64(0.1), torch.tensor(0.1), 1,
                                    torch.tensor(1, dtype=torch.int32)])
def test_margin_accepts_real_numbers(margin):
    x = torch.randn(6, 3)
    want = fastmine.mine(x, Y, neg_strategy="semihard", margin=float(margin))
    got = fastmine.mine(x, Y, neg_strategy="semihard", margin=margin)
    assert torch.equal(got.neg_idx, want.neg_idx)


@pytest.mark.parametrize("margin,exc,match", [
    (True, TypeError, "margin must be a real number, got bool"),
    (float("nan"), ValueError, "margin must be finite"),
    (float("inf"), ValueError, "margin must be finite"),
    (-0.5, ValueError, "margin must be > 0"),
    ("0.1", TypeError, "margin must be a real number, got str"),
    (torch.tensor([0.1]), TypeError, "margin must be a real number or a 0-d real tensor"),
])
def test_margin_rejects_non_reals(margin, exc, match):
    with pytest.raises(exc, match=match):
        fastmine.mine(torch.randn(6, 3), Y, neg_strategy="semihard", margin=margin)
