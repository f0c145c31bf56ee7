// The CUTLASS 3 kernel template behind grouped_gemm_sm90.h, included by one translation unit per
// configuration (gemm_sm90_*.cu), each compiled for sm_90a only with NDEBUG (without it ptxas
// serialises the wgmma pipeline, warning C7510).
//
// One GEMM per expert in one persistent launch: KernelPtrArrayTmaWarpSpecialized{Cooperative,
// Pingpong} reads each group's pointers, strides and CUTLASS (M, N, K) shape ((rows, Y, X) in the
// forward, (X, Y, rows) in the weight gradient: grouped_gemm_sm90.h) from device arrays, so the
// routed counts never reach the host. The setup kernel (table.cu, one launch for one or two
// GEMMs) first checks offs_E, fills those arrays and writes the contract's zeros (and gathers the
// rows of a gathered GEMM's operand).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <algorithm>
#include <type_traits>

#include "grouped_gemm_sm90.h"

namespace moe::cuda::sm90 {

// CUTLASS's CTA tile shape (M, N, K), cluster size along M, and ping-pong or cooperative schedule.
template <int TM, int TN, int TK, int CM, bool PINGPONG>
struct TileConfig {
  static constexpr int kM = TM, kN = TN, kK = TK, kClusterM = CM;
  static constexpr bool kPingpong = PINGPONG;
};

// The CUTLASS kernel for one tile configuration and operand layout. A_COL: A is contiguous along
// CUTLASS's M (the weight gradient's a^T, along X); B_COL: B is contiguous along CUTLASS's K
// (CUTLASS's ColumnMajor B: the forward's b along X, a transposed nn.Linear weight).
template <class Cfg, bool A_COL, bool B_COL>
struct Sm90GroupedGemm {
  using Element = cutlass::bfloat16_t;
  using Accum = float;
  using LayoutA = std::conditional_t<A_COL, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutB = std::conditional_t<B_COL, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutC = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16 / sizeof(Element);  // 16-byte TMA alignment
  using TileShape = cute::Shape<cute::Int<Cfg::kM>, cute::Int<Cfg::kN>, cute::Int<Cfg::kK>>;
  using ClusterShape = cute::Shape<cute::Int<Cfg::kClusterM>, cute::_1, cute::_1>;
  using KernelSchedule = std::conditional_t<Cfg::kPingpong,
                                            cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                                            cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = std::conditional_t<Cfg::kPingpong,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // CUTLASS's (M, N, K)

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accum, Accum, Element, LayoutC*, kAlign,
      Element, LayoutC*, kAlign, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, Accum>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element,
      LayoutB*, kAlign, Accum, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideD;
  using Shape = typename ProblemShape::UnderlyingProblemShape;

  // The setup kernel writes the group arrays (grouped_gemm_sm90.h's GroupArrays) without knowing
  // the configuration: each stride is one int64 (the leading dimension; its static unit modes
  // take no bytes) and each problem shape three ints.
  template <class S>
  static constexpr bool one_int64() {  // 8 bytes holding an int64 mode: that mode is all it holds
    using M0 = std::remove_cv_t<std::remove_reference_t<decltype(cute::get<0>(S{}))>>;
    using M1 = std::remove_cv_t<std::remove_reference_t<decltype(cute::get<1>(S{}))>>;
    return sizeof(S) == sizeof(int64_t) && std::is_trivially_copyable_v<S> &&
           (std::is_same_v<M0, int64_t> || std::is_same_v<M1, int64_t>);
  }
  static_assert(one_int64<StrideA>() && one_int64<StrideB>() && one_int64<StrideC>(),
                "moe sm90: a CUTLASS stride is not one int64");
  static_assert(std::is_same_v<Shape, cute::Shape<int, int, int>> && sizeof(Shape) == 3 * sizeof(int),
                "moe sm90: problem shapes are (int, int, int)");
  static_assert(sizeof(Element) == 2, "moe sm90: the setup kernel writes 2-byte elements' pointers");

