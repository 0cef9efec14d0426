// Checks of the host CUDA emulation itself (built and run by
// tests/test_cuda_emulation.py): its collectives compute what the hardware's
// do, and the misuses it promises to catch are caught.  Prints one line per
// check and "N passed, M failed"; exit 1 on failure.
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

// out[t] = value of lane t ^ mask, for every xor mask 1..16.
__global__ void shuffle_kernel(int64_t* out) {
  const int t = threadIdx.x;
  for (int m = 1; m < 32; m *= 2)
    out[t * 5 + __builtin_ctz(m)] = __shfl_xor_sync(0xffffffffu, int64_t(1000 + t), m);
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
      for (int b = 0; b < 5; ++b) ok = ok && out[t * 5 + b] == 1000 + (t ^ (1 << b));
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
    fastmine::cuda::launch_kernel(mma_kernel, dim3(1), dim3(32), nullptr, "mma_kernel", a, b, d, 8);
    check(error_mentions(cudaGetLastError(), cudaErrorLaunchFailure, "256-bit aligned"),
          "a wmma load from a pointer that is not 256-bit aligned is reported");
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
