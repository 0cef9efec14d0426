"""Label-aware contrastive losses in O((N + M) D) memory: SupCon, NT-Xent, Multi-Similarity.

pytorch-metric-learning's losses of the same names (constructor arguments,
defaults and values, on cosine similarity of L2-normalised rows), computed
without the N x M similarity matrix: the forward streams tiles of it with an
online log-sum-exp per anchor, the backward recomputes the tiles from the
saved per-anchor statistics.  docs/contrastive.md has the definitions and the
algorithm; ``fastmine.reference_contrastive`` the full-matrix oracle.

Backends (``backend=``):
    "cpu"      the compiled kernel (csrc/cpu/contrastive_cpu.cpp, the op
               ``fastmine::contrastive`` with C++ autograd; CPU tensors)
    "chunked"  the streaming algorithm written in PyTorch (one ``torch.mm`` per
               tile; any device): the algorithm's executable specification
    "triton"   the Triton kernels of fastmine/_triton_contrastive.py (CUDA
               tensors; CPU tensors under TRITON_INTERPRET=1)
    "torch"    the full-matrix reference (O(N M) memory; plain autograd)
    "auto"     "cpu" for CPU tensors when the extension is built, "triton" for
               CUDA tensors when triton is installed, else "chunked"
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _extension, _ops
from . import reference_contrastive as ref
from ._contract import (check_choice, check_finite_async, check_not_indices_tuple,
                        check_positive_int, check_real, checked_references, compute_dtype)
from .reference_contrastive import pair_masks, reduce_terms, softplus

__all__ = ["SupConLoss", "NTXentLoss", "MultiSimilarityLoss", "BACKENDS", "DEFAULT_BLOCK",
           "prepare", "resolve_backend", "streaming_stats", "streaming_backward"]

BACKENDS = ("auto", "cpu", "chunked", "triton", "torch")
# The op's loss codes (csrc/include/fastmine/schema.h: kContrastive*).
LOSS_CODES = {"supcon": 0, "ntxent": 1, "multi_similarity": 2}
_CPU_OPS = _ops.has_contrastive_ops()  # the extension registers fastmine::contrastive
DEFAULT_BLOCK = 256  # anchors x references per tile: a 256 x 256 tile, 256 KiB in float32


# --------------------------------------------------------------------------- inputs

def prepare(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
            ref_labels: Optional[Tensor], query_ids: Optional[Tensor],
            ref_ids: Optional[Tensor]):
    """Argument checks, data checks and the reference set of a loss call.

    The checks are the mining contract's (docs/contract.md), by the same
    functions: ``fastmine.mine._prepare`` (shapes, dtypes, devices, the id
    rules) and ``_contract.checked_references`` with the cosine bounds (NaN,
    Inf, rows without a direction).

    Returns ``(q, r, labels, ref_labels, query_ids, ref_ids, self_ref, user_ids)``:
    q [N, D] and r [M, D] the L2-normalised rows in the compute dtype (float64
    stays, everything else float32), differentiable; r is q itself when
    ``ref_emb`` is None (``self_ref``; the ids are then ``arange(N)``, or the
    given ``query_ids``, for both sides); labels / ids widened to a signed
    dtype; ids None when no pair is same-sample.  ``user_ids``: the caller
    passed ids (the compiled kernel excludes self-pairs by a flag otherwise).

    Raises TypeError when ``ref_emb`` is a tuple or list: a PML ``indices_tuple``
    passed positionally (PML's ``loss(embeddings, labels, indices_tuple, ref_emb,
    ref_labels)``), which would otherwise surface as a confusing ref_labels or
    ref_emb error.
    """
    check_not_indices_tuple("fastmine's contrastive losses", ref_emb)
    from .mine import _prepare as _mine_prepare  # fastmine.mine imports the op layer

    (embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, *_) = _mine_prepare(
        embeddings, labels, ref_emb, ref_labels, "easy", "hard", "cosine", None,
        query_ids, ref_ids, "torch")
    self_ref, user_ids = ref_emb is None, query_ids is not None
    if torch.compiler.is_compiling():
        # In a graph the data checks take their no-sync form (a device-side
        # assertion, docs/contract.md "Errors"), and the references are resolved
        # as checked_references does.
        check_finite_async("embeddings", embeddings, "cosine")
        if self_ref:
            ids = torch.arange(embeddings.shape[0], device=embeddings.device) \
                if query_ids is None else query_ids
            ref_emb, ref_labels, query_ids, ref_ids = embeddings, labels, ids, ids
        else:
            check_finite_async("ref_emb", ref_emb, "cosine")
    else:
        ref_emb, ref_labels, query_ids, ref_ids = checked_references(
            embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, "cosine")
    cdt = compute_dtype(embeddings.dtype)
    q = F.normalize(embeddings.to(cdt), dim=1)
    r = q if self_ref else F.normalize(ref_emb.to(cdt), dim=1)
    return q, r, labels, ref_labels, query_ids, ref_ids, self_ref, user_ids


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "cpu" (CPU tensors, extension built), "triton" (CUDA tensors, triton
    installed) or "chunked"; an explicit "cpu" or "triton" that cannot run raises
    RuntimeError("backend '<name>' is not available: ...")."""
    if backend == "auto":
        if device.type == "cpu" and _CPU_OPS:
            return "cpu"
        if device.type == "cuda" and not _triton_unavailable(device):
            return "triton"
        return "chunked"
    if backend == "triton":
        why = _triton_unavailable(device)
        if why:
            raise RuntimeError(f"backend 'triton' is not available: {why}")
    if backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpu' is not available: it takes CPU tensors, got "
                               f"{device.type} tensors")
        if not _CPU_OPS:
            why = _extension.why_missing() if not _extension.loaded() else \
                "the loaded fastmine._C has no fastmine::contrastive op (rebuild it)"
            raise RuntimeError(f"backend 'cpu' is not available: {why}")
    return backend


