// pair_stats CPU loops on one-lane "vectors" that call the shared header's scalar functions (the
// ones the CUDA kernels run). Selected only by MMIM_EXT_CPU_CAPABILITY=scalar; the tests use it
// to check that scalar math against the reference on a machine without a GPU.
#include "cpu/pair_stats_cpu.h"

#define MMIM_CPU_CAPABILITY scalar
#define MMIM_VEC_SCALAR 1
#include "cpu/pair_stats_cpu_impl.h"

MMIM_INSTANTIATE_PAIR_STATS_CPU(scalar)
