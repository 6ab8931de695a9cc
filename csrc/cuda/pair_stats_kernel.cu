// CUDA kernels of pair_stats: staging, indexing and reductions. The critic and log-sum-exp
// arithmetic is the shared header's (csrc/pair_stats_math.h), the same functions the CPU kernel
// runs, so the CPU tests check the GPU's per-element math.
//
// Staging (ATen ops on the current stream, no host synchronization):
//   hT  [m][B]      h transposed and converted to the accumulation type acc_t (float for
//                   float16/bfloat16/float32, double for float64), so a unit's samples are
//                   contiguous and every kernel below reads h with lanes on neighbouring samples
//   prm [P'][4][K]  (wa, wb, bias, v) of each critic in acc_t; P' = P, or 1 for a shared critic
//                   (stride 0), so a warp's pair has its K parameters in one 16K-byte row
//
// Kernels (128 threads = 4 warps per block; a warp owns a pair or a unit, its lanes own samples,
// so the pair's critic parameters are warp-uniform broadcast loads and h is read coalesced):
//   fwd         warp per pair p; lanes take samples n = lane + 32 t (kFwdNT per lane per tile),
//               sources (joint, shuffle 1..R) in chunks of kSC; joint scores summed and shuffled
//               ones folded into a per-lane online log-sum-exp, both reduced across the warp by a
//               butterfly (every lane gets the same, order-independent result: deterministic).
//   bwd_params  warp per pair: recompute the scores of a tile, weight them (joint: grad_t / B,
//               shuffled: grad_lme exp(T - lme) / (R B)), then per hidden unit reduce the four
//               parameter gradients across the warp; lane 0 adds them to the pair's own row
//               (one critic per pair) or to the warp's own row of a [warps][4][K] buffer that
//               ATen sums afterwards (shared critic). No atomics; fixed order: deterministic.
//   bwd_h       gather formulation: warp per (unit u, tile of 32 kHNT samples), a lane owns
//               grad h[n, u] and sums over all partners of u (as first argument: d/da over the
//               joint and shuffled samples at n; as second argument: the joint sample at n and,
//               for each shuffle r, the sample n' = perms[r]^-1(n) that paired h[n, u]). Every
//               output element has one writer: no atomics, deterministic.
// The backward computes each score three times (params, and both members' gathers); that is the
// price of deterministic gradients without global atomics.
//
// Index bounds of perms and pairs are checked on the device (CUDA_KERNEL_ASSERT), so a bad
// direct call fails loudly instead of reading out of bounds; the Python wrapper checks values
// (permutation rows, finite h) before it calls the op.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

#include "pair_stats.h"
#include "pair_stats_math.h"

namespace mmim_ext {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kSC = 2;    // sources (joint or shuffle rows) per chunk: R = 1 is one chunk
constexpr int kFwdNT = 4;  // samples per lane per tile in the forward (a tile is 128 samples)
constexpr int kPrmNT = 8;  // in bwd_params: fewer tiles, fewer warp reductions per hidden unit
constexpr int kHNT = 2;    // in bwd_h: small tiles keep m * ceil(B / 64) warps busy
// Warps of bwd_params for a shared critic: a fixed count (not the GPU's SM count), so the
// reduction order, hence the result, is the same on every GPU.
constexpr int64_t kSharedWarps = 4096;

template <typename T>
struct Args {
  const T* hT;            // [m][B]
  const int64_t* perms;   // [R][B]
  const int64_t* pairs;   // [P][2] or nullptr: all i < j, row-major
  const T* prm;           // [P'][4][K]
  const T* c;             // [P'] (cstride 1) or [1] (cstride 0)
  int64_t B, m, P, K, R;
  int64_t pstride;        // 4 K or 0
  int64_t cstride;        // 1 or 0
};

__device__ __forceinline__ void pair_of(const int64_t* pairs, int64_t m, int64_t p, int64_t* i,
                                        int64_t* j) {
  if (pairs == nullptr) {
    math::pair_from_index(p, m, i, j);
  } else {
    *i = pairs[2 * p];
    *j = pairs[2 * p + 1];
    CUDA_KERNEL_ASSERT(*i >= 0 && *i < m && *j >= 0 && *j < m);
  }
}

// Row r of perms at sample n, bounds-checked.
__device__ __forceinline__ int64_t perm_at(const int64_t* perms, int64_t B, int64_t r, int64_t n) {
  const int64_t q = perms[r * B + n];
  CUDA_KERNEL_ASSERT(q >= 0 && q < B);
  return q;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename T>
__device__ __forceinline__ math::LseState<T> warp_lse(math::LseState<T> s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    math::LseState<T> o;
    o.max = __shfl_xor_sync(0xffffffffu, s.max, off);
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, off);
    s = math::lse_merge(s, o);
  }
  return s;
}

