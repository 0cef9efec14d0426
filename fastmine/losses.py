"""Triplet-style losses built on fastmine.mine.

Every loss module exposes the same two-level interface (a distributed wrapper
relies on these names):

``per_anchor(embeddings, labels, ref_emb=None, ref_labels=None, *, query_ids=None, ref_ids=None)``
    -> ``(terms [N], valid [N] bool)``: one loss term per anchor, 0 where the
    anchor has no admissible positive/negative (``valid`` False).
``forward(...)`` (same arguments)
    -> ``reduce_terms(terms, valid, reduction, average_nonzero)`` (+ any
    regulariser, see MarginLoss).

When no anchor is valid the reduced loss is an exact 0 that is still attached
to the graph (its gradient is zero), never NaN.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _backends
from ._contract import (DISTANCES, check_backend_name, check_choice, check_positive_int, check_real,
                        check_strategy)
from .mine import mine

_REDUCTIONS = ("mean", "sum", "none")


def reduce_terms(terms: Tensor, valid: Tensor, reduction: str = "mean",
                 average_nonzero: bool = False) -> Tensor:
    """Reduce per-anchor loss terms.

    Args:
        terms: [N] float, 0 for invalid anchors.
        valid: [N] bool, anchors that had a positive and a negative.
        reduction: "mean": average over valid anchors (valid anchors whose
            term is 0 count in the denominator), or over anchors with a
            non-zero term when ``average_nonzero`` (pytorch-metric-learning's
            AvgNonZeroReducer behaviour); "sum"; "none": ``terms`` unchanged.
        average_nonzero: see ``reduction``; ignored unless reduction="mean".

    Returns:
        A scalar (or [N] for "none") in ``terms.dtype``.  With an empty
        denominator the result is ``terms.sum() * 0`` = 0, still attached to
        the graph, never NaN.
    """
    check_choice("reduction", reduction, _REDUCTIONS)
    if reduction == "none":
        return terms
    total = terms.sum()  # invalid anchors contribute exact zeros
    if reduction == "sum":
        return total
    keep = valid & (terms > 0) if average_nonzero else valid
    # clamp_min(1): when nothing is kept, total is an exact 0 (all kept-out
    # terms are 0 or excluded), so total / 1 = 0 keeps the graph without NaN.
    count = keep.sum().clamp_min(1).to(terms.dtype)
    if average_nonzero:
        total = torch.where(keep, terms, torch.zeros_like(terms)).sum()
    return total / count


def _check_common(reduction: str, distance: str, pos_strategy: str, neg_strategy: str,
                  backend: str) -> None:
    """Constructor checks shared by the loss modules (the errors ``mine`` would raise later)."""
    check_choice("reduction", reduction, _REDUCTIONS)
    check_choice("distance", distance, DISTANCES)
    check_strategy(pos_strategy, neg_strategy, distance, None)
    if neg_strategy == "distance_weighted":
        raise NotImplementedError("the losses do not take neg_strategy='distance_weighted' yet; "
                                  "sample with fastmine.mine_topk and compute the loss from "
                                  "its distances")
    check_backend_name(backend, _backends._REGISTRY)


class _MinedLoss(nn.Module):
    """Shared plumbing: optional normalisation, fastmine.mine, then the loss of the mined pairs.

    The loss formula has one definition, ``_anchor_terms(pos_dist, neg_dist,
    labels)``, and the reduction one, ``_reduce(terms, valid, labels)``; both
    ``forward``/``per_anchor`` and ``_loss_from_mined`` (the internal entry
    point of ``CrossBatchMemory``, which mines against its ring buffer in
    place and recomputes the selected distances itself) go through them.
    """

    _mining_margin = None  # the semi-hard window passed to mine (TripletMarginLoss)

    def _mining_kwargs(self) -> dict:
        """The keyword arguments this loss passes to ``fastmine.mine``."""
        return dict(pos_strategy=self.pos_strategy, neg_strategy=self.neg_strategy,
                    distance=self.distance, margin=self._mining_margin, backend=self.backend)

    def _mine(self, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids):
        if self.normalize_embeddings:
            embeddings = F.normalize(embeddings, dim=1)
            if ref_emb is not None:
                ref_emb = F.normalize(ref_emb, dim=1)
        return mine(embeddings, labels, ref_emb, ref_labels, query_ids=query_ids,
                    ref_ids=ref_ids, **self._mining_kwargs())

    def _anchor_terms(self, pos_dist: Tensor, neg_dist: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def _reduce(self, terms: Tensor, valid: Tensor, labels: Tensor) -> Tensor:
        return reduce_terms(terms, valid, self.reduction, self.average_nonzero)

    def _masked_terms(self, pos_dist: Tensor, neg_dist: Tensor, valid: Tensor,
                      labels: Tensor) -> Tensor:
        terms = self._anchor_terms(pos_dist, neg_dist, labels)
        return torch.where(valid, terms, torch.zeros_like(terms))

    def _loss_from_mined(self, pos_dist: Tensor, neg_dist: Tensor, valid: Tensor,
                         labels: Tensor) -> Tensor:
        """What ``forward`` returns, given the mined distances [N] and ``valid`` [N]."""
        return self._reduce(self._masked_terms(pos_dist, neg_dist, valid, labels), valid, labels)

    def per_anchor(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                   ref_labels: Optional[Tensor] = None, *, query_ids: Optional[Tensor] = None,
                   ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(terms [N], valid [N] bool); terms are 0 for invalid anchors."""
        res = self._mine(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids)
        return self._masked_terms(res.pos_dist, res.neg_dist, res.valid, labels), res.valid

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, query_ids: Optional[Tensor] = None,
                ref_ids: Optional[Tensor] = None) -> Tensor:
        terms, valid = self.per_anchor(embeddings, labels, ref_emb, ref_labels,
                                       query_ids=query_ids, ref_ids=ref_ids)
        return self._reduce(terms, valid, labels)


