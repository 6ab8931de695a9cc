// The per-pair loops of the CPU pair_stats kernels, compiled once per instruction set.
//
// Included (without include guard, on purpose) by pair_stats_base.cpp and pair_stats_avx2.cpp,
// each of which defines MMIM_CPU_CAPABILITY (the namespace of that build) and sets the target
// instruction set before including it. pair_stats_kernel.cpp dispatches at run time.
//
// Work per pair (i, j), in tiles of W lanes over the batch:
//   u[l]  = wa_k a[l] + bias_k                 once per tile and hidden unit, shared by the joint
//                                              sample and all R shuffled ones
//   x[l]  = wb_k b_s[l] + u[l]                 for each source s (joint, shuffle 1..R)
//   t_s[l] += v_k relu(x[l])
// The joint scores are summed; the shuffled ones go through an online log-sum-exp (per tile:
// max and sum of exp, merged into the running state). The critic's constant c shifts every
// score equally, so it is added at the end and never enters the exponentials.

#ifndef MMIM_CPU_CAPABILITY
#error "define MMIM_CPU_CAPABILITY before including pair_stats_cpu_impl.h"
#endif

namespace mmim_ext {
namespace cpu {
namespace MMIM_CPU_CAPABILITY {

namespace detail {

// A SIMD vector of 32 bytes (GCC/Clang vector extension): one AVX2 register in the AVX2 build,
// two SSE registers in the baseline build. It provides the operators and the two functions the
// shared critic math needs (max_zero, where_positive), so that math runs unchanged on it.
template <typename T>
struct Vec {
  static constexpr int L = 32 / static_cast<int>(sizeof(T));
  typedef T raw __attribute__((vector_size(32)));
  raw x;

