// CPU kernels of pair_stats: argument checks, data staging, thread partitioning and reductions.
// The per-pair loops are in pair_stats_cpu_impl.h, built once per instruction set; this file
// picks the build at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu/output_cache.h"
#include "cpu/pair_stats_cpu.h"
#include "pair_stats.h"

namespace mmim_ext {
namespace cpu {

// Declarations of the per-instruction-set builds (pair_stats_scalar.cpp, pair_stats_base.cpp,
// pair_stats_avx2.cpp).
MMIM_DECLARE_PAIR_STATS_CPU(scalar)
MMIM_DECLARE_PAIR_STATS_CPU(base)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMIM_HAVE_AVX2_BUILD 1
MMIM_DECLARE_PAIR_STATS_CPU(avx2)
#endif

namespace {

enum class Capability { kScalar, kBase, kAvx2 };

// The instruction set to run: the best one the CPU supports, or MMIM_EXT_CPU_CAPABILITY
// ("scalar" / "base" / "avx2") when set, which lets the tests exercise every build on one
// machine. "scalar" is never chosen automatically: it runs the shared header's scalar functions
// (those of the CUDA kernels) one sample at a time.
Capability detect_capability() {
  Capability best = Capability::kBase;
#ifdef MMIM_HAVE_AVX2_BUILD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Capability::kAvx2;
#endif
  const char* env = std::getenv("MMIM_EXT_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  if (want == "scalar") return Capability::kScalar;
  if (want == "base" || want == "default") return Capability::kBase;
  if (want == "avx2") {
    TORCH_CHECK(best == Capability::kAvx2,
                "MMIM_EXT_CPU_CAPABILITY=avx2 but this CPU or build has no AVX2+FMA support");
    return Capability::kAvx2;
  }
  TORCH_CHECK(false, "MMIM_EXT_CPU_CAPABILITY must be 'scalar', 'base' or 'avx2', got '", want, "'");
  return best;
}

Capability capability() {
  static const Capability cap = detect_capability();
  return cap;
}

std::string cpu_capability_name() {
  switch (capability()) {
    case Capability::kAvx2:
      return "avx2";
    case Capability::kScalar:
      return "scalar";
    default:
      return "base";
  }
}

template <typename T>
void run_forward(const PairStatsCpuArgs<T>& g, int64_t b, int64_t e, T* sc, T* tj, T* lme) {
#ifdef MMIM_HAVE_AVX2_BUILD
  if (capability() == Capability::kAvx2) return avx2::forward_range<T>(g, b, e, sc, tj, lme);
#endif
  if (capability() == Capability::kScalar) return scalar::forward_range<T>(g, b, e, sc, tj, lme);
  base::forward_range<T>(g, b, e, sc, tj, lme);
}

template <typename T>
void run_backward(const PairStatsCpuArgs<T>& g, int64_t b, int64_t e, const T* gt, const T* gl,
                  const T* lme, const BwdScratch<T>& s, T* gwa, T* gwb, T* gb, T* gv) {
#ifdef MMIM_HAVE_AVX2_BUILD
  if (capability() == Capability::kAvx2)
    return avx2::backward_range<T>(g, b, e, gt, gl, lme, s, gwa, gwb, gb, gv);
#endif
  if (capability() == Capability::kScalar)
    return scalar::backward_range<T>(g, b, e, gt, gl, lme, s, gwa, gwb, gb, gv);
  base::backward_range<T>(g, b, e, gt, gl, lme, s, gwa, gwb, gb, gv);
}

// lme == nullptr: forward_backward_range, which writes the statistics to tj, lmo.
template <typename T>
void run_backward_or_both(const PairStatsCpuArgs<T>& g, int64_t b, int64_t e, const T* gt, const T* gl,
                          const T* lme, const BwdScratch<T>& s, T* gwa, T* gwb, T* gb, T* gv, T* tj, T* lmo) {
  if (lme != nullptr) return run_backward<T>(g, b, e, gt, gl, lme, s, gwa, gwb, gb, gv);
#ifdef MMIM_HAVE_AVX2_BUILD
  if (capability() == Capability::kAvx2)
    return avx2::forward_backward_range<T>(g, b, e, gt, gl, s, gwa, gwb, gb, gv, tj, lmo);
#endif
  if (capability() == Capability::kScalar)
    return scalar::forward_backward_range<T>(g, b, e, gt, gl, s, gwa, gwb, gb, gv, tj, lmo);
  base::forward_backward_range<T>(g, b, e, gt, gl, s, gwa, gwb, gb, gv, tj, lmo);
}

// Data checks that would otherwise read out of bounds: permutation rows and pair indices. Also
// rejects non-finite h, which would make every statistic of its units NaN. Returns the largest
// |h| (PairStatsCpuArgs::hmax).
double check_values(const at::Tensor& hc, const at::Tensor& perms_c, const at::Tensor* pairs_c,
                    int64_t B, int64_t m) {
  const int64_t R = perms_c.size(0);
  const int64_t* pp = perms_c.data_ptr<int64_t>();
  std::vector<char> seen(B);
  for (int64_t r = 0; r < R; ++r) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t n = 0; n < B; ++n) {
      const int64_t q = pp[r * B + n];
      TORCH_CHECK(q >= 0 && q < B && !seen[q], "pair_stats: row ", r,
                  " of 'perms' is not a permutation of 0..", B - 1);
      seen[q] = 1;
    }
  }
  if (pairs_c != nullptr) {
    const int64_t* q = pairs_c->data_ptr<int64_t>();
    for (int64_t t = 0; t < pairs_c->numel(); ++t) {
      TORCH_CHECK(q[t] >= 0 && q[t] < m, "pair_stats: 'pairs' holds unit index ", q[t],
                  ", expected all in [0, ", m - 1, "]");
    }
  }
  double hmax = 0.0;
  AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "pair_stats_check", [&] {
    const scalar_t* x = hc.data_ptr<scalar_t>();
    bool finite = true;
    scalar_t mx = scalar_t(0);
    for (int64_t t = 0; t < hc.numel(); ++t) {
      finite &= std::isfinite(x[t]);
      mx = std::max(mx, std::abs(x[t]));
    }
    TORCH_CHECK(finite, "pair_stats: 'h' contains NaN or infinite values");
    hmax = static_cast<double>(mx);
  });
  return hmax;
}

// Everything the loops need, staged: h transposed and zero padded, contiguous parameters.
struct Staged {
  at::Tensor hT, hP, perms, pairs, wa, wb, b, v, c;
  PairStatsSizes s;
  int64_t Bp;
  double hmax;  // the largest |h|
};

Staged stage(const at::Tensor& h, const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b,
             const at::Tensor& v, const at::Tensor& c, const at::Tensor& perms,
             const c10::optional<at::Tensor>& pairs) {
  Staged st;
  st.s = check_pair_stats_args(h, wa, wb, b, v, c, perms, pairs);
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble,
              "pair_stats (CPU): 'h' must be float32 or float64, got ", h.scalar_type());
  const int64_t B = st.s.B, m = st.s.m;
  const int64_t W = h.scalar_type() == at::kFloat ? kLanes<float> : kLanes<double>;
  st.Bp = (B + W - 1) / W * W;
  st.perms = perms.contiguous();
  if (pairs.has_value()) st.pairs = pairs->contiguous();
  const at::Tensor hc = h.contiguous();
  st.hmax = check_values(hc, st.perms, pairs.has_value() ? &st.pairs : nullptr, B, m);
  st.hT = empty_cached({m, st.Bp}, h.options()).zero_();
  st.hT.narrow(1, 0, B).copy_(h.t());
  // The shuffled samples' second arguments, materialized once per call ([R][m][Bp], R times the
  // size of h) so that every pair streams them contiguously instead of gathering.
  const int64_t R = st.s.R, Bp = st.Bp;
  st.hP = empty_cached({R, m, Bp}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pair_stats_stage", [&] {
    const scalar_t* src = st.hT.data_ptr<scalar_t>();
    scalar_t* dst = st.hP.data_ptr<scalar_t>();
    const int64_t* pp = st.perms.data_ptr<int64_t>();
    at::parallel_for(0, R * m, 64, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r = q / m, u = q % m;
        const scalar_t* row = src + u * Bp;
        scalar_t* out = dst + q * Bp;
        for (int64_t n = 0; n < B; ++n) out[n] = row[pp[r * B + n]];
        for (int64_t n = B; n < Bp; ++n) out[n] = scalar_t(0);
      }
    });
  });
  st.wa = wa.contiguous();
  st.wb = wb.contiguous();
  st.b = b.contiguous();
  st.v = v.contiguous();
  st.c = c.contiguous();
  return st;
}

template <typename T>
PairStatsCpuArgs<T> make_args(const Staged& st) {
  PairStatsCpuArgs<T> g;
  g.hT = st.hT.data_ptr<T>();
  g.hP = st.hP.data_ptr<T>();
  g.pairs = st.s.all_pairs ? nullptr : st.pairs.data_ptr<int64_t>();
  g.wa = st.wa.data_ptr<T>();
  g.wb = st.wb.data_ptr<T>();
  g.bias = st.b.data_ptr<T>();
  g.v = st.v.data_ptr<T>();
  g.c = st.c.data_ptr<T>();
  g.B = st.s.B;
  g.Bp = st.Bp;
  g.m = st.s.m;
  g.P = st.s.P;
  g.K = st.s.K;
  g.R = st.s.R;
  g.pstride = st.s.shared ? 0 : st.s.K;
  g.cstride = st.s.shared ? 0 : 1;
  g.hmax = static_cast<T>(st.hmax);
  return g;
}

// Pairs per parallel task: enough work per task to amortize the scheduling.
int64_t grain(const PairStatsSizes& s) {
  const int64_t work = std::max<int64_t>(1, s.B * (1 + s.R) * s.K);
  return std::max<int64_t>(1, (int64_t{1} << 16) / work);
}

// Blocks of pairs: `blocks` consecutive, equal ranges of [0, P) whose number depends on the
// problem's sizes only, never on the thread count. Partial sums that span pairs (h's gradient
// rows, a shared critic's gradient) are kept per block and added in block order, so outputs and
// gradients are bitwise the same for any number of threads (per-pair results depend on their
// own pair only).
//
// Runs f(q, begin, end) for the blocks q in [q0, q1) on the intra-op threads, each thread taking
// the next block not yet taken. A static split (at::parallel_for's) makes every thread wait for
// the slowest, and on a shared machine one core is often slowed for a while by other load; here
// the other threads take more of the blocks.
template <typename F>
void for_each_block(int64_t P, int64_t blocks, int64_t q0, int64_t q1, const F& f) {
  if (q1 <= q0) return;
  std::atomic<int64_t> next{q0};
  const int64_t workers = std::min<int64_t>(q1 - q0, std::max(1, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t q = next.fetch_add(1); q < q1; q = next.fetch_add(1)) f(q, P * q / blocks, P * (q + 1) / blocks);
  });
}

