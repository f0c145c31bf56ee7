// moe.grouped_mm and moe.grouped_mm_wgrad on CUDA: one launch over all groups, offs_E read on
// the device, no host sync; buffers are sized from host-known bounds (c_NY has a_NX's N rows).
//
// Shape legend: N routed rows of a_NX (the host-side bound T*K; rows past offs_E[E-1] are
// padding), E experts, X/Y the GEMM input/output dims (a_NX @ b_EXY -> c_NY). The tile engines
// (gemm_tiles.cuh) compute plain GEMMs of M rows, depth X and Y columns: M is a row tile of c_NY
// in the forward, a slice of X in the weight gradient (whose depth is then the expert's rows).
//
// grouped_mm schedule: grid (ceil(N/BM) + E, ceil(Y/BY)). Block x is a flat row-tile index; each
// CTA scans offs_E (a block-wide scan of ceil(rows_e / BM), E/256 steps) to find the expert and
// the row tile it owns: the groups need at most ceil(N/BM) + E row tiles including the padding
// rows, so the grid covers every arrangement. Tiles past the groups zero-fill the padding rows
// [offs_E[E-1], N); the rest exit. Rows of a are read only inside their group.
// grouped_mm_wgrad schedule: grid (ceil(X/BM) * ceil(Y/BY), E); CTA (tile, e) computes
// a_e^T @ g_e over expert e's rows (zero when it has none).
// offs_E must be non-decreasing and within [0, N]: checked by CUDA_KERNEL_ASSERT (a host check
// would sync); bad offsets are clamped so memory stays safe if asserts are compiled out.
//
// Backends (MOE_CUDA_GEMM, read at every call). "auto" (the default): a forward GEMM with at most
// config::kCudaStreamRows rows per expert on average (N <= 4 E: decode) runs the weight-streaming
// kernel (stream_gemm.cuh) where its layout rules hold, and so does every forward GEMM under
// "stream"; otherwise, under "auto" and "stream": bfloat16 on compute
// capability 9.0 runs moekit's own Hopper grouped GEMM (csrc/cuda/sm90/: CUTLASS 3, TMA + wgmma,
// warp-specialised, per-expert sizes read on the device, a tile configuration chosen from the
// host-known N/E) when it was compiled in (MOE_WITH_SM90_GEMM: the build found CUTLASS's headers
// and 9.0 in the arch list); otherwise, and on 10.x, PyTorch's CUTLASS grouped GEMM
// (at::_grouped_mm). Both need their layout rules to hold (X, Y and the strides multiples of 8
// elements, 16-byte aligned pointers; PyTorch's also E < 1024). "torch" forces PyTorch's and
// "native" moekit's WMMA kernels below, which are also the path for float16/float32/float64,
// other GPUs and unaligned layouts. moekit's sm90 GEMM is two launches (its setup kernel asserts
// the offsets, as the native kernels do, and writes the contract's zeros: padding rows of c_NY,
// experts with no rows in the weight gradient); one setup launch serves both GEMMs of
// grouped_mm_backward and gather_grouped_mm_backward, and in the gathered ops it also copies
// permute(x_TD) (no permute kernel); around PyTorch's, a check kernel asserts the offsets first and
// the zeros are written after.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/_grouped_mm.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "gemm_tiles.cuh"
#include "stream_gemm.cuh"
#include "config.h"
#include "moe_ops.h"
#ifdef MOE_WITH_SM90_GEMM
#include "sm90/grouped_gemm_sm90.h"
#endif

namespace moe::cuda {
namespace {

struct Params {
  const void* a;  // a_NX
  int64_t a_s0, a_s1;
  const void* b;  // grouped: b_EXY; wgrad: g_NY (b_s0, b_s1 its strides)
  int64_t b_s0, b_s1, b_s2;
  void* c;  // contiguous output: c_NY or w_EXY
  const int* offs;
  int E, N, X, Y;
  bool vec_in, vec_out;
};

// Group e's rows [lo, hi), clamped into [0, N].
__device__ __forceinline__ void group_rows(const Params& p, int e, int& lo, int& hi) {
  group_rows_of(p.offs, p.N, e, lo, hi);
}

// Locates this CTA's row tile. Returns true with `pr` set for a GEMM tile; zero-fills and
// returns false for a padding tile; returns false for a surplus CTA.
template <typename T, int BM, int BY>
__device__ bool grouped_schedule(const Params& p, Problem<T>& pr) {
  __shared__ int warp_sums[kGemmThreads / kWarp];
  __shared__ int found_e, found_tile;
  const int tile = blockIdx.x, y0 = blockIdx.y * BY;
  if (threadIdx.x == 0) found_e = -1;
  __syncthreads();
  int carry = 0;  // row tiles of the experts before `base`
  for (int base = 0; base < p.E; base += kGemmThreads) {
    const int e = base + threadIdx.x;
    int tiles = 0;
    if (e < p.E) {
      int lo, hi;
      group_rows(p, e, lo, hi);
      tiles = static_cast<int>(ceil_div(hi - lo, BM));
    }
    int total = 0;
    const int incl = carry + block_inclusive_scan<kGemmThreads>(tiles, total, warp_sums);
    if (e < p.E && tile >= incl - tiles && tile < incl) {
      found_e = e;
      found_tile = tile - (incl - tiles);
    }
    carry += total;
    __syncthreads();
    if (found_e >= 0) break;  // uniform: read after the barrier
  }
  const T* b = static_cast<const T*>(p.b);
  T* c = static_cast<T*>(p.c);
  if (found_e >= 0) {
    const int e = found_e, r0 = found_tile * BM;
    int lo, hi;
    group_rows(p, e, lo, hi);
    const int64_t row = int64_t(lo) + r0;
    pr.a = static_cast<const T*>(p.a) + row * p.a_s0;
    pr.a_rs = p.a_s0;
    pr.a_cs = p.a_s1;
    pr.b = b + e * p.b_s0 + y0 * p.b_s2;
    pr.b_rs = p.b_s1;
    pr.b_cs = p.b_s2;
    pr.c = c + row * p.Y + y0;
    pr.ldc = p.Y;
    pr.m_lim = hi - lo - r0;
    pr.y_lim = p.Y - y0;
    pr.x_lim = p.X;
    return true;
  }
  int pad_lo = 0, unused = 0;
  if (p.E > 0) group_rows(p, p.E - 1, unused, pad_lo);
  const int64_t r0 = pad_lo + int64_t(tile - carry) * BM;  // padding rows of this tile
  if (r0 >= p.N) return false;                              // surplus CTA
  const int rows = static_cast<int>(min(int64_t(BM), p.N - r0)), cols = min(BY, p.Y - y0);
  for (int idx = threadIdx.x; idx < BM * BY; idx += kGemmThreads) {
    const int r = idx / BY, col = idx % BY;
    if (r < rows && col < cols) c[(r0 + r) * p.Y + y0 + col] = from_float<T>(0.0f);
  }
  return false;
}

template <typename T, int BM, int BY>
__device__ void wgrad_schedule(const Params& p, Problem<T>& pr) {
  const int e = blockIdx.y, tiles_y = static_cast<int>(ceil_div(p.Y, BY));
  const int m0 = (blockIdx.x / tiles_y) * BM, y0 = (blockIdx.x % tiles_y) * BY;
  int lo, hi;
  group_rows(p, e, lo, hi);
  // A[m, x] = a_NX[lo + x, m0 + m] (column-major), B[x, y] = g_NY[lo + x, y0 + y]: the plain
  // GEMM's depth x runs over the expert's rows, its m over a_NX's X.
  pr.a = static_cast<const T*>(p.a) + int64_t(lo) * p.a_s0 + int64_t(m0) * p.a_s1;
  pr.a_rs = p.a_s1;
  pr.a_cs = p.a_s0;
  pr.b = static_cast<const T*>(p.b) + int64_t(lo) * p.b_s0 + int64_t(y0) * p.b_s1;
  pr.b_rs = p.b_s0;
  pr.b_cs = p.b_s1;
  pr.c = static_cast<T*>(p.c) + (int64_t(e) * p.X + m0) * p.Y + y0;
  pr.ldc = p.Y;
  pr.m_lim = p.X - m0;
  pr.y_lim = p.Y - y0;
  pr.x_lim = hi - lo;
}

template <typename T, typename Engine>
__global__ void __launch_bounds__(kGemmThreads, 2) grouped_mm_kernel(Params p) {
  __shared__ __align__(128) unsigned char smem[Engine::SMEM_BYTES];
  Problem<T> pr;
  if (!grouped_schedule<T, Engine::BM, Engine::BY>(p, pr)) return;
  Engine::run(pr, p.vec_in, p.vec_out, smem);
}

template <typename T, typename Engine>
__global__ void __launch_bounds__(kGemmThreads, 2) grouped_mm_wgrad_kernel(Params p) {
  __shared__ __align__(128) unsigned char smem[Engine::SMEM_BYTES];
  Problem<T> pr;
  wgrad_schedule<T, Engine::BM, Engine::BY>(p, pr);
  Engine::run(pr, p.vec_in, p.vec_out, smem);
}

template <typename S> struct DeviceType { using type = S; };
template <> struct DeviceType<at::BFloat16> { using type = __nv_bfloat16; };
template <> struct DeviceType<at::Half> { using type = __half; };

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void check_sizes(const char* op, int64_t N, int64_t X, int64_t Y) {
  constexpr int64_t kMax = (int64_t{1} << 31) - 1;
  TORCH_CHECK(N <= kMax && X <= kMax && Y <= kMax, "moe.", op,
              ": sizes must fit in int32, got N=", N, " X=", X, " Y=", Y);
}

void check_tensor_cores(const char* op) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "moe.", op, ": bfloat16/float16 needs a GPU of compute capability",
              " 8.0 or newer, got ", prop->major, ".", prop->minor);
}

