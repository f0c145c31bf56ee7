// The one place where moekit's op schemas are defined and the CPU kernels registered.
// CUDA kernels register themselves in csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(moe, CUDA, m)).
#ifdef MOE_PYTHON_MODULE
#include <Python.h>
#endif
#include <torch/library.h>

#include <exception>

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
  // c_NY[offs[e-1]:offs[e]] = a_NX[offs[e-1]:offs[e]] @ b_EXY[e]; rows past offs[E-1] are zero.
  m.def("grouped_mm(Tensor a_NX, Tensor b_EXY, Tensor offs_E) -> Tensor");
  // g_EXY[e] = a_NX[rows of e]^T @ g_NY[rows of e]; zero for experts with no rows.
  m.def("grouped_mm_wgrad(Tensor a_NX, Tensor g_NY, Tensor offs_E) -> Tensor");
  // grouped_mm(permute(x_TD, order_N, rows_TK), b_EXY, offs_E), the rows read from x_TD in place.
  m.def("gather_grouped_mm(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor b_EXY, Tensor offs_E) -> Tensor");
  // grouped_mm_wgrad(permute(x_TD, order_N, rows_TK), g_NY, offs_E), likewise.
  m.def("gather_grouped_mm_wgrad(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor g_NY, Tensor offs_E) -> Tensor");
  // x_TD @ weight_ED^T in float32 (float64 for float64): the routers' logits.
  m.def("linear_f32(Tensor x_TD, Tensor weight_ED) -> Tensor");
  // out = silu(gate) * up on h = [gate; up] (..., 2F) -> (..., F).
  m.def("swiglu(Tensor h) -> Tensor");
  // d h = [grad * up * silu'(gate); grad * silu(gate)], grad (..., F), h (..., 2F) -> (..., 2F).
  m.def("swiglu_backward(Tensor grad, Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("plan", &moe::plan_cpu);
  m.impl("permute", &moe::permute_cpu);
  m.impl("unpermute", &moe::unpermute_cpu);
  m.impl("unpermute_weights_grad", &moe::unpermute_weights_grad_cpu);
  m.impl("grouped_mm", &moe::grouped_mm_cpu);
  m.impl("grouped_mm_wgrad", &moe::grouped_mm_wgrad_cpu);
  m.impl("gather_grouped_mm", &moe::gather_grouped_mm_cpu);
  m.impl("gather_grouped_mm_wgrad", &moe::gather_grouped_mm_wgrad_cpu);
  m.impl("linear_f32", &moe::linear_f32_cpu);
  m.impl("swiglu", &moe::swiglu_cpu);
  m.impl("swiglu_backward", &moe::swiglu_backward_cpu);
}

#ifdef MOE_PYTHON_MODULE  // defined by setup.py only: the CMake (libtorch) library has no Python
// `import moe._C` loads this library, which runs the registrations above. The ops are reached
// through torch.ops.moe.*; the module itself only has the host cache's clear and stats.
namespace {

// C++ exceptions (e.g. a bad MOE_HOST_CACHE_MB) become Python RuntimeErrors, never an abort.
template <typename Fn>
PyObject* guarded(Fn&& fn) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* host_cache_clear(PyObject*, PyObject*) {
  return guarded([] {
    moe::host_cache_clear();
    Py_RETURN_NONE;
  });
}

PyObject* host_cache_stats(PyObject*, PyObject*) {
  return guarded([] {
    const auto s = moe::host_cache_stats();
    return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L}", "cached_bytes", (long long)s.cached_bytes,
                         "in_use_bytes", (long long)s.in_use_bytes, "hits", (long long)s.hits,
                         "misses", (long long)s.misses, "limit_bytes", (long long)s.limit_bytes);
  });
}

// What this build compiled in: {"cuda": CUDA kernels, "sm90_gemm": moekit's Hopper grouped GEMM,
// "sm90_forward_configs" / "sm90_wgrad_configs": the names of its configurations, by id}.
PyObject* build_info(PyObject*, PyObject*) {
  return guarded([] {
#ifdef MOE_WITH_CUDA
    PyObject* cuda = Py_True;
#else
    PyObject* cuda = Py_False;
#endif
    PyObject* forward = PyList_New(0);
    PyObject* wgrad = PyList_New(0);
#ifdef MOE_WITH_SM90_GEMM
    PyObject* sm90 = Py_True;
    for (int wg = 0; wg < 2; ++wg) {
      for (int id = 0; id < moe::cuda::sm90::num_configs(wg == 1); ++id) {
        PyObject* name = PyUnicode_FromString(moe::cuda::sm90::config(wg == 1, id).name);
        PyList_Append(wg == 1 ? wgrad : forward, name);
        Py_DECREF(name);
      }
    }
#else
    PyObject* sm90 = Py_False;
#endif
    PyObject* info = Py_BuildValue("{s:O,s:O,s:N,s:N}", "cuda", cuda, "sm90_gemm", sm90,
                                   "sm90_forward_configs", forward, "sm90_wgrad_configs", wgrad);
    return info;
  });
}

PyMethodDef methods[] = {
    {"host_cache_clear", host_cache_clear, METH_NOARGS,
     "Release every CPU buffer kept by moekit's host cache."},
    {"host_cache_stats", host_cache_stats, METH_NOARGS,
     "dict: cached_bytes, in_use_bytes, hits, misses, limit_bytes of moekit's host cache."},
    {"build_info", build_info, METH_NOARGS,
     "dict: which kernels this build of moe._C holds (cuda, sm90_gemm)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
#endif
