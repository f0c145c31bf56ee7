// The kernels of moe.plan on CUDA, launched by csrc/cuda/dispatch.cu (kept in a header so the
// CUDA build stays at few translation units).
//
// Shape legend: T tokens, K top-k slots per token, E experts, N routed rows (the host-side bound
// T*K, also the count num_slots of slots; rows past offs_E[E-1] are padding).
//
// plan: (1) keys: key[s] = ids[s] (E for an empty slot), value[s] = s, and a per-expert histogram
// (shared-memory atomics, then one global atomic per block and expert; integer sums, so the
// counts are exact whatever the order); (2) offs_E = inclusive scan of counts_E (one block);
// (3) cub::DeviceRadixSort::SortPairs on (key, slot) over the low ceil(log2(E+1)) bits: LSD radix
// sort is stable, so within an expert the slots keep their flat order t*K+k, and it is
// deterministic: the result equals the CPU counting sort bit for bit; (4) order_N[i] = sorted
// slot (or -1 once the keys reach E, i.e. past offs_E[E-1]) and rows_TK[slot] = i (or -1).
// Ids outside [-1, E) trip a device-side assert (CUDA_KERNEL_ASSERT) instead of a host check,
// so the op never syncs; such a slot is treated as empty if asserts are compiled out.
// Decode sizes (at most kBlockPlanSlots slots, E <= kBlockPlanMaxExperts) take one launch instead:
// one block counts, scans and sorts the composite keys (id << slot_bits) | slot with
// cub::BlockRadixSort. The keys are distinct, so the order is the same whatever the sort's
// stability: by expert, then by slot, as above (bit for bit the same plan).
// Larger batches (up to 128 blocks of 2048 slots) with E <= kCountPlanMaxExperts take two launches,
// a stable counting sort: (1) each block counts the ids of its kChunkSlots slots into
// hist[block][e]; (2) each block reads the whole table (blocks * E ints), so it knows every
// expert's start and the rows of the blocks before it, and places its slots in slot order, 256 at
// a time: a slot's position is its expert's next free row + the slots of that expert in the warps
// before it (per-warp counts in shared memory) + those before it in its warp (__match_any_sync).
// Block 0 writes counts_E and offs_E. The same plan bit for bit again.
#pragma once

#include <cub/block/block_radix_sort.cuh>

#include "common.cuh"

namespace moe::cuda {
// Internal linkage, as when these lived in dispatch.cu (nvcc's kernel stubs need the kernels and
// their callers in the same namespace).
namespace {

constexpr int kSmemHistMax = 8192;  // experts counted in shared memory (32 KiB)

template <typename index_t>
__global__ void plan_keys_kernel(const index_t* __restrict__ ids, int64_t num_slots, int E,
                                 bool smem_hist, int* __restrict__ keys, int* __restrict__ vals,
                                 int* __restrict__ counts) {
  extern __shared__ int hist[];
  if (smem_hist) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
  }
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s < num_slots; s += stride) {
    const int64_t id = static_cast<int64_t>(ids[s]);
    CUDA_KERNEL_ASSERT(id >= -1 && id < E && "moe.plan: ids_TK holds an id outside [-1, E)");
    const bool valid = id >= 0 && id < E;
    keys[s] = valid ? static_cast<int>(id) : E;  // empty slots sort last
    vals[s] = static_cast<int>(s);
    if (valid) atomicAdd(smem_hist ? &hist[id] : &counts[id], 1);
  }
  if (smem_hist) {
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
      if (hist[e] != 0) atomicAdd(&counts[e], hist[e]);
  }
}

constexpr int kScanThreads = 1024;

constexpr int kBlockPlanThreads = 256;
constexpr int kBlockPlanMaxItems = 8;
constexpr int64_t kBlockPlanSlots = int64_t{kBlockPlanThreads} * kBlockPlanMaxItems;  // 2048
constexpr int kBlockPlanMaxExperts = 4096;  // keys of 13 + 11 bits

constexpr int kCountPlanThreads = 256;
constexpr int kCountPlanWarps = kCountPlanThreads / kWarp;
constexpr int64_t kChunkSlots = 2048;         // slots per block of the counting sort
constexpr int kCountPlanMaxExperts = 1024;    // shared memory: (1 + warps) * E ints
constexpr int64_t kCountPlanMaxBlocks = 128;  // each block reads the whole blocks x E table

