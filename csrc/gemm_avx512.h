// AVX-512 GEMM microkernels for the CPU grouped GEMM (see gemm_avx512.cpp).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace moe {

// True when this CPU runs the kernel for `dtype` (bfloat16: AVX-512 BF16; float32: AVX-512F)
// and MOE_CPU_GEMM is not "aten". Other dtypes: false.
bool avx512_gemm_available(at::ScalarType dtype);

// The B operand (K x N, the same strides) of the call likely to run next on this thread: its
// first panel is prefetched during this call's last one. B == nullptr: no hint.
template <typename T>
struct NextB {
  const T* B = nullptr;
  int64_t K = 0, N = 0;
};

// A operand read through offset tables (a gathered operand, never materialized): A(m, k) =
// A[rows[m] + k * ak] with `rows`, A[m * am + cols[k]] with `cols` (element offsets).
struct GatherA {
  const int64_t* rows = nullptr;
  const int64_t* cols = nullptr;
};

// C (M x N, row stride ldc) = A (M x K) @ B (K x N), fp32 accumulation, C in the inputs' dtype.
// A(m, k) = A[m * am + k * ak], B(k, n) = B[k * bk + n * bn] (element strides, any layout).
// Single-threaded: the grouped GEMM calls it from its own parallel tiles.
void avx512_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t am, int64_t ak,
                 const c10::BFloat16* B, int64_t bk, int64_t bn, c10::BFloat16* C, int64_t ldc,
                 NextB<c10::BFloat16> next = {}, GatherA gather = {});
void avx512_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t am, int64_t ak,
                 const float* B, int64_t bk, int64_t bn, float* C, int64_t ldc,
                 NextB<float> next = {}, GatherA gather = {});
// bfloat16 inputs, float32 C: the fp32 sums are stored unrounded (blocked like the float32 path).
void avx512_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t am, int64_t ak,
                 const c10::BFloat16* B, int64_t bk, int64_t bn, float* C, int64_t ldc);

}  // namespace moe
