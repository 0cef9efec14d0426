// C++ entry points of the device implementations (registered through
// csrc/fastmine_ops.cpp).  Arguments as in schema.h.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastmine {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mine_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels,
    const c10::optional<at::Tensor>& ref_emb, const c10::optional<at::Tensor>& ref_labels,
    const c10::optional<at::Tensor>& query_ids, const c10::optional<at::Tensor>& ref_ids,
    int64_t pos_strategy, int64_t neg_strategy, int64_t distance, c10::optional<double> margin);

std::tuple<at::Tensor, at::Tensor> mine_backward_cpu(
    const at::Tensor& grad_pos_dist, const at::Tensor& grad_neg_dist,
    const at::Tensor& embeddings, const c10::optional<at::Tensor>& ref_emb,
    const at::Tensor& pos_idx, const at::Tensor& neg_idx, int64_t distance, bool ref_emb_grad);

}  // namespace cpu
}  // namespace fastmine
