"""Full-matrix references of the contrastive losses (docs/contrastive.md, "Definitions").

Readable, float64-capable, plain autograd: the oracle the streaming
implementation (``fastmine.contrastive``) is tested against, and itself tested
against pytorch-metric-learning (tests/test_contrastive_reference.py).  They
build the N x M similarity matrix: O(N * M) memory.

Every function takes *prepared* inputs (``fastmine.contrastive.prepare`` does
that for the modules):

    q [N, D], r [M, D]  L2-normalised rows in the compute dtype (float32 or
                        float64); r may be q itself (references = the batch)
    labels [N], ref_labels [M]    integer class labels
    query_ids [N], ref_ids [M]    integer sample ids, or both None (no pair is
                                  same-sample); when the references are the
                                  batch, the caller passes arange(N) (or the
                                  user's query_ids) for both

and returns a 0-d tensor in q's dtype.
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
    """Row-wise log-sum-exp of ``x`` [n, m] over ``mask`` [n, m] (bool); [n].

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
    """log(1 + e^z), exact for every z (torch's F.softplus is linear above 20):
    max(z, 0) + log1p(e^{-|z|}); 0 with gradient 0 at z = -inf."""
    return z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))


def _batch_has_pairs(pos: Tensor, neg: Tensor) -> Tensor:
    """0-d bool: the batch has a positive pair and a negative pair (SupCon's and
    NT-Xent's batch-level condition, PML's ``_compute_loss``)."""
    return pos.any() & neg.any()


def supcon_terms(q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor,
                 query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
                 temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
    """SupCon per anchor: (terms [N], pos [N, M], neg [N, M]).

    terms_i = LSE_{P_i u Q_i}(s/tau) - sum_{P_i} s / (tau P_i), 0 when P_i = 0."""
    pos, neg = pair_masks(labels, ref_labels, query_ids, ref_ids)
    x = (q @ r.T) / temperature
    lse = masked_lse(x, pos | neg)
    n_pos = pos.sum(dim=1)
    mean_pos = torch.where(pos, x, torch.zeros_like(x)).sum(dim=1) / n_pos.clamp_min(1).to(x.dtype)
    terms = torch.where(n_pos > 0, lse.masked_fill(n_pos == 0, 0.0) - mean_pos,
                        torch.zeros_like(lse))
    return terms, pos, neg


def supcon(q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor,
           query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
           temperature: float = 0.1) -> Tensor:
    """SupConLoss: the mean of the per-anchor terms > 0 (AvgNonZeroReducer); 0 when
    none is > 0 or the batch has no positive or no negative pair."""
    terms, pos, neg = supcon_terms(q, r, labels, ref_labels, query_ids, ref_ids, temperature)
    keep = terms > 0
    loss = torch.where(keep, terms, torch.zeros_like(terms)).sum() \
        / keep.sum().clamp_min(1).to(terms.dtype)
    return torch.where(_batch_has_pairs(pos, neg), loss, torch.zeros_like(loss))


def ntxent(q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor,
           query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
           temperature: float = 0.07) -> Tensor:
    """NTXentLoss: per positive pair (i, j), softplus(N_i - s_ij/tau) with
    N_i = LSE_{Q_i}(s/tau) (0 when Q_i is empty); the mean over all positive
    pairs, 0 when the batch has no positive or no negative pair."""
    pos, neg = pair_masks(labels, ref_labels, query_ids, ref_ids)
    x = (q @ r.T) / temperature
    n_i = masked_lse(x, neg)  # -inf without negatives: softplus(-inf) = 0
    pair = softplus(n_i[:, None] - x)
    total = torch.where(pos, pair, torch.zeros_like(pair)).sum()
    loss = total / pos.sum().clamp_min(1).to(x.dtype)
    return torch.where(_batch_has_pairs(pos, neg), loss, torch.zeros_like(loss))


def ms_miner_masks(s: Tensor, pos: Tensor, neg: Tensor, epsilon: float) -> Tuple[Tensor, Tensor]:
    """The Multi-Similarity miner's selection (PML ``MultiSimilarityMiner``), not
    differentiated: positives with s - eps < max over the anchor's negatives,
    negatives with s + eps > min over its positives (strict; none across an
    empty side).  s, pos, neg: [n, m]; returns the selected (pos, neg) masks."""
    with torch.no_grad():
        max_neg = s.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
        min_pos = s.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
        return pos & (s - epsilon < max_neg), neg & (s + epsilon > min_pos)


def multi_similarity(q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor,
                     query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
                     alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                     miner_epsilon: Optional[float] = None) -> Tensor:
    """MultiSimilarityLoss: per anchor (1/alpha) log(1 + sum_P e^{-alpha (s - base)})
    + (1/beta) log(1 + sum_Q e^{beta (s - base)}), on the MS miner's pairs when
    ``miner_epsilon`` is not None; the mean over all N anchors (0 when N = 0)."""
    pos, neg = pair_masks(labels, ref_labels, query_ids, ref_ids)
    s = q @ r.T
    if miner_epsilon is not None:
        pos, neg = ms_miner_masks(s, pos, neg, miner_epsilon)
    pos_term = masked_lse(alpha * (base - s), pos, add_one=True) / alpha
    neg_term = masked_lse(beta * (s - base), neg, add_one=True) / beta
    terms = pos_term + neg_term
    return terms.sum() / max(terms.shape[0], 1)
