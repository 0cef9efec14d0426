// Checks of the host CUDA emulation itself (built and run by
// tests/test_cuda_emulation.py): its collectives compute what the hardware's
// do, and the misuses it promises to catch are caught.  Prints one line per
// check and "N passed, M failed"; exit 1 on failure.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "mine_kernels.cuh"  // fastmine::cuda::launch_kernel, over the emulation

namespace {

int g_pass = 0, g_fail = 0;

void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  (ok ? g_pass : g_fail)++;
}

bool error_mentions(cudaError_t e, cudaError_t want, const char* text) {
  const std::string msg = cudaGetErrorString(e);
  return e == want && msg.find(text) != std::string::npos;
}

// out[t * 5 + b] = value of lane t ^ (1 << b) in round b; the values change
// between rounds, so a round that read the previous round's slots would show.
__global__ void shuffle_kernel(int64_t* out) {
  const int t = threadIdx.x;
  for (int b = 0; b < 5; ++b)
    out[t * 5 + b] = __shfl_xor_sync(0xffffffffu, int64_t(1000 + t + 100 * b), 1 << b);
}

// One 64 x 64 tile of the tf32 dot-product path of the kernels (dot_tile), copied out.
__global__ void tf32_tile_kernel(const float* x, const float* r, float* out, int64_t d) {
  using C = fastmine::cuda::TileConfig<float, fastmine::cuda::DotPath::Tf32>;
  __shared__ __align__(128) unsigned char smem[C::kSmemBytes];
  fastmine::cuda::dot_tile<float, fastmine::cuda::DotPath::Tf32>(smem, x, r, 0, 0, 64, 64, d);
  const float* tile = reinterpret_cast<const float*>(smem);
  for (int e = threadIdx.x; e < 64 * 64; e += blockDim.x) out[e] = tile[(e / 64) * C::LDC + e % 64];
}

// tf32 mma_sync on inputs that were *not* rounded: the tensor core reads 10
// mantissa bits, so 1 + 2^-11 counts as 1.
__global__ void tf32_unrounded_mma_kernel(const float* a, const float* b, float* d) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 8);
  wmma::load_matrix_sync(fb, b, 8);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

// Block 0's thread t writes t to shared memory, the block syncs, thread t
// reads thread (t + 1) % n's value.
__global__ void barrier_kernel(int* out) {
  __shared__ int s[256];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = t + 7 * blockIdx.x;
  __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// Only even threads reach the barrier: undefined behaviour on a GPU.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) __syncthreads();
  out[threadIdx.x] = 1;
}

// One warp: D = A B + C with half inputs, checked against a plain loop.
__global__ void mma_kernel(const __half* a, const __half* b, float* d, int offset) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 1.0f);
  wmma::load_matrix_sync(fa, a + offset, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

void run() {
  {  // shuffles
    int64_t* out;
    cudaMalloc(&out, sizeof(int64_t) * 32 * 5);
    fastmine::cuda::launch_kernel(shuffle_kernel, dim3(1), dim3(32), nullptr, "shuffle_kernel", out);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int t = 0; t < 32; ++t)
      for (int b = 0; b < 5; ++b) ok = ok && out[t * 5 + b] == 1000 + (t ^ (1 << b)) + 100 * b;
    check(ok, "__shfl_xor_sync returns lane ^ mask's value");
    cudaFree(out);
  }
  {
    int* out;
    cudaMalloc(&out, sizeof(int) * 3 * 256);
    fastmine::cuda::launch_kernel(barrier_kernel, dim3(3), dim3(256), nullptr, "barrier_kernel", out);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int b = 0; b < 3; ++b)
      for (int t = 0; t < 256; ++t) ok = ok && out[b * 256 + t] == (t + 1) % 256 + 7 * b;
    check(ok, "__syncthreads orders shared-memory writes before reads (3 blocks x 256 threads)");
    cudaFree(out);
  }
  {
    int* out;
    cudaMalloc(&out, sizeof(int) * 64);
    fastmine::cuda::launch_kernel(divergent_barrier_kernel, dim3(1), dim3(64), nullptr,
                                  "divergent_barrier_kernel", out);
    check(error_mentions(cudaGetLastError(), cudaErrorLaunchFailure, "deadlock"),
          "a __syncthreads that half the block skips is reported as a deadlock");
    check(cudaGetLastError() == cudaSuccess, "cudaGetLastError clears the error");
    cudaFree(out);
  }
  {
    int* out = nullptr;
    fastmine::cuda::launch_kernel(barrier_kernel, dim3(1), dim3(2048), nullptr, "barrier_kernel", out);
    check(error_mentions(cudaGetLastError(), cudaErrorInvalidConfiguration, "block (2048"),
          "a 2048-thread block is an invalid configuration");
    fastmine::cuda::launch_kernel(barrier_kernel, dim3(1, 70000), dim3(32), nullptr, "barrier_kernel",
                                  out);
    check(error_mentions(cudaGetLastError(), cudaErrorInvalidConfiguration, "grid (1, 70000"),
          "gridDim.y = 70000 is an invalid configuration");
    fastmine::cuda::launch_kernel(barrier_kernel, dim3(0), dim3(32), nullptr, "barrier_kernel", out);
    check(cudaGetLastError() == cudaErrorInvalidConfiguration, "an empty grid is an invalid configuration");
  }
  {  // WMMA against a plain loop; then a misaligned load
    __half *a, *b;
    float* d;
    cudaMalloc(&a, sizeof(__half) * 16 * 17);
    cudaMalloc(&b, sizeof(__half) * 16 * 16);
    cudaMalloc(&d, sizeof(float) * 256);
    float fa[256], fb[256];
    for (int k = 0; k < 256; ++k) {
      fa[k] = float((k * 7) % 11) - 5.0f;
      fb[k] = float((k * 5) % 13) * 0.5f - 3.0f;
      a[k] = __float2half_rn(fa[k]);
      b[k] = __float2half_rn(fb[k]);
    }
    fastmine::cuda::launch_kernel(mma_kernel, dim3(1), dim3(32), nullptr, "mma_kernel", a, b, d, 0);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) {
        float s = 1.0f;  // B is column-major: element (k, c) at b[c * 16 + k]
        for (int k = 0; k < 16; ++k) s += fa[r * 16 + k] * fb[c * 16 + k];
        ok = ok && d[r * 16 + c] == s;
      }
    check(ok, "wmma 16x16x16 half mma_sync equals the plain product (row-major A, col-major B)");