template <typename T>
constexpr bool kSimt = std::is_same_v<T, float> || std::is_same_v<T, double>;

// grid (ceil(N/BM) + E, ceil(Y/BY)): covers every arrangement of the groups' row tiles.
template <typename T, bool B_COL>
void launch_grouped(const Params& p) {
  using Engine = std::conditional_t<kSimt<T>, SimtEngine<T>, TcEngine<T, false, B_COL>>;
  const int64_t grid_x = ceil_div(p.N, Engine::BM) + p.E, grid_y = ceil_div(p.Y, Engine::BY);
  TORCH_CHECK(grid_y <= 65535 && grid_x < (int64_t{1} << 31), "moe.grouped_mm: Y=", p.Y,
              " or N+E too large for one launch");
  if constexpr (!kSimt<T>) check_tensor_cores("grouped_mm");
  grouped_mm_kernel<T, Engine>
      <<<dim3(grid_x, grid_y), kGemmThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grid (ceil(X/BM) * ceil(Y/BY), E).
template <typename T>
void launch_wgrad(const Params& p) {
  using Engine = std::conditional_t<kSimt<T>, SimtEngine<T>, TcEngine<T, true, false>>;
  const int64_t tiles = ceil_div(p.X, Engine::BM) * ceil_div(p.Y, Engine::BY);
  TORCH_CHECK(tiles < (int64_t{1} << 31), "moe.grouped_mm_wgrad: X*Y too large");
  if constexpr (!kSimt<T>) check_tensor_cores("grouped_mm_wgrad");
  grouped_mm_wgrad_kernel<T, Engine>
      <<<dim3(tiles, p.E), kGemmThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using Backend = config::CudaGemm;

// ---- Weight-streaming path (decode sizes) ---------------------------------------------------

// The streaming kernel serves this forward call: forced ("stream"), or "auto" with at most
// kCudaStreamRows rows per expert on average; either way only where its layout rules hold.
bool use_stream(Backend be, int64_t N, int64_t E) {
  return be == Backend::kStream || (be == Backend::kAuto && N <= config::kCudaStreamRows * E);
}

// A forward GEMM's operands as the kernels read them: a with unit column stride, b row-major
// (b[e, x, y] at y stride 1) or column-major (b_col: a transposed nn.Linear weight), b_ld its
// stride along the other dim (copies only where neither holds).
struct MmOperands {
  at::Tensor a, b;
  bool b_col;
  int64_t b_ld;
};

MmOperands mm_operands(const at::Tensor& a_NX, const at::Tensor& b_EXY) {
  const bool b_col = b_EXY.stride(2) != 1 && b_EXY.stride(1) == 1;
  const auto b = (b_EXY.stride(2) == 1 || b_col) ? b_EXY : b_EXY.contiguous();
  return {unit_inner(a_NX), b, b_col, b_col ? b.stride(2) : b.stride(1)};
}

// The streaming kernel's arguments: a's rows (a_NX's, or x_TD's through order_N when `order` is
// defined, K slots a token) @ b_EXY per group into c (N, Y) (may be null with the SwiGLU epilogue).
StreamParams stream_params(const at::Tensor& a, const at::Tensor& order, int64_t K, const at::Tensor& b, bool b_col,
                           const at::Tensor& offs, int64_t N, void* c) {
  return StreamParams{a.const_data_ptr(), a.stride(0),
                      order.defined() ? order.const_data_ptr<int64_t>() : nullptr, K, a.size(0) * K,
                      b.const_data_ptr(), b.stride(0), b_col ? b.stride(2) : b.stride(1), c,
                      offs.const_data_ptr<int>(), static_cast<int>(b.size(0)), static_cast<int>(N),
                      static_cast<int>(a.size(1)), static_cast<int>(b.size(2))};
}

// Whether the streaming kernel serves the gathered GEMM of x_TD's rows (N of them) and b (decode
// sizes, see use_stream; its layout rules); b_col: b is contiguous along X. May raise: a bad
// MOE_CUDA_GEMM.
bool gather_streams(const at::Tensor& x_TD, const at::Tensor& b, int64_t N, bool& b_col) {
  const Backend be = config::cuda_gemm();  // may raise: a bad MOE_CUDA_GEMM
  const int64_t X = x_TD.size(1), Y = b.size(2), E = b.size(0);
  b_col = b.stride(2) != 1 && b.stride(1) == 1;
  const int64_t b_ld = b_col ? b.stride(2) : b.stride(1);
  return N > 0 && Y > 0 && use_stream(be, N, E) && x_TD.stride(1) == 1 &&
         (b.stride(2) == 1 || b_col) && stream_layout_ok(x_TD, x_TD.stride(0), b, b_col, b_ld, N, E, X, Y);
}

// c_NY = a's rows (a_NX's, or x_TD's through order_N when `order` is defined) @ b_EXY per group.
at::Tensor grouped_mm_stream_path(const at::Tensor& a, const at::Tensor& order, int64_t K,
                                  const at::Tensor& b, bool b_col, const at::Tensor& offs, int64_t N) {
  auto c = at::empty({N, b.size(2)}, a.options());
  const StreamParams p = stream_params(a, order, K, b, b_col, offs, N, c.mutable_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "moe_grouped_mm_stream", [&] {
    using T = typename DeviceType<scalar_t>::type;
    if (b_col) launch_stream<T, true>(p);
    else launch_stream<T, false>(p);
  });
  return c;
}

// ---- CUTLASS grouped GEMM path (at::_grouped_mm) -------------------------------------------

// Row-major (s1 == 1) or column-major (s0 == 1) 2-D layout with 16-byte-aligned leading dim.
bool tma_2d(int64_t s0, int64_t s1) { return (s1 == 1 && s0 % 8 == 0) || (s0 == 1 && s1 % 8 == 0); }

// The CUTLASS kernels' layout rules: bf16, X and Y multiples of 8, 16-byte aligned pointers and
// strides (TMA).
bool cutlass_layout_ok(const at::Tensor& a, const at::Tensor& b, int64_t E, int64_t X, int64_t Y) {
  if (a.scalar_type() != at::kBFloat16 || b.scalar_type() != at::kBFloat16) return false;
  if (E < 1 || X % 8 != 0 || Y % 8 != 0) return false;
  if (!aligned16(a.const_data_ptr()) || !aligned16(b.const_data_ptr())) return false;
  if (!tma_2d(a.stride(a.dim() - 2), a.stride(a.dim() - 1))) return false;
  if (!tma_2d(b.stride(b.dim() - 2), b.stride(b.dim() - 1))) return false;
  return b.dim() == 2 || b.stride(0) % 8 == 0;
}

bool is_sm90() {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
}

// PyTorch's grouped GEMM serves this call ("auto" without our sm90 kernels, or "torch"; 9.0/10.x).
bool use_torch(Backend be, int64_t E) {
  if (be == Backend::kNative || E >= 1024) return false;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return is_sm90() || prop->major == 10;
}

// One block: offs_E non-decreasing within [0, N] (the native kernels' assert, before the GEMM).
__global__ void check_offs_kernel(const int* __restrict__ offs, int E, int64_t N) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int lo = e > 0 ? offs[e - 1] : 0;
    CUDA_KERNEL_ASSERT(lo >= 0 && lo <= offs[e] && offs[e] <= N &&
                       "moe.grouped_mm: offs_E must be non-decreasing and within [0, N]");
  }
}

