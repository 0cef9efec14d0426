// CUDA kernels of fastmine::mine_topk (issue #17; docs/topk.md, "CUDA"):
// per anchor, the k best (key, index) pairs of the positives and of the
// negatives, including distance-weighted sampling (Gumbel-top-k); torch-free,
// raw pointers and a stream.  The torch launcher is mine_topk_cuda.cu.
//
// Reused from mine_kernels.cuh: the tiles and the dot path (dot_tile), the
// row terms with the data-check flag (row_terms_kernel), the (key, index)
// order (better), the split heuristic (choose_splits), the pair distances
// (pair_distance_launch with k columns).  The rules are strategies.h (mining
// value, same-sample rule, semi-hard window, signs) and sampling.h (noise,
// prune bound, log-weight).
//
// Keys.  Every list is "smaller key is better", as the k = 1 kernels:
//   nearest rules (pos easy, neg hard, neg semihard)  key = v
//   farthest rules (pos hard, neg easy)              key = -v
//   neg distance_weighted                            key = -(lw + g)  (float32
//                                                    value, held in acc_t)
// so the largest lw + g is the best, exact ties by the smallest index.
//
// Per thread.  As mine_forward_kernel: a block owns BM anchor rows and one
// split of the reference tiles; thread t owns row t / TPR.  Here it owns the
// column *quads* q = t % TPR, t % TPR + TPR, ... of each BN-wide tile (columns
// 4q .. 4q+3), so that the four columns that share one Philox call (noise_words:
// counter j >> 2) are scanned by one thread, which draws the words once,
// lazily, when the first of them survives the prune.  Its lists (KP positive,
// KN negative slots, compile-time bounds) are sorted arrays of (key, index),
// empty slots (+inf, kNoIndex) last, kept in registers (fully unrolled
// insertion, constant indices).  A thread scans its columns in increasing j,
// so a candidate enters iff its key is strictly below the last slot's, and
// it goes after every kept entry with an equal key (which has a smaller j):
// the list is always sorted by (key, index).
//
// Distance-weighted, per admissible negative: lw = dw_log_weight(v) (-inf:
// w = 0, skipped); pruned when fl(lw + kGumbelMax) < the last slot's lw + g
// (no computed g exceeds kGumbelMax, so the pair could neither beat nor tie
// it: pruning changes no pick); otherwise key = lw + noise_gumbel(word j & 3).
//
// Merges, all lexicographic on (key, index), so the result is independent
// of how the references were split:
//   * the TPR lanes of a row (adjacent lanes of a warp) by log2(TPR) rounds of
//     a bitonic two-list merge through warp shuffles (merge_with_lane), after
//     which every lane holds the row's list for its split;
//   * the splits: lane 0 writes its list to the workspace ([splits, n, K]),
//     and topk_merge_kernel (one thread per row) merges the splits' lists,
//     writes the first k entries (-1 for empty slots) and, after a
//     positive-only sweep, the semi-hard window of positive 0.
// Semi-hard runs two sweeps as in mine: positives (PosOnly), then negatives
// inside the window (NegWindow).  Every other rule is one fused sweep.  The
// pass is a kernel argument (uniform branches), so both use the same kernels.
#pragma once

#include "mine_kernels.cuh"

#include "fastmine/sampling.h"

namespace fastmine {
namespace cuda {

// The largest k of a list (k_pos and k_neg each); the instantiated bounds
// are the powers of two up to it (topk_bound).
constexpr int kTopkMaxK = 64;

// The compile-time list capacity for k (1 <= k <= kTopkMaxK): the smallest
// power of two >= k.
FASTMINE_HD inline int topk_bound(int64_t k) {
  int b = 1;
  while (b < k) b *= 2;
  return b;
}

// A sorted list of K (key, index) pairs, smaller key first, exact ties by the
// smaller index; empty slots (+inf, kNoIndex) last.
template <typename acc_t, int K>
struct TopkList {
  acc_t key[K];
  int64_t idx[K];

