// Argument checks shared by the CPU and CUDA kernels. Each message names the argument.
// These read metadata only (shapes, dtypes, devices), never tensor data, so they cost no sync.
#include "moe_ops.h"

namespace moe {

at::ScalarType accum_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// The most experts a plan takes (moe.ops.MAX_EXPERTS): its outputs and scratch are O(E).
constexpr int64_t kMaxExperts = int64_t{1} << 20;

static bool is_index_dtype(at::ScalarType t) { return t == at::kLong || t == at::kInt; }

static bool is_mm_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_plan_args(const at::Tensor& ids_TK, int64_t num_experts) {
  TORCH_CHECK(ids_TK.dim() == 2, "moe.plan: ids_TK must be 2-D (T, K), got shape ",
              ids_TK.sizes());
  TORCH_CHECK(is_index_dtype(ids_TK.scalar_type()),
              "moe.plan: ids_TK must be int64 or int32 expert ids, got ", ids_TK.scalar_type());
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts,
              "moe.plan: num_experts must be in [1, 2^20 = ", kMaxExperts, "] (the plan holds ",
              "counts_E and offs_E, one int32 each per expert), got ", num_experts);
}

void check_dispatch_args(const char* op, const at::Tensor& x, const char* x_name,
                         int64_t expect_rows, const char* rows_desc, const at::Tensor& order_N,
                         const at::Tensor& rows_TK) {
  TORCH_CHECK(order_N.dim() == 1 && order_N.scalar_type() == at::kLong, "moe.", op,
              ": order_N must be a 1-D int64 tensor (Plan.order_N), got ", order_N.scalar_type(),
              " of shape ", order_N.sizes());
  TORCH_CHECK(rows_TK.dim() == 2 && rows_TK.scalar_type() == at::kLong, "moe.", op,
              ": rows_TK must be a 2-D int64 tensor (Plan.rows_TK), got ", rows_TK.scalar_type(),
              " of shape ", rows_TK.sizes());
  TORCH_CHECK(order_N.size(0) == rows_TK.numel(), "moe.", op, ": order_N has ", order_N.size(0),
              " rows but rows_TK has ", rows_TK.numel(), " slots (both come from one Plan)");
  TORCH_CHECK(x.dim() == 2, "moe.", op, ": ", x_name, " must be 2-D, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "moe.", op, ": ", x_name,
              " must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) == expect_rows, "moe.", op, ": ", x_name, " has ", x.size(0),
              " rows, expected ", expect_rows, " (", rows_desc, ")");
  TORCH_CHECK(x.device() == order_N.device() && x.device() == rows_TK.device(), "moe.", op, ": ",
              x_name, " is on ", x.device(), " but the plan (order_N/rows_TK) is on ",
              order_N.device());
}

void check_weights_arg(const char* op, const char* name, const at::Tensor& w_TK,
                       const at::Tensor& rows_TK, const at::Tensor& x) {
  TORCH_CHECK(w_TK.sizes() == rows_TK.sizes(), "moe.", op, ": ", name, " must have shape ",
              rows_TK.sizes(), " (T, K), got ", w_TK.sizes());
  TORCH_CHECK(w_TK.scalar_type() == x.scalar_type() || w_TK.scalar_type() == at::kFloat, "moe.",
              op, ": ", name, " must be float32 or match the data dtype ", x.scalar_type(),
              ", got ", w_TK.scalar_type());
  TORCH_CHECK(w_TK.device() == x.device(), "moe.", op, ": ", name, " is on ", w_TK.device(),
              " but the data is on ", x.device());
}

void check_unpermute_weights_grad_args(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                       const at::Tensor& order_N, const at::Tensor& rows_TK, const char* op) {
  check_dispatch_args(op, y_ND, "y_ND", order_N.size(0), "N, the plan's rows", order_N, rows_TK);
  check_dispatch_args(op, grad_TD, "grad_TD", rows_TK.size(0), "T, the plan's tokens", order_N, rows_TK);
  TORCH_CHECK(grad_TD.scalar_type() == y_ND.scalar_type() && grad_TD.size(1) == y_ND.size(1),
              "moe.", op, ": grad_TD (", grad_TD.scalar_type(), ", D=",
              grad_TD.size(1), ") must match y_ND (", y_ND.scalar_type(), ", D=", y_ND.size(1), ")");
}

void check_unpermute_backward_args(const at::Tensor& grad_TD, const at::Tensor& y_ND, const at::Tensor& order_N,
                                   const at::Tensor& rows_TK, const at::Tensor& weights_TK) {
  check_unpermute_weights_grad_args(grad_TD, y_ND, order_N, rows_TK, "unpermute_backward");
  check_weights_arg("unpermute_backward", "weights_TK", weights_TK, rows_TK, grad_TD);
}

static void check_offs(const char* op, const at::Tensor& offs_E, const at::Tensor& a,
                       const char* a_name = "a_NX") {
  TORCH_CHECK(offs_E.dim() == 1 && offs_E.scalar_type() == at::kInt, "moe.", op,
              ": offs_E must be a 1-D int32 tensor (cumulative end row of each expert), got ",
              offs_E.scalar_type(), " of shape ", offs_E.sizes());
  TORCH_CHECK(offs_E.device() == a.device(), "moe.", op, ": offs_E is on ", offs_E.device(),
              " but ", a_name, " is on ", a.device());
}

void check_grouped_mm_args(const at::Tensor& a_NX, const at::Tensor& b_EXY,
                           const at::Tensor& offs_E, const char* op) {
  TORCH_CHECK(a_NX.dim() == 2, "moe.", op, ": a_NX must be 2-D (N, X), got shape ", a_NX.sizes());
  TORCH_CHECK(b_EXY.dim() == 3, "moe.", op, ": b_EXY must be 3-D (E, X, Y), got shape ", b_EXY.sizes());
  TORCH_CHECK(is_mm_dtype(a_NX.scalar_type()),
              "moe.", op, ": a_NX must be float32/float64/bfloat16/float16, got ", a_NX.scalar_type());
  TORCH_CHECK(a_NX.scalar_type() == b_EXY.scalar_type(), "moe.", op, ": a_NX is ",
              a_NX.scalar_type(), " but b_EXY is ", b_EXY.scalar_type());
  TORCH_CHECK(a_NX.device() == b_EXY.device(), "moe.", op, ": a_NX is on ", a_NX.device(),
              " but b_EXY is on ", b_EXY.device());
  TORCH_CHECK(a_NX.size(1) == b_EXY.size(1), "moe.", op, ": a_NX has X=", a_NX.size(1),
              " columns but b_EXY has X=", b_EXY.size(1), " rows per expert");
  check_offs(op, offs_E, a_NX);
  TORCH_CHECK(offs_E.size(0) == b_EXY.size(0), "moe.", op, ": offs_E has ", offs_E.size(0),
              " entries but b_EXY has E=", b_EXY.size(0), " experts");
}

// A backward op's incoming gradient: (rows, Y) in `like`'s dtype, on its device.
static void check_grad_rows(const char* op, const at::Tensor& grad_NY, int64_t rows, int64_t Y,
                            const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(grad_NY.dim() == 2 && grad_NY.size(0) == rows && grad_NY.size(1) == Y, "moe.", op,
              ": grad_NY must have shape (N, Y) = (", rows, ", ", Y, "), got ", grad_NY.sizes());
  TORCH_CHECK(grad_NY.scalar_type() == like.scalar_type(), "moe.", op, ": grad_NY is ",
              grad_NY.scalar_type(), " but ", like_name, " is ", like.scalar_type());
  TORCH_CHECK(grad_NY.device() == like.device(), "moe.", op, ": grad_NY is on ", grad_NY.device(),
              " but ", like_name, " is on ", like.device());
}

void check_grouped_mm_backward_args(const at::Tensor& grad_NY, const at::Tensor& a_NX,
                                    const at::Tensor& b_EXY, const at::Tensor& offs_E) {
  check_grouped_mm_args(a_NX, b_EXY, offs_E, "grouped_mm_backward");
  check_grad_rows("grouped_mm_backward", grad_NY, a_NX.size(0), b_EXY.size(2), a_NX, "a_NX");
}

void check_grouped_mm_wgrad_args(const at::Tensor& a_NX, const at::Tensor& g_NY,
                                 const at::Tensor& offs_E) {
  TORCH_CHECK(a_NX.dim() == 2 && g_NY.dim() == 2,
              "moe.grouped_mm_wgrad: a_NX and g_NY must be 2-D, got shapes ", a_NX.sizes(),
              " and ", g_NY.sizes());
  TORCH_CHECK(is_mm_dtype(a_NX.scalar_type()) && a_NX.scalar_type() == g_NY.scalar_type(),
              "moe.grouped_mm_wgrad: a_NX and g_NY must share a float dtype, got ",
              a_NX.scalar_type(), " and ", g_NY.scalar_type());
  TORCH_CHECK(a_NX.size(0) == g_NY.size(0), "moe.grouped_mm_wgrad: a_NX has ", a_NX.size(0),
              " rows but g_NY has ", g_NY.size(0));
  TORCH_CHECK(a_NX.device() == g_NY.device(), "moe.grouped_mm_wgrad: a_NX is on ",
              a_NX.device(), " but g_NY is on ", g_NY.device());
  check_offs("grouped_mm_wgrad", offs_E, a_NX);
}

void check_swiglu_args(const at::Tensor& h) {
  TORCH_CHECK(h.dim() >= 1, "moe.swiglu: h must have at least one dim (..., 2F), got a scalar");
  TORCH_CHECK(is_mm_dtype(h.scalar_type()),
              "moe.swiglu: h must be float32/float64/bfloat16/float16, got ", h.scalar_type());
  TORCH_CHECK(h.size(-1) > 0 && h.size(-1) % 2 == 0,
              "moe.swiglu: h's last dim must be 2F = [gate; up], a positive even number, got ",
              h.size(-1));
}

void check_swiglu_backward_args(const at::Tensor& grad, const at::Tensor& h) {
  check_swiglu_args(h);
  TORCH_CHECK(grad.scalar_type() == h.scalar_type(), "moe.swiglu_backward: grad is ",
              grad.scalar_type(), " but h is ", h.scalar_type());
  TORCH_CHECK(grad.device() == h.device(), "moe.swiglu_backward: grad is on ", grad.device(),
              " but h is on ", h.device());
  auto expect = h.sizes().vec();
  expect.back() /= 2;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(expect), "moe.swiglu_backward: grad must have shape ",
              at::IntArrayRef(expect), " (h's with the last dim halved), got ", grad.sizes());
}

static void check_gather_common(const char* op, const at::Tensor& x_TD, const at::Tensor& order_N,
                                const at::Tensor& rows_TK, const at::Tensor& other,
                                const char* other_name, const at::Tensor& offs_E) {
  check_dispatch_args(op, x_TD, "x_TD", rows_TK.size(0), "T, the plan's tokens", order_N, rows_TK);
  TORCH_CHECK(is_mm_dtype(x_TD.scalar_type()), "moe.", op,
              ": x_TD must be float32/float64/bfloat16/float16, got ", x_TD.scalar_type());
  TORCH_CHECK(other.scalar_type() == x_TD.scalar_type(), "moe.", op, ": x_TD is ",
              x_TD.scalar_type(), " but ", other_name, " is ", other.scalar_type());
  TORCH_CHECK(other.device() == x_TD.device(), "moe.", op, ": ", other_name, " is on ",
              other.device(), " but x_TD is on ", x_TD.device());
  check_offs(op, offs_E, x_TD, "x_TD");
}

static void check_gather_b(const char* op, const at::Tensor& x_TD, const at::Tensor& order_N,
                           const at::Tensor& rows_TK, const at::Tensor& b_EXY, const at::Tensor& offs_E) {
  TORCH_CHECK(b_EXY.dim() == 3, "moe.", op, ": b_EXY must be 3-D (E, X, Y), got shape ", b_EXY.sizes());
  check_gather_common(op, x_TD, order_N, rows_TK, b_EXY, "b_EXY", offs_E);
  TORCH_CHECK(x_TD.size(1) == b_EXY.size(1), "moe.", op, ": x_TD has X=", x_TD.size(1),
              " columns but b_EXY has X=", b_EXY.size(1), " rows per expert");
  TORCH_CHECK(offs_E.size(0) == b_EXY.size(0), "moe.", op, ": offs_E has ", offs_E.size(0),
              " entries but b_EXY has E=", b_EXY.size(0), " experts");
}

void check_gather_grouped_mm_args(const at::Tensor& x_TD, const at::Tensor& order_N,
                                  const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                  const at::Tensor& offs_E) {
  check_gather_b("gather_grouped_mm", x_TD, order_N, rows_TK, b_EXY, offs_E);
}

void check_gather_grouped_mm_backward_args(const at::Tensor& grad_NY, const at::Tensor& x_TD,
                                           const at::Tensor& order_N, const at::Tensor& rows_TK,
                                           const at::Tensor& b_EXY, const at::Tensor& offs_E) {
  check_gather_b("gather_grouped_mm_backward", x_TD, order_N, rows_TK, b_EXY, offs_E);
  check_grad_rows("gather_grouped_mm_backward", grad_NY, order_N.size(0), b_EXY.size(2), x_TD, "x_TD");
}

void check_gather_grouped_mm_swiglu_args(const at::Tensor& x_TD, const at::Tensor& order_N,
                                         const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                         const at::Tensor& offs_E) {
  check_gather_b("gather_grouped_mm_swiglu", x_TD, order_N, rows_TK, b_EXY, offs_E);
  TORCH_CHECK(b_EXY.size(2) > 0 && b_EXY.size(2) % 2 == 0,
              "moe.gather_grouped_mm_swiglu: b_EXY's Y must be 2F = [gate; up], a positive even number, got ",
              b_EXY.size(2));
}

void check_gather_grouped_mm_wgrad_args(const at::Tensor& x_TD, const at::Tensor& order_N,
                                        const at::Tensor& rows_TK, const at::Tensor& g_NY,
                                        const at::Tensor& offs_E) {
  TORCH_CHECK(g_NY.dim() == 2, "moe.gather_grouped_mm_wgrad: g_NY must be 2-D (N, Y), got shape ",
              g_NY.sizes());
  check_gather_common("gather_grouped_mm_wgrad", x_TD, order_N, rows_TK, g_NY, "g_NY", offs_E);
  TORCH_CHECK(g_NY.size(0) == order_N.size(0), "moe.gather_grouped_mm_wgrad: g_NY has ",
              g_NY.size(0), " rows but the plan has N=", order_N.size(0));
}

void check_grouped_mm_unpermute_args(const at::Tensor& a_NX, const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                     const at::Tensor& order_N, const at::Tensor& rows_TK,
                                     const std::optional<at::Tensor>& weights_TK, bool swiglu, const char* op) {
  if (swiglu) {  // a_NX is h = [gate; up]: the GEMM's rows are its first X columns' width
    TORCH_CHECK(a_NX.dim() == 2 && b_EXY.dim() == 3 && a_NX.size(1) == 2 * b_EXY.size(1), "moe.", op,
                ": with swiglu, a_NX must be h = [gate; up] with 2 * X = 2 * b_EXY.size(1) columns, got a_NX ",
                a_NX.sizes(), " and b_EXY ", b_EXY.sizes());
    check_grouped_mm_args(a_NX.narrow(1, 0, b_EXY.size(1)), b_EXY, offs_E, op);
  } else {
    check_grouped_mm_args(a_NX, b_EXY, offs_E, op);
  }
  check_dispatch_args(op, a_NX, "a_NX", order_N.size(0), "N, the plan's rows", order_N, rows_TK);
  if (weights_TK.has_value()) check_weights_arg(op, "weights_TK", *weights_TK, rows_TK, a_NX);
}

void check_grouped_mm_unpermute_backward_args(const at::Tensor& grad_TD, const at::Tensor& a_NX,
                                              const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                              const at::Tensor& order_N, const at::Tensor& rows_TK,
                                              const std::optional<at::Tensor>& weights_TK, bool swiglu) {
  const char* op = "grouped_mm_unpermute_backward";
  check_grouped_mm_unpermute_args(a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK, swiglu, op);
  TORCH_CHECK(grad_TD.dim() == 2 && grad_TD.size(0) == rows_TK.size(0) && grad_TD.size(1) == b_EXY.size(2),
              "moe.", op, ": grad_TD must have shape (T, Y) = (", rows_TK.size(0), ", ", b_EXY.size(2),
              "), got ", grad_TD.sizes());
  TORCH_CHECK(grad_TD.scalar_type() == a_NX.scalar_type(), "moe.", op, ": grad_TD is ", grad_TD.scalar_type(),
              " but a_NX is ", a_NX.scalar_type());
  TORCH_CHECK(grad_TD.device() == a_NX.device(), "moe.", op, ": grad_TD is on ", grad_TD.device(),
              " but a_NX is on ", a_NX.device());
}

void check_linear_f32_args(const at::Tensor& x_TD, const at::Tensor& weight_ED, const char* op) {
  TORCH_CHECK(x_TD.dim() == 2, "moe.", op, ": x_TD must be 2-D (T, D), got shape ", x_TD.sizes());
  TORCH_CHECK(weight_ED.dim() == 2, "moe.", op, ": weight_ED must be 2-D (E, D), got shape ",
              weight_ED.sizes());
  TORCH_CHECK(is_mm_dtype(x_TD.scalar_type()),
              "moe.", op, ": x_TD must be float32/float64/bfloat16/float16, got ", x_TD.scalar_type());
  TORCH_CHECK(weight_ED.scalar_type() == x_TD.scalar_type(), "moe.", op, ": x_TD is ",
              x_TD.scalar_type(), " but weight_ED is ", weight_ED.scalar_type());
  TORCH_CHECK(weight_ED.device() == x_TD.device(), "moe.", op, ": weight_ED is on ",
              weight_ED.device(), " but x_TD is on ", x_TD.device());
  TORCH_CHECK(weight_ED.size(1) == x_TD.size(1), "moe.", op, ": x_TD has D=", x_TD.size(1),
              " but weight_ED has D=", weight_ED.size(1));
}

void check_linear_f32_backward_args(const at::Tensor& grad_TE, const at::Tensor& x_TD, const at::Tensor& weight_ED) {
  check_linear_f32_args(x_TD, weight_ED, "linear_f32_backward");
  const auto acc = accum_dtype(x_TD.scalar_type());
  TORCH_CHECK(grad_TE.dim() == 2 && grad_TE.size(0) == x_TD.size(0) && grad_TE.size(1) == weight_ED.size(0),
              "moe.linear_f32_backward: grad_TE must have shape (T, E) = (", x_TD.size(0), ", ",
              weight_ED.size(0), "), got ", grad_TE.sizes());
  TORCH_CHECK(grad_TE.scalar_type() == acc, "moe.linear_f32_backward: grad_TE must be ", acc,
              " (linear_f32's output dtype for ", x_TD.scalar_type(), " operands), got ", grad_TE.scalar_type());
  TORCH_CHECK(grad_TE.device() == x_TD.device(), "moe.linear_f32_backward: grad_TE is on ", grad_TE.device(),
              " but x_TD is on ", x_TD.device());
}

}  // namespace moe
