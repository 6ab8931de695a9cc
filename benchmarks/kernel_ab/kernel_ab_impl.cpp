// One version of the CPU loops for benchmarks/kernel_ab: csrc/cpu/pair_stats_cpu_impl.h (and the
// headers it includes) as found at IMPL (an include path; run.sh puts each version's files in its
// own include directory), compiled for AVX2 + FMA in the namespace MMIM_CPU_CAPABILITY (impl_a or
// impl_b), with the float entry points instantiated. run.sh compiles it once per version, both
// in parallel, and links both objects with kernel_ab.cpp, which declares the entry points.
#include "cpu/pair_stats_cpu.h"

#if !defined(IMPL) || !defined(MMIM_CPU_CAPABILITY)
#error "define IMPL (path of a pair_stats_cpu_impl.h) and MMIM_CPU_CAPABILITY (impl_a or impl_b); see run.sh"
#endif

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MMIM_VEC_AVX2 1
#include IMPL

namespace mmim_ext {
namespace cpu {
namespace MMIM_CPU_CAPABILITY {
MMIM_INSTANTIATE_PAIR_STATS_CPU_T(float)
}  // namespace MMIM_CPU_CAPABILITY
}  // namespace cpu
}  // namespace mmim_ext
#pragma GCC pop_options
