// CUDA implementation of fastmine::mine and fastmine::mine_backward (the ops
// fastmine::mine_cuda and fastmine::mine_backward_cuda, which the CUDA kernel
// of fastmine::mine runs for backend "cuda"; csrc/fastmine_ops.cpp), and of the
// selection-only fastmine::mine_select: argument checks, dtype/path dispatch
// and workspace around the torch-free kernels of mine_kernels.cuh.  Semantics
// are those of csrc/cpu/mine_cpu.cpp (and docs/contract.md).
//
// A call never synchronises with the host:
//   * labels and ids are read as int64 by the kernels (a dtype cast on the
//     device at most), and ref_emb = None is the flag Ids::Self, no arange;
//   * the data checks (NaN/Inf, admissible norms) are computed by the row-terms
//     kernel into a device flag, and asserted with at::_assert_async: a bad
//     input fails the next synchronising call with a device-side assertion
//     (docs/contract.md, "Errors");
//   * the SM count (for the split heuristic) is read once per device.
// Everything else is stream-ordered kernels, async memsets and caching-allocator
// allocations, so a call can also be captured in a CUDA graph.
//
// Dot-product path per input dtype (variants.cuh lists the instantiated ones):
//   float16, bfloat16  tensor cores (WMMA), fp32 accumulate
//   float32            torch.get_float32_matmul_precision() == "highest": exact
//                      FFMA; "high"/"medium": tensor cores in tf32
//   float64            FFMA in fp64
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h, which pulls in
// cuSPARSE/cuBLAS headers), so the file also compiles with a bare toolkit.
//
// FASTMINE_CUDA_EMULATION (the tests' host emulation of CUDA, see
// cuda_runtime_shim.cuh) builds this same launcher for CPU tensors: the ops are
// then fastmine::mine_cuda_emulated / mine_backward_cuda_emulated (backend
// "cuda-emulated", tests only) and fastmine_cuda_emulated::mine_select, and the
// data checks are eager (a ValueError naming the row, as on every CPU path).
// The two builds differ only in the launcher half of cuda_runtime_shim.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "fastmine/op_checks.h"
#include "fastmine/schema.h"
// The launcher's half of the shim (device type, stream, guard, error check):
#define FASTMINE_CUDA_TORCH_LAUNCHER
#include "variants.cuh"
#include "launcher_common.cuh"  // dispatch, inputs, dot path, data-check flags


