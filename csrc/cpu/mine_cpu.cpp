// CPU implementation of fastmine::mine (selection + exact pair distances) and
// fastmine::mine_backward, and of the selection-only fastmine::mine_select.
//
// Selection is blocked and fused, never holding the N x M matrix:
//   for each block of BM anchors (in parallel, at::parallel_for):
//     for each chunk of BN references:
//       dot = X_blk @ R_chunk^T               (BLAS, at::mm_out into a BM x BN buffer;
//                                             small tiles: small_gram, no BLAS call)
//       one vectorised pass over the buffer: mining value v, label and
//       same-sample masks, running argmin of the positive and negative keys.
// Memory: O(threads * BM * (BN + D)) plus O(N + M) row terms (and the O(M)
// label index of one-sweep semi-hard).  Low-precision
// inputs are upcast block by block and chunk by chunk (never a copy of the
// whole bank); float32/float64 rows are read in place.
//
// Selection is "argmin of a key" (strategies.h): key = v for nearest rules and
// -v for farthest ones, +inf for inadmissible references.  The inner loop only
// reduces the *minimum key* of each 64-wide sub-chunk (an `omp simd` min
// reduction, no branches); the index is resolved afterwards by rescanning the
// winning sub-chunk for the first position holding that key.  Sub-chunks and
// chunks are merged with a strict '<', so exact ties keep the smallest index.
// The rescan recomputes keys with the same inline code; the file is compiled
// with -ffp-contract=off so SIMD and scalar arithmetic agree bit for bit.
//
// The semi-hard rule needs d_ap before it can judge a negative.  Small classes
// (the usual case): ONE sweep -- each anchor's v_ap estimated from its own
// class members (reference rows grouped by label, O(N K D)), the fused sweep
// collects the positive exactly and the negatives around the estimate, and
// the exact window (lo, hi) of strategies.h is applied afterwards.  Large
// classes: two sweeps, positives first, then negatives inside the window
// (reusing the dot buffer when all references fit in one chunk).  Both give
// the same indices bit for bit; the cost model (kDirectCost: one sweep iff
// 8 sum_i K_i < N M; measured crossover between K = M/16 and K = M/8 at
// N = 8192, D = 128) and the proof are at "semi-hard in one sweep" below.
//
// Labels and ids are read as int64 (no compaction, no host round trip).  The
// references default to the batch (ref_emb undefined); same-sample pairs are
// then the diagonal (a flag, not a materialised arange) unless ids are given.
// Data checks (NaN/Inf, admissible norms) come for free from the row terms.
//
// The tiles, row terms, per-pair keys and pair distances are in gram_tiles.h,
// shared with the top-k kernel (mine_topk_cpu.cpp), which forms the same tiles
// and computes the same keys.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "fastmine/op_checks.h"
#include "fastmine/ops.h"
#include "fastmine/strategies.h"
#include "gram_tiles.h"  // tiles, row terms, keys, pair distances (shared with mine_topk_cpu.cpp)


