// The CUTLASS 3 kernel template behind grouped_gemm_sm90.h, included by one translation unit per
// configuration (gemm_sm90_*.cu), each compiled for sm_90a only with NDEBUG (without it ptxas
// serialises the wgmma pipeline, warning C7510).
//
// One GEMM per expert in one persistent launch: KernelPtrArrayTmaWarpSpecialized{Cooperative,
// Pingpong} reads each group's pointers, strides and CUTLASS (M, N, K) shape ((rows, Y, X) in the
// forward, (X, Y, rows) in the weight gradient: grouped_gemm_sm90.h) from device arrays, so the
// routed counts never reach the host. One setup kernel first checks offs_E, fills those arrays
// and writes the contract's zeros: two launches per GEMM.
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

  // The per-group arrays at the front of the workspace, then CUTLASS's own workspace.
  struct Layout {
    size_t ptr_a, ptr_b, ptr_c, stride_a, stride_b, stride_c, shapes, cutlass, total;
  };

  __host__ __device__ static constexpr size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

  __host__ __device__ static Layout layout(int E, size_t cutlass_bytes) {
    Layout l{};
    size_t at = 0;
    auto take = [&](size_t bytes) { size_t here = at; at = round_up(at + bytes, 16); return here; };
    l.ptr_a = take(sizeof(void*) * E);
    l.ptr_b = take(sizeof(void*) * E);
    l.ptr_c = take(sizeof(void*) * E);
    l.stride_a = take(sizeof(StrideA) * E);
    l.stride_b = take(sizeof(StrideB) * E);
    l.stride_c = take(sizeof(StrideC) * E);
    l.shapes = take(sizeof(Shape) * E);
    at = round_up(at, 256);
    l.cutlass = at;
    l.total = at + cutlass_bytes;
    return l;
  }

  // A stride type with one dynamic (int64) mode and a static unit mode: sets the dynamic one.
  template <class S>
  __host__ __device__ static S leading(int64_t ld) {
    S s{};
    if constexpr (cute::is_static<std::remove_cv_t<std::remove_reference_t<decltype(cute::get<0>(s))>>>::value) {
      cute::get<1>(s) = ld;
    } else {
      cute::get<0>(s) = ld;
    }
    return s;
  }

  static typename Gemm::Arguments arguments(const GroupedGemm& g, char* ws) {
    const Layout l = layout(g.E, 0);
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
    return layout(g.E, Gemm::get_workspace_size(args)).total;
  }

  static const char* run(const GroupedGemm& g, void* workspace, cudaStream_t stream);
};

// A device-side assert that NDEBUG (defined in these units for the wgmma pipeline) leaves in:
// CUDA declares __assert_fail for device code whatever NDEBUG says; the failure is reported as
// PyTorch's CUDA_KERNEL_ASSERT reports it (a device-side assert).
#define MOE_SM90_ASSERT(cond, msg) \
  do {                             \
    if (!(cond)) __assert_fail(msg, __FILE__, __LINE__, __func__); \
  } while (0)

constexpr int kPrepareThreads = 256;

