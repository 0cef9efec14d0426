"""Cross-batch memory (XBM, Wang et al. 2020) with same-sample exclusion."""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._contract import check_embeddings, check_index_vector, check_positive_int, widen_index_vector
from ._pairs import pair_distance
from .losses import _MinedLoss, _mines_through_hooks
from .reference_topk import TopKResult

__all__ = ["CrossBatchMemory", "all_pairs_indices"]

# The two loss protocols CrossBatchMemory drives (told apart by the forward's parameters).
_FASTMINE = "fastmine"  # forward(embeddings, labels, ref_emb, ref_labels, *, query_ids, ref_ids)
_PML = "pml"            # forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)


def _loss_protocol(loss) -> str:
    if not callable(loss):
        raise TypeError(f"loss must be a loss module, got {type(loss).__name__}")
    try:
        params = inspect.signature(loss.forward if isinstance(loss, nn.Module) else loss).parameters
    except (TypeError, ValueError):
        params = {}
    if "query_ids" in params and "ref_ids" in params:
        return _FASTMINE
    if "indices_tuple" in params and "ref_emb" in params:
        return _PML
    raise TypeError(
        f"loss must be a fastmine loss (forward(embeddings, labels, ref_emb, ref_labels, *, "
        f"query_ids, ref_ids)) or a pytorch-metric-learning loss (forward(embeddings, labels, "
        f"indices_tuple, ref_emb, ref_labels)); got {type(loss).__name__}")


