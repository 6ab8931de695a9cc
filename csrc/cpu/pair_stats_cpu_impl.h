// The per-pair loops of the CPU pair_stats kernels, compiled once per instruction set.
//
// Included (without include guard, on purpose) by pair_stats_base.cpp and pair_stats_avx2.cpp,
// each of which defines MMIM_CPU_CAPABILITY (the namespace of that build) and sets the target
// instruction set before including it. pair_stats_kernel.cpp dispatches at run time.
//
// Work per pair (i, j), in tiles of two SIMD vectors over the batch:
//   u     = wa_k a + bias_k                    once per tile and hidden unit, shared by the joint
//                                              sample and all R shuffled ones
//   x_s   = wb_k b_s + u                       for each source s (joint, shuffle 1..R)
//   t_s  += v_k relu(x_s)
// The joint scores are summed; the shuffled ones go through a log-sum-exp, chunk by chunk,
// merged online. The critic's constant c shifts every score equally, so it is added at the end
// and never enters the exponentials.

#ifndef MMIM_CPU_CAPABILITY
#error "define MMIM_CPU_CAPABILITY before including pair_stats_cpu_impl.h"
#endif

// The shared math templates were defined before this build's target pragma; `flatten` inlines
// every call of the two entry points into them, so that all of that code is compiled for this
// build's instruction set (a call would cross a target boundary and pass vectors in memory).
#ifndef MMIM_FLATTEN
#define MMIM_FLATTEN __attribute__((flatten))
#endif

namespace mmim_ext {
namespace cpu {
namespace MMIM_CPU_CAPABILITY {

namespace detail {

// The lanes of one vector. The SIMD builds use 32 bytes (GCC/Clang vector extension): one AVX2
// register in the AVX2 build, two SSE registers in the baseline build. The scalar build uses one
// lane whose functions are the shared header's scalar overloads, so that build runs exactly the
// per-element functions the CUDA kernels call; it is never picked automatically
// (MMIM_EXT_CPU_CAPABILITY=scalar), and the tests compare it with the reference.
#ifdef MMIM_VEC_SCALAR
template <typename T>
struct VecRaw {
  static constexpr int L = 1;
  typedef T type;
};
#else
template <typename T>
struct VecRaw {
  static constexpr int L = 32 / static_cast<int>(sizeof(T));
  typedef T type __attribute__((vector_size(32)));
};
#endif

// A vector of L lanes with the operators and the functions the shared math needs (max_zero,
// where_positive, exp_lse), so that math runs unchanged on it.
template <typename T>
struct Vec {
  static constexpr int L = VecRaw<T>::L;
  static constexpr bool kScalar = L == 1;
  typedef typename VecRaw<T>::type raw;
  raw x;

  Vec() = default;
  // Broadcast. s - 0 == s exactly (also for -0), so this folds to one vbroadcastss; s + 0 would
  // not (-0 + 0 = +0) and costs a scalar add per broadcast.
  explicit Vec(T s) : x(s - raw{}) {}
  static Vec from_raw(raw r) {
    Vec v;
    v.x = r;
    return v;
  }

