// Argument checks of the fastmine ops, shared by their implementations
// (csrc/cpu/mine_cpu.cpp, csrc/cuda/mine_cuda.cu): one TORCH_CHECK per
// requirement, each message naming the argument; and the eager error for a row
// that fails the data checks (raise_row_error).  Needs ATen (unlike
// strategies.h, which the torch-free CUDA kernels include).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "fastmine/strategies.h"

#define FASTMINE_CHECK_ARG(cond, ...) TORCH_CHECK(cond, "fastmine: ", __VA_ARGS__)

namespace fastmine {

namespace detail {
inline void check_ids(const at::Tensor& ids, int64_t n, const char* name, const char* owner,
                      const at::Device& dev) {
  FASTMINE_CHECK_ARG(ids.dim() == 1 && ids.size(0) == n, name, " must be 1-D of length ", n,
                     " (rows of ", owner, "), got shape ", ids.sizes());
  FASTMINE_CHECK_ARG(!at::isFloatingType(ids.scalar_type()) &&
                         !at::isComplexType(ids.scalar_type()) && ids.scalar_type() != at::kBool,
                     name, " must be an integer tensor, got ", ids.scalar_type());
  FASTMINE_CHECK_ARG(ids.device() == dev, name, " must be on ", dev,
                     " (the device of embeddings), got ", ids.device());
}
}  // namespace detail

// Checks the arguments of mine_select for the implementation on `device_type`
// (embeddings must live there; every other tensor on embeddings' device).
inline void check_mine_select_args(c10::DeviceType device_type, const at::Tensor& embeddings,
                                   const at::Tensor& labels, const at::Tensor& ref_emb,
                                   const at::Tensor& ref_labels,
                                   const c10::optional<at::Tensor>& query_ids,
                                   const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy,
                                   int64_t neg_strategy, int64_t distance,
                                   c10::optional<double> margin) {
  FASTMINE_CHECK_ARG(embeddings.dim() == 2, "embeddings must be 2-D, got shape ", embeddings.sizes());
  FASTMINE_CHECK_ARG(ref_emb.dim() == 2, "ref_emb must be 2-D, got shape ", ref_emb.sizes());
  FASTMINE_CHECK_ARG(embeddings.size(1) == ref_emb.size(1), "embeddings have dim ",
                     embeddings.size(1), " but ref_emb has dim ", ref_emb.size(1));
  FASTMINE_CHECK_ARG(at::isFloatingType(embeddings.scalar_type()),
                     "embeddings must be floating, got ", embeddings.scalar_type());
  FASTMINE_CHECK_ARG(embeddings.scalar_type() == ref_emb.scalar_type(), "embeddings (",
                     embeddings.scalar_type(), ") and ref_emb (", ref_emb.scalar_type(),
                     ") must have the same dtype");
  FASTMINE_CHECK_ARG(embeddings.device().type() == device_type, "embeddings must be a ",
                     c10::DeviceTypeName(device_type), " tensor, got ", embeddings.device());
  const at::Device dev = embeddings.device();
  FASTMINE_CHECK_ARG(ref_emb.device() == dev, "ref_emb must be on ", dev,
                     " (the device of embeddings), got ", ref_emb.device());
  const int64_t n = embeddings.size(0), m = ref_emb.size(0);
  detail::check_ids(labels, n, "labels", "embeddings", dev);
  detail::check_ids(ref_labels, m, "ref_labels", "ref_emb", dev);
  FASTMINE_CHECK_ARG(query_ids.has_value() == ref_ids.has_value(),
                     "query_ids and ref_ids must be given together");
  if (query_ids.has_value()) {
    detail::check_ids(*query_ids, n, "query_ids", "embeddings", dev);
    detail::check_ids(*ref_ids, m, "ref_ids", "ref_emb", dev);
  }
  FASTMINE_CHECK_ARG(pos_strategy >= 0 && pos_strategy <= 1, "unknown pos_strategy code ",
                     pos_strategy);
  TORCH_CHECK_NOT_IMPLEMENTED(
      neg_strategy != static_cast<int64_t>(NegStrategy::DistanceWeighted),
      "fastmine: neg_strategy distance_weighted (code 3) is not implemented by the ",
      c10::DeviceTypeName(device_type), " mine / mine_select kernels (they take no seed): it is "
      "mined by fastmine::mine_topk");
  FASTMINE_CHECK_ARG(neg_strategy >= 0 && neg_strategy <= 2, "unknown neg_strategy code ",
                     neg_strategy);
  FASTMINE_CHECK_ARG(distance >= 0 && distance <= 2, "unknown distance code ", distance);
  FASTMINE_CHECK_ARG(
      !margin.has_value() ||
          (static_cast<NegStrategy>(neg_strategy) == NegStrategy::SemiHard && *margin >= 0),
      "margin must be >= 0 and is only valid with the semi-hard negative strategy");
}

// Checks the arguments of fastmine::mine for the implementation on
// `device_type`; returns true when the references are the batch (ref_emb None).
inline bool check_mine_args(c10::DeviceType device_type, const at::Tensor& embeddings,
                            const at::Tensor& labels, const c10::optional<at::Tensor>& ref_emb,
                            const c10::optional<at::Tensor>& ref_labels,
                            const c10::optional<at::Tensor>& query_ids,
                            const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy,
                            int64_t neg_strategy, int64_t distance,
                            c10::optional<double> margin) {
  const bool self_refs = !ref_emb.has_value();
  FASTMINE_CHECK_ARG(ref_emb.has_value() == ref_labels.has_value(),
                     "ref_emb and ref_labels must be given together");
  if (self_refs) {
    FASTMINE_CHECK_ARG(!ref_ids.has_value(),
                       "ref_ids given without ref_emb: when the references are the batch their "
                       "ids are query_ids");
    check_mine_select_args(device_type, embeddings, labels, embeddings, labels, query_ids,
                           query_ids, pos_strategy, neg_strategy, distance, margin);
  } else {
    check_mine_select_args(device_type, embeddings, labels, *ref_emb, *ref_labels, query_ids,
                           ref_ids, pos_strategy, neg_strategy, distance, margin);
  }
  return self_refs;
}

inline void check_mine_backward_args(c10::DeviceType device_type, const at::Tensor& grad_pos_dist,
                                     const at::Tensor& grad_neg_dist,
                                     const at::Tensor& embeddings,
                                     const c10::optional<at::Tensor>& ref_emb,
                                     const at::Tensor& pos_idx, const at::Tensor& neg_idx,
                                     int64_t distance) {
  const int64_t n = embeddings.size(0);
  FASTMINE_CHECK_ARG(embeddings.dim() == 2 && embeddings.device().type() == device_type,
                     "mine_backward: embeddings must be a 2-D ", c10::DeviceTypeName(device_type),
                     " tensor");
  if (ref_emb.has_value()) {
    FASTMINE_CHECK_ARG(ref_emb->dim() == 2 && ref_emb->size(1) == embeddings.size(1) &&
                           ref_emb->device() == embeddings.device(),
                       "mine_backward: ref_emb must be [M, ", embeddings.size(1), "] on ",
                       embeddings.device());
  }
  for (const at::Tensor* t : {&grad_pos_dist, &grad_neg_dist, &pos_idx, &neg_idx}) {
    FASTMINE_CHECK_ARG(t->dim() == 1 && t->size(0) == n && t->device() == embeddings.device(),
                       "mine_backward: gradients and indices must be [", n, "] on ",
                       embeddings.device());
  }
  FASTMINE_CHECK_ARG(pos_idx.scalar_type() == at::kLong && neg_idx.scalar_type() == at::kLong,
                     "mine_backward: pos_idx and neg_idx must be int64");
  FASTMINE_CHECK_ARG(distance >= 0 && distance <= 2, "unknown distance code ", distance);
}

// The scalar arguments of fastmine::mine_topk that every implementation relies
// on, for callers of the raw ops (fastmine.mine_topk has already raised the
// Python form, naming the argument, fastmine/_contract.py): checked by
// fastmine::mine_topk and again by the compiled implementations
// (fastmine::mine_topk_cpu), which also check the tensors (check_mine_args).
inline void check_topk_args(int64_t k_pos, int64_t k_neg, int64_t neg_strategy, int64_t distance,
                            c10::optional<double> margin, double cutoff,
                            double nonzero_loss_cutoff) {
  TORCH_CHECK_VALUE(k_pos >= 1, "fastmine::mine_topk: k_pos must be >= 1, got ", k_pos);
  TORCH_CHECK_VALUE(k_neg >= 1, "fastmine::mine_topk: k_neg must be >= 1, got ", k_neg);
  TORCH_CHECK_VALUE(neg_strategy >= 0 && neg_strategy <= 3,
                    "fastmine::mine_topk: unknown neg_strategy code ", neg_strategy);
  if (neg_strategy == static_cast<int64_t>(NegStrategy::DistanceWeighted)) {
    TORCH_CHECK_VALUE(distance == static_cast<int64_t>(Distance::Euclidean),
                      "fastmine::mine_topk: neg_strategy distance_weighted needs distance "
                      "euclidean (code 0), got code ", distance);
    TORCH_CHECK_VALUE(!margin.has_value(),
                      "fastmine::mine_topk: margin is only used by neg_strategy semihard");
    TORCH_CHECK_VALUE(std::isfinite(cutoff) && cutoff > 0,
                      "fastmine::mine_topk: cutoff must be a finite number > 0, got ", cutoff);
    TORCH_CHECK_VALUE(std::isfinite(nonzero_loss_cutoff) && nonzero_loss_cutoff > 0,
                      "fastmine::mine_topk: nonzero_loss_cutoff must be a finite number > 0, got ",
                      nonzero_loss_cutoff);
  }
}

// ------------------------------------------------------------ data checks
// The contract's ValueError for row i of `name` (d elements at `row`, host
// memory), which failed strategies.h row_admissible: says which rule failed
// and the row's norm.  Used where the check is eager (CPU tensors).
template <typename acc_t, typename scalar_t>
[[noreturn]] void raise_row_error(const scalar_t* row, int64_t d, int64_t i, bool cosine,
                                  const char* name) {
  acc_t s = 0;
  bool finite = true;
  for (int64_t k = 0; k < d; ++k) {
    const acc_t v = static_cast<acc_t>(row[k]);
    finite = finite && std::isfinite(v);
    s += v * v;
  }
  const char* dtype = sizeof(acc_t) == 8 ? "torch.float64" : "torch.float32";
  char msg[320];
  if (!finite) {
    std::snprintf(msg, sizeof msg, "%s contains NaN or Inf", name);
  } else if (!(s <= sqnorm_max<acc_t>())) {
    std::snprintf(msg, sizeof msg,
                  "%s row %lld has norm %.3g, above the largest norm that %s mining can rank "
                  "(%.3g: squared distances would overflow); scale the embeddings down (e.g. "
                  "L2-normalise them)",
                  name, static_cast<long long>(i), static_cast<double>(std::sqrt(s)), dtype,
                  std::sqrt(static_cast<double>(sqnorm_max<acc_t>())));
  } else {
    (void)cosine;  // the only other rule: the cosine lower bound
    std::snprintf(msg, sizeof msg,
                  "cosine distance needs rows with a direction: %s row %lld has norm %.3g "
                  "(zero, D = 0, or a squared norm below %.3g, where %s products lose their "
                  "precision)",
                  name, static_cast<long long>(i), static_cast<double>(std::sqrt(s)),
                  static_cast<double>(cosine_sqnorm_min<acc_t>()), dtype);
  }
  TORCH_CHECK_VALUE(false, msg);
  abort();  // unreachable: TORCH_CHECK_VALUE(false) throws
}

// Eager form of the data checks on a 2-D contiguous CPU tensor: raises the
// ValueError of raise_row_error for the first row that is not admissible.
inline void check_rows_eager(const at::Tensor& rows, bool cosine, const char* name) {
  const int64_t n = rows.size(0), d = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "check_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* p = rows.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      acc_t s = 0;
      for (int64_t k = 0; k < d; ++k) {
        const acc_t v = static_cast<acc_t>(p[i * d + k]);
        s += v * v;
      }
      if (!row_admissible(s, cosine)) raise_row_error<acc_t>(p + i * d, d, i, cosine, name);
    }
  });
}

}  // namespace fastmine
