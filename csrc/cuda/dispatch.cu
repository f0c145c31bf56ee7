// moe.plan / moe.permute / moe.unpermute / moe.unpermute_weights_grad on CUDA.
//
// Shape legend: T tokens, K top-k slots per token, E experts, N routed rows (the host-side bound
// T*K, also the count num_slots of slots; rows past offs_E[E-1] are padding), D feature dim.
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
//
// permute / unpermute / unpermute_weights_grad: one warp per output row, 16-byte vectors when
// the row strides and pointers allow it (else one element at a time). unpermute accumulates in
// at::opmath_type (float32 for half/bfloat16) in slot order k = 0..K-1 with separately rounded
// multiplies and adds (no FMA), so it equals the CPU kernel bit for bit. Empty slots (-1) are
// never read; padding rows of permute's output are written with zeros.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cub/block/block_radix_sort.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "gather.cuh"
#include "moe_ops.h"

namespace moe::cuda {
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

// (rows / warps per block, chunks of kChunk vectors per row) for permute and unpermute.
dim3 chunked_grid(int64_t rows, int64_t nvec) {
  const int64_t chunks = ceil_div(nvec, kChunk);
  TORCH_CHECK(chunks <= 65535, "moe: feature dim too large for one launch (", nvec, " vectors)");
  return dim3(rows_grid(rows, kWarpsPerBlock), static_cast<unsigned>(std::max<int64_t>(1, chunks)));
}

// Rows may have any row stride; the feature dim must be unit-stride (else a contiguous copy).
at::Tensor unit_inner(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// Calls fn(W{}) with W the C++ type of the optional weights (float when absent or float32).
template <typename scalar_t, typename Fn>
void with_weight_type(const std::optional<at::Tensor>& w, Fn&& fn) {
  if (!w.has_value() || w->scalar_type() == at::kFloat) {
    fn(float{});
  } else {
    fn(scalar_t{});
  }
}

template <typename W>
const W* weight_ptr(const std::optional<at::Tensor>& w) {
  return w.has_value() ? w->template const_data_ptr<W>() : nullptr;
}

}  // namespace

PlanTensors plan_cuda(const at::Tensor& ids_TK, int64_t num_experts) {
  check_plan_args(ids_TK, num_experts);
  TORCH_CHECK(ids_TK.numel() < (int64_t{1} << 31), "moe.plan: ids_TK has too many slots (",
              ids_TK.numel(), "): counts are int32");
  c10::cuda::CUDAGuard guard(ids_TK.device());
  const auto ids = ids_TK.contiguous();
  const int64_t T = ids.size(0), K = ids.size(1), num_slots = T * K;
  const int E = static_cast<int>(num_experts);
  auto i32 = ids.options().dtype(at::kInt);
  auto order = at::empty({num_slots}, ids.options().dtype(at::kLong));
  auto rows = at::empty({T, K}, ids.options().dtype(at::kLong));
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (num_slots > 0 && num_slots <= kBlockPlanSlots && E <= kBlockPlanMaxExperts) {  // one launch
    auto counts = at::empty({E}, i32);
    auto offs = at::empty({E}, i32);
    // One item per thread up to 256 slots, else 8; the slot field holds every item's index,
    // padding included (8 or 11 bits), under the id's (at most 13).
    const bool one = num_slots <= kBlockPlanThreads;
    const int slot_bits = one ? 8 : 11;
    static_assert(kBlockPlanThreads == 256 && kBlockPlanSlots == 2048 && kBlockPlanMaxExperts <= 4096,
                  "slot_bits and the 13 id bits below must fit 32-bit keys");
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_plan_block_cuda", [&] {
      auto kernel = one ? plan_block_kernel<index_t, 1> : plan_block_kernel<index_t, kBlockPlanMaxItems>;
      kernel<<<1, kBlockPlanThreads, 0, stream>>>(
          ids.const_data_ptr<index_t>(), static_cast<int>(num_slots), E, slot_bits,
          counts.mutable_data_ptr<int>(), offs.mutable_data_ptr<int>(), order.mutable_data_ptr<int64_t>(),
          rows.mutable_data_ptr<int64_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {counts, offs, order, rows};
  }
  // Two launches, the counting sort, while its table is small: each block reads all of it, so the
  // reads grow as blocks^2 * E (128 blocks: 262144 slots, 64 MiB at E = 1024); beyond, the radix sort.
  if (num_slots > 0 && E <= kCountPlanMaxExperts && ceil_div(num_slots, kChunkSlots) <= kCountPlanMaxBlocks) {
    auto counts = at::empty({E}, i32);
    auto offs = at::empty({E}, i32);
    const int64_t nblocks = ceil_div(num_slots, kChunkSlots);
    auto hist = at::empty({nblocks, E}, i32);
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_plan_count_cuda", [&] {
      plan_hist_kernel<index_t><<<unsigned(nblocks), kCountPlanThreads, 0, stream>>>(
          ids.const_data_ptr<index_t>(), num_slots, E, hist.mutable_data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      plan_place_kernel<index_t><<<unsigned(nblocks), kCountPlanThreads, 0, stream>>>(
          ids.const_data_ptr<index_t>(), num_slots, E, hist.const_data_ptr<int>(),
          counts.mutable_data_ptr<int>(), offs.mutable_data_ptr<int>(), order.mutable_data_ptr<int64_t>(),
          rows.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {counts, offs, order, rows};
  }
  auto counts = at::zeros({E}, i32);
  auto offs = at::empty({E}, i32);
  auto keys = at::empty({4, num_slots}, i32);  // keys in/out, slots in/out
  int* key_in = keys[0].mutable_data_ptr<int>();
  int* key_out = keys[1].mutable_data_ptr<int>();
  int* val_in = keys[2].mutable_data_ptr<int>();
  int* val_out = keys[3].mutable_data_ptr<int>();
  if (num_slots > 0) {
    const bool smem_hist = E <= kSmemHistMax;
    const size_t smem = smem_hist ? size_t(E) * sizeof(int) : 0;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_plan_cuda", [&] {
      plan_keys_kernel<index_t><<<flat_grid(num_slots, kThreads), kThreads, smem, stream>>>(
          ids.const_data_ptr<index_t>(), num_slots, E, smem_hist, key_in, val_in,
          counts.mutable_data_ptr<int>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  offsets_kernel<<<1, kScanThreads, 0, stream>>>(counts.const_data_ptr<int>(), E,
                                                  offs.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_slots == 0) return {counts, offs, order, rows};
  const int end_bit = 32 - __builtin_clz(static_cast<unsigned>(E));  // keys are in [0, E]
  size_t temp_bytes = 0;  // size query: host-only, no device work
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, key_in, key_out, val_in,
                                                 val_out, static_cast<int>(num_slots), 0, end_bit, stream));
  auto temp = at::empty({static_cast<int64_t>(temp_bytes)}, ids.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.mutable_data_ptr(), temp_bytes, key_in,
                                                 key_out, val_in, val_out, static_cast<int>(num_slots), 0,
                                                 end_bit, stream));
  plan_finalize_kernel<<<flat_grid(num_slots, kThreads), kThreads, 0, stream>>>(
      key_out, val_out, num_slots, E, order.mutable_data_ptr<int64_t>(), rows.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, offs, order, rows};
}

at::Tensor permute_cuda(const at::Tensor& x_TD, const at::Tensor& order_N,
                        const at::Tensor& rows_TK, const std::optional<at::Tensor>& scale_TK) {
  check_dispatch_args("permute", x_TD, "x_TD", rows_TK.size(0), "T, the plan's tokens", order_N,
                      rows_TK);
  if (scale_TK.has_value()) check_weights_arg("permute", "scale_TK", *scale_TK, rows_TK, x_TD);
  c10::cuda::CUDAGuard guard(x_TD.device());
  const int64_t N = order_N.size(0), K = rows_TK.size(1), D = x_TD.size(1), num_slots = rows_TK.numel();
  const auto x = unit_inner(x_TD);
  const auto order = order_N.contiguous();
  const auto scale = scale_TK.has_value() ? std::optional<at::Tensor>(scale_TK->contiguous())
                                          : std::nullopt;
  auto out = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute_cuda", [&] {
    with_weight_type<scalar_t>(scale, [&](auto w_tag) {
      using W = decltype(w_tag);
      constexpr int V = kVec16<scalar_t>;
      const bool vec = vec16_ok(x.const_data_ptr(), D, x.stride(0), sizeof(scalar_t)) &&
                       vec16_ok(out.const_data_ptr(), D, D, sizeof(scalar_t));
      auto launch = [&](auto kernel, int64_t nvec) {
        kernel<<<chunked_grid(N, nvec), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), x.stride(0), order.const_data_ptr<int64_t>(),
            weight_ptr<W>(scale), N, num_slots, static_cast<int>(K), nvec, out.mutable_data_ptr<scalar_t>());
      };
      if (vec) launch(permute_kernel<scalar_t, W, V>, D / V);
      else launch(permute_kernel<scalar_t, W, 1>, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y_ND, const at::Tensor& order_N,
                          const at::Tensor& rows_TK, const std::optional<at::Tensor>& weights_TK) {
  check_dispatch_args("unpermute", y_ND, "y_ND", order_N.size(0), "N, the plan's rows", order_N,
                      rows_TK);
  if (weights_TK.has_value()) check_weights_arg("unpermute", "weights_TK", *weights_TK, rows_TK, y_ND);
  c10::cuda::CUDAGuard guard(y_ND.device());
  const int64_t N = y_ND.size(0), T = rows_TK.size(0), K = rows_TK.size(1), D = y_ND.size(1);
  const auto y = unit_inner(y_ND);
  const auto rows = rows_TK.contiguous();
  const auto w = weights_TK.has_value() ? std::optional<at::Tensor>(weights_TK->contiguous())
                                        : std::nullopt;
  auto out = at::empty({T, D}, y.options());
  if (T == 0 || D == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_cuda", [&] {
    with_weight_type<scalar_t>(w, [&](auto w_tag) {
      using W = decltype(w_tag);
      constexpr int V = kVec16<scalar_t>;
      const bool vec = vec16_ok(y.const_data_ptr(), D, y.stride(0), sizeof(scalar_t)) &&
                       vec16_ok(out.const_data_ptr(), D, D, sizeof(scalar_t));
      auto launch = [&](auto kernel, int64_t nvec) {
        kernel<<<chunked_grid(T, nvec), kThreads, 0, stream>>>(
            y.const_data_ptr<scalar_t>(), y.stride(0), rows.const_data_ptr<int64_t>(),
            weight_ptr<W>(w), T, static_cast<int>(K), N, nvec, out.mutable_data_ptr<scalar_t>());
      };
      if (vec) launch(unpermute_kernel<scalar_t, W, V>, D / V);
      else launch(unpermute_kernel<scalar_t, W, 1>, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor unpermute_weights_grad_cuda(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                       const at::Tensor& order_N, const at::Tensor& rows_TK) {
  check_unpermute_weights_grad_args(grad_TD, y_ND, order_N, rows_TK);
  c10::cuda::CUDAGuard guard(y_ND.device());
  const int64_t N = y_ND.size(0), T = rows_TK.size(0), K = rows_TK.size(1), D = y_ND.size(1);
  const int64_t num_slots = T * K;
  const auto y = unit_inner(y_ND);
  const auto g = unit_inner(grad_TD);
  const auto rows = rows_TK.contiguous();
  auto out = at::empty({T, K}, y.options().dtype(accum_dtype(y.scalar_type())));
  if (num_slots == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_wgrad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = kVec16<scalar_t>;
    const bool vec = vec16_ok(y.const_data_ptr(), D, y.stride(0), sizeof(scalar_t)) &&
                     vec16_ok(g.const_data_ptr(), D, g.stride(0), sizeof(scalar_t));
    auto launch = [&](auto kernel, int64_t nvec) {
      kernel<<<rows_grid(num_slots, kWarpsPerBlock), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), g.stride(0), y.const_data_ptr<scalar_t>(), y.stride(0),
          rows.const_data_ptr<int64_t>(), num_slots, static_cast<int>(K), N, nvec,
          out.mutable_data_ptr<acc_t>());
    };
    if (vec) launch(unpermute_wgrad_kernel<scalar_t, V>, D / V);
    else launch(unpermute_wgrad_kernel<scalar_t, 1>, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace moe::cuda

TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("plan", &moe::cuda::plan_cuda);
  m.impl("permute", &moe::cuda::permute_cuda);
  m.impl("unpermute", &moe::cuda::unpermute_cuda);
  m.impl("unpermute_weights_grad", &moe::cuda::unpermute_weights_grad_cuda);
}
