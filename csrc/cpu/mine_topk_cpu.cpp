// CPU implementation of fastmine::mine_topk_cpu: per anchor the k_pos
// positives and k_neg negatives of a strategy (top-k), or k_neg distance-
// weighted draws without replacement (Gumbel-top-k), and the exact distances
// of the selected pairs.  The rules are docs/contract.md and
// fastmine/reference_topk.py; the design is docs/topk.md ("CPU").
//
// The blocked Gram sweep of fastmine::mine (gram_tiles.h: BM anchors per
// task in parallel, BN references per dot tile, BLAS or small_gram, fp16/bf16
// upcast tile by tile, never the N x M matrix) with a k-list per anchor in
// place of mine's running (key, index) pair:
//
//   * Keys are "smaller is better": v for the nearest rules, -v for the
//     farthest ones, -(log w + g) for distance-weighted (negation is exact,
//     so the order and the ties are those of the largest log w + g), +inf
//     for an inadmissible reference.
//   * A k-list holds the k best (key, index) pairs seen so far, sorted by
//     (key, index); empty slots hold (+inf, -1) and sort last.  Its k-th key
//     is the admission threshold.  One thread scans an anchor's references in
//     increasing index (chunks in order, then j within a chunk), so every
//     entry already in the list has a smaller index than the candidate: a
//     candidate enters iff its key is STRICTLY below the k-th key, and is
//     placed after the entries with an equal key.  That is exactly the stable
//     (key, index) order of the reference; the reference axis is never split
//     between threads, so no two lists are ever merged.
//   * The per-pair cost of the scan is mine's: a branch-free `omp simd`
//     minimum of the keys of each 64-wide sub-chunk, which also stores the
//     64 keys in a small buffer.  Only a sub-chunk whose minimum beats the
//     k-th key is rescanned, from that buffer (the keys are not recomputed),
//     inserting its candidates (O(k) shifts each).  For references in random
//     order that happens O(k log(M / k)) times per anchor.
//   * Semi-hard: two sweeps, the positives first (the window comes from the
//     first positive, list entry 0: strategies.h semihard_window), then the
//     negatives inside the window (the second sweep reuses the dot tile when
//     all references fit in one chunk).  mine's one-sweep variant (class
//     members' direct dots) is not used here.
//   * Distance-weighted (Euclidean): per admissible negative,
//     lw = dw_log_weight(v) (sampling.h, float32; -inf where w = 0) and
//     key = lw + g_ij, g the Gumbel noise of sampling.h counted by (anchor
//     row i of embeddings, reference row j).  Every computed g is at most
//     kGumbelMax, so a candidate with fl(lw + kGumbelMax) < the k-th largest
//     key can neither beat nor tie it (rounding is monotone:
//     fl(lw + g) <= fl(lw + kGumbelMax)): it is skipped before its noise is
//     drawn.  Per 64-wide sub-chunk, once the list is full, an upper bound ub
//     of its log-weights (from the smallest and largest clamped v among its
//     candidates: for D >= 3 lw is convex in vc, so its largest value is at
//     an end, read from a table (LogWeightTable); for D <= 2 each of its two
//     terms is monotone) gives two prunes: ub + kGumbelMax below the k-th key
//     skips the whole sub-chunk without a logarithm; otherwise a candidate
//     needs g > K - ub (K the k-th key), a threshold on its integer Philox
//     word (min_noise_word).  The words of the sub-chunk's 16 quads (one
//     Philox call serves references 4q .. 4q+3 of the anchor) are computed
//     at once in SIMD registers (QuadWords), with the mask of those that
//     reach the threshold; only those columns are visited, and they pay for
//     the four logarithms of lw and g only if the pair's own bound lets them.
//
// k bound: the lists hold min(k, M) entries (slots beyond M are always -1);
// min(k, M) <= kMaxK = 1024 per side, else a ValueError naming k_pos / k_neg.
// Memory: O(threads * BM * (BN + D + min(k, M))) plus the O(N + M) row terms.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define FASTMINE_X86_QUAD_WORDS 1
#endif

#include "fastmine/op_checks.h"
#include "fastmine/sampling.h"
#include "fastmine/schema.h"
#include "fastmine/strategies.h"
#include "gram_tiles.h"
#include "overrides.h"  // kernel_overrides (the noise form)

namespace fastmine {
namespace cpu {
namespace {

// The largest list the kernel keeps per anchor and side (min(k, M)).  Memory
// per thread: BM * (k_pos + k_neg) * 16 bytes (4 MiB at the bound), and an
// insertion shifts up to k entries.
constexpr int64_t kMaxK = 1024;

// Inserts (key, j) into the sorted list (key[0..k), idx[0..k)), dropping the
// last entry.  Preconditions: key < key[k - 1] (it beats the k-th), and every
// entry's index is smaller than j, so it goes after the entries with an equal
// key: the list stays sorted by (key, index).
template <typename acc_t>
inline void klist_insert(acc_t* key, int64_t* idx, int64_t k, acc_t c, int64_t j) {
  int64_t p = k - 1;
  while (p > 0 && key[p - 1] > c) {
    key[p] = key[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  key[p] = c;
  idx[p] = j;
}

// The distance-weighted law of one call: dw_log_weight's parameters lo, hi,
// a, b (sampling.h dw_params, the CUDA kernels' too), the seed, and the table
// of the sub-chunk bound.
struct LogWeightTable;  // below

template <typename acc_t>
struct DwLaw : DwParams<acc_t> {
  uint64_t seed;
  const LogWeightTable* ub = nullptr;  // the sub-chunk bound's table (a, b <= 0); else null
};


// ------------------------------------------------------------ vectorised noise
// The Philox words of 16 consecutive quads q0 .. q0 + 15 of anchor row i:
// w[c][l] = word c of sampling.h noise_words(seed, i, q0 + l) (uint32
// counters, so q0 + l wraps exactly as the scalar counter does).  The SIMD
// forms below are sampling.h's philox4x32_10 computed on 16 lanes (the
// 32 x 32 -> 64-bit products of the even and odd lanes by _mm*_mul_epu32, the
// high and low halves blended back into 32-bit lanes): the same rounds, keys
// and constants, hence the same bits (tests/test_topk_cpu.py and
// tests/test_topk_backends.py compare the picks with the reference's
// fastmine/_philox.py on every path).  One call replaces up to 16 scalar
// Philox calls (~25 ns each on an AVX-512 AMD EPYC).
//
// Each form also returns the mask of the words that reach a threshold:
// bit 4 l + t set iff (w[t][l] >> 9) >= wmin (bit j - s for column j of an
// aligned sub-chunk), so the kernel visits only those columns.
struct alignas(64) QuadWords {
  uint32_t w[4][16];
};

// Spreads the 16 bits of m to bits 0, 4, 8, ..., 60.
inline uint64_t spread4(uint64_t m) {
  m = (m | (m << 24)) & 0x000000FF000000FFull;
  m = (m | (m << 12)) & 0x000F000F000F000Full;
  m = (m | (m << 6)) & 0x0303030303030303ull;
  m = (m | (m << 3)) & 0x1111111111111111ull;
  return m;
}

uint64_t quad_words_scalar(uint64_t seed, uint32_t i, uint32_t q0, uint32_t wmin, QuadWords& out) {
  uint64_t mask = 0;
  for (uint32_t l = 0; l < 16; ++l) {
    uint32_t c[4];
    noise_words(seed, i, q0 + l, c);
    for (int t = 0; t < 4; ++t) {
      out.w[t][l] = c[t];
      mask |= uint64_t((c[t] >> 9) >= wmin) << (4 * l + t);
    }
  }
  return mask;
}

#ifdef FASTMINE_X86_QUAD_WORDS
// Philox's multiplier constants and Weyl key increments (sampling.h
// philox4x32_10): M0 multiplies counter word 0, M1 word 2.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// hi, lo of m * a per 32-bit lane: even lanes from mul_epu32(a, m), odd
// lanes from mul_epu32(a >> 32, m) (the 64-bit products in place).
__attribute__((target("avx512f"))) inline void mulhilo(__m512i m, __m512i a, __m512i& hi,
                                                       __m512i& lo) {
  const __m512i ev = _mm512_mul_epu32(a, m);
  const __m512i od = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_mov_epi32(_mm512_srli_epi64(ev, 32), 0xAAAA, od);
  lo = _mm512_mask_mov_epi32(ev, 0xAAAA, _mm512_slli_epi64(od, 32));
}

__attribute__((target("avx2"))) inline void mulhilo(__m256i m, __m256i a, __m256i& hi,
                                                    __m256i& lo) {
  const __m256i ev = _mm256_mul_epu32(a, m);
  const __m256i od = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(ev, 32), od, 0xAA);
  lo = _mm256_blend_epi32(ev, _mm256_slli_epi64(od, 32), 0xAA);
}

__attribute__((target("avx512f"))) uint64_t quad_words_avx512(uint64_t seed, uint32_t i,
                                                              uint32_t q0, uint32_t wmin,
                                                              QuadWords& out) {
  const __m512i m0 = _mm512_set1_epi32(int(kPhiloxM0)), m1 = _mm512_set1_epi32(int(kPhiloxM1));
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(q0)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(int(i)), c2 = _mm512_setzero_si512(), c3 = c2;
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r) { k0 += kPhiloxW0; k1 += kPhiloxW1; }
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(m0, c0, hi0, lo0);
    mulhilo(m1, c2, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(int(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(int(k1)));
    c1 = lo1;
    c3 = lo0;
  }
  _mm512_store_si512(out.w[0], c0);
  _mm512_store_si512(out.w[1], c1);
  _mm512_store_si512(out.w[2], c2);
  _mm512_store_si512(out.w[3], c3);
  const __m512i th = _mm512_set1_epi32(int(wmin));
  const __m512i cs[4] = {c0, c1, c2, c3};
  uint64_t mask = 0;
  for (int t = 0; t < 4; ++t) {
    mask |= spread4(_mm512_cmpge_epu32_mask(_mm512_srli_epi32(cs[t], 9), th)) << t;
  }
  return mask;
}

__attribute__((target("avx2"))) uint64_t quad_words_avx2(uint64_t seed, uint32_t i, uint32_t q0,
                                                         uint32_t wmin, QuadWords& out) {
  uint64_t mask = 0;
  const __m256i m0 = _mm256_set1_epi32(int(kPhiloxM0)), m1 = _mm256_set1_epi32(int(kPhiloxM1));
  for (int h = 0; h < 2; ++h) {  // two halves of 8 quads
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(q0 + 8u * h)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i c1 = _mm256_set1_epi32(int(i)), c2 = _mm256_setzero_si256(), c3 = c2;
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      if (r) { k0 += kPhiloxW0; k1 += kPhiloxW1; }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(m0, c0, hi0, lo0);
      mulhilo(m1, c2, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(int(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
      c1 = lo1;
      c3 = lo0;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.w[0] + 8 * h), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.w[1] + 8 * h), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.w[2] + 8 * h), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.w[3] + 8 * h), c3);
    // (w >> 9) >= wmin  <=>  max(w >> 9, wmin) == w >> 9 (unsigned)
    const __m256i th = _mm256_set1_epi32(int(wmin));
    const __m256i cs[4] = {c0, c1, c2, c3};
    for (int t = 0; t < 4; ++t) {
      const __m256i x = _mm256_srli_epi32(cs[t], 9);
      const uint64_t m8 = uint32_t(_mm256_movemask_ps(
          _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(x, th), x))));
      mask |= spread4(m8 << (8 * h)) << t;
    }
  }
  return mask;
}
#endif

using QuadWordsFn = uint64_t (*)(uint64_t, uint32_t, uint32_t, uint32_t, QuadWords&);

// The widest form this CPU runs (chosen once).  FASTMINE_CPU_NO_AVX512 (the
// measurement build without the avx512f clones, docs/build.md) leaves the
// AVX-512 form out too, so that such a build times what an AVX2 CPU runs.
QuadWordsFn quad_words_fn() {
#ifdef FASTMINE_X86_QUAD_WORDS
  static const QuadWordsFn fn = [] {
    __builtin_cpu_init();
#if !defined(FASTMINE_CPU_NO_AVX512)
    if (__builtin_cpu_supports("avx512f")) return &quad_words_avx512;
#endif
    if (__builtin_cpu_supports("avx2")) return &quad_words_avx2;
    return &quad_words_scalar;
  }();
  return fn;
#else
  return &quad_words_scalar;
#endif
}

// The form of one call: quad_words_fn(), or a narrower one forced by the
// noise override (overrides.h: FASTMINE_CPU_NOISE / fastmine::_set_cpu_overrides,
// "avx2" / "scalar"; tests/test_topk_cpu.py checks that every form gives the
// same picks).  Never a form this CPU cannot run.
QuadWordsFn quad_words_for_call() {
  const KernelOverrides::Noise noise = kernel_overrides().noise;
  if (noise == KernelOverrides::Noise::Scalar) return &quad_words_scalar;
#ifdef FASTMINE_X86_QUAD_WORDS
  if (noise == KernelOverrides::Noise::Avx2 && __builtin_cpu_supports("avx2")) return &quad_words_avx2;
#endif
  return quad_words_fn();
}

// ------------------------------------------------------ the two prunes' tables
// The sub-chunk bound of the log-weights for D >= 3 (a, b <= 0), without a
// logarithm per sub-chunk.  lw(f) = a log f + b log1p(-f / 4) is convex in f,
// so on any [f0, f1] inside a grid cell range [g_ia, g_ib] it is at most
// max(lw(g_ia), lw(g_ib)).  The kernel computes lw from f = float(vc) with
// vc in [lo, hi), so f lies in [float(lo), float(hi)]: the grid g_t = flo +
// t (fhi - flo) / G, t = 0 .. G, covers every f, and f in [float(vmin),
// float(vmax)] (rounding is monotone).  T[t] = lw(g_t) in float64 plus a slack
// kLogWeightSlack * (max |a log f| + max |b log1p(-f/4)| over the grid + 1)
// that covers the float32 logarithms of dw_log_weight (as the 4-logarithm
// bound below); ia, ib are taken one cell outside the rounded positions.
//
// kLogWeightSlack: float32 logarithms are accurate (<= 2 ulp) but not
// provably monotone, and the products and the sum round; 1e-4 of |log w| is
// hundreds of ulps and costs nothing against kGumbelMax = 16.64.
constexpr float kLogWeightSlack = 1e-4f;

struct LogWeightTable {
  static constexpr int G = 2048;
  double flo, inv_h;
  std::vector<float> t;  // [G + 1]

  LogWeightTable(double flo_, double fhi, double a, double b) : flo(flo_), t(G + 1) {
    const double h = (fhi - flo) / G;
    inv_h = h > 0 ? 1.0 / h : 0.0;
    auto ta = [&](double f) { return a == 0 ? 0.0 : a * std::log(f); };
    auto tb = [&](double f) { return b == 0 ? 0.0 : b * std::log1p(-0.25 * f); };
    const double slack = double(kLogWeightSlack) *
                         (std::max(std::fabs(ta(flo)), std::fabs(ta(fhi))) +
                          std::max(std::fabs(tb(flo)), std::fabs(tb(fhi))) + 1.0);
    for (int k = 0; k <= G; ++k) {
      const double g = k == G ? fhi : flo + k * h;
      const double v = ta(g) + tb(g) + slack;
      // Rounded up to float (a float below the double would not bound it).
      float fv = float(v);
      if (double(fv) < v) fv = std::nextafter(fv, INFINITY);
      t[k] = std::isnan(v) ? INFINITY : fv;
    }
  }

  // >= every computed lw of a candidate with float(vc) in [f0, f1].
  float bound(float f0, float f1) const {
    // With x the exact cell positions: ia = trunc(x0 - 2) <= floor(x0) - 1 and
    // ib = trunc(x1 + 2) >= ceil(x1) + 1 (x >= 0; trunc is floor there), so
    // g_ia <= f0 and g_ib >= f1 despite the rounding of x and of g_t.
    const double x0 = (double(f0) - flo) * inv_h - 2, x1 = (double(f1) - flo) * inv_h + 2;
    const int ia = x0 <= 0 ? 0 : (x0 >= G ? G : int(x0));
    const int ib = x1 <= 0 ? 0 : (x1 >= G ? G : int(x1));
    return std::max(t[ia], t[ib]);
  }
};

// One dot tile of one anchor block and its lists.
template <typename acc_t>
struct TopkTile {
  const acc_t* dot;  // [bm, cn] row-major
  int64_t bm, cn, i0, j0;
  const acc_t* a;      // [bm] anchor row terms
  const acc_t* b;      // [cn] reference row terms
  const int64_t* ql;   // [bm] anchor labels
  const int64_t* rl;   // [cn] reference labels
  const int64_t* qid;  // [bm] (Ids::Explicit)
  const int64_t* rid;  // [cn] (Ids::Explicit)
  acc_t ps, ns;        // +1 nearest / -1 farthest
  const acc_t* lo;     // [bm] semi-hard window (NegWindow)
  const acc_t* hi;     // [bm]
  acc_t* pkey;         // [bm, kp] positive lists
  int64_t* pidx;
  int64_t kp;
  acc_t* nkey;         // [bm, kn] negative lists
  int64_t* nidx;
  int64_t kn;
  DwLaw<acc_t> dw;
  QuadWordsFn words;   // distance-weighted: quad_words_fn()
};

// Rescans the keys kb[0 .. e - s) of columns [s, e) of one anchor row (kept
// by the SIMD pass), inserting every key below the k-th (which tightens as
// entries arrive), in increasing index.
template <typename acc_t>
inline void rescan_insert(const acc_t* kb, int64_t s, int64_t e, int64_t j0, acc_t* key,
                          int64_t* idx, int64_t k) {
  acc_t kth = key[k - 1];
  for (int64_t j = s; j < e; ++j) {
    const acc_t c = kb[j - s];
    if (c < kth) {
      klist_insert(key, idx, k, c, j0 + j);
      kth = key[k - 1];
    }
  }
}


// The second prune of distance-weighted (per sub-chunk, once the list is
// full).  With K the k-th largest key and ub >= every lw of the sub-chunk, a
// candidate can enter only if its g exceeds t = K - ub.  The exact
// g(U) = -log(-log U) is increasing in U = ((x >> 9) + 1/2) 2^-23, so with
// u_t = exp(-exp(-t')) and t' = t - margin, every word with
// (x >> 9) < w_min = ceil(u_t 2^23 - 1/2) has U < u_t, so exact g < t'.  The
// margin (1e-3 + 1e-5 (|K| + |ub|)) exceeds the error of the computed g
// (float32 logarithms: ~1e-6) plus the rounding of fl(lw + g) by orders of
// magnitude, so such a candidate's computed key is below K: it is skipped
// after its (integer) Philox word, before any logarithm.  Returns 0 (no test)
// when t' is below every g.
//
// w_min(t') is nondecreasing in t', so the kernel reads it from a table on the
// grid t_k = -3 + k / 128 (k = 0 .. 20 * 128) at a grid point t_k < t' (one
// step below the rounded position): a threshold no larger than the exact one,
// which skips fewer words but never one that could enter, for two table reads
// instead of two exponentials per sub-chunk.
inline uint32_t noise_word_threshold(double t) {
  if (!(t > -3.0)) return 0;  // G_MIN = -2.8116: every word may enter
  const double w = std::ceil(std::exp(-std::exp(-t)) * 8388608.0 - 0.5);
  return w >= 8388608.0 ? 8388608u : uint32_t(w);  // 2^23: no word passes
}

struct NoiseWordTable {
  static constexpr double kT0 = -3.0, kPerUnit = 128.0;
  static constexpr int kLast = 20 * 128;  // t up to 17 > G_MAX: no word passes there
  uint32_t w[kLast + 1];
  NoiseWordTable() {
    for (int k = 0; k <= kLast; ++k) w[k] = noise_word_threshold(kT0 + k / kPerUnit);
  }
};

const NoiseWordTable kNoiseWordTable;  // built when the library loads

inline uint32_t min_noise_word(double K, double ub) {
  const double t = K - ub - (1e-3 + 1e-5 * (std::fabs(K) + std::fabs(ub)));
  if (!(t > NoiseWordTable::kT0)) return 0;  // also NaN / -inf (an infinite ub)
  // x > 0: truncation is the floor; one step lower for the rounding of x.
  const double x = (t - NoiseWordTable::kT0) * NoiseWordTable::kPerUnit - 1;
  if (!(x >= 0)) return 0;
  return kNoiseWordTable.w[x >= NoiseWordTable::kLast ? NoiseWordTable::kLast : int(x)];
}

template <typename acc_t, bool COS, Ids IDS, Pass PASS, bool DW>
FASTMINE_CPU_CLONES void scan_tile_topk(const TopkTile<acc_t>& A) {
  constexpr bool DO_POS = PASS != Pass::NegWindow;
  constexpr bool DO_NEG = PASS != Pass::PosOnly;
  constexpr bool WINDOW = PASS == Pass::NegWindow;
  static_assert(!DW || (!COS && PASS == Pass::Fused), "distance-weighted is a Euclidean fused pass");
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < A.bm; ++i) {
    const int64_t qi = IDS == Ids::Explicit ? A.qid[i] : (IDS == Ids::Self ? A.i0 + i : 0);
    RowKeys<acc_t> k{A.dot + i * A.cn, A.b, A.rl, A.rid, A.j0, A.a[i], A.ql[i], qi, A.ps, A.ns,
                     WINDOW ? A.lo[i] : acc_t(0), WINDOW ? A.hi[i] : acc_t(0)};
    if (WINDOW && !(k.lo < inf)) continue;  // no positive -> no semi-hard negative
    acc_t* pk = A.pkey + i * A.kp;
    int64_t* pi = A.pidx + i * A.kp;
    acc_t* nk = A.nkey + i * A.kn;
    int64_t* ni = A.nidx + i * A.kn;
    QuadWords qw;  // distance-weighted: the Philox words of one sub-chunk
    alignas(64) acc_t kbp[kSub], kbn[kSub];  // one sub-chunk's keys
    for (int64_t s = 0; s < A.cn; s += kSub) {
      const int64_t e = std::min(s + kSub, A.cn);
      // mp, mn: the sub-chunk's smallest keys; for DW, [vmin, vmax] the range
      // of the clamped mining value vc over its candidates with w > 0.
      // The keys are kept (kbp, kbn) for the rescan of a sub-chunk whose
      // minimum beats the k-th key.
      acc_t mp = inf, mn = inf, vmin = inf, vmax = -inf;
#pragma omp simd reduction(min : mp, mn, vmin) reduction(max : vmax)
      for (int64_t j = s; j < e; ++j) {
        if constexpr (DO_POS) {
          const acc_t kp = pos_key<acc_t, COS, IDS>(k, j);
          kbp[j - s] = kp;
          mp = kp < mp ? kp : mp;
        }
        if constexpr (DO_NEG && !DW) {
          const acc_t kn = neg_key<acc_t, COS, IDS, WINDOW>(k, j);
          kbn[j - s] = kn;
          mn = kn < mn ? kn : mn;
        }
        if constexpr (DW) {
          // vc and the support w > 0 <=> vc < hi exactly as dw_log_weight
          // (sampling.h) computes them, spelled out for the SIMD range.
          const acc_t v = mining_value<acc_t>(k.dot[j], k.ai, k.b[j], false);
          const acc_t vc = dw_clamp(v, A.dw.lo);
          const bool ok = (k.rl[j] != k.li) & !same_sample<acc_t, IDS>(k, j) & (vc < A.dw.hi);
          const acc_t c0 = ok ? vc : inf, c1 = ok ? vc : -inf;
          vmin = c0 < vmin ? c0 : vmin;
          vmax = c1 > vmax ? c1 : vmax;
        }
      }
      if (DO_POS && mp < pk[A.kp - 1]) rescan_insert(kbp, s, e, A.j0, pk, pi, A.kp);
      if constexpr (DO_NEG && !DW) {
        if (mn < nk[A.kn - 1]) rescan_insert(kbn, s, e, A.j0, nk, ni, A.kn);
      }
      if constexpr (DW) {
        if (!(vmin < inf)) continue;  // no candidate with w > 0 in this sub-chunk
        acc_t kth = nk[A.kn - 1];     // -(k-th largest key); +inf while the list has room
        uint32_t wmin = 0;            // the noise-word threshold (0: none)
        if (kth < inf) {
          // Upper bound ub of lw = a log vc + b log1p(-vc / 4) over vc in
          // [vmin, vmax].  D >= 3 (a, b <= 0): both terms are convex in vc, so
          // lw is, and its largest value is at an end (read from the table,
          // LogWeightTable).  D <= 2: each term is monotone, so each is largest
          // at an end (a looser bound, 4 logarithms).
          const float f0 = float(vmin), f1 = float(vmax);
          float ub;
          if (A.dw.ub) {
            ub = A.dw.ub->bound(f0, f1);
          } else {
            const float ta0 = A.dw.a * std::log(f0), ta1 = A.dw.a * std::log(f1);
            const float tb0 = A.dw.b * std::log1p(-0.25f * f0), tb1 = A.dw.b * std::log1p(-0.25f * f1);
            const float ta = std::max(ta0, ta1), tb = std::max(tb0, tb1);
            ub = ta + tb + kLogWeightSlack * (std::fabs(ta) + std::fabs(tb) + 1.0f);
          }
          if (-acc_t(ub + kGumbelMax) > kth) continue;  // ub + G_MAX < the k-th key
          wmin = min_noise_word(-double(kth), double(ub));
        }
        // The Philox words of the sub-chunk's quads, 16 at once (QuadWords),
        // with the mask of the words that reach wmin: quads qb .. qb + 15
        // cover [s, e) unless j0 + s is not a multiple of 4 (odd chunk widths),
        // where every column is visited and a 17th quad computed when needed.
        const int64_t qb = (A.j0 + s) >> 2;
        const uint64_t reach = A.words(A.dw.seed, uint32_t(A.i0 + i), uint32_t(qb), wmin, qw);
        const bool aligned = ((A.j0 + s) & 3) == 0;
        const int64_t width = e - s;
        uint64_t visit = width == 64 ? ~uint64_t(0) : (uint64_t(1) << width) - 1;
        if (aligned) visit &= reach;
        uint32_t extra[4];
        bool have_extra = false;
        for (; visit; visit &= visit - 1) {
          const int64_t j = s + __builtin_ctzll(visit);
          const int64_t jg = A.j0 + j;
          const int64_t l = (jg >> 2) - qb;
          if (l == 16 && !have_extra) {
            noise_words(A.dw.seed, uint32_t(A.i0 + i), uint32_t(jg >> 2), extra);
            have_extra = true;
          }
          const uint32_t word = l < 16 ? qw.w[jg & 3][l] : extra[jg & 3];
          // Integer test first when the list is full: g too small to enter,
          // whatever lw (<= ub) is; then no logarithm at all.
          if ((word >> 9) < wmin) continue;
          const bool cand = (k.rl[j] != k.li) & !same_sample<acc_t, IDS>(k, j);
          if (!cand) continue;
          const acc_t v = mining_value<acc_t>(k.dot[j], k.ai, k.b[j], false);
          if (wmin > 0 && A.dw.ub) {
            // The same test with the pair's own bound (a table read, no
            // logarithm): lw(f) <= bound(f, f), f = float(vc).
            const acc_t vc = dw_clamp(v, A.dw.lo);
            if (!(vc < A.dw.hi)) continue;  // w = 0: never picked
            const float f = float(vc);
            if ((word >> 9) < min_noise_word(-double(kth), double(A.dw.ub->bound(f, f)))) continue;
          }
          const float lw = dw_log_weight<acc_t>(v, A.dw.lo, A.dw.hi, A.dw.a, A.dw.b);
          if (lw == -INFINITY) continue;  // w = 0: never picked
          // The prune: fl(lw + g) <= fl(lw + G_MAX) < the k-th key.
          if (-acc_t(lw + kGumbelMax) > kth) continue;
          const float key = lw + noise_gumbel(word);
          const acc_t c = -acc_t(key);
          if (c < kth) {
            klist_insert(nk, ni, A.kn, c, jg);
            kth = nk[A.kn - 1];
          }
        }
      }
    }
  }
}

template <typename acc_t, bool COS, Ids IDS>
void scan_pass_topk(Pass pass, bool dw, const TopkTile<acc_t>& A) {
  if constexpr (!COS) {
    if (dw) return scan_tile_topk<acc_t, false, IDS, Pass::Fused, true>(A);
  }
  switch (pass) {
    case Pass::Fused: return scan_tile_topk<acc_t, COS, IDS, Pass::Fused, false>(A);
    case Pass::PosOnly: return scan_tile_topk<acc_t, COS, IDS, Pass::PosOnly, false>(A);
    case Pass::NegWindow: return scan_tile_topk<acc_t, COS, IDS, Pass::NegWindow, false>(A);
  }
}

template <typename acc_t, bool COS>
void scan_ids_topk(Ids ids, Pass pass, bool dw, const TopkTile<acc_t>& A) {
  switch (ids) {
    case Ids::None: return scan_pass_topk<acc_t, COS, Ids::None>(pass, dw, A);
    case Ids::Explicit: return scan_pass_topk<acc_t, COS, Ids::Explicit>(pass, dw, A);
    case Ids::Self: return scan_pass_topk<acc_t, COS, Ids::Self>(pass, dw, A);
  }
}

// Selection: pos_idx [N, k_pos], neg_idx [N, k_neg] (int64, prefilled with
// -1) from the prepared arguments (prepare_select) and the list sizes
// kp = min(k_pos, M), kn = min(k_neg, M).
template <typename acc_t>
void select_topk_impl(const SelectArgs& S, int64_t k_pos, int64_t k_neg, bool dw,
                      const DwLaw<acc_t>& law, at::Tensor& pos_idx, at::Tensor& neg_idx) {
  const at::Tensor& x = S.x;
  const at::Tensor& r = S.r;
  const int64_t n = x.size(0), m = r.size(0);
  const int64_t kp = std::min(k_pos, m), kn = std::min(k_neg, m);
  const TileLayout L = tile_layout<acc_t>(n, m);
  const int64_t block_rows = L.block_rows;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t ps = pos_sign<acc_t>(S.pos);
  const acc_t ns = dw ? acc_t(1) : neg_sign<acc_t>(S.neg);
  const bool semihard = !dw && S.neg == NegStrategy::SemiHard;
  const bool cosine = S.dist == Distance::Cosine;
  const int64_t* qlp = S.ql.data_ptr<int64_t>();
  const int64_t* rlp = S.rl.data_ptr<int64_t>();
  const int64_t* qidp = S.ids == Ids::Explicit ? S.qid.data_ptr<int64_t>() : nullptr;
  const int64_t* ridp = S.ids == Ids::Explicit ? S.rid.data_ptr<int64_t>() : nullptr;
  int64_t* pout = pos_idx.data_ptr<int64_t>();
  int64_t* nout = neg_idx.data_ptr<int64_t>();
  const QuadWordsFn words = quad_words_for_call();

  at::parallel_for(0, L.nblocks, 1, [&](int64_t blk0, int64_t blk1) {
    at::NoGradGuard no_grad;  // worker threads: mm_out must never see autograd
    TileWorkspace<acc_t> W(x, L);
    std::vector<acc_t> pkey(block_rows * kp), nkey(block_rows * kn);
    std::vector<int64_t> pidx(block_rows * kp), nidx(block_rows * kn);
    std::vector<acc_t> lo(block_rows), hi(block_rows);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * block_rows, bm = std::min(block_rows, n - i0);
      const at::Tensor xb = W.anchors(x, i0, bm);
      std::fill(pkey.begin(), pkey.end(), inf);
      std::fill(nkey.begin(), nkey.end(), inf);
      std::fill(pidx.begin(), pidx.end(), int64_t(-1));
      std::fill(nidx.begin(), nidx.end(), int64_t(-1));
      auto sweep = [&](Pass pass, bool reuse_buffer) {
        W.sweep(xb, r, reuse_buffer, [&](const acc_t* dot, int64_t j0, int64_t cn) {
          TopkTile<acc_t> A{dot, bm, cn, i0, j0,
                            S.a.data_ptr<acc_t>() + i0, S.b.data_ptr<acc_t>() + j0,
                            qlp + i0, rlp + j0,
                            qidp ? qidp + i0 : nullptr, ridp ? ridp + j0 : nullptr,
                            ps, ns, lo.data(), hi.data(),
                            pkey.data(), pidx.data(), kp, nkey.data(), nidx.data(), kn, law,
                            words};
          if (cosine) {
            scan_ids_topk<acc_t, true>(S.ids, pass, dw, A);
          } else {
            scan_ids_topk<acc_t, false>(S.ids, pass, dw, A);
          }
        });
      };
      if (!semihard) {
        sweep(Pass::Fused, false);
      } else {
        sweep(Pass::PosOnly, false);
        for (int64_t i = 0; i < bm; ++i) {  // the window of the first positive
          semihard_window<acc_t>(pidx[i * kp] >= 0, pkey[i * kp], ps, S.margin, S.dist, inf,
                                 lo[i], hi[i]);
        }
        sweep(Pass::NegWindow, /*reuse_buffer=*/L.chunk == m);
      }
      for (int64_t i = 0; i < bm; ++i) {
        std::copy_n(pidx.data() + i * kp, kp, pout + (i0 + i) * k_pos);
        std::copy_n(nidx.data() + i * kn, kn, nout + (i0 + i) * k_neg);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mine_topk_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels,
    const c10::optional<at::Tensor>& ref_emb, const c10::optional<at::Tensor>& ref_labels,
    const c10::optional<at::Tensor>& query_ids, const c10::optional<at::Tensor>& ref_ids,
    int64_t k_pos, int64_t k_neg, int64_t pos_strategy, int64_t neg_strategy, int64_t distance,
    c10::optional<double> margin, double cutoff, double nonzero_loss_cutoff, int64_t seed) {
  check_topk_args(k_pos, k_neg, neg_strategy, distance, margin, cutoff, nonzero_loss_cutoff);
  const bool dw = neg_strategy == static_cast<int64_t>(NegStrategy::DistanceWeighted);
  // The tensor checks of fastmine::mine (which has no code 3: distance-weighted
  // reads its negatives' labels and ids as the hard rule does).
  const bool self_refs = check_mine_args(
      c10::DeviceType::CPU, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
      pos_strategy, dw ? static_cast<int64_t>(NegStrategy::Hard) : neg_strategy, distance, margin);
  at::NoGradGuard no_grad;  // the autograd kernel of fastmine::mine_topk sits above this one
  const at::Tensor& r = self_refs ? embeddings : *ref_emb;
  const int64_t n = embeddings.size(0), m = r.size(0);
  TORCH_CHECK_VALUE(std::min(k_pos, m) <= kMaxK, "fastmine::mine_topk_cpu: k_pos = ", k_pos,
                    " with ", m, " references: the CPU kernel keeps at most ", kMaxK,
                    " positives per anchor (min(k_pos, M) <= ", kMaxK, ")");
  TORCH_CHECK_VALUE(std::min(k_neg, m) <= kMaxK, "fastmine::mine_topk_cpu: k_neg = ", k_neg,
                    " with ", m, " references: the CPU kernel keeps at most ", kMaxK,
                    " negatives per anchor (min(k_neg, M) <= ", kMaxK, ")");
  if (dw) {
    // The noise counters are (j >> 2, i) as uint32 (docs/contract.md).
    TORCH_CHECK_VALUE(n <= (int64_t(1) << 32) && m <= (int64_t(1) << 34),
                      "fastmine::mine_topk_cpu: distance_weighted counts its noise by 32-bit "
                      "rows: embeddings may have at most 2^32 rows and the references 2^34, got ",
                      n, " and ", m);
  }
  auto lopts = at::TensorOptions().dtype(at::kLong);
  at::Tensor pos_idx = at::full({n, k_pos}, -1, lopts), neg_idx = at::full({n, k_neg}, -1, lopts);
  SelectArgs S;
  const auto dist = static_cast<Distance>(distance);
  if (prepare_select(S, embeddings, labels, r, self_refs ? labels : *ref_labels, query_ids,
                     self_refs ? query_ids : ref_ids, self_refs, dist)) {
    S.pos = static_cast<PosStrategy>(pos_strategy);
    S.neg = static_cast<NegStrategy>(neg_strategy);
    S.margin = margin.has_value() ? *margin : -1.0;
    std::vector<LogWeightTable> table;  // at most one (D >= 3, distance-weighted)
    auto law = [&](auto zero) {
      using acc_t = decltype(zero);
      DwLaw<acc_t> L{dw_params<acc_t>(cutoff, nonzero_loss_cutoff, embeddings.size(1)),
                     static_cast<uint64_t>(seed)};
      if (dw && L.a <= 0.0f && L.b <= 0.0f && L.lo < L.hi) {
        table.emplace_back(double(float(L.lo)), double(float(L.hi)), double(L.a), double(L.b));
        L.ub = &table.back();
      }
      return L;
    };
    if (embeddings.scalar_type() == at::kDouble) {
      select_topk_impl<double>(S, k_pos, k_neg, dw, law(0.0), pos_idx, neg_idx);
    } else {
      select_topk_impl<float>(S, k_pos, k_neg, dw, law(0.0f), pos_idx, neg_idx);
    }
  }
  at::Tensor pos_dist = at::empty({n, k_pos}, embeddings.options());
  at::Tensor neg_dist = at::empty({n, k_neg}, embeddings.options());
  const at::Tensor x = embeddings.detach().contiguous();
  const at::Tensor rc = self_refs ? x : r.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pair_distances", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    pair_distances<acc_t, scalar_t>(x, rc, pos_idx, dist, pos_dist);
    pair_distances<acc_t, scalar_t>(x, rc, neg_idx, dist, neg_dist);
  });
  return {pos_idx, neg_idx, pos_dist, neg_dist};
}

}  // namespace
}  // namespace cpu
}  // namespace fastmine

TORCH_LIBRARY_FRAGMENT(fastmine, m) { m.def(FASTMINE_MINE_TOPK_IMPL_SCHEMA("cpu")); }

TORCH_LIBRARY_IMPL(fastmine, CPU, m) { m.impl("mine_topk_cpu", &fastmine::cpu::mine_topk_cpu); }