// Scores without c of NT x SC samples of one critic: sc[t][q] = T(a[t][q], b[t][q]) - c.
// With kShareA all sources of sample t share the first argument a[t][0] (joint and shuffled
// samples of the first-argument view), so u = wa a + bias is computed once per sample.
template <typename T, int NT, bool kShareA>
__device__ __forceinline__ void tile_scores(const T* __restrict__ pp, int64_t K, const T (&a)[NT][kSC],
                                            const T (&b)[NT][kSC], T (&sc)[NT][kSC]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int q = 0; q < kSC; ++q) sc[t][q] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T wa = pp[k], wb = pp[K + k], bias = pp[2 * K + k], v = pp[3 * K + k];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const T u0 = math::critic_u(wa, a[t][0], bias);
#pragma unroll
      for (int q = 0; q < kSC; ++q) {
        const T u = kShareA ? u0 : math::critic_u(wa, a[t][q], bias);
        sc[t][q] += math::critic_unit(v, math::critic_x(wb, b[t][q], u));
      }
    }
  }
}

// Sample weights of a tile: joint grad_t / B, shuffled grad_lme exp(T - lme) / (R B), 0 where
// the sample or source does not exist.
template <typename T, int NT>
__device__ __forceinline__ void tile_weights(const T (&sc)[NT][kSC], const bool (&ok)[NT][kSC],
                                             int64_t s0, T gj, T gl, T lme0, T (&w)[NT][kSC]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int q = 0; q < kSC; ++q) {
      const T wt = (s0 + q == 0) ? gj : math::marginal_weight(sc[t][q], lme0, gl);
      w[t][q] = ok[t][q] ? wt : T(0);
    }
}

// ---- forward -------------------------------------------------------------------------------

// Staging shared by the forward and the parameter backward (a warp owns a pair; lane takes
// samples n0 + lane + 32 t). First arguments: a[t][q] = h[n_t, i] for every source q.
template <typename T, int NT>
__device__ __forceinline__ void stage_first(const T* __restrict__ ha, int64_t B, int64_t n0, int lane,
                                            int (&nn)[NT], T (&a)[NT][kSC]) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    nn[t] = static_cast<int>(n0) + lane + 32 * t;
    a[t][0] = nn[t] < B ? ha[nn[t]] : T(0);
#pragma unroll
    for (int q = 1; q < kSC; ++q) a[t][q] = a[t][0];
  }
}

