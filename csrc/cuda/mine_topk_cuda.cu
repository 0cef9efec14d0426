// CUDA implementation of fastmine::mine_topk (issue #17): the op
// fastmine::mine_topk_cuda, which the CUDA kernel of fastmine::mine_topk runs
// for backend "cuda" (csrc/fastmine_ops.cpp; its autograd backpropagates
// through fastmine::mine_backward_cuda, mine_cuda.cu).  Argument checks,
// dtype/path dispatch and workspace around the torch-free kernels of
// mine_topk_kernels.cuh; semantics of fastmine/reference_topk.py and
// docs/contract.md.
//
// Like mine_cuda.cu, a call never synchronises with the host: labels/ids are
// read as int64 by the kernels, ref_emb = None is the flag Ids::Self, the data
// checks are a device flag asserted with at::_assert_async, the seed is a
// kernel argument, and everything else is stream-ordered kernels and
// caching-allocator allocations.  The outputs: pos_idx int64 [N, k_pos],
// neg_idx [N, k_neg] (trailing -1), pos_dist / neg_dist [N, k] in the
// embeddings' dtype (pair_distance_kernel per column: 0 at -1).
//
// Under FASTMINE_CUDA_EMULATION (tests/csrc/emulation/mine_cuda_emulated.cpp
// includes this file after mine_cuda.cu) the op is
// fastmine::mine_topk_cuda_emulated for CPU tensors (backend "cuda-emulated").
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastmine/op_checks.h"
#include "fastmine/schema.h"
// The launcher's half of the shim (device type, stream, guard, error check):
#define FASTMINE_CUDA_TORCH_LAUNCHER
#include "variants.cuh"
#include "launcher_common.cuh"  // dispatch, inputs, dot path, data-check flags
#include "mine_topk_kernels.cuh"

