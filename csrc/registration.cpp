// The one place where moekit's op schemas are defined and the CPU kernels registered.
// CUDA kernels register themselves in csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(moe, CUDA, m)).
#ifdef MOE_PYTHON_MODULE
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#endif
#include <torch/library.h>

#include <exception>

#include "config.h"
#include "gemm_avx512.h"
#include "host_cache.h"
#include "moe_ops.h"
#ifdef MOE_WITH_SM90_GEMM
#include "cuda/sm90/grouped_gemm_sm90.h"
#endif

TORCH_LIBRARY(moe, m) {
  // counts_E, offs_E (int32), order_N (int64, length T*K, -1 past offs_E[-1]), rows_TK (int64).
  m.def("plan(Tensor ids_TK, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  // x_ND[i] = x_TD[order_N[i] // K] (* scale_TK.flatten()[order_N[i]]); zero where order_N[i] < 0.
  m.def("permute(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor? scale_TK=None) -> Tensor");
  // y_TD[t] = sum_k weights_TK[t, k] * y_ND[rows_TK[t, k]] over slots with rows_TK >= 0.
  m.def("unpermute(Tensor y_ND, Tensor order_N, Tensor rows_TK, Tensor? weights_TK=None) -> Tensor");
  // dw_TK[t, k] = <grad_TD[t], y_ND[rows_TK[t, k]]>, 0 for empty slots (float32 for half types).
  m.def("unpermute_weights_grad(Tensor grad_TD, Tensor y_ND, Tensor order_N, Tensor rows_TK) -> Tensor");
  // (permute(grad_TD, order_N, rows_TK, weights_TK), unpermute_weights_grad(grad_TD, y_ND, order_N,
  // rows_TK)): the weighted unpermute's backward in one pass; an output not asked for is empty.
  m.def("unpermute_backward(Tensor grad_TD, Tensor y_ND, Tensor order_N, Tensor rows_TK, Tensor weights_TK, "
        "bool grad_y=True, bool grad_weights=True) -> (Tensor, Tensor)");
  // c_NY[offs[e-1]:offs[e]] = a_NX[offs[e-1]:offs[e]] @ b_EXY[e]; rows past offs[E-1] are zero.
  m.def("grouped_mm(Tensor a_NX, Tensor b_EXY, Tensor offs_E) -> Tensor");
  // g_EXY[e] = a_NX[rows of e]^T @ g_NY[rows of e]; zero for experts with no rows.
  m.def("grouped_mm_wgrad(Tensor a_NX, Tensor g_NY, Tensor offs_E) -> Tensor");
  // grouped_mm(permute(x_TD, order_N, rows_TK), b_EXY, offs_E), the rows read from x_TD in place.
  m.def("gather_grouped_mm(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor b_EXY, Tensor offs_E) -> Tensor");
  // grouped_mm_wgrad(permute(x_TD, order_N, rows_TK), g_NY, offs_E), likewise; out_yx: the same
  // (E, X, Y) values stored (E, Y, X), the layout of an nn.Linear-style weight.
  m.def("gather_grouped_mm_wgrad(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor g_NY, Tensor offs_E, bool out_yx=False) -> Tensor");
  // grouped_mm's backward in one op: (grouped_mm(grad_NY, b_EXY^T, offs_E), the weight gradient in
  // b_EXY's layout: grouped_mm_wgrad(a_NX, grad_NY, offs_E), or for a transposed (E, Y, X) view
  // grouped_mm_wgrad(grad_NY, a_NX, offs_E)^T); an output not asked for is an empty (0, X) / (0, X, Y).
  m.def("grouped_mm_backward(Tensor grad_NY, Tensor a_NX, Tensor b_EXY, Tensor offs_E, bool grad_a=True, "
        "bool grad_b=True) -> (Tensor, Tensor)");
  // gather_grouped_mm's likewise: (unpermute(grouped_mm(grad_NY, b_EXY^T, offs_E), order_N, rows_TK),
  // gather_grouped_mm_wgrad(x_TD, order_N, rows_TK, grad_NY, offs_E, b_EXY's layout)); (0, X) / (0, X, Y).
  m.def("gather_grouped_mm_backward(Tensor grad_NY, Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor b_EXY, "
        "Tensor offs_E, bool grad_x=True, bool grad_b=True) -> (Tensor, Tensor)");
  // (swiglu(h_NH), h_NH if keep_h else (0, 2F)) with h_NH = gather_grouped_mm(...) and b_EXY's
  // Y = 2F = [gate; up]: the first projection with SwiGLU's epilogue (one launch at decode sizes on
  // CUDA); keep_h returns h_NH, what the backward needs.
  m.def("gather_grouped_mm_swiglu(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor b_EXY, Tensor offs_E, "
        "bool keep_h=False) -> (Tensor, Tensor)");
  // unpermute(grouped_mm(a_NX, b_EXY, offs_E), weights_TK) (with swiglu, of swiglu(a_NX)): the down
  // projection and the weighted combine; its backward needs no (N, Y) product (d weights =
  // <a_i, grad_t @ b_e^T>), and with swiglu no (N, X) activation either (recomputed from h).
  m.def("grouped_mm_unpermute(Tensor a_NX, Tensor b_EXY, Tensor offs_E, Tensor order_N, Tensor rows_TK, "
        "Tensor? weights_TK=None, bool swiglu=False) -> Tensor");
  m.def("grouped_mm_unpermute_backward(Tensor grad_TD, Tensor a_NX, Tensor b_EXY, Tensor offs_E, Tensor order_N, "
        "Tensor rows_TK, Tensor? weights_TK=None, bool grad_a=True, bool grad_b=True, bool grad_weights=True, "
        "bool swiglu=False) -> (Tensor, Tensor, Tensor)");
  // x_TD @ weight_ED^T in float32 (float64 for float64): the routers' logits.
  m.def("linear_f32(Tensor x_TD, Tensor weight_ED) -> Tensor");
  // (grad_TE @ weight_ED, grad_TE^T @ x_TD) in grad's dtype, cast to the operands' dtype: the
  // gradients of linear_f32; an output not asked for (grad_x / grad_weight false) is (0, D).
  m.def("linear_f32_backward(Tensor grad_TE, Tensor x_TD, Tensor weight_ED, bool grad_x=True, "
        "bool grad_weight=True) -> (Tensor, Tensor)");
  // out = silu(gate) * up on h = [gate; up] (..., 2F) -> (..., F).
  m.def("swiglu(Tensor h) -> Tensor");
  // d h = [grad * up * silu'(gate); grad * silu(gate)], grad (..., F), h (..., 2F) -> (..., 2F).
  m.def("swiglu_backward(Tensor grad, Tensor h) -> Tensor");
  // A token-choice router in one pass per token (csrc/router.cpp; num_groups = topk_groups = 0: no
  // group limit): (ids_TK, weights_TK, probs_TE, counts_E, metrics (dropped_fraction 0,
  // experts_per_token), fw_BE, psum_BE, zsum, balance) from logits_TE; padded tokens (valid_T false) get
  // ids -1; num_seqs = B > 0 adds the loss statistics over B sequences. rule "xmoe" / "top_p" (the
  // threshold router: softmax, no bias or groups) keeps the prefix of each token's top_k that the
  // rule keeps at threshold, the other slots -1 with weight 0; "none" keeps all top_k. fw_BE comes
  // multiplied by fw_scale (a balance loss's coefficient times E) and zsum by z_scale (a z-loss's
  // coefficient over the tokens: zsum is then the loss); balance = sum(fw_BE * psum_BE), then the
  // balance loss.
  m.def("topk_route(Tensor logits_TE, Tensor? bias_E, int top_k, str score, int num_groups, int topk_groups, "
        "bool norm_topk, float scaling, Tensor? valid_T=None, int num_seqs=0, bool check_finite=False, "
        "str rule=\"none\", float threshold=1.0, float fw_scale=1.0, float z_scale=1.0) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // d logits_TE from d weights_TK and (optional) d probs_TE, d psum_BE, d zsum (zsum the forward's,
  // times z_scale) and d balance (with fw_BE).
  m.def("topk_route_backward(Tensor grad_weights_TK, Tensor? grad_probs_TE, Tensor ids_TK, Tensor probs_TE, "
        "str score, bool norm_topk, float scaling, Tensor? grad_psum_BE=None, Tensor? grad_zsum=None, "
        "Tensor? logits_TE=None, Tensor? valid_T=None, float z_scale=1.0, Tensor? grad_balance=None, "
        "Tensor? fw_BE=None) -> Tensor");
  // Weight-only int8 experts (inference): c_NY[i, y] = (a_NX[i] . q_EYX[e, y]) * scale_EY[e, y]
  // for the rows i of expert e, float32 sums, in a_NX's dtype; rows past offs[E-1] are zero.
  m.def("grouped_mm_w8(Tensor a_NX, Tensor q_EYX, Tensor scale_EY, Tensor offs_E) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("plan", &moe::plan_cpu);
  m.impl("permute", &moe::permute_cpu);
  m.impl("unpermute", &moe::unpermute_cpu);
  m.impl("unpermute_weights_grad", &moe::unpermute_weights_grad_cpu);
  m.impl("unpermute_backward", &moe::unpermute_backward_cpu);
  m.impl("grouped_mm", &moe::grouped_mm_cpu);
  m.impl("grouped_mm_wgrad", &moe::grouped_mm_wgrad_cpu);
  m.impl("gather_grouped_mm", &moe::gather_grouped_mm_cpu);
  m.impl("gather_grouped_mm_wgrad", &moe::gather_grouped_mm_wgrad_cpu);
  m.impl("grouped_mm_backward", &moe::grouped_mm_backward_cpu);
  m.impl("gather_grouped_mm_backward", &moe::gather_grouped_mm_backward_cpu);
  m.impl("gather_grouped_mm_swiglu", &moe::gather_grouped_mm_swiglu_cpu);
  m.impl("grouped_mm_unpermute", &moe::grouped_mm_unpermute_cpu);
  m.impl("grouped_mm_unpermute_backward", &moe::grouped_mm_unpermute_backward_cpu);
  m.impl("linear_f32", &moe::linear_f32_cpu);
  m.impl("linear_f32_backward", &moe::linear_f32_backward_cpu);
  m.impl("swiglu", &moe::swiglu_cpu);
  m.impl("swiglu_backward", &moe::swiglu_backward_cpu);
  m.impl("topk_route", &moe::topk_route_cpu);
  m.impl("topk_route_backward", &moe::topk_route_backward_cpu);
  m.impl("grouped_mm_w8", &moe::grouped_mm_w8_cpu);  // csrc/grouped_mm_int8.cpp
}

#ifdef MOE_PYTHON_MODULE  // defined by setup.py only: the CMake (libtorch) library has no Python
// `import moe._C` loads this library, which runs the registrations above. The ops are reached
// through torch.ops.moe.*; the module itself holds the host cache's clear and stats, the backend
// settings (moe.ops.config) and what the build holds.
namespace py = pybind11;

namespace {

// What this build compiled in: {"cuda": CUDA kernels, "sm90_gemm": moekit's Hopper grouped GEMM,
// "sm90_forward_configs" / "sm90_wgrad_configs": the names of its configurations, by id}.
py::dict build_info() {
  py::dict info;
#ifdef MOE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  py::list forward, wgrad;
#ifdef MOE_WITH_SM90_GEMM
  info["sm90_gemm"] = true;
  for (int id = 0; id < moe::cuda::sm90::num_configs(false); ++id)
    forward.append(moe::cuda::sm90::config(false, id).name);
  for (int id = 0; id < moe::cuda::sm90::num_configs(true); ++id)
    wgrad.append(moe::cuda::sm90::config(true, id).name);
#else
  info["sm90_gemm"] = false;
#endif
  info["sm90_forward_configs"] = forward;
  info["sm90_wgrad_configs"] = wgrad;
  // The most rows per expert, on average, at which the CUDA forward GEMMs stream the weights
  // (csrc/cuda/stream_gemm.cuh; moe.ops.config.cuda_gemm "auto").
  info["cuda_stream_rows"] = moe::config::kCudaStreamRows;
  // What the CPU grouped GEMMs run here, now (this CPU's features, moe.ops.config.cpu_gemm):
  // moekit's kernel by its instruction set, or "aten" (at::mm), and the most rows per expert
  // that the forward streams (gemm_avx512.h; _deep: bfloat16 weights whose packed panel exceeds
  // a quarter of L2), the L2 size its blocking is sized from, and the
  // output size from which it writes with non-temporal stores.
  py::dict cpu;
  cpu["float32"] = moe::avx512_gemm_available(at::kFloat) ? "avx512" : "aten";
  cpu["bfloat16"] = moe::avx512_gemm_available(at::kBFloat16) ? "avx512_bf16" : "aten";
  info["cpu_gemm"] = cpu;
  info["cpu_stream_rows"] = moe::kStreamRows;
  info["cpu_stream_rows_yx"] = moe::kStreamRowsYX;
  info["cpu_stream_rows_deep"] = moe::kStreamRowsDeep;
  info["cpu_l2_bytes"] = moe::cpu_l2_bytes();
  info["cpu_nt_store_bytes"] = moe::kNtStoreBytes;
  return info;
}

py::dict host_cache_stats() {
  const auto s = moe::host_cache_stats();
  py::dict out;
  out["cached_bytes"] = s.cached_bytes;
  out["in_use_bytes"] = s.in_use_bytes;
  out["hits"] = s.hits;
  out["misses"] = s.misses;
  out["limit_bytes"] = s.limit_bytes;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  // C++ errors (a bad MOE_HOST_CACHE_MB, an invalid setting) become RuntimeErrors (ValueError,
  // TypeError, IndexError for c10's subclasses of those names) without the C++ backtrace.
  // pybind11 shares its translators between modules and tries the latest first, so this one sees
  // every c10::Error raised through pybind11 (torch.ops included): keep PyTorch's Python types.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.def("host_cache_clear", &moe::host_cache_clear,
        "Release every CPU buffer kept by moekit's host cache.");
  m.def("host_cache_stats", &host_cache_stats,
        "dict: cached_bytes, in_use_bytes, hits, misses, limit_bytes of moekit's host cache.");
  m.def("build_info", &build_info, "dict: which kernels this build of moe._C holds.");
  m.def("cpu_gemm_streams", &moe::avx512_streams, py::arg("rows"), py::arg("X"), py::arg("bf16"),
        "Whether the CPU forward GEMM streams the weight of a tile of `rows` rows and depth X "
        "(csrc/gemm_avx512.h avx512_streams) rather than packing it.");
  m.def("config_names", &moe::config::names, "The backend settings' names (csrc/config.h).");
  m.def("config_get", &moe::config::get, "A backend setting's current value.");
  m.def("config_is_set", &moe::config::is_set, "Whether a backend setting was set explicitly.");
  m.def("config_set", &moe::config::set,
        "Sets a backend setting (validated); \"\" returns to its environment variable.");
}
#endif