  static Vec load(const T* p) {
    Vec r;
    std::memcpy(&r.x, p, sizeof(raw));
    return r;
  }
  // A load the compiler keeps in a register. Without the empty asm GCC folds a loaded value used
  // by two instructions into both as memory operands, which costs a second load (the backward's
  // unit loop with its loads kept in registers: 2.82 -> 2.14 ns per iteration, benchmarks/
  // RESULTS.md §8 row 14; that loop is now bound by its vector FP operations, §8 after row 35).
  static Vec load_reg(const T* p) {
    Vec r = load(p);
#ifdef MMIM_VEC_AVX2
    asm("" : "+x"(r.x));
#endif
    return r;
  }
  static Vec zero() { return from_raw(raw{}); }
  void store(T* p) const { std::memcpy(p, &x, sizeof(raw)); }
  T lane(int l) const {
    if constexpr (kScalar) return x;
    else return x[l];
  }
  // Sum of the lanes: a tree of halves for 8 and 4 lanes (3 or 2 shuffles and adds), in the
  // same order in every build.
  T sum() const {
    if constexpr (L == 8) {
      raw y = x + __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
      y += __builtin_shufflevector(y, y, 2, 3, 0, 1, 6, 7, 4, 5);
      y += __builtin_shufflevector(y, y, 1, 0, 3, 2, 5, 4, 7, 6);
      return y[0];
    } else if constexpr (L == 4) {
      raw y = x + __builtin_shufflevector(x, x, 2, 3, 0, 1);
      y += __builtin_shufflevector(y, y, 1, 0, 3, 2);
      return y[0];
    } else {
      T s = T(0);
      for (int l = 0; l < L; ++l) s += lane(l);
      return s;
    }
  }
  T max_lane() const {
    T m = lane(0);
    for (int l = 1; l < L; ++l) m = lane(l) > m ? lane(l) : m;
    return m;
  }
  friend Vec operator+(Vec a, Vec b) { return from_raw(a.x + b.x); }
  friend Vec operator-(Vec a, Vec b) { return from_raw(a.x - b.x); }
  friend Vec operator*(Vec a, Vec b) { return from_raw(a.x * b.x); }
  Vec& operator+=(Vec b) {
    x += b.x;
    return *this;
  }
  friend Vec vmax(Vec a, Vec b) { return from_raw(b.x > a.x ? b.x : a.x); }
  friend Vec max_zero(Vec a) {
    if constexpr (kScalar) {
      return from_raw(math::max_zero(a.x));
    } else {
#ifdef MMIM_VEC_AVX2
      // One vmaxps/vmaxpd: max(0, x) returns its second operand where either is NaN, so NaN is
      // kept as in math::max_zero (only -0 differs: -0 here, +0 there; v relu(x) sums alike).
      if constexpr (sizeof(T) == 4) return from_raw(__builtin_ia32_maxps256(raw{}, a.x));
      else return from_raw(__builtin_ia32_maxpd256(raw{}, a.x));
#else
      return from_raw(a.x <= raw{} ? raw{} : a.x);  // NaN kept, as math::max_zero
#endif
    }
  }
  friend Vec where_positive(Vec a, Vec y) {
    if constexpr (kScalar) return from_raw(math::where_positive(a.x, y.x));
    else return from_raw(a.x > raw{} ? y.x : raw{});
  }
  friend Vec where_greater(Vec a, Vec b, Vec y) {
    if constexpr (kScalar) return from_raw(math::where_greater(a.x, b.x, y.x));
    else return from_raw(a.x > b.x ? y.x : raw{});
  }
};

// Lane sums of n vectors stored one after the other at x (L values each; no alignment needed):
// out[q] = sum of vector q's lanes. Groups of L vectors are reduced together
// by a transpose-and-add (pairwise adds of interleaved lanes, so that the L reductions share their
// shuffles: 14 shuffles and 7 adds for 8 vectors instead of 24 and 24), the rest one by one.
template <typename T>
inline void lane_sums(const T* x, int64_t n, T* out) {
  using V = Vec<T>;
  typedef typename V::raw R;
  int64_t q = 0;
  if constexpr (V::L == 8) {
    for (; q + 8 <= n; q += 8) {
      R h[4];
      for (int t = 0; t < 4; ++t) {
        const R u = V::load(x + (q + 2 * t) * 8).x, w = V::load(x + (q + 2 * t + 1) * 8).x;
        // [u01, w01, u23, w23, u45, w45, u67, w67] (uAB = lane A + lane B of u)
        h[t] = __builtin_shufflevector(u, w, 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(u, w, 1, 9, 3, 11, 5, 13, 7, 15);
      }
      // [x0 lanes 0-3, x1, x2, x3, x0 lanes 4-7, x1, x2, x3], then the same for x4..x7
      const R f0 = __builtin_shufflevector(h[0], h[1], 0, 1, 8, 9, 4, 5, 12, 13) +
                   __builtin_shufflevector(h[0], h[1], 2, 3, 10, 11, 6, 7, 14, 15);
      const R f1 = __builtin_shufflevector(h[2], h[3], 0, 1, 8, 9, 4, 5, 12, 13) +
                   __builtin_shufflevector(h[2], h[3], 2, 3, 10, 11, 6, 7, 14, 15);
      const R r = __builtin_shufflevector(f0, f1, 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(f0, f1, 4, 5, 6, 7, 12, 13, 14, 15);
      V::from_raw(r).store(out + q);
    }
  } else if constexpr (V::L == 4) {
    for (; q + 4 <= n; q += 4) {
      const R a = V::load(x + q * 4).x, b = V::load(x + (q + 1) * 4).x;
      const R c = V::load(x + (q + 2) * 4).x, d = V::load(x + (q + 3) * 4).x;
      const R ab = __builtin_shufflevector(a, b, 0, 4, 2, 6) + __builtin_shufflevector(a, b, 1, 5, 3, 7);
      const R cd = __builtin_shufflevector(c, d, 0, 4, 2, 6) + __builtin_shufflevector(c, d, 1, 5, 3, 7);
      const R r = __builtin_shufflevector(ab, cd, 0, 1, 4, 5) + __builtin_shufflevector(ab, cd, 2, 3, 6, 7);
      V::from_raw(r).store(out + q);
    }
  }
  for (; q < n; ++q) out[q] = V::load(x + q * V::L).sum();
}

// exp of a vector (the shared header's exp_lse): the scalar build calls it directly, double
// lanes go one by one (std::exp), float lanes run the header's range reduction and polynomial on
// whole vectors.
template <typename T>
inline Vec<T> exp_lse(Vec<T> xin) {
  using V = Vec<T>;
  if constexpr (V::kScalar) {
    return V::from_raw(math::exp_lse(xin.x));
  } else if constexpr (sizeof(T) == 8) {
    V r;
    for (int l = 0; l < V::L; ++l) r.x[l] = math::exp_lse(xin.x[l]);
    return r;
  } else {
    using C = math::ExpConst;
    typedef int32_t iraw __attribute__((vector_size(32)));
    typename V::raw x = xin.x;
#ifdef MMIM_VEC_AVX2
    // vmaxps(lo, x) = lo > x ? lo : x and vminps(hi, x) = hi < x ? hi : x, NaN x kept: one
    // instruction each instead of a compare and a blend.
    x = __builtin_ia32_maxps256(typename V::raw{} + C::lo, x);
    x = __builtin_ia32_minps256(typename V::raw{} + C::hi, x);
#else
    x = x < C::lo ? typename V::raw{} + C::lo : x;
    x = x > C::hi ? typename V::raw{} + C::hi : x;
#endif
    typename V::raw kf = x * C::log2e + C::shifter;
    const iraw kbits = (iraw)kf;  // GCC vector casts reinterpret the bits
    kf -= C::shifter;
    const V r = V::from_raw((x - kf * C::ln2_hi) - kf * C::ln2_lo);
    const iraw scale_bits = (kbits - C::shifter_bits + 127) << 23;
    const V scale = V::from_raw((typename V::raw)scale_bits);
    return math::exp_poly7(r) * scale;
  }
}

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
// max, against 5 FMAs (u, two x, two sums) and 2 max for the direct form (kernel_ab: forward
// 0.92x, one pass 0.97-0.98x; benchmarks/RESULTS.md §8 row 29). Each term's rounding is a few ulp of
// |v| (|wa a| + |bias| + |wb b|), the size of the direct form's. score_form uses the form for a
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

// u = wa_k a + bias_k for every hidden unit k and sample n of one first argument: U[k][n], rows
// of Bp. A shared critic's u depends on the first argument alone, so the pairs that share it
// (consecutive in the row-major order) load u instead of recomputing it: one FMA fewer of the
// forward's five per unit, tile vector and pair of sources.
template <typename T>
inline void first_layer_rows(const T* a, const T* wa, const T* bias, int64_t K, int64_t Bp, T* U) {
  using V = Vec<T>;
  for (int64_t k = 0; k < K; ++k) {
    const V wak(wa[k]), bk(bias[k]);
    T* row = U + k * Bp;
    for (int64_t n = 0; n < Bp; n += V::L) math::critic_u(wak, V::load(a + n), bk).store(row + n);
  }
}

// The first-layer term of unit k for a tile's two vectors a0, a1 of first arguments: w1[k] a +
// w0[k] (u = wa a + bias, or a threshold t = ta a + tb), or (kU) loaded from the rows U of
// first_layer_rows (offset to the tile, row stride us), which hold the same values.
template <typename T, bool kU>
inline void tile_first_layer(const T* U, int64_t us, int64_t k, const T* w1, const T* w0, const Vec<T>& a0,
                             const Vec<T>& a1, Vec<T>& x0, Vec<T>& x1) {
  using V = Vec<T>;
  if constexpr (kU) {
    x0 = V::load(U + k * us);
    x1 = V::load(U + k * us + V::L);
  } else {
    const V c1(w1[k]), c0(w0[k]);
    x0 = math::critic_u(c1, a0, c0);
    x1 = math::critic_u(c1, a1, c0);
  }
}

// Scores (without c) of one tile of 2 vectors for up to two sources (b1 may be null), with
// u = wa a + bias computed once for both, or (kU) loaded from the first_layer_rows U (offset to
// the tile, row stride us; the same values).
template <typename T, bool kU>
inline void tile_scores2(const T* a, const T* U, int64_t us, const T* b0, const T* b1, const T* wa,
                         const T* wb, const T* bias, const T* v, int64_t K, T* t0, T* t1) {
  using V = Vec<T>;
  constexpr int L = V::L;
  // the tile's u for unit k
#define MMIM_TILE_U(k, u0, u1) \
  V u0, u1;                    \
  tile_first_layer<T, kU>(U, us, k, wa, bias, a0, a1, u0, u1);
  const V a0 = kU ? V::zero() : V::load(a), a1 = kU ? V::zero() : V::load(a + L);
  V s00 = V::zero(), s01 = V::zero();
  if (b1 != nullptr) {
    V s10 = V::zero(), s11 = V::zero();
    const V b00 = V::load(b0), b01 = V::load(b0 + L);
    const V b10 = V::load(b1), b11 = V::load(b1 + L);
    for (int64_t k = 0; k < K; ++k) {
      const V wbk(wb[k]), vk(v[k]);
      MMIM_TILE_U(k, u0, u1)
      s00 += math::critic_unit(vk, math::critic_x(wbk, b00, u0));
      s01 += math::critic_unit(vk, math::critic_x(wbk, b01, u1));
      s10 += math::critic_unit(vk, math::critic_x(wbk, b10, u0));
      s11 += math::critic_unit(vk, math::critic_x(wbk, b11, u1));
    }
    s10.store(t1);
    s11.store(t1 + L);
  } else {
    // One source: hidden units two at a time into separate sums, so that four accumulation
    // chains (not two) hide the FMA latency.
    const V b00 = V::load(b0), b01 = V::load(b0 + L);
    V e00 = V::zero(), e01 = V::zero();
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      const V wbk(wb[k]), vk(v[k]), wbk1(wb[k + 1]), vk1(v[k + 1]);
      MMIM_TILE_U(k, u0, u1)
      MMIM_TILE_U(k + 1, w0, w1)
      s00 += math::critic_unit(vk, math::critic_x(wbk, b00, u0));
      s01 += math::critic_unit(vk, math::critic_x(wbk, b01, u1));
      e00 += math::critic_unit(vk1, math::critic_x(wbk1, b00, w0));
      e01 += math::critic_unit(vk1, math::critic_x(wbk1, b01, w1));
    }
    for (; k < K; ++k) {
      const V wbk(wb[k]), vk(v[k]);
      MMIM_TILE_U(k, u0, u1)
      s00 += math::critic_unit(vk, math::critic_x(wbk, b00, u0));
      s01 += math::critic_unit(vk, math::critic_x(wbk, b01, u1));
    }
#undef MMIM_TILE_U
    s00 += e00;
    s01 += e01;
  }
  s00.store(t0);
  s01.store(t0 + L);
}

// tile_scores2 in the threshold form f (ScoreForm): the same scores up to rounding. kU: the
// thresholds t = ta a + tb are loaded from rows U (first_layer_rows of ta, tb) instead of formed.
template <typename T, bool kU>
inline void tile_scores2_form(const T* a, const T* U, int64_t us, const T* b0, const T* b1, const ScoreForm<T>& f,
                              int64_t K, T* t0, T* t1) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const T* ta = f.ta;
  const T* tb = f.tb;
  const T* cp = f.cp;
  // the tile's thresholds for unit k
#define MMIM_TILE_T(k, x0, x1) \
  V x0, x1;                    \
  tile_first_layer<T, kU>(U, us, k, ta, tb, a0, a1, x0, x1);
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
      MMIM_TILE_T(k, x0, x1)
      const V ck(cp[k]);
      s00 += ck * vmax_form(b00, x0);
      s01 += ck * vmax_form(b01, x1);
      s10 += ck * vmax_form(b10, x0);
      s11 += ck * vmax_form(b11, x1);
    }
    finish(b10, a0, s10, t1);
    finish(b11, a1, s11, t1 + L);
  } else {
    // One source: units two at a time into separate sums (four accumulation chains).
    V e00 = V::zero(), e01 = V::zero();
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      MMIM_TILE_T(k, x0, x1)
      MMIM_TILE_T(k + 1, y0, y1)
      const V ck(cp[k]), ck1(cp[k + 1]);
      s00 += ck * vmax_form(b00, x0);
      s01 += ck * vmax_form(b01, x1);
      e00 += ck1 * vmax_form(b00, y0);
      e01 += ck1 * vmax_form(b01, y1);
    }
    for (; k < K; ++k) {
      MMIM_TILE_T(k, x0, x1)
      const V ck(cp[k]);
      s00 += ck * vmax_form(b00, x0);
      s01 += ck * vmax_form(b01, x1);
    }
    s00 += e00;
    s01 += e01;
  }
#undef MMIM_TILE_T
  finish(b00, a0, s00, t0);
  finish(b01, a1, s01, t0 + L);
}

// tile_scores2_form for two sources over a tile of three vectors, thresholds formed (not kU).
// Each unit adds one FMA to each of six sums, so each sum's chain waits on the FMA latency (4
// cycles) once per unit while the FMA pipes do 9 operations, where the two-vector tile's four
// sums bound it at the latency with 6. The same sums in the same order as tile_scores2_form
// (max(t, b) for max(b, t): equal where neither is NaN, and the form keeps them finite), so the
// scores are bitwise the same. Used by the forward only (source_scores' kTile3): kernel_ab
// forward B/A 0.90-0.96, while in the one pass the same loop did not gain, and with a shared
// critic's rows U three vectors did not gain either (benchmarks/RESULTS.md §8 row 33).
template <typename T>
inline void tile_scores3_form(const T* a, const T* b0, const T* b1, const ScoreForm<T>& f, int64_t K, T* t0,
                              T* t1) {
  using V = Vec<T>;
  constexpr int L = V::L;
  V s00 = V::zero(), s01 = V::zero(), s02 = V::zero(), s10 = V::zero(), s11 = V::zero(), s12 = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    const V ck(f.cp[k]), c1(f.ta[k]), c0(f.tb[k]);
    const V x0 = math::critic_u(c1, V::load(a), c0);
    const V x1 = math::critic_u(c1, V::load(a + L), c0);
    const V x2 = math::critic_u(c1, V::load(a + 2 * L), c0);
    s00 += ck * vmax_form(x0, V::load(b0));
    s01 += ck * vmax_form(x1, V::load(b0 + L));
    s02 += ck * vmax_form(x2, V::load(b0 + 2 * L));
    s10 += ck * vmax_form(x0, V::load(b1));
    s11 += ck * vmax_form(x1, V::load(b1 + L));
    s12 += ck * vmax_form(x2, V::load(b1 + 2 * L));
  }
  const V alpha(f.alpha), beta(f.beta), gamma(f.gamma);
  const auto finish = [&](const T* bn, const T* an, const V& sum, T* out) {
    ((alpha * V::load(an) + gamma + beta * V::load(bn)) + sum).store(out);
  };
  finish(b0, a, s00, t0);
  finish(b0 + L, a + L, s01, t0 + L);
  finish(b0 + 2 * L, a + 2 * L, s02, t0 + 2 * L);
  finish(b1, a, s10, t1);
  finish(b1 + L, a + L, s11, t1 + L);
  finish(b1 + 2 * L, a + 2 * L, s12, t1 + 2 * L);
}

