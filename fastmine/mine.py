"""fastmine.mine: the public entry point, and MineFunction for the raw op outputs."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _backends, _extension, _ops, _philox, reference  # noqa: F401  (_ops: fake kernels)
from ._contract import (DISTANCE_WEIGHTED, DISTANCES, DW_CUTOFF, DW_NONZERO_LOSS_CUTOFF,
                        NEG_STRATEGIES, POS_STRATEGIES, check_backend_name, check_embeddings,
                        check_index_vector, check_strategy, check_sampling_args, check_topk_args,
                        seed_as_int64, seed_from_int64, widen_index_vector)
from .reference_topk import TopKResult

__all__ = ["mine", "mine_topk", "MineFunction", "MiningResult", "TopKResult"]


class MiningResult(NamedTuple):
    """What ``mine`` returns; every field is [N] (N = rows of ``embeddings``).

    pos_idx, neg_idx: int64 [N], row indices into the references (``ref_emb``,
        or the batch itself); -1 where no admissible reference exists (no
        same-class reference other than the anchor's own sample for pos_idx; no
        different-class one, or none inside the semi-hard window, for neg_idx).
        Not differentiable.
    pos_dist, neg_dist: [N] in the embeddings' dtype, the distance of the
        selected pair recomputed exactly from the rows; differentiable w.r.t.
        embeddings and ref_emb; 0 (with zero gradient) where the index is -1.
    valid: bool [N], ``(pos_idx >= 0) & (neg_idx >= 0)``: the anchor has a
        triplet.  Reduce with it (``fastmine.losses.reduce_terms``), not with
        ``[valid].mean()``, which is NaN when no anchor is valid.
    """
    pos_idx: Tensor
    neg_idx: Tensor
    pos_dist: Tensor
    neg_dist: Tensor
    valid: Tensor


def _prepare(embeddings, labels, ref_emb, ref_labels, pos_strategy, neg_strategy, distance,
             margin, query_ids, ref_ids, backend, needs=frozenset()):
    """Validate (statically) and fill in defaults; returns the op's argument tuple.

    ref_emb / ref_labels stay None when the references are the batch: the op
    then excludes self-pairs itself (no arange is materialised).  ``needs``:
    the backend rules the call needs (``_backends.rules_needed``)."""
    check_embeddings("embeddings", embeddings)
    device = embeddings.device
    n = embeddings.shape[0]
    check_index_vector("labels", labels, n, "embeddings", device)
    check_strategy(pos_strategy, neg_strategy, distance, margin)
    check_backend_name(backend, _backends._REGISTRY)
    if (ref_emb is None) != (ref_labels is None):
        missing = "ref_labels" if ref_labels is None else "ref_emb"
        raise ValueError(f"ref_emb and ref_labels must be given together ({missing} is missing)")
    if ref_emb is None:
        if ref_ids is not None:
            raise ValueError("ref_ids given without ref_emb: when the references are the batch "
                             "their ids are query_ids")
        if query_ids is not None:
            check_index_vector("query_ids", query_ids, n, "embeddings", device)
            query_ids = widen_index_vector(query_ids)
    else:
        check_embeddings("ref_emb", ref_emb)
        if ref_emb.device != device:
            raise ValueError(f"ref_emb is on {ref_emb.device} but embeddings are on {device}")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(f"embeddings have dim {embeddings.shape[1]} but ref_emb has dim "
                             f"{ref_emb.shape[1]}")
        if ref_emb.dtype != embeddings.dtype:
            raise TypeError(f"embeddings ({embeddings.dtype}) and ref_emb ({ref_emb.dtype}) "
                            "must have the same dtype")
        check_index_vector("ref_labels", ref_labels, ref_emb.shape[0], "ref_emb", device)
        ref_labels = widen_index_vector(ref_labels)
        if (query_ids is None) != (ref_ids is None):
            missing = "ref_ids" if ref_ids is None else "query_ids"
            raise ValueError(f"with ref_emb, query_ids and ref_ids must be given together "
                             f"({missing} is missing)")
        if query_ids is not None:
            check_index_vector("query_ids", query_ids, n, "embeddings", device)
            check_index_vector("ref_ids", ref_ids, ref_emb.shape[0], "ref_emb", device)
            query_ids, ref_ids = widen_index_vector(query_ids), widen_index_vector(ref_ids)
    backend = _backends.resolve(backend, device, needs)
    margin = None if margin is None else float(margin)
    return (embeddings, widen_index_vector(labels), ref_emb, ref_labels, query_ids, ref_ids,
            POS_STRATEGIES[pos_strategy], NEG_STRATEGIES[neg_strategy], DISTANCES[distance],
            margin, backend)


def _mine_op(args):
    """(pos_idx, neg_idx, pos_dist, neg_dist, valid): the op fastmine::mine, or,
    when the compiled extension is missing, the reference computed eagerly."""
    if args[-1] == "torch" and not _extension.loaded():
        pos_idx, neg_idx, pos_dist, neg_dist = reference.mine_eager(*args[:-1])
        return pos_idx, neg_idx, pos_dist, neg_dist, (pos_idx >= 0) & (neg_idx >= 0)
    return torch.ops.fastmine.mine(*args)


def _prepare_topk(embeddings, labels, ref_emb, ref_labels, k_pos, k_neg, pos_strategy,
                  neg_strategy, distance, margin, cutoff, nonzero_loss_cutoff, seed, query_ids,
                  ref_ids, backend, topk):
    """The argument tuple of fastmine::mine_topk (``topk``: a mine_topk call; False:
    fastmine.mine with distance_weighted, k = 1).  Argument checks first (each
    error names its argument), then ``seed=None`` is resolved here, before the
    op, from torch's default CPU generator (distance_weighted only; the other
    rules ignore the seed and draw nothing), so every backend receives an int."""
    k_pos, k_neg, margin, cutoff, nonzero_loss_cutoff, seed = check_topk_args(
        k_pos, k_neg, pos_strategy, neg_strategy, distance, margin, cutoff, nonzero_loss_cutoff,
        seed)
    (embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, pos, neg, dist, margin,
     backend) = _prepare(embeddings, labels, ref_emb, ref_labels, pos_strategy, neg_strategy,
                         distance, margin, query_ids, ref_ids, backend,
                         _backends.rules_needed(neg_strategy, topk))
    if seed is None:
        seed = _philox.draw_seed() if neg_strategy == DISTANCE_WEIGHTED else 0
    return (embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, k_pos, k_neg, pos, neg,
            dist, margin, cutoff, nonzero_loss_cutoff, seed_as_int64(seed), backend)


def _topk_op(args):
    """(pos_idx, neg_idx, pos_dist, neg_dist): the op fastmine::mine_topk, or, when
    the compiled extension is missing, the reference computed eagerly."""
    if args[-1] == "torch" and not _extension.loaded():
        from . import reference_topk
        (x, y, r, ry, qid, rid, k_pos, k_neg, pos, neg, dist, margin, cutoff, nzlc, seed,
         _) = args
        name = lambda table, code: next(k for k, v in table.items() if v == code)  # noqa: E731
        return tuple(reference_topk.mine_topk(
            x, y, r, ry, k_pos=k_pos, k_neg=k_neg, pos_strategy=name(POS_STRATEGIES, pos),
            neg_strategy=name(NEG_STRATEGIES, neg), distance=name(DISTANCES, dist),
            margin=margin, cutoff=cutoff, nonzero_loss_cutoff=nzlc, seed=seed_from_int64(seed),
            query_ids=qid, ref_ids=rid))
    return torch.ops.fastmine.mine_topk(*args)


def mine_topk(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
              ref_labels: Optional[Tensor] = None, *, k_pos: int = 1, k_neg: int = 1,
              pos_strategy: str = "easy", neg_strategy: str = "hard",
              distance: str = "euclidean", margin: Optional[float] = None,
              cutoff: float = DW_CUTOFF, nonzero_loss_cutoff: float = DW_NONZERO_LOSS_CUTOFF,
              seed: Optional[int] = None, query_ids: Optional[Tensor] = None,
              ref_ids: Optional[Tensor] = None, backend: str = "auto") -> TopKResult:
    """Select, per anchor, k_pos positives and k_neg negatives (issue #17).

    Args:
        embeddings: [N, D] float16/bfloat16/float32/float64 anchors.
        labels: [N] integer class labels.
        ref_emb, ref_labels: [M, D] (embeddings' dtype and device) and [M]
            references; default: the batch itself (self-pairs excluded).
        k_pos, k_neg: integers >= 1, positives / negatives per anchor.
        pos_strategy: "easy" (the k nearest same-class references, increasing
            distance) or "hard" (the k farthest, decreasing distance).
        neg_strategy: "hard" (k nearest different-class), "easy" (k farthest),
            "semihard" (k nearest with d_an > d_ap of the first positive, and
            < d_ap + margin when margin is given) or "distance_weighted" (k draws
            without replacement with probability ~ w(d), Wu et al. 2017;
            Euclidean only; docs/contract.md, "Random sampling").
        distance: "euclidean", "squared_euclidean" or "cosine" (1 - cos).
        margin: semi-hard upper window, a real >= 0; only with "semihard".
        cutoff, nonzero_loss_cutoff: finite reals > 0, the distance-weighted
            clamp and zero-weight bound (used by "distance_weighted" only).
        seed: None or an int in [0, 2^64) keying the noise of
            "distance_weighted"; None draws one from torch's default CPU
            generator (so ``torch.manual_seed`` makes runs reproducible).
        query_ids, ref_ids: [N], [M] integer sample ids, as in ``fastmine.mine``.
        backend: "auto", "torch" (the reference), or a backend that implements
            top-k, e.g. "cpu" (``auto`` picks one; on others NotImplementedError).

    Returns:
        TopKResult(pos_idx int64 [N, k_pos], neg_idx int64 [N, k_neg],
        pos_dist [N, k_pos], neg_dist [N, k_neg]): indices into the references
        in the strategy's order, exact ties by the smallest index, trailing -1
        where fewer are admissible; distances of the selected pairs in the
        embeddings' dtype, recomputed exactly, differentiable w.r.t. embeddings
        and ref_emb (0 with zero gradient at -1).  k = 1 equals ``mine``.
    """
    return TopKResult._make(_topk_op(_prepare_topk(
        embeddings, labels, ref_emb, ref_labels, k_pos, k_neg, pos_strategy, neg_strategy,
        distance, margin, cutoff, nonzero_loss_cutoff, seed, query_ids, ref_ids, backend,
        topk=True)))


def mine(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
         ref_labels: Optional[Tensor] = None, *, pos_strategy: str = "easy",
         neg_strategy: str = "hard", distance: str = "euclidean",
         margin: Optional[float] = None, query_ids: Optional[Tensor] = None,
         ref_ids: Optional[Tensor] = None, backend: str = "auto", cutoff: float = DW_CUTOFF,
         nonzero_loss_cutoff: float = DW_NONZERO_LOSS_CUTOFF,
         seed: Optional[int] = None) -> MiningResult:
    """Select, per anchor, one positive and one negative reference.

    Args:
        embeddings: [N, D] float16/bfloat16/float32/float64 anchors.
        labels: [N] integer class labels.
        ref_emb, ref_labels: [M, D] and [M] references (e.g. a memory bank);
            default: the batch itself.
        pos_strategy: "easy" (nearest same-class reference, EPS) or "hard" (farthest).
        neg_strategy: "hard" (nearest different-class), "semihard" (nearest with
            d_an > d_ap, and d_an < d_ap + margin if margin is given), "easy"
            (farthest) or "distance_weighted" (one draw with probability ~ w(d),
            Euclidean only: ``mine_topk`` with k_pos = k_neg = 1).
        distance: "euclidean", "squared_euclidean" or "cosine" (1 - cos).
        margin: semi-hard upper window, >= 0; only with neg_strategy="semihard".
        query_ids, ref_ids: [N], [M] integer sample ids; a pair with equal ids
            is the same sample and is never selected.  Default: each row is its
            own sample when the references are the batch (self-pairs
            excluded); no exclusion when ref_emb is given without ids.
        backend: "auto", "torch" (reference), "cpu", "triton" or "cuda"
            ("distance_weighted": a backend that implements it, see
            ``mine_topk``; auto picks one).
        cutoff, nonzero_loss_cutoff, seed: "distance_weighted" only; see
            ``mine_topk`` (cutoffs: finite reals > 0, checked always; seed:
            None or an int in [0, 2^64)).

    Returns:
        MiningResult(pos_idx, neg_idx, pos_dist, neg_dist, valid), each [N].
        Exact ties go to the smallest reference index.  See docs/contract.md.
    """
    if neg_strategy == DISTANCE_WEIGHTED:
        # k = 1 of the top-k op, which carries the seed and the cutoffs.
        pos_idx, neg_idx, pos_dist, neg_dist = _topk_op(_prepare_topk(
            embeddings, labels, ref_emb, ref_labels, 1, 1, pos_strategy, neg_strategy,
            distance, margin, cutoff, nonzero_loss_cutoff, seed, query_ids, ref_ids, backend,
            topk=False))
        pos_idx, neg_idx = pos_idx[:, 0], neg_idx[:, 0]
        return MiningResult(pos_idx, neg_idx, pos_dist[:, 0], neg_dist[:, 0],
                            (pos_idx >= 0) & (neg_idx >= 0))
    args = _prepare(embeddings, labels, ref_emb, ref_labels, pos_strategy, neg_strategy,
                    distance, margin, query_ids, ref_ids, backend)
    if seed is not None or cutoff != DW_CUTOFF or nonzero_loss_cutoff != DW_NONZERO_LOSS_CUTOFF:
        check_sampling_args(cutoff, nonzero_loss_cutoff, seed)  # unused here, but never wrong
    return MiningResult._make(_mine_op(args))


class MineFunction:
    """Mining as a function of tensors, for research code that wants the raw outputs.

    ``MineFunction.apply(embeddings, labels, ref_emb=None, ref_labels=None,
    pos_strategy="easy", neg_strategy="hard", distance="euclidean", margin=None,
    query_ids=None, ref_ids=None, backend="auto")`` (positional, like
    ``torch.autograd.Function.apply``; the arguments are checked as in ``mine``):

        embeddings  [N, D] float16/bfloat16/float32/float64 anchors
        labels      [N] integer class labels
        ref_emb     [M, D] references (embeddings' dtype and device), or None:
                    the batch itself, self-pairs excluded
        ref_labels  [M] integer, given exactly when ref_emb is
        pos_strategy, neg_strategy, distance, margin: as in ``mine``
                    ("distance_weighted" runs with the default cutoffs and a
                    seed drawn from torch's default CPU generator)
        query_ids   [N] integer sample ids, or None
        ref_ids     [M] integer sample ids (with ref_emb and query_ids), or None
        backend     "auto", "torch", "cpu", "triton" or "cuda"

    Returns ``(pos_idx, neg_idx, pos_dist, neg_dist)``, the first four fields
    of ``MiningResult``: the indices int64 [N] (-1: none admissible), not
    differentiable; the distances [N] in the embeddings' dtype, differentiable
    w.r.t. ``embeddings`` and ``ref_emb`` (not labels or ids) through the op's
    one registered autograd (``fastmine::mine_backward``), 0 with zero gradient
    at -1.  When the references are the batch, both halves of the gradient land
    in ``embeddings.grad``.
    """

    @staticmethod
    def apply(embeddings, labels, ref_emb=None, ref_labels=None, pos_strategy="easy",
              neg_strategy="hard", distance="euclidean", margin=None, query_ids=None,
              ref_ids=None, backend="auto"):
        if neg_strategy == DISTANCE_WEIGHTED:  # default cutoffs, seed drawn: see ``mine``
            return tuple(mine(embeddings, labels, ref_emb, ref_labels, pos_strategy=pos_strategy,
                              neg_strategy=neg_strategy, distance=distance, margin=margin,
                              query_ids=query_ids, ref_ids=ref_ids, backend=backend))[:4]
        return _mine_op(_prepare(embeddings, labels, ref_emb, ref_labels, pos_strategy,
                                 neg_strategy, distance, margin, query_ids, ref_ids, backend))[:4]
