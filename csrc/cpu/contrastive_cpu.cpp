// The CPU kernels of the contrastive losses (issue #18; docs/contrastive.md):
// SupCon, NT-Xent and Multi-Similarity (+ the fused MS miner) on L2-normalised
// rows, in O((N + M) D) memory.
//
//   forward   for each block of anchors (in parallel, at::parallel_for; a block
//             is owned by one thread, so its per-anchor state needs no atomics):
//               for each pass the loss needs, for each block of references:
//                 S = Q_blk R_blk^T          (at::mm_out into a per-thread buffer)
//                 per tile row: the masked exponents, their maximum, the sum of
//                 their exponentials below it (vectorised), merged into the
//                 anchor's running log-sum-exp (max, sum) in double
//             (NT-Xent: pass 1 also records the block's positive pairs, at most
//             a tile's worth, so pass 2 replays them without a GEMM; MS with
//             the miner: a min/max pass first)
//             The op returns the per-anchor loss terms and counts; the
//             reduction (the AvgNonZero selection, the means, PML's
//             batch-level conditions) is fastmine/contrastive.py's `reduce`,
//             one definition for every backend.
//   backward  recompute the tiles; g_ij = gamma_i dterm_i/ds_ij from the
//             per-anchor statistics and the upstream gradient gamma [N] (the
//             table in docs/contrastive.md), then
//             * references = the batch (self): ONE pass over anchor blocks I,
//               2 GEMMs per tile.  S is symmetric (s_ij = s_ji), so the tile
//               S_IJ also gives anchor j's gradient w.r.t. reference i:
//               H_IJ[a, c] = gamma_j dterm_j/ds_ji evaluated on S_IJ[a, c] with
//               the column anchor's statistics.  Block I owns its rows of dQ:
//                 dQ_I += (G_IJ + H_IJ) Q_J      (sum over J in order)
//               which is dQ = G Q + G^T Q without a second sweep: 3 GEMMs in
//               all (forward tile, backward tile, the addmm) -- the floor's.
//             * explicit references: pass 1 (anchor blocks own rows of dQ):
//               dQ_blk += G R_blk; pass 2 (reference blocks own rows of dR,
//               only when a reference gradient is needed): dR_blk += G^T Q_blk.
//             The tiles are formed with the same at::mm_out shapes as the
//             forward, and every sum has a fixed order: gradients are
//             bit-identical across runs and thread counts.
//
// The elementwise work runs in the tile's dtype: float32 with exp_f32
// (fast_exp.h: plain float arithmetic, < 1 ulp, vectorised by GCC in every
// FASTMINE_CPU_CLONES clone), float64 with libm's exp (exact to the tests'
// 1e-8).  Labels and ids are narrowed once per call to int32 codes (dense
// ranks), so the masks are 16-lane integer compares without branches.  A tile
// row's maximum is taken over its *admissible* entries only (the excluded
// self pair s_ii = 1 would otherwise underflow every e^{x - max} at small tau
// in float32); its exponentials are summed in the tile's dtype over 16 lanes
// and merged into the double running sums.
//
// The masks are pair_masks of fastmine/reference_contrastive.py: positive =
// same label and not the same sample, negative = different label and not the
// same sample; same sample = query_ids[i] == ref_ids[j], or i == j when the
// references are the batch and no ids are given.  The Python implementations
// (fastmine/contrastive.py, "chunked") are the executable specification of
// every formula here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_clones.h"  // FASTMINE_CPU_CLONES
#include "fast_exp.h"    // exp_f32
#include "fastmine/schema.h"

// The helpers of the hot loops are inlined into each ISA clone (a call would
// run the default ISA's copy, unvectorised).
#if defined(__GNUC__)
#define FASTMINE_INLINE inline __attribute__((always_inline))
#else
#define FASTMINE_INLINE inline
#endif

