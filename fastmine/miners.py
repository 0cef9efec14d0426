"""Drop-in replacements for pytorch-metric-learning's batch miners.

``BatchEasyHardMiner``, ``BatchHardMiner`` and ``DistanceWeightedMiner`` have PML's call signature
``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` and return PML's
index tuples, so their output feeds PML losses unchanged.  PML is never
imported.

Distances: "euclidean" is PML's default ``LpDistance()`` (p=2, power=1,
normalised embeddings); "cosine" ranks like PML's ``CosineSimilarity()``
(fastmine uses 1 - cos, an order-reversing map of the similarity, so the same
pairs are mined).  Strategy names are PML's: positives "easy" (nearest) and
"hard" (farthest); negatives "hard" (nearest), "semihard" (nearest with
d_an > d_ap) and "easy" (farthest).  PML's "all", a "semihard" positive and
``allowed_pos_range`` / ``allowed_neg_range`` are not supported (ValueError).
As in PML, the batch's own pairs (i, i) are excluded when ref_emb is None, and
nothing is excluded when ref_emb is given.  Exact ties may resolve to a
different index than PML (fastmine: smallest reference index) but always to
an equal distance.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _backends
from ._contract import (DISTANCE_WEIGHTED, DW_CUTOFF, DW_NONZERO_LOSS_CUTOFF, NEG_STRATEGIES,
                        POS_STRATEGIES, check_backend_name, check_bool, check_choice,
                        check_topk_args, l2_normalized)
from .mine import mine, mine_topk

__all__ = ["BatchEasyHardMiner", "BatchHardMiner", "DistanceWeightedMiner"]

_PML_DISTANCES = {"euclidean": "euclidean", "cosine": "cosine"}


def _reject_pml_options(cls_name: str, kwargs: dict, supported: Iterable[str]) -> None:
    """ValueError naming the PML miner options (``kwargs``) that ``cls_name`` does not
    take, and listing the ``supported`` ones; nothing when ``kwargs`` is empty."""
    if kwargs:
        *head, last = supported
        raise ValueError(f"unsupported PML miner options {sorted(kwargs)}: fastmine's "
                         f"{cls_name} supports {', '.join(head)} and {last}")


def _mining_inputs(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                   ref_labels: Optional[Tensor], normalize: bool) -> Tuple:
    """(embeddings, labels, ref_emb, ref_labels) as a miner mines them (under
    no_grad): L2-normalised when ``normalize`` (PML's
    LpDistance(normalize_embeddings=True); checked first, ``l2_normalized``),
    label tensors moved to the embeddings' device (as PML does).  Every other
    check is ``fastmine.mine``'s."""
    if normalize:
        embeddings = l2_normalized("embeddings", embeddings)
        ref_emb = None if ref_emb is None else l2_normalized("ref_emb", ref_emb)
    if isinstance(embeddings, Tensor):  # otherwise fastmine.mine names the error
        labels, ref_labels = (v.to(embeddings.device) if isinstance(v, Tensor) else v
                              for v in (labels, ref_labels))
    return embeddings, labels, ref_emb, ref_labels