def _triton_unavailable(device: torch.device) -> str:
    """'' when the Triton kernels can take tensors of ``device``, else why not."""
    try:
        from . import _triton
    except ImportError as exc:  # pragma: no cover - _triton itself guards the triton import
        return str(exc)
    return _triton.why_unavailable(device)


# --------------------------------------------------------------------------- streaming

def _tiles(q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor, query_ids: Optional[Tensor],
           ref_ids: Optional[Tensor], block_q: int, block_r: int):
    """Yield ``(i0, i1, j0, j1, s, pos, neg)`` for every tile: s = q[i0:i1] r[j0:j1]^T
    ([bq, br], one mm) and the tile's masks (``pair_masks`` on the slices).
    Anchor blocks are the outer loop, so per-anchor state is finished block by block."""
    n, m = q.shape[0], r.shape[0]
    for i0 in range(0, n, block_q):
        i1 = min(i0 + block_q, n)
        qi = q[i0:i1]
        for j0 in range(0, m, block_r):
            j1 = min(j0 + block_r, m)
            s = torch.mm(qi, r[j0:j1].T)
            pos, neg = pair_masks(labels[i0:i1], ref_labels[j0:j1],
                                  None if query_ids is None else query_ids[i0:i1],
                                  None if ref_ids is None else ref_ids[j0:j1])
            yield i0, i1, j0, j1, s, pos, neg


def _lse_update(mx: Tensor, sm: Tensor, x: Tensor, mask: Tensor) -> None:
    """One step of the online log-sum-exp, in place: the running (max, sum) of an
    anchor block, mx, sm [b], absorb the masked tile rows x [b, c]
    (LSE = mx + log sm; docs/contrastive.md, "Streaming forward").

    m' = max(m, max_k x_k);  sum' = sum e^{m - m'} + sum_k e^{x_k - m'}; while
    m' = -inf (nothing seen yet) the shift is 0, so the sum stays 0, not NaN."""
    xm = x.masked_fill(~mask, float("-inf"))
    new = torch.maximum(mx, xm.amax(dim=1))
    shift = new.masked_fill(torch.isneginf(new), 0.0)
    sm.mul_(torch.exp(mx - shift)).add_(torch.exp(xm - shift[:, None]).sum(dim=1))
    mx.copy_(new)


def _lse_state(n: int, like: Tensor, add_one: bool) -> Tuple[Tensor, Tensor]:
    """The empty online LSE of n anchors: (-inf, 0), or (0, 1) with PML's extra term e^0."""
    if add_one:
        return like.new_zeros(n), like.new_ones(n)
    return like.new_full((n,), float("-inf")), like.new_zeros(n)