// Blocks for a pass over the pairs: of at least `grain` pairs, at most kMaxBlocks (enough for
// load balance on a few dozen threads). With h's gradient wanted, each block's gradient rows
// ([1+R][m][Bp]) are zeroed and read once more by the reduction, a cost in proportion to m per
// block, against the block's work in proportion to its pairs times K: at most one block per
// kPairKPerUnit pairs times K per unit of m keeps the reduction a small part of the pass (m =
// 1024, K = 16, all pairs: 16 blocks of 2 MiB of rows in float32 with R = 1), but never fewer
// than kMinBlocks (load balance on a few threads; the reduction's share grows for small m).
constexpr int64_t kMinBlocks = 8;
constexpr int64_t kMaxBlocks = 64;
constexpr int64_t kPairKPerUnit = 512;
int64_t pair_blocks(const PairStatsSizes& s, bool h_rows) {
  int64_t blocks = kMaxBlocks;
  if (h_rows) blocks = std::clamp<int64_t>(s.P * s.K / (kPairKPerUnit * s.m), kMinBlocks, kMaxBlocks);
  // A multiple of 8: the blocks are equal, so 2, 4 or 8 threads finish together (15 blocks on 2
  // threads left one thread a block behind, about 7% of the pass).
  blocks = (blocks + 7) / 8 * 8;
  return std::max<int64_t>(1, std::min(blocks, s.P / grain(s)));
}

