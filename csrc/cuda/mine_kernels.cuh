// CUDA kernels of fastmine::mine (selection, exact pair distances) and
// fastmine::mine_backward; torch-free: raw pointers and a stream.  The torch
// launcher is csrc/cuda/mine_cuda.cu.  The rules (mining value, passes,
// same-sample rule, admissible rows, semi-hard window, splits) are the shared
// definitions of fastmine/strategies.h, which the CPU kernels use too.
//
// Forward, per anchor row i and reference j, without ever holding the N x M matrix:
//   dot(i, j)   tiled BM x BN block tile, K-loop over the embedding dimension in
//               BK slices staged through shared memory; the tile product runs on
//               tensor cores (WMMA: fp16/bf16 inputs, or tf32 for fp32 when the
//               matmul precision allows it) or on FFMA (exact fp32, fp64).
//   v(i, j)     mining_value: squared Euclidean a_i + b_j - 2 dot (a, b = squared
//               norms), cosine 1 - dot * a_i * b_j (a, b = inverse norms),
//               clamped at +0; Euclidean is mined on its square (same order).
//   key         nearest rule: v, farthest rule: -v, +inf when inadmissible
//               (label mask, same-sample rule, semi-hard window lo < v < hi).
//   selection   argmin of the key, ties -> smallest reference index.  Every
//               (key, index) comparison is lexicographic, so the result does not
//               depend on the order in which tiles, threads or splits are merged.
// Labels and ids are read as int64 (no compaction); with the batch as the
// references the same-sample rule is the flag Ids::Self (j == i), not an arange.
// Each block owns BM anchor rows and a contiguous range of reference tiles (a
// "split" of the reference axis, gridDim.y splits so that small N still fills the
// GPU).  Thread t owns row t / TPR of the tile and the columns congruent to
// t % TPR: its running (key, index) for positive and negative live in registers
// across all reference tiles of the block.  The TPR lanes of a row are merged
// with warp shuffles, the splits by merge_kernel.  Semi-hard runs two sweeps:
// positives (PosOnly) then negatives inside the window (NegWindow) whose bounds
// merge_kernel derives from the positive's key (semihard_window).
//
// Data checks: row_terms_kernel computes |x|^2 for the row terms anyway and
// raises a device-side flag for a row that is not admissible (NaN/Inf, norm out
// of range); the launcher asserts on the flag without a host sync.
//
// Pair distances (pair_distance_kernel): d(x_i, r_idx[i]) by direct difference
// from the selected rows, one warp per pair, gathered then upcast: O(N * D).
//
// Backward (pair_backward_kernel): the exact pair gradients of
// fastmine/_pairs.py (see there for the formulas), one block per anchor; dL/dx
// is written densely (the block owns row i).  dL/dr is scattered with atomicAdd
// (RefGrad::Atomic), or written per pair (RefGrad::Contrib) and summed per
// reference row in a fixed order by segment_ref_grad_kernel over the pairs
// sorted (stably) by reference row: bitwise reproducible, O(N * D).  With
// RefGrad::None nothing is formed for the references (a bank without grad).
//
// Indexing is int64 throughout (row * D offsets can exceed 2^31).
#pragma once

#include "cuda_runtime_shim.cuh"  // the toolkit's headers, or the tests' host emulation

#include <cstdint>
#include <cstddef>
#include <type_traits>

#include "fastmine/strategies.h"