// Scores (without c) of samples [n0, n1) of `nsrc` sources that share the first argument a:
// dst[s][n - n0] = T(a[n], src[s][n]). n0 and n1 are multiples of the tile width. form: null,
// or the critic's threshold form (ScoreForm), which the loops then use (builds with
// kThresholdGates only). U: null, or a's first_layer_rows (row stride Bp) of wa, bias, or of ta,
// tb with a form, loaded instead of computing u or t. kTile3: two sources of per-pair critics in
// a form go through tile_scores3_form (the forward).
template <typename T, bool kTile3 = false>
inline void source_scores(const T* a, const T* U, int64_t Bp, const T* const* src, T* const* dst,
                          int64_t nsrc, int64_t n0, int64_t n1, const T* wa, const T* wb,
                          const T* bias, const T* v, int64_t K, const ScoreForm<T>* form) {
  constexpr int W = 2 * Vec<T>::L;  // one tile_scores2 tile; kLanes<T> (the padding) is a multiple
  T scratch[W];
  auto run = [&](auto use_u, auto use_form) {
    constexpr bool kU = decltype(use_u)::value;
    int64_t n = n0;
    if constexpr (kTile3 && decltype(use_form)::value && !kU) {
      // Two sources, per-pair critics: three-vector tiles (tile_scores3_form) for an even number
      // of them, so that the rest is a multiple of W.
      if (nsrc == 2) {
        constexpr int W3 = 3 * Vec<T>::L;
        const int64_t n3 = n0 + (n1 - n0) / (2 * W3) * (2 * W3);
        for (; n < n3; n += W3)
          tile_scores3_form<T>(a + n, src[0] + n, src[1] + n, *form, K, dst[0] + (n - n0), dst[1] + (n - n0));
      }
    }
    for (; n < n1; n += W) {
      for (int64_t s = 0; s < nsrc; s += 2) {
        const bool two = s + 1 < nsrc;
        const T* b1 = two ? src[s + 1] + n : nullptr;
        T* t1 = two ? dst[s + 1] + (n - n0) : scratch;
        if constexpr (decltype(use_form)::value)
          tile_scores2_form<T, kU>(a + n, kU ? U + n : nullptr, Bp, src[s] + n, b1, *form, K, dst[s] + (n - n0), t1);
        else
          tile_scores2<T, kU>(a + n, kU ? U + n : nullptr, Bp, src[s] + n, b1, wa, wb, bias, v, K, dst[s] + (n - n0),
                              t1);
      }
    }
  };
  if constexpr (kThresholdGates<T>) {
    if (form != nullptr) {
      if (U != nullptr) run(std::true_type{}, std::true_type{});
      else run(std::false_type{}, std::true_type{});
      return;
    }
  }
  if (U != nullptr) run(std::true_type{}, std::false_type{});
  else run(std::false_type{}, std::false_type{});
}

