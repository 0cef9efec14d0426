// The blocked-Gram machinery of the CPU kernels, shared by
// csrc/cpu/mine_cpu.cpp (fastmine::mine, mine_select, mine_backward) and
// csrc/cpu/mine_topk_cpu.cpp (fastmine::mine_topk_cpu):
//   * tiles: BM anchors per task, BN references per chunk, the BM x BN dot
//     buffer (BLAS at::mm_out, or small_gram for small tiles), low-precision
//     rows upcast block by block (TileLayout, TileWorkspace);
//   * the per-pair keys of a tile row (RowKeys, pos_key, neg_key);
//   * the row terms with the contract's data checks (row_terms) and the
//     argument preparation (prepare_select);
//   * the exact pair distances and their gradients (pair_value, pair_grad,
//     pair_distances).
// Everything has internal linkage (an unnamed namespace): each kernel file
// gets its own copies and its own target_clones dispatchers, exactly as when
// this code lived in mine_cpu.cpp.  Include only from csrc/cpu/*.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "fastmine/op_checks.h"
#include "fastmine/strategies.h"
#include "cpu_clones.h"  // FASTMINE_CPU_CLONES
#include "overrides.h"   // kernel_overrides (tiles)


namespace fastmine {
namespace cpu {
namespace {


// Tile sizes, chosen by measurement (benchmarks/results/amd-epyc-2026-12-03-block-sweep-v2:
// BM x buffer in {128 x 256 KiB, 256 x 512 KiB, 512 x 1 MiB, 256 x 1 MiB},
// N = 8192, D = 32 / 128 / 512, easy/hard and semi-hard, 1 and 2 threads, the
// AVX-512 and the AVX2 clone of a 2-core AMD EPYC, interleaved with the floor):
// 512 rows with 1 MiB (BN = 512 references per chunk in fp32) was the fastest
// or within 0.03x the floor of it in 19 of the 24 cells, and faster than the
// former 128 x 256 KiB in 23 (tied in one; up to 0.19x the floor faster at
// D >= 128: fewer, larger GEMM calls, each reference chunk reused by 4x more
// anchors).  An earlier sweep,
// before the AVX2 clone was vectorised, had preferred 128 x 256 KiB
// (benchmarks/results/amd-epyc-2026-12-03-cpu-kernel/block_sweep.md).
constexpr int64_t kBlockRows = 512;        // anchors per task (BM), at most
constexpr int64_t kBufferBytes = 1 << 20;  // BM x BN dot buffer per thread (BN = 512 in fp32)
constexpr int64_t kSub = 64;            // width of one min-reduction sub-chunk

// Pass (the sweeps), Ids (same-sample rule), the mining value, the admissible
// row norms and the semi-hard window are the shared definitions of
// fastmine/strategies.h (the CUDA kernels use the same ones).

template <typename acc_t>
struct Best {
  acc_t key;
  int64_t idx;
};

// Everything one anchor row needs to turn dot products into keys.
template <typename acc_t>
struct RowKeys {
  const acc_t* dot;     // [cn]
  const acc_t* b;       // [cn] reference terms
  const int64_t* rl;    // [cn] reference labels
  const int64_t* rid;   // [cn] reference ids (Ids::Explicit)
  int64_t j0;           // global index of dot[0]
  acc_t ai;
  int64_t li, qi;       // anchor label; anchor id (Explicit) or global row (Self)
  acc_t ps, ns;         // +1 nearest / -1 farthest
  acc_t lo, hi;         // semi-hard window on v (NegWindow only)
};

// strategies.h same_sample, with the rule fixed at compile time (so that the
// vectorised loop carries no branch on it).  For Self, qi is the anchor's row.
template <typename acc_t, Ids IDS>
inline bool same_sample(const RowKeys<acc_t>& k, int64_t j) {
  if constexpr (IDS == Ids::None) return false;
  return fastmine::same_sample(IDS, k.qi, k.j0 + j, k.qi, IDS == Ids::Explicit ? k.rid[j] : 0);
}

template <typename acc_t, bool COS, Ids IDS>
inline acc_t pos_key(const RowKeys<acc_t>& k, int64_t j) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t v = mining_value<acc_t>(k.dot[j], k.ai, k.b[j], COS);
  const bool ok = (k.rl[j] == k.li) & !same_sample<acc_t, IDS>(k, j);
  return ok ? k.ps * v : inf;
}

template <typename acc_t, bool COS, Ids IDS, bool WINDOW>
inline acc_t neg_key(const RowKeys<acc_t>& k, int64_t j) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t v = mining_value<acc_t>(k.dot[j], k.ai, k.b[j], COS);
  bool ok = (k.rl[j] != k.li) & !same_sample<acc_t, IDS>(k, j);
  // in_semihard_window(v, lo, hi) of strategies.h, spelled with '&' instead of
  // '&&': the same value, but GCC then keeps the omp simd loop branch-free (with
  // '&&' it ran the scalar fallback and the NegWindow pass cost ~3x the Fused one).
  if (WINDOW) ok = ok & (v > k.lo) & (v < k.hi);
  return ok ? k.ns * v : inf;
}

// First index in [s, e) whose key equals `key` (it exists: `key` came from there).

template <typename acc_t, typename scalar_t>
inline acc_t squared_norm(const scalar_t* row, int64_t d) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < d; ++k) {
    const acc_t v = static_cast<acc_t>(row[k]);
    s += v * v;
  }
  return s;
}

