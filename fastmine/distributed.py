"""Global-batch mining under ``torch.distributed`` (DDP), with exact gradients.

Under data parallelism every rank holds a local batch of ``n_r`` rows; the
*global* batch is their concatenation in rank order (``N = sum_r n_r`` rows).
Mining should see the global batch: each sample is a positive or negative
candidate for every anchor, on every rank.

* :func:`gather` all-gathers embeddings, labels and sample ids (unequal
  ``n_r`` allowed).  The gathered embeddings are differentiable: in backward the
  gradients that *every* rank computed for a row are summed and returned to the
  rank that owns the row.  (Detaching the other ranks' slices, as
  pytorch-metric-learning's ``DistributedLossWrapper`` does by default, drops
  the terms in which a sample is the positive/negative of another rank's
  anchor.)
* :class:`DistributedLoss` wraps a fastmine loss: the anchors are the local
  batch, the references the global batch, the normalisation is global, and
  the gradient is scaled so that DDP's gradient *averaging* yields exactly the
  gradient of one process on the concatenated batch.

Exactness argument (used by the tests).  Let ``L`` be the single-process loss
on the global batch and ``W`` the world size.  Rank ``r`` backpropagates a
surrogate ``S_r`` chosen so that ``sum_r S_r = W * L`` as functions of all
rows.  :func:`gather`'s backward gives rank ``r``'s local rows the gradient
``sum_r' dS_r'/de_r`` (its own and everybody else's), so rank ``r``'s parameter
gradient is ``sum_r' dS_r'/de_r * de_r/dtheta``, and DDP's average over ranks
is ``(1/W) * d(sum_r' S_r')/dtheta = dL/dtheta``.  The forward *value* returned
on every rank is ``L`` itself (all-reduced), so logging sees the global loss.

Every collective here runs on every rank of ``group`` in the same order:
all ranks must call :func:`gather` / :class:`DistributedLoss` together, and
all must run the backward (as DDP requires anyway).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ._contract import _FLOAT_DTYPES, check_embeddings, check_index_vector
from .losses import _REDUCTIONS, MarginLoss, _per_triplet, _kept_in_mean

__all__ = ["gather", "GatheredBatch", "DistributedLoss"]


class GatheredBatch(NamedTuple):
    """What :func:`gather` returns (identical on every rank, except ``local``).

    embeddings: [N, D], the local embeddings' dtype; rows of rank 0, then
        rank 1, ...; differentiable (gradient goes back to the owning rank).
    labels: [N], the local labels' dtype.
    ids: [N] int64 global sample ids: the ``ids`` given on every rank, or the
        global row positions ``arange(N)`` when ``ids`` was None.
    local: ``slice`` of this rank's rows, ``embeddings[local]`` equals the
        local embeddings.
    """
    embeddings: Tensor
    labels: Tensor
    ids: Tensor
    local: slice


def _require_group(group, fn: str) -> Tuple[int, int]:
    """(rank, world_size) in ``group``; a clear error when torch.distributed is unusable."""
    if not dist.is_available():
        raise RuntimeError(f"fastmine.distributed.{fn}: torch.distributed is not available in "
                           "this torch build")
    if not dist.is_initialized():
        raise RuntimeError(
            f"fastmine.distributed.{fn}: the default process group is not initialised; call "
            "torch.distributed.init_process_group(backend='gloo' or 'nccl', ...) on every rank "
            "first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"fastmine.distributed.{fn}: this process is not a member of `group`")
    return rank, dist.get_world_size(group)


def _collective_device(embeddings, group) -> torch.device:
    """Device for the metadata exchange: the embeddings' device, else what the backend needs."""
    if isinstance(embeddings, Tensor):
        return embeddings.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t: Tensor, world: int, group) -> List[Tensor]:
    """all_gather of equally shaped tensors (one per rank, rank order)."""
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """[n_r, D] local rows -> [N, D] global rows; backward: sum over ranks, own slice.

    Forward pads every rank's rows to ``max_r n_r`` (all_gather needs equal
    shapes) and drops the padding.  Backward: rank r' holds dS_r'/dG for the
    whole global tensor G; all_reduce(SUM) forms sum_r' dS_r'/dG on every
    rank, and each rank keeps the rows it owns.  (An all_reduce of [N, D]
    works on every backend; gloo has no reduce_scatter.)
    """

    @staticmethod
    def forward(ctx, local: Tensor, sizes: Tuple[int, ...], rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        n_max, d = max(sizes), local.shape[1]
        if n_max == 0:
            return local.new_empty(0, d)
        padded = local.new_zeros(n_max, d)
        padded[:local.shape[0]] = local
        parts = _all_gather(padded, len(sizes), group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, rank = ctx.sizes, ctx.rank
        off = sum(sizes[:rank])
        if sum(sizes) == 0:
            return grad.new_empty(0, grad.shape[1]), None, None, None
        total = grad.contiguous().clone()  # all_reduce is in place
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[off:off + sizes[rank]], None, None, None


def _gather(embeddings: Tensor, labels: Tensor, ids: Optional[Tensor], group,
            fn: str) -> GatheredBatch:
    rank, world = _require_group(group, fn)
    device = _collective_device(embeddings, group)
    # Validate locally, but do not raise before the metadata exchange: a rank
    # that raised alone would leave the others waiting in the collective.
    err: Optional[Exception] = None
    meta = [1, 0, 0, 0, int(ids is not None), 0]  # ok, n, D, dtype, has_ids, needs_grad
    try:
        check_embeddings("embeddings", embeddings)
        n = embeddings.shape[0]
        check_index_vector("labels", labels, n, "embeddings", embeddings.device)
        if ids is not None:
            check_index_vector("ids", ids, n, "embeddings", embeddings.device)
        needs_grad = embeddings.requires_grad and torch.is_grad_enabled()
        meta[1:] = [n, embeddings.shape[1], _FLOAT_DTYPES.index(embeddings.dtype),
                    int(ids is not None), int(needs_grad)]
    except (TypeError, ValueError) as e:
        err, meta[0] = e, 0
    metas = torch.stack(_all_gather(torch.tensor(meta, dtype=torch.int64, device=device),
                                    world, group)).tolist()
    bad = [r for r, m in enumerate(metas) if not m[0]]
    if err is not None:
        raise type(err)(f"fastmine.distributed.{fn} (rank {rank}): {err}") from err
    if bad:
        raise ValueError(f"fastmine.distributed.{fn}: invalid input on rank(s) {bad} "
                         "(see the error raised there)")
    for col, what in ((2, "embeddings must have the same dim D on every rank"),
                      (3, "embeddings must have the same dtype on every rank"),
                      (4, "ids must be given on every rank or on none"),
                      (5, "embeddings must require grad on every rank or on none (the "
                          "backward is a collective)")):
        vals = [m[col] for m in metas]
        if len(set(vals)) > 1:
            shown = ([str(_FLOAT_DTYPES[v]) for v in vals] if col == 3 else vals)
            raise ValueError(f"fastmine.distributed.{fn}: {what}; got {shown} on ranks "
                             f"0..{world - 1}")
    sizes = tuple(m[1] for m in metas)
    off, n, n_max = sum(sizes[:rank]), sizes[rank], max(sizes)

    g_emb = _AllGatherRows.apply(embeddings, sizes, rank, group)
    # labels and ids travel together: one int64 [n_max, 2] all_gather
    if ids is None:  # global row positions: only a row and its own gathered copy share an id
        ids = torch.arange(off, off + n, device=embeddings.device)
    if n_max:
        li = torch.zeros(n_max, 2, dtype=torch.int64, device=embeddings.device)
        li[:n, 0], li[:n, 1] = labels, ids
        rows = torch.cat([p[:k] for p, k in zip(_all_gather(li, world, group), sizes)])
    else:
        rows = torch.zeros(0, 2, dtype=torch.int64, device=embeddings.device)
    return GatheredBatch(g_emb, rows[:, 0].to(labels.dtype), rows[:, 1].contiguous(),
                         slice(off, off + n))


def gather(embeddings: Tensor, labels: Tensor, ids: Optional[Tensor] = None,
           group=None) -> GatheredBatch:
    """Gather every rank's batch into the global batch, with gradient to the owner.

    Must be called on every rank of ``group`` (a collective).

    Args:
        embeddings: [n_r, D] float16/bfloat16/float32/float64, this rank's rows;
            n_r may differ between ranks (0 allowed), D and dtype may not.
        labels: [n_r] integer class labels.
        ids: [n_r] integer sample ids (e.g. dataset indices), or None on every
            rank: then the ids are the global row positions, so a row shares
            an id only with its own gathered copy.  Pass dataset ids when the
            same sample can sit on two ranks (e.g. ``DistributedSampler``
            pads by repeating samples): mining then never pairs them.
        group: process group (default: the world).

    Returns:
        ``GatheredBatch(embeddings [N, D], labels [N], ids [N] int64, local)``
        with N = sum of n_r, rows in rank order (identical on every rank), and
        ``local`` the slice of this rank's rows.  The gathered embeddings carry
        gradient: the gradients that all ranks compute for a row are summed
        and added to the owning rank's ``embeddings`` gradient.

    Raises:
        RuntimeError: the process group is not initialised (or torch.distributed
            is unavailable, or this process is not in ``group``).
        TypeError / ValueError: invalid input on some rank, raised on every
            rank (the offending rank names the argument), or D / dtype / ids
            presence / requires_grad differing between ranks.
    """
    return _gather(embeddings, labels, ids, group, "gather")


def _regularizer_kind(loss: nn.Module) -> Optional[str]:
    """None, "global" (nu * beta) or "per_class" (mean of nu * beta[label] over valid anchors)."""
    if isinstance(loss, MarginLoss):
        if not loss.learn_beta or loss.nu == 0.0:
            return None
        return "per_class" if loss.num_classes else "global"
    return None


class DistributedLoss(nn.Module):
    """Mine this rank's anchors against the global batch; exact under DDP averaging.

    Args:
        loss: a fastmine loss (``fastmine.losses.TripletMarginLoss``,
            ``MarginLoss``, ``SupConLoss``, ``NTXentLoss``,
            ``MultiSimilarityLoss``), or any module with ``per_anchor(embeddings,
            labels, ref_emb, ref_labels, *, query_ids, ref_ids) -> (terms [n]
            or [n, k_pos, k_neg], valid bool of the same shape)`` -- or
            ``(terms, valid, counts)``, counts of the same shape: the number of
            items (e.g. pairs) each term sums, so that "mean" divides by the
            global sum of the kept counts -- and attributes ``reduction``
            ("mean", "sum" or "none") and optionally ``average_nonzero``; a
            module with another ``regularizer`` is refused (it cannot be
            normalised globally).
        group: process group (default: the world); DDP must average over the
            same group.

    ``forward(embeddings [n_r, D], labels [n_r], ids [n_r] = None)`` returns,
    on every rank, the loss ``L`` of one process on the concatenated batch
    (same ids; see :func:`gather` for the default ids) as a scalar in the
    embeddings' dtype.  Its gradient is ``world_size`` times this rank's share
    of ``dL`` (share: the terms of this rank's anchors, with their gradient
    to every rank's rows), so that DDP's average over ranks is exactly
    ``dL/dtheta``:

    * "mean": terms of local anchors / the *global* number of valid triplets
      (one per valid anchor when k_pos = k_neg = 1; with ``average_nonzero``:
      of valid triplets with a non-zero term); with ``counts``: / the global
      sum of the kept terms' counts (NT-Xent: the number of positive pairs);
    * "sum": the sum of local terms;
    * MarginLoss with ``learn_beta`` and ``nu``: the global-beta regulariser
      ``nu * beta`` is added once per rank (DDP's average keeps it once); the
      per-class one is the sum of ``nu * beta[label]`` over local valid
      anchors / the global number of valid anchors.
    * "none": this rank's terms [n_r] (against the global references),
      unscaled; reducing them is then up to you (no exactness guarantee).
    * neg_strategy="distance_weighted": the noise is counted by the anchor's
      local row, so the draws are not those of one process on the
      concatenated batch (each draw's law is the same; docs/usage.md).

    Parameters of ``loss`` (learnable beta) get gradients that must be averaged
    over ranks like the model's: make this module part of the DDP-wrapped
    module, or wrap it in its own ``DistributedDataParallel``.
    """

    def __init__(self, loss: nn.Module, group=None):
        super().__init__()
        if not isinstance(loss, nn.Module) or not callable(getattr(loss, "per_anchor", None)):
            raise TypeError("loss must be an nn.Module with per_anchor(embeddings, labels, "
                            "ref_emb, ref_labels, *, query_ids, ref_ids) (a fastmine loss), got "
                            f"{type(loss).__name__}")
        if getattr(loss, "reduction", None) not in _REDUCTIONS:
            raise ValueError(f"loss.reduction must be one of {_REDUCTIONS}, got "
                             f"{getattr(loss, 'reduction', None)!r}")
        if not isinstance(loss, MarginLoss) and hasattr(loss, "regularizer"):
            raise TypeError(f"loss ({type(loss).__name__}) has a regularizer that "
                            "DistributedLoss does not know how to normalise over ranks")
        self.loss = loss
        self.group = group

    def forward(self, embeddings: Tensor, labels: Tensor, ids: Optional[Tensor] = None) -> Tensor:
        """See the class docstring: scalar global loss ([n_r] terms for reduction="none")."""
        world = _require_group(self.group, "DistributedLoss")[1]
        g = _gather(embeddings, labels, ids, self.group, "DistributedLoss")
        out = self.loss.per_anchor(embeddings, labels, g.embeddings, g.labels,
                                   query_ids=g.ids[g.local], ref_ids=g.ids)
        if not isinstance(out, tuple) or len(out) not in (2, 3):
            raise TypeError(f"{type(self.loss).__name__}.per_anchor must return (terms, valid) or "
                            "(terms, valid, counts)")
        terms, valid, counts = out if len(out) == 3 else (*out, None)
        reduction = self.loss.reduction
        if reduction not in _REDUCTIONS:
            raise ValueError(f"loss.reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if reduction == "none":
            return terms
        # reduce_terms' "kept" set; invalid anchors' terms are exact 0.
        average_nonzero = reduction == "mean" and bool(getattr(self.loss, "average_nonzero", False))
        keep = _kept_in_mean(terms, valid, average_nonzero)
        local_sum = torch.where(keep, terms, torch.zeros_like(terms)).sum()
        # the local share of the mean's denominator: kept terms, or their counts
        local_count = keep.sum() if counts is None else \
            torch.where(keep, counts, torch.zeros_like(counts)).sum()

        kind = _regularizer_kind(self.loss)
        reg_sum = terms.new_zeros(())  # sum of beta[label] over local valid anchors
        if kind == "per_class":
            b = _per_triplet(self.loss._beta_for(labels, self.loss.beta.dtype), valid)
            reg_sum = torch.where(valid, b, torch.zeros_like(b)).sum()

        # One all_reduce for the forward statistics.  float64 keeps counts exact
        # (MPS has no float64: float32 there).
        sdt = torch.float32 if terms.device.type == "mps" else torch.float64
        stats = torch.stack([local_sum.detach().to(sdt), local_count.detach().to(sdt),
                             valid.sum().to(sdt), reg_sum.detach().to(sdt)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        total, n_keep, n_valid, reg_total = stats.unbind()

        # Surrogate S_r with sum_r S_r = W * L (module docstring); value = L.
        if reduction == "mean":
            # clamp_min(1): with nothing kept every term is 0, so 0 / 1 = 0 (no NaN)
            surrogate = local_sum * (world / n_keep.clamp_min(1).item())
            value = total / n_keep.clamp_min(1)
        else:  # "sum"
            surrogate = local_sum * world
            value = total
        if kind == "global":
            # L has nu * beta once; each rank adds it, DDP averages W copies -> once
            reg = self.loss.nu * self.loss.beta.sum()
            surrogate = surrogate + reg.to(surrogate.dtype)
            value = value + reg.detach().to(sdt)
        elif kind == "per_class":
            # L has nu * sum_{valid i} beta[l_i] / V_global; rank r's share is its anchors'
            scale = world * self.loss.nu / n_valid.clamp_min(1).item()
            surrogate = surrogate + (reg_sum * scale).to(surrogate.dtype)
            value = value + self.loss.nu * reg_total / n_valid.clamp_min(1)
        # The gather's backward is a collective, so every rank must reach it:
        # tie the gathered rows in with weight 0 (exact: adds a zero gradient).
        if g.embeddings.requires_grad:
            surrogate = surrogate + g.embeddings.sum() * 0
        # value is the global loss; the gradient is the surrogate's (the
        # difference below is an exact 0 in the forward).
        return value.to(surrogate.dtype) + (surrogate - surrogate.detach())