namespace fastmine {
namespace cuda {

// How the tile of dot products is computed.
enum class DotPath : int {
  Ffma = 0,  // CUDA cores in the accumulation type (exact fp32 / fp64)
  Wmma = 1,  // tensor cores, fp16/bf16 inputs, fp32 accumulate (sm_70 fp16 / sm_80 bf16)
  Tf32 = 2,  // tensor cores, fp32 inputs rounded to tf32, fp32 accumulate (sm_80)
};

constexpr int64_t kNoIndex = INT64_MAX;  // "no candidate" sentinel while merging

// Every launch goes through launch_kernel (cuda_runtime_shim.cuh).

// ---------------------------------------------------------------- type helpers
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

FASTMINE_HD inline float load_acc(float v) { return v; }
FASTMINE_HD inline double load_acc(double v) { return v; }
__device__ inline float load_acc(__half v) { return __half2float(v); }
__device__ inline float load_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename acc_t> FASTMINE_HD inline acc_t acc_inf();
template <> FASTMINE_HD inline float acc_inf<float>() { return __builtin_huge_valf(); }
template <> FASTMINE_HD inline double acc_inf<double>() { return __builtin_huge_val(); }

// acc_t -> storage type, round to nearest (outputs in the embeddings' dtype).
template <typename T> __device__ inline T from_acc(typename AccOf<T>::type v) { return T(v); }
template <> __device__ inline __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Sum over the 32 lanes of a warp (every lane gets it); fixed butterfly order.
template <typename acc_t>
__device__ inline acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Lexicographic (key, index) order: smaller key, then smaller index.
template <typename acc_t>
FASTMINE_HD inline bool better(acc_t k1, int64_t i1, acc_t k2, int64_t i2) {
  return k1 < k2 || (k1 == k2 && i1 < i2);
}

// ------------------------------------------------------------------ tile config
// BM x BN output tile, BK-deep K slices, NT threads; TPR threads per row.
template <typename T, DotPath P> struct TileConfig {
  static constexpr int BM = 64, BN = 64, NT = 256, TPR = NT / BM;
  static constexpr int BK = (P == DotPath::Ffma) ? (sizeof(T) == 8 ? 16 : 32) : 32;
  using stage_t = typename std::conditional<P == DotPath::Wmma, T, typename AccOf<T>::type>::type;
  using acc_t = typename AccOf<T>::type;
  // Shared-memory strides (elements).  WMMA needs ldm % (16 bytes) == 0.
  static constexpr int LDS = (P == DotPath::Ffma) ? BK + 1 : BK + (P == DotPath::Wmma ? 8 : 4);
  static constexpr int LDC = BN + ((P == DotPath::Ffma && sizeof(acc_t) == 8) ? 1 : 4);
  static constexpr size_t kStageBytes = size_t(BM + BN) * LDS * sizeof(stage_t);
  static constexpr size_t kTileBytes = size_t(BM) * LDC * sizeof(acc_t);
  static constexpr size_t kSmemBytes = kStageBytes > kTileBytes ? kStageBytes : kTileBytes;
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
  static_assert(NT % BM == 0 && BN % TPR == 0, "row ownership");
};

// Everything the forward kernels read.  Terms/labels are per row.
template <typename T>
struct ForwardArgs {
  using acc_t = typename AccOf<T>::type;
  const T* x;              // [n, d] anchors, row-major contiguous
  const T* r;              // [m, d] references
  const acc_t* a;          // [n] anchor terms (|x|^2 or 1/|x|)
  const acc_t* b;          // [m] reference terms
  const int64_t* ql;       // [n] anchor labels
  const int64_t* rl;       // [m] reference labels
  Ids ids;                 // same-sample rule (strategies.h)
  const int64_t* qid;      // [n] (Ids::Explicit only)
  const int64_t* rid;      // [m] (Ids::Explicit only)
  const acc_t* lo;         // [n] semi-hard window (NegWindow only)
  const acc_t* hi;         // [n]
  int64_t n, m, d;
  acc_t ps, ns;            // +1 nearest / -1 farthest
  int64_t tiles_per_split; // reference tiles (of BN) per split
  acc_t* part_pkey;        // [splits, n] partial results
  int64_t* part_pidx;
  acc_t* part_nkey;
  int64_t* part_nidx;
};

// Stage rows [row0, row0 + ROWS) x cols [k0, k0 + BK) of src into smem (zero padded).
template <typename T, typename S, int ROWS, int BK, int LDS, int NT>
__device__ inline void stage_rows(S* dst, const T* src, int64_t row0, int64_t rows, int64_t k0,
                                  int64_t d) {
  for (int e = threadIdx.x; e < ROWS * BK; e += NT) {
    const int rr = e / BK, kk = e % BK;
    const int64_t row = row0 + rr, k = k0 + kk;
    S v{};  // value-initialised: +0 (no float -> __half conversion: torch builds
            // with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__)
    if (row < rows && k < d) {
      if constexpr (std::is_same<S, T>::value) v = src[row * d + k];
      else v = static_cast<S>(load_acc(src[row * d + k]));
    }
    dst[rr * LDS + kk] = v;
  }
}

// WMMA input type and K step per variant.  tf32 (and bf16) fragments exist only
// for sm_80+; older targets never take the tensor-core branch for them
// (kHaveTensor below), but the names must still resolve.
template <typename T, DotPath P> struct WmmaIn { using type = T; static constexpr int KS = 16; };
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <> struct WmmaIn<float, DotPath::Tf32> {
  using type = nvcuda::wmma::precision::tf32;
  static constexpr int KS = 8;
};
__device__ inline float round_tf32(float v) { return nvcuda::wmma::__float_to_tf32(v); }
#else
template <> struct WmmaIn<float, DotPath::Tf32> { using type = float; static constexpr int KS = 8; };
__device__ inline float round_tf32(float v) { return v; }  // unreachable below sm_80
#endif

// C[BM][LDC] (acc_t) = X[i0:i0+BM] . R[j0:j0+BN]^T.
template <typename T, DotPath P>
__device__ inline void dot_tile(unsigned char* smem, const T* __restrict__ x,
                                const T* __restrict__ r, int64_t i0, int64_t j0, int64_t n,
                                int64_t m, int64_t d) {
  using C = TileConfig<T, P>;
  using S = typename C::stage_t;
  using acc_t = typename C::acc_t;
  S* As = reinterpret_cast<S*>(smem);
  S* Bs = As + C::BM * C::LDS;
  acc_t* Cs = reinterpret_cast<acc_t*>(smem);  // aliases the stage (used after the K loop)
  constexpr bool kTensor = P != DotPath::Ffma;
  // Tensor cores of the generation compiled for (FASTMINE_TARGET_ARCH, the shim):
  // sm_80+ every dot path, sm_70 fp16 only.
  constexpr bool kHaveTensor =
      FASTMINE_TARGET_ARCH >= 800 || (FASTMINE_TARGET_ARCH >= 700 && std::is_same<T, __half>::value);
  if constexpr (kTensor && kHaveTensor) {
    namespace wmma = nvcuda::wmma;
    // 16 fragments of 16x16 over NT/32 = 8 warps: warp w owns row strip w/2 and
    // column strips 2*(w%2), 2*(w%2)+1.
    constexpr int KS = WmmaIn<T, P>::KS;
    using in_t = typename WmmaIn<T, P>::type;
    const int warp = threadIdx.x / 32;
    const int fm = warp / 2, fn0 = (warp % 2) * 2;
    wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int64_t k0 = 0; k0 < d; k0 += C::BK) {
      stage_rows<T, S, C::BM, C::BK, C::LDS, C::NT>(As, x, i0, n, k0, d);
      stage_rows<T, S, C::BN, C::BK, C::LDS, C::NT>(Bs, r, j0, m, k0, d);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < C::BK; kk += KS) {
        wmma::fragment<wmma::matrix_a, 16, 16, KS, in_t, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, As + fm * 16 * C::LDS + kk, C::LDS);
        if constexpr (P == DotPath::Tf32) {
          for (int t = 0; t < fa.num_elements; ++t) fa.x[t] = round_tf32(fa.x[t]);
        }
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          // B^T as a K x BN column-major matrix: element (k, n) at Bs[n * LDS + k].
          wmma::fragment<wmma::matrix_b, 16, 16, KS, in_t, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, Bs + (fn0 + q) * 16 * C::LDS + kk, C::LDS);
          if constexpr (P == DotPath::Tf32) {
            for (int t = 0; t < fb.num_elements; ++t) fb.x[t] = round_tf32(fb.x[t]);
          }
          wmma::mma_sync(acc[q], fa, fb, acc[q]);
        }
      }
      __syncthreads();
    }
    for (int q = 0; q < 2; ++q) {
      wmma::store_matrix_sync(Cs + fm * 16 * C::LDC + (fn0 + q) * 16, acc[q], C::LDC,
                              wmma::mem_row_major);
    }
    __syncthreads();
  } else {
    // FFMA: thread (ty, tx) of a 16 x 16 grid computes rows ty + 16 a, cols tx + 16 b.
    static_assert(C::NT == 256 && C::BM == 64 && C::BN == 64, "FFMA micro-tile layout");
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    acc_t c[4][4] = {};
    for (int64_t k0 = 0; k0 < d; k0 += C::BK) {
      stage_rows<T, S, C::BM, C::BK, C::LDS, C::NT>(As, x, i0, n, k0, d);
      stage_rows<T, S, C::BN, C::BK, C::LDS, C::NT>(Bs, r, j0, m, k0, d);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < C::BK; ++kk) {
        acc_t av[4], bv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          av[q] = load_acc(As[(ty + 16 * q) * C::LDS + kk]);
          bv[q] = load_acc(Bs[(tx + 16 * q) * C::LDS + kk]);
        }
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
          for (int q = 0; q < 4; ++q) c[p][q] += av[p] * bv[q];
      }
      __syncthreads();
    }
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int q = 0; q < 4; ++q) Cs[(ty + 16 * p) * C::LDC + tx + 16 * q] = c[p][q];
    __syncthreads();
  }
}

