"""The pure-PyTorch oracle for top-k mining and distance-weighted sampling (issue #17).

Readable full-matrix code, like ``fastmine.reference`` (whose mining values,
semi-hard window and exact pair distances it reuses): the naive O(N*M) oracle
every top-k backend is tested against.  It materialises the N x M matrix of
mining values (and, for ``"distance_weighted"``, of keys), so it is O(N*M) in
time and memory.  The fused backends must reproduce it; see docs/contract.md
("Random sampling (distance-weighted)") and docs/topk.md.

The building blocks (``topk_by_key``, ``distance_weighted_log_weight``,
``distance_weighted_keys``, ``select_topk``, ``pair_distances``) do NOT
validate arguments: ``fastmine.mine_topk`` does (``fastmine._contract``), and
they assume valid, prepared inputs.  ``mine_topk`` here, the reference of that
API, runs only the same ``_contract`` checks of the scalar arguments and the
data (``check_topk_args``, ``check_seed``, and ``checked_references``: NaN /
Inf / overflowing rows), defining none of its own; it does not check tensor
shapes, dtypes or devices (``fastmine.mine_topk`` does, before the op).

Rules (per anchor row i, over the admissible references j: label mask,
same-sample exclusion, semi-hard window):

* top-k by a key, in the strategy's order, exact ties by the smallest j:
  pos "easy" / neg "hard" / neg "semihard" = the k smallest mining values v,
  pos "hard" / neg "easy" = the k largest.  v is the squared distance for
  "euclidean", so the order is that of the distance.  The semi-hard window
  comes from the *first* selected positive (``_contract.semihard_window``).
* ``"distance_weighted"`` (Euclidean only; Wu et al. 2017): the key is
  log w(d) + g_ij, g_ij the Gumbel noise of ``fastmine._philox``, and the k
  largest keys are taken (Gumbel-top-k: k draws without replacement with
  probability proportional to w).  w is computed on the mining value v = d^2:
      vc    = max(v, fl(cutoff^2))
      w > 0 iff vc < fl(min(nonzero_loss_cutoff, 2)^2)
      log w = (2 - D)/2 log(vc) + (3 - D)/2 log1p(-vc / 4)
  (= (2 - D) log dc + (3 - D)/2 log(1 - dc^2/4) with dc = max(d, cutoff)),
  fl() = computed in float64 and rounded to v's dtype, as the semi-hard
  window is; D = the embedding dimension.  References with w = 0 are never
  picked.
* Fewer than k admissible references: the row ends with -1 (distance 0, zero
  gradient).  k = 1 gives exactly ``fastmine.reference.select``'s picks.

The returned distances are recomputed exactly from the rows
(``fastmine._pairs.pair_distance``, one call per column) and differentiate by
plain autograd; the selection itself runs without gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _philox
from ._contract import (DISTANCE_WEIGHTED, DW_CUTOFF, DW_NONZERO_LOSS_CUTOFF, NEG_STRATEGIES,
                        check_seed, checked_references, check_topk_args, semihard_window)
from ._pairs import pair_distance
from .reference import mining_values

TOPK_NEG_STRATEGIES = tuple(NEG_STRATEGIES)  # includes DISTANCE_WEIGHTED


class TopKResult(NamedTuple):
    """What ``mine_topk`` returns (N = anchors).

    pos_idx: int64 [N, k_pos], neg_idx: int64 [N, k_neg]: row indices into the
        references in the strategy's order; trailing -1 where fewer than k are
        admissible (the admissible ones always come first).  Not differentiable.
    pos_dist: [N, k_pos], neg_dist: [N, k_neg], the embeddings' dtype: exact
        distances of the selected pairs (0, zero gradient, at -1), differentiable
        w.r.t. the embeddings and the references.
    """
    pos_idx: Tensor
    neg_idx: Tensor
    pos_dist: Tensor
    neg_dist: Tensor


def topk_by_key(key: Tensor, mask: Tensor, k: int, largest: bool) -> Tensor:
    """Per row, the k admissible columns with the smallest (or largest) key.

    key: [..., M] floating, finite where ``mask``; mask: bool, same shape.
    Returns int64 [..., k]: column indices ordered by key (increasing, or
    decreasing when ``largest``), exact ties by the smallest column; -1 after
    the row's admissible columns run out (and for every slot when M = 0).

    A stable sort of the masked keys is a sort by (key, column): the fill
    (+inf, or -inf when largest) is beyond every admissible key, so the first
    ``count`` sorted columns are exactly the admissible ones.
    """
    m = key.shape[-1]
    fill = float("-inf") if largest else float("inf")
    masked = key.masked_fill(~mask, fill)
    order = torch.sort(masked, dim=-1, descending=largest, stable=True).indices
    kk = min(k, m)
    idx = order[..., :kk]
    count = mask.sum(-1, keepdim=True)
    slot = torch.arange(kk, device=key.device)
    idx = torch.where(slot < count, idx, torch.full_like(idx, -1))
    if kk < k:
        pad = torch.full((*idx.shape[:-1], k - kk), -1, dtype=torch.int64, device=key.device)
        idx = torch.cat([idx, pad], dim=-1)
    return idx


def distance_weighted_log_weight(v: Tensor, dim: int, cutoff: float,
                                 nonzero_loss_cutoff: float) -> Tuple[Tensor, Tensor]:
    """log w on the mining value v = d^2 (see the module docstring).

    v: [...] float32/float64 squared Euclidean distances, as mined; dim: the
    embedding dimension D; cutoff, nonzero_loss_cutoff: > 0.
    Returns (log_w, positive): log_w float64 [...] (-inf where w = 0), and
    positive bool [...] (w > 0).  The thresholds are compared in v's dtype;
    the logarithms are taken in float64 (the oracle; kernels use float32).
    """
    lo = torch.tensor(cutoff * cutoff, dtype=torch.float64).to(v.dtype)
    hi = torch.tensor(min(nonzero_loss_cutoff, 2.0) ** 2, dtype=torch.float64).to(v.dtype)
    vc = v.clamp_min(lo)
    positive = vc < hi  # hi <= 4, so log1p(-vc / 4) is finite where positive
    vc64 = vc.double()
    log_w = (2.0 - dim) / 2.0 * torch.log(vc64) + (3.0 - dim) / 2.0 * torch.log1p(-vc64 / 4.0)
    return log_w.masked_fill(~positive, float("-inf")), positive


def distance_weighted_keys(v: Tensor, dim: int, cutoff: float, nonzero_loss_cutoff: float,
                           seed_key, rows: Optional[Tensor] = None,
                           cols: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The Gumbel-max keys log w(v_ij) + g_ij, float64.

    v: [N, M] mining values (squared distances); seed_key: (k0, k1) from
    ``_philox.split_seed`` -- ints, or int64 tensors shaped [S, 1, 1] to draw
    S seeds at once (the tests); rows, cols: the Philox row and column
    numbers of v's rows and columns (default arange(N), arange(M)).
    Returns (key, positive): key float64 [N, M] (or [S, N, M]), -inf where
    w = 0; positive bool [N, M] (w > 0).  The noise g is evaluated in float64
    from the exact float32 uniforms.
    """
    n, m = v.shape
    rows = torch.arange(n, device=v.device) if rows is None else rows
    cols = torch.arange(m, device=v.device) if cols is None else cols
    log_w, positive = distance_weighted_log_weight(v, dim, cutoff, nonzero_loss_cutoff)
    bits = _philox.pair_bits(seed_key, rows[:, None], cols[None, :])
    g = _philox.gumbel_from_uniform(_philox.uniform_from_bits(bits), torch.float64)
    return log_w + g, positive