// The score form (ScoreForm) of the pairs' critics, and a shared critic's first_layer_rows of the
// current first argument, recomputed when the pairs move to another one (for per-pair critics
// rows() is nullptr). A shared critic's form is made once; per-pair critics' forms for blocks of
// kFormBlock consecutive pairs at a time (independent computations that the CPU overlaps, where
// one per pair would wait on its divisions before the pair's loops can start).
template <typename T>
struct FirstLayerCache {
  static constexpr int64_t kFormBlock = 32;
  const PairStatsCpuArgs<T>& g;
  const int64_t end;  // the pairs [begin, end) of the caller
  std::vector<T> buf, form_buf;
  ScoreForm<T> shared_form;
  std::vector<ScoreForm<T>> forms;  // pairs [blk0, blk1)
  int64_t blk0 = 0, blk1 = 0, unit = -1;
  FirstLayerCache(const PairStatsCpuArgs<T>& args, int64_t end_pair) : g(args), end(end_pair) {
    if constexpr (kThresholdGates<T>) {
      const int64_t n = g.pstride == 0 ? 1 : kFormBlock;  // a shared critic's form is shared_form
      form_buf.resize(static_cast<size_t>(n * score_form_floats<T>(g.K) + 64 / sizeof(T)));
      if (g.pstride != 0) forms.resize(static_cast<size_t>(kFormBlock));
    }
    if (g.pstride == 0) {
      buf.resize(static_cast<size_t>(g.K * g.Bp));
      if constexpr (kThresholdGates<T>) shared_form = score_form(g.wa, g.wb, g.bias, g.v, g.K, g.hmax, form_data());
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
  const T* rows(int64_t i) {
    if (buf.empty()) return nullptr;
    if (i != unit) {
      if (shared_form.ok) first_layer_rows<T>(g.hT + i * g.Bp, shared_form.ta, shared_form.tb, g.K, g.Bp, buf.data());
      else first_layer_rows<T>(g.hT + i * g.Bp, g.wa, g.bias, g.K, g.Bp, buf.data());
      unit = i;
    }
    return buf.data();
  }
};

// Sum of x[0..n).
template <typename T>
inline T range_sum(const T* x, int64_t n) {
  using V = Vec<T>;
  // Four accumulators: one would make the loop wait on each add's latency.
  V acc0 = V::zero(), acc1 = V::zero(), acc2 = V::zero(), acc3 = V::zero();
  int64_t t = 0;
  for (; t + 4 * V::L <= n; t += 4 * V::L) {
    acc0 += V::load(x + t);
    acc1 += V::load(x + t + V::L);
    acc2 += V::load(x + t + 2 * V::L);
    acc3 += V::load(x + t + 3 * V::L);
  }
  for (; t + V::L <= n; t += V::L) acc0 += V::load(x + t);
  T s = ((acc0 + acc1) + (acc2 + acc3)).sum();
  for (; t < n; ++t) s += x[t];
  return s;
}

// Whether the critic (wa, wb, bias, v: [K]; c) has finite parameters only. x * 0 is 0 for finite
// x and NaN for NaN or infinity, so one comparison of the products' sum tests them all.
template <typename T>
inline bool critic_finite(const T* wa, const T* wb, const T* bias, const T* v, int64_t K, T c) {
  using V = Vec<T>;
  const V zero = V::zero();
  V acc = zero;
  int64_t k = 0;
  for (; k + V::L <= K; k += V::L)
    acc += ((V::load(wa + k) * zero + V::load(wb + k) * zero) + (V::load(bias + k) * zero + V::load(v + k) * zero));
  T sum = acc.sum() + c * T(0);
  for (; k < K; ++k) sum += (wa[k] * T(0) + wb[k] * T(0)) + (bias[k] * T(0) + v[k] * T(0));
  return sum == T(0);
}

// Log-sum-exp state of x[0..n), n >= 1: the maximum, then the sum of exp(x - max). kKeep: also
// leave exp(x[t] - max) in x[t] (t < n), for weights formed from them (x is written then).
template <typename T, bool kKeep = false>
inline math::LseState<T> range_lse(std::conditional_t<kKeep, T*, const T*> x, int64_t n) {
  using V = Vec<T>;
  constexpr int L = V::L;
  T mx = x[0];
  int64_t t = 0;
  if (n >= L) {
    V vm = V::load(x);
    for (t = L; t + L <= n; t += L) vm = vmax(vm, V::load(x + t));
    mx = vm.max_lane();
  }
  for (; t < n; ++t) mx = x[t] > mx ? x[t] : mx;
  const V vmx(mx);
  V acc = V::zero();
  for (t = 0; t + L <= n; t += L) {
    const V e = exp_lse(V::load(x + t) - vmx);
    if constexpr (kKeep) e.store(x + t);
    acc += e;
  }
  T sum = acc.sum();
  for (; t < n; ++t) {
    const T e = math::exp_lse(x[t] - mx);
    if constexpr (kKeep) x[t] = e;
    sum += e;
  }
  return math::LseState<T>{mx, sum};
}

// Backward of hidden unit k over all samples of `nsrc` sources sharing the first argument a.
// Source s has second argument b[s] and per-sample weights w[s] (the upstream gradient of its
// score); its argument gradient goes to gb[s]. Per sample and source the unit's gate is
// w [x > 0]; acc collects the sums over samples of gate*a, gate*b and gate, from which the caller
// forms the critic's gradients (dv too: math::critic_unit_dv). Per sample, the gates of all
// sources are summed first (into dsum [Bp] between passes), because wa, bias and the first
// argument see only their sum.
template <typename T>
struct UnitGrad {
  Vec<T> ga, gb, g1;  // sums of gate*a, gate*b, gate
};

// How unit_pass forms its gates (see there).
constexpr int kGateX = 0, kGateAbove = 1, kGateBelow = 2;

// One pass of unit_backward over the samples for one or two sources (kTwo); kFirst / kLast:
// whether earlier / later passes exist that read or write dsum; kW0: the first source's weights
// are the single value w0c (the joint samples when the batch has no padding), not the array w0;
// kH / kP: whether the argument gradients (g0, g1, ga) / the sums for the critic's gradients
// (acc) are wanted; kJ (gates by threshold only): also the sum over the samples of the first
// source's max(b, t) into *accj. Compile-time flags keep the sample loop free of branches.
template <typename T, bool kH, bool kP, bool kTwo, bool kFirst, bool kLast, bool kW0, int kGate, bool kJ = false>
inline void unit_pass(int64_t Bp, const T* __restrict a, const T* __restrict b0, const T* __restrict b1,
                      const T* __restrict w0, const T* __restrict w1, T* __restrict g0, T* __restrict g1,
                      T* __restrict ga, T* __restrict dsum, const Vec<T>& w0c, const Vec<T>& wak,
                      const Vec<T>& wbk, const Vec<T>& bk, const Vec<T>& cwa, const Vec<T>& cwb,
                      UnitGrad<T>& acc, Vec<T>* accj = nullptr) {
  using V = Vec<T>;
  constexpr int L = V::L;
  // The gate of sample n: kGate == kGateX, [x > 0] from x = wb b + u; else b compared with the
  // threshold t = wak a + bk, where wak, bk hold the math::GateThreshold's ta, tb (kGateAbove:
  // [b > t], kGateBelow: [b < t]), one FMA per sample instead of one per sample and source.
  const auto gate = [&](const V& t, const V& bn, const V& w) {
    if constexpr (kGate == kGateX) return math::critic_unit_gate(math::critic_x(wbk, bn, t), w);
    else if constexpr (kGate == kGateAbove) return where_greater(bn, t, w);
    else return where_greater(t, bn, w);
  };
  // One accumulator per source for gate*b: a chain with two FMAs per iteration would bound the
  // loop by the FMA latency.
  V acc_b0 = V::zero(), acc_b1 = V::zero(), acc_a = V::zero(), acc_1 = V::zero(), acc_j = V::zero();
  for (int64_t n = 0; n < Bp; n += L) {
    const V an = V::load_reg(a + n);
    const V u = math::critic_u(wak, an, bk);  // u, or the threshold t
    const V bn0 = V::load_reg(b0 + n);
    // kJ (gates by threshold): the joint samples' max(b, t), whose sum over the samples is the
    // unit's part of the joint scores' sum (ScoreForm; units_backward_r1_form).
    if constexpr (kJ) acc_j += vmax_form(bn0, u);
    V w0n;
    if constexpr (kW0) w0n = w0c;
    else w0n = V::load(w0 + n);
    const V d0 = gate(u, bn0, w0n);
    if constexpr (kP) acc_b0 += d0 * bn0;
    V D = d0, d1;
    if constexpr (kTwo) {
      const V bn1 = V::load_reg(b1 + n);
      d1 = gate(u, bn1, V::load(w1 + n));
      if constexpr (kP) acc_b1 += d1 * bn1;
      D += d1;
    }
    if constexpr (!kFirst) D += V::load(dsum + n);
    if constexpr (kLast && kP) {
      acc_a += D * an;
      acc_1 += D;
    }
    // The gradient rows' loads before their stores: kernel_ab one pass B/A 0.94-0.99 against
    // each row's load and store in turn (RESULTS.md §8 row 27). A sample's rows of g0 and g1 lie
    // a multiple of 4 KiB apart, so a load after the other row's store may wait on that store's
    // address check; that this is the cause is not shown.
    if constexpr (kH) {
      const V r0 = V::load(g0 + n) + d0 * cwb;
      V r1, ra;
      if constexpr (kTwo) r1 = V::load(g1 + n) + d1 * cwb;
      if constexpr (kLast) ra = V::load(ga + n) + D * cwa;
      r0.store(g0 + n);
      if constexpr (kTwo) r1.store(g1 + n);
      if constexpr (kLast) ra.store(ga + n);
    }
    if constexpr (!kLast) D.store(dsum + n);
  }
  acc.gb += acc_b0 + acc_b1;
  acc.ga += acc_a;
  acc.g1 += acc_1;
  if constexpr (kJ) *accj = acc_j;
}

// The gate threshold of unit k (math::GateThreshold; sign 0: gate from x), in the builds with
// kThresholdGates only. A critic with a score form (ScoreForm: every unit's threshold safe) has
// the unit's threshold in it already, the same quotients.
template <typename T>
inline math::GateThreshold<T> unit_threshold(const ScoreForm<T>* form, int64_t k, T wak, T wbk, T bk) {
  math::GateThreshold<T> th{T(0), T(0), 0};
  if constexpr (kThresholdGates<T>) {
    if (form != nullptr) th = math::GateThreshold<T>{form->ta[k], form->tb[k], wbk > T(0) ? 1 : -1};
    else th = math::gate_threshold(wak, wbk, bk);
  }
  return th;
}

// unit_pass for two hidden units at once (p, q) whose gates both compare with their threshold the
// same way (kGate: kGateAbove or kGateBelow), over the two sources of R = 1 (joint, shuffled), for
// the argument gradients alone (unit_pass's kH without kP). The samples, the weights and the three
// gradient rows are loaded and the rows stored once for both units: per unit and vector of samples
// 3.5 loads and 1.5 stores instead of 7 and 3 (kernel_ab: the one pass with the h-gradients only
// 0.85-0.90x; benchmarks/RESULTS.md §8 row 30). The rows get unit p's terms and then q's, the
// order of two unit_pass calls. kW0: as unit_pass; tp, tq: each unit's threshold coefficients ta,
// tb and d x / d a, d x / d b (cwa, cwb).
template <typename T, bool kW0, int kGate>
inline void unit_pass2(int64_t Bp, const T* __restrict a, const T* __restrict b0, const T* __restrict b1,
                       const T* __restrict w0, const T* __restrict w1, T* __restrict g0, T* __restrict g1,
                       T* __restrict ga, const Vec<T>& w0c, const Vec<T>* tp, const Vec<T>* tq) {
  using V = Vec<T>;
  constexpr int L = V::L;
  static_assert(kGate == kGateAbove || kGate == kGateBelow, "unit_pass2 gates by threshold");
  const auto gate = [](const V& t, const V& bn, const V& w) {
    if constexpr (kGate == kGateAbove) return where_greater(bn, t, w);
    else return where_greater(t, bn, w);
  };
  const V tap = tp[0], tbp = tp[1], cwap = tp[2], cwbp = tp[3];
  const V taq = tq[0], tbq = tq[1], cwaq = tq[2], cwbq = tq[3];
  for (int64_t n = 0; n < Bp; n += L) {
    const V an = V::load(a + n);
    const V bn0 = V::load(b0 + n), bn1 = V::load(b1 + n);
    V w0n;
    if constexpr (kW0) w0n = w0c;
    else w0n = V::load(w0 + n);
    const V w1n = V::load(w1 + n);
    const V up = math::critic_u(tap, an, tbp), uq = math::critic_u(taq, an, tbq);
    const V dp0 = gate(up, bn0, w0n), dp1 = gate(up, bn1, w1n);
    const V dq0 = gate(uq, bn0, w0n), dq1 = gate(uq, bn1, w1n);
    const V r0 = (V::load(g0 + n) + dp0 * cwbp) + dq0 * cwbq;
    const V r1 = (V::load(g1 + n) + dp1 * cwbp) + dq1 * cwbq;
    const V ra = (V::load(ga + n) + (dp0 + dp1) * cwap) + (dq0 + dq1) * cwaq;
    r0.store(g0 + n);
    r1.store(g1 + n);
    ra.store(ga + n);
  }
}

// w[0] == nullptr: every sample of source 0 has the weight w0 (no padding to zero). kH, kP: see
// unit_pass (gb and ga are not touched without kH, acc is not without kP).
template <typename T, bool kH, bool kP>
inline void unit_backward(int64_t Bp, const T* a, const T* const* b, const T* const* w, T w0, T* const* gb,
                          int64_t nsrc, T wak_s, T wbk_s, T bk_s, T vk_s, T* ga, T* dsum,
                          UnitGrad<T>& acc, const ScoreForm<T>* form, int64_t k) {
  using V = Vec<T>;
  // The gates by threshold when the unit allows it (math::gate_threshold), else from x; in the
  // builds with kThresholdGates only. A critic with a score form (ScoreForm: every unit's
  // threshold safe) has unit k's threshold in it already, the same quotients.
  const math::GateThreshold<T> th = unit_threshold(form, k, wak_s, wbk_s, bk_s);
  const int mode = th.sign > 0 ? kGateAbove : th.sign < 0 ? kGateBelow : kGateX;
  const V wak(mode == kGateX ? wak_s : th.ta), wbk(wbk_s), bk(mode == kGateX ? bk_s : th.tb), w0c(w0);
  const bool w0_const = w[0] == nullptr;
  // d x / d a = wa and d x / d b = wb, times d T / d x = v gate (critic_unit_dx is linear in the
  // gate, so it is applied to the parameters once).
  const V cwa(math::critic_unit_dx(vk_s, wak_s)), cwb(math::critic_unit_dx(vk_s, wbk_s));
  // Sources two at a time (u is shared); the last pass also applies the per-sample sum D.
  for (int64_t s = 0; s < nsrc; s += 2) {
    const bool two = s + 1 < nsrc, first = s == 0, last = s + 2 >= nsrc;
    const T* b1 = two ? b[s + 1] : b[s];
    const T* w1 = two ? w[s + 1] : w[s];
    T* g1 = two ? gb[s + 1] : gb[s];
#define MMIM_UNIT_PASS_G(TWO, FIRST, LAST, W0, G)                                                      \
  unit_pass<T, kH, kP, TWO, FIRST, LAST, W0, G>(Bp, a, b[s], b1, w[s], w1, gb[s], g1, ga, dsum, w0c, wak, wbk, \
                                                bk, cwa, cwb, acc)
#define MMIM_UNIT_PASS(TWO, FIRST, LAST, W0)                                        \
  do {                                                                              \
    if constexpr (kThresholdGates<T>) {                                             \
      if (mode == kGateAbove) MMIM_UNIT_PASS_G(TWO, FIRST, LAST, W0, kGateAbove);   \
      else if (mode == kGateBelow) MMIM_UNIT_PASS_G(TWO, FIRST, LAST, W0, kGateBelow); \
      else MMIM_UNIT_PASS_G(TWO, FIRST, LAST, W0, kGateX);                          \
    } else {                                                                        \
      MMIM_UNIT_PASS_G(TWO, FIRST, LAST, W0, kGateX);                               \
    }                                                                               \
  } while (0)
#define MMIM_UNIT_PASS_FIRST(TWO, LAST)                \
  if (w0_const) MMIM_UNIT_PASS(TWO, true, LAST, true); \
  else MMIM_UNIT_PASS(TWO, true, LAST, false)
    if (first && last) {
      if (two) MMIM_UNIT_PASS_FIRST(true, true);
      else MMIM_UNIT_PASS_FIRST(false, true);
    } else if (first) {
      MMIM_UNIT_PASS_FIRST(true, false);  // not last: a later pass exists, so this one has two
    } else if (last) {
      if (two) MMIM_UNIT_PASS(true, false, true, false);
      else MMIM_UNIT_PASS(false, false, true, false);
    } else {
      MMIM_UNIT_PASS(true, false, false, false);
    }
#undef MMIM_UNIT_PASS_FIRST
#undef MMIM_UNIT_PASS
#undef MMIM_UNIT_PASS_G
  }
}

// A hidden unit and its gate threshold (units_backward_r1's order).
template <typename T>
struct UnitRule {
  int64_t k;
  math::GateThreshold<T> th;
};

// The unit loop of backward_pairs for R = 1 and the argument gradients alone (sources: joint b0
// with weights w0, or w0c everywhere when w0 is null; shuffled b1 with weights w1; their gradient
// rows g0, g1; ga the first argument's): the units whose gates go by threshold two at a time
// (unit_pass2), those with [b > t] (wb > 0) among themselves and those with [b < t] among
// themselves; a unit left over, or gated from x, alone (unit_backward). order: [K] scratch (each
// unit with the threshold it was sorted by, which its pass then uses). Not inlined: inlined into
// backward_pairs, two-unit loops made the compiler keep the other unit loops' pointers and bounds
// on the stack (the one pass 1.13-1.26x slower).
template <typename T>
__attribute__((noinline)) void units_backward_r1(int64_t Bp, const T* a, const T* b0, const T* b1, const T* w0,
                                                 const T* w1, T w0c, T* g0, T* g1, T* ga, const T* wa,
                                                 const T* wb, const T* bias, const T* v,
                                                 const ScoreForm<T>* form, int64_t K, UnitRule<T>* order) {
  using V = Vec<T>;
  const T* src[2] = {b0, b1};
  const T* wts[2] = {w0, w1};
  T* gsrc[2] = {g0, g1};
  const auto one_unit = [&](int64_t k) {
    UnitGrad<T> unused{V::zero(), V::zero(), V::zero()};
    unit_backward<T, true, false>(Bp, a, src, wts, w0c, gsrc, 2, wa[k], wb[k], bias[k], v[k], ga, nullptr, unused,
                                  form, k);
  };
  const auto two_units = [&](const UnitRule<T>& p, const UnitRule<T>& q, auto gate) {
    V coef[2][4];
    for (int u = 0; u < 2; ++u) {
      const UnitRule<T>& r = u == 0 ? p : q;
      const int64_t k = r.k;
      coef[u][0] = V(r.th.ta);
      coef[u][1] = V(r.th.tb);
      coef[u][2] = V(math::critic_unit_dx(v[k], wa[k]));
      coef[u][3] = V(math::critic_unit_dx(v[k], wb[k]));
    }
    constexpr int G = decltype(gate)::value;
    if (w0 == nullptr) unit_pass2<T, true, G>(Bp, a, b0, b1, nullptr, w1, g0, g1, ga, V(w0c), coef[0], coef[1]);
    else unit_pass2<T, false, G>(Bp, a, b0, b1, w0, w1, g0, g1, ga, V(w0c), coef[0], coef[1]);
  };
  int64_t above = 0, below = K;  // order[0, above): [b > t]; order[below, K): [b < t]
  for (int64_t k = 0; k < K; ++k) {
    const math::GateThreshold<T> th = unit_threshold(form, k, wa[k], wb[k], bias[k]);
    if (th.sign > 0) order[above++] = UnitRule<T>{k, th};
    else if (th.sign < 0) order[--below] = UnitRule<T>{k, th};
    else one_unit(k);
  }
  int64_t q = 0;
  for (; q + 2 <= above; q += 2) two_units(order[q], order[q + 1], std::integral_constant<int, kGateAbove>{});
  if (q < above) one_unit(order[q].k);
  for (q = below; q + 2 <= K; q += 2) two_units(order[q], order[q + 1], std::integral_constant<int, kGateBelow>{});
  if (q < K) one_unit(order[q].k);
}

// The unit loop of backward_pairs for its commonest case with the critic's gradients (with kH the
// argument gradients too, else the critic's alone: MINE's critic steps): R = 1, a critic with a
// score form (every unit gates by threshold), the joint weight one value w0c. The same unit_pass
// calls as unit_backward makes there (bitwise the same results), without its per-unit choices
// (sources, weights, flags, gate from x): the sources' pointers are set once per pair and each
// unit only picks [b > t] or [b < t] by the sign of wb. Each unit's sums go to accv ([3][K]
// vectors, backward_pairs' layout). Not inlined, like units_backward_r1; here GCC also keeps the
// joint weight in a register (7 loads per iteration, not 8). kernel_ab: all gradients, one pass
// B/A 0.935-0.961, backward 0.941-0.969; critic gradients only 0.936-0.943 / 0.932-0.935
// (benchmarks/RESULTS.md §8 rows 32 and 34). kJ (the one pass): each unit's sum over the joint
// samples of max(b0, t) goes to a fourth row of accv ([4][K] vectors), from which backward_pairs
// forms t_joint (§8 row 35).
template <typename T, bool kH, bool kJ = false>
__attribute__((noinline)) void units_backward_r1_form(int64_t Bp, const T* a, const T* b0, const T* b1, T w0c,
                                                     const T* w1, T* g0, T* g1, T* ga, const T* wa, const T* wb,
                                                     const T* v, const ScoreForm<T>& form, int64_t K, T* accv) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const V w0v(w0c);
  for (int64_t k = 0; k < K; ++k) {
    UnitGrad<T> acc{V::zero(), V::zero(), V::zero()};
    V accj;
    const V ta(form.ta[k]), tb(form.tb[k]), wbk(wb[k]);
    const V cwa(math::critic_unit_dx(v[k], wa[k])), cwb(math::critic_unit_dx(v[k], wb[k]));
    if (wb[k] > T(0))
      unit_pass<T, kH, true, true, true, true, true, kGateAbove, kJ>(Bp, a, b0, b1, nullptr, w1, g0, g1, ga, nullptr,
                                                                     w0v, ta, wbk, tb, cwa, cwb, acc, &accj);
    else
      unit_pass<T, kH, true, true, true, true, true, kGateBelow, kJ>(Bp, a, b0, b1, nullptr, w1, g0, g1, ga, nullptr,
                                                                     w0v, ta, wbk, tb, cwa, cwb, acc, &accj);
    acc.ga.store(accv + k * L);
    acc.gb.store(accv + (K + k) * L);
    acc.g1.store(accv + (2 * K + k) * L);
    if constexpr (kJ) accj.store(accv + (3 * K + k) * L);
  }
}

}  // namespace detail