// One block: BM anchors x one split of the reference axis.
template <typename T, DotPath P, Distance DIST, Pass PASS>
__global__ void __launch_bounds__(TileConfig<T, P>::NT)
    mine_forward_kernel(const ForwardArgs<T> A) {
  using C = TileConfig<T, P>;
  using acc_t = typename C::acc_t;
  constexpr bool DO_POS = PASS != Pass::NegWindow;
  constexpr bool DO_NEG = PASS != Pass::PosOnly;
  constexpr bool WINDOW = PASS == Pass::NegWindow;
  __shared__ __align__(128) unsigned char smem[C::kSmemBytes];
  const acc_t inf = acc_inf<acc_t>();

  const int64_t i0 = int64_t(blockIdx.x) * C::BM;
  const int row = threadIdx.x / C::TPR, lane_col = threadIdx.x % C::TPR;
  const int64_t i = i0 + row;
  const bool row_ok = i < A.n;
  const acc_t ai = row_ok ? A.a[i] : acc_t(0);
  const int64_t li = row_ok ? A.ql[i] : 0;
  const bool explicit_ids = A.ids == Ids::Explicit;
  const int64_t qi = (row_ok && explicit_ids) ? A.qid[i] : 0;
  acc_t lo = inf, hi = inf;
  if (WINDOW && row_ok) { lo = A.lo[i]; hi = A.hi[i]; }
  // A semi-hard row without a positive has lo = +inf: nothing is admissible.
  const bool row_active = row_ok && (!WINDOW || lo < inf);

  acc_t bpk = inf, bnk = inf;
  int64_t bpi = kNoIndex, bni = kNoIndex;
  const int64_t tiles = (A.m + C::BN - 1) / C::BN;
  const int64_t t0 = int64_t(blockIdx.y) * A.tiles_per_split;
  const int64_t t1 = t0 + A.tiles_per_split < tiles ? t0 + A.tiles_per_split : tiles;
  const acc_t* Cs = reinterpret_cast<const acc_t*>(smem);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j0 = t * C::BN;
    dot_tile<T, P>(smem, A.x, A.r, i0, j0, A.n, A.m, A.d);
    if (row_active) {
      // Columns in increasing order with strict '<': first occurrence wins ties.
      for (int c = lane_col; c < C::BN; c += C::TPR) {
        const int64_t j = j0 + c;
        if (j >= A.m) break;
        const acc_t v = mining_value<acc_t>(Cs[row * C::LDC + c], ai, A.b[j],
                                            DIST == Distance::Cosine);
        const bool same = same_sample(A.ids, i, j, qi, explicit_ids ? A.rid[j] : 0);
        const int64_t lj = A.rl[j];
        if (DO_POS) {
          const acc_t k = (lj == li && !same) ? A.ps * v : inf;
          if (k < bpk) { bpk = k; bpi = j; }
        }
        if (DO_NEG) {
          bool ok = lj != li && !same;
          if (WINDOW) ok = ok && in_semihard_window(v, lo, hi);
          const acc_t k = ok ? A.ns * v : inf;
          if (k < bnk) { bnk = k; bni = j; }
        }
      }
    }
    __syncthreads();  // Cs aliases the next tile's stage
  }
  // Merge the TPR lanes of a row (adjacent lanes of one warp).
