// The CPU kernels of the contrastive losses (issue #18; docs/contrastive.md):
// SupCon, NT-Xent and Multi-Similarity (+ the fused MS miner) on L2-normalised
// rows, in O((N + M) D) memory.
//
//   forward   for each block of anchors (in parallel, at::parallel_for; a block
//             is owned by one thread, so its per-anchor state needs no atomics):
//               for each pass the loss needs, for each block of references:
//                 S = Q_blk R_blk^T          (at::mm_out into a per-thread buffer)
//                 per anchor: the online log-sum-exp (max, sum) and counts
//             The op returns the per-anchor loss terms and counts; the
//             reduction (the AvgNonZero selection, the means, PML's
//             batch-level conditions) is fastmine/contrastive.py's `reduce`,
//             one definition for every backend.
//   backward  recompute the tiles; g_ij = gamma_i dterm_i/ds_ij from the
//             per-anchor statistics and the upstream gradient gamma [N] (the
//             table in docs/contrastive.md) and
//               pass 1 (anchor blocks own rows of dQ):      dQ_blk += G R_blk
//               pass 2 (reference blocks own rows of dR):   dR_blk += G^T Q_blk
//             pass 2 runs only when a reference gradient is needed; when the
//             references are the batch it adds into dQ after pass 1.  Both
//             passes form the tiles with the same at::mm_out shapes as the
//             forward, and every sum has a fixed order: gradients are
//             bit-identical across runs.
//
// The masks are pair_masks of fastmine/reference_contrastive.py: positive =
// same label and not the same sample, negative = different label and not the
// same sample; same sample = query_ids[i] == ref_ids[j], or i == j when the
// references are the batch and no ids are given.  The Python implementations
// (fastmine/contrastive.py, "chunked") are the executable specification of
// every formula here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "fastmine/schema.h"

