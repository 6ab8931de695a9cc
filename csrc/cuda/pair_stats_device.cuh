// Device-side building blocks of the pair_stats CUDA kernels (csrc/cuda/pair_stats_kernel.cu):
// the kernels' argument struct, index helpers, warp reductions and the tile routines that score
// and weight samples. The per-element arithmetic is the shared header's (csrc/pair_stats_math.h).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "pair_stats_math.h"

namespace mmim_ext {
namespace cuda {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kSC = 2;    // sources (joint or shuffle rows) per chunk: R = 1 is one chunk
constexpr int kFwdNT = 4;  // samples per lane per tile in the forward (a tile is 128 samples)
constexpr int kPrmNT = 8;  // in bwd_params: fewer tiles, fewer warp reductions per hidden unit
constexpr int kHNT = 2;    // in bwd_h: small tiles keep m * ceil(B / 64) warps busy
// Warps of bwd_params for a shared critic: a fixed count (not the GPU's SM count), so the
// reduction order, hence the result, is the same on every GPU.
constexpr int64_t kSharedWarps = 4096;

// Everything the kernels read. The critic's four parameter tensors are read where they are
// (unit stride along K, any row stride: 0 for a shared critic), so a call copies none of the
// [P, K] parameters unless they must be converted (float16/bfloat16) or repacked (a stride
// along K other than 1).
template <typename T>
struct Args {
  const T* hT;            // [m][B]
  const int64_t* perms;   // [R][B]
  const int64_t* pairs;   // [P][2] contiguous, or nullptr: all i < j, row-major
  const T* wa;            // row p of each parameter at p * its row stride, K contiguous values
  const T* wb;
  const T* bias;
  const T* v;
  const T* c;             // c[p * c_rs]
  int64_t wa_rs, wb_rs, bias_rs, v_rs, c_rs;
  int64_t B, m, P, K, R;
  bool shared;            // one critic for all pairs (its gradients are summed over pairs)
};

// Pair p's critic: K contiguous values of each parameter.
template <typename T>
struct Critic {
  const T* wa;
  const T* wb;
  const T* bias;
  const T* v;
};

template <typename T>
__device__ __forceinline__ Critic<T> critic_of(const Args<T>& g, int64_t p) {
  return Critic<T>{g.wa + p * g.wa_rs, g.wb + p * g.wb_rs, g.bias + p * g.bias_rs, g.v + p * g.v_rs};
}

__device__ __forceinline__ void pair_of(const int64_t* pairs, int64_t m, int64_t p, int64_t* i, int64_t* j) {
  if (pairs == nullptr) {
    math::pair_from_index(p, m, i, j);
  } else {
    *i = pairs[2 * p];
    *j = pairs[2 * p + 1];
    CUDA_KERNEL_ASSERT(*i >= 0 && *i < m && *j >= 0 && *j < m);
  }
}

// Row r of perms (or of the inverse permutations) at sample n, bounds-checked: the host checks
// the rows before every launch, except while a CUDA graph is being captured.
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
__device__ __forceinline__ void tile_scores(const Critic<T>& cr, int64_t K, const T (&a)[NT][kSC],
                                            const T (&b)[NT][kSC], T (&sc)[NT][kSC]) {
  const T* __restrict__ pwa = cr.wa;
  const T* __restrict__ pwb = cr.wb;
  const T* __restrict__ pbias = cr.bias;
  const T* __restrict__ pv = cr.v;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int q = 0; q < kSC; ++q) sc[t][q] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T wa = pwa[k], wb = pwb[k], bias = pbias[k], v = pv[k];
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

// Finite (neither NaN nor infinite), from the exponent bits: independent of fast-math flags.
__device__ __forceinline__ bool finite_bits(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool finite_bits(double x) {
  return (static_cast<unsigned long long>(__double_as_longlong(x)) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// ---- checks and inverse permutations --------------------------------------------------------

// The CPU kernel's value checks (check_values in csrc/cpu/pair_stats_kernel.cpp) on the device,
// and the inverse permutations inv[r][perms[r][n]] = n (inv filled with -1 beforehand: a slot
// that stays -1 belongs to a row that is no permutation, which the host reports; under graph
// capture the gather's perm_at assert catches it). Flags, 0 = fine; where several entries are
// bad the largest value is kept, so the report does not depend on scheduling:
//   err[0] = R - r for a row r of perms with an index outside [0, B) or a repeated one (the
//            first such row wins)
//   err[1] = -q for a negative unit index q in pairs (the most negative wins; modulo 2^64)
//   err[2] = q - (m - 1) for a unit index q >= m in pairs (the largest wins)
//   err[3] = 1 when h holds a NaN or an infinity
constexpr unsigned long long kNoInverse = ~0ull;  // -1 as stored in int64 inv

template <typename T>
__global__ void __launch_bounds__(kThreads)
    check_inputs_kernel(const int64_t* __restrict__ perms, int64_t R, int64_t B, const int64_t* __restrict__ pairs,
                        int64_t n_pair_idx, int64_t m, const T* __restrict__ hT, int64_t* __restrict__ inv,
                        unsigned long long* __restrict__ err) {
  const int64_t n_perm = R * B, n_h = m * B;
  const int64_t total = n_perm + n_pair_idx + n_h;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    if (e < n_perm) {
      const int64_t r = e / B;
      const int64_t q = perms[e];
      bool ok = q >= 0 && q < B;
      if (ok) {
        // One writer per slot when the row is a permutation; a second one finds it taken.
        unsigned long long* slot = reinterpret_cast<unsigned long long*>(inv + r * B + q);
        ok = atomicCAS(slot, kNoInverse, static_cast<unsigned long long>(e - r * B)) == kNoInverse;
      }
      if (!ok) atomicMax(err, static_cast<unsigned long long>(R - r));
    } else if (e < n_perm + n_pair_idx) {
      const int64_t q = pairs[e - n_perm];
      if (q < 0) atomicMax(err + 1, 0ull - static_cast<unsigned long long>(q));
      if (q >= m) atomicMax(err + 2, static_cast<unsigned long long>(q - (m - 1)));
    } else if (!finite_bits(hT[e - n_perm - n_pair_idx])) {
      atomicMax(err + 3, 1ull);
    }
  }
}

}  // namespace cuda
}  // namespace mmim_ext
