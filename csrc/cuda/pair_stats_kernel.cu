// CUDA kernels of pair_stats: staging, indexing and reductions. The critic and log-sum-exp
// arithmetic is the shared header's (csrc/pair_stats_math.h), the same functions the CPU kernel
// runs, so the CPU tests check the GPU's per-element math; the kernels' device-side helpers
// (argument struct, tile scoring and weighting, warp reductions) are in pair_stats_device.cuh.
//
// Staging (ATen ops on the current stream):
//   hT  [m][B]      h transposed and converted to the accumulation type acc_t (float for
//                   float16/bfloat16/float32, double for float64), so a unit's samples are
//                   contiguous and every kernel below reads h with lanes on neighbouring samples
//   wa, wb, b, v, c read in place through their row strides (0 for a shared critic); only
//                   float16/bfloat16 parameters (converted to acc_t) or a stride along K other
//                   than 1 make a packed copy
//   inv [R][B]      inverse permutations, built by check_inputs_kernel, which also checks the
//                   indices and h like the CPU kernel; the host reads its flags and raises (one
//                   synchronization per call, skipped while a CUDA graph is being captured)
//
// Kernels (128 threads = 4 warps per block; a warp owns a pair or a unit, its lanes own samples):
//   fwd         warp per pair p; lanes take samples n = lane + 32 t (kFwdNT per lane per tile),
//               sources (joint, shuffle 1..R) in chunks of kSC; joint scores summed and shuffled
//               ones folded into a per-lane online log-sum-exp, both reduced across the warp by a
//               butterfly (every lane gets the same, order-independent result: deterministic).
//   bwd_params  warp per pair: recompute the scores of a tile, weight them (joint: grad_t / B,
//               shuffled: grad_lme exp(T - lme) / (R B)), then per hidden unit reduce the four
//               parameter gradients across the warp; lane 0 writes them to the pair's own rows
//               of the four gradient outputs (one critic per pair) or to the warp's own row of a
//               [warps][4][K] buffer that ATen sums afterwards (shared critic). No atomics;
//               fixed order: deterministic.
//   bwd_h       gather formulation: warp per (unit u, tile of 32 kHNT samples), a lane owns
//               grad h[n, u] and sums over all partners of u (as first argument: d/da over the
//               joint and shuffled samples at n; as second argument: the joint sample at n and,
//               for each shuffle r, the sample n' = perms[r]^-1(n) that paired h[n, u]). Every
//               output element has one writer: no atomics, deterministic.
// Every gradient output has its own storage (torch.library's contract: outputs never alias).
// float32/float64 gradients are written by the kernels into their outputs; float16/bfloat16 ones
// are accumulated in float32 and converted once.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
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
#include "pair_stats_device.cuh"
#include "pair_stats_math.h"