namespace fastmine {
namespace cpu {
namespace {

template <typename acc_t, typename KeyFn>
inline int64_t first_index_of(KeyFn key_fn, int64_t s, int64_t e, acc_t key) {
  for (int64_t j = s; j < e; ++j) {
    if (key_fn(j) == key) return j;
  }
  return s;  // unreachable with -ffp-contract=off; keeps the result in range
}

template <typename acc_t>
struct BlockArgs {
  const acc_t* dot;  // [bm, cn] row-major
  int64_t bm, cn, i0, j0;
  const acc_t* a;    // [bm]
  const acc_t* b;    // [cn]
  const int64_t* ql; // [bm]
  const int64_t* rl; // [cn]
  const int64_t* qid;  // [bm] (Explicit)
  const int64_t* rid;  // [cn] (Explicit)
  acc_t ps, ns;
  const acc_t* lo;   // [bm] (NegWindow)
  const acc_t* hi;   // [bm] (NegWindow)
  Best<acc_t>* bp;   // [bm] running best positive
  Best<acc_t>* bn;   // [bm] running best negative
  // One-pass semi-hard (scan_block_band): lo = L1, hi = hi(L2), lo2 = L2, and
  // band[i] collects the negatives with L1 < v <= L2 in index order.
  const acc_t* lo2 = nullptr;                  // [bm]
  std::vector<Best<acc_t>>* band = nullptr;    // [bm]
};

template <typename acc_t, bool COS, Ids IDS, Pass PASS>
FASTMINE_CPU_CLONES void scan_block(const BlockArgs<acc_t>& A) {
  constexpr bool DO_POS = PASS != Pass::NegWindow;
  constexpr bool DO_NEG = PASS != Pass::PosOnly;
  constexpr bool WINDOW = PASS == Pass::NegWindow;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < A.bm; ++i) {
    const int64_t qi = IDS == Ids::Explicit ? A.qid[i] : (IDS == Ids::Self ? A.i0 + i : 0);
    RowKeys<acc_t> k{A.dot + i * A.cn, A.b, A.rl, A.rid, A.j0, A.a[i], A.ql[i], qi, A.ps, A.ns,
                     WINDOW ? A.lo[i] : acc_t(0), WINDOW ? A.hi[i] : acc_t(0)};
    if (WINDOW && !(k.lo < inf)) continue;  // no positive -> no semi-hard negative
    acc_t best_p = inf, best_n = inf;
    int64_t sub_p = -1, sub_n = -1;
    for (int64_t s = 0; s < A.cn; s += kSub) {
      const int64_t e = std::min(s + kSub, A.cn);
      acc_t mp = inf, mn = inf;
#pragma omp simd reduction(min : mp, mn)
      for (int64_t j = s; j < e; ++j) {
        if constexpr (DO_POS) {
          const acc_t kp = pos_key<acc_t, COS, IDS>(k, j);
          mp = kp < mp ? kp : mp;
        }
        if constexpr (DO_NEG) {
          const acc_t kn = neg_key<acc_t, COS, IDS, WINDOW>(k, j);
          mn = kn < mn ? kn : mn;
        }
      }
      if (mp < best_p) { best_p = mp; sub_p = s; }
      if (mn < best_n) { best_n = mn; sub_n = s; }
    }
    if (DO_POS && sub_p >= 0 && best_p < A.bp[i].key) {
      auto fn = [&](int64_t j) { return pos_key<acc_t, COS, IDS>(k, j); };
      A.bp[i] = {best_p, A.j0 + first_index_of(fn, sub_p, std::min(sub_p + kSub, A.cn), best_p)};
    }
    if (DO_NEG && sub_n >= 0 && best_n < A.bn[i].key) {
      auto fn = [&](int64_t j) { return neg_key<acc_t, COS, IDS, WINDOW>(k, j); };
      A.bn[i] = {best_n, A.j0 + first_index_of(fn, sub_n, std::min(sub_n + kSub, A.cn), best_n)};
    }
  }
}

// The one-pass semi-hard sweep (see "Semi-hard in one sweep" above
// select_impl).  Per reference: the positive key exactly as Pass::PosOnly
// computes it (same tiles, same code, so the same bits and the same argmin),
// and for the negatives, with [L1, L2] an interval known to contain the exact
// v_ap and hi2 = semihard_upper(L2) >= the exact hi:
//   * the nearest negative with L2 < v < hi2 (an argmin, like NegWindow), and
//   * every negative with L1 < v <= L2 (the band, usually empty), in index order.
// The exact window (v_ap, hi) is applied to these afterwards (resolve_band).
template <typename acc_t, bool COS, Ids IDS>
FASTMINE_CPU_CLONES void scan_block_band(const BlockArgs<acc_t>& A) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < A.bm; ++i) {
    const int64_t qi = IDS == Ids::Explicit ? A.qid[i] : (IDS == Ids::Self ? A.i0 + i : 0);
    RowKeys<acc_t> k{A.dot + i * A.cn, A.b, A.rl, A.rid, A.j0, A.a[i], A.ql[i], qi, A.ps, A.ns,
                     A.lo2[i], A.hi[i]};  // neg_key's window (L2, hi2)
    const acc_t l1 = A.lo[i];
    if (!(l1 < inf)) continue;  // no positive (L1 = +inf): no positive, no negative
    acc_t best_p = inf, best_n = inf;
    int64_t sub_p = -1, sub_n = -1;
    for (int64_t s = 0; s < A.cn; s += kSub) {
      const int64_t e = std::min(s + kSub, A.cn);
      // mb < inf iff the sub-chunk holds a band member (three min reductions:
      // an integer count here kept GCC from vectorising the loop).
      acc_t mp = inf, mn = inf, mb = inf;
#pragma omp simd reduction(min : mp, mn, mb)
      for (int64_t j = s; j < e; ++j) {
        const acc_t v = mining_value<acc_t>(k.dot[j], k.ai, k.b[j], COS);
        const bool same = same_sample<acc_t, IDS>(k, j);
        const bool pos = (k.rl[j] == k.li) & !same;
        const bool neg = (k.rl[j] != k.li) & !same;
        // pos_key and neg_key<WINDOW> (window (L2, hi2)) from the one v.
        const acc_t kp = pos ? k.ps * v : inf;
        const acc_t kn = (neg & (v > k.lo) & (v < k.hi)) ? v : inf;
        const acc_t kb = (neg & (v > l1) & (v <= k.lo)) ? v : inf;
        mp = kp < mp ? kp : mp;
        mn = kn < mn ? kn : mn;
        mb = kb < mb ? kb : mb;
      }
      if (mp < best_p) { best_p = mp; sub_p = s; }
      if (mn < best_n) { best_n = mn; sub_n = s; }
      if (mb < inf) {
        for (int64_t j = s; j < e; ++j) {
          const acc_t v = mining_value<acc_t>(k.dot[j], k.ai, k.b[j], COS);
          const bool neg = (k.rl[j] != k.li) & !same_sample<acc_t, IDS>(k, j);
          if (neg & (v > l1) & (v <= k.lo)) A.band[i].push_back({v, A.j0 + j});
        }
      }
    }
    if (sub_p >= 0 && best_p < A.bp[i].key) {
      auto fn = [&](int64_t j) { return pos_key<acc_t, COS, IDS>(k, j); };
      A.bp[i] = {best_p, A.j0 + first_index_of(fn, sub_p, std::min(sub_p + kSub, A.cn), best_p)};
    }
    if (sub_n >= 0 && best_n < A.bn[i].key) {
      auto fn = [&](int64_t j) { return neg_key<acc_t, COS, IDS, true>(k, j); };
      A.bn[i] = {best_n, A.j0 + first_index_of(fn, sub_n, std::min(sub_n + kSub, A.cn), best_n)};
    }
  }
}

