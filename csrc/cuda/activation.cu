// moe.swiglu / moe.swiglu_backward / moe.linear_f32 / moe.linear_f32_backward on CUDA: the layers'
// fused helpers.
//
// Shape legend: N rows (h's leading dims flattened: the routed rows of the experts' h_NH), F FFN
// hidden, H = 2F = [gate; up] the first projection's width; T tokens, D model dim, E experts.
//
// swiglu (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 5-6), one pass each way:
//
//   out[n, f]   = silu(g) * u                   silu(g) = g / (1 + e^-g)   g = h[n, f], u = h[n, F+f]
//   d_h[n, f]   = grad * u * (s (1 + g (1 - s)))         s = 1 / (1 + e^-g)
//   d_h[n, F+f] = grad * (g s)
//
// Arithmetic in float32 for half/bfloat16 and float32 (float64 for float64), rounded once to the
// output dtype. Every operation is rounded on its own (IEEE division, expf/exp, no FMA
// contraction) in the order of PyTorch's CUDA silu and sigmoid kernels and of the twin
// (moe/ops_torch.py), so on CUDA the kernels equal the twin bit for bit. The CPU kernel
// (csrc/activation.cpp) forms silu as g * s and its AVX-512 loops use a polynomial e^x: the two
// backends agree to about one rounding of float32 before the output rounding. A grid-stride loop
// over (row, vector) items, 16-byte vectors where h's rows, grad's rows and F allow it
// (F % (16 / sizeof(T)) == 0), else one element at a time. Rows may have any stride; a last dim
// that is not unit-stride is copied first, as on the CPU.
//
// linear_f32: logits_TE = x_TD @ weight_ED^T, float32 out (float64 for float64). bfloat16/float16
// operands: one cublasGemmEx with float32 output and CUBLAS_COMPUTE_32F. Every product of two
// bfloat16 (or float16) values is exact in float32 and the sums are float32, the CPU kernel's
// contract, without a float32 copy of x; with a float32 output there is no reduced-precision
// reduction to disallow. float32/float64 operands: at::linear in that dtype, the twin's own GEMM
// (TF32 only where the user allowed it for every float32 matmul).
//
// linear_f32_backward: d x_TD = grad_TE @ weight_ED and d weight_ED = grad_TE^T @ x_TD, float32
// sums, rounded once to the operands' dtype. For bfloat16 operands (the routers' case) grad_TE is
// float32, which no half-precision tensor-core GEMM takes; the float32 GEMMs on upcast copies (what
// autograd runs for F.linear(x.float(), w.float()), and the other dtypes here) are SIMT GEMMs and
// four casts. Instead each gradient value splits exactly into three bfloat16 values,
//
//   g = h1 + h2 + h3,   h1 = bf16(g), h2 = bf16(g - h1), h3 = bf16(g - h1 - h2) = g - h1 - h2
//
// (8 significand bits each, float32's 24 in all; exact unless |g| < about 2^-110, where h3 would
// be a bfloat16 subnormal; where h1 is not finite it stands alone, so infinities and NaN
// propagate, and a finite |g| past bfloat16's largest value, 3.39e38, counts as infinite), and a
// product of two bfloat16 values is exact in float32. So both gradients are float32-accumulated sums of exactly the float32 GEMMs'
// products, on bfloat16 tensor cores:
//
//   d x_TD      = G3 (T, 3E) @ W3 (3E, D)                   G3 = [h1 | h2 | h3], W3 = [w; w; w]
//   d weight_ED = C[0:E] + C[E:2E] + C[2E:3E],  C (3E, D) = G3^T @ x_TD  (float32)
//
// Four launches: the split (G3 and W3 in one grid-stride kernel), two cublasGemmEx (bfloat16
// operands, CUBLAS_COMPUTE_32F, reduced-precision split-K reductions disallowed for the bfloat16
// output) and the sum of C's three blocks. Tensor cores accumulate less exactly than a float32
// SIMT GEMM (the forward's note), far below the bfloat16 rounding of both outputs.
#include <ATen/Dispatch.h>
#include <ATen/cuda/Exceptions.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "common.cuh"
#include "moe_ops.h"