// Counting-sort plan, pass 1: hist[b][e] = slots of block b's chunk routed to expert e.
template <typename index_t>
__global__ void __launch_bounds__(kCountPlanThreads)
    plan_hist_kernel(const index_t* __restrict__ ids, int64_t num_slots, int E, int* __restrict__ hist) {
  __shared__ int h[kCountPlanMaxExperts];
  for (int e = threadIdx.x; e < E; e += kCountPlanThreads) h[e] = 0;
  __syncthreads();
  const int64_t begin = int64_t(blockIdx.x) * kChunkSlots, end = min(num_slots, begin + kChunkSlots);
  for (int64_t s = begin + threadIdx.x; s < end; s += kCountPlanThreads) {
    const int64_t id = static_cast<int64_t>(ids[s]);
    CUDA_KERNEL_ASSERT(id >= -1 && id < E && "moe.plan: ids_TK holds an id outside [-1, E)");
    if (id >= 0 && id < E) atomicAdd(&h[id], 1);  // integer counts: exact in any order
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kCountPlanThreads) hist[int64_t(blockIdx.x) * E + e] = h[e];
}

// Counting-sort plan, pass 2 (see the header): block b places the slots of its chunk.
template <typename index_t>
__global__ void __launch_bounds__(kCountPlanThreads)
    plan_place_kernel(const index_t* __restrict__ ids, int64_t num_slots, int E,
                      const int* __restrict__ hist, int* __restrict__ counts, int* __restrict__ offs,
                      int64_t* __restrict__ order, int64_t* __restrict__ rows) {
  __shared__ int next_row[kCountPlanMaxExperts];                  // expert e's next free row
  __shared__ int warp_count[kCountPlanWarps][kCountPlanMaxExperts];  // this step's slots per warp
  __shared__ int warp_sums[kCountPlanThreads / kWarp];
  __shared__ int valid_rows;
  const int b = blockIdx.x, nblocks = gridDim.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  // Every expert's total and the rows the blocks before b give it; their exclusive scan over e.
  int carry = 0;
  for (int base = 0; base < E; base += kCountPlanThreads) {  // uniform loop: every thread scans
    const int e = base + threadIdx.x;
    int total_e = 0, before = 0;
    if (e < E) {
      for (int j = 0; j < nblocks; ++j) {
        const int c = hist[int64_t(j) * E + e];
        total_e += c;
        before += j < b ? c : 0;
      }
    }
    int total = 0;
    const int incl = block_inclusive_scan<kCountPlanThreads>(total_e, total, warp_sums);
    if (e < E) {
      next_row[e] = carry + incl - total_e + before;
      for (int w = 0; w < kCountPlanWarps; ++w) warp_count[w][e] = 0;
      if (b == 0) {
        counts[e] = total_e;
        offs[e] = carry + incl;
      }
    }
    carry += total;
  }
  if (threadIdx.x == 0) valid_rows = carry;
  __syncthreads();
  const int64_t begin = int64_t(b) * kChunkSlots, end = min(num_slots, begin + kChunkSlots);
  for (int64_t s0 = begin; s0 < end; s0 += kCountPlanThreads) {  // uniform: steps in slot order
    const int64_t s = s0 + threadIdx.x;
    int id = -1;
    if (s < end) {
      const int64_t v = static_cast<int64_t>(ids[s]);
      id = (v >= 0 && v < E) ? int(v) : -1;  // out-of-range ids: asserted in pass 1
    }
    const unsigned peers = __match_any_sync(0xffffffffu, id);  // this warp's slots of the same id
    const unsigned lower = peers & ((1u << lane) - 1u);
    const bool leader = id >= 0 && lower == 0;  // the warp's first slot of this id
    if (leader) warp_count[warp][id] = __popc(peers);
    __syncthreads();
    int64_t row = -1;
    bool first_warp = true;  // no warp before this one has the id
    if (id >= 0) {
      int r = next_row[id] + __popc(lower);
      for (int w = 0; w < warp; ++w) {
        r += warp_count[w][id];
        first_warp = first_warp && warp_count[w][id] == 0;
      }
      row = r;
      order[row] = s;
    }
    if (s < end) rows[s] = row;
    __syncthreads();  // every thread has read next_row and warp_count
    if (leader && first_warp) {  // one thread per id: advance its next free row, clear its counts
      int step = 0;
      for (int w = 0; w < kCountPlanWarps; ++w) {
        step += warp_count[w][id];
        warp_count[w][id] = 0;
      }
      next_row[id] += step;
    }
    __syncthreads();
  }
  // order_N past the valid rows: -1 (padding), shared out over the blocks.
  for (int64_t i = valid_rows + int64_t(b) * kCountPlanThreads + threadIdx.x; i < num_slots;
       i += int64_t(nblocks) * kCountPlanThreads)
    order[i] = -1;
}