// Second arguments of sources s0 .. s0 + kSC - 1 (0 = joint, r + 1 = shuffle row r):
// b[t][q] = h[perm_s(n_t), j]; ok[t][q] is false for padding samples and sources past S.
template <typename T, int NT>
__device__ __forceinline__ void stage_second(const T* __restrict__ hb, const int64_t* perms, int64_t B,
                                             int64_t S, int64_t s0, const int (&nn)[NT], T (&b)[NT][kSC],
                                             bool (&ok)[NT][kSC]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int q = 0; q < kSC; ++q) {
      const int64_t s = s0 + q;
      ok[t][q] = nn[t] < B && s < S;
      const int64_t idx = !ok[t][q] ? 0 : (s == 0 ? nn[t] : perm_at(perms, B, s - 1, nn[t]));
      b[t][q] = ok[t][q] ? hb[idx] : T(0);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_stats_fwd_kernel(const Args<T> g, T* __restrict__ t_joint, T* __restrict__ lme) {
  constexpr int NT = kFwdNT;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t S = 1 + g.R;  // sources: 0 = joint, r + 1 = shuffle row r
  for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; p < g.P;
       p += nwarps) {
    int64_t i, j;
    pair_of(g.pairs, g.m, p, &i, &j);
    const T* __restrict__ pp = g.prm + p * g.pstride;
    const T* __restrict__ ha = g.hT + i * g.B;
    const T* __restrict__ hb = g.hT + j * g.B;
    T jsum = T(0);
    math::LseState<T> st = math::lse_empty<T>();
    for (int64_t n0 = 0; n0 < g.B; n0 += 32 * NT) {
      int nn[NT];  // sample indices (B < 2^31, checked on the host)
      T a[NT][kSC];
      stage_first<T, NT>(ha, g.B, n0, lane, nn, a);
      for (int64_t s0 = 0; s0 < S; s0 += kSC) {
        T b[NT][kSC], sc[NT][kSC];
        bool ok[NT][kSC];
        stage_second<T, NT>(hb, g.perms, g.B, S, s0, nn, b, ok);
        tile_scores<T, NT, true>(pp, g.K, a, b, sc);
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int q = 0; q < kSC; ++q) {
            if (!ok[t][q]) continue;
            if (s0 + q == 0) {
              jsum += sc[t][q];
            } else {
              st = math::lse_merge(st, math::LseState<T>{sc[t][q], T(1)});
            }
          }
      }
    }
    jsum = warp_sum(jsum);
    st = warp_lse(st);
    if (lane == 0) {
      // c shifts every score equally: added here, never inside the exponentials.
      const T cp = g.c[p * g.cstride];
      t_joint[p] = cp + jsum / static_cast<T>(g.B);
      lme[p] = cp + math::lse_finish_mean(st, static_cast<T>(g.R * g.B));
    }
  }
}

// ---- backward: critic parameters -----------------------------------------------------------

template <typename T>
struct BwdArgs {
  const T* grad_t;    // [P]
  const T* grad_lme;  // [P]
  const T* lme;       // [P]
};

// gprm: [P][4][K] (one critic per pair, zero-initialized) or [warps][4][K] (shared critic).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_stats_bwd_params_kernel(const Args<T> g, const BwdArgs<T> d, T* __restrict__ gprm) {
  constexpr int NT = kPrmNT;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t S = 1 + g.R;
  const int64_t K = g.K;
  const bool shared = g.pstride == 0;
  for (int64_t p = warp; p < g.P; p += nwarps) {
    int64_t i, j;
    pair_of(g.pairs, g.m, p, &i, &j);
    const T* __restrict__ pp = g.prm + p * g.pstride;
    const T* __restrict__ ha = g.hT + i * g.B;
    const T* __restrict__ hb = g.hT + j * g.B;
    T* __restrict__ dst = gprm + (shared ? warp : p) * 4 * K;
    const T gj = d.grad_t[p] / static_cast<T>(g.B);
    const T gl = d.grad_lme[p] / static_cast<T>(g.R * g.B);
    const T lme0 = d.lme[p] - g.c[p * g.cstride];
    for (int64_t n0 = 0; n0 < g.B; n0 += 32 * NT) {
      int nn[NT];  // sample indices (B < 2^31, checked on the host)
      T a[NT][kSC];
      stage_first<T, NT>(ha, g.B, n0, lane, nn, a);
      for (int64_t s0 = 0; s0 < S; s0 += kSC) {
        T b[NT][kSC], w[NT][kSC];
        bool ok[NT][kSC];
        stage_second<T, NT>(hb, g.perms, g.B, S, s0, nn, b, ok);
        {
          T sc[NT][kSC];
          tile_scores<T, NT, true>(pp, K, a, b, sc);
          tile_weights<T, NT>(sc, ok, s0, gj, gl, lme0, w);
        }
        for (int64_t k = 0; k < K; ++k) {
          const T wa = pp[k], wb = pp[K + k], bias = pp[2 * K + k], v = pp[3 * K + k];
          // Sums of gate a, gate b and gate; the gradients are formed from them below.
          T sga = T(0), sgb = T(0), sg = T(0);
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            const T u = math::critic_u(wa, a[t][0], bias);
            T gs = T(0);
#pragma unroll
            for (int q = 0; q < kSC; ++q) {
              const T gate = math::critic_unit_gate(math::critic_x(wb, b[t][q], u), w[t][q]);
              sgb += gate * b[t][q];
              gs += gate;
            }
            // All sources of sample t share a: sum their gates first.
            sga += gs * a[t][0];
            sg += gs;
          }
          sga = warp_sum(sga);
          sgb = warp_sum(sgb);
          sg = warp_sum(sg);
          const T gwa = math::critic_unit_dx(v, sga), gwb = math::critic_unit_dx(v, sgb);
          const T gb = math::critic_unit_dx(v, sg);
          const T gv = math::critic_unit_dv(wa, wb, bias, sga, sgb, sg);
          if (lane == 0) {
            dst[k] += gwa;
            dst[K + k] += gwb;
            dst[2 * K + k] += gb;
            dst[3 * K + k] += gv;
          }
        }
      }
    }
  }
}