// c[r, :] = 0 for the padding rows r >= offs_E[E-1] (grid-stride over the tail's 16-byte words).
__global__ void zero_tail_rows_kernel(uint4* __restrict__ c, int64_t N, int64_t words_per_row,
                                      const int* __restrict__ offs, int E) {
  const int64_t begin = int64_t(min(max(offs[E - 1], 0), int(N))) * words_per_row;
  const int64_t end = N * words_per_row;
  for (int64_t i = begin + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += int64_t(gridDim.x) * blockDim.x)
    c[i] = make_uint4(0, 0, 0, 0);
}

// w[e] = 0 for the experts with no rows (block row e; other experts' blocks exit at once).
__global__ void zero_empty_experts_kernel(uint4* __restrict__ w, int64_t words_per_expert,
                                          const int* __restrict__ offs) {
  const int e = blockIdx.y;
  const int lo = e > 0 ? offs[e - 1] : 0;
  if (offs[e] != lo) return;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < words_per_expert;
       i += int64_t(gridDim.x) * blockDim.x)
    w[e * words_per_expert + i] = make_uint4(0, 0, 0, 0);
}

// w[e] = 0 for every expert e with no rows (bf16 (E, X, Y) contiguous, X * Y % 8 == 0).
void zero_empty_experts(at::Tensor& w, const at::Tensor& offs, int64_t E, int64_t X, int64_t Y) {
  const int64_t words = X * Y / 8;
  zero_empty_experts_kernel<<<dim3(std::max<unsigned>(1, std::min<int64_t>(ceil_div(words, 256), 64)),
                                   unsigned(E)), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<uint4*>(w.mutable_data_ptr()), words, offs.const_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Asserts offs_E on the device before a CUTLASS GEMM (the native kernels' own check).
void check_offs(const at::Tensor& offs, int64_t E, int64_t N) {
  check_offs_kernel<<<1, 1024, 0, at::cuda::getCurrentCUDAStream()>>>(offs.const_data_ptr<int>(),
                                                                       int(E), N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// c[r, :] = 0 for the padding rows r >= offs_E[E-1] of a bf16 (N, Y) contiguous c, Y % 8 == 0.
void zero_tail_rows(at::Tensor& c, const at::Tensor& offs, int64_t E) {
  const int64_t N = c.size(0), words = c.size(1) / 8;  // bf16: 8 per 16 bytes
  zero_tail_rows_kernel<<<flat_grid(N * words, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<uint4*>(c.mutable_data_ptr()), N, words, offs.const_data_ptr<int>(), int(E));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#ifdef MOE_WITH_SM90_GEMM
// moekit's own sm90 kernels serve this call ("auto" on compute capability 9.0).
bool use_sm90(Backend be) { return (be == Backend::kAuto || be == Backend::kStream) && is_sm90(); }

// The configuration forced by moe.ops.config (sm90_forward_config / sm90_wgrad_config, default
// MOE_SM90_GEMM_CONFIG / MOE_SM90_WGRAD_CONFIG), else the table's choice from host-known sizes.
int sm90_config(bool wgrad, int64_t N, int64_t E, int64_t X, int64_t Y) {
  const int forced = config::sm90_config(wgrad);
  return forced >= 0 ? forced : sm90::choose_config(wgrad, N, E, X, Y);
}

// One sm90 grouped GEMM ready to run: its problem, configuration and output (g.c points into it).
struct Sm90Gemm {
  sm90::GroupedGemm g;
  int config;
  at::Tensor out;
};

// Runs sm90 GEMMs (one, or a backward's two) with one setup launch, which also gathers `gather`'s
// rows when given; their workspaces are one buffer from the caching allocator (stream-ordered).
void run_sm90(const Sm90Gemm* gemms, int count, const at::Tensor& like, const sm90::Gather* gather = nullptr) {
  TORCH_INTERNAL_ASSERT(count >= 1 && count <= sm90::kMaxRun);
  sm90::GroupedGemm g[sm90::kMaxRun];
  int ids[sm90::kMaxRun];
  int64_t at[sm90::kMaxRun + 1] = {0};
  for (int i = 0; i < count; ++i) {
    g[i] = gemms[i].g;
    ids[i] = gemms[i].config;
    at[i + 1] = at[i] + (static_cast<int64_t>(sm90::workspace_bytes(g[i], ids[i])) + 255) / 256 * 256;
  }
  auto workspace = at::empty({at[count]}, like.options().dtype(at::kByte));
  void* ws[sm90::kMaxRun];
  for (int i = 0; i < count; ++i) ws[i] = static_cast<char*>(workspace.mutable_data_ptr()) + at[i];
  const char* err = sm90::run(g, ids, ws, count, at::cuda::getCurrentCUDAStream(), gather);
  TORCH_CHECK(err == nullptr, err);
}

sm90::GroupedGemm sm90_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                               int64_t E, int64_t X, int64_t Y) {
  sm90::GroupedGemm g;
  g.a = a.const_data_ptr();
  g.lda = a.stride(0);
  g.b = b.const_data_ptr();
  g.offs = offs.const_data_ptr<int>();
  g.E = static_cast<int>(E);
  g.N = static_cast<int>(a.size(0));
  g.X = static_cast<int>(X);
  g.Y = static_cast<int>(Y);
  g.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  g.device = a.get_device();
  return g;
}

// grouped_mm's sm90 GEMM for operands as mm_operands leaves them, where that is grouped_mm_cuda's
// path once the streaming kernel is ruled out (a bfloat16 layout CUTLASS takes, "auto"/"stream" on
// sm90); the setup launch zeroes the padding rows. Else nullopt.
std::optional<Sm90Gemm> sm90_forward(const MmOperands& o, const at::Tensor& offs, Backend be) {
  const int64_t N = o.a.size(0), X = o.a.size(1), Y = o.b.size(2), E = o.b.size(0);
  if (!(X > 0 && cutlass_layout_ok(o.a, o.b, E, X, Y) && use_sm90(be))) return std::nullopt;
  Sm90Gemm r{sm90_problem(o.a, o.b, offs, E, X, Y), sm90_config(false, N, E, X, Y), at::empty({N, Y}, o.a.options())};
  r.g.c = r.out.mutable_data_ptr();
  r.g.b_col = o.b_col;
  r.g.ldb = o.b_ld;
  r.g.b_batch = o.b.stride(0);
  return r;
}

// x's rows for the sm90 kernels as they are (sm90::GatheredX without order: routed row i is x's row
// i), where the kernels take its layout (bfloat16, unit column stride, 16-byte rows: D and the row
// stride multiples of 8, aligned); else nullopt.
std::optional<sm90::GatheredX> routed_x(const at::Tensor& x) {
  const int64_t rows = x.size(0), D = x.size(1);
  const int64_t ldx = rows > 1 ? x.stride(0) : D;
  if (x.scalar_type() != at::kBFloat16 || (D > 1 && x.stride(1) != 1) || D % 8 != 0 || ldx % 8 != 0 ||
      !aligned16(x.const_data_ptr()))
    return std::nullopt;
  sm90::GatheredX g;
  g.x = x.const_data_ptr();
  g.ldx = ldx;
  g.slots = rows;
  return g;
}

// x_TD's rows through the plan for the sm90 kernels (routed_x's layout rules), reading order_N in
// place; else nullopt.
std::optional<sm90::GatheredX> gathered_x(const at::Tensor& x_TD, const at::Tensor& order_N,
                                          const at::Tensor& rows_TK) {
  auto g = routed_x(x_TD);
  if (!g || !order_N.is_contiguous()) return std::nullopt;
  g->order = order_N.const_data_ptr<int64_t>();
  g->slots = rows_TK.numel();
  g->K = static_cast<int>(rows_TK.size(1));
  return g;
}

// The gathered kernel's problem for A's N routed rows `rows` and b_EXY (bfloat16, contiguous along
// Y, or along X: b_col, a transposed nn.Linear weight): b's layout and the sizes, the outputs, offs
// and the epilogue left to the caller; nullopt where b's layout is neither or N is not an int.
std::optional<sm90::GatheredGemm> gathered_problem(const sm90::GatheredX& rows, const at::Tensor& b_EXY, int64_t N) {
  const int64_t E = b_EXY.size(0), D = b_EXY.size(1), Y = b_EXY.size(2);
  const bool b_col = b_EXY.stride(2) != 1 && b_EXY.stride(1) == 1;
  if (b_EXY.scalar_type() != at::kBFloat16 || !(b_EXY.stride(2) == 1 || b_col) || N > std::numeric_limits<int>::max() ||
      E > std::numeric_limits<int>::max())
    return std::nullopt;
  sm90::GatheredGemm g;
  g.rows = rows;
  g.b = b_EXY.const_data_ptr();
  g.b_col = b_col;
  g.ldb = b_col ? b_EXY.stride(2) : b_EXY.stride(1);
  g.b_batch = E > 1 ? b_EXY.stride(0) : D * Y;  // (any 16-byte stride for one expert)
  g.E = static_cast<int>(E);
  g.N = static_cast<int>(N);
  g.D = static_cast<int>(D);
  g.Y = static_cast<int>(Y);
  g.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return g;
}

// permute(x_TD, order_N, rows_TK) as the rows of a new x_ND (N, D), to be written by an sm90 setup
// launch (gather): where gathered_x takes x_TD; else nullopt, before any allocation (the permute
// kernel runs). The same bytes as the permute kernel: a copy.
struct GatheredRows {
  at::Tensor x_ND;
  sm90::Gather gather;
};

std::optional<GatheredRows> sm90_gather(const at::Tensor& x_TD, const at::Tensor& order_N, const at::Tensor& rows_TK) {
  const auto rows = gathered_x(x_TD, order_N, rows_TK);
  if (!rows) return std::nullopt;
  const int64_t N = order_N.size(0), D = x_TD.size(1);
  GatheredRows r{at::empty({N, D}, x_TD.options()), {}};
  r.gather.rows = *rows;
  r.gather.out = r.x_ND.mutable_data_ptr();
  r.gather.N = N;
  r.gather.D = D;
  return r;
}

// moekit's one-launch gathered sm90 GEMMs serve gathered calls: the setting sm90_gathered asks for
// them ("fused"; "auto" does not yet, see config.h) and moekit's sm90 GEMM serves the call.
bool fused_gathered() {
  return config::sm90_gathered() == config::Sm90Gathered::kFused && use_sm90(config::cuda_gemm());
}

// gather_grouped_mm (swiglu=false: returns (h, empty)) or gather_grouped_mm_swiglu (returns (act, h
// or an empty (0, Y) without keep_h)) in one launch of moekit's gathered sm90 GEMM
// (sm90/gathered_gemm.cu: x_TD's rows read in place, SwiGLU in the epilogue), where the setting
// sm90_gathered asks for it ("fused"; "auto" does not yet, see config.h), moekit's sm90 GEMM serves
// the call, and the kernel's layout rules hold (bfloat16, x_TD with unit column stride, b
// contiguous along Y or along X, Y a multiple of 128, 16-byte strides, E <= 1024); else nullopt,
// before any allocation but a copy of a non-contiguous order_N.
std::optional<std::tuple<at::Tensor, at::Tensor>> gathered_sm90(const at::Tensor& x_TD, const at::Tensor& order_N,
                                                                const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                                                const at::Tensor& offs_E, bool swiglu, bool keep_h) {
  if (!fused_gathered()) return std::nullopt;
  const int64_t N = order_N.size(0), Y = b_EXY.size(2);
  const auto order = order_N.contiguous();
  const auto rows = gathered_x(x_TD, order, rows_TK);
  auto problem = rows ? gathered_problem(*rows, b_EXY, N) : std::nullopt;
  if (!problem) return std::nullopt;
  sm90::GatheredGemm& g = *problem;
  g.swiglu = swiglu;
  if (sm90::gathered_gemm_unsupported(g) != nullptr) return std::nullopt;
  const auto offs = offs_E.contiguous();
  auto act = at::empty({swiglu ? N : 0, Y / 2}, x_TD.options());
  auto h = at::empty({!swiglu || keep_h ? N : 0, Y}, x_TD.options());
  g.offs = offs.const_data_ptr<int>();
  g.act = swiglu ? act.mutable_data_ptr() : nullptr;
  g.h = h.size(0) > 0 ? h.mutable_data_ptr() : nullptr;
  const char* err = sm90::gathered_gemm(g, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  if (!swiglu) return std::make_tuple(h, act);
  return std::make_tuple(act, h);
}

// gather_grouped_mm_wgrad in one launch of moekit's gathered sm90 GEMM (x_TD's rows read in place)
// where sm90_gathered asks for it ("fused"), moekit's sm90 GEMM serves the call and the kernel's
// rules hold (bfloat16, unit column strides, D and Y multiples of 8, 16-byte rows); the weight
// gradient in b's layout ((E, D, Y), or out_yx the transpose of an (E, Y, D) tensor). Else nullopt,
// before any allocation but a copy of a non-contiguous order_N.
std::optional<at::Tensor> gathered_wgrad_sm90(const at::Tensor& x_TD, const at::Tensor& order_N,
                                              const at::Tensor& rows_TK, const at::Tensor& g_NY,
                                              const at::Tensor& offs_E, bool out_yx) {
  if (!fused_gathered()) return std::nullopt;
  const int64_t N = order_N.size(0), D = x_TD.size(1), Y = g_NY.size(1), E = offs_E.size(0);
  const auto order = order_N.contiguous();
  const auto rows = gathered_x(x_TD, order, rows_TK);
  if (!rows || g_NY.scalar_type() != at::kBFloat16 || (Y > 1 && g_NY.stride(1) != 1) ||
      N > std::numeric_limits<int>::max() || E > std::numeric_limits<int>::max())
    return std::nullopt;
  sm90::GatheredWgrad w;
  w.rows = *rows;
  w.g = g_NY.const_data_ptr();
  w.ldg = N > 1 ? g_NY.stride(0) : Y;
  w.out_yx = out_yx;
  w.E = static_cast<int>(E);
  w.N = static_cast<int>(N);
  w.D = static_cast<int>(D);
  w.Y = static_cast<int>(Y);
  w.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (sm90::gathered_wgrad_unsupported(w) != nullptr) return std::nullopt;
  const auto offs = offs_E.contiguous();
  auto out = out_yx ? at::empty({E, Y, D}, x_TD.options()) : at::empty({E, D, Y}, x_TD.options());
  w.offs = offs.const_data_ptr<int>();
  w.out = out.mutable_data_ptr();
  const char* err = sm90::gathered_wgrad(w, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return out_yx ? out.transpose(1, 2) : out;
}

// grouped_mm_wgrad's sm90 GEMM (a and g with unit column strides, N > 0, E <= 65535), where that is
// grouped_mm_wgrad_cuda's path; the setup launch zeroes the experts with no rows. Else nullopt.
std::optional<Sm90Gemm> sm90_wgrad(const at::Tensor& a, const at::Tensor& g_NY, const at::Tensor& offs, Backend be) {
  const int64_t N = a.size(0), X = a.size(1), Y = g_NY.size(1), E = offs.size(0);
  if (!(cutlass_layout_ok(a, g_NY, E, X, Y) && use_sm90(be))) return std::nullopt;
  Sm90Gemm r{sm90_problem(a, g_NY, offs, E, X, Y), sm90_config(true, N, E, X, Y), at::empty({E, X, Y}, a.options())};
  r.g.c = r.out.mutable_data_ptr();
  r.g.wgrad = true;
  r.g.ldb = g_NY.stride(0);
  return r;
}
#endif

at::Tensor grouped_mm_torch_path(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs) {
  const int64_t N = a.size(0), Y = b.size(2), E = b.size(0);
  check_offs(offs, E, N);
  // PyTorch (2.9-2.11) sizes its tile from the mean rows per expert, a_NX.size(0) / E: 64 x 128
  // at 128 or fewer, 128 x 256 above. With 65-128 rows per expert the short tile reads every
  // expert's weights twice, and at fine-grained shapes the weights are most of the bytes
  // (DeepSeek-V3 at 4096 tokens: 7.5 GB, twice). When a few more rows (at most N/16) reach 129
  // per expert, a_NX is passed with that row count: the extra rows are past offs_E[E-1], so
  // nothing reads them, and the extra output rows are dropped.
  // The trick relies on PyTorch internals (its tile heuristic, and that the rows past the offsets are
  // never read), so it is applied only to the versions it was measured with.
  at::Tensor a_call = a;
  constexpr bool kTallTileTrick = TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9 &&
                                  TORCH_VERSION_MINOR <= 11;
  if (kTallTileTrick && N / E > 64 && N / E <= 128 && Y > 128 && (129 * E - N) * 16 <= N) {
    a_call = at::from_blob(const_cast<void*>(a.const_data_ptr()), {129 * E, a.size(1)}, a.strides(),
                           a.options());
  }
  auto c = at::_grouped_mm(a_call, b, offs);
  if (c.size(0) != N) c = c.narrow(0, 0, N);
  TORCH_INTERNAL_ASSERT(c.is_contiguous() && c.size(0) == N && c.size(1) == Y);
  zero_tail_rows(c, offs, E);
  return c;
}

at::Tensor grouped_mm_wgrad_torch_path(const at::Tensor& a, const at::Tensor& g,
                                       const at::Tensor& offs) {
  const int64_t N = a.size(0), X = a.size(1), Y = g.size(1), E = offs.size(0);
  check_offs(offs, E, N);
  auto w = at::_grouped_mm(a.t(), g, offs);  // (X, N) @ (N, Y) per group of rows: (E, X, Y)
  TORCH_INTERNAL_ASSERT(w.is_contiguous() && w.size(0) == E && w.size(1) == X && w.size(2) == Y);
  zero_empty_experts(w, offs, E, X, Y);
  return w;
}

}  // namespace

at::Tensor grouped_mm_cuda(const at::Tensor& a_NX, const at::Tensor& b_EXY,
                           const at::Tensor& offs_E) {
  check_grouped_mm_args(a_NX, b_EXY, offs_E);
  c10::cuda::CUDAGuard guard(a_NX.device());
  const int64_t N = a_NX.size(0), X = a_NX.size(1), Y = b_EXY.size(2), E = b_EXY.size(0);
  check_sizes("grouped_mm", N, X, Y);
  if (N == 0 || Y == 0) return at::empty({N, Y}, a_NX.options());
  const MmOperands o = mm_operands(a_NX, b_EXY);
  const auto& a = o.a;
  const auto& b = o.b;
  const auto offs = offs_E.contiguous();
  const Backend be = config::cuda_gemm();  // may raise: a bad MOE_CUDA_GEMM
  if (use_stream(be, N, E) && stream_layout_ok(a, a.stride(0), b, o.b_col, o.b_ld, N, E, X, Y))
    return grouped_mm_stream_path(a, at::Tensor(), 1, b, o.b_col, offs, N);
#ifdef MOE_WITH_SM90_GEMM
  if (auto gemm = sm90_forward(o, offs, be)) {
    run_sm90(&*gemm, 1, a);  // asserts offs_E and zeroes the padding rows too
    return gemm->out;
  }
#endif
  if (X > 0 && cutlass_layout_ok(a, b, E, X, Y) && use_torch(be, E)) return grouped_mm_torch_path(a, b, offs);
  auto c = at::empty({N, Y}, a_NX.options());
  Params p{a.const_data_ptr(), a.stride(0), a.stride(1), b.const_data_ptr(), b.stride(0),
           b.stride(1), b.stride(2), c.mutable_data_ptr(), offs.const_data_ptr<int>(),
           static_cast<int>(E), static_cast<int>(N), static_cast<int>(X), static_cast<int>(Y),
           false, false};
  p.vec_in = aligned16(a.const_data_ptr()) && aligned16(b.const_data_ptr()) &&
             a.stride(0) % 8 == 0 && b.stride(0) % 8 == 0 && o.b_ld % 8 == 0;
  p.vec_out = Y % 8 == 0 && aligned16(c.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "moe_grouped_mm_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    if (o.b_col) launch_grouped<T, true>(p);
    else launch_grouped<T, false>(p);
  });
  return c;
}

at::Tensor grouped_mm_wgrad_cuda(const at::Tensor& a_NX, const at::Tensor& g_NY,
                                 const at::Tensor& offs_E) {
  check_grouped_mm_wgrad_args(a_NX, g_NY, offs_E);
  c10::cuda::CUDAGuard guard(a_NX.device());
  const int64_t N = a_NX.size(0), X = a_NX.size(1), Y = g_NY.size(1), E = offs_E.size(0);
  check_sizes("grouped_mm_wgrad", N, X, Y);
  if (E == 0 || X == 0 || Y == 0) return at::empty({E, X, Y}, a_NX.options());
  TORCH_CHECK(E <= 65535, "moe.grouped_mm_wgrad: at most 65535 experts, got E=", E);
  const auto a = unit_inner(a_NX);
  const auto g = unit_inner(g_NY);
  const auto offs = offs_E.contiguous();
  const Backend be = config::cuda_gemm();  // may raise: a bad MOE_CUDA_GEMM
#ifdef MOE_WITH_SM90_GEMM
  if (N > 0) {
    if (auto gemm = sm90_wgrad(a, g, offs, be)) {
      run_sm90(&*gemm, 1, a);  // asserts offs_E and zeroes the experts with no rows too
      return gemm->out;
    }
  }
#endif
  if (N > 0 && cutlass_layout_ok(a, g, E, X, Y) && use_torch(be, E)) return grouped_mm_wgrad_torch_path(a, g, offs);
  auto out = at::empty({E, X, Y}, a_NX.options());
  Params p{a.const_data_ptr(), a.stride(0), a.stride(1), g.const_data_ptr(), g.stride(0),
           g.stride(1), 0, out.mutable_data_ptr(), offs.const_data_ptr<int>(),
           static_cast<int>(E), static_cast<int>(N), static_cast<int>(X), static_cast<int>(Y),
           false, false};
  p.vec_in = aligned16(a.const_data_ptr()) && aligned16(g.const_data_ptr()) &&
             a.stride(0) % 8 == 0 && g.stride(0) % 8 == 0;
  p.vec_out = Y % 8 == 0 && aligned16(out.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "moe_grouped_mm_wgrad_cuda", [&] {
    launch_wgrad<typename DeviceType<scalar_t>::type>(p);
  });
  return out;
}

// d b of a backward op, in b's layout: grouped_mm_wgrad(a, grad), or for an nn.Linear-style b (a
// transposed (E, Y, X) view) grouped_mm_wgrad(grad, a) transposed.
at::Tensor weight_grad(const at::Tensor& grad_NY, const at::Tensor& a_NX, const at::Tensor& b_EXY,
                       const at::Tensor& offs_E) {
  return is_yx_layout(b_EXY) ? grouped_mm_wgrad_cuda(grad_NY, a_NX, offs_E).transpose(1, 2)
                             : grouped_mm_wgrad_cuda(a_NX, grad_NY, offs_E);
}

#ifdef MOE_WITH_SM90_GEMM
// (grouped_mm(grad_NY, b^T), weight_grad(grad_NY, a_NX, b)) with one setup launch for both GEMMs,
// where grouped_mm_cuda and grouped_mm_wgrad_cuda would each run an sm90 GEMM: the same kernels
// and configurations, so the same bits, in three launches instead of four; a_NX's rows may be
// gathered by that setup launch. Else nullopt, before any launch.
std::optional<std::tuple<at::Tensor, at::Tensor>> backward_sm90(const at::Tensor& grad_NY, const at::Tensor& a_NX,
                                                                const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                                                const sm90::Gather* gather = nullptr) {
  const int64_t N = grad_NY.size(0), X = a_NX.size(1), Y = grad_NY.size(1), E = b_EXY.size(0);
  if (N == 0 || X == 0 || Y == 0 || E == 0 || E > 65535) return std::nullopt;  // the ops' own cases
  const Backend be = config::cuda_gemm();  // may raise: a bad MOE_CUDA_GEMM
  const auto offs = offs_E.contiguous();
  const MmOperands d = mm_operands(grad_NY, b_EXY.transpose(1, 2));  // (N, Y) @ (E, Y, X)
  if (use_stream(be, N, E) && stream_layout_ok(d.a, d.a.stride(0), d.b, d.b_col, d.b_ld, N, E, Y, X))
    return std::nullopt;
  auto dgrad = sm90_forward(d, offs, be);
  if (!dgrad) return std::nullopt;
  const bool yx = is_yx_layout(b_EXY);
  const at::Tensor a = unit_inner(a_NX), g = unit_inner(grad_NY);  // alive until both GEMMs are enqueued
  auto wgrad = yx ? sm90_wgrad(g, a, offs, be) : sm90_wgrad(a, g, offs, be);
  if (!wgrad) return std::nullopt;
  const Sm90Gemm both[2] = {*dgrad, *wgrad};
  run_sm90(both, 2, grad_NY, gather);  // (a gather writes a_NX's rows before the GEMMs read them)
  return std::make_tuple(dgrad->out, yx ? wgrad->out.transpose(1, 2) : wgrad->out);
}
#endif

// moe.grouped_mm_backward on CUDA: on the sm90 path one setup launch and the two GEMMs, else the
// two ops' CUDA entries.
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cuda(const at::Tensor& grad_NY, const at::Tensor& a_NX,
                                                            const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                                            bool grad_a, bool grad_b) {
  check_grouped_mm_backward_args(grad_NY, a_NX, b_EXY, offs_E);
  c10::cuda::CUDAGuard guard(a_NX.device());
  const int64_t X = a_NX.size(1), Y = b_EXY.size(2);
  check_sizes("grouped_mm_backward", a_NX.size(0), X, Y);
#ifdef MOE_WITH_SM90_GEMM
  if (grad_a && grad_b) {
    if (auto both = backward_sm90(grad_NY, a_NX, b_EXY, offs_E)) return *both;
  }
#endif
  return {grad_a ? grouped_mm_cuda(grad_NY, b_EXY.transpose(1, 2), offs_E) : a_NX.new_empty({0, X}),
          grad_b ? weight_grad(grad_NY, a_NX, b_EXY, offs_E) : b_EXY.new_empty({0, X, Y})};
}

#ifdef MOE_WITH_SM90_GEMM
// grouped_mm(permute(x_TD), b) where grouped_mm_cuda would run its sm90 GEMM on the permuted rows:
// the setup launch gathers them (two launches, not three; the same bits). Else nullopt, before any
// launch.
std::optional<at::Tensor> gathered_forward_sm90(const at::Tensor& x_TD, const at::Tensor& order_N,
                                                const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                                const at::Tensor& offs_E) {
  const int64_t N = order_N.size(0), D = x_TD.size(1), Y = b_EXY.size(2), E = b_EXY.size(0);
  if (N == 0 || Y == 0) return std::nullopt;  // grouped_mm_cuda's own cases
  const Backend be = config::cuda_gemm();  // may raise: a bad MOE_CUDA_GEMM
  if (!use_sm90(be)) return std::nullopt;  // (before any copy mm_operands may make)
  const auto rows = sm90_gather(x_TD, order_N, rows_TK);
  if (!rows) return std::nullopt;
  const MmOperands o = mm_operands(rows->x_ND, b_EXY);
  if (use_stream(be, N, E) && stream_layout_ok(o.a, o.a.stride(0), o.b, o.b_col, o.b_ld, N, E, D, Y))
    return std::nullopt;
  const auto offs = offs_E.contiguous();
  auto gemm = sm90_forward(o, offs, be);
  if (!gemm) return std::nullopt;
  run_sm90(&*gemm, 1, rows->x_ND, &rows->gather);
  return gemm->out;
}
#endif

// Gathered rows: the streaming kernel reads x_TD through the plan where it serves the call (decode
// sizes, see use_stream); on sm90 with sm90_gathered="fused" moekit's gathered GEMM reads it in place
// (one launch); else the sm90 setup launch gathers the rows for the CUTLASS GEMM, or the two-op form:
// moe.permute's kernel, then grouped_mm's own choice.
at::Tensor gather_grouped_mm_cuda(const at::Tensor& x_TD, const at::Tensor& order_N,
                                  const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                  const at::Tensor& offs_E) {
  check_gather_grouped_mm_args(x_TD, order_N, rows_TK, b_EXY, offs_E);
  c10::cuda::CUDAGuard guard(x_TD.device());
  const int64_t N = order_N.size(0);
  check_sizes("gather_grouped_mm", N, x_TD.size(1), b_EXY.size(2));
  bool b_col = false;
  if (gather_streams(x_TD, b_EXY, N, b_col))
    return grouped_mm_stream_path(x_TD, order_N.contiguous(), rows_TK.size(1), b_EXY, b_col,
                                  offs_E.contiguous(), N);
#ifdef MOE_WITH_SM90_GEMM
  if (auto fused = gathered_sm90(x_TD, order_N, rows_TK, b_EXY, offs_E, /*swiglu=*/false, /*keep_h=*/true))
    return std::get<0>(*fused);
  if (auto c = gathered_forward_sm90(x_TD, order_N, rows_TK, b_EXY, offs_E)) return *c;
#endif
  return grouped_mm_cuda(permute_cuda(x_TD, order_N, rows_TK, std::nullopt), b_EXY, offs_E);
}

// moe.gather_grouped_mm_wgrad on CUDA: with sm90_gathered="fused" moekit's gathered sm90 GEMM (one
// launch, x_TD's rows read in place); else grouped_mm_wgrad on permute(x_TD) (with out_yx,
// grouped_mm_wgrad(g, permute(x_TD)) transposed), the permuted rows gathered by the sm90 setup
// launch where that GEMM runs (two launches), else the permute kernel first.
at::Tensor gather_grouped_mm_wgrad_cuda(const at::Tensor& x_TD, const at::Tensor& order_N, const at::Tensor& rows_TK,
                                        const at::Tensor& g_NY, const at::Tensor& offs_E, bool out_yx) {
  check_gather_grouped_mm_wgrad_args(x_TD, order_N, rows_TK, g_NY, offs_E);
  c10::cuda::CUDAGuard guard(x_TD.device());
  const int64_t N = order_N.size(0), D = x_TD.size(1), Y = g_NY.size(1);
  check_sizes("gather_grouped_mm_wgrad", N, D, Y);
#ifdef MOE_WITH_SM90_GEMM
  if (auto fused = gathered_wgrad_sm90(x_TD, order_N, rows_TK, g_NY, offs_E, out_yx)) return *fused;
  const int64_t E = offs_E.size(0);
  const Backend be = config::cuda_gemm();  // may raise: a bad MOE_CUDA_GEMM
  if (N > 0 && D > 0 && Y > 0 && E > 0 && E <= 65535 && use_sm90(be)) {  // else grouped_mm_wgrad_cuda's cases
    if (const auto rows = sm90_gather(x_TD, order_N, rows_TK)) {
      const auto g = unit_inner(g_NY), offs = offs_E.contiguous();
      if (auto gemm = out_yx ? sm90_wgrad(g, rows->x_ND, offs, be) : sm90_wgrad(rows->x_ND, g, offs, be)) {
        run_sm90(&*gemm, 1, rows->x_ND, &rows->gather);
        return out_yx ? gemm->out.transpose(1, 2) : gemm->out;
      }
    }
  }
#endif
  const auto x_ND = permute_cuda(x_TD, order_N, rows_TK, std::nullopt);
  return out_yx ? grouped_mm_wgrad_cuda(g_NY, x_ND, offs_E).transpose(1, 2) : grouped_mm_wgrad_cuda(x_ND, g_NY, offs_E);
}

// moe.gather_grouped_mm_backward on CUDA: d b is gather_grouped_mm_wgrad, d x unpermute of
// grouped_mm(grad, b^T); on the sm90 path one setup launch gathers x's rows and sets up both GEMMs
// (four launches with the unpermute); with sm90_gathered="fused" d b is the gathered GEMM's one
// launch, which reads x_TD in place (four launches, no gathered copy).
std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward_cuda(const at::Tensor& grad_NY, const at::Tensor& x_TD,
                                                                   const at::Tensor& order_N, const at::Tensor& rows_TK,
                                                                   const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                                                   bool grad_x, bool grad_b) {
  check_gather_grouped_mm_backward_args(grad_NY, x_TD, order_N, rows_TK, b_EXY, offs_E);
  c10::cuda::CUDAGuard guard(x_TD.device());
  const int64_t D = x_TD.size(1), Y = b_EXY.size(2);
  check_sizes("gather_grouped_mm_backward", order_N.size(0), D, Y);
  at::Tensor rows_ND, d_b;  // d x before the sum over each token's rows
#ifdef MOE_WITH_SM90_GEMM
  // with the gathered GEMM (sm90_gathered="fused") d b reads x_TD in place: no gathered copy to share
  const bool share = !fused_gathered();
  if (share && grad_x && grad_b && order_N.size(0) > 0) {
    if (const auto rows = sm90_gather(x_TD, order_N, rows_TK)) {
      if (auto both = backward_sm90(grad_NY, rows->x_ND, b_EXY, offs_E, &rows->gather)) std::tie(rows_ND, d_b) = *both;
    }
  }
#endif
  if (!d_b.defined()) {
    if (grad_x) rows_ND = grouped_mm_cuda(grad_NY, b_EXY.transpose(1, 2), offs_E);
    d_b = grad_b ? gather_grouped_mm_wgrad_cuda(x_TD, order_N, rows_TK, grad_NY, offs_E, is_yx_layout(b_EXY))
                 : b_EXY.new_empty({0, D, Y});
  }
  return {grad_x ? unpermute_cuda(rows_ND, order_N, rows_TK, std::nullopt) : x_TD.new_empty({0, D}), d_b};
}

// moe.gather_grouped_mm_swiglu on CUDA: where the streaming kernel serves the gathered GEMM (decode
// sizes, its layout rules) and F is a multiple of half its column block, one launch with the
// SwiGLU epilogue (stream_gemm.cuh: the same bits as moe.swiglu on the streamed h, which is
// written only with keep_h); on sm90 with sm90_gathered="fused", moekit's gathered GEMM with SwiGLU's
// epilogue (one launch, gathered_sm90); else gather_grouped_mm's path, then the swiglu kernel.
std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_swiglu_cuda(const at::Tensor& x_TD, const at::Tensor& order_N,
                                                                 const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                                                 const at::Tensor& offs_E, bool keep_h) {
  check_gather_grouped_mm_swiglu_args(x_TD, order_N, rows_TK, b_EXY, offs_E);
  c10::cuda::CUDAGuard guard(x_TD.device());
  const int64_t N = order_N.size(0), Y = b_EXY.size(2), F = Y / 2;
  check_sizes("gather_grouped_mm_swiglu", N, x_TD.size(1), Y);
  bool b_col = false;
  if (gather_streams(x_TD, b_EXY, N, b_col) && F % (stream_cols(b_col, int(16 / x_TD.element_size())) / 2) == 0) {
    auto act = at::empty({N, F}, x_TD.options());
    auto h = at::empty({keep_h ? N : 0, Y}, x_TD.options());
    const auto order = order_N.contiguous(), offs = offs_E.contiguous();
    StreamParams p = stream_params(x_TD, order, rows_TK.size(1), b_EXY, b_col, offs, N,
                                   keep_h ? h.mutable_data_ptr() : nullptr);
    p.act = act.mutable_data_ptr();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_TD.scalar_type(), "moe_gather_swiglu_stream", [&] {
      using T = typename DeviceType<scalar_t>::type;
      if (b_col) launch_stream<T, true, T, true>(p);
      else launch_stream<T, false, T, true>(p);
    });
    return {act, h};
  }
#ifdef MOE_WITH_SM90_GEMM
  if (auto fused = gathered_sm90(x_TD, order_N, rows_TK, b_EXY, offs_E, /*swiglu=*/true, keep_h)) return *fused;
#endif
  at::Tensor h = gather_grouped_mm_cuda(x_TD, order_N, rows_TK, b_EXY, offs_E);
  at::Tensor act = swiglu_cuda(h);
  return {act, keep_h ? h : h.new_empty({0, Y})};
}

// moe.grouped_mm_w8 (weight-only int8 experts, inference) on CUDA: the weight-streaming kernel with
// q_EYX read as column-major int8 weights (half the bytes of bfloat16), float32 sums, each times
// its channel's scale and rounded once to a's dtype, as the CPU kernel and the twin do. Any number
// of rows per expert (passes of up to 4 rows; later passes find the weights in L2; so it is meant
// for decode: a prefill of many rows per expert runs many passes), no host sync.
// Where the kernel's layout rules fail (X not a multiple of 16, unaligned rows or weights), a
// float32 grouped_mm on the dequantised weights, then the scales of each row's expert.
at::Tensor grouped_mm_w8_cuda(const at::Tensor& a_NX, const at::Tensor& q_EYX, const at::Tensor& scale_EY,
                              const at::Tensor& offs_E) {
  check_grouped_mm_w8_args(a_NX, q_EYX, scale_EY, offs_E);
  c10::cuda::CUDAGuard guard(a_NX.device());
  const int64_t N = a_NX.size(0), X = a_NX.size(1), E = q_EYX.size(0), Y = q_EYX.size(1);
  check_sizes("grouped_mm_w8", N, X, Y);
  if (N == 0 || Y == 0) return at::empty({N, Y}, a_NX.options());
  const auto a = a_NX.stride(1) == 1 ? a_NX : a_NX.contiguous();
  const auto q = q_EYX.stride(2) == 1 ? q_EYX : q_EYX.contiguous();
  const auto scale = scale_EY.contiguous();
  const auto offs = offs_E.contiguous();
  // The streaming kernel's rules for column-major b with 16 int8 weights per vector.
  const bool ok = stream_sizes_ok(N, E, X, Y, stream_cols(true, 16)) && q.stride(0) % 16 == 0 &&
                  vec16_ok(q.const_data_ptr(), X, q.stride(1), 1) &&
                  vec16_ok(a.const_data_ptr(), X, a.stride(0), a.element_size());
  if (!ok) {
    if (E == 0) return at::zeros({N, Y}, a.options());  // every row is padding
    auto sums = grouped_mm_cuda(a.to(at::kFloat), q.to(at::kFloat).transpose(1, 2), offs);
    auto rows = at::arange(N, offs.options());
    auto expert = at::searchsorted(offs, rows, /*out_int32=*/true, /*right=*/true).clamp_max(E - 1);
    return sums.mul_(scale.index_select(0, expert)).to(a.scalar_type());  // padding rows: 0 * scale
  }
  auto c = at::empty({N, Y}, a.options());
  StreamParams p{a.const_data_ptr(), a.stride(0), nullptr, 1, N, q.const_data_ptr(), q.stride(0), q.stride(1),
                 c.mutable_data_ptr(), offs.const_data_ptr<int>(), static_cast<int>(E), static_cast<int>(N),
                 static_cast<int>(X), static_cast<int>(Y), scale.const_data_ptr<float>()};
  AT_DISPATCH_SWITCH(a.scalar_type(), "moe_grouped_mm_w8_cuda",  // the dtypes the check allows
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch_stream<float, true, int8_t>(p); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { launch_stream<__nv_bfloat16, true, int8_t>(p); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch_stream<__half, true, int8_t>(p); }));
  return c;
}

// ---- grouped_mm_unpermute: the down projection and the weighted combine ------------------------
// Forward: grouped_mm's path, then the unpermute kernel (the two ops' launches and values); on sm90
// with sm90_gathered="fused" the gathered kernel's token-major epilogue and a contiguous sum over k
// (scatter_sm90). Backward
// (csrc/grouped_mm.cpp has the formula): g = gather_grouped_mm(grad_TD, plan, b^T) (grad's rows read
// through the plan on the paths that gather), one row kernel for d a = w g, d w = <a, g> and the
// scaled rows w a, then gather_grouped_mm_wgrad(grad_TD, plan, w a): no (N, Y) tensor is read or
// written; with swiglu the activation is recomputed from h in that kernel, which also writes d h. g is
// the GEMM's output in the data dtype (the twin's arithmetic).

namespace {

#ifdef MOE_WITH_SM90_GEMM
// The down projection and the combine where sm90_gathered asks for moekit's gathered GEMMs
// ("fused") and the kernel's rules hold (bfloat16 a and b, a with unit column stride and 16-byte
// rows, b contiguous along Y or X, Y a multiple of 128, E <= 1024): one launch of the gathered
// kernel over a's rows in place whose epilogue multiplies each row by its routing weight and stores
// it token-major (row t * K + k of a (T*K, Y) buffer), then the combine as a contiguous sum over
// each token's K rows (sum_slots_cuda). Each product is rounded after its weight, so the values
// meet the GEMM error rule, not the two ops' bits. Else nullopt, before any allocation (also for a
// non-contiguous order_N, which the kernel reads in place; plans' are contiguous).
std::optional<at::Tensor> scatter_sm90(const at::Tensor& a_NX, const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                       const at::Tensor& order_N, const at::Tensor& rows_TK,
                                       const std::optional<at::Tensor>& weights_TK) {
  if (!fused_gathered() || !order_N.is_contiguous()) return std::nullopt;
  const int64_t N = a_NX.size(0), Y = b_EXY.size(2), slots = rows_TK.numel();
  const auto rows = routed_x(a_NX);  // (no order: a's rows are the routed rows)
  auto problem = rows ? gathered_problem(*rows, b_EXY, N) : std::nullopt;
  if (!problem) return std::nullopt;
  sm90::GatheredGemm& g = *problem;
  g.scatter = order_N.const_data_ptr<int64_t>();
  g.slots = slots;
  if (sm90::gathered_gemm_unsupported(g) != nullptr) return std::nullopt;
  const auto offs = offs_E.contiguous();
  const auto w = weights_TK.has_value() ? weights_TK->contiguous() : at::Tensor();  // float32 or bfloat16
  auto out_s = at::empty({slots, Y}, a_NX.options());
  g.offs = offs.const_data_ptr<int>();
  g.weights = w.defined() ? w.const_data_ptr() : nullptr;
  g.weights_bf16 = w.defined() && w.scalar_type() == at::kBFloat16;
  g.out_s = out_s.mutable_data_ptr();
  const char* err = sm90::gathered_gemm(g, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, err);
  return sum_slots_cuda(out_s, order_N, rows_TK);
}
#endif

}  // namespace

at::Tensor grouped_mm_unpermute_cuda(const at::Tensor& a_NX, const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                     const at::Tensor& order_N, const at::Tensor& rows_TK,
                                     const std::optional<at::Tensor>& weights_TK, bool swiglu) {
  check_grouped_mm_unpermute_args(a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK, swiglu);
  c10::cuda::CUDAGuard guard(a_NX.device());
  const at::Tensor a = swiglu ? swiglu_cuda(a_NX) : a_NX;
#ifdef MOE_WITH_SM90_GEMM
  if (auto fused = scatter_sm90(a, b_EXY, offs_E, order_N, rows_TK, weights_TK)) return *fused;
#endif
  return unpermute_cuda(grouped_mm_cuda(a, b_EXY, offs_E), order_N, rows_TK, weights_TK);
}

namespace {

constexpr int kRowWarps = 8;  // rows (one warp each) per block of the row kernel

// One warp per row i of the N: slot s = order_N[i] (< 0: a padding row, zero). With a_i the GEMM's
// A row (a's row, or with SWIGLU silu(gate) * up of h = a's row, by swiglu_one: the swiglu kernel's
// bits), aw[i] = w_s a_i, d_w[s] = <a_i, g_i> summed in Acc per lane, then across the warp in a fixed
// order, and d_a[i] = w_s g_i (with SWIGLU rounded, then swiglu_grad_one into d h = [d gate; d up]).
template <typename T, typename Acc, bool SWIGLU>
__global__ void unpermute_gemm_rows_kernel(const T* __restrict__ g, const T* __restrict__ a, int64_t sa0,
                                           int64_t sa1, const int64_t* __restrict__ order,
                                           const Acc* __restrict__ w, int64_t N, int64_t X, T* __restrict__ d_a,
                                           Acc* __restrict__ d_w, T* __restrict__ aw) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= N) return;
  const int64_t s = order[i], H = SWIGLU ? 2 * X : X;
  if (s < 0) {
    for (int64_t x = lane; x < X; x += kWarp) {
      if (d_a) {
        d_a[i * H + x] = T(0);
        if (SWIGLU) d_a[i * H + X + x] = T(0);
      }
      if (aw) aw[i * X + x] = T(0);
    }
    return;
  }
  const Acc wi = w ? w[s] : Acc(1);
  Acc dot = 0;
  for (int64_t x = lane; x < X; x += kWarp) {
    Acc av, gate = 0, up = 0;
    if (SWIGLU) {
      gate = static_cast<Acc>(a[i * sa0 + x * sa1]), up = static_cast<Acc>(a[i * sa0 + (X + x) * sa1]);
      av = static_cast<Acc>(static_cast<T>(swiglu_one(gate, up)));
    } else {
      av = static_cast<Acc>(a[i * sa0 + x * sa1]);
    }
    if (aw) aw[i * X + x] = static_cast<T>(wi * av);
    if (g) {
      const Acc gv = static_cast<Acc>(g[i * X + x]);
      dot += av * gv;
      if (d_a) {
        const T da = static_cast<T>(wi * gv);
        if (SWIGLU) {
          Acc d_gate, d_up;
          swiglu_grad_one(static_cast<Acc>(da), gate, up, d_gate, d_up);
          d_a[i * H + x] = static_cast<T>(d_gate);
          d_a[i * H + X + x] = static_cast<T>(d_up);
        } else {
          d_a[i * H + x] = da;
        }
      }
    }
  }
  if (d_w == nullptr) return;
  for (int o = kWarp / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (lane == 0) d_w[s] = dot;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward_cuda(
    const at::Tensor& grad_TD, const at::Tensor& a_NX, const at::Tensor& b_EXY, const at::Tensor& offs_E,
    const at::Tensor& order_N, const at::Tensor& rows_TK, const std::optional<at::Tensor>& weights_TK,
    bool grad_a, bool grad_b, bool grad_weights, bool swiglu) {
  check_grouped_mm_unpermute_backward_args(grad_TD, a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK, swiglu);
  c10::cuda::CUDAGuard guard(a_NX.device());
  const int64_t N = a_NX.size(0), H = a_NX.size(1), X = b_EXY.size(1), Y = b_EXY.size(2);
  const int64_t T = rows_TK.size(0), K = rows_TK.size(1);
  const auto acc = accum_dtype(a_NX.scalar_type());
  const bool weighted = weights_TK.has_value();
  grad_weights = grad_weights && weighted;
  at::Tensor d_a = at::empty({grad_a ? N : 0, H}, a_NX.options());
  at::Tensor d_w = at::zeros({grad_weights ? T : 0, K}, a_NX.options().dtype(acc));
  // the weight gradient's rows w a (a itself without weights and SwiGLU)
  at::Tensor aw = grad_b && (weighted || swiglu) ? at::empty({N, X}, a_NX.options()) : at::Tensor();
  if (N > 0 && X > 0 && (grad_a || grad_weights || aw.defined())) {
    const at::Tensor g = grad_a || grad_weights
                             ? gather_grouped_mm_cuda(grad_TD, order_N, rows_TK, b_EXY.transpose(1, 2), offs_E)
                             : at::Tensor();
    const auto order = order_N.contiguous();
    const auto w = weighted ? weights_TK->to(acc).contiguous() : at::Tensor();
    const auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid(static_cast<unsigned>((N + kRowWarps - 1) / kRowWarps));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_NX.scalar_type(), "moe_grouped_mm_unpermute_rows", [&] {
      using Acc = at::opmath_type<scalar_t>;
      auto launch = [&](auto kernel) {
        kernel<<<grid, kRowWarps * kWarp, 0, stream>>>(
            g.defined() ? g.const_data_ptr<scalar_t>() : nullptr, a_NX.const_data_ptr<scalar_t>(), a_NX.stride(0),
            a_NX.stride(1), order.const_data_ptr<int64_t>(), weighted ? w.const_data_ptr<Acc>() : nullptr, N, X,
            grad_a ? d_a.mutable_data_ptr<scalar_t>() : nullptr, grad_weights ? d_w.mutable_data_ptr<Acc>() : nullptr,
            aw.defined() ? aw.mutable_data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (swiglu) launch(unpermute_gemm_rows_kernel<scalar_t, Acc, true>);
      else launch(unpermute_gemm_rows_kernel<scalar_t, Acc, false>);
    });
  } else if (grad_a) {
    d_a.zero_();
  }
  at::Tensor d_b = grad_b ? gather_grouped_mm_wgrad_cuda(grad_TD, order_N, rows_TK, aw.defined() ? aw : a_NX, offs_E,
                                                         !is_yx_layout(b_EXY)).transpose(1, 2)
                          : b_EXY.new_empty({0, X, Y});
  return {d_a, d_b, d_w};
}

}  // namespace moe::cuda

TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("grouped_mm_w8", &moe::cuda::grouped_mm_w8_cuda);
  m.impl("grouped_mm", &moe::cuda::grouped_mm_cuda);
  m.impl("grouped_mm_wgrad", &moe::cuda::grouped_mm_wgrad_cuda);
  m.impl("gather_grouped_mm", &moe::cuda::gather_grouped_mm_cuda);
  m.impl("gather_grouped_mm_wgrad", &moe::cuda::gather_grouped_mm_wgrad_cuda);
  m.impl("gather_grouped_mm_swiglu", &moe::cuda::gather_grouped_mm_swiglu_cuda);
  m.impl("grouped_mm_backward", &moe::cuda::grouped_mm_backward_cuda);
  m.impl("gather_grouped_mm_backward", &moe::cuda::gather_grouped_mm_backward_cuda);
  m.impl("grouped_mm_unpermute", &moe::cuda::grouped_mm_unpermute_cuda);
  m.impl("grouped_mm_unpermute_backward", &moe::cuda::grouped_mm_unpermute_backward_cuda);
}
