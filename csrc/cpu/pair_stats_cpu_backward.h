// CPU loops of pair_stats, part 4 of 4: the backward and the one pass (statistics and gradients
// together) over a range of pairs: each hidden unit's pass over the samples (unit_pass and the
// loops built on it) and the per-pair driver backward_pairs. Part of pair_stats_cpu_impl.h.
#ifndef MMIM_CPU_IMPL_PARTS
#error "include cpu/pair_stats_cpu_impl.h, which includes this file inside the build's namespace"
#endif

namespace detail {

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
// (acc) are wanted. Compile-time flags keep the sample loop free of branches.
template <typename T, bool kH, bool kP, bool kTwo, bool kFirst, bool kLast, bool kW0, int kGate>
inline void unit_pass(int64_t Bp, const T* __restrict a, const T* __restrict b0, const T* __restrict b1,
                      const T* __restrict w0, const T* __restrict w1, T* __restrict g0, T* __restrict g1,
                      T* __restrict ga, T* __restrict dsum, const Vec<T>& w0c, const Vec<T>& wak,
                      const Vec<T>& wbk, const Vec<T>& bk, const Vec<T>& cwa, const Vec<T>& cwb,
                      UnitGrad<T>& acc) {
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
  V acc_b0 = V::zero(), acc_b1 = V::zero(), acc_a = V::zero(), acc_1 = V::zero();
  for (int64_t n = 0; n < Bp; n += L) {
    const V an = V::load_reg(a + n);
    const V u = math::critic_u(wak, an, bk);  // u, or the threshold t
    const V bn0 = V::load_reg(b0 + n);
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
    // The gradient rows' loads before their stores (measured faster than each row's load and
    // store in turn). A sample's rows of g0 and g1 lie a multiple of 4 KiB apart, so a load after
    // the other row's store may wait on that store's address check; that this is the cause is not
    // shown. The rows must not overlap (a pair (i, i) has its own g0: BwdScratch::gdiag).
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
// 3.5 loads and 1.5 stores instead of 7 and 3. The rows get unit p's terms and then q's, the
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
// on the stack (the one pass was slower).
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

// The unit loop of backward_pairs for its commonest case with all gradients (the critic's and the
// arguments'): R = 1, a critic with a score form (every unit gates by threshold), the joint
// weight one value w0c. The same unit_pass calls as unit_backward makes there (bitwise the same
// results), without its per-unit choices (sources, weights, flags, gate from x): the sources'
// pointers are set once per pair and each unit only picks [b > t] or [b < t] by the sign of wb. Each unit's sums go to accv ([3][K]
// vectors, backward_pairs' layout). Not inlined, like units_backward_r1; here GCC also keeps the
// joint weight in a register (7 loads per iteration, not 8).
template <typename T>
__attribute__((noinline)) void units_backward_r1_form(int64_t Bp, const T* a, const T* b0, const T* b1, T w0c,
                                                     const T* w1, T* g0, T* g1, T* ga, const T* wa, const T* wb,
                                                     const T* v, const ScoreForm<T>& form, int64_t K, T* accv) {
  using V = Vec<T>;
  constexpr int L = V::L;
  const V w0v(w0c);
  for (int64_t k = 0; k < K; ++k) {
    UnitGrad<T> acc{V::zero(), V::zero(), V::zero()};
    const V ta(form.ta[k]), tb(form.tb[k]), wbk(wb[k]);
    const V cwa(math::critic_unit_dx(v[k], wa[k])), cwb(math::critic_unit_dx(v[k], wb[k]));
    if (wb[k] > T(0))
      unit_pass<T, true, true, true, true, true, true, kGateAbove>(Bp, a, b0, b1, nullptr, w1, g0, g1, ga, nullptr,
                                                                   w0v, ta, wbk, tb, cwa, cwb, acc);
    else
      unit_pass<T, true, true, true, true, true, true, kGateBelow>(Bp, a, b0, b1, nullptr, w1, g0, g1, ga, nullptr,
                                                                   w0v, ta, wbk, tb, cwa, cwb, acc);
    acc.ga.store(accv + k * L);
    acc.gb.store(accv + (K + k) * L);
    acc.g1.store(accv + (2 * K + k) * L);
  }
}

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
  // Per pair: the per-unit sum vectors ([3][K] vectors: gate a, gate b, gate) and their lane sums.
  constexpr int L = detail::Vec<T>::L;
  std::vector<T> accv(static_cast<size_t>(3 * K * L));
  std::vector<T> sums(static_cast<size_t>(3 * K));
  std::vector<detail::UnitRule<T>> order(static_cast<size_t>(kH && !kP ? K : 0));  // units_backward_r1's scratch
  std::vector<T> wmax(values ? R : 0);  // the one pass: each source's largest shuffled score
  FormCache<T> forms(g, end);
  const bool shared_finite = shared && critic_finite(g.wa, g.wb, g.bias, g.v, K, g.c[0]);
  for_each_pair(g.pairs, g.m, begin, end, [&](int64_t p, int64_t i, int64_t j) {
    const T* wa = g.wa + p * g.pstride;
    const T* wb = g.wb + p * g.pstride;
    const T* bias = g.bias + p * g.pstride;
    const T* v = g.v + p * g.pstride;
    const T cp = g.c[p * g.cstride];
    const T* a = g.hT + i * Bp;
    const ScoreForm<T>* form = forms.form(p);
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
    {
      using V = detail::Vec<T>;
      if (values) {
        // The statistics as forward_range forms them, from scores of the whole batch at once. The
        // log-sum-exp keeps each shuffled sample's exp(T - max_r), so that its weight is one
        // multiply away (math::marginal_weight_scale) instead of a second exp.
        detail::source_scores<T>(a, src.data(), score_dst.data(), nsrc, 0, Bp, wa, wb, bias, v, K, form);
        math::LseState<T> st = math::lse_empty<T>();
        for (int64_t r = 0; r < R; ++r) {
          const math::LseState<T> sr = detail::range_lse<T, true>(score_dst[1 + r], g.B);
          wmax[r] = sr.max;
          st = math::lse_merge(st, sr);
        }
        const T lme0 = math::lse_finish_mean(st, static_cast<T>(R * g.B));
        t_out[p] = cp + detail::range_sum(s.dsum, g.B) / static_cast<T>(g.B);
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
        detail::source_scores<T>(a, src.data() + 1, score_dst.data() + 1, R, 0, Bp, wa, wb, bias, v, K, form);
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
    // Two loops for the commonest cases of R = 1, each measured faster than the general loop
    // below (unit_backward's per-unit choices of sources, weights and gate) by 5% or more of the
    // call (docs/performance.md): with the argument gradients only (a penalty through frozen
    // critics) the units two at a time (units_backward_r1); with all gradients (the headline's
    // one pass) units_backward_r1_form, which picks nothing per unit but the gate's direction.
    // The critic's gradients alone (MINE's critic steps) gained under 5% from a loop of their
    // own and take the general loop.
    bool units_done = false;
    if constexpr (kThresholdGates<T> && kH && !kP) {
      if (nsrc == 2) {
        detail::units_backward_r1<T>(Bp, a, src[0], src[1], wts[0], wts[1], gj, gsrc[0], gsrc[1], ga_row, wa, wb,
                                     bias, v, form, K, order.data());
        units_done = true;
      }
    }
    if constexpr (kThresholdGates<T> && kH && kP) {
      if (nsrc == 2 && form != nullptr && wts[0] == nullptr) {
        detail::units_backward_r1_form<T>(Bp, a, src[0], src[1], gj, wts[1], gsrc[0], gsrc[1], ga_row, wa, wb, v, *form,
                                          K, accv.data());
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
    detail::lane_sums(accv.data(), 3 * K, sums.data());
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