// Everything of one GEMM call around the CUTLASS kernel, in one launch (grouped_gemm_sm90.h's
// contract): threads e < E of blocks (x, 0) assert offs_E (non-decreasing, within [0, N]) and
// write expert e's pointers, strides and CUTLASS (M, N, K) (bad offsets are clamped, so memory
// stays safe if the assert is compiled out); the grid's blocks also write the contract's zeros:
// in the forward the padding rows [offs_E[E-1], N) of c (blocks (x, 0), grid-stride), in the
// weight gradient expert y's (X, Y) block when it has no rows (blocks (x, y)). Zeros and GEMM
// outputs are disjoint (an empty expert's group has M = 0: no tiles), so their order does not
// matter. Y (and X * Y) are multiples of 8 here (the TMA layout rules): zeros go in 16-byte words.
template <class G>
__global__ void __launch_bounds__(kPrepareThreads) prepare_groups_kernel(GroupedGemm g, char* ws) {
  using E_ = typename G::Element;
  const int e = blockIdx.x * kPrepareThreads + threadIdx.x;
  if (blockIdx.y == 0 && e < g.E) {
    const auto l = G::layout(g.E, 0);
    int lo = e > 0 ? g.offs[e - 1] : 0, hi = g.offs[e];
    MOE_SM90_ASSERT(lo >= 0 && lo <= hi && hi <= g.N,
                    "moe.grouped_mm: offs_E must be non-decreasing and within [0, N]");
    lo = min(max(lo, 0), g.N);
    hi = min(max(hi, lo), g.N);
    auto ptr_a = reinterpret_cast<const E_**>(ws + l.ptr_a);
    auto ptr_b = reinterpret_cast<const E_**>(ws + l.ptr_b);
    auto ptr_c = reinterpret_cast<E_**>(ws + l.ptr_c);
    auto shapes = reinterpret_cast<typename G::Shape*>(ws + l.shapes);
    const E_* a = static_cast<const E_*>(g.a);
    const E_* b = static_cast<const E_*>(g.b);
    E_* c = static_cast<E_*>(g.c);
    const int rows = hi - lo;
    if (!g.wgrad) {  // (rows, Y, X): A = a rows (row-major), B = b[e], C = c rows
      ptr_a[e] = a + int64_t(lo) * g.lda;
      ptr_b[e] = b + int64_t(e) * g.b_batch;
      ptr_c[e] = c + int64_t(lo) * g.Y;
      shapes[e] = typename G::Shape{rows, g.Y, g.X};
    } else {  // (X, Y, rows): A = a rows transposed (contiguous along X), B = g rows, C = c[e]
      ptr_a[e] = a + int64_t(lo) * g.lda;
      ptr_b[e] = b + int64_t(lo) * g.ldb;
      ptr_c[e] = c + int64_t(e) * g.X * g.Y;
      // An expert with no rows gets no tiles (M = 0): with K = 0 CUTLASS would still store its
      // X x Y tiles, from accumulators no wgmma ever cleared, over the zeros written below.
      shapes[e] = typename G::Shape{rows > 0 ? g.X : 0, g.Y, rows};
    }
    reinterpret_cast<typename G::StrideB*>(ws + l.stride_b)[e] = G::template leading<typename G::StrideB>(g.ldb);
    reinterpret_cast<typename G::StrideA*>(ws + l.stride_a)[e] = G::template leading<typename G::StrideA>(g.lda);
    reinterpret_cast<typename G::StrideC*>(ws + l.stride_c)[e] = G::template leading<typename G::StrideC>(g.Y);
  }
  uint4* c = static_cast<uint4*>(g.c);
  const int64_t step = int64_t(gridDim.x) * kPrepareThreads;
  const int64_t first = int64_t(blockIdx.x) * kPrepareThreads + threadIdx.x;
  if (!g.wgrad) {
    if (blockIdx.y != 0 || g.E < 1) return;
    const int64_t words_per_row = g.Y / 8;
    const int64_t begin = int64_t(min(max(g.offs[g.E - 1], 0), g.N)) * words_per_row;
    for (int64_t i = begin + first; i < int64_t(g.N) * words_per_row; i += step) c[i] = make_uint4(0, 0, 0, 0);
  } else {
    const int ez = blockIdx.y;
    if (g.offs[ez] != (ez > 0 ? g.offs[ez - 1] : 0)) return;  // expert ez has rows
    const int64_t words = int64_t(g.X) * g.Y / 8;
    for (int64_t i = first; i < words; i += step) c[ez * words + i] = make_uint4(0, 0, 0, 0);
  }
}

// The setup kernel's grid: enough blocks for one thread per expert, and for the zeros (the
// forward: up to 4 per SM over the N x Y output; the weight gradient: up to 64 per expert).
inline dim3 prepare_grid(const GroupedGemm& g) {
  const int64_t setup = (int64_t(g.E) + kPrepareThreads - 1) / kPrepareThreads;
  const int64_t words = g.wgrad ? int64_t(g.X) * g.Y / 8 : int64_t(g.N) * g.Y / 8;
  const int64_t cap = g.wgrad ? 64 : 4 * int64_t(g.sm_count > 0 ? g.sm_count : 1);
  const int64_t zero = std::min<int64_t>((words + kPrepareThreads - 1) / kPrepareThreads, cap);
  return dim3(unsigned(std::max<int64_t>({setup, zero, 1})), g.wgrad ? unsigned(g.E) : 1u);
}

template <class Cfg, bool A_COL, bool B_COL>
const char* Sm90GroupedGemm<Cfg, A_COL, B_COL>::run(const GroupedGemm& g, void* workspace,
                                                    cudaStream_t stream) {
  char* ws = static_cast<char*>(workspace);
  prepare_groups_kernel<Sm90GroupedGemm><<<prepare_grid(g), kPrepareThreads, 0, stream>>>(g, ws);
  if (cudaGetLastError() != cudaSuccess) return "moe.grouped_mm (sm90): launching the group setup kernel failed";
  auto args = arguments(g, ws);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess)
    return "moe.grouped_mm (sm90): CUTLASS cannot implement this problem (alignment?)";
  const Layout l = layout(g.E, 0);
  if (gemm.initialize(args, ws + l.cutlass, stream) != cutlass::Status::kSuccess)
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
  const char* forward_run<ID>(const GroupedGemm& g, void* ws, cudaStream_t stream) {           \
    return g.b_col ? Sm90GroupedGemm<CFG, false, true>::run(g, ws, stream)                     \
                   : Sm90GroupedGemm<CFG, false, false>::run(g, ws, stream);                   \
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
  const char* wgrad_run<ID>(const GroupedGemm& g, void* ws, cudaStream_t stream) {             \
    return Sm90GroupedGemm<CFG, true, false>::run(g, ws, stream);                              \
  }                                                                                            \
  }
