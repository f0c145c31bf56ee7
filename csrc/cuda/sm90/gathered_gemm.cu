// moekit's own Hopper kernels for the gathered grouped GEMMs (grouped_gemm_sm90.h's GatheredGemm and
// GatheredWgrad), one launch each: moe.gather_grouped_mm, moe.gather_grouped_mm_swiglu with SwiGLU
// in its epilogue, moe.grouped_mm_unpermute's down projection (its A the routed rows in place, its
// epilogue the routing weights and token-major stores: the combine then sums contiguous rows), and
// the weight gradient moe.gather_grouped_mm_wgrad (below, gathered_wgrad).
//
// Layout of one CTA (384 threads, one CTA per SM, persistent over output tiles of 128 rows x TN
// b columns, TN = 256 where it divides the output, else 128):
//   warp group 0 (producer): each stage, cp.async copies the tile's kTM gathered rows of x_TD
//     (row order[i] / K, or row i of the routed rows themselves without order; zeros for
//     padding) into shared memory in the wgmma's 128-byte swizzle,
//     and one thread issues one 5-D TMA box of b (dims (column in a 64-column block, depth, block,
//     half, expert)): with SwiGLU expert e's gate columns f..f+TN/2-1 and, as the second half, its
//     up columns F+f..F+f+TN/2-1, so [gate; up] needs no relayout; else TN consecutive columns;
//   warp groups 1-2 (consumers): 64 rows each, wgmma m64nTNk16 over the stages (one batch in
//     flight), then the epilogue: accumulator v holds column c (< TN / 2) and v + TN / 4 column
//     c + TN / 2 of the same row, so act = silu(g) * u is formed in registers; token-major, each
//     thread's two rows' slots and weights are read once and its values stored, weighted, at their
//     slots' rows (the same 16-byte pieces of 8 rows per warp store as h's). The 256-wide tile's
//     consumers take 224 registers a thread from the producer's warp group (setmaxnreg).
// Full barriers count the producer's 128 cp.async arrivals and the TMA's bytes; empty barriers the
// 256 consumer threads; a wait that lasts seconds traps (wait_or_trap), so a pipeline bug fails
// fast instead of hanging. Tiles (tile_of, gathered_gemm.cuh): each expert's rows in kTM-row
// blocks (a prefix over offs_E built by every CTA in shared memory: no host sync), then the
// padding rows [offs_E[E-1], N), which the consumers zero; tile t is (row block t / col_blocks,
// column block t % col_blocks), so CTAs that run together share a row block's x rows and an
// expert's weights in L2. The layouts, the accumulator pairing and the tile map are checked on
// the CPU (tests/cpp/sm90_gathered_gemm.cu); the kernel itself by tests/gpu against the twins.
#include <cuda.h>  // CUtensorMap (the driver entry point is found at run time: no -lcuda)
#include <cuda_bf16.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cuda/rn_math.cuh"
#include "gathered_gemm.cuh"
#include "grouped_gemm_sm90.h"