namespace fastmine {
namespace cpu {
namespace {

using acc = double;  // per-anchor accumulators (sums of exponentials, counts)
constexpr acc kInf = std::numeric_limits<acc>::infinity();

// The exp of the tile loops: exp_f32 in float32 (vectorisable), libm in float64.
FASTMINE_INLINE float tile_exp(float x) { return exp_f32(x); }
FASTMINE_INLINE double tile_exp(double x) { return std::exp(x); }

// The online log-sum-exp of one anchor: LSE = mx + log(sum).  Empty: (-inf, 0);
// with PML's extra term e^0: (0, 1).
struct Lse {
  acc mx, sum;
  // Adds a tile's part sum_k e^{x_k} = tsum e^{tmax} (tmax finite, tsum >= 1:
  // the maximal term contributes e^0).  e^{-inf} = 0 when empty.
  void merge(acc tmax, acc tsum) {
    if (tmax > mx) {
      sum = sum * std::exp(mx - tmax) + tsum;
      mx = tmax;
    } else {
      sum += tsum * std::exp(tmax - mx);
    }
  }
  acc value() const { return sum > 0 ? mx + std::log(sum) : -kInf; }
};

inline acc softplus(acc z) { return std::max(z, acc(0)) + std::log1p(std::exp(-std::abs(z))); }
inline acc sigmoid(acc z) { return 1.0 / (1.0 + std::exp(-z)); }

// The loss and its hyper-parameters (schema.h: FASTMINE_CONTRASTIVE_ARGS).
struct Loss {
  int64_t kind;  // ContrastiveLoss code
  acc p0, p1, p2;
  bool mined;
  acc eps;
};

// Labels and ids as int32 codes (equal codes <=> equal values; `rows`).
struct Codes {
  const int32_t *ql, *rl;    // [N], [M]
  const int32_t *qid, *rid;  // [N], [M]; nullptr without explicit ids
  bool self;                 // the references are the batch
};

// The inputs of one call.
struct Rows {
  at::Tensor q, r;  // [N, D], [M, D] (r may be q)
  int64_t n, m, d;
  Codes c;
  int64_t block;
};

// One tile row's masks: anchor i against the references j0 + c, 0 <= c < bn.
// IDS: explicit ids; else the same sample is i == j0 + c when self (c == dj).
template <bool IDS>
struct RowMask {
  int32_t li, qi, dj;
  const int32_t *rl, *rid;  // offset to j0
  int32_t adm(int32_t c) const { return IDS ? rid[c] != qi : c != dj; }  // not the same sample
  int32_t pos(int32_t c) const { return rl[c] == li; }                    // same label
};
template <bool IDS>
FASTMINE_INLINE RowMask<IDS> row_mask(const Codes& C, int64_t i, int64_t j0) {
  return {C.ql[i], IDS ? C.qid[i] : 0, C.self ? static_cast<int32_t>(i - j0) : -1, C.rl + j0,
          IDS ? C.rid + j0 : nullptr};
}

// Reductions over 16 independent lanes (a fixed order: deterministic, and
// vectorisable without reassociating float sums).
constexpr int kLanes = 16;
template <typename T>
FASTMINE_INLINE T lane_max(const T* x, int64_t n) {
  T part[kLanes];
  for (int l = 0; l < kLanes; ++l) part[l] = -std::numeric_limits<T>::infinity();
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] = x[k + l] > part[l] ? x[k + l] : part[l];
  }
  for (; k < n; ++k) part[0] = x[k] > part[0] ? x[k] : part[0];
  T v = part[0];
  for (int l = 1; l < kLanes; ++l) v = part[l] > v ? part[l] : v;
  return v;
}
// sum_k e^{x_k - mx} (x_k = -inf: 0); mx finite.
template <typename T>
FASTMINE_INLINE T lane_sum_exp(const T* x, int64_t n, T mx) {
  T part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += tile_exp(x[k + l] - mx);
  }
  for (; k < n; ++k) part[0] += tile_exp(x[k] - mx);
  T v = part[0];
  for (int l = 1; l < kLanes; ++l) v += part[l];
  return v;
}
template <typename T>
FASTMINE_INLINE T lane_sum(const T* x, int64_t n) {
  T part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += x[k + l];
  }
  for (; k < n; ++k) part[0] += x[k];
  T v = part[0];
  for (int l = 1; l < kLanes; ++l) v += part[l];
  return v;
}

// One forward tile: S (bm x bn, row-major) of anchors i0.. and references j0..,
// and two scratch rows x, y [bn].  The per-anchor arrays are offset to i0.
template <typename T>
struct FwdTile {
  const T* s;
  int64_t i0, bm, j0, bn;
  T *x, *y;
};

// A row's masked exponents x (-inf off the set) merged into lse.
template <typename T>
FASTMINE_INLINE void merge_row(Lse& lse, const T* x, int64_t bn) {
  const T mt = lane_max(x, bn);
  if (mt > -std::numeric_limits<T>::infinity()) lse.merge(acc(mt), acc(lane_sum_exp(x, bn, mt)));
}