def _lse_finish(mx: Tensor, sm: Tensor) -> Tensor:
    """LSE = mx + log(sm); -inf for an empty set."""
    return mx + torch.log(sm)


def _finite(x: Tensor) -> Tensor:
    """x with -inf replaced by 0: a safe shift where the masks select nothing."""
    return x.masked_fill(torch.isneginf(x), 0.0)


class _Spec:
    """One loss of the streaming family: its forward passes (``stats``) and
    dterm_i/ds on a tile (``tile_grad``).  Subclasses hold the hyper-parameters."""

    def stats(self, tiles, q: Tensor, n: int):
        """Run the forward passes over ``tiles()`` (a fresh tile iterator per call).
        Returns (terms [N], n_pos [N] int64, n_neg [N] int64, saved: a tuple of
        per-anchor tensors for tile_grad)."""
        raise NotImplementedError

    def tile_grad(self, s, pos, neg, saved, gamma, i0, i1) -> Tensor:
        """gamma_i dterm_i/ds on one tile [bq, br], from ``saved`` rows i0:i1 and the
        upstream gradient gamma [bq, 1]."""
        raise NotImplementedError

    def op_args(self) -> Tuple[int, float, float, float, Optional[float]]:
        """(loss code, p0, p1, p2, epsilon): this loss as the arguments of the ops
        fastmine::contrastive (schema.h) and fastmine::contrastive_triton;
        ``spec_from_op_args`` is the inverse."""
        raise NotImplementedError


def spec_from_op_args(loss: int, p0: float, p1: float, p2: float,
                      epsilon: Optional[float]) -> _Spec:
    """The ``_Spec`` of the ops' loss arguments (the inverse of ``_Spec.op_args``)."""
    if loss == LOSS_CODES["supcon"]:
        return _SupConSpec(p0)
    if loss == LOSS_CODES["ntxent"]:
        return _NTXentSpec(p0)
    if loss == LOSS_CODES["multi_similarity"]:
        return _MultiSimilaritySpec(p0, p1, p2, epsilon)
    raise ValueError(f"unknown contrastive loss code {loss}; expected one of "
                     f"{sorted(LOSS_CODES.values())}")


def _counts_state(n: int, q: Tensor) -> Tuple[Tensor, Tensor]:
    return (torch.zeros(n, dtype=torch.int64, device=q.device),
            torch.zeros(n, dtype=torch.int64, device=q.device))


class _SupConSpec(_Spec):
    def __init__(self, temperature: float):
        self.t = temperature

    def op_args(self):
        return LOSS_CODES["supcon"], self.t, 0.0, 0.0, None

    def stats(self, tiles, q, n):
        mx, sm = _lse_state(n, q, add_one=False)
        sum_pos = q.new_zeros(n)  # sum over positives of s / tau
        n_pos, n_neg = _counts_state(n, q)
        for i0, i1, _, _, s, pos, neg in tiles():
            x = s / self.t
            _lse_update(mx[i0:i1], sm[i0:i1], x, pos | neg)
            sum_pos[i0:i1] += torch.where(pos, x, torch.zeros_like(x)).sum(dim=1)
            n_pos[i0:i1] += pos.sum(dim=1)
            n_neg[i0:i1] += neg.sum(dim=1)
        terms, saved = self.finish(_lse_finish(mx, sm), sum_pos, n_pos)
        return terms, n_pos, n_neg, saved

    def finish(self, lse, sum_pos, n_pos):
        """(terms [N], saved) from the pass's totals: LSE_i over P u Q of s/tau, the sum
        over P of s/tau and P_i (also the Triton backend's, fastmine/_triton_contrastive.py)."""
        lse = _finite(lse)  # -inf only without candidates (then P_i = 0)
        terms = torch.where(n_pos > 0, lse - sum_pos / n_pos.clamp_min(1).to(lse.dtype),
                            torch.zeros_like(lse))
        return terms, (lse, n_pos.to(lse.dtype))

    def tile_grad(self, s, pos, neg, saved, gamma, i0, i1):
        lse, n_pos = (t[i0:i1, None] for t in saved)
        x = s / self.t
        soft = torch.where(pos | neg, torch.exp(x - lse), torch.zeros_like(x))
        g = (soft - pos.to(s.dtype) / n_pos.clamp_min(1)) * (gamma / self.t)
        return torch.where(n_pos > 0, g, torch.zeros_like(g))  # term_i = 0 without positives


