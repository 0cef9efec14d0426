// The torch half of the CUDA launchers, shared by mine_cuda.cu (fastmine::mine,
// mine_backward, mine_select) and mine_topk_cuda.cu (fastmine::mine_topk):
// storage-type dispatch, the SM count, the checked inputs (rows contiguous,
// labels/ids int64, the same-sample rule), the dot path of a dtype, and the
// data checks' flags.  Include after the launcher half of the shim (variants.cuh
// with FASTMINE_CUDA_TORCH_LAUNCHER defined).  Everything is in an anonymous
// namespace: each launcher file is its own translation unit in the extension
// (the emulated build includes both into one, hence #pragma once).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "fastmine/op_checks.h"
#include "variants.cuh"

namespace fastmine {
namespace cuda {
namespace {

template <typename T> struct ScalarTypeOf;
template <> struct ScalarTypeOf<__half> { static constexpr auto value = at::kHalf; };
template <> struct ScalarTypeOf<__nv_bfloat16> { static constexpr auto value = at::kBFloat16; };
template <> struct ScalarTypeOf<float> { static constexpr auto value = at::kFloat; };
template <> struct ScalarTypeOf<double> { static constexpr auto value = at::kDouble; };

template <typename T> const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T> T* mutable_ptr(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// f(T{}) for the kernels' storage type T of `st`.
template <typename F>
void dispatch_type(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kHalf: f(__half{}); return;
    case at::kBFloat16: f(__nv_bfloat16{}); return;
    case at::kFloat: f(float{}); return;
    case at::kDouble: f(double{}); return;
    default:
      FASTMINE_CHECK_ARG(false, "embeddings dtype ", st,
                         " is not supported (float16, bfloat16, float32, float64)");
  }
}

// The SM count of `dev`, read once per device (the split heuristic needs it;
// querying it on every call would cost a driver call each time).
int sm_count(const at::Device& dev) {
  static std::mutex mu;
  static std::vector<int> cache;
  const int index = std::max<int>(dev.index(), 0);
  std::lock_guard<std::mutex> lock(mu);
  if (index >= int(cache.size())) cache.resize(index + 1, 0);
  if (cache[index] == 0) {
    int sms = 1;
    FASTMINE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, index));
    cache[index] = sms > 0 ? sms : 1;
  }
  return cache[index];
}

// The selection inputs after the checks: rows contiguous, labels/ids int64.
struct Inputs {
  at::Tensor x, r;      // r is x when the references are the batch
  at::Tensor ql, rl;
  at::Tensor qid, rid;  // Ids::Explicit only
  Ids ids;
};

at::Tensor as_int64(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

Inputs prepare(const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor* ref_emb,
               const at::Tensor* ref_labels, const c10::optional<at::Tensor>& query_ids,
               const c10::optional<at::Tensor>& ref_ids) {
  Inputs in;
  in.x = embeddings.detach().contiguous();
  in.r = ref_emb == nullptr ? in.x : ref_emb->detach().contiguous();
  in.ql = as_int64(labels);
  in.rl = ref_emb == nullptr ? in.ql : as_int64(*ref_labels);
  if (query_ids.has_value()) {
    in.ids = Ids::Explicit;
    in.qid = as_int64(*query_ids);
    in.rid = ref_emb == nullptr ? in.qid : as_int64(*ref_ids);
  } else {
    in.ids = ref_emb == nullptr ? Ids::Self : Ids::None;
  }
  return in;
}

// The kernels' dot-product path for the dtype and the matmul precision.
DotPath dot_path(at::ScalarType st) {
  if (st == at::kHalf || st == at::kBFloat16) return DotPath::Wmma;
  if (st == at::kFloat &&
      at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST) {
    return DotPath::Tf32;
  }
  return DotPath::Ffma;
}

// Raise on the data checks' flags (see the file comment): eager ValueError in
// the emulated (CPU) build, an asynchronous device-side assertion on CUDA.
void check_rows(const at::Tensor& bad, const Inputs& in, bool cosine) {
  const bool self_refs = in.r.is_same(in.x);
  if (kEagerChecks) {
    const int32_t* flag = bad.data_ptr<int32_t>();
    if (flag[0]) check_rows_eager(in.x, cosine, "embeddings");
    if (!self_refs && flag[1]) check_rows_eager(in.r, cosine, "ref_emb");
    // A row flagged by the kernel's sum order but not by the sequential one
    // (a norm within rounding of a bound) still fails:
    FASTMINE_CHECK_ARG(!flag[0] && (self_refs || !flag[1]),
                       flag[0] ? "embeddings" : "ref_emb",
                       " contains NaN or Inf, or a row whose norm is outside the admissible "
                       "range (docs/contract.md, 'Admissible rows')");
    return;
  }
  at::_assert_async(bad.select(0, 0).eq(0),
                    "fastmine: embeddings contains NaN or Inf, or a row whose norm is outside "
                    "the admissible range (docs/contract.md, 'Admissible rows')");
  if (!self_refs) {
    at::_assert_async(bad.select(0, 1).eq(0),
                      "fastmine: ref_emb contains NaN or Inf, or a row whose norm is outside "
                      "the admissible range (docs/contract.md, 'Admissible rows')");
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastmine
