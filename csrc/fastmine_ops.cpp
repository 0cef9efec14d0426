// The fastmine ops: schemas, the per-device kernels that pick the
// implementation named by `backend`, and the autograd kernel, registered once.
//
//   Python fastmine.mine(...) --> fastmine::mine            (C++ schema.h)
//     Autograd key:  MineAutograd (below): forward = the op below autograd,
//                    backward = fastmine::mine_backward on the saved rows.
//     CPU / CUDA key: mine_device: backend "cpu" on CPU tensors runs
//                    csrc/cpu/mine_cpu.cpp here; any other backend X runs the
//                    op fastmine::mine_X (csrc/cuda/mine_cuda.cu registers
//                    mine_cuda; fastmine/_triton.py registers mine_triton).
//     Meta / fake:   fastmine/_ops.py (register_fake), so torch.compile and
//                    opcheck see the output shapes.
// mine_backward dispatches the same way; an implementation without its own
// backward op on CPU tensors uses the CPU backward (same formulas).
//
//   Python fastmine.mine_topk(...) --> fastmine::mine_topk  (k per anchor; also
//                    fastmine.mine with neg_strategy="distance_weighted", k = 1)
//     Autograd key:  MineTopkAutograd: backward = fastmine::mine_backward once,
//                    on the [N*K] flattened columns (no backward kernel of its own).
//     CPU / CUDA key: mine_topk_device: every backend X (also "cpu", "cuda") is
//                    the op fastmine::mine_topk_X; a backend that has none
//                    raises NotImplementedError naming it, so backends are added
//                    one by one (fastmine/_backends.py: Backend.rules).
//     Meta / fake:   fastmine/_ops.py.
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <string>
#include <unordered_map>

#include "fastmine/op_checks.h"
#include "fastmine/ops.h"
#include "fastmine/schema.h"

