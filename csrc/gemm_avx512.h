// AVX-512 GEMM microkernels for the CPU grouped GEMM (see gemm_avx512.cpp).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace moe {

// True when this CPU runs the kernel for `dtype` (bfloat16: AVX-512 BF16; float32: AVX-512F)
// and MOE_CPU_GEMM is not "aten". Other dtypes: false.
bool avx512_gemm_available(at::ScalarType dtype);

// The B operand (X x Y, the same strides; with `rows`, its own row table as in Gather::b_rows)
// of the call likely to run next on this thread: its first panel is prefetched during this
// call's last one. B == nullptr: no hint.
template <typename T>
struct NextB {
  const T* B = nullptr;
  int64_t X = 0, Y = 0;
  const int64_t* rows = nullptr;
};

// Operands read through offset tables (gathered operands, never materialized), element offsets:
// A(m, x) = A[a_rows[m] + x * ax] with `a_rows`, A[m * am + a_cols[x]] with `a_cols`, and
// B(x, y) = B[b_rows[x] + y * by] with `b_rows` (B's depth rows gathered: the weight gradient
// g^T x of a gathered x, stored in an nn.Linear-style (Y, X) layout).
struct Gather {
  const int64_t* a_rows = nullptr;
  const int64_t* a_cols = nullptr;
  const int64_t* b_rows = nullptr;
};

// The most rows of one GEMM (one tile of an expert) that the grouped forward streams
// (avx512_gemm's `stream`): up to it each word of the expert's weight is read once from memory,
// in place; above it packing B pays for itself. Packing reads B a panel of 64 columns at a time
// down the whole depth, 128 bytes of each row: on wide weights (Mixtral's up projection, rows of
// 57 KB) that is a page per line. One thread, Zen 4 EPYC (bench.decode, one layer, ms, streamed up
// to 12 / 32 / 64 rows): Mixtral slice at ~21 rows per expert 272 / 186 / 202, ~43 rows 367 /
// 401 / 333; Qwen3 at 16 rows 165 / 151 / 144, 32 rows 271 / 263 / 266, 64 rows 442 / 450 / 480.
constexpr int64_t kStreamRows = 32;
// Deep weights stream further: a bfloat16 tile of up to kStreamRowsDeep rows streams when one
// packed panel of B (kYR = 64 columns down the whole depth X: 128 X bytes) exceeds a quarter of
// L2 (X > 2048 at 1 MiB), in depth blocks whose strips are packed once for all the tile's rows
// (gemm_stream.h BlockB). There the packed path's panel no longer stays in L2 for the tile's
// microkernel calls, and it reads B a panel of 128-byte row pieces at a time down the depth (a
// page per line on rows of many KiB). Two threads, bf16, ms, packed -> streamed: 3 Mixtral
// experts of 43 rows, up projection (X 4096) 135-157 -> 109, down (X 14336) 75-81 -> 54; 4
// DeepSeek-V3 experts, up projection (X 7168), 33 / 64 / 192 rows 33-37 / 48-56 / 139-158 ->
// 26 / 43 / 123-130; at X <= 2048 packing stays ahead (Qwen3's up projection at 64-192 rows: the
// streamed path 5-8% slower).
constexpr int64_t kStreamRowsDeep = 192;
// Whether a forward tile of M rows and depth X streams (avx512_gemm's `stream`), by the two rules
// above.
bool avx512_streams(int64_t M, int64_t X, bool bf16);
// The same for weights stored (E, Y, X), whose rows are dotted with the tile's rows
// (gemm_stream_yx.h: at most 12 rows of accumulators); above it their packing is a transpose.
constexpr int64_t kStreamRowsYX = 12;

// The output size from which a grouped GEMM writes C with non-temporal stores (avx512_gemm's
// nt_store): C is then far larger than any cache, so it goes to memory anyway, and a plain store
// would first read each line it writes (a read for ownership), doubling the output's traffic.
// At E=128 experts of T=4096 x 8 rows, the expert outputs and weight gradients are E/K = 16 times
// a dense layer's (the weight gradient of the up projection: 235 MB in float32): on the Zen 4
// EPYC of the README (one L3 of 32 MiB per 8 cores), float32, the layer's six GEMMs took 770 ->
// 722 ms with them (the down projection 90 -> 81, its weight gradient 91 -> 82, the up
// projection's 180 -> 162), bfloat16 348 -> 346 ms. A fixed size rather than the L3's: sysconf
// reports the whole socket's L3 (320 MiB there), not the part one core's data can use.
constexpr int64_t kNtStoreBytes = int64_t(32) << 20;

// This CPU's L2 cache per core in bytes (sysconf; 1 MiB where the system does not say): the
// streamed path keeps its partial sums within a quarter of it.
int64_t cpu_l2_bytes();

// C (M x Y, row stride ldc) = A (M x X) @ B (X x Y), fp32 accumulation, C in the inputs' dtype:
// one plain GEMM of M rows, depth X and Y output columns (the shape legend of moe_ops.h).
// A(m, x) = A[m * am + x * ax], B(x, y) = B[x * bx + y * by] (element strides, any layout).
// With `stream` and B's rows contiguous (by == 1, no b_rows), B is read in place, 64 columns at a
// time, instead of packed (for few rows: each word of B is used M times); with `stream`, B stored
// (Y x X) (bx == 1, no b_rows) and M <= kStreamRowsYX, each of B's rows is read in place once and
// dotted with A's rows (the same rule, another summation order). With `nt_store` the packed
// path writes C's full, aligned vectors with non-temporal stores (kNtStoreBytes). Single-threaded:
// the grouped GEMM calls it from its own parallel tiles.
void avx512_gemm(int64_t M, int64_t Y, int64_t X, const c10::BFloat16* A, int64_t am, int64_t ax,
                 const c10::BFloat16* B, int64_t bx, int64_t by, c10::BFloat16* C, int64_t ldc,
                 NextB<c10::BFloat16> next = {}, Gather gather = {}, bool stream = false,
                 bool nt_store = false);
void avx512_gemm(int64_t M, int64_t Y, int64_t X, const float* A, int64_t am, int64_t ax,
                 const float* B, int64_t bx, int64_t by, float* C, int64_t ldc,
                 NextB<float> next = {}, Gather gather = {}, bool stream = false,
                 bool nt_store = false);
// bfloat16 inputs, float32 C: the fp32 sums are stored unrounded (blocked like the float32 path);
// A's rows may be gathered (Gather::a_rows) as in the call above.
void avx512_gemm(int64_t M, int64_t Y, int64_t X, const c10::BFloat16* A, int64_t am, int64_t ax,
                 const c10::BFloat16* B, int64_t bx, int64_t by, float* C, int64_t ldc, Gather gather = {});

}  // namespace moe