namespace mmim_ext {
namespace cuda {
namespace {

// ---- forward -------------------------------------------------------------------------------

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
    const Critic<T> cr = critic_of(g, p);
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
        tile_scores<T, NT, true>(cr, g.K, a, b, sc);
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
      const T cp = g.c[p * g.c_rs];
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
  const T* lme;       // [P], in acc_t (for float16/bfloat16 inputs: not rounded to the input dtype)
};

// Where bwd_params writes: row r of each of the four gradients at r * rs (K contiguous values).
// One critic per pair: the four [P, K] outputs (or float32 buffers), r = p, rs = K. Shared critic:
// a [warps][4][K] buffer, r = the warp, rs = 4 K, the four pointers K apart.
template <typename T>
struct GradOut {
  T* wa;
  T* wb;
  T* bias;
  T* v;
  int64_t rs;
};

// float: at least 4 blocks (16 warps) per SM, at most 128 registers. Left to itself, ptxas gives
// the float kernel 146 registers on sm_90 (3 blocks) since it reads the critic and writes its
// gradients through four pointers each; bounded, it needs 107 (117 on sm_80) and spills nothing.
template <typename T>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 4 : 1)
    pair_stats_bwd_params_kernel(const Args<T> g, const BwdArgs<T> d, const GradOut<T> o) {
  constexpr int NT = kPrmNT;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t S = 1 + g.R;
  const int64_t K = g.K;
  for (int64_t p = warp; p < g.P; p += nwarps) {
    int64_t i, j;
    pair_of(g.pairs, g.m, p, &i, &j);
    const Critic<T> cr = critic_of(g, p);
    const T* __restrict__ ha = g.hT + i * g.B;
    const T* __restrict__ hb = g.hT + j * g.B;
    const int64_t row = (g.shared ? warp : p) * o.rs;
    T* __restrict__ dwa = o.wa + row;
    T* __restrict__ dwb = o.wb + row;
    T* __restrict__ dbias = o.bias + row;
    T* __restrict__ dv = o.v + row;
    // The row's first contribution is stored, later ones added, so the outputs need no zero
    // fill: a per-pair row is first reached at its pair's first tile and source chunk, a shared
    // critic's warp row at the warp's first pair (p == warp).
    const bool row_is_new = !g.shared || p == warp;
    const T gj = d.grad_t[p] / static_cast<T>(g.B);
    const T gl = d.grad_lme[p] / static_cast<T>(g.R * g.B);
    const T lme0 = d.lme[p] - g.c[p * g.c_rs];
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
          tile_scores<T, NT, true>(cr, K, a, b, sc);
          tile_weights<T, NT>(sc, ok, s0, gj, gl, lme0, w);
        }
        const bool store = row_is_new && n0 == 0 && s0 == 0;
        for (int64_t k = 0; k < K; ++k) {
          const T wa = cr.wa[k], wb = cr.wb[k], bias = cr.bias[k], v = cr.v[k];
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
            if (store) {
              dwa[k] = gwa;
              dwb[k] = gwb;
              dbias[k] = gb;
              dv[k] = gv;
            } else {
              dwa[k] += gwa;
              dwb[k] += gwb;
              dbias[k] += gb;
              dv[k] += gv;
            }
          }
        }
      }
    }
  }
}

// ---- backward: h (gather) ------------------------------------------------------------------

struct GatherArgs {
  const int64_t* inv;      // [R][B] inverse permutations
  const int64_t* offsets;  // [m + 1] CSR offsets into entries (explicit pairs only)
  const int64_t* entries;  // [2P]: e < P -> unit is pair e's first member, else pair e - P's second
};

// Adds to acc[t] the gradient w.r.t. h[n_t, u] through pair p, where u is the pair's first
// member (kFirst) or second member and w the other one.
template <typename T, bool kFirst>
__device__ __forceinline__ void gather_pair(const Args<T>& g, const BwdArgs<T>& d, const GatherArgs& ga,
                                            int64_t p, int64_t u, int64_t w, const int (&nn)[kHNT],
                                            T (&acc)[kHNT]) {
  constexpr int NT = kHNT;
  CUDA_KERNEL_ASSERT(w >= 0 && w < g.m);
  const int64_t S = 1 + g.R;
  const int64_t K = g.K;
  const Critic<T> cr = critic_of(g, p);
  const T* __restrict__ hu = g.hT + u * g.B;
  const T* __restrict__ hw = g.hT + w * g.B;
  const T gj = d.grad_t[p] / static_cast<T>(g.B);
  const T gl = d.grad_lme[p] / static_cast<T>(g.R * g.B);
  const T lme0 = d.lme[p] - g.c[p * g.c_rs];
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
      tile_scores<T, NT, kFirst>(cr, K, a, b, sc);
      tile_weights<T, NT>(sc, ok, s0, gj, gl, lme0, wt);
    }
    for (int64_t k = 0; k < K; ++k) {
      const T wa = cr.wa[k], wb = cr.wb[k], bias = cr.bias[k], v = cr.v[k];
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

// gh: [B][m] (grad h itself, or its float32 buffer for float16/bfloat16), every element written
// once.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_stats_bwd_h_kernel(const Args<T> g, const BwdArgs<T> d, const GatherArgs ga, T* __restrict__ gh) {
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
    // Lanes hold neighbouring samples, so these stores are m elements apart: one per output
    // element after m - 1 partners' worth of arithmetic, not worth a transpose through shared
    // memory.
#pragma unroll
    for (int t = 0; t < NT; ++t)
      if (nn[t] < g.B) gh[static_cast<int64_t>(nn[t]) * g.m + u] = acc[t];
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
  at::ScalarType dt, acc;     // the inputs' dtype and the accumulation type
  at::TensorOptions acc_opts;  // acc on h's device
  cudaStream_t stream;         // the current stream of h's device
  at::Tensor hT, wa, wb, b, v, c, perms, pairs, inv;
};

