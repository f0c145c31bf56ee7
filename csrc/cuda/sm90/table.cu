// The configuration tables of moekit's sm90 grouped GEMM, the choice among their entries from
// host-known sizes only, and the setup kernel that runs before the CUTLASS kernels of one run()
// (no CUTLASS kernel in this unit).
#include <cute/layout.hpp>

#include <algorithm>

#include "grouped_gemm_sm90.h"

namespace moe::cuda::sm90 {

namespace {

struct Entry {
  Config config;
  size_t (*workspace)(const GroupedGemm&);
  const char* (*gemm)(const GroupedGemm&, void*, cudaStream_t);
};

// Names: CUTLASS's tile M x N x K (the problem's rows x Y x X, grouped_gemm_sm90.h); pp =
// ping-pong (two consumer warp groups on alternate tiles, so one's epilogue overlaps the other's
// MMAs), co = cooperative (both on one tile); c2 = a cluster of 2 CTAs along CUTLASS's M sharing
// each B tile by TMA multicast (each group's row tiles round up to 2), c1 = no cluster.
const Entry kForward[] = {
    {{"64x128x128_pp_c2", 64, 128, 128}, forward_workspace<0>, forward_gemm<0>},
    {{"128x256x64_co_c2", 128, 256, 64}, forward_workspace<1>, forward_gemm<1>},
    {{"128x128x64_co_c2", 128, 128, 64}, forward_workspace<2>, forward_gemm<2>},
    {{"256x128x64_co_c1", 256, 128, 64}, forward_workspace<3>, forward_gemm<3>},
    {{"128x256x64_co_c1", 128, 256, 64}, forward_workspace<4>, forward_gemm<4>},
    {{"64x256x64_pp_c1", 64, 256, 64}, forward_workspace<5>, forward_gemm<5>},
};
const Entry kWgrad[] = {
    {{"128x256x64_co_c2", 128, 256, 64}, wgrad_workspace<0>, wgrad_gemm<0>},
    {{"128x128x64_pp_c1", 128, 128, 64}, wgrad_workspace<1>, wgrad_gemm<1>},
    {{"64x256x64_pp_c1", 64, 256, 64}, wgrad_workspace<2>, wgrad_gemm<2>},
};
constexpr int kNumForward = sizeof(kForward) / sizeof(kForward[0]);
constexpr int kNumWgrad = sizeof(kWgrad) / sizeof(kWgrad[0]);

const Entry* entry(bool wgrad, int id) {
  if (id < 0 || id >= (wgrad ? kNumWgrad : kNumForward)) return nullptr;
  return wgrad ? &kWgrad[id] : &kForward[id];
}

}  // namespace

int num_configs(bool wgrad) { return wgrad ? kNumWgrad : kNumForward; }

Config config(bool wgrad, int id) {
  const Entry* e = entry(wgrad, id);
  return e ? e->config : Config{"invalid", 0, 0, 0};
}

// Chosen from the H200 sweep of bench/gpu_gemm_sweep.py (bench/RESULTS_H200.md, session 5): the
// 64 x 256 ping-pong tile without a cluster wins up to about a thousand rows per expert (one
// 64-row strip at a time keeps partial tiles cheap, and one warp group's epilogue hides behind
// the other's MMAs); cooperative 128 x 256 tiles win once there are thousands of rows per expert
// to fill them, and with the 2-CTA cluster where many rows meet narrow outputs. The weight
// gradient's depth (CUTLASS's K) is each expert's rows: ping-pong 128 x 128 where those are many
// and the total small, else cooperative 128 x 256.
int choose_config(bool wgrad, int64_t N, int64_t E, int64_t X, int64_t Y) {
  (void)X;
  const int64_t rows = E > 0 ? N / E : N;  // mean rows per expert (host bound)
  if (wgrad) return rows >= 256 && N <= 16384 ? 1 : 0;
  if (rows >= 2048) return 4;
  if (N > 65536 && Y <= 1024) return 1;
  return 5;
}

size_t workspace_bytes(const GroupedGemm& g, int id) {
  const Entry* e = entry(g.wgrad, id);
  return e ? e->workspace(g) : 0;
}

namespace {

constexpr int kSetupThreads = 256;

// The work of one setup launch. GEMM i owns the blocks [first[i], first[i + 1]) of the 1-D grid, as
// an x by y grid of its own (setup_grid, x = grid_x[i]); the gather, when there is one, the blocks
// from first[kMaxRun] on: gather_row_blocks x chunks of its rows.
struct Setup {
  GroupedGemm g[kMaxRun];
  char* ws[kMaxRun];
  unsigned first[kMaxRun + 1], grid_x[kMaxRun];
  Gather gather;
  unsigned gather_row_blocks;
};

constexpr int kWarpsPerSetupBlock = kSetupThreads / 32;
constexpr int kGatherUnroll = 4;                        // 16-byte loads in flight per lane
constexpr int64_t kGatherChunk = 32 * kGatherUnroll;    // 16-byte vectors of a row per warp

// The gathered rows, moe.permute's kernel without a scale (csrc/cuda/gather.cuh: a warp per row
// and chunk of kGatherChunk vectors, kGatherUnroll loads issued before the first store), in 16-byte
// vectors: the same bytes. `block` is this block's index in the gather's row_blocks x chunks.
__device__ void gather_rows(const Gather& gt, unsigned block, unsigned row_blocks) {
  const int64_t i = int64_t(block % row_blocks) * kWarpsPerSetupBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= gt.N) return;
  const GatheredX& rows = gt.rows;
  const int64_t s = rows.order[i];
  MOE_SM90_ASSERT(s >= -1 && s < rows.slots, "moe.permute: order_N does not match rows_TK");
  const int64_t nvec = gt.D / 8;
  uint4* o = static_cast<uint4*>(gt.out) + i * nvec;
  const int64_t v_lo = int64_t(block / row_blocks) * kGatherChunk, v_hi = min(nvec, v_lo + kGatherChunk);
  if (s < 0 || s >= rows.slots) {  // padding row: zeros, nothing read
    for (int64_t v = v_lo + lane; v < v_hi; v += 32) o[v] = make_uint4(0, 0, 0, 0);
    return;
  }
  const uint4* src = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(rows.x) + (s / rows.K) * rows.ldx);
  for (int64_t v0 = v_lo + lane; v0 < v_hi; v0 += 32 * kGatherUnroll) {
    uint4 a[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u)
      if (v0 + u * 32 < v_hi) a[u] = src[v0 + u * 32];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u)
      if (v0 + u * 32 < v_hi) o[v0 + u * 32] = a[u];
  }
}

