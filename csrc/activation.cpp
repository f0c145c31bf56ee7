// moe.swiglu / moe.swiglu_backward on the CPU: SwiGLU (Shazeer 2020, "GLU Variants Improve
// Transformer", Eq. 5-6) on the first projection's output h = [gate; up], in one pass over the
// rows. PyTorch's version of the same expression is silu then mul forward (two passes over the
// (N, F) half, each strided by 2F) and four elementwise ops backward.
//
// Shape legend: N rows (h's leading dims flattened: the routed rows of the experts' h_NH), F FFN
// hidden, H = 2F = [gate; up] the first projection's width.
//
//   out[n, f]    = silu(g) * u                    g = h[n, f], u = h[n, F + f]
//   d_h[n, f]    = grad * u * s * (1 + g (1 - s)) silu(g) = g s, s = sigmoid(g) = 1 / (1 + e^-g)
//   d_h[n, F+f]  = grad * g * s
//
// Arithmetic in float32 for half/bfloat16 and float32 inputs (float64 for float64), rounded once
// to the output dtype. bfloat16 and float32 run AVX-512 loops where the CPU has AVX-512, with e^x
// from the polynomial below (relative error under 2e-7); the scalar loops use std::exp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>

#include "cpu_vec.h"
#include "host_cache.h"
#include "moe_ops.h"

namespace moe {

namespace {

constexpr int64_t kElemGrain = 1 << 14;  // elements per parallel task

// (..., H) -> (N, H) rows with unit stride along H (a view when the layout allows, else a copy).
at::Tensor as_rows(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

template <typename acc_t>
inline acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + std::exp(-g));
}

#ifdef MOE_HAVE_AVX512_ROWS

// e^x on 16 lanes: n = round(x / ln 2), r = x - n ln 2 (two-constant Cody-Waite split, |r| <=
// ln2 / 2), e^r from its degree-7 Taylor polynomial in Horner form, times 2^n by vscalefps
// (which saturates to inf / 0). x is clamped to [-104, 104] first, where 2^n already overflows or
// underflows, so r stays accurate; NaN lanes give an arbitrary finite value, and the callers
// multiply by g, which carries the NaN through.
MOE_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2, high 9 bits (exact n*c)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);      // ln 2, the rest
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

MOE_AVX512 inline __m512 sigmoid16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

template <typename T>
MOE_AVX512 void swiglu_row_vec(const T* gate, const T* up, T* out, int64_t F) {
  for (int64_t f = 0; f < F; f += 16) {
    const __mmask16 m = F - f >= 16 ? __mmask16(0xFFFF) : vec::tail_mask(F - f);
    const __m512 g = vec::load16(gate + f, m), u = vec::load16(up + f, m);
    vec::store16(out + f, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u), m);
  }
}

template <typename T>
MOE_AVX512 void swiglu_bwd_row_vec(const T* grad, const T* gate, const T* up, T* d_gate, T* d_up,
                                   int64_t F) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t f = 0; f < F; f += 16) {
    const __mmask16 m = F - f >= 16 ? __mmask16(0xFFFF) : vec::tail_mask(F - f);
    const __m512 d = vec::load16(grad + f, m), g = vec::load16(gate + f, m), u = vec::load16(up + f, m);
    const __m512 s = sigmoid16(g);
    const __m512 ds = _mm512_mul_ps(s, _mm512_add_ps(one, _mm512_mul_ps(g, _mm512_sub_ps(one, s))));
    vec::store16(d_gate + f, _mm512_mul_ps(_mm512_mul_ps(d, u), ds), m);
    vec::store16(d_up + f, _mm512_mul_ps(d, _mm512_mul_ps(g, s)), m);
  }
}

#endif

using vec::kVecRows;

}  // namespace

template <typename T>
void swiglu_row(const T* gate, const T* up, T* out, int64_t F) {
  using acc_t = at::opmath_type<T>;
  if constexpr (kVecRows<T>) {
    if (vec::avx512_rows()) {
      swiglu_row_vec(gate, up, out, F);
      return;
    }
  }
  for (int64_t f = 0; f < F; ++f) {
    const acc_t g = gate[f];
    out[f] = static_cast<T>(g * sigmoid(g) * static_cast<acc_t>(up[f]));
  }
}

template <typename T>
void swiglu_backward_row(const T* grad, const T* gate, const T* up, T* d_gate, T* d_up, int64_t F) {
  using acc_t = at::opmath_type<T>;
  if constexpr (kVecRows<T>) {
    if (vec::avx512_rows()) {
      swiglu_bwd_row_vec(grad, gate, up, d_gate, d_up, F);
      return;
    }
  }
  for (int64_t f = 0; f < F; ++f) {
    const acc_t g = gate[f], u = up[f], dd = grad[f];
    const acc_t s = sigmoid(g);
    d_gate[f] = static_cast<T>(dd * u * (s * (acc_t(1) + g * (acc_t(1) - s))));
    d_up[f] = static_cast<T>(dd * (g * s));
  }
}

#define MOE_SWIGLU_ROWS(T)                                                      \
  template void swiglu_row<T>(const T*, const T*, T*, int64_t);                 \
  template void swiglu_backward_row<T>(const T*, const T*, const T*, T*, T*, int64_t);
MOE_SWIGLU_ROWS(float)
MOE_SWIGLU_ROWS(double)
MOE_SWIGLU_ROWS(c10::Half)
MOE_SWIGLU_ROWS(c10::BFloat16)
#undef MOE_SWIGLU_ROWS

namespace {

template <typename scalar_t>
void swiglu_rows(const at::Tensor& h, at::Tensor& out) {
  const int64_t N = h.size(0), F = out.size(1), ld = h.stride(0);
  const scalar_t* src = h.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(F, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) swiglu_row(src + n * ld, src + n * ld + F, dst + n * F, F);
  });
}

template <typename scalar_t>
void swiglu_bwd_rows(const at::Tensor& grad, const at::Tensor& h, at::Tensor& d_h) {
  const int64_t N = h.size(0), F = grad.size(1), ld = h.stride(0), ldg = grad.stride(0);
  const scalar_t* src = h.const_data_ptr<scalar_t>();
  const scalar_t* gsrc = grad.const_data_ptr<scalar_t>();
  scalar_t* dst = d_h.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(F, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n)
      swiglu_backward_row(gsrc + n * ldg, src + n * ld, src + n * ld + F, dst + n * 2 * F, dst + n * 2 * F + F, F);
  });
}

}  // namespace

at::Tensor swiglu_cpu(const at::Tensor& h) {
  check_swiglu_args(h);
  const auto rows = as_rows(h);
  const int64_t F = h.size(-1) / 2;
  auto out = empty_cpu({rows.size(0), F}, h.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "moe_swiglu",
                                    [&] { swiglu_rows<scalar_t>(rows, out); });
  }
  auto sizes = h.sizes().vec();
  sizes.back() = F;
  return out.view(sizes);
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& h) {
  check_swiglu_backward_args(grad, h);
  const auto rows = as_rows(h);
  const auto grows = as_rows(grad);
  auto d_h = empty_cpu({rows.size(0), rows.size(1)}, h.options());
  if (d_h.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "moe_swiglu_backward",
                                    [&] { swiglu_bwd_rows<scalar_t>(grows, rows, d_h); });
  }
  return d_h.view(h.sizes());
}

}  // namespace moe
