// A caching allocator for the large CPU outputs of moekit's kernels.
//
// A training step allocates the same large buffers every step: permute's x_ND (T*K rows of the
// model dim), the grouped GEMM outputs and the per-expert weight gradients (E/K times the size of
// a dense FFN's). Above glibc's mmap threshold (32 MiB at most) every such allocation is a fresh
// mmap, and writing it page-faults each 4 KiB page in: about 25 ms per 128 MiB on the 2-core CI
// machine, as much as a GEMM over the same bytes. The CUDA side of PyTorch solves this with its
// caching allocator; on the CPU, PyTorch leaves it to malloc. This allocator keeps the blocks of
// freed moekit outputs and hands them back to the next request of a similar size.
//
// Policy: requests below 1 MiB go straight to c10::alloc_cpu. Larger ones take the smallest
// cached block that fits and is at most 1/8 larger than the request (rounded up to 64 KiB), else
// a new one. A freed block is kept while the cached (free) bytes stay under the limit, set by
// MOE_HOST_CACHE_MB (default 2048; 0 turns the cache off); to make room, cached blocks of other
// sizes are released, largest first, when that makes room. Before a new allocation larger than
// every cached block (the workload has outgrown them), cached blocks are released, largest first,
// until the blocks in use plus the cached ones plus the new one fit in the high-water mark of the
// bytes in use (the most that moekit outputs ever held at once, the new block included): blocks a
// growing workload has outgrown never push the process past its largest working set.
// A forked child keeps its parent's cached blocks (copy on write), as with any malloc arena, and
// gets a fresh lock.
// moe._C.host_cache_clear() releases every cached block; host_cache_stats() reports usage.
// Blocks are never shared: a block is reused only after the tensor that held it is freed.
#include "host_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <ATen/EmptyTensor.h>

#include <pthread.h>

