// Tile engines of moekit's grouped GEMM (csrc/cuda/grouped_mm.cu): each computes one output tile
// C[m, y] = sum_x A[m, x] * B[x, y] of a `Problem` whose operands were located by a schedule:
// one plain GEMM of M rows, depth X and Y columns, C (M x Y) = A (M x X) @ B (X x Y).
//
// TcEngine (bfloat16/float16, tensor cores through WMMA, float32 accumulate): a 128x128 CTA tile,
// BX = 32, 8 warps in a 2x4 grid, each warp 64x32 (4x2 fragments of 16x16x16). Shared tiles are
// padded by 8 elements per row and double buffered with cp.async (16-byte copies, zero-filled
// past the valid extent) when the operands are 16-byte aligned, else loaded element by element.
// A and B may each be row- or column-major (template flags). Every load and store is bounds
// checked against the Problem's m/y/x limits.
// SimtEngine (float32/float64): a 64x64 tile, BX = 16, 4x4 outputs per thread, any strides.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "common.cuh"

namespace moe::cuda {

constexpr int kGemmThreads = 256;

template <typename T>
struct Problem {
  const T* a;  // A[m, x] = a[m * a_rs + x * a_cs]
  int64_t a_rs, a_cs;
  const T* b;  // B[x, y] = b[x * b_rs + y * b_cs]
  int64_t b_rs, b_cs;
  T* c;  // C[m, y] = c[m * ldc + y]
  int64_t ldc;
  int m_lim, y_lim, x_lim;  // valid extents from the tile origin (rows, columns, depth)
};

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half(v); }
template <> __device__ __forceinline__ float from_float(float v) { return v; }
template <> __device__ __forceinline__ double from_float(float v) { return v; }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

template <typename T, bool A_COL, bool B_COL>
struct TcEngine {
  static constexpr int BM = 128, BY = 128, BX = 32, PAD = 8, FM = 4, FY = 2;
  static constexpr int A_ELEMS = A_COL ? BX * (BM + PAD) : BM * (BX + PAD);
  static constexpr int B_ELEMS = B_COL ? BY * (BX + PAD) : BX * (BY + PAD);
  static constexpr int STAGE = A_ELEMS + B_ELEMS;
  static constexpr int PIPE_BYTES = 2 * STAGE * int(sizeof(T));
  static constexpr int EPI_BYTES = (kGemmThreads / kWarp) * 256 * int(sizeof(float));
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory limit");

