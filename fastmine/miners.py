"""Drop-in replacements for pytorch-metric-learning's batch miners.

``BatchEasyHardMiner`` and ``BatchHardMiner`` have PML's call signature
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

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _backends
from ._contract import NEG_STRATEGIES, POS_STRATEGIES, check_backend_name
from .mine import mine

_PML_DISTANCES = {"euclidean": "euclidean", "cosine": "cosine"}


class BatchEasyHardMiner(nn.Module):
    """PML-compatible BatchEasyHardMiner on fastmine's fused kernel.

    Args:
        pos_strategy: "easy" or "hard".
        neg_strategy: "hard", "semihard" or "easy".
        distance: "euclidean" (PML LpDistance) or "cosine" (PML CosineSimilarity).
        normalize_embeddings: L2-normalise first (PML's default: True).
        backend: fastmine backend.

    Call: ``(embeddings [N, D], labels [N], ref_emb [M, D]=None, ref_labels [M]=None,
    *, query_ids [N]=None, ref_ids [M]=None)`` -> ``(a1, p, a2, n)`` int64, one
    entry per anchor that has both a positive and a negative (PML returns
    ``a, p, a, n`` for these strategies).  ``query_ids`` / ``ref_ids`` (a
    fastmine extension, see ``fastmine.mine``) exclude same-sample pairs;
    ``fastmine.CrossBatchMemory`` passes them.
    """

    def __init__(self, pos_strategy: str = "easy", neg_strategy: str = "semihard",
                 distance: str = "euclidean", normalize_embeddings: bool = True,
                 backend: str = "auto", **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"unsupported PML miner options {sorted(kwargs)}: fastmine's miners "
                             "support pos_strategy, neg_strategy, distance, "
                             "normalize_embeddings and backend")
        for name, value, options in (("pos_strategy", pos_strategy, POS_STRATEGIES),
                                     ("neg_strategy", neg_strategy, NEG_STRATEGIES)):
            if not isinstance(value, str) or value not in options:
                raise ValueError(f"{name}={value!r} is not supported: use one of "
                                 f"{sorted(options)} (PML's 'all', and a 'semihard' positive, "
                                 "are not supported)")
        if neg_strategy == "distance_weighted":
            raise NotImplementedError("BatchEasyHardMiner does not take neg_strategy="
                                      "'distance_weighted'; a DistanceWeightedMiner is planned "
                                      "(fastmine.mine_topk samples that rule today)")
        if not isinstance(distance, str) or distance not in _PML_DISTANCES:
            raise ValueError(f"distance must be 'euclidean' (PML LpDistance) or 'cosine' "
                             f"(PML CosineSimilarity), got {distance!r}")
        check_backend_name(backend, _backends._REGISTRY)
        self.pos_strategy, self.neg_strategy = pos_strategy, neg_strategy
        self.distance, self.normalize_embeddings = distance, bool(normalize_embeddings)
        self.backend = backend

    def _select(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                ref_labels: Optional[Tensor], query_ids: Optional[Tensor] = None,
                ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(anchor, pos, neg) indices of the valid anchors."""
        with torch.no_grad():
            if self.normalize_embeddings:
                embeddings = F.normalize(embeddings, dim=1)
                ref_emb = None if ref_emb is None else F.normalize(ref_emb, dim=1)
            if ref_labels is not None:
                ref_labels = ref_labels.to(labels.device)
            res = mine(embeddings.detach(), labels.to(embeddings.device),
                       None if ref_emb is None else ref_emb.detach(), ref_labels,
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

    Call as BatchEasyHardMiner; returns ``(a, p, n)`` int64 over valid anchors.
    """

    def __init__(self, distance: str = "euclidean", normalize_embeddings: bool = True,
                 backend: str = "auto"):
        super().__init__("hard", "hard", distance, normalize_embeddings, backend)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, query_ids: Optional[Tensor] = None,
                ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        return self._select(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids)