namespace moe::cuda::sm90 {

namespace {

using namespace cute;
using namespace gathered;

// A CTA's shared memory for STAGES stages of an A tile (kTM x kTK) and a B tile (N x kTK).
template <int STAGES, int N>
struct alignas(1024) Smem {
  static constexpr int kStages = STAGES;
  bf16 a[STAGES][kTM * kTK];
  bf16 b[STAGES][N * kTK];
  uint64_t full[STAGES], empty[STAGES];
  int tiles[kGatheredMaxExperts + 1];  // the forward's tiles[e]: the row blocks of experts before e
  int end;                             // offs_E[E-1]: the padding rows start here
  int blocks;                          // row blocks, padding's included
};
template <int TN>
using FwdSmem = Smem<TileWidth<TN>::kStages, TN>;
using WgradSmem = Smem<WgradLayouts::kStages, kWgradN>;
template <class S>
constexpr size_t smem_bytes() { return sizeof(S) + 1024; }  // + the alignment of the dynamic base
// Register budgets of the 256-wide tile (setmaxnreg, multiples of 8): its consumers hold 128 float
// accumulators a thread. The two must fit the 168 registers a thread the CTA starts with (65536 /
// 384, rounded down to 8), or the consumers' setmaxnreg.inc waits forever; 64 keeps the producer
// free of spills (56 spilled a few bytes), 216 the consumers.
constexpr int kProducerRegs = 64, kConsumerRegs = 216;
static_assert(128 * kProducerRegs + kConsumers * kConsumerRegs <= kThreads * (65536 / kThreads / 8 * 8),
              "moe sm90: the register budgets exceed the CTA's registers");

struct Params {
  CUtensorMap b_map;  // first: CUtensorMap's alignment (64 or 128 bytes) in the parameter space
  GatheredX rows;
  const int* offs;
  __nv_bfloat16* act;  // SwiGLU's (N, F), or nullptr
  __nv_bfloat16* h;    // (N, Y), or nullptr
  const int64_t* scatter;  // the token-major epilogue (out_s, else nullptr): routed row i's slot
  const void* weights;     // (slots,) float32, or bfloat16 with weights_bf16; or nullptr
  bool weights_bf16;
  __nv_bfloat16* out_s;    // (slots, Y), or nullptr
  int64_t slots;
  int E, N, D, Y, F;    // F: act's columns (SwiGLU), else 0
  int col_blocks;        // output column blocks of the tile's width
  int box_blocks;        // 64-column blocks a tile's box starts past the previous tile's: TN / 128
                         // with SwiGLU (each with its up block), else TN / 64
};

// Bad offs_E or order_N stop the kernel with a trap (reported as a launch failure at the next
// synchronisation, and the CUDA context is lost, as after a device-side assert): __assert_fail is a
// call, and any call in a kernel with wgmma makes ptxas serialise the wgmma pipeline (C7510).
#define MOE_SM90_TRAP_UNLESS(cond) \
  do {                             \
    if (!(cond)) __trap();         \
  } while (0)

// Expert e's rows [lo, hi), offs_E checked (non-decreasing within [0, N], else a trap) and clamped
// (expert_rows), so memory stays safe whatever it holds.
__device__ __forceinline__ void checked_rows(const int* offs, int N, int e, int& lo, int& hi) {
  const int l = e > 0 ? offs[e - 1] : 0, h = offs[e];
  MOE_SM90_TRAP_UNLESS(l >= 0 && l <= h && h <= N);
  expert_rows(offs, N, e, lo, hi);
}

// Warp 0: tiles[e] = the row blocks of the experts before e (a warp scan in chunks of 32), the
// padding's start and the number of row blocks.
template <class S>
__device__ void build_tiles(const Params& p, S& sm) {
  const int lane = threadIdx.x;
  int carry = 0;
  for (int e0 = 0; e0 < p.E; e0 += 32) {
    const int e = e0 + lane;
    int n = 0;
    if (e < p.E) {
      int lo, hi;
      checked_rows(p.offs, p.N, e, lo, hi);
      n = row_blocks(hi - lo);
    }
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, n, d);
      if (lane >= d) n += v;
    }
    if (e < p.E) sm.tiles[e + 1] = carry + n;
    carry += __shfl_sync(0xffffffffu, n, 31);
  }
  if (lane == 0) {
    sm.tiles[0] = 0;
    const int end = min(max(p.offs[p.E - 1], 0), p.N);
    sm.end = end;
    sm.blocks = carry + row_blocks(p.N - end);
  }
}

template <class S>
__device__ __forceinline__ OutputTile tile_at(const Params& p, const S& sm, int t) {
  return tile_of(sm.tiles, p.offs, p.E, p.N, sm.end, p.col_blocks, t);
}

// Waits for the phase of `bar` with parity `phase`, as ClusterBarrier::wait does, but traps after
// about 2^34 cycles (seconds; a stage's loads take microseconds, even under compute-sanitizer): a
// pipeline that cannot make progress fails its test instead of hanging the GPU check.
__device__ __forceinline__ void wait_or_trap(const uint64_t* bar, uint32_t phase) {
  if (cutlass::arch::ClusterBarrier::try_wait(bar, phase)) return;
  const long long start = clock64();
  while (!cutlass::arch::ClusterBarrier::try_wait(bar, phase))
    MOE_SM90_TRAP_UNLESS(clock64() - start < (1ll << 34));
}

// Routed row i's row of x (order[i] / K; row i without order), or nullptr for a padding row; a bad
// order[i] traps.
__device__ __forceinline__ const bf16* gathered_row(const GatheredX& g, int64_t i) {
  if (g.order == nullptr) return static_cast<const bf16*>(g.x) + i * g.ldx;
  const int64_t s = g.order[i];
  MOE_SM90_TRAP_UNLESS(s >= -1 && s < g.slots);  // order_N matches rows_TK
  return s >= 0 && s < g.slots ? static_cast<const bf16*>(g.x) + (s / g.K) * g.ldx : nullptr;
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool copy) {
  const uint32_t dst = cast_smem_ptr_to_uint(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(copy ? 16 : 0)
               : "memory");
}

template <bool B_COL, int TN>
__device__ void produce(const Params& p, FwdSmem<TN>& sm, int total) {
  using L = Layouts<B_COL, TN>;
  constexpr int kStages = L::kStages;
  if constexpr (TN == 256) cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();  // for the consumers'
  Tensor sA = make_tensor(make_smem_ptr(&sm.a[0][0]), typename L::LayoutA{});
  const int tid = threadIdx.x, chunk = tid % kChunks, first_row = tid / kChunks;
  const int depth_blocks = (p.D + kTK - 1) / kTK;
  int stage = 0;
  uint32_t phase = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const OutputTile tl = tile_at(p, sm, t);
    if (tl.e < 0) continue;  // padding: the consumers write its zeros
    const bf16* src[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = first_row + i * kRowsPerPass;
      src[i] = r < tl.rows ? gathered_row(p.rows, tl.row0 + r) : nullptr;
    }
    for (int kb = 0; kb < depth_blocks; ++kb) {
      wait_or_trap(&sm.empty[stage], phase ^ 1);
      if (tid == 0) {
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&sm.full[stage], TileWidth<TN>::kBBytes);
        const uint64_t hint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);
        if constexpr (B_COL)  // dims (depth, column, block, half, expert)
          SM90_TMA_LOAD_5D::copy(&p.b_map, &sm.full[stage], hint, &sm.b[stage][0], kb * kTK, 0,
                                 tl.cb * p.box_blocks, 0, tl.e);
        else  // dims (column, depth, block, half, expert)
          SM90_TMA_LOAD_5D::copy(&p.b_map, &sm.full[stage], hint, &sm.b[stage][0], 0, kb * kTK,
                                 tl.cb * p.box_blocks, 0, tl.e);
      }
      const int k = kb * kTK + chunk * 8;
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const bool copy = src[i] != nullptr && k < p.D;  // else zeros (padding, past the rows or D)
        cp_async_16(&sA(first_row + i * kRowsPerPass, chunk * 8, stage), copy ? src[i] + k : p.rows.x, copy);
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(&sm.full[stage]);
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// The consumers' mainloop for one tile: `depth_blocks` (>= 1) stages of wgmma, one batch in flight,
// each stage released once its batch is done; acc then holds the tile's sums.
template <class Mma, class FragA, class FragB, class Acc, class S>
__device__ __forceinline__ void mma_stages(Mma& mma, const FragA& tCrA, const FragB& tCrB, Acc& acc, S& sm,
                                           int depth_blocks, int& stage, uint32_t& phase) {
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  int previous = -1;
  for (int kb = 0; kb < depth_blocks; ++kb) {
    wait_or_trap(&sm.full[stage], phase);
    // cp.async wrote through the generic proxy, wgmma reads through the async proxy: the PTX ISA
    // asks for a proxy fence between them (CUTLASS's cp.async mainloop goes without; it costs little)
    cutlass::arch::fence_view_async_shared();
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
#pragma unroll
    for (int k = 0; k < size<2>(tCrA); ++k) {
      cute::gemm(mma, tCrA(_, _, k, stage), tCrB(_, _, k, stage), acc);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_wait<1>();  // the previous stage's batch is done: release its buffers
    warpgroup_fence_operand(acc);
    if (previous >= 0) cutlass::arch::ClusterBarrier::arrive(&sm.empty[previous]);
    previous = stage;
    if (++stage == S::kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  cutlass::arch::ClusterBarrier::arrive(&sm.empty[previous]);
}

// SwiGLU's epilogue for row `row`'s gate columns f, f + 1 (g) and up columns F + f, F + f + 1 (u):
// act's columns f, f + 1 and, when kept, h's; zeros for padding.
__device__ __forceinline__ void store_swiglu(const Params& p, int64_t row, int f, float g0, float g1, float u0,
                                             float u1) {
  const __nv_bfloat162 g = __floats2bfloat162_rn(g0, g1), u = __floats2bfloat162_rn(u0, u1);
  // SwiGLU on the bfloat16 h, in float, rounded once: moe.swiglu's values on that h
  const __nv_bfloat162 a = __floats2bfloat162_rn(swiglu_one(__low2float(g), __low2float(u)),
                                                 swiglu_one(__high2float(g), __high2float(u)));
  *reinterpret_cast<__nv_bfloat162*>(p.act + row * p.F + f) = a;
  if (p.h != nullptr) {
    *reinterpret_cast<__nv_bfloat162*>(p.h + row * p.Y + f) = g;
    *reinterpret_cast<__nv_bfloat162*>(p.h + row * p.Y + p.F + f) = u;
  }
}

// h's columns c, c + 1 of row `row` (no epilogue).
__device__ __forceinline__ void store_h(const Params& p, int64_t row, int c, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(p.h + row * p.Y + c) = __floats2bfloat162_rn(v0, v1);
}

// The token-major epilogue's slot of routed row `row` and its routing weight (s < 0: not stored);
// a scatter entry outside [-1, slots) traps.
struct Slot {
  int64_t s;
  float w;
};
__device__ __forceinline__ Slot slot_of(const Params& p, int64_t row) {
  const int64_t s = p.scatter[row];
  MOE_SM90_TRAP_UNLESS(s >= -1 && s < p.slots);  // scatter (order_N) matches rows_TK
  if (s < 0 || p.weights == nullptr) return {s, 1.f};
  return {s, p.weights_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p.weights)[s])
                            : static_cast<const float*>(p.weights)[s]};
}

// Columns c, c + 1 of slot s's row of out_s: the weight times the sums, in float, rounded once.
__device__ __forceinline__ void store_slot(const Params& p, const Slot& slot, int c, float v0, float v1) {
  if (slot.s >= 0)
    *reinterpret_cast<__nv_bfloat162*>(p.out_s + slot.s * p.Y + c) =
        __floats2bfloat162_rn(slot.w * v0, slot.w * v1);
}

template <bool B_COL, int TN>
__device__ void consume(const Params& p, FwdSmem<TN>& sm, int total) {
  using L = Layouts<B_COL, TN>;
  if constexpr (TN == 256) cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();  // 128 accumulators a thread
  const int ctid = threadIdx.x - 128;
  typename L::Mma mma;
  auto thr = mma.get_thread_slice(ctid);
  Tensor sA = make_tensor(make_smem_ptr(&sm.a[0][0]), typename L::LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(&sm.b[0][0]), typename L::LayoutB{});
  Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));  // (MMA, MMA_M, MMA_K, stage) descriptors
  Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
  Tensor acc = partition_fragment_C(mma, Shape<Int<kTM>, Int<TN>>{});
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<kTM>, Int<TN>>{}));
  static_assert(decltype(size(acc))::value == TN / 2, "moe sm90: one thread's m64nTN accumulators");
  const bool swiglu = p.act != nullptr, scatter = p.scatter != nullptr;
  const int depth_blocks = (p.D + kTK - 1) / kTK;
  int stage = 0;
  uint32_t phase = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const OutputTile tl = tile_at(p, sm, t);
    if (tl.e < 0) {  // padding rows: zeros (with SwiGLU act's TN / 2 columns and h's gate and up)
      if (scatter) continue;  // (token-major: no slot holds them)
      for (int i = ctid; i < tl.rows * (TN / 4); i += kConsumers) {
        const int64_t row = tl.row0 + i / (TN / 4);
        const int c = 2 * (i % (TN / 4));
        if (swiglu) store_swiglu(p, row, tl.cb * (TN / 2) + c, 0.f, 0.f, 0.f, 0.f);
        else store_h(p, row, tl.cb * TN + c, 0.f, 0.f), store_h(p, row, tl.cb * TN + TN / 2 + c, 0.f, 0.f);
      }
      continue;
    }
    // token-major: a thread's accumulators hold two rows, coord(0)'s where (v / 2) % 2 == 0, else
    // coord(2)'s (checked on the CPU); their slots and weights are read once, before the mainloop
    // (the loads' latency hidden under it)
    Slot s0{-1, 0.f}, s1{-1, 0.f};
    if (scatter) {
      const int r0 = get<0>(coord(0)), r1 = get<0>(coord(2));
      if (r0 < tl.rows) s0 = slot_of(p, int64_t(tl.row0) + r0);
      if (r1 < tl.rows) s1 = slot_of(p, int64_t(tl.row0) + r1);
    }
    mma_stages(mma, tCrA, tCrB, acc, sm, depth_blocks, stage, phase);
    if (swiglu) {
#pragma unroll
      for (int v = 0; v < TN / 4; v += 2) {  // gate columns c, c + 1 at v, v + 1; up at v + TN / 4, + 1
        const int r = get<0>(coord(v));
        if (r < tl.rows)
          store_swiglu(p, int64_t(tl.row0) + r, tl.cb * (TN / 2) + get<1>(coord(v)), acc(v), acc(v + 1),
                       acc(v + TN / 4), acc(v + TN / 4 + 1));
      }
    } else if (scatter) {
#pragma unroll
      for (int v = 0; v < TN / 2; v += 2)  // columns c, c + 1 at v, v + 1
        store_slot(p, (v / 2) % 2 == 0 ? s0 : s1, tl.cb * TN + get<1>(coord(v)), acc(v), acc(v + 1));
    } else {
#pragma unroll
      for (int v = 0; v < TN / 2; v += 2) {  // columns c, c + 1 at v, v + 1
        const int r = get<0>(coord(v));
        if (r < tl.rows) store_h(p, int64_t(tl.row0) + r, tl.cb * TN + get<1>(coord(v)), acc(v), acc(v + 1));
      }
    }
  }
}

