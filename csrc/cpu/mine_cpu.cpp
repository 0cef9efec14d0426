// CPU implementation of fastmine::mine_select.
//
// Blocked and fused, never holding the N x M matrix:
//   for each block of BM anchors (in parallel, at::parallel_for):
//     for each chunk of BN references:
//       dot = X_blk @ R_chunk^T               (BLAS, at::mm_out into a BM x BN buffer)
//       one vectorised pass over the buffer: mining value v, label and
//       same-sample masks, running argmin of the positive and negative keys.
// Memory: O(threads * BM * BN) plus O((N + M) * D) for upcasts/norms.
//
// Selection is "argmin of a key" (strategies.h): key = v for nearest rules and
// -v for farthest ones, +inf for inadmissible references.  The inner loop only
// reduces the *minimum key* of each 64-wide sub-chunk (an `omp simd` min
// reduction, no branches); the index is resolved afterwards by rescanning the
// winning sub-chunk for the first position holding that key.  Sub-chunks and
// chunks are merged with a strict '<', so exact ties keep the smallest index.
// The rescan recomputes keys with the same inline code; the file is compiled
// with -ffp-contract=off so SIMD and scalar arithmetic agree bit for bit.
//
// The semi-hard rule needs d_ap before the negative sweep, so it runs two
// sweeps: positives first, then negatives inside the window (lo, hi) of
// strategies.h.  When all references fit in one chunk the second sweep reuses
// the dot buffer; otherwise it recomputes the GEMM chunk by chunk.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "fastmine/compact.h"
#include "fastmine/op_checks.h"
#include "fastmine/strategies.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// One clone per ISA, chosen at load time; keeps the build portable.
#define FASTMINE_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTMINE_CPU_CLONES
#endif