// ---- backward: h (gather) ------------------------------------------------------------------

template <typename T>
struct GatherArgs {
  const int64_t* inv;      // [R][B] inverse permutations
  const int64_t* offsets;  // [m + 1] CSR offsets into entries (explicit pairs only)
  const int64_t* entries;  // [2P]: e < P -> unit is pair e's first member, else pair e - P's second
};

// Adds to acc[t] the gradient w.r.t. h[n_t, u] through pair p, where u is the pair's first
// member (kFirst) or second member and w the other one.
template <typename T, bool kFirst>
__device__ __forceinline__ void gather_pair(const Args<T>& g, const BwdArgs<T>& d, const GatherArgs<T>& ga,
                                            int64_t p, int64_t u, int64_t w, const int (&nn)[kHNT],
                                            T (&acc)[kHNT]) {
  constexpr int NT = kHNT;
  const int64_t S = 1 + g.R;
  const int64_t K = g.K;
  const T* __restrict__ pp = g.prm + p * g.pstride;
  const T* __restrict__ hu = g.hT + u * g.B;
  const T* __restrict__ hw = g.hT + w * g.B;
  const T gj = d.grad_t[p] / static_cast<T>(g.B);
  const T gl = d.grad_lme[p] / static_cast<T>(g.R * g.B);
  const T lme0 = d.lme[p] - g.c[p * g.cstride];
  for (int64_t s0 = 0; s0 < S; s0 += kSC) {
    T a[NT][kSC], b[NT][kSC], wt[NT][kSC];
    bool ok[NT][kSC];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int q = 0; q < kSC; ++q) {
        const int64_t s = s0 + q;
        ok[t][q] = nn[t] < g.B && s < S;
        const int n = ok[t][q] ? nn[t] : 0;
        if (kFirst) {
          // Samples (n, s): a = h[n, u], b = h[perm_s(n), w].
          a[t][q] = ok[t][q] ? hu[n] : T(0);
          const int64_t idx = !ok[t][q] ? 0 : (s == 0 ? n : perm_at(g.perms, g.B, s - 1, n));
          b[t][q] = ok[t][q] ? hw[idx] : T(0);
        } else {
          // The sample of source s whose second argument is h[n, u]: n' = perm_s^-1(n).
          const int64_t idx = !ok[t][q] ? 0 : (s == 0 ? n : perm_at(ga.inv, g.B, s - 1, n));
          a[t][q] = ok[t][q] ? hw[idx] : T(0);
          b[t][q] = ok[t][q] ? hu[n] : T(0);
        }
      }
    {
      T sc[NT][kSC];
      tile_scores<T, NT, kFirst>(pp, K, a, b, sc);
      tile_weights<T, NT>(sc, ok, s0, gj, gl, lme0, wt);
    }
    for (int64_t k = 0; k < K; ++k) {
      const T wa = pp[k], wb = pp[K + k], bias = pp[2 * K + k], v = pp[3 * K + k];
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        T dxs = T(0);
#pragma unroll
        for (int q = 0; q < kSC; ++q) {
          const T x = math::critic_x(wb, b[t][q], math::critic_u(wa, a[t][q], bias));
          dxs += math::critic_unit_dx(v, math::critic_unit_gate(x, wt[t][q]));
        }
        acc[t] += dxs * (kFirst ? wa : wb);
      }
    }
  }
}