template <typename acc_t, bool COS>
void scan_band_ids(Ids ids, const BlockArgs<acc_t>& A) {
  switch (ids) {
    case Ids::None: return scan_block_band<acc_t, COS, Ids::None>(A);
    case Ids::Explicit: return scan_block_band<acc_t, COS, Ids::Explicit>(A);
    case Ids::Self: return scan_block_band<acc_t, COS, Ids::Self>(A);
  }
}

template <typename acc_t, bool COS, Ids IDS>
void scan_pass(Pass pass, const BlockArgs<acc_t>& A) {
  switch (pass) {
    case Pass::Fused: return scan_block<acc_t, COS, IDS, Pass::Fused>(A);
    case Pass::PosOnly: return scan_block<acc_t, COS, IDS, Pass::PosOnly>(A);
    case Pass::NegWindow: return scan_block<acc_t, COS, IDS, Pass::NegWindow>(A);
  }
}

template <typename acc_t, bool COS>
void scan_ids(Ids ids, Pass pass, const BlockArgs<acc_t>& A) {
  switch (ids) {
    case Ids::None: return scan_pass<acc_t, COS, Ids::None>(pass, A);
    case Ids::Explicit: return scan_pass<acc_t, COS, Ids::Explicit>(pass, A);
    case Ids::Self: return scan_pass<acc_t, COS, Ids::Self>(pass, A);
  }
}