// Forward for pairs [begin, end): t_joint[p], lme[p]. Scratch sc: [1+R][kChunkSamples], one
// chunk of scores per source (small enough to stay in L1/L2).
template <typename T>
MMIM_FLATTEN void forward_range(const PairStatsCpuArgs<T>& g, int64_t begin, int64_t end, T* sc, T* t_joint,
                   T* lme) {
  const T inv_b = T(1) / static_cast<T>(g.B);
  const T count = static_cast<T>(g.R * g.B);
  const int64_t nsrc = 1 + g.R;
  std::vector<const T*> src(nsrc);
  std::vector<T*> dst(nsrc);
  for (int64_t s = 0; s < nsrc; ++s) dst[s] = sc + s * kChunkSamples;
  detail::FirstLayerCache<T> first_layer(g, end);
  using detail::ScoreForm;
  for_each_pair(g.pairs, g.m, begin, end, [&](int64_t p, int64_t i, int64_t j) {
    const T* wa = g.wa + p * g.pstride;
    const T* wb = g.wb + p * g.pstride;
    const T* bias = g.bias + p * g.pstride;
    const T* v = g.v + p * g.pstride;
    const T* a = g.hT + i * g.Bp;
    const T* U = first_layer.rows(i);
    const ScoreForm<T>* form = first_layer.form(p);
    src[0] = g.hT + j * g.Bp;
    for (int64_t r = 0; r < g.R; ++r) src[1 + r] = g.hP + (r * g.m + j) * g.Bp;
    T jsum = T(0);
    math::LseState<T> st = math::lse_empty<T>();
    for (int64_t n0 = 0; n0 < g.B; n0 += kChunkSamples) {
      const int64_t n1 = std::min(n0 + kChunkSamples, g.Bp);
      const int64_t valid = std::min(n1, g.B) - n0;
      detail::source_scores<T, true>(a, U, g.Bp, src.data(), dst.data(), nsrc, n0, n1, wa, wb, bias, v, g.K,
                                     form);
      jsum += detail::range_sum(dst[0], valid);
      for (int64_t r = 0; r < g.R; ++r) st = math::lse_merge(st, detail::range_lse<T>(dst[1 + r], valid));
    }
    const T cp = g.c[p * g.cstride];
    t_joint[p] = cp + jsum * inv_b;
    lme[p] = cp + math::lse_finish_mean(st, count);
  });
}

