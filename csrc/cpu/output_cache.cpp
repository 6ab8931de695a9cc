// The CPU block cache of output_cache.h, and its two ops (empty_cpu_cache, cpu_cache_info).
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

namespace mmim_ext {
namespace cpu {
namespace {

int64_t limit_from_env() {
  const char* env = std::getenv("MMIM_EXT_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return int64_t(1024) << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && errno == 0 && mb >= 0 && mb <= (1LL << 30),
              "MMIM_EXT_CPU_CACHE_MB must be a whole number of mebibytes from 0 (no cache) to 2^30, got '", env,
              "'");
  return static_cast<int64_t>(mb) << 20;
}

// Free blocks by exact size (a training loop asks for the same sizes every step). A block handed
// out carries a Block context whose deleter returns it here.
class BlockCache final : public c10::Allocator {
 public:
  explicit BlockCache(int64_t limit) : limit_(limit) {}

  int64_t limit() const { return limit_; }

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, nullptr, c10::Device(c10::DeviceType::CPU)};
    void* p = nullptr;
    const bool cacheable = static_cast<int64_t>(n) >= kMinCachedBytes;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(n);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        free_bytes_ -= static_cast<int64_t>(n);
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) p = c10::alloc_cpu(n);
    return {p, new Block{this, p, n}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void empty() {
    std::unordered_map<size_t, std::vector<void*>> taken;
    {
      std::lock_guard<std::mutex> lock(mu_);
      taken.swap(free_);
      free_bytes_ = 0;
    }
    for (auto& kv : taken)
      for (void* p : kv.second) c10::free_cpu(p);
  }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t blocks = 0;
    for (const auto& kv : free_) blocks += static_cast<int64_t>(kv.second.size());
    return {free_bytes_, blocks, limit_, hits_, misses_};
  }

 private:
  struct Block {
    BlockCache* cache;
    void* ptr;
    size_t n;
  };

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    b->cache->put(b->ptr, b->n);
    delete b;
  }

  void put(void* p, size_t n) {
    if (static_cast<int64_t>(n) >= kMinCachedBytes) {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_bytes_ + static_cast<int64_t>(n) <= limit_) {
        free_[n].push_back(p);
        free_bytes_ += static_cast<int64_t>(n);
        return;
      }
    }
    c10::free_cpu(p);
  }

  const int64_t limit_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  int64_t free_bytes_ = 0, hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may outlive static destruction at exit, and their deleters use it.
BlockCache* block_cache() {
  static BlockCache* cache = new BlockCache(limit_from_env());
  return cache;
}

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "empty_cached: CPU tensors only");
  const at::ScalarType dtype = c10::typeMetaToScalarType(options.dtype());
  const int64_t nbytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  BlockCache* cache = block_cache();
  if (nbytes < kMinCachedBytes || cache->limit() == 0) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, cache, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, c10::nullopt);
}

void empty_cpu_cache() { block_cache()->empty(); }

std::vector<int64_t> cpu_cache_info() { return block_cache()->info(); }

}  // namespace cpu
}  // namespace mmim_ext

// No tensor arguments: registered for every dispatch key (as cpu_capability).
TORCH_LIBRARY_IMPL(mmim_ext, CompositeImplicitAutograd, m) {
  m.impl("empty_cpu_cache", [] { mmim_ext::cpu::empty_cpu_cache(); });
  m.impl("cpu_cache_info", [] { return mmim_ext::cpu::cpu_cache_info(); });
}
