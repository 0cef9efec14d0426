// The op schemas of fastmine (defined in csrc/fastmine_ops.cpp).  One op per
// job, one implementation per device; docs/ops.md describes the layering.
//
// fastmine::mine           per anchor, the selected positive and negative
//                          (int64 [N], -1 where none exists), the exact
//                          distances of those pairs ([N], embeddings' dtype)
//                          and valid (bool [N], both exist).
//                          ref_emb/ref_labels None: the references are the
//                          batch and self-pairs are excluded (unless
//                          query_ids says which rows are the same sample).
//                          `backend` names the implementation: "cpu" and
//                          "cuda" are this library's kernels; any other name X
//                          is the op fastmine::mine_X (same schema without
//                          `backend`), e.g. the Triton kernels.
// fastmine::mine_backward  dL/d(embeddings) [N, D] and dL/d(ref_emb) ([M, D],
//                          or [0, D] when ref_emb is None -- both halves are
//                          then in the first output -- or ref_emb_grad is false).
// fastmine::mine_select    selection only, for an explicit reference set (the
//                          raw kernels: benchmarks, argument-validation tests;
//                          CPU and CUDA implement it).
// fastmine::mine_topk      per anchor, the k_pos positives and k_neg negatives
//                          in the strategy's order (int64 [N, k_pos] and
//                          [N, k_neg], trailing -1 where fewer exist) and the
//                          exact distances of those pairs ([N, k], embeddings'
//                          dtype); docs/topk.md.  neg_strategy may also be
//                          distance_weighted (code 3: Gumbel-top-k keyed by
//                          `seed`, weights from cutoff / nonzero_loss_cutoff;
//                          docs/contract.md, "Random sampling").  `seed` is the
//                          64-bit seed's bit pattern as a signed int64 (seeds
//                          >= 2^63 arrive as seed - 2^64; read it as uint64_t).
//                          Autograd: fastmine::mine_backward on the flattened
//                          [N*K] columns.  Every backend X is the op
//                          fastmine::mine_topk_X (same schema without `backend`;
//                          FASTMINE_MINE_TOPK_IMPL_SCHEMA), also "cpu" and "cuda".
// The CUDA implementation registers fastmine::mine_cuda and
// fastmine::mine_backward_cuda (csrc/cuda/mine_cuda.cu; FASTMINE_MINE_IMPL_SCHEMA).
// Codes: see strategies.h.
#pragma once

#define FASTMINE_MINE_ARGS                                                                 \
  "Tensor embeddings, Tensor labels, Tensor? ref_emb, Tensor? ref_labels, "               \
  "Tensor? query_ids, Tensor? ref_ids, int pos_strategy, int neg_strategy, int distance, " \
  "float? margin"
#define FASTMINE_MINE_RETURNS "(Tensor, Tensor, Tensor, Tensor)"
#define FASTMINE_MINE_BACKWARD_ARGS                                                      \
  "Tensor grad_pos_dist, Tensor grad_neg_dist, Tensor embeddings, Tensor? ref_emb, "    \
  "Tensor pos_idx, Tensor neg_idx, int distance, bool ref_emb_grad"

#define FASTMINE_MINE_SCHEMA \
  "mine(" FASTMINE_MINE_ARGS ", str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
#define FASTMINE_MINE_BACKWARD_SCHEMA \
  "mine_backward(" FASTMINE_MINE_BACKWARD_ARGS ", str backend) -> (Tensor, Tensor)"
// An implementation X registers fastmine::mine_X (the first four outputs of
// fastmine::mine) and optionally fastmine::mine_backward_X, with these schemas.
#define FASTMINE_MINE_IMPL_SCHEMA(X) "mine_" X "(" FASTMINE_MINE_ARGS ") -> " FASTMINE_MINE_RETURNS
#define FASTMINE_MINE_BACKWARD_IMPL_SCHEMA(X) \
  "mine_backward_" X "(" FASTMINE_MINE_BACKWARD_ARGS ") -> (Tensor, Tensor)"