// ghT: [m][B], every element written once.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_stats_bwd_h_kernel(const Args<T> g, const BwdArgs<T> d, const GatherArgs<T> ga, T* __restrict__ ghT) {
  constexpr int NT = kHNT;
  const int lane = threadIdx.x & 31;
  const int64_t tiles = (g.B + 32 * NT - 1) / (32 * NT);
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t wi = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; wi < g.m * tiles;
       wi += nwarps) {
    const int64_t u = wi / tiles;
    const int64_t n0 = (wi % tiles) * 32 * NT;
    int nn[NT];  // sample indices (B < 2^31, checked on the host)
    T acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      nn[t] = static_cast<int>(n0) + lane + 32 * t;
      acc[t] = T(0);
    }
    if (g.pairs == nullptr) {
      // Partners in increasing order; pair (min, max) has index offset(min) + max - min - 1.
      for (int64_t w = 0; w < u; ++w)
        gather_pair<T, false>(g, d, ga, math::pair_row_offset(w, g.m) + (u - w - 1), u, w, nn, acc);
      for (int64_t w = u + 1; w < g.m; ++w)
        gather_pair<T, true>(g, d, ga, math::pair_row_offset(u, g.m) + (w - u - 1), u, w, nn, acc);
    } else {
      for (int64_t e = ga.offsets[u]; e < ga.offsets[u + 1]; ++e) {
        const int64_t ent = ga.entries[e];
        if (ent < g.P) {
          gather_pair<T, true>(g, d, ga, ent, u, g.pairs[2 * ent + 1], nn, acc);
        } else {
          gather_pair<T, false>(g, d, ga, ent - g.P, u, g.pairs[2 * (ent - g.P)], nn, acc);
        }
      }
    }
    T* __restrict__ out = ghT + u * g.B;
#pragma unroll
    for (int t = 0; t < NT; ++t)
      if (nn[t] < g.B) out[nn[t]] = acc[t];
  }
}

// inv[r][perms[r][n]] = n (rows are permutations: one writer per element).
__global__ void __launch_bounds__(kThreads)
    invert_perms_kernel(const int64_t* __restrict__ perms, int64_t R, int64_t B, int64_t* __restrict__ inv) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < R * B; e += stride) {
    const int64_t r = e / B;
    const int64_t q = perms[e];
    CUDA_KERNEL_ASSERT(q >= 0 && q < B);
    inv[r * B + q] = e - r * B;
  }
}

// out[p] = grad_lme[p] * math::mine_ema_ratio(lme[p], ema[p][0], ema[p][1], log_a): MINE's
// moving-average rule for the upstream gradient of lme (the CPU's one pass applies the same
// function per pair).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mine_ema_grad_kernel(const T* __restrict__ grad_lme, const T* __restrict__ lme, const T* __restrict__ ema,
                         T log_a, int64_t P, T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += stride)
    out[p] = grad_lme[p] * math::mine_ema_ratio(lme[p], ema[2 * p], ema[2 * p + 1], log_a);
}

// ---- host side -----------------------------------------------------------------------------

