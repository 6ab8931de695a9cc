// CPU loops of pair_stats, part 1 of 4: the SIMD vector type (Vec) with the functions the shared
// math needs, lane sums, exp on vectors, and the reductions over samples (sum, log-sum-exp) and
// the critic's finiteness check. Part of pair_stats_cpu_impl.h, compiled once per instruction set.
#ifndef MMIM_CPU_IMPL_PARTS
#error "include cpu/pair_stats_cpu_impl.h, which includes this file inside the build's namespace"
#endif

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
  // by two instructions into both as memory operands, which costs a second load (in the
  // backward's unit loop, where every sample row is used twice).
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

}  // namespace detail