// Per-row terms of the mining value (strategies.h mining_value), computed from
// the rows in their own dtype, with the contract's data checks:
//   a NaN/Inf element, or |x|^2 above sqnorm_max, or (cosine) below
//   cosine_sqnorm_min is a ValueError naming `name` and the row.
// Returns |x|^2 (Euclidean) or 1/|x| (cosine), [rows] in acc_t.
template <typename acc_t>
at::Tensor row_terms(const at::Tensor& rows, bool cosine, const char* name) {
  const int64_t n = rows.size(0), d = rows.size(1);
  at::Tensor out = at::empty({n}, rows.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* o = out.data_ptr<acc_t>();
  std::atomic<int64_t> first_bad{n};  // first row failing a check (n: none)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "row_terms", [&] {
    const scalar_t* p = rows.data_ptr<scalar_t>();
    const int64_t stride = rows.stride(0);
    at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t s = squared_norm<acc_t>(p + i * stride, d);
        if (!row_admissible(s, cosine)) {  // NaN fails every comparison
          int64_t cur = first_bad.load();
          while (i < cur && !first_bad.compare_exchange_weak(cur, i)) {}
        }
        o[i] = row_term(s, cosine);
      }
    });
    const int64_t i = first_bad.load();
    if (i == n) return;
    raise_row_error<acc_t>(p + i * stride, d, i, cosine, name);
  });
  return out;
}

struct SelectArgs {
  at::Tensor x, r;            // [N, D], [M, D] contiguous, any float dtype (r may be x)
  at::Tensor a, b;            // row terms [N], [M] in acc_t
  at::Tensor ql, rl;          // int64 [N], [M]
  at::Tensor qid, rid;        // int64 [N], [M] (Ids::Explicit)
  Ids ids;
  PosStrategy pos;
  NegStrategy neg;
  Distance dist;
  double margin;              // < 0: none
};

// Tiles smaller than this many multiply-adds are formed by small_gram below
// instead of BLAS: for them a BLAS call costs more than the arithmetic (at 16
// x 16 x 64, at::mm_out took 8.8 us with 2 threads, most of it waking the BLAS
// thread pool, against ~2 us for the whole tile here).  Any rounding of the
// dot products is allowed by the contract (ranking precision); on integer-
// valued rows both are exact.
constexpr int64_t kSmallGramFmas = 1 << 15;

// x . r with sixteen partial sums, so the loop vectorises (and hides the add
// latency) without reassociation flags.  One fixed order per pair: the same
// bits wherever a pair is computed (small_gram tiles, the one-pass direct d_ap).
template <typename acc_t, typename xs_t, typename rs_t>
inline acc_t lane_dot(const xs_t* x, const rs_t* r, int64_t d) {
  constexpr int kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      part[l] += static_cast<acc_t>(x[k + l]) * static_cast<acc_t>(r[k + l]);
    }
  }
  for (; k < d; ++k) part[0] += static_cast<acc_t>(x[k]) * static_cast<acc_t>(r[k]);
  acc_t s = 0;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// dot[i, j] = x[i, :] . r[j, :] for a bm x cn tile, row-major, acc_t operands.