namespace fastmine {
namespace cpu {
namespace {

constexpr int64_t kBlockRows = 64;      // anchors per task (BM)
constexpr int64_t kBufferBytes = 1 << 20;  // BM x BN dot buffer per thread (fits L2)
constexpr int64_t kSub = 64;            // width of one min-reduction sub-chunk

enum class Pass { Fused, PosOnly, NegWindow };

template <typename acc_t>
struct Best {
  acc_t key;
  int64_t idx;
};

// Mining value from a dot product: squared Euclidean via the Gram expansion
// (a_i = |x_i|^2, b_j = |r_j|^2) or cosine distance (a_i, b_j = 1/|.|).
// Clamped at +0 (rounding can make it slightly negative).
template <typename acc_t, Distance DIST>
inline acc_t mining_value(acc_t dot, acc_t ai, acc_t bj) {
  acc_t v;
  if constexpr (DIST == Distance::Cosine) {
    v = acc_t(1) - dot * ai * bj;
  } else {
    v = ai + bj - acc_t(2) * dot;
  }
  return v > acc_t(0) ? v : acc_t(0);
}

// Everything one anchor row needs to turn dot products into keys.
template <typename acc_t>
struct RowKeys {
  const acc_t* dot;     // [cn]
  const acc_t* b;       // [cn] reference terms
  const int32_t* rl;    // [cn] reference labels
  const int32_t* rid;   // [cn] reference ids (nullptr without ids)
  acc_t ai;
  int32_t li, qi;
  acc_t ps, ns;         // +1 nearest / -1 farthest
  acc_t lo, hi;         // semi-hard window on v (NegWindow only)
};

template <typename acc_t, Distance DIST, bool HAS_IDS>
inline acc_t pos_key(const RowKeys<acc_t>& k, int64_t j) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t v = mining_value<acc_t, DIST>(k.dot[j], k.ai, k.b[j]);
  const bool ok = (k.rl[j] == k.li) & !(HAS_IDS && k.rid[j] == k.qi);
  return ok ? k.ps * v : inf;
}

template <typename acc_t, Distance DIST, bool HAS_IDS, bool WINDOW>
inline acc_t neg_key(const RowKeys<acc_t>& k, int64_t j) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t v = mining_value<acc_t, DIST>(k.dot[j], k.ai, k.b[j]);
  bool ok = (k.rl[j] != k.li) & !(HAS_IDS && k.rid[j] == k.qi);
  if (WINDOW) ok = ok & (v > k.lo) & (v < k.hi);
  return ok ? k.ns * v : inf;
}

// First index in [s, e) whose key equals `key` (it exists: `key` came from there).
template <typename acc_t, typename KeyFn>
inline int64_t first_index_of(KeyFn key_fn, int64_t s, int64_t e, acc_t key) {
  for (int64_t j = s; j < e; ++j) {
    if (key_fn(j) == key) return j;
  }
  return s;  // unreachable with -ffp-contract=off; keeps the result in range
}

template <typename acc_t>
struct BlockArgs {
  const acc_t* dot;  // [bm, cn] row-major
  int64_t bm, cn, j0;
  const acc_t* a;    // [bm]
  const acc_t* b;    // [cn]
  const int32_t* ql; // [bm]
  const int32_t* rl; // [cn]
  const int32_t* qid;  // [bm] or nullptr
  const int32_t* rid;  // [cn] or nullptr
  acc_t ps, ns;
  const acc_t* lo;   // [bm] (NegWindow)
  const acc_t* hi;   // [bm] (NegWindow)
  Best<acc_t>* bp;   // [bm] running best positive
  Best<acc_t>* bn;   // [bm] running best negative
};

template <typename acc_t, Distance DIST, bool HAS_IDS, Pass PASS>
FASTMINE_CPU_CLONES void scan_block(const BlockArgs<acc_t>& A) {
  constexpr bool DO_POS = PASS != Pass::NegWindow;
  constexpr bool DO_NEG = PASS != Pass::PosOnly;
  constexpr bool WINDOW = PASS == Pass::NegWindow;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < A.bm; ++i) {
    RowKeys<acc_t> k{A.dot + i * A.cn, A.b, A.rl, A.rid, A.a[i], A.ql[i],
                     HAS_IDS ? A.qid[i] : 0, A.ps, A.ns,
                     WINDOW ? A.lo[i] : acc_t(0), WINDOW ? A.hi[i] : acc_t(0)};
    if (WINDOW && !(k.lo < inf)) continue;  // no positive -> no semi-hard negative
    acc_t best_p = inf, best_n = inf;
    int64_t sub_p = -1, sub_n = -1;
    for (int64_t s = 0; s < A.cn; s += kSub) {
      const int64_t e = std::min(s + kSub, A.cn);
      acc_t mp = inf, mn = inf;
#pragma omp simd reduction(min : mp, mn)
      for (int64_t j = s; j < e; ++j) {
        if constexpr (DO_POS) {
          const acc_t kp = pos_key<acc_t, DIST, HAS_IDS>(k, j);
          mp = kp < mp ? kp : mp;
        }
        if constexpr (DO_NEG) {
          const acc_t kn = neg_key<acc_t, DIST, HAS_IDS, WINDOW>(k, j);
          mn = kn < mn ? kn : mn;
        }
      }
      if (mp < best_p) { best_p = mp; sub_p = s; }
      if (mn < best_n) { best_n = mn; sub_n = s; }
    }
    if (DO_POS && sub_p >= 0 && best_p < A.bp[i].key) {
      auto fn = [&](int64_t j) { return pos_key<acc_t, DIST, HAS_IDS>(k, j); };
      A.bp[i] = {best_p, A.j0 + first_index_of(fn, sub_p, std::min(sub_p + kSub, A.cn), best_p)};
    }
    if (DO_NEG && sub_n >= 0 && best_n < A.bn[i].key) {
      auto fn = [&](int64_t j) { return neg_key<acc_t, DIST, HAS_IDS, WINDOW>(k, j); };
      A.bn[i] = {best_n, A.j0 + first_index_of(fn, sub_n, std::min(sub_n + kSub, A.cn), best_n)};
    }
  }
}