def select_topk(x: Tensor, labels: Tensor, r: Tensor, ref_labels: Tensor,
                query_ids: Optional[Tensor], ref_ids: Optional[Tensor], k_pos: int, k_neg: int,
                pos_strategy: str, neg_strategy: str, distance: str, margin: Optional[float],
                cutoff: float, nonzero_loss_cutoff: float,
                seed: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Reference selection: (pos_idx int64 [N, k_pos], neg_idx int64 [N, k_neg]).

    x: [N, D], r: [M, D] floating, one dtype (the references, already
    expanded: the batch itself is passed as r = x with ids); labels [N],
    ref_labels [M] integer; query_ids [N] and ref_ids [M] integer (or both
    None: no same-sample exclusion); k_pos, k_neg ints >= 1.  Strategy and
    distance names as in ``mine_topk``; margin a float or None; cutoff and
    nonzero_loss_cutoff floats > 0 and ``seed`` (an int in [0, 2^64)), used by
    "distance_weighted" only.  Indices in the strategy's order, exact ties by
    the smallest reference index, trailing -1 where fewer are admissible.  Not
    differentiable (integer outputs); no argument checks.
    """
    n, m = x.shape[0], r.shape[0]
    v = mining_values(x, r, distance)  # [N, M], compute dtype, monotone in d
    same = labels[:, None] == ref_labels[None, :]
    allowed = torch.ones_like(same)
    if query_ids is not None:
        allowed = query_ids[:, None] != ref_ids[None, :]  # same-sample pairs never selected

    pos_idx = topk_by_key(v, same & allowed, k_pos, largest=(pos_strategy == "hard"))

    neg_mask = ~same & allowed
    if neg_strategy == DISTANCE_WEIGHTED:
        key, positive = distance_weighted_keys(v, x.shape[1], cutoff, nonzero_loss_cutoff,
                                               _philox.split_seed(seed))
        return pos_idx, topk_by_key(key, neg_mask & positive, k_neg, largest=True)
    if neg_strategy == "semihard":
        first = pos_idx[:, 0]  # the window of the first (nearest / farthest) positive
        v_ap = v.gather(1, first.clamp_min(0)[:, None])[:, 0] if m else v.new_zeros(n)
        lo, hi = semihard_window(v_ap, first >= 0, margin, distance)
        neg_mask = neg_mask & (v > lo[:, None]) & (v < hi[:, None])
    return pos_idx, topk_by_key(v, neg_mask, k_neg, largest=(neg_strategy == "easy"))


def pair_distances(x: Tensor, r: Tensor, idx: Tensor, distance: str) -> Tensor:
    """Exact distances of the pairs (x[i], r[idx[i, t]]): idx int64 [N, k] ->
    [N, k] in x's dtype, 0 (zero gradient) at -1.  One ``pair_distance`` per
    column t, so every backend's per-pair formula and gradient apply."""
    cols = [pair_distance(x, r, idx[:, t], distance) for t in range(idx.shape[1])]
    if not cols:
        return x.new_zeros((x.shape[0], 0))
    return torch.stack(cols, dim=1)


def _check_args(k_pos, k_neg, pos_strategy, neg_strategy, distance, margin, cutoff,
                nonzero_loss_cutoff):
    """The API's argument checks (one definition: ``_contract.check_topk_args``);
    returns (margin, cutoff, nonzero_loss_cutoff) as Python floats/None."""
    _, _, margin, cutoff, nonzero_loss_cutoff, _ = check_topk_args(
        k_pos, k_neg, pos_strategy, neg_strategy, distance, margin, cutoff, nonzero_loss_cutoff,
        None)
    return margin, cutoff, nonzero_loss_cutoff


def mine_topk(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
              ref_labels: Optional[Tensor] = None, *, k_pos: int = 1, k_neg: int = 1,
              pos_strategy: str = "easy", neg_strategy: str = "hard",
              distance: str = "euclidean", margin: Optional[float] = None,
              cutoff: float = DW_CUTOFF, nonzero_loss_cutoff: float = DW_NONZERO_LOSS_CUTOFF,
              seed: Optional[int] = None, query_ids: Optional[Tensor] = None,
              ref_ids: Optional[Tensor] = None) -> TopKResult:
    """The reference for ``fastmine.mine_topk`` (issue #17's API, minus ``backend``).

    Args:
        embeddings: [N, D] float16/bfloat16/float32/float64 anchors.
        labels: [N] integer labels.
        ref_emb, ref_labels: [M, D] and [M] references; default: the batch
            (self-pairs excluded, or pairs with equal ``query_ids``).
        k_pos, k_neg: >= 1, how many positives / negatives per anchor.
        pos_strategy: "easy" (k nearest) or "hard" (k farthest).
        neg_strategy: "hard" (k nearest), "easy" (k farthest), "semihard"
            (k nearest inside the window of the first positive) or
            "distance_weighted" (k draws without replacement, P ~ w(d)).
        distance: "euclidean", "squared_euclidean" or "cosine";
            "distance_weighted" needs "euclidean".
        margin: the semi-hard window's upper margin (>= 0), "semihard" only.
        cutoff, nonzero_loss_cutoff: the distance-weighted clamp and zero-weight
            bound (> 0; used by "distance_weighted" only).
        seed: int in [0, 2^64) keying the noise; None draws one from torch's
            default CPU generator (``_philox.draw_seed``).  Only
            "distance_weighted" uses it.
        query_ids, ref_ids: [N], [M] sample ids, as in ``fastmine.mine``.

    Returns:
        TopKResult(pos_idx int64 [N, k_pos], neg_idx int64 [N, k_neg], pos_dist
        [N, k_pos], neg_dist [N, k_neg]): trailing -1 where fewer are
        admissible; distances in the embeddings' dtype, exact, differentiable
        (plain autograd) w.r.t. embeddings and ref_emb, 0 with zero gradient at
        -1.  The k = 1 columns equal ``fastmine.mine``'s picks; ``mine`` with
        neg_strategy="distance_weighted" is column 0 of k_neg = 1.
    """
    margin, cutoff, nonzero_loss_cutoff = _check_args(
        k_pos, k_neg, pos_strategy, neg_strategy, distance, margin, cutoff, nonzero_loss_cutoff)
    r, ref_labels, query_ids, ref_ids = checked_references(
        embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, distance)
    seed = check_seed(seed)
    if neg_strategy == DISTANCE_WEIGHTED and seed is None:
        seed = _philox.draw_seed()
    with torch.no_grad():
        pos_idx, neg_idx = select_topk(embeddings, labels, r, ref_labels, query_ids, ref_ids,
                                       int(k_pos), int(k_neg), pos_strategy, neg_strategy,
                                       distance, margin, cutoff, nonzero_loss_cutoff, seed)
    return TopKResult(pos_idx, neg_idx, pair_distances(embeddings, r, pos_idx, distance),
                      pair_distances(embeddings, r, neg_idx, distance))
