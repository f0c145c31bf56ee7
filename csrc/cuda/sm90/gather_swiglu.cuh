// The tile constants and shared-memory layouts of moekit's fused sm90 kernel (gather_swiglu.cu),
// apart so that a host program checks them (tests/ops/test_sm90_layouts.py compiles
// tests/ops/sm90_layouts.cu with nvcc and runs it on the CPU): the layouts wgmma reads must be the
// orders in which cp.async and the TMA box write, under the 128-byte swizzle.
//
// Under the 128-byte swizzle (the TMA's CU_TENSOR_MAP_SWIZZLE_128B, CuTe's SW128 atoms), the
// 16-byte chunk c of the 128-byte row r of a 1024-byte-aligned buffer sits at chunk c ^ (r % 8).
// The TMA box of b fills its 16 KiB in dim order: [half][depth][column] for row-major b (dims
// (column, depth, half, expert)), [half][column][depth] for b_col (dims (depth, column, half,
// expert)); so B's tile is its 64 gate columns, then its 64 up columns.
#pragma once

#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>

#include <type_traits>

namespace moe::cuda::sm90::fused_swiglu {

using namespace cute;
using bf16 = cutlass::bfloat16_t;

constexpr int kTM = 128;                    // routed rows per tile: two consumer warp groups of 64
constexpr int kTF = 64;                     // act columns per tile (kGatherSwigluCols)
constexpr int kTN = 2 * kTF;                // b columns per tile: kTF gate, then kTF up
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
  // groups of 64 rows, m64n128k16, so one thread's accumulator v holds gate column c of a row
  // and v + 32 the up column c + 64 of that row (v even: v + 1 is column c + 1).
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

}  // namespace moe::cuda::sm90::fused_swiglu
