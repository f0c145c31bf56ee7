// moe.linear_f32 on the CPU: logits_TE = x_TD @ weight_ED^T in float32, for the routers (which
// compute in float32 whatever the input dtype, as Megatron's moe_router_dtype="fp32" and
// DeepSeek-V3's gate do).
//
// For bfloat16 x and weight every product is exact in float32, so the float32 GEMM on upcast
// copies equals, up to the order of the sums, bfloat16 inputs with float32 accumulation: moekit's
// AVX-512 BF16 kernel (gemm_avx512.cpp, blocked float32 sums, float32 result), at about twice
// the float32 GEMM's rate and without the float32 copy of x. Every other case (other dtypes, a
// CPU without AVX-512 BF16) is at::linear on float32 copies (float64 stays float64).
//
// linear_f32_backward: (d x_TD, d weight_ED) = (grad_TE @ weight, grad_TE^T @ x) on copies in
// grad's dtype, cast back to the operands' dtype: what autograd computes for
// F.linear(x.float(), w.float()) (Megatron's router_gating_linear too), one op. The CPU runs it
// as those ATen ops; so does CUDA except for bfloat16 (csrc/cuda/activation.cu).
#include <ATen/Parallel.h>

#include <algorithm>

#include "gemm_avx512.h"
#include "moe_ops.h"

namespace moe {

at::Tensor linear_f32_cpu(const at::Tensor& x_TD, const at::Tensor& weight_ED) {
  check_linear_f32_args(x_TD, weight_ED);
  const auto acc = accum_dtype(x_TD.scalar_type());
  const int64_t T = x_TD.size(0), D = x_TD.size(1), E = weight_ED.size(0);
  if (x_TD.scalar_type() != at::kBFloat16 || !avx512_gemm_available(at::kBFloat16) || T == 0 || E == 0)
    return at::linear(x_TD.to(acc), weight_ED.to(acc));
  const auto x = x_TD.stride(1) == 1 ? x_TD : x_TD.contiguous();
  const auto w = weight_ED.stride(1) == 1 ? weight_ED : weight_ED.contiguous();
  auto out = at::empty({T, E}, x.options().dtype(at::kFloat));
  const auto* xp = x.const_data_ptr<c10::BFloat16>();
  const auto* wp = w.const_data_ptr<c10::BFloat16>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t ldx = x.stride(0), ldw = w.stride(0);
  // Row blocks, a few per thread; each packs the (small) weight once. Each block is one plain
  // GEMM (gemm_avx512.h): M = its rows, depth X = D, Y = E columns.
  const int64_t threads = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(48, (T + 4 * threads - 1) / (4 * threads));
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    avx512_gemm(end - begin, E, D, xp + begin * ldx, ldx, 1, wp, 1, ldw, op + begin * E, E);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> linear_f32_backward_aten(const at::Tensor& grad_TE, const at::Tensor& x_TD,
                                                            const at::Tensor& weight_ED, bool grad_x,
                                                            bool grad_weight) {
  const auto acc = grad_TE.scalar_type();
  const int64_t D = x_TD.size(1);
  auto g_x = grad_x ? at::mm(grad_TE, weight_ED.to(acc)).to(x_TD.scalar_type()) : at::empty({0, D}, x_TD.options());
  auto g_w = grad_weight ? at::mm(grad_TE.t(), x_TD.to(acc)).to(weight_ED.scalar_type())
                         : at::empty({0, D}, weight_ED.options());
  return {g_x, g_w};
}

std::tuple<at::Tensor, at::Tensor> linear_f32_backward_cpu(const at::Tensor& grad_TE, const at::Tensor& x_TD,
                                                           const at::Tensor& weight_ED, bool grad_x,
                                                           bool grad_weight) {
  check_linear_f32_backward_args(grad_TE, x_TD, weight_ED);
  return linear_f32_backward_aten(grad_TE, x_TD, weight_ED, grad_x, grad_weight);
}

}  // namespace moe
