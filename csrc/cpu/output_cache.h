// A cache of large CPU blocks for the ops' per-call outputs and buffers (the per-pair critic
// gradients: four [P, K] tensors, 134 MB at m=1024, K=16, float32).
//
// glibc hands blocks this large back to the kernel when they are freed, so every call of the one
// pass faulted in its gradients afresh: ~33,000 page faults and 0.04-0.2 s of system time per
// call at m=1024. Tensors made by empty_cached() hold a block of
// this cache; when the last reference to one dies (the user dropped the gradient), its block goes
// back to the cache instead of to the kernel, and the next call of the same size takes it again.
// Every tensor gets its own storage (only the memory is reused, as with PyTorch's CUDA caching
// allocator). Blocks smaller than kMinCachedBytes are left to the default allocator.
//
// The cache holds at most MMIM_EXT_CPU_CACHE_MB mebibytes of free blocks (default 1024; 0 turns
// it off); beyond that a freed block is released at once. empty_cpu_cache() releases every free
// block (torch.ops.mmim_ext.empty_cpu_cache, mmim_ext.empty_cpu_cache()).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mmim_ext {
namespace cpu {

constexpr int64_t kMinCachedBytes = int64_t(1) << 20;

// An uninitialized contiguous CPU tensor; its memory comes from the cache when it holds at least
// kMinCachedBytes (and the cache is on), else from at::empty.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// Releases every free block of the cache.
void empty_cpu_cache();

// [free bytes held, free blocks held, limit in bytes, blocks handed out from the cache so far,
// blocks allocated fresh so far] (the last two count blocks of at least kMinCachedBytes).
std::vector<int64_t> cpu_cache_info();

}  // namespace cpu
}  // namespace mmim_ext