namespace fastmine {
namespace cpu {
namespace {

using acc = double;  // per-anchor accumulators (sums of exponentials, counts)
constexpr acc kInf = std::numeric_limits<acc>::infinity();

// The online log-sum-exp of one anchor: LSE = mx + log(sum).  Empty: (-inf, 0);
// with PML's extra term e^0: (0, 1).
struct Lse {
  acc mx, sum;
  void add(acc x) {
    if (x > mx) {  // rescale the sum to the new maximum (e^{-inf} = 0 when empty)
      sum = sum * std::exp(mx - x) + 1.0;
      mx = x;
    } else {
      sum += std::exp(x - mx);
    }
  }
  acc value() const { return sum > 0 ? mx + std::log(sum) : -kInf; }
};

inline acc softplus(acc z) { return std::max(z, acc(0)) + std::log1p(std::exp(-std::abs(z))); }
inline acc sigmoid(acc z) { return 1.0 / (1.0 + std::exp(-z)); }

// The loss and its hyper-parameters (schema.h: FASTMINE_CONTRASTIVE_ARGS).
struct Loss {
  int64_t kind;  // ContrastiveLoss code
  acc p0, p1, p2;
  bool mined;
  acc eps;
};

// The inputs of one call, as raw pointers.
struct Rows {
  at::Tensor q, r;  // [N, D], [M, D] (r may be q)
  int64_t n, m, d;
  const int64_t *ql, *rl, *qid, *rid;  // ids: nullptr without explicit ids
  bool self;                           // the references are the batch
  int64_t block;
};

// Same sample: explicit ids, or the diagonal when the references are the batch.
inline bool same_sample(const Rows& R, int64_t i, int64_t j) {
  if (R.qid) return R.qid[i] == R.rid[j];
  return R.self && i == j;
}

// The tile S = Q[i0:i0+bm] R[j0:j0+bn]^T into buf (bm x bn, row-major).
template <typename T>
void tile(const Rows& R, at::Tensor& buf, int64_t i0, int64_t bm, int64_t j0, int64_t bn) {
  at::Tensor dot = buf.narrow(0, 0, bm * bn).view({bm, bn});
  at::mm_out(dot, R.q.narrow(0, i0, bm), R.r.narrow(0, j0, bn).t());
}

// Per-anchor statistics, rows of the float64 [6, N] stats tensor
// (docs/contrastive.md, "Streaming forward"):
//   0  SupCon: LSE over P u Q of s/tau;  NT-Xent: N_i (LSE over Q of s/tau);  MS: A_i
//   1  NT-Xent: G_i = dterm_i/dN_i;  MS: B_i;  SupCon: 0
//   2  P_i, the positive count;  3  Q_i, the negative count
//   4, 5  MS with the miner: min over P of s, max over Q of s (+inf, -inf when empty)
constexpr int64_t kStats = 6;

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Rows& R, const Loss& L) {
  const int64_t n = R.n, m = R.m, bs = R.block;
  std::vector<acc> st0(n), st1(n), st3(n, kInf), st4(n, -kInf);
  std::vector<acc> term(n, 0.0);       // per-anchor loss (NT-Xent: sum over its pairs)
  std::vector<int64_t> npos(n, 0), nneg(n, 0);
  const int64_t nblocks = (n + bs - 1) / bs;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor buf = at::empty({bs * std::min(bs, std::max<int64_t>(m, 1))}, R.q.options());
    std::vector<Lse> l1(bs), l2(bs);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * bs, bm = std::min(bs, n - i0);
      // One sweep over the reference blocks; f(i, j, s) per admissible pair
      // (not same-sample), with i, j global and s the tile's similarity.
      auto sweep = [&](auto&& f) {
        for (int64_t j0 = 0; j0 < m; j0 += bs) {
          const int64_t bn = std::min(bs, m - j0);
          tile<T>(R, buf, i0, bm, j0, bn);
          const T* s = buf.data_ptr<T>();
          for (int64_t a = 0; a < bm; ++a) {
            const int64_t i = i0 + a;
            for (int64_t c = 0; c < bn; ++c) {
              const int64_t j = j0 + c;
              if (same_sample(R, i, j)) continue;
              f(a, i, j, R.ql[i] == R.rl[j], acc(s[a * bn + c]));
            }
          }
        }
      };
      if (L.kind == kContrastiveSupCon) {
        const acc t = L.p0;
        std::fill(l1.begin(), l1.end(), Lse{-kInf, 0.0});
        sweep([&](int64_t a, int64_t i, int64_t, bool pos, acc s) {
          const acc x = s / t;
          l1[a].add(x);
          if (pos) {
            term[i] += x;  // sum over positives of s/tau, finished below
            ++npos[i];
          } else {
            ++nneg[i];
          }
        });
        for (int64_t a = 0; a < bm; ++a) {
          const int64_t i = i0 + a;
          st0[i] = l1[a].value();
          term[i] = npos[i] > 0 ? st0[i] - term[i] / acc(npos[i]) : 0.0;
          if (!std::isfinite(st0[i])) st0[i] = 0.0;  // no candidate: never read
        }
      } else if (L.kind == kContrastiveNTXent) {
        const acc t = L.p0;
        std::fill(l1.begin(), l1.end(), Lse{-kInf, 0.0});
        sweep([&](int64_t a, int64_t i, int64_t, bool pos, acc s) {  // pass 1: negatives
          if (pos) {
            ++npos[i];
          } else {
            ++nneg[i];
            l1[a].add(s / t);
          }
        });
        for (int64_t a = 0; a < bm; ++a) st0[i0 + a] = l1[a].value();
        sweep([&](int64_t, int64_t i, int64_t, bool pos, acc s) {  // pass 2: positive pairs
          if (!pos) return;
          const acc z = st0[i] - s / t;  // -inf without negatives: 0 and 0
          term[i] += softplus(z);
          st1[i] += sigmoid(z);
        });
      } else {  // Multi-Similarity
        const acc alpha = L.p0, beta = L.p1, base = L.p2;
        if (L.mined) {  // pass 0: min over P and max over Q of s
          sweep([&](int64_t, int64_t i, int64_t, bool pos, acc s) {
            if (pos) {
              st3[i] = std::min(st3[i], s);
            } else {
              st4[i] = std::max(st4[i], s);
            }
          });
        }
        std::fill(l1.begin(), l1.end(), Lse{0.0, 1.0});
        std::fill(l2.begin(), l2.end(), Lse{0.0, 1.0});
        sweep([&](int64_t a, int64_t i, int64_t, bool pos, acc s) {
          if (pos) {
            if (!L.mined || s - L.eps < st4[i]) l1[a].add(alpha * (base - s));
          } else {
            if (!L.mined || s + L.eps > st3[i]) l2[a].add(beta * (s - base));
          }
        });
        for (int64_t a = 0; a < bm; ++a) {
          const int64_t i = i0 + a;
          st0[i] = l1[a].value();
          st1[i] = l2[a].value();
          term[i] = st0[i] / alpha + st1[i] / beta;
        }
      }
    }
  });

  at::Tensor stats = at::empty({kStats, n}, R.q.options().dtype(at::kDouble));
  at::Tensor terms = at::empty({n}, R.q.options());
  double* sp = stats.data_ptr<double>();
  T* tp = terms.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    sp[i] = st0[i];
    sp[n + i] = st1[i];
    sp[2 * n + i] = acc(npos[i]);
    sp[3 * n + i] = acc(nneg[i]);
    sp[4 * n + i] = st3[i];
    sp[5 * n + i] = st4[i];
    tp[i] = T(term[i]);
  }
  return {terms, stats};
}

