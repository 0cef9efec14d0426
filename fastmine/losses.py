"""Triplet-style losses built on fastmine.mine.

Every loss module exposes the same two-level interface (a distributed wrapper
relies on these names):

``per_anchor(embeddings, labels, ref_emb=None, ref_labels=None, *, query_ids=None, ref_ids=None)``
    -> ``(terms, valid bool)``: one loss term per triplet (anchor i, its s-th
    mined positive, its t-th mined negative), 0 where the triplet does not
    exist (a -1 slot: ``valid`` False).  Shapes: [N] with k_pos = k_neg = 1
    (the default: one triplet per anchor), else [N, k_pos, k_neg].
``forward(...)`` (same arguments)
    -> ``reduce_terms(terms, valid, reduction, average_nonzero)`` (+ any
    regulariser, see MarginLoss).

So every reduction counts triplets: "mean" divides by the number of valid
triplets (= valid anchors when k = 1), ``average_nonzero`` by the number of
triplets with a non-zero term (pytorch-metric-learning's AvgNonZeroReducer
over the same triplets).  When no triplet is valid the reduced loss is an
exact 0 that is still attached to the graph (its gradient is zero), never NaN.

Mining: k_pos = k_neg = 1 runs ``fastmine.mine`` (the op ``fastmine::mine``,
or its k = 1 top-k path for neg_strategy="distance_weighted"); otherwise
``fastmine.mine_topk``.  Both pick the backend with ``backend`` ("auto": the
fastest one that implements the rule).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _backends
from ._contract import (DISTANCES, DW_CUTOFF, DW_NONZERO_LOSS_CUTOFF, check_backend_name,
                        check_bool, check_choice, check_not_indices_tuple, check_positive_int,
                        check_real, check_semihard_margin, check_topk_args, l2_normalized)
from .mine import mine, mine_topk
from .reference_topk import TopKResult

__all__ = ["reduce_terms", "TripletMarginLoss", "MarginLoss", "triplet_margin_loss", "margin_loss",
           "MultiSimilarityLoss", "NTXentLoss", "SupConLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _kept_in_mean(terms: Tensor, valid: Tensor, average_nonzero: bool) -> Tensor:
    """bool, the shape of ``terms``: the triplets a "mean" reduction averages
    over -- the valid ones, or (``average_nonzero``) the valid ones with a
    non-zero term.  The one definition shared by ``reduce_terms`` and
    ``fastmine.DistributedLoss``."""
    return valid & (terms > 0) if average_nonzero else valid


def reduce_terms(terms: Tensor, valid: Tensor, reduction: str = "mean",
                 average_nonzero: bool = False) -> Tensor:
    """Reduce per-anchor loss terms.

    Args:
        terms: float, one term per triplet, 0 for invalid ones: [N] (one
            triplet per anchor) or [N, k_pos, k_neg] (any shape works).
        valid: bool, the shape of ``terms``: triplets whose positive and
            negative exist.
        reduction: "mean": average over valid triplets (valid triplets whose
            term is 0 count in the denominator), or over triplets with a
            non-zero term when ``average_nonzero`` (pytorch-metric-learning's
            AvgNonZeroReducer behaviour); "sum"; "none": ``terms`` unchanged.
        average_nonzero: bool, see ``reduction``; ignored unless reduction="mean".

    Raises:
        TypeError: ``terms`` is not a floating tensor, ``valid`` not a bool
            tensor, or ``average_nonzero`` not a bool.
        ValueError: ``valid`` and ``terms`` differ in shape, or an unknown
            ``reduction``.

    Returns:
        A scalar (or ``terms`` for "none") in ``terms.dtype``.  With an empty
        denominator the result is ``terms.sum() * 0`` = 0, still attached to
        the graph, never NaN.
    """
    if not isinstance(terms, Tensor) or not terms.is_floating_point():
        got = terms.dtype if isinstance(terms, Tensor) else type(terms).__name__
        raise TypeError(f"terms must be a floating-point torch.Tensor, got {got}")
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, Tensor) else type(valid).__name__
        raise TypeError(f"valid must be a bool torch.Tensor, got {got}")
    if valid.shape != terms.shape:
        raise ValueError(f"valid must have the shape of terms {tuple(terms.shape)}, got "
                         f"{tuple(valid.shape)}")
    return _reduce_terms(terms, valid, reduction, check_bool("average_nonzero", average_nonzero))


def _reduce_terms(terms: Tensor, valid: Tensor, reduction: str, average_nonzero: bool) -> Tensor:
    """``reduce_terms`` without its input checks: the loss modules' own path, on
    the terms and validity they built (``reduction`` is still checked: it is a
    mutable attribute of theirs)."""
    check_choice("reduction", reduction, _REDUCTIONS)
    if reduction == "none":
        return terms
    total = terms.sum()  # invalid anchors contribute exact zeros
    if reduction == "sum":
        return total
    keep = _kept_in_mean(terms, valid, average_nonzero)
    # clamp_min(1): when nothing is kept, total is an exact 0 (all kept-out
    # terms are 0 or excluded), so total / 1 = 0 keeps the graph without NaN.
    count = keep.sum().clamp_min(1).to(terms.dtype)
    if average_nonzero:
        total = torch.where(keep, terms, torch.zeros_like(terms)).sum()
    return total / count


def _check_common(loss: "_MinedLoss", reduction: str, distance: str, pos_strategy: str,
                  neg_strategy: str, backend: str, k_pos, k_neg, cutoff, nonzero_loss_cutoff,
                  seed) -> None:
    """Constructor checks shared by the loss modules (the errors ``mine`` /
    ``mine_topk`` would raise later, each naming its argument); stores the
    mining settings on ``loss``."""
    check_choice("reduction", reduction, _REDUCTIONS)
    check_choice("distance", distance, DISTANCES)
    k_pos, k_neg, _, cutoff, nonzero_loss_cutoff, seed = check_topk_args(
        k_pos, k_neg, pos_strategy, neg_strategy, distance, None, cutoff, nonzero_loss_cutoff,
        seed)
    check_backend_name(backend, _backends._REGISTRY)
    loss.distance, loss.pos_strategy, loss.neg_strategy = distance, pos_strategy, neg_strategy
    loss.k_pos, loss.k_neg, loss.backend = k_pos, k_neg, backend
    loss.cutoff, loss.nonzero_loss_cutoff, loss.seed = cutoff, nonzero_loss_cutoff, seed
    loss.reduction = reduction


def _per_triplet(values: Tensor, valid: Tensor) -> Tensor:
    """A per-anchor [N] tensor broadcast to the triplet shape of ``valid``
    ([N], or [N, k_pos, k_neg]): triplet (i, s, t) gets values[i]."""
    return values.reshape(values.shape[:1] + (1,) * (valid.dim() - 1)).expand(valid.shape)


class _MinedLoss(nn.Module):
    """Shared plumbing: optional normalisation, mining, then the loss of the mined triplets.

    Mining has one definition, ``_select`` ([N, k] picks, whatever k); the
    loss formula one, ``_anchor_terms(pos_dist, neg_dist, labels)`` (on
    broadcast [N, k_pos, 1] and [N, 1, k_neg] distances: every triplet of an
    anchor); the triplets' validity and shape one, ``_triplet_terms``; and the
    reduction one, ``_reduce(terms, valid, labels)``.  Both
    ``forward``/``per_anchor`` and ``_loss_from_mined`` (the internal entry
    point of ``CrossBatchMemory``, which mines against its ring buffer in
    place and recomputes the selected distances itself) go through them.
    """

    _mining_margin = None  # the semi-hard window passed to mine (TripletMarginLoss)
    # Mining settings (set by _check_common; these class defaults are k = 1 and
    # the contract's sampling defaults, for subclasses that set their own).
    k_pos = k_neg = 1
    cutoff, nonzero_loss_cutoff, seed = DW_CUTOFF, DW_NONZERO_LOSS_CUTOFF, None

    def _mining_kwargs(self) -> dict:
        """The keyword arguments this loss passes to ``fastmine.mine`` /
        ``fastmine.mine_topk`` (besides k_pos, k_neg and the tensors)."""
        return dict(pos_strategy=self.pos_strategy, neg_strategy=self.neg_strategy,
                    distance=self.distance, margin=self._mining_margin, backend=self.backend,
                    cutoff=self.cutoff, nonzero_loss_cutoff=self.nonzero_loss_cutoff,
                    seed=self.seed)

    def _select(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                ref_labels: Optional[Tensor], query_ids: Optional[Tensor],
                ref_ids: Optional[Tensor]) -> TopKResult:
        """The mined picks as TopKResult (pos_idx [N, k_pos], neg_idx [N, k_neg]
        int64, -1 for an empty slot; pos_dist, neg_dist the same shapes,
        differentiable).  k_pos = k_neg = 1 runs ``fastmine.mine`` (its
        columns, so that k = 1 is exactly the op and backends it always ran),
        otherwise ``fastmine.mine_topk`` (equal to ``mine`` at k = 1)."""
        kw = self._mining_kwargs()
        if self.k_pos == 1 and self.k_neg == 1:
            r = mine(embeddings, labels, ref_emb, ref_labels, query_ids=query_ids,
                     ref_ids=ref_ids, **kw)
            return TopKResult(r.pos_idx[:, None], r.neg_idx[:, None], r.pos_dist[:, None],
                              r.neg_dist[:, None])
        return mine_topk(embeddings, labels, ref_emb, ref_labels, k_pos=self.k_pos,
                         k_neg=self.k_neg, query_ids=query_ids, ref_ids=ref_ids, **kw)

    def _mine(self, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids) -> TopKResult:
        check_not_indices_tuple("fastmine losses", ref_emb)
        if self.normalize_embeddings:
            embeddings = l2_normalized("embeddings", embeddings)
            if ref_emb is not None:
                ref_emb = l2_normalized("ref_emb", ref_emb)
        return self._select(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids)

    def _anchor_terms(self, pos_dist: Tensor, neg_dist: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def _reduce(self, terms: Tensor, valid: Tensor, labels: Tensor) -> Tensor:
        return _reduce_terms(terms, valid, self.reduction, self.average_nonzero)

    def _triplet_terms(self, sel: TopKResult, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """(terms, valid) of every triplet (i, s, t) = (anchor i, positive
        sel.pos_idx[i, s], negative sel.neg_idx[i, t]): valid iff both slots
        hold a reference (not -1); terms 0 where not valid.  [N] when
        k_pos = k_neg = 1 (a view of the [N, 1, 1] result: bit for bit the one
        triplet per anchor), else [N, k_pos, k_neg]."""
        valid = (sel.pos_idx >= 0)[:, :, None] & (sel.neg_idx >= 0)[:, None, :]
        terms = self._anchor_terms(sel.pos_dist[:, :, None], sel.neg_dist[:, None, :], labels)
        terms = torch.where(valid, terms, torch.zeros_like(terms))
        if valid.shape[1:] == (1, 1):
            return terms.reshape(-1), valid.reshape(-1)
        return terms, valid

    def _loss_from_mined(self, sel: TopKResult, labels: Tensor) -> Tensor:
        """What ``forward`` returns, given the mined picks and distances (see ``_select``)."""
        return self._reduce(*self._triplet_terms(sel, labels), labels)

    def per_anchor(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                   ref_labels: Optional[Tensor] = None, *, query_ids: Optional[Tensor] = None,
                   ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(terms, valid bool): [N] with k_pos = k_neg = 1, else [N, k_pos, k_neg]
        (one per triplet); terms are 0 where valid is False."""
        sel = self._mine(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids)
        return self._triplet_terms(sel, labels)

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
    """Triplet margin loss with fused exact mining: per triplet
    ``relu(d(a, p) - d(a, n) + margin)`` for the mined (p, n).

    Each anchor contributes all k_pos x k_neg triplets of its k_pos mined
    positives and k_neg mined negatives (default one each); a -1 slot (fewer
    admissible references than k) contributes nothing.

    Args:
        margin: the triplet margin; the only argument that may be positional
            (the others are keyword-only: PML's positional order is a TypeError).
        distance: "euclidean", "squared_euclidean" or "cosine" (1 - cos).
        pos_strategy, neg_strategy: see ``fastmine.mine_topk``; neg_strategy
            "distance_weighted" samples the negatives (Wu et al. 2017;
            Euclidean only, meant for L2-normalised embeddings: set
            ``normalize_embeddings=True`` or normalise them yourself).
        reduction, average_nonzero: see ``reduce_terms``.  Default "mean" over
            valid triplets, zero-loss ones included; ``average_nonzero``: over
            non-zero triplets (PML's AvgNonZeroReducer).
        normalize_embeddings: L2-normalise embeddings (and ref_emb) first.
        semihard_margin: upper window of semihard negatives
            (d_an < d_ap + semihard_margin); only with neg_strategy="semihard".
        backend: fastmine backend.
        k_pos, k_neg: integers >= 1, positives / negatives mined per anchor.
        cutoff, nonzero_loss_cutoff: the distance-weighted clamp and zero-weight
            bound (finite reals > 0; used by "distance_weighted" only).
        seed: "distance_weighted" noise: None (default) draws a fresh seed
            from torch's default CPU generator at every call (so
            ``torch.manual_seed`` makes training reproducible); an int in
            [0, 2^64) uses that seed at every call (the same noise each call).

    Inputs: embeddings [N, D] float, labels [N] int, optional ref_emb [M, D],
    ref_labels [M], query_ids [N], ref_ids [M] (same-sample exclusion).
    ``reduction="none"`` returns [N] terms (k = 1) or [N, k_pos, k_neg].

    Differences from pytorch-metric-learning's TripletMarginLoss (checked
    against PML 2.9's source):

    * Mining is built in: each anchor gets one triplet (its mined positive and
      negative), or k_pos x k_neg.  PML's loss called without an
      ``indices_tuple`` uses every (anchor, positive, negative) triplet of the
      batch (``triplets_per_anchor="all"``); with one it uses the given
      triplets.  A fastmine loss takes no ``indices_tuple``: its third
      positional argument is ``ref_emb`` (a tuple or list there is a TypeError).
    * Reduction: PML's default is AvgNonZeroReducer (the mean over triplets
      with a non-zero term) = ``average_nonzero=True`` here; fastmine's
      default averages over all valid triplets, zero-loss ones included.
    * Distance: PML's default LpDistance(p=2) L2-normalises the embeddings;
      here ``normalize_embeddings`` is False unless you set it.
    * Defaults: margin 0.1 (PML: 0.05).  PML's ``swap`` and ``smooth_loss``
      have no counterpart.
    * With no valid triplet both return 0 (fastmine's still attached to the
      graph).
    """

    def __init__(self, margin: float = 0.1, *, distance: str = "euclidean",
                 pos_strategy: str = "easy", neg_strategy: str = "semihard",
                 reduction: str = "mean", normalize_embeddings: bool = False,
                 average_nonzero: bool = False, semihard_margin: Optional[float] = None,
                 backend: str = "auto", k_pos: int = 1, k_neg: int = 1,
                 cutoff: float = DW_CUTOFF, nonzero_loss_cutoff: float = DW_NONZERO_LOSS_CUTOFF,
                 seed: Optional[int] = None):
        super().__init__()
        _check_common(self, reduction, distance, pos_strategy, neg_strategy, backend, k_pos,
                      k_neg, cutoff, nonzero_loss_cutoff, seed)
        self.margin = check_real("margin", margin, minimum=0.0)
        if semihard_margin is not None:
            if neg_strategy != "semihard":
                raise ValueError(f"semihard_margin is only used by neg_strategy='semihard'; got "
                                 f"semihard_margin={semihard_margin!r} with "
                                 f"neg_strategy={neg_strategy!r}")
            semihard_margin = check_semihard_margin("semihard_margin", semihard_margin)
        self.average_nonzero = check_bool("average_nonzero", average_nonzero)
        self.normalize_embeddings = check_bool("normalize_embeddings", normalize_embeddings)
        self.semihard_margin = semihard_margin

    @property
    def _mining_margin(self):
        return self.semihard_margin

    def _anchor_terms(self, pos_dist: Tensor, neg_dist: Tensor, labels: Tensor) -> Tensor:
        """pos_dist [N, k_pos, 1], neg_dist [N, 1, k_neg] -> [N, k_pos, k_neg]."""
        return F.relu(pos_dist - neg_dist + self.margin)