#define FASTMINE_MINE_TOPK_ARGS                                                            \
  "Tensor embeddings, Tensor labels, Tensor? ref_emb, Tensor? ref_labels, "               \
  "Tensor? query_ids, Tensor? ref_ids, int k_pos, int k_neg, int pos_strategy, "          \
  "int neg_strategy, int distance, float? margin, float cutoff, float nonzero_loss_cutoff, " \
  "int seed"
#define FASTMINE_MINE_TOPK_SCHEMA \
  "mine_topk(" FASTMINE_MINE_TOPK_ARGS ", str backend) -> (Tensor, Tensor, Tensor, Tensor)"
// An implementation X of top-k registers fastmine::mine_topk_X with this schema
// (the outputs of fastmine::mine_topk: pos_idx, neg_idx, pos_dist, neg_dist).
#define FASTMINE_MINE_TOPK_IMPL_SCHEMA(X) \
  "mine_topk_" X "(" FASTMINE_MINE_TOPK_ARGS ") -> (Tensor, Tensor, Tensor, Tensor)"

#define FASTMINE_MINE_SELECT_SCHEMA                                                      \
  "mine_select(Tensor embeddings, Tensor labels, Tensor ref_emb, Tensor ref_labels, "   \
  "Tensor? query_ids, Tensor? ref_ids, int pos_strategy, int neg_strategy, "             \
  "int distance, float? margin) -> (Tensor, Tensor)"

// ---------------------------------------------------------------------------
// Contrastive losses (issue #18; docs/contrastive.md; fastmine/contrastive.py).
// fastmine::contrastive            the per-anchor loss terms ([N], q's dtype;
//                                  NT-Xent: the sum of the anchor's pair terms)
//                                  and the per-anchor statistics (float64
//                                  [6, N], not differentiable: rows 2 and 3 are
//                                  the positive and negative counts the
//                                  reduction needs), streamed in block x block
//                                  tiles, O((N + M) D) memory.  The reduction
//                                  is Python's (fastmine/contrastive.py: reduce).
//                                  q [N, D], r [M, D]: L2-normalised rows,
//                                  float32 or float64 (the caller normalises
//                                  and upcasts); r None: the references are q
//                                  and self-pairs are excluded unless ids say
//                                  which rows are one sample (then ref_labels
//                                  = labels and ref_ids = query_ids).
//                                  loss: a kContrastive* code; p0, p1, p2:
//                                  temperature, -, - (SupCon, NT-Xent) or
//                                  alpha, beta, base (Multi-Similarity);
//                                  epsilon: the fused MS miner's (None: all pairs).
// fastmine::contrastive_backward   given grad [N] (dL/dterms), dL/dq [N, D] and
//                                  dL/dr ([M, D], or [0, D] when r is None --
//                                  both halves are then in the first output --
//                                  or ref_grad is false), recomputing the tiles
//                                  from the statistics.
// CPU: csrc/cpu/contrastive_cpu.cpp.  Autograd: C++ (csrc/fastmine_ops.cpp).
#define FASTMINE_CONTRASTIVE_ARGS                                                          \
  "Tensor q, Tensor? r, Tensor labels, Tensor ref_labels, Tensor? query_ids, "             \
  "Tensor? ref_ids, int loss, float p0, float p1, float p2, float? epsilon, int block"
#define FASTMINE_CONTRASTIVE_SCHEMA "contrastive(" FASTMINE_CONTRASTIVE_ARGS ") -> (Tensor, Tensor)"
#define FASTMINE_CONTRASTIVE_BACKWARD_SCHEMA                                                \
  "contrastive_backward(Tensor grad, " FASTMINE_CONTRASTIVE_ARGS                            \
  ", Tensor stats, bool ref_grad) -> (Tensor, Tensor)"
// Loss codes (mirrored in fastmine/contrastive.py: LOSS_CODES).
#include <cstdint>
namespace fastmine {
constexpr int64_t kContrastiveSupCon = 0;
constexpr int64_t kContrastiveNTXent = 1;
constexpr int64_t kContrastiveMultiSimilarity = 2;
}  // namespace fastmine
