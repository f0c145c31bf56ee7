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
// weight gradients of experts with no rows). Two launches per GEMM, no host sync; a backward's two
// GEMMs (d a and d b) share one setup launch: three. Gathered rows (a permuted copy of x_TD) are
// written by the setup launch too (Gather).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

// A device-side assert that NDEBUG (defined in the sm90 units for the wgmma pipeline) leaves in:
// CUDA declares __assert_fail for device code whatever NDEBUG says; the failure is reported as
// PyTorch's CUDA_KERNEL_ASSERT reports it (a device-side assert).
#define MOE_SM90_ASSERT(cond, msg)                                 \
  do {                                                             \
    if (!(cond)) __assert_fail(msg, __FILE__, __LINE__, __func__); \
  } while (0)

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

// The per-group arrays at the front of a GEMM's workspace, byte offsets for E groups: pointers to
// each group's a, b and c rows; their strides (each CUTLASS stride type here holds one int64, the
// leading dimension: Sm90GroupedGemm asserts it); CUTLASS's (M, N, K) per group (three ints);
// then, 256-byte aligned, CUTLASS's own workspace. The setup kernel (table.cu) writes the arrays
// and the CUTLASS kernel reads them, whatever the configuration.
struct GroupArrays {
  size_t ptr_a, ptr_b, ptr_c, stride_a, stride_b, stride_c, shapes, cutlass;
};
__host__ __device__ inline GroupArrays group_arrays(int E) {
  size_t at = 0;
  auto take = [&](size_t bytes) { const size_t here = at; at = (at + bytes + 15) / 16 * 16; return here; };
  GroupArrays l{};
  l.ptr_a = take(sizeof(void*) * E);
  l.ptr_b = take(sizeof(void*) * E);
  l.ptr_c = take(sizeof(void*) * E);
  l.stride_a = take(sizeof(int64_t) * E);
  l.stride_b = take(sizeof(int64_t) * E);
  l.stride_c = take(sizeof(int64_t) * E);
  l.shapes = take(3 * sizeof(int) * E);
  l.cutlass = (at + 255) / 256 * 256;
  return l;
}

// Device scratch bytes for one GEMM of run() (its group arrays + CUTLASS's workspace).
size_t workspace_bytes(const GroupedGemm& g, int id);
// The most GEMMs one run() takes: a backward's two (d a and d b of one grouped GEMM).
constexpr int kMaxRun = 2;

// x_TD's rows through the plan, as the sm90 kernels read them: routed row i is row order[i] / K of
// x (zeros where order[i] < 0; order's entries are in [-1, slots), else a device-side error); with
// order nullptr, x holds the routed rows themselves (row i of an (N, D) x: the down projection's
// activation). bfloat16 with unit column stride; D and ldx multiples of 8 elements, x 16-byte
// aligned.
struct GatheredX {
  const void* x = nullptr;         // x_TD (or x_ND), row stride ldx (elements)
  int64_t ldx = 0;
  const int64_t* order = nullptr;  // order_N (N,), or nullptr: x's rows are the routed rows
  int64_t slots = 0;               // T * K
  int K = 1;
};

// Rows gathered by the setup launch into a GEMM operand (moe.permute's copy without a launch of its
// own, for gather_grouped_mm and its weight gradient): out (N, D) contiguous, out[i] = routed row
// i of `rows`, 16-byte aligned.
struct Gather {
  GatheredX rows;
  void* out = nullptr;
  int64_t N = 0, D = 0;
};

// Enqueues `count` (1..kMaxRun) GEMMs on `stream`: one setup launch for all of them (it asserts
// each GEMM's offs_E, writes its group arrays and the contract's zeros, and gathers `gather`'s
// rows when given), then each CUTLASS kernel in turn. GEMM i runs config ids[i] of g[i].wgrad's
// table with ws[i] holding workspace_bytes(g[i], ids[i]) bytes of device memory (256-byte
// aligned, one buffer per GEMM). Returns nullptr on success, else a message naming what failed.
// No host-device synchronisation.
const char* run(const GroupedGemm* g, const int* ids, void* const* ws, int count, cudaStream_t stream,
                const Gather* gather = nullptr);