// Blocks whose h-gradient rows are held at once (a wave; the waves' sums are added in block
// order, so their size does not change the results): as many as fit in the budget, at least one
// per thread. The budget is 32 MiB, or MMIM_EXT_CPU_WAVE_BYTES bytes when set (the tests set it
// small to run several waves on small inputs).
int64_t wave_budget() {
  static const int64_t budget = [] {
    const char* env = std::getenv("MMIM_EXT_CPU_WAVE_BYTES");
    if (env == nullptr || *env == '\0') return int64_t{32} << 20;
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && v >= 0,
                "MMIM_EXT_CPU_WAVE_BYTES must be a non-negative integer, got '", env, "'");
    return static_cast<int64_t>(v);
  }();
  return budget;
}
int64_t blocks_per_wave(int64_t blocks, int64_t block_bytes) {
  const int64_t nthreads = std::max(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min(blocks, std::max<int64_t>(nthreads, wave_budget() / block_bytes)));
}

std::tuple<at::Tensor, at::Tensor> pair_stats_fwd_cpu(const at::Tensor& h, const at::Tensor& wa,
                                                      const at::Tensor& wb, const at::Tensor& b,
                                                      const at::Tensor& v, const at::Tensor& c,
                                                      const at::Tensor& perms,
                                                      const c10::optional<at::Tensor>& pairs) {
  const Staged st = stage(h, wa, wb, b, v, c, perms, pairs);
  at::Tensor t_joint = empty_cached({st.s.P}, h.options());
  at::Tensor lme = empty_cached({st.s.P}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pair_stats_fwd_cpu", [&] {
    const PairStatsCpuArgs<scalar_t> g = make_args<scalar_t>(st);
    scalar_t* tj = t_joint.data_ptr<scalar_t>();
    scalar_t* lm = lme.data_ptr<scalar_t>();
    const int64_t blocks = pair_blocks(st.s, false);
    for_each_block(st.s.P, blocks, 0, blocks, [&](int64_t, int64_t begin, int64_t end) {
      std::vector<scalar_t> sc(static_cast<size_t>((1 + g.R) * kChunkSamples));
      run_forward<scalar_t>(g, begin, end, sc.data(), tj, lm);
    });
  });
  return {t_joint, lme};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// pair_stats_bwd (lme given), or with lme == nullptr pair_stats_fwd_bwd's one pass, which also
