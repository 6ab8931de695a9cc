// CPU loops of pair_stats, part 3 of 4: the forward (t_joint, lme) over a range of pairs. Part of
// pair_stats_cpu_impl.h.
#ifndef MMIM_CPU_IMPL_PARTS
#error "include cpu/pair_stats_cpu_impl.h, which includes this file inside the build's namespace"
#endif

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
  detail::FormCache<T> forms(g, end);
  using detail::ScoreForm;
  for_each_pair(g.pairs, g.m, begin, end, [&](int64_t p, int64_t i, int64_t j) {
    const T* wa = g.wa + p * g.pstride;
    const T* wb = g.wb + p * g.pstride;
    const T* bias = g.bias + p * g.pstride;
    const T* v = g.v + p * g.pstride;
    const T* a = g.hT + i * g.Bp;
    const ScoreForm<T>* form = forms.form(p);
    src[0] = g.hT + j * g.Bp;
    for (int64_t r = 0; r < g.R; ++r) src[1 + r] = g.hP + (r * g.m + j) * g.Bp;
    T jsum = T(0);
    math::LseState<T> st = math::lse_empty<T>();
    for (int64_t n0 = 0; n0 < g.B; n0 += kChunkSamples) {
      const int64_t n1 = std::min(n0 + kChunkSamples, g.Bp);
      const int64_t valid = std::min(n1, g.B) - n0;
      detail::source_scores<T>(a, src.data(), dst.data(), nsrc, n0, n1, wa, wb, bias, v, g.K, form);
      jsum += detail::range_sum(dst[0], valid);
      for (int64_t r = 0; r < g.R; ++r) st = math::lse_merge(st, detail::range_lse<T>(dst[1 + r], valid));
    }
    const T cp = g.c[p * g.cstride];
    t_joint[p] = cp + jsum * inv_b;
    lme[p] = cp + math::lse_finish_mean(st, count);
  });
}
