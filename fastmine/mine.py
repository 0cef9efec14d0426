"""fastmine.mine: the public entry point, and MineFunction for the raw op outputs."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _backends, _extension, _ops, reference  # noqa: F401  (_ops: fake kernels)
from ._contract import (DISTANCES, NEG_STRATEGIES, POS_STRATEGIES, check_backend_name,
                        check_embeddings, check_index_vector, check_strategy, widen_index_vector)


class MiningResult(NamedTuple):
    """What ``mine`` returns; every field is [N] (N = rows of ``embeddings``).

    pos_idx, neg_idx: int64, index into the references (``ref_emb``, or the
        batch itself); -1 where no admissible reference exists.
    pos_dist, neg_dist: distance of the selected pair, recomputed exactly from
        the rows, in the embeddings' dtype; differentiable w.r.t. embeddings and
        ref_emb; 0 (with zero gradient) where the index is -1.
    valid: bool, ``pos_idx >= 0 & neg_idx >= 0``.
    """
    pos_idx: Tensor
    neg_idx: Tensor
    pos_dist: Tensor
    neg_dist: Tensor
    valid: Tensor


def _prepare(embeddings, labels, ref_emb, ref_labels, pos_strategy, neg_strategy, distance,
             margin, query_ids, ref_ids, backend):
    """Validate (statically) and fill in defaults; returns the op's argument tuple.

    ref_emb / ref_labels stay None when the references are the batch: the op
    then excludes self-pairs itself (no arange is materialised)."""
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
    backend = _backends.resolve(backend, device)
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


def mine(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
         ref_labels: Optional[Tensor] = None, *, pos_strategy: str = "easy",
         neg_strategy: str = "hard", distance: str = "euclidean",
         margin: Optional[float] = None, query_ids: Optional[Tensor] = None,
         ref_ids: Optional[Tensor] = None, backend: str = "auto") -> MiningResult:
    """Select, per anchor, one positive and one negative reference.

    Args:
        embeddings: [N, D] float16/bfloat16/float32/float64 anchors.
        labels: [N] integer class labels.
        ref_emb, ref_labels: [M, D] and [M] references (e.g. a memory bank);
            default: the batch itself.
        pos_strategy: "easy" (nearest same-class reference, EPS) or "hard" (farthest).
        neg_strategy: "hard" (nearest different-class), "semihard" (nearest with
            d_an > d_ap, and d_an < d_ap + margin if margin is given) or "easy" (farthest).
        distance: "euclidean", "squared_euclidean" or "cosine" (1 - cos).
        margin: semi-hard upper window, >= 0; only with neg_strategy="semihard".
        query_ids, ref_ids: [N], [M] integer sample ids; a pair with equal ids
            is the same sample and is never selected.  Default: each row is its
            own sample when the references are the batch (self-pairs
            excluded); no exclusion when ref_emb is given without ids.
        backend: "auto", "torch" (reference), "cpu", "triton" or "cuda".

    Returns:
        MiningResult(pos_idx, neg_idx, pos_dist, neg_dist, valid), each [N].
        Exact ties go to the smallest reference index.  See docs/contract.md.
    """
    return MiningResult._make(_mine_op(_prepare(
        embeddings, labels, ref_emb, ref_labels, pos_strategy, neg_strategy, distance, margin,
        query_ids, ref_ids, backend)))


class MineFunction:
    """Mining as a function of tensors, for research code that wants the raw outputs.

    ``MineFunction.apply(embeddings, labels, ref_emb=None, ref_labels=None,
    pos_strategy="easy", neg_strategy="hard", distance="euclidean", margin=None,
    query_ids=None, ref_ids=None, backend="auto")`` (positional, like
    ``torch.autograd.Function.apply``) returns ``(pos_idx, neg_idx, pos_dist,
    neg_dist)``: the indices are int64 [N] and not differentiable; the
    distances [N] are differentiable w.r.t. ``embeddings`` and ``ref_emb``
    through the op's one registered autograd (``fastmine::mine_backward``).
    When the references are the batch, both halves of the gradient land in
    ``embeddings.grad``.
    """

    @staticmethod
    def apply(embeddings, labels, ref_emb=None, ref_labels=None, pos_strategy="easy",
              neg_strategy="hard", distance="euclidean", margin=None, query_ids=None,
              ref_ids=None, backend="auto"):
        return _mine_op(_prepare(embeddings, labels, ref_emb, ref_labels, pos_strategy,
                                 neg_strategy, distance, margin, query_ids, ref_ids, backend))[:4]