def _mines_through_hooks(loss) -> bool:
    """True when ``loss`` is a fastmine loss whose ``forward`` and ``per_anchor``
    are the ones above, so that mining with ``_mining_kwargs`` and reducing
    with ``_loss_from_mined`` computes exactly its forward (a subclass that
    overrides ``forward``, ``per_anchor`` or ``_mine`` is called as it is)."""
    cls = type(loss)
    return (isinstance(loss, _MinedLoss) and cls.forward is _MinedLoss.forward
            and cls.per_anchor is _MinedLoss.per_anchor and cls._mine is _MinedLoss._mine)


class TripletMarginLoss(_MinedLoss):
    """Triplet margin loss with fused exact mining: per anchor
    ``relu(d(a, p) - d(a, n) + margin)`` for the mined (p, n).

    Args:
        margin: the triplet margin.
        distance: "euclidean", "squared_euclidean" or "cosine" (1 - cos).
        pos_strategy, neg_strategy: see ``fastmine.mine``.
        reduction, average_nonzero: see ``reduce_terms``.  Default "mean" over
            valid anchors, zero-loss valid anchors included.
        normalize_embeddings: L2-normalise embeddings (and ref_emb) first.
        semihard_margin: upper window of semihard negatives
            (d_an < d_ap + semihard_margin); only with neg_strategy="semihard".
        backend: fastmine backend.

    Inputs: embeddings [N, D] float, labels [N] int, optional ref_emb [M, D],
    ref_labels [M], query_ids [N], ref_ids [M] (same-sample exclusion).
    """

    def __init__(self, margin: float = 0.1, distance: str = "euclidean",
                 pos_strategy: str = "easy", neg_strategy: str = "semihard",
                 reduction: str = "mean", normalize_embeddings: bool = False,
                 average_nonzero: bool = False, semihard_margin: Optional[float] = None,
                 backend: str = "auto"):
        super().__init__()
        _check_common(reduction, distance, pos_strategy, neg_strategy, backend)
        self.margin = check_real("margin", margin, minimum=0.0)
        if semihard_margin is not None:
            if neg_strategy != "semihard":
                raise ValueError(f"semihard_margin is only used by neg_strategy='semihard'; got "
                                 f"semihard_margin={semihard_margin!r} with "
                                 f"neg_strategy={neg_strategy!r}")
            semihard_margin = check_real("semihard_margin", semihard_margin, minimum=0.0)
        self.distance, self.pos_strategy, self.neg_strategy = distance, pos_strategy, neg_strategy
        self.reduction, self.average_nonzero = reduction, bool(average_nonzero)
        self.normalize_embeddings = bool(normalize_embeddings)
        self.semihard_margin = semihard_margin
        self.backend = backend

    @property
    def _mining_margin(self):
        return self.semihard_margin

    def _anchor_terms(self, pos_dist: Tensor, neg_dist: Tensor, labels: Tensor) -> Tensor:
        return F.relu(pos_dist - neg_dist + self.margin)