// One thread: the stages' full barriers (`arrivals` a phase) and empty ones (the consumer threads).
template <class S>
__device__ __forceinline__ void init_barriers(S& sm, int arrivals) {
  for (int s = 0; s < S::kStages; ++s) {
    cutlass::arch::ClusterTransactionBarrier::init(&sm.full[s], arrivals);
    cutlass::arch::ClusterBarrier::init(&sm.empty[s], kConsumers);
  }
  cutlass::arch::fence_barrier_init();
}

template <bool B_COL, int TN>
__global__ void __launch_bounds__(kThreads, 1) gathered_gemm_kernel(const __grid_constant__ Params p) {
  extern __shared__ char smem_raw[];
  auto& sm = *reinterpret_cast<FwdSmem<TN>*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) / 1024 * 1024);
  if (threadIdx.x == 0) {
    prefetch_tma_descriptor(&p.b_map);
    init_barriers(sm, 128 + 1);  // the producer's cp.async arrivals + the TMA's
  }
  if (threadIdx.x < 32) build_tiles(p, sm);
  __syncthreads();
  const int total = sm.blocks * p.col_blocks;
  if (threadIdx.x < 128) produce<B_COL, TN>(p, sm, total);
  else consume<B_COL, TN>(p, sm, total);
}

// ---- the weight gradient: d b[e] = x_rows(e)^T @ g_rows(e), x's rows gathered through order_N ----
// Output tiles of kTM x kWgradN of each expert's (M, N) = (D, Y) (out_yx: (Y, D), the transposed
// layout, computed as g^T x); the depth is the expert's rows, kTK a stage; both operands come by
// cp.async (rows past the expert's end and columns past D or Y are zeros, so the sums are exact),
// both contiguous along M or N (MN-major for wgmma). Tile t: (expert, M block, N block), N block
// fastest, so CTAs that run together read one expert's rows.