namespace fastmine {
namespace cuda {
namespace {

template <typename T, DotPath P>
void topk_variant(const TopkParams& tp, const Inputs& in, at::Tensor& pos_idx,
                  at::Tensor& neg_idx, at::Tensor& bad) {
  using acc_t = typename AccOf<T>::type;
  const SelectParams& sp = tp.s;
  at::Tensor ws = at::empty(
      {int64_t(topk_workspace_bytes<acc_t>(sp.n, sp.m, sp.splits,
                                           topk_bounds(tp.k_pos, tp.k_neg)))},
      in.x.options().dtype(at::kByte));
  poison(ws);
  const T* xp = ptr<T>(in.x);
  const T* rp = in.r.is_same(in.x) ? xp : ptr<T>(in.r);
  const bool explicit_ids = in.ids == Ids::Explicit;
  FASTMINE_CUDA_CHECK(mine_topk_launch<T, P>(
      tp, xp, rp, in.ql.data_ptr<int64_t>(), in.rl.data_ptr<int64_t>(),
      explicit_ids ? in.qid.data_ptr<int64_t>() : nullptr,
      explicit_ids ? in.rid.data_ptr<int64_t>() : nullptr, pos_idx.data_ptr<int64_t>(),
      neg_idx.data_ptr<int64_t>(), ws.data_ptr(), bad.data_ptr<int32_t>(), current_stream()));
}

using TopkOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace

// fastmine::mine_topk_cuda (FASTMINE_MINE_TOPK_IMPL_SCHEMA): see the file comment.
TopkOut mine_topk_cuda(const at::Tensor& embeddings, const at::Tensor& labels,
                       const c10::optional<at::Tensor>& ref_emb,
                       const c10::optional<at::Tensor>& ref_labels,
                       const c10::optional<at::Tensor>& query_ids,
                       const c10::optional<at::Tensor>& ref_ids, int64_t k_pos, int64_t k_neg,
                       int64_t pos_strategy, int64_t neg_strategy, int64_t distance,
                       c10::optional<double> margin, double cutoff, double nonzero_loss_cutoff,
                       int64_t seed) {
  const bool dw = neg_strategy == static_cast<int64_t>(NegStrategy::DistanceWeighted);
  // The tensors and the deterministic codes as fastmine::mine checks them
  // (distance_weighted, which mine rejects, is checked as code 0 here: its own
  // rules -- euclidean, no margin, cutoffs -- are fastmine::mine_topk's
  // check_topk_args, which runs before any implementation).
  const bool self_refs = check_mine_args(
      kDeviceType, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, pos_strategy,
      dw ? static_cast<int64_t>(NegStrategy::Hard) : neg_strategy, distance, margin);
  FASTMINE_CHECK_ARG(k_pos >= 1 && k_pos <= kTopkMaxK, "k_pos must be in [1, ", kTopkMaxK,
                     "] for backend 'cuda' (its per-thread lists are bounded), got ", k_pos);
  FASTMINE_CHECK_ARG(k_neg >= 1 && k_neg <= kTopkMaxK, "k_neg must be in [1, ", kTopkMaxK,
                     "] for backend 'cuda' (its per-thread lists are bounded), got ", k_neg);
  at::NoGradGuard no_grad;  // the autograd kernel of fastmine::mine_topk sits above this one
  const DeviceGuard guard(embeddings.device());
  const int64_t n = embeddings.size(0);
  auto lopts = embeddings.options().dtype(at::kLong);
  at::Tensor pos_idx = at::empty({n, k_pos}, lopts), neg_idx = at::empty({n, k_neg}, lopts);
  at::Tensor pos_dist = at::empty({n, k_pos}, embeddings.options());
  at::Tensor neg_dist = at::empty({n, k_neg}, embeddings.options());
  if (n == 0) return {pos_idx, neg_idx, pos_dist, neg_dist};
  const Inputs in = prepare(embeddings, labels, self_refs ? nullptr : &*ref_emb,
                            self_refs ? nullptr : &*ref_labels, query_ids, ref_ids);
  const int64_t m = in.r.size(0);
  const TopkParams tp{
      SelectParams{n, m, in.x.size(1), static_cast<PosStrategy>(pos_strategy),
                   static_cast<NegStrategy>(neg_strategy), static_cast<Distance>(distance),
                   margin.has_value() ? *margin : -1.0,
                   topk_splits(n, m, sm_count(in.x.device()), std::max(k_pos, k_neg)), in.ids},
      k_pos, k_neg, cutoff, nonzero_loss_cutoff, static_cast<uint64_t>(seed)};
  at::Tensor bad = at::zeros({2}, embeddings.options().dtype(at::kInt));
  const auto st = in.x.scalar_type();
  const DotPath path = dot_path(st);
  bool done = false;
#define FASTMINE_DISPATCH(T, P, NAME)                                \
  if (!done && st == ScalarTypeOf<T>::value && path == DotPath::P) { \
    topk_variant<T, DotPath::P>(tp, in, pos_idx, neg_idx, bad);      \
    done = true;                                                     \
  }
  FASTMINE_CUDA_VARIANTS(FASTMINE_DISPATCH)
#undef FASTMINE_DISPATCH
  FASTMINE_CHECK_ARG(done, "embeddings dtype ", st,
                     " is not supported (float16, bfloat16, float32, float64)");
  check_rows(bad, in, static_cast<Distance>(distance) == Distance::Cosine);
  dispatch_type(st, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(in.x);
    FASTMINE_CUDA_CHECK(pair_distance_launch<T>(
        static_cast<Distance>(distance), xp, in.r.is_same(in.x) ? xp : ptr<T>(in.r), n,
        in.x.size(1), pos_idx.data_ptr<int64_t>(), neg_idx.data_ptr<int64_t>(),
        mutable_ptr<T>(pos_dist), mutable_ptr<T>(neg_dist), current_stream(), k_pos, k_neg));
  });
  return {pos_idx, neg_idx, pos_dist, neg_dist};
}

// The implementation op of backend "cuda" for fastmine::mine_topk
// ("cuda_emulated" in the tests' emulated build), found by name.
TORCH_LIBRARY_FRAGMENT(fastmine, m) {
  m.def(FASTMINE_MINE_TOPK_IMPL_SCHEMA(FASTMINE_CUDA_IMPL));
}

TORCH_LIBRARY_IMPL(fastmine, FASTMINE_CUDA_KEY, m) {
  m.impl("mine_topk_" FASTMINE_CUDA_IMPL, &mine_topk_cuda);
}

}  // namespace cuda
}  // namespace fastmine