// computes the statistics into t_out, lme_out (allocated here, [P]).
Grads backward_cpu(const char* op, const at::Tensor& grad_t, const at::Tensor& grad_lme, const at::Tensor& h,
                   const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b, const at::Tensor& v,
                   const at::Tensor& c, const at::Tensor& perms, const c10::optional<at::Tensor>& pairs,
                   const at::Tensor* lme, bool need_h, bool need_params, at::Tensor* t_out, at::Tensor* lme_out,
                   const at::Tensor* ema = nullptr, double ema_log_a = 0.0) {
  const Staged st = stage(h, wa, wb, b, v, c, perms, pairs);
  const PairStatsSizes& s = st.s;
  TORCH_INTERNAL_ASSERT(t_out == nullptr || need_h || need_params, "the one pass needs a gradient to compute");
  if (t_out != nullptr) {
    *t_out = empty_cached({s.P}, h.options());
    *lme_out = empty_cached({s.P}, h.options());
  }
  std::vector<const at::Tensor*> per_pair = {&grad_t, &grad_lme};
  if (lme != nullptr) per_pair.push_back(lme);
  for (const at::Tensor* t : per_pair) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == s.P && t->scalar_type() == h.scalar_type() &&
                    t->device() == h.device(),
                op, ": ", lme != nullptr ? "gradients and lme" : "grad_t_joint and grad_lme",
                " must be [P] tensors in h's dtype with P=", s.P, ", got ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_INTERNAL_ASSERT(ema == nullptr || t_out != nullptr, "the moving-average rule needs the one pass");
  if (ema != nullptr) check_mine_rule_args(op, *ema, ema_log_a, s.P, h);
  const at::Tensor ema_c = ema != nullptr ? ema->contiguous() : at::Tensor();
  // The pass's per-pair factor of the moving-average rule (PairStatsCpuArgs::ema_ratio).
  const at::Tensor ema_ratio = ema != nullptr ? at::empty({s.P}, h.options()) : at::Tensor();
  const at::Tensor gt_c = grad_t.contiguous(), gl_c = grad_lme.contiguous();
  const at::Tensor lme_c = lme != nullptr ? lme->contiguous() : at::Tensor();
  const int64_t B = s.B, Bp = st.Bp, m = s.m, K = s.K, R = s.R;

  // A gradient not asked for (need_h / need_params false) is returned as an empty [0] tensor (a
  // new one each: outputs of an op must not alias).
  auto none = [&] { return at::empty({0}, h.options()); };
  at::Tensor grad_h = need_h ? empty_cached({B, m}, h.options()) : none();
  // One critic per pair: the loops write every row, so no zero fill ([P, K] x 4 is large), and the
  // memory comes from the block cache (output_cache.h: no page faults when the last call's gradients
  // were dropped).
  auto make_grad = [&] {
    if (!need_params) return none();
    return s.shared ? at::zeros(wa.sizes(), h.options()) : empty_cached(wa.sizes(), h.options());
  };
  at::Tensor gwa = make_grad(), gwb = make_grad(), gb = make_grad(), gv = make_grad();
  at::Tensor gc = none();
  // d t_joint / d c = d lme / d c = 1 (with the moving-average rule the lme's upstream gradient is
  // only known after the pass: below).
  if (need_params && ema == nullptr) gc = s.shared ? gt_c.sum().add(gl_c.sum()) : gt_c.add(gl_c);
  if (!need_h && !need_params) return {grad_h, gwa, gwb, gb, gv, gc};

  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "pair_stats_bwd_cpu", [&] {
    using T = scalar_t;
    PairStatsCpuArgs<T> g = make_args<T>(st);
    if (ema != nullptr) {
      g.ema = ema_c.data_ptr<T>();
      g.ema_log_a = static_cast<T>(ema_log_a);
      g.ema_ratio = ema_ratio.data_ptr<T>();
    }
    // Per-block gradient buffers (for_each_block): for hT and hP ([1+R][m][Bp], one wave of blocks
    // at a time) and for a shared critic ([4][K], every block). Summed in block order
    // (deterministic, and the same for any number of threads).
    const int64_t per_block = (1 + R) * m * Bp;
    const int64_t blocks = pair_blocks(s, need_h);
    const int64_t wave = need_h ? blocks_per_wave(blocks, per_block * static_cast<int64_t>(sizeof(T))) : blocks;
    const int64_t waves = (blocks + wave - 1) / wave;
    at::Tensor gbuf = need_h ? empty_cached({wave, 1 + R, m, Bp}, h.options()).zero_() : none();
    // More than one wave: the blocks' sums so far, added to wave by wave.
    at::Tensor gtotal = need_h && waves > 1 ? empty_cached({1 + R, m, Bp}, h.options()).zero_() : none();
    at::Tensor gs_blocks = at::zeros({blocks, 4, K}, h.options());
    T* gbuf_all = need_h ? gbuf.data_ptr<T>() : nullptr;
    T* gs_all = gs_blocks.data_ptr<T>();
    const T* gtp = gt_c.data_ptr<T>();
    const T* glp = gl_c.data_ptr<T>();
    const T* lmep = lme != nullptr ? lme_c.data_ptr<T>() : nullptr;
    T* tjp = t_out != nullptr ? t_out->data_ptr<T>() : nullptr;
    T* lmop = lme_out != nullptr ? lme_out->data_ptr<T>() : nullptr;
    T* gwap = need_params ? gwa.data_ptr<T>() : nullptr;
    T* gwbp = need_params ? gwb.data_ptr<T>() : nullptr;
    T* gbp = need_params ? gb.data_ptr<T>() : nullptr;
    T* gvp = need_params ? gv.data_ptr<T>() : nullptr;
    // A per-pair critic's c gradient, for the pairs with a non-finite critic (set to NaN there);
    // with the moving-average rule it is formed after the pass, from ema_ratio.
    if (need_params && !s.shared && ema == nullptr) g.gc = gc.data_ptr<T>();
    for (int64_t w = 0; w < waves; ++w) {
      const int64_t q0 = w * wave, q1 = std::min(blocks, q0 + wave);
      if (w > 0) gbuf.zero_();
      for_each_block(s.P, blocks, q0, q1, [&](int64_t q, int64_t begin, int64_t end) {
        std::vector<T> scratch(static_cast<size_t>((R + 3) * Bp));
        BwdScratch<T> sc;
        sc.wm = scratch.data();
        sc.wj = sc.wm + R * Bp;
        sc.dsum = sc.wj + Bp;
        sc.gdiag = sc.dsum + Bp;
        sc.gh = need_h ? gbuf_all + (q - q0) * per_block : nullptr;
        sc.gP = need_h ? sc.gh + m * Bp : nullptr;
        sc.gshared = gs_all + q * 4 * K;
        sc.need_h = need_h;
        sc.need_params = need_params;
        run_backward_or_both<T>(g, begin, end, gtp, glp, lmep, sc, gwap, gwbp, gbp, gvp, tjp, lmop);
      });
      if (waves > 1) {
        // gtotal += this wave's rows, block by block
        T* tot = gtotal.data_ptr<T>();
        at::parallel_for(0, (1 + R) * m, 16, [&](int64_t r0, int64_t r1) {
          for (int64_t t = 0; t < q1 - q0; ++t)
            for (int64_t r = r0; r < r1; ++r) {
              const T* src = gbuf_all + t * per_block + r * Bp;
              T* dst = tot + r * Bp;
              for (int64_t n = 0; n < B; ++n) dst[n] += src[n];
            }
        });
      }
    }
    // grad_h[n, u] = sum over blocks of gh[u][n] + sum over r of gP[r][u][n'] at n = perms[r][n'],
    // from the one wave's buffers or from gtotal.
    const T* rows_all = waves > 1 ? gtotal.data_ptr<T>() : gbuf_all;
    const int64_t nrows = waves > 1 ? 1 : blocks;
    T* ghp = need_h ? grad_h.data_ptr<T>() : nullptr;
    const int64_t* pp = st.perms.data_ptr<int64_t>();
    at::parallel_for(0, need_h ? m : 0, 16, [&](int64_t u0, int64_t u1) {
      std::vector<T> row(static_cast<size_t>(Bp)), part(static_cast<size_t>(Bp));
      for (int64_t u = u0; u < u1; ++u) {
        std::fill(row.begin(), row.end(), T(0));
        for (int64_t t = 0; t < nrows; ++t) {
          const T* src = rows_all + t * per_block + u * Bp;
          for (int64_t n = 0; n < B; ++n) row[n] += src[n];
        }
        for (int64_t r = 0; r < R; ++r) {
          std::fill(part.begin(), part.end(), T(0));
          for (int64_t t = 0; t < nrows; ++t) {
            const T* src = rows_all + t * per_block + ((1 + r) * m + u) * Bp;
            for (int64_t n = 0; n < B; ++n) part[n] += src[n];
          }
          const int64_t* pr = pp + r * B;
          for (int64_t n = 0; n < B; ++n) row[pr[n]] += part[n];
        }
        for (int64_t n = 0; n < B; ++n) ghp[n * m + u] = row[n];
      }
    });
    if (s.shared && need_params) {
      std::vector<T> red(static_cast<size_t>(4 * K), T(0));
      for (int64_t q = 0; q < blocks; ++q)
        for (int64_t x = 0; x < 4 * K; ++x) red[x] += gs_all[q * 4 * K + x];
      at::Tensor* out[4] = {&gwa, &gwb, &gb, &gv};
      for (int x = 0; x < 4; ++x) std::copy(red.data() + x * K, red.data() + (x + 1) * K, out[x]->data_ptr<T>());
    }
  });
  if (need_params && ema != nullptr) {
    // d lme / d c = 1, times lme's upstream gradient with the pass's factor of the rule.
    const at::Tensor glr = gl_c.mul(ema_ratio);
    gc = s.shared ? gt_c.sum().add(glr.sum()) : gt_c.add(glr);
  }
  // A shared critic with a non-finite parameter: every pair's gradients are NaN (backward_pairs),
  // c's too. (Per-pair critics' c gradients: g.gc or ema_ratio, in the pass.)
  if (need_params && s.shared) {
    bool finite = true;
    for (const at::Tensor* t : {&st.wa, &st.wb, &st.b, &st.v, &st.c}) finite = finite && t->isfinite().all().item<bool>();
    if (!finite) gc.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return {grad_h, gwa, gwb, gb, gv, gc};
}

Grads pair_stats_bwd_cpu(const at::Tensor& grad_t, const at::Tensor& grad_lme, const at::Tensor& h,
                         const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b, const at::Tensor& v,
                         const at::Tensor& c, const at::Tensor& perms, const c10::optional<at::Tensor>& pairs,
                         const at::Tensor& lme, bool need_h, bool need_params) {
  return backward_cpu("pair_stats_bwd", grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs, &lme, need_h,
                      need_params, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pair_stats_fwd_bwd_cpu(const at::Tensor& grad_t, const at::Tensor& grad_lme, const at::Tensor& h,
                       const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b, const at::Tensor& v,
                       const at::Tensor& c, const at::Tensor& perms, const c10::optional<at::Tensor>& pairs,
                       bool need_h, bool need_params) {
  if (!need_h && !need_params) {
    // No gradient wanted: the forward alone; backward_cpu checks the upstream gradients and
    // returns the same empty gradients as pair_stats_bwd.
    auto [t, l] = pair_stats_fwd_cpu(h, wa, wb, b, v, c, perms, pairs);
    const Grads g = backward_cpu("pair_stats_fwd_bwd", grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs, &l,
                                 false, false, nullptr, nullptr);
    return {t, l, std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g), std::get<5>(g)};
  }
  at::Tensor t, l;
  const Grads g = backward_cpu("pair_stats_fwd_bwd", grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs, nullptr,
                               need_h, need_params, &t, &l);
  return {t, l, std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g), std::get<5>(g)};
}