struct WgradParams {
  GatheredX rows;
  const bf16* g;
  int64_t ldg;
  const int* offs;
  __nv_bfloat16* out;  // (E, M, N) contiguous
  int E, N, D, Y, M, cols, m_blocks, n_blocks;
};

struct WgradTile {
  int e, lo, hi, mb, nb;
};

__device__ __forceinline__ WgradTile wgrad_tile(const WgradParams& p, int t) {
  WgradTile tl;
  tl.nb = t % p.n_blocks;
  tl.mb = (t / p.n_blocks) % p.m_blocks;
  tl.e = t / (p.n_blocks * p.m_blocks);
  checked_rows(p.offs, p.N, tl.e, tl.lo, tl.hi);
  return tl;
}

// x's rows (M side unless YX) and g's rows (the other side), kWgradChunks 16-byte chunks of a
// 128-column row a thread each stage: chunk `chunk` of rows first + kWgradRowsPerPass * i.
template <bool YX>
__device__ void produce_wgrad(const WgradParams& p, WgradSmem& sm, int total) {
  Tensor sA = make_tensor(make_smem_ptr(&sm.a[0][0]), WgradLayouts::LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(&sm.b[0][0]), WgradLayouts::LayoutB{});
  const int tid = threadIdx.x, chunk = tid % kWgradChunks, first = tid / kWgradChunks;
  int stage = 0;
  uint32_t phase = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const WgradTile tl = wgrad_tile(p, t);
    const int x_col = (YX ? tl.nb * kWgradN : tl.mb * kTM) + chunk * 8;
    const int g_col = (YX ? tl.mb * kTM : tl.nb * kWgradN) + chunk * 8;
    const int depth_blocks = (tl.hi - tl.lo + kTK - 1) / kTK;
    for (int kb = 0; kb < depth_blocks; ++kb) {
      wait_or_trap(&sm.empty[stage], phase ^ 1);
#pragma unroll
      for (int i = 0; i < kWgradRowsPerThread; ++i) {
        const int j = first + i * kWgradRowsPerPass, r = tl.lo + kb * kTK + j;
        const bf16* xs = r < tl.hi ? gathered_row(p.rows, r) : nullptr;
        if (x_col >= p.D) xs = nullptr;
        const bool g_in = r < tl.hi && g_col < p.Y;
        bf16* x_dst = YX ? &sB(chunk * 8, j, stage) : &sA(chunk * 8, j, stage);
        bf16* g_dst = YX ? &sA(chunk * 8, j, stage) : &sB(chunk * 8, j, stage);
        cp_async_16(x_dst, xs != nullptr ? xs + x_col : p.rows.x, xs != nullptr);
        cp_async_16(g_dst, g_in ? p.g + int64_t(r) * p.ldg + g_col : p.g, g_in);
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(&sm.full[stage]);
      if (++stage == WgradSmem::kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

__device__ __forceinline__ void store_wgrad(const WgradParams& p, int e, int m, int n, float v0, float v1) {
  if (m < p.M && n < p.cols)  // (cols is even, n too: n + 1 < cols)
    *reinterpret_cast<__nv_bfloat162*>(p.out + (int64_t(e) * p.M + m) * p.cols + n) = __floats2bfloat162_rn(v0, v1);
}

__device__ void consume_wgrad(const WgradParams& p, WgradSmem& sm, int total) {
  const int ctid = threadIdx.x - 128;
  WgradLayouts::Mma mma;
  auto thr = mma.get_thread_slice(ctid);
  Tensor sA = make_tensor(make_smem_ptr(&sm.a[0][0]), WgradLayouts::LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(&sm.b[0][0]), WgradLayouts::LayoutB{});
  Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));
  Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
  Tensor acc = partition_fragment_C(mma, Shape<Int<kTM>, Int<kWgradN>>{});
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<kTM>, Int<kWgradN>>{}));
  int stage = 0;
  uint32_t phase = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const WgradTile tl = wgrad_tile(p, t);
    const int depth_blocks = (tl.hi - tl.lo + kTK - 1) / kTK;
    if (depth_blocks > 0) mma_stages(mma, tCrA, tCrB, acc, sm, depth_blocks, stage, phase);
    else clear(acc);  // an expert with no rows: zeros
#pragma unroll
    for (int v = 0; v < 32; v += 2) {  // columns c, c + 1 at v, v + 1; c + 64, c + 65 at v + 32, v + 33
      const int m = tl.mb * kTM + get<0>(coord(v)), n = tl.nb * kWgradN + get<1>(coord(v));
      store_wgrad(p, tl.e, m, n, acc(v), acc(v + 1));
      store_wgrad(p, tl.e, m, n + kWgradN / 2, acc(v + 32), acc(v + 33));
    }
  }
}