namespace fastmine {
namespace {

using MineOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using MineOutValid = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using MineSig = MineOut(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                        const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                        const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                        c10::optional<double>);
using BackwardOut = std::tuple<at::Tensor, at::Tensor>;
using BackwardSig = BackwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const c10::optional<at::Tensor>&, const at::Tensor&,
                                const at::Tensor&, int64_t, bool);

// The op fastmine::<kind>_<backend> ('-' read as '_'), or nullopt when no
// library registered it.  Looked up once per name.
c10::optional<c10::OperatorHandle> implementation(const std::string& kind, c10::string_view backend) {
  static std::mutex mu;
  static std::unordered_map<std::string, c10::optional<c10::OperatorHandle>> cache;
  std::string name = "fastmine::" + kind + "_" + std::string(backend);
  for (auto& c : name) c = c == '-' ? '_' : c;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(name);
  if (it != cache.end() && it->second.has_value()) return it->second;
  auto op = c10::Dispatcher::singleton().findOp({name, ""});
  cache[name] = op;  // a miss is looked up again: the library may register later
  return op;
}

MineOutValid mine_device(const at::Tensor& embeddings, const at::Tensor& labels,
                         const c10::optional<at::Tensor>& ref_emb,
                         const c10::optional<at::Tensor>& ref_labels,
                         const c10::optional<at::Tensor>& query_ids,
                         const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy,
                         int64_t neg_strategy, int64_t distance, c10::optional<double> margin,
                         c10::string_view backend) {
  // distance_weighted needs a seed and cutoffs, which this op's schema does not
  // carry: fastmine.mine routes it to fastmine::mine_topk (k = 1).
  TORCH_CHECK_NOT_IMPLEMENTED(
      neg_strategy != static_cast<int64_t>(NegStrategy::DistanceWeighted),
      "fastmine::mine: neg_strategy distance_weighted (code 3) is not implemented by fastmine::mine "
      "(backend '", backend, "'; the op takes no seed): it is mined by fastmine::mine_topk with "
      "k_pos = k_neg = 1, which fastmine.mine calls");
  MineOut out;
  if (embeddings.is_cpu() && backend == "cpu") {
    out = cpu::mine_cpu(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                        pos_strategy, neg_strategy, distance, margin);
  } else {
    auto op = implementation("mine", backend);
    TORCH_CHECK(op.has_value(), "fastmine::mine: backend '", backend,
                "' has no implementation for ", embeddings.device().type(),
                " tensors (no op fastmine::mine_", backend, " is registered)");
    out = op->typed<MineSig>().call(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                                    pos_strategy, neg_strategy, distance, margin);
  }
  auto& [pos_idx, neg_idx, pos_dist, neg_dist] = out;
  // both >= 0  <=>  their bitwise or is >= 0 (an index is -1 or non-negative)
  at::Tensor valid = pos_idx.bitwise_or(neg_idx).ge(0);
  return {pos_idx, neg_idx, pos_dist, neg_dist, valid};
}

BackwardOut mine_backward_device(const at::Tensor& grad_pos_dist, const at::Tensor& grad_neg_dist,
                                 const at::Tensor& embeddings,
                                 const c10::optional<at::Tensor>& ref_emb,
                                 const at::Tensor& pos_idx, const at::Tensor& neg_idx,
                                 int64_t distance, bool ref_emb_grad, c10::string_view backend) {
  auto op = backend == "cpu" ? c10::nullopt : implementation("mine_backward", backend);
  if (op.has_value()) {
    return op->typed<BackwardSig>().call(grad_pos_dist, grad_neg_dist, embeddings, ref_emb,
                                         pos_idx, neg_idx, distance, ref_emb_grad);
  }
  TORCH_CHECK(embeddings.is_cpu(), "fastmine::mine_backward: backend '", backend,
              "' has no backward for ", embeddings.device().type(),
              " tensors (no op fastmine::mine_backward_", backend, " is registered)");
  return cpu::mine_backward_cpu(grad_pos_dist, grad_neg_dist, embeddings, ref_emb, pos_idx,
                                neg_idx, distance, ref_emb_grad);
}

// Autograd of fastmine::mine: the indices are not differentiable; the pair
// distances backpropagate through fastmine::mine_backward into the anchor and
// reference rows (both into embeddings when the references are the batch).
class MineAutograd : public torch::autograd::Function<MineAutograd> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& embeddings,
      const at::Tensor& labels, const c10::optional<at::Tensor>& ref_emb,
      const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& query_ids,
      const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy, int64_t neg_strategy,
      int64_t distance, c10::optional<double> margin, c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmine::mine", "")
                         .typed<MineOutValid(const at::Tensor&, const at::Tensor&,
                                             const c10::optional<at::Tensor>&,
                                             const c10::optional<at::Tensor>&,
                                             const c10::optional<at::Tensor>&,
                                             const c10::optional<at::Tensor>&, int64_t, int64_t,
                                             int64_t, c10::optional<double>, c10::string_view)>();
    auto [pos_idx, neg_idx, pos_dist, neg_dist, valid] =
        op.call(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, pos_strategy,
                neg_strategy, distance, margin, backend);
    ctx->save_for_backward({embeddings, ref_emb.has_value() ? *ref_emb : at::Tensor(), pos_idx,
                            neg_idx});
    ctx->saved_data["distance"] = distance;
    ctx->saved_data["backend"] = std::string(backend);
    ctx->mark_non_differentiable({pos_idx, neg_idx, valid});
    return {pos_idx, neg_idx, pos_dist, neg_dist, valid};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& embeddings = saved[0];
    const at::Tensor& ref_emb = saved[1];
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_r = ref_emb.defined() && ctx->needs_input_grad(2);
    torch::autograd::variable_list out(11);
    if (!need_x && !need_r) return out;
    auto grad_or_zeros = [&](const at::Tensor& g) {
      return g.defined() ? g : at::zeros({embeddings.size(0)}, embeddings.options());
    };
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmine::mine_backward", "")
                         .typed<BackwardOut(const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const c10::optional<at::Tensor>&,
                                            const at::Tensor&, const at::Tensor&, int64_t, bool,
                                            c10::string_view)>();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    auto [grad_x, grad_r] =
        op.call(grad_or_zeros(grads[2]), grad_or_zeros(grads[3]), embeddings,
                ref_emb.defined() ? c10::optional<at::Tensor>(ref_emb) : c10::nullopt, saved[2],
                saved[3], ctx->saved_data["distance"].toInt(), need_r, backend);
    if (need_x) out[0] = grad_x;
    if (need_r) out[2] = grad_r;
    return out;
  }
};