class _NTXentSpec(_Spec):
    def __init__(self, temperature: float):
        self.t = temperature

    def op_args(self):
        return LOSS_CODES["ntxent"], self.t, 0.0, 0.0, None

    def stats(self, tiles, q, n):
        mx, sm = _lse_state(n, q, add_one=False)
        n_pos, n_neg = _counts_state(n, q)
        for i0, i1, _, _, s, pos, neg in tiles():  # pass 1: N_i = LSE over the negatives
            _lse_update(mx[i0:i1], sm[i0:i1], s / self.t, neg)
            n_pos[i0:i1] += pos.sum(dim=1)
            n_neg[i0:i1] += neg.sum(dim=1)
        neg_lse = _lse_finish(mx, sm)  # -inf without negatives: every pair term is 0
        terms = q.new_zeros(n)  # sum over positives of softplus(N_i - s/tau)
        dn = q.new_zeros(n)  # G_i = dterm_i/dN_i = sum over positives of sigmoid(N_i - s/tau)
        for i0, i1, _, _, s, pos, neg in tiles():  # pass 2: the positive pairs
            z = neg_lse[i0:i1, None] - s / self.t
            terms[i0:i1] += torch.where(pos, softplus(z), torch.zeros_like(z)).sum(dim=1)
            dn[i0:i1] += torch.where(pos, torch.sigmoid(z), torch.zeros_like(z)).sum(dim=1)
        return terms, n_pos, n_neg, (neg_lse, dn)

    def tile_grad(self, s, pos, neg, saved, gamma, i0, i1):
        neg_lse, dn = (t[i0:i1, None] for t in saved)
        x = s / self.t
        g_neg = torch.where(neg, dn * torch.exp(x - _finite(neg_lse)), torch.zeros_like(x))
        g_pos = torch.where(pos, torch.sigmoid(neg_lse - x), torch.zeros_like(x))
        return (gamma / self.t) * (g_neg - g_pos)


class _MultiSimilaritySpec(_Spec):
    def __init__(self, alpha: float, beta: float, base: float, miner_epsilon: Optional[float]):
        self.alpha, self.beta, self.base, self.eps = alpha, beta, base, miner_epsilon

    def op_args(self):
        return LOSS_CODES["multi_similarity"], self.alpha, self.beta, self.base, self.eps

    def _select(self, s, pos, neg, bounds, i0, i1):
        """The MS miner's pairs on a tile (``reference_contrastive.ms_miner_masks``
        with the anchors' min over positives / max over negatives from pass 0)."""
        if self.eps is None:
            return pos, neg
        min_pos, max_neg = (t[i0:i1, None] for t in bounds)
        return pos & (s - self.eps < max_neg), neg & (s + self.eps > min_pos)

    def stats(self, tiles, q, n):
        bounds = ()
        n_pos, n_neg = _counts_state(n, q)
        if self.eps is not None:  # pass 0: min_P s and max_Q s per anchor
            min_pos = q.new_full((n,), float("inf"))
            max_neg = q.new_full((n,), float("-inf"))
            for i0, i1, _, _, s, pos, neg in tiles():
                min_pos[i0:i1] = torch.minimum(
                    min_pos[i0:i1], s.masked_fill(~pos, float("inf")).amin(dim=1))
                max_neg[i0:i1] = torch.maximum(
                    max_neg[i0:i1], s.masked_fill(~neg, float("-inf")).amax(dim=1))
            bounds = (min_pos, max_neg)
        pmx, psm = _lse_state(n, q, add_one=True)
        nmx, nsm = _lse_state(n, q, add_one=True)
        for i0, i1, _, _, s, pos, neg in tiles():
            n_pos[i0:i1] += pos.sum(dim=1)  # the counts before the miner
            n_neg[i0:i1] += neg.sum(dim=1)
            pos, neg = self._select(s, pos, neg, bounds, i0, i1)
            _lse_update(pmx[i0:i1], psm[i0:i1], self.alpha * (self.base - s), pos)
            _lse_update(nmx[i0:i1], nsm[i0:i1], self.beta * (s - self.base), neg)
        terms, saved = self.finish(_lse_finish(pmx, psm), _lse_finish(nmx, nsm), bounds)
        return terms, n_pos, n_neg, saved

    def finish(self, a, b, bounds):
        """(terms [N], saved) from A_i, B_i (the two LSEs, finite: both include e^0)
        and the miner's bounds (() without the miner); shared with the Triton backend."""
        return a / self.alpha + b / self.beta, (a, b) + tuple(bounds)

    def tile_grad(self, s, pos, neg, saved, gamma, i0, i1):
        a, b = (t[i0:i1, None] for t in saved[:2])
        pos, neg = self._select(s, pos, neg, saved[2:], i0, i1)
        g_pos = torch.where(pos, torch.exp(self.alpha * (self.base - s) - a), torch.zeros_like(s))
        g_neg = torch.where(neg, torch.exp(self.beta * (s - self.base) - b), torch.zeros_like(s))
        return gamma * (g_neg - g_pos)


