// Distance-weighted sampling (Wu et al. 2017) for the compiled kernels: the
// counter-based noise and the log-weight, one definition for the CPU kernels
// and the CUDA kernels (FASTMINE_HD).  The rules are docs/contract.md,
// "Random sampling (distance-weighted)"; the executable definition of the
// noise is fastmine/_philox.py, and tests/test_philox.py compiles this header
// and checks it against that, bit for bit for the uniforms.
#pragma once
#include <cmath>
#include <cstdint>

#include "fastmine/strategies.h"  // FASTMINE_HD

namespace fastmine {

// Philox4x32-10 (Salmon et al. 2011, Random123): counter c[4], key (k0, k1);
// c is replaced by the output block.  The 32x32 -> 64-bit products compile to
// mul.hi / mul.lo under nvcc.
FASTMINE_HD inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }  // Weyl key bump
    const uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c[0] = hi1 ^ c[1] ^ k0; c[1] = lo1; c[2] = hi0 ^ c[3] ^ k1; c[3] = lo0;
  }
}

// The four words of anchor row i for reference rows 4q .. 4q+3 (q = j >> 2):
// word j & 3 belongs to reference row j.  Key (seed mod 2^32, seed >> 32),
// counter (q, i, 0, 0).  One call per quad of columns.
FASTMINE_HD inline void noise_words(uint64_t seed, uint32_t i, uint32_t q, uint32_t out[4]) {
  out[0] = q; out[1] = i; out[2] = 0; out[3] = 0;
  philox4x32_10(out, uint32_t(seed), uint32_t(seed >> 32));
}

// U = ((x >> 9) + 1/2) 2^-23: exact in float32, in [2^-24, 1 - 2^-24].
FASTMINE_HD inline float noise_uniform(uint32_t x) {
  return (float(x >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// Gumbel noise g = -log(-log U), in [G_MIN, G_MAX] = [-2.8116, 16.6356];
// accurate logf (never __logf or fast-math).
FASTMINE_HD inline float noise_gumbel(uint32_t x) {
  return -::logf(-::logf(noise_uniform(x)));
}

// Every computed g is <= kGumbelMax (fastmine._philox.G_MAX), so a candidate
// whose log-weight lw has fl(lw + kGumbelMax) < the current k-th key can
// neither beat nor tie it: the kernels skip its noise (docs/topk.md, "Prune").
constexpr float kGumbelMax = 16.64f;

// The distance-weighted law on the mining value v = d^2, with the thresholds
// lo = fl(cutoff^2), hi = fl(min(nonzero_loss_cutoff, 2)^2) rounded to v's
// type T and the exponents a = (2 - D) / 2, b = (3 - D) / 2:
//   vc = max(v, lo);  w > 0 iff vc < hi;  log w = a log vc + b log1p(-vc / 4)
// (float32 logarithms).  Returns -inf where w = 0.
// vc = max(v, lo), the clamped value both the weight and its support read
// (the CPU kernel's range and table prunes clamp with this too).
template <typename T>
FASTMINE_HD inline T dw_clamp(T v, T lo) {
  return v < lo ? lo : v;
}
template <typename T>
FASTMINE_HD inline float dw_log_weight(T v, T lo, T hi, float a, float b) {
  const T vc = dw_clamp(v, lo);
  if (!(vc < hi)) return -INFINITY;
  const float f = float(vc);
  return a * ::logf(f) + b * ::log1pf(-0.25f * f);
}

// The parameters of dw_log_weight for a call, T = the mining value's type:
// lo = fl(cutoff^2), hi = fl(min(nonzero_loss_cutoff, 2)^2) (squared in
// float64, then rounded to T, as the contract says), a = (2 - D) / 2,
// b = (3 - D) / 2 (float32; exact for any practical D).
template <typename T>
struct DwParams {
  T lo, hi;
  float a, b;
};
template <typename T>
FASTMINE_HD inline DwParams<T> dw_params(double cutoff, double nonzero_loss_cutoff, int64_t dim) {
  const double c = nonzero_loss_cutoff < 2.0 ? nonzero_loss_cutoff : 2.0;
  return {static_cast<T>(cutoff * cutoff), static_cast<T>(c * c),
          static_cast<float>((2.0 - double(dim)) / 2.0), static_cast<float>((3.0 - double(dim)) / 2.0)};
}

}  // namespace fastmine