// pair_stats_fwd_bwd with MINE's moving-average rule for the upstream gradient of lme.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
pair_stats_fwd_bwd_mine_cpu(const at::Tensor& grad_t, const at::Tensor& grad_lme, const at::Tensor& ema,
                            double log_a, const at::Tensor& h, const at::Tensor& wa, const at::Tensor& wb,
                            const at::Tensor& b, const at::Tensor& v, const at::Tensor& c, const at::Tensor& perms,
                            const c10::optional<at::Tensor>& pairs, bool need_h, bool need_params) {
  TORCH_CHECK(need_h || need_params, "pair_stats_fwd_bwd_mine: at least one of need_h, need_params must be true");
  at::Tensor t, l;
  const Grads g = backward_cpu("pair_stats_fwd_bwd_mine", grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs,
                               nullptr, need_h, need_params, &t, &l, &ema, log_a);
  return {t, l, std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g), std::get<5>(g)};
}

}  // namespace
}  // namespace cpu
}  // namespace mmim_ext

TORCH_LIBRARY_IMPL(mmim_ext, CPU, m) {
  m.impl("pair_stats_fwd_bwd_mine", &mmim_ext::cpu::pair_stats_fwd_bwd_mine_cpu);
  m.impl("pair_stats_fwd", &mmim_ext::cpu::pair_stats_fwd_cpu);
  m.impl("pair_stats_bwd", &mmim_ext::cpu::pair_stats_bwd_cpu);
  m.impl("pair_stats_fwd_bwd", &mmim_ext::cpu::pair_stats_fwd_bwd_cpu);
}

// cpu_capability takes no tensor, so it is registered for every dispatch key.
TORCH_LIBRARY_IMPL(mmim_ext, CompositeImplicitAutograd, m) {
  m.impl("cpu_capability", [] { return mmim_ext::cpu::cpu_capability_name(); });
}