// g = gamma_i dterm_i/ds on the tile (bm x bn at s) of anchors i0.. and references j0..
template <typename T>
void tile_grad(const Rows& R, const Loss& L, const double* sp, const T* gamma, const T* s, T* g,
               int64_t i0, int64_t bm, int64_t j0, int64_t bn) {
  const int64_t n = R.n;
  const double *st0 = sp, *st1 = sp + n, *npos = sp + 2 * n, *st4 = sp + 4 * n,
               *st5 = sp + 5 * n;
  for (int64_t a = 0; a < bm; ++a) {
    const int64_t i = i0 + a;
    const acc w = acc(gamma[i]);
    for (int64_t c = 0; c < bn; ++c) {
      const int64_t j = j0 + c;
      acc v = 0.0;
      if (w != 0.0 && !same_sample(R, i, j)) {
        const bool pos = R.ql[i] == R.rl[j];
        const acc x = acc(s[a * bn + c]);
        if (L.kind == kContrastiveSupCon) {
          const acc t = L.p0;  // term_i = 0 without positives: no gradient
          if (npos[i] > 0) v = w / t * (std::exp(x / t - st0[i]) - (pos ? 1.0 / npos[i] : 0.0));
        } else if (L.kind == kContrastiveNTXent) {
          const acc t = L.p0;
          v = pos ? -w / t * sigmoid(st0[i] - x / t) : w / t * st1[i] * std::exp(x / t - st0[i]);
        } else {
          const acc alpha = L.p0, beta = L.p1, base = L.p2;
          if (pos) {
            if (!L.mined || x - L.eps < st5[i]) v = -w * std::exp(alpha * (base - x) - st0[i]);
          } else {
            if (!L.mined || x + L.eps > st4[i]) v = w * std::exp(beta * (x - base) - st1[i]);
          }
        }
      }
      g[a * bn + c] = T(v);
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(const Rows& R, const Loss& L,
                                                 const at::Tensor& grad, const at::Tensor& stats,
                                                 bool ref_grad) {
  const int64_t n = R.n, m = R.m, bs = R.block;
  const double* sp = stats.data_ptr<double>();
  const T* gamma = grad.data_ptr<T>();
  at::Tensor dq = at::zeros_like(R.q);
  at::Tensor dr;
  const bool want_r = R.self || ref_grad;
  if (want_r) dr = at::zeros_like(R.r);
  const int64_t cap = bs * std::min(bs, std::max<int64_t>(std::max(n, m), 1));
  // pass 1: anchor blocks own rows of dQ
  at::parallel_for(0, (n + bs - 1) / bs, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor buf = at::empty({cap}, R.q.options()), gbuf = at::empty({cap}, R.q.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * bs, bm = std::min(bs, n - i0);
      at::Tensor dqb = dq.narrow(0, i0, bm);
      for (int64_t j0 = 0; j0 < m; j0 += bs) {
        const int64_t bn = std::min(bs, m - j0);
        tile<T>(R, buf, i0, bm, j0, bn);
        tile_grad<T>(R, L, sp, gamma, buf.data_ptr<T>(), gbuf.data_ptr<T>(), i0, bm, j0, bn);
        dqb.addmm_(gbuf.narrow(0, 0, bm * bn).view({bm, bn}), R.r.narrow(0, j0, bn));
      }
    }
  });
  if (want_r) {
    // pass 2: reference blocks own rows of dR; the tiles are formed exactly as
    // in the forward (the same Q_blk R_blk^T products).
    at::parallel_for(0, (m + bs - 1) / bs, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad;
      at::Tensor buf = at::empty({cap}, R.q.options()), gbuf = at::empty({cap}, R.q.options());
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t j0 = blk * bs, bn = std::min(bs, m - j0);
        at::Tensor drb = dr.narrow(0, j0, bn);
        for (int64_t i0 = 0; i0 < n; i0 += bs) {
          const int64_t bm = std::min(bs, n - i0);
          tile<T>(R, buf, i0, bm, j0, bn);
          tile_grad<T>(R, L, sp, gamma, buf.data_ptr<T>(), gbuf.data_ptr<T>(), i0, bm, j0, bn);
          drb.addmm_(gbuf.narrow(0, 0, bm * bn).view({bm, bn}).t(), R.q.narrow(0, i0, bm));
        }
      }
    });
  }
  if (R.self) return {dq.add_(dr), at::empty({0, R.d}, R.q.options())};
  if (!ref_grad) return {dq, at::empty({0, R.d}, R.q.options())};
  return {dq, dr};
}

