"""Full-matrix references of the contrastive losses (docs/contrastive.md, "Definitions").

Readable, float64-capable, plain autograd: the naive O(N*M) oracle every
backend of ``fastmine.contrastive`` ("chunked", "cpu", "triton") is tested
against, and ``backend="torch"``; itself tested against pytorch-metric-learning
(tests/test_contrastive_reference.py).  They build the N x M similarity matrix:
O(N*M) time and memory.

They do NOT validate arguments: the loss modules do (``contrastive.prepare``
runs the ``fastmine._contract`` checks of shapes, dtypes, devices, ids and
data), and every function here assumes valid, *prepared* inputs:

    q [N, D], r [M, D]  L2-normalised rows in the compute dtype (float32 or
                        float64); r may be q itself (references = the batch)
    labels [N], ref_labels [M]    integer class labels
    query_ids [N], ref_ids [M]    integer sample ids, or both None (no pair is
                                  same-sample); when the references are the
                                  batch, the caller passes arange(N) (or the
                                  user's query_ids) for both

and the per-anchor functions return ``(terms [N] in q's dtype, n_pos [N], n_neg [N])``
(int64 counts of positives / negatives), which ``reduce_terms`` turns into the
loss (0-d): the one definition of the reductions, shared by every backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def pair_masks(labels: Tensor, ref_labels: Tensor, query_ids: Optional[Tensor],
               ref_ids: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The positive and negative masks (bool [n, m]) of anchors ``labels`` [n] against
    references ``ref_labels`` [m]: positive = same label and not the same sample,
    negative = different label and not the same sample (same sample:
    ``query_ids[i] == ref_ids[j]``; no exclusion when the ids are None).

    The one definition of the masks: the streaming implementation calls it on
    the label / id slices of each tile."""
    same_label = labels[:, None] == ref_labels[None, :]
    if query_ids is None:
        return same_label, ~same_label
    other = query_ids[:, None] != ref_ids[None, :]
    return same_label & other, ~same_label & other


def masked_lse(x: Tensor, mask: Tensor, add_one: bool = False) -> Tensor:
    """Row-wise log-sum-exp of ``x`` [n, m] (floating) over ``mask`` [n, m] (bool);
    returns [n] in x's dtype, differentiable w.r.t. x.

    ``add_one``: one extra term e^0 = 1 per row (PML's ``logsumexp(add_one=True)``),
    so an empty row gives log 1 = 0.  Without it an empty row gives -inf, with
    a zero (not NaN) gradient."""
    fill = x.masked_fill(~mask, float("-inf"))
    if add_one:
        return torch.logsumexp(torch.cat([fill, x.new_zeros(x.shape[0], 1)], dim=1), dim=1)
    empty = ~mask.any(dim=1)
    safe = fill.masked_fill(empty[:, None], 0.0)  # no -inf - (-inf) in the backward
    return torch.logsumexp(safe, dim=1).masked_fill(empty, float("-inf"))


def softplus(z: Tensor) -> Tensor:
    """log(1 + e^z), elementwise (any shape, z's floating dtype), exact for every z
    (torch's F.softplus is linear above 20): max(z, 0) + log1p(e^{-|z|}); 0 with
    gradient 0 at z = -inf."""
    return z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))


def reduce_terms(loss: str, terms: Tensor, n_pos: Tensor, n_neg: Tensor) -> Tensor:
    """The reduction of each loss (PML's reducers), one definition for every backend.

    loss: "supcon", "ntxent" or "multi_similarity" (ValueError otherwise);
    terms [N] floating: the per-anchor terms (NT-Xent: the sum of the anchor's
    pair terms); n_pos, n_neg [N] int: each anchor's positive / negative counts.
        "supcon"            mean of the terms > 0 (AvgNonZeroReducer; the
                            selection is not differentiated)
        "ntxent"            sum of the terms / the number of positive pairs
                            (MeanReducer over pairs)
        "multi_similarity"  mean over all N anchors (MeanReducer)
    SupCon and NT-Xent are 0 when the batch has no positive pair or no
    negative pair (PML's ``_compute_loss``).  An empty denominator gives an
    exact 0 (still attached to the graph), never NaN.  Returns a 0-d tensor in
    terms' dtype, differentiable w.r.t. terms.
    """
    if loss == "multi_similarity":
        return terms.sum() / max(terms.shape[0], 1)
    if loss == "supcon":
        keep = terms > 0
        value = torch.where(keep, terms, torch.zeros_like(terms)).sum() \
            / keep.sum().clamp_min(1).to(terms.dtype)
    elif loss == "ntxent":
        value = terms.sum() / n_pos.sum().clamp_min(1).to(terms.dtype)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    on = (n_pos > 0).any() & (n_neg > 0).any()
    return torch.where(on, value, torch.zeros_like(value))