def all_pairs_indices(labels: Tensor, ref_labels: Tensor, query_ids: Tensor,
                      ref_ids: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """PML's all-pairs tuple (a1, p, a2, n) without same-sample pairs.

    labels, query_ids: [N]; ref_labels, ref_ids: [M] integer.  Positive pairs
    (a1[k], p[k]) have equal labels, negative pairs (a2[k], n[k]) different
    ones; a pair with ``query_ids[a] == ref_ids[r]`` is never listed.
    Materialises [N, M] masks, as PML's own ``get_all_pairs_indices`` does.
    """
    other = query_ids[:, None] != ref_ids[None, :]
    same = labels[:, None] == ref_labels[None, :]
    a1, p = torch.where(same & other)
    a2, n = torch.where(~same & other)
    return a1, p, a2, n


def _drop_same_sample(indices_tuple, query_ids: Tensor, ref_ids: Tensor):
    """Remove same-sample pairs from a PML indices tuple ((a, p, n) or (a1, p, a2, n))."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        keep = (query_ids[a] != ref_ids[p]) & (query_ids[a] != ref_ids[n])
        return a[keep], p[keep], n[keep]
    if len(indices_tuple) == 4:
        a1, p, a2, n = indices_tuple
        kp, kn = query_ids[a1] != ref_ids[p], query_ids[a2] != ref_ids[n]
        return a1[kp], p[kp], a2[kn], n[kn]
    raise ValueError(f"miner must return a PML indices tuple of 3 or 4 tensors, got "
                     f"{len(indices_tuple)}")


class CrossBatchMemory(nn.Module):
    """Mine each batch against itself plus a ring buffer of past embeddings.

    A drop-in for pytorch-metric-learning's ``CrossBatchMemory`` (same
    constructor), which never pairs an anchor with a stored copy of itself.

    Args:
        loss: a fastmine loss (``fastmine.losses.TripletMarginLoss`` /
            ``MarginLoss``, or anything with their ``forward(embeddings,
            labels, ref_emb, ref_labels, *, query_ids, ref_ids)``), which mines
            by itself; or a pytorch-metric-learning loss (``forward(embeddings,
            labels, indices_tuple, ref_emb, ref_labels)``), which is handed the
            pairs or triplets chosen by ``miner``.
        embedding_size: D.
        memory_size: capacity of the ring buffer (rows), >= 1.
        miner: PML losses only.  None: every positive and negative pair
            (PML's default, O(N * (N + memory)) pairs); a fastmine miner
            (``fastmine.miners.BatchEasyHardMiner`` / ``BatchHardMiner`` /
            ``DistanceWeightedMiner``): fused mining with same-sample
            exclusion; any other PML miner:
            called as ``miner(embeddings, labels, ref_emb, ref_labels)``, then
            its same-sample pairs are removed.  A fastmine loss mines itself,
            so a miner is an error there.

    ``forward(embeddings [N, D] float, labels [N] int, ids [N] int = None)``:
      1. references: with a fastmine loss, the current batch (with its
         gradient) followed by the filled part of the memory in slot order
         (detached), so reference j < N is batch row j and reference N + k is
         memory slot k (ties go to the smallest such index); with a PML loss,
         as in PML, the batch is enqueued first and the references are the
         filled memory in slot order (the batch rows detached);
      2. a pair (anchor i, reference j) is never used when ``ids[i] ==
         ref_ids[j]``.  Default ids are a running counter, so every enqueued
         batch has fresh ids and only the anchor's own row in the batch is
         excluded.  Pass dataset sample ids to also exclude the stored copies
         of the same sample from earlier batches (an anchor never mines its own
         stale copy as its "easy positive" -- the bug fixed by
         pytorch-metric-learning PR #524);
      3. the loss is computed; the batch is enqueued (detached, oldest rows
         overwritten first) after it (fastmine loss) or before it (PML loss).
    ``embeddings``, ``labels`` and ``ids`` are validated as by
    ``fastmine.mine`` before anything is stored.  PML's ``indices_tuple`` and
    ``enqueue_mask`` arguments are not supported.

    Cost of a step (fastmine's ``TripletMarginLoss`` / ``MarginLoss``, not
    subclassed in ``forward``, ``per_anchor`` or ``_mine``): O(N * k * D)
    memory beyond the bank (k = k_pos + k_neg, 2 by default), never a copy of
    it (plus what the mining backend needs: O(N * M) for the ``torch``
    reference).  The three buffers are views into
    storage with ``S`` spare rows in front (S = the largest batch so far);
    the (detached) batch is written into the last N spare rows, so that the
    references above are one contiguous view ``[batch; memory[:filled]]``,
    mined in place without gradient by the loss's own rule (``loss._select``:
    its strategies, k_pos x k_neg, distance-weighted sampling with its cutoffs
    and seed; with seed=None one seed per step from torch's generator, as its
    forward draws).  The selected distances [N, k] are then recomputed from
    the N * k gathered rows (``fastmine._pairs.pair_distance``),
    taking the live batch rows for references j < N, so the batch gets its
    gradient both as anchor and as reference; the loss is
    ``loss._loss_from_mined`` (the formula its ``forward`` uses).  The spare
    rows are (re)allocated, with one copy of the bank, at the first step, for
    a batch larger than any before, and after the buffers were replaced
    (``module.to(...)``, a checkpoint of another dtype).  When the loss
    normalises (``normalize_embeddings=True``) the memory stores the
    normalised rows, so that they need no normalising at each step.
    fastmine's contrastive losses (``SupConLoss``, ``NTXentLoss``,
    ``MultiSimilarityLoss``, not subclassed in ``forward`` or ``_terms``) on
    their streaming backends (compiled ``cpu``, ``triton`` or ``chunked``; not the
    full-matrix ``torch``) with float32 / float64 rows stream the same
    view ``[batch; memory[:filled]]`` in place (``_BankContrastive``: O((N +
    M) D) memory, no copy of the bank; the memory stores the normalised rows),
    with the gradient of the live batch as anchor and as reference.  Any
    other fastmine-protocol loss (or backend), or a non-empty memory whose dtype/device
    differs from the batch's, gets ``torch.cat([batch, memory])`` (a copy of
    the bank per step) and its own ``forward``.  No step synchronises the
    host with a CUDA device (beyond what the loss and ``fastmine.mine`` do).

    State (all in ``state_dict``, so a checkpoint restores the memory exactly):
    buffers ``embedding_memory`` [memory_size, D] (float32 at construction; an
    empty memory adopts the dtype/device of the first batch, its label and id
    buffers the device, and loading a checkpoint adopts the checkpoint's
    dtype), ``label_memory`` / ``id_memory`` [memory_size] int64 (with a
    fastmine loss all three are views into the spare-row storage above; a
    saved checkpoint therefore also holds the spare rows); and, as extra
    state, ``queue_idx``
    (next write slot), ``filled`` (rows in use) and the default-id counter.
    ``has_been_filled`` (PML's name) is ``filled == memory_size``.
    """

    def __init__(self, loss: nn.Module, embedding_size: int, memory_size: int = 1024,
                 miner: Optional[nn.Module] = None):
        super().__init__()
        self._protocol = _loss_protocol(loss)
        if miner is not None:
            if self._protocol == _FASTMINE:
                raise ValueError("miner is only used with pytorch-metric-learning losses: a "
                                 "fastmine loss mines by itself (set its pos_strategy / "
                                 "neg_strategy instead)")
            if not callable(miner):
                raise TypeError(f"miner must be a miner module, got {type(miner).__name__}")
        self.loss, self.miner = loss, miner
        self.embedding_size = check_positive_int("embedding_size", embedding_size)
        self.memory_size = check_positive_int("memory_size", memory_size)
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.register_buffer("id_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.queue_idx = 0
        self.filled = 0
        self._next_id = 0  # running counter for default ids
        self._fused = _NO_STORE  # the spare-row storage behind the buffers (fastmine losses)

    # --- state -----------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"queue_idx": self.queue_idx, "filled": self.filled, "next_id": self._next_id}

    def set_extra_state(self, state: dict) -> None:
        queue_idx, filled = int(state["queue_idx"]), int(state["filled"])
        if not (0 <= queue_idx < self.memory_size and 0 <= filled <= self.memory_size):
            raise ValueError(f"CrossBatchMemory checkpoint has queue_idx={queue_idx}, "
                             f"filled={filled}, which do not fit memory_size={self.memory_size}")
        self.queue_idx, self.filled, self._next_id = queue_idx, filled, int(state["next_id"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "embedding_memory")
        if isinstance(saved, Tensor) and saved.dtype != self.embedding_memory.dtype:
            # adopt the checkpoint's dtype (a bf16 memory stays bf16, bit for bit)
            self.embedding_memory = self.embedding_memory.to(saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._drop_stale_store()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._drop_stale_store()  # .to() / .cuda() / .half() may have replaced the buffers
        return out

    # --- storage with spare rows in front of the buffers (fastmine losses) -------------
    def _drop_stale_store(self) -> None:
        """Forget the spare-row storage when the buffers are no longer views into it."""
        st = self.__dict__.get("_fused", _NO_STORE)
        if st is not _NO_STORE and not st.backs(self):
            self._fused = _NO_STORE

    def _store_for(self, n: int) -> "_Store":
        """The spare-row storage behind the buffers, with at least n spare rows."""
        st = self._fused
        if st is _NO_STORE or not st.backs(self) or st.slack < n:
            st = self._fused = _Store.build(self, max(n, st.slack if st.backs(self) else 0))
        return st

    def _stage_batch(self, x: Tensor, labels: Tensor, ids: Tensor):
        """Copy the batch (x [N, D], labels, ids [N] int64) into the N spare rows just
        before the memory, without gradient, and return the references
        [batch; memory[:filled]] as three views of the storage: embeddings
        [N + filled, D], labels and ids [N + filled].  Nothing of the bank is copied."""
        n = x.shape[0]
        st = self._store_for(n)
        lo, hi = st.slack - n, st.slack + self.filled
        with torch.no_grad():
            st.emb[lo:st.slack].copy_(x)
            st.labels[lo:st.slack].copy_(labels)
            st.ids[lo:st.slack].copy_(ids)
        return st.emb[lo:hi], st.labels[lo:hi], st.ids[lo:hi]

    @property
    def has_been_filled(self) -> bool:
        """True once every slot holds a row (PML's attribute of the same name):
        ``filled == memory_size``.  Read-only; ``reset_queue`` makes it False."""
        return self.filled == self.memory_size

    def reset_queue(self) -> None:
        """Empty the memory (ids of the default counter keep increasing)."""
        self.queue_idx = 0
        self.filled = 0

    # --- forward ---------------------------------------------------------------------
    def _default_ids(self, n: int, device) -> Tensor:
        # Negative ids so that they never collide with user-supplied dataset
        # ids (>= 0) if the two are mixed across calls.
        ids = -1 - torch.arange(self._next_id, self._next_id + n, device=device)
        self._next_id += n
        return ids

    def _validate(self, embeddings, labels, ids) -> None:
        check_embeddings("embeddings", embeddings)
        n = embeddings.shape[0]
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [N, {self.embedding_size}] (embedding_size), "
                             f"got {tuple(embeddings.shape)}")
        check_index_vector("labels", labels, n, "embeddings", embeddings.device)
        if ids is not None:
            check_index_vector("ids", ids, n, "embeddings", embeddings.device)
        if n > self.memory_size:
            raise ValueError(f"batch size {n} exceeds memory_size {self.memory_size}")

    @staticmethod
    def _reject_pml_arguments(ids, kwargs: dict) -> None:
        """TypeError for the arguments of PML's ``CrossBatchMemory.forward(embeddings,
        labels, indices_tuple=None, enqueue_mask=None)`` that this forward does not take:
        ``indices_tuple`` / ``enqueue_mask`` by keyword, or an indices tuple passed as the
        third positional argument (which is ``ids`` here)."""
        if "indices_tuple" in kwargs:
            raise TypeError("fastmine's CrossBatchMemory takes no indices_tuple: it mines the "
                            "batch against the memory itself (with the loss's rule, or the "
                            "miner given to the constructor)")
        if "enqueue_mask" in kwargs:
            raise TypeError("enqueue_mask is not supported by fastmine's CrossBatchMemory: "
                            "every row of the batch is enqueued")
        if kwargs:
            raise TypeError(f"CrossBatchMemory.forward() got unexpected keyword arguments "
                            f"{sorted(kwargs)}: it takes (embeddings, labels, ids=None)")
        if isinstance(ids, (tuple, list)):
            raise TypeError(f"ids (the third argument of fastmine's CrossBatchMemory) must be "
                            f"an integer tensor [N] of sample ids, got a {type(ids).__name__}: "
                            f"PML's indices_tuple is not supported (the memory mines itself)")

    def forward(self, embeddings: Tensor, labels: Tensor, ids: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        """One step: the loss of the batch against [batch; memory], then the batch is
        enqueued (see the class docstring for the order and the references).

        Args:
            embeddings: [N, D] float16/bfloat16/float32/float64, D = embedding_size,
                N <= memory_size (else ValueError).
            labels: [N] integer (int8 ... int64, uint8/16/32), on the embeddings' device.
            ids: None (a running counter: fresh ids per batch) or [N] integer sample ids,
                on the embeddings' device; a pair whose anchor id equals the reference's
                id is never used.  Not PML's ``indices_tuple`` (a tuple or list here is a
                TypeError); PML's ``indices_tuple=`` / ``enqueue_mask=`` keywords are
                TypeErrors too.

        Returns the loss's value (a 0-d tensor for the default reductions).
        """
        self._reject_pml_arguments(ids, kwargs)
        self._validate(embeddings, labels, ids)
        n = embeddings.shape[0]
        labels = widen_index_vector(labels).long()
        ids = self._default_ids(n, embeddings.device) if ids is None else widen_index_vector(ids).long()
        dev = embeddings.device
        if self.filled == 0 and (self.embedding_memory.dtype != embeddings.dtype
                                 or self.embedding_memory.device != dev
                                 or self.label_memory.device != dev
                                 or self.id_memory.device != dev):
            # an empty memory adopts the embeddings' dtype/device (no precision loss;
            # labels and ids too, so that no step moves them)
            self._fused = _NO_STORE  # nothing to keep: an empty memory is rebuilt without a copy
            self.embedding_memory = self.embedding_memory.to(dev, embeddings.dtype)
            self.label_memory, self.id_memory = self.label_memory.to(dev), self.id_memory.to(dev)
        if self._protocol == _FASTMINE and _mines_through_hooks(self.loss) and (
                self.embedding_memory.dtype == embeddings.dtype
                and self.embedding_memory.device == embeddings.device):
            return self._forward_in_place(embeddings, labels, ids)
        if self._protocol == _FASTMINE and self._contrastive_in_place(embeddings):
            return self._forward_contrastive_in_place(embeddings, labels, ids)
        if self._protocol == _PML:
            # PML's order: enqueue first, then the references are the memory
            # (which now holds the batch, detached), in slot order.
            self._enqueue(embeddings.detach(), labels, ids)
            dev, m = embeddings.device, self.filled
            ref_emb = self.embedding_memory[:m].to(dev, embeddings.dtype)
            ref_labels, ref_ids = self.label_memory[:m].to(dev), self.id_memory[:m].to(dev)
            indices_tuple = self._pml_indices(embeddings, labels, ids, ref_emb, ref_labels, ref_ids)
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        # any other fastmine-protocol loss (or a memory of another dtype/device):
        # the references concatenated, a copy of the bank per step
        dev, m = embeddings.device, self.filled
        ref_emb = torch.cat([embeddings, self.embedding_memory[:m].to(dev, embeddings.dtype)])
        ref_labels = torch.cat([labels, self.label_memory[:m].to(dev)])
        ref_ids = torch.cat([ids, self.id_memory[:m].to(dev)])
        out = self.loss(embeddings, labels, ref_emb, ref_labels, query_ids=ids, ref_ids=ref_ids)
        stored = embeddings
        if isinstance(self.loss, _MinedLoss) and self.loss.normalize_embeddings:
            stored = F.normalize(embeddings, dim=1)  # as the in-place path stores them
        self._enqueue(stored.detach(), labels, ids)
        return out

    def _forward_in_place(self, embeddings: Tensor, labels: Tensor, ids: Tensor) -> Tensor:
        """The fastmine-loss step without copying the bank (see the class docstring)."""
        loss = self.loss
        x = F.normalize(embeddings, dim=1) if loss.normalize_embeddings else embeddings
        ref_emb, ref_labels, ref_ids = self._stage_batch(x, labels, ids)
        with torch.no_grad():
            # mined without gradient by the loss's own rule (its k_pos / k_neg,
            # strategies, sampling settings; a distance_weighted seed=None draws
            # its seed here, once per step, as the loss's forward would)
            sel = loss._select(x, labels, ref_emb, ref_labels, ids, ref_ids)
        distance = loss._mining_kwargs()["distance"]
        pos_dist = self._selected_distance(x, ref_emb, sel.pos_idx, distance)
        neg_dist = self._selected_distance(x, ref_emb, sel.neg_idx, distance)
        out = loss._loss_from_mined(TopKResult(sel.pos_idx, sel.neg_idx, pos_dist, neg_dist),
                                    labels)
        self._enqueue(x.detach(), labels, ids)
        return out

    def _contrastive_in_place(self, embeddings: Tensor) -> bool:
        """True when the step can stream the bank in place for a contrastive loss:
        fastmine.contrastive's SupCon / NT-Xent / MS (forward and _terms not
        overridden) on a streaming backend that exposes its per-anchor statistics
        and a reference gradient restricted to given rows (``_BANK_BACKENDS``: the
        compiled ``cpu`` kernel, ``triton``, or the PyTorch ``chunked`` one; so every
        backend but the full-matrix ``torch``), float32 / float64 rows, the memory
        of the same dtype and device."""
        from . import contrastive as C

        loss = self.loss
        if not (isinstance(loss, C._ContrastiveLoss)
                and type(loss).forward is C._ContrastiveLoss.forward
                and type(loss)._terms is C._ContrastiveLoss._terms
                and embeddings.dtype in (torch.float32, torch.float64)
                and self.embedding_memory.dtype == embeddings.dtype
                and self.embedding_memory.device == embeddings.device):
            return False
        try:
            return C.resolve_backend(loss.backend, embeddings.device) in _BANK_BACKENDS
        except RuntimeError:
            return False  # the loss's own forward raises it

    def _forward_contrastive_in_place(self, embeddings: Tensor, labels: Tensor,
                                      ids: Tensor) -> Tensor:
        """The contrastive-loss step without copying the bank: the normalised batch goes
        into the spare rows, the references [batch; memory[:filled]] are one view of the
        storage (as ``_forward_in_place``), and ``_BankContrastive`` streams it.  The
        memory stores the normalised rows (the loss normalises anyway; normalising a
        unit row again changes it by rounding only)."""
        from . import contrastive as C

        # the batch's checks and normalisation, as the loss's forward does them
        q, _, labels, _, ids, _, _, _ = C.prepare(embeddings, labels, None, None, ids, None)
        ref_emb, ref_labels, ref_ids = self._stage_batch(q, labels, ids)
        backend = C.resolve_backend(self.loss.backend, embeddings.device)
        out = _BankContrastive.apply(q, labels, ids, ref_emb, ref_labels, ref_ids, self.loss, backend)
        self._enqueue(q.detach(), labels, ids)
        return out.to(embeddings.dtype)

    @staticmethod
    def _selected_distance(x: Tensor, refs: Tensor, idx: Tensor, distance: str) -> Tensor:
        """d(x[i], ref idx[i, s]) [N, k] for idx [N, k] int64, 0 where idx[i, s] = -1;
        references idx < N are the live rows of x (gradient flows to them), the
        others rows of ``refs`` (no gradient).  Gathers N * k rows: O(N * k * D),
        and the gathered rows are a copy, so later writes into the ring cannot
        touch this step's backward."""
        n, k = idx.shape
        flat = idx.reshape(-1)  # pair (i, s) is row i * k + s
        live = (flat >= 0) & (flat < n)
        b = torch.where(live[:, None], x.index_select(0, torch.where(live, flat, 0)),
                        refs.index_select(0, flat.clamp_min(0)))
        a = x[:, None, :].expand(n, k, x.shape[1]).reshape(n * k, x.shape[1])  # a view at k = 1
        rows = torch.where(flat >= 0, torch.arange(n * k, device=idx.device), -1)
        return pair_distance(a, b, rows, distance).reshape(n, k)

    def _pml_indices(self, embeddings, labels, ids, ref_emb, ref_labels, ref_ids):
        from .miners import FASTMINE_MINERS  # fastmine's own miners take ids

        if self.miner is None:
            return all_pairs_indices(labels, ref_labels, ids, ref_ids)
        if isinstance(self.miner, FASTMINE_MINERS):
            return self.miner(embeddings, labels, ref_emb, ref_labels, query_ids=ids, ref_ids=ref_ids)
        return _drop_same_sample(self.miner(embeddings, labels, ref_emb, ref_labels), ids, ref_ids)

    @torch.no_grad()
    def _enqueue(self, embeddings: Tensor, labels: Tensor, ids: Tensor) -> None:
        # slots queue_idx, queue_idx + 1, ... (mod memory_size): at most two slice
        # copies, positions known on the host (no index tensor, no sync)
        n, q = embeddings.shape[0], self.queue_idx
        k = min(n, self.memory_size - q)
        for buf, src in ((self.embedding_memory, embeddings), (self.label_memory, labels),
                         (self.id_memory, ids)):
            buf[q:q + k].copy_(src[:k])
            buf[:n - k].copy_(src[k:])
        self.queue_idx = (q + n) % self.memory_size
        self.filled = min(self.filled + n, self.memory_size)