namespace moe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // items per thread and step, all loads issued before the first use

// exp_acc, div_rn, one_plus_exp_neg and swiglu_one (silu(g) * u): common.cuh.

// Item i of a (rows, nvec) grid: row n = i / nvec, vector v = i % nvec (32-bit division when the
// grid fits in 32 bits, which is uniform across the launch).
__device__ __forceinline__ void split(int64_t i, int64_t nvec, bool narrow, int64_t& n, int64_t& v) {
  if (narrow) {
    const uint32_t q = static_cast<uint32_t>(i) / static_cast<uint32_t>(nvec);
    n = q;
    v = static_cast<uint32_t>(i) - q * static_cast<uint32_t>(nvec);
  } else {
    n = i / nvec;
    v = i - n * nvec;
  }
}

// out (N, F) contiguous = swiglu of h's rows (N, 2F) with row stride ld; nvec = F / VEC.
template <typename T, int VEC>
__global__ void swiglu_kernel(const T* __restrict__ h, int64_t ld, int64_t F, int64_t nvec,
                              int64_t total, T* __restrict__ out) {
  using acc_t = at::opmath_type<T>;
  using V = Vec<T, VEC>;
  const bool narrow = total <= int64_t(UINT32_MAX);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i0 < total; i0 += stride * kUnroll) {
    V g[kUnroll], u[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = i0 + k * stride;
      if (i >= total) break;
      int64_t n, v;
      split(i, nvec, narrow, n, v);
      const T* gate = h + n * ld + v * VEC;
      g[k] = *reinterpret_cast<const V*>(gate);
      u[k] = *reinterpret_cast<const V*>(gate + F);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = i0 + k * stride;
      if (i >= total) break;
      V o;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        o.v[j] = static_cast<T>(swiglu_one(static_cast<acc_t>(g[k].v[j]), static_cast<acc_t>(u[k].v[j])));
      reinterpret_cast<V*>(out)[i] = o;  // vector v of row n of the contiguous output
    }
  }
}

// d_h (N, 2F) contiguous from grad's rows (N, F, row stride ldg) and h's rows (N, 2F, stride ld).
template <typename T, int VEC>
__global__ void swiglu_backward_kernel(const T* __restrict__ grad, int64_t ldg,
                                       const T* __restrict__ h, int64_t ld, int64_t F,
                                       int64_t nvec, int64_t total, T* __restrict__ d_h) {
  using acc_t = at::opmath_type<T>;
  using V = Vec<T, VEC>;
  const bool narrow = total <= int64_t(UINT32_MAX);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i0 < total; i0 += stride * kUnroll) {
    V d[kUnroll], g[kUnroll], u[kUnroll];
    int64_t dst[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = i0 + k * stride;
      if (i >= total) break;
      int64_t n, v;
      split(i, nvec, narrow, n, v);
      const T* gate = h + n * ld + v * VEC;
      d[k] = *reinterpret_cast<const V*>(grad + n * ldg + v * VEC);
      g[k] = *reinterpret_cast<const V*>(gate);
      u[k] = *reinterpret_cast<const V*>(gate + F);
      dst[k] = n * 2 * F + v * VEC;
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (i0 + k * stride >= total) break;
      V dg, du;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc_t d_gate, d_up;
        swiglu_grad_one(static_cast<acc_t>(d[k].v[j]), static_cast<acc_t>(g[k].v[j]), static_cast<acc_t>(u[k].v[j]),
                        d_gate, d_up);
        dg.v[j] = static_cast<T>(d_gate);
        du.v[j] = static_cast<T>(d_up);
      }
      *reinterpret_cast<V*>(d_h + dst[k]) = dg;
      *reinterpret_cast<V*>(d_h + dst[k] + F) = du;
    }
  }
}