  __device__ inline void clear() {
#pragma unroll
    for (int s = 0; s < K; ++s) {
      key[s] = acc_inf<acc_t>();
      idx[s] = kNoIndex;
    }
  }
  // The admission threshold: a candidate scanned after every entry (a larger
  // index) enters iff its key is below this.
  __device__ inline acc_t last() const { return key[K - 1]; }
  // Insert (k, j) with k < last() and j larger than every kept index: it goes
  // after the entries with key <= k, the last entry falls off.  Constant
  // indices only (the array stays in registers).
  __device__ inline void insert(acc_t k, int64_t j) {
    bool placed = false;
#pragma unroll
    for (int s = K - 1; s > 0; --s) {
      if (!placed) {
        if (key[s - 1] > k) {
          key[s] = key[s - 1];
          idx[s] = idx[s - 1];
        } else {
          key[s] = k;
          idx[s] = j;
          placed = true;
        }
      }
    }
    if (!placed) {
      key[0] = k;
      idx[0] = j;
    }
  }
};

// Merge this lane's list with lane (lane ^ off)'s: both lanes end with the K
// best of the two lists by (key, index), sorted.  A bitonic merge, so that
// every array index is a compile-time constant and the lists stay in
// registers: for sorted A (this lane) and B (the partner, read by a shuffle of
// the mirrored slot), c[s] = the better of A[s] and B[K-1-s] are exactly the
// K best of A u B, in a bitonic order; log2(K) rounds of compare-exchange
// sort them.  (better is a strict order here: the lanes own disjoint columns,
// and empty slots are identical, so both lanes hold the same list after.)
// Every lane of the warp must call it (shuffles); off < 32.
template <typename acc_t, int K>
__device__ inline void merge_with_lane(TopkList<acc_t, K>& L, int off) {
  acc_t ck[K];
  int64_t ci[K];
#pragma unroll
  for (int s = 0; s < K; ++s) {
    const acc_t pk = __shfl_xor_sync(0xffffffffu, L.key[K - 1 - s], off);
    const int64_t pi = __shfl_xor_sync(0xffffffffu, L.idx[K - 1 - s], off);
    const bool mine = better(L.key[s], L.idx[s], pk, pi);
    ck[s] = mine ? L.key[s] : pk;
    ci[s] = mine ? L.idx[s] : pi;
  }
#pragma unroll
  for (int stride = K / 2; stride > 0; stride /= 2) {
#pragma unroll
    for (int s = 0; s < K; ++s) {
      if ((s & stride) == 0 && better(ck[s + stride], ci[s + stride], ck[s], ci[s])) {
        const acc_t tk = ck[s];
        const int64_t ti = ci[s];
        ck[s] = ck[s + stride];
        ci[s] = ci[s + stride];
        ck[s + stride] = tk;
        ci[s + stride] = ti;
      }
    }
  }
#pragma unroll
  for (int s = 0; s < K; ++s) {
    L.key[s] = ck[s];
    L.idx[s] = ci[s];
  }
}

// Everything the top-k kernels read: the k = 1 kernels' arguments (tiles,
// terms, labels, ids, window, signs, splits; their part_* pointers are the
// [splits, n, K] lists here) and the distance-weighted draw.
template <typename T>
struct TopkArgs {
  using acc_t = typename AccOf<T>::type;
  ForwardArgs<T> f;
  bool cosine;            // Distance::Cosine (else the squared-Euclidean family)
  bool dw;                // the negatives are drawn (NegStrategy::DistanceWeighted)
  DwParams<acc_t> w;      // dw_log_weight's parameters (sampling.h)
  uint64_t seed;          // the noise key
};

// One block: BM anchors x one split of the reference axis; lists of KP
// positives and KN negatives per thread (a semi-hard pass leaves one unused).
template <typename T, DotPath P, int KP, int KN>
__global__ void __launch_bounds__(TileConfig<T, P>::NT)
    mine_topk_forward_kernel(const TopkArgs<T> A, const Pass pass) {
  using C = TileConfig<T, P>;
  using acc_t = typename C::acc_t;
  // The pass is a kernel argument (uniform branches), not a template
  // parameter: the semi-hard sweeps reuse the fused sweep's kernels.
  const bool do_pos = pass != Pass::NegWindow;
  const bool do_neg = pass != Pass::PosOnly;
  const bool window = pass == Pass::NegWindow;
  static_assert(C::BN % (4 * C::TPR) == 0, "whole quads per thread");
  __shared__ __align__(128) unsigned char smem[C::kSmemBytes];
  const ForwardArgs<T>& F = A.f;
  const acc_t inf = acc_inf<acc_t>();

  const int64_t i0 = int64_t(blockIdx.x) * C::BM;
  const int row = threadIdx.x / C::TPR, lane_col = threadIdx.x % C::TPR;
  const int64_t i = i0 + row;
  const bool row_ok = i < F.n;
  const acc_t ai = row_ok ? F.a[i] : acc_t(0);
  const int64_t li = row_ok ? F.ql[i] : 0;
  const bool explicit_ids = F.ids == Ids::Explicit;
  const int64_t qi = (row_ok && explicit_ids) ? F.qid[i] : 0;
  acc_t lo = inf, hi = inf;
  if (window && row_ok) { lo = F.lo[i]; hi = F.hi[i]; }
  // A semi-hard row without a positive has lo = +inf: nothing is admissible.
  const bool row_active = row_ok && (!window || lo < inf);

  TopkList<acc_t, KP> pos;
  TopkList<acc_t, KN> neg;
  pos.clear();
  neg.clear();
  const int64_t tiles = (F.m + C::BN - 1) / C::BN;
  const int64_t t0 = int64_t(blockIdx.y) * F.tiles_per_split;
  const int64_t t1 = t0 + F.tiles_per_split < tiles ? t0 + F.tiles_per_split : tiles;
  const acc_t* Cs = reinterpret_cast<const acc_t*>(smem);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j0 = t * C::BN;  // a multiple of 4: quads of the tile are quads of j
    dot_tile<T, P>(smem, F.x, F.r, i0, j0, F.n, F.m, F.d);
    if (row_active) {
      for (int q = lane_col; q < C::BN / 4; q += C::TPR) {
        uint32_t w0 = 0, w1 = 0, w2 = 0, w3 = 0;
        bool have_words = false;  // the quad's noise, drawn at most once
        // Not unrolled, and one insertion site per list: the K-slot insertion
        // is the bulk of the code (compile time, instruction cache).
#pragma unroll 1
        for (int e = 0; e < 4; ++e) {
          const int c = 4 * q + e;
          const int64_t j = j0 + c;
          if (j >= F.m) break;
          const acc_t v = mining_value<acc_t>(Cs[row * C::LDC + c], ai, F.b[j], A.cosine);
          if (same_sample(F.ids, i, j, qi, explicit_ids ? F.rid[j] : 0)) continue;
          const bool same_label = F.rl[j] == li;
          if (do_pos && same_label) {
            const acc_t k = F.ps * v;
            if (k < pos.last()) pos.insert(k, j);
          }
          if (do_neg && !same_label) {
            acc_t k = inf;  // inf: not a candidate
            if (A.dw) {
              const float lw = dw_log_weight<acc_t>(v, A.w.lo, A.w.hi, A.w.a, A.w.b);
              // w > 0, and not pruned: fl(lw + kGumbelMax) >= the last slot's
              // lw + g (-inf while the list has room), else the pair can
              // neither beat nor tie it.
              if (lw != -INFINITY && !(lw + kGumbelMax < -float(neg.last()))) {
                if (!have_words) {
                  uint32_t wd[4];
                  noise_words(A.seed, uint32_t(i), uint32_t(j >> 2), wd);
                  w0 = wd[0]; w1 = wd[1]; w2 = wd[2]; w3 = wd[3];
                  have_words = true;
                }
                const uint32_t word = e == 0 ? w0 : e == 1 ? w1 : e == 2 ? w2 : w3;  // j & 3
                k = -acc_t(lw + noise_gumbel(word));
              }
            } else if (!window || in_semihard_window(v, lo, hi)) {
              k = F.ns * v;
            }
            if (k < neg.last()) neg.insert(k, j);
          }
        }
      }
    }
    __syncthreads();  // Cs aliases the next tile's stage
  }
  // Merge the TPR lanes of a row (adjacent lanes of one warp).
#pragma unroll
  for (int off = C::TPR / 2; off > 0; off /= 2) {
    if (do_pos) merge_with_lane(pos, off);
    if (do_neg) merge_with_lane(neg, off);
  }
  if (row_ok && lane_col == 0) {
    const int64_t o = int64_t(blockIdx.y) * F.n + i;
#pragma unroll
    for (int s = 0; s < KP; ++s) {
      if (do_pos) { F.part_pkey[o * KP + s] = pos.key[s]; F.part_pidx[o * KP + s] = pos.idx[s]; }
    }
#pragma unroll
    for (int s = 0; s < KN; ++s) {
      if (do_neg) { F.part_nkey[o * KN + s] = neg.key[s]; F.part_nidx[o * KN + s] = neg.idx[s]; }
    }
  }
}

// Row i's lists of the splits ([splits, n, K] layout, each sorted) merged to
// the first k entries by (key, index), written to out[i * k + s] (-1 for an
// empty slot).  A running list (K slots) is merged with each split's list in
// turn: O(splits * K) per row.  Returns the best entry's key and whether it
// exists.
template <typename acc_t, int K>
__device__ inline bool merge_splits(const acc_t* keys, const int64_t* idxs, int64_t n,
                                    int64_t splits, int64_t i, int64_t k, int64_t* out,
                                    acc_t& best_key) {
  acc_t rk[K], tk[K];
  int64_t ri[K], ti[K];
  for (int s = 0; s < K; ++s) {
    rk[s] = keys[i * K + s];
    ri[s] = idxs[i * K + s];
  }
  for (int64_t sp = 1; sp < splits; ++sp) {
    const acc_t* bk = keys + (sp * n + i) * K;
    const int64_t* bi = idxs + (sp * n + i) * K;
    int a = 0, b = 0;
    for (int s = 0; s < K; ++s) {  // a + b == s < K: both heads are in range
      if (better(bk[b], bi[b], rk[a], ri[a])) {
        tk[s] = bk[b];
        ti[s] = bi[b];
        ++b;
      } else {
        tk[s] = rk[a];
        ti[s] = ri[a];
        ++a;
      }
    }
    for (int s = 0; s < K; ++s) {
      rk[s] = tk[s];
      ri[s] = ti[s];
    }
  }
  for (int64_t s = 0; s < k; ++s) out[i * k + s] = ri[s] == kNoIndex ? -1 : ri[s];
  best_key = rk[0];
  return ri[0] != kNoIndex;
}

// Merge the splits of one sweep (one thread per row).  PosOnly also derives
// the semi-hard window (lo, hi) from positive 0's key (key = ps * v_ap).
template <typename acc_t, int KP, int KN>
__global__ void topk_merge_kernel(int64_t n, int64_t splits, int64_t k_pos, int64_t k_neg,
                                  const acc_t* part_pkey, const int64_t* part_pidx,
                                  const acc_t* part_nkey, const int64_t* part_nidx,
                                  int64_t* pos_idx, int64_t* neg_idx, acc_t ps, double margin,
                                  Distance dist, acc_t* lo, acc_t* hi, Pass pass) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  acc_t key;
  if (pass != Pass::NegWindow) {
    const bool has = merge_splits<acc_t, KP>(part_pkey, part_pidx, n, splits, i, k_pos, pos_idx,
                                             key);
    if (pass == Pass::PosOnly) {
      semihard_window<acc_t>(has, key, ps, margin, dist, acc_inf<acc_t>(), lo[i], hi[i]);
    }
  }
  if (pass != Pass::PosOnly) {
    merge_splits<acc_t, KN>(part_nkey, part_nidx, n, splits, i, k_neg, neg_idx, key);
  }
}