# The contrastive backends whose forward returns the per-anchor statistics and whose
# backward takes a reference gradient restricted to given rows (``_bank_ops``).
_BANK_BACKENDS = ("cpu", "triton", "chunked")


def _bank_ops(backend: str, loss, q: Tensor, refs: Tensor, labels: Tensor,
              ref_labels: Tensor, ids: Tensor, ref_ids: Tensor):
    """One streaming forward of ``loss`` on (q, refs) with backend "cpu"
    (fastmine::contrastive), "triton" (fastmine::contrastive_triton) or "chunked"
    (``contrastive.streaming_stats``, tiles of ``loss.block_size``).

    q [N, D], refs [M, D] normalised rows (float32 / float64, detached); labels,
    ids [N] and ref_labels, ref_ids [M] int64.  Returns (terms [N] in q's dtype,
    n_pos [N] int64, n_neg [N] int64, backward), where backward(gamma [N], r
    [M_r, D], r_labels, r_ids [M_r], ref_grad: bool) runs the backend's backward
    on the forward's per-anchor statistics against the references r:
    (dL/dq [N, D], dL/dr [M_r, D] when ref_grad)."""
    if backend == "chunked":
        from . import contrastive as C

        spec, blocks = loss._spec(), (loss.block_size, loss.block_size)
        terms, n_pos, n_neg, saved = C.streaming_stats(spec, q, refs, labels, ref_labels, ids,
                                                       ref_ids, *blocks)

        def backward(gamma, r, r_labels, r_ids, ref_grad):
            dq, dr = torch.zeros_like(q), (torch.zeros_like(r) if ref_grad else None)
            C.streaming_backward(spec, saved, gamma, q, r, labels, r_labels, ids, r_ids, *blocks,
                                 dq, dr)
            return dq, dr
        return terms, n_pos, n_neg, backward
    args = loss._op_args()
    if backend == "cpu":
        args = args + (loss.block_size,)
        terms, stats = torch.ops.fastmine.contrastive(q, refs, labels, ref_labels, ids, ref_ids,
                                                      *args)

        def backward(gamma, r, r_labels, r_ids, ref_grad):
            return torch.ops.fastmine.contrastive_backward(gamma, q, r, labels, r_labels, ids,
                                                           r_ids, *args, stats, ref_grad)
        return terms, stats[2].to(torch.int64), stats[3].to(torch.int64), backward
    from . import _triton_contrastive  # noqa: F401  (registers the ops)

    terms, n_pos, n_neg, stats = torch.ops.fastmine.contrastive_triton(
        q, refs, labels, ref_labels, ids, ref_ids, *args, False, None)

    def backward(gamma, r, r_labels, r_ids, ref_grad):
        return torch.ops.fastmine.contrastive_backward_triton(
            gamma, stats, q, r, labels, r_labels, ids, r_ids, *args, False, ref_grad)
    return terms, n_pos, n_neg, backward