  // Copies an R x C tile, element (r, c) = g[r * ld + c] valid for r < r_lim and c < c_lim (else
  // zero), into shared memory s[r * (C + PAD) + c], in chunks of 8 contiguous elements.
  template <int R, int C>
  __device__ static void load_tile(T* s, const T* g, int64_t ld, int r_lim, int c_lim, bool vec,
                                   const T* safe) {
    constexpr int CH = C / 8;
    for (int idx = threadIdx.x; idx < R * CH; idx += kGemmThreads) {
      const int r = idx / CH, c = (idx % CH) * 8;
      T* dst = s + r * (C + PAD) + c;
      const int valid = r < r_lim ? max(0, min(8, c_lim - c)) : 0;
      if (vec) {  // zero-fills the 16 - 2*valid bytes past the valid extent
        cp_async16(dst, valid > 0 ? static_cast<const void*>(g + r * ld + c) : safe,
                   valid * int(sizeof(T)));
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) dst[j] = j < valid ? g[r * ld + c + j] : from_float<T>(0.0f);
      }
    }
  }

  __device__ static void load_stage(T* s, const Problem<T>& p, int x0, bool vec) {
    const int x_left = p.x_lim - x0;
    if constexpr (A_COL) load_tile<BX, BM>(s, p.a + x0 * p.a_cs, p.a_cs, x_left, p.m_lim, vec, p.a);
    else load_tile<BM, BX>(s, p.a + x0, p.a_rs, p.m_lim, x_left, vec, p.a);
    T* sb = s + A_ELEMS;
    if constexpr (B_COL) load_tile<BY, BX>(sb, p.b + x0, p.b_cs, p.y_lim, x_left, vec, p.b);
    else load_tile<BX, BY>(sb, p.b + x0 * p.b_rs, p.b_rs, x_left, p.y_lim, vec, p.b);
  }

  __device__ static void run(const Problem<T>& p, bool vec_in, bool vec_out, unsigned char* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    namespace wmma = nvcuda::wmma;
    using ALayout = std::conditional_t<A_COL, wmma::col_major, wmma::row_major>;
    using BLayout = std::conditional_t<B_COL, wmma::col_major, wmma::row_major>;
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int wm = (warp / 4) * (FM * 16), wy = (warp % 4) * (FY * 16);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FY];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FY; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    T* buf = reinterpret_cast<T*>(smem);
    const int XT = static_cast<int>(ceil_div(p.x_lim, BX));
    if (XT > 0) load_stage(buf, p, 0, vec_in);
    cp_async_commit();
    for (int xt = 0; xt < XT; ++xt) {
      if (xt + 1 < XT) load_stage(buf + ((xt + 1) & 1) * STAGE, p, (xt + 1) * BX, vec_in);
      cp_async_commit();
      cp_async_wait<1>();  // every group but the one just issued: stage xt has landed
      __syncthreads();
      const T* sa = buf + (xt & 1) * STAGE;
      const T* sb = sa + A_ELEMS;
#pragma unroll
      for (int xx = 0; xx < BX; xx += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa[FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[FY];
#pragma unroll
        for (int i = 0; i < FM; ++i) {
          const int m = wm + i * 16;
          if constexpr (A_COL) wmma::load_matrix_sync(fa[i], sa + xx * (BM + PAD) + m, BM + PAD);
          else wmma::load_matrix_sync(fa[i], sa + m * (BX + PAD) + xx, BX + PAD);
        }
#pragma unroll
        for (int j = 0; j < FY; ++j) {
          const int y = wy + j * 16;
          if constexpr (B_COL) wmma::load_matrix_sync(fb[j], sb + y * (BX + PAD) + xx, BX + PAD);
          else wmma::load_matrix_sync(fb[j], sb + xx * (BY + PAD) + y, BY + PAD);
        }
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
          for (int j = 0; j < FY; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();  // the next iteration's loads overwrite this stage
    }
    cp_async_wait<0>();
    __syncthreads();

    // Epilogue: each warp stages one 16x16 fragment at a time through shared memory and writes
    // it with bounds checks (16-byte stores when a full, aligned 8-wide run fits).
    float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
    const int r = lane / 2, c0 = (lane % 2) * 8;
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FY; ++j) {
        wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        const int gm = wm + i * 16 + r, gy = wy + j * 16 + c0;
        if (gm < p.m_lim) {
          T* dst = p.c + gm * p.ldc + gy;
          if (vec_out && gy + 8 <= p.y_lim) {
            Vec<T, 8> v;
#pragma unroll
            for (int q = 0; q < 8; ++q) v.v[q] = from_float<T>(scratch[r * 16 + c0 + q]);
            *reinterpret_cast<Vec<T, 8>*>(dst) = v;
          } else {
            for (int q = 0; q < 8; ++q)
              if (gy + q < p.y_lim) dst[q] = from_float<T>(scratch[r * 16 + c0 + q]);
          }
        }
        __syncwarp();
      }
    }
#else
    __trap();  // bfloat16/float16 tensor-core path needs sm_80+ (checked on the host)
#endif
  }
};

template <typename T>
struct SimtEngine {
  static constexpr int BM = 64, BY = 64, BX = 16;
  static constexpr int SMEM_BYTES = (BX * BM + BX * BY) * int(sizeof(T));

  __device__ static void run(const Problem<T>& p, bool, bool, unsigned char* smem) {
    T* As = reinterpret_cast<T*>(smem);  // As[x * BM + m]
    T* Bs = As + BX * BM;                // Bs[x * BY + y]
    const int tc = threadIdx.x % 16, tr = threadIdx.x / 16;
    T acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
    for (int x0 = 0; x0 < p.x_lim; x0 += BX) {
#pragma unroll
      for (int l = 0; l < BM * BX / kGemmThreads; ++l) {
        const int idx = threadIdx.x + l * kGemmThreads, m = idx / BX, x = idx % BX;
        As[x * BM + m] = (m < p.m_lim && x0 + x < p.x_lim) ? p.a[m * p.a_rs + (x0 + x) * p.a_cs] : T(0);
      }
#pragma unroll
      for (int l = 0; l < BX * BY / kGemmThreads; ++l) {
        const int idx = threadIdx.x + l * kGemmThreads, x = idx / BY, y = idx % BY;
        Bs[x * BY + y] = (x0 + x < p.x_lim && y < p.y_lim) ? p.b[(x0 + x) * p.b_rs + y * p.b_cs] : T(0);
      }
      __syncthreads();
      // Two-level sum: the BX products of this x-tile are summed first, then added to acc, so
      // rounding error grows with X/BX + BX rather than X (one serial chain over all of X risks
      // exceeding twice cuBLAS's float32 error, the tests' bound, at X ~ 1024).
      T part[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[i][j] = T(0);
#pragma unroll
      for (int x = 0; x < BX; ++x) {
        T ar[4], br[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ar[i] = As[x * BM + tr + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) br[j] = Bs[x * BY + tc + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) part[i][j] += ar[i] * br[j];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += part[i][j];
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int m = tr + 16 * i, y = tc + 16 * j;
        if (m < p.m_lim && y < p.y_lim) p.c[m * p.ldc + y] = acc[i][j];
      }
  }
};

}  // namespace moe::cuda