template <typename acc_t>
FASTMINE_CPU_CLONES void small_gram(const acc_t* x, const acc_t* r, int64_t bm, int64_t cn,
                                    int64_t d, acc_t* dot) {
  for (int64_t i = 0; i < bm; ++i) {
    for (int64_t j = 0; j < cn; ++j) dot[i * cn + j] = lane_dot<acc_t>(x + i * d, r + j * d, d);
  }
}


// Tile sizes: BM anchors per task, BN references per chunk, with the BM x BN
// dot buffer sized for L2 (see kBlockRows/kBufferBytes).  The block override
// (overrides.h: FASTMINE_CPU_BLOCK / fastmine::_set_cpu_overrides, "BM,BUFFER_KIB";
// the block-size sweep of the benchmark notes) replaces them.  Both paths of
// the semi-hard rule use the same tiles.
struct Tiles {
  int64_t bm, buffer_bytes;
  bool forced;  // set by the block override: used exactly as given
};
Tiles tiles_for_call() {
  const KernelOverrides o = kernel_overrides();
  if (o.block_rows > 0) return {o.block_rows, o.buffer_kib * 1024, true};
  return {kBlockRows, kBufferBytes, false};
}

// The tiles of one call: BM = block_rows anchors per task, BN = chunk
// references per dot tile, nblocks anchor blocks (parallel_for over them).
struct TileLayout {
  int64_t block_rows, chunk, nblocks;
};

template <typename acc_t>
TileLayout tile_layout(int64_t n, int64_t m) {
  const Tiles T = tiles_for_call();
  int64_t block_rows = std::min(T.bm, n);
  int64_t buffer_bytes = T.buffer_bytes;
  if (!T.forced) {
    // Balanced rounds: the number of blocks is a multiple of the thread count
    // (every round of at::parallel_for's static split keeps every thread busy),
    // at least one block per thread (a single 128-row block left the second
    // core idle at N = 128: 137 us against 57 us with two 64-row blocks), and
    // blocks of at most kBlockRows rows; never below 32 rows, where starting a
    // task costs more than it computes.  E.g. N = 10000 on 16 threads: 32
    // blocks of 313 rows, not 20 of 512 (two rounds, the second 4/16 busy).
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t blocks = std::max<int64_t>((n + T.bm - 1) / T.bm, threads);
    blocks = (blocks + threads - 1) / threads * threads;
    block_rows = std::min(block_rows, std::max<int64_t>(32, (n + blocks - 1) / blocks));
    // Keep BN (the buffer's columns) as at kBlockRows rows: smaller blocks take
    // a proportionally smaller buffer.
    buffer_bytes = T.buffer_bytes / T.bm * std::max<int64_t>(block_rows, 1);
  }
  const int64_t bn_cap = std::max<int64_t>(kSub, buffer_bytes / int64_t(sizeof(acc_t)) / block_rows);
  const int64_t chunk = std::min(m, bn_cap);
  return {block_rows, chunk, (n + block_rows - 1) / block_rows};
}

// One thread's buffers: the BM x BN dot tile and, for float16/bfloat16 rows,
// the upcast anchor block and reference chunk (never a copy of the bank).
template <typename acc_t>
struct TileWorkspace {
  at::Tensor buf, xbuf, rbuf;
  bool upcast;
  int64_t chunk;

  TileWorkspace(const at::Tensor& x, const TileLayout& L)
      : upcast(x.scalar_type() != c10::CppTypeToScalarType<acc_t>::value), chunk(L.chunk) {
    const auto acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    buf = at::empty({L.block_rows * L.chunk}, acc);
    if (upcast) {
      xbuf = at::empty({L.block_rows, x.size(1)}, acc);
      rbuf = at::empty({L.chunk, x.size(1)}, acc);
    }
  }

