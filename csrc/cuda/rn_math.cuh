// Rounded-per-operation arithmetic shared by moekit's CUDA kernels, without torch headers (the sm90
// units include it too): sums and products that round exactly like the CPU kernels and the PyTorch
// twins, and SwiGLU's gating in PyTorch's order.
#pragma once

namespace moe::cuda {

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
// swiglu kernel (csrc/cuda/activation.cu) and the SwiGLU epilogues of the streaming GEMM and of the
// gathered sm90 GEMM (sm90/gathered_gemm.cu).
template <typename acc_t>
__device__ __forceinline__ acc_t swiglu_one(acc_t g, acc_t u) {
  return mul_rn(div_rn(g, one_plus_exp_neg(g)), u);
}

// SwiGLU's backward for one (gate g, up u) pair and the incoming d: d_gate = d u s (1 + g (1 - s)),
// d_up = d g s with s = sigmoid(g), in the twin's order; shared by the swiglu_backward kernel and
// grouped_mm_unpermute's backward with swiglu (csrc/cuda/grouped_mm.cu).
template <typename acc_t>
__device__ __forceinline__ void swiglu_grad_one(acc_t d, acc_t g, acc_t u, acc_t& d_gate, acc_t& d_up) {
  const acc_t s = div_rn(acc_t(1), one_plus_exp_neg(g));  // torch.sigmoid
  const acc_t ds = mul_rn(s, add_rn(acc_t(1), mul_rn(g, add_rn(acc_t(1), -s))));
  d_gate = mul_rn(mul_rn(d, u), ds);
  d_up = mul_rn(d, mul_rn(g, s));
}

}  // namespace moe::cuda
