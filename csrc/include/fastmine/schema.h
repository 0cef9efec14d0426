// The schema of fastmine::mine_select, the op every compiled backend implements
// (defined in csrc/fastmine_ops.cpp; the CPU-emulated CUDA build of the tests
// defines the same schema under its own namespace).
//
// Per anchor, the index (into ref_emb) of the selected positive and negative,
// int64 [N], -1 where none exists.  Codes: see strategies.h.
#pragma once

#define FASTMINE_MINE_SELECT_SCHEMA                                                      \
  "mine_select(Tensor embeddings, Tensor labels, Tensor ref_emb, Tensor ref_labels, "   \
  "Tensor? query_ids, Tensor? ref_ids, int pos_strategy, int neg_strategy, "             \
  "int distance, float? margin) -> (Tensor, Tensor)"
