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

// Scores of two sources (b0, b1) of one tile: t0, t1 [W]. b1 may be null.
template <typename T, int W>
inline void tile_scores2(const T* a, const T* b0, const T* b1, const T* wa, const T* wb,
                         const T* bias, const T* v, int64_t K, T* t0, T* t1) {
  T acc0[W], acc1[W];
  for (int l = 0; l < W; ++l) acc0[l] = acc1[l] = T(0);
  if (b1 != nullptr) {
    for (int64_t k = 0; k < K; ++k) {
      const T wak = wa[k], wbk = wb[k], bk = bias[k], vk = v[k];
      for (int l = 0; l < W; ++l) {
        const T u = math::critic_u(wak, a[l], bk);
        acc0[l] += math::critic_unit(vk, math::critic_x(wbk, b0[l], u));
        acc1[l] += math::critic_unit(vk, math::critic_x(wbk, b1[l], u));
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const T wak = wa[k], wbk = wb[k], bk = bias[k], vk = v[k];
      for (int l = 0; l < W; ++l) {
        const T u = math::critic_u(wak, a[l], bk);
        acc0[l] += math::critic_unit(vk, math::critic_x(wbk, b0[l], u));
      }
    }
  }
  for (int l = 0; l < W; ++l) {
    t0[l] = acc0[l];
    t1[l] = acc1[l];
  }
}

// Fold one tile of shuffled-sample scores (first `valid` lanes) into the running log-sum-exp.
template <typename T, int W>
inline math::LseState<T> lse_tile(math::LseState<T> st, const T* t, int valid) {
  T mx = t[0];
  for (int l = 1; l < valid; ++l) mx = t[l] > mx ? t[l] : mx;
  T e[W];
  for (int l = 0; l < W; ++l) e[l] = math::exp_lse(t[l] - mx);
  T sum = T(0);
  for (int l = 0; l < valid; ++l) sum += e[l];
  return math::lse_merge(st, math::LseState<T>{mx, sum});
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

// Scores of all shuffled samples of pair (i, j) without c, and their log-sum-exp.
// With `scores` non-null the scores are also stored ([R][Bp]).
template <typename T>
inline math::LseState<T> shuffled_scores(const PairStatsCpuArgs<T>& g, const T* a, const T* bm,
                                         const T* wa, const T* wb, const T* bias, const T* v,
                                         T* scores) {
  constexpr int W = kLanes<T>;
  math::LseState<T> st = math::lse_empty<T>();
  T t0[W], t1[W];
  for (int64_t n0 = 0; n0 < g.Bp; n0 += W) {
    const int valid = static_cast<int>(std::min<int64_t>(W, g.B - n0));
    for (int64_t r = 0; r < g.R; r += 2) {
      const T* b0 = bm + r * g.Bp + n0;
      const T* b1 = r + 1 < g.R ? bm + (r + 1) * g.Bp + n0 : nullptr;
      tile_scores2<T, W>(a + n0, b0, b1, wa, wb, bias, v, g.K, t0, t1);
      st = lse_tile<T, W>(st, t0, valid);
      if (b1 != nullptr) st = lse_tile<T, W>(st, t1, valid);
      if (scores != nullptr) {
        for (int l = 0; l < W; ++l) scores[r * g.Bp + n0 + l] = t0[l];
        if (b1 != nullptr)
          for (int l = 0; l < W; ++l) scores[(r + 1) * g.Bp + n0 + l] = t1[l];
      }
    }
  }
  return st;
}

// Backward of one hidden unit k over all tiles of one source with per-sample weights w.
// Accumulates the critic gradients into the lane accumulators and the gradients w.r.t. the
// pair's arguments into ga (first unit) and gb (second argument of this source).
template <typename T, int W>
inline void unit_backward_source(int64_t Bp, const T* a, const T* b, const T* w, T wak, T wbk,
                                 T bk, T vk, T* ga, T* gb, T* dwa, T* dwb, T* dbias, T* dv) {
  for (int64_t n0 = 0; n0 < Bp; n0 += W) {
    for (int l = 0; l < W; ++l) {
      const T u = math::critic_u(wak, a[n0 + l], bk);
      const T x = math::critic_x(wbk, b[n0 + l], u);
      T dx;
      dv[l] += math::critic_unit_backward(vk, x, w[n0 + l], &dx);
      dwa[l] += dx * a[n0 + l];
      dwb[l] += dx * b[n0 + l];
      dbias[l] += dx;
      ga[n0 + l] += dx * wak;
      gb[n0 + l] += dx * wbk;
    }
  }
}

template <typename T, int W>
inline T lane_sum(const T* x) {
  T s = T(0);
  for (int l = 0; l < W; ++l) s += x[l];
  return s;
}

}  // namespace detail

// Forward for pairs [begin, end): t_joint[p], lme[p].
template <typename T>
void forward_range(const PairStatsCpuArgs<T>& g, int64_t begin, int64_t end, T* bm, T* t_joint,
                   T* lme) {
  constexpr int W = kLanes<T>;
  const T inv_b = T(1) / static_cast<T>(g.B);
  const T count = static_cast<T>(g.R * g.B);
  int64_t last_j = -1;
  for_each_pair(g.pairs, g.m, begin, end, [&](int64_t p, int64_t i, int64_t j) {
    const T* wa = g.wa + p * g.pstride;
    const T* wb = g.wb + p * g.pstride;
    const T* bias = g.bias + p * g.pstride;
    const T* v = g.v + p * g.pstride;
    const T cp = g.c[p * g.cstride];
    const T* a = g.hT + i * g.Bp;
    const T* bj = g.hT + j * g.Bp;
    if (j != last_j) {
      detail::gather_shuffled(g, j, bm);
      last_j = j;
    }
    // Joint scores, one source per tile; lane sums, reduced once per pair.
    T jsum[W];
    for (int l = 0; l < W; ++l) jsum[l] = T(0);
    T t0[W], t1[W];
    for (int64_t n0 = 0; n0 < g.Bp; n0 += W) {
      detail::tile_scores2<T, W>(a + n0, bj + n0, nullptr, wa, wb, bias, v, g.K, t0, t1);
      const int valid = static_cast<int>(std::min<int64_t>(W, g.B - n0));
      for (int l = 0; l < W; ++l) jsum[l] += l < valid ? t0[l] : T(0);
    }
    const math::LseState<T> st = detail::shuffled_scores(g, a, bm, wa, wb, bias, v, (T*)nullptr);
    t_joint[p] = cp + detail::lane_sum<T, W>(jsum) * inv_b;
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
  constexpr int W = kLanes<T>;
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
    detail::shuffled_scores(g, a, s.bm, wa, wb, bias, v, s.wm);
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
      T dwa[W], dwb[W], dbias[W], dv[W];
      for (int l = 0; l < W; ++l) dwa[l] = dwb[l] = dbias[l] = dv[l] = T(0);
      const T wak = wa[k], wbk = wb[k], bk = bias[k], vk = v[k];
      detail::unit_backward_source<T, W>(g.Bp, a, bj, s.wj, wak, wbk, bk, vk, ga, gbj, dwa, dwb,
                                         dbias, dv);
      for (int64_t r = 0; r < g.R; ++r) {
        detail::unit_backward_source<T, W>(g.Bp, a, s.bm + r * g.Bp, s.wm + r * g.Bp, wak, wbk,
                                           bk, vk, ga, s.gbm + r * g.Bp, dwa, dwb, dbias, dv);
      }
      T* dst_wa = shared ? s.gshared : gwa + p * K;
      T* dst_wb = shared ? s.gshared + K : gwb + p * K;
      T* dst_b = shared ? s.gshared + 2 * K : gbias + p * K;
      T* dst_v = shared ? s.gshared + 3 * K : gv + p * K;
      const T swa = detail::lane_sum<T, W>(dwa), swb = detail::lane_sum<T, W>(dwb);
      const T sb = detail::lane_sum<T, W>(dbias), sv = detail::lane_sum<T, W>(dv);
      if (shared) {
        dst_wa[k] += swa;
        dst_wb[k] += swb;
        dst_b[k] += sb;
        dst_v[k] += sv;
      } else {
        dst_wa[k] = swa;
        dst_wb[k] = swb;
        dst_b[k] = sb;
        dst_v[k] = sv;
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