template <bool YX>
__global__ void __launch_bounds__(kThreads, 1) gathered_wgrad_kernel(const __grid_constant__ WgradParams p) {
  extern __shared__ char smem_raw[];
  auto& sm = *reinterpret_cast<WgradSmem*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) / 1024 * 1024);
  if (threadIdx.x == 0) init_barriers(sm, 128);  // the producer's cp.async arrivals
  __syncthreads();
  const int total = p.E * p.m_blocks * p.n_blocks;
  if (threadIdx.x < 128) produce_wgrad<YX>(p, sm, total);
  else consume_wgrad(p, sm, total);
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Launches a persistent kernel: min(tiles, SMs) CTAs of kThreads with `smem` bytes of shared memory.
template <class P>
const char* launch(void (*kernel)(P), const P& p, size_t smem, int64_t tiles, int sm_count, cudaStream_t stream) {
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(tiles, sm_count > 0 ? sm_count : 1)));
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess)
    return "moe (sm90 gathered GEMM): the gathered kernel's shared memory was refused";
  kernel<<<grid, kThreads, smem, stream>>>(p);
  if (cudaGetLastError() != cudaSuccess) return "moe (sm90 gathered GEMM): the gathered kernel's launch failed";
  return nullptr;
}

// The tile width for `p`: 256 columns where they divide the output (Y by 256: with SwiGLU F by 128)
// and the routed rows fill the GPU with them (at least a tile per SM: the wide tile halves the
// tiles), else 128.
int tile_width(const GatheredGemm& p) {
  const int64_t wide_tiles = int64_t(p.N) / kTM * (p.Y / 256);
  return p.Y % 256 == 0 && wide_tiles >= std::max(p.sm_count, 1) ? 256 : 128;
}