namespace detail {

// backward_range for the wanted gradients: kH, those w.r.t. hT and hP; kP, the critic's. With
// t_out != nullptr (forward_backward_range) the pass also computes the statistics: it scores the
// joint samples with the shuffled ones, writes t_joint and lme to t_out[p], lme_out[p] and uses
// that lme (the argument lme is not read).
template <typename T, bool kH, bool kP>
inline void backward_pairs(const PairStatsCpuArgs<T>& g, int64_t begin, int64_t end, const T* grad_t,
                           const T* grad_lme, const T* lme, const BwdScratch<T>& s, T* gwa, T* gwb,
                           T* gbias, T* gv, T* t_out, T* lme_out) {
  const bool values = t_out != nullptr;
  const bool shared = g.pstride == 0;
  const int64_t K = g.K, R = g.R, Bp = g.Bp;
  const int64_t nsrc = 1 + R;
  std::vector<const T*> src(nsrc), wts(nsrc);
  // score_dst: [0] the joint scores (values only; in dsum, which the unit passes use later), then
  // the shuffled ones in wm, where they become the sample weights.
  std::vector<T*> gsrc(nsrc), score_dst(nsrc);
  score_dst[0] = s.dsum;
  for (int64_t r = 0; r < R; ++r) {
    wts[1 + r] = s.wm + r * Bp;
    score_dst[1 + r] = s.wm + r * Bp;
  }
  // Per pair: the per-unit sum vectors ([3][K] vectors: gate a, gate b, gate; with the one pass's
  // joint scores summed in the unit loop (joint_in_units) a fourth row, the sums over the joint
  // samples of max(b, t_k)) and their lane sums.
  constexpr int L = detail::Vec<T>::L;
  std::vector<T> accv(static_cast<size_t>(4 * K * L));
  std::vector<T> sums(static_cast<size_t>(4 * K));
  std::vector<detail::UnitRule<T>> order(static_cast<size_t>(kH && !kP ? K : 0));  // units_backward_r1's scratch
  std::vector<T> wmax(values ? R : 0);  // the one pass: each source's largest shuffled score
  // joint_in_units: the sums over the batch of the rows of hT (both arguments of a joint sample
  // are rows of hT), each formed when a pair first needs it (NaN: not yet).
  std::vector<T> row_sums(values ? static_cast<size_t>(g.m) : 0, std::numeric_limits<T>::quiet_NaN());
  const auto row_sum = [&](int64_t r) {
    T& sum = row_sums[r];
    if (sum != sum) sum = detail::range_sum(g.hT + r * Bp, g.B);
    return sum;
  };
  FirstLayerCache<T> first_layer(g, end);
  const bool shared_finite = shared && critic_finite(g.wa, g.wb, g.bias, g.v, K, g.c[0]);
  for_each_pair(g.pairs, g.m, begin, end, [&](int64_t p, int64_t i, int64_t j) {
    const T* wa = g.wa + p * g.pstride;
    const T* wb = g.wb + p * g.pstride;
    const T* bias = g.bias + p * g.pstride;
    const T* v = g.v + p * g.pstride;
    const T cp = g.c[p * g.cstride];
    const T* a = g.hT + i * Bp;
    const ScoreForm<T>* form = first_layer.form(p);
    src[0] = g.hT + j * Bp;
    for (int64_t r = 0; r < R; ++r) src[1 + r] = g.hP + (r * g.m + j) * Bp;
    // A pair (i, i): the joint samples' second-argument gradient goes to gdiag, not to gh row i,
    // which is also the first argument's row ga_row (the unit loops load both rows before they
    // store both, and declare them __restrict); added to it after the unit loops.
    const bool diag = kH && i == j;
    if constexpr (kH) {
      gsrc[0] = diag ? s.gdiag : s.gh + j * Bp;
      if (diag) std::fill(s.gdiag, s.gdiag + Bp, T(0));
      for (int64_t r = 0; r < R; ++r) gsrc[1 + r] = s.gP + (r * g.m + j) * Bp;
    }
    // A critic with a non-finite parameter (NaN or infinity): its statistics come from the scores
    // as the reference's arithmetic forms them (no score form, which score_form makes for finite
    // critics only; max_zero keeps NaN), and every gradient the pair contributes to is NaN: the
    // critic's (its rows, or all of a shared critic's; c's through g.gc or the moving-average
    // factor) and h's columns i and j. The reference's gradients through such scores are NaN
    // too, except where a ReLU's zero gate happens to cut a NaN off.
    const bool finite = shared ? shared_finite : critic_finite(wa, wb, bias, v, K, cp);
    const auto poison = [&] {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      if constexpr (kH) {
        std::fill(s.gh + i * Bp, s.gh + i * Bp + g.B, nan);
        std::fill(s.gh + j * Bp, s.gh + j * Bp + g.B, nan);
      }
      if constexpr (kP) {
        if (shared) {
          std::fill(s.gshared, s.gshared + 4 * K, nan);
        } else {
          for (T* row : {gwa, gwb, gbias, gv}) std::fill(row + p * K, row + (p + 1) * K, nan);
          if (g.gc != nullptr) g.gc[p] = nan;
        }
      }
      if (values && g.ema != nullptr) g.ema_ratio[p] = nan;
    };
    if (!finite && !values) return poison();

    // Sample weights: joint grad_t / B (one value, unless the padding needs zeros); shuffled
    // grad_lme exp(T - lme) / (R B), recomputing the scores instead of having stored them.
    const T gj = grad_t[p] / static_cast<T>(g.B);
    wts[0] = g.B == Bp ? nullptr : s.wj;
    if (g.B != Bp)
      for (int64_t n = 0; n < Bp; ++n) s.wj[n] = n < g.B ? gj : T(0);
    T gl = grad_lme[p] / static_cast<T>(R * g.B);
    // The one pass in units_backward_r1_form's case (R = 1, a score form, one joint weight, the
    // critic's gradients wanted): the joint scores are not formed sample by sample (their sum is
    // all the statistic needs, and the joint weight does not depend on them). The score tile
    // scores the shuffled samples alone, and the unit loop sums each unit's max(b, t_k) over the
    // joint samples (unit_pass's kJ); t_joint is formed from those sums after it.
    // r1_form: units_backward_r1_form's case (below); joint_in_units: that case in the one pass.
    bool r1_form = false;
    if constexpr (kThresholdGates<T> && kP) r1_form = finite && nsrc == 2 && form != nullptr && wts[0] == nullptr;
    const bool joint_in_units = values && r1_form;
    {
      using V = detail::Vec<T>;
      if (values) {
        // The statistics as forward_range forms them, from scores of the whole batch at once. The
        // log-sum-exp keeps each shuffled sample's exp(T - max_r), so that its weight is one
        // multiply away (math::marginal_weight_scale) instead of a second exp.
        if (joint_in_units)
          detail::source_scores<T>(a, first_layer.rows(i), Bp, src.data() + 1, score_dst.data() + 1, R, 0, Bp, wa,
                                   wb, bias, v, K, form);
        else
          detail::source_scores<T>(a, first_layer.rows(i), Bp, src.data(), score_dst.data(), nsrc, 0, Bp, wa, wb,
                                   bias, v, K, form);
        math::LseState<T> st = math::lse_empty<T>();
        for (int64_t r = 0; r < R; ++r) {
          const math::LseState<T> sr = detail::range_lse<T, true>(score_dst[1 + r], g.B);
          wmax[r] = sr.max;
          st = math::lse_merge(st, sr);
        }
        const T lme0 = math::lse_finish_mean(st, static_cast<T>(R * g.B));
        if (!joint_in_units) t_out[p] = cp + detail::range_sum(s.dsum, g.B) / static_cast<T>(g.B);
        lme_out[p] = cp + lme0;
        if (g.ema != nullptr) {
          const T ratio = math::mine_ema_ratio(cp + lme0, g.ema[2 * p], g.ema[2 * p + 1], g.ema_log_a);
          g.ema_ratio[p] = ratio;
          gl *= ratio;
        }
        for (int64_t r = 0; r < R; ++r) {
          T* w = s.wm + r * Bp;
          const V scale(math::marginal_weight_scale(wmax[r], lme0, gl));
          for (int64_t n = 0; n < Bp; n += V::L) (V::load(w + n) * scale).store(w + n);
        }
      } else {
        detail::source_scores<T>(a, first_layer.rows(i), Bp, src.data() + 1, score_dst.data() + 1, R, 0, Bp, wa,
                                 wb, bias, v, K, form);
        const V lme0v(lme[p] - cp), glv(gl);
        for (int64_t r = 0; r < R; ++r) {
          T* w = s.wm + r * Bp;
          for (int64_t n = 0; n < Bp; n += V::L) math::marginal_weight(V::load(w + n), lme0v, glv).store(w + n);
        }
      }
      for (int64_t r = 0; r < R; ++r)  // the padding samples weigh nothing
        for (int64_t n = g.B; n < Bp; ++n) s.wm[r * Bp + n] = T(0);
    }
    if (!finite) return poison();

    T* const ga_row = kH ? s.gh + i * Bp : nullptr;
    // R = 1 with the argument gradients only (a penalty through frozen critics): the units two at a
    // time (units_backward_r1), one pass 0.85-0.90x. With the critic's gradients wanted as well, or
    // only those, that did not gain (benchmarks/RESULTS.md §8 row 30), and the loop below stays.
    bool units_done = false;
    if constexpr (kThresholdGates<T> && kH && !kP) {
      if (nsrc == 2) {
        detail::units_backward_r1<T>(Bp, a, src[0], src[1], wts[0], wts[1], gj, gsrc[0], gsrc[1], ga_row, wa, wb,
                                     bias, v, form, K, order.data());
        units_done = true;
      }
    }
    // The critic's gradients (and the arguments' with kH), R = 1, a score form and one joint
    // weight: the unit loop without unit_backward's per-unit choices (units_backward_r1_form).
    if constexpr (kThresholdGates<T> && kP) {
      if (r1_form) {
        const auto run = [&](auto joint) {
          detail::units_backward_r1_form<T, kH, decltype(joint)::value>(Bp, a, src[0], src[1], gj, wts[1], gsrc[0],
                                                                        gsrc[1], ga_row, wa, wb, v, *form, K,
                                                                        accv.data());
        };
        if (joint_in_units) run(std::true_type{});
        else run(std::false_type{});
        units_done = true;
      }
    }
    if (!units_done) {
      for (int64_t k = 0; k < K; ++k) {
        detail::UnitGrad<T> acc{detail::Vec<T>::zero(), detail::Vec<T>::zero(), detail::Vec<T>::zero()};
        detail::unit_backward<T, kH, kP>(Bp, a, src.data(), wts.data(), gj, gsrc.data(), nsrc, wa[k], wb[k],
                                         bias[k], v[k], ga_row, s.dsum, acc, form, k);
        if constexpr (kP) {
          acc.ga.store(accv.data() + k * L);
          acc.gb.store(accv.data() + (K + k) * L);
          acc.g1.store(accv.data() + (2 * K + k) * L);
        }
      }
    }
    if (diag)
      for (int64_t n = 0; n < Bp; ++n) ga_row[n] += s.gdiag[n];
    if constexpr (!kP) return;
    detail::lane_sums(accv.data(), (joint_in_units ? 4 : 3) * K, sums.data());
    if (joint_in_units) {
      // sum over the joint samples of T - c = alpha a + gamma + beta b + sum_k cp_k max(b, t_k)
      // (ScoreForm), the units' parts from the unit loop
      const T* sj = sums.data() + 3 * K;
      T units = T(0);
      for (int64_t k = 0; k < K; ++k) units += form->cp[k] * sj[k];
      const T jsum = form->alpha * row_sum(i) + form->gamma * static_cast<T>(g.B) + form->beta * row_sum(j) + units;
      t_out[p] = cp + jsum / static_cast<T>(g.B);
    }
    // d/dwa = v sum(gate a), d/dwb = v sum(gate b), d/dbias = v sum(gate),
    // d/dv = sum(gate x) = wa sum(gate a) + wb sum(gate b) + bias sum(gate); units L at a time.
    const T* sa = sums.data();
    const T* sb = sa + K;
    const T* s1 = sb + K;
    T* out[4];
    if (shared) {
      for (int q = 0; q < 4; ++q) out[q] = s.gshared + q * K;
    } else {
      out[0] = gwa + p * K;
      out[1] = gwb + p * K;
      out[2] = gbias + p * K;
      out[3] = gv + p * K;
    }
    auto unit_grads = [&](auto vk, auto wak, auto wbk, auto bk, auto ga_, auto gb_, auto g1_, auto* res) {
      res[0] = math::critic_unit_dx(vk, ga_);
      res[1] = math::critic_unit_dx(vk, gb_);
      res[2] = math::critic_unit_dx(vk, g1_);
      res[3] = math::critic_unit_dv(wak, wbk, bk, ga_, gb_, g1_);
    };
    using V = detail::Vec<T>;
    int64_t k = 0;
    for (; k + V::L <= K; k += V::L) {
      V res[4];
      unit_grads(V::load(v + k), V::load(wa + k), V::load(wb + k), V::load(bias + k), V::load(sa + k),
                 V::load(sb + k), V::load(s1 + k), res);
      for (int q = 0; q < 4; ++q) {
        if (shared) (V::load(out[q] + k) + res[q]).store(out[q] + k);
        else res[q].store(out[q] + k);
      }
    }
    for (; k < K; ++k) {
      T res[4];
      unit_grads(v[k], wa[k], wb[k], bias[k], sa[k], sb[k], s1[k], res);
      for (int q = 0; q < 4; ++q) out[q][k] = shared ? out[q][k] + res[q] : res[q];
    }
  });
}

// backward_pairs for the gradients s asks for (at least one).
template <typename T>
inline void backward_pairs_wanted(const PairStatsCpuArgs<T>& g, int64_t begin, int64_t end, const T* grad_t,
                                  const T* grad_lme, const T* lme, const BwdScratch<T>& s, T* gwa, T* gwb,
                                  T* gbias, T* gv, T* t_out, T* lme_out) {
  if (s.need_h && s.need_params)
    backward_pairs<T, true, true>(g, begin, end, grad_t, grad_lme, lme, s, gwa, gwb, gbias, gv, t_out, lme_out);
  else if (s.need_h)
    backward_pairs<T, true, false>(g, begin, end, grad_t, grad_lme, lme, s, gwa, gwb, gbias, gv, t_out, lme_out);
  else if (s.need_params)
    backward_pairs<T, false, true>(g, begin, end, grad_t, grad_lme, lme, s, gwa, gwb, gbias, gv, t_out, lme_out);
}

}  // namespace detail