class BatchEasyHardMiner(nn.Module):
    """PML-compatible BatchEasyHardMiner on fastmine's fused kernel.

    Args:
        pos_strategy: "easy" or "hard".
        neg_strategy: "hard", "semihard" or "easy".
        distance: "euclidean" (PML LpDistance) or "cosine" (PML CosineSimilarity).
        normalize_embeddings: L2-normalise first (PML's default: True); a bool.
        backend: fastmine backend.
        Any other (PML) keyword option: ValueError.

    Call: ``(embeddings [N, D], labels [N], ref_emb [M, D]=None, ref_labels [M]=None,
    *, query_ids [N]=None, ref_ids [M]=None)`` -> ``(a1, p, a2, n)`` int64, one
    entry per anchor that has both a positive and a negative (PML returns
    ``a, p, a, n`` for these strategies).  ``query_ids`` / ``ref_ids`` (a
    fastmine extension, see ``fastmine.mine``) exclude same-sample pairs;
    ``fastmine.CrossBatchMemory`` passes them.  The inputs are checked as by
    ``fastmine.mine`` (float embeddings, integer labels; labels are moved to
    the embeddings' device, as PML does).
    """

    def __init__(self, pos_strategy: str = "easy", neg_strategy: str = "semihard",
                 distance: str = "euclidean", normalize_embeddings: bool = True,
                 backend: str = "auto", **kwargs):
        super().__init__()
        _reject_pml_options("BatchEasyHardMiner", kwargs, ("pos_strategy", "neg_strategy",
                                                          "distance", "normalize_embeddings",
                                                          "backend"))
        for name, value, options in (("pos_strategy", pos_strategy, POS_STRATEGIES),
                                     ("neg_strategy", neg_strategy, NEG_STRATEGIES)):
            if not isinstance(value, str) or value not in options:
                raise ValueError(f"{name}={value!r} is not supported: use one of "
                                 f"{sorted(options)} (PML's 'all', and a 'semihard' positive, "
                                 "are not supported)")
        if neg_strategy == DISTANCE_WEIGHTED:
            raise ValueError("BatchEasyHardMiner does not take neg_strategy='distance_weighted': "
                             "use fastmine.miners.DistanceWeightedMiner")
        if not isinstance(distance, str) or distance not in _PML_DISTANCES:
            raise ValueError(f"distance must be 'euclidean' (PML LpDistance) or 'cosine' "
                             f"(PML CosineSimilarity), got {distance!r}")
        check_backend_name(backend, _backends._REGISTRY)
        self.pos_strategy, self.neg_strategy = pos_strategy, neg_strategy
        self.distance = distance
        self.normalize_embeddings = check_bool("normalize_embeddings", normalize_embeddings)
        self.backend = backend

    def _select(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                ref_labels: Optional[Tensor], query_ids: Optional[Tensor] = None,
                ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(anchor, pos, neg) indices of the valid anchors."""
        with torch.no_grad():
            res = mine(*_mining_inputs(embeddings, labels, ref_emb, ref_labels,
                                       self.normalize_embeddings),
                       pos_strategy=self.pos_strategy, neg_strategy=self.neg_strategy,
                       distance=_PML_DISTANCES[self.distance], query_ids=query_ids,
                       ref_ids=ref_ids, backend=self.backend)
        a = torch.nonzero(res.valid).flatten()
        return a, res.pos_idx[a], res.neg_idx[a]

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, query_ids: Optional[Tensor] = None,
                ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        a, p, n = self._select(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids)
        return a, p, a, n


class BatchHardMiner(BatchEasyHardMiner):
    """PML-compatible BatchHardMiner: hardest positive and hardest negative.

    Args: ``distance``, ``normalize_embeddings``, ``backend`` as BatchEasyHardMiner;
    any other (PML) keyword option: ValueError.

    Call as BatchEasyHardMiner; returns ``(a, p, n)`` int64 over valid anchors.
    """

    def __init__(self, distance: str = "euclidean", normalize_embeddings: bool = True,
                 backend: str = "auto", **kwargs):
        _reject_pml_options("BatchHardMiner", kwargs,
                            ("distance", "normalize_embeddings", "backend"))
        super().__init__("hard", "hard", distance, normalize_embeddings, backend)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, query_ids: Optional[Tensor] = None,
                ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        return self._select(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids)


class DistanceWeightedMiner(nn.Module):
    """PML-compatible DistanceWeightedMiner (Wu et al. 2017) on fastmine's fused sampler.

    Negatives are drawn per anchor among its different-class references with
    probability proportional to w(d) = d^(2-D) (1 - d^2/4)^((3-D)/2), d
    clamped below at ``cutoff`` and w = 0 where d >= ``nonzero_loss_cutoff``
    (or d >= 2): PML's weights, drawn by ``fastmine.mine_topk(...,
    neg_strategy="distance_weighted")`` (Gumbel-max with counter-based noise,
    docs/contract.md "Random sampling") without forming the N x M weight
    matrix that PML builds.

    Args:
        cutoff, nonzero_loss_cutoff: as PML (finite reals > 0).
        k_pos: positives per anchor (integer >= 1), chosen by ``pos_strategy``:
            "easy" (the k_pos nearest same-class references, default) or
            "hard" (the k_pos farthest).
        k_neg: negatives per anchor (integer >= 1): k_neg draws without
            replacement (Gumbel-top-k).
        pos_strategy: "easy" or "hard", see k_pos.
        distance: "euclidean" only (PML requires ``LpDistance(p=2, power=1,
            normalize_embeddings=True)``).
        normalize_embeddings: L2-normalise embeddings (and ref_emb) first
            (default True, as PML requires; False: they are used as given,
            which the weight assumes are unit rows).
        seed: None (default) draws a fresh seed from torch's default CPU
            generator at each call, so ``torch.manual_seed`` makes the draws
            reproducible (as PML's torch.multinomial); an int in [0, 2^64)
            gives the same draws at every call on the same inputs.
        backend: fastmine backend ("auto": one that implements the rule).
        Any other (PML) keyword option (e.g. ``t_per_anchor``): ValueError.

    Call: ``(embeddings [N, D], labels [N], ref_emb [M, D]=None, ref_labels
    [M]=None, *, query_ids [N]=None, ref_ids [M]=None)`` -> ``(a, p, n)``
    int64 triplet indices (into ``embeddings`` and into the references), for
    PML's losses.  Each anchor with at least one positive and one negative of
    positive weight gives all its k_pos x k_neg triplets, anchor-major, then
    positive slot, then negative slot; other anchors give none (as PML drops
    them).  As PML, the batch's pairs (i, i) are excluded when ref_emb is
    None and nothing when ref_emb is given, unless ``query_ids`` / ``ref_ids``
    (a fastmine extension; ``fastmine.CrossBatchMemory`` passes them) exclude
    same-sample pairs.

    Differences from PML's miner (same weights, another sampling scheme):

    * PML gives each anchor n_p triplets (n_p: its class's count among the
      references), each with a positive drawn uniformly with replacement and
      an independent negative drawn by weight with replacement.  fastmine
      takes k_pos deterministic positives (``pos_strategy``) and k_neg
      negatives drawn without replacement, and forms all their combinations.
    * With k_neg = 1 each anchor's negative has exactly PML's per-triplet law
      P(n = j) = w_j / sum_l w_l.  With k_neg > 1 the first negative has that
      law and the k_neg are distinct (successive sampling:
      P(j1, j2) = p_j1 p_j2 / (1 - p_j1)), where PML's independent draws may
      repeat a negative.
    * The triplets come anchor by anchor, not grouped by label; the draws use
      fastmine's Philox noise, so the same seed does not reproduce PML's
      picks.
    """

    def __init__(self, cutoff: float = DW_CUTOFF,
                 nonzero_loss_cutoff: float = DW_NONZERO_LOSS_CUTOFF, *,
                 k_pos: int = 1, k_neg: int = 1, pos_strategy: str = "easy",
                 distance: str = "euclidean", normalize_embeddings: bool = True,
                 seed: Optional[int] = None, backend: str = "auto", **kwargs):
        super().__init__()
        _reject_pml_options("DistanceWeightedMiner", kwargs, (
            "cutoff", "nonzero_loss_cutoff", "k_pos", "k_neg", "pos_strategy", "distance",
            "normalize_embeddings", "seed", "backend"))
        check_choice("pos_strategy", pos_strategy, POS_STRATEGIES)
        if distance != "euclidean":
            raise ValueError(f"distance must be 'euclidean' (PML's DistanceWeightedMiner requires "
                             f"LpDistance(normalize_embeddings=True)), got {distance!r}")
        (self.k_pos, self.k_neg, _, self.cutoff, self.nonzero_loss_cutoff,
         self.seed) = check_topk_args(k_pos, k_neg, pos_strategy, DISTANCE_WEIGHTED, distance,
                                      None, cutoff, nonzero_loss_cutoff, seed)
        check_backend_name(backend, _backends._REGISTRY)
        self.pos_strategy, self.distance = pos_strategy, distance
        self.normalize_embeddings = check_bool("normalize_embeddings", normalize_embeddings)
        self.backend = backend

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, query_ids: Optional[Tensor] = None,
                ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            res = mine_topk(*_mining_inputs(embeddings, labels, ref_emb, ref_labels,
                                            self.normalize_embeddings),
                            k_pos=self.k_pos, k_neg=self.k_neg, pos_strategy=self.pos_strategy,
                            neg_strategy=DISTANCE_WEIGHTED, distance=self.distance,
                            cutoff=self.cutoff, nonzero_loss_cutoff=self.nonzero_loss_cutoff,
                            seed=self.seed, query_ids=query_ids, ref_ids=ref_ids,
                            backend=self.backend)
        # triplet (i, s, t) exists iff positive slot s and negative slot t are filled
        ok = (res.pos_idx >= 0)[:, :, None] & (res.neg_idx >= 0)[:, None, :]
        a, s, t = torch.nonzero(ok, as_tuple=True)  # row-major: anchor, then s, then t
        return a, res.pos_idx[a, s], res.neg_idx[a, t]


# The miners that take query_ids / ref_ids (fastmine.CrossBatchMemory passes them).
FASTMINE_MINERS = (BatchEasyHardMiner, DistanceWeightedMiner)