// SupCon: (max, sum) over P u Q of s/tau; sum over P of s/tau; the counts.
template <typename T, bool IDS>
FASTMINE_CPU_CLONES void supcon_tile(const Codes& C, const FwdTile<T>& A, T inv_t, Lse* lse,
                                     acc* psum, int64_t* np, int64_t* nn) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int32_t bn = static_cast<int32_t>(A.bn);
  for (int64_t a = 0; a < A.bm; ++a) {
    const RowMask<IDS> M = row_mask<IDS>(C, A.i0 + a, A.j0);
    const T* s = A.s + a * A.bn;
    int32_t cp = 0, cn = 0;
    for (int32_t c = 0; c < bn; ++c) {
      const int32_t adm = M.adm(c), p = adm & M.pos(c);
      const T x = s[c] * inv_t;
      A.x[c] = adm ? x : ninf;
      A.y[c] = p ? x : T(0);
      cp += p;
      cn += adm - p;
    }
    np[a] += cp;
    nn[a] += cn;
    merge_row(lse[a], A.x, bn);
    psum[a] += acc(lane_sum(A.y, bn));
  }
}

// NT-Xent pass 1: (max, sum) over Q of s/tau; the counts.
template <typename T, bool IDS>
FASTMINE_CPU_CLONES void ntxent_neg_tile(const Codes& C, const FwdTile<T>& A, T inv_t, Lse* lse,
                                         int64_t* np, int64_t* nn) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int32_t bn = static_cast<int32_t>(A.bn);
  for (int64_t a = 0; a < A.bm; ++a) {
    const RowMask<IDS> M = row_mask<IDS>(C, A.i0 + a, A.j0);
    const T* s = A.s + a * A.bn;
    int32_t cp = 0, cn = 0;
    for (int32_t c = 0; c < bn; ++c) {
      const int32_t adm = M.adm(c), p = adm & M.pos(c);
      A.x[c] = adm - p ? s[c] * inv_t : ninf;
      cp += p;
      cn += adm - p;
    }
    np[a] += cp;
    nn[a] += cn;
    merge_row(lse[a], A.x, bn);
  }
}

// NT-Xent pass 2: per positive pair (a, s) of the block, in the order of the
// pass-1 tiles (tile, row, column), softplus(N_i - s/tau) and sigmoid(..) in
// double.  The pairs come from pos_pairs (recorded in pass 1, no GEMM) or, when
// they overflowed its cap, from the tiles recomputed: the same values in the
// same order, so both give the same bits.
template <typename T>
struct PosPair {
  int32_t a;  // the anchor's row in its block
  T s;
};

// Appends the tile's positive pairs to out; false (out cleared) past cap.
template <typename T, bool IDS>
bool pos_pairs(const Codes& C, const FwdTile<T>& A, std::vector<PosPair<T>>& out, size_t cap) {
  const int32_t bn = static_cast<int32_t>(A.bn);
  for (int64_t a = 0; a < A.bm; ++a) {
    const RowMask<IDS> M = row_mask<IDS>(C, A.i0 + a, A.j0);
    const T* s = A.s + a * A.bn;
    for (int32_t c = 0; c < bn; ++c) {
      if (!(M.adm(c) & M.pos(c))) continue;
      if (out.size() == cap) {
        out.clear();
        return false;
      }
      out.push_back({static_cast<int32_t>(a), s[c]});
    }
  }
  return true;
}

template <typename T>
void ntxent_pos_terms(const std::vector<PosPair<T>>& pairs, acc t, const acc* nlse, acc* term,
                      acc* gsum) {
  for (const PosPair<T>& p : pairs) {
    const acc z = nlse[p.a] - acc(p.s) / t;  // -inf without negatives: 0 and 0
    term[p.a] += softplus(z);
    gsum[p.a] += sigmoid(z);
  }
}

// MS with the miner, pass 0: min over P and max over Q of s.
template <typename T, bool IDS>
FASTMINE_CPU_CLONES void ms_mine_tile(const Codes& C, const FwdTile<T>& A, acc* minpos,
                                      acc* maxneg) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int32_t bn = static_cast<int32_t>(A.bn);
  for (int64_t a = 0; a < A.bm; ++a) {
    const RowMask<IDS> M = row_mask<IDS>(C, A.i0 + a, A.j0);
    const T* s = A.s + a * A.bn;
    for (int32_t c = 0; c < bn; ++c) {
      const int32_t adm = M.adm(c), p = adm & M.pos(c);
      A.x[c] = p ? -s[c] : ninf;  // min over P = -max of -s
      A.y[c] = adm - p ? s[c] : ninf;
    }
    minpos[a] = std::min(minpos[a], -acc(lane_max(A.x, bn)));
    maxneg[a] = std::max(maxneg[a], acc(lane_max(A.y, bn)));
  }
}