#include <cctype>
#include <cerrno>
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <new>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace moe {

namespace {

constexpr size_t kMinCached = size_t(1) << 20;  // smaller requests are cheap for malloc
constexpr size_t kRound = size_t(64) << 10;

size_t limit_from_env() {
  const char* s = std::getenv("MOE_HOST_CACHE_MB");
  if (s == nullptr || *s == '\0') return size_t(2048) << 20;
  errno = 0;
  char* end = nullptr;
  const unsigned long long mb = std::strtoull(s, &end, 10);
  TORCH_CHECK(std::isdigit(static_cast<unsigned char>(*s)) && *end == '\0' && errno != ERANGE &&
                  mb <= uint64_t(std::numeric_limits<int64_t>::max() >> 20),
              "MOE_HOST_CACHE_MB must be a non-negative integer number of MiB, got '", s, "'");
  return size_t(mb) << 20;
}

class HostCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCached || limit_ == 0) {
      void* p = nbytes ? c10::alloc_cpu(nbytes) : nullptr;
      return {p, p, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t size = (nbytes + kRound - 1) / kRound * kRound;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 8) {
        in_use_.emplace(it->second, it->first);  // first: if it throws, the cache is unchanged
        p = it->second;
        cached_bytes_ -= it->first;
        in_use_bytes_ += it->first;
        free_.erase(it);
        ++hits_;
      }
    }
    if (p == nullptr) p = allocate_fresh(size);
    return {p, p, &HostCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void release(void* p) { instance().give_back(p); }

  static HostCache& instance() {
    // Leaked on purpose: tensors may be freed during interpreter shutdown, after static
    // destructors would have run.
    static HostCache* cache = new HostCache();
    return *cache;
  }

  void clear() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      cached_bytes_ = 0;
    }
    for (auto& [size, p] : blocks) c10::free_cpu(p);
  }

  HostCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(cached_bytes_), int64_t(in_use_bytes_), hits_, misses_, int64_t(limit_)};
  }

 private:
  HostCache() : limit_(limit_from_env()) {
    // A child forked while another thread held the lock (a DataLoader worker, say) would
    // deadlock on its first moekit allocation: give the child a fresh, unlocked mutex.
    pthread_atfork(nullptr, nullptr, [] { new (&instance().mu_) std::mutex(); });
  }

  // A miss: reserves `size` bytes in use; if every cached block is smaller than `size` (the
  // workload has outgrown them), releases them, largest first, until in use + cached fits in the
  // high-water mark of the bytes in use; then allocates the block. While some cached block is
  // larger, the workload still has requests of that size (a smaller last batch, alternating
  // shapes) and everything stays: releasing whenever the blocks one step uses add up to more
  // than its peak would make every step miss. If the allocation fails, the reservation is
  // undone; the mark stays where it was raised.
  void* allocate_fresh(size_t size) {
    std::vector<void*> released;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_bytes_ += size;  // reserved now, so that concurrent misses see each other
      peak_in_use_bytes_ = std::max(peak_in_use_bytes_, in_use_bytes_);
      try {
        auto f = free_.end();
        const bool outgrown = free_.lower_bound(size) == f;  // every cached block is smaller
        while (outgrown && f != free_.begin() &&
               in_use_bytes_ + cached_bytes_ > peak_in_use_bytes_) {
          --f;
          released.push_back(f->second);  // first: if it throws, this block stays cached
          cached_bytes_ -= f->first;
          f = free_.erase(f);
        }
      } catch (...) {  // out of memory for the list: release what it holds, keep the rest
      }
      ++misses_;
    }
    for (void* b : released) c10::free_cpu(b);
    void* p = nullptr;
    try {
      p = c10::alloc_cpu(size);
      std::lock_guard<std::mutex> lock(mu_);
      in_use_.emplace(p, size);
    } catch (...) {
      if (p != nullptr) c10::free_cpu(p);
      std::lock_guard<std::mutex> lock(mu_);
      in_use_bytes_ -= size;
      throw;
    }
    return p;
  }

  // Keeps the freed block for reuse. When the cache is full, blocks of other sizes are released,
  // largest first, to make room: the sizes of the current step's buffers win over stale ones.
  void give_back(void* p) noexcept {
    std::vector<void*> evicted;
    bool keep = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = in_use_.find(p);
      const size_t size = it == in_use_.end() ? 0 : it->second;  // (never unknown: we handed it out)
      if (it != in_use_.end()) {
        in_use_.erase(it);
        in_use_bytes_ -= size;
      }
      size_t other = 0;  // cached bytes in blocks of other sizes: what eviction could free
      if (size > 0 && size <= limit_ && cached_bytes_ + size > limit_)
        for (auto& [bytes, block] : free_) other += bytes == size ? 0 : bytes;
      if (size > 0 && cached_bytes_ - other + size <= limit_) {  // evict only if it then fits
        try {
          for (auto f = free_.end(); cached_bytes_ + size > limit_ && f != free_.begin();) {
            --f;
            if (f->first == size) continue;
            cached_bytes_ -= f->first;
            evicted.push_back(f->second);
            f = free_.erase(f);
          }
          if (cached_bytes_ + size <= limit_) {
            free_.emplace(size, p);
            cached_bytes_ += size;
            keep = true;
          }
        } catch (...) {  // out of memory for the bookkeeping: just free the block
        }
      }
    }
    for (void* e : evicted) c10::free_cpu(e);
    if (!keep) c10::free_cpu(p);
  }

  std::mutex mu_;
  std::multimap<size_t, void*> free_;        // size -> block, free for reuse
  std::unordered_map<void*, size_t> in_use_;  // block -> size, held by a live tensor
  size_t cached_bytes_ = 0;
  size_t in_use_bytes_ = 0;       // the sizes in in_use_, summed
  size_t peak_in_use_bytes_ = 0;  // the high-water mark of in_use_bytes_
  int64_t hits_ = 0, misses_ = 0;
  const size_t limit_;
};

}  // namespace

at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &HostCache::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

void host_cache_clear() { HostCache::instance().clear(); }

HostCacheStats host_cache_stats() { return HostCache::instance().stats(); }

}  // namespace moe
