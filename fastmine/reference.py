"""The pure-PyTorch oracle: readable full-matrix mining, no cleverness.

This is the naive O(N*M) oracle every backend ("cpu", "triton", "cuda") is
tested against, and ``backend="torch"``.  It materialises the N x M matrix of
mining values, so it is O(N*M) in time and memory.  The rules are the contract
(``docs/contract.md``) written as tensor algebra.

It does NOT validate arguments: ``fastmine.mine`` does (``fastmine._contract``:
shapes, dtypes, devices, strategy names, ids) before anything reaches it, and
the functions here assume valid, prepared inputs.  The one exception is
``mine_eager``, the op's stand-in without the compiled extension, which runs
the op's data check (``check_finite``: NaN / Inf / overflowing rows).

Shapes and dtypes: x [N, D] anchors and r [M, D] references, float16 /
bfloat16 / float32 / float64 (one dtype, one device); labels [N] and
ref_labels [M] integer (signed, or widened: ``_contract.widen_index_vector``);
query_ids [N] and ref_ids [M] integer, or both None (no same-sample pair).
Indices are int64, -1 where no admissible reference exists.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._contract import compute_dtype, semihard_window


def mining_values(x: Tensor, r: Tensor, distance: str) -> Tensor:
    """The values mining ranks, [N, D] x [M, D] -> [N, M] in the compute dtype.

    v = ||a||^2 + ||b||^2 - 2 a.b (the squared distance, for "euclidean" and
    "squared_euclidean") or 1 - a.b / (||a|| ||b||) ("cosine"), clamped at 0:
    the same mining arithmetic as the fused kernels.  The semi-hard window is
    applied to v (``fastmine._contract.semihard_window``), as in every kernel.
    Computed with autocast disabled, so an enclosing ``torch.autocast`` does
    not lower the precision of the oracle.
    """
    cdt = compute_dtype(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, r = x.to(cdt), r.to(cdt)
        if distance == "cosine":
            x = x / x.norm(dim=1, keepdim=True)
            r = r / r.norm(dim=1, keepdim=True)
            return (1 - x @ r.T).clamp_min(0)
        sq = (x * x).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2 * (x @ r.T)
        return sq.clamp_min(0)


def distance_matrix(x: Tensor, r: Tensor, distance: str) -> Tensor:
    """All pairwise distances, [N, D] x [M, D] -> [N, M] in the compute dtype.

    ``mining_values`` (the Gram expansion), with the square root taken for
    "euclidean".  Mining only needs the ordering; the distances that are
    *returned* are recomputed exactly from the rows (see ``fastmine._pairs``).
    """
    v = mining_values(x, r, distance)
    return v.sqrt() if distance == "euclidean" else v


def _masked_argbest(d: Tensor, mask: Tensor, nearest: bool) -> Tensor:
    """Per row, index of the min (nearest) or max (farthest) of d over mask; -1 if empty.

    torch.argmin/argmax return the first extremal index, so ties go to the
    smallest reference index, as the contract demands.  d is finite (the op
    rejects rows whose norms would overflow it), so the +-inf fill of masked
    entries never ties with an admissible one.
    """
    fill = float("inf") if nearest else float("-inf")
    masked = d.masked_fill(~mask, fill)
    idx = masked.argmin(1) if nearest else masked.argmax(1)
    return torch.where(mask.any(1), idx, torch.full_like(idx, -1))


def select(x: Tensor, labels: Tensor, r: Tensor, ref_labels: Tensor,
           query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
           pos_strategy: str, neg_strategy: str, distance: str,
           margin: Optional[float]) -> Tuple[Tensor, Tensor]:
    """Reference selection: (pos_idx, neg_idx), int64 [N], -1 where none exists.

    x [N, D], r [M, D] floating (the references already expanded: the batch is
    passed as r = x with ids, so that self-pairs are excluded); labels [N],
    ref_labels [M] integer; query_ids [N] / ref_ids [M] integer or both None.
    pos_strategy "easy" / "hard", neg_strategy "hard" / "semihard" / "easy",
    distance "euclidean" / "squared_euclidean" / "cosine" (names, not the op's
    codes); margin a float or None ("semihard" only).  Ties go to the smallest
    reference index.  Not differentiable (integer outputs).
    """
    n, m = x.shape[0], r.shape[0]
    if n == 0 or m == 0:
        empty = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        return empty, empty.clone()
    v = mining_values(x, r, distance)  # monotone in the distance: same ranking
    same = labels[:, None] == ref_labels[None, :]
    allowed = torch.ones_like(same)
    if query_ids is not None:
        allowed = query_ids[:, None] != ref_ids[None, :]  # same-sample pairs never selected

    pos_idx = _masked_argbest(v, same & allowed, nearest=(pos_strategy == "easy"))

    neg_mask = ~same & allowed
    if neg_strategy == "semihard":
        v_ap = v.gather(1, pos_idx.clamp_min(0)[:, None])[:, 0]
        lo, hi = semihard_window(v_ap, pos_idx >= 0, margin, distance)
        neg_mask &= (v > lo[:, None]) & (v < hi[:, None])
    neg_idx = _masked_argbest(v, neg_mask, nearest=(neg_strategy != "easy"))
    return pos_idx, neg_idx


def mine_eager(x: Tensor, labels: Tensor, r: Optional[Tensor], ref_labels: Optional[Tensor],
               query_ids: Optional[Tensor], ref_ids: Optional[Tensor], pos_strategy: int,
               neg_strategy: int, distance: int, margin: Optional[float]):
    """The reference without the compiled op (fastmine._C missing or refused):
    the op's arguments (strategy and distance codes, ref None = the batch) ->
    (pos_idx, neg_idx, pos_dist, neg_dist), differentiable through plain autograd.

    x [N, D] floating; labels [N] integer; r [M, D] (x's dtype) and ref_labels [M],
    or both None (the references are the batch, self-pairs excluded);
    query_ids [N] / ref_ids [M] integer or None; pos_strategy, neg_strategy,
    distance: the op's integer codes (``_contract.POS_STRATEGIES`` ...); margin a
    float or None.  Returns pos_idx, neg_idx int64 [N] (-1: none) and pos_dist,
    neg_dist [N] in x's dtype (0 with zero gradient at -1), differentiable w.r.t.
    x and r.  Runs the op's data check (``check_finite``), not the argument checks.
    """
    from ._contract import DISTANCES, NEG_STRATEGIES, POS_STRATEGIES, check_finite
    from ._pairs import pair_distance

    names = lambda table, code: next(k for k, v in table.items() if v == code)
    dist = names(DISTANCES, distance)
    check_finite("embeddings", x, dist)
    if r is None:
        r, ref_labels = x, labels
        query_ids = torch.arange(x.shape[0], device=x.device) if query_ids is None else query_ids
        ref_ids = query_ids
    else:
        check_finite("ref_emb", r, dist)
    with torch.no_grad():
        pos_idx, neg_idx = select(x, labels, r, ref_labels, query_ids, ref_ids,
                                  names(POS_STRATEGIES, pos_strategy),
                                  names(NEG_STRATEGIES, neg_strategy), dist, margin)
    return pos_idx, neg_idx, pair_distance(x, r, pos_idx, dist), pair_distance(x, r, neg_idx, dist)