def streaming_stats(spec: _Spec, q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor,
                    query_ids: Optional[Tensor], ref_ids: Optional[Tensor], block_q: int,
                    block_r: int):
    """The forward of the streaming algorithm: ``spec.stats`` over the tiles of (q, r).

    spec: the loss (``_SupConSpec``, ``_NTXentSpec``, ``_MultiSimilaritySpec``);
    q [N, D], r [M, D] normalised rows (float32 / float64, one dtype and device;
    r may be q); labels [N], ref_labels [M] integer; query_ids [N] / ref_ids [M]
    integer or both None (no same-sample pair); tiles of block_q anchors x
    block_r references (ints >= 1).  Returns (terms [N] in q's dtype, n_pos [N]
    int64, n_neg [N] int64, saved): terms and counts as in
    ``reference_contrastive`` (``reduce_terms`` makes the loss); saved is a tuple
    of per-anchor tensors [N] in q's dtype, the statistics ``streaming_backward``
    takes (SupCon: (LSE_i, P_i); NT-Xent: (N_i, G_i); Multi-Similarity: (A_i, B_i),
    plus (min_pos_i, max_neg_i) with the miner).  O(N + M) memory beyond one
    tile.  No autograd: ``_StreamingTerms`` (and ``memory._bank_ops``) wrap it."""
    tiles = lambda: _tiles(q, r, labels, ref_labels, query_ids, ref_ids,  # noqa: E731
                           block_q, block_r)
    return spec.stats(tiles, q, q.shape[0])


def streaming_backward(spec: _Spec, saved, gamma: Tensor, q: Tensor, r: Tensor,
                       labels: Tensor, ref_labels: Tensor, query_ids: Optional[Tensor],
                       ref_ids: Optional[Tensor], block_q: int, block_r: int,
                       dq: Optional[Tensor], dr: Optional[Tensor]) -> None:
    """The backward of the streaming algorithm, accumulated in place: every tile of
    (q, r) again, g = gamma_i dterm_i/ds_ij (``spec.tile_grad`` from ``saved``, the
    per-anchor statistics of ``streaming_stats``), then dq[i-block] += g r[j-block]
    and dr[j-block] += g^T q[i-block].  Returns None: the result is dq and dr.

    spec, q, r, labels, ref_labels, ids, block_q, block_r as in ``streaming_stats``
    (the same tiling need not be used); saved: its fourth output; gamma [N] in q's
    dtype is dL/dterms; dq [N, D] and dr [M, D] in q's dtype (either None: not
    formed; the same tensor when r is q) are added to: the gradients w.r.t. the
    normalised rows q and r (the normalisation's backward is autograd's).

    r need not be the forward's references: g_ij depends on reference j only
    through s_ij and the masks of (i, j), so the saved statistics of the full
    pass and r = a subset of the references (with its labels and ids) give that
    subset's reference gradient (``memory._BankContrastive``: the live batch
    rows of [batch; memory])."""
    for i0, i1, j0, j1, s, pos, neg in _tiles(q, r, labels, ref_labels, query_ids, ref_ids,
                                              block_q, block_r):
        g = spec.tile_grad(s, pos, neg, saved, gamma[i0:i1, None], i0, i1)
        if dq is not None:
            dq[i0:i1].addmm_(g, r[j0:j1])
        if dr is not None:
            dr[j0:j1].addmm_(g.T, q[i0:i1])


