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

// exp and the merge of two log-sum-exp states are the pair_stats header's (one implementation
// of the vectorizable float exp and of the online log-sum-exp for every op).
using math::exp_lse;
using math::lse_merge;

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
  return exp_lse(s - block_max);
}

// log sum exp of everything merged into the state.
template <typename T>
MMIM_HD T lse_finish(LseState<T> st) {
  return st.max + ::log(st.sum);
}

// Softmax weight of a pair in the backward, times the upstream gradient of its row.
template <typename T>
MMIM_HD T pair_weight(T s, T out_n, T grad_n) {
  return grad_n * exp_lse(s - out_n);
}

}  // namespace kde
}  // namespace mmim_ext