MineOutValid mine_autograd(const at::Tensor& embeddings, const at::Tensor& labels,
                      const c10::optional<at::Tensor>& ref_emb,
                      const c10::optional<at::Tensor>& ref_labels,
                      const c10::optional<at::Tensor>& query_ids,
                      const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy,
                      int64_t neg_strategy, int64_t distance, c10::optional<double> margin,
                      c10::string_view backend) {
  auto out = MineAutograd::apply(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                                 pos_strategy, neg_strategy, distance, margin, backend);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ------------------------------------------------------------------ top-k
using TopkSig = MineOut(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                        const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                        const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t,
                        int64_t, c10::optional<double>, double, double, int64_t);

MineOut mine_topk_device(const at::Tensor& embeddings, const at::Tensor& labels,
                         const c10::optional<at::Tensor>& ref_emb,
                         const c10::optional<at::Tensor>& ref_labels,
                         const c10::optional<at::Tensor>& query_ids,
                         const c10::optional<at::Tensor>& ref_ids, int64_t k_pos, int64_t k_neg,
                         int64_t pos_strategy, int64_t neg_strategy, int64_t distance,
                         c10::optional<double> margin, double cutoff, double nonzero_loss_cutoff,
                         int64_t seed, c10::string_view backend) {
  check_topk_args(k_pos, k_neg, neg_strategy, distance, margin, cutoff, nonzero_loss_cutoff);
  auto op = implementation("mine_topk", backend);
  TORCH_CHECK_NOT_IMPLEMENTED(
      op.has_value(), "fastmine::mine_topk: backend '", backend,
      "' does not implement top-k / distance-weighted mining yet (no op fastmine::mine_topk_",
      backend, " is registered); use backend='torch' (the reference) or 'auto'");
  return op->typed<TopkSig>().call(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                                   k_pos, k_neg, pos_strategy, neg_strategy, distance, margin,
                                   cutoff, nonzero_loss_cutoff, seed);
}

// Autograd of fastmine::mine_topk: the indices are not differentiable; every
// selected pair's distance backpropagates through fastmine::mine_backward,
// called once on the K = max(k_pos, k_neg) columns flattened to [N*K] pairs:
//   anchors     x_rep = embeddings repeated K times (row i*K + t = row i),
//   references  ref_emb, or embeddings itself when the references are the batch,
//   indices     pos_idx / neg_idx padded to K columns with -1 (zero gradient),
//   gradients   padded with 0;
// then dL/dx = the K anchor copies' gradients summed (plus the reference half
// when the references are the batch).  mine_backward's formulas and its
// zero-at--1 rule thus apply unchanged, and a memory bank still gets no [M, D]
// gradient when it does not need one.  Extra memory: [N*K, D] (the size of the
// selected pairs), never [M, D] per column.
class MineTopkAutograd : public torch::autograd::Function<MineTopkAutograd> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& embeddings,
      const at::Tensor& labels, const c10::optional<at::Tensor>& ref_emb,
      const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& query_ids,
      const c10::optional<at::Tensor>& ref_ids, int64_t k_pos, int64_t k_neg,
      int64_t pos_strategy, int64_t neg_strategy, int64_t distance,
      c10::optional<double> margin, double cutoff, double nonzero_loss_cutoff, int64_t seed,
      c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmine::mine_topk", "")
                         .typed<MineOut(const at::Tensor&, const at::Tensor&,
                                        const c10::optional<at::Tensor>&,
                                        const c10::optional<at::Tensor>&,
                                        const c10::optional<at::Tensor>&,
                                        const c10::optional<at::Tensor>&, int64_t, int64_t,
                                        int64_t, int64_t, int64_t, c10::optional<double>, double,
                                        double, int64_t, c10::string_view)>();
    auto [pos_idx, neg_idx, pos_dist, neg_dist] =
        op.call(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, k_pos, k_neg,
                pos_strategy, neg_strategy, distance, margin, cutoff, nonzero_loss_cutoff, seed,
                backend);
    ctx->save_for_backward({embeddings, ref_emb.has_value() ? *ref_emb : at::Tensor(), pos_idx,
                            neg_idx});
    ctx->saved_data["distance"] = distance;
    ctx->saved_data["backend"] = std::string(backend);
    ctx->mark_non_differentiable({pos_idx, neg_idx});
    return {pos_idx, neg_idx, pos_dist, neg_dist};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& embeddings = saved[0];
    const at::Tensor& ref_emb = saved[1];
    const at::Tensor& pos_idx = saved[2];
    const at::Tensor& neg_idx = saved[3];
    const bool self_refs = !ref_emb.defined();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_r = !self_refs && ctx->needs_input_grad(2);
    torch::autograd::variable_list out(16);
    if (!need_x && !need_r) return out;
    const int64_t n = embeddings.size(0), d = embeddings.size(1);
    const int64_t k_pos = pos_idx.size(1), k_neg = neg_idx.size(1);
    const int64_t kk = std::max(k_pos, k_neg);
    // [N, k] -> [N*K] (row-major: pair i*K + t is column t of anchor i).
    auto flat_idx = [&](const at::Tensor& idx) {
      return at::constant_pad_nd(idx, {0, kk - idx.size(1)}, -1).reshape({n * kk});
    };
    auto flat_grad = [&](const at::Tensor& g, int64_t k) {
      const at::Tensor full = g.defined() ? g : at::zeros({n, k}, embeddings.options());
      return at::constant_pad_nd(full, {0, kk - k}, 0).reshape({n * kk});
    };
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmine::mine_backward", "")
                         .typed<BackwardOut(const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const c10::optional<at::Tensor>&,
                                            const at::Tensor&, const at::Tensor&, int64_t, bool,
                                            c10::string_view)>();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    const at::Tensor x_rep = embeddings.repeat_interleave(kk, 0);  // [N*K, D]
    // The references are always explicit here (x_rep is not the reference set).
    const at::Tensor refs = self_refs ? embeddings : ref_emb;
    const bool want_r = self_refs ? need_x : need_r;
    auto [grad_rep, grad_r] =
        op.call(flat_grad(grads[2], k_pos), flat_grad(grads[3], k_neg), x_rep,
                c10::optional<at::Tensor>(refs), flat_idx(pos_idx), flat_idx(neg_idx),
                ctx->saved_data["distance"].toInt(), want_r, backend);
    if (need_x) {
      at::Tensor gx = grad_rep.reshape({n, kk, d}).sum(1);
      out[0] = self_refs ? gx.add(grad_r) : gx;
    }
    if (need_r) out[2] = grad_r;
    return out;
  }
};