def _counts(pos: Tensor, neg: Tensor) -> Tuple[Tensor, Tensor]:
    return pos.sum(dim=1), neg.sum(dim=1)


def supcon_terms(q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor,
                 query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
                 temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    """SupCon per anchor: (terms [N] in q's dtype, n_pos [N] int64, n_neg [N] int64)
    on the prepared inputs (module docstring); temperature tau > 0.
    terms_i = LSE_{P_i u Q_i}(s/tau) - sum_{P_i} s / (tau P_i), 0 when P_i = 0."""
    pos, neg = pair_masks(labels, ref_labels, query_ids, ref_ids)
    x = (q @ r.T) / temperature
    lse = masked_lse(x, pos | neg)
    n_pos, n_neg = _counts(pos, neg)
    mean_pos = torch.where(pos, x, torch.zeros_like(x)).sum(dim=1) / n_pos.clamp_min(1).to(x.dtype)
    terms = torch.where(n_pos > 0, lse.masked_fill(n_pos == 0, 0.0) - mean_pos,
                        torch.zeros_like(lse))
    return terms, n_pos, n_neg


def ntxent_terms(q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor,
                 query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
                 temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    """NT-Xent per anchor: (terms [N] in q's dtype, n_pos [N] int64, n_neg [N] int64)
    on the prepared inputs (module docstring); temperature tau > 0.  terms_i =
    the sum over its positives j of softplus(N_i - s_ij/tau), N_i = LSE_{Q_i}(s/tau)
    (0 without negatives)."""
    pos, neg = pair_masks(labels, ref_labels, query_ids, ref_ids)
    x = (q @ r.T) / temperature
    n_i = masked_lse(x, neg)  # -inf without negatives: softplus(-inf) = 0
    pair = softplus(n_i[:, None] - x)
    return (torch.where(pos, pair, torch.zeros_like(pair)).sum(dim=1),) + _counts(pos, neg)


def ms_miner_masks(s: Tensor, pos: Tensor, neg: Tensor, epsilon: float) -> Tuple[Tensor, Tensor]:
    """The Multi-Similarity miner's selection (PML ``MultiSimilarityMiner``), not
    differentiated: positives with s - eps < max over the anchor's negatives,
    negatives with s + eps > min over its positives (strict; none across an
    empty side).  s [n, m] floating, pos, neg [n, m] bool; returns the selected
    (pos, neg) masks, bool [n, m]."""
    with torch.no_grad():
        max_neg = s.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
        min_pos = s.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
        return pos & (s - epsilon < max_neg), neg & (s + epsilon > min_pos)


def multi_similarity_terms(q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor,
                           query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
                           alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                           miner_epsilon: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Multi-Similarity per anchor: (terms [N] in q's dtype, n_pos [N] int64,
    n_neg [N] int64) on the prepared inputs (module docstring); alpha, beta > 0,
    base real, miner_epsilon >= 0 or None; terms_i = (1/alpha) log(1 + sum_P e^{-alpha (s - base)})
    + (1/beta) log(1 + sum_Q e^{beta (s - base)}), on the MS miner's pairs when
    ``miner_epsilon`` is not None (the counts are those before the miner)."""
    pos, neg = pair_masks(labels, ref_labels, query_ids, ref_ids)
    n_pos, n_neg = _counts(pos, neg)
    s = q @ r.T
    if miner_epsilon is not None:
        pos, neg = ms_miner_masks(s, pos, neg, miner_epsilon)
    pos_term = masked_lse(alpha * (base - s), pos, add_one=True) / alpha
    neg_term = masked_lse(beta * (s - base), neg, add_one=True) / beta
    return pos_term + neg_term, n_pos, n_neg


def supcon(*prepared, temperature: float = 0.1) -> Tensor:
    """SupConLoss: ``reduce_terms("supcon", *supcon_terms(...))``.

    ``prepared`` = (q, r, labels, ref_labels, query_ids, ref_ids) as in the module
    docstring; returns the 0-d loss in q's dtype (likewise ``ntxent``,
    ``multi_similarity``)."""
    return reduce_terms("supcon", *supcon_terms(*prepared, temperature))


def ntxent(*prepared, temperature: float = 0.07) -> Tensor:
    """NTXentLoss: ``reduce_terms("ntxent", *ntxent_terms(...))``."""
    return reduce_terms("ntxent", *ntxent_terms(*prepared, temperature))


def multi_similarity(*prepared, **kwargs) -> Tensor:
    """MultiSimilarityLoss: ``reduce_terms("multi_similarity", *multi_similarity_terms(...))``."""
    return reduce_terms("multi_similarity", *multi_similarity_terms(*prepared, **kwargs))
