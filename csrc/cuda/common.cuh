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

#include "rn_math.cuh"

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

// add_rn / mul_rn / fma_rn, exp_acc, div_rn and swiglu_one: rn_math.cuh (no torch headers, so the
// sm90 units share them).

}  // namespace moe::cuda
