// The tile constants, shared-memory layouts and tile map of moekit's gathered sm90 GEMM
// (gathered_gemm.cu), apart so that a host program checks them (tests/ops/test_sm90_gathered_gemm.py
// compiles tests/cpp/sm90_gathered_gemm.cu with nvcc and runs it on the CPU): the layouts wgmma reads
// must be the orders in which cp.async and the TMA box write, under the 128-byte swizzle.
//
// Under the 128-byte swizzle (the TMA's CU_TENSOR_MAP_SWIZZLE_128B, CuTe's SW128 atoms), the
// 16-byte chunk c of the 128-byte row r of a 1024-byte-aligned buffer sits at chunk c ^ (r % 8).
// The TMA box of b fills its 16 KiB in dim order: [block][depth][column] for row-major b (dims
// (column, depth, block, expert)), [block][column][depth] for b_col (dims (depth, column, block,
// expert)); so B's tile is its first 64 columns (with SwiGLU the gate's), then the 64 of its second
// half (the up columns F further; without SwiGLU the next 64).
#pragma once

#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>

#include <type_traits>

namespace moe::cuda::sm90::gathered {

using namespace cute;
using bf16 = cutlass::bfloat16_t;

constexpr int kTM = 128;                    // routed rows per tile: two consumer warp groups of 64
constexpr int kTF = 64;                     // columns per half of a tile (act columns with SwiGLU)
constexpr int kTN = 2 * kTF;                // b columns per tile: two halves
constexpr int kTK = 64;                     // depth per stage: one 128-byte swizzle row of bf16
constexpr int kStages = 5;
constexpr int kThreads = 384;
constexpr int kConsumers = 256;
constexpr int kChunks = kTK / 8;            // 16-byte chunks per row and stage
constexpr int kRowsPerPass = 128 / kChunks; // rows the producer's 128 threads cover at once
constexpr int kRowsPerThread = kTM / kRowsPerPass;
constexpr uint32_t kBBytes = kTN * kTK * sizeof(bf16);

template <bool B_COL>
struct Layouts {
  // A (rows x depth) and B (columns x depth) per stage, as wgmma reads them; the MMA: two warp
  // groups of 64 rows, m64n128k16, so one thread's accumulator v holds column c of a row in the
  // first half and v + 32 the column c of that row in the second (v even: v + 1 is column c + 1).
  using LayoutA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{},
                                         Shape<Int<kTM>, Int<kTK>, Int<kStages>>{}));
  using LayoutB = std::conditional_t<
      B_COL,
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<kTN>, Int<kTK>, Int<kStages>>{})),
      decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{}, Shape<Int<kTN>, Int<kTK>, Int<kStages>>{},
                             Step<_2, _1, _3>{}))>;
  using Mma = decltype(make_tiled_mma(
      SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, B_COL ? GMMA::Major::K : GMMA::Major::MN>{},
      Layout<Shape<_2, _1, _1>>{}));
  static_assert(cosize_v<LayoutA> == kStages * kTM * kTK && cosize_v<LayoutB> == kStages * kTN * kTK);
};

// The weight gradient's operands (gathered_wgrad): both contiguous along the output's M or N (x's
// rows along D, g's along Y), 128 x kTK per stage, written by cp.async through these layouts.
constexpr int kWgradChunks = kTM / 8;                     // 16-byte chunks of a 128-column row
constexpr int kWgradRowsPerPass = 128 / kWgradChunks;     // rows the producer's threads cover at once
constexpr int kWgradRowsPerThread = kTK / kWgradRowsPerPass;
struct WgradLayouts {
  using LayoutA = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{},
                                         Shape<Int<kTM>, Int<kTK>, Int<kStages>>{}));
  using LayoutB = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{},
                                         Shape<Int<kTN>, Int<kTK>, Int<kStages>>{}));
  using Mma = decltype(make_tiled_mma(SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::MN, GMMA::Major::MN>{},
                                      Layout<Shape<_2, _1, _1>>{}));
  static_assert(cosize_v<LayoutA> == kStages * kTM * kTK && cosize_v<LayoutB> == kStages * kTN * kTK);
};

// ---- the output tiles: expert e's rows in kTM-row blocks, experts in order, then the padding rows
// [end, N) (end = offs_E[E-1]) in kTM-row blocks; tile t is (row block t / col_blocks, column block
// t % col_blocks). tiles[e] (e = 0..E) counts the row blocks of the experts before e.

__host__ __device__ constexpr int row_blocks(int rows) { return (rows + kTM - 1) / kTM; }

// Expert e's rows [lo, hi) from offs_E (int32 cumulative ends), clamped into [0, N].
__host__ __device__ inline void expert_rows(const int* offs, int N, int e, int& lo, int& hi) {
  lo = e > 0 ? offs[e - 1] : 0;
  hi = offs[e];
  lo = lo < 0 ? 0 : lo > N ? N : lo;
  hi = hi < lo ? lo : hi > N ? N : hi;
}

struct OutputTile {
  int e;     // expert, or -1: padding rows
  int row0;  // first routed row
  int rows;  // rows in the tile (1..kTM)
  int cb;    // column block
};

__host__ __device__ inline OutputTile tile_of(const int* tiles, const int* offs, int E, int N, int end, int col_blocks,
                                        int t) {
  const int m = t / col_blocks;
  OutputTile tl;
  tl.cb = t % col_blocks;
  if (m >= tiles[E]) {
    tl.e = -1;
    tl.row0 = end + (m - tiles[E]) * kTM;
    tl.rows = N - tl.row0 < kTM ? N - tl.row0 : kTM;
    return tl;
  }
  int lo = 0, hi = E - 1;  // the last expert e with tiles[e] <= m (its blocks hold m)
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tiles[mid] <= m) lo = mid;
    else hi = mid - 1;
  }
  int r0, r1;
  expert_rows(offs, N, lo, r0, r1);
  tl.e = lo;
  tl.row0 = r0 + (m - tiles[lo]) * kTM;
  tl.rows = r1 - tl.row0 < kTM ? r1 - tl.row0 : kTM;
  return tl;
}

}  // namespace moe::cuda::sm90::gathered
