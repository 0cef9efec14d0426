"""The Triton backend's top-k mining and distance-weighted sampling (issue #17).

Reads top to bottom: kernels -> autotuning -> launchers -> registration, like
fastmine/_triton.py (the k = 1 kernels), whose pieces it reuses: the
program's anchors and reference slice (``_anchor_block``), the mining tile
(``_mining_tile``: Gram tile, mining value, label and same-sample masks), the
row terms, the split heuristic, the tile configs and the exact pair
distances.  Design: docs/topk.md ("Triton"); the rules: docs/contract.md and
fastmine/reference_topk.py (the reference every backend equals).

One rule for every strategy: per anchor, the k admissible references with the
smallest *key*, exact ties by the smallest index, where

    pos "easy", neg "hard" / "semihard"    key = v        (the mining value)
    pos "hard", neg "easy"                 key = -v
    neg "distance_weighted"                key = -(log w(v) + g_ij)   (float32)

(+inf: inadmissible; the kernels minimise, so the largest Gumbel key comes
first).  ``_topk_fwd_kernel`` keeps, per anchor of its block, a running list of
K = next_power_of_2(k) (key, index) slots ([BLOCK_M, K] tensors; slots >= k
hold key -inf and are never replaced), *unsorted*, together with its worst
entry (the largest (key, index): the admission threshold).  Per tile of
BLOCK_N references, ``_push`` counts the candidates that beat the threshold
(lexicographically on (key, index)); when none does -- the common case once
the lists hold good keys -- the tile costs that one comparison; otherwise it
runs as many rounds as the busiest row needs (at most K), each extracting the
row's best remaining candidate (smallest key, then smallest index: explicit,
not tl.argmin's tie rule) and, if it beats the worst entry, writing it into
that slot.  At the end the list is sorted by (key, index) (k rounds of the
same extraction); empty slots give index -1.

Split-M (Flash-Decoding, as in _triton.py): each of the SPLITS programs of an
anchor block writes its sorted [N, K] partial list; ``_topk_merge_kernel``
pushes the other splits' lists into the first one by (key, index).

Semi-hard: a positives-only launch gives the first positive's v, the window
(_contract.semihard_window), then a negatives-only launch with the same tiles
(the autotuning key excludes the pass), as in _triton.py.

Distance-weighted (neg side): per tile, lw = log w(v) in float32
(``_dw_log_weight``: csrc/include/fastmine/sampling.h ``dw_log_weight``).
**Prune:** every computed g is <= G_MAX (fastmine._philox), so a reference
with fl(lw + G_MAX) < -worst can neither beat nor tie the worst key; when no
admissible reference of the tile is above that bound, the tile draws no noise
at all (a scalar branch).  Otherwise the whole tile draws it:
``_noise_words`` = ``tl.randint4x(seed, (i << 32) | (j >> 2))`` on a
[BLOCK_M, BLOCK_N / 4] grid, its four words interleaved into columns 4q + w,
i.e. Philox4x32-10 with counter (j >> 2, i, 0, 0) and key (seed mod 2^32,
seed >> 32): the contract's words, bit for bit (tests/test_triton_topk.py).
U = ((x >> 9) + 1/2) 2^-23 and g = -log(-log U), with libdevice's accurate
``log`` / ``log1p`` on the GPU.  The Triton interpreter has no libdevice: there
``tl.log`` (NumPy's float32 log) and log1p(x) = log(u) x / (u - 1), u = fl(1 + x)
(Goldberg's correction, a few ulps) stand in; keys then differ from the GPU's
by float32 ulps, which the contract allows.

Limits: k_pos, k_neg <= K_MAX = 64 (the lists live in registers); indices are
int32 inside the kernels, as in _triton.py.  Outputs are int64 [N, k] with
trailing -1 for short rows; the exact pair distances are _triton.pair_distance
per column, and the gradient is the C++ autograd of fastmine::mine_topk
(fastmine::mine_backward of the triton backend, per pair).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backends, _triton
from ._contract import DISTANCE_WEIGHTED, POS_STRATEGIES, semihard_window
from ._philox import G_MAX
from ._triton import FUSED, INTERPRETED, NEG_WINDOW, POS_ONLY, triton

if triton is not None:
    import triton.language as tl
    from ._triton import _anchor_block, _mining_tile

# The largest k per side: the running lists are [BLOCK_M, K] register tensors.
K_MAX = 64
# Negative rules of the top-k kernel (constexpr NEG_RULE).
NEG_NEAREST, NEG_FARTHEST, NEG_DW = 0, 1, 2

if triton is not None:

    # ------------------------------------------------------------------ kernels

    _INF = tl.constexpr(float("inf"))
    _NEG_INF = tl.constexpr(float("-inf"))
    _IDX_NONE = tl.constexpr(2 ** 31 - 1)  # "no candidate" in index reductions (int32)
    _IDX_LOW = tl.constexpr(-(2 ** 31 - 1))
    _G_MAX = tl.constexpr(G_MAX)

    if INTERPRETED:
        # No libdevice under the interpreter (extern calls are not emulated).
        @triton.jit
        def _log(x):
            """float32 log: NumPy's under the interpreter."""
            return tl.log(x)

        @triton.jit
        def _log1p(x):
            """log1p for x in (-1, 0]: log(u) * x / (u - 1) with u = fl(1 + x)
            (Goldberg), accurate to a few ulps given an accurate log."""
            u = 1.0 + x
            return tl.where(u == 1.0, x, tl.log(u) * tl.div_rn(x, u - 1.0))
    else:
        from triton.language.extra import libdevice

        @triton.jit
        def _log(x):
            """float32 log, libdevice's accurate __nv_logf (not an approximate lg2)."""
            return libdevice.log(x)

        @triton.jit
        def _log1p(x):
            """float32 log1p, libdevice's __nv_log1pf."""
            return libdevice.log1p(x)

    @triton.jit
    def _noise_words(seed, rows, j0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The contract's Philox words x_ij, uint32 [BLOCK_M, BLOCK_N], for the
        anchor rows ``rows`` [BLOCK_M] (int32) and the columns j = j0 + t,
        t < BLOCK_N (j0 and BLOCK_N multiples of 4): word (j & 3) of
        Philox4x32-10((j >> 2, i, 0, 0), (seed mod 2^32, seed >> 32)).

        One tl.randint4x per quad of columns: offset (i << 32) | q is the
        counter (c0, c1) = (q, i); tl.join twice and a row-major reshape put
        word w of quad q at column 4q + w ([..., p, t] holds word 2p + t).
        """
        q = (j0 >> 2) + tl.arange(0, BLOCK_N // 4)
        offset = (rows.to(tl.int64)[:, None] << 32) | q.to(tl.int64)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, offset)
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_M, BLOCK_N])
        return words.to(tl.uint32, bitcast=True)

    @triton.jit
    def _gumbel(words):
        """g = -log(-log U), U = ((x >> 9) + 1/2) 2^-23 (exact in float32, in
        [2^-24, 1 - 2^-24]); float32, within [G_MIN, G_MAX] of fastmine._philox."""
        u = ((words >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
        return -_log(-_log(u))

    @triton.jit
    def _dw_log_weight(v, lo, hi, a, b):
        """sampling.h ``dw_log_weight`` on a tile: vc = max(v, lo) (v's dtype),
        w > 0 iff vc < hi, log w = a log vc + b log1p(-vc / 4) in float32
        (a = (2 - D)/2, b = (3 - D)/2).  Returns (log w, -inf where w = 0;
        positive)."""
        vc = tl.maximum(v, lo)
        positive = vc < hi
        f = tl.where(positive, vc, 1.0).to(tl.float32)  # no log of values beyond hi
        lw = a * _log(f) + b * _log1p(-0.25 * f)
        return tl.where(positive, lw, _NEG_INF), positive

    @triton.jit
    def _worst(lk, li):
        """The worst entry of each row's list: the largest key, then the largest
        index.  lk [R, K] keys, li [R, K] int32 indices -> (key [R], index [R]).
        The (key, index) pairs of a list are distinct (empty slot s holds
        (+inf, -2 - s), see _empty_list), so the pair names one slot."""
        wk = tl.max(lk, axis=1)
        wi = tl.max(tl.where(lk == wk[:, None], li, _IDX_LOW), axis=1)
        return wk, wi

    @triton.jit
    def _push(lk, li, wk, wi, ck, ci, K: tl.constexpr):
        """Merge candidates (ck [R, C] keys, +inf = none; ci [R, C] int32
        indices >= -1, distinct within a row where ck < +inf) into the running
        lists (lk, li) [R, K] with their worst entries (wk, wi) [R]:
        afterwards each row's list holds the k best (key, index) pairs of the
        old list and the candidates, ties by the smallest index.  Returns
        (lk, li, wk, wi).

        Only candidates that beat the worst entry can enter; rounds = the
        largest such count in the block (capped at K: more than k entries are
        never needed), so a tile without one costs one comparison.  Each round
        takes each row's best remaining candidate (extracted in increasing
        (key, index) order, so once one fails the rest fail) and, if it beats
        the current worst entry, writes it into that entry's slot.
        """
        beats = (ck < wk[:, None]) | ((ck == wk[:, None]) & (ci < wi[:, None]))
        ck = tl.where(beats, ck, _INF)
        rounds = tl.minimum(tl.max(tl.sum(beats.to(tl.int32), axis=1), axis=0), K)
        for _ in range(rounds):
            bk = tl.min(ck, axis=1)
            bi = tl.min(tl.where(ck == bk[:, None], ci, _IDX_NONE), axis=1)
            ck = tl.where(ci == bi[:, None], _INF, ck)
            enter = (bk < _INF) & ((bk < wk) | ((bk == wk) & (bi < wi)))
            hit = enter[:, None] & (lk == wk[:, None]) & (li == wi[:, None])
            lk = tl.where(hit, bk[:, None], lk)
            li = tl.where(hit, bi[:, None], li)
            wk, wi = _worst(lk, li)
        return lk, li, wk, wi

    @triton.jit
    def _empty_list(k, key_t: tl.constexpr, BLOCK_M: tl.constexpr, K: tl.constexpr):
        """A running list of k empty slots and K - k unused ones, with its worst
        entry.  Empty slot s holds (+inf, -2 - s): distinct pairs, below every
        candidate index (-1 marks a missing candidate of a partial list); unused
        slots hold (-inf, -1) and are never the worst entry."""
        slots = tl.arange(0, K)[None, :] + tl.zeros([BLOCK_M, K], dtype=tl.int32)
        lk = tl.where(slots < k, _INF, _NEG_INF).to(key_t)
        li = tl.where(slots < k, -2 - slots, -1)
        wk, wi = _worst(lk, li)
        return lk, li, wk, wi

    @triton.jit
    def _store_sorted(KEY, IDX, out_rows, row_ok, lk, li, k, K: tl.constexpr):
        """Store each row's list sorted by (key, index) into KEY/IDX [.., K]
        rows ``out_rows`` (int64): slots >= k and empty slots as (+inf, -1)."""
        slots = tl.arange(0, K)[None, :]
        lk = tl.where(slots < k, lk, _INF)
        out_k = tl.full(lk.shape, float("inf"), dtype=lk.dtype)
        out_i = tl.full(li.shape, -1, dtype=tl.int32)
        for t in range(k):
            bk = tl.min(lk, axis=1)
            bi = tl.min(tl.where(lk == bk[:, None], li, _IDX_NONE), axis=1)
            lk = tl.where((lk == bk[:, None]) & (li == bi[:, None]), _INF, lk)
            at = slots == t
            out_k = tl.where(at, bk[:, None], out_k)
            out_i = tl.where(at & (bk < _INF)[:, None], bi[:, None], out_i)
        offs = out_rows[:, None] * K + slots
        tl.store(KEY + offs, out_k, mask=row_ok[:, None])
        tl.store(IDX + offs, out_i.to(tl.int64), mask=row_ok[:, None])

    @triton.jit
    def _topk_fwd_kernel(
        X, R,                   # [N, D] anchors, [M, D] references (same dtype, any row stride)
        XT, RT,                 # [N], [M] row terms (_triton._row_terms), acc dtype
        QL, RL,                 # [N], [M] int64 labels
        QID, RID,               # [N], [M] int64 sample ids (read only if HAS_IDS)
        LO, HI,                 # [N] semi-hard window on v (read only if PASS == NEG_WINDOW)
        DW,                     # [2] acc dtype: fl(cutoff^2), fl(min(nonzero_loss_cutoff, 2)^2)
        POS_KEY, POS_IDX,       # [SPLITS, N, KP] sorted partial lists: key (acc dtype), int64
        NEG_KEY, NEG_IDX,       # [SPLITS, N, KN]: key (acc dtype; float32 for NEG_DW), int64
        N, M, D, SPLITS, k_pos, k_neg,
        seed, dw_a, dw_b,       # distance-weighted: Philox seed, (2 - D)/2, (3 - D)/2
        stride_xn, stride_xd, stride_rm, stride_rd,
        PASS: tl.constexpr, DISTANCE: tl.constexpr, HAS_IDS: tl.constexpr,
        POS_NEAREST: tl.constexpr, NEG_RULE: tl.constexpr, PRUNE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, KP: tl.constexpr, KN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # This program's anchors and its slice [j_begin, j_end) of the
        # references, a whole number of tiles (so every tile starts at a
        # multiple of BLOCK_N, hence of 4: the Philox quads).
        rows, row_ok, x_rows, j_begin, j_end, a, ql, qid, lo, hi = _anchor_block(
            X, XT, QL, QID, LO, HI, N, M, SPLITS, stride_xn, PASS, HAS_IDS, BLOCK_M, BLOCK_N)
        if NEG_RULE == 2:
            dw_lo = tl.load(DW)
            dw_hi = tl.load(DW + 1)

        lk_p, li_p, wk_p, wi_p = _empty_list(k_pos, POS_KEY.dtype.element_ty, BLOCK_M, KP)
        lk_n, li_n, wk_n, wi_n = _empty_list(k_neg, NEG_KEY.dtype.element_ty, BLOCK_M, KN)

        for j0 in range(j_begin, j_end, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < j_end
            v, same, ok = _mining_tile(x_rows, row_ok, a, ql, qid, R, RT, RL, RID, cols, col_ok, D,
                                       stride_xd, stride_rm, stride_rd, DISTANCE, HAS_IDS,
                                       DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            ci = cols[None, :] + tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)

            if PASS != 2:  # positives
                if POS_NEAREST:
                    kp = tl.where(same & ok, v, _INF)
                else:
                    kp = tl.where(same & ok, -v, _INF)
                lk_p, li_p, wk_p, wi_p = _push(lk_p, li_p, wk_p, wi_p, kp, ci, KP)
            if PASS != 1:  # negatives
                admissible = (~same) & ok
                if PASS == 2:
                    admissible = admissible & (v > lo[:, None]) & (v < hi[:, None])
                if NEG_RULE == 2:  # distance-weighted: key = -(log w + g)
                    lw, positive = _dw_log_weight(v, dw_lo, dw_hi, dw_a, dw_b)
                    admissible = admissible & positive
                    if PRUNE:  # fl(lw + g) <= fl(lw + G_MAX) < -worst: can neither beat nor tie
                        admissible = admissible & (lw + _G_MAX >= -wk_n[:, None])
                    if tl.max(tl.max(admissible.to(tl.int32), axis=1), axis=0) > 0:
                        g = _gumbel(_noise_words(seed, rows, j0, BLOCK_M, BLOCK_N))
                        kn = tl.where(admissible, -(lw + g), _INF)
                        lk_n, li_n, wk_n, wi_n = _push(lk_n, li_n, wk_n, wi_n, kn, ci, KN)
                else:
                    if NEG_RULE == 0:
                        kn = tl.where(admissible, v, _INF)
                    else:
                        kn = tl.where(admissible, -v, _INF)
                    lk_n, li_n, wk_n, wi_n = _push(lk_n, li_n, wk_n, wi_n, kn, ci, KN)

        out_rows = tl.program_id(1).to(tl.int64) * N + rows
        if PASS != 2:
            _store_sorted(POS_KEY, POS_IDX, out_rows, row_ok, lk_p, li_p, k_pos, KP)
        if PASS != 1:
            _store_sorted(NEG_KEY, NEG_IDX, out_rows, row_ok, lk_n, li_n, k_neg, KN)

    @triton.jit
    def _topk_merge_kernel(KEY, IDX, OUT_KEY, OUT_IDX, N, SPLITS, k, K: tl.constexpr,
                           BLOCK: tl.constexpr):
        """Combine [SPLITS, N, K] sorted partial lists into [N, K] sorted lists:
        the k best (key, index) pairs of the union, ties by the smallest index
        (the splits cover disjoint references, so indices never repeat)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < N
        slots = tl.arange(0, K)[None, :]
        offs = rows.to(tl.int64)[:, None] * K + slots
        lk = tl.load(KEY + offs, mask=ok[:, None], other=float("inf"))
        li = tl.load(IDX + offs, mask=ok[:, None], other=-1).to(tl.int32)
        # Empty slots (+inf, -1) -> (+inf, -2 - s); unused slots: never the worst entry.
        li = tl.where(lk == float("inf"), -2 - slots, li)
        lk = tl.where(slots < k, lk, _NEG_INF)
        wk, wi = _worst(lk, li)
        for _ in range(1, SPLITS):
            KEY += N * K  # next split (pointer arithmetic is 64-bit)
            IDX += N * K
            ck = tl.load(KEY + offs, mask=ok[:, None], other=float("inf"))
            ci = tl.load(IDX + offs, mask=ok[:, None], other=-1).to(tl.int32)
            lk, li, wk, wi = _push(lk, li, wk, wi, ck, ci, K)
        _store_sorted(OUT_KEY, OUT_IDX, rows.to(tl.int64), ok, lk, li, k, K)

    # ------------------------------------------------------------------ autotuning

    # Tile configs (as _triton._FWD_CONFIG_PATHS: key -> the dot paths it
    # suits).  8 warps: the [BLOCK_M, K] lists of both sides live in registers
    # next to the Gram tile.  Static survey for sm_90 (triton_static's
    # compile_kernel, no GPU): 64 x 64 x 32 with 8 warps compiles without
    # spills for tf32/tc16 at K = 8 and 64, distance-weighted included (the
    # same tile with 4 warps spills 128 B), 32 x 64 x 32 for fma64.  Not timed.
    _TOPK_CONFIG_PATHS = {
        (64, 64, 32, 8, 3): ("tc16", "tf32"),
        (64, 64, 16, 8, 3): ("tc16", "tf32"),
        (32, 64, 32, 8, 3): ("fma32", "fma64"),
        (32, 64, 16, 8, 2): ("tc16", "tf32", "fma32", "fma64"),
    }
    _TOPK_CONFIGS = _triton._fwd_configs(_TOPK_CONFIG_PATHS)

    def _prune_topk_configs(configs, named_args, **kwargs):
        return _triton.prune_fwd_configs(configs, named_args, table=_TOPK_CONFIG_PATHS, **kwargs)

    _topk_fwd_tuned = triton.autotune(
        configs=_TOPK_CONFIGS,
        # Not keyed on PASS (the two semi-hard launches must run the same tiles,
        # see _triton.py) -- K_POS/K_NEG and the rule are passed to both.
        key=["D", "DISTANCE", "HAS_IDS", "DOT_PRECISION", "KP", "KN", "NEG_RULE"],
        prune_configs_by={"early_config_prune": _prune_topk_configs},
    )(_topk_fwd_kernel)


# ------------------------------------------------------------------- launchers

def _list_size(k: int) -> int:
    """K: the power of two >= k (>= 2, tl.arange's minimum useful size)."""
    return max(2, triton.next_power_of_2(k))


def _check_k(k_pos: int, k_neg: int) -> None:
    for name, k in (("k_pos", k_pos), ("k_neg", k_neg)):
        if k > K_MAX:
            raise ValueError(f"backend 'triton' supports {name} <= {K_MAX} (the per-anchor lists "
                             f"live in registers), got {name}={k}; use backend='torch' or 'cpu' "
                             "for larger k")


def _dw_params(dim: int, acc: torch.dtype, cutoff: float, nonzero_loss_cutoff: float,
               device: torch.device) -> Tuple[Tensor, float, float]:
    """The distance-weighted law's thresholds on v, fl(cutoff^2) and
    fl(min(nonzero_loss_cutoff, 2)^2) (float64, rounded to the acc dtype: the
    contract), as a [2] tensor, and the exponents (a, b) = ((2 - D)/2, (3 - D)/2)."""
    bounds = torch.full((2,), cutoff * cutoff, dtype=torch.float64, device=device)
    bounds[1:].fill_(min(nonzero_loss_cutoff, 2.0) ** 2)  # fills: no host-device copy, no sync
    return bounds.to(acc), (2.0 - dim) / 2.0, (3.0 - dim) / 2.0


def _launch_topk(x, r, a, b, ql, rl, qid, rid, lo, hi, dw, seed, pass_, distance, pos_nearest,
                 neg_rule, k_pos, k_neg, splits, config, prune):
    """One forward launch (plus the split merge); returns ((pos_key, pos_idx),
    (neg_key, neg_idx)), each [N, K] sorted (slots >= k: (+inf, -1)), for the
    sides this pass computes (None for the other)."""
    n, m, d = x.shape[0], r.shape[0], x.shape[1]
    acc = a.dtype
    dev = x.device
    kp, kn = _list_size(k_pos), _list_size(k_neg)
    neg_key_t = torch.float32 if neg_rule == NEG_DW else acc
    pos = (torch.empty((splits, n, kp), dtype=acc, device=dev),
           torch.empty((splits, n, kp), dtype=torch.int64, device=dev)) \
        if pass_ != NEG_WINDOW else None
    neg = (torch.empty((splits, n, kn), dtype=neg_key_t, device=dev),
           torch.empty((splits, n, kn), dtype=torch.int64, device=dev)) \
        if pass_ != POS_ONLY else None
    dummy_f, dummy_i = a, ql  # never read: PASS / HAS_IDS / NEG_RULE guard every use
    has_ids = qid is not None
    args = (x, r, a, b, ql, rl,
            qid if has_ids else dummy_i, rid if has_ids else dummy_i,
            lo if lo is not None else dummy_f, hi if hi is not None else dummy_f,
            dw if dw is not None else dummy_f,
            *(pos if pos is not None else (dummy_f, dummy_i)),
            *(neg if neg is not None else (dummy_f.new_empty(0, dtype=neg_key_t), dummy_i)),
            n, m, d, splits, k_pos, k_neg, seed[0], seed[1], seed[2],
            x.stride(0), x.stride(1), r.stride(0), r.stride(1))
    meta = dict(PASS=pass_, DISTANCE=_triton._FWD_DISTANCE[distance], HAS_IDS=has_ids,
                POS_NEAREST=pos_nearest, NEG_RULE=neg_rule, PRUNE=prune,
                DOT_PRECISION=_triton._dot_precision(x.dtype),
                UPCAST=INTERPRETED and x.dtype == torch.bfloat16, KP=kp, KN=kn)
    if config is None and not INTERPRETED:
        grid = lambda META: (triton.cdiv(n, META["BLOCK_M"]), splits)  # noqa: E731
        _topk_fwd_tuned[grid](*args, **meta)
    else:
        cfg = dict(_triton.INTERPRETER_CONFIG if config is None else config)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), splits)
        _topk_fwd_kernel[grid](*args, **meta, **cfg)

    def merged(side, k, kk):
        if side is None:
            return None
        key, idx = side
        if splits == 1:
            return key[0], idx[0]
        out_key = torch.empty((n, kk), dtype=key.dtype, device=dev)
        out_idx = torch.empty((n, kk), dtype=torch.int64, device=dev)
        _topk_merge_kernel[(triton.cdiv(n, 32),)](key, idx, out_key, out_idx, n, splits, k,
                                                 K=kk, BLOCK=32)
        return out_key, out_idx

    return merged(pos, k_pos, kp), merged(neg, k_neg, kn)


