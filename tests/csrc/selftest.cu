// Self-test of the torch-free CUDA kernels (needs a GPU to run; builds anywhere
// nvcc does).  For every variant of FASTMINE_CUDA_VARIANTS (variants.cuh, the
// same list the extension instantiates) x distance x pos x neg (x margin, x
// reference mode, x split count) it mines a small random problem on the GPU and
// compares with a plain host reference; then it checks the backward scatter
// (atomic, and the deterministic sorted segment sum) against a host evaluation
// of the pair gradients, and that the row-terms kernel flags inadmissible rows.
//
// The inputs are small integers, so every dot product is exact in fp16, bf16,
// tf32, fp32 and fp64, and the mining values are computed with the same
// non-contracted arithmetic on both sides (mining_value): selected indices must
// then agree exactly, ties -> smallest index included.
//
//   ./fastmine_cuda_selftest         prints "N passed, M failed"; exit 1 on failure
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "variants.cuh"

using namespace fastmine;
using namespace fastmine::cuda;

#define CK(...)                                                                        \
  do {                                                                                 \
    cudaError_t e_ = (__VA_ARGS__);                                                         \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, \
                   __LINE__);                                                          \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

namespace {

int g_pass = 0, g_fail = 0;

// FASTMINE_SELFTEST_MAX_FAILS=k: stop after k failures (exit 1).
void report(bool ok, const std::string& what) {
  if (ok) ++g_pass;
  else { ++g_fail; std::printf("FAIL %s\n", what.c_str()); }
  static const char* max_fails = std::getenv("FASTMINE_SELFTEST_MAX_FAILS");
  if (!ok && max_fails && g_fail >= std::atoi(max_fails)) {
    std::printf("%d passed, %d failed (stopped)\n", g_pass, g_fail);
    std::exit(1);
  }
}

template <typename T> T from_float(float v) { return static_cast<T>(v); }
template <> __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct Problem {
  int64_t n, m, d;
  std::vector<float> x, r;          // integer-valued
  std::vector<int64_t> ql, rl, qid, rid;
  bool self;                        // refs are the batch: Ids::Self (i == j excluded)
  bool with_ids;                    // explicit ids (Ids::Explicit), else no exclusion
};

Problem make_problem(std::mt19937& g, int64_t n, int64_t m, int64_t d, bool self, int classes) {
  // Explicit ids only with a separate reference set; a few values, so that
  // some pairs are same-sample.
  Problem p{n, self ? n : m, d, {}, {}, {}, {}, {}, {}, self, !self};
  std::uniform_int_distribution<int> val(-2, 2), lab(0, classes - 1), id(0, 9);
  auto fill = [&](std::vector<float>& v, int64_t rows) {
    v.resize(rows * d);
    for (auto& e : v) e = float(val(g));
    for (int64_t i = 0; i < rows; ++i) v[i * d] = v[i * d] == 0 ? 1.f : v[i * d];  // no zero rows
  };
  fill(p.x, n);
  p.ql.resize(n);
  for (auto& l : p.ql) l = (int64_t(lab(g)) << 33) + 1;  // beyond int32
  if (self) { p.r = p.x; p.rl = p.ql; }
  else {
    fill(p.r, p.m);
    p.rl.resize(p.m);
    for (auto& l : p.rl) l = (int64_t(lab(g)) << 33) + 1;
  }
  if (p.with_ids) {
    p.qid.resize(n); p.rid.resize(p.m);
    // large values: the kernels compare int64 ids (no int32 compaction)
    for (int64_t i = 0; i < n; ++i) p.qid[i] = (int64_t(id(g)) << 40) - 3;
    for (int64_t j = 0; j < p.m; ++j) p.rid[j] = (int64_t(id(g)) << 40) - 3;
  }
  return p;
}

// Host reference of the selection, in acc_t, same mining values as the device.
template <typename acc_t, Distance DIST>
void host_select(const Problem& p, PosStrategy pos, NegStrategy neg, Distance dist, double margin,
                 std::vector<int64_t>& pi, std::vector<int64_t>& ni) {
  const acc_t inf = acc_inf<acc_t>();
  auto term = [&](const std::vector<float>& v, int64_t row) {
    acc_t s = 0;
    for (int64_t k = 0; k < p.d; ++k) s += acc_t(v[row * p.d + k]) * acc_t(v[row * p.d + k]);
    return DIST == Distance::Cosine ? acc_t(1) / std::sqrt(s) : s;
  };
  const acc_t ps = pos_is_nearest(pos) ? 1 : -1, ns = neg_is_nearest(neg) ? 1 : -1;
  pi.assign(p.n, -1); ni.assign(p.n, -1);
  for (int64_t i = 0; i < p.n; ++i) {
    std::vector<acc_t> v(p.m);
    const acc_t ai = term(p.x, i);
    for (int64_t j = 0; j < p.m; ++j) {
      acc_t dot = 0;
      for (int64_t k = 0; k < p.d; ++k) dot += acc_t(p.x[i * p.d + k]) * acc_t(p.r[j * p.d + k]);
      // Written out here rather than calling the kernels' mining_value, so that a
      // bug there is not copied into the reference (same operation order; the
      // build disables FMA contraction).
      const acc_t bj = term(p.r, j);
      const acc_t raw = DIST == Distance::Cosine ? acc_t(1) - dot * ai * bj : (ai + bj) - acc_t(2) * dot;
      v[j] = raw > acc_t(0) ? raw : acc_t(0);
    }
    auto excluded = [&](int64_t j) {
      return p.self ? i == j : (p.with_ids && p.qid[i] == p.rid[j]);
    };
    acc_t bk = inf;
    for (int64_t j = 0; j < p.m; ++j) {
      if (p.rl[j] != p.ql[i] || excluded(j)) continue;
      if (ps * v[j] < bk) { bk = ps * v[j]; pi[i] = j; }
    }
    acc_t lo = -inf, hi = inf;
    if (neg == NegStrategy::SemiHard) {
      if (pi[i] < 0) continue;
      lo = v[pi[i]];
      if (margin < 0) hi = inf;  // independent of strategies.h's semihard_upper
      else if (dist == Distance::Euclidean) {
        const double root = std::sqrt(double(lo)) + margin;
        hi = acc_t(root * root);
      } else {
        hi = acc_t(double(lo) + margin);
      }
    }
    acc_t bn = inf;
    for (int64_t j = 0; j < p.m; ++j) {
      if (p.rl[j] == p.ql[i] || excluded(j)) continue;
      if (neg == NegStrategy::SemiHard && !(v[j] > lo && v[j] < hi)) continue;
      if (ns * v[j] < bn) { bn = ns * v[j]; ni[i] = j; }
    }
  }
}

template <typename T>
struct DeviceProblem {
  T *x = nullptr, *r = nullptr;
  int64_t *ql = nullptr, *rl = nullptr, *qid = nullptr, *rid = nullptr;
  explicit DeviceProblem(const Problem& p) {
    std::vector<T> hx(p.x.size()), hr(p.r.size());
    for (size_t k = 0; k < hx.size(); ++k) hx[k] = from_float<T>(p.x[k]);
    for (size_t k = 0; k < hr.size(); ++k) hr[k] = from_float<T>(p.r[k]);
    CK(cudaMalloc(&x, sizeof(T) * hx.size()));
    CK(cudaMemcpy(x, hx.data(), sizeof(T) * hx.size(), cudaMemcpyHostToDevice));
    if (p.self) r = x;
    else {
      CK(cudaMalloc(&r, sizeof(T) * hr.size()));
      CK(cudaMemcpy(r, hr.data(), sizeof(T) * hr.size(), cudaMemcpyHostToDevice));
    }
    auto up = [](int64_t*& dst, const std::vector<int64_t>& src) {
      CK(cudaMalloc(&dst, sizeof(int64_t) * src.size()));
      CK(cudaMemcpy(dst, src.data(), sizeof(int64_t) * src.size(), cudaMemcpyHostToDevice));
    };
    up(ql, p.ql); up(rl, p.rl);
    if (p.with_ids) { up(qid, p.qid); up(rid, p.rid); }
  }
  ~DeviceProblem() {
    cudaFree(x);
    if (r != x) cudaFree(r);
    cudaFree(ql); cudaFree(rl); cudaFree(qid); cudaFree(rid);
  }
};

const char* dist_name(Distance d) {
  return d == Distance::Cosine ? "cosine" : d == Distance::Euclidean ? "euclidean" : "sqeuclidean";
}

template <typename T, DotPath P>
void test_forward(const char* name, const Problem& prob, int64_t splits_req) {
  using acc_t = typename AccOf<T>::type;
  DeviceProblem<T> dp(prob);
  int64_t *dpi, *dni;
  CK(cudaMalloc(&dpi, sizeof(int64_t) * prob.n));
  CK(cudaMalloc(&dni, sizeof(int64_t) * prob.n));
  int sms = 1;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t splits = splits_req > 0 ? splits_req : choose_splits(prob.n, prob.m, sms);
  void* ws;
  CK(cudaMalloc(&ws, workspace_bytes<acc_t>(prob.n, prob.m, splits)));
  int32_t* bad;  // data-check flags: the inputs are admissible, they must stay 0
  CK(cudaMalloc(&bad, 2 * sizeof(int32_t)));
  CK(cudaMemset(bad, 0, 2 * sizeof(int32_t)));
  const Ids ids = prob.self ? Ids::Self : prob.with_ids ? Ids::Explicit : Ids::None;
  for (Distance dist : {Distance::Euclidean, Distance::SquaredEuclidean, Distance::Cosine})
    for (PosStrategy pos : {PosStrategy::Easy, PosStrategy::Hard})
      for (NegStrategy neg : {NegStrategy::Hard, NegStrategy::SemiHard, NegStrategy::Easy})
        for (double margin : {-1.0, 1.0}) {  // integer data: hi = v_ap + 1 is hit exactly
          if (margin >= 0 && neg != NegStrategy::SemiHard) continue;
          SelectParams sp{prob.n, prob.m, prob.d, pos, neg, dist, margin, splits, ids};
          CK(mine_select_launch<T, P>(sp, dp.x, dp.r, dp.ql, dp.rl, dp.qid, dp.rid, dpi, dni, ws,
                                      bad, 0));
          CK(cudaDeviceSynchronize());
          int32_t flags[2];
          CK(cudaMemcpy(flags, bad, sizeof flags, cudaMemcpyDeviceToHost));
          std::vector<int64_t> gpi(prob.n), gni(prob.n), hpi, hni;
          CK(cudaMemcpy(gpi.data(), dpi, sizeof(int64_t) * prob.n, cudaMemcpyDeviceToHost));
          CK(cudaMemcpy(gni.data(), dni, sizeof(int64_t) * prob.n, cudaMemcpyDeviceToHost));
          if (dist == Distance::Cosine)
            host_select<acc_t, Distance::Cosine>(prob, pos, neg, dist, margin, hpi, hni);
          else
            host_select<acc_t, Distance::SquaredEuclidean>(prob, pos, neg, dist, margin, hpi, hni);
          int64_t wrong = 0, first = -1;
          for (int64_t i = 0; i < prob.n; ++i)
            if (gpi[i] != hpi[i] || gni[i] != hni[i]) { if (first < 0) first = i; ++wrong; }
          char what[256];
          std::snprintf(what, sizeof what,
                        "forward %s %s pos=%d neg=%d margin=%g n=%lld m=%lld d=%lld self=%d "
                        "splits=%lld: %lld rows differ (first %lld), check flags %d %d",
                        name, dist_name(dist), int(pos), int(neg), margin, (long long)prob.n,
                        (long long)prob.m, (long long)prob.d, int(prob.self), (long long)splits,
                        (long long)wrong, (long long)first, flags[0], flags[1]);
          report(wrong == 0 && flags[0] == 0 && flags[1] == 0, what);
        }
  cudaFree(ws); cudaFree(bad); cudaFree(dpi); cudaFree(dni);
}

// Host pair gradients in double (fastmine/_pairs.py::_pair_grads).
void host_pair_grads(const float* a, const float* b, int64_t d, Distance dist,
                     std::vector<double>& ga, std::vector<double>& gb) {
  ga.assign(d, 0); gb.assign(d, 0);
  double uu = 0, aa = 0, bb = 0;
  for (int64_t k = 0; k < d; ++k) {
    uu += double(a[k] - b[k]) * (a[k] - b[k]); aa += double(a[k]) * a[k]; bb += double(b[k]) * b[k];
  }
  const double na = std::sqrt(aa), nb = std::sqrt(bb), nu = std::sqrt(uu);
  double aw = 0, bw = 0;
  for (int64_t k = 0; k < d; ++k) {
    const double w = a[k] / na - b[k] / nb;
    aw += a[k] / na * w; bw += b[k] / nb * w;
  }
  for (int64_t k = 0; k < d; ++k) {
    const double u = double(a[k]) - b[k];
    if (dist == Distance::SquaredEuclidean) { ga[k] = 2 * u; gb[k] = -ga[k]; }
    else if (dist == Distance::Euclidean) { ga[k] = nu > 0 ? u / nu : 0; gb[k] = -ga[k]; }
    else {
      const double ah = a[k] / na, bh = b[k] / nb, w = ah - bh;
      ga[k] = (w - aw * ah) / na; gb[k] = (-w + bw * bh) / nb;
    }
  }
}

template <typename T>
void test_backward(const char* name, const Problem& prob, std::mt19937& g) {
  using acc_t = typename AccOf<T>::type;
  const int64_t n = prob.n, m = prob.m, d = prob.d;
  std::uniform_int_distribution<int64_t> pick(-1, m - 1);
  std::normal_distribution<double> nd;
  std::vector<int64_t> pi(n), ni(n);
  std::vector<acc_t> gp(n), gn(n);
  for (int64_t i = 0; i < n; ++i) {
    pi[i] = pick(g); ni[i] = pick(g) % 7;  // repeated negatives exercise the scatter
    gp[i] = acc_t(nd(g)); gn[i] = acc_t(nd(g));
  }
  DeviceProblem<T> dp(prob);
  int64_t *dpi, *dni;
  acc_t *dgp, *dgn, *gx, *gr, *gr2, *contrib;
  int64_t *dsorted, *dorder;
  CK(cudaMalloc(&dpi, 8 * n)); CK(cudaMalloc(&dni, 8 * n));
  CK(cudaMalloc(&dgp, sizeof(acc_t) * n)); CK(cudaMalloc(&dgn, sizeof(acc_t) * n));
  CK(cudaMalloc(&gx, sizeof(acc_t) * n * d)); CK(cudaMalloc(&gr, sizeof(acc_t) * m * d));
  CK(cudaMalloc(&gr2, sizeof(acc_t) * m * d)); CK(cudaMalloc(&contrib, sizeof(acc_t) * 2 * n * d));
  CK(cudaMemcpy(dpi, pi.data(), 8 * n, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dni, ni.data(), 8 * n, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dgp, gp.data(), sizeof(acc_t) * n, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dgn, gn.data(), sizeof(acc_t) * n, cudaMemcpyHostToDevice));
  // The deterministic path's order: pairs p (p < n: positive of anchor p, else
  // negative of anchor p - n) sorted stably by reference row.
  std::vector<int64_t> order(2 * n), sorted(2 * n);
  for (int64_t p = 0; p < 2 * n; ++p) order[p] = p;
  auto row_of = [&](int64_t p) { return p < n ? pi[p] : ni[p - n]; };
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return row_of(a) < row_of(b); });
  for (int64_t s = 0; s < 2 * n; ++s) sorted[s] = row_of(order[s]);
  CK(cudaMalloc(&dsorted, 8 * 2 * n)); CK(cudaMalloc(&dorder, 8 * 2 * n));
  CK(cudaMemcpy(dsorted, sorted.data(), 8 * 2 * n, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dorder, order.data(), 8 * 2 * n, cudaMemcpyHostToDevice));
  // det == 1: per-pair rows, then the fixed-order segment sum into `out`.
  auto backward = [&](Distance dist, int det, acc_t* out) {
    CK(cudaMemset(out, 0, sizeof(acc_t) * m * d));
    if (det) {
      CK(pair_backward_launch<T>(dist, RefGrad::Contrib, dp.x, dp.r, n, d, dpi, dni, dgp, dgn, gx,
                                 contrib, 0));
      CK(segment_ref_grad_launch<acc_t>(2 * n, d, dsorted, dorder, contrib, out, false, 0));
    } else {
      CK(pair_backward_launch<T>(dist, RefGrad::Atomic, dp.x, dp.r, n, d, dpi, dni, dgp, dgn, gx,
                                 out, 0));
    }
  };
  const double tol = sizeof(acc_t) == 8 ? 1e-10 : 2e-4;
  for (Distance dist : {Distance::Euclidean, Distance::SquaredEuclidean, Distance::Cosine}) {
    // host reference
    std::vector<double> hx(n * d, 0), hr(m * d, 0), ga, gb;
    for (int64_t i = 0; i < n; ++i)
      for (int w = 0; w < 2; ++w) {
        const int64_t j = w == 0 ? pi[i] : ni[i];
        const double gg = w == 0 ? gp[i] : gn[i];
        if (j < 0) continue;
        host_pair_grads(&prob.x[i * d], &prob.r[j * d], d, dist, ga, gb);
        for (int64_t k = 0; k < d; ++k) { hx[i * d + k] += gg * ga[k]; hr[j * d + k] += gg * gb[k]; }
      }
    for (int det = 0; det < 2; ++det) {
      backward(dist, det, gr);
      CK(cudaDeviceSynchronize());
      std::vector<acc_t> cx(n * d), cr(m * d);
      CK(cudaMemcpy(cx.data(), gx, sizeof(acc_t) * n * d, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(cr.data(), gr, sizeof(acc_t) * m * d, cudaMemcpyDeviceToHost));
      double err = 0, scale = 1e-30;
      for (int64_t k = 0; k < n * d; ++k) { err = std::fmax(err, std::fabs(cx[k] - hx[k])); scale = std::fmax(scale, std::fabs(hx[k])); }
      for (int64_t k = 0; k < m * d; ++k) { err = std::fmax(err, std::fabs(cr[k] - hr[k])); scale = std::fmax(scale, std::fabs(hr[k])); }
      char what[200];
      std::snprintf(what, sizeof what, "backward %s %s %s: max err %.3g (scale %.3g)", name,
                    dist_name(dist), det ? "deterministic" : "atomic", err, scale);
      report(err <= tol * scale, what);
      if (det) {  // bitwise reproducible
        backward(dist, 1, gr2);
        CK(cudaDeviceSynchronize());
        std::vector<acc_t> cr2(m * d);
        CK(cudaMemcpy(cr2.data(), gr2, sizeof(acc_t) * m * d, cudaMemcpyDeviceToHost));
        report(std::memcmp(cr.data(), cr2.data(), sizeof(acc_t) * m * d) == 0,
               std::string("backward deterministic reproducible ") + name + " " + dist_name(dist));
      }
    }
  }
  cudaFree(dpi); cudaFree(dni); cudaFree(dgp); cudaFree(dgn); cudaFree(gx); cudaFree(gr);
  cudaFree(gr2); cudaFree(contrib); cudaFree(dsorted); cudaFree(dorder);
}