// The layout rules of x_TD's gathered rows (GatheredX), or nullptr.
const char* gathered_x_unsupported(const GatheredX& g) {
  if (g.ldx % 8 != 0 || !aligned16(g.x)) return "x's rows are not 16-byte vectors";
  if (g.K < 1 || g.slots < 0) return "bad slots";
  return nullptr;
}

}  // namespace

const char* gathered_gemm_unsupported(const GatheredGemm& p) {
  if (p.E < 1 || p.E > kGatheredMaxExperts) return "E outside [1, kGatheredMaxExperts]";
  if (p.N < 1 || p.D < 1 || p.Y < 1) return "an empty dimension";
  if (p.Y % 128 != 0) return "Y is not a multiple of 128 (with SwiGLU: F of 64)";
  if (p.scatter != nullptr && p.swiglu) return "the token-major epilogue takes no SwiGLU";
  if (p.scatter != nullptr && p.slots < 0) return "bad slots";
  if (const char* why = gathered_x_unsupported(p.rows)) return why;
  if (p.D % 8 != 0 || p.ldb % 8 != 0 || p.b_batch % 8 != 0) return "a stride is not 16-byte";
  if (p.ldb <= 0 || p.b_batch <= 0) return "b's strides are not positive";
  if ((int64_t(p.N) / kTM + p.E + 1) * (p.Y / 128) > std::numeric_limits<int>::max() / 2) return "too many tiles";
  if (!aligned16(p.b)) return "b is not 16-byte aligned";
  return nullptr;
}