// ------------------------------------------------------ semi-hard in one sweep
// The semi-hard rule needs v_ap (the positive's mining value) before it can
// judge a negative.  Two ways:
//   two sweeps: a positive-only GEMM sweep, then a GEMM sweep for negatives in
//     the window (v_ap, hi) -- 2 N M D multiply-adds;
//   one sweep: each anchor's positives are its own class members, K of them
//     (reference rows grouped by label: a sorted index, O(M log M) once per
//     call).  The direct dots give v^_ap, within a rounding bound e of the
//     sweep's v_ap (below), in N K D multiply-adds; then ONE fused GEMM sweep
//     selects the positive exactly as the positive-only sweep does (same
//     tiles, same key code: the same bits, so the same index) and collects the
//     negatives against the interval [L1, L2] = [v^_ap - e, v^_ap + e] that
//     contains v_ap: the nearest negative above L2 (below hi(L2)) and the
//     "band" of negatives in (L1, L2] (almost always empty).  Once v_ap is
//     known, the exact window picks from these: the nearest negative with
//     v_ap < v < hi(v_ap) is either in the band or is the nearest above L2
//     (every v > L2 is > v_ap; hi is monotone in v_ap, so hi(v_ap) <= hi(L2),
//     and if the nearest above L2 fails v < hi(v_ap) every larger one does).
//     Same candidates, same strict comparisons, ties to the smallest index: the
//     indices of the two-sweep path, bit for bit.  Should v_ap ever fall
//     outside [L1, L2] (the bound is not met), that block re-runs the
//     negative sweep of the two-sweep path for those anchors: correctness does
//     not rest on the bound, only speed does.
// Rounding bound: the sweep (BLAS or small_gram) and lane_dot compute the same
// dot products in different orders; each is within gamma_D * sum|x_k r_k| <=
// gamma_D |x| |r| of the exact value (gamma_D = D u / (1 - D u), u the unit
// roundoff; any order, FMA or not).  Euclidean: v = (a + b) - 2 dot, with the
// same rounded a + b on both sides, so |v_sweep - v^| <= 4 gamma_D sqrt(a b) +
// u (|v_sweep| + |v^|).  Cosine: v = 1 - dot a b with a b = 1/(|x||r|), so
// |v_sweep - v^| <= 2 gamma_D (1 + 3u) * 2 + 2u (|v_sweep| + |v^|).  The
// minimum (maximum) over the members moves by at most the largest pair bound;
// e below doubles it (D + 2 for gamma) as a safety margin.
//
// Cost model (which path): two sweeps cost 2 N M D GEMM multiply-adds; one
// sweep costs N M D plus sum_i K_i D direct multiply-adds (K_i: anchor i's
// class members among the references) plus a slightly heavier selection pass.
// A direct multiply-add costs about kDirectCost GEMM ones (gathered rows, a
// dot product per pair instead of a register-blocked GEMM), so one sweep wins
// when kDirectCost * sum_i K_i < N M.  Measured (N = 8192, D = 128, margin 0.2,
// 2 threads, 2-core AMD EPYC): one sweep 205 / 223 / 279 ms at K = 8 / 128 /
// 512, two sweeps 356 / 330 / 381 ms; at K = 1024 (M/8) 440 vs 365 ms and at
// K = 2048 610 vs 504 ms.
// With 8 samples per class, sum_i K_i ~ 8 N: one sweep whenever M > 8 kDirectCost.
constexpr double kDirectCost = 8.0;

enum class SemiPath { Auto, OneSweep, TwoSweeps };

// Test and benchmark hook: the semi-hard override (overrides.h, included by
// gram_tiles.h: FASTMINE_CPU_SEMIHARD / fastmine::_set_cpu_overrides, "one" |
// "two") forces a path; by default the cost model chooses.
SemiPath semihard_path_override() {
  using S = KernelOverrides::Semihard;
  const S s = kernel_overrides().semihard;
  return s == S::OneSweep ? SemiPath::OneSweep : s == S::TwoSweeps ? SemiPath::TwoSweeps : SemiPath::Auto;
}

// Reference rows grouped by label: order[] sorts the rows by (label, index);
// keys[k] = label of order[k].  Class c's members are order[lo, hi) with
// [lo, hi) = equal_range(keys, c), in increasing index order.
struct LabelGroups {
  std::vector<int64_t> order, keys;
  LabelGroups(const int64_t* rl, int64_t m) : order(m), keys(m) {
    for (int64_t j = 0; j < m; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t p, int64_t q) { return rl[p] < rl[q]; });
    for (int64_t k = 0; k < m; ++k) keys[k] = rl[order[k]];
  }
  std::pair<int64_t, int64_t> members(int64_t label) const {
    auto r = std::equal_range(keys.begin(), keys.end(), label);
    return {r.first - keys.begin(), r.second - keys.begin()};
  }
};

