// CPU kernels of pair_stats: argument structs shared by the driver (pair_stats_kernel.cpp) and
// the per-instruction-set builds of the loops (pair_stats_cpu_impl.h).
//
// Layout: the driver transposes h to hT[m][Bp] (Bp = B rounded up to the lane count, zero padded)
// so that a unit's samples are contiguous. A pair (i, j) streams its samples in tiles of W lanes;
// the per-lane loops have a fixed trip count so that the compiler vectorizes them, and the
// per-element math is the shared header's (csrc/pair_stats_math.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "pair_stats_math.h"

namespace mmim_ext {
namespace cpu {

// Lanes per tile: 64 bytes = two AVX2 registers (four SSE ones).
template <typename T>
constexpr int kLanes = 64 / static_cast<int>(sizeof(T));

// Samples per chunk of the forward's score buffer (a multiple of every kLanes).
constexpr int64_t kChunkSamples = 256;

template <typename T>
struct PairStatsCpuArgs {
  const T* hT;            // [m][Bp] h transposed, zero padded
  const T* hP;            // [R][m][Bp] second arguments of the shuffled samples:
                          // hP[r][u][n] = hT[u][perms[r][n]], zero padded
  const int64_t* pairs;   // [P][2] or nullptr for all i < j, row-major
  const T* wa;            // [P][K] or [K]
  const T* wb;
  const T* bias;
  const T* v;
  const T* c;             // [P] or []
  int64_t B, Bp, m, P, K, R;
  int64_t pstride;        // K (one critic per pair) or 0 (shared)
  int64_t cstride;        // 1 or 0
  // The one pass only: nullptr, or [P][2] per-pair (la, lk) of MINE's moving average, which makes
  // the upstream gradient of lme grad_lme[p] * math::mine_ema_ratio(lme[p], la, lk, ema_log_a);
  // the pass writes that factor to ema_ratio[p] ([P]; the driver needs it for c's gradient).
  const T* ema = nullptr;
  T ema_log_a = T(0);
  T* ema_ratio = nullptr;
  // The backward and the one pass with per-pair critics' gradients: nullptr, or [P] the gradient
  // of c (formed by the driver), set to NaN for a pair whose critic has a non-finite parameter
  // (as every other gradient of that pair; see backward_pairs).
  T* gc = nullptr;
  // The largest |h| of the call (the driver rejects non-finite h): the threshold form of the
  // scores (pair_stats_cpu_score.h, ScoreForm) is used only for critics whose terms stay bounded
  // for arguments this large. Infinity (the default) or NaN leaves every critic on the direct form.
  T hmax = std::numeric_limits<T>::infinity();
};

template <typename T>
struct BwdScratch {
  T* wm;       // [R][Bp] weights of the shuffled samples, exp(T - lme) grad_lme / (R B)
  T* wj;       // [Bp] weights of the joint samples, grad_t / B; both zero in the padding
  T* dsum;     // [Bp] per-sample sum over sources of a hidden unit's gates w [x > 0]
  T* gdiag;    // [Bp] a pair (i, i)'s joint second-argument gradient, added to gh row i after the
               // pair: the unit loops write the first and second argument's rows in one pass, so
               // the two must be different memory
  T* gh;       // [m][Bp] this thread's gradient w.r.t. hT
  T* gP;       // [R][m][Bp] this thread's gradient w.r.t. hP
  T* gshared;  // [4][K] this thread's gradient of a shared critic (wa, wb, bias, v)
  bool need_h;       // gradients w.r.t. hT and hP wanted (gh, gP; else both null)
  bool need_params;  // the critic's gradients wanted (gwa.., gshared)
};

// Calls f(p, i, j) for the pairs p in [begin, end).
template <typename F>
inline void for_each_pair(const int64_t* pairs, int64_t m, int64_t begin, int64_t end, F&& f) {
  if (pairs != nullptr) {
    for (int64_t p = begin; p < end; ++p) f(p, pairs[2 * p], pairs[2 * p + 1]);
    return;
  }
  if (begin >= end) return;
  int64_t i, j;
  math::pair_from_index(begin, m, &i, &j);
  for (int64_t p = begin; p < end; ++p) {
    f(p, i, j);
    if (++j == m) {
      ++i;
      j = i + 1;
    }
  }
}

}  // namespace cpu
}  // namespace mmim_ext

// Declarations of the loops' entry points in the build namespace NS, used inside mmim_ext::cpu:
// how the driver (pair_stats_kernel.cpp) and benchmarks/kernel_ab see each build.
#define MMIM_DECLARE_PAIR_STATS_CPU(NS)                                                             \
  namespace NS {                                                                                   \
  template <typename T>                                                                            \
  void forward_range(const PairStatsCpuArgs<T>&, int64_t, int64_t, T*, T*, T*);                    \
  template <typename T>                                                                            \
  void backward_range(const PairStatsCpuArgs<T>&, int64_t, int64_t, const T*, const T*, const T*, \
                      const BwdScratch<T>&, T*, T*, T*, T*);                                       \
  template <typename T>                                                                            \
  void forward_backward_range(const PairStatsCpuArgs<T>&, int64_t, int64_t, const T*, const T*,    \
                              const BwdScratch<T>&, T*, T*, T*, T*, T*, T*);                       \
  }

// Explicit instantiations of the loops' entry points for the type T, inside the build's namespace.
#define MMIM_INSTANTIATE_PAIR_STATS_CPU_T(T)                                                              \
  template void forward_range<T>(const PairStatsCpuArgs<T>&, int64_t, int64_t, T*, T*, T*);              \
  template void backward_range<T>(const PairStatsCpuArgs<T>&, int64_t, int64_t, const T*, const T*,      \
                                  const T*, const BwdScratch<T>&, T*, T*, T*, T*);                       \
  template void forward_backward_range<T>(const PairStatsCpuArgs<T>&, int64_t, int64_t, const T*,        \
                                          const T*, const BwdScratch<T>&, T*, T*, T*, T*, T*, T*);

// Explicit instantiations of the loops for float and double in the build namespace NS (one line
// in each per-instruction-set file).
#define MMIM_INSTANTIATE_PAIR_STATS_CPU(NS)                  \
  namespace mmim_ext {                                       \
  namespace cpu {                                            \
  namespace NS {                                             \
  MMIM_INSTANTIATE_PAIR_STATS_CPU_T(float)                   \
  MMIM_INSTANTIATE_PAIR_STATS_CPU_T(double)                  \
  }                                                          \
  }                                                          \
  }