// (..., H) -> (N, H) rows with a unit-stride last dim (a view when the layout allows, else a
// copy): the CPU kernel's as_rows.
at::Tensor as_rows(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

unsigned items_grid(int64_t total) { return flat_grid(ceil_div(total, kUnroll), kThreads); }

// A row-major (rows, D) GEMM operand as cuBLAS reads it: column-major D x rows with leading
// dimension ld >= D. Unit stride along D and rows at least D apart, else a contiguous copy; one
// row needs no row stride (ld = D). Any such layout is valid for cuBLAS; 16-byte aligned pointers
// and ld % 8 == 0 let it pick its fastest kernels.
at::Tensor gemm_rows(const at::Tensor& t, int64_t& ld) {
  const int64_t rows = t.size(0), D = t.size(1);
  const bool ok = (D == 1 || t.stride(1) == 1) && (rows == 1 || t.stride(0) >= D);
  auto r = ok ? t : t.contiguous();
  ld = rows == 1 ? D : r.stride(0);
  return r;
}

}  // namespace

at::Tensor swiglu_cuda(const at::Tensor& h) {
  check_swiglu_args(h);
  c10::cuda::CUDAGuard guard(h.device());
  const auto rows = as_rows(h);
  const int64_t N = rows.size(0), F = rows.size(1) / 2, ld = rows.stride(0);
  auto out = at::empty({N, F}, rows.options());
  if (out.numel() > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "moe_swiglu_cuda", [&] {
      constexpr int V = kVec16<scalar_t>;
      const bool vec = vec16_ok(rows.const_data_ptr(), F, ld, sizeof(scalar_t)) &&
                       vec16_ok(out.const_data_ptr(), F, F, sizeof(scalar_t));
      auto launch = [&](auto kernel, int64_t width) {
        const int64_t nvec = F / width, total = N * nvec;
        kernel<<<items_grid(total), kThreads, 0, stream>>>(
            rows.const_data_ptr<scalar_t>(), ld, F, nvec, total, out.mutable_data_ptr<scalar_t>());
      };
      if (vec) launch(swiglu_kernel<scalar_t, V>, V);
      else launch(swiglu_kernel<scalar_t, 1>, 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto sizes = h.sizes().vec();
  sizes.back() = F;
  return out.view(sizes);
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& h) {
  check_swiglu_backward_args(grad, h);
  c10::cuda::CUDAGuard guard(h.device());
  const auto rows = as_rows(h);
  const auto grows = as_rows(grad);
  const int64_t N = rows.size(0), F = grows.size(1), ld = rows.stride(0), ldg = grows.stride(0);
  auto d_h = at::empty({N, 2 * F}, rows.options());
  if (d_h.numel() > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "moe_swiglu_backward_cuda", [&] {
      constexpr int V = kVec16<scalar_t>;
      const bool vec = vec16_ok(rows.const_data_ptr(), F, ld, sizeof(scalar_t)) &&
                       vec16_ok(grows.const_data_ptr(), F, ldg, sizeof(scalar_t)) &&
                       vec16_ok(d_h.const_data_ptr(), F, 2 * F, sizeof(scalar_t));
      auto launch = [&](auto kernel, int64_t width) {
        const int64_t nvec = F / width, total = N * nvec;
        kernel<<<items_grid(total), kThreads, 0, stream>>>(
            grows.const_data_ptr<scalar_t>(), ldg, rows.const_data_ptr<scalar_t>(), ld, F, nvec,
            total, d_h.mutable_data_ptr<scalar_t>());
      };
      if (vec) launch(swiglu_backward_kernel<scalar_t, V>, V);
      else launch(swiglu_backward_kernel<scalar_t, 1>, 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return d_h.view(h.sizes());
}

at::Tensor linear_f32_cuda(const at::Tensor& x_TD, const at::Tensor& weight_ED) {
  check_linear_f32_args(x_TD, weight_ED);
  c10::cuda::CUDAGuard guard(x_TD.device());
  const auto dtype = x_TD.scalar_type();
  if (dtype == at::kFloat || dtype == at::kDouble) return at::linear(x_TD, weight_ED);
  const int64_t T = x_TD.size(0), D = x_TD.size(1), E = weight_ED.size(0);
  const auto f32 = x_TD.options().dtype(at::kFloat);
  if (T == 0 || E == 0) return at::empty({T, E}, f32);
  if (D == 0) return at::zeros({T, E}, f32);  // empty sums
  int64_t ldx = 0, ldw = 0;
  const auto x = gemm_rows(x_TD, ldx);
  const auto w = gemm_rows(weight_ED, ldw);
  TORCH_CHECK(std::max({T, E, ldx, ldw}) <= INT_MAX, "moe.linear_f32: x_TD ", x_TD.sizes(),
              " or weight_ED ", weight_ED.sizes(), " exceeds cuBLAS's 32-bit sizes");
  auto out = at::empty({T, E}, f32);
  const cudaDataType_t in = dtype == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const float one = 1.f, zero = 0.f;
  // cuBLAS is column-major: the row-major (T, E) out is out^T (E x T, ld E) = weight_ED x_TD^T,
  // with weight read as D x E (ld ldw, transposed: CUBLAS_OP_T) and x as D x T (ld ldx,
  // CUBLAS_OP_N): cuBLAS's (m, n, k) = (E, T, D).
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(E),
      static_cast<int>(T), static_cast<int>(D), &one, w.const_data_ptr(), in, static_cast<int>(ldw),
      x.const_data_ptr(), in, static_cast<int>(ldx), &zero, out.mutable_data_ptr(), CUDA_R_32F,
      static_cast<int>(E), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return out;
}

namespace {

// grad (T, E) float32 (strides gs0, gs1) -> g3 (T, 3E) = [h1 | h2 | h3] (the split above); items
// past T * E copy w's rows (E, D, row stride ws0, unit column stride) to w3 (3E, D) = [w; w; w].
__global__ void split3_kernel(const float* __restrict__ g, int64_t gs0, int64_t gs1, int64_t T, int64_t E,
                              const c10::BFloat16* __restrict__ w, int64_t ws0, int64_t D,
                              c10::BFloat16* __restrict__ g3, c10::BFloat16* __restrict__ w3, int64_t total) {
  const int64_t TE = T * E, ED = E * D;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    if (i < TE) {
      const int64_t t = i / E, e = i - t * E;
      const float v = g[t * gs0 + e * gs1];
      const c10::BFloat16 h1(v);  // round to nearest even
      c10::BFloat16 h2(0.0f), h3(0.0f);
      if (isfinite(static_cast<float>(h1))) {  // else (inf, NaN, |g| near FLT_MAX) h1 alone, as float32 would
        const float r1 = v - static_cast<float>(h1);  // exact
        h2 = c10::BFloat16(r1);
        h3 = c10::BFloat16(r1 - static_cast<float>(h2));  // exact: r1 - h2 has at most 8 bits
      }
      c10::BFloat16* row = g3 + t * 3 * E + e;
      row[0] = h1;
      row[E] = h2;
      row[2 * E] = h3;
    } else {
      const int64_t j = i - TE, e = j / D, d = j - e * D;
      const c10::BFloat16 v = w[e * ws0 + d];
      w3[j] = v;
      w3[ED + j] = v;
      w3[2 * ED + j] = v;
    }
  }
}

// out (E, D) = (c[0:E] + c[E:2E]) + c[2E:3E] rounded to bfloat16, c (3E, D) float32 contiguous.
__global__ void sum3_kernel(const float* __restrict__ c, int64_t ED, c10::BFloat16* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < ED; i += stride)
    out[i] = c10::BFloat16((c[i] + c[ED + i]) + c[2 * ED + i]);
}

// Adds `extra` to the cuBLAS handle's math mode for this scope, then restores it.
struct MathMode {
  cublasHandle_t handle;
  cublasMath_t saved;
  MathMode(cublasHandle_t h, cublasMath_t extra) : handle(h) {
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle, &saved));
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, static_cast<cublasMath_t>(saved | extra)));
  }
  ~MathMode() { cublasSetMathMode(handle, saved); }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_f32_backward_cuda(const at::Tensor& grad_TE, const at::Tensor& x_TD,
                                                            const at::Tensor& weight_ED, bool grad_x,
                                                            bool grad_weight) {
  check_linear_f32_backward_args(grad_TE, x_TD, weight_ED);
  c10::cuda::CUDAGuard guard(x_TD.device());
  if (x_TD.scalar_type() != at::kBFloat16)
    return linear_f32_backward_aten(grad_TE, x_TD, weight_ED, grad_x, grad_weight);
  const int64_t T = x_TD.size(0), D = x_TD.size(1), E = weight_ED.size(0);
  auto g_x = at::empty({grad_x ? T : 0, D}, x_TD.options());
  auto g_w = at::empty({grad_weight ? E : 0, D}, weight_ED.options());
  if (T == 0 || E == 0 || D == 0) {  // empty sums (or empty outputs)
    g_x.zero_();
    g_w.zero_();
    return {g_x, g_w};
  }
  if (!grad_x && !grad_weight) return {g_x, g_w};
  int64_t ldx = D, ldw = D;
  const auto x = grad_weight ? gemm_rows(x_TD, ldx) : x_TD;
  const auto w = grad_x ? gemm_rows(weight_ED, ldw) : weight_ED;
  TORCH_CHECK(std::max({T, D, 3 * E, ldx}) <= INT_MAX, "moe.linear_f32_backward: x_TD ", x_TD.sizes(),
              " or weight_ED ", weight_ED.sizes(), " exceeds cuBLAS's 32-bit sizes");
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto g3 = at::empty({T, 3 * E}, x_TD.options());
  auto w3 = at::empty({grad_x ? 3 * E : 0, D}, x_TD.options());
  const int64_t total = T * E + (grad_x ? E * D : 0);
  split3_kernel<<<flat_grid(total, kThreads), kThreads, 0, stream>>>(
      grad_TE.const_data_ptr<float>(), grad_TE.stride(0), grad_TE.stride(1), T, E,
      w.const_data_ptr<c10::BFloat16>(), ldw, D, g3.mutable_data_ptr<c10::BFloat16>(),
      w3.mutable_data_ptr<c10::BFloat16>(), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto handle = at::cuda::getCurrentCUDABlasHandle();
  const MathMode mode(handle, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
  const float one = 1.f, zero = 0.f;
  const int d = static_cast<int>(D), t = static_cast<int>(T), e3 = static_cast<int>(3 * E);
  if (grad_x) {
    // Column-major: d_x^T (D x T, ld D) = W3^T (D x 3E: row-major W3, ld D) @ G3^T (3E x T: row-major
    // G3, ld 3E); cuBLAS's (m, n, k) = (D, T, 3E).
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, d, t, e3, &one, w3.const_data_ptr(),
                                      CUDA_R_16BF, d, g3.const_data_ptr(), CUDA_R_16BF, e3, &zero,
                                      g_x.mutable_data_ptr(), CUDA_R_16BF, d, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
  }
  if (grad_weight) {
    // Column-major: C^T (D x 3E, ld D) = x^T (D x T: row-major x, ld ldx) @ G3 (T x 3E: G3^T read
    // transposed, ld 3E); cuBLAS's (m, n, k) = (D, 3E, T).
    auto c = at::empty({3 * E, D}, x_TD.options().dtype(at::kFloat));
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, d, e3, t, &one, x.const_data_ptr(),
                                      CUDA_R_16BF, static_cast<int>(ldx), g3.const_data_ptr(), CUDA_R_16BF, e3,
                                      &zero, c.mutable_data_ptr(), CUDA_R_32F, d, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
    sum3_kernel<<<flat_grid(E * D, kThreads), kThreads, 0, stream>>>(c.const_data_ptr<float>(), E * D,
                                                                      g_w.mutable_data_ptr<c10::BFloat16>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {g_x, g_w};
}

}  // namespace moe::cuda

TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("swiglu", &moe::cuda::swiglu_cuda);
  m.impl("swiglu_backward", &moe::cuda::swiglu_backward_cuda);
  m.impl("linear_f32", &moe::cuda::linear_f32_cuda);
  m.impl("linear_f32_backward", &moe::cuda::linear_f32_backward_cuda);
}
