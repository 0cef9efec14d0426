"""The pure-PyTorch oracle: readable full-matrix mining, no cleverness.

This is ``backend="torch"`` and the oracle every other backend is tested
against.  It materialises the N x M distance matrix, so it is O(N*M) in memory.
The rules are the contract (``docs/contract.md``) written as tensor algebra.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._contract import compute_dtype


def distance_matrix(x: Tensor, r: Tensor, distance: str) -> Tensor:
    """All pairwise distances, [N, D] x [M, D] -> [N, M] in the compute dtype.

    Uses the Gram expansion ||a||^2 + ||b||^2 - 2 a.b (clamped at 0), the same
    mining arithmetic as the fused kernels.  Mining only needs the ordering;
    the distances that are *returned* are recomputed exactly from the rows
    (see ``fastmine._pairs``).
    """
    cdt = compute_dtype(x.dtype)
    x, r = x.to(cdt), r.to(cdt)
    if distance == "cosine":
        x = x / x.norm(dim=1, keepdim=True)
        r = r / r.norm(dim=1, keepdim=True)
        return (1 - x @ r.T).clamp_min(0)
    sq = (x * x).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2 * (x @ r.T)
    sq = sq.clamp_min(0)
    return sq.sqrt() if distance == "euclidean" else sq


def _masked_argbest(d: Tensor, mask: Tensor, nearest: bool) -> Tensor:
    """Per row, index of the min (nearest) or max (farthest) of d over mask; -1 if empty.

    torch.argmin/argmax return the first extremal index, so ties go to the
    smallest reference index, as the contract demands.
    """
    fill = float("inf") if nearest else float("-inf")
    masked = d.masked_fill(~mask, fill)
    idx = masked.argmin(1) if nearest else masked.argmax(1)
    return torch.where(mask.any(1), idx, torch.full_like(idx, -1))


def select(x: Tensor, labels: Tensor, r: Tensor, ref_labels: Tensor,
           query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
           pos_strategy: str, neg_strategy: str, distance: str,
           margin: Optional[float]) -> Tuple[Tensor, Tensor]:
    """Reference selection: (pos_idx, neg_idx), int64 [N], -1 where none exists."""
    n, m = x.shape[0], r.shape[0]
    if n == 0 or m == 0:
        empty = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        return empty, empty.clone()
    d = distance_matrix(x, r, distance)
    same = labels[:, None] == ref_labels[None, :]
    allowed = torch.ones_like(same)
    if query_ids is not None:
        allowed = query_ids[:, None] != ref_ids[None, :]  # same-sample pairs never selected

    pos_idx = _masked_argbest(d, same & allowed, nearest=(pos_strategy == "easy"))

    neg_mask = ~same & allowed
    if neg_strategy == "semihard":
        has_pos = pos_idx >= 0
        d_ap = d.gather(1, pos_idx.clamp_min(0)[:, None])  # [N, 1]
        window = d > d_ap
        if margin is not None:
            window &= d < d_ap + margin
        neg_mask &= window & has_pos[:, None]
    neg_idx = _masked_argbest(d, neg_mask, nearest=(neg_strategy != "easy"))
    return pos_idx, neg_idx
