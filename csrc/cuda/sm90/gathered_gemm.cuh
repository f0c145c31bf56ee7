// The tile constants, shared-memory layouts and tile map of moekit's gathered sm90 GEMM
// (gathered_gemm.cu), apart so that a host program checks them (tests/ops/test_sm90_gathered_gemm.py
// compiles tests/cpp/sm90_gathered_gemm.cu with nvcc and runs it on the CPU): the layouts wgmma reads
// must be the orders in which cp.async and the TMA box write, under the 128-byte swizzle.
//
// Under the 128-byte swizzle (the TMA's CU_TENSOR_MAP_SWIZZLE_128B, CuTe's SW128 atoms), the
// 16-byte chunk c of the 128-byte row r of a 1024-byte-aligned buffer sits at chunk c ^ (r % 8).
// The TMA box of b fills a stage's TN x kTK in dim order: [half][block][depth][column] for row-major
// b (dims (column in a 64-column block, depth, block, half, expert)), [half][block][column][depth]
// for b_col (dims (depth, column, block, half, expert)); so B's tile is its column blocks in order,
// with SwiGLU the gate's TN / 2 columns, then the up columns (the half, F columns further).
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
constexpr int kBlock = 64;                  // columns of one TMA block of b (128 bytes: the swizzle's row)
constexpr int kTK = 64;                     // depth per stage: one 128-byte swizzle row of bf16
constexpr int kThreads = 384;
constexpr int kConsumers = 256;
constexpr int kChunks = kTK / 8;            // 16-byte chunks per row and stage
constexpr int kRowsPerPass = 128 / kChunks; // rows the producer's 128 threads cover at once
constexpr int kRowsPerThread = kTM / kRowsPerPass;

// The forward's tile of TN b columns (128 or 256): with SwiGLU TN / 2 gate columns, then their TN / 2
// up columns (act's TN / 2 columns), else TN consecutive columns; stages as shared memory allows.
template <int TN>
struct TileWidth {
  static_assert(TN == 128 || TN == 256, "moe sm90: a gathered tile is 128 or 256 columns wide");
  static constexpr int kN = TN;
  static constexpr int kStages = TN == 256 ? 4 : 5;
  static constexpr uint32_t kBBytes = TN * kTK * 2;
};

template <bool B_COL, int TN>
struct Layouts {
  // A (rows x depth) and B (columns x depth) per stage, as wgmma reads them; the MMA: two warp
  // groups of 64 rows, m64nTNk16, so one thread's accumulator v holds column c of a row and, with
  // v + TN / 4 (v < TN / 4), column c + TN / 2 of that row (c < TN / 2; v even: v + 1 is c + 1).
  static constexpr int kStages = TileWidth<TN>::kStages;
  using LayoutA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{},
                                         Shape<Int<kTM>, Int<kTK>, Int<kStages>>{}));
  using LayoutB = std::conditional_t<
      B_COL,
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<Int<TN>, Int<kTK>, Int<kStages>>{})),
      decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{}, Shape<Int<TN>, Int<kTK>, Int<kStages>>{},
                             Step<_2, _1, _3>{}))>;
  using Atom = std::conditional_t<
      TN == 256, SM90_64x256x16_F32BF16BF16_SS<GMMA::Major::K, B_COL ? GMMA::Major::K : GMMA::Major::MN>,
      SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::K, B_COL ? GMMA::Major::K : GMMA::Major::MN>>;
  using Mma = decltype(make_tiled_mma(Atom{}, Layout<Shape<_2, _1, _1>>{}));
  static_assert(cosize_v<LayoutA> == kStages * kTM * kTK && cosize_v<LayoutB> == kStages * TN * kTK);
};

// The weight gradient's operands (gathered_wgrad): both contiguous along the output's M or N (x's
// rows along D, g's along Y), 128 x kTK per stage, written by cp.async through these layouts; its
// output tile is kTM x kWgradN.
constexpr int kWgradN = 128;
constexpr int kWgradChunks = kTM / 8;                     // 16-byte chunks of a 128-column row
constexpr int kWgradRowsPerPass = 128 / kWgradChunks;     // rows the producer's threads cover at once
constexpr int kWgradRowsPerThread = kTK / kWgradRowsPerPass;
struct WgradLayouts {
  static constexpr int kStages = TileWidth<kWgradN>::kStages;
  using LayoutA = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{},
                                         Shape<Int<kTM>, Int<kTK>, Int<kStages>>{}));
  using LayoutB = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{},
                                         Shape<Int<kWgradN>, Int<kTK>, Int<kStages>>{}));
  using Mma = decltype(make_tiled_mma(SM90_64x128x16_F32BF16BF16_SS<GMMA::Major::MN, GMMA::Major::MN>{},
                                      Layout<Shape<_2, _1, _1>>{}));
  static_assert(cosize_v<LayoutA> == kStages * kTM * kTK && cosize_v<LayoutB> == kStages * kWgradN * kTK);
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
