// The weight-streaming grouped GEMM of moe.grouped_mm and moe.gather_grouped_mm on CUDA, for few
// rows per expert (decode: T = 1..64 tokens, a handful of rows per chosen expert). There the cost
// is reading the chosen experts' weights once; a tiled GEMM spends its time on tiles of mostly
// empty rows and gives each CTA a wide column block, so too few CTAs stream the weights.
// Included by csrc/cuda/grouped_mm.cu (one translation unit).
//
// Shape legend (moe_ops.h): N routed rows, E experts, X/Y the GEMM input/output dims (a_NX @ b_EXY
// -> c_NY), K the plan's slots per token; MR rows of one pass, BY columns of one CTA.
//
// Schedule: grid (min(E, N) + 1, ceil(Y / BY)). CTA (i, j) finds the i-th expert e with rows (warp
// 0 counts the non-empty experts with ballots: no CTA is spent on the experts a decode step did
// not choose, most of them at T = 1) and computes columns [j*BY, (j+1)*BY) of e's rows, MR rows
// per pass (MR = 1, 2 or 4, the smallest that holds the rows left), streaming b[e]'s columns once
// per pass: an expert with up to 4 rows reads its weights from memory exactly once
// (a fifth row starts a pass that finds the CTA's columns in L2). The rows of a come straight from
// global memory (a few KB per expert, read by all its CTAs: L1 and L2 hits), so a pass has no
// barrier until its sums are combined. CTAs past the experts with rows exit; the last column of
// CTAs zero-fills the padding rows [offs_E[E-1], N). The rows are a_NX's, or with `order` (the plan's
// order_N) row i is x_TD[order[i] / K]: the gathered first projection reads the tokens in place,
// without the permuted N x D copy. Sums are float (double for float64), in a fixed order.
//   row-major b (b[e][x, y] at x*ldb + y): BY = 8 vectors of 16 bytes; lane l of warp w loads the
//     vector l % 8 of depth rows x = 4w + l/8 (mod 32), so each warp load reads 4 whole 128-byte
//     lines; the 32 partial sums of a column are added by two shuffles and a pass over the 8
//     warps' sums in shared memory.
//   column-major b (b[e][x, y] at y*ldb + x, a transposed nn.Linear weight): BY = 32 columns, 4
//     per warp; each lane loads 16 bytes of depth of each of its warp's columns, so a warp load
//     reads 512 contiguous bytes of one column; a butterfly of shuffles adds the lanes' sums.
// Registers: at most 128 per thread (2 CTAs of 8 warps per SM), no spills (ptxas -v, sm_90), but
// for the SwiGLU epilogue's column-major bfloat16 / float64 kernels: 56 / 8 bytes of spill loads
// (bfloat16 column-major is the Hugging Face weights' layout: to be timed on a GPU).
// Layout rules (stream_layout_ok): 16-byte aligned b, b's strides multiples of 16 bytes' worth of
// elements, and Y too for row-major b; for column-major b, a likewise (aligned, row stride and X).
// offs_E is checked on the device (CUDA_KERNEL_ASSERT) and clamped, as in the tiled kernels (with
// the asserts compiled out, bad offsets can give more than min(E, N) experts rows: rows of the
// ones past the grid's width are then left unwritten; memory stays safe).
#pragma once

#include "gemm_tiles.cuh"