namespace fastmine {
namespace cuda {
namespace {

template <typename T, DotPath P>
void select_variant(const SelectParams& sp, const Inputs& in, at::Tensor& pos_idx,
                    at::Tensor& neg_idx, at::Tensor& bad) {
  using acc_t = typename AccOf<T>::type;
  at::Tensor ws = at::empty({int64_t(workspace_bytes<acc_t>(sp.n, sp.m, sp.splits))},
                            in.x.options().dtype(at::kByte));
  poison(ws);
  const T* xp = ptr<T>(in.x);
  const T* rp = in.r.is_same(in.x) ? xp : ptr<T>(in.r);
  const bool explicit_ids = in.ids == Ids::Explicit;
  FASTMINE_CUDA_CHECK(mine_select_launch<T, P>(
      sp, xp, rp, in.ql.data_ptr<int64_t>(), in.rl.data_ptr<int64_t>(),
      explicit_ids ? in.qid.data_ptr<int64_t>() : nullptr,
      explicit_ids ? in.rid.data_ptr<int64_t>() : nullptr, pos_idx.data_ptr<int64_t>(),
      neg_idx.data_ptr<int64_t>(), ws.data_ptr(), bad.data_ptr<int32_t>(), current_stream()));
}

// Selection into pos_idx/neg_idx (int64 [n]); the data checks' flags into
// bad (int32 [2], zeroed): [0] embeddings, [1] ref_emb.
void select(const Inputs& in, int64_t pos_strategy, int64_t neg_strategy, int64_t distance,
            c10::optional<double> margin, at::Tensor& pos_idx, at::Tensor& neg_idx,
            at::Tensor& bad) {
  const int64_t n = in.x.size(0), m = in.r.size(0);
  SelectParams sp{n, m, in.x.size(1), static_cast<PosStrategy>(pos_strategy),
                  static_cast<NegStrategy>(neg_strategy), static_cast<Distance>(distance),
                  margin.has_value() ? *margin : -1.0,
                  choose_splits(n, m, sm_count(in.x.device())), in.ids};
  const auto st = in.x.scalar_type();
  const DotPath path = dot_path(st);
  bool done = false;
#define FASTMINE_DISPATCH(T, P, NAME)                                \
  if (!done && st == ScalarTypeOf<T>::value && path == DotPath::P) { \
    select_variant<T, DotPath::P>(sp, in, pos_idx, neg_idx, bad);    \
    done = true;                                                     \
  }
  FASTMINE_CUDA_VARIANTS(FASTMINE_DISPATCH)
#undef FASTMINE_DISPATCH
  FASTMINE_CHECK_ARG(done, "embeddings dtype ", st,
                     " is not supported (float16, bfloat16, float32, float64)");
}

using MineOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace

// fastmine::mine_cuda: the selection and the exact distances of the selected
// pairs (pair_distance_kernel: gather, then upcast; O(N * D)).
MineOut mine_cuda(const at::Tensor& embeddings, const at::Tensor& labels,
                  const c10::optional<at::Tensor>& ref_emb,
                  const c10::optional<at::Tensor>& ref_labels,
                  const c10::optional<at::Tensor>& query_ids,
                  const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy,
                  int64_t neg_strategy, int64_t distance, c10::optional<double> margin) {
  const bool self_refs = check_mine_args(kDeviceType, embeddings, labels, ref_emb, ref_labels,
                                         query_ids, ref_ids, pos_strategy, neg_strategy, distance,
                                         margin);
  at::NoGradGuard no_grad;  // the autograd kernel of fastmine::mine sits above this one
  const DeviceGuard guard(embeddings.device());
  const int64_t n = embeddings.size(0);
  auto lopts = embeddings.options().dtype(at::kLong);
  at::Tensor pos_idx = at::empty({n}, lopts), neg_idx = at::empty({n}, lopts);
  at::Tensor pos_dist = at::empty({n}, embeddings.options());
  at::Tensor neg_dist = at::empty({n}, embeddings.options());
  if (n == 0) return {pos_idx, neg_idx, pos_dist, neg_dist};
  const Inputs in = prepare(embeddings, labels, self_refs ? nullptr : &*ref_emb,
                            self_refs ? nullptr : &*ref_labels, query_ids, ref_ids);
  at::Tensor bad = at::zeros({2}, embeddings.options().dtype(at::kInt));
  select(in, pos_strategy, neg_strategy, distance, margin, pos_idx, neg_idx, bad);
  check_rows(bad, in, static_cast<Distance>(distance) == Distance::Cosine);
  dispatch_type(in.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(in.x);
    FASTMINE_CUDA_CHECK(pair_distance_launch<T>(
        static_cast<Distance>(distance), xp, in.r.is_same(in.x) ? xp : ptr<T>(in.r), n,
        in.x.size(1), pos_idx.data_ptr<int64_t>(), neg_idx.data_ptr<int64_t>(),
        mutable_ptr<T>(pos_dist), mutable_ptr<T>(neg_dist), current_stream()));
  });
  return {pos_idx, neg_idx, pos_dist, neg_dist};
}

// fastmine::mine_backward_cuda: dL/d(embeddings) [N, D] and dL/d(ref_emb)
// ([M, D], or [0, D] when ref_emb is None -- both halves are then in the first
// output -- or when ref_emb_grad is false: then nothing of size M is formed).
// The reference rows are summed with atomics, or, under
// torch.use_deterministic_algorithms(True), in a fixed order over the pairs
// sorted by reference row (segment_ref_grad_kernel): bitwise reproducible.
std::tuple<at::Tensor, at::Tensor> mine_backward_cuda(
    const at::Tensor& grad_pos_dist, const at::Tensor& grad_neg_dist,
    const at::Tensor& embeddings, const c10::optional<at::Tensor>& ref_emb,
    const at::Tensor& pos_idx, const at::Tensor& neg_idx, int64_t distance, bool ref_emb_grad) {
  check_mine_backward_args(kDeviceType, grad_pos_dist, grad_neg_dist, embeddings, ref_emb,
                           pos_idx, neg_idx, distance);
  at::NoGradGuard no_grad;
  const DeviceGuard guard(embeddings.device());
  const bool self_refs = !ref_emb.has_value();
  const at::Tensor x = embeddings.detach().contiguous();
  const at::Tensor r = self_refs ? x : ref_emb->detach().contiguous();
  const int64_t n = x.size(0), m = r.size(0), d = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopts = x.options().dtype(acc);
  const bool want_r = !self_refs && ref_emb_grad;
  const bool ref_side = want_r || self_refs;  // dd/db is needed somewhere
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const at::Tensor gp = grad_pos_dist.to(acc).contiguous();
  const at::Tensor gn = grad_neg_dist.to(acc).contiguous();
  const at::Tensor pi = pos_idx.contiguous(), ni = neg_idx.contiguous();
  at::Tensor gx = at::empty({n, d}, aopts);
  // Where the reference side lands: a zeroed [M, D] for ref_emb; for the batch
  // as references, grad_x itself (deterministic: added after the anchor side)
  // or a zeroed [N, D] added to it (atomic: the anchor side is written without
  // atomics by the block that owns the row, so the two must not share memory).
  at::Tensor gr = want_r ? at::zeros({m, d}, aopts) : at::Tensor();
  at::Tensor scratch;  // RefGrad::Contrib rows [2N, D], or the atomic [N, D] of self refs
  RefGrad mode = RefGrad::None;
  if (ref_side && n > 0 && d > 0) {
    if (deterministic) {
      mode = RefGrad::Contrib;
      scratch = at::empty({2 * n, d}, aopts);
    } else {
      mode = RefGrad::Atomic;
      if (self_refs) scratch = at::zeros({n, d}, aopts);
    }
  }
  if (n > 0 && d > 0) {
    dispatch_type(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using acc_t = typename AccOf<T>::type;
      const T* xp = ptr<T>(x);
      acc_t* out_r = mode == RefGrad::None     ? nullptr
                     : mode == RefGrad::Contrib ? scratch.data_ptr<acc_t>()
                     : self_refs                ? scratch.data_ptr<acc_t>()
                                                : gr.data_ptr<acc_t>();
      FASTMINE_CUDA_CHECK(pair_backward_launch<T>(
          static_cast<Distance>(distance), mode, xp, self_refs ? xp : ptr<T>(r), n, d,
          pi.data_ptr<int64_t>(), ni.data_ptr<int64_t>(), gp.data_ptr<acc_t>(),
          gn.data_ptr<acc_t>(), gx.data_ptr<acc_t>(), out_r, current_stream()));
      if (mode == RefGrad::Contrib) {
        // Pair p < N is anchor p's positive, p >= N anchor p - N's negative; a
        // stable sort keeps pair order within a reference row (-1 rows first,
        // skipped by the kernel).
        auto [sorted_rows, order] =
            at::sort(at::cat({pi, ni}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
        FASTMINE_CUDA_CHECK(segment_ref_grad_launch<acc_t>(
            2 * n, d, sorted_rows.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
            scratch.data_ptr<acc_t>(), self_refs ? gx.data_ptr<acc_t>() : gr.data_ptr<acc_t>(),
            /*accumulate=*/self_refs, current_stream()));
      }
    });
    if (mode == RefGrad::Atomic && self_refs) gx.add_(scratch);
  } else {
    gx.zero_();
  }
  at::Tensor grad_x = gx.to(embeddings.scalar_type());
  at::Tensor grad_r = want_r ? gr.to(ref_emb->scalar_type())
                             : at::empty({0, d}, embeddings.options());
  return {grad_x, grad_r};
}

// fastmine::mine_select (selection only, explicit reference set; ids optional).
std::tuple<at::Tensor, at::Tensor> mine_select_cuda(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
    const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy, int64_t neg_strategy,
    int64_t distance, c10::optional<double> margin) {
  check_mine_select_args(kDeviceType, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                         pos_strategy, neg_strategy, distance, margin);
  at::NoGradGuard no_grad;
  const DeviceGuard guard(embeddings.device());
  const int64_t n = embeddings.size(0);
  auto lopts = embeddings.options().dtype(at::kLong);
  at::Tensor pos_idx = at::empty({n}, lopts), neg_idx = at::empty({n}, lopts);
  if (n == 0) return {pos_idx, neg_idx};
  const Inputs in = prepare(embeddings, labels, &ref_emb, &ref_labels, query_ids, ref_ids);
  at::Tensor bad = at::zeros({2}, embeddings.options().dtype(at::kInt));
  select(in, pos_strategy, neg_strategy, distance, margin, pos_idx, neg_idx, bad);
  check_rows(bad, in, static_cast<Distance>(distance) == Distance::Cosine);
  return {pos_idx, neg_idx};
}

// The implementation ops of backend "cuda" (schema.h; "cuda_emulated" in the
// tests' emulated build), found by fastmine::mine's device kernel by name.
TORCH_LIBRARY_FRAGMENT(fastmine, m) {
  m.def(FASTMINE_MINE_IMPL_SCHEMA(FASTMINE_CUDA_IMPL));
  m.def(FASTMINE_MINE_BACKWARD_IMPL_SCHEMA(FASTMINE_CUDA_IMPL));
}

TORCH_LIBRARY_IMPL(fastmine, FASTMINE_CUDA_KEY, m) {
  m.impl("mine_" FASTMINE_CUDA_IMPL, &mine_cuda);
  m.impl("mine_backward_" FASTMINE_CUDA_IMPL, &mine_backward_cuda);
}

// The raw selection op (fastmine::mine_select on CUDA tensors; the tests'
// fastmine_cuda_emulated::mine_select on CPU tensors under emulation).
TORCH_LIBRARY_IMPL(FASTMINE_CUDA_SELECT_NAMESPACE, FASTMINE_CUDA_KEY, m) {
  m.impl("mine_select", &mine_select_cuda);
}

}  // namespace cuda
}  // namespace fastmine
