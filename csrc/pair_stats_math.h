// Per-element math of the pairwise critic statistics, shared by the CPU and CUDA kernels.
//
// Everything here is a small inline function on scalars, compiled for the host by the C++
// compiler and for the device by nvcc (MMIM_HD expands to __host__ __device__ there), so the CPU
// tests check the arithmetic the GPU runs. Only indexing, staging and reductions differ between
// the two kernels.
//
// The critic of pair p is T(a, b) = c + sum_k v_k * relu(wa_k * a + wb_k * b + bias_k). Its first
// layer is evaluated in two steps, u = wa*a + bias (shared by every sample that pairs the same a
// with different b: the joint sample and all shuffled ones) and x = wb*b + u.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MMIM_HD __host__ __device__ __forceinline__
#else
#define MMIM_HD inline __attribute__((always_inline))
#endif

namespace mmim_ext {
namespace math {

// ---- critic --------------------------------------------------------------------------------

// First half of the first layer: the part that depends on the pair's first unit only.
template <typename T>
MMIM_HD T critic_u(T wa, T a, T bias) {
  return wa * a + bias;
}

// Pre-activation of hidden unit k for second argument b.
template <typename T>
MMIM_HD T critic_x(T wb, T b, T u) {
  return wb * b + u;
}

// max(x, 0) and "y where x > 0, else 0" for scalars; the CPU kernel's SIMD type provides the
// same two functions (found by argument-dependent lookup), so the critic below is written once
// for scalars and vectors. max_zero keeps NaN (NaN <= 0 is false), as torch.relu does: a
// non-finite critic parameter must make the scores NaN, not 0.
MMIM_HD float max_zero(float x) { return x <= 0.0f ? 0.0f : x; }
MMIM_HD double max_zero(double x) { return x <= 0.0 ? 0.0 : x; }
MMIM_HD float where_positive(float x, float y) { return x > 0.0f ? y : 0.0f; }
MMIM_HD double where_positive(double x, double y) { return x > 0.0 ? y : 0.0; }
// "y where a > b, else 0".
MMIM_HD float where_greater(float a, float b, float y) { return a > b ? y : 0.0f; }
MMIM_HD double where_greater(double a, double b, double y) { return a > b ? y : 0.0; }

template <typename T>
MMIM_HD T relu(T x) {
  return max_zero(x);
}

// Contribution of one hidden unit to T: v * relu(x).
template <typename T>
MMIM_HD T critic_unit(T v, T x) {
  return v * relu(x);
}

// Backward of one hidden unit for a sample whose score has upstream weight g. Its gate is
// g [x > 0] ...
template <typename T>
MMIM_HD T critic_unit_gate(T x, T g) {
  return where_positive(x, g);
}

// ... d(g T)/dx = v gate, the gradient of the pre-activation, which flows to wa, wb, bias
// (times a, b, 1) and to the pair's two arguments (times wa, wb). It is linear in the gate, so a
// kernel may apply it to a sum of gates ...
template <typename T>
MMIM_HD T critic_unit_dx(T v, T gate) {
  return v * gate;
}

// ... and d(g T)/dv = g relu(x) = gate x. Wherever the gate is nonzero x = wa a + wb b + bias, so
// over a set of samples sum(gate x) = wa sum(gate a) + wb sum(gate b) + bias sum(gate): kernels
// sum gate a, gate b and gate (which the other gradients need anyway) and form dv from those
// three sums instead of summing gate x per sample. (Rounding: the error of each sum is scaled by
// |wa|, |wb|, |bias| instead of entering once; the same sums give dwa, dwb, dbias.)
template <typename T>
MMIM_HD T critic_unit_dv(T wa, T wb, T bias, T sum_gate_a, T sum_gate_b, T sum_gate) {
  return wa * sum_gate_a + wb * sum_gate_b + bias * sum_gate;
}

// The same gate [x > 0], x = wb b + (wa a + bias), as a comparison of b with a threshold that
// does not depend on b: for wb > 0 it is [b > t], for wb < 0 [b < t], with t = ta a + tb,
// ta = -wa / wb, tb = -bias / wb (one FMA per first argument instead of one per sample of each
// source). The two agree except where x lies within rounding of 0, where either is a valid
// subgradient of ReLU. sign is 0 where the threshold is not safe to use (wb zero, subnormal or
// NaN; ta or tb not finite): the gate then comes from x.
template <typename T>
struct GateThreshold {
  T ta, tb;
  int sign;
};

MMIM_HD float smallest_normal(float) { return 1.17549435e-38f; }
MMIM_HD double smallest_normal(double) { return 2.2250738585072014e-308; }

template <typename T>
MMIM_HD GateThreshold<T> gate_threshold(T wa, T wb, T bias) {
  GateThreshold<T> r{T(0), T(0), 0};
  const T mag = wb < T(0) ? -wb : wb;
  if (!(mag >= smallest_normal(wb))) return r;
  const T ta = -wa / wb, tb = -bias / wb;
  if (!(ta - ta == T(0) && tb - tb == T(0))) return r;  // x - x is 0 exactly when x is finite
  r.ta = ta;
  r.tb = tb;
  r.sign = wb > T(0) ? 1 : -1;
  return r;
}

// ---- exp -----------------------------------------------------------------------------------

// exp for the log-sum-exp. On the device the hardware exp is used. On the host, float uses a
// branch-free range reduction exp(x) = 2^k exp(r), k = round(x / ln2), |r| <= ln2/2, and a
// degree-7 Taylor polynomial for exp(r) (relative error below 2 ulp); the CPU kernel's SIMD
// version (csrc/cpu) runs the same steps and the same polynomial on whole vectors. double uses
// std::exp. Arguments below -87 give a tiny positive value instead of 0 (harmless in a sum that
// also holds exp(0) = 1), arguments above 88 are clamped.
struct ExpConst {
  static constexpr float lo = -87.0f;
  static constexpr float hi = 88.0f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693145751953125f;        // exact in float
  static constexpr float ln2_lo = 1.428606765330187045e-06f;  // ln2 - ln2_hi
  static constexpr float shifter = 12582912.0f;               // 1.5 * 2^23: rounds to integer
  static constexpr int32_t shifter_bits = 0x4B400000;         // bit pattern of `shifter`
};

// exp(r) for |r| <= ln2/2 by Horner's rule on the Taylor series to degree 7; T is float or a
// SIMD vector of floats.
template <typename T>
MMIM_HD T exp_poly7(T r) {
  T p = T(1.0f / 5040.0f);
  p = p * r + T(1.0f / 720.0f);
  p = p * r + T(1.0f / 120.0f);
  p = p * r + T(1.0f / 24.0f);
  p = p * r + T(1.0f / 6.0f);
  p = p * r + T(0.5f);
  p = p * r + T(1.0f);
  p = p * r + T(1.0f);
  return p;
}

MMIM_HD float exp_lse(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // Clamp with integer bit selects rather than float ?: (GCC does not if-convert the latter at
  // the baseline instruction set, which would keep loops calling this from vectorizing).
  const float lo = ExpConst::lo, hi = ExpConst::hi;
  int32_t xb, lb, hb;
  std::memcpy(&xb, &x, sizeof(xb));
  std::memcpy(&lb, &lo, sizeof(lb));
  std::memcpy(&hb, &hi, sizeof(hb));
  const int32_t below = -static_cast<int32_t>(x < lo);  // all ones when x < lo (or x = -inf)
  const int32_t above = -static_cast<int32_t>(x > hi);
  xb = (xb & ~below) | (lb & below);
  xb = (xb & ~above) | (hb & above);
  std::memcpy(&x, &xb, sizeof(x));
  float kf = x * ExpConst::log2e + ExpConst::shifter;
  int32_t kbits;
  std::memcpy(&kbits, &kf, sizeof(kbits));
  kf -= ExpConst::shifter;
  const float r = (x - kf * ExpConst::ln2_hi) - kf * ExpConst::ln2_lo;
  // k sits in the low mantissa bits of kf + shifter; 2^k is built in the exponent field.
  const int32_t scale_bits = (kbits - ExpConst::shifter_bits + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return exp_poly7(r) * scale;
#endif
}

MMIM_HD double exp_lse(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// log in T's precision (float: logf on the device, std::log(float) on the host).
MMIM_HD float log_lse(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

MMIM_HD double log_lse(double x) { return ::log(x); }

// ---- online log-sum-exp --------------------------------------------------------------------

// Running state of log(sum exp(t)): the maximum seen and the sum of exp(t - max).
template <typename T>
struct LseState {
  T max;
  T sum;
};

template <typename T>
MMIM_HD LseState<T> lse_empty() {
  return LseState<T>{-INFINITY, T(0)};
}

// Merge two partial log-sum-exp states (associative and commutative up to rounding).
template <typename T>
MMIM_HD LseState<T> lse_merge(LseState<T> s, LseState<T> o) {
  if (o.max == -INFINITY) return s;
  if (s.max == -INFINITY) return o;
  if (o.max > s.max) {
    LseState<T> t = s;
    s = o;
    o = t;
  }
  return LseState<T>{s.max, s.sum + o.sum * exp_lse(o.max - s.max)};
}

// log of the mean of exp over `count` samples, with the logarithms in T's precision (on the host
// ::log would take float through the double log, at twice logf's cost).
template <typename T>
MMIM_HD T lse_finish_mean(LseState<T> s, T count) {
  return s.max + log_lse(s.sum) - log_lse(count);
}

// Weight of a shuffled sample in the backward: grad_lme * d lme / d T_n = grad_over_count *
// exp(T_n - lme), with grad_over_count = grad_lme / count. T may be a SIMD vector type that has
// an exp_lse overload (found by argument-dependent lookup).
template <typename T>
MMIM_HD T marginal_weight(T t, T lme, T grad_over_count) {
  return grad_over_count * exp_lse(t - lme);
}

// The same weight from exp(T_n - max_r), at hand when the log-sum-exp pass over source r's
// samples (maximum max_r) kept its exponentials: marginal_weight(T_n, lme, g) =
// exp(T_n - max_r) * marginal_weight_scale(max_r, lme, g), one exp per source instead of one per
// sample.
template <typename T>
MMIM_HD T marginal_weight_scale(T max_r, T lme, T grad_over_count) {
  return grad_over_count * exp_lse(max_r - lme);
}

// MINE's bias-corrected gradient (Belghazi et al.): the gradient of its loss w.r.t. lme is
// exp(lme - log_avg), with log_avg the log of the moving average of E_Q[e^T] after folding in
// this batch, log_avg = logaddexp(la, log_a + lme) - lk, where la = log(1 - a) + the average's
// previous log (-inf before the first batch), log_a = log(a), lk = log(1 - (1 - a)^count) with
// count the batches folded in, this one included (a the average's rate).
template <typename T>
MMIM_HD T mine_ema_ratio(T lme, T la, T lk, T log_a) {
  const T x = log_a + lme;
  const T mx = la > x ? la : x;
  const T lse = mx + log_lse(exp_lse(la - mx) + exp_lse(x - mx));
  return exp_lse(lme + lk - lse);
}

// ---- pair enumeration ----------------------------------------------------------------------

// Index of the first pair (i, i+1) of row i among all pairs i < j of m units, row-major.
MMIM_HD int64_t pair_row_offset(int64_t i, int64_t m) {
  return i * (2 * m - i - 1) / 2;
}

// Inverse of the row-major enumeration: pair index p -> (i, j) with i < j.
MMIM_HD void pair_from_index(int64_t p, int64_t m, int64_t* i_out, int64_t* j_out) {
  // Solve offset(i) <= p for the largest i in floating point, then correct by one either way.
  const double mm = static_cast<double>(2 * m - 1);
  double disc = mm * mm - 8.0 * static_cast<double>(p);
  disc = disc < 0.0 ? 0.0 : disc;
  int64_t i = static_cast<int64_t>((mm - ::sqrt(disc)) / 2.0);
  if (i < 0) i = 0;
  if (i > m - 2) i = m - 2;
  while (i > 0 && pair_row_offset(i, m) > p) --i;
  while (i < m - 2 && pair_row_offset(i + 1, m) <= p) ++i;
  *i_out = i;
  *j_out = i + 1 + (p - pair_row_offset(i, m));
}

}  // namespace math
}  // namespace mmim_ext