// Everything of one run() around its CUTLASS kernels, in one launch (grouped_gemm_sm90.h's
// contract). The launch is 1-D: each GEMM's blocks form an (x, y) grid of its own (Setup), so two
// GEMMs cost the blocks of two launches, and the gather's blocks come last. Threads e < E of
// blocks (x, 0) assert offs_E (non-decreasing, within [0, N]) and write expert e's pointers,
// strides and CUTLASS (M, N, K) (bad offsets are clamped, so memory stays safe if the assert is
// compiled out); the GEMM's blocks also write the contract's zeros: in the forward the padding
// rows [offs_E[E-1], N) of c (blocks (x, 0), grid-stride), in the weight gradient expert y's
// (X, Y) block when it has no rows (blocks (x, y)). Zeros and GEMM outputs are disjoint (an empty
// expert's group has M = 0: no tiles), so their order does not matter. Y (and X * Y) are
// multiples of 8 here (the TMA layout rules): zeros go in 16-byte words.
__global__ void __launch_bounds__(kSetupThreads) grouped_gemm_setup_kernel(const __grid_constant__ Setup s) {
  if (blockIdx.x >= s.first[kMaxRun]) {
    gather_rows(s.gather, blockIdx.x - s.first[kMaxRun], s.gather_row_blocks);
    return;
  }
  const int i = blockIdx.x < s.first[1] ? 0 : 1;  // kMaxRun == 2
  const GroupedGemm& g = s.g[i];
  char* ws = s.ws[i];
  const unsigned own = blockIdx.x - s.first[i], grid_x = s.grid_x[i];
  const unsigned bx = own % grid_x, by = own / grid_x;  // this block in the GEMM's own grid
  const int e = int(bx) * kSetupThreads + threadIdx.x;
  if (by == 0 && e < g.E) {
    const GroupArrays l = group_arrays(g.E);
    int lo = e > 0 ? g.offs[e - 1] : 0, hi = g.offs[e];
    MOE_SM90_ASSERT(lo >= 0 && lo <= hi && hi <= g.N,
                    "moe.grouped_mm: offs_E must be non-decreasing and within [0, N]");
    lo = min(max(lo, 0), g.N);
    hi = min(max(hi, lo), g.N);
    auto ptrs = [&](size_t at) { return reinterpret_cast<const void**>(ws + at); };
    auto strides = [&](size_t at) { return reinterpret_cast<int64_t*>(ws + at); };
    const uint16_t* a = static_cast<const uint16_t*>(g.a);  // bfloat16 elements
    const uint16_t* b = static_cast<const uint16_t*>(g.b);
    uint16_t* c = static_cast<uint16_t*>(g.c);
    const int rows = hi - lo;
    using Shape = cute::Shape<int, int, int>;
    if (!g.wgrad) {  // (rows, Y, X): A = a rows (row-major), B = b[e], C = c rows
      ptrs(l.ptr_a)[e] = a + int64_t(lo) * g.lda;
      ptrs(l.ptr_b)[e] = b + int64_t(e) * g.b_batch;
      ptrs(l.ptr_c)[e] = c + int64_t(lo) * g.Y;
      reinterpret_cast<Shape*>(ws + l.shapes)[e] = Shape{rows, g.Y, g.X};
    } else {  // (X, Y, rows): A = a rows transposed (contiguous along X), B = g rows, C = c[e]
      ptrs(l.ptr_a)[e] = a + int64_t(lo) * g.lda;
      ptrs(l.ptr_b)[e] = b + int64_t(lo) * g.ldb;
      ptrs(l.ptr_c)[e] = c + int64_t(e) * g.X * g.Y;
      // An expert with no rows gets no tiles (M = 0): with K = 0 CUTLASS would still store its
      // X x Y tiles, from accumulators no wgmma ever cleared, over the zeros written below.
      reinterpret_cast<Shape*>(ws + l.shapes)[e] = Shape{rows > 0 ? g.X : 0, g.Y, rows};
    }
    strides(l.stride_a)[e] = g.lda;
    strides(l.stride_b)[e] = g.ldb;
    strides(l.stride_c)[e] = g.Y;
  }
  uint4* c = static_cast<uint4*>(g.c);
  const int64_t step = int64_t(grid_x) * kSetupThreads;
  const int64_t first = int64_t(bx) * kSetupThreads + threadIdx.x;
  if (!g.wgrad) {
    if (by != 0 || g.E < 1) return;
    const int64_t words_per_row = g.Y / 8;
    const int64_t begin = int64_t(min(max(g.offs[g.E - 1], 0), g.N)) * words_per_row;
    for (int64_t i = begin + first; i < int64_t(g.N) * words_per_row; i += step) c[i] = make_uint4(0, 0, 0, 0);
  } else {
    const int ez = int(by);
    if (ez >= g.E || g.offs[ez] != (ez > 0 ? g.offs[ez - 1] : 0)) return;  // expert ez has rows
    const int64_t words = int64_t(g.X) * g.Y / 8;
    for (int64_t i = first; i < words; i += step) c[ez * words + i] = make_uint4(0, 0, 0, 0);
  }
}

// One GEMM's share of the setup grid: enough blocks for one thread per expert, and for the zeros
// (the forward: up to 4 per SM over the N x Y output; the weight gradient: up to 64 per expert,
// one block row per expert).
dim3 setup_grid(const GroupedGemm& g) {
  const int64_t setup = (int64_t(g.E) + kSetupThreads - 1) / kSetupThreads;
  const int64_t words = g.wgrad ? int64_t(g.X) * g.Y / 8 : int64_t(g.N) * g.Y / 8;
  const int64_t cap = g.wgrad ? 64 : 4 * int64_t(g.sm_count > 0 ? g.sm_count : 1);
  const int64_t zero = std::min<int64_t>((words + kSetupThreads - 1) / kSetupThreads, cap);
  return dim3(unsigned(std::max<int64_t>({setup, zero, 1})), g.wgrad ? unsigned(std::max(g.E, 1)) : 1u);
}

}  // namespace

const char* run(const GroupedGemm* g, const int* ids, void* const* ws, int count, cudaStream_t stream,
                const Gather* gather) {
  if (count < 1 || count > kMaxRun) return "moe.grouped_mm (sm90): a run takes 1 or 2 GEMMs";
  static_assert(kMaxRun == 2, "grouped_gemm_setup_kernel picks one of two GEMMs");
  Setup s{};
  for (int i = 0; i < count; ++i) {
    if (entry(g[i].wgrad, ids[i]) == nullptr) return "moe.grouped_mm (sm90): config id out of range";
    s.g[i] = g[i];
    s.ws[i] = static_cast<char*>(ws[i]);
    const dim3 own = setup_grid(g[i]);
    s.grid_x[i] = own.x;
    s.first[i + 1] = s.first[i] + own.x * own.y;  // < 2^31: x <= 256 where y = E <= 65535 (wgrad)
  }
  for (int i = count; i < kMaxRun; ++i) s.first[i + 1] = s.first[i];  // no blocks: never picked
  unsigned blocks = s.first[kMaxRun];
  if (gather != nullptr && gather->N > 0 && gather->D > 0) {
    if (gather->D % 8 != 0 || gather->rows.ldx % 8 != 0 || reinterpret_cast<uintptr_t>(gather->rows.x) % 16 != 0 ||
        reinterpret_cast<uintptr_t>(gather->out) % 16 != 0)
      return "moe.grouped_mm (sm90): gathered rows must be 16-byte vectors";
    s.gather = *gather;
    s.gather_row_blocks = unsigned((gather->N + kWarpsPerSetupBlock - 1) / kWarpsPerSetupBlock);
    const int64_t chunks = (gather->D / 8 + kGatherChunk - 1) / kGatherChunk;
    if (int64_t(s.gather_row_blocks) * chunks + blocks >= (int64_t{1} << 31))
      return "moe.grouped_mm (sm90): too many gathered rows for one setup launch";
    blocks += unsigned(int64_t(s.gather_row_blocks) * chunks);
  }
  grouped_gemm_setup_kernel<<<blocks, kSetupThreads, 0, stream>>>(s);
  if (cudaGetLastError() != cudaSuccess) return "moe.grouped_mm (sm90): launching the group setup kernel failed";
  for (int i = 0; i < count; ++i) {
    if (const char* err = entry(g[i].wgrad, ids[i])->gemm(g[i], ws[i], stream)) return err;
  }
  return nullptr;
}

}  // namespace moe::cuda::sm90
