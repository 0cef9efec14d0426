"""The Triton backend: fused mining forward and the pair-distance backward.

Reads top to bottom: kernels -> autotuning -> launchers -> backend registration.
Design notes and the static (no-GPU) compile check: docs/triton.md.

Forward (``_mine_fwd_kernel``), in the FlashAttention style.  Program (i, s)
owns a block of BLOCK_M anchors and the s-th slice of the references.  It
streams BLOCK_N references at a time: the dot-product tile X_blk @ R_tile^T is
accumulated with ``tl.dot`` over D in BLOCK_K chunks (any D), turned into the
mining value in registers,

    v = |x|^2 + |r|^2 - 2 x.r   (Euclidean and squared Euclidean; clamped at 0)
    v = 1 - x.r / (|x| |r|)     (cosine; clamped at 0)

masked (same class / different class / same sample / semi-hard window) and
reduced to one (key, index) per anchor and tile.  Selection is "argmin of a
key" (csrc/include/fastmine/strategies.h): key = v for nearest rules, -v for
farthest ones, +inf for inadmissible references.  A running (best key, best
index) per anchor is updated with a strict '<' as tiles arrive in increasing
reference order, and each tile's argmin takes the leftmost minimum, so exact
ties keep the smallest index.  The N x M matrix never exists in memory.

Small N (Flash-Decoding): when there are too few anchor blocks to fill the
GPU, the reference axis is split across SPLITS programs per anchor block; each
writes a partial (key, index) pair and ``_merge_splits_kernel`` combines them
in split order (strict '<' again keeps the smallest index).

Semi-hard negatives need d_ap first: a positives-only launch, then the window
(lo, hi) on v is formed per anchor (exactly as the CPU kernel does, in float64
from the fp32 v_ap), then a negatives-only launch inside the window, with the
same tiles (so it recomputes v bit-identically: the bound lo is strict).

Backward (``_pair_grad_kernel``): per anchor, the exact gradients of the two
selected pair distances (formulas in fastmine/_pairs.py) go densely to the
anchor row and are scattered to the reference rows with atomics; in
deterministic mode the pairs are sorted by reference row and
``_scatter_sorted_kernel`` sums each row's contributions in a fixed order.

Precision: fp32 inputs use tf32 ``tl.dot`` unless
``torch.get_float32_matmul_precision() == "highest"`` (then ieee); fp16/bf16
accumulate in fp32; fp64 stays fp64.  Under the interpreter (CPU tensors,
``TRITON_INTERPRET=1``) bf16 tiles are upcast to fp32 before ``tl.dot``
(the interpreter's bf16 dot is wrong); bf16 products are exact in fp32, so
this is the same arithmetic up to accumulation order.  Offsets are int64, so
N*D and M*D beyond 2**31 are fine; indices themselves are int32
(N, M <= 2**31 - 257).  Square roots and fp32 divisions are correctly rounded.

The exact pair distances that ``mine`` returns are computed here too
(``_pair_distance_kernel``, O(N) memory) by direct difference, as in
fastmine/_pairs.py.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backends
from ._contract import DISTANCES, POS_STRATEGIES, compute_dtype, semihard_window

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # triton is optional: the backend then says why it is missing
    triton = None
    _IMPORT_ERROR: Optional[BaseException] = exc
else:
    _IMPORT_ERROR = None

# triton.jit reads TRITON_INTERPRET when a kernel is *defined*; record it at
# the same moment so that "can this backend take CPU tensors" never disagrees
# with how the kernels were built.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Passes of the forward kernel.
FUSED, POS_ONLY, NEG_WINDOW = 0, 1, 2
# Kernels take the contract's distance codes (DISTANCES: 0 Euclidean, 1 squared,
# 2 cosine); the forward mines Euclidean on its square, like the CPU kernel.
_FWD_DISTANCE = {"euclidean": DISTANCES["squared_euclidean"],
                 "squared_euclidean": DISTANCES["squared_euclidean"], "cosine": DISTANCES["cosine"]}

if triton is not None:

    # ------------------------------------------------------------------ kernels

    @triton.jit
    def _sqrt(x):
        """Correctly rounded square root (tl.sqrt may be approximate for fp32)."""
        if x.dtype == tl.float64:
            return tl.sqrt(x)
        else:
            return tl.sqrt_rn(x)

    @triton.jit
    def _div(x, y):
        """Correctly rounded x / y (fp32 '/' compiles to an approximate division)."""
        if y.dtype == tl.float64:
            return x / y
        else:
            return tl.div_rn(x, y)

    @triton.jit
    def _row_chunk(row_ptrs, ks, stride_d, row_mask, D, acc_t: tl.constexpr):
        """Columns ks of the rows at row_ptrs [R, 1] as an [R, BLOCK] tile in
        acc_t; 0 outside row_mask and beyond D."""
        tile = tl.load(row_ptrs + ks[None, :] * stride_d,
                       mask=row_mask[:, None] & (ks < D)[None, :], other=0.0)
        return tile.to(acc_t)

    @triton.jit
    def _row_sumsq_kernel(X, OUT, N, D, stride_n, stride_d,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """OUT[i] = sum_k X[i, k]^2 in OUT's dtype (fp32, or fp64 for fp64 inputs).

        Exact for integer-valued inputs, like the dot products of the mining
        tile, so exact ties stay ties.
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        acc_t = OUT.dtype.element_ty
        x_rows = X + rows.to(tl.int64)[:, None] * stride_n
        acc = tl.zeros([BLOCK_R], dtype=acc_t)
        for k0 in range(0, D, BLOCK_K):
            x = _row_chunk(x_rows, k0 + tl.arange(0, BLOCK_K), stride_d, row_ok, D, acc_t)
            acc += tl.sum(x * x, axis=1)
        tl.store(OUT + rows, acc, mask=row_ok)

    @triton.jit
    def _mining_tile(x_rows, row_ok, a, ql, qid, R, RT, RL, RID, cols, col_ok, D,
                     stride_xd, stride_rm, stride_rd, DISTANCE: tl.constexpr,
                     HAS_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of the mining pass (shared with the top-k
        kernels of fastmine/_triton_topk.py).

        x_rows [BLOCK_M, 1]: pointers to the anchor rows (int64 offsets);
        row_ok [BLOCK_M], a [BLOCK_M] (row terms, acc dtype), ql / qid
        [BLOCK_M] (labels / ids, int64; qid read only if HAS_IDS); cols
        [BLOCK_N] reference indices, col_ok their mask.  Returns (v, same, ok),
        each [BLOCK_M, BLOCK_N]: the mining value (acc dtype, clamped at 0),
        "same label", and "a pair that may be selected" (in range, and not a
        same-sample pair).
        """
        acc_t = a.dtype
        r_cols = R + cols.to(tl.int64)[None, :] * stride_rm

        # dot = X_blk @ R_tile^T, streamed over D.
        dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
        for k0 in range(0, D, BLOCK_K):
            # Column offsets stay int32: the launcher guarantees unit stride
            # along D, and the int64 row offsets are already in the pointers.
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            x = tl.load(x_rows + ks[None, :] * stride_xd,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            r = tl.load(r_cols + ks[:, None] * stride_rd,   # [BLOCK_K, BLOCK_N]
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                r = r.to(tl.float32)
            dot = tl.dot(x, r, dot, input_precision=DOT_PRECISION, out_dtype=acc_t)

        # Mining value in registers.
        b = tl.load(RT + cols, mask=col_ok, other=0.0)
        if DISTANCE == 2:  # cosine
            v = 1.0 - dot * a[:, None] * b[None, :]
        else:
            v = (a[:, None] + b[None, :]) - 2.0 * dot
        v = tl.maximum(v, 0.0)

        rl = tl.load(RL + cols, mask=col_ok, other=0)
        same = ql[:, None] == rl[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        if HAS_IDS:
            rid = tl.load(RID + cols, mask=col_ok, other=0)
            ok = ok & (qid[:, None] != rid[None, :])  # same-sample pairs never selected
        return v, same, ok

    @triton.jit
    def _anchor_block(X, XT, QL, QID, LO, HI, N, M, SPLITS, stride_xn, PASS: tl.constexpr,
                      HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The anchor block and the reference slice of program (pid_m, pid_s) =
        (tl.program_id(0), tl.program_id(1)) of a mining pass (shared with the top-k kernel of fastmine/_triton_topk.py).

        Anchors rows = pid_m BLOCK_M + [0, BLOCK_M); references [j_begin,
        j_end), split pid_s of SPLITS, a whole number of BLOCK_N tiles, so that
        split boundaries never cut a tile and every tile starts at a multiple
        of BLOCK_N.  Returns (rows [BLOCK_M] int32, row_ok, x_rows [BLOCK_M, 1]
        pointers to the anchor rows (int64 offsets), j_begin, j_end, and per
        row: a (row terms, acc dtype), ql (labels), qid (ids; ql, never read,
        unless HAS_IDS), lo, hi (the semi-hard window when PASS == NEG_WINDOW:
        no positive -> lo = +inf -> nothing admissible; otherwise a, never
        read)).
        """
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        x_rows = X + rows.to(tl.int64)[:, None] * stride_xn  # int64 row offsets
        split_len = tl.cdiv(tl.cdiv(M, SPLITS), BLOCK_N) * BLOCK_N
        j_begin = tl.program_id(1) * split_len
        j_end = tl.minimum(j_begin + split_len, M)
        a = tl.load(XT + rows, mask=row_ok, other=0.0)
        ql = tl.load(QL + rows, mask=row_ok, other=0)
        if HAS_IDS:
            qid = tl.load(QID + rows, mask=row_ok, other=0)
        else:
            qid = ql
        if PASS == 2:
            lo = tl.load(LO + rows, mask=row_ok, other=float("inf"))
            hi = tl.load(HI + rows, mask=row_ok, other=float("inf"))
        else:
            lo = a
            hi = a
        return rows, row_ok, x_rows, j_begin, j_end, a, ql, qid, lo, hi

    @triton.jit
    def _mine_fwd_kernel(
        X, R,                   # [N, D] anchors, [M, D] references (same dtype, any row stride)
        XT, RT,                 # [N], [M] row terms: |.|^2 (Gram) or 1/|.| (cosine), acc dtype
        QL, RL,                 # [N], [M] int64 labels
        QID, RID,               # [N], [M] int64 sample ids (read only if HAS_IDS)
        LO, HI,                 # [N] semi-hard window on v (read only if PASS == NEG_WINDOW)
        POS_KEY, POS_IDX,       # [SPLITS, N] best positive key (acc dtype) / index (int64)
        NEG_KEY, NEG_IDX,       # [SPLITS, N] best negative key / index
        N, M, D, SPLITS,
        stride_xn, stride_xd, stride_rm, stride_rd,
        PASS: tl.constexpr, DISTANCE: tl.constexpr, HAS_IDS: tl.constexpr,
        POS_NEAREST: tl.constexpr, NEG_NEAREST: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        acc_t = XT.dtype.element_ty
        # This program's anchors and its slice [j_begin, j_end) of the references.
        rows, row_ok, x_rows, j_begin, j_end, a, ql, qid, lo, hi = _anchor_block(
            X, XT, QL, QID, LO, HI, N, M, SPLITS, stride_xn, PASS, HAS_IDS, BLOCK_M, BLOCK_N)

        inf = float("inf")
        best_p = tl.full([BLOCK_M], inf, dtype=acc_t)
        best_n = tl.full([BLOCK_M], inf, dtype=acc_t)
        idx_p = tl.full([BLOCK_M], -1, dtype=tl.int64)
        idx_n = tl.full([BLOCK_M], -1, dtype=tl.int64)

        for j0 in range(j_begin, j_end, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < j_end
            v, same, ok = _mining_tile(x_rows, row_ok, a, ql, qid, R, RT, RL, RID, cols, col_ok, D,
                                       stride_xd, stride_rm, stride_rd, DISTANCE, HAS_IDS,
                                       DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)

            if PASS != 2:  # positives
                if POS_NEAREST:
                    kp = tl.where(same & ok, v, inf)
                else:
                    kp = tl.where(same & ok, -v, inf)
                tile_best, tile_arg = tl.min(kp, axis=1, return_indices=True,
                                             return_indices_tie_break_left=True)
                better = tile_best < best_p
                best_p = tl.where(better, tile_best, best_p)
                idx_p = tl.where(better, (j0 + tile_arg).to(tl.int64), idx_p)
            if PASS != 1:  # negatives
                admissible = (~same) & ok
                if PASS == 2:
                    admissible = admissible & (v > lo[:, None]) & (v < hi[:, None])
                if NEG_NEAREST:
                    kn = tl.where(admissible, v, inf)
                else:
                    kn = tl.where(admissible, -v, inf)
                tile_best, tile_arg = tl.min(kn, axis=1, return_indices=True,
                                             return_indices_tie_break_left=True)
                better = tile_best < best_n
                best_n = tl.where(better, tile_best, best_n)
                idx_n = tl.where(better, (j0 + tile_arg).to(tl.int64), idx_n)

        out = tl.program_id(1).to(tl.int64) * N + rows
        if PASS != 2:
            tl.store(POS_KEY + out, best_p, mask=row_ok)
            tl.store(POS_IDX + out, idx_p, mask=row_ok)
        if PASS != 1:
            tl.store(NEG_KEY + out, best_n, mask=row_ok)
            tl.store(NEG_IDX + out, idx_n, mask=row_ok)

    @triton.jit
    def _merge_splits_kernel(KEY, IDX, OUT_KEY, OUT_IDX, N, SPLITS, BLOCK: tl.constexpr):
        """Combine [SPLITS, N] partial (key, index) pairs into [N].

        Split s covers references before split s + 1's, and each partial index
        is the smallest among its ties, so a strict '<' in split order keeps
        the smallest index overall.
        """
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        best = tl.load(KEY + rows, mask=ok, other=float("inf"))
        idx = tl.load(IDX + rows, mask=ok, other=-1)
        for _ in range(1, SPLITS):
            KEY += N  # next split's row (pointer arithmetic is 64-bit)
            IDX += N
            k = tl.load(KEY + rows, mask=ok, other=float("inf"))
            i = tl.load(IDX + rows, mask=ok, other=-1)
            better = k < best
            best = tl.where(better, k, best)
            idx = tl.where(better, i, idx)
        tl.store(OUT_KEY + rows, best, mask=ok)
        tl.store(OUT_IDX + rows, idx, mask=ok)

    @triton.jit
    def _pair_distance_kernel(
        X, R, IDX, OUT,          # [N, D], [M, D], [N] int64 (-1 = none), [N] acc dtype
        N, D, stride_xn, stride_xd, stride_rm, stride_rd,
        DISTANCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """OUT[i] = d(x[i], r[IDX[i]]) by direct difference (0 where IDX[i] = -1):
        |u|, |u|^2 with u = a - b, or cosine as 1/2 |a^ - b^|^2 (exact for unit
        vectors, no cancellation near 0).  The contract's exact pair distance,
        O(N) memory instead of gathering an [N, D] copy of the rows."""
        acc_t = OUT.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        idx = tl.load(IDX + rows, mask=row_ok, other=-1)
        valid = idx >= 0
        x_rows = X + rows.to(tl.int64)[:, None] * stride_xn
        b_rows = R + tl.maximum(idx, 0)[:, None] * stride_rm
        ia = tl.full([BLOCK_R], 1.0, dtype=acc_t)
        ib = tl.full([BLOCK_R], 1.0, dtype=acc_t)
        if DISTANCE == 2:  # norms first
            s_aa = tl.zeros([BLOCK_R], dtype=acc_t)
            s_bb = tl.zeros([BLOCK_R], dtype=acc_t)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                a = _row_chunk(x_rows, ks, stride_xd, row_ok, D, acc_t)
                b = _row_chunk(b_rows, ks, stride_rd, valid, D, acc_t)
                s_aa += tl.sum(a * a, axis=1)
                s_bb += tl.sum(b * b, axis=1)
            ia = _div(1.0, _sqrt(tl.where(valid, s_aa, 1.0)))
            ib = _div(1.0, _sqrt(tl.where(valid, s_bb, 1.0)))
        s_ww = tl.zeros([BLOCK_R], dtype=acc_t)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = _row_chunk(x_rows, ks, stride_xd, valid, D, acc_t)
            b = _row_chunk(b_rows, ks, stride_rd, valid, D, acc_t)
            w = a * ia[:, None] - b * ib[:, None]
            s_ww += tl.sum(w * w, axis=1)
        if DISTANCE == 0:
            dist = _sqrt(s_ww)
        elif DISTANCE == 1:
            dist = s_ww
        else:
            dist = 0.5 * s_ww
        tl.store(OUT + rows, tl.where(valid, dist, 0.0), mask=row_ok)

    @triton.jit
    def _pair_coefficients(g, valid, ia, ib, s_uu, s_aw, s_bw, DISTANCE: tl.constexpr):
        """Per pair (a, b) with upstream gradient g, the coefficients of

            dd/da * g = d1 * w + d2 * a        dd/db * g = c1 * w + c2 * b
            w = a * ia - b * ib

        exactly as in fastmine/_pairs.py:
        Euclidean (DISTANCE 0): ia = ib = 1, w = u = a - b, d1 = g/|u| (0 at u = 0), c1 = -d1.
        Squared Euclidean (1):  ia = ib = 1, d1 = 2g, c1 = -d1.
        Cosine (2): ia = 1/|a|, ib = 1/|b|, w = a^ - b^, s_aw = a^.w, s_bw = b^.w
            (summed directly: accurate relative to |w| even for near pairs),
            d1 = g ia, d2 = -g ia^2 s_aw, c1 = -g ib, c2 = g ib^2 s_bw.
        Invalid pairs (index -1) get all-zero coefficients.
        """
        g = tl.where(valid, g, 0.0)
        zero = tl.zeros_like(g)
        if DISTANCE == 2:
            d1 = g * ia
            d2 = -g * ia * ia * s_aw
            c1 = -g * ib
            c2 = g * ib * ib * s_bw
        else:
            if DISTANCE == 0:
                d1 = tl.where(s_uu > 0, _div(g, _sqrt(tl.where(s_uu > 0, s_uu, 1.0))), 0.0)
            else:
                d1 = 2.0 * g
            d2 = zero
            c1 = -d1
            c2 = zero
        return d1, d2, c1, c2

    @triton.jit
    def _pair_grad_kernel(
        X, R,                    # [N, D], [M, D] (input dtype, any row stride)
        POS_IDX, NEG_IDX,        # [N] int64, -1 = no pair
        G_POS, G_NEG,            # [N] upstream gradients (acc dtype)
        GRAD_X, GRAD_R,          # [N, D], [M, D] contiguous, acc dtype; GRAD_R zero-filled
        COEF,                    # [2, N, 4] (ib, c1, c2, ia) per pair, written if not ATOMIC
        N, D, stride_xn, stride_xd, stride_rm, stride_rd,
        DISTANCE: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """grad_x[i] = sum over the two pairs of dd/da * g (dense, one writer per row);
        grad_r[j] += dd/db * g via atomics (ATOMIC) or, else, the per-pair
        coefficients are stored for the deterministic _scatter_sorted_kernel.
        Euclidean reads the rows twice, cosine three times, squared Euclidean once."""
        acc_t = GRAD_X.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        ip = tl.load(POS_IDX + rows, mask=row_ok, other=-1)
        ineg = tl.load(NEG_IDX + rows, mask=row_ok, other=-1)
        vp = ip >= 0
        vn = ineg >= 0
        gp = tl.load(G_POS + rows, mask=row_ok, other=0.0).to(acc_t)
        gn = tl.load(G_NEG + rows, mask=row_ok, other=0.0).to(acc_t)
        x_rows = X + rows.to(tl.int64)[:, None] * stride_xn
        p_rows = R + tl.maximum(ip, 0)[:, None] * stride_rm
        n_rows = R + tl.maximum(ineg, 0)[:, None] * stride_rm

        # Pass 1: |u|^2 by direct difference (Euclidean; no cancellation), or
        # the squared norms (cosine).  Squared Euclidean needs no reduction.
        s_aa = tl.zeros([BLOCK_R], dtype=acc_t)
        s_pp = tl.zeros([BLOCK_R], dtype=acc_t)
        s_nn = tl.zeros([BLOCK_R], dtype=acc_t)
        if DISTANCE != 1:
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                a = _row_chunk(x_rows, ks, stride_xd, row_ok, D, acc_t)
                bp = _row_chunk(p_rows, ks, stride_rd, vp, D, acc_t)
                bn = _row_chunk(n_rows, ks, stride_rd, vn, D, acc_t)
                if DISTANCE == 2:
                    s_aa += tl.sum(a * a, axis=1)
                    bp_sq = bp * bp
                    bn_sq = bn * bn
                else:
                    bp_sq = (a - bp) * (a - bp)
                    bn_sq = (a - bn) * (a - bn)
                s_pp += tl.sum(bp_sq, axis=1)
                s_nn += tl.sum(bn_sq, axis=1)
        one = tl.full([BLOCK_R], 1.0, dtype=acc_t)
        ia, ibp, ibn = one, one, one
        s_awp = tl.zeros([BLOCK_R], dtype=acc_t)
        s_bwp = tl.zeros([BLOCK_R], dtype=acc_t)
        s_awn = tl.zeros([BLOCK_R], dtype=acc_t)
        s_bwn = tl.zeros([BLOCK_R], dtype=acc_t)
        if DISTANCE == 2:
            # Pass 1b (cosine): a^.w and b^.w with w = a^ - b^, as _pairs.py sums them.
            ia = _div(1.0, _sqrt(tl.where(row_ok, s_aa, 1.0)))
            ibp = tl.where(vp, _div(1.0, _sqrt(tl.where(vp, s_pp, 1.0))), 0.0)
            ibn = tl.where(vn, _div(1.0, _sqrt(tl.where(vn, s_nn, 1.0))), 0.0)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                ah = _row_chunk(x_rows, ks, stride_xd, row_ok, D, acc_t) * ia[:, None]
                bph = _row_chunk(p_rows, ks, stride_rd, vp, D, acc_t) * ibp[:, None]
                bnh = _row_chunk(n_rows, ks, stride_rd, vn, D, acc_t) * ibn[:, None]
                s_awp += tl.sum(ah * (ah - bph), axis=1)
                s_bwp += tl.sum(bph * (ah - bph), axis=1)
                s_awn += tl.sum(ah * (ah - bnh), axis=1)
                s_bwn += tl.sum(bnh * (ah - bnh), axis=1)
        d1p, d2p, c1p, c2p = _pair_coefficients(gp, vp, ia, ibp, s_pp, s_awp, s_bwp, DISTANCE)
        d1n, d2n, c1n, c2n = _pair_coefficients(gn, vn, ia, ibn, s_nn, s_awn, s_bwn, DISTANCE)

        if not ATOMIC:
            for side in tl.static_range(2):
                base = COEF + (side * N + rows.to(tl.int64)) * 4
                if side == 0:
                    tl.store(base + 0, ibp, mask=row_ok)
                    tl.store(base + 1, c1p, mask=row_ok)
                    tl.store(base + 2, c2p, mask=row_ok)
                else:
                    tl.store(base + 0, ibn, mask=row_ok)
                    tl.store(base + 1, c1n, mask=row_ok)
                    tl.store(base + 2, c2n, mask=row_ok)
                tl.store(base + 3, ia, mask=row_ok)

        # Pass 2: write the gradients.
        gx_rows = GRAD_X + rows.to(tl.int64)[:, None] * D
        gp_rows = GRAD_R + tl.maximum(ip, 0)[:, None] * D
        gn_rows = GRAD_R + tl.maximum(ineg, 0)[:, None] * D
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            a = _row_chunk(x_rows, ks, stride_xd, row_ok, D, acc_t)
            bp = _row_chunk(p_rows, ks, stride_rd, vp, D, acc_t)
            bn = _row_chunk(n_rows, ks, stride_rd, vn, D, acc_t)
            wp = a * ia[:, None] - bp * ibp[:, None]
            wn = a * ia[:, None] - bn * ibn[:, None]
            ga = (d1p[:, None] * wp + d2p[:, None] * a) + (d1n[:, None] * wn + d2n[:, None] * a)
            tl.store(gx_rows + ks[None, :], ga, mask=row_ok[:, None] & k_ok[None, :])
            if ATOMIC:
                gbp = c1p[:, None] * wp + c2p[:, None] * bp
                gbn = c1n[:, None] * wn + c2n[:, None] * bn
                tl.atomic_add(gp_rows + ks[None, :], gbp, mask=vp[:, None] & k_ok[None, :],
                              sem="relaxed")
                tl.atomic_add(gn_rows + ks[None, :], gbn, mask=vn[:, None] & k_ok[None, :],
                              sem="relaxed")

    @triton.jit
    def _scatter_sorted_kernel(
        X, R, GRAD_R, COEF,
        ORDER,                   # [P] pair ids (side * N + anchor) sorted by reference row
        OFFSETS,                 # [M + 1] row j's pairs are ORDER[OFFSETS[j]:OFFSETS[j + 1]]
        N, D, stride_xn, stride_xd, stride_rm, stride_rd,
        BLOCK_D: tl.constexpr,
    ):
        """Deterministic grad_r: program (j, d-block) sums row j's pair
        contributions c1 * (a ia - b ib) + c2 * b in sorted (stable) order."""
        acc_t = GRAD_R.dtype.element_ty
        j = tl.program_id(0).to(tl.int64)
        ks = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        k_ok = ks < D
        b = tl.load(R + j * stride_rm + ks * stride_rd, mask=k_ok, other=0.0).to(acc_t)
        start = tl.load(OFFSETS + j)
        end = tl.load(OFFSETS + j + 1)
        acc = tl.zeros([BLOCK_D], dtype=acc_t)
        for t in range(start, end):
            p = tl.load(ORDER + t)
            anchor = p % N
            ib = tl.load(COEF + p * 4 + 0)
            c1 = tl.load(COEF + p * 4 + 1)
            c2 = tl.load(COEF + p * 4 + 2)
            ia = tl.load(COEF + p * 4 + 3)
            a = tl.load(X + anchor * stride_xn + ks * stride_xd, mask=k_ok, other=0.0).to(acc_t)
            acc += c1 * (a * ia - b * ib) + c2 * b
        tl.store(GRAD_R + j * D + ks, acc, mask=k_ok)

    # ------------------------------------------------------------- autotuning

    # Forward tile configs and the dot paths each is meant for:
    #   "tc16"  fp16/bf16 on tensor cores      "tf32"  fp32 at "high"/"medium" precision
    #   "fma32" fp32 at "highest" (ieee FFMA)   "fma64" fp64
    # Chosen from a static survey (tests/tools/triton_static.py: sm_90 registers,
    # spills and shared memory without a GPU): every config listed for a path
    # compiles for sm_90 without spills and within the shared-memory limit.
    # Timing among them is left to the autotuner.
    _FWD_CONFIG_PATHS = {
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): paths
        (128, 128, 32, 8, 3): ("tc16", "tf32"),
        (128, 128, 32, 8, 4): ("tc16", "tf32"),
        (128, 64, 32, 8, 4): ("tc16", "tf32"),
        (64, 128, 32, 8, 4): ("tc16", "tf32"),
        (128, 64, 64, 8, 3): ("tc16",),
        (64, 128, 64, 8, 3): ("tc16",),
        (64, 64, 32, 4, 3): ("tc16", "tf32"),
        (64, 64, 16, 4, 3): ("tc16", "tf32"),
        (64, 32, 32, 4, 3): ("fma64",),
        (32, 64, 32, 4, 3): ("fma32", "fma64"),
        (32, 64, 16, 4, 2): ("tc16", "tf32", "fma32", "fma64"),
    }

    def _config_key(c) -> tuple:
        k = c.kwargs
        return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_warps, c.num_stages)

    def _fwd_configs(table=None):
        """triton.Config of every (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) key of
        ``table`` (default _FWD_CONFIG_PATHS)."""
        table = _FWD_CONFIG_PATHS if table is None else table
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                for (bm, bn, bk, w, st) in table]

    def dot_path(dtype: torch.dtype, dot_precision: str) -> str:
        """Which of the _FWD_CONFIG_PATHS paths a launch takes."""
        if dtype == torch.float64:
            return "fma64"
        if dtype == torch.float32:
            return "tf32" if dot_precision == "tf32" else "fma32"
        return "tc16"

    def prune_fwd_configs(configs, named_args, table=None, **kwargs):
        """Keep the configs meant for this launch's dot path (see
        _FWD_CONFIG_PATHS, or ``table`` of the same form) whose BLOCK_K does
        not exceed D rounded up to a power of two (>= 16: tl.dot's minimum);
        on tensor cores BLOCK_K = 16 only when D <= 16.  Never empty; a first
        call times at most 7 configs."""
        table = _FWD_CONFIG_PATHS if table is None else table
        path = dot_path(named_args["X"].dtype, kwargs.get("DOT_PRECISION", "ieee"))
        k_cap = max(16, triton.next_power_of_2(named_args["D"]))
        k_min = 32 if path in ("tc16", "tf32") and k_cap >= 32 else 16
        mine = [c for c in configs if path in table[_config_key(c)]]
        return [c for c in mine if k_min <= c.kwargs["BLOCK_K"] <= k_cap] or mine[-1:]

    _mine_fwd_tuned = triton.autotune(
        configs=_fwd_configs(),
        # Not keyed on PASS: the two semi-hard launches must use the same tiles,
        # so that the negatives pass recomputes bit-identical v (the window's
        # lo = v_ap is strict; a duplicate of the positive must stay outside).
        key=["D", "DISTANCE", "HAS_IDS", "DOT_PRECISION"],  # + the tensors' dtypes
        prune_configs_by={"early_config_prune": prune_fwd_configs},
    )(_mine_fwd_kernel)


# ------------------------------------------------------------------- launchers

# Fixed tile sizes for the interpreter (small: it runs every program in Python)
# and the default anchor block of the split heuristic.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}
_NOMINAL_BLOCK_M = 128
# Row and column indices are int32 inside the kernels; a tile may run up to
# 256 rows past the end, which must not wrap.
_MAX_ROWS = 2 ** 31 - 1 - 256
_MIN_REFS_PER_SPLIT = 512


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a nominal count, so small batches exercise splitting


def num_splits(n: int, m: int, device: torch.device, block_m: int = _NOMINAL_BLOCK_M) -> int:
    """How many programs share one anchor block's references (Flash-Decoding).

    With B = ceil(N / block_m) anchor blocks (block_m: the dot path's largest
    BLOCK_M, which the autotuner usually picks for large N), the grid has
    B * S programs; pick the
    smallest S whose programs fill the SMs' waves to >= 90% (one program per
    SM per wave: the large tiles use the whole register file), so a batch of
    B = 64 blocks on 132 SMs runs as 128 programs in one wave instead of 64.
    Slices never hold fewer than _MIN_REFS_PER_SPLIT references.
    """
    sms = _sm_count(device)
    row_blocks = triton.cdiv(n, block_m)
    cap = max(1, min(m // _MIN_REFS_PER_SPLIT, 256))

    def wave_efficiency(s: int) -> float:
        programs = row_blocks * s
        return programs / (triton.cdiv(programs, sms) * sms)

    best = max(range(1, cap + 1), key=lambda s: (wave_efficiency(s), -s))
    return next((s for s in range(1, cap + 1) if wave_efficiency(s) >= 0.9), best)


def _embedding_views(x: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """x and r detached, with unit stride along D (any row stride is kept: no
    copy for row views); r stays the same object as x when the references are
    the batch."""
    def view(t):
        t = t.detach()
        return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()
    xv = view(x)
    return xv, (xv if r is x else view(r))


def bwd_block_k(dtype: torch.dtype, d: int) -> int:
    """D-chunk of the per-pair kernels (pair distance, backward): 64, or 32 for
    small D and for float64 (whose 64-wide cosine backward spills on sm_90)."""
    return 32 if d <= 32 or dtype == torch.float64 else 64


def row_sumsq(x: Tensor) -> Tensor:
    """[N] sum of squares of each row of x [N, D], in float32 (float64 for float64)."""
    out = torch.empty(x.shape[0], dtype=compute_dtype(x.dtype), device=x.device)
    if x.shape[0]:
        grid = (triton.cdiv(x.shape[0], 32),)
        _row_sumsq_kernel[grid](x, out, x.shape[0], x.shape[1], x.stride(0), x.stride(1),
                                BLOCK_R=32, BLOCK_K=64 if x.shape[1] > 32 else 32)
    return out


def _row_terms(x: Tensor, distance: str) -> Tensor:
    sumsq = row_sumsq(x)
    return sumsq.sqrt().reciprocal() if distance == "cosine" else sumsq


def pair_distance(x: Tensor, r: Tensor, idx: Tensor, distance: str) -> Tensor:
    """d(x[i], r[idx[i]]) for each i, 0 where idx[i] == -1; [N] in x.dtype.

    Same contract as ``fastmine._pairs.pair_distance`` (direct difference in
    float32, float64 for float64 inputs) with O(N) extra memory.
    """
    n, d = x.shape
    out = torch.zeros(n, dtype=compute_dtype(x.dtype), device=x.device)
    if n and r.shape[0]:
        x, r = _embedding_views(x, r)
        _pair_distance_kernel[(triton.cdiv(n, 16),)](
            x, r, idx.contiguous(), out, n, d, x.stride(0), x.stride(1), r.stride(0), r.stride(1),
            DISTANCE=DISTANCES[distance], BLOCK_R=16, BLOCK_K=bwd_block_k(x.dtype, d))
    return out.to(x.dtype)


def _launch_mine(x, r, a, b, ql, rl, qid, rid, lo, hi, pass_, distance, pos_nearest,
                 neg_nearest, splits, config):
    """One forward launch (plus the split merge); returns ((pos_key, pos_idx), (neg_key, neg_idx)),
    each [N], for the sides this pass computes (None for the other)."""
    n, m, d = x.shape[0], r.shape[0], x.shape[1]
    acc = a.dtype
    dev = x.device
    pos = (torch.empty((splits, n), dtype=acc, device=dev),
           torch.empty((splits, n), dtype=torch.int64, device=dev)) if pass_ != NEG_WINDOW else None
    neg = (torch.empty((splits, n), dtype=acc, device=dev),
           torch.empty((splits, n), dtype=torch.int64, device=dev)) if pass_ != POS_ONLY else None
    dummy_f = a  # never read: the pass / HAS_IDS constexprs guard every use
    dummy_i = ql
    has_ids = qid is not None
    args = (x, r, a, b, ql, rl,
            qid if has_ids else dummy_i, rid if has_ids else dummy_i,
            lo if lo is not None else dummy_f, hi if hi is not None else dummy_f,
            *(pos if pos is not None else (dummy_f, dummy_i)),
            *(neg if neg is not None else (dummy_f, dummy_i)),
            n, m, d, splits, x.stride(0), x.stride(1), r.stride(0), r.stride(1))
    meta = dict(PASS=pass_, DISTANCE=_FWD_DISTANCE[distance], HAS_IDS=has_ids,
                POS_NEAREST=pos_nearest, NEG_NEAREST=neg_nearest,
                DOT_PRECISION=_dot_precision(x.dtype),
                UPCAST=INTERPRETED and x.dtype == torch.bfloat16)
    if config is None and not INTERPRETED:
        grid = lambda META: (triton.cdiv(n, META["BLOCK_M"]), splits)  # noqa: E731
        _mine_fwd_tuned[grid](*args, **meta)
    else:
        cfg = dict(INTERPRETER_CONFIG if config is None else config)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), splits)
        _mine_fwd_kernel[grid](*args, **meta, **cfg)

    def merged(side):
        if side is None:
            return None
        key, idx = side
        if splits == 1:
            return key[0], idx[0]
        out_key = torch.empty(n, dtype=acc, device=dev)
        out_idx = torch.empty(n, dtype=torch.int64, device=dev)
        _merge_splits_kernel[(triton.cdiv(n, 256),)](key, idx, out_key, out_idx, n, splits,
                                                     BLOCK=256)
        return out_key, out_idx

    return merged(pos), merged(neg)


def select(x: Tensor, labels: Tensor, r: Tensor, ref_labels: Tensor,
           query_ids: Optional[Tensor], ref_ids: Optional[Tensor], pos_strategy: str,
           neg_strategy: str, distance: str, margin: Optional[float], *,
           splits: Optional[int] = None, config: Optional[dict] = None) -> Tuple[Tensor, Tensor]:
    """Triton selection: (pos_idx, neg_idx), int64 [N], -1 where none exists.

    x: [N, D], r: [M, D] float16/bfloat16/float32/float64 on CUDA (or CPU under
    the interpreter); labels/ids: integer [N] / [M].  Arguments as for
    ``fastmine.reference.select``.  ``splits`` (reference-axis split count)
    and ``config`` (dict of BLOCK_M/BLOCK_N/BLOCK_K, bypassing the autotuner)
    are for tests and tuning.
    """
    n, m = x.shape[0], r.shape[0]
    if n == 0 or m == 0:
        empty = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        return empty, empty.clone()
    if max(n, m) > _MAX_ROWS:
        raise ValueError(f"backend 'triton' indexes rows in int32: N={n} and M={m} must be "
                         f"<= {_MAX_ROWS}")
    x, r = _embedding_views(x, r)
    a = _row_terms(x, distance)
    b = a if r is x else _row_terms(r, distance)
    ql, rl = labels.to(torch.int64).contiguous(), ref_labels.to(torch.int64).contiguous()
    qid = rid = None
    if query_ids is not None:
        qid, rid = query_ids.to(torch.int64).contiguous(), ref_ids.to(torch.int64).contiguous()
    if splits is None:
        path = dot_path(x.dtype, _dot_precision(x.dtype))
        block_m = max(k[0] for k, paths in _FWD_CONFIG_PATHS.items() if path in paths)
        splits = num_splits(n, m, x.device, block_m)
    splits = max(1, min(int(splits), m))
    pos_nearest = POS_STRATEGIES[pos_strategy] == POS_STRATEGIES["easy"]
    neg_nearest = neg_strategy != "easy"
    common = (x, r, a, b, ql, rl, qid, rid)
    if neg_strategy != "semihard":
        (_, pos_idx), (_, neg_idx) = _launch_mine(*common, None, None, FUSED, distance,
                                                  pos_nearest, neg_nearest, splits, config)
        return pos_idx, neg_idx
    (pos_key, pos_idx), _ = _launch_mine(*common, None, None, POS_ONLY, distance,
                                         pos_nearest, neg_nearest, splits, config)
    v_ap = pos_key if pos_nearest else -pos_key  # key = +-v
    lo, hi = semihard_window(v_ap, pos_idx >= 0, margin, distance)
    _, (_, neg_idx) = _launch_mine(*common, lo, hi, NEG_WINDOW, distance, pos_nearest,
                                   neg_nearest, splits, config)
    return pos_idx, neg_idx


def backward(grad_pos: Tensor, grad_neg: Tensor, x: Tensor, r: Tensor, pos_idx: Tensor,
             neg_idx: Tensor, distance: str) -> Tuple[Tensor, Tensor]:
    """Scatter dL/d(pos_dist), dL/d(neg_dist) [N] into (dL/dx [N, D], dL/dr [M, D]).

    Same contract as ``fastmine._pairs.pair_distance_backward``: anchor rows
    get a dense update; reference rows get atomics, or, with
    ``torch.use_deterministic_algorithms(True)``, a sorted fixed-order sum
    (bit-identical across runs).  Returned in x's / r's dtype.
    """
    n, d = x.shape
    m = r.shape[0]
    acc = compute_dtype(x.dtype)
    dev = x.device
    grad_r = torch.zeros((m, d), dtype=acc, device=dev)
    if n == 0 or m == 0 or d == 0:  # no pairs (m == 0: every index is -1)
        return torch.zeros((n, d), dtype=x.dtype, device=dev), grad_r.to(r.dtype)
    grad_x = torch.empty((n, d), dtype=acc, device=dev)
    x, r = _embedding_views(x, r)
    atomic = not torch.are_deterministic_algorithms_enabled()
    coef = grad_x if atomic else torch.empty((2, n, 4), dtype=acc, device=dev)
    block_k = bwd_block_k(x.dtype, d)
    _pair_grad_kernel[(triton.cdiv(n, 16),)](
        x, r, pos_idx.contiguous(), neg_idx.contiguous(), grad_pos.to(acc).contiguous(),
        grad_neg.to(acc).contiguous(), grad_x, grad_r, coef, n, d,
        x.stride(0), x.stride(1), r.stride(0), r.stride(1),
        DISTANCE=DISTANCES[distance], ATOMIC=atomic, BLOCK_R=16, BLOCK_K=block_k)
    if not atomic:
        # Pairs sorted (stably) by reference row; rows' slices found by searchsorted
        # (both deterministic), then one program per (row, D-block) sums in order.
        rows = torch.cat([pos_idx, neg_idx])
        rows = torch.where(rows >= 0, rows, torch.full_like(rows, m))  # -1 -> after every row
        sorted_rows, order = torch.sort(rows, stable=True)
        offsets = torch.searchsorted(sorted_rows, torch.arange(m + 1, device=dev))
        block_d = min(128, max(16, triton.next_power_of_2(d)))
        _scatter_sorted_kernel[(m, triton.cdiv(d, block_d))](
            x, r, grad_r, coef, order, offsets, n, d,
            x.stride(0), x.stride(1), r.stride(0), r.stride(1), BLOCK_D=block_d)
    return grad_x.to(x.dtype), grad_r.to(r.dtype)


# ------------------------------------------------------------------- registration

def why_unavailable(device: torch.device) -> str:
    """'' when backend="triton" can run on tensors of ``device``, else why not."""
    if triton is None:
        return f"triton is not installed ({_IMPORT_ERROR})"
    if device.type == "cuda":
        return ""
    if device.type == "cpu":
        if INTERPRETED:
            return ""
        return ("backend 'triton' needs CUDA tensors; CPU tensors run only under the Triton "
                "interpreter (set TRITON_INTERPRET=1 before importing fastmine)")
    return f"backend 'triton' needs CUDA tensors, got tensors on {device}"


_backends.register_python("triton", select, backward, why_unavailable, pair_distance=pair_distance)

# Top-k mining and distance-weighted sampling (issue #17): the kernels of
# fastmine/_triton_topk.py, registered as the op fastmine::mine_topk_triton
# (rules "topk" and "distance_weighted").
from . import _triton_topk  # noqa: E402

_triton_topk.register()