MineOut mine_topk_autograd(const at::Tensor& embeddings, const at::Tensor& labels,
                           const c10::optional<at::Tensor>& ref_emb,
                           const c10::optional<at::Tensor>& ref_labels,
                           const c10::optional<at::Tensor>& query_ids,
                           const c10::optional<at::Tensor>& ref_ids, int64_t k_pos,
                           int64_t k_neg, int64_t pos_strategy, int64_t neg_strategy,
                           int64_t distance, c10::optional<double> margin, double cutoff,
                           double nonzero_loss_cutoff, int64_t seed, c10::string_view backend) {
  auto out = MineTopkAutograd::apply(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                                     k_pos, k_neg, pos_strategy, neg_strategy, distance, margin,
                                     cutoff, nonzero_loss_cutoff, seed, backend);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace fastmine

TORCH_LIBRARY(fastmine, m) {
  m.def(FASTMINE_MINE_SCHEMA);
  m.def(FASTMINE_MINE_BACKWARD_SCHEMA);
  m.def(FASTMINE_MINE_SELECT_SCHEMA);
  m.def(FASTMINE_MINE_TOPK_SCHEMA);
}

TORCH_LIBRARY_IMPL(fastmine, CPU, m) {
  m.impl("mine", &fastmine::mine_device);
  m.impl("mine_topk", &fastmine::mine_topk_device);
  m.impl("mine_backward", &fastmine::mine_backward_device);
}

TORCH_LIBRARY_IMPL(fastmine, CUDA, m) {
  m.impl("mine", &fastmine::mine_device);
  m.impl("mine_topk", &fastmine::mine_topk_device);
  m.impl("mine_backward", &fastmine::mine_backward_device);
}

TORCH_LIBRARY_IMPL(fastmine, Autograd, m) {
  m.impl("mine", &fastmine::mine_autograd);
  m.impl("mine_topk", &fastmine::mine_topk_autograd);
}

// ---------------------------------------------------------------------------
// Contrastive losses (issue #18; docs/contrastive.md).
//   Python fastmine.contrastive.*Loss(backend="cpu") --> fastmine::contrastive
//     Autograd key:  ContrastiveAutograd: forward = the op below autograd (the
//                    per-anchor terms and statistics), backward =
//                    fastmine::contrastive_backward, recomputing the tiles.
//     CPU key:       csrc/cpu/contrastive_cpu.cpp.
//     Meta / fake:   fastmine/_ops.py.
namespace fastmine {
namespace cpu {
std::tuple<at::Tensor, at::Tensor> contrastive_cpu(
    const at::Tensor& q, const c10::optional<at::Tensor>& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
    const c10::optional<at::Tensor>& ref_ids, int64_t loss, double p0, double p1, double p2,
    c10::optional<double> epsilon, int64_t block);
std::tuple<at::Tensor, at::Tensor> contrastive_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const c10::optional<at::Tensor>& r,
    const at::Tensor& labels, const at::Tensor& ref_labels,
    const c10::optional<at::Tensor>& query_ids, const c10::optional<at::Tensor>& ref_ids,
    int64_t loss, double p0, double p1, double p2, c10::optional<double> epsilon, int64_t block,
    const at::Tensor& stats, bool ref_grad);
}  // namespace cpu

namespace {

using OptT = c10::optional<at::Tensor>;
using ContrastiveOut = std::tuple<at::Tensor, at::Tensor>;

// The terms are differentiable w.r.t. q and r; the statistics are not.
class ContrastiveAutograd : public torch::autograd::Function<ContrastiveAutograd> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& q, const OptT& r,
      const at::Tensor& labels, const at::Tensor& ref_labels, const OptT& query_ids,
      const OptT& ref_ids, int64_t loss, double p0, double p1, double p2,
      c10::optional<double> epsilon, int64_t block) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmine::contrastive", "")
                         .typed<ContrastiveOut(const at::Tensor&, const OptT&, const at::Tensor&,
                                               const at::Tensor&, const OptT&, const OptT&,
                                               int64_t, double, double, double,
                                               c10::optional<double>, int64_t)>();
    auto [value, stats] = op.call(q, r, labels, ref_labels, query_ids, ref_ids, loss, p0, p1, p2,
                                  epsilon, block);
    auto opt = [](const OptT& t) { return t.has_value() ? *t : at::Tensor(); };
    ctx->save_for_backward({q, opt(r), labels, ref_labels, opt(query_ids), opt(ref_ids), stats});
    ctx->saved_data["loss"] = loss;
    ctx->saved_data["p0"] = p0;
    ctx->saved_data["p1"] = p1;
    ctx->saved_data["p2"] = p2;
    ctx->saved_data["mined"] = epsilon.has_value();
    ctx->saved_data["epsilon"] = epsilon.value_or(0.0);
    ctx->saved_data["block"] = block;
    ctx->mark_non_differentiable({stats});
    return {value, stats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool self_refs = !saved[1].defined();
    const bool need_q = ctx->needs_input_grad(0);
    const bool need_r = !self_refs && ctx->needs_input_grad(1);
    torch::autograd::variable_list out(12);
    if ((!need_q && !need_r) || !grads[0].defined()) return out;
    auto opt = [](const at::Tensor& t) { return t.defined() ? OptT(t) : c10::nullopt; };
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmine::contrastive_backward", "")
                         .typed<ContrastiveOut(const at::Tensor&, const at::Tensor&, const OptT&,
                                               const at::Tensor&, const at::Tensor&, const OptT&,
                                               const OptT&, int64_t, double, double, double,
                                               c10::optional<double>, int64_t, const at::Tensor&,
                                               bool)>();
    const auto& d = ctx->saved_data;
    const c10::optional<double> epsilon =
        d.at("mined").toBool() ? c10::optional<double>(d.at("epsilon").toDouble()) : c10::nullopt;
    auto [gq, gr] = op.call(grads[0], saved[0], opt(saved[1]), saved[2], saved[3], opt(saved[4]),
                            opt(saved[5]), d.at("loss").toInt(), d.at("p0").toDouble(),
                            d.at("p1").toDouble(), d.at("p2").toDouble(), epsilon,
                            d.at("block").toInt(), saved[6], need_r);
    if (need_q) out[0] = gq;
    if (need_r) out[1] = gr;
    return out;
  }
};

ContrastiveOut contrastive_autograd(const at::Tensor& q, const OptT& r, const at::Tensor& labels,
                                    const at::Tensor& ref_labels, const OptT& query_ids,
                                    const OptT& ref_ids, int64_t loss, double p0, double p1,
                                    double p2, c10::optional<double> epsilon, int64_t block) {
  auto out = ContrastiveAutograd::apply(q, r, labels, ref_labels, query_ids, ref_ids, loss, p0, p1,
                                        p2, epsilon, block);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace fastmine

TORCH_LIBRARY_FRAGMENT(fastmine, m) {
  m.def(FASTMINE_CONTRASTIVE_SCHEMA);
  m.def(FASTMINE_CONTRASTIVE_BACKWARD_SCHEMA);
}

TORCH_LIBRARY_IMPL(fastmine, CPU, m) {
  m.impl("contrastive", &fastmine::cpu::contrastive_cpu);
  m.impl("contrastive_backward", &fastmine::cpu::contrastive_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastmine, Autograd, m) {
  m.impl("contrastive", &fastmine::contrastive_autograd);
}
