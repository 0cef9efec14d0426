"""Fake (meta) implementations of the fastmine ops, for torch.compile and opcheck.

The ops, their autograd and their CPU / CUDA kernels are C++ (csrc/fastmine_ops.cpp,
schemas in csrc/include/fastmine/schema.h); only the output shapes are
described here, once per op.
"""
from __future__ import annotations

import torch

from . import _extension


def _mine_fake(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, pos_strategy,
               neg_strategy, distance, margin, backend):
    n = embeddings.shape[0]
    return (embeddings.new_empty((n,), dtype=torch.int64),
            embeddings.new_empty((n,), dtype=torch.int64),
            embeddings.new_empty((n,)), embeddings.new_empty((n,)),
            embeddings.new_empty((n,), dtype=torch.bool))


def _mine_backward_fake(grad_pos_dist, grad_neg_dist, embeddings, ref_emb, pos_idx, neg_idx,
                        distance, ref_emb_grad, backend):
    d = embeddings.shape[1]
    if ref_emb is None or not ref_emb_grad:
        return torch.empty_like(embeddings), embeddings.new_empty((0, d))
    return torch.empty_like(embeddings), torch.empty_like(ref_emb)


def _mine_select_fake(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, pos_strategy,
                      neg_strategy, distance, margin):
    n = embeddings.shape[0]
    return (embeddings.new_empty((n,), dtype=torch.int64),
            embeddings.new_empty((n,), dtype=torch.int64))


def _mine_topk_fake(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, k_pos, k_neg,
                    pos_strategy, neg_strategy, distance, margin, cutoff, nonzero_loss_cutoff,
                    seed, backend):
    """pos_idx, neg_idx: int64 [N, k_pos], [N, k_neg]; pos_dist, neg_dist: the same
    shapes in the embeddings' dtype."""
    n = embeddings.shape[0]
    return (embeddings.new_empty((n, k_pos), dtype=torch.int64),
            embeddings.new_empty((n, k_neg), dtype=torch.int64),
            embeddings.new_empty((n, k_pos)), embeddings.new_empty((n, k_neg)))


if _extension.loaded():
    torch.library.register_fake("fastmine::mine")(_mine_fake)
    torch.library.register_fake("fastmine::mine_backward")(_mine_backward_fake)
    torch.library.register_fake("fastmine::mine_select")(_mine_select_fake)
    torch.library.register_fake("fastmine::mine_topk")(_mine_topk_fake)


# --------------------------------------------------------------------------- contrastive losses
# (issue #18; docs/contrastive.md; schemas FASTMINE_CONTRASTIVE_* in schema.h)

CONTRASTIVE_STATS = 6  # rows of the per-anchor statistics (csrc/cpu/contrastive_cpu.cpp)


def _contrastive_fake(q, r, labels, ref_labels, query_ids, ref_ids, loss, p0, p1, p2, epsilon,
                      block):
    """terms: [N] in q's dtype; stats: float64 [6, N]."""
    return q.new_empty((q.shape[0],)), q.new_empty((CONTRASTIVE_STATS, q.shape[0]),
                                                   dtype=torch.float64)


def _contrastive_backward_fake(grad, q, r, labels, ref_labels, query_ids, ref_ids, loss, p0, p1,
                               p2, epsilon, block, stats, ref_grad):
    """dL/dq [N, D]; dL/dr [M, D], or [0, D] when r is None or ref_grad is false."""
    if r is None or not ref_grad:
        return torch.empty_like(q), q.new_empty((0, q.shape[1]))
    return torch.empty_like(q), torch.empty_like(r)


def has_contrastive_ops() -> bool:
    """The loaded extension registers fastmine::contrastive (a build of this checkout)."""
    return _extension.loaded() and hasattr(torch.ops.fastmine, "contrastive")


if has_contrastive_ops():
    torch.library.register_fake("fastmine::contrastive")(_contrastive_fake)
    torch.library.register_fake("fastmine::contrastive_backward")(_contrastive_backward_fake)
