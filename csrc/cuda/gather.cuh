// Gather/scatter kernels of moe.permute / moe.unpermute / moe.unpermute_weights_grad /
// moe.unpermute_backward, launched by
// csrc/cuda/dispatch.cu (kept in a header so the CUDA build stays at two translation units).
//
// Shape legend: T tokens, K top-k slots per token, S = T*K slots, N routed rows, D feature dim.
// One warp per output row; VEC consecutive elements per 16-byte access (VEC = 1 when the rows are
// not 16-byte aligned); each lane keeps kUnroll accesses in flight (all loads of a step are issued
// before the first use: with one row per warp, a 4096-token batch fills only half an H200's warp
// slots, so the bytes in flight must come from each warp, and from splitting rows: kChunk). unpermute adds in slot order k = 0..K-1 with separately rounded multiplies
// and adds (add_rn/mul_rn), in at::opmath_type, exactly like the CPU kernel and the twin.
#pragma once

#include "common.cuh"

namespace moe::cuda {
// Internal linkage, as when these lived in dispatch.cu (nvcc's kernel stubs need the kernels and
// their callers in the same namespace).
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kUnroll = 4;
// Vectors of a row per warp: rows are split into chunks of kChunk (blockIdx.y), so small batches
// still give every SM enough warps (4096 tokens of an 8 KB row: 16384 warps, not 4096).
constexpr int64_t kChunk = kWarp * kUnroll;

template <typename T, typename W, int VEC>
__global__ void permute_kernel(const T* __restrict__ x, int64_t ldx,
                               const int64_t* __restrict__ order, const W* __restrict__ scale,
                               int64_t N, int64_t S, int K, int64_t nvec, T* __restrict__ out) {
  using acc_t = at::opmath_type<T>;
  using V = Vec<T, VEC>;
  const int64_t i = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= N) return;
  const int64_t s = order[i];
  CUDA_KERNEL_ASSERT(s >= -1 && s < S && "moe.permute: order_N does not match rows_TK");
  V* o = reinterpret_cast<V*>(out + i * nvec * VEC);
  const int64_t v_lo = int64_t(blockIdx.y) * kChunk, v_hi = min(nvec, v_lo + kChunk);
  if (s < 0 || s >= S) {  // padding row: zeros, nothing read
    V z;
#pragma unroll
    for (int j = 0; j < VEC; ++j) z.v[j] = static_cast<T>(0.0f);
    for (int64_t v = v_lo + lane; v < v_hi; v += kWarp) o[v] = z;
    return;
  }
  const V* src = reinterpret_cast<const V*>(x + (s / K) * ldx);
  const acc_t w = scale == nullptr ? acc_t(1) : static_cast<acc_t>(scale[s]);
  for (int64_t v0 = v_lo + lane; v0 < v_hi; v0 += kWarp * kUnroll) {
    V a[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (v0 + u * kWarp < v_hi) a[u] = src[v0 + u * kWarp];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + u * kWarp >= v_hi) break;
      if (scale != nullptr) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) a[u].v[j] = static_cast<T>(mul_rn(static_cast<acc_t>(a[u].v[j]), w));
      }
      o[v0 + u * kWarp] = a[u];
    }
  }
}