  static typename Gemm::Arguments arguments(const GroupedGemm& g, char* ws) {
    const GroupArrays l = group_arrays(g.E);
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {g.E, reinterpret_cast<Shape*>(ws + l.shapes), nullptr},
        {reinterpret_cast<const Element**>(ws + l.ptr_a), reinterpret_cast<StrideA*>(ws + l.stride_a),
         reinterpret_cast<const Element**>(ws + l.ptr_b), reinterpret_cast<StrideB*>(ws + l.stride_b)},
        {{},
         reinterpret_cast<const Element**>(ws + l.ptr_c), reinterpret_cast<StrideC*>(ws + l.stride_c),
         reinterpret_cast<Element**>(ws + l.ptr_c), reinterpret_cast<StrideC*>(ws + l.stride_c)}};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;  // C is never read
    args.epilogue.thread.dAlpha = {cute::_0{}, cute::_0{}, 0};
    args.epilogue.thread.dBeta = {cute::_0{}, cute::_0{}, 0};
    args.hw_info.device_id = g.device;
    args.hw_info.sm_count = g.sm_count;
    return args;
  }

  static size_t workspace_bytes(const GroupedGemm& g) {
    auto args = arguments(g, nullptr);
    return group_arrays(g.E).cutlass + Gemm::get_workspace_size(args);
  }

  // Enqueues the CUTLASS kernel; the setup launch has written the group arrays before it.
  static const char* gemm(const GroupedGemm& g, void* workspace, cudaStream_t stream);
};

template <class Cfg, bool A_COL, bool B_COL>
const char* Sm90GroupedGemm<Cfg, A_COL, B_COL>::gemm(const GroupedGemm& g, void* workspace,
                                                     cudaStream_t stream) {
  char* ws = static_cast<char*>(workspace);
  auto args = arguments(g, ws);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess)
    return "moe.grouped_mm (sm90): CUTLASS cannot implement this problem (alignment?)";
  if (gemm.initialize(args, ws + group_arrays(g.E).cutlass, stream) != cutlass::Status::kSuccess)
    return "moe.grouped_mm (sm90): CUTLASS initialisation failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "moe.grouped_mm (sm90): the CUTLASS kernel failed to launch";
  if (cudaGetLastError() != cudaSuccess) return "moe.grouped_mm (sm90): the CUTLASS kernel launch reported an error";
  return nullptr;
}

}  // namespace moe::cuda::sm90

// Defines forward config ID with tile CFG for both layouts of b (contiguous along Y or along X).
#define MOE_SM90_FORWARD(ID, CFG)                                                              \
  namespace moe::cuda::sm90 {                                                                  \
  template <>                                                                                  \
  size_t forward_workspace<ID>(const GroupedGemm& g) {                                         \
    return g.b_col ? Sm90GroupedGemm<CFG, false, true>::workspace_bytes(g)                     \
                   : Sm90GroupedGemm<CFG, false, false>::workspace_bytes(g);                   \
  }                                                                                            \
  template <>                                                                                  \
  const char* forward_gemm<ID>(const GroupedGemm& g, void* ws, cudaStream_t stream) {          \
    return g.b_col ? Sm90GroupedGemm<CFG, false, true>::gemm(g, ws, stream)                    \
                   : Sm90GroupedGemm<CFG, false, false>::gemm(g, ws, stream);                  \
  }                                                                                            \
  }

// Defines weight-gradient config ID with tile CFG (A = a^T, contiguous along X; B = g, along Y).
#define MOE_SM90_WGRAD(ID, CFG)                                                                \
  namespace moe::cuda::sm90 {                                                                  \
  template <>                                                                                  \
  size_t wgrad_workspace<ID>(const GroupedGemm& g) {                                           \
    return Sm90GroupedGemm<CFG, true, false>::workspace_bytes(g);                              \
  }                                                                                            \
  template <>                                                                                  \
  const char* wgrad_gemm<ID>(const GroupedGemm& g, void* ws, cudaStream_t stream) {            \
    return Sm90GroupedGemm<CFG, true, false>::gemm(g, ws, stream);                             \
  }                                                                                            \
  }