// Backward for pairs [begin, end), of the gradients s.need_h / s.need_params asks for (at least
// one). Gradients w.r.t. hT and hP go to this thread's buffers s.gh, s.gP; per-pair critic
// gradients are written to gwa..gv (rows p), a shared critic's are accumulated in s.gshared.
// Without need_h the sample loop skips its three read-modify-writes of gradient rows; without
// need_params its four sums and the per-pair epilogue.
template <typename T>
MMIM_FLATTEN void backward_range(const PairStatsCpuArgs<T>& g, int64_t begin, int64_t end, const T* grad_t,
                                 const T* grad_lme, const T* lme, const BwdScratch<T>& s, T* gwa, T* gwb,
                                 T* gbias, T* gv) {
  detail::backward_pairs_wanted<T>(g, begin, end, grad_t, grad_lme, lme, s, gwa, gwb, gbias, gv, nullptr, nullptr);
}

// Statistics and gradients in one pass, for upstream gradients known before the forward: writes
// t_joint[p], lme[p] (as forward_range) and the gradients backward_range would compute with that
// lme, without forward_range's separate pass over the samples and the backward's recompute of the
// shuffled scores.
template <typename T>
MMIM_FLATTEN void forward_backward_range(const PairStatsCpuArgs<T>& g, int64_t begin, int64_t end,
                                         const T* grad_t, const T* grad_lme, const BwdScratch<T>& s, T* gwa,
                                         T* gwb, T* gbias, T* gv, T* t_joint, T* lme) {
  detail::backward_pairs_wanted<T>(g, begin, end, grad_t, grad_lme, nullptr, s, gwa, gwb, gbias, gv, t_joint, lme);
}

}  // namespace MMIM_CPU_CAPABILITY
}  // namespace cpu
}  // namespace mmim_ext