// With slot_major (order_N), y holds a row per slot (token-major, (T*K, D), the rows already
// weighted: grouped_mm_unpermute's sm90 epilogue): slot (t, k)'s row is t * K + k, read where
// r = rows_TK[t, k] >= 0, so a token's rows are contiguous; order_N[r] must be that slot (the GEMM
// stored the row there).
template <typename T, typename W, int VEC>
__global__ void unpermute_kernel(const T* __restrict__ y, int64_t ldy,
                                 const int64_t* __restrict__ rows, const W* __restrict__ weights,
                                 int64_t T_, int K, int64_t N, int64_t nvec, const int64_t* __restrict__ slot_major,
                                 T* __restrict__ out) {
  using acc_t = at::opmath_type<T>;
  using V = Vec<T, VEC>;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= T_) return;
  const int64_t* rows_t = rows + t * K;
  V* o = reinterpret_cast<V*>(out + t * nvec * VEC);
  const int64_t v_lo = int64_t(blockIdx.y) * kChunk, v_hi = min(nvec, v_lo + kChunk);
  for (int64_t v0 = v_lo + lane; v0 < v_hi; v0 += kWarp * kUnroll) {
    acc_t acc[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[u][j] = acc_t(0);
    for (int k = 0; k < K; ++k) {  // slot order, as the CPU kernel and the twin
      const int64_t r = rows_t[k];
      CUDA_KERNEL_ASSERT(r >= -1 && r < N && "moe.unpermute: rows_TK does not match y_ND");
      if (r < 0 || r >= N) continue;  // empty slot: never read
      const int64_t s = t * K + k;
      if (slot_major != nullptr) {  // (a row stored by no routed row would be garbage: never read)
        CUDA_KERNEL_ASSERT(slot_major[r] == s && "moe.grouped_mm_unpermute: rows_TK does not match order_N");
        if (slot_major[r] != s) continue;
      }
      const V* yr = reinterpret_cast<const V*>(y + (slot_major != nullptr ? s : r) * ldy);
      V a[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (v0 + u * kWarp < v_hi) a[u] = yr[v0 + u * kWarp];
      const acc_t w = weights != nullptr ? static_cast<acc_t>(weights[t * K + k]) : acc_t(1);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (weights != nullptr) {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            acc[u][j] = add_rn(acc[u][j], mul_rn(w, static_cast<acc_t>(a[u].v[j])));
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[u][j] = add_rn(acc[u][j], static_cast<acc_t>(a[u].v[j]));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + u * kWarp >= v_hi) break;
      V res;
#pragma unroll
      for (int j = 0; j < VEC; ++j) res.v[j] = static_cast<T>(acc[u][j]);
      o[v0 + u * kWarp] = res;
    }
  }
}

// The weighted unpermute's backward (moe.unpermute_backward), and unpermute_weights_grad (gy and
// weights null): one warp per slot s = (t, k) of row r = rows[s]. With gy: gy[r] = g[t] * w[s]
// (permute's arithmetic: its rows for a plan whose rows_TK inverts its order_N), and row s of gy
// zeroed when order[s] is -1 (permute's padding rows; N = S). With dw: dw[s] = <g[t], y[r]>,
// lane-strided fused multiply-adds then a fixed-order warp reduction (deterministic, but not the
// CPU's sequential order: equal to it up to float rounding), 0 for an empty slot. The same code
// serves both ops, so their dot products have the same bits.
template <typename T, typename W, int VEC>
__global__ void unpermute_backward_kernel(const T* __restrict__ g, int64_t ldg, const T* __restrict__ y,
                                          int64_t ldy, const int64_t* __restrict__ rows,
                                          const int64_t* __restrict__ order, const W* __restrict__ weights,
                                          int64_t S, int K, int64_t N, int64_t nvec, T* __restrict__ gy,
                                          at::opmath_type<T>* __restrict__ dw) {
  using acc_t = at::opmath_type<T>;
  using V = Vec<T, VEC>;
  const int64_t s = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (s >= S) return;  // warp-uniform
  if (gy != nullptr) {
    const int64_t o = order[s];
    CUDA_KERNEL_ASSERT(o >= -1 && o < S && "moe.unpermute_backward: order_N does not match rows_TK");
    if (o < 0 || o >= S) {  // padding row s: zeros
      V z;
#pragma unroll
      for (int j = 0; j < VEC; ++j) z.v[j] = static_cast<T>(0.0f);
      V* out = reinterpret_cast<V*>(gy + s * nvec * VEC);
      for (int64_t v = lane; v < nvec; v += kWarp) out[v] = z;
    }
  }
  const int64_t r = rows[s];
  CUDA_KERNEL_ASSERT(r >= -1 && r < N && "moe.unpermute_weights_grad: rows_TK does not match y_ND");
  acc_t dot = 0;
  if (r >= 0 && r < N) {  // warp-uniform
    const V* gv = reinterpret_cast<const V*>(g + (s / K) * ldg);
    const V* yv = dw != nullptr ? reinterpret_cast<const V*>(y + r * ldy) : nullptr;
    V* out = gy != nullptr ? reinterpret_cast<V*>(gy + r * nvec * VEC) : nullptr;
    const acc_t w = out != nullptr ? static_cast<acc_t>(weights[s]) : acc_t(1);
    for (int64_t v = lane; v < nvec; v += kWarp) {
      const V a = gv[v];
      if (yv != nullptr) {
        const V b = yv[v];
#pragma unroll
        for (int j = 0; j < VEC; ++j) dot = fma_rn(static_cast<acc_t>(a.v[j]), static_cast<acc_t>(b.v[j]), dot);
      }
      if (out != nullptr) {
        V o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<T>(mul_rn(static_cast<acc_t>(a.v[j]), w));
        out[v] = o;
      }
    }
  }
  if (dw == nullptr) return;  // warp-uniform
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) dot = add_rn(dot, __shfl_xor_sync(0xffffffffu, dot, o));
  if (lane == 0) dw[s] = dot;
}

}  // namespace
}  // namespace moe::cuda