// The whole plan in one block for at most kBlockPlanThreads * ITEMS slots (see the header).
template <typename index_t, int ITEMS>
__global__ void __launch_bounds__(kBlockPlanThreads)
    plan_block_kernel(const index_t* __restrict__ ids, int num_slots, int E, int slot_bits,
                      int* __restrict__ counts, int* __restrict__ offs, int64_t* __restrict__ order,
                      int64_t* __restrict__ rows) {
  using Sort = cub::BlockRadixSort<unsigned, kBlockPlanThreads, ITEMS>;
  __shared__ typename Sort::TempStorage sort_storage;
  __shared__ int hist[kBlockPlanMaxExperts];
  __shared__ int warp_sums[kBlockPlanThreads / kWarp];
  for (int e = threadIdx.x; e < E; e += kBlockPlanThreads) hist[e] = 0;
  __syncthreads();
  unsigned keys[ITEMS];  // blocked: thread t holds slots t*ITEMS .. t*ITEMS + ITEMS - 1
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int s = threadIdx.x * ITEMS + j;
    unsigned id = unsigned(E);  // empty slots, and the padding past num_slots, sort last
    if (s < num_slots) {
      const int64_t v = static_cast<int64_t>(ids[s]);
      CUDA_KERNEL_ASSERT(v >= -1 && v < E && "moe.plan: ids_TK holds an id outside [-1, E)");
      if (v >= 0 && v < E) {
        id = unsigned(v);
        atomicAdd(&hist[v], 1);
      }
    }
    keys[j] = (id << slot_bits) | unsigned(s);
  }
  __syncthreads();
  int carry = 0;
  for (int base = 0; base < E; base += kBlockPlanThreads) {  // uniform loop: every thread scans
    const int e = base + threadIdx.x;
    const int c = e < E ? hist[e] : 0;
    int total = 0;
    const int incl = block_inclusive_scan<kBlockPlanThreads>(c, total, warp_sums);
    if (e < E) {
      counts[e] = c;
      offs[e] = carry + incl;
    }
    carry += total;
  }
  const int end_bit = slot_bits + 32 - __clz(unsigned(E));  // ids are in [0, E]
  Sort(sort_storage).Sort(keys, 0, end_bit);
  const unsigned slot_mask = (1u << slot_bits) - 1u;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int i = threadIdx.x * ITEMS + j;  // the sorted rank
    const int s = int(keys[j] & slot_mask);
    if (i >= num_slots) continue;  // padding keys sort past every slot
    const bool valid = int(keys[j] >> slot_bits) < E;
    order[i] = valid ? s : -1;
    rows[s] = valid ? i : -1;
  }
}

__global__ void offsets_kernel(const int* __restrict__ counts, int E, int* __restrict__ offs) {
  __shared__ int warp_sums[kScanThreads / kWarp];
  int carry = 0;
  for (int base = 0; base < E; base += kScanThreads) {  // uniform loop: every thread scans
    const int e = base + threadIdx.x;
    int total = 0;
    const int incl = block_inclusive_scan<kScanThreads>(e < E ? counts[e] : 0, total, warp_sums);
    if (e < E) offs[e] = carry + incl;
    carry += total;
  }
}

__global__ void plan_finalize_kernel(const int* __restrict__ keys, const int* __restrict__ vals,
                                     int64_t num_slots, int E, int64_t* __restrict__ order,
                                     int64_t* __restrict__ rows) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < num_slots; i += stride) {
    const int s = vals[i];
    const bool valid = keys[i] < E;
    order[i] = valid ? s : -1;
    rows[s] = valid ? i : -1;
  }
}

}  // namespace
}  // namespace moe::cuda
