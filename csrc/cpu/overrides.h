// The CPU kernels' overrides: test and benchmark hooks that force one of the
// kernels' internal paths or tile shapes.  Every form gives the same results
// (tests/test_cpu_kernel.py and tests/test_topk_cpu.py check that); none is
// needed in production, where every field is at its default.
//
// One state for the whole library (defined once, csrc/cpu/overrides.cpp),
// initialised at first use from the environment (a fresh process, e.g. a
// benchmark run in a subprocess) and changed afterwards only through the op
// fastmine::_set_cpu_overrides (docs/ops.md, "CPU kernel overrides"):
//   FASTMINE_CPU_BLOCK    = "BM,BUFFER_KIB"  tiles: BM anchors per task and a
//                                             BUFFER_KIB KiB dot buffer, used
//                                             exactly as given (gram_tiles.h)
//   FASTMINE_CPU_SEMIHARD = "one" | "two"    the semi-hard path (mine_cpu.cpp)
//   FASTMINE_CPU_NOISE    = "avx2" | "scalar" a narrower form of the
//                                             distance-weighted noise
//                                             (mine_topk_cpu.cpp)
// "" (or the variable unset) is the default: the kernels' own choice.
// Anything else is an error naming the variable or the argument.
#pragma once

#include <cstdint>
#include <string>

namespace fastmine {
namespace cpu {

struct KernelOverrides {
  int64_t block_rows = 0;  // BM; 0: the default tiles (then buffer_kib = 0 too)
  int64_t buffer_kib = 0;  // the dot buffer in KiB
  enum class Semihard : uint8_t { Auto, OneSweep, TwoSweeps } semihard = Semihard::Auto;
  enum class Noise : uint8_t { Auto, Avx2, Scalar } noise = Noise::Auto;
};

// The overrides in force (a copy, read under a lock: one per kernel call).
KernelOverrides kernel_overrides();

}  // namespace cpu
}  // namespace fastmine
