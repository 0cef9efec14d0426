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
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "fastmine/compact.h"
#include "variants.cuh"

namespace fastmine {
namespace cuda {
namespace {

template <typename T> struct ScalarTypeOf;
template <> struct ScalarTypeOf<__half> { static constexpr auto value = at::kHalf; };
template <> struct ScalarTypeOf<__nv_bfloat16> { static constexpr auto value = at::kBFloat16; };
template <> struct ScalarTypeOf<float> { static constexpr auto value = at::kFloat; };
template <> struct ScalarTypeOf<double> { static constexpr auto value = at::kDouble; };

#define CHECK_ARG(cond, ...) TORCH_CHECK(cond, "fastmine::mine_select (cuda): ", __VA_ARGS__)

void check_ids(const at::Tensor& ids, int64_t n, const char* name, const char* owner,
               const at::Device& dev) {
  CHECK_ARG(ids.dim() == 1 && ids.size(0) == n, name, " must be 1-D of length ", n,
            " (rows of ", owner, "), got shape ", ids.sizes());
  CHECK_ARG(!at::isFloatingType(ids.scalar_type()) && !at::isComplexType(ids.scalar_type()) &&
                ids.scalar_type() != at::kBool,
            name, " must be an integer tensor, got ", ids.scalar_type());
  CHECK_ARG(ids.device() == dev, name, " must be on ", dev, " (the device of embeddings), got ",
            ids.device());
}

template <typename T, DotPath P>
void run_variant(const SelectParams& sp, const at::Tensor& x, const at::Tensor& r,
                 const at::Tensor& ql, const at::Tensor& rl, const at::Tensor& qid,
                 const at::Tensor& rid, at::Tensor& pos_idx, at::Tensor& neg_idx) {
  using acc_t = typename AccOf<T>::type;
  at::Tensor ws = at::empty({int64_t(workspace_bytes<acc_t>(sp.n, sp.m, sp.splits))},
                            x.options().dtype(at::kByte));
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* rp = r.is_same(x) ? xp : reinterpret_cast<const T*>(r.data_ptr());
  cudaError_t err = mine_select_launch<T, P>(
      sp, xp, rp, ql.data_ptr<int32_t>(), rl.data_ptr<int32_t>(),
      qid.defined() ? qid.data_ptr<int32_t>() : nullptr,
      rid.defined() ? rid.data_ptr<int32_t>() : nullptr, pos_idx.data_ptr<int64_t>(),
      neg_idx.data_ptr<int64_t>(), ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mine_select_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
    const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy, int64_t neg_strategy,
    int64_t distance, c10::optional<double> margin) {
  CHECK_ARG(embeddings.dim() == 2, "embeddings must be 2-D, got shape ", embeddings.sizes());
  CHECK_ARG(ref_emb.dim() == 2, "ref_emb must be 2-D, got shape ", ref_emb.sizes());
  CHECK_ARG(embeddings.size(1) == ref_emb.size(1), "embeddings have dim ", embeddings.size(1),
            " but ref_emb has dim ", ref_emb.size(1));
  CHECK_ARG(at::isFloatingType(embeddings.scalar_type()), "embeddings must be floating, got ",
            embeddings.scalar_type());
  CHECK_ARG(embeddings.scalar_type() == ref_emb.scalar_type(), "embeddings (",
            embeddings.scalar_type(), ") and ref_emb (", ref_emb.scalar_type(),
            ") must have the same dtype");
  CHECK_ARG(embeddings.is_cuda(), "embeddings must be a CUDA tensor, got ", embeddings.device());
  const at::Device dev = embeddings.device();
  CHECK_ARG(ref_emb.device() == dev, "ref_emb must be on ", dev, " (the device of embeddings), got ",
            ref_emb.device());
  const int64_t n = embeddings.size(0), m = ref_emb.size(0);
  check_ids(labels, n, "labels", "embeddings", dev);
  check_ids(ref_labels, m, "ref_labels", "ref_emb", dev);
  CHECK_ARG(query_ids.has_value() == ref_ids.has_value(),
            "query_ids and ref_ids must be given together");
  if (query_ids.has_value()) {
    check_ids(*query_ids, n, "query_ids", "embeddings", dev);
    check_ids(*ref_ids, m, "ref_ids", "ref_emb", dev);
  }
  CHECK_ARG(pos_strategy >= 0 && pos_strategy <= 1, "unknown pos_strategy code ", pos_strategy);
  CHECK_ARG(neg_strategy >= 0 && neg_strategy <= 2, "unknown neg_strategy code ", neg_strategy);
  CHECK_ARG(distance >= 0 && distance <= 2, "unknown distance code ", distance);
  const auto neg = static_cast<NegStrategy>(neg_strategy);
  CHECK_ARG(!margin.has_value() || (neg == NegStrategy::SemiHard && *margin >= 0),
            "margin must be >= 0 and is only valid with the semi-hard negative strategy");

  const c10::cuda::CUDAGuard device_guard(dev);
  auto opts = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor pos_idx = at::full({n}, -1, opts), neg_idx = at::full({n}, -1, opts);
  if (n == 0 || m == 0) return {pos_idx, neg_idx};

  at::Tensor x = embeddings.contiguous();
  at::Tensor r = ref_emb.is_same(embeddings) ? x : ref_emb.contiguous();
  auto [ql, rl] = compact_int32(labels, ref_labels);
  at::Tensor qid, rid;
  if (query_ids.has_value()) std::tie(qid, rid) = compact_int32(*query_ids, *ref_ids);

  int sms = 1;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev.index()));
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
  CHECK_ARG(done, "embeddings dtype ", st, " is not supported (float16, bfloat16, float32, float64)");
  return {pos_idx, neg_idx};
}

TORCH_LIBRARY_IMPL(fastmine, CUDA, m) { m.impl("mine_select", &mine_select_cuda); }

}  // namespace cuda
}  // namespace fastmine