template <typename acc_t, Distance DIST, bool HAS_IDS>
void scan_dispatch(Pass pass, const BlockArgs<acc_t>& A) {
  switch (pass) {
    case Pass::Fused: return scan_block<acc_t, DIST, HAS_IDS, Pass::Fused>(A);
    case Pass::PosOnly: return scan_block<acc_t, DIST, HAS_IDS, Pass::PosOnly>(A);
    case Pass::NegWindow: return scan_block<acc_t, DIST, HAS_IDS, Pass::NegWindow>(A);
  }
}

template <typename acc_t>
void scan(Distance dist, bool has_ids, Pass pass, const BlockArgs<acc_t>& A) {
#define FASTMINE_SCAN(D)                                                   \
  return has_ids ? scan_dispatch<acc_t, D, true>(pass, A)                  \
                 : scan_dispatch<acc_t, D, false>(pass, A)
  switch (dist) {
    case Distance::Euclidean:  // mined on the square: same ordering
    case Distance::SquaredEuclidean: FASTMINE_SCAN(Distance::SquaredEuclidean);
    case Distance::Cosine: FASTMINE_SCAN(Distance::Cosine);
  }
#undef FASTMINE_SCAN
}

template <typename acc_t>
void mine_select_impl(const at::Tensor& x, const at::Tensor& r, const at::Tensor& a_terms,
                      const at::Tensor& b_terms, const at::Tensor& ql, const at::Tensor& rl,
                      const at::Tensor& qid, const at::Tensor& rid, PosStrategy pos,
                      NegStrategy neg, Distance dist, double margin, at::Tensor& pos_idx,
                      at::Tensor& neg_idx) {
  const int64_t n = x.size(0), m = r.size(0);
  const bool has_ids = qid.defined();
  const int64_t bn_cap = std::max<int64_t>(kSub, kBufferBytes / int64_t(sizeof(acc_t)) / kBlockRows);
  const int64_t chunk = std::min(m, bn_cap);
  const int64_t nblocks = (n + kBlockRows - 1) / kBlockRows;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t ps = pos_is_nearest(pos) ? acc_t(1) : acc_t(-1);
  const acc_t ns = neg_is_nearest(neg) ? acc_t(1) : acc_t(-1);
  const bool semihard = neg == NegStrategy::SemiHard;

  at::parallel_for(0, nblocks, 1, [&](int64_t blk0, int64_t blk1) {
    // Worker threads do not inherit the caller's dispatch state (the op runs
    // below autograd only on the calling thread): operands are detached and
    // grad mode is off here so mm_out never sees autograd.
    at::NoGradGuard no_grad;
    at::Tensor buf = at::empty({kBlockRows * chunk}, x.options());
    std::vector<Best<acc_t>> bp(kBlockRows), bn(kBlockRows);
    std::vector<acc_t> lo(kBlockRows), hi(kBlockRows);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * kBlockRows, bm = std::min(kBlockRows, n - i0);
      const at::Tensor xb = x.narrow(0, i0, bm);
      std::fill(bp.begin(), bp.end(), Best<acc_t>{inf, -1});
      std::fill(bn.begin(), bn.end(), Best<acc_t>{inf, -1});
      // One sweep over all reference chunks with the given pass.
      auto sweep = [&](Pass pass, bool reuse_buffer) {
        for (int64_t j0 = 0; j0 < m; j0 += chunk) {
          const int64_t cn = std::min(chunk, m - j0);
          at::Tensor dot = buf.narrow(0, 0, bm * cn).view({bm, cn});
          if (!reuse_buffer) at::mm_out(dot, xb, r.narrow(0, j0, cn).t());
          BlockArgs<acc_t> A{dot.data_ptr<acc_t>(), bm, cn, j0,
                             a_terms.data_ptr<acc_t>() + i0, b_terms.data_ptr<acc_t>() + j0,
                             ql.data_ptr<int32_t>() + i0, rl.data_ptr<int32_t>() + j0,
                             has_ids ? qid.data_ptr<int32_t>() + i0 : nullptr,
                             has_ids ? rid.data_ptr<int32_t>() + j0 : nullptr,
                             ps, ns, lo.data(), hi.data(), bp.data(), bn.data()};
          scan<acc_t>(dist, has_ids, pass, A);
        }
      };
      if (!semihard) {
        sweep(Pass::Fused, false);
      } else {
        sweep(Pass::PosOnly, false);
        for (int64_t i = 0; i < bm; ++i) {
          if (bp[i].idx < 0) { lo[i] = inf; hi[i] = inf; continue; }
          const acc_t v_ap = ps * bp[i].key;  // key = ps * v
          lo[i] = v_ap;
          hi[i] = semihard_upper<acc_t>(v_ap, margin, dist, inf);
        }
        sweep(Pass::NegWindow, /*reuse_buffer=*/chunk == m);
      }
      int64_t* pi = pos_idx.data_ptr<int64_t>() + i0;
      int64_t* ni = neg_idx.data_ptr<int64_t>() + i0;
      for (int64_t i = 0; i < bm; ++i) { pi[i] = bp[i].idx; ni[i] = bn[i].idx; }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mine_select_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
    const c10::optional<at::Tensor>& ref_ids, int64_t pos_strategy, int64_t neg_strategy,
    int64_t distance, c10::optional<double> margin) {
  check_mine_select_args(c10::DeviceType::CPU, embeddings, labels, ref_emb, ref_labels, query_ids,
                         ref_ids, pos_strategy, neg_strategy, distance, margin);
  const int64_t n = embeddings.size(0), m = ref_emb.size(0);
  const auto neg = static_cast<NegStrategy>(neg_strategy);

  auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor pos_idx = at::full({n}, -1, opts), neg_idx = at::full({n}, -1, opts);
  if (n == 0 || m == 0) return {pos_idx, neg_idx};

  // float64 stays float64; float16/bfloat16/float32 are mined in float32.
  const auto acc = embeddings.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Selection is not differentiable: detach so no ATen call below records autograd.
  at::Tensor x = embeddings.detach().to(acc).contiguous();
  at::Tensor r = ref_emb.is_same(embeddings) ? x : ref_emb.detach().to(acc).contiguous();
  const auto dist = static_cast<Distance>(distance);
  at::Tensor a_terms, b_terms;
  if (dist == Distance::Cosine) {
    a_terms = x.norm(2, {1}).reciprocal_();
    b_terms = r.is_same(x) ? a_terms : r.norm(2, {1}).reciprocal_();
  } else {
    a_terms = (x * x).sum(1);
    b_terms = r.is_same(x) ? a_terms : (r * r).sum(1);
  }
  auto [ql, rl] = compact_int32(labels, ref_labels);
  at::Tensor qid, rid;
  if (query_ids.has_value()) std::tie(qid, rid) = compact_int32(*query_ids, *ref_ids);

  const auto pos = static_cast<PosStrategy>(pos_strategy);
  const double margin_v = margin.has_value() ? *margin : -1.0;
  if (acc == at::kDouble) {
    mine_select_impl<double>(x, r, a_terms, b_terms, ql, rl, qid, rid, pos, neg, dist, margin_v,
                             pos_idx, neg_idx);
  } else {
    mine_select_impl<float>(x, r, a_terms, b_terms, ql, rl, qid, rid, pos, neg, dist, margin_v,
                            pos_idx, neg_idx);
  }
  return {pos_idx, neg_idx};
}

TORCH_LIBRARY_IMPL(fastmine, CPU, m) { m.impl("mine_select", &mine_select_cpu); }

}  // namespace cpu
}  // namespace fastmine