// Blocks for `warps` warps, capped for grid-stride loops.
int64_t blocks_for_warps(int64_t warps) {
  return std::max<int64_t>(1, std::min<int64_t>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t{1} << 30));
}

struct Staged {
  PairStatsSizes s;
  at::ScalarType acc;
  at::Tensor hT, prm, c, perms, pairs;
};

Staged stage(const at::Tensor& h, const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b,
             const at::Tensor& v, const at::Tensor& c, const at::Tensor& perms,
             const c10::optional<at::Tensor>& pairs) {
  Staged st;
  st.s = check_pair_stats_args(h, wa, wb, b, v, c, perms, pairs);
  const at::ScalarType dt = h.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "pair_stats (CUDA): 'h' must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(h.is_cuda(), "pair_stats (CUDA): 'h' must be a CUDA tensor");
  TORCH_CHECK(st.s.B + 32 * kFwdNT < (int64_t{1} << 31), "pair_stats (CUDA): batch too large, B=", st.s.B);
  st.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  st.hT = h.t().to(st.acc).contiguous();
  st.prm = at::stack({wa, wb, b, v}, -2).to(st.acc).contiguous();  // [P', 4, K]
  st.c = c.to(st.acc).contiguous();
  st.perms = perms.contiguous();
  if (pairs.has_value()) st.pairs = pairs->contiguous();
  return st;
}

template <typename T>
Args<T> make_args(const Staged& st) {
  Args<T> g;
  g.hT = st.hT.data_ptr<T>();
  g.perms = st.perms.data_ptr<int64_t>();
  g.pairs = st.s.all_pairs ? nullptr : st.pairs.data_ptr<int64_t>();
  g.prm = st.prm.data_ptr<T>();
  g.c = st.c.data_ptr<T>();
  g.B = st.s.B;
  g.m = st.s.m;
  g.P = st.s.P;
  g.K = st.s.K;
  g.R = st.s.R;
  g.pstride = st.s.shared ? 0 : 4 * st.s.K;
  g.cstride = st.s.shared ? 0 : 1;
  return g;
}

