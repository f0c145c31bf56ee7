// Helpers shared by moekit's CUDA kernels (csrc/cuda/*.cu): launch sizes, a block-wide scan,
// 16-byte vectors and no-contraction arithmetic (so sums round exactly like the CPU kernels).
//
// Shape legend (moe_ops.h): T tokens, K top-k slots per token, E experts, N routed rows (the
// host-side bound T*K), D feature dim, X/Y GEMM input/output dims, M the rows of one plain GEMM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace moe::cuda {

constexpr int kWarp = 32;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n items, `threads` per block: enough to fill the GPU (four
// blocks per SM at most), at least one.
inline unsigned flat_grid(int64_t n, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(n, threads), 4 * sms)));
}

// Blocks for a warp-per-row kernel: `rows` rows, `warps` warps per block (rows >= 1).
inline unsigned rows_grid(int64_t rows, int warps) {
  return static_cast<unsigned>(ceil_div(rows, warps));
}

// Inclusive scan of one int per thread across a block of THREADS threads. `warp_sums` is
// shared memory for THREADS/32 ints. Returns the thread's inclusive prefix and sets `total`.
// Must be reached by every thread of the block (it synchronizes twice).
template <int THREADS>
__device__ __forceinline__ int block_inclusive_scan(int v, int& total, int* warp_sums) {
  static_assert(THREADS % kWarp == 0 && THREADS <= 1024, "THREADS must be a multiple of 32");
  constexpr int kWarps = THREADS / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  if (lane == kWarp - 1) warp_sums[warp] = v;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int s = warp_sums[w];
    before += (w < warp) ? s : 0;
    total += s;
  }
  __syncthreads();  // warp_sums may be rewritten by the next call
  return before + v;
}

// A 16-byte (or, for VEC == 1, one-element) bundle of VEC consecutive elements.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// A 2-D operand with rows of any stride and a unit-stride inner dim (else a contiguous copy): what
// the row kernels and the GEMMs read.
inline at::Tensor unit_inner(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// True when a row-major (rows, D) buffer with row stride `ld` can be read in 16-byte bundles.
inline bool vec16_ok(const void* p, int64_t D, int64_t ld, int64_t elem) {
  const int64_t per = 16 / elem;
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && D % per == 0 && ld % per == 0;
}

// Group e's rows [lo, hi) of a grouped GEMM from offs_E (int32, cumulative ends) and the row count
// N: asserted on the device (a host check would sync) and clamped into [0, N], so memory stays
// safe if asserts are compiled out.
__device__ __forceinline__ void group_rows_of(const int* offs, int N, int e, int& lo, int& hi) {
  lo = e > 0 ? offs[e - 1] : 0;
  hi = offs[e];
  CUDA_KERNEL_ASSERT(lo >= 0 && lo <= hi && hi <= N &&
                     "moe.grouped_mm: offs_E must be non-decreasing and at most a_NX.size(0)");
  lo = min(max(lo, 0), N);
  hi = min(max(hi, lo), N);
}

// acc + w * y and acc + y, rounded after each operation (no FMA contraction): the CPU kernels and
// the PyTorch twins multiply and add separately, so this keeps results bit-identical.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

__device__ __forceinline__ float exp_acc(float x) { return ::expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return ::exp(x); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// 1 + e^-g, the denominator of PyTorch's silu and sigmoid.
template <typename acc_t>
__device__ __forceinline__ acc_t one_plus_exp_neg(acc_t g) {
  return add_rn(acc_t(1), exp_acc(-g));
}

// silu(g) * u, as F.silu (g / (1 + e^-g)) then the multiply: SwiGLU's gating, shared by the
// swiglu kernel (csrc/cuda/activation.cu) and the streaming GEMM's SwiGLU epilogue.
template <typename acc_t>
__device__ __forceinline__ acc_t swiglu_one(acc_t g, acc_t u) {
  return mul_rn(div_rn(g, one_plus_exp_neg(g)), u);
}

}  // namespace moe::cuda
