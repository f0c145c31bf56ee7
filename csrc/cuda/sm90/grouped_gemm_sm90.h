// moekit's own Hopper (sm_90a) grouped GEMM: CUTLASS 3 / CuTe kernels (TMA loads, wgmma,
// warp-specialised persistent CTAs, per-expert problem sizes read on the device), behind a plain
// C++ interface so that these translation units need no torch headers and compile for sm_90a
// alone (setup.py and CMake build them apart from the other CUDA sources).
//
// Shape legend (moe_ops.h): N routed rows of a_NX (the host-side bound T*K; rows past
// offs_E[E-1] are padding), E experts, X/Y the GEMM input/output dims, rows_e expert e's rows.
// CUTLASS's problem shape (M, N, K) is (rows, Y, X) in moekit's legend (rows: one GEMM's M).
//
//   forward: c_NY[rows of e] = a_NX[rows of e] @ b_EXY[e]     problem e = (rows_e, Y, X)
//   wgrad:   c_EXY[e] = a_NX[rows of e]^T @ g_NY[rows of e]    problem e = (X, Y, rows_e)
//
// The rows of e are offs_E[e-1]..offs_E[e] (offs_E int32 on the device, never read on the host:
// a setup kernel asserts them, turns them into CUTLASS's per-group pointers, strides and problem
// shapes in the caller's workspace, and writes the contract's zeros: the padding rows of c_NY, the
// weight gradients of experts with no rows). Two launches per call, no host sync.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe::cuda::sm90 {

struct GroupedGemm {
  bool wgrad = false;
  const void* a = nullptr;   // a_NX, row-major (element stride 1), row stride lda
  int64_t lda = 0;
  const void* b = nullptr;   // forward: b_EXY; wgrad: g_NY (row-major, row stride ldb)
  int64_t ldb = 0;           // forward: b's stride over x (row-major b) or over y (b_col)
  int64_t b_batch = 0;       // forward: b's stride over e
  bool b_col = false;        // forward: b[e, x, y] has x contiguous (a transposed nn.Linear weight)
  void* c = nullptr;         // contiguous output: c_NY (N, Y) or c_EXY (E, X, Y)
  const int* offs = nullptr; // offs_E (E,) int32, device
  int E = 0, N = 0, X = 0, Y = 0;
  int sm_count = 0, device = 0;
};

// A kernel configuration: CTA tile, cluster and warp-group schedule.
struct Config {
  const char* name;
  int tile_m, tile_n, tile_k;  // CUTLASS's tile shape (M, N, K) = (rows, Y, X) of one problem
};

// The forward (wgrad=false) or weight-gradient configurations compiled in, in a fixed order (the
// index is the config id).
int num_configs(bool wgrad);
Config config(bool wgrad, int id);
// The configuration used for a problem, chosen from host-known sizes only: N/E (the mean rows per
// expert, an upper bound on the routed mean), X and Y.
int choose_config(bool wgrad, int64_t N, int64_t E, int64_t X, int64_t Y);

// Device scratch bytes for run() (per-group arrays + CUTLASS's workspace).
size_t workspace_bytes(const GroupedGemm& g, int id);
// Enqueues the GEMM on `stream` with config `id` of g.wgrad's table; `workspace` holds
// workspace_bytes(g, id) bytes of device memory (256-byte aligned). Returns nullptr on success,
// else a message naming what failed. No host-device synchronisation.
const char* run(const GroupedGemm& g, int id, void* workspace, cudaStream_t stream);

// Entry points of one configuration, each defined in its translation unit (forward_c<ID>.cu,
// wgrad_c<ID>.cu) and listed in table.cu.
template <int ID>
size_t forward_workspace(const GroupedGemm& g);
template <int ID>
const char* forward_run(const GroupedGemm& g, void* ws, cudaStream_t stream);
template <int ID>
size_t wgrad_workspace(const GroupedGemm& g);
template <int ID>
const char* wgrad_run(const GroupedGemm& g, void* ws, cudaStream_t stream);

}  // namespace moe::cuda::sm90
