// Host emulation of the CUDA features that csrc/cuda/*.cuh use, so that the
// torch-free kernels compile with a plain C++ compiler and *execute* on a CPU.
//
// Why: CI has no GPU.  nvcc can compile the kernels there but nothing runs them;
// this emulation runs the very same kernel source (mine_kernels.cuh) with CUDA's
// execution model, so that indexing, masking, tiling, split merging, barriers
// and warp collectives are tested on every CI run (tests/test_cuda_emulation.py
// builds tests/csrc/selftest.cu with -DFASTMINE_CUDA_EMULATION and runs it).
// It is not a performance model and not a substitute for a GPU run: it cannot
// see memory-model effects between blocks, bank conflicts, or compiler bugs.
//
// Execution model (cuda_emulation.cpp):
//   * blocks run one after another; the threads of a block are cooperative
//     fibers on one OS thread.  A fiber runs until it reaches a barrier
//     (__syncthreads, or the warp barrier inside a shuffle / WMMA collective),
//     then the next runnable fiber runs.  The order in which runnable fibers
//     are resumed is a policy: FASTMINE_EMU_SCHEDULE = forward (default) |
//     reverse | depth | shuffle[:seed] (cuda_emulation.cpp).  A missing
//     __syncthreads shows up as wrong results under some policy: the CI test
//     runs them all, and checks that deleting any one barrier is caught.
//   * __syncthreads must be reached by every thread of the block, a warp
//     collective by every lane of the warp: a fiber that exits while others
//     wait, or a cycle of waits, aborts the launch with a message naming the
//     kernel's barrier state (cudaGetLastError() then reports it).
//   * WMMA fragments are distributed like on hardware: each lane owns
//     num_elements = rows * cols / 32 elements, so element-wise code on
//     fragment.x[] (e.g. the tf32 rounding) is exercised per lane.  load/store
//     check the documented requirements (256-bit aligned pointer, ldm a
//     multiple of 16 bytes); mma_sync gathers the warp's fragments and
//     accumulates in fp32 in k order.  tf32 inputs are truncated to tf32, as the
//     tensor core ignores their low mantissa bits.
//   * __shared__ variables become function-local statics: one copy, shared by
//     the fibers of the running block (blocks never run concurrently).  Their
//     contents carry over from the previous block, like stale shared memory.
//   * the runtime API (cudaMalloc, cudaMemcpy, cudaMemsetAsync, ...) works on
//     host memory; cudaMalloc fills new buffers with 0x7f bytes so that reads
//     of never-written workspace give conspicuous values.  Streams are ignored
//     (everything is synchronous).  Launch configurations are validated
//     against the hardware limits (block <= 1024 threads, grid.y/z <= 65535).
//     Its definitions have hidden visibility, so that a real libcudart in the
//     same process (a CUDA build of torch loads one) never takes their place.
//
// Types come from the toolkit's own host-compilable headers (cuda_fp16.h,
// cuda_bf16.h pull in cuda_runtime_api.h and vector_types.h), so __half,
// __nv_bfloat16, dim3 and cudaError_t are the real ones.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math.h>  // libstdc++: float overloads of sqrt & co. in the global namespace, like CUDA's

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#if !defined(FASTMINE_CUDA_EMULATION)
#error "cuda_emulation.h is for host builds with -DFASTMINE_CUDA_EMULATION"
#endif

// ------------------------------------------------------------ qualifiers
// Kernels and device functions become ordinary host functions.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// The GPU generation the kernels are compiled for (their __CUDA_ARCH__ tests):
// 900 runs the tensor-core paths; 750 the FFMA fallback of sm_75 for bf16/tf32
// (fp16 keeps WMMA from 700).
#if !defined(FASTMINE_EMU_ARCH)
#define FASTMINE_EMU_ARCH 900
#endif