class _StreamingTerms(torch.autograd.Function):
    """(terms [N], n_pos [N], n_neg [N]) = spec(q, r); r None: the references are q
    itself (ref_labels None: ``labels``; ref_ids None: ``query_ids``).

    forward: ``streaming_stats``, O(N + M) state.  backward:
    ``streaming_backward`` from the saved per-anchor statistics."""

    @staticmethod
    def forward(ctx, q, r, labels, ref_labels, query_ids, ref_ids, spec, block_q, block_r):
        refs = q if r is None else r
        ref_labels = labels if ref_labels is None else ref_labels
        ref_ids = query_ids if ref_ids is None else ref_ids
        terms, n_pos, n_neg, saved = streaming_stats(spec, q, refs, labels, ref_labels,
                                                     query_ids, ref_ids, block_q, block_r)
        ctx.save_for_backward(q, r, labels, ref_labels, query_ids, ref_ids, *saved)
        ctx.spec, ctx.blocks = spec, (block_q, block_r)
        ctx.mark_non_differentiable(n_pos, n_neg)
        return terms, n_pos, n_neg

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_pos, _grad_neg):
        q, r, labels, ref_labels, query_ids, ref_ids, *saved = ctx.saved_tensors
        refs = q if r is None else r
        dq = torch.zeros_like(q)
        want_r = r is not None and ctx.needs_input_grad[1]
        dr = dq if r is None else (torch.zeros_like(r) if want_r else None)
        streaming_backward(ctx.spec, saved, grad, q, refs, labels, ref_labels, query_ids,
                           ref_ids, *ctx.blocks, dq, dr)
        return dq, (dr if want_r else None), None, None, None, None, None, None, None


# --------------------------------------------------------------------------- modules

class _ContrastiveLoss(nn.Module):
    """Shared plumbing: checks, normalisation, backend dispatch."""

    def __init__(self, backend: str, block_size: int):
        super().__init__()
        check_choice("backend", backend, BACKENDS)
        self.backend = backend
        self.block_size = check_positive_int("block_size", block_size)

    _loss = ""  # the LOSS_CODES / reduce_terms name

    def _spec(self) -> _Spec:
        raise NotImplementedError

    def _reference(self, *prepared) -> Tuple[Tensor, Tensor, Tensor]:
        """The full-matrix per-anchor (terms, n_pos, n_neg)."""
        raise NotImplementedError

    def _op_args(self) -> tuple:
        """(loss code, p0, p1, p2, epsilon) of the ops fastmine::contrastive(_triton)."""
        return self._spec().op_args()

    def _terms(self, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids):
        """(terms [N] in the compute dtype, n_pos [N], n_neg [N]) on the backend."""
        q, r, labels, ref_labels, qid, rid, self_ref, user_ids = prepare(
            embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids)
        backend = resolve_backend(self.backend, q.device)
        if backend == "torch":
            return self._reference(q, r, labels, ref_labels, qid, rid)
        if backend == "chunked":
            # the references are the batch: one tensor each (no duplicate inputs, which
            # torch.compile rejects for an autograd.Function)
            return _StreamingTerms.apply(q, None if self_ref else r, labels,
                                         None if self_ref else ref_labels, qid,
                                         None if self_ref else rid, self._spec(),
                                         self.block_size, self.block_size)
        if backend == "triton":
            from . import _triton_contrastive
            return _triton_contrastive.streaming_terms(
                self._spec(), q, None if self_ref else r, labels, ref_labels, qid, rid,
                self_ref and not user_ids)
        if self_ref and not user_ids:
            qid = rid = None  # the kernel excludes i == j itself
        terms, stats = torch.ops.fastmine.contrastive(
            q, None if self_ref else r, labels, ref_labels, qid, rid, *self._op_args(),
            self.block_size)
        return terms, stats[2].to(torch.int64), stats[3].to(torch.int64)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, query_ids: Optional[Tensor] = None,
                ref_ids: Optional[Tensor] = None) -> Tensor:
        """embeddings [N, D] float16/bfloat16/float32/float64, labels [N] int;
        optional ref_emb [M, D] / ref_labels [M] (a memory bank; default: the
        batch, self-pairs excluded) and query_ids [N] / ref_ids [M] (same-sample
        exclusion, docs/contract.md).  Returns the 0-d loss in embeddings' dtype
        (computed in float32 for float16/bfloat16).  A tuple or list as ref_emb
        (PML's positional indices_tuple) is a TypeError (``prepare``)."""
        terms, n_pos, n_neg = self._terms(embeddings, labels, ref_emb, ref_labels, query_ids,
                                          ref_ids)
        return reduce_terms(self._loss, terms, n_pos, n_neg).to(embeddings.dtype)