// MS: (max, sum) over the selected P of alpha (base - s) and over the selected
// Q of beta (s - base).  Selected: every pair without the miner (thresholds
// +-inf); with it, s - eps < max over Q (P) and s + eps > min over P (Q).
template <typename T, bool IDS>
FASTMINE_CPU_CLONES void ms_tile(const Codes& C, const FwdTile<T>& A, T alpha, T beta, T base,
                                 acc eps, const acc* thp, const acc* thn, Lse* lp, Lse* ln) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int32_t bn = static_cast<int32_t>(A.bn);
  for (int64_t a = 0; a < A.bm; ++a) {
    const RowMask<IDS> M = row_mask<IDS>(C, A.i0 + a, A.j0);
    const T* s = A.s + a * A.bn;
    const acc tp = thp[a], tn = thn[a];
    for (int32_t c = 0; c < bn; ++c) {
      const int32_t adm = M.adm(c), p = adm & M.pos(c);
      const T v = s[c];
      const int32_t selp = p & (acc(v) - eps < tp);
      const int32_t seln = (adm - p) & (acc(v) + eps > tn);
      A.x[c] = selp ? alpha * (base - v) : ninf;
      A.y[c] = seln ? beta * (v - base) : ninf;
    }
    merge_row(lp[a], A.x, bn);
    merge_row(ln[a], A.y, bn);
  }
}

// The tile S = Q[i0:i0+bm] R[j0:j0+bn]^T into buf (bm x bn, row-major).
void tile(const Rows& R, at::Tensor& buf, int64_t i0, int64_t bm, int64_t j0, int64_t bn) {
  at::Tensor dot = buf.narrow(0, 0, bm * bn).view({bm, bn});
  at::mm_out(dot, R.q.narrow(0, i0, bm), R.r.narrow(0, j0, bn).t());
}

// Per-anchor statistics, rows of the float64 [6, N] stats tensor
// (docs/contrastive.md, "Streaming forward"):
//   0  SupCon: LSE over P u Q of s/tau;  NT-Xent: N_i (LSE over Q of s/tau);  MS: A_i
//   1  NT-Xent: G_i = dterm_i/dN_i;  MS: B_i;  SupCon: 0
//   2  P_i, the positive count;  3  Q_i, the negative count (SupCon, NT-Xent)
//   4, 5  MS with the miner: min over P of s, max over Q of s (+inf, -inf when empty)
constexpr int64_t kStats = 6;

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Rows& R, const Loss& L) {
  const int64_t n = R.n, m = R.m, bs = R.block;
  std::vector<acc> st0(n), st1(n), st3(n, kInf), st4(n, -kInf);
  std::vector<acc> term(n, 0.0);  // per-anchor loss (NT-Xent: sum over its pairs)
  std::vector<int64_t> npos(n, 0), nneg(n, 0);
  const bool ids = R.c.qid != nullptr;
  const int64_t nblocks = (n + bs - 1) / bs;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    const int64_t cols = std::min(bs, std::max<int64_t>(m, 1));
    at::Tensor buf = at::empty({bs * cols}, R.q.options());
    std::vector<T> xs(cols), ys(cols);
    std::vector<Lse> l1(bs), l2(bs);
    std::vector<acc> psum(bs);
    // NT-Xent: the block's positive pairs, at most a tile's worth (O(block^2))
    const size_t pair_cap = static_cast<size_t>(bs * cols);
    constexpr size_t kNoCap = std::numeric_limits<size_t>::max();
    std::vector<PosPair<T>> pairs;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * bs, bm = std::min(bs, n - i0);
      // One sweep over the reference blocks: f(tile) per tile.
      auto sweep = [&](auto&& f) {
        for (int64_t j0 = 0; j0 < m; j0 += bs) {
          const int64_t bn = std::min(bs, m - j0);
          tile(R, buf, i0, bm, j0, bn);
          f(FwdTile<T>{buf.data_ptr<T>(), i0, bm, j0, bn, xs.data(), ys.data()});
        }
      };
      if (L.kind == kContrastiveSupCon) {
        const acc t = L.p0;
        std::fill(l1.begin(), l1.end(), Lse{-kInf, 0.0});
        std::fill(psum.begin(), psum.end(), 0.0);
        sweep([&](const FwdTile<T>& A) {
          if (ids) {
            supcon_tile<T, true>(R.c, A, T(1 / t), l1.data(), psum.data(), &npos[i0], &nneg[i0]);
          } else {
            supcon_tile<T, false>(R.c, A, T(1 / t), l1.data(), psum.data(), &npos[i0], &nneg[i0]);
          }
        });
        for (int64_t a = 0; a < bm; ++a) {
          const int64_t i = i0 + a;
          st0[i] = l1[a].value();
          term[i] = npos[i] > 0 ? st0[i] - psum[a] / acc(npos[i]) : 0.0;
          if (!std::isfinite(st0[i])) st0[i] = 0.0;  // no candidate: never read
        }
      } else if (L.kind == kContrastiveNTXent) {
        const acc t = L.p0;
        std::fill(l1.begin(), l1.end(), Lse{-kInf, 0.0});
        pairs.clear();
        bool cached = true;
        sweep([&](const FwdTile<T>& A) {  // pass 1: negatives (and the positive pairs)
          if (ids) {
            ntxent_neg_tile<T, true>(R.c, A, T(1 / t), l1.data(), &npos[i0], &nneg[i0]);
            cached = cached && pos_pairs<T, true>(R.c, A, pairs, pair_cap);
          } else {
            ntxent_neg_tile<T, false>(R.c, A, T(1 / t), l1.data(), &npos[i0], &nneg[i0]);
            cached = cached && pos_pairs<T, false>(R.c, A, pairs, pair_cap);
          }
        });
        for (int64_t a = 0; a < bm; ++a) st0[i0 + a] = l1[a].value();
        // pass 2: positive pairs, recorded by pass 1 unless more than a tile's
        // worth (then the tiles are recomputed)
        if (cached) {
          ntxent_pos_terms(pairs, t, &st0[i0], &term[i0], &st1[i0]);
        } else {
          sweep([&](const FwdTile<T>& A) {
            pairs.clear();
            if (ids) {
              pos_pairs<T, true>(R.c, A, pairs, kNoCap);
            } else {
              pos_pairs<T, false>(R.c, A, pairs, kNoCap);
            }
            ntxent_pos_terms(pairs, t, &st0[i0], &term[i0], &st1[i0]);
          });
        }
      } else {  // Multi-Similarity
        const T alpha = T(L.p0), beta = T(L.p1), base = T(L.p2);
        if (L.mined) {  // pass 0: min over P and max over Q of s
          sweep([&](const FwdTile<T>& A) {
            if (ids) {
              ms_mine_tile<T, true>(R.c, A, &st3[i0], &st4[i0]);
            } else {
              ms_mine_tile<T, false>(R.c, A, &st3[i0], &st4[i0]);
            }
          });
        }
        // thresholds: without the miner every pair is selected (+-inf)
        const acc* thp = L.mined ? &st4[i0] : nullptr;
        const acc* thn = L.mined ? &st3[i0] : nullptr;
        std::vector<acc> all_p, all_n;
        if (!L.mined) {
          all_p.assign(bm, kInf);
          all_n.assign(bm, -kInf);
          thp = all_p.data();
          thn = all_n.data();
        }
        std::fill(l1.begin(), l1.end(), Lse{0.0, 1.0});
        std::fill(l2.begin(), l2.end(), Lse{0.0, 1.0});
        sweep([&](const FwdTile<T>& A) {
          if (ids) {
            ms_tile<T, true>(R.c, A, alpha, beta, base, L.eps, thp, thn, l1.data(), l2.data());
          } else {
            ms_tile<T, false>(R.c, A, alpha, beta, base, L.eps, thp, thn, l1.data(), l2.data());
          }
        });
        for (int64_t a = 0; a < bm; ++a) {
          const int64_t i = i0 + a;
          st0[i] = l1[a].value();
          st1[i] = l2[a].value();
          term[i] = st0[i] / L.p0 + st1[i] / L.p1;
        }
      }
    }
  });

  at::Tensor stats = at::empty({kStats, n}, R.q.options().dtype(at::kDouble));
  at::Tensor terms = at::empty({n}, R.q.options());
  double* sp = stats.data_ptr<double>();
  T* tp = terms.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    sp[i] = st0[i];
    sp[n + i] = st1[i];
    sp[2 * n + i] = acc(npos[i]);
    sp[3 * n + i] = acc(nneg[i]);
    sp[4 * n + i] = st3[i];
    sp[5 * n + i] = st4[i];
    tp[i] = T(term[i]);
  }
  return {terms, stats};
}

// The backward's per-anchor coefficients in the tile's dtype (from the stats
// and gamma = dL/dterm; the table of docs/contrastive.md):
//   SupCon   g = c1 (e^{s/tau - a0} - [pos] c2),  a0 = LSE_i, c1 = gamma_i/tau,
//            c2 = 1/P_i  (c1 = c2 = 0 when P_i = 0: term_i = 0)
//   NT-Xent  e = e^{s/tau - a0}, a0 = N_i:  pos  -c1 sigma(N_i - s/tau) = -c1/(1 + e),
//            c1 = gamma_i/tau;  neg  c2 e, c2 = gamma_i G_i/tau
//   MS       pos  -c1 e^{alpha(base - s) - a0}, neg  c1 e^{beta(s - base) - a1},
//            a0 = A_i, a1 = B_i, c1 = gamma_i; selected pairs only (thp, thn:
//            the forward's thresholds, +-inf without the miner)
template <typename T>
struct Coef {
  const T *a0, *a1, *c1, *c2;
  const acc *thp, *thn;
  T inv_t, alpha, beta, base;
  acc eps;
};

// gamma_k dterm_k/ds for anchor k and one reference at similarity s.
// (Every operand is loaded before the selects: a load in one arm of a ?: is
// control flow that GCC does not vectorise.)
template <typename T, int64_t KIND>
FASTMINE_INLINE T pair_grad(const Coef<T>& K, int64_t k, T s, int32_t adm, int32_t pos) {
  const T a0 = K.a0[k], c1 = K.c1[k];
  if constexpr (KIND == kContrastiveSupCon) {
    const T c2 = K.c2[k];
    const T e = tile_exp(s * K.inv_t - a0);
    const T v = c1 * (e - (pos ? c2 : T(0)));
    return adm ? v : T(0);
  } else if constexpr (KIND == kContrastiveNTXent) {
    const T c2 = K.c2[k];
    const T e = tile_exp(s * K.inv_t - a0);  // +inf when N_i = -inf: sigma = 0
    const T v = pos ? -c1 / (T(1) + e) : c2 * e;
    return adm ? v : T(0);
  } else {
    const T a1 = K.a1[k];
    const acc thp = K.thp[k], thn = K.thn[k];
    const T e = tile_exp(pos ? K.alpha * (K.base - s) - a0 : K.beta * (s - K.base) - a1);
    const int32_t selp = acc(s) - K.eps < thp, seln = acc(s) + K.eps > thn;
    const int32_t sel = adm & (pos ? selp : seln);
    return sel ? (pos ? -c1 : c1) * e : T(0);
  }
}

// g (bm x bn) on the tile s of anchors i0.. and references j0..; SYM (the
// references are the batch): plus H, anchor j0 + c's gradient w.r.t. reference
// i0 + a at s_ji = s_ij (the column anchor's coefficients; its same-sample and
// label tests with the roles of q and r swapped).
template <typename T, int64_t KIND, bool IDS, bool SYM>
FASTMINE_CPU_CLONES void grad_tile(const Codes& C, const Coef<T>& K, const T* s, T* g,
                                   int64_t i0, int64_t bm, int64_t j0, int64_t bn) {
  const int32_t n = static_cast<int32_t>(bn);
  for (int64_t a = 0; a < bm; ++a) {
    const int64_t i = i0 + a;
    const RowMask<IDS> M = row_mask<IDS>(C, i, j0);
    const int32_t li_ref = C.rl[i], id_ref = IDS ? C.rid[i] : 0;
    const int32_t* lj = C.ql + j0;
    const int32_t* idj = IDS ? C.qid + j0 : nullptr;
    const T* sr = s + a * bn;
    T* gr = g + a * bn;
    for (int32_t c = 0; c < n; ++c) {
      T v = pair_grad<T, KIND>(K, i, sr[c], M.adm(c), M.pos(c));
      if constexpr (SYM) {
        const int32_t adm = IDS ? idj[c] != id_ref : c != M.dj;
        v += pair_grad<T, KIND>(K, j0 + c, sr[c], adm, lj[c] == li_ref);
      }
      gr[c] = v;
    }
  }
}