template <typename T, DotPath P>
void test_variant(const char* name) {
  std::mt19937 g(1234);
  // (n, m, d, self, classes, splits): tile edges, several reference tiles,
  // forced and automatic splits, few classes (many ties), many classes (rows
  // without positives).
  struct Case { int64_t n, m, d; bool self; int classes; int64_t splits; };
  const Case cases[] = {
      {1, 1, 3, true, 1, 1},      {70, 0, 37, false, 3, 1},   {150, 0, 37, true, 4, 1},
      {150, 0, 37, true, 4, 3},   {97, 200, 45, false, 5, 0}, {64, 64, 16, true, 60, 0},
      {33, 300, 70, false, 2, 2},
  };
  for (const Case& c : cases) {
    Problem prob = make_problem(g, c.n, c.m, c.d, c.self, c.classes);
    if (prob.m == 0 && !c.self) {  // empty reference set: everything is -1
      DeviceProblem<T> dp(prob);
      int64_t* dpi; int64_t* dni;
      CK(cudaMalloc(&dpi, 8 * prob.n)); CK(cudaMalloc(&dni, 8 * prob.n));
      SelectParams sp{prob.n, 0, prob.d, PosStrategy::Easy, NegStrategy::Hard,
                      Distance::Euclidean, -1.0, 1, Ids::None};
      void* ws;  // the row terms (and their checks) run even without references
      CK(cudaMalloc(&ws, workspace_bytes<typename AccOf<T>::type>(prob.n, 0, 1)));
      CK(mine_select_launch<T, P>(sp, dp.x, dp.r, dp.ql, dp.rl, nullptr, nullptr, dpi, dni, ws,
                                  nullptr, 0));
      CK(cudaFree(ws));
      std::vector<int64_t> a(prob.n), b(prob.n);
      CK(cudaMemcpy(a.data(), dpi, 8 * prob.n, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(b.data(), dni, 8 * prob.n, cudaMemcpyDeviceToHost));
      bool ok = true;
      for (int64_t i = 0; i < prob.n; ++i) ok = ok && a[i] == -1 && b[i] == -1;
      report(ok, std::string("forward ") + name + " empty reference set");
      cudaFree(dpi); cudaFree(dni);
      continue;
    }
    test_forward<T, P>(name, prob, c.splits);
  }
  {
    // Groups of 8 parallel rows (x, 2x, ..., 8x) of one class: their cosine
    // values 1 - dot * a * b round to -eps, 0 or +eps, and only the clamp at 0
    // makes the exact ties go to the smallest index.
    Problem prob = make_problem(g, 64, 0, 8, true, 3);
    for (int64_t i = 0; i < prob.n; ++i) {
      const int64_t base = i - i % 8;
      for (int64_t k = 0; k < prob.d; ++k)
        prob.x[i * prob.d + k] = float(i % 8 + 1) * prob.x[base * prob.d + k];
      prob.ql[i] = prob.ql[base];
    }
    prob.r = prob.x;
    prob.rl = prob.ql;
    test_forward<T, P>(name, prob, 0);
  }
  {
    // The data checks of the row-terms kernel: a NaN in a reference row sets
    // the ref_emb flag only; for cosine a zero anchor row (no direction) sets
    // the embeddings flag too.  (Admissible inputs leave both at 0: test_forward.)
    Problem prob = make_problem(g, 20, 30, 5, false, 3);
    prob.r[3 * prob.d + 1] = NAN;
    for (int64_t k = 0; k < prob.d; ++k) prob.x[7 * prob.d + k] = 0.f;
    DeviceProblem<T> dp(prob);
    int64_t *dpi, *dni;
    int32_t* bad;
    void* ws;
    CK(cudaMalloc(&dpi, 8 * prob.n)); CK(cudaMalloc(&dni, 8 * prob.n));
    CK(cudaMalloc(&bad, 2 * sizeof(int32_t)));
    CK(cudaMalloc(&ws, workspace_bytes<typename AccOf<T>::type>(prob.n, prob.m, 1)));
    int32_t flags[2][2];
    const Distance dists[2] = {Distance::Euclidean, Distance::Cosine};
    for (int c = 0; c < 2; ++c) {
      CK(cudaMemset(bad, 0, 2 * sizeof(int32_t)));
      SelectParams sp{prob.n, prob.m, prob.d, PosStrategy::Easy, NegStrategy::Hard, dists[c],
                      -1.0, 1, Ids::Explicit};
      CK(mine_select_launch<T, P>(sp, dp.x, dp.r, dp.ql, dp.rl, dp.qid, dp.rid, dpi, dni, ws, bad,
                                  0));
      CK(cudaMemcpy(flags[c], bad, sizeof flags[c], cudaMemcpyDeviceToHost));
    }
    char what[160];
    std::snprintf(what, sizeof what,
                  "row checks %s: euclidean flags %d %d (want 0 1), cosine %d %d (want 1 1)", name,
                  flags[0][0], flags[0][1], flags[1][0], flags[1][1]);
    report(flags[0][0] == 0 && flags[0][1] == 1 && flags[1][0] == 1 && flags[1][1] == 1, what);
    cudaFree(dpi); cudaFree(dni); cudaFree(bad); cudaFree(ws);
  }
  if (P == DotPath::Ffma || std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) {
    Problem prob = make_problem(g, 90, 40, 33, false, 3);
    test_backward<T>(name, prob, g);
    // 2n = 1200 pairs over 50 reference rows (long segments in
    // segment_ref_grad_kernel) and d > 128 (several column passes per block).
    Problem wide = make_problem(g, 600, 50, 150, false, 3);
    test_backward<T>(name, wide, g);
  }
}

}  // namespace

int main() {
  int dev_count = 0;
  if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
    std::printf("no CUDA device: 0 passed, 0 failed (nothing run)\n");
    return 3;
  }
#define FASTMINE_TEST_VARIANT(T, P, NAME) test_variant<T, DotPath::P>(NAME);
  FASTMINE_CUDA_VARIANTS(FASTMINE_TEST_VARIANT)
#undef FASTMINE_TEST_VARIANT
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