class _PerAnchorMean:
    """``per_anchor`` for the losses whose reduction is a mean over anchors
    (``fastmine.distributed.DistributedLoss`` reads ``per_anchor``, ``reduction``
    and ``average_nonzero``): SupCon (the mean of the non-zero terms) and
    Multi-Similarity (the mean over all anchors).  NT-Xent averages over pairs: its
    ``per_anchor`` also returns the pair counts (``NTXentLoss.per_anchor``)."""

    reduction = "mean"

    def per_anchor(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                   ref_labels: Optional[Tensor] = None, *, query_ids: Optional[Tensor] = None,
                   ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(terms [N] in embeddings' dtype, valid [N] bool), terms 0 where not valid:
        the mean of the valid terms (> 0 with ``average_nonzero``) is ``forward``.

        SupCon: valid = the anchor has a positive and this call's batch has a
        negative pair (PML's batch-level condition, evaluated on this call's
        anchors: under DistributedLoss, on the rank's anchors against the global
        references -- the same as the global condition unless ids leave some
        anchors of a multi-class batch without any negative).  MS: every anchor."""
        terms, n_pos, n_neg = self._terms(embeddings, labels, ref_emb, ref_labels, query_ids,
                                          ref_ids)
        if self.average_nonzero:
            valid = (n_pos > 0) & (n_neg > 0).any()
        else:
            valid = torch.ones_like(n_pos, dtype=torch.bool)
        terms = torch.where(valid, terms, torch.zeros_like(terms))
        return terms.to(embeddings.dtype), valid


class SupConLoss(_PerAnchorMean, _ContrastiveLoss):
    """Supervised contrastive loss (Khosla et al. 2020; PML ``SupConLoss``).

    Per anchor, minus the mean over its positives of the log-softmax of s/tau
    over its positives and negatives (s: cosine similarity).  docs/contrastive.md.

    Args:
        temperature: tau, a real > 0 (default 0.1).
        backend: "auto", "cpu" (compiled kernel), "chunked" (streaming in
            PyTorch), "triton" (Triton kernels) or "torch" (full matrix); see
            the module docstring.
        block_size: int >= 1, anchors and references per tile of the "chunked"
            and "cpu" backends ("triton" runs its own power-of-two tiles).

    Call ``loss(embeddings, labels, ref_emb=None, ref_labels=None, query_ids=None,
    ref_ids=None)`` (PML's order without ``indices_tuple``: a tuple or list as
    the third argument is a TypeError):
        embeddings: [N, D] float16/bfloat16/float32/float64; labels: [N] integer.
        ref_emb, ref_labels: [M, D] (embeddings' dtype and device) and [M]
            integer, together (e.g. a memory bank), or None: the references are
            the batch, self-pairs excluded.
        query_ids, ref_ids: [N], [M] integer sample ids, or None; a pair with
            equal ids is neither positive nor negative (docs/contract.md).
    Returns a 0-d tensor in embeddings' dtype (computed in float32 for
    float16/bfloat16), differentiable w.r.t. embeddings and ref_emb.

    Reduction: the mean over the anchors with a non-zero term (PML's
    AvgNonZeroReducer); 0 (attached to the graph, never NaN) when the batch has
    no positive or no negative pair.  ``per_anchor`` gives the unreduced terms.
    """

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto",
                 block_size: int = DEFAULT_BLOCK):
        super().__init__(backend, block_size)
        self.temperature = check_real("temperature", temperature, positive=True)

    _loss = "supcon"
    average_nonzero = True  # PML's AvgNonZeroReducer

    def _spec(self):
        return _SupConSpec(self.temperature)

    def _reference(self, *prepared):
        return ref.supcon_terms(*prepared, temperature=self.temperature)


class NTXentLoss(_ContrastiveLoss):
    """NT-Xent / InfoNCE with labels (PML ``NTXentLoss``).

    Per positive pair (a, p): -log(e^{s_ap/tau} / (e^{s_ap/tau} + sum_n e^{s_an/tau}))
    (s: cosine similarity).  Args (temperature default 0.07), call, shapes and
    dtypes as SupConLoss.

    Reduction: the mean over all positive pairs (PML's MeanReducer over pairs);
    0 (attached to the graph, never NaN) when the batch has no positive or no
    negative pair.  ``per_anchor`` gives the per-anchor sums and pair counts."""

    def __init__(self, temperature: float = 0.07, *, backend: str = "auto",
                 block_size: int = DEFAULT_BLOCK):
        super().__init__(backend, block_size)
        self.temperature = check_real("temperature", temperature, positive=True)

    _loss = "ntxent"
    reduction = "mean"  # fastmine.distributed.DistributedLoss: the mean over pairs, by counts
    average_nonzero = False

    def per_anchor(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                   ref_labels: Optional[Tensor] = None, *, query_ids: Optional[Tensor] = None,
                   ref_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(terms [N] in embeddings' dtype, valid [N] bool, counts [N] int64): terms_i the
        sum of anchor i's positive-pair terms, counts_i = P_i its positive pairs, valid =
        P_i > 0.  sum(terms) / sum(counts) is ``forward`` (fastmine.distributed.
        DistributedLoss divides by the global sum of the counts).  PML's batch-level
        conditions need no flag here: without a negative pair every term is 0 (N_i = -inf),
        without a positive pair every count is."""
        terms, n_pos, _ = self._terms(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids)
        return terms.to(embeddings.dtype), n_pos > 0, n_pos

    def _spec(self):
        return _NTXentSpec(self.temperature)

    def _reference(self, *prepared):
        return ref.ntxent_terms(*prepared, temperature=self.temperature)


class MultiSimilarityLoss(_PerAnchorMean, _ContrastiveLoss):
    """Multi-Similarity loss (Wang et al. 2019; PML ``MultiSimilarityLoss``).

    Per anchor (1/alpha) log(1 + sum_p e^{-alpha (s_ap - base)})
    + (1/beta) log(1 + sum_n e^{beta (s_an - base)}) (s: cosine similarity).
    Call, shapes and dtypes as SupConLoss.

    Reduction: the mean over all N anchors (PML's MeanReducer); an anchor
    without positives or negatives contributes 0 for that side.

    Args:
        alpha, beta: reals > 0 (defaults 2, 50); base: real (default 0.5).
        miner_epsilon: None (all pairs), or the MultiSimilarityMiner's epsilon
            (>= 0; PML's default is 0.1) to fuse its pair selection: negatives
            with s_an + eps > min_p s_ap, positives with s_ap - eps < max_n s_an.
        backend, block_size: as SupConLoss.
    """

    def __init__(self, alpha: float = 2, beta: float = 50, base: float = 0.5, *,
                 miner_epsilon: Optional[float] = None, backend: str = "auto",
                 block_size: int = DEFAULT_BLOCK):
        super().__init__(backend, block_size)
        self.alpha = check_real("alpha", alpha, positive=True)
        self.beta = check_real("beta", beta, positive=True)
        self.base = check_real("base", base)
        self.miner_epsilon = (None if miner_epsilon is None
                              else check_real("miner_epsilon", miner_epsilon, minimum=0.0))

    _loss = "multi_similarity"
    average_nonzero = False

    def _spec(self):
        return _MultiSimilaritySpec(self.alpha, self.beta, self.base, self.miner_epsilon)

    def _reference(self, *prepared):
        return ref.multi_similarity_terms(*prepared, alpha=self.alpha, beta=self.beta,
                                          base=self.base, miner_epsilon=self.miner_epsilon)