  // Rows [i0, i0 + bm) of x in acc_t (x itself when no upcast is needed).
  at::Tensor anchors(const at::Tensor& x, int64_t i0, int64_t bm) {
    at::Tensor xb = x.narrow(0, i0, bm);
    return upcast ? xbuf.narrow(0, 0, bm).copy_(xb) : xb;
  }

  // One sweep over the reference chunks of r for the anchor block xb:
  // scan(dot, j0, cn) with dot the row-major [bm, cn] tile of xb . r[j0 : j0 + cn]^T.
  // reuse_buffer: the tile already holds the dots (a second sweep when all
  // references fit in one chunk).  Every sweep forms the same tiles.
  template <typename F>
  void sweep(const at::Tensor& xb, const at::Tensor& r, bool reuse_buffer, F&& scan) {
    const int64_t bm = xb.size(0), m = r.size(0), d = r.size(1);
    for (int64_t j0 = 0; j0 < m; j0 += chunk) {
      const int64_t cn = std::min(chunk, m - j0);
      at::Tensor dot = buf.narrow(0, 0, bm * cn).view({bm, cn});
      if (!reuse_buffer) {
        at::Tensor rc = r.narrow(0, j0, cn);
        if (upcast) rc = rbuf.narrow(0, 0, cn).copy_(rc);
        if (bm * cn * d <= kSmallGramFmas) {
          small_gram<acc_t>(xb.data_ptr<acc_t>(), rc.contiguous().data_ptr<acc_t>(), bm, cn, d,
                            dot.data_ptr<acc_t>());
        } else {
          at::mm_out(dot, xb, rc.t());
        }
      }
      scan(static_cast<const acc_t*>(dot.data_ptr<acc_t>()), j0, cn);
    }
  }
};


// ---------------------------------------------------------------- pair distances
// d(x[i], r[idx[i]]) by direct difference, in acc_t, from the rows in their own
// dtype (gather, then upcast: only the selected rows are read).  The formulas
// and their gradients are those of fastmine/_pairs.py:
//   squared_euclidean  d = |u|^2, u = a - b          dd/da = 2u             dd/db = -dd/da
//   euclidean          d = |u|                       dd/da = u/|u| (0 at u = 0)
//   cosine             d = |a^ - b^|^2 / 2, a^ = a/|a|, w = a^ - b^
//                      dd/da = (w - (a^.w) a^)/|a|   dd/db = (-w + (b^.w) b^)/|b|
template <typename acc_t, typename scalar_t>
inline acc_t squared_difference(const scalar_t* a, const scalar_t* b, int64_t d) {
  acc_t s = 0;
  for (int64_t k = 0; k < d; ++k) {
    const acc_t u = static_cast<acc_t>(a[k]) - static_cast<acc_t>(b[k]);
    s += u * u;
  }
  return s;
}

template <typename acc_t, typename scalar_t>
acc_t pair_value(const scalar_t* a, const scalar_t* b, int64_t d, Distance dist) {
  if (dist == Distance::Cosine) {
    const acc_t na = std::sqrt(squared_norm<acc_t>(a, d)), nb = std::sqrt(squared_norm<acc_t>(b, d));
    acc_t s = 0;
    for (int64_t k = 0; k < d; ++k) {
      const acc_t w = static_cast<acc_t>(a[k]) / na - static_cast<acc_t>(b[k]) / nb;
      s += w * w;
    }
    return acc_t(0.5) * s;
  }
  const acc_t s = squared_difference<acc_t>(a, b, d);
  return dist == Distance::Euclidean ? std::sqrt(s) : s;
}

