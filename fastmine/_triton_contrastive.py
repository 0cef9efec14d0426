"""The Triton backend of the contrastive losses (issue #18): SupCon, NT-Xent, Multi-Similarity.

Reads top to bottom: kernels -> launchers -> the ops fastmine::contrastive_triton
and fastmine::contrastive_backward_triton (custom ops with fakes and autograd, so
torch.compile(fullgraph=True) sees one opaque op) and the entry point ``streaming_terms`` that ``fastmine.contrastive`` calls for
``backend="triton"`` (and "auto" on CUDA tensors).  The algorithm is the
chunked PyTorch implementation of fastmine/contrastive.py (its ``_Spec``
classes are the executable specification; docs/contrastive.md "Streaming
forward" and "Backward by recomputation"), tile for tile, as in
FlashAttention-2:

Forward (``_contrastive_fwd_kernel``).  Program (i, s) owns BLOCK_M anchors
and the s-th slice of the references (Flash-Decoding split, a whole number of
BLOCK_N tiles).  Per tile: S = Q_blk R_tile^T by ``tl.dot`` over D in BLOCK_K
chunks (rows already L2-normalised, so S is the cosine similarity), the
positive / negative masks (labels, same-sample ids or i == j, range), then the
loss's per-anchor statistics -- an online (max, sum) log-sum-exp, sums and
counts -- in registers.  Only O(SPLITS * N) statistics are written; the splits
are merged in PyTorch in a fixed order (``_merge_lse``), and the terms are
finished by the specs' own ``finish`` (one definition with the chunked path).

    loss      PASS 0 (MS miner)   PASS 1                            PASS 2
    SupCon    -                   (m, sigma) over P u Q of s/tau,   -
                                  sum_P s/tau, P_i, Q_i
    NT-Xent   -                   (m, sigma) over Q of s/tau,       sum_P softplus(N_i - s/tau),
                                  P_i, Q_i                          sum_P sigmoid(N_i - s/tau)
    MS        min_P s, max_Q s    (m, sigma) over P of              -
                                  alpha(base - s), over Q of
                                  beta(s - base), P_i, Q_i

Backward (``_contrastive_bwd_kernel``), recomputing every tile from the saved
per-anchor statistics: g_ij = gamma_i dterm_i/ds_ij (``_tile_grad``), then
BY_REFS = 0: program = an anchor block, dQ_blk += G R_tile over all reference
tiles; BY_REFS = 1: program = a reference block, dR_blk += G^T Q_tile over all
anchor tiles.  The sums stay in registers ([block, BLOCK_D], BLOCK_D >= D up to
64-128 columns by dot path; wider rows get a second grid axis of column chunks, each
recomputing the tiles) and are written once.  Each output element has exactly
one writing program and every sum runs in a fixed order: no atomics,
bit-identical across runs.  When the references are the batch, the BY_REFS
launch adds into the same buffer.  F.normalize's backward is autograd's (the module
normalises before calling in), as for the other streaming backends.

Precision: the rows arrive in the compute dtype (``contrastive.prepare``:
float16/bfloat16 are normalised in float32 and computed in float32, float64
stays float64); the statistics accumulate in that dtype; the hyper-parameters
travel in a tensor of that dtype (a Python float kernel argument would be
float32).  fp32 ``tl.dot`` is tf32 unless ``torch.get_float32_matmul_precision()
== "highest"`` (``_triton._dot_precision``, the same rule as torch.mm in the
"chunked" backend).  Indices are int32 inside the kernels, row offsets int64.

Where a formula must be restated in Triton, its comment names the defining
Python function; tests/test_contrastive_triton.py checks equality (float64,
1e-10) against the full-matrix reference.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _triton
from .contrastive import (_finite, _lse_finish, _MultiSimilaritySpec, _NTXentSpec, _Spec,
                          _SupConSpec, spec_from_op_args)
from ._triton import INTERPRETED, triton

if triton is not None:
    import triton.language as tl
    from ._triton import _div

# Loss codes (constexpr LOSS) and passes (constexpr PASS) of the kernels.
SUPCON, NTXENT, MULTI_SIMILARITY = 0, 1, 2
BOUNDS_PASS, MAIN_PASS, PAIR_PASS = 0, 1, 2
# Same-sample exclusion (constexpr SAME): none, by ids, or i == j (references = the batch).
SAME_NONE, SAME_IDS, SAME_SELF = 0, 1, 2
N_STATS = 4  # statistics rows per anchor (the widest pass: MS's two (m, sigma) pairs)

if triton is not None:

    # ------------------------------------------------------------------ kernels

    _INF = tl.constexpr(float("inf"))
    _NEG_INF = tl.constexpr(float("-inf"))

    if INTERPRETED:
        @triton.jit
        def _log1p(x):
            """log(1 + x) for x >= 0: log(u) x / (u - 1), u = fl(1 + x) (Goldberg; the
            interpreter has no libdevice), exact to a few ulps in fp32 and fp64."""
            u = 1.0 + x
            return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))
    else:
        from triton.language.extra import libdevice

        @triton.jit
        def _log1p(x):
            """log(1 + x): libdevice's log1p (fp32 and fp64)."""
            return libdevice.log1p(x)

    @triton.jit
    def _softplus(z):
        """log(1 + e^z) = max(z, 0) + log1p(e^{-|z|}), 0 at z = -inf
        (``reference_contrastive.softplus``)."""
        return tl.maximum(z, 0.0) + _log1p(tl.exp(-tl.abs(z)))

    @triton.jit
    def _sigmoid(z):
        """1 / (1 + e^{-z}) without overflow (e^{-|z|} only); 0 at z = -inf."""
        e = tl.exp(-tl.abs(z))
        return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    @triton.jit
    def _lse_update(mx, sm, x, mask):
        """One step of the online log-sum-exp (``contrastive._lse_update``): the
        running (max, sum) [BLOCK_M] absorb the masked tile rows x [BLOCK_M, BLOCK_N].
        m' = max(m, max_k x_k), sum' = sum e^{m - m'} + sum_k e^{x_k - m'}, with the
        shift 0 while m' = -inf (an empty prefix keeps sum = 0, never NaN)."""
        xm = tl.where(mask, x, _NEG_INF)
        new = tl.maximum(mx, tl.max(xm, axis=1))
        shift = tl.where(new == _NEG_INF, 0.0, new)
        sm = sm * tl.exp(mx - shift) + tl.sum(tl.exp(xm - shift[:, None]), axis=1)
        return new, sm

    @triton.jit
    def _similarity_tile(q_rows, row_ok, R, cols, col_ok, D, stride_qd, stride_rm, stride_rd,
                         acc_t: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """S [BLOCK_M, BLOCK_N] = Q_blk R_tile^T in acc_t, ``tl.dot`` over D in BLOCK_K
        chunks (0 outside row_ok / col_ok).  q_rows [BLOCK_M, 1]: pointers to the
        anchor rows (int64 offsets); cols [BLOCK_N]: reference indices.  Every
        launch (forward passes, both backward sides) runs the same tiles, so a
        tile's S is bit-identical wherever it is recomputed (the MS miner's strict
        thresholds rely on it)."""
        r_cols = R + cols.to(tl.int64)[None, :] * stride_rm
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            x = tl.load(q_rows + ks[None, :] * stride_qd,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            r = tl.load(r_cols + ks[:, None] * stride_rd,  # [BLOCK_K, BLOCK_N]
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            s = tl.dot(x, r, s, input_precision=DOT_PRECISION, out_dtype=acc_t)
        return s

    @triton.jit
    def _pair_masks(rows, row_ok, ql, qid, cols, col_ok, RL, RID, SAME: tl.constexpr):
        """(pos, neg) [BLOCK_M, BLOCK_N] of a tile (``reference_contrastive.pair_masks``):
        positive = same label, negative = different label, both never a
        same-sample pair (SAME_IDS: qid != ref id; SAME_SELF: i != j) nor out of range."""
        rl = tl.load(RL + cols, mask=col_ok, other=0)
        same_label = ql[:, None] == rl[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        if SAME == 1:
            rid = tl.load(RID + cols, mask=col_ok, other=0)
            ok = ok & (qid[:, None] != rid[None, :])
        elif SAME == 2:
            ok = ok & (rows[:, None] != cols[None, :])
        return same_label & ok, (~same_label) & ok

    @triton.jit
    def _ms_select(s, pos, neg, min_pos, max_neg, eps):
        """The MS miner's pairs (``reference_contrastive.ms_miner_masks``, strict):
        positives with s - eps < max_neg_i, negatives with s + eps > min_pos_i."""
        return (pos & (s - eps < max_neg[:, None]),
                neg & (s + eps > min_pos[:, None]))

    @triton.jit
    def _load_anchor(QL, QID, rows, row_ok, SAME: tl.constexpr):
        """Labels and (SAME_IDS) ids of the anchor rows; the labels stand in for
        the ids when these are not read."""
        ql = tl.load(QL + rows, mask=row_ok, other=0)
        if SAME == 1:
            qid = tl.load(QID + rows, mask=row_ok, other=0)
        else:
            qid = ql
        return ql, qid

    @triton.jit
    def _contrastive_fwd_kernel(
        Q, R,                   # [N, D], [M, D] normalised rows (fp32 / fp64, unit stride on D)
        QL, RL, QID, RID,       # [N], [M] int64 labels; ids (read only if SAME == SAME_IDS)
        PARAMS,                 # [4] acc dtype: tau | alpha, -, -  | beta, base, eps (below)
        AUX,                    # [2, N] acc: PAIR_PASS: N_i in row 0; MS + MINER: min_P, max_Q
        STATS,                  # [SPLITS, 4, N] acc: the pass's partial statistics
        COUNTS,                 # [SPLITS, 2, N] int64: P_i, Q_i partials (MAIN_PASS)
        N, M, D, SPLITS,
        stride_qn, stride_qd, stride_rm, stride_rd,
        LOSS: tl.constexpr, PASS: tl.constexpr, MINER: tl.constexpr, SAME: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """PARAMS: SupCon / NT-Xent [tau, 0, 0, 0]; MS [alpha, beta, base, eps].
        Statistics rows per pass: see the module docstring (unused rows: never read)."""
        acc_t = STATS.dtype.element_ty
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        q_rows = Q + rows64[:, None] * stride_qn
        split_len = tl.cdiv(tl.cdiv(M, SPLITS), BLOCK_N) * BLOCK_N
        j_begin = pid_s * split_len
        j_end = tl.minimum(j_begin + split_len, M)
        ql, qid = _load_anchor(QL, QID, rows, row_ok, SAME)
        p0 = tl.load(PARAMS + 0)
        p1 = tl.load(PARAMS + 1)
        p2 = tl.load(PARAMS + 2)
        p3 = tl.load(PARAMS + 3)

        zero = tl.zeros([BLOCK_M], dtype=acc_t)
        pinf = tl.full([BLOCK_M], float("inf"), dtype=acc_t)
        ninf = tl.full([BLOCK_M], float("-inf"), dtype=acc_t)
        if PASS == 0:  # the MS miner's bounds: min over P, max over Q
            st0 = pinf
            st1 = ninf
        else:  # empty online LSEs (-inf, 0) and zero sums; MS's "+1" is added at the merge
            st0 = ninf
            st1 = zero
        st2 = zero
        st3 = zero
        if LOSS == 2:
            st2 = ninf
        if PASS == 2:  # NT-Xent's pair sums; row 0 of AUX holds N_i
            st0 = zero
            aux0 = tl.load(AUX + rows64, mask=row_ok, other=0.0)
        if MINER:
            if PASS == 1:
                min_pos = tl.load(AUX + rows64, mask=row_ok, other=float("inf"))
                max_neg = tl.load(AUX + (rows64 + N), mask=row_ok, other=float("-inf"))
        n_pos = tl.zeros([BLOCK_M], dtype=tl.int32)
        n_neg = tl.zeros([BLOCK_M], dtype=tl.int32)

        for j0 in range(j_begin, j_end, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < j_end
            s = _similarity_tile(q_rows, row_ok, R, cols, col_ok, D, stride_qd, stride_rm,
                                 stride_rd, acc_t, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            pos, neg = _pair_masks(rows, row_ok, ql, qid, cols, col_ok, RL, RID, SAME)
            if PASS == 0:  # _MultiSimilaritySpec.stats, pass 0
                st0 = tl.minimum(st0, tl.min(tl.where(pos, s, _INF), axis=1))
                st1 = tl.maximum(st1, tl.max(tl.where(neg, s, _NEG_INF), axis=1))
            else:
                if PASS == 1:  # the counts, before the MS miner
                    n_pos += tl.sum(pos.to(tl.int32), axis=1)
                    n_neg += tl.sum(neg.to(tl.int32), axis=1)
                if LOSS == 0:  # _SupConSpec.stats
                    x = _div(s, p0)
                    st0, st1 = _lse_update(st0, st1, x, pos | neg)
                    st2 += tl.sum(tl.where(pos, x, 0.0), axis=1)
                elif LOSS == 1:  # _NTXentSpec.stats
                    x = _div(s, p0)
                    if PASS == 1:
                        st0, st1 = _lse_update(st0, st1, x, neg)
                    else:
                        z = aux0[:, None] - x
                        st0 += tl.sum(tl.where(pos, _softplus(z), 0.0), axis=1)
                        st1 += tl.sum(tl.where(pos, _sigmoid(z), 0.0), axis=1)
                else:  # _MultiSimilaritySpec.stats
                    if MINER:
                        pos, neg = _ms_select(s, pos, neg, min_pos, max_neg, p3)
                    st0, st1 = _lse_update(st0, st1, p0 * (p2 - s), pos)
                    st2, st3 = _lse_update(st2, st3, p1 * (s - p2), neg)

        out = pid_s.to(tl.int64) * 4 * N + rows64  # [SPLITS, 4, N]: row k at out + k N
        tl.store(STATS + out, st0, mask=row_ok)
        out += N
        tl.store(STATS + out, st1, mask=row_ok)
        out += N
        tl.store(STATS + out, st2, mask=row_ok)
        out += N
        tl.store(STATS + out, st3, mask=row_ok)
        if PASS == 1:
            out = pid_s.to(tl.int64) * 2 * N + rows64  # [SPLITS, 2, N]
            tl.store(COUNTS + out, n_pos.to(tl.int64), mask=row_ok)
            tl.store(COUNTS + (out + N), n_neg.to(tl.int64), mask=row_ok)

    @triton.jit
    def _tile_grad(s, pos, neg, st0, st1, st2, st3, gamma, p0, p1, p2, p3,
                   LOSS: tl.constexpr, MINER: tl.constexpr):
        """g = gamma_i dterm_i/ds_ij on a tile, from the saved per-anchor statistics
        (rows [BLOCK_M]) -- the specs' ``tile_grad`` (fastmine/contrastive.py):

        SupCon (_SupConSpec.tile_grad; st0 = LSE_i, st1 = P_i):
            gamma/tau (e^{s/tau - LSE} [P u Q] - [P] / P_i), 0 when P_i = 0
        NT-Xent (_NTXentSpec.tile_grad; st0 = N_i, st1 = G_i):
            gamma/tau (G_i e^{s/tau - N_i} [Q] - sigmoid(N_i - s/tau) [P])
        MS (_MultiSimilaritySpec.tile_grad; st0 = A_i, st1 = B_i, st2, st3 = the
            miner's min_P, max_Q):
            gamma (e^{beta(s - base) - B_i} [Q'] - e^{alpha(base - s) - A_i} [P'])
            on the (selected) pairs P', Q'."""
        if LOSS == 0:
            x = _div(s, p0)
            soft = tl.where(pos | neg, tl.exp(x - st0[:, None]), 0.0)
            inv_p = 1.0 / tl.maximum(st1, 1.0)
            g = (soft - tl.where(pos, inv_p[:, None], 0.0)) * _div(gamma, p0)[:, None]
            g = tl.where(st1[:, None] > 0, g, 0.0)
        elif LOSS == 1:
            x = _div(s, p0)
            shift = tl.where(st0 == _NEG_INF, 0.0, st0)  # contrastive._finite
            g_neg = tl.where(neg, st1[:, None] * tl.exp(x - shift[:, None]), 0.0)
            g_pos = tl.where(pos, _sigmoid(st0[:, None] - x), 0.0)
            g = _div(gamma, p0)[:, None] * (g_neg - g_pos)
        else:
            if MINER:
                pos, neg = _ms_select(s, pos, neg, st2, st3, p3)
            g_pos = tl.where(pos, tl.exp(p0 * (p2 - s) - st0[:, None]), 0.0)
            g_neg = tl.where(neg, tl.exp(p1 * (s - p2) - st1[:, None]), 0.0)
            g = gamma[:, None] * (g_neg - g_pos)
        return g

    @triton.jit
    def _grad_tile(Q, R, QL, RL, QID, RID, SAVED, GAMMA, rows, row_ok, cols, col_ok,
                   p0, p1, p2, p3, N, D, stride_qn, stride_qd, stride_rm, stride_rd,
                   acc_t: tl.constexpr, LOSS: tl.constexpr, MINER: tl.constexpr,
                   SAME: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Recompute tile (rows, cols): S, the masks, then g [BLOCK_M, BLOCK_N]
        (0 outside the tile's range)."""
        q_rows = Q + rows.to(tl.int64)[:, None] * stride_qn
        s = _similarity_tile(q_rows, row_ok, R, cols, col_ok, D, stride_qd, stride_rm,
                             stride_rd, acc_t, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        ql, qid = _load_anchor(QL, QID, rows, row_ok, SAME)
        pos, neg = _pair_masks(rows, row_ok, ql, qid, cols, col_ok, RL, RID, SAME)
        at = rows.to(tl.int64)  # SAVED [4, N]: row k at at + k N (int64: no overflow)
        st0 = tl.load(SAVED + at, mask=row_ok, other=0.0)
        at += N
        st1 = tl.load(SAVED + at, mask=row_ok, other=0.0)
        at += N
        st2 = tl.load(SAVED + at, mask=row_ok, other=0.0)
        at += N
        st3 = tl.load(SAVED + at, mask=row_ok, other=0.0)
        gamma = tl.load(GAMMA + rows, mask=row_ok, other=0.0)
        return _tile_grad(s, pos, neg, st0, st1, st2, st3, gamma, p0, p1, p2, p3, LOSS, MINER)

    @triton.jit
    def _contrastive_bwd_kernel(
        Q, R,                   # [N, D], [M, D] normalised rows, as in the forward
        QL, RL, QID, RID,       # labels / ids, as in the forward
        PARAMS,                 # [4] acc dtype, as in the forward
        SAVED,                  # [4, N] acc: the per-anchor statistics (the spec's ``saved``)
        GAMMA,                  # [N] acc: dL/dterm_i
        OUT,                    # BY_REFS 0: dL/dQ [N, D]; 1: dL/dR [M, D]; acc, contiguous,
                                # zero-filled or holding a sum to add to
        N, M, D,
        stride_qn, stride_qd, stride_rm, stride_rd,
        LOSS: tl.constexpr, MINER: tl.constexpr, SAME: tl.constexpr, BY_REFS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Program (b, c) owns output columns [c BLOCK_D, (c + 1) BLOCK_D) of a row block:
        BY_REFS = 0: BLOCK_M anchors, OUT[rows] += sum over reference tiles of
        G R_tile; BY_REFS = 1: BLOCK_N references, OUT[cols] += sum over anchor
        tiles of G^T Q_tile.  The sum stays in registers ([rows, BLOCK_D], as
        FlashAttention's output accumulator) and is added to OUT once at the end:
        one writer per output element, tiles in order.  With D > BLOCK_D each
        column chunk recomputes the tiles (the launcher keeps BLOCK_D >= D up to MAX_BLOCK_D)."""
        acc_t = OUT.dtype.element_ty
        p0 = tl.load(PARAMS + 0)
        p1 = tl.load(PARAMS + 1)
        p2 = tl.load(PARAMS + 2)
        p3 = tl.load(PARAMS + 3)
        pid = tl.program_id(0)
        ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        if BY_REFS:
            cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_t)
            for i0 in range(0, N, BLOCK_M):
                rows = i0 + tl.arange(0, BLOCK_M)
                row_ok = rows < N
                g = _grad_tile(Q, R, QL, RL, QID, RID, SAVED, GAMMA, rows, row_ok, cols, col_ok,
                               p0, p1, p2, p3, N, D, stride_qn, stride_qd, stride_rm, stride_rd,
                               acc_t, LOSS, MINER, SAME, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                x = tl.load(Q + rows.to(tl.int64)[:, None] * stride_qn + ds[None, :] * stride_qd,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PRECISION, out_dtype=acc_t)
            out_ptr = OUT + cols.to(tl.int64)[:, None] * D + ds[None, :]
            out_ok = col_ok[:, None] & d_ok[None, :]
        else:
            rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_t)
            for j0 in range(0, M, BLOCK_N):
                cols = j0 + tl.arange(0, BLOCK_N)
                col_ok = cols < M
                g = _grad_tile(Q, R, QL, RL, QID, RID, SAVED, GAMMA, rows, row_ok, cols, col_ok,
                               p0, p1, p2, p3, N, D, stride_qn, stride_qd, stride_rm, stride_rd,
                               acc_t, LOSS, MINER, SAME, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                r = tl.load(R + cols.to(tl.int64)[:, None] * stride_rm + ds[None, :] * stride_rd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
                acc = tl.dot(g, r, acc, input_precision=DOT_PRECISION, out_dtype=acc_t)
            out_ptr = OUT + rows.to(tl.int64)[:, None] * D + ds[None, :]
            out_ok = row_ok[:, None] & d_ok[None, :]
        # The previous launch's sum (the references are the batch) or zeros.
        tl.store(out_ptr, tl.load(out_ptr, mask=out_ok, other=0.0) + acc, mask=out_ok)


# ------------------------------------------------------------------- launchers

# Fixed tiles (no autotuning: every launch of one call -- the forward passes and
# both backward sides -- must run the same tiles, see _similarity_tile).
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, MAX_BLOCK_D) per dot path
# (_triton.dot_path); MAX_BLOCK_D: the widest column chunk of the backward's
# register accumulator (wider rows recompute the tiles per chunk).  Static
# survey for sm_90 (tests/tools/triton_static.py's compile_kernel, no GPU):
# every forward pass and both backward sides of every loss compile without
# spills (tf32 64 x 64 needs 8 warps: with 4 the forward spills 400-550 B; the
# FFMA paths spill 32-48 B in the by-reference backward at MAX_BLOCK_D = 128,
# hence 64); tf32 on tensor cores.  Not timed on a GPU yet.
_GPU_CONFIGS = {
    "tf32": (64, 64, 32, 8, 3, 128),
    "fma32": (32, 64, 16, 4, 2, 64),
    "fma64": (32, 32, 16, 4, 2, 64),
}  # no "tc16": the rows arrive in float32 / float64 (streaming_terms)
# The interpreter's tiles (small: it runs every program in Python); tests set others.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "MAX_BLOCK_D": 16}


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes (and MAX_BLOCK_D) and launch options of this dtype's dot path."""
    if INTERPRETED:
        return dict(INTERPRETER_CONFIG)
    bm, bn, bk, warps, stages, max_d = _GPU_CONFIGS[_triton.dot_path(dtype,
                                                                     _triton._dot_precision(dtype))]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, MAX_BLOCK_D=max_d, num_warps=warps,
                num_stages=stages)


def _splits(n: int, m: int, device: torch.device, block_m: int) -> int:
    """Reference-axis splits of the forward (``_triton.num_splits``: fill the SMs)."""
    return _triton.num_splits(n, m, device, block_m)


def _kernel_loss(spec: _Spec, dtype: torch.dtype, device: torch.device) -> Tuple[int, bool, Tensor]:
    """(LOSS code, MINER, PARAMS [4] in the compute dtype) of a spec."""
    if isinstance(spec, _SupConSpec):
        code, miner, params = SUPCON, False, (spec.t, 0.0, 0.0, 0.0)
    elif isinstance(spec, _NTXentSpec):
        code, miner, params = NTXENT, False, (spec.t, 0.0, 0.0, 0.0)
    elif isinstance(spec, _MultiSimilaritySpec):
        miner = spec.eps is not None
        code, params = MULTI_SIMILARITY, (spec.alpha, spec.beta, spec.base,
                                          spec.eps if miner else 0.0)
    else:
        raise TypeError(f"backend 'triton' has no kernel for {type(spec).__name__}")
    return code, miner, _params_tensor(params, dtype, device)


@functools.lru_cache(maxsize=64)
def _params_tensor(params: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The hyper-parameters as a tensor of the compute dtype on the device, made once
    per (values, dtype, device): a loss called every step pays no host-to-device copy.
    The kernels only read it."""
    return torch.tensor(params, dtype=dtype, device=device)


class _Launch:
    """The fixed arguments of one loss call's launches (rows, labels, ids, tiles)."""

    def __init__(self, q: Tensor, r: Tensor, labels: Tensor, ref_labels: Tensor,
                 query_ids: Optional[Tensor], ref_ids: Optional[Tensor], exclude_self: bool,
                 spec: _Spec, splits: Optional[int]):
        self.q, self.r = _triton._embedding_views(q, r)
        self.n, self.d = q.shape
        self.m = r.shape[0]
        if max(self.n, self.m) > _triton._MAX_ROWS:
            raise ValueError(f"backend 'triton' indexes rows in int32: N={self.n} and "
                             f"M={self.m} must be <= {_triton._MAX_ROWS}")
        self.acc = q.dtype
        self.ql = labels.to(torch.int64).contiguous()
        self.rl = ref_labels.to(torch.int64).contiguous()
        if exclude_self:
            self.same, self.qid, self.rid = SAME_SELF, self.ql, self.rl
        elif query_ids is not None:
            self.same = SAME_IDS
            self.qid = query_ids.to(torch.int64).contiguous()
            self.rid = ref_ids.to(torch.int64).contiguous()
        else:
            self.same, self.qid, self.rid = SAME_NONE, self.ql, self.rl
        self.loss, self.miner, self.params = _kernel_loss(spec, self.acc, q.device)
        self.cfg = _config(self.acc)
        self.max_block_d = self.cfg.pop("MAX_BLOCK_D")
        if splits is None:  # (no launch at all without rows)
            splits = _splits(self.n, self.m, q.device, self.cfg["BLOCK_M"]) \
                if self.n and self.m else 1
        self.splits = max(1, min(int(splits), self.m))

    def _common(self):
        q, r = self.q, self.r
        return (q, r, self.ql, self.rl, self.qid, self.rid, self.params)

    def _strides(self):
        return (self.q.stride(0), self.q.stride(1), self.r.stride(0), self.r.stride(1))

    def forward(self, pass_: int, aux: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """One forward launch: (stats [SPLITS, 4, N], counts [SPLITS, 2, N] int64 --
        written by MAIN_PASS only)."""
        dev = self.q.device
        stats = torch.empty((self.splits, N_STATS, self.n), dtype=self.acc, device=dev)
        counts = torch.empty((self.splits, 2, self.n) if pass_ == MAIN_PASS else (1,),
                             dtype=torch.int64, device=dev)
        aux = stats if aux is None else aux.contiguous()  # never read without one
        grid = (triton.cdiv(self.n, self.cfg["BLOCK_M"]), self.splits)
        _contrastive_fwd_kernel[grid](
            *self._common(), aux, stats, counts, self.n, self.m, self.d, self.splits,
            *self._strides(), LOSS=self.loss, PASS=pass_, MINER=self.miner, SAME=self.same,
            DOT_PRECISION=_triton._dot_precision(self.acc), **self.cfg)
        return stats, counts

    def backward(self, saved: Tensor, gamma: Tensor, out: Tensor, by_refs: bool) -> None:
        """Add dL/dQ (by_refs False) or dL/dR (True) into ``out`` (acc, contiguous)."""
        block_d = min(max(16, triton.next_power_of_2(self.d)), self.max_block_d)
        blocks = triton.cdiv(self.m, self.cfg["BLOCK_N"]) if by_refs \
            else triton.cdiv(self.n, self.cfg["BLOCK_M"])
        _contrastive_bwd_kernel[(blocks, triton.cdiv(self.d, block_d))](
            *self._common(), saved, gamma, out, self.n, self.m, self.d, *self._strides(),
            LOSS=self.loss, MINER=self.miner, SAME=self.same, BY_REFS=by_refs,
            DOT_PRECISION=_triton._dot_precision(self.acc), BLOCK_D=block_d, **self.cfg)


def _merge_lse(mx: Tensor, sm: Tensor, add_one: bool = False) -> Tensor:
    """LSE [N] of the union of the splits' online LSEs (mx, sm [SPLITS, N]), in split
    order; ``add_one``: one more term e^0 (PML's "+1", ``contrastive._lse_state``)."""
    top = mx.amax(dim=0)
    if add_one:
        top = top.clamp_min(0.0)
    shift = _finite(top)
    total = (sm * torch.exp(mx - shift)).sum(dim=0)
    if add_one:
        total = total + torch.exp(-shift)
    return _lse_finish(top, total)


def _forward(launch: _Launch, spec: _Spec):
    """(terms [N], n_pos [N], n_neg [N] int64, saved: the spec's per-anchor tensors)."""
    bounds = ()
    aux = None
    if launch.miner:  # pass 0: min over P, max over Q
        stats, _ = launch.forward(BOUNDS_PASS, None)
        bounds = (stats[:, 0].amin(dim=0), stats[:, 1].amax(dim=0))
        aux = torch.stack(bounds)
    stats, counts = launch.forward(MAIN_PASS, aux)
    n_pos, n_neg = counts.sum(dim=0)  # the splits in order
    st = stats.unbind(dim=1)  # 4 x [SPLITS, N]
    if launch.loss == SUPCON:
        terms, saved = spec.finish(_merge_lse(st[0], st[1]), st[2].sum(dim=0), n_pos)
    elif launch.loss == NTXENT:
        neg_lse = _merge_lse(st[0], st[1])  # -inf without negatives
        pairs, _ = launch.forward(PAIR_PASS, neg_lse[None])
        terms, saved = pairs[:, 0].sum(dim=0), (neg_lse, pairs[:, 1].sum(dim=0))
    else:
        terms, saved = spec.finish(_merge_lse(st[0], st[1], add_one=True),
                                   _merge_lse(st[2], st[3], add_one=True), bounds)
    return terms, n_pos, n_neg, saved


# ------------------------------------------------------- the ops and their autograd
# fastmine::contrastive_triton / contrastive_backward_triton: custom ops (opaque to
# torch.compile, with fakes), device-agnostic so that the interpreter runs them on
# CPU tensors.  Arguments as fastmine::contrastive (schema.h), the loss as its op
# arguments (``contrastive.spec_from_op_args``), plus exclude_self (references =
# the batch without ids: i == j excluded by index) and splits (tests only).  r None:
# the references are q, with labels / query_ids as theirs.

def _launch(q, r, labels, ref_labels, query_ids, ref_ids, loss, p0, p1, p2, epsilon,
            exclude_self, splits) -> _Launch:
    spec = spec_from_op_args(loss, p0, p1, p2, epsilon)
    refs = q if r is None else r
    return _Launch(q, refs, labels, labels if r is None else ref_labels, query_ids,
                   query_ids if r is None else ref_ids, exclude_self, spec, splits), spec


@torch.library.custom_op("fastmine::contrastive_triton", mutates_args=())
def _contrastive_triton(q: Tensor, r: Optional[Tensor], labels: Tensor, ref_labels: Tensor,
                        query_ids: Optional[Tensor], ref_ids: Optional[Tensor], loss: int,
                        p0: float, p1: float, p2: float, epsilon: Optional[float],
                        exclude_self: bool, splits: Optional[int]
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(terms [N] in q's dtype, n_pos [N] int64, n_neg [N] int64, saved [N_STATS, N]
    in q's dtype: the per-anchor statistics the backward reads)."""
    launch, spec = _launch(q, r, labels, ref_labels, query_ids, ref_ids, loss, p0, p1, p2,
                           epsilon, exclude_self, splits)
    saved = q.new_zeros((N_STATS, launch.n))
    if launch.n == 0 or launch.m == 0:  # no pair: every term 0, every count 0
        zeros = torch.zeros(launch.n, dtype=torch.int64, device=q.device)
        return q.new_zeros(launch.n), zeros, zeros.clone(), saved
    terms, n_pos, n_neg, rows = _forward(launch, spec)
    for k, row in enumerate(rows):
        saved[k] = row
    # n_pos, n_neg are rows of one [2, N] sum: an op's outputs may not alias each other
    return terms, n_pos.clone(), n_neg.clone(), saved


@_contrastive_triton.register_fake
def _(q, r, labels, ref_labels, query_ids, ref_ids, loss, p0, p1, p2, epsilon, exclude_self,
      splits):
    n = q.shape[0]
    counts = q.new_empty((n,), dtype=torch.int64)
    return q.new_empty((n,)), counts, torch.empty_like(counts), q.new_empty((N_STATS, n))


@torch.library.custom_op("fastmine::contrastive_backward_triton", mutates_args=())
def _contrastive_backward_triton(grad: Tensor, saved: Tensor, q: Tensor, r: Optional[Tensor],
                                 labels: Tensor, ref_labels: Tensor,
                                 query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
                                 loss: int, p0: float, p1: float, p2: float,
                                 epsilon: Optional[float], exclude_self: bool, ref_grad: bool
                                 ) -> Tuple[Tensor, Tensor]:
    """(dL/dq [N, D], dL/dr [M, D] -- or [0, D] when r is None, both halves then in
    dL/dq, or when not ref_grad) from the upstream gradient of the terms, grad [N]."""
    launch, _ = _launch(q, r, labels, ref_labels, query_ids, ref_ids, loss, p0, p1, p2,
                        epsilon, exclude_self, 1)
    want_r = r is not None and ref_grad
    dq = torch.zeros((launch.n, launch.d), dtype=launch.acc, device=q.device)
    dr = torch.zeros((launch.m if want_r else 0, launch.d), dtype=launch.acc, device=q.device)
    if launch.n and launch.m:
        gamma = grad.to(launch.acc).contiguous()
        saved = saved.contiguous()
        launch.backward(saved, gamma, dq, by_refs=False)
        if r is None:  # the references are the batch: dR lands in dQ too
            launch.backward(saved, gamma, dq, by_refs=True)
        elif want_r:
            launch.backward(saved, gamma, dr, by_refs=True)
    return dq, dr


@_contrastive_backward_triton.register_fake
def _(grad, saved, q, r, labels, ref_labels, query_ids, ref_ids, loss, p0, p1, p2, epsilon,
      exclude_self, ref_grad):
    rows = r.shape[0] if (r is not None and ref_grad) else 0
    return torch.empty_like(q), q.new_empty((rows, q.shape[1]))


_NON_TENSOR_ARGS = ("loss", "p0", "p1", "p2", "epsilon", "exclude_self")


def _setup_context(ctx, inputs, output):
    q, r, labels, ref_labels, query_ids, ref_ids, *rest = inputs
    ctx.args = dict(zip(_NON_TENSOR_ARGS, rest[:len(_NON_TENSOR_ARGS)]))
    ctx.has_r = r is not None
    ctx.save_for_backward(output[3], q, r, labels, ref_labels, query_ids, ref_ids)


def _backward(ctx, grad_terms, _grad_pos, _grad_neg, _grad_saved) -> Tuple[Optional[Tensor], ...]:
    saved, q, r, labels, ref_labels, query_ids, ref_ids = ctx.saved_tensors
    if grad_terms is None:
        grad_terms = torch.zeros_like(saved[0])
    ref_grad = ctx.has_r and ctx.needs_input_grad[1]
    dq, dr = torch.ops.fastmine.contrastive_backward_triton(
        grad_terms, saved, q, r, labels, ref_labels, query_ids, ref_ids, **ctx.args,
        ref_grad=ref_grad)
    return (dq, dr if ref_grad else None) + (None,) * 11


_contrastive_triton.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------- entry point

def streaming_terms(spec: _Spec, q: Tensor, r: Optional[Tensor], labels: Tensor,
                    ref_labels: Tensor, query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
                    exclude_self: bool, *, splits: Optional[int] = None
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """The per-anchor (terms [N] in q's dtype, n_pos [N] int64, n_neg [N] int64) of
    ``spec`` (a ``contrastive._Spec``) on the Triton kernels, differentiable in q and r
    (the op fastmine::contrastive_triton and its backward op).

    q [N, D], r [M, D] or None (the references are q): L2-normalised rows in
    float32 / float64 on CUDA (CPU under TRITON_INTERPRET=1), as
    ``contrastive.prepare`` returns them; labels [N], ref_labels [M] integer;
    query_ids / ref_ids integer or None (no same-sample pair);
    ``exclude_self``: references = the batch without ids, so the pairs i == j
    are excluded by index and the ids are not read.  ``splits``: the forward's
    reference-axis split count (default: ``_triton.num_splits``), for tests."""
    if q.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"backend 'triton' takes float32 / float64 normalised rows, got {q.dtype}")
    terms, n_pos, n_neg, _ = torch.ops.fastmine.contrastive_triton(
        q, r, labels, ref_labels, query_ids, ref_ids, *spec.op_args(), exclude_self, splits)
    return terms, n_pos, n_neg
