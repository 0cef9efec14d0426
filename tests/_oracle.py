"""Helpers that compare a backend's MiningResult with the float64 reference.

Indices are compared exactly only where the reference has no near-tie; the
*distances* of the selected pairs (under the float64 mining distance) are
compared everywhere.  This is what "same answer" means for a mining kernel
whose dot products may be computed in a different order or precision.
"""
from __future__ import annotations

import torch

import fastmine
from fastmine import reference


def oracle(x, y, r=None, ry=None, **kw):
    """Reference selection on float64 copies of the inputs; also returns D (float64)."""
    x64 = x.detach().double()
    r64 = x64 if r is None else r.detach().double()
    res = fastmine.mine(x64, y, None if r is None else r64, ry, backend="torch", **kw)
    d = reference.distance_matrix(x64, r64, kw.get("distance", "euclidean"))
    return res, d


def _selected(d, idx):
    return torch.where(idx >= 0, d.gather(1, idx.clamp_min(0)[:, None])[:, 0],
                       torch.zeros((), dtype=d.dtype))


def _unique_best(d, ref_idx, mask_fn, rtol):
    """True where the reference's choice beats every other candidate by > rtol."""
    chosen = _selected(d, ref_idx)
    gap = (d - chosen[:, None]).abs()
    scale = d.abs().amax().clamp_min(1e-12)
    near = (gap <= rtol * scale) & mask_fn
    return near.sum(1) <= 1


def assert_matches_reference(res, x, y, r=None, ry=None, rtol=1e-9, dist_rtol=None, **kw):
    """Check a MiningResult against the float64 oracle.

    rtol: relative tolerance (w.r.t. the largest distance) for comparing the
    mining distances of the selected pairs; dist_rtol for the returned exact
    pair distances (defaults by dtype).
    """
    ref, d = oracle(x, y, r, ry, **kw)
    for name in ("pos_idx", "neg_idx"):
        got, want = getattr(res, name), getattr(ref, name)
        assert got.dtype == torch.int64 and got.shape == want.shape
        # Same anchors have / lack a choice.
        assert torch.equal(got >= 0, want >= 0), f"{name}: -1 pattern differs"
        # The chosen pair is as good as the reference's under the exact distance.
        scale = d.abs().amax().clamp_min(1e-12) if d.numel() else 1.0
        diff = (_selected(d, got) - _selected(d, want)).abs()
        assert bool((diff <= rtol * scale).all()), (
            f"{name}: selected distances differ by up to {float(diff.max()):.3g}")
        # Where the reference's choice is unambiguous, the index is identical.
        any_cand = torch.ones_like(d, dtype=torch.bool)
        clear = _unique_best(d, want, any_cand, rtol) & (want >= 0)
        assert torch.equal(got[clear], want[clear]), f"{name}: indices differ at clear choices"
    assert torch.equal(res.valid, (res.pos_idx >= 0) & (res.neg_idx >= 0))
    assert_exact_pair_distances(res, x, r, kw.get("distance", "euclidean"), dist_rtol)


_DIST_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_exact_pair_distances(res, x, r, distance, dist_rtol=None):
    """pos_dist/neg_dist equal the float64 distance of the selected rows; 0 where -1."""
    x64 = x.detach().double()
    r64 = x64 if r is None else r.detach().double()
    tol = dist_rtol if dist_rtol is not None else _DIST_RTOL[x.dtype]
    for idx, got in ((res.pos_idx, res.pos_dist), (res.neg_idx, res.neg_dist)):
        assert got.dtype == x.dtype
        b = r64[idx.clamp_min(0)]
        if distance == "cosine":
            want = 1 - torch.nn.functional.cosine_similarity(x64, b, dim=1)
        else:
            want = (x64 - b).pow(2).sum(1)
            if distance == "euclidean":
                want = want.sqrt()
        want = torch.where(idx >= 0, want, torch.zeros_like(want))
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        err = (got.double() - want).abs()
        assert bool((err <= tol * scale).all()), f"pair distance error {float(err.max()):.3g}"
        assert bool((got[idx < 0] == 0).all())