class _BankContrastive(torch.autograd.Function):
    """loss [] = a fastmine contrastive loss of the anchors q [n, D] (normalised,
    differentiable) against refs = [q (detached copy); memory] [n + m, D], a view
    of the CrossBatchMemory storage (labels / ids likewise), with the gradient of
    the live batch in both roles -- what the loss gives on ``torch.cat([q,
    memory])`` -- in O((n + m) D) memory and no copy of the bank.

    The gradient is formed in the forward (from dL/dterms of the loss's one
    reduction, ``reference_contrastive.reduce_terms``) and only scaled in the
    backward: the ring buffer is overwritten by this step's enqueue before the
    backward runs, so the bank cannot be read then.  Anchor role: the backend's
    backward (``_bank_ops``: ``fastmine::contrastive_backward``, its Triton twin,
    or ``contrastive.streaming_backward``) over every reference, no reference
    gradient; reference role of the live rows j < n: the same backward with the
    references = the batch rows and ``ref_grad``, from the per-anchor
    statistics of the full pass (the tile gradient g_ij depends on the
    reference j only through s_ij and the masks), so only an [n, D] reference
    gradient is formed."""

    @staticmethod
    def forward(ctx, q, labels, ids, refs, ref_labels, ref_ids, loss, backend):
        from .reference_contrastive import reduce_terms

        qd = q.detach()
        terms, n_pos, n_neg, back = _bank_ops(backend, loss, qd, refs, labels, ref_labels, ids,
                                              ref_ids)
        leaf = terms.detach().requires_grad_(q.requires_grad)
        with torch.enable_grad():
            value = reduce_terms(loss._loss, leaf, n_pos, n_neg)
        if q.requires_grad:
            (gamma,) = torch.autograd.grad(value, leaf)
            dq, _ = back(gamma, refs, ref_labels, ref_ids, False)
            _, dlive = back(gamma, qd, labels, ids, True)
            ctx.save_for_backward(dq.add_(dlive))
        return value.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (dq,) = ctx.saved_tensors
        return grad * dq, None, None, None, None, None, None, None


