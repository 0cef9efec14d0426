// Torch-free definitions shared by every compiled backend (CPU C++, CUDA) and
// mirrored in fastmine/_contract.py.  The integer values are part of the op
// schema `fastmine::mine_select` and must never change.
#pragma once
#include <cstdint>
#include <limits>

// Helpers below are usable from CUDA device code too (csrc/cuda); plain
// inline functions for host compilers.
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
};

enum class Distance : int64_t {
  Euclidean = 0,         // ||a - b||_2        (mined on the square, a monotone map)
  SquaredEuclidean = 1,  // ||a - b||_2^2
  Cosine = 2,            // 1 - cos(a, b)
};

// The value mining ranks, from a dot product a.b and per-row terms:
//   squared Euclidean (also mined for Euclidean):  v = a_i + b_j - 2 a.b,
//       a_i = |x_i|^2, b_j = |r_j|^2 (the Gram expansion);
//   cosine:  v = 1 - a.b * a_i * b_j,  a_i = 1/|x_i|, b_j = 1/|r_j|.
// Clamped at +0 (rounding can make it slightly negative).  This is the one
// definition for the compiled kernels (fastmine/reference.py and
// fastmine/_triton.py write the same formula in Python).
template <typename acc_t>
FASTMINE_HD inline acc_t mining_value(acc_t dot, acc_t ai, acc_t bj, bool cosine) {
  const acc_t v = cosine ? acc_t(1) - dot * ai * bj : ai + bj - acc_t(2) * dot;
  return v > acc_t(0) ? v : acc_t(0);
}

// Admissible squared row norms |x|^2 in the compute dtype (docs/contract.md,
// "Admissible rows"; fastmine/_contract.py sqnorm_bounds is the Python form):
// at most max/8 for every distance (no Gram term can overflow), at least
// tiny/eps for cosine (the direction is defined).
template <typename acc_t>
FASTMINE_HD inline acc_t sqnorm_max() {
  return std::numeric_limits<acc_t>::max() / acc_t(8);
}
template <typename acc_t>
FASTMINE_HD inline acc_t cosine_sqnorm_min() {
  return std::numeric_limits<acc_t>::min() / std::numeric_limits<acc_t>::epsilon();
}

// Selection as "argmin of a key": a nearest rule uses key = d, a farthest rule
// key = -d.  Ties keep the smallest reference index.
FASTMINE_HD inline constexpr bool pos_is_nearest(PosStrategy s) { return s == PosStrategy::Easy; }
FASTMINE_HD inline constexpr bool neg_is_nearest(NegStrategy s) { return s != NegStrategy::Easy; }

// The semi-hard window is applied to the *mining* value v, which for
// Euclidean is the squared distance.  Given the positive's mining value
// v_ap, a negative is admissible iff  lo < v_an < hi  with
//   lo = v_ap,  hi = +inf (no margin)  or
//   hi = (sqrt(v_ap) + margin)^2  (Euclidean)  |  v_ap + margin (others).
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

}  // namespace fastmine