class MarginLoss(_MinedLoss):
    """Margin loss of Wu et al. 2017 ("Sampling matters") with fused mining: per anchor
    ``relu(d_ap - beta + margin) + relu(beta - d_an + margin)``.

    Args:
        margin: the margin around the boundary beta.
        beta: initial boundary; one global value, or one per class when
            ``num_classes`` is given (indexed by the anchor's label, which must
            then lie in [0, num_classes): checked eagerly on CPU, by a
            device-side assertion without a host sync on CUDA).
        learn_beta: make beta an ``nn.Parameter``.
        nu: weight of the beta regulariser ``nu * beta`` (only when learn_beta,
            as in pytorch-metric-learning); see ``regularizer``.
        pos_strategy, neg_strategy, distance, reduction, normalize_embeddings,
        average_nonzero, backend: as in TripletMarginLoss.

    ``forward`` returns ``reduce_terms(...) + regularizer(labels, valid)``
    (for reduction="none", the regulariser is not added: add it yourself).
    """

    def __init__(self, margin: float = 0.2, beta: float = 1.2, learn_beta: bool = False,
                 num_classes: Optional[int] = None, nu: float = 0.0,
                 pos_strategy: str = "easy", neg_strategy: str = "semihard",
                 distance: str = "euclidean", reduction: str = "mean",
                 normalize_embeddings: bool = False, average_nonzero: bool = False,
                 backend: str = "auto"):
        super().__init__()
        _check_common(reduction, distance, pos_strategy, neg_strategy, backend)
        if num_classes is not None:
            num_classes = check_positive_int("num_classes", num_classes)
        self.margin = check_real("margin", margin, minimum=0.0)
        self.nu = check_real("nu", nu, minimum=0.0)
        self.learn_beta = bool(learn_beta)
        self.num_classes = num_classes
        init = torch.full((num_classes or 1,), check_real("beta", beta))
        if self.learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self.distance, self.pos_strategy, self.neg_strategy = distance, pos_strategy, neg_strategy
        self.reduction, self.average_nonzero = reduction, bool(average_nonzero)
        self.normalize_embeddings = bool(normalize_embeddings)
        self.backend = backend

    def _beta_for(self, labels: Tensor, dtype) -> Tensor:
        """[N] beta of each anchor (global beta broadcast, or beta[label])."""
        beta = self.beta.to(dtype)
        if self.num_classes:
            labels = labels.long()
            if not torch.compiler.is_compiling() and labels.numel():
                if labels.device.type == "cpu":  # eager, as the contract's data checks
                    lo, hi = torch.aminmax(labels)
                    if int(lo) < 0 or int(hi) >= self.num_classes:
                        bad = int(lo) if int(lo) < 0 else int(hi)
                        raise ValueError(f"labels must lie in [0, num_classes) = [0, "
                                         f"{self.num_classes}) for per-class beta, got label {bad}")
                else:  # no host sync: a device-side assertion, failing a later sync
                    torch._assert_async(((labels >= 0) & (labels < self.num_classes)).all(),
                                        f"fastmine: labels must lie in [0, num_classes) = [0, "
                                        f"{self.num_classes}) for per-class beta")
            return beta[labels]
        return beta.expand(labels.shape[0])

    def _anchor_terms(self, pos_dist: Tensor, neg_dist: Tensor, labels: Tensor) -> Tensor:
        beta = self._beta_for(labels, pos_dist.dtype)
        return F.relu(pos_dist - beta + self.margin) + F.relu(beta - neg_dist + self.margin)

    def regularizer(self, labels: Tensor, valid: Tensor) -> Tensor:
        """``nu * beta`` term (scalar); 0 unless learn_beta.

        Global beta: ``nu * beta`` (as pytorch-metric-learning).  Per-class
        beta: mean of ``nu * beta[label]`` over valid anchors (PML divides the
        sum by its non-zero pair count instead).
        """
        if not self.learn_beta or self.nu == 0.0:
            return self.beta.sum() * 0.0
        if not self.num_classes:
            return self.nu * self.beta.sum()
        b = self._beta_for(labels, self.beta.dtype)
        b = torch.where(valid, b, torch.zeros_like(b))
        return self.nu * b.sum() / valid.sum().clamp_min(1).to(b.dtype)

    def _reduce(self, terms: Tensor, valid: Tensor, labels: Tensor) -> Tensor:
        out = reduce_terms(terms, valid, self.reduction, self.average_nonzero)
        if self.reduction == "none":
            return out
        return out + self.regularizer(labels, valid).to(out.dtype)


def triplet_margin_loss(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                        ref_labels: Optional[Tensor] = None, *, query_ids=None, ref_ids=None,
                        **kwargs) -> Tensor:
    """Functional TripletMarginLoss; ``kwargs`` are its constructor arguments."""
    return TripletMarginLoss(**kwargs)(embeddings, labels, ref_emb, ref_labels,
                                       query_ids=query_ids, ref_ids=ref_ids)


def margin_loss(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, query_ids=None, ref_ids=None,
                **kwargs) -> Tensor:
    """Functional MarginLoss (fixed beta unless you pass learn_beta, which is
    then a fresh parameter); ``kwargs`` are its constructor arguments."""
    return MarginLoss(**kwargs)(embeddings, labels, ref_emb, ref_labels,
                                query_ids=query_ids, ref_ids=ref_ids)