// moekit's own gathered grouped GEMM, one launch (gathered_gemm.cu: TMA and wgmma from CuTe's
// atoms, no CUTLASS collective): the rows of x_TD gathered through order_N straight into shared
// memory (cp.async, no T*K x D copy), b read by a TMA box of two 64-column halves, and with `swiglu`
// SwiGLU in the epilogue (the halves are an expert's gate columns f..f+63 and up columns
// F+f..F+f+63 of moekit's [gate; up] weight, no relayout):
//   h[i] = x[order[i] / K] @ b[e]  (rows i of expert e, h (N, Y) with Y = 2F when swiglu)
//   swiglu: act[i, f] = silu(h[i, f]) * h[i, F + f], from h rounded to bfloat16 (the unfused ops'
//   values); h written only when `h` is given. Without swiglu h is the output (gather_grouped_mm).
// Zeros for the padding rows [offs_E[E-1], N) and rows with order[i] < 0 (h or act; token-major,
// below, nothing is stored for them). bfloat16; swiglu: F a
// multiple of 64, else Y a multiple of 128; D, ldx, ldb and b_batch multiples of 8; x and b 16-byte
// aligned; 1 <= E <= kGatheredMaxExperts.
// With `scatter` (no swiglu; the down projection of grouped_mm_unpermute), the epilogue stores
// token-major instead of h: routed row i's values times its routing weight, in float, rounded once,
// go to row s = scatter[i] of out_s (slots, Y), slot s = t * K + k, so that the combine is a
// contiguous sum over each token's K rows; rows with s < 0 (padding) are not stored, nor are the
// rows of slots that no routed row holds (dropped slots: the combine skips them through rows_TK).
//   out_s[scatter[i]] = weights[scatter[i]] * (a_i @ b[e])    (weights float32 or bfloat16; nullptr: 1)
// scatter's entries must lie in [-1, slots) (else a trap).
constexpr int kGatheredMaxExperts = 1024;
struct GatheredGemm {
  GatheredX rows;
  const void* b = nullptr;         // b_EXY (E, D, Y): b[e, x, y] at e * b_batch + x * ldb + y, or
  int64_t ldb = 0, b_batch = 0;    // with b_col at e * b_batch + y * ldb + x (nn.Linear's (E, Y, D))
  bool b_col = false;
  const int* offs = nullptr;       // offs_E (E,) int32, device
  bool swiglu = false;
  void* act = nullptr;             // swiglu: (N, Y / 2) contiguous
  void* h = nullptr;               // (N, Y) contiguous; with swiglu may be nullptr (not written)
  // the token-major epilogue (scatter given): out_s, not h, is the output
  const int64_t* scatter = nullptr;  // out_s's row of each routed row: order_N (N,)
  const void* weights = nullptr;     // (slots,) routing weights, float32 (bfloat16 with weights_bf16), or nullptr
  bool weights_bf16 = false;
  void* out_s = nullptr;             // (slots, Y) contiguous
  int64_t slots = 0;
  int E = 0, N = 0, D = 0, Y = 0;
  int sm_count = 0;
};
// nullptr if gathered_gemm takes `p`'s sizes and layouts (the rules above; the outputs are not
// looked at), else the rule that fails.
const char* gathered_gemm_unsupported(const GatheredGemm& p);
// Enqueues the kernel on `stream` (no host-device synchronisation). Returns nullptr on success,
// else a message naming what failed.
const char* gathered_gemm(const GatheredGemm& p, cudaStream_t stream);

// gather_grouped_mm_wgrad in one launch of the same engine (gathered_gemm.cu): d b[e] = x_rows(e)^T
// @ g_rows(e) with x_TD's rows read in place through order_N (no T*K x D copy); out (E, D, Y)
// contiguous, or with out_yx (E, Y, D) (the transposed layout, for nn.Linear-style weights);
// experts with no rows get zeros. bfloat16; D, Y, ldx and ldg multiples of 8; x and g 16-byte
// aligned.
struct GatheredWgrad {
  GatheredX rows;
  const void* g = nullptr;  // g_NY, row stride ldg, unit column stride
  int64_t ldg = 0;
  const int* offs = nullptr;
  bool out_yx = false;
  void* out = nullptr;
  int E = 0, N = 0, D = 0, Y = 0;
  int sm_count = 0;
};
const char* gathered_wgrad_unsupported(const GatheredWgrad& p);
const char* gathered_wgrad(const GatheredWgrad& p, cudaStream_t stream);

// Entry points of one configuration, each defined in its translation unit (forward_c<ID>.cu,
// wgrad_c<ID>.cu) and listed in table.cu: CUTLASS's workspace bytes and its kernel alone (the
// group arrays written by the setup launch before it).
template <int ID>
size_t forward_workspace(const GroupedGemm& g);
template <int ID>
const char* forward_gemm(const GroupedGemm& g, void* ws, cudaStream_t stream);
template <int ID>
size_t wgrad_workspace(const GroupedGemm& g);
template <int ID>
const char* wgrad_gemm(const GroupedGemm& g, void* ws, cudaStream_t stream);

}  // namespace moe::cuda::sm90