// ------------------------------------------------------------------- host side
struct TopkParams {
  SelectParams s;    // sizes, strategies, distance, margin, splits, ids
  int64_t k_pos, k_neg;
  double cutoff, nonzero_loss_cutoff;  // distance-weighted only
  uint64_t seed;                       // distance-weighted only
};

// The reference splits of a top-k call: choose_splits, capped so that the
// per-split lists (splits x n x K entries) stay within 256 x n entries.
inline int64_t topk_splits(int64_t n, int64_t m, int sm_count, int64_t kmax) {
  const int64_t s = choose_splits(n, m, sm_count);
  const int64_t cap = 256 / topk_bound(kmax) > 0 ? 256 / topk_bound(kmax) : 1;
  return s < cap ? s : cap;
}

// The list bounds (KP, KN) of a call, which size its workspace and select
// its kernels: (1, B) for a single positive (the common case: one positive, k
// negatives), else (B, B), with B the bound of max(k_pos, k_neg).  Only these
// pairs are instantiated, and the semi-hard sweeps (the pass is a kernel
// argument) use the same kernels: 13 per dot-path variant (compile time).
struct TopkBounds {
  int kp, kn;
};
inline TopkBounds topk_bounds(int64_t k_pos, int64_t k_neg) {
  const int big = topk_bound(k_pos > k_neg ? k_pos : k_neg);
  return {k_pos == 1 ? 1 : big, big};
}