  static Vec load(const T* p) {
    Vec r;
    std::memcpy(&r.x, p, sizeof(raw));
    return r;
  }
  static Vec bcast(T s) { return Vec{raw{} + s}; }
  static Vec zero() { return Vec{raw{}}; }
  void store(T* p) const { std::memcpy(p, &x, sizeof(raw)); }
  T sum() const {
    T s = T(0);
    for (int l = 0; l < L; ++l) s += x[l];
    return s;
  }
  friend Vec operator+(Vec a, Vec b) { return Vec{a.x + b.x}; }
  friend Vec operator*(Vec a, Vec b) { return Vec{a.x * b.x}; }
  Vec& operator+=(Vec b) {
    x += b.x;
    return *this;
  }
  friend Vec max_zero(Vec a) { return Vec{a.x > raw{} ? a.x : raw{}}; }
  friend Vec where_positive(Vec a, Vec y) { return Vec{a.x > raw{} ? y.x : raw{}}; }
};

// Scores (without c) of one tile of W = 2 vectors for up to two sources (b1 may be null), with
// u = wa a + bias computed once for both.
template <typename T>
inline void tile_scores2(const T* a, const T* b0, const T* b1, const T* wa, const T* wb,
                         const T* bias, const T* v, int64_t K, T* t0, T* t1) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const V a0 = V::load(a), a1 = V::load(a + L);
  V s00 = V::zero(), s01 = V::zero();
  if (b1 != nullptr) {
    V s10 = V::zero(), s11 = V::zero();
    const V b00 = V::load(b0), b01 = V::load(b0 + L);
    const V b10 = V::load(b1), b11 = V::load(b1 + L);
    for (int64_t k = 0; k < K; ++k) {
      const V wak = V::bcast(wa[k]), wbk = V::bcast(wb[k]), bk = V::bcast(bias[k]), vk = V::bcast(v[k]);
      const V u0 = math::critic_u(wak, a0, bk), u1 = math::critic_u(wak, a1, bk);
      s00 += math::critic_unit(vk, math::critic_x(wbk, b00, u0));
      s01 += math::critic_unit(vk, math::critic_x(wbk, b01, u1));
      s10 += math::critic_unit(vk, math::critic_x(wbk, b10, u0));
      s11 += math::critic_unit(vk, math::critic_x(wbk, b11, u1));
    }
    s10.store(t1);
    s11.store(t1 + L);
  } else {
    const V b00 = V::load(b0), b01 = V::load(b0 + L);
    for (int64_t k = 0; k < K; ++k) {
      const V wak = V::bcast(wa[k]), wbk = V::bcast(wb[k]), bk = V::bcast(bias[k]), vk = V::bcast(v[k]);
      s00 += math::critic_unit(vk, math::critic_x(wbk, b00, math::critic_u(wak, a0, bk)));
      s01 += math::critic_unit(vk, math::critic_x(wbk, b01, math::critic_u(wak, a1, bk)));
    }
  }
  s00.store(t0);
  s01.store(t0 + L);
}

// Gather the R shuffled second arguments of unit j: bm[r][n] = hT[j][perms[r][n]], zero padded.
template <typename T>
inline void gather_shuffled(const PairStatsCpuArgs<T>& g, int64_t j, T* bm) {
  const T* src = g.hT + j * g.Bp;
  for (int64_t r = 0; r < g.R; ++r) {
    const int64_t* pr = g.perms + r * g.B;
    T* dst = bm + r * g.Bp;
    for (int64_t n = 0; n < g.B; ++n) dst[n] = src[pr[n]];
    for (int64_t n = g.B; n < g.Bp; ++n) dst[n] = T(0);
  }
}

// Scores (without c) of samples [n0, n1) of `nsrc` sources that share the first argument a:
// dst[s][n - n0] = T(a[n], src[s][n]). n0, n1 are multiples of the tile width.
template <typename T>
inline void source_scores(const T* a, const T* const* src, T* const* dst, int64_t nsrc, int64_t n0,
                          int64_t n1, const T* wa, const T* wb, const T* bias, const T* v,
                          int64_t K) {
  constexpr int W = kLanes<T>;
  T scratch[W];
  for (int64_t n = n0; n < n1; n += W) {
    for (int64_t s = 0; s < nsrc; s += 2) {
      const bool two = s + 1 < nsrc;
      tile_scores2<T>(a + n, src[s] + n, two ? src[s + 1] + n : nullptr, wa, wb, bias, v, K,
                      dst[s] + (n - n0), two ? dst[s + 1] + (n - n0) : scratch);
    }
  }
}

// Sum of x[0..n).
template <typename T>
inline T range_sum(const T* x, int64_t n) {
  using V = Vec<T>;
  V acc = V::zero();
  int64_t t = 0;
  for (; t + V::L <= n; t += V::L) acc += V::load(x + t);
  T s = acc.sum();
  for (; t < n; ++t) s += x[t];
  return s;
}

// Log-sum-exp state of x[0..n), n >= 1: the maximum, then the sum of exp(x - max) with the
// vectorizable exp of the shared header.
template <typename T>
inline math::LseState<T> range_lse(const T* x, int64_t n) {
  using V = Vec<T>;
  constexpr int L = V::L;
  T mx = x[0];
  int64_t t = 0;
  if (n >= L) {
    T lane_max[L];
    for (int l = 0; l < L; ++l) lane_max[l] = x[l];
    for (t = L; t + L <= n; t += L)
      for (int l = 0; l < L; ++l) lane_max[l] = x[t + l] > lane_max[l] ? x[t + l] : lane_max[l];
    for (int l = 0; l < L; ++l) mx = lane_max[l] > mx ? lane_max[l] : mx;
  }
  for (; t < n; ++t) mx = x[t] > mx ? x[t] : mx;
  V acc = V::zero();
  T e[L];
  for (t = 0; t + L <= n; t += L) {
    for (int l = 0; l < L; ++l) e[l] = math::exp_lse(x[t + l] - mx);
    acc += V::load(e);
  }
  T sum = acc.sum();
  for (; t < n; ++t) sum += math::exp_lse(x[t] - mx);
  return math::LseState<T>{mx, sum};
}

// Critic gradients of one hidden unit, accumulated over samples (lanes summed at the end).
template <typename T>
struct UnitGrad {
  Vec<T> wa, wb, bias, v;
};

// Backward of hidden unit k over all samples of one source with per-sample weights w.
// Accumulates the critic gradients into acc and the gradients w.r.t. the pair's arguments into
// ga (first unit) and gb (this source's second argument).
template <typename T>
inline void unit_backward_source(int64_t Bp, const T* a, const T* b, const T* w, T wak_s, T wbk_s,
                                 T bk_s, T vk_s, T* ga, T* gb, UnitGrad<T>& acc) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const V wak = V::bcast(wak_s), wbk = V::bcast(wbk_s), bk = V::bcast(bk_s), vk = V::bcast(vk_s);
  for (int64_t n = 0; n < Bp; n += L) {
    const V an = V::load(a + n), bn = V::load(b + n), wn = V::load(w + n);
    const V x = math::critic_x(wbk, bn, math::critic_u(wak, an, bk));
    const V dx = math::critic_unit_dx(vk, x, wn);
    acc.v += math::critic_unit_dv(x, wn);
    acc.wa += dx * an;
    acc.wb += dx * bn;
    acc.bias += dx;
    (V::load(ga + n) + dx * wak).store(ga + n);
    (V::load(gb + n) + dx * wbk).store(gb + n);
  }
}

}  // namespace detail

// Forward for pairs [begin, end): t_joint[p], lme[p]. Scratch: bm [R][Bp] (the gathered second
// arguments of the shuffled samples) and sc [1+R][kChunkSamples] (one chunk of
// scores per source, small enough to stay in L1/L2).
template <typename T>
void forward_range(const PairStatsCpuArgs<T>& g, int64_t begin, int64_t end, T* bm, T* sc, T* t_joint,
                   T* lme) {
  const T inv_b = T(1) / static_cast<T>(g.B);
  const T count = static_cast<T>(g.R * g.B);
  const int64_t nsrc = 1 + g.R;
  std::vector<const T*> src(nsrc);
  std::vector<T*> dst(nsrc);
  for (int64_t s = 0; s < nsrc; ++s) dst[s] = sc + s * kChunkSamples;
  for (int64_t r = 0; r < g.R; ++r) src[1 + r] = bm + r * g.Bp;
  int64_t last_j = -1;
  for_each_pair(g.pairs, g.m, begin, end, [&](int64_t p, int64_t i, int64_t j) {
    const T* wa = g.wa + p * g.pstride;
    const T* wb = g.wb + p * g.pstride;
    const T* bias = g.bias + p * g.pstride;
    const T* v = g.v + p * g.pstride;
    const T* a = g.hT + i * g.Bp;
    src[0] = g.hT + j * g.Bp;
    if (j != last_j) {
      detail::gather_shuffled(g, j, bm);
      last_j = j;
    }
    T jsum = T(0);
    math::LseState<T> st = math::lse_empty<T>();
    for (int64_t n0 = 0; n0 < g.B; n0 += kChunkSamples) {
      const int64_t n1 = std::min(n0 + kChunkSamples, g.Bp);
      const int64_t valid = std::min(n1, g.B) - n0;
      detail::source_scores<T>(a, src.data(), dst.data(), nsrc, n0, n1, wa, wb, bias, v, g.K);
      jsum += detail::range_sum(dst[0], valid);
      for (int64_t r = 0; r < g.R; ++r) st = math::lse_merge(st, detail::range_lse(dst[1 + r], valid));
    }
    const T cp = g.c[p * g.cstride];
    t_joint[p] = cp + jsum * inv_b;
    lme[p] = cp + math::lse_finish_mean(st, count);
  });
}

// Backward for pairs [begin, end). Gradients w.r.t. h go to s.gh (this thread's [m][Bp] buffer);
// per-pair critic gradients are written to gwa..gv (rows p), a shared critic's are accumulated
// in s.gshared.
template <typename T>
void backward_range(const PairStatsCpuArgs<T>& g, int64_t begin, int64_t end, const T* grad_t,
                    const T* grad_lme, const T* lme, const BwdScratch<T>& s, T* gwa, T* gwb,
                    T* gbias, T* gv) {
  const bool shared = g.pstride == 0;
  const int64_t K = g.K;
  for_each_pair(g.pairs, g.m, begin, end, [&](int64_t p, int64_t i, int64_t j) {
    const T* wa = g.wa + p * g.pstride;
    const T* wb = g.wb + p * g.pstride;
    const T* bias = g.bias + p * g.pstride;
    const T* v = g.v + p * g.pstride;
    const T cp = g.c[p * g.cstride];
    const T* a = g.hT + i * g.Bp;
    const T* bj = g.hT + j * g.Bp;
    T* ga = s.gh + i * g.Bp;
    T* gbj = s.gh + j * g.Bp;

    // Sample weights: joint grad_t / B; shuffled grad_lme exp(T - lme) / (R B), recomputing
    // the scores instead of having stored them.
    const T gj = grad_t[p] / static_cast<T>(g.B);
    for (int64_t n = 0; n < g.Bp; ++n) s.wj[n] = n < g.B ? gj : T(0);
    detail::gather_shuffled(g, j, s.bm);
    const T gl = grad_lme[p] / static_cast<T>(g.R * g.B);
    detail::source_scores<T>(a, s.src, s.dst, g.R, 0, g.Bp, wa, wb, bias, v, g.K);
    const T lme0 = lme[p] - cp;
    for (int64_t r = 0; r < g.R; ++r) {
      T* w = s.wm + r * g.Bp;
      for (int64_t n = 0; n < g.Bp; ++n) {
        const T wn = math::marginal_weight(w[n], lme0, gl);
        w[n] = n < g.B ? wn : T(0);
      }
    }
    for (int64_t n = 0; n < g.R * g.Bp; ++n) s.gbm[n] = T(0);

    for (int64_t k = 0; k < K; ++k) {
      detail::UnitGrad<T> acc{detail::Vec<T>::zero(), detail::Vec<T>::zero(), detail::Vec<T>::zero(),
                              detail::Vec<T>::zero()};
      const T wak = wa[k], wbk = wb[k], bk = bias[k], vk = v[k];
      detail::unit_backward_source<T>(g.Bp, a, bj, s.wj, wak, wbk, bk, vk, ga, gbj, acc);
      for (int64_t r = 0; r < g.R; ++r) {
        detail::unit_backward_source<T>(g.Bp, a, s.bm + r * g.Bp, s.wm + r * g.Bp, wak, wbk, bk, vk,
                                        ga, s.gbm + r * g.Bp, acc);
      }
      if (shared) {
        s.gshared[k] += acc.wa.sum();
        s.gshared[K + k] += acc.wb.sum();
        s.gshared[2 * K + k] += acc.bias.sum();
        s.gshared[3 * K + k] += acc.v.sum();
      } else {
        gwa[p * K + k] = acc.wa.sum();
        gwb[p * K + k] = acc.wb.sum();
        gbias[p * K + k] = acc.bias.sum();
        gv[p * K + k] = acc.v.sum();
      }
    }
    // Scatter the shuffled samples' second-argument gradients back through the permutations.
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t* pr = g.perms + r * g.B;
      const T* src = s.gbm + r * g.Bp;
      for (int64_t n = 0; n < g.B; ++n) gbj[pr[n]] += src[n];
    }
  });
}

}  // namespace MMIM_CPU_CAPABILITY
}  // namespace cpu
}  // namespace mmim_ext