std::tuple<at::Tensor, at::Tensor> pair_stats_fwd_cuda(const at::Tensor& h, const at::Tensor& wa,
                                                       const at::Tensor& wb, const at::Tensor& b,
                                                       const at::Tensor& v, const at::Tensor& c,
                                                       const at::Tensor& perms,
                                                       const c10::optional<at::Tensor>& pairs) {
  const c10::cuda::CUDAGuard guard(h.device());
  const Staged st = stage(h, wa, wb, b, v, c, perms, pairs);
  const at::TensorOptions acc_opts = h.options().dtype(st.acc);
  at::Tensor t_joint = at::empty({st.s.P}, acc_opts);
  at::Tensor lme = at::empty({st.s.P}, acc_opts);
  if (st.s.P > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(st.acc, "pair_stats_fwd_cuda", [&] {
      pair_stats_fwd_kernel<scalar_t><<<blocks_for_warps(st.s.P), kThreads, 0, stream>>>(
          make_args<scalar_t>(st), t_joint.data_ptr<scalar_t>(), lme.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {t_joint.to(h.scalar_type()), lme.to(h.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_stats_bwd_cuda(
    const at::Tensor& grad_t, const at::Tensor& grad_lme, const at::Tensor& h, const at::Tensor& wa,
    const at::Tensor& wb, const at::Tensor& b, const at::Tensor& v, const at::Tensor& c,
    const at::Tensor& perms, const c10::optional<at::Tensor>& pairs, const at::Tensor& lme, bool need_h,
    bool need_params) {
  const c10::cuda::CUDAGuard guard(h.device());
  const Staged st = stage(h, wa, wb, b, v, c, perms, pairs);
  const PairStatsSizes& s = st.s;
  for (const at::Tensor* t : {&grad_t, &grad_lme, &lme}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == s.P && t->scalar_type() == h.scalar_type() &&
                    t->device() == h.device(),
                "pair_stats_bwd: gradients and lme must be [P] tensors in h's dtype on h's device with P=",
                s.P, ", got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
  const at::TensorOptions acc_opts = h.options().dtype(st.acc);
  const at::Tensor gt = grad_t.to(st.acc).contiguous();
  const at::Tensor gl = grad_lme.to(st.acc).contiguous();
  const at::Tensor lm = lme.to(st.acc).contiguous();
  const int64_t K = s.K;

  // A gradient not asked for: its kernel is not launched and an empty [0] tensor is returned.
  auto none = [&] { return at::empty({0}, h.options()); };
  at::Tensor ghT = at::empty({need_h ? s.m : 0, need_h ? s.B : 0}, acc_opts);
  const int64_t prm_warps = s.shared ? std::min<int64_t>(s.P, kSharedWarps) : s.P;
  at::Tensor gprm = at::zeros({need_params ? (s.shared ? std::max<int64_t>(prm_warps, 1) : s.P) : 0, 4, K},
                              acc_opts);
  at::Tensor inv = at::empty({s.R, s.B}, perms.options());
  at::Tensor offsets, entries;
  if (!s.all_pairs && s.P > 0) {
    // CSR of each unit's pairs: entries e < P (unit is pair e's first member) and P + e
    // (second member), stably sorted by unit, so partners are visited in a fixed order.
    const at::Tensor keys = at::cat({st.pairs.select(1, 0), st.pairs.select(1, 1)});
    auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    entries = std::get<1>(sorted).contiguous();
    offsets = at::searchsorted(std::get<0>(sorted), at::arange(s.m + 1, perms.options())).contiguous();
  }

  if (s.P > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    invert_perms_kernel<<<blocks_for_warps((s.R * s.B + 31) / 32), kThreads, 0, stream>>>(
        st.perms.data_ptr<int64_t>(), s.R, s.B, inv.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES(st.acc, "pair_stats_bwd_cuda", [&] {
      using T = scalar_t;
      const Args<T> g = make_args<T>(st);
      BwdArgs<T> d;
      d.grad_t = gt.data_ptr<T>();
      d.grad_lme = gl.data_ptr<T>();
      d.lme = lm.data_ptr<T>();
      if (need_params) {
        pair_stats_bwd_params_kernel<T><<<blocks_for_warps(prm_warps), kThreads, 0, stream>>>(g, d, gprm.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (!need_h) return;
      GatherArgs<T> ga;
      ga.inv = inv.data_ptr<int64_t>();
      ga.offsets = s.all_pairs ? nullptr : offsets.data_ptr<int64_t>();
      ga.entries = s.all_pairs ? nullptr : entries.data_ptr<int64_t>();
      const int64_t tiles = (s.B + 32 * kHNT - 1) / (32 * kHNT);
      pair_stats_bwd_h_kernel<T><<<blocks_for_warps(s.m * tiles), kThreads, 0, stream>>>(g, d, ga, ghT.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    ghT.zero_();
  }

  const at::ScalarType dt = h.scalar_type();
  at::Tensor grad_h = need_h ? ghT.t().to(dt).contiguous() : none();
  if (!need_params) return {grad_h, none(), none(), none(), none(), none()};
  // A shared critic: the per-warp rows summed in a fixed order by ATen.
  const at::Tensor red = s.shared ? gprm.sum(0) : gprm;  // [4, K] or [P, 4, K]
  at::Tensor gwa = red.select(-2, 0).to(dt).contiguous();
  at::Tensor gwb = red.select(-2, 1).to(dt).contiguous();
  at::Tensor gb = red.select(-2, 2).to(dt).contiguous();
  at::Tensor gv = red.select(-2, 3).to(dt).contiguous();
  // d t_joint / d c = d lme / d c = 1.
  at::Tensor gc = s.shared ? gt.sum().add(gl.sum()).to(dt) : gt.add(gl).to(dt);
  return {grad_h, gwa, gwb, gb, gv, gc};
}

using EightTensors =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

EightTensors with_stats(const at::Tensor& t, const at::Tensor& l,
                        std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> g) {
  auto [gh, gwa, gwb, gb, gv, gc] = std::move(g);
  return {t, l, gh, gwa, gwb, gb, gv, gc};
}

// pair_stats_fwd_bwd on CUDA: the forward, then the backward with its lme (no one-pass kernel
// here; the CPU has one).
EightTensors pair_stats_fwd_bwd_cuda(const at::Tensor& grad_t, const at::Tensor& grad_lme, const at::Tensor& h,
                                     const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b,
                                     const at::Tensor& v, const at::Tensor& c, const at::Tensor& perms,
                                     const c10::optional<at::Tensor>& pairs, bool need_h, bool need_params) {
  auto [t, l] = pair_stats_fwd_cuda(h, wa, wb, b, v, c, perms, pairs);
  return with_stats(t, l, pair_stats_bwd_cuda(grad_t, grad_lme, h, wa, wb, b, v, c, perms, pairs, l, need_h,
                                               need_params));
}

// pair_stats_fwd_bwd_mine on CUDA: the forward, mine_ema_grad_kernel on its lme, the backward.
EightTensors pair_stats_fwd_bwd_mine_cuda(const at::Tensor& grad_t, const at::Tensor& grad_lme,
                                          const at::Tensor& ema, double log_a, const at::Tensor& h,
                                          const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b,
                                          const at::Tensor& v, const at::Tensor& c, const at::Tensor& perms,
                                          const c10::optional<at::Tensor>& pairs, bool need_h, bool need_params) {
  TORCH_CHECK(need_h || need_params, "pair_stats_fwd_bwd_mine: at least one of need_h, need_params must be true");
  const int64_t P = check_pair_stats_args(h, wa, wb, b, v, c, perms, pairs).P;
  check_mine_rule_args("pair_stats_fwd_bwd_mine", ema, log_a, P, h);
  TORCH_CHECK(grad_lme.dim() == 1 && grad_lme.size(0) == P && grad_lme.scalar_type() == h.scalar_type() &&
                  grad_lme.device() == h.device(),
              "pair_stats_fwd_bwd_mine: 'grad_lme' must be a [P] tensor in h's dtype on h's device with P=", P,
              ", got ", grad_lme.sizes(), " ", grad_lme.scalar_type(), " on ", grad_lme.device());
  const c10::cuda::CUDAGuard guard(h.device());
  auto [t, l] = pair_stats_fwd_cuda(h, wa, wb, b, v, c, perms, pairs);
  const at::ScalarType acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor gl = grad_lme.to(acc).contiguous(), lm = l.to(acc).contiguous(), em = ema.to(acc).contiguous();
  at::Tensor gl_rule = at::empty({P}, gl.options());
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "pair_stats_fwd_bwd_mine_cuda", [&] {
      mine_ema_grad_kernel<scalar_t><<<blocks_for_warps((P + 31) / 32), kThreads, 0,
                                       c10::cuda::getCurrentCUDAStream()>>>(
          gl.data_ptr<scalar_t>(), lm.data_ptr<scalar_t>(), em.data_ptr<scalar_t>(), static_cast<scalar_t>(log_a), P,
          gl_rule.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return with_stats(t, l, pair_stats_bwd_cuda(grad_t, gl_rule.to(h.scalar_type()), h, wa, wb, b, v, c, perms, pairs,
                                               l, need_h, need_params));
}

}  // namespace
}  // namespace cuda
}  // namespace mmim_ext

TORCH_LIBRARY_IMPL(mmim_ext, CUDA, m) {
  m.impl("pair_stats_fwd", &mmim_ext::cuda::pair_stats_fwd_cuda);
  m.impl("pair_stats_bwd", &mmim_ext::cuda::pair_stats_bwd_cuda);
  m.impl("pair_stats_fwd_bwd", &mmim_ext::cuda::pair_stats_fwd_bwd_cuda);
  m.impl("pair_stats_fwd_bwd_mine", &mmim_ext::cuda::pair_stats_fwd_bwd_mine_cuda);
}