class MarginLoss(_MinedLoss):
    """Margin loss of Wu et al. 2017 ("Sampling matters") with fused mining: per triplet
    ``relu(d_ap - beta + margin) + relu(beta - d_an + margin)``.

    Each anchor contributes all k_pos x k_neg triplets of its k_pos mined
    positives and k_neg mined negatives (default one each), the term of a
    triplet being its positive pair's term plus its negative pair's term, as
    in Wu et al.'s code and pytorch-metric-learning's MarginLoss.  So the
    "mean" over an anchor's triplets is the mean of its positive pairs' terms
    plus the mean of its negative pairs' terms, and k = 1 is one triplet (one
    positive and one negative pair) per anchor.  A -1 slot contributes
    nothing.

    Args:
        margin: the margin around the boundary beta; the only argument that may
            be positional (the others are keyword-only: PML's positional order,
            ``MarginLoss(margin, nu, beta, ...)``, is a TypeError).
        beta: initial boundary; one global value, or one per class when
            ``num_classes`` is given (indexed by the anchor's label, which must
            then lie in [0, num_classes): checked eagerly on CPU, by a
            device-side assertion without a host sync on CUDA).
        learn_beta: make beta an ``nn.Parameter``.
        nu: weight of the beta regulariser ``nu * beta`` (only when learn_beta,
            as in pytorch-metric-learning); see ``regularizer``.
        pos_strategy, neg_strategy, distance, reduction, normalize_embeddings,
        average_nonzero, backend, k_pos, k_neg, cutoff, nonzero_loss_cutoff,
        seed: as in TripletMarginLoss ("mean" counts valid triplets,
        ``average_nonzero`` triplets with a non-zero term).  neg_strategy
        "distance_weighted" is the sampler MarginLoss was designed with.

    ``forward`` returns ``reduce_terms(...) + regularizer(labels, valid)``
    (for reduction="none", the regulariser is not added: add it yourself).

    Reduction, compared with pytorch-metric-learning's MarginLoss (PML 2.9's
    DivisorReducer; checked against its source and numerically): let the
    valid triplets t have terms ``pos_t + neg_t`` (pos_t = relu(d_ap - beta +
    margin), neg_t = relu(beta - d_an + margin)).

    * fastmine ``reduction="mean"``: ``sum_t (pos_t + neg_t) / #valid
      triplets``; with ``average_nonzero=True``: ``/ #{t: pos_t + neg_t > 0}``.
    * PML: ``sum_t (pos_t + neg_t) / (#{t: pos_t > 0} + #{t: neg_t > 0})``,
      i.e. it counts non-zero *pair* terms, up to two per triplet (0 when the
      count is 0).  So PML's value lies between half of fastmine's
      ``average_nonzero`` value and that value (equal to it when no triplet
      has both terms non-zero); ``reduction="sum"`` equals PML's numerator.
    * The per-class regulariser (``learn_beta``, ``num_classes``): PML divides
      ``sum_t nu * beta[label of anchor t]`` by the same pair count; fastmine
      takes its mean over valid triplets (see ``regularizer``).  The global
      one is ``nu * beta`` in both.

    Other differences from PML's MarginLoss:

    * Mining is built in (one triplet per anchor, or k_pos x k_neg); PML
      without an ``indices_tuple`` uses every triplet of the batch
      (``triplets_per_anchor="all"``).  A fastmine loss takes no
      ``indices_tuple``: its third positional argument is ``ref_emb``.
    * Only ``margin`` may be positional (PML's order is margin, nu, beta, ...).
    * PML's default LpDistance L2-normalises the embeddings; here
      ``normalize_embeddings`` is False unless you set it.
    * With no triplet PML returns 0 (no regulariser either); fastmine returns
      0 plus the regulariser, i.e. ``nu * beta`` for a learnable global beta.
    """

    def __init__(self, margin: float = 0.2, *, beta: float = 1.2, learn_beta: bool = False,
                 num_classes: Optional[int] = None, nu: float = 0.0,
                 pos_strategy: str = "easy", neg_strategy: str = "semihard",
                 distance: str = "euclidean", reduction: str = "mean",
                 normalize_embeddings: bool = False, average_nonzero: bool = False,
                 backend: str = "auto", k_pos: int = 1, k_neg: int = 1,
                 cutoff: float = DW_CUTOFF, nonzero_loss_cutoff: float = DW_NONZERO_LOSS_CUTOFF,
                 seed: Optional[int] = None):
        super().__init__()
        _check_common(self, reduction, distance, pos_strategy, neg_strategy, backend, k_pos,
                      k_neg, cutoff, nonzero_loss_cutoff, seed)
        if num_classes is not None:
            num_classes = check_positive_int("num_classes", num_classes)
        self.margin = check_real("margin", margin, minimum=0.0)
        self.nu = check_real("nu", nu, minimum=0.0)
        self.learn_beta = check_bool("learn_beta", learn_beta)
        self.num_classes = num_classes
        init = torch.full((num_classes or 1,), check_real("beta", beta))
        if self.learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self.average_nonzero = check_bool("average_nonzero", average_nonzero)
        self.normalize_embeddings = check_bool("normalize_embeddings", normalize_embeddings)

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
        """pos_dist [N, k_pos, 1], neg_dist [N, 1, k_neg] -> [N, k_pos, k_neg]."""
        beta = self._beta_for(labels, pos_dist.dtype)[:, None, None]
        return F.relu(pos_dist - beta + self.margin) + F.relu(beta - neg_dist + self.margin)

    def regularizer(self, labels: Tensor, valid: Tensor) -> Tensor:
        """``nu * beta`` term (scalar); 0 unless learn_beta.

        labels [N]; valid: the triplets' mask ([N], or [N, k_pos, k_neg]).
        Global beta: ``nu * beta`` (as pytorch-metric-learning).  Per-class
        beta: mean of ``nu * beta[label of the anchor]`` over valid triplets
        (= valid anchors when k = 1; PML sums it over its triplets and divides
        by its non-zero pair count instead).
        """
        if not self.learn_beta or self.nu == 0.0:
            return self.beta.sum() * 0.0
        if not self.num_classes:
            return self.nu * self.beta.sum()
        b = _per_triplet(self._beta_for(labels, self.beta.dtype), valid)
        b = torch.where(valid, b, torch.zeros_like(b))
        return self.nu * b.sum() / valid.sum().clamp_min(1).to(b.dtype)

    def _reduce(self, terms: Tensor, valid: Tensor, labels: Tensor) -> Tensor:
        out = _reduce_terms(terms, valid, self.reduction, self.average_nonzero)
        if self.reduction == "none":
            return out
        return out + self.regularizer(labels, valid).to(out.dtype)