// ga, gb [d]: dd/da and dd/db of one pair, scaled by g.
template <typename acc_t, typename scalar_t>
void pair_grad(const scalar_t* a, const scalar_t* b, int64_t d, Distance dist, acc_t g, acc_t* ga,
               acc_t* gb) {
  if (dist == Distance::Cosine) {
    const acc_t na = std::sqrt(squared_norm<acc_t>(a, d)), nb = std::sqrt(squared_norm<acc_t>(b, d));
    acc_t aw = 0, bw = 0;
    for (int64_t k = 0; k < d; ++k) {
      const acc_t ah = static_cast<acc_t>(a[k]) / na, bh = static_cast<acc_t>(b[k]) / nb;
      const acc_t w = ah - bh;
      aw += ah * w;
      bw += bh * w;
    }
    for (int64_t k = 0; k < d; ++k) {
      const acc_t ah = static_cast<acc_t>(a[k]) / na, bh = static_cast<acc_t>(b[k]) / nb;
      const acc_t w = ah - bh;
      ga[k] = g * ((w - aw * ah) / na);
      gb[k] = g * ((-w + bw * bh) / nb);
    }
    return;
  }
  acc_t scale = 2;
  if (dist == Distance::Euclidean) {
    const acc_t s = squared_difference<acc_t>(a, b, d);
    scale = s > 0 ? acc_t(1) / std::sqrt(s) : acc_t(0);  // subgradient 0 at u = 0
  }
  for (int64_t k = 0; k < d; ++k) {
    const acc_t u = static_cast<acc_t>(a[k]) - static_cast<acc_t>(b[k]);
    ga[k] = g * (scale * u);
    gb[k] = -ga[k];
  }
}

// out[i, t] = d(x[i], r[idx[i, t]]) (0 where idx[i, t] = -1) for idx and out
// [N] (K = 1) or [N, K] contiguous; out in x's dtype, computed in acc_t.
template <typename acc_t, typename scalar_t>
void pair_distances(const at::Tensor& x, const at::Tensor& r, const at::Tensor& idx,
                    Distance dist, at::Tensor& out) {
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t kk = idx.dim() == 2 ? idx.size(1) : 1;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = r.data_ptr<scalar_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, n * kk, 64, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      op[e] = ip[e] < 0 ? scalar_t(0)
                        : static_cast<scalar_t>(
                              pair_value<acc_t>(xp + (e / kk) * d, rp + ip[e] * d, d, dist));
    }
  });
}

at::Tensor as_int64(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

// The arguments of a selection, checked (check_mine_args), as plain data:
// S.x, S.r contiguous (S.r is S.x when the references are the batch), the row
// terms S.a, S.b (running the data checks, which hold even when N or M is 0),
// labels and ids as int64, S.ids.  Returns false when there is nothing to
// select (N = 0 or M = 0); S.pos, S.neg, S.dist, S.margin are the caller's.
inline bool prepare_select(SelectArgs& S, const at::Tensor& embeddings, const at::Tensor& labels,
                           const at::Tensor& ref_emb, const at::Tensor& ref_labels,
                           const c10::optional<at::Tensor>& query_ids,
                           const c10::optional<at::Tensor>& ref_ids, bool self_refs,
                           Distance dist) {
  const bool cosine = dist == Distance::Cosine;
  S.dist = dist;
  S.x = embeddings.detach().contiguous();
  S.r = self_refs ? S.x : ref_emb.detach().contiguous();
  const int64_t n = S.x.size(0), m = S.r.size(0);
  if (n == 0) return false;
  const bool f64 = embeddings.scalar_type() == at::kDouble;
  // Row terms first: they carry the data checks, which hold even when m == 0.
  S.a = f64 ? row_terms<double>(S.x, cosine, "embeddings")
            : row_terms<float>(S.x, cosine, "embeddings");
  if (self_refs) {
    S.b = S.a;
  } else {
    S.b = f64 ? row_terms<double>(S.r, cosine, "ref_emb") : row_terms<float>(S.r, cosine, "ref_emb");
  }
  if (m == 0) return false;
  S.ql = as_int64(labels);
  S.rl = self_refs ? S.ql : as_int64(ref_labels);
  if (query_ids.has_value()) {
    S.ids = Ids::Explicit;
    S.qid = as_int64(*query_ids);
    S.rid = self_refs ? S.qid : as_int64(*ref_ids);
  } else {
    S.ids = self_refs ? Ids::Self : Ids::None;
  }
  return true;
}

}  // namespace
}  // namespace cpu
}  // namespace fastmine
