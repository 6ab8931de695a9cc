// CPU loops of pair_stats, part 2 of 4: the critic's scores over tiles of samples, directly
// (u = wa a + bias, x = wb b + u) or in the threshold form (ScoreForm), and the cache of the
// critics' forms. Part of pair_stats_cpu_impl.h.
#ifndef MMIM_CPU_IMPL_PARTS
#error "include cpu/pair_stats_cpu_impl.h, which includes this file inside the build's namespace"
#endif

namespace detail {

// Whether this build's loops for T may use the threshold forms of the gates (unit_pass) and of
// the scores (ScoreForm). Only the AVX2 build's float loops, the ones that run for speed, do
// (three versions of every pass for each instruction set and type would triple the build's
// compile time); the others, and the scalar build that checks the shared header, compute x.
#ifdef MMIM_VEC_AVX2
template <typename T>
constexpr bool kThresholdGates = sizeof(T) == 4;
#else
template <typename T>
constexpr bool kThresholdGates = false;
#endif

// The critic's scores in the threshold form. Where wb_k is not 0, unit k's pre-activation is
// x_k = wb_k (b - t_k) with the threshold t_k = ta_k a + tb_k, ta_k = -wa_k / wb_k,
// tb_k = -bias_k / wb_k (math::gate_threshold), so that
//   v_k relu(x_k) = v_k |wb_k| max(b, t_k) - v_k |wb_k| (wb_k > 0 ? t_k : b),
// and the subtracted term is linear in a or in b: v_k (wa_k a + bias_k) for wb_k > 0, v_k wb_k b
// for wb_k < 0. Summed over the units,
//   T(a, b) - c = alpha a + beta b + gamma + sum_k cp_k max(b, t_k)
// with alpha = sum_{wb > 0} v wa, gamma = sum_{wb > 0} v bias, beta = sum_{wb < 0} v wb and
// cp = v |wb|. Per unit and vector of samples of two sources that is 3 FMAs (t, two sums) and 2
// max, against 5 FMAs (u, two x, two sums) and 2 max for the direct form. Each term's rounding is
// a few ulp of |v| (|wa a| + |bias| + |wb b|), the size of the direct form's. score_form uses the form for a
// critic only when every unit's threshold is finite with wb_k normal, and these magnitudes stay
// below 2^100 for |a|, |b| <= hmax (the largest |h| of the call), so nothing in it overflows;
// otherwise the loops compute x.
template <typename T>
struct ScoreForm {
  bool ok = false;
  T alpha = T(0), beta = T(0), gamma = T(0);
  const T* ta = nullptr;  // [K] each
  const T* tb = nullptr;
  const T* cp = nullptr;
};

// Floats of the buffer score_form writes: three rows of K rounded up to the vector width.
template <typename T>
inline int64_t score_form_floats(int64_t K) {
  constexpr int L = Vec<T>::L;
  return 3 * ((K + L - 1) / L * L);
}

// The threshold form of the critic (wa, wb, bias, v: [K]), written to buf (score_form_floats),
// or ok = false where it is not safe (above). Vectors of units, the last one padded with a unit
// that contributes nothing (wa = bias = v = 0, wb = 1).
template <typename T>
inline ScoreForm<T> score_form(const T* wa, const T* wb, const T* bias, const T* v, int64_t K, T hmax, T* buf) {
  using V = Vec<T>;
  typedef typename V::raw R;
  constexpr int L = V::L;
  ScoreForm<T> f;
  const T bound = T(1.2676506002282294e30);  // 2^100
  if (!(hmax <= bound)) return f;              // also NaN or inf in h
  const int64_t Kp = (K + L - 1) / L * L;
  T* ta = buf;
  T* tb = buf + Kp;
  T* cp = buf + 2 * Kp;
  const R zero{}, one = zero + T(1), hm = zero + hmax, bd = zero + bound;
  const R tiny = zero + math::smallest_normal(T(0));
  R alpha = zero, beta = zero, gamma = zero;
  R ok = zero + T(1);  // stays 1 in every lane while all units qualify
  for (int64_t k0 = 0; k0 < Kp; k0 += L) {
    R wav, wbv, bv, vv;
    if (k0 + L <= K) {
      wav = V::load(wa + k0).x;
      wbv = V::load(wb + k0).x;
      bv = V::load(bias + k0).x;
      vv = V::load(v + k0).x;
    } else {
      wav = zero, wbv = one, bv = zero, vv = zero;
      for (int l = 0; k0 + l < K; ++l) {
        wav[l] = wa[k0 + l];
        wbv[l] = wb[k0 + l];
        bv[l] = bias[k0 + l];
        vv[l] = v[k0 + l];
      }
    }
    const auto absv = [](R x) { return x < R{} ? -x : x; };
    const R mag = absv(wbv);
    const R tav = -wav / wbv, tbv = -bv / wbv;
    const R t_size = absv(tav) * hm + absv(tbv);
    const R size = absv(vv) * ((absv(wav) + mag) * hm + absv(bv));
    // A comparison with NaN is false, so NaN anywhere leaves the lane not ok.
    ok = ((mag >= tiny) & (t_size <= bd) & (size <= bd)) ? ok : zero;
    const R pos = wbv > zero ? one : zero;  // wb > 0
    alpha += pos * (vv * wav);
    gamma += pos * (vv * bv);
    beta += (one - pos) * (vv * wbv);
    V::from_raw(tav).store(ta + k0);
    V::from_raw(tbv).store(tb + k0);
    V::from_raw(vv * mag).store(cp + k0);
  }
  if (!(V::from_raw(ok).sum() == T(L))) return f;
  f.ok = true;
  f.alpha = V::from_raw(alpha).sum();
  f.beta = V::from_raw(beta).sum();
  f.gamma = V::from_raw(gamma).sum();
  f.ta = ta;
  f.tb = tb;
  f.cp = cp;
  return f;
}

// max(x, y) of two vectors without NaN (the threshold form's max(b, t)).
template <typename T>
inline Vec<T> vmax_form(Vec<T> x, Vec<T> y) {
#ifdef MMIM_VEC_AVX2
  if constexpr (sizeof(T) == 4) return Vec<T>::from_raw(__builtin_ia32_maxps256(x.x, y.x));
#endif
  return vmax(x, y);
}

// Scores (without c) of one tile of 2 vectors for up to two sources (b1 may be null), with
// u = wa a + bias computed once for both.
template <typename T>
inline void tile_scores2(const T* a, const T* b0, const T* b1, const T* wa, const T* wb, const T* bias,
                         const T* v, int64_t K, T* t0, T* t1) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const V a0 = V::load(a), a1 = V::load(a + L);
  const V b00 = V::load(b0), b01 = V::load(b0 + L);
  V s00 = V::zero(), s01 = V::zero();
  if (b1 != nullptr) {
    const V b10 = V::load(b1), b11 = V::load(b1 + L);
    V s10 = V::zero(), s11 = V::zero();
    for (int64_t k = 0; k < K; ++k) {
      const V wak(wa[k]), wbk(wb[k]), bk(bias[k]), vk(v[k]);
      const V u0 = math::critic_u(wak, a0, bk), u1 = math::critic_u(wak, a1, bk);
      s00 += math::critic_unit(vk, math::critic_x(wbk, b00, u0));
      s01 += math::critic_unit(vk, math::critic_x(wbk, b01, u1));
      s10 += math::critic_unit(vk, math::critic_x(wbk, b10, u0));
      s11 += math::critic_unit(vk, math::critic_x(wbk, b11, u1));
    }
    s10.store(t1);
    s11.store(t1 + L);
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const V wak(wa[k]), wbk(wb[k]), bk(bias[k]), vk(v[k]);
      s00 += math::critic_unit(vk, math::critic_x(wbk, b00, math::critic_u(wak, a0, bk)));
      s01 += math::critic_unit(vk, math::critic_x(wbk, b01, math::critic_u(wak, a1, bk)));
    }
  }
  s00.store(t0);
  s01.store(t0 + L);
}