def triplet_margin_loss(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                        ref_labels: Optional[Tensor] = None, *, query_ids=None, ref_ids=None,
                        **kwargs) -> Tensor:
    """Functional TripletMarginLoss; ``kwargs`` are its constructor arguments.

    embeddings [N, D] float16/bfloat16/float32/float64, labels [N] integer;
    optional ref_emb [M, D] (embeddings' dtype and device) with ref_labels [M],
    query_ids [N] / ref_ids [M] integer (same-sample exclusion).  Returns the
    0-d loss (or the [N] / [N, k_pos, k_neg] terms for reduction="none")."""
    return TripletMarginLoss(**kwargs)(embeddings, labels, ref_emb, ref_labels,
                                       query_ids=query_ids, ref_ids=ref_ids)


def margin_loss(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, query_ids=None, ref_ids=None,
                **kwargs) -> Tensor:
    """Functional MarginLoss (fixed beta unless you pass learn_beta, which is
    then a fresh parameter); ``kwargs`` are its constructor arguments.
    Inputs and result as ``triplet_margin_loss``."""
    return MarginLoss(**kwargs)(embeddings, labels, ref_emb, ref_labels,
                                query_ids=query_ids, ref_ids=ref_ids)


# The label-aware contrastive losses (issue #18): streamed in O((N + M) D) memory,
# defined in fastmine/contrastive.py (docs/contrastive.md).
from .contrastive import MultiSimilarityLoss, NTXentLoss, SupConLoss  # noqa: E402,F401
