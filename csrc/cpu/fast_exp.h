// exp for float32 in plain float arithmetic, so that GCC vectorises the loops
// that call it (csrc/cpu/contrastive_cpu.cpp's tile loops, compiled per ISA by
// FASTMINE_CPU_CLONES).  No libm call, no table, no branch: every step is a
// float multiply / add, a compare-and-select or an int <-> float conversion.
//
// Method (Cephes expf, S. L. Moshier):
//   n = round(x log2 e)                      (the 1.5 * 2^23 trick: add, subtract)
//   r = x - n ln 2, |r| <~ ln 2 / 2          (Cody-Waite: ln 2 = C1 + C2, C1 with
//                                             9 significant bits, so n C1 is exact)
//   e^r = 1 + r + r^2 P(r)                   (Cephes' degree-5 P: minimax for
//                                             e^r on [-ln2/2, ln2/2])
//   e^x = e^r 2^n                            (2^n built in the exponent bits; for
//                                             n = 128, 2^127 then a doubling)
// Error bound: below 1 ulp of the exact e^x for every float x in
// [ln FLT_MIN, ln FLT_MAX] = [-87.3365, 88.7228]: an exhaustive check of all
// 2,237,668,969 of them against float64 exp measured 0.9903 ulp at most
// (x = 70.4031); tests/test_contrastive_cpu_kernel.py asserts < 1 ulp on a
// dense grid of every binade (and <= 2 ulp against torch.exp).  Outside: e^x <
// FLT_MIN is returned as 0 (no subnormals: an absolute error below FLT_MIN =
// 1.2e-38), x > ln FLT_MAX as +inf, -inf as 0, +inf as +inf.  NaN is not
// propagated (callers never pass one).
//
// The rounding of every step is IEEE float with -ffp-contract=off (the
// manifest's flags): no FMA contraction, so each ISA clone returns the same
// bits.
//
// GCC vectorises the callers' loops (the selects included) under the
// manifest's -fno-trapping-math (fastmine/_build_manifest.json, "about").
#pragma once

#include <cstdint>
#include <limits>

namespace fastmine {
namespace cpu {

#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float exp_f32(float x) {
  constexpr float kLo = -87.33654475f;     // ln FLT_MIN: below, 0
  constexpr float kHi = 88.72283172607f;   // the largest float with e^x <= FLT_MAX
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;    // 1.5 * 2^23: x + kRound - kRound = rint(x)
  constexpr float kC1 = 0.693359375f;      // ln 2 = kC1 + kC2
  constexpr float kC2 = -2.12194440e-4f;
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);
  const float n = (xc * kLog2e + kRound) - kRound;  // |n| <= 128, an integer
  const float r = (xc - n * kC1) - n * kC2;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;
  // 2^n = 2^(n - big) * (1 + big): 2^128 is not a float, 2^127 * 2 of e^r < 1 is.
  const float big = n > 127.0f ? 1.0f : 0.0f;
  const int32_t ni = static_cast<int32_t>(n - big);
  const float scale = __builtin_bit_cast(float, static_cast<uint32_t>(ni + 127) << 23);
  float e = er * scale;
  e = e + e * big;
  // Below / above the range: 0 / +inf.
  const float keep = x < kLo ? 0.0f : 1.0f;
  const float over = x > kHi ? std::numeric_limits<float>::infinity() : 0.0f;
  return e * keep + over;
}

}  // namespace cpu
}  // namespace fastmine