class _Store:
    """Storage [slack + memory_size] behind the three buffers of a CrossBatchMemory,
    which are its rows slack... (views): the batch goes into the spare rows just
    before them, so that [batch; memory[:filled]] is one contiguous view."""

    def __init__(self, emb: Tensor, labels: Tensor, ids: Tensor, slack: int, views=()):
        self.emb, self.labels, self.ids, self.slack, self.views = emb, labels, ids, slack, views

    def backs(self, xbm: "CrossBatchMemory") -> bool:
        """True while xbm's buffers are still the views into this storage."""
        return (len(self.views) == 3 and self.views[0] is xbm.embedding_memory
                and self.views[1] is xbm.label_memory and self.views[2] is xbm.id_memory)

    @classmethod
    def build(cls, xbm: "CrossBatchMemory", slack: int) -> "_Store":
        """New storage with ``slack`` spare rows; the buffers' contents are copied
        into it (once; nothing to copy for an empty memory) and the buffers
        become views of it, on the embedding memory's device."""
        em = xbm.embedding_memory
        size = slack + xbm.memory_size
        keep = xbm.filled > 0
        make = torch.empty if keep else torch.zeros
        st = cls(make(size, em.shape[1], dtype=em.dtype, device=em.device),
                 make(size, dtype=torch.long, device=em.device),
                 make(size, dtype=torch.long, device=em.device), slack)
        if keep:
            st.emb[slack:].copy_(em)
            st.labels[slack:].copy_(xbm.label_memory)
            st.ids[slack:].copy_(xbm.id_memory)
        xbm.embedding_memory = st.emb[slack:]
        xbm.label_memory = st.labels[slack:]
        xbm.id_memory = st.ids[slack:]
        st.views = (xbm.embedding_memory, xbm.label_memory, xbm.id_memory)
        return st


_NO_STORE = _Store(None, None, None, 0)