#pragma unroll
  for (int off = C::TPR / 2; off > 0; off /= 2) {
    const acc_t opk = __shfl_xor_sync(0xffffffffu, bpk, off);
    const int64_t opi = __shfl_xor_sync(0xffffffffu, bpi, off);
    const acc_t onk = __shfl_xor_sync(0xffffffffu, bnk, off);
    const int64_t oni = __shfl_xor_sync(0xffffffffu, bni, off);
    if (better(opk, opi, bpk, bpi)) { bpk = opk; bpi = opi; }
    if (better(onk, oni, bnk, bni)) { bnk = onk; bni = oni; }
  }
  if (row_ok && lane_col == 0) {
    const int64_t o = int64_t(blockIdx.y) * A.n + i;
    if (DO_POS) { A.part_pkey[o] = bpk; A.part_pidx[o] = bpi; }
    if (DO_NEG) { A.part_nkey[o] = bnk; A.part_nidx[o] = bni; }
  }
}

// Lexicographic minimum of row i's partial (key, index) over the splits
// (layout [splits, n]); (+inf, kNoIndex) when no split found a candidate.
template <typename acc_t>
__device__ inline void best_of_splits(const acc_t* keys, const int64_t* idxs, int64_t n,
                                      int64_t splits, int64_t i, acc_t& key, int64_t& idx) {
  key = acc_inf<acc_t>();
  idx = kNoIndex;
  for (int64_t s = 0; s < splits; ++s) {
    if (better(keys[s * n + i], idxs[s * n + i], key, idx)) {
      key = keys[s * n + i];
      idx = idxs[s * n + i];
    }
  }
}

// Merge the splits of one sweep.  PosOnly also derives the semi-hard window
// (lo, hi) from the positive's key (key = ps * v_ap).
template <typename acc_t, Pass PASS>
__global__ void merge_kernel(int64_t n, int64_t splits, const acc_t* part_pkey,
                             const int64_t* part_pidx, const acc_t* part_nkey,
                             const int64_t* part_nidx, int64_t* pos_idx, int64_t* neg_idx,
                             acc_t ps, double margin, Distance dist, acc_t* lo, acc_t* hi) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const acc_t inf = acc_inf<acc_t>();
  if (PASS != Pass::NegWindow) {
    acc_t k;
    int64_t idx;
    best_of_splits(part_pkey, part_pidx, n, splits, i, k, idx);
    pos_idx[i] = idx == kNoIndex ? -1 : idx;
    if (PASS == Pass::PosOnly) {
      semihard_window<acc_t>(idx != kNoIndex, k, ps, margin, dist, inf, lo[i], hi[i]);
    }
  }
  if (PASS != Pass::PosOnly) {
    acc_t k;
    int64_t idx;
    best_of_splits(part_nkey, part_nidx, n, splits, i, k, idx);
    neg_idx[i] = idx == kNoIndex ? -1 : idx;
  }
}

// Per-row terms (strategies.h row_term): |x|^2 (Euclidean family) or 1/|x|
// (cosine), in acc_t, one warp per row (fixed-order tree sum: reproducible).
// The contract's data check comes with it: a row whose |x|^2 is not admissible
// (row_admissible: NaN/Inf elements, or a norm outside the bounds) sets *bad
// to 1 (every writer writes the same value, so plain stores suffice); `bad`
// may be nullptr (no check).
template <typename T>
__global__ void row_terms_kernel(const T* x, int64_t n, int64_t d, bool cosine,
                                 typename AccOf<T>::type* out, int32_t* bad) {
  using acc_t = typename AccOf<T>::type;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;  // uniform per warp
  acc_t s = 0;
  for (int64_t k = lane; k < d; k += 32) {
    const acc_t v = load_acc(x[row * d + k]);
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) {
    out[row] = row_term(s, cosine);
    if (bad != nullptr && !row_admissible(s, cosine)) *bad = 1;
  }
}

// ------------------------------------------------------------------- host side
// Workspace layout (bytes): a[n], b[m], lo[n], hi[n] (acc_t), partial keys
// 2 x [splits, n] (acc_t), partial indices 2 x [splits, n] (int64).
template <typename acc_t>
inline size_t workspace_bytes(int64_t n, int64_t m, int64_t splits) {
  auto up = [](size_t b) { return (b + 255) / 256 * 256; };
  return up(sizeof(acc_t) * (3 * n + m)) + up(2 * sizeof(acc_t) * splits * n) +
         up(2 * sizeof(int64_t) * splits * n);
}

struct SelectParams {
  int64_t n, m, d;
  PosStrategy pos;
  NegStrategy neg;
  Distance dist;
  double margin;  // < 0: none
  int64_t splits; // >= 1 (choose_splits, strategies.h)
  Ids ids;        // same-sample rule; Explicit reads qid/rid
};

// The whole selection for one (T, P): row terms (with the data checks), one or
// two sweeps, merges.  x [n, d], r [m, d] (r == x: the batch is the reference
// set, its terms are copied), labels and ids int64 (ids read only for
// Ids::Explicit), outputs pos_idx/neg_idx int64 [n] (-1 = none).  `workspace`
// holds workspace_bytes<acc_t>(n, m, splits) bytes.  bad: nullptr, or int32 [2]
// (zeroed by the caller) that row_terms_kernel sets for embeddings ([0]) and
// ref_emb ([1]).  Never synchronises.  Returns the first launch error.
template <typename T, DotPath P>
cudaError_t mine_select_launch(const SelectParams& p, const T* x, const T* r, const int64_t* ql,
                               const int64_t* rl, const int64_t* qid, const int64_t* rid,
                               int64_t* pos_idx, int64_t* neg_idx, void* workspace, int32_t* bad,
                               cudaStream_t stream) {
  using C = TileConfig<T, P>;
  using acc_t = typename C::acc_t;
  if (p.n == 0) return cudaSuccess;
  auto up = [](size_t b) { return (b + 255) / 256 * 256; };
  unsigned char* w = static_cast<unsigned char*>(workspace);
  acc_t* a = reinterpret_cast<acc_t*>(w);
  acc_t* b = a + p.n;
  acc_t* lo = b + p.m;
  acc_t* hi = lo + p.n;
  w += up(sizeof(acc_t) * (3 * p.n + p.m));
  acc_t* pkey = reinterpret_cast<acc_t*>(w);
  acc_t* nkey = pkey + p.splits * p.n;
  w += up(2 * sizeof(acc_t) * p.splits * p.n);
  int64_t* pidx = reinterpret_cast<int64_t*>(w);
  int64_t* nidx = pidx + p.splits * p.n;

  // Row terms first: they carry the data checks, which hold even when m == 0.
  const bool cosine = p.dist == Distance::Cosine;
  const bool self_refs = r == x && p.m == p.n;
  launch_kernel(row_terms_kernel<T>, dim3(unsigned((p.n + 7) / 8)), dim3(256), stream,
                "row_terms_kernel", x, p.n, p.d, cosine, a, bad);
  if (p.m == 0) {  // no references: nothing is selected
    cudaMemsetAsync(pos_idx, 0xff, sizeof(int64_t) * p.n, stream);  // all bytes 0xff == -1
    cudaMemsetAsync(neg_idx, 0xff, sizeof(int64_t) * p.n, stream);
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
  ForwardArgs<T> A{x, r, a, b, ql, rl, p.ids, qid, rid, lo, hi, p.n, p.m, p.d, ps, ns, per,
                   pkey, pidx, nkey, nidx};
  const dim3 grid(unsigned((p.n + C::BM - 1) / C::BM), unsigned(splits));
  const unsigned mgrid = unsigned((p.n + 255) / 256);
  auto sweep = [&](auto pass_tag) {
    constexpr Pass PASS = decltype(pass_tag)::value;
    launch_kernel(cosine ? mine_forward_kernel<T, P, Distance::Cosine, PASS>
                         : mine_forward_kernel<T, P, Distance::SquaredEuclidean, PASS>,
                  grid, dim3(C::NT), stream, "mine_forward_kernel", A);
    launch_kernel(merge_kernel<acc_t, PASS>, dim3(mgrid), dim3(256), stream, "merge_kernel", p.n,
                  splits, pkey, pidx, nkey, nidx, pos_idx, neg_idx, ps, p.margin, p.dist, lo, hi);
  };
  if (p.neg != NegStrategy::SemiHard) {
    sweep(std::integral_constant<Pass, Pass::Fused>{});
  } else {
    sweep(std::integral_constant<Pass, Pass::PosOnly>{});
    sweep(std::integral_constant<Pass, Pass::NegWindow>{});
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------- pair distances
// d(x[i], r[idx[p]]) for the kp positive columns (warps w < n * kp: pair
// p = w, anchor p / kp) and the kn negative columns (w >= n * kp) of every
// anchor -- fastmine::mine has kp = kn = 1, fastmine::mine_topk [n, k]
// row-major columns --, 0 where idx == -1; one warp per pair, the rows read
// in their dtype and upcast element by element (gather, then upcast).  The
// formulas of fastmine/_pairs.py, by direct difference (no cancellation for
// near pairs):
//   squared_euclidean |a - b|^2;  euclidean |a - b|;
//   cosine |a/|a| - b/|b||^2 / 2 (= 1 - cos for the unit vectors).
template <typename T, Distance DIST>
__global__ void pair_distance_kernel(const T* x, const T* r, int64_t n, int64_t d, int64_t kp,
                                     int64_t kn, const int64_t* pos_idx, const int64_t* neg_idx,
                                     T* pos_out, T* neg_out) {
  using acc_t = typename AccOf<T>::type;
  const int64_t w = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (w >= n * (kp + kn)) return;  // uniform per warp
  const bool pos = w < n * kp;
  const int64_t p = pos ? w : w - n * kp;
  const int64_t i = p / (pos ? kp : kn);
  const int64_t j = (pos ? pos_idx : neg_idx)[p];
  T* out = pos ? pos_out : neg_out;
  acc_t v = 0;
  if (j >= 0) {  // uniform per warp
    const T* a = x + i * d;
    const T* b = r + j * d;
    if (DIST == Distance::Cosine) {
      acc_t saa = 0, sbb = 0;
      for (int64_t k = lane; k < d; k += 32) {
        const acc_t av = load_acc(a[k]), bv = load_acc(b[k]);
        saa += av * av;
        sbb += bv * bv;
      }
      const acc_t na = sqrt_rn(warp_sum(saa)), nb = sqrt_rn(warp_sum(sbb));
      acc_t sww = 0;
      for (int64_t k = lane; k < d; k += 32) {
        const acc_t wk = load_acc(a[k]) / na - load_acc(b[k]) / nb;
        sww += wk * wk;
      }
      v = acc_t(0.5) * warp_sum(sww);
    } else {
      acc_t suu = 0;
      for (int64_t k = lane; k < d; k += 32) {
        const acc_t u = load_acc(a[k]) - load_acc(b[k]);
        suu += u * u;
      }
      suu = warp_sum(suu);
      v = DIST == Distance::Euclidean ? sqrt_rn(suu) : suu;
    }
  }
  if (lane == 0) out[p] = from_acc<T>(v);
}

// Distances of the selected pairs: pos_out [n, kp], neg_out [n, kn] in T
// (pos_idx / neg_idx [n, kp] / [n, kn], row-major; kp = kn = 1 for mine).
template <typename T>
cudaError_t pair_distance_launch(Distance dist, const T* x, const T* r, int64_t n, int64_t d,
                                 const int64_t* pos_idx, const int64_t* neg_idx, T* pos_out,
                                 T* neg_out, cudaStream_t stream, int64_t kp = 1,
                                 int64_t kn = 1) {
  if (n == 0) return cudaSuccess;
  const dim3 grid(unsigned((n * (kp + kn) + 7) / 8)), block(256);
  auto go = [&](auto dist_tag) {
    constexpr Distance D = decltype(dist_tag)::value;
    launch_kernel(pair_distance_kernel<T, D>, grid, block, stream, "pair_distance_kernel", x, r,
                  n, d, kp, kn, pos_idx, neg_idx, pos_out, neg_out);
  };
  switch (dist) {
    case Distance::Euclidean: go(std::integral_constant<Distance, Distance::Euclidean>{}); break;
    case Distance::SquaredEuclidean:
      go(std::integral_constant<Distance, Distance::SquaredEuclidean>{});
      break;
    case Distance::Cosine: go(std::integral_constant<Distance, Distance::Cosine>{}); break;
  }
  return cudaGetLastError();
}

// --------------------------------------------------------------------- backward
// Block-wide sum (blockDim.x a multiple of 32, <= 1024); fixed order.
template <typename acc_t>
__device__ inline acc_t block_sum(acc_t v, acc_t* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, nw = blockDim.x / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  acc_t s = 0;
  for (int w = 0; w < nw; ++w) s += scratch[w];
  return s;
}

// What the backward forms for the reference rows.
enum class RefGrad : int {
  None = 0,     // nothing (the references need no gradient)
  Atomic = 1,   // out_r [m, d] (zeroed by the caller) += g * dd/db, atomicAdd
  Contrib = 2,  // out_r [2n, d]: row p = g * dd/db of pair p (p < n: the positive
                // of anchor p, else the negative of anchor p - n); rows of pairs
                // with idx == -1 are not written.  segment_ref_grad_kernel sums them.
};

// Pair gradients of fastmine/_pairs.py::_pair_grads, one block per anchor:
// grad_x [n, d] (acc_t) row i = sum over its two pairs of g * dd/da, written
// (not accumulated) by the block that owns row i; the reference side per MODE.
template <typename T, Distance DIST, RefGrad MODE>
__global__ void pair_backward_kernel(const T* x, const T* r, int64_t n, int64_t d,
                                     const int64_t* pos_idx, const int64_t* neg_idx,
                                     const typename AccOf<T>::type* grad_pos,
                                     const typename AccOf<T>::type* grad_neg,
                                     typename AccOf<T>::type* grad_x,
                                     typename AccOf<T>::type* out_r) {
  using acc_t = typename AccOf<T>::type;
  __shared__ acc_t scratch[32];
  const int64_t i = blockIdx.x;
  if (i >= n) return;
  const T* xa = x + i * d;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) grad_x[i * d + k] = acc_t(0);
  for (int which = 0; which < 2; ++which) {
    const int64_t j = (which == 0 ? pos_idx : neg_idx)[i];
    const acc_t g = (which == 0 ? grad_pos : grad_neg)[i];
    if (j < 0) continue;  // uniform per block: no barrier is skipped by part of it
    const T* xb = r + j * d;
    // Reductions needed by the formulas.
    acc_t s_uu = 0, s_aa = 0, s_bb = 0;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const acc_t av = load_acc(xa[k]), bv = load_acc(xb[k]);
      s_uu += (av - bv) * (av - bv);
      s_aa += av * av;
      s_bb += bv * bv;
    }
    acc_t na = 0, nb = 0, scale_u = 0, aw = 0, bw = 0;
    if (DIST == Distance::Euclidean) {
      const acc_t nu = sqrt_rn(block_sum(s_uu, scratch));
      scale_u = nu > acc_t(0) ? acc_t(1) / nu : acc_t(0);  // subgradient 0 at u = 0
    } else if (DIST == Distance::Cosine) {
      na = sqrt_rn(block_sum(s_aa, scratch));
      nb = sqrt_rn(block_sum(s_bb, scratch));
      // a^.w and b^.w with w = a^ - b^
      acc_t s_aw = 0, s_bw = 0;
      for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
        const acc_t ah = load_acc(xa[k]) / na, bh = load_acc(xb[k]) / nb, w = ah - bh;
        s_aw += ah * w;
        s_bw += bh * w;
      }
      aw = block_sum(s_aw, scratch);
      bw = block_sum(s_bw, scratch);
    }
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      const acc_t av = load_acc(xa[k]), bv = load_acc(xb[k]);
      acc_t ga, gb;
      if (DIST == Distance::SquaredEuclidean) {
        ga = acc_t(2) * (av - bv); gb = -ga;
      } else if (DIST == Distance::Euclidean) {
        ga = (av - bv) * scale_u; gb = -ga;
      } else {
        const acc_t ah = av / na, bh = bv / nb, w = ah - bh;
        ga = (w - aw * ah) / na;
        gb = (-w + bw * bh) / nb;
      }
      grad_x[i * d + k] += g * ga;
      if (MODE == RefGrad::Atomic) atomicAdd(out_r + j * d + k, g * gb);
      if (MODE == RefGrad::Contrib) out_r[(which * n + i) * d + k] = g * gb;
    }
  }
}

// Deterministic reference gradient: the pairs sorted stably by reference row
// (sorted_rows[s] = row of the pair order[s], -1 for pairs without one; equal
// rows keep pair order) form one segment per selected row; the block that
// finds a segment's first position sums its contributions in sorted order and
// writes grad_r[row] (accumulate: adds to what is there, the anchor gradient
// when the references are the batch).  Each row is written by exactly one
// block, in a fixed order: bitwise reproducible, O(pairs * d) reads, and rows
// that no pair selected are never touched.  Grid-stride over the positions.
template <typename acc_t>
__global__ void segment_ref_grad_kernel(int64_t pairs, int64_t d, const int64_t* sorted_rows,
                                        const int64_t* order, const acc_t* contrib,
                                        acc_t* grad_r, bool accumulate) {
  for (int64_t s = blockIdx.x; s < pairs; s += gridDim.x) {
    const int64_t j = sorted_rows[s];
    if (j < 0 || (s > 0 && sorted_rows[s - 1] == j)) continue;  // uniform per block
    int64_t e = s + 1;
    while (e < pairs && sorted_rows[e] == j) ++e;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      acc_t sum = 0;
      for (int64_t t = s; t < e; ++t) sum += contrib[order[t] * d + k];
      grad_r[j * d + k] = accumulate ? grad_r[j * d + k] + sum : sum;
    }
  }
}

// Backward of the pair distances for one T: grad_x [n, d] (acc_t, written),
// the reference side per `mode` into out_r (see RefGrad).  grad_pos/grad_neg
// [n] in acc_t.  Never synchronises.
template <typename T>
cudaError_t pair_backward_launch(Distance dist, RefGrad mode, const T* x, const T* r, int64_t n,
                                 int64_t d, const int64_t* pos_idx, const int64_t* neg_idx,
                                 const typename AccOf<T>::type* grad_pos,
                                 const typename AccOf<T>::type* grad_neg,
                                 typename AccOf<T>::type* grad_x, typename AccOf<T>::type* out_r,
                                 cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  auto pairs = [&](auto dist_tag) {
    constexpr Distance D = decltype(dist_tag)::value;
    auto kernel = mode == RefGrad::Atomic    ? pair_backward_kernel<T, D, RefGrad::Atomic>
                  : mode == RefGrad::Contrib ? pair_backward_kernel<T, D, RefGrad::Contrib>
                                             : pair_backward_kernel<T, D, RefGrad::None>;
    launch_kernel(kernel, dim3(unsigned(n)), dim3(128), stream, "pair_backward_kernel", x, r, n,
                  d, pos_idx, neg_idx, grad_pos, grad_neg, grad_x, out_r);
  };
  switch (dist) {
    case Distance::Euclidean: pairs(std::integral_constant<Distance, Distance::Euclidean>{}); break;
    case Distance::SquaredEuclidean:
      pairs(std::integral_constant<Distance, Distance::SquaredEuclidean>{});
      break;
    case Distance::Cosine: pairs(std::integral_constant<Distance, Distance::Cosine>{}); break;
  }
  return cudaGetLastError();
}

// The fixed-order sum of RefGrad::Contrib rows into grad_r (see
// segment_ref_grad_kernel).  sorted_rows/order: [pairs], pairs = 2n.
template <typename acc_t>
cudaError_t segment_ref_grad_launch(int64_t pairs, int64_t d, const int64_t* sorted_rows,
                                    const int64_t* order, const acc_t* contrib, acc_t* grad_r,
                                    bool accumulate, cudaStream_t stream) {
  if (pairs == 0 || d == 0) return cudaSuccess;
  const int64_t blocks = pairs < (int64_t(1) << 20) ? pairs : (int64_t(1) << 20);
  launch_kernel(segment_ref_grad_kernel<acc_t>, dim3(unsigned(blocks)), dim3(128), stream,
                "segment_ref_grad_kernel", pairs, d, sorted_rows, order, contrib, grad_r,
                accumulate);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastmine
