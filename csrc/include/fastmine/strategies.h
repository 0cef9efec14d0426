// Torch-free rules shared by every compiled backend -- the CPU kernels
// (csrc/cpu/mine_cpu.cpp) and the CUDA kernels (csrc/cuda/mine_kernels.cuh) --
// and mirrored once in Python (fastmine/_contract.py for the codes and bounds;
// fastmine/reference.py and fastmine/_triton.py for the formulas).  The
// integer values of the enums are part of the op schemas and must never change.
//
// Every function is FASTMINE_HD: __host__ __device__ under nvcc, a plain inline
// function for the host C++ compiler, so CPU and CUDA evaluate one definition.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTMINE_HD __host__ __device__
#else
#define FASTMINE_HD
#endif

namespace fastmine {

// Which same-class reference becomes the positive.
enum class PosStrategy : int64_t {
  Easy = 0,  // nearest same-class reference (EPS, Levi et al. 2021)
  Hard = 1,  // farthest same-class reference
};

// Which different-class reference becomes the negative.
enum class NegStrategy : int64_t {
  Hard = 0,      // nearest different-class reference
  SemiHard = 1,  // nearest with d_an > d_ap (and d_an < d_ap + margin if given)
  Easy = 2,      // farthest different-class reference
  // Random draw with probability ~ w(d) (Wu et al. 2017), Gumbel-max keyed by a
  // seed: only fastmine::mine_topk carries the seed and cutoffs, so kernels of
  // fastmine::mine / mine_select reject it (op_checks.h, fastmine_ops.cpp).
  DistanceWeighted = 3,
};

enum class Distance : int64_t {
  Euclidean = 0,         // ||a - b||_2        (mined on the square, a monotone map)
  SquaredEuclidean = 1,  // ||a - b||_2^2
  Cosine = 2,            // 1 - cos(a, b)
};

// The sweeps of one selection.  Every rule but semi-hard needs one fused sweep
// (positive and negative together).  Semi-hard needs v_ap before it can judge
// a negative: a positive-only sweep, then a negative sweep inside the window
// (lo, hi) derived from v_ap (semihard_window below).
enum class Pass : int { Fused = 0, PosOnly = 1, NegWindow = 2 };

// How same-sample pairs (never selected) are recognised.
enum class Ids : int {
  None = 0,      // ref_emb given without ids: no pair is excluded
  Explicit = 1,  // query_ids[i] == ref_ids[j]
  Self = 2,      // the references are the batch and no ids are given: i == j
};

// Is (anchor i with id qi, reference j with id rj) a same-sample pair?
// (qi, rj are read only for Ids::Explicit.)
FASTMINE_HD inline bool same_sample(Ids ids, int64_t i, int64_t j, int64_t qi, int64_t rj) {
  return ids == Ids::Explicit ? qi == rj : (ids == Ids::Self && i == j);
}

// ------------------------------------------------------------ mining value
// Round-to-nearest arithmetic that the compiler may not contract into an FMA:
// nvcc contracts a*b+c by default, so device code spells the operations out;
// host code is compiled with -ffp-contract=off.  CPU and GPU then compute the
// same mining value bit for bit (given the same dot product).
#if defined(__CUDA_ARCH__)
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ inline double sub_rn(double a, double b) { return __dsub_rn(a, b); }
#else
template <typename A> inline A mul_rn(A a, A b) { return a * b; }
template <typename A> inline A add_rn(A a, A b) { return a + b; }
template <typename A> inline A sub_rn(A a, A b) { return a - b; }
#endif
// Correctly rounded square root on both sides (nvcc's default -prec-sqrt=true).
template <typename A>
FASTMINE_HD inline A sqrt_rn(A x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// The value mining ranks, from a dot product a.b and per-row terms:
//   squared Euclidean (also mined for Euclidean):  v = (a_i + b_j) - 2 a.b,
//       a_i = |x_i|^2, b_j = |r_j|^2 (the Gram expansion);
//   cosine:  v = 1 - (a.b * a_i) * b_j,  a_i = 1/|x_i|, b_j = 1/|r_j|.
// Clamped at +0 (rounding can make it slightly negative; the clamp also makes
// exact duplicates tie at 0, so ties go to the smallest index).
template <typename acc_t>
FASTMINE_HD inline acc_t mining_value(acc_t dot, acc_t ai, acc_t bj, bool cosine) {
  const acc_t v = cosine ? sub_rn(acc_t(1), mul_rn(mul_rn(dot, ai), bj))
                         : sub_rn(add_rn(ai, bj), mul_rn(acc_t(2), dot));
  return v > acc_t(0) ? v : acc_t(0);
}

// The row term of the mining value from |x|^2: |x|^2 itself (Euclidean family)
// or 1/|x| (cosine).
template <typename acc_t>
FASTMINE_HD inline acc_t row_term(acc_t sqnorm, bool cosine) {
  return cosine ? acc_t(1) / sqrt_rn(sqnorm) : sqnorm;
}

// ------------------------------------------------------- admissible rows
// Admissible squared row norms |x|^2 in the compute dtype (docs/contract.md,
// "Admissible rows"; fastmine/_contract.py sqnorm_bounds is the Python form):
// at most max/8 for every distance (no Gram term can overflow), at least
// tiny/eps for cosine (the direction is defined).
template <typename acc_t> FASTMINE_HD inline acc_t sqnorm_max();
template <> FASTMINE_HD inline float sqnorm_max<float>() { return FLT_MAX / 8.0f; }
template <> FASTMINE_HD inline double sqnorm_max<double>() { return DBL_MAX / 8.0; }
template <typename acc_t> FASTMINE_HD inline acc_t cosine_sqnorm_min();
template <> FASTMINE_HD inline float cosine_sqnorm_min<float>() { return FLT_MIN / FLT_EPSILON; }
template <> FASTMINE_HD inline double cosine_sqnorm_min<double>() { return DBL_MIN / DBL_EPSILON; }

// Is a row with squared norm s (NaN if the row has a NaN, +inf if it has an
// Inf or overflows) admissible?  NaN fails every comparison.
template <typename acc_t>
FASTMINE_HD inline bool row_admissible(acc_t s, bool cosine) {
  return s <= sqnorm_max<acc_t>() && (!cosine || s >= cosine_sqnorm_min<acc_t>());
}

// ------------------------------------------------------------- selection
// Selection as "argmin of a key": a nearest rule uses key = v, a farthest rule
// key = -v, +inf for an inadmissible reference.  Ties keep the smallest index.
FASTMINE_HD inline constexpr bool pos_is_nearest(PosStrategy s) { return s == PosStrategy::Easy; }
FASTMINE_HD inline constexpr bool neg_is_nearest(NegStrategy s) { return s != NegStrategy::Easy; }
template <typename acc_t>
FASTMINE_HD inline acc_t pos_sign(PosStrategy s) { return pos_is_nearest(s) ? acc_t(1) : acc_t(-1); }
template <typename acc_t>
FASTMINE_HD inline acc_t neg_sign(NegStrategy s) { return neg_is_nearest(s) ? acc_t(1) : acc_t(-1); }

// The semi-hard window is applied to the *mining* value v, which for
// Euclidean is the squared distance.  Given the positive's mining value
// v_ap, a negative is admissible iff  lo < v_an < hi  with
//   lo = v_ap,  hi = +inf (no margin, margin < 0)  or
//   hi = (sqrt(v_ap) + margin)^2  (Euclidean)  |  v_ap + margin (others),
// computed in float64 and rounded to acc_t.
template <typename acc_t>
FASTMINE_HD inline acc_t semihard_upper(acc_t v_ap, double margin, Distance dist, acc_t inf) {
  if (margin < 0) return inf;  // no margin given
  if (dist == Distance::Euclidean) {
#if defined(__CUDA_ARCH__)
    // Correctly rounded sqrt/add/mul without FMA contraction: bit-identical to the host.
    double r = __dadd_rn(::sqrt(static_cast<double>(v_ap)), margin);
    return static_cast<acc_t>(__dmul_rn(r, r));
#else
    double r = __builtin_sqrt(static_cast<double>(v_ap)) + margin;
    return static_cast<acc_t>(r * r);
#endif
  }
  return static_cast<acc_t>(static_cast<double>(v_ap) + margin);
}

// The window of an anchor from its positive's key (key = pos_sign * v_ap), or
// the empty window (lo = hi = +inf) when it has no positive: the semi-hard
// rule needs d_ap, so such an anchor gets no negative either.
template <typename acc_t>
FASTMINE_HD inline void semihard_window(bool has_pos, acc_t pos_key, acc_t ps, double margin,
                                        Distance dist, acc_t inf, acc_t& lo, acc_t& hi) {
  if (!has_pos) {
    lo = inf;
    hi = inf;
    return;
  }
  lo = ps * pos_key;
  hi = semihard_upper<acc_t>(lo, margin, dist, inf);
}

// A candidate negative's admissibility inside the window (NegWindow pass).
template <typename acc_t>
FASTMINE_HD inline bool in_semihard_window(acc_t v, acc_t lo, acc_t hi) {
  return v > lo && v < hi;
}

// ----------------------------------------------------- work decomposition
// Splits of the reference axis for the CUDA forward: with few anchor blocks
// (small N) the references are split over gridDim.y so that about two waves of
// blocks fill the `sm_count` SMs; at most one split per reference tile, and at
// most 256 (each split costs a [N] partial result and a merge step).
FASTMINE_HD inline int64_t choose_splits(int64_t n, int64_t m, int sm_count, int bm = 64,
                                         int bn = 64) {
  const int64_t row_blocks = (n + bm - 1) / bm, tiles = (m + bn - 1) / bn;
  if (row_blocks == 0) return 1;
  int64_t s = (2 * int64_t(sm_count) + row_blocks - 1) / row_blocks;
  if (s > tiles) s = tiles;
  if (s > 256) s = 256;
  return s < 1 ? 1 : s;
}

}  // namespace fastmine