// Workspace layout (bytes): a[n], b[m], lo[n], hi[n] (acc_t); the lists
// [splits, n, KP] and [splits, n, KN] (topk_bounds): keys (acc_t), then indices (int64).
template <typename acc_t>
inline size_t topk_workspace_bytes(int64_t n, int64_t m, int64_t splits, TopkBounds kb) {
  auto up = [](size_t b) { return (b + 255) / 256 * 256; };
  const int64_t slots = splits * n * (kb.kp + kb.kn);
  return up(sizeof(acc_t) * (3 * n + m)) + up(sizeof(acc_t) * slots) +
         up(sizeof(int64_t) * slots);
}

// The whole top-k selection for one (T, P): row terms (with the data checks),
// one sweep (two for semi-hard), merges.  x [n, d], r [m, d] (r == x: the batch
// is the reference set), labels and ids int64 (ids read only for
// Ids::Explicit); outputs pos_idx int64 [n, k_pos], neg_idx [n, k_neg]
// (row-major, trailing -1).  `workspace`: topk_workspace_bytes(n, m, splits,
// topk_bounds(k_pos, k_neg)) bytes.  bad: as in mine_select_launch.  1 <= k <= kTopkMaxK.
// Never synchronises.  Returns the first launch error.
template <typename T, DotPath P>
cudaError_t mine_topk_launch(const TopkParams& tp, const T* x, const T* r, const int64_t* ql,
                             const int64_t* rl, const int64_t* qid, const int64_t* rid,
                             int64_t* pos_idx, int64_t* neg_idx, void* workspace, int32_t* bad,
                             cudaStream_t stream) {
  using C = TileConfig<T, P>;
  using acc_t = typename C::acc_t;
  const SelectParams& p = tp.s;
  if (p.n == 0) return cudaSuccess;
  auto up = [](size_t b) { return (b + 255) / 256 * 256; };
  const TopkBounds kb = topk_bounds(tp.k_pos, tp.k_neg);
  const int kp = kb.kp, kn = kb.kn;
  unsigned char* w = static_cast<unsigned char*>(workspace);
  acc_t* a = reinterpret_cast<acc_t*>(w);
  acc_t* b = a + p.n;
  acc_t* lo = b + p.m;
  acc_t* hi = lo + p.n;
  w += up(sizeof(acc_t) * (3 * p.n + p.m));
  const int64_t slots = p.splits * p.n * (kp + kn);
  acc_t* pkey = reinterpret_cast<acc_t*>(w);
  acc_t* nkey = pkey + p.splits * p.n * kp;
  w += up(sizeof(acc_t) * slots);
  int64_t* pidx = reinterpret_cast<int64_t*>(w);
  int64_t* nidx = pidx + p.splits * p.n * kp;

  // Row terms first: they carry the data checks, which hold even when m == 0.
  const bool cosine = p.dist == Distance::Cosine;
  const bool self_refs = r == x && p.m == p.n;
  launch_kernel(row_terms_kernel<T>, dim3(unsigned((p.n + 7) / 8)), dim3(256), stream,
                "row_terms_kernel", x, p.n, p.d, cosine, a, bad);
  if (p.m == 0) {  // no references: nothing is selected
    cudaMemsetAsync(pos_idx, 0xff, sizeof(int64_t) * p.n * tp.k_pos, stream);  // -1
    cudaMemsetAsync(neg_idx, 0xff, sizeof(int64_t) * p.n * tp.k_neg, stream);
    return cudaGetLastError();
  }
  if (self_refs) {
    cudaMemcpyAsync(b, a, sizeof(acc_t) * p.n, cudaMemcpyDeviceToDevice, stream);
  } else {
    launch_kernel(row_terms_kernel<T>, dim3(unsigned((p.m + 7) / 8)), dim3(256), stream,
                  "row_terms_kernel", r, p.m, p.d, cosine, b, bad == nullptr ? bad : bad + 1);
  }

  const acc_t ps = pos_sign<acc_t>(p.pos);
  const acc_t ns = neg_sign<acc_t>(p.neg);
  const int64_t tiles = (p.m + C::BN - 1) / C::BN;
  const int64_t per = (tiles + p.splits - 1) / p.splits;
  const int64_t splits = (tiles + per - 1) / per;  // drop empty splits
  TopkArgs<T> A{{x, r, a, b, ql, rl, p.ids, qid, rid, lo, hi, p.n, p.m, p.d, ps, ns, per, pkey,
                 pidx, nkey, nidx},
                cosine, p.neg == NegStrategy::DistanceWeighted,
                dw_params<acc_t>(tp.cutoff, tp.nonzero_loss_cutoff, p.d), tp.seed};
  const dim3 grid(unsigned((p.n + C::BM - 1) / C::BM), unsigned(splits));
  const unsigned mgrid = unsigned((p.n + 255) / 256);
  // The sweeps (one, or semi-hard's two), each with its merge, with list
  // bounds KP, KN (compile time).
  auto sweeps = [&](auto kp_tag, auto kn_tag) {
    constexpr int KP = decltype(kp_tag)::value, KN = decltype(kn_tag)::value;
    const bool semihard = p.neg == NegStrategy::SemiHard;
    for (const Pass pass : {semihard ? Pass::PosOnly : Pass::Fused, Pass::NegWindow}) {
      launch_kernel(mine_topk_forward_kernel<T, P, KP, KN>, grid, dim3(C::NT), stream,
                    "mine_topk_forward_kernel", A, pass);
      launch_kernel(topk_merge_kernel<acc_t, KP, KN>, dim3(mgrid), dim3(256), stream,
                    "topk_merge_kernel", p.n, splits, tp.k_pos, tp.k_neg, pkey, pidx, nkey, nidx,
                    pos_idx, neg_idx, ps, p.margin, p.dist, lo, hi, pass);
      if (!semihard) break;
    }
  };
  // (KP, KN) = (1, B) or (B, B) (topk_bounds), B in {1, 2, 4, ..., kTopkMaxK}.
  auto with_bound = [&](auto b_tag) {
    using B = decltype(b_tag);
    if (kp == 1) sweeps(std::integral_constant<int, 1>{}, B{});
    else sweeps(B{}, B{});
  };
  switch (kn) {
    case 1: with_bound(std::integral_constant<int, 1>{}); break;
    case 2: with_bound(std::integral_constant<int, 2>{}); break;
    case 4: with_bound(std::integral_constant<int, 4>{}); break;
    case 8: with_bound(std::integral_constant<int, 8>{}); break;
    case 16: with_bound(std::integral_constant<int, 16>{}); break;
    case 32: with_bound(std::integral_constant<int, 32>{}); break;
    default: with_bound(std::integral_constant<int, kTopkMaxK>{}); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastmine
