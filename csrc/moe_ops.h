// moekit ops: declarations shared by the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) kernels.
//
// Shape legend (one meaning per letter, as in moe/__init__.py): T tokens, K top-k routing slots
// per token, E experts, N routed rows (the host-side bound N = T*K; rows past offs_E[E-1] are
// padding), D feature (model) dim, X/Y a GEMM's input/output dims (a_NX @ b_EXY -> c_NY), F FFN
// hidden, H a first projection's width (2F for swiglu's h), C capacity per expert. The plain-GEMM
// routines (gemm_avx512.h, cuda/gemm_tiles.cuh) compute C (M x Y) = A (M x X) @ B (X x Y): M the
// rows of one GEMM (e.g. one expert's rows), X its depth, Y its output columns.
// Schemas are registered once, in registration.cpp (TORCH_LIBRARY(moe, m)); autograd and fake
// (meta) kernels are registered from Python, one define_op call per op in moe/ops/defs.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace moe {

using PlanTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Argument checks shared by every backend (metadata only: they never read device data).
void check_plan_args(const at::Tensor& ids_TK, int64_t num_experts);
void check_dispatch_args(const char* op, const at::Tensor& x, const char* x_name,
                         int64_t expect_rows, const char* rows_desc, const at::Tensor& order_N,
                         const at::Tensor& rows_TK);
void check_weights_arg(const char* op, const char* name, const at::Tensor& w_TK,
                       const at::Tensor& rows_TK, const at::Tensor& x);
void check_unpermute_weights_grad_args(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                       const at::Tensor& order_N, const at::Tensor& rows_TK,
                                       const char* op = "unpermute_weights_grad");
// unpermute_weights_grad's checks under this op's name, and weights_TK (T, K) float32 or grad's dtype.
void check_unpermute_backward_args(const at::Tensor& grad_TD, const at::Tensor& y_ND, const at::Tensor& order_N,
                                   const at::Tensor& rows_TK, const at::Tensor& weights_TK);
void check_grouped_mm_args(const at::Tensor& a_NX, const at::Tensor& b_EXY,
                           const at::Tensor& offs_E, const char* op = "grouped_mm");
// grouped_mm's checks under this op's name, and grad_NY (N, Y) in a_NX's dtype on its device.
void check_grouped_mm_backward_args(const at::Tensor& grad_NY, const at::Tensor& a_NX,
                                    const at::Tensor& b_EXY, const at::Tensor& offs_E);
void check_grouped_mm_wgrad_args(const at::Tensor& a_NX, const at::Tensor& g_NY,
                                 const at::Tensor& offs_E);
void check_gather_grouped_mm_args(const at::Tensor& x_TD, const at::Tensor& order_N,
                                  const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                  const at::Tensor& offs_E);
// gather_grouped_mm's checks under this op's name, and grad_NY (N, Y) in x_TD's dtype on its device.
void check_gather_grouped_mm_backward_args(const at::Tensor& grad_NY, const at::Tensor& x_TD,
                                           const at::Tensor& order_N, const at::Tensor& rows_TK,
                                           const at::Tensor& b_EXY, const at::Tensor& offs_E);
void check_gather_grouped_mm_wgrad_args(const at::Tensor& x_TD, const at::Tensor& order_N,
                                        const at::Tensor& rows_TK, const at::Tensor& g_NY,
                                        const at::Tensor& offs_E);
// gather_grouped_mm's checks under this op's name, and b_EXY's Y = 2F ([gate; up]) even.
void check_gather_grouped_mm_swiglu_args(const at::Tensor& x_TD, const at::Tensor& order_N,
                                         const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                         const at::Tensor& offs_E);
// grouped_mm's checks and unpermute's on its (N, Y) product: a_NX has the plan's N rows (with swiglu
// h = [gate; up], 2X columns), weights_TK (T, K) float32 or a's dtype.
void check_grouped_mm_unpermute_args(const at::Tensor& a_NX, const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                     const at::Tensor& order_N, const at::Tensor& rows_TK,
                                     const std::optional<at::Tensor>& weights_TK, bool swiglu,
                                     const char* op = "grouped_mm_unpermute");
// grouped_mm_unpermute's checks under this op's name, and grad_TD (T, Y) in a_NX's dtype on its device.
void check_grouped_mm_unpermute_backward_args(const at::Tensor& grad_TD, const at::Tensor& a_NX,
                                              const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                              const at::Tensor& order_N, const at::Tensor& rows_TK,
                                              const std::optional<at::Tensor>& weights_TK, bool swiglu);
void check_linear_f32_args(const at::Tensor& x_TD, const at::Tensor& weight_ED, const char* op = "linear_f32");
// linear_f32's checks, and grad_TE (T, E) in linear_f32's output dtype on x_TD's device.
void check_linear_f32_backward_args(const at::Tensor& grad_TE, const at::Tensor& x_TD, const at::Tensor& weight_ED);
void check_swiglu_args(const at::Tensor& h);
void check_swiglu_backward_args(const at::Tensor& grad, const at::Tensor& h);
void check_topk_route_args(const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E,
                           int64_t top_k, c10::string_view score, int64_t num_groups,
                           int64_t topk_groups, double scaling, const std::optional<at::Tensor>& valid_T,
                           int64_t num_seqs, c10::string_view rule, double threshold, double fw_scale,
                           double z_scale);
// topk_route's threshold rule (csrc/router.cpp): keep all top_k slots, or the prefix that XMoE's
// threshold gating / top-p routing keeps (routers.topk.threshold_keep).
enum class RouteRule : int { kNone = 0, kXmoe = 1, kTopP = 2 };
RouteRule route_rule(c10::string_view rule);
// How many of a token's top-k slots (ids best first, p its probabilities) `rule` keeps, for the
// CPU and CUDA kernels alike: the first k > 0 whose a_k, the sum of p over the ranks above k
// accumulated in double and rounded to T (torch.cumsum's arithmetic on the CPU), fails
// a_k < threshold (kXmoe) or a_k <= threshold (kTopP), in T; K with kNone or when none fails.
template <typename T>
C10_HOST_DEVICE inline int64_t kept_slots(RouteRule rule, T threshold, const T* p, const int64_t* ids, int64_t K) {
  if (rule == RouteRule::kNone) return K;
  double above = 0.0;
  for (int64_t k = 1; k < K; ++k) {
    above += static_cast<double>(p[ids[k - 1]]);
    const T a = static_cast<T>(above);
    if (rule == RouteRule::kXmoe ? !(a < threshold) : !(a <= threshold)) return k;
  }
  return K;
}
void check_topk_route_backward_args(const at::Tensor& grad_weights_TK,
                                    const std::optional<at::Tensor>& grad_probs_TE,
                                    const at::Tensor& ids_TK, const at::Tensor& probs_TE,
                                    c10::string_view score, const std::optional<at::Tensor>& grad_psum_BE,
                                    const std::optional<at::Tensor>& grad_zsum,
                                    const std::optional<at::Tensor>& logits_TE,
                                    const std::optional<at::Tensor>& valid_T, double z_scale,
                                    const std::optional<at::Tensor>& grad_balance,
                                    const std::optional<at::Tensor>& fw_BE);
// topk_route's results: ids_TK, weights_TK, probs_TE, counts_E, metrics (2,), fw_BE, psum_BE, zsum,
// balance.
using RouteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor>;
// topk_route's results allocated (uninitialised) for its arguments, then the float32 bias and the
// contiguous valid mask its kernels read (undefined where absent); CPU and CUDA share it.
using RouteBuffers = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
RouteBuffers route_buffers(const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E, int64_t top_k,
                           const std::optional<at::Tensor>& valid_T, int64_t num_seqs);
// b_EXY is a transposed view of an (E, Y, X) weight (nn.Linear layout): the backward ops return its
// gradient in that layout (moe/ops/defs.py's _is_yx_layout, the same rule).
inline bool is_yx_layout(const at::Tensor& b_EXY) {
  return b_EXY.dim() == 3 && b_EXY.stride(1) == 1 && b_EXY.stride(2) != 1;
}
// Dtype of the unpermute_weights_grad output: float32 for half/bfloat16, else the input dtype.
at::ScalarType accum_dtype(at::ScalarType t);

// CPU kernels.
PlanTensors plan_cpu(const at::Tensor& ids_TK, int64_t num_experts);
at::Tensor permute_cpu(const at::Tensor& x_TD, const at::Tensor& order_N,
                       const at::Tensor& rows_TK, const std::optional<at::Tensor>& scale_TK);
at::Tensor unpermute_cpu(const at::Tensor& y_ND, const at::Tensor& order_N,
                         const at::Tensor& rows_TK, const std::optional<at::Tensor>& weights_TK);
at::Tensor unpermute_weights_grad_cpu(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                      const at::Tensor& order_N, const at::Tensor& rows_TK);
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                                          const at::Tensor& order_N, const at::Tensor& rows_TK,
                                                          const at::Tensor& weights_TK, bool grad_y,
                                                          bool grad_weights);
at::Tensor grouped_mm_cpu(const at::Tensor& a_NX, const at::Tensor& b_EXY,
                          const at::Tensor& offs_E);
at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& a_NX, const at::Tensor& g_NY,
                                const at::Tensor& offs_E);
at::Tensor gather_grouped_mm_cpu(const at::Tensor& x_TD, const at::Tensor& order_N,
                                 const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                 const at::Tensor& offs_E);
at::Tensor gather_grouped_mm_wgrad_cpu(const at::Tensor& x_TD, const at::Tensor& order_N,
                                       const at::Tensor& rows_TK, const at::Tensor& g_NY,
                                       const at::Tensor& offs_E, bool out_yx);
// grouped_mm's backward in one op: (d a_NX, d b_EXY in b's layout); an output not asked for is an
// empty (0, X) / (0, X, Y). gather_grouped_mm's likewise, with d x_TD (T, D) / (0, D).
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad_NY, const at::Tensor& a_NX,
                                                           const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                                           bool grad_a, bool grad_b);
std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward_cpu(const at::Tensor& grad_NY, const at::Tensor& x_TD,
                                                                  const at::Tensor& order_N, const at::Tensor& rows_TK,
                                                                  const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                                                  bool grad_x, bool grad_b);
std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_swiglu_cpu(const at::Tensor& x_TD, const at::Tensor& order_N,
                                                                const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                                                const at::Tensor& offs_E, bool keep_h);
// The down projection and the weighted combine: unpermute(grouped_mm(a, b), weights) (T, Y) (with
// swiglu, a_NX is h = [gate; up] and the GEMM's rows are swiglu(h)), and its backward without the
// (N, Y) product: (d a_NX (d h with swiglu), d b_EXY in b's layout, d weights_TK in float32 for half
// types); an output not asked for is an empty (0, a's width) / (0, X, Y) / (0, K).
at::Tensor grouped_mm_unpermute_cpu(const at::Tensor& a_NX, const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                    const at::Tensor& order_N, const at::Tensor& rows_TK,
                                    const std::optional<at::Tensor>& weights_TK, bool swiglu);
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward_cpu(
    const at::Tensor& grad_TD, const at::Tensor& a_NX, const at::Tensor& b_EXY, const at::Tensor& offs_E,
    const at::Tensor& order_N, const at::Tensor& rows_TK, const std::optional<at::Tensor>& weights_TK,
    bool grad_a, bool grad_b, bool grad_weights, bool swiglu);
at::Tensor linear_f32_cpu(const at::Tensor& x_TD, const at::Tensor& weight_ED);
std::tuple<at::Tensor, at::Tensor> linear_f32_backward_cpu(const at::Tensor& grad_TE, const at::Tensor& x_TD,
                                                           const at::Tensor& weight_ED, bool grad_x,
                                                           bool grad_weight);
// The backward as ATen ops in grad's dtype (csrc/linear.cpp): the CPU kernel, and CUDA's for
// other dtypes than bfloat16.
std::tuple<at::Tensor, at::Tensor> linear_f32_backward_aten(const at::Tensor& grad_TE, const at::Tensor& x_TD,
                                                            const at::Tensor& weight_ED, bool grad_x,
                                                            bool grad_weight);
at::Tensor swiglu_cpu(const at::Tensor& h);
// One row of swiglu_cpu / swiglu_backward_cpu (csrc/activation.cpp), the same arithmetic: out = silu(gate) * up,
// and d_gate, d_up from grad (F values each); for float, double, Half and BFloat16.
template <typename T>
void swiglu_row(const T* gate, const T* up, T* out, int64_t F);
template <typename T>
void swiglu_backward_row(const T* grad, const T* gate, const T* up, T* d_gate, T* d_up, int64_t F);
at::Tensor swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& h);
RouteOutputs topk_route_cpu(const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E, int64_t top_k,
                            c10::string_view score, int64_t num_groups, int64_t topk_groups, bool norm_topk,
                            double scaling, const std::optional<at::Tensor>& valid_T, int64_t num_seqs,
                            bool check_finite, c10::string_view rule, double threshold, double fw_scale,
                            double z_scale);
at::Tensor topk_route_backward_cpu(const at::Tensor& grad_weights_TK,
                                   const std::optional<at::Tensor>& grad_probs_TE,
                                   const at::Tensor& ids_TK, const at::Tensor& probs_TE,
                                   c10::string_view score, bool norm_topk, double scaling,
                                   const std::optional<at::Tensor>& grad_psum_BE,
                                   const std::optional<at::Tensor>& grad_zsum,
                                   const std::optional<at::Tensor>& logits_TE,
                                   const std::optional<at::Tensor>& valid_T, double z_scale,
                                   const std::optional<at::Tensor>& grad_balance,
                                   const std::optional<at::Tensor>& fw_BE);

// CUDA kernels that other CUDA ops call (csrc/cuda/).
namespace cuda {
at::Tensor permute_cuda(const at::Tensor& x_TD, const at::Tensor& order_N,
                        const at::Tensor& rows_TK, const std::optional<at::Tensor>& scale_TK);
at::Tensor unpermute_cuda(const at::Tensor& y_ND, const at::Tensor& order_N,
                          const at::Tensor& rows_TK, const std::optional<at::Tensor>& weights_TK);
at::Tensor swiglu_cuda(const at::Tensor& h);
// out[t] = the sum over k of y_SD[t * K + k] where rows_TK[t, k] >= 0, in slot order in
// at::opmath_type, rounded once: the combine of token-major rows already weighted
// (grouped_mm_unpermute's sm90 path); unpermute's kernel. Each read slot's routed row r =
// rows_TK[t, k] must be in [0, N) with order_N[r] == t * K + k (the slot whose row the GEMM stored;
// else a device-side assert, never a read of a row nobody wrote).
at::Tensor sum_slots_cuda(const at::Tensor& y_SD, const at::Tensor& order_N, const at::Tensor& rows_TK);
}  // namespace cuda

// Weight-only int8 experts (csrc/grouped_mm_int8.cpp): q_EYX int8, scale_EY float32.
void check_grouped_mm_w8_args(const at::Tensor& a_NX, const at::Tensor& q_EYX,
                              const at::Tensor& scale_EY, const at::Tensor& offs_E);
at::Tensor grouped_mm_w8_cpu(const at::Tensor& a_NX, const at::Tensor& q_EYX,
                             const at::Tensor& scale_EY, const at::Tensor& offs_E);

}  // namespace moe