// The interval [L1, L2] around v^_ap and the upper end hi2 = hi(L2) of the
// window for one anchor, from its class members (see above).  No admissible
// member: L1 = L2 = hi2 = +inf (no positive; the sweep finds none either,
// since it applies the same label and same-sample masks).
template <typename acc_t, typename scalar_t>
void direct_interval(const scalar_t* xi, const scalar_t* r, int64_t d, const LabelGroups& G,
                     int64_t li, int64_t i_glob, int64_t qi, Ids ids, const int64_t* rid,
                     acc_t ai, const acc_t* b, acc_t ps, double margin, Distance dist,
                     acc_t& l1, acc_t& l2, acc_t& hi2) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const bool cosine = dist == Distance::Cosine;
  auto [s, e] = G.members(li);
  acc_t best = inf, bmax = 0;
  for (int64_t k = s; k < e; ++k) {
    const int64_t j = G.order[k];
    if (fastmine::same_sample(ids, i_glob, j, qi, ids == Ids::Explicit ? rid[j] : 0)) continue;
    const acc_t v = mining_value<acc_t>(lane_dot<acc_t>(xi, r + j * d, d), ai, b[j], cosine);
    best = std::min(best, ps * v);
    bmax = std::max(bmax, b[j]);
  }
  if (!(best < inf)) {
    l1 = l2 = hi2 = inf;
    return;
  }
  const double u = std::numeric_limits<acc_t>::epsilon() / 2;
  const double gamma = (d + 2) * u / (1 - (d + 2) * u);
  const double vhat = static_cast<double>(ps * best);
  const double scale = cosine ? 2.0 : 2.0 * std::sqrt(static_cast<double>(ai) * bmax);
  const double dv = 2 * gamma * scale * (1 + 3 * u);  // |v_sweep - v^| from the dots
  const double err = 2 * (dv + 2 * u * (vhat + dv) + 4 * std::numeric_limits<acc_t>::denorm_min());
  l1 = static_cast<acc_t>(vhat - err);
  l2 = static_cast<acc_t>(vhat + err);
  // static_cast rounds to nearest: widen by one ulp each way so [L1, L2] keeps
  // the real interval.
  l1 = std::nextafter(l1, -inf);
  l2 = std::nextafter(l2, inf);
  hi2 = semihard_upper<acc_t>(std::max(l2, acc_t(0)), margin, dist, inf);
}

// Picks the negative of one anchor after the one-pass sweep from the exact
// v_ap = lo: the band's nearest with lo < v < hi (index order: the first of
// equal values), else the nearest above L2 if it is below hi.  Returns false
// when lo is outside [L1, L2] (the caller then runs the exact negative sweep).
template <typename acc_t>
bool resolve_band(acc_t lo, acc_t hi, acc_t l1, acc_t l2, const std::vector<Best<acc_t>>& band,
                  Best<acc_t>& bn) {
  if (!(lo >= l1 && lo <= l2)) return false;
  Best<acc_t> best{std::numeric_limits<acc_t>::infinity(), -1};
  for (const auto& c : band) {
    if (in_semihard_window(c.key, lo, hi) && c.key < best.key) best = c;
  }
  if (best.idx < 0 && bn.idx >= 0 && bn.key < hi) best = bn;
  bn = best;
  return true;
}

template <typename acc_t>
void select_impl(const SelectArgs& S, at::Tensor& pos_idx, at::Tensor& neg_idx) {
  const at::Tensor& x = S.x;
  const at::Tensor& r = S.r;
  const int64_t n = x.size(0), m = r.size(0), d = x.size(1);
  const TileLayout L = tile_layout<acc_t>(n, m);
  const int64_t block_rows = L.block_rows, chunk = L.chunk, nblocks = L.nblocks;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t ps = pos_sign<acc_t>(S.pos);
  const acc_t ns = neg_sign<acc_t>(S.neg);
  const bool semihard = S.neg == NegStrategy::SemiHard;
  const bool cosine = S.dist == Distance::Cosine;
  const int64_t* qlp = S.ql.data_ptr<int64_t>();
  const int64_t* rlp = S.rl.data_ptr<int64_t>();
  const int64_t* qidp = S.ids == Ids::Explicit ? S.qid.data_ptr<int64_t>() : nullptr;
  const int64_t* ridp = S.ids == Ids::Explicit ? S.rid.data_ptr<int64_t>() : nullptr;

  // Semi-hard: one sweep or two (cost model above scan_block_band's helpers).
  bool one_sweep = false;
  std::unique_ptr<LabelGroups> groups;
  if (semihard) {
    const SemiPath forced = semihard_path_override();
    if (forced != SemiPath::TwoSweeps) {
      groups = std::make_unique<LabelGroups>(rlp, m);
      double direct = 0;  // sum_i K_i
      for (int64_t i = 0; i < n; ++i) {
        auto [s0, s1] = groups->members(qlp[i]);
        direct += double(s1 - s0);
      }
      one_sweep = forced == SemiPath::OneSweep || kDirectCost * direct < double(n) * double(m);
    }
  }

  at::parallel_for(0, nblocks, 1, [&](int64_t blk0, int64_t blk1) {
    // Worker threads do not inherit the caller's dispatch state: operands are
    // plain data and grad mode is off here so mm_out never sees autograd.
    at::NoGradGuard no_grad;
    TileWorkspace<acc_t> W(x, L);
    std::vector<Best<acc_t>> bp(block_rows), bn(block_rows);
    std::vector<acc_t> lo(block_rows), hi(block_rows), lo2(block_rows);
    std::vector<std::vector<Best<acc_t>>> band(one_sweep ? block_rows : 0);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * block_rows, bm = std::min(block_rows, n - i0);
      const at::Tensor xb = W.anchors(x, i0, bm);
      std::fill(bp.begin(), bp.end(), Best<acc_t>{inf, -1});
      std::fill(bn.begin(), bn.end(), Best<acc_t>{inf, -1});
      // One sweep over all reference chunks with the given pass (band: the
      // one-pass semi-hard scan).  Every sweep forms the same tiles.
      auto sweep = [&](Pass pass, bool band_pass, bool reuse_buffer) {
        W.sweep(xb, r, reuse_buffer, [&](const acc_t* dot, int64_t j0, int64_t cn) {
          BlockArgs<acc_t> A{dot, bm, cn, i0, j0,
                             S.a.data_ptr<acc_t>() + i0, S.b.data_ptr<acc_t>() + j0,
                             qlp + i0, rlp + j0,
                             qidp ? qidp + i0 : nullptr, ridp ? ridp + j0 : nullptr,
                             ps, ns, lo.data(), hi.data(), bp.data(), bn.data()};
          if (band_pass) {
            A.lo2 = lo2.data();
            A.band = band.data();
            if (cosine) {
              scan_band_ids<acc_t, true>(S.ids, A);
            } else {
              scan_band_ids<acc_t, false>(S.ids, A);
            }
          } else if (cosine) {
            scan_ids<acc_t, true>(S.ids, pass, A);
          } else {
            scan_ids<acc_t, false>(S.ids, pass, A);
          }
        });
      };
      if (!semihard) {
        sweep(Pass::Fused, false, false);
      } else if (!one_sweep) {
        sweep(Pass::PosOnly, false, false);
        for (int64_t i = 0; i < bm; ++i) {
          semihard_window<acc_t>(bp[i].idx >= 0, bp[i].key, ps, S.margin, S.dist, inf, lo[i],
                                 hi[i]);
        }
        sweep(Pass::NegWindow, false, /*reuse_buffer=*/chunk == m);
      } else {
        // [L1, L2] and hi(L2) per anchor from its class members (direct dots).
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "direct", [&] {
          const scalar_t* xp = x.data_ptr<scalar_t>();
          const scalar_t* rp = r.data_ptr<scalar_t>();
          for (int64_t i = 0; i < bm; ++i) {
            const int64_t g = i0 + i;
            direct_interval<acc_t, scalar_t>(
                xp + g * d, rp, d, *groups, qlp[g], g,
                S.ids == Ids::Explicit ? qidp[g] : g, S.ids, ridp, S.a.data_ptr<acc_t>()[g],
                S.b.data_ptr<acc_t>(), ps, S.margin, S.dist, lo[i], lo2[i], hi[i]);
            band[i].clear();
          }
        });
        sweep(Pass::Fused, /*band_pass=*/true, false);
        // The exact window from the positive the sweep picked.
        bool redo = false;
        for (int64_t i = 0; i < bm; ++i) {
          acc_t wlo, whi;
          semihard_window<acc_t>(bp[i].idx >= 0, bp[i].key, ps, S.margin, S.dist, inf, wlo, whi);
          if (bp[i].idx < 0) {
            bn[i] = {inf, -1};
            lo[i] = hi[i] = inf;  // skipped by a NegWindow re-run
          } else if (resolve_band<acc_t>(wlo, whi, lo[i], lo2[i], band[i], bn[i])) {
            lo[i] = hi[i] = inf;
          } else {  // v_ap outside [L1, L2]: this anchor takes the exact negative sweep
            bn[i] = {inf, -1};
            lo[i] = wlo;
            hi[i] = whi;
            redo = true;
          }
        }
        if (redo) sweep(Pass::NegWindow, false, /*reuse_buffer=*/chunk == m);
      }
      int64_t* pi = pos_idx.data_ptr<int64_t>() + i0;
      int64_t* ni = neg_idx.data_ptr<int64_t>() + i0;
      for (int64_t i = 0; i < bm; ++i) { pi[i] = bp[i].idx; ni[i] = bn[i].idx; }
    }
  });
}


// Selection shared by mine_cpu and mine_select_cpu.  Arguments are checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
    const c10::optional<at::Tensor>& ref_ids, bool self_refs, int64_t pos_strategy,
    int64_t neg_strategy, int64_t distance, c10::optional<double> margin) {
  const int64_t n = embeddings.size(0);
  const auto dist = static_cast<Distance>(distance);
  auto lopts = at::TensorOptions().dtype(at::kLong);
  at::Tensor pos_idx = at::full({n}, -1, lopts), neg_idx = at::full({n}, -1, lopts);
  SelectArgs S;
  if (!prepare_select(S, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, self_refs,
                      dist)) {
    return {pos_idx, neg_idx, S.x, S.r};
  }
  const bool f64 = embeddings.scalar_type() == at::kDouble;
  S.pos = static_cast<PosStrategy>(pos_strategy);
  S.neg = static_cast<NegStrategy>(neg_strategy);
  S.margin = margin.has_value() ? *margin : -1.0;
  if (f64) {
    select_impl<double>(S, pos_idx, neg_idx);
  } else {
    select_impl<float>(S, pos_idx, neg_idx);
  }
  return {pos_idx, neg_idx, S.x, S.r};
}

}  // namespace

// ------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mine_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels,
    const c10::optional<at::Tensor>& ref_emb, const c10::optional<at::Tensor>& ref_labels,
    const c10::optional<at::Tensor>& query_ids, const c10::optional<at::Tensor>& ref_ids,
    int64_t pos_strategy, int64_t neg_strategy, int64_t distance, c10::optional<double> margin) {
  const bool self_refs = check_mine_args(c10::DeviceType::CPU, embeddings, labels, ref_emb,
                                         ref_labels, query_ids, ref_ids, pos_strategy,
                                         neg_strategy, distance, margin);
  at::NoGradGuard no_grad;  // the autograd kernel sits above this one
  const at::Tensor& r = self_refs ? embeddings : *ref_emb;
  auto [pos_idx, neg_idx, x, rc] =
      select_cpu(embeddings, labels, r, self_refs ? labels : *ref_labels, query_ids,
                 self_refs ? query_ids : ref_ids, self_refs, pos_strategy, neg_strategy, distance,
                 margin);
  const int64_t n = embeddings.size(0);
  at::Tensor pos_dist = at::empty({n}, embeddings.options());
  at::Tensor neg_dist = at::empty({n}, embeddings.options());
  const auto dist = static_cast<Distance>(distance);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pair_distances", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    pair_distances<acc_t, scalar_t>(x, rc, pos_idx, dist, pos_dist);
    pair_distances<acc_t, scalar_t>(x, rc, neg_idx, dist, neg_dist);
  });
  return {pos_idx, neg_idx, pos_dist, neg_dist};
}

std::tuple<at::Tensor, at::Tensor> mine_backward_cpu(
    const at::Tensor& grad_pos_dist, const at::Tensor& grad_neg_dist,
    const at::Tensor& embeddings, const c10::optional<at::Tensor>& ref_emb,
    const at::Tensor& pos_idx, const at::Tensor& neg_idx, int64_t distance,
    bool ref_emb_grad) {
  check_mine_backward_args(c10::DeviceType::CPU, grad_pos_dist, grad_neg_dist, embeddings,
                           ref_emb, pos_idx, neg_idx, distance);
  at::NoGradGuard no_grad;
  const bool self_refs = !ref_emb.has_value();
  const at::Tensor x = embeddings.detach().contiguous();
  const at::Tensor r = self_refs ? x : ref_emb->detach().contiguous();
  const int64_t n = x.size(0), m = r.size(0), d = x.size(1);
  const bool f64 = x.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  // Accumulate in acc; the reference gradient only when asked for (a memory
  // bank without grad costs O(N*D), not O(M*D)).  Self refs: both halves land
  // in grad_x, the returned grad_ref_emb is empty.
  at::Tensor gx = at::zeros({n, d}, x.options().dtype(acc));
  const bool want_r = !self_refs && ref_emb_grad;
  at::Tensor gr = want_r ? at::zeros({m, d}, x.options().dtype(acc)) : at::Tensor();
  const at::Tensor gp = grad_pos_dist.to(acc).contiguous(), gn = grad_neg_dist.to(acc).contiguous();
  const auto dist = static_cast<Distance>(distance);
  const int64_t* pi = pos_idx.contiguous().data_ptr<int64_t>();
  const int64_t* ni = neg_idx.contiguous().data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mine_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const acc_t* gpp = gp.data_ptr<acc_t>();
    const acc_t* gnp = gn.data_ptr<acc_t>();
    acc_t* gxp = gx.data_ptr<acc_t>();
    acc_t* grp = want_r ? gr.data_ptr<acc_t>() : nullptr;
    const bool scatter = want_r || self_refs;
    acc_t* target = self_refs ? gxp : grp;
    // Anchor rows: dense and parallel.  Reference rows: scattered afterwards
    // in anchor order by one thread, so the sum is the same on every run
    // (deterministic whether or not torch.use_deterministic_algorithms is on).
    std::vector<acc_t> gbuf(scatter ? size_t(2 * n * d) : 0);
    at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> ga(d), gb(d);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t idx[2] = {pi[i], ni[i]};
        const acc_t g[2] = {gpp[i], gnp[i]};
        for (int side = 0; side < 2; ++side) {
          if (idx[side] < 0) continue;
          pair_grad<acc_t>(xp + i * d, rp + idx[side] * d, d, dist, g[side], ga.data(), gb.data());
          acc_t* row = gxp + i * d;
          for (int64_t k = 0; k < d; ++k) row[k] += ga[k];
          if (scatter) std::copy(gb.begin(), gb.end(), gbuf.begin() + (2 * i + side) * d);
        }
      }
    });
    if (scatter) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t idx[2] = {pi[i], ni[i]};
        for (int side = 0; side < 2; ++side) {
          if (idx[side] < 0) continue;
          acc_t* row = target + idx[side] * d;
          const acc_t* src = gbuf.data() + (2 * i + side) * d;
          for (int64_t k = 0; k < d; ++k) row[k] += src[k];
        }
      }
    }
  });
  at::Tensor grad_x = gx.to(embeddings.scalar_type());
  at::Tensor grad_r = want_r ? gr.to(ref_emb->scalar_type())
                             : at::empty({0, d}, embeddings.options());
  return {grad_x, grad_r};
}

std::tuple<at::Tensor, at::Tensor> mine_select_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
    const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy, int64_t neg_strategy,
    int64_t distance, c10::optional<double> margin) {
  check_mine_select_args(c10::DeviceType::CPU, embeddings, labels, ref_emb, ref_labels, query_ids,
                         ref_ids, pos_strategy, neg_strategy, distance, margin);
  at::NoGradGuard no_grad;
  auto [pos_idx, neg_idx, x, r] =
      select_cpu(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                 /*self_refs=*/false, pos_strategy, neg_strategy, distance, margin);
  return {pos_idx, neg_idx};
}

TORCH_LIBRARY_IMPL(fastmine, CPU, m) { m.impl("mine_select", &mine_select_cpu); }

}  // namespace cpu
}  // namespace fastmine
