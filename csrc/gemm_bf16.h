// bfloat16 GEMM microkernels for the CPU grouped GEMM (see gemm_bf16.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace moe {

// True when this CPU runs AVX-512 BF16 (and MOE_CPU_GEMM is not "aten").
bool bf16_gemm_available();

// C (M x N, row stride ldc) = A (M x K) @ B (K x N), bf16 in and out, fp32 accumulation.
// A(m, k) = A[m * am + k * ak], B(k, n) = B[k * bk + n * bn] (element strides, any layout).
// Single-threaded: the grouped GEMM calls it from its own parallel tiles.
void bf16_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t am, int64_t ak,
               const c10::BFloat16* B, int64_t bk, int64_t bn, c10::BFloat16* C, int64_t ldc);

}  // namespace moe
