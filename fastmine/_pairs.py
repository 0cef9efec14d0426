"""Exact distances of the selected pairs, and their explicit backward.

Mining ranks pairs with the Gram expansion, which cancels badly for near pairs
(exactly the easy positives).  The distances that ``mine`` returns, and that
losses differentiate, are therefore recomputed here from the selected rows by
direct difference, in float32 (float64 for float64 inputs).  O(N*D) work.

Gradients (per selected pair (a, b) = (x[i], r[idx[i]]), u = a - b):
  squared_euclidean  d = |u|^2               dd/da =  2u            dd/db = -dd/da
  euclidean          d = |u|                 dd/da =  u/|u| (0 at u=0, a subgradient)
  cosine             d = 1 - a^.b^ = |a^ - b^|^2 / 2   with a^ = a/|a|, w = a^ - b^
                                            dd/da = (w - (a^.w) a^)/|a|
                                            dd/db = (-w + (b^.w) b^)/|b|
The cosine form via |a^ - b^|^2 / 2 is exact for unit vectors and has no
cancellation near d = 0; zero-norm rows are rejected before mining.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._contract import compute_dtype


def _gather(x: Tensor, r: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(a, b, valid): the anchors and their selected references, gathered then
    upcast to the compute dtype (only the N selected rows are read, never the
    whole bank)."""
    cdt = compute_dtype(x.dtype)
    valid = idx >= 0
    a = x.to(cdt)
    if r.shape[0] == 0:  # no references: every idx is -1 and b is never used
        return a, torch.ones_like(a), valid
    b = r.index_select(0, idx.clamp_min(0)).to(cdt)
    return a, b, valid


def pair_distance(x: Tensor, r: Tensor, idx: Tensor, distance: str) -> Tensor:
    """d(x[i], r[idx[i]]) for each i; 0 where idx[i] == -1.

    x: [N, D], r: [M, D] floating; idx: int64 [N].  Returns [N] in x.dtype.
    """
    a, b, valid = _gather(x, r, idx)
    if distance == "cosine":
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
        d = 0.5 * (a - b).pow(2).sum(1)
    else:
        d = (a - b).pow(2).sum(1)
        if distance == "euclidean":
            # sqrt with the subgradient 0 at d = 0 (duplicates) under plain autograd
            pos = d > 0
            d = torch.where(pos, torch.where(pos, d, torch.ones_like(d)).sqrt(), torch.zeros_like(d))
    return torch.where(valid, d, torch.zeros_like(d)).to(x.dtype)


def _pair_grads(a: Tensor, b: Tensor, distance: str) -> Tuple[Tensor, Tensor]:
    """Row-wise (dd/da, dd/db) for the pairs (a[i], b[i])."""
    u = a - b
    if distance == "squared_euclidean":
        ga = 2 * u
        return ga, -ga
    if distance == "euclidean":
        norm = u.norm(dim=1, keepdim=True)
        ga = torch.where(norm > 0, u / norm.clamp_min(torch.finfo(u.dtype).tiny),
                         torch.zeros_like(u))
        return ga, -ga
    na = a.norm(dim=1, keepdim=True)
    nb = b.norm(dim=1, keepdim=True)
    ah, bh = a / na, b / nb
    w = ah - bh
    ga = (w - (ah * w).sum(1, keepdim=True) * ah) / na
    gb = (-w + (bh * w).sum(1, keepdim=True) * bh) / nb
    return ga, gb


def pair_distance_backward(grad_pos: Tensor, grad_neg: Tensor, x: Tensor, r: Tensor,
                           pos_idx: Tensor, neg_idx: Tensor,
                           distance: str) -> Tuple[Tensor, Tensor]:
    """Scatter dL/d(pos_dist), dL/d(neg_dist) [N] into (dL/dx [N, D], dL/dr [M, D]).

    Anchor rows get a dense update; reference rows are scattered with
    ``index_put_(accumulate=True)`` when deterministic algorithms are enabled
    (a sorted, deterministic reduction on every device), else ``index_add_``.
    Pairs with idx == -1 contribute exactly zero.
    """
    cdt = compute_dtype(x.dtype)
    grad_x = torch.zeros(x.shape, dtype=cdt, device=x.device)
    grad_r = torch.zeros(r.shape, dtype=cdt, device=r.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    for g, idx in ((grad_pos, pos_idx), (grad_neg, neg_idx)):
        a, b, valid = _gather(x, r, idx)
        ga, gb = _pair_grads(a, b, distance)
        w = torch.where(valid, g.to(cdt), torch.zeros((), dtype=cdt, device=g.device))[:, None]
        grad_x += w * ga
        if r.shape[0] == 0:
            continue
        rows = idx.clamp_min(0)
        if deterministic:
            grad_r.index_put_((rows,), w * gb, accumulate=True)
        else:
            grad_r.index_add_(0, rows, w * gb)
    return grad_x.to(x.dtype), grad_r.to(r.dtype)
