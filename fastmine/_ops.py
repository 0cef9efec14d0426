"""The torch.library ops behind fastmine.mine.

fastmine::mine           selection + exact pair distances, one op for every backend
                         (the backend is an argument), with a fake implementation
                         and registered autograd, so it works under
                         torch.compile(fullgraph=True) and passes opcheck.
fastmine::mine_backward  the explicit backward: scatters dL/d(pos_dist) and
                         dL/d(neg_dist) into the anchor and reference rows.
fastmine::mine_select    (C++, csrc/) the compiled selection; only its fake
                         implementation is registered here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backends, _extension
from ._contract import check_finite
from ._pairs import pair_distance


@torch.library.custom_op("fastmine::mine", mutates_args=())
def mine_op(embeddings: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor,
            query_ids: Optional[Tensor], ref_ids: Optional[Tensor], pos_strategy: str,
            neg_strategy: str, distance: str, margin: Optional[float],
            backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pos_idx, neg_idx, pos_dist, neg_dist) for already-validated arguments.

    Inputs are those of fastmine.mine after defaults are filled in; ``backend``
    is concrete (never 'auto').  Data-dependent checks (NaN/Inf, zero norms for
    cosine) run here, eagerly, so that the Python wrapper stays traceable.
    """
    check_finite("embeddings", embeddings, distance)
    if ref_emb is not embeddings:
        check_finite("ref_emb", ref_emb, distance)
    impl = _backends.get(backend)
    pos_idx, neg_idx = impl.select(
        embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
        pos_strategy, neg_strategy, distance, margin)
    exact = impl.pair_distance or pair_distance
    pos_dist = exact(embeddings, ref_emb, pos_idx, distance)
    neg_dist = exact(embeddings, ref_emb, neg_idx, distance)
    return pos_idx, neg_idx, pos_dist, neg_dist


@mine_op.register_fake
def _mine_fake(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, pos_strategy,
               neg_strategy, distance, margin, backend):
    n = embeddings.shape[0]
    return (embeddings.new_empty((n,), dtype=torch.int64),
            embeddings.new_empty((n,), dtype=torch.int64),
            embeddings.new_empty((n,)), embeddings.new_empty((n,)))


@torch.library.custom_op("fastmine::mine_backward", mutates_args=())
def mine_backward_op(grad_pos_dist: Tensor, grad_neg_dist: Tensor, embeddings: Tensor,
                     ref_emb: Tensor, pos_idx: Tensor, neg_idx: Tensor, distance: str,
                     backend: str) -> Tuple[Tensor, Tensor]:
    """(grad_embeddings [N, D], grad_ref_emb [M, D]) of the selected pair distances."""
    return _backends.get(backend).backward(
        grad_pos_dist, grad_neg_dist, embeddings, ref_emb, pos_idx, neg_idx, distance)


@mine_backward_op.register_fake
def _mine_backward_fake(grad_pos_dist, grad_neg_dist, embeddings, ref_emb, pos_idx, neg_idx,
                        distance, backend):
    return torch.empty_like(embeddings), torch.empty_like(ref_emb)


# --- autograd: shared by the registered op and fastmine.MineFunction ---------

def setup_context(ctx, inputs, output) -> None:
    embeddings, _, ref_emb, _, _, _, _, _, distance, _, backend = inputs
    pos_idx, neg_idx, _, _ = output
    ctx.save_for_backward(embeddings, ref_emb, pos_idx, neg_idx)
    ctx.distance = distance
    ctx.backend = backend


def pair_grads(ctx, grad_pos_dist, grad_neg_dist):
    """(grad_embeddings, grad_ref_emb) from the tensors saved by setup_context."""
    embeddings, ref_emb, pos_idx, neg_idx = ctx.saved_tensors
    zeros = lambda: torch.zeros(pos_idx.shape, dtype=embeddings.dtype, device=embeddings.device)
    grad_pos_dist = zeros() if grad_pos_dist is None else grad_pos_dist
    grad_neg_dist = zeros() if grad_neg_dist is None else grad_neg_dist
    return torch.ops.fastmine.mine_backward(
        grad_pos_dist, grad_neg_dist, embeddings, ref_emb, pos_idx, neg_idx,
        ctx.distance, ctx.backend)


def backward(ctx, _g_pos_idx, _g_neg_idx, grad_pos_dist, grad_neg_dist):
    need_x, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_x or need_r):
        return (None,) * 11
    grad_x, grad_r = pair_grads(ctx, grad_pos_dist, grad_neg_dist)
    return (grad_x if need_x else None, None, grad_r if need_r else None) + (None,) * 8


mine_op.register_autograd(backward, setup_context=setup_context)


if _extension.loaded():
    @torch.library.register_fake("fastmine::mine_select")
    def _mine_select_fake(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                          pos_strategy, neg_strategy, distance, margin):
        n = embeddings.shape[0]
        return (embeddings.new_empty((n,), dtype=torch.int64),
                embeddings.new_empty((n,), dtype=torch.int64))
