// The op schemas of the compiled backends: one schema, one implementation per
// device (csrc/cpu/*.cpp registers CPU, csrc/cuda/*.cu registers CUDA).
// Fake (meta) implementations live in fastmine/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastmine, m) {
  // Per anchor, the index (into ref_emb) of the selected positive and negative,
  // int64 [N], -1 where none exists.  Codes: see csrc/include/fastmine/strategies.h.
  m.def(
      "mine_select(Tensor embeddings, Tensor labels, Tensor ref_emb, Tensor ref_labels, "
      "Tensor? query_ids, Tensor? ref_ids, int pos_strategy, int neg_strategy, "
      "int distance, float? margin) -> (Tensor, Tensor)");
}