// tile_scores2 in the threshold form f (ScoreForm): the same scores up to rounding.
template <typename T>
inline void tile_scores2_form(const T* a, const T* b0, const T* b1, const ScoreForm<T>& f, int64_t K, T* t0,
                              T* t1) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const V a0 = V::load(a), a1 = V::load(a + L);
  const V b00 = V::load(b0), b01 = V::load(b0 + L);
  // a source's score: the linear part alpha a + gamma (shared by the sources) + beta b, plus the
  // sum over the units
  const V alpha(f.alpha), beta(f.beta), gamma(f.gamma);
  const auto finish = [&](const V& bn, const V& an, const V& sum, T* out) {
    ((alpha * an + gamma + beta * bn) + sum).store(out);
  };
  V s00 = V::zero(), s01 = V::zero();
  if (b1 != nullptr) {
    const V b10 = V::load(b1), b11 = V::load(b1 + L);
    V s10 = V::zero(), s11 = V::zero();
    for (int64_t k = 0; k < K; ++k) {
      const V ta(f.ta[k]), tb(f.tb[k]), ck(f.cp[k]);
      const V x0 = math::critic_u(ta, a0, tb), x1 = math::critic_u(ta, a1, tb);  // the thresholds
      s00 += ck * vmax_form(b00, x0);
      s01 += ck * vmax_form(b01, x1);
      s10 += ck * vmax_form(b10, x0);
      s11 += ck * vmax_form(b11, x1);
    }
    finish(b10, a0, s10, t1);
    finish(b11, a1, s11, t1 + L);
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const V ta(f.ta[k]), tb(f.tb[k]), ck(f.cp[k]);
      s00 += ck * vmax_form(b00, math::critic_u(ta, a0, tb));
      s01 += ck * vmax_form(b01, math::critic_u(ta, a1, tb));
    }
  }
  finish(b00, a0, s00, t0);
  finish(b01, a1, s01, t0 + L);
}

