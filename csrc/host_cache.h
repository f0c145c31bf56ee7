// Caching allocator for the large CPU outputs of moekit's kernels (see host_cache.cpp).
#pragma once

#include <ATen/ATen.h>

namespace moe {

// at::empty on the CPU, from blocks that freed moekit outputs left in the cache.
at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);

struct HostCacheStats {
  int64_t cached_bytes;  // free blocks kept for reuse
  int64_t in_use_bytes;  // blocks held by live tensors
  int64_t hits, misses;  // requests served from the cache / by a new allocation
  int64_t limit_bytes;   // MOE_HOST_CACHE_MB (0: cache off)
};

void host_cache_clear();
HostCacheStats host_cache_stats();

}  // namespace moe