namespace moe::cuda {
namespace {

constexpr int kStreamThreads = 256;
constexpr int kStreamWarps = kStreamThreads / kWarp;
constexpr int kStreamPassRows = 4;  // the largest MR
constexpr int kStreamColsPerWarp = 4;  // column-major b: columns per warp

// Columns per CTA: 8 vectors of 16 bytes for row-major b, 4 per warp for column-major b.
constexpr int stream_cols(bool b_col, int vec) { return b_col ? kStreamWarps * kStreamColsPerWarp : 8 * vec; }

template <typename T> struct StreamAcc { using type = float; };
template <> struct StreamAcc<double> { using type = double; };

__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(int8_t v) { return float(v); }
template <typename T> __device__ __forceinline__ T from_acc(float v) { return from_float<T>(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

struct StreamParams {
  const void* a;          // a_NX, or x_TD when `order` is set
  int64_t lda;            // a's row stride (elements; a's rows are contiguous)
  const int64_t* order;   // gathered: the plan's order_N (row i reads a's row order[i] / K), else null
  int64_t K, S;           // gathered: slots per token and T*K
  const void* b;          // b_EXY
  int64_t b_batch, ldb;   // b[e] at b + e*b_batch; b[e][x, y] at x*ldb + y, or y*ldb + x (B_COL)
  void* c;                // c_NY, (N, Y) contiguous
  const int* offs;        // offs_E, int32
  int E, N, X, Y;
  const float* scale;     // int8 weights (moe.grouped_mm_w8): c[i, y] = sum * scale[e * Y + y]; else null
  void* act;              // SwiGLU epilogue (moe.gather_grouped_mm_swiglu), else null: see stream_col
};

// The SwiGLU epilogue (SWIGLU, a template flag so that the plain kernels stay as they were; p.act
// set; Y = 2F, b = [gate; up] along Y, F a multiple of BY / 2): CTA
// column j takes the gate columns [j*BY/2, (j+1)*BY/2) and the up columns F + the same, as local
// columns [0, BY/2) and [BY/2, BY); each (gate, up) pair is rounded to T (h's values; c gets them
// when set, so it may be null) and act (N, F) gets swiglu_one of the two, the swiglu kernel's
// arithmetic: the same bits as moe.swiglu on this kernel's h. Otherwise local column l is y0 + l.
template <bool SWIGLU>
__device__ __forceinline__ int stream_col(const StreamParams& p, int y0, int l, int half) {
  return !SWIGLU ? y0 + l : (l < half ? y0 + l : p.Y / 2 + y0 + (l - half));
}

// Row r of the pass, local column l < BY/2 of the SwiGLU epilogue, from the pair's float sums.
template <typename T, typename acc_t>
__device__ __forceinline__ void swiglu_store(const StreamParams& p, int64_t row, int y0, int l, acc_t g, acc_t u) {
  const T gt = from_acc<T>(g), ut = from_acc<T>(u);
  const int F = p.Y / 2;
  if (p.c != nullptr) {
    T* c = static_cast<T*>(p.c) + row * p.Y;
    c[y0 + l] = gt;
    c[F + y0 + l] = ut;
  }
  static_cast<T*>(p.act)[row * F + y0 + l] = from_acc<T>(swiglu_one(to_acc(gt), to_acc(ut)));
}

// W: the weights' element type, T's own or int8_t (column-major only, with per-channel scales).
template <typename T, typename W, bool B_COL>
struct StreamTile {
  static_assert(B_COL || std::is_same_v<T, W>, "int8 weights are stored (E, Y, X): column-major");
  using acc_t = typename StreamAcc<T>::type;
  static constexpr int VEC = 16 / static_cast<int>(sizeof(W));  // weights per 16-byte load
  static constexpr int BY = stream_cols(B_COL, VEC);
  // Shared memory (acc_t elements): row-major b, the 8 warps' sums of a pass; column-major b, a
  // pass's sums for the SwiGLU epilogue (which pairs columns of different warps).
  static constexpr int SMEM = B_COL ? kStreamPassRows * BY : kStreamWarps * kStreamPassRows * BY;
  static_assert((BY / 2) % (B_COL ? kStreamColsPerWarp : VEC) == 0,
                "the SwiGLU epilogue's halves hold whole warps' columns (column-major) or vectors");
};


// One pass: rows [r0, r0 + m) of the expert whose weights start at b_e (m <= MR), columns
// [y0, y0 + BY). The rows of a are read straight from global memory (they are a few KB, shared by
// every CTA of the expert: L1 and L2 hits); rows m..MR-1 of a pass repeat row m-1 and are dropped.
template <typename T, typename W, bool B_COL, bool SWIGLU, int MR>
__device__ void stream_pass(const StreamParams& p, const W* __restrict__ b_e, const float* scale_e, int r0,
                            int m, int y0, typename StreamAcc<T>::type* smem, int64_t* src_row) {
  using Tile = StreamTile<T, W, B_COL>;
  using acc_t = typename Tile::acc_t;
  using V = Vec<W, Tile::VEC>;
  constexpr int VEC = Tile::VEC, BY = Tile::BY;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  __syncthreads();  // the previous pass is done with src_row and the shared sums
  if (threadIdx.x < MR) {
    int64_t src = r0 + min(int(threadIdx.x), m - 1);
    if (p.order != nullptr) {
      const int64_t s = p.order[src];
      CUDA_KERNEL_ASSERT(s >= 0 && s < p.S && "moe.gather_grouped_mm: order_N does not match rows_TK");
      src = (s >= 0 && s < p.S) ? s / p.K : 0;
    }
    src_row[threadIdx.x] = src * p.lda;
  }
  __syncthreads();
  const T* a_r[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) a_r[r] = static_cast<const T*>(p.a) + src_row[r];

  constexpr int NACC = B_COL ? kStreamColsPerWarp : VEC;
  acc_t acc[MR][NACC];
#pragma unroll
  for (int r = 0; r < MR; ++r)
#pragma unroll
    for (int j = 0; j < NACC; ++j) acc[r][j] = acc_t(0);

  T* __restrict__ c = static_cast<T*>(p.c);
  if constexpr (!B_COL) {
    // Lane l of warp w: the columns of vector l % 8, depth rows x = 4w + l/8 (mod 32).
    constexpr int U = 4;  // 16-byte weight loads in flight per thread
    const int cv = lane % 8, xr = warp * 4 + lane / 8, y = stream_col<SWIGLU>(p, y0, cv * VEC, BY / 2);
    if (y < p.Y) {
      const W* __restrict__ bcol = b_e + y;
      for (int x = xr; x < p.X; x += kWarp * U) {
        V bv[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (x + kWarp * u < p.X) bv[u] = *reinterpret_cast<const V*>(bcol + int64_t(x + kWarp * u) * p.ldb);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int xu = x + kWarp * u;
          if (xu >= p.X) break;
#pragma unroll
          for (int r = 0; r < MR; ++r) {
            const acc_t av = to_acc(a_r[r][xu]);
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[r][j] = fma(av, to_acc(bv[u].v[j]), acc[r][j]);
          }
        }
      }
    }
    // The 4 depth residues of a warp (lanes l, l^8, l^16, l^24), then the 8 warps, in order.
#pragma unroll
    for (int r = 0; r < MR; ++r)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc_t v = acc[r][j];
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        acc[r][j] = v;
      }
    if (lane < 8) {
#pragma unroll
      for (int r = 0; r < MR; ++r)
#pragma unroll
        for (int j = 0; j < VEC; ++j) smem[(warp * MR + r) * BY + cv * VEC + j] = acc[r][j];
    }
    __syncthreads();
    if constexpr (SWIGLU) {  // the SwiGLU epilogue: (gate, up) = local columns (l, l + BY/2)
      constexpr int H = BY / 2;
      for (int idx = threadIdx.x; idx < MR * H; idx += kStreamThreads) {
        const int r = idx / H, l = idx % H;
        if (r >= m) continue;
        acc_t g = smem[r * BY + l], u = smem[r * BY + H + l];
#pragma unroll
        for (int w = 1; w < kStreamWarps; ++w) {
          g += smem[(w * MR + r) * BY + l];
          u += smem[(w * MR + r) * BY + H + l];
        }
        swiglu_store<T>(p, r0 + r, y0, l, g, u);
      }
    } else {
      for (int idx = threadIdx.x; idx < MR * BY; idx += kStreamThreads) {
        const int r = idx / BY, col = idx % BY;
        if (r >= m || y0 + col >= p.Y) continue;
        acc_t s = smem[r * BY + col];
#pragma unroll
        for (int w = 1; w < kStreamWarps; ++w) s += smem[(w * MR + r) * BY + col];
        c[int64_t(r0 + r) * p.Y + y0 + col] = from_acc<T>(s);
      }
    }
  } else {
    // Warp w: columns yw .. yw + 3; lane l: depth x = l*VEC .. l*VEC + VEC - 1 (mod 32*VEC), read
    // from a in AV vectors of VA elements (AV = 2 for int8 weights and 16-bit rows).
    constexpr int U = sizeof(W) == 1 ? 1 : 2, VA = 16 / int(sizeof(T)), AV = VEC / VA;  // registers
    using VecA = Vec<T, VA>;
    // The warp's first local column and its first column of c: its 4 columns are consecutive in
    // both (with the SwiGLU epilogue a half of BY/2 = 4 warps' columns holds them all).
    const int lw = warp * kStreamColsPerWarp, yw = stream_col<SWIGLU>(p, y0, lw, BY / 2);
    for (int x = lane * VEC; x < p.X; x += kWarp * VEC * U) {
      V bv[U][kStreamColsPerWarp];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int q = 0; q < kStreamColsPerWarp; ++q)
          if (x + kWarp * VEC * u < p.X && yw + q < p.Y)
            bv[u][q] = *reinterpret_cast<const V*>(b_e + int64_t(yw + q) * p.ldb + x + kWarp * VEC * u);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int xu = x + kWarp * VEC * u;
        if (xu >= p.X) break;
#pragma unroll
        for (int r = 0; r < MR; ++r) {
          VecA av[AV];
#pragma unroll
          for (int i = 0; i < AV; ++i) av[i] = *reinterpret_cast<const VecA*>(a_r[r] + xu + i * VA);
#pragma unroll
          for (int q = 0; q < kStreamColsPerWarp; ++q) {
            if (yw + q >= p.Y) continue;  // uniform over the warp; bv[u][q] was not loaded
#pragma unroll
            for (int j = 0; j < VEC; ++j)
              acc[r][q] = fma(to_acc(av[j / VA].v[j % VA]), to_acc(bv[u][q].v[j]), acc[r][q]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < MR; ++r)
#pragma unroll
      for (int q = 0; q < kStreamColsPerWarp; ++q) {
        acc_t v = acc[r][q];
#pragma unroll
        for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane != r * kStreamColsPerWarp + q || yw + q >= p.Y) continue;
        if (scale_e != nullptr) v = v * scale_e[yw + q];
        if constexpr (SWIGLU) smem[r * BY + lw + q] = v;  // paired below
        else if (r < m) c[int64_t(r0 + r) * p.Y + yw + q] = from_acc<T>(v);
      }
    if constexpr (SWIGLU) {  // the SwiGLU epilogue: (gate, up) = local columns (l, l + BY/2)
      constexpr int H = BY / 2;
      __syncthreads();
      for (int idx = threadIdx.x; idx < MR * H; idx += kStreamThreads) {
        const int r = idx / H, l = idx % H;
        if (r < m) swiglu_store<T>(p, r0 + r, y0, l, smem[r * BY + l], smem[r * BY + H + l]);
      }
    }
  }
}

template <typename T, typename W, bool B_COL, bool SWIGLU>
__global__ void __launch_bounds__(kStreamThreads, 2) stream_gemm_kernel(StreamParams p) {
  using Tile = StreamTile<T, W, B_COL>;
  using acc_t = typename Tile::acc_t;
  __shared__ __align__(16) acc_t smem[Tile::SMEM];
  __shared__ int64_t src_row[kStreamPassRows];
  __shared__ int found;
  constexpr int BY = Tile::BY;
  const int y0 = blockIdx.y * (SWIGLU ? BY / 2 : BY);  // (stream_col)
  if (blockIdx.x == gridDim.x - 1) {  // the padding rows past the last group
    int pad_lo = 0, unused = 0;
    if (p.E > 0) group_rows_of(p.offs, p.N, p.E - 1, unused, pad_lo);
    T* c = static_cast<T*>(p.c);
    const int cols = SWIGLU ? BY : min(BY, p.Y - y0);  // local columns
    for (int64_t idx = threadIdx.x; idx < int64_t(p.N - pad_lo) * cols; idx += kStreamThreads) {
      const int64_t row = pad_lo + idx / cols;
      const int l = int(idx % cols);
      if (c != nullptr) c[row * p.Y + stream_col<SWIGLU>(p, y0, l, BY / 2)] = from_acc<T>(acc_t(0));
      if (SWIGLU && l < BY / 2) static_cast<T*>(p.act)[row * (p.Y / 2) + y0 + l] = from_acc<T>(acc_t(0));
    }
    return;
  }
  // This CTA's expert: the blockIdx.x-th with rows, in expert order (at most min(E, N) have rows:
  // the grid's width). Warp 0 counts them 128 at a time with ballots.
  if (threadIdx.x == 0) found = -1;
  __syncthreads();
  if (threadIdx.x < kWarp) {
    const int lane = threadIdx.x;
    int seen = 0;
    for (int base = 0; base < p.E; base += 4 * kWarp) {  // warp-uniform
      bool has[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {  // the 4 loads first, then the ballots
        const int e = base + u * kWarp + lane;
        int lo = 0, hi = 0;
        if (e < p.E) group_rows_of(p.offs, p.N, e, lo, hi);
        has[u] = hi > lo;
      }
      bool done = false;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const unsigned ball = __ballot_sync(0xffffffffu, has[u]);
        const int k = int(blockIdx.x) - seen;
        if (!done && k < __popc(ball)) {
          if (has[u] && __popc(ball & ((1u << lane) - 1u)) == k) found = base + u * kWarp + lane;
          done = true;
        }
        seen += __popc(ball);
      }
      if (done) break;
    }
  }
  __syncthreads();
  const int e = found;
  if (e < 0) return;  // fewer experts have rows than the grid's width
  int lo, hi;
  group_rows_of(p.offs, p.N, e, lo, hi);
  const W* b_e = static_cast<const W*>(p.b) + int64_t(e) * p.b_batch;
  const float* scale_e = p.scale != nullptr ? p.scale + int64_t(e) * p.Y : nullptr;
  for (int r0 = lo; r0 < hi; r0 += kStreamPassRows) {  // uniform over the CTA
    const int m = min(kStreamPassRows, hi - r0);
    static_assert(kStreamPassRows == 4, "the passes below are MR = 1, 2 and 4");
    if (m == 1) stream_pass<T, W, B_COL, SWIGLU, 1>(p, b_e, scale_e, r0, m, y0, smem, src_row);
    else if (m == 2) stream_pass<T, W, B_COL, SWIGLU, 2>(p, b_e, scale_e, r0, m, y0, smem, src_row);
    else stream_pass<T, W, B_COL, SWIGLU, 4>(p, b_e, scale_e, r0, m, y0, smem, src_row);
  }
}

// One launch's grid (ceil(Y / by) <= 65535 column tiles) and int32 index arithmetic with room to
// spare (decode sizes are far below these limits).
inline bool stream_sizes_ok(int64_t N, int64_t E, int64_t X, int64_t Y, int64_t by) {
  constexpr int64_t kLimit = int64_t{1} << 30;
  return N < kLimit && E < kLimit && X < kLimit && ceil_div(Y, by) <= 65535;
}

// Whether the streaming kernel takes these operands: stream_sizes_ok and its 16-byte vector loads
// (of b's rows, and for column-major b of a's rows too; row-major b reads a element by element).
// Anything else falls back to the tiled kernels.
inline bool stream_layout_ok(const at::Tensor& a, int64_t lda, const at::Tensor& b, bool b_col,
                             int64_t b_ld, int64_t N, int64_t E, int64_t X, int64_t Y) {
  const auto st = a.scalar_type();
  if (st != at::kBFloat16 && st != at::kHalf && st != at::kFloat && st != at::kDouble) return false;
  const int64_t elem = a.element_size(), vec = 16 / elem;
  if (X < 1 || !stream_sizes_ok(N, E, X, Y, stream_cols(b_col, int(vec))) || b.stride(0) % vec != 0) return false;
  if (b_col) return vec16_ok(b.const_data_ptr(), X, b_ld, elem) && vec16_ok(a.const_data_ptr(), X, lda, elem);
  return vec16_ok(b.const_data_ptr(), Y, b_ld, elem);
}

// grid (min(E, N) + 1, ceil(Y / BY)): at most min(E, N) experts have rows. SWIGLU: p.act set (the
// same grid: F / (BY / 2) = Y / BY column blocks).
template <typename T, bool B_COL, typename W = T, bool SWIGLU = false>
void launch_stream(const StreamParams& p) {
  const int64_t tiles_y = ceil_div(p.Y, StreamTile<T, W, B_COL>::BY);  // <= 65535: the caller's check
  TORCH_INTERNAL_ASSERT(!SWIGLU || (p.act != nullptr && p.Y % StreamTile<T, W, B_COL>::BY == 0),
                        "the SwiGLU epilogue needs act and F a multiple of half the column block");
  const int64_t width = std::min<int64_t>(p.E, p.N) + 1;
  stream_gemm_kernel<T, W, B_COL, SWIGLU>
      <<<dim3(unsigned(width), unsigned(tiles_y)), kStreamThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace moe::cuda
