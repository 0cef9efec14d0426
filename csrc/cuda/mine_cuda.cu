// CUDA implementation of fastmine::mine_select: argument checks, dtype/path
// dispatch and workspace allocation around the torch-free kernels of
// mine_kernels.cuh.  Semantics are those of csrc/cpu/mine_cpu.cpp.
//
// Dot-product path per input dtype (variants.cuh lists the instantiated ones):
//   float16, bfloat16  tensor cores (WMMA), fp32 accumulate
//   float32            torch.get_float32_matmul_precision() == "highest": exact
//                      FFMA; "high"/"medium": tensor cores in tf32
//   float64            FFMA in fp64
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h, which pulls in
// cuSPARSE/cuBLAS headers), so the file also compiles with a bare toolkit.
//
// FASTMINE_CUDA_EMULATION builds this same launcher for the CPU over the host
// CUDA emulation (emulation/mine_cuda_emulated.cpp): it then takes CPU tensors,
// has no device guard or stream, and registers as the CPU implementation of the
// test-only op fastmine_cuda_emulated::mine_select, so that the Python contract
// suite can run the CUDA launcher and kernels without a GPU (tests/conftest.py).
#include <ATen/ATen.h>
#if !defined(FASTMINE_CUDA_EMULATION)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <torch/library.h>

#include <limits>

#include "fastmine/compact.h"
#include "fastmine/op_checks.h"
#include "variants.cuh"

#if defined(FASTMINE_CUDA_EMULATION)
#define FASTMINE_CUDA_CHECK(expr)                                                  \
  do {                                                                             \
    const cudaError_t err_ = (expr);                                               \
    TORCH_CHECK(err_ == cudaSuccess, "fastmine::mine_select (emulated CUDA): ",    \
                cudaGetErrorString(err_));                                         \
  } while (0)
#else
#define FASTMINE_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#endif

namespace fastmine {
namespace cuda {
namespace {

template <typename T> struct ScalarTypeOf;
template <> struct ScalarTypeOf<__half> { static constexpr auto value = at::kHalf; };
template <> struct ScalarTypeOf<__nv_bfloat16> { static constexpr auto value = at::kBFloat16; };
template <> struct ScalarTypeOf<float> { static constexpr auto value = at::kFloat; };
template <> struct ScalarTypeOf<double> { static constexpr auto value = at::kDouble; };

#if defined(FASTMINE_CUDA_EMULATION)
constexpr auto kDeviceType = c10::DeviceType::CPU;
cudaStream_t current_stream() { return nullptr; }
#else
constexpr auto kDeviceType = c10::DeviceType::CUDA;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

template <typename T, DotPath P>
void run_variant(const SelectParams& sp, const at::Tensor& x, const at::Tensor& r,
                 const at::Tensor& ql, const at::Tensor& rl, const at::Tensor& qid,
                 const at::Tensor& rid, at::Tensor& pos_idx, at::Tensor& neg_idx) {
  using acc_t = typename AccOf<T>::type;
  at::Tensor ws = at::empty({int64_t(workspace_bytes<acc_t>(sp.n, sp.m, sp.splits))},
                            x.options().dtype(at::kByte));
#if defined(FASTMINE_CUDA_EMULATION)
  ws.fill_(0x7f);  // as the emulated cudaMalloc: reads of unwritten workspace stand out
#endif
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* rp = r.is_same(x) ? xp : reinterpret_cast<const T*>(r.data_ptr());
  cudaError_t err = mine_select_launch<T, P>(
      sp, xp, rp, ql.data_ptr<int32_t>(), rl.data_ptr<int32_t>(),
      qid.defined() ? qid.data_ptr<int32_t>() : nullptr,
      rid.defined() ? rid.data_ptr<int32_t>() : nullptr, pos_idx.data_ptr<int64_t>(),
      neg_idx.data_ptr<int64_t>(), ws.data_ptr(), current_stream());
  FASTMINE_CUDA_CHECK(err);
  FASTMINE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mine_select_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
    const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy, int64_t neg_strategy,
    int64_t distance, c10::optional<double> margin) {
  check_mine_select_args(kDeviceType, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                         pos_strategy, neg_strategy, distance, margin);
  const at::Device dev = embeddings.device();
  const int64_t n = embeddings.size(0), m = ref_emb.size(0);
  const auto neg = static_cast<NegStrategy>(neg_strategy);

#if !defined(FASTMINE_CUDA_EMULATION)
  const c10::cuda::CUDAGuard device_guard(dev);
#endif
  auto opts = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor pos_idx = at::full({n}, -1, opts), neg_idx = at::full({n}, -1, opts);
  if (n == 0 || m == 0) return {pos_idx, neg_idx};

  at::Tensor x = embeddings.contiguous();
  at::Tensor r = ref_emb.is_same(embeddings) ? x : ref_emb.contiguous();
  auto [ql, rl] = compact_int32(labels, ref_labels);
  at::Tensor qid, rid;
  if (query_ids.has_value()) std::tie(qid, rid) = compact_int32(*query_ids, *ref_ids);

  int sms = 1;
  FASTMINE_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, std::max<int>(dev.index(), 0)));
  SelectParams sp{n, m, embeddings.size(1), static_cast<PosStrategy>(pos_strategy), neg,
                  static_cast<Distance>(distance), margin.has_value() ? *margin : -1.0,
                  choose_splits(n, m, sms)};
  const auto st = x.scalar_type();
  DotPath path = DotPath::Ffma;
  if (st == at::kHalf || st == at::kBFloat16) path = DotPath::Wmma;
  if (st == at::kFloat &&
      at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST) {
    path = DotPath::Tf32;
  }
  bool done = false;
#define FASTMINE_DISPATCH(T, P, NAME)                                          \
  if (!done && st == ScalarTypeOf<T>::value && path == DotPath::P) {           \
    run_variant<T, DotPath::P>(sp, x, r, ql, rl, qid, rid, pos_idx, neg_idx);  \
    done = true;                                                               \
  }
  FASTMINE_CUDA_VARIANTS(FASTMINE_DISPATCH)
#undef FASTMINE_DISPATCH
  FASTMINE_CHECK_ARG(done, "embeddings dtype ", st,
                     " is not supported (float16, bfloat16, float32, float64)");
  return {pos_idx, neg_idx};
}

#if defined(FASTMINE_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(fastmine_cuda_emulated, CPU, m) { m.impl("mine_select", &mine_select_cuda); }
#else
TORCH_LIBRARY_IMPL(fastmine, CUDA, m) { m.impl("mine_select", &mine_select_cuda); }
#endif

}  // namespace cuda
}  // namespace fastmine
