// The per-pair loops of the CPU pair_stats kernels, compiled once per instruction set.
//
// Included (without include guard, on purpose, as are the four parts below) by
// pair_stats_scalar.cpp, pair_stats_base.cpp and pair_stats_avx2.cpp, each of which defines
// MMIM_CPU_CAPABILITY (the namespace of that build) and sets the target instruction set before
// including it. pair_stats_kernel.cpp dispatches at run time.
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

// The loops, by role, inside the build's namespace: the parts neither open it nor include
// anything themselves (what they use comes from pair_stats_cpu.h, which the including file has
// included before its target pragma).
#define MMIM_CPU_IMPL_PARTS 1
namespace mmim_ext {
namespace cpu {
namespace MMIM_CPU_CAPABILITY {
#include "cpu/pair_stats_cpu_vec.h"
#include "cpu/pair_stats_cpu_score.h"
#include "cpu/pair_stats_cpu_forward.h"
#include "cpu/pair_stats_cpu_backward.h"
}  // namespace MMIM_CPU_CAPABILITY
}  // namespace cpu
}  // namespace mmim_ext
#undef MMIM_CPU_IMPL_PARTS