#if !defined(FASTMINE_EMU_WEAK_ALIGNMENT)  // not checked under ASan (cuda_emulation.h)
    fastmine::cuda::launch_kernel(mma_kernel, dim3(1), dim3(32), nullptr, "mma_kernel", a, b, d, 8);
    check(error_mentions(cudaGetLastError(), cudaErrorLaunchFailure, "256-bit aligned"),
          "a wmma load from a pointer that is not 256-bit aligned is reported");
#endif
    cudaFree(a); cudaFree(b); cudaFree(d);
  }
  {  // the kernels' tf32 path rounds its inputs (rna) before the tensor core
    constexpr int64_t d = 40;  // two K slices, the second partly padding
    float *x, *r, *out;
    cudaMalloc(&x, sizeof(float) * 64 * d);
    cudaMalloc(&r, sizeof(float) * 64 * d);
    cudaMalloc(&out, sizeof(float) * 64 * 64);
    // Anchors: integers in [-2, 2], where |v| == 1 perturbed by 2^-12 (rounds to
    // 1), 2^-11 (a tie: away from zero, 1 + 2^-10) or 3 * 2^-12 (1 + 2^-10).
    // References: integers.  Every product and sum is then exact in fp32.
    const float delta[3] = {0x1p-12f, 0x1p-11f, 0x3p-12f}, rounded[3] = {0.0f, 0x1p-10f, 0x1p-10f};
    std::vector<float> xr(64 * d);
    for (int e = 0; e < 64 * d; ++e) {
      float v = float((e * 7 + e / 5) % 5) - 2.0f;
      xr[e] = v;
      if (v == 1.0f || v == -1.0f) {
        x[e] = v * (1.0f + delta[e % 3]);
        xr[e] = v * (1.0f + rounded[e % 3]);
      } else {
        x[e] = v;
      }
    }
    for (int e = 0; e < 64 * d; ++e) r[e] = float((e * 3 + e / 7) % 5) - 2.0f;
    fastmine::cuda::launch_kernel(tf32_tile_kernel, dim3(1), dim3(256), nullptr, "tf32_tile_kernel",
                                  x, r, out, d);
    bool ok = cudaGetLastError() == cudaSuccess, rounding_matters = false;
    for (int i = 0; i < 64; ++i)
      for (int j = 0; j < 64; ++j) {
        float want = 0.0f, truncated = 0.0f;
        for (int k = 0; k < d; ++k) {
          want += xr[i * d + k] * r[j * d + k];
          truncated += std::trunc(x[i * d + k]) * r[j * d + k];  // |x| < 2^11: trunc keeps 1.0
        }
        ok = ok && out[i * 64 + j] == want;
        rounding_matters = rounding_matters || want != truncated;
      }
    check(ok && rounding_matters,
          "dot_tile<float, Tf32> rounds its inputs to tf32 (to nearest, ties away) before the mma");
    cudaFree(x); cudaFree(r); cudaFree(out);
  }
  {
    float *a, *b, *d;
    cudaMalloc(&a, sizeof(float) * 16 * 8);
    cudaMalloc(&b, sizeof(float) * 16 * 8);
    cudaMalloc(&d, sizeof(float) * 256);
    for (int e = 0; e < 128; ++e) { a[e] = 1.0f + 0x1p-11f; b[e] = 1.0f; }
    fastmine::cuda::launch_kernel(tf32_unrounded_mma_kernel, dim3(1), dim3(32), nullptr,
                                  "tf32_unrounded_mma_kernel", a, b, d);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int e = 0; e < 256; ++e) ok = ok && d[e] == 8.0f;
    check(ok, "tf32 mma_sync ignores the low 13 mantissa bits of unrounded inputs");
    cudaFree(a); cudaFree(b); cudaFree(d);
  }
  check(nvcuda::wmma::__float_to_tf32(1.0f + 0x1p-11f) == 1.0f + 0x1p-10f &&
            nvcuda::wmma::__float_to_tf32(-(1.0f + 0x1p-11f)) == -(1.0f + 0x1p-10f) &&
            nvcuda::wmma::__float_to_tf32(1.0f + 0x1p-12f) == 1.0f,
        "__float_to_tf32 rounds to nearest, ties away from zero");
}

}  // namespace

int main() {
  run();
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