// Scores (without c) of samples [n0, n1) of `nsrc` sources that share the first argument a:
// dst[s][n - n0] = T(a[n], src[s][n]), sources two at a time (their first layer formed once).
// n0 and n1 are multiples of the tile width. form: null, or the critic's threshold form
// (ScoreForm), which the loops then use (builds with kThresholdGates only).
template <typename T>
inline void source_scores(const T* a, const T* const* src, T* const* dst, int64_t nsrc, int64_t n0, int64_t n1,
                          const T* wa, const T* wb, const T* bias, const T* v, int64_t K,
                          const ScoreForm<T>* form) {
  constexpr int W = 2 * Vec<T>::L;  // one tile_scores2 tile; kLanes<T> (the padding) is a multiple
  // The choice of form once per call, not per tile.
  const auto run = [&](auto use_form) {
    for (int64_t n = n0; n < n1; n += W) {
      for (int64_t s = 0; s < nsrc; s += 2) {
        const bool two = s + 1 < nsrc;
        const T* b1 = two ? src[s + 1] + n : nullptr;
        T* t1 = two ? dst[s + 1] + (n - n0) : nullptr;
        if constexpr (decltype(use_form)::value)
          tile_scores2_form<T>(a + n, src[s] + n, b1, *form, K, dst[s] + (n - n0), t1);
        else
          tile_scores2<T>(a + n, src[s] + n, b1, wa, wb, bias, v, K, dst[s] + (n - n0), t1);
      }
    }
  };
  if constexpr (kThresholdGates<T>) {
    if (form != nullptr) return run(std::true_type{});
  }
  run(std::false_type{});
}

// The score form (ScoreForm) of the pairs' critics (builds with kThresholdGates only; else
// none). A shared critic's form is made once; per-pair critics' forms for blocks of kFormBlock
// consecutive pairs at a time (independent computations that the CPU overlaps, where one per pair
// would wait on its divisions before the pair's loops can start).
template <typename T>
struct FormCache {
  static constexpr int64_t kFormBlock = 32;
  const PairStatsCpuArgs<T>& g;
  const int64_t end;  // the pairs [begin, end) of the caller
  std::vector<T> form_buf;
  ScoreForm<T> shared_form;
  std::vector<ScoreForm<T>> forms;  // pairs [blk0, blk1)
  int64_t blk0 = 0, blk1 = 0;
  FormCache(const PairStatsCpuArgs<T>& args, int64_t end_pair) : g(args), end(end_pair) {
    if constexpr (kThresholdGates<T>) {
      const int64_t n = g.pstride == 0 ? 1 : kFormBlock;  // a shared critic's form is shared_form
      form_buf.resize(static_cast<size_t>(n * score_form_floats<T>(g.K) + 64 / sizeof(T)));
      if (g.pstride != 0) forms.resize(static_cast<size_t>(kFormBlock));
      else shared_form = score_form(g.wa, g.wb, g.bias, g.v, g.K, g.hmax, form_data());
    }
  }
  // form_buf from its first 64-byte boundary on (vectors stored to it do not straddle cache
  // lines).
  T* form_data() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(form_buf.data());
    return form_buf.data() + ((64 - p % 64) % 64) / sizeof(T);
  }
  // The form of pair p's critic, or nullptr. Pairs are asked for in increasing order.
  const ScoreForm<T>* form(int64_t p) {
    if constexpr (!kThresholdGates<T>) {
      return nullptr;
    } else {
      if (g.pstride == 0) return shared_form.ok ? &shared_form : nullptr;
      if (p < blk0 || p >= blk1) {
        blk0 = p;
        blk1 = std::min(p + kFormBlock, end);
        const int64_t K = g.K, floats = score_form_floats<T>(K);
        T* data = form_data();
        for (int64_t q = blk0; q < blk1; ++q)
          forms[q - blk0] = score_form(g.wa + q * K, g.wb + q * K, g.bias + q * K, g.v + q * K, K, g.hmax,
                                       data + (q - blk0) * floats);
      }
      const ScoreForm<T>& f = forms[p - blk0];
      return f.ok ? &f : nullptr;
    }
  }
};

}  // namespace detail
