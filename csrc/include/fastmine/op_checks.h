// Argument checks of fastmine::mine_select, shared by its implementations
// (csrc/cpu/mine_cpu.cpp, csrc/cuda/mine_cuda.cu): one TORCH_CHECK per
// requirement, each message naming the argument.  Needs ATen (unlike
// strategies.h, which the torch-free CUDA kernels include).
#pragma once

#include <ATen/ATen.h>

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

}  // namespace fastmine