#if defined(__SANITIZE_ADDRESS__)
// GCC's AddressSanitizer puts redzones only around globals aligned to at most
// 16 bytes, so a 128-byte aligned __shared__ array would go unguarded: cap the
// alignment, and leave the 256-bit WMMA pointer check to the plain build.
#undef __align__
#define __align__(n) __attribute__((aligned(16)))
#define FASTMINE_EMU_WEAK_ALIGNMENT 1
#endif

namespace fastmine {
namespace emu {

// Index registers of the running fiber.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Runs `body` once per thread of every block of `grid` (see the file comment).
// Returns cudaSuccess, or the launch's error (also kept for cudaGetLastError).
cudaError_t launch(dim3 grid, dim3 block, const char* kernel_name, void (*body)(void*),
                   void* ctx);

void sync_block(const char* file, int line);  // __syncthreads() at file:line
void sync_warp(unsigned mask);       // every lane of `mask` (all lanes of the warp)
int lane_id();                       // linear thread index % 32
[[noreturn]] void fail(const char* fmt, ...);  // abort the running launch

// Per-warp scratch (64-bit slots) for collectives: one slot per lane, plus a
// matrix area for WMMA.
uint64_t* warp_slots();
float* warp_matrix(int which);  // which: 0 = A, 1 = B, 2 = C; 16 x 16 floats each

// Launch helper used by mine_kernels.cuh: copies the arguments once and calls
// the kernel with them on every fiber.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, const char* name,
                          Args... args) {
  struct Ctx {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } ctx{kernel, std::tuple<std::decay_t<Params>...>(args...)};
  return launch(grid, block, name, [](void* p) {
    auto* c = static_cast<Ctx*>(p);
    std::apply(c->kernel, c->params);
  }, &ctx);
}

}  // namespace emu
}  // namespace fastmine

#define threadIdx (::fastmine::emu::thread_idx())
#define blockIdx (::fastmine::emu::block_idx())
#define blockDim (::fastmine::emu::block_dim())
#define gridDim (::fastmine::emu::grid_dim())

// A macro, so that the barrier knows its source line: FASTMINE_EMU_DROP_BARRIER
// = "file:line" turns that one barrier into a no-op (fault injection: the CI
// test checks that the self-test catches the loss of each barrier).
#define __syncthreads() ::fastmine::emu::sync_block(__FILE__, __LINE__)

// __shfl_xor_sync: every lane of the warp deposits its value, then reads lane ^ lane_mask's.
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  static_assert(sizeof(V) <= 8 && std::is_trivially_copyable<V>::value, "shuffle of a 64-bit value");
  if (width != 32) ::fastmine::emu::fail("__shfl_xor_sync: width %d is not emulated", width);
  uint64_t* slots = ::fastmine::emu::warp_slots();
  const int lane = ::fastmine::emu::lane_id();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  ::fastmine::emu::sync_warp(mask);  // previous readers are done with the slots
  slots[lane] = bits;
  ::fastmine::emu::sync_warp(mask);  // every lane has deposited
  const int src = lane ^ lane_mask;
  if (src >= 32 || !(mask >> src & 1u))
    ::fastmine::emu::fail("__shfl_xor_sync: lane %d reads lane %d outside mask 0x%x", lane, src, mask);
  V out;
  std::memcpy(&out, &slots[src], sizeof(V));
  return out;
}

// Fibers never run concurrently, so a read-modify-write is atomic.
inline float atomicAdd(float* p, float v) { const float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { const double o = *p; *p = o + v; return o; }

// ------------------------------------------------------------------- WMMA
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };

// Round to tf32 (10 mantissa bits), to nearest with ties away from zero, as
// the device's cvt.rna.tf32.f32.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) {  // finite: add half an ulp to the magnitude, truncate
    u += 0x1000u;
    u &= 0xffffe000u;
  }
  std::memcpy(&v, &u, 4);
  return v;
}

