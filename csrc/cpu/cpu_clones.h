// The ISA clones of the CPU kernels' hot loops: GCC `target_clones` on x86-64
// makes one copy per ISA and the loader picks one for the running CPU (GCC's
// resolver order: avx512f, then avx2, then default), so one build is portable
// and fast on AVX2 and AVX-512 CPUs alike.
//
// FASTMINE_CPU_NO_AVX512 (a measurement build: docs/build.md, "CPU clones")
// leaves the avx512f clone out, so that an AVX-512 machine runs -- and can
// time -- the clone an AVX2-only CPU runs.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTMINE_CPU_HAS_CLONES 1
#if defined(FASTMINE_CPU_NO_AVX512)
#define FASTMINE_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define FASTMINE_CPU_CLONE_NAMES "avx2,default"
#else
#define FASTMINE_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define FASTMINE_CPU_CLONE_NAMES "avx512f,avx2,default"
#endif
#else
#define FASTMINE_CPU_CLONES
#define FASTMINE_CPU_CLONE_NAMES "none"
#endif

namespace fastmine {
namespace cpu {

// The clone the loader picks on this CPU (the resolver's order above), for
// build_info() and the benchmark records.
inline const char* clone_in_use() {
#if defined(FASTMINE_CPU_HAS_CLONES)
  __builtin_cpu_init();
#if !defined(FASTMINE_CPU_NO_AVX512)
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
#endif
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "default";
#else
  return "none";
#endif
}

}  // namespace cpu
}  // namespace fastmine
