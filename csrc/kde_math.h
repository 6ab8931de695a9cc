// Per-element math of kde_lse, shared by the CPU and CUDA kernels.
//
//   out[n] = log sum_l exp(-scale * ||x_n - y_l||^2)
//
// Small inline functions on scalars, compiled for the host by the C++ compiler and for the device
// by nvcc (MMIM_HD from pair_stats_math.h, expanding to __host__ __device__ there), so the CPU tests check the arithmetic the GPU runs.
// The kernels only differ in how they tile rows and columns and where partial states are merged.
//
// Forward: a row keeps an online log-sum-exp state (running maximum and sum of exp(s - max)) and
// merges one block of scores at a time. Backward (flash-attention style): with the forward's
// out[n], the softmax weight of pair (n, l) is w = exp(s_nl - out[n]); then
//   d out[n] / d x_n = -2 scale * sum_l w_nl (x_n - y_l)
//   d out[n] / d y_l =  2 scale * w_nl (x_n - y_l)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "pair_stats_math.h"  // MMIM_HD, math::LseState, math::lse_empty

namespace mmim_ext {
namespace kde {

using math::LseState;

// exp for the arguments this op produces: a score minus a maximum (<= 0) or minus the row's
// log-sum-exp (<= 0 up to rounding). On the device the hardware exp. On the host, float uses
// Cody-Waite range reduction and a degree-7 Taylor polynomial on |r| <= ln2/2 (below 2 ulp);
// arguments below -87 (including -inf) are raised to -87 with an integer bit select instead of
// a comparison branch, which keeps the loops calling this vectorizable at the baseline
// instruction set (GCC does not if-convert the float ?: form there). The result for such
// arguments, about 1.6e-38, is negligible next to the exp(0) = 1 every block holds. double uses
// the library exp.
MMIM_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float lo = -87.0f;
  int32_t xb, lb;
  std::memcpy(&xb, &x, sizeof(xb));
  std::memcpy(&lb, &lo, sizeof(lb));
  const int32_t below = -static_cast<int32_t>(x < lo);  // all ones when x < lo
  const int32_t cb = (xb & ~below) | (lb & below);
  std::memcpy(&x, &cb, sizeof(x));
  // k = round(x / ln2) via the 1.5 * 2^23 shifter; k then sits in the low mantissa bits.
  const float shifter = 12582912.0f;
  float kf = x * 1.44269504088896341f + shifter;
  int32_t kbits;
  std::memcpy(&kbits, &kf, sizeof(kbits));
  kf -= shifter;
  const float r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t two_k_bits = (kbits - 0x4B400000 + 127) << 23;  // 2^k as float bits
  float two_k;
  std::memcpy(&two_k, &two_k_bits, sizeof(two_k));
  return p * two_k;
#endif
}

MMIM_HD double exp_nonpos(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// One term of the squared distance, accumulated coordinate by coordinate.
template <typename T>
MMIM_HD T sq_dist_step(T acc, T a, T b) {
  const T d = a - b;
  return acc + d * d;
}

// Kernel score of a pair from its squared distance.
template <typename T>
MMIM_HD T score(T scale, T dist2) {
  return -scale * dist2;
}

// State of a block of scores whose maximum is known: sum of exp(s - block_max) is accumulated
// by the caller with block_term.
template <typename T>
MMIM_HD T block_term(T s, T block_max) {
  return exp_nonpos(s - block_max);
}

// Add one score to a running state (for kernels that see scores one at a time).
template <typename T>
MMIM_HD LseState<T> lse_push(LseState<T> st, T s) {
  if (s > st.max) {
    // The old sum is rescaled to the new maximum; exp(-inf) of the empty state gives 0.
    const T rescale = st.max == -INFINITY ? T(0) : exp_nonpos(st.max - s);
    return LseState<T>{s, st.sum * rescale + T(1)};
  }
  return LseState<T>{st.max, st.sum + exp_nonpos(s - st.max)};
}

// Merge a block's (max, sum of exp(s - max)) into a running state (associative and commutative
// up to rounding, so per-thread or per-warp partial states can be merged in any tree).
template <typename T>
MMIM_HD LseState<T> lse_merge(LseState<T> st, LseState<T> block) {
  if (block.max == -INFINITY) return st;
  if (st.max == -INFINITY) return block;
  if (block.max > st.max) {
    const LseState<T> t = st;
    st = block;
    block = t;
  }
  return LseState<T>{st.max, st.sum + block.sum * exp_nonpos(block.max - st.max)};
}

// log sum exp of everything merged into the state.
template <typename T>
MMIM_HD T lse_finish(LseState<T> st) {
  return st.max + ::log(st.sum);
}

// Softmax weight of a pair in the backward, times the upstream gradient of its row.
template <typename T>
MMIM_HD T pair_weight(T s, T out_n, T grad_n) {
  return grad_n * exp_nonpos(s - out_n);
}

}  // namespace kde
}  // namespace mmim_ext
