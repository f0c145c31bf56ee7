// AVX-512 GEMM microkernels for the CPU grouped GEMM (see gemm_avx512.cpp).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace moe {

// True when this CPU runs the kernel for `dtype` (bfloat16: AVX-512 BF16; float32: AVX-512F)
// and MOE_CPU_GEMM is not "aten". Other dtypes: false.
bool avx512_gemm_available(at::ScalarType dtype);

// C (M x N, row stride ldc) = A (M x K) @ B (K x N), fp32 accumulation, C in the inputs' dtype.
// A(m, k) = A[m * am + k * ak], B(k, n) = B[k * bk + n * bn] (element strides, any layout).
// Single-threaded: the grouped GEMM calls it from its own parallel tiles.
void avx512_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t am, int64_t ak,
                 const c10::BFloat16* B, int64_t bk, int64_t bn, c10::BFloat16* C, int64_t ldc);
void avx512_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t am, int64_t ak,
                 const float* B, int64_t bk, int64_t bn, float* C, int64_t ldc);

}  // namespace moe