def select_topk(x: Tensor, labels: Tensor, r: Tensor, ref_labels: Tensor,
                query_ids: Optional[Tensor], ref_ids: Optional[Tensor], k_pos: int, k_neg: int,
                pos_strategy: str, neg_strategy: str, distance: str, margin: Optional[float],
                cutoff: float, nonzero_loss_cutoff: float, seed: int, *,
                splits: Optional[int] = None, config: Optional[dict] = None,
                prune: bool = True) -> Tuple[Tensor, Tensor]:
    """Triton top-k selection: (pos_idx int64 [N, k_pos], neg_idx int64 [N, k_neg]).

    Arguments as for ``fastmine.reference_topk.select_topk``: x [N, D], r [M, D]
    float16/bfloat16/float32/float64 on CUDA (CPU under the interpreter), the
    references already expanded (r is x with ids for the batch); labels/ids
    integer [N] / [M] (ids None: no exclusion); ``seed`` an int in [0, 2^64)
    (read by "distance_weighted" only); 1 <= k_pos, k_neg <= K_MAX.  Rows in the
    strategy's order, ties by the smallest index, trailing -1.  ``splits``
    (reference-axis split count), ``config`` (BLOCK_M/BLOCK_N/BLOCK_K, bypassing
    the autotuner) and ``prune`` (False: draw the noise of every tile) are for
    tests and tuning; none changes a pick.
    """
    _check_k(k_pos, k_neg)
    n, m = x.shape[0], r.shape[0]
    if n == 0 or m == 0:
        return (torch.full((n, k_pos), -1, dtype=torch.int64, device=x.device),
                torch.full((n, k_neg), -1, dtype=torch.int64, device=x.device))
    if max(n, m) > _triton._MAX_ROWS:
        raise ValueError(f"backend 'triton' indexes rows in int32: N={n} and M={m} must be "
                         f"<= {_triton._MAX_ROWS}")
    x, r = _triton._embedding_views(x, r)
    a = _triton._row_terms(x, distance)
    b = a if r is x else _triton._row_terms(r, distance)
    ql, rl = labels.to(torch.int64).contiguous(), ref_labels.to(torch.int64).contiguous()
    qid = rid = None
    if query_ids is not None:
        qid, rid = query_ids.to(torch.int64).contiguous(), ref_ids.to(torch.int64).contiguous()
    if splits is None:
        path = _triton.dot_path(x.dtype, _triton._dot_precision(x.dtype))
        block_m = max(c.kwargs["BLOCK_M"] for c in _TOPK_CONFIGS
                      if path in _TOPK_CONFIG_PATHS[_triton._config_key(c)])
        splits = _triton.num_splits(n, m, x.device, block_m)
    splits = max(1, min(int(splits), m))
    pos_nearest = POS_STRATEGIES[pos_strategy] == POS_STRATEGIES["easy"]
    dw = None
    noise = (0, 0.0, 0.0)  # seed, a, b: read by NEG_DW only (seed 0: one compiled variant)
    if neg_strategy == DISTANCE_WEIGHTED:
        neg_rule = NEG_DW
        dw, dw_a, dw_b = _dw_params(x.shape[1], a.dtype, cutoff, nonzero_loss_cutoff, x.device)
        noise = (int(seed), dw_a, dw_b)
    else:
        neg_rule = NEG_FARTHEST if neg_strategy == "easy" else NEG_NEAREST
    common = (x, r, a, b, ql, rl, qid, rid)
    opts = (k_pos, k_neg, splits, config, prune)
    if neg_strategy != "semihard":
        (_, pos_idx), (_, neg_idx) = _launch_topk(*common, None, None, dw, noise, FUSED,
                                                  distance, pos_nearest, neg_rule, *opts)
        return pos_idx[:, :k_pos], neg_idx[:, :k_neg]
    (pos_key, pos_idx), _ = _launch_topk(*common, None, None, None, noise, POS_ONLY, distance,
                                         pos_nearest, neg_rule, *opts)
    first = pos_key[:, 0]  # the window of the first positive; key = +-v
    v_ap = first if pos_nearest else -first
    lo, hi = semihard_window(v_ap, pos_idx[:, 0] >= 0, margin, distance)
    _, (_, neg_idx) = _launch_topk(*common, lo, hi, None, noise, NEG_WINDOW, distance,
                                   pos_nearest, neg_rule, *opts)
    return pos_idx[:, :k_pos], neg_idx[:, :k_neg]


def pair_distances(x: Tensor, r: Tensor, idx: Tensor, distance: str) -> Tensor:
    """Exact distances of the pairs (x[i], r[idx[i, t]]): idx int64 [N, k] -> [N, k]
    in x's dtype, 0 at -1 (``_triton.pair_distance`` per column, O(N) memory each;
    the contract of ``fastmine.reference_topk.pair_distances``)."""
    if idx.shape[1] == 0:
        return x.new_zeros((x.shape[0], 0))
    return torch.stack([_triton.pair_distance(x, r, idx[:, t], distance)
                        for t in range(idx.shape[1])], dim=1)


# ------------------------------------------------------------------- registration

def register() -> None:
    """Add the rules "topk" and "distance_weighted" to backend "triton" (the op
    fastmine::mine_topk_triton); called from fastmine/_triton.py's registration."""
    _backends.register_python_topk("triton", select_topk, distance_weighted=True,
                                   pair_distances=pair_distances)