at::Tensor index_vector(const at::Tensor& v) { return v.to(at::kLong).contiguous(); }

// Checks and raw pointers (the Python entry point has checked the arguments
// and the data, naming them; these guard the raw op).
Rows rows(const at::Tensor& q, const c10::optional<at::Tensor>& r, const at::Tensor& labels,
          const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
          const c10::optional<at::Tensor>& ref_ids, int64_t block, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(q.dim() == 2 && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "fastmine::contrastive: q must be a 2-D float32/float64 tensor (normalised rows)");
  TORCH_CHECK_VALUE(block >= 1, "fastmine::contrastive: block must be >= 1, got ", block);
  Rows R;
  R.self = !r.has_value();
  R.q = q.contiguous();
  R.r = R.self ? R.q : r->contiguous();
  TORCH_CHECK(R.r.dim() == 2 && R.r.size(1) == R.q.size(1) &&
                  R.r.scalar_type() == R.q.scalar_type(),
              "fastmine::contrastive: r must be [M, D] with q's D and dtype");
  R.n = R.q.size(0);
  R.m = R.r.size(0);
  R.d = R.q.size(1);
  R.block = block;
  TORCH_CHECK_VALUE(labels.numel() == R.n && ref_labels.numel() == R.m,
                    "fastmine::contrastive: labels / ref_labels lengths must be N / M");
  TORCH_CHECK_VALUE(query_ids.has_value() == ref_ids.has_value(),
                    "fastmine::contrastive: query_ids and ref_ids go together");
  keep.push_back(index_vector(labels));
  keep.push_back(index_vector(ref_labels));
  R.ql = keep[0].data_ptr<int64_t>();
  R.rl = keep[1].data_ptr<int64_t>();
  R.qid = R.rid = nullptr;
  if (query_ids.has_value()) {
    TORCH_CHECK_VALUE(query_ids->numel() == R.n && ref_ids->numel() == R.m,
                      "fastmine::contrastive: query_ids / ref_ids lengths must be N / M");
    keep.push_back(index_vector(*query_ids));
    keep.push_back(index_vector(*ref_ids));
    R.qid = keep[2].data_ptr<int64_t>();
    R.rid = keep[3].data_ptr<int64_t>();
  }
  return R;
}

Loss loss_args(int64_t kind, double p0, double p1, double p2, c10::optional<double> epsilon) {
  TORCH_CHECK_VALUE(kind == kContrastiveSupCon || kind == kContrastiveNTXent ||
                        kind == kContrastiveMultiSimilarity,
                    "fastmine::contrastive: unknown loss code ", kind);
  return Loss{kind, p0, p1, p2, epsilon.has_value(), epsilon.value_or(0.0)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> contrastive_cpu(
    const at::Tensor& q, const c10::optional<at::Tensor>& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const c10::optional<at::Tensor>& query_ids,
    const c10::optional<at::Tensor>& ref_ids, int64_t loss, double p0, double p1, double p2,
    c10::optional<double> epsilon, int64_t block) {
  std::vector<at::Tensor> keep;
  const Rows R = rows(q, r, labels, ref_labels, query_ids, ref_ids, block, keep);
  const Loss L = loss_args(loss, p0, p1, p2, epsilon);
  if (R.q.scalar_type() == at::kDouble) return forward_impl<double>(R, L);
  return forward_impl<float>(R, L);
}

std::tuple<at::Tensor, at::Tensor> contrastive_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const c10::optional<at::Tensor>& r,
    const at::Tensor& labels, const at::Tensor& ref_labels,
    const c10::optional<at::Tensor>& query_ids, const c10::optional<at::Tensor>& ref_ids,
    int64_t loss, double p0, double p1, double p2, c10::optional<double> epsilon, int64_t block,
    const at::Tensor& stats, bool ref_grad) {
  std::vector<at::Tensor> keep;
  const Rows R = rows(q, r, labels, ref_labels, query_ids, ref_ids, block, keep);
  const Loss L = loss_args(loss, p0, p1, p2, epsilon);
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.dim() == 2 &&
                  stats.size(0) == kStats && stats.size(1) == R.n,
              "fastmine::contrastive_backward: stats must be the forward's float64 [6, N]");
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == R.n,
              "fastmine::contrastive_backward: grad must be [N] (one per anchor term)");
  const at::Tensor st = stats.contiguous();
  const at::Tensor g = grad.to(R.q.scalar_type()).contiguous();
  if (R.q.scalar_type() == at::kDouble) return backward_impl<double>(R, L, g, st, ref_grad);
  return backward_impl<float>(R, L, g, st, ref_grad);
}

}  // namespace cpu
}  // namespace fastmine