const char* gathered_gemm(const GatheredGemm& g, cudaStream_t stream) {
  if (const char* why = gathered_gemm_unsupported(g)) return why;
  if (g.swiglu ? g.act == nullptr : g.scatter != nullptr ? g.out_s == nullptr : g.h == nullptr)
    return "moe (sm90 gathered GEMM): no output";
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return "moe (sm90 gathered GEMM): cuTensorMapEncodeTiled is unavailable";
  const int TN = tile_width(g);
  Params p{};
  p.rows = g.rows;
  p.offs = g.offs;
  p.act = g.swiglu ? static_cast<__nv_bfloat16*>(g.act) : nullptr;
  p.h = g.scatter != nullptr ? nullptr : static_cast<__nv_bfloat16*>(g.h);
  p.scatter = g.scatter;
  p.weights = g.scatter != nullptr ? g.weights : nullptr;
  p.weights_bf16 = g.weights_bf16;
  p.out_s = g.scatter != nullptr ? static_cast<__nv_bfloat16*>(g.out_s) : nullptr;
  p.slots = g.slots;
  p.E = g.E;
  p.N = g.N;
  p.D = g.D;
  p.Y = g.Y;
  p.F = g.swiglu ? g.Y / 2 : 0;
  p.col_blocks = g.swiglu ? p.F / (TN / 2) : g.Y / TN;
  p.box_blocks = g.swiglu ? TN / 128 : TN / kBlock;
  // b's tensor map: (column in a 64-column block, depth, block, half, expert); with SwiGLU the
  // blocks are the gate's F / 64 and the half the up columns F further, else the Y / 64 blocks and
  // one half. A box of 64 columns x kTK depth x box_blocks blocks x both halves (SwiGLU) fills a
  // stage's TN x kTK; tile cb's at block cb * box_blocks. No element of the map aliases another.
  // b_col: b[e, x, y] at e * b_batch + y * ldb + x, dims (depth, column, block, half, expert);
  // else at e * b_batch + x * ldb + y, dims (column, depth, block, half, expert).
  const cuuint64_t es = sizeof(bf16), D = cuuint64_t(g.D), E = cuuint64_t(g.E);
  const cuuint64_t blocks = cuuint64_t(g.swiglu ? p.F / kBlock : g.Y / kBlock), halves = g.swiglu ? 2 : 1;
  const cuuint64_t half = cuuint64_t(g.swiglu ? p.F : g.Y);  // (one half without SwiGLU: any valid stride)
  const cuuint64_t ldb = cuuint64_t(g.ldb) * es, batch = cuuint64_t(g.b_batch) * es;
  const cuuint32_t nb = cuuint32_t(p.box_blocks), nh = cuuint32_t(halves);
  const cuuint64_t dims_col[5] = {D, kBlock, blocks, halves, E};
  const cuuint64_t strides_col[4] = {ldb, kBlock * ldb, half * ldb, batch};
  const cuuint64_t dims_row[5] = {kBlock, D, blocks, halves, E};
  const cuuint64_t strides_row[4] = {ldb, kBlock * es, half * es, batch};
  const cuuint32_t box_col[5] = {kTK, kBlock, nb, nh, 1}, box_row[5] = {kBlock, kTK, nb, nh, 1};
  const cuuint32_t unit[5] = {1, 1, 1, 1, 1};
  if (encode(&p.b_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 5, const_cast<void*>(g.b), g.b_col ? dims_col : dims_row,
             g.b_col ? strides_col : strides_row, g.b_col ? box_col : box_row, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return "moe (sm90 gathered GEMM): cuTensorMapEncodeTiled rejected b's layout";
  // A bound on the tiles from host-known sizes: sum over experts of ceil(rows_e / kTM), plus the
  // padding's blocks, is at most N / kTM + E + 1 row blocks.
  const int64_t bound = (int64_t(g.N) / kTM + g.E + 1) * p.col_blocks;
  if (TN == 256)
    return launch(g.b_col ? gathered_gemm_kernel<true, 256> : gathered_gemm_kernel<false, 256>, p,
                  smem_bytes<FwdSmem<256>>(), bound, g.sm_count, stream);
  return launch(g.b_col ? gathered_gemm_kernel<true, 128> : gathered_gemm_kernel<false, 128>, p,
                smem_bytes<FwdSmem<128>>(), bound, g.sm_count, stream);
}

const char* gathered_wgrad_unsupported(const GatheredWgrad& p) {
  if (p.E < 1 || p.N < 1 || p.D < 1 || p.Y < 1) return "an empty dimension";
  if (const char* why = gathered_x_unsupported(p.rows)) return why;
  if (p.D % 8 != 0 || p.Y % 8 != 0 || p.ldg % 8 != 0 || !aligned16(p.g)) return "g's rows are not 16-byte vectors";
  if (int64_t(p.E) * ((int64_t(p.D) + kTM - 1) / kTM) * ((int64_t(p.Y) + kWgradN - 1) / kWgradN) >
      std::numeric_limits<int>::max() / 2)  // (t + gridDim.x stays an int)
    return "too many tiles";
  return nullptr;
}

const char* gathered_wgrad(const GatheredWgrad& g, cudaStream_t stream) {
  if (const char* why = gathered_wgrad_unsupported(g)) return why;
  if (g.out == nullptr) return "moe.gather_grouped_mm_wgrad (sm90): no output";
  WgradParams p{};
  p.rows = g.rows;
  p.g = static_cast<const bf16*>(g.g);
  p.ldg = g.ldg;
  p.offs = g.offs;
  p.out = static_cast<__nv_bfloat16*>(g.out);
  p.E = g.E;
  p.N = g.N;
  p.D = g.D;
  p.Y = g.Y;
  p.M = g.out_yx ? g.Y : g.D;
  p.cols = g.out_yx ? g.D : g.Y;
  p.m_blocks = (p.M + kTM - 1) / kTM;
  p.n_blocks = (p.cols + kWgradN - 1) / kWgradN;
  const int64_t total = int64_t(g.E) * p.m_blocks * p.n_blocks;
  return launch(g.out_yx ? gathered_wgrad_kernel<true> : gathered_wgrad_kernel<false>, p, smem_bytes<WgradSmem>(), total,
                g.sm_count, stream);
}

}  // namespace moe::cuda::sm90
