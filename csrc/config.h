// moekit's backend settings: one table, read by the kernels, set from Python through
// moe.ops.config (or from C++ with set()). Each setting's default is its environment variable,
// read at the first use; an invalid value raises an error naming the variable at that use (and
// again at every use until it is fixed or overridden).
#pragma once

#include <string>
#include <vector>

namespace moe::config {

// cpu_gemm (MOE_CPU_GEMM): "auto" = moekit's AVX-512 GEMM where the CPU has it; "aten" = at::mm.
enum class CpuGemm : int { kAuto = 0, kAten = 1 };
// cuda_gemm (MOE_CUDA_GEMM): "auto" = moekit's weight-streaming kernel for forward GEMMs with at
// most kCudaStreamRows rows per expert on average (N <= kCudaStreamRows * E, host-known sizes),
// else moekit's sm90 GEMM on compute capability 9.0 where built, else PyTorch's grouped GEMM where
// it serves the call; "native" = moekit's WMMA kernels; "torch" = PyTorch's grouped GEMM where it
// serves the call; "stream" = the weight-streaming kernel for every forward GEMM whose layout it
// takes, the rest as "auto" (csrc/cuda/stream_gemm.cuh).
enum class CudaGemm : int { kAuto = 0, kNative = 1, kTorch = 2, kStream = 3 };
// 4: the streaming kernel's largest pass, so at the mean an expert's weights are read once (more
// rows take passes that re-read them; bench/gpu_gemm_sweep.py's decode rows time both kernels).
constexpr long long kCudaStreamRows = 4;

// sm90_gathered (MOE_SM90_GATHERED): the kernels of moe.gather_grouped_mm,
// moe.gather_grouped_mm_swiglu, moe.gather_grouped_mm_wgrad and the forward of
// moe.grouped_mm_unpermute on sm90 where moekit's sm90 GEMM serves the call. "fused" = moekit's
// one-launch gathered GEMMs (csrc/cuda/sm90/gathered_gemm.cu: x_TD's rows read in place, SwiGLU in
// the epilogue; for grouped_mm_unpermute the routing weights in the epilogue and token-major rows,
// summed contiguously); "unfused" = the setup launch's gather and the CUTLASS grouped GEMM (then the
// swiglu kernel; grouped_mm then unpermute); "auto" = "unfused" until the fused kernel has passed the GPU checks
// (tests/gpu, bench/gpu_check.sh), which no device has run yet.
enum class Sm90Gathered : int { kAuto = 0, kFused = 1, kUnfused = 2 };

CpuGemm cpu_gemm();
CudaGemm cuda_gemm();
Sm90Gathered sm90_gathered();
// sm90_forward_config / sm90_wgrad_config (MOE_SM90_GEMM_CONFIG / MOE_SM90_WGRAD_CONFIG): a
// configuration id of the Hopper GEMM, or "auto" (-1 here): the table picks from the sizes.
int sm90_config(bool wgrad);

// By name, values as strings (the Python binding): the setting names, the current value
// (resolving the environment default), set (validated; "" goes back to the environment default).
std::vector<std::string> names();
std::string get(const std::string& name);
bool is_set(const std::string& name);  // set explicitly (else the environment variable decides)
void set(const std::string& name, const std::string& value);

}  // namespace moe::config
