// pair_stats CPU loops compiled for AVX2 + FMA. Used only when the running CPU has both
// (pair_stats_kernel.cpp checks at run time); other x86-64 CPUs get the baseline build.
#include "cpu/pair_stats_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMIM_HAVE_AVX2_BUILD 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MMIM_CPU_CAPABILITY avx2
#define MMIM_VEC_AVX2 1
#include "cpu/pair_stats_cpu_impl.h"

namespace mmim_ext {
namespace cpu {
namespace avx2 {
template void forward_range<float>(const PairStatsCpuArgs<float>&, int64_t, int64_t, float*, float*, float*);
template void forward_range<double>(const PairStatsCpuArgs<double>&, int64_t, int64_t, double*, double*, double*);
template void backward_range<float>(const PairStatsCpuArgs<float>&, int64_t, int64_t, const float*, const float*,
                                    const float*, const BwdScratch<float>&, float*, float*, float*, float*);
template void backward_range<double>(const PairStatsCpuArgs<double>&, int64_t, int64_t, const double*,
                                     const double*, const double*, const BwdScratch<double>&, double*, double*,
                                     double*, double*);
}  // namespace avx2
}  // namespace cpu
}  // namespace mmim_ext
#pragma GCC pop_options
#endif