namespace detail {
template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K> struct shape;
template <int M, int N, int K> struct shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename S> inline S from_float(float v) { return static_cast<S>(v); }
template <> inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline void check_pointer(const void* p, unsigned ldm, size_t elem, const char* what) {
#if !defined(FASTMINE_EMU_WEAK_ALIGNMENT)
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::fastmine::emu::fail("%s: pointer %p is not 256-bit aligned", what, p);
#endif
  if ((ldm * elem) % 16 != 0)
    ::fastmine::emu::fail("%s: ldm %u (x %zu bytes) is not a multiple of 16 bytes", what, ldm, elem);
}
}  // namespace detail

// Element e = t * 32 + lane of the row-major (rows x cols) matrix lives in lane
// `lane`'s x[t], each element once.  The hardware's layout is unspecified and
// differs (e.g. a half A fragment holds 16 elements per lane, some replicated);
// code may only rely on x[] being element-wise, which is all the kernels do.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::storage<T>::type;
  static constexpr int rows = detail::shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  static_assert(rows * cols % 32 == 0, "fragment size");
  element_type x[num_elements];
  static int row_of(int t, int lane) { return (t * 32 + lane) / cols; }
  static int col_of(int t, int lane) { return (t * 32 + lane) % cols; }
};

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  using E = typename fragment<Use, M, N, K, T, L>::element_type;
  for (int t = 0; t < f.num_elements; ++t) f.x[t] = detail::from_float<E>(v);
}

// matrix_a / matrix_b with a compile-time layout.
template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators take a layout_t");
  detail::check_pointer(p, ldm, sizeof(P), "wmma::load_matrix_sync");
  constexpr bool row = std::is_same<L, row_major>::value;
  const int lane = ::fastmine::emu::lane_id();
  for (int t = 0; t < f.num_elements; ++t) {
    const int r = f.row_of(t, lane), c = f.col_of(t, lane);
    f.x[t] = p[row ? size_t(r) * ldm + c : size_t(c) * ldm + r];
  }
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_pointer(p, ldm, sizeof(float), "wmma::store_matrix_sync");
  const int lane = ::fastmine::emu::lane_id();
  for (int t = 0; t < f.num_elements; ++t) {
    const int r = f.row_of(t, lane), c = f.col_of(t, lane);
    p[layout == mem_row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r] = f.x[t];
  }
}

// D = A B + C over the warp: every lane publishes its elements, then computes its own.
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, TC>& c) {
  static_assert(M * K <= 256 && K * N <= 256 && M * N <= 256, "scratch size");
  constexpr bool tf32 = std::is_same<TA, precision::tf32>::value;
  auto input = [](float v) {  // the tensor core reads 10 mantissa bits of a tf32 input
    if (!tf32) return v;
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u &= 0xffffe000u;
    std::memcpy(&v, &u, 4);
    return v;
  };
  float* A = ::fastmine::emu::warp_matrix(0);
  float* B = ::fastmine::emu::warp_matrix(1);
  float* C = ::fastmine::emu::warp_matrix(2);
  const int lane = ::fastmine::emu::lane_id();
  ::fastmine::emu::sync_warp(0xffffffffu);  // previous mma's readers are done
  for (int t = 0; t < a.num_elements; ++t)
    A[a.row_of(t, lane) * K + a.col_of(t, lane)] = input(detail::to_float(a.x[t]));
  for (int t = 0; t < b.num_elements; ++t)
    B[b.row_of(t, lane) * N + b.col_of(t, lane)] = input(detail::to_float(b.x[t]));
  for (int t = 0; t < c.num_elements; ++t) C[c.row_of(t, lane) * N + c.col_of(t, lane)] = c.x[t];
  ::fastmine::emu::sync_warp(0xffffffffu);
  for (int t = 0; t < d.num_elements; ++t) {
    const int r = d.row_of(t, lane), col = d.col_of(t, lane);
    float s = C[r * N + col];
    for (int k = 0; k < K; ++k) s += A[r * K + k] * B[k * N + col];
    d.x[t] = s;
  }
}

}  // namespace wmma
}  // namespace nvcuda

// ---------------------------------------------------------- runtime API
// The C++ convenience overload of cuda_runtime.h.
template <typename T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
  return ::cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