// Calls f(kind, ids) with both as compile-time constants.
template <typename F>
void with_kind(int64_t kind, bool ids, F&& f) {
  auto go = [&](auto k) {
    if (ids) {
      f(k, std::true_type{});
    } else {
      f(k, std::false_type{});
    }
  };
  if (kind == kContrastiveSupCon) {
    go(std::integral_constant<int64_t, kContrastiveSupCon>{});
  } else if (kind == kContrastiveNTXent) {
    go(std::integral_constant<int64_t, kContrastiveNTXent>{});
  } else {
    go(std::integral_constant<int64_t, kContrastiveMultiSimilarity>{});
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(const Rows& R, const Loss& L,
                                                 const at::Tensor& grad, const at::Tensor& stats,
                                                 bool ref_grad) {
  const int64_t n = R.n, m = R.m, bs = R.block;
  const double* sp = stats.data_ptr<double>();
  const T* gamma = grad.data_ptr<T>();
  // the coefficients (Coef)
  std::vector<T> a0(n), a1(n), c1(n), c2(n);
  std::vector<acc> thp(n, kInf), thn(n, -kInf);
  for (int64_t i = 0; i < n; ++i) {
    const acc w = acc(gamma[i]), s0 = sp[i], s1 = sp[n + i], p = sp[2 * n + i];
    a0[i] = T(s0);
    if (L.kind == kContrastiveSupCon) {
      c1[i] = p > 0 ? T(w / L.p0) : T(0);
      c2[i] = p > 0 ? T(1.0 / p) : T(0);
    } else if (L.kind == kContrastiveNTXent) {
      c1[i] = T(w / L.p0);
      c2[i] = T(w / L.p0 * s1);
    } else {
      a1[i] = T(s1);
      c1[i] = T(w);
      if (L.mined) {
        thp[i] = sp[5 * n + i];  // max over Q of s
        thn[i] = sp[4 * n + i];  // min over P of s
      }
    }
  }
  const Coef<T> K{a0.data(), a1.data(), c1.data(), c2.data(), thp.data(), thn.data(),
                  T(1 / L.p0),  T(L.p0),   T(L.p1),   T(L.p2),   L.eps};
  const bool ids = R.c.qid != nullptr;
  auto grad_of = [&](bool sym, const T* s, T* g, int64_t i0, int64_t bm, int64_t j0,
                     int64_t bn) {
    with_kind(L.kind, ids, [&](auto kind, auto has_ids) {
      constexpr int64_t KIND = decltype(kind)::value;
      constexpr bool IDS = decltype(has_ids)::value;
      if (sym) {
        grad_tile<T, KIND, IDS, true>(R.c, K, s, g, i0, bm, j0, bn);
      } else {
        grad_tile<T, KIND, IDS, false>(R.c, K, s, g, i0, bm, j0, bn);
      }
    });
  };
  at::Tensor dq = at::zeros_like(R.q);
  const int64_t cap = bs * std::min(bs, std::max<int64_t>(std::max(n, m), 1));
  // anchor blocks own rows of dQ: dQ_blk += G R_blk (self: += (G + H) Q_blk)
  at::parallel_for(0, (n + bs - 1) / bs, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor buf = at::empty({cap}, R.q.options()), gbuf = at::empty({cap}, R.q.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * bs, bm = std::min(bs, n - i0);
      at::Tensor dqb = dq.narrow(0, i0, bm);
      for (int64_t j0 = 0; j0 < m; j0 += bs) {
        const int64_t bn = std::min(bs, m - j0);
        tile(R, buf, i0, bm, j0, bn);
        grad_of(R.c.self, buf.data_ptr<T>(), gbuf.data_ptr<T>(), i0, bm, j0, bn);
        dqb.addmm_(gbuf.narrow(0, 0, bm * bn).view({bm, bn}), R.r.narrow(0, j0, bn));
      }
    }
  });
  if (R.c.self || !ref_grad) return {dq, at::empty({0, R.d}, R.q.options())};
  // reference blocks own rows of dR: dR_blk += G^T Q_blk; the tiles are formed
  // exactly as in the forward (the same Q_blk R_blk^T products).
  at::Tensor dr = at::zeros_like(R.r);
  at::parallel_for(0, (m + bs - 1) / bs, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor buf = at::empty({cap}, R.q.options()), gbuf = at::empty({cap}, R.q.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t j0 = blk * bs, bn = std::min(bs, m - j0);
      at::Tensor drb = dr.narrow(0, j0, bn);
      for (int64_t i0 = 0; i0 < n; i0 += bs) {
        const int64_t bm = std::min(bs, n - i0);
        tile(R, buf, i0, bm, j0, bn);
        grad_of(false, buf.data_ptr<T>(), gbuf.data_ptr<T>(), i0, bm, j0, bn);
        drb.addmm_(gbuf.narrow(0, 0, bm * bn).view({bm, bn}).t(), R.q.narrow(0, i0, bm));
      }
    }
  });
  return {dq, dr};
}

// Dense int32 codes of two index vectors over their union (equal codes <=>
// equal values; the ranks of torch.unique), [len a] and [len b].
std::pair<at::Tensor, at::Tensor> codes(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor both = at::cat({a.reshape(-1).to(at::kLong), b.reshape(-1).to(at::kLong)});
  TORCH_CHECK_VALUE(both.numel() < std::numeric_limits<int32_t>::max(),
                    "fastmine::contrastive: N + M must be below 2^31");
  const at::Tensor inv = std::get<1>(at::_unique2(both, /*sorted=*/true, /*return_inverse=*/true,
                                                  /*return_counts=*/false))
                             .to(at::kInt);
  return {inv.narrow(0, 0, a.numel()).contiguous(),
          inv.narrow(0, a.numel(), b.numel()).contiguous()};
}

// Checks and raw pointers (the Python entry point has checked the arguments
// and the data, naming them; these guard the raw op).
Rows rows(const at::Tensor& q, const c10::optional<at::Tensor>& r, const at::Tensor& labels,
          const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
          const c10::optional<at::Tensor>& ref_ids, int64_t block, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(q.dim() == 2 && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "fastmine::contrastive: q must be a 2-D float32/float64 tensor (normalised rows)");
  TORCH_CHECK_VALUE(block >= 1, "fastmine::contrastive: block must be >= 1, got ", block);
  Rows R;
  R.c.self = !r.has_value();
  R.q = q.contiguous();
  R.r = R.c.self ? R.q : r->contiguous();
  TORCH_CHECK(R.r.dim() == 2 && R.r.size(1) == R.q.size(1) &&
                  R.r.scalar_type() == R.q.scalar_type(),
              "fastmine::contrastive: r must be [M, D] with q's D and dtype");
  R.n = R.q.size(0);
  R.m = R.r.size(0);
  R.d = R.q.size(1);
  R.block = block;
  TORCH_CHECK_VALUE(labels.numel() == R.n && ref_labels.numel() == R.m,
                    "fastmine::contrastive: labels / ref_labels lengths must be N / M");
  TORCH_CHECK_VALUE(query_ids.has_value() == ref_ids.has_value(),
                    "fastmine::contrastive: query_ids and ref_ids go together");
  auto [ql, rl] = codes(labels, ref_labels);
  keep.push_back(ql);
  keep.push_back(rl);
  R.c.ql = ql.data_ptr<int32_t>();
  R.c.rl = rl.data_ptr<int32_t>();
  R.c.qid = R.c.rid = nullptr;
  if (query_ids.has_value()) {
    TORCH_CHECK_VALUE(query_ids->numel() == R.n && ref_ids->numel() == R.m,
                      "fastmine::contrastive: query_ids / ref_ids lengths must be N / M");
    auto [qid, rid] = codes(*query_ids, *ref_ids);
    keep.push_back(qid);
    keep.push_back(rid);
    R.c.qid = qid.data_ptr<int32_t>();
    R.c.rid = rid.data_ptr<int32_t>();
  }
  return R;
}

Loss loss_args(int64_t kind, double p0, double p1, double p2, c10::optional<double> epsilon) {
  TORCH_CHECK_VALUE(kind == kContrastiveSupCon || kind == kContrastiveNTXent ||
                        kind == kContrastiveMultiSimilarity,
                    "fastmine::contrastive: unknown loss code ", kind);
  return Loss{kind, p0, p1, p2, epsilon.has_value(), epsilon.value_or(0.0)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> contrastive_cpu(
    const at::Tensor& q, const c10::optional<at::Tensor>& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
    const c10::optional<at::Tensor>& ref_ids, int64_t loss, double p0, double p1, double p2,
    c10::optional<double> epsilon, int64_t block) {
  std::vector<at::Tensor> keep;
  const Rows R = rows(q, r, labels, ref_labels, query_ids, ref_ids, block, keep);
  const Loss L = loss_args(loss, p0, p1, p2, epsilon);
  if (R.q.scalar_type() == at::kDouble) return forward_impl<double>(R, L);
  return forward_impl<float>(R, L);
}

std::tuple<at::Tensor, at::Tensor> contrastive_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const c10::optional<at::Tensor>& r,
    const at::Tensor& labels, const at::Tensor& ref_labels,
    const c10::optional<at::Tensor>& query_ids, const c10::optional<at::Tensor>& ref_ids,
    int64_t loss, double p0, double p1, double p2, c10::optional<double> epsilon, int64_t block,
    const at::Tensor& stats, bool ref_grad) {
  std::vector<at::Tensor> keep;
  const Rows R = rows(q, r, labels, ref_labels, query_ids, ref_ids, block, keep);
  const Loss L = loss_args(loss, p0, p1, p2, epsilon);
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.dim() == 2 &&
                  stats.size(0) == kStats && stats.size(1) == R.n,
              "fastmine::contrastive_backward: stats must be the forward's float64 [6, N]");
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == R.n,
              "fastmine::contrastive_backward: grad must be [N] (one per anchor term)");
  const at::Tensor st = stats.contiguous();
  const at::Tensor g = grad.to(R.q.scalar_type()).contiguous();
  if (R.q.scalar_type() == at::kDouble) return backward_impl<double>(R, L, g, st, ref_grad);
  return backward_impl<float>(R, L, g, st, ref_grad);
}

}  // namespace cpu
}  // namespace fastmine
