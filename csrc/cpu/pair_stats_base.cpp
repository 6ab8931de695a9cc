// pair_stats CPU loops at the baseline instruction set of the build (SSE2 on x86-64).
#include "cpu/pair_stats_cpu.h"

#define MMIM_CPU_CAPABILITY base
#include "cpu/pair_stats_cpu_impl.h"

namespace mmim_ext {
namespace cpu {
namespace base {
template void forward_range<float>(const PairStatsCpuArgs<float>&, int64_t, int64_t, float*, float*, float*);
template void forward_range<double>(const PairStatsCpuArgs<double>&, int64_t, int64_t, double*, double*, double*);
template void backward_range<float>(const PairStatsCpuArgs<float>&, int64_t, int64_t, const float*, const float*,
                                    const float*, const BwdScratch<float>&, float*, float*, float*, float*);
template void backward_range<double>(const PairStatsCpuArgs<double>&, int64_t, int64_t, const double*,
                                     const double*, const double*, const BwdScratch<double>&, double*, double*,
                                     double*, double*);
}  // namespace base
}  // namespace cpu
}  // namespace mmim_ext
