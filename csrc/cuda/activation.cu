// moe.swiglu / moe.swiglu_backward / moe.linear_f32 on CUDA: the layers' fused helpers.
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
        const acc_t dd = static_cast<acc_t>(d[k].v[j]), gg = static_cast<acc_t>(g[k].v[j]);
        const acc_t uu = static_cast<acc_t>(u[k].v[j]);
        const acc_t s = div_rn(acc_t(1), one_plus_exp_neg(gg));  // torch.sigmoid
        const acc_t ds = mul_rn(s, add_rn(acc_t(1), mul_rn(gg, add_rn(acc_t(1), -s))));
        dg.v[j] = static_cast<T>(mul_rn(mul_rn(dd, uu), ds));
        du.v[j] = static_cast<T>(mul_rn(dd, mul_rn(gg, s)));
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

}  // namespace moe::cuda

TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("swiglu", &moe::cuda::swiglu_cuda);
  m.impl("swiglu_backward", &moe::cuda::swiglu_backward_cuda);
  m.impl("linear_f32", &moe::cuda::linear_f32_cuda);
}