// A critic parameter as the kernels read it: in acc_t, with unit stride along K and any row
// stride. float32/float64 parameters are used in place; a copy is made only to convert
// float16/bfloat16 or to repack a stride along K other than 1.
at::Tensor kernel_param(const at::Tensor& t, at::ScalarType acc) {
  at::Tensor r = t.scalar_type() == acc ? t : t.to(acc);
  if (r.size(-1) > 1 && r.stride(-1) != 1) r = r.contiguous();
  return r;
}

// Runs check_inputs_kernel (which also builds st.inv) and, unless the stream is capturing a CUDA
// graph, reads its flags and raises the CPU kernel's errors: a direct call of the op that skips
// the Python wrapper's checks gets a clear error, not wrong results or a device-side assert. The
// price is one synchronization per call. Under capture no synchronization is allowed; the
// kernels' device-side asserts remain.
void check_inputs(Staged& st) {
  const PairStatsSizes& s = st.s;
  st.inv = at::full({s.R, s.B}, -1, st.perms.options());
  const at::Tensor err = at::zeros({4}, st.perms.options());
  const int64_t n_pair_idx = s.all_pairs ? 0 : 2 * s.P;
  const int64_t total = s.R * s.B + n_pair_idx + s.m * s.B;
  AT_DISPATCH_FLOATING_TYPES(st.acc, "pair_stats_check_cuda", [&] {
    check_inputs_kernel<scalar_t><<<blocks_for_warps((total + 31) / 32), kThreads, 0, st.stream>>>(
        st.perms.data_ptr<int64_t>(), s.R, s.B, s.all_pairs ? nullptr : st.pairs.data_ptr<int64_t>(), n_pair_idx,
        s.m, st.hT.data_ptr<scalar_t>(), st.inv.data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(err.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(st.stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  const at::Tensor flags = err.cpu();  // waits for the stream
  const int64_t* fl = flags.data_ptr<int64_t>();
  const uint64_t f[4] = {static_cast<uint64_t>(fl[0]), static_cast<uint64_t>(fl[1]), static_cast<uint64_t>(fl[2]),
                         static_cast<uint64_t>(fl[3])};
  TORCH_CHECK(f[0] == 0, "pair_stats: row ", s.R - static_cast<int64_t>(f[0]), " of 'perms' is not a permutation of 0..",
              s.B - 1);
  if (f[1] != 0 || f[2] != 0) {
    const int64_t q = f[1] != 0 ? static_cast<int64_t>(uint64_t{0} - f[1]) : static_cast<int64_t>(f[2]) + (s.m - 1);
    TORCH_CHECK(false, "pair_stats: 'pairs' holds unit index ", q, ", expected all in [0, ", s.m - 1, "]");
  }
  TORCH_CHECK(f[3] == 0, "pair_stats: 'h' contains NaN or infinite values");
}

// Checks, staging and the inverse permutations of a call; the caller holds the device guard.
Staged stage(const at::Tensor& h, const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b,
             const at::Tensor& v, const at::Tensor& c, const at::Tensor& perms,
             const c10::optional<at::Tensor>& pairs) {
  Staged st;
  st.s = check_pair_stats_args(h, wa, wb, b, v, c, perms, pairs);
  st.dt = h.scalar_type();
  TORCH_CHECK(st.dt == at::kFloat || st.dt == at::kDouble || st.dt == at::kHalf || st.dt == at::kBFloat16,
              "pair_stats (CUDA): 'h' must be float32, float64, float16 or bfloat16, got ", st.dt);
  TORCH_CHECK(h.is_cuda(), "pair_stats (CUDA): 'h' must be a CUDA tensor");
  TORCH_CHECK(st.s.B + 32 * kFwdNT < (int64_t{1} << 31), "pair_stats (CUDA): batch too large, B=", st.s.B);
  st.acc = st.dt == at::kDouble ? at::kDouble : at::kFloat;
  st.acc_opts = h.options().dtype(st.acc);
  st.stream = c10::cuda::getCurrentCUDAStream();
  st.hT = h.t().to(st.acc).contiguous();
  st.wa = kernel_param(wa, st.acc);
  st.wb = kernel_param(wb, st.acc);
  st.b = kernel_param(b, st.acc);
  st.v = kernel_param(v, st.acc);
  st.c = c.scalar_type() == st.acc ? c : c.to(st.acc);  // read as c[p * stride]: any stride
  st.perms = perms.contiguous();
  if (pairs.has_value()) st.pairs = pairs->contiguous();
  check_inputs(st);
  return st;
}

template <typename T>
Args<T> make_args(const Staged& st) {
  const bool shared = st.s.shared;
  Args<T> g;
  g.hT = st.hT.data_ptr<T>();
  g.perms = st.perms.data_ptr<int64_t>();
  g.pairs = st.s.all_pairs ? nullptr : st.pairs.data_ptr<int64_t>();
  g.wa = st.wa.data_ptr<T>();
  g.wb = st.wb.data_ptr<T>();
  g.bias = st.b.data_ptr<T>();
  g.v = st.v.data_ptr<T>();
  g.c = st.c.data_ptr<T>();
  g.wa_rs = shared ? 0 : st.wa.stride(0);
  g.wb_rs = shared ? 0 : st.wb.stride(0);
  g.bias_rs = shared ? 0 : st.b.stride(0);
  g.v_rs = shared ? 0 : st.v.stride(0);
  g.c_rs = shared ? 0 : st.c.stride(0);
  g.B = st.s.B;
  g.m = st.s.m;
  g.P = st.s.P;
  g.K = st.s.K;
  g.R = st.s.R;
  g.shared = shared;
  return g;
}

// The statistics in acc_t (t_joint, lme), [P] each.
std::pair<at::Tensor, at::Tensor> forward_acc(const Staged& st) {
  at::Tensor t_joint = at::empty({st.s.P}, st.acc_opts);
  at::Tensor lme = at::empty({st.s.P}, st.acc_opts);
  if (st.s.P > 0) {
    AT_DISPATCH_FLOATING_TYPES(st.acc, "pair_stats_fwd_cuda", [&] {
      pair_stats_fwd_kernel<scalar_t><<<blocks_for_warps(st.s.P), kThreads, 0, st.stream>>>(
          make_args<scalar_t>(st), t_joint.data_ptr<scalar_t>(), lme.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {t_joint, lme};
}

// The upstream gradients (and lme) must be [P] tensors in h's dtype on h's device.
void check_per_pair(const char* op, std::initializer_list<const at::Tensor*> ts, const Staged& st,
                    const at::Tensor& h) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == st.s.P && t->scalar_type() == st.dt && t->device() == h.device(), op,
                ": the upstream gradients (and lme) must be [P] tensors in h's dtype on h's device with P=", st.s.P,
                ", got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Gradients w.r.t. (h, wa, wb, b, v, c) in h's dtype from the upstream gradients gt, gl and lme,
// all [P] in acc_t. A gradient not asked for is an empty [0] tensor (a new one each).
Grads backward_acc(const Staged& st, const at::Tensor& gt, const at::Tensor& gl, const at::Tensor& lm, bool need_h,
                   bool need_params) {
  const PairStatsSizes& s = st.s;
  const int64_t K = s.K;
  const bool convert = st.acc != st.dt;  // float16/bfloat16: float32 buffers, converted once
  auto none = [&] { return at::empty({0}, st.acc_opts.dtype(st.dt)); };
  at::Tensor gh = need_h ? at::empty({s.B, s.m}, st.acc_opts) : none();
  const int64_t prm_warps = s.shared ? std::min<int64_t>(s.P, kSharedWarps) : s.P;
  at::Tensor gwa, gwb, gb, gv, warp_rows;
  if (need_params) {
    if (s.shared) {
      // [warps][4][K]: every row is written by its warp (each warp < P gets pair `warp` first).
      warp_rows = at::empty({std::max<int64_t>(prm_warps, 1), 4, K}, st.acc_opts);
      if (s.P == 0) warp_rows.zero_();
    } else {
      gwa = at::empty({s.P, K}, st.acc_opts);
      gwb = at::empty({s.P, K}, st.acc_opts);
      gb = at::empty({s.P, K}, st.acc_opts);
      gv = at::empty({s.P, K}, st.acc_opts);
    }
  }
  at::Tensor offsets, entries;
  if (need_h && !s.all_pairs && s.P > 0) {
    // CSR of each unit's pairs: entries e < P (unit is pair e's first member) and P + e
    // (second member), stably sorted by unit, so partners are visited in a fixed order.
    const at::Tensor keys = at::cat({st.pairs.select(1, 0), st.pairs.select(1, 1)});
    auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    entries = std::get<1>(sorted).contiguous();
    offsets = at::searchsorted(std::get<0>(sorted), at::arange(s.m + 1, st.perms.options())).contiguous();
  }

  if (s.P > 0) {
    AT_DISPATCH_FLOATING_TYPES(st.acc, "pair_stats_bwd_cuda", [&] {
      using T = scalar_t;
      const Args<T> g = make_args<T>(st);
      const BwdArgs<T> d{gt.data_ptr<T>(), gl.data_ptr<T>(), lm.data_ptr<T>()};
      if (need_params) {
        GradOut<T> o;
        if (s.shared) {
          T* rows = warp_rows.data_ptr<T>();
          o = GradOut<T>{rows, rows + K, rows + 2 * K, rows + 3 * K, 4 * K};
        } else {
          o = GradOut<T>{gwa.data_ptr<T>(), gwb.data_ptr<T>(), gb.data_ptr<T>(), gv.data_ptr<T>(), K};
        }
        pair_stats_bwd_params_kernel<T><<<blocks_for_warps(prm_warps), kThreads, 0, st.stream>>>(g, d, o);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_h) {
        const GatherArgs ga{st.inv.data_ptr<int64_t>(), s.all_pairs ? nullptr : offsets.data_ptr<int64_t>(),
                            s.all_pairs ? nullptr : entries.data_ptr<int64_t>()};
        const int64_t tiles = (s.B + 32 * kHNT - 1) / (32 * kHNT);
        pair_stats_bwd_h_kernel<T><<<blocks_for_warps(s.m * tiles), kThreads, 0, st.stream>>>(g, d, ga,
                                                                                              gh.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  } else if (need_h) {
    gh.zero_();
  }

  if (need_h && convert) gh = gh.to(st.dt);
  if (!need_params) return {gh, none(), none(), none(), none(), none()};
  if (s.shared) {
    // The per-warp rows summed by ATen in a fixed order, one reduction per gradient (each its
    // own storage).
    gwa = warp_rows.select(1, 0).sum(0);
    gwb = warp_rows.select(1, 1).sum(0);
    gb = warp_rows.select(1, 2).sum(0);
    gv = warp_rows.select(1, 3).sum(0);
  }
  if (convert) {
    gwa = gwa.to(st.dt);
    gwb = gwb.to(st.dt);
    gb = gb.to(st.dt);
    gv = gv.to(st.dt);
  }
  // d t_joint / d c = d lme / d c = 1.
  const at::Tensor gc = s.shared ? gt.sum().add(gl.sum()) : gt.add(gl);
  return {gh, gwa, gwb, gb, gv, gc.to(st.dt)};
}

at::Tensor to_acc(const at::Tensor& t, const Staged& st) { return t.to(st.acc).contiguous(); }

std::tuple<at::Tensor, at::Tensor> pair_stats_fwd_cuda(const at::Tensor& h, const at::Tensor& wa,
                                                       const at::Tensor& wb, const at::Tensor& b,
                                                       const at::Tensor& v, const at::Tensor& c,
                                                       const at::Tensor& perms,
                                                       const c10::optional<at::Tensor>& pairs) {
  const c10::cuda::CUDAGuard guard(h.device());
  const Staged st = stage(h, wa, wb, b, v, c, perms, pairs);
  auto [t_joint, lme] = forward_acc(st);
  return {t_joint.to(st.dt), lme.to(st.dt)};
}

Grads pair_stats_bwd_cuda(const at::Tensor& grad_t, const at::Tensor& grad_lme, const at::Tensor& h,
                          const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b, const at::Tensor& v,
                          const at::Tensor& c, const at::Tensor& perms, const c10::optional<at::Tensor>& pairs,
                          const at::Tensor& lme, bool need_h, bool need_params) {
  const c10::cuda::CUDAGuard guard(h.device());
  const Staged st = stage(h, wa, wb, b, v, c, perms, pairs);
  check_per_pair("pair_stats_bwd", {&grad_t, &grad_lme, &lme}, st, h);
  at::Tensor lm = to_acc(lme, st);
  if (st.acc != st.dt && st.s.P > 0 && (need_h || need_params)) {
    // float16/bfloat16: the forward rounded lme to the input dtype, which would put an error of
    // up to half an ulp of |lme| into every weight exp(T - lme) (bfloat16: 3% at |lme| = 8, 28%
    // at 64). The forward runs again in float32 and the bits its rounding dropped are added back:
    // lme + (l32 - round(l32)), which is l32 itself when lme is the forward's output (and within
    // half an ulp of any other lme passed in).
    // (Where round(l32) overflows float16 the residual is NaN; lme is then infinite already, and
    // the residual is dropped.)
    const at::Tensor l32 = forward_acc(st).second;
    lm = lm.add(l32.sub(l32.to(st.dt).to(st.acc)).nan_to_num_(0.0, 0.0, 0.0));
  }
  return backward_acc(st, to_acc(grad_t, st), to_acc(grad_lme, st), lm, need_h, need_params);
}

using EightTensors =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

EightTensors with_stats(const at::Tensor& t, const at::Tensor& l, Grads g) {
  auto [gh, gwa, gwb, gb, gv, gc] = std::move(g);
  return {t, l, gh, gwa, gwb, gb, gv, gc};
}

// pair_stats_fwd_bwd on CUDA: the forward, then the backward with its unrounded lme (no one-pass
// kernel here; the CPU has one).
EightTensors pair_stats_fwd_bwd_cuda(const at::Tensor& grad_t, const at::Tensor& grad_lme, const at::Tensor& h,
                                     const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b,
                                     const at::Tensor& v, const at::Tensor& c, const at::Tensor& perms,
                                     const c10::optional<at::Tensor>& pairs, bool need_h, bool need_params) {
  const c10::cuda::CUDAGuard guard(h.device());
  const Staged st = stage(h, wa, wb, b, v, c, perms, pairs);
  check_per_pair("pair_stats_fwd_bwd", {&grad_t, &grad_lme}, st, h);
  auto [t, l] = forward_acc(st);
  Grads g = backward_acc(st, to_acc(grad_t, st), to_acc(grad_lme, st), l, need_h, need_params);
  return with_stats(t.to(st.dt), l.to(st.dt), std::move(g));
}

// pair_stats_fwd_bwd_mine on CUDA: the forward, mine_ema_grad_kernel on its lme, the backward.
EightTensors pair_stats_fwd_bwd_mine_cuda(const at::Tensor& grad_t, const at::Tensor& grad_lme,
                                          const at::Tensor& ema, double log_a, const at::Tensor& h,
                                          const at::Tensor& wa, const at::Tensor& wb, const at::Tensor& b,
                                          const at::Tensor& v, const at::Tensor& c, const at::Tensor& perms,
                                          const c10::optional<at::Tensor>& pairs, bool need_h, bool need_params) {
  TORCH_CHECK(need_h || need_params, "pair_stats_fwd_bwd_mine: at least one of need_h, need_params must be true");
  const c10::cuda::CUDAGuard guard(h.device());
  const Staged st = stage(h, wa, wb, b, v, c, perms, pairs);
  const int64_t P = st.s.P;
  check_mine_rule_args("pair_stats_fwd_bwd_mine", ema, log_a, P, h);
  check_per_pair("pair_stats_fwd_bwd_mine", {&grad_t, &grad_lme}, st, h);
  at::Tensor t, l;  // not a structured binding: the kernel launch's lambda captures l (C++17)
  std::tie(t, l) = forward_acc(st);
  const at::Tensor gl = to_acc(grad_lme, st), em = to_acc(ema, st);
  at::Tensor gl_rule = at::empty({P}, st.acc_opts);
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES(st.acc, "pair_stats_fwd_bwd_mine_cuda", [&] {
      mine_ema_grad_kernel<scalar_t><<<blocks_for_warps((P + 31) / 32), kThreads, 0, st.stream>>>(
          gl.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), em.data_ptr<scalar_t>(), static_cast<scalar_t>(log_a), P,
          gl_rule.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  Grads g = backward_acc(st, to_acc(grad_t, st), gl_rule, l, need_h, need_params);
  return with_stats(t.to(st.dt), l.to(st.dt), std::move(g));
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
