// moe.grouped_mm_w8 on the CPU: the grouped GEMM with weight-only int8 experts, for inference.
//
// Shape legend (moe_ops.h): N routed rows of a_NX, E experts, X/Y the GEMM input/output dims.
// q_EYX holds each expert's int8 weight in nn.Linear layout (output channel y, then its X inputs
// contiguous) and scale_EY the float32 scale of each output channel:
//   c[i, y] = (sum_x float(a[i, x]) * float(q[e, y, x])) * scale[e, y]   for the rows i of expert e,
// summed in float32 and rounded once to a's dtype; rows past offs_E[E-1] are zero.
//
// Decode sizes (a few rows per expert) are the target, where the layer is bound by the bytes of
// the chosen experts' weights: each expert's int8 weights are streamed once, front to back, and
// dequantised in registers (int8 -> int32 -> float32, exact), never written back as a float copy.
// A task is (expert, block of kBlockY output channels): its kBlockY * X weight bytes are one
// contiguous stretch of memory. Inside it, 4 channels x up to 6 rows are one register tile of 24
// float32 accumulators, 16 x-elements per step; rows beyond 6 re-read the 4 channels' weights from
// L1 (each int8 weight is converted once per 6 rows); each tile fetches into L2 the lines of the tile
// kAhead tiles on as it runs (short streams of X bytes: the hardware prefetcher alone left int8 at
// about half its bound). Activations are converted to float32 once (bf16 -> fp32 is exact);
// bfloat16 rows run vdpbf16ps where the CPU has it, except tiles of one row (run_w8). A few rows
// per expert make this loop bound by the weights' conversion, not by memory, so the conversion is
// kept to the fewest instructions per weight. The scale is applied once per output after the sum.
// The AVX-512 loop (cpu_vec.h's MOE_AVX512) runs where the CPU has it; the scalar loop computes
// the same sums in x order elsewhere.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu_vec.h"
#include "moe_ops.h"

namespace moe {

void check_grouped_mm_w8_args(const at::Tensor& a_NX, const at::Tensor& q_EYX,
                              const at::Tensor& scale_EY, const at::Tensor& offs_E) {
  TORCH_CHECK(a_NX.dim() == 2, "moe.grouped_mm_w8: a_NX must be 2-D (N, X), got shape ", a_NX.sizes());
  const auto t = a_NX.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "moe.grouped_mm_w8: a_NX must be float32/bfloat16/float16, got ", t);
  TORCH_CHECK(q_EYX.dim() == 3 && q_EYX.scalar_type() == at::kChar,
              "moe.grouped_mm_w8: q_EYX must be a 3-D int8 tensor (E, Y, X), got ",
              q_EYX.scalar_type(), " of shape ", q_EYX.sizes());
  TORCH_CHECK(q_EYX.size(2) == a_NX.size(1), "moe.grouped_mm_w8: a_NX has X=", a_NX.size(1),
              " columns but q_EYX has X=", q_EYX.size(2), " inputs per channel");
  TORCH_CHECK(scale_EY.scalar_type() == at::kFloat && scale_EY.dim() == 2 &&
                  scale_EY.size(0) == q_EYX.size(0) && scale_EY.size(1) == q_EYX.size(1),
              "moe.grouped_mm_w8: scale_EY must be float32 of shape (E, Y) = (", q_EYX.size(0),
              ", ", q_EYX.size(1), "), got ", scale_EY.scalar_type(), " of shape ", scale_EY.sizes());
  TORCH_CHECK(offs_E.dim() == 1 && offs_E.scalar_type() == at::kInt && offs_E.size(0) == q_EYX.size(0),
              "moe.grouped_mm_w8: offs_E must be 1-D int32 of length E=", q_EYX.size(0),
              " (cumulative end row of each expert), got ", offs_E.scalar_type(), " of shape ",
              offs_E.sizes());
  for (const auto& [name, other] : {std::pair<const char*, const at::Tensor*>{"q_EYX", &q_EYX},
                                    {"scale_EY", &scale_EY}, {"offs_E", &offs_E}})
    TORCH_CHECK(other->device() == a_NX.device(), "moe.grouped_mm_w8: ", name, " is on ",
                other->device(), " but a_NX is on ", a_NX.device());
}

namespace {

constexpr int64_t kBlockY = 64;  // output channels per task
constexpr int kTileY = 4;        // channels per register tile
constexpr int kTileN = 6;        // rows per register tile (6 x 4 accumulators of 32 registers)
constexpr int64_t kAhead = 2;    // tiles between the channels read and those fetched

// Scalar tile: out[r][c] = sum_x a[r][x] * q[c][x] (float32, x order).
template <int R, int C>
void tile_scalar(const void* a_rows, int64_t lda, const int8_t* q, int64_t X, uintptr_t, float* out) {
  const float* a = static_cast<const float*>(a_rows);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float acc = 0.f;
      for (int64_t x = 0; x < X; ++x) acc += a[r * lda + x] * float(q[c * X + x]);
      out[r * C + c] = acc;
    }
}

#ifdef MOE_HAVE_AVX512_ROWS
// AVX-512 tile: R rows x C channels of 16-lane partial sums, reduced at the end. The full steps
// and the masked tail are separate loops written out in place (no helper taking acc by reference,
// no mask inside the main loop): that way GCC keeps the R*C accumulators in registers instead of
// storing them to the stack at every step (4x slower).
template <int R, int C>
MOE_AVX512 void tile_avx512(const void* a_rows, int64_t lda, const int8_t* q, int64_t X, uintptr_t ahead,
                            float* out) {
  const float* a = static_cast<const float*>(a_rows);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t x = 0;
  for (; x + 16 <= X; x += 16) {
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + kTileY * x), 0, 2);  // 64 of the next tiles' bytes per 64 read here
    __m512 w[C];
    for (int c = 0; c < C; ++c)
      w[c] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * X + x))));
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_loadu_ps(a + r * lda + x);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(av, w[c], acc[r][c]);
    }
  }
  if (x < X) {
    const __mmask16 m = vec::tail_mask(X - x);
    __m512 w[C];
    for (int c = 0; c < C; ++c)
      w[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + c * X + x)));
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_maskz_loadu_ps(m, a + r * lda + x);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(av, w[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * C + c] = _mm512_reduce_add_ps(acc[r][c]);
}

#define MOE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// 16 int8 -> 16 float32 (exact).
MOE_AVX512 inline __m512 widen16(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }

// 32 float32 holding int8 values (lo: elements 0-15, hi: 16-31) -> 32 bfloat16 in that order. The
// values are exact in bfloat16, so each one is its float32's upper half: one word permute, the
// same result as vcvtne2ps2bf16 and about 15% faster per weight on Zen 4 (the conversion, not the
// multiply-adds, bounds this loop at a few rows).
MOE_AVX512_BF16 inline __m512bh to_bf16(__m512 lo, __m512 hi) {
  const __m512i upper = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                         31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return (__m512bh)_mm512_permutex2var_epi16(_mm512_castps_si512(lo), upper, _mm512_castps_si512(hi));
}

bool has_bf16_dot() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return vec::avx512_rows() && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
}

// bfloat16 rows on CPUs with AVX512_BF16: the int8 weights become bfloat16 exactly (|q| <= 127
// fits bf16's 8-bit significand) and vdpbf16ps adds the exact products of 32 x-elements into 16
// float32 lanes (pairs x = 2i, 2i+1 into lane i, each addition rounded, denormals flushed, as the
// instruction defines): half the instructions per multiply-add of the float32 path, the rows
// read as they are (no float32 copy). Same structure as tile_avx512.
template <int R, int C>
MOE_AVX512_BF16 void tile_bf16dot(const void* a_rows, int64_t lda, const int8_t* q, int64_t X,
                                  uintptr_t ahead, float* out) {
  const uint16_t* a = static_cast<const uint16_t*>(a_rows);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t x = 0;
  for (; x + 32 <= X; x += 32) {
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + kTileY * x), 0, 2);  // 128 of the next tiles' bytes per 128 read here
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + kTileY * x + 64), 0, 2);
    __m512bh w[C];
    for (int c = 0; c < C; ++c)
      w[c] = to_bf16(widen16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * X + x))),
                     widen16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c * X + x + 16))));
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a + r * lda + x);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, w[c]);
    }
  }
  if (x < X) {
    const __mmask32 m = __mmask32((uint64_t{1} << (X - x)) - 1);
    __m512bh w[C];
    for (int c = 0; c < C; ++c)
      w[c] = to_bf16(widen16(_mm_maskz_loadu_epi8(__mmask16(m), q + c * X + x)),
                     widen16(_mm_maskz_loadu_epi8(__mmask16(m >> 16), q + c * X + x + 16)));
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, a + r * lda + x);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, w[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * C + c] = _mm512_reduce_add_ps(acc[r][c]);
}
#else
bool has_bf16_dot() { return false; }
#endif

// Which loop runs: float32 rows on the scalar or AVX-512 loop, or bfloat16 rows on vdpbf16ps.
enum class Path { kScalar, kAvx512, kBf16Dot };

// (a rows, lda, q channels, X, ahead, out): `ahead` is the address where the lines to fetch into L2
// start, the channels kAhead tiles on (kTileY * X contiguous bytes per tile; an address, not a
// pointer: past the last expert it points nowhere, and a prefetch there does nothing).
using TileFn = void (*)(const void*, int64_t, const int8_t*, int64_t, uintptr_t, float*);

template <int C>
TileFn pick_tile(int rows, Path path) {
  static const TileFn scalar[kTileN] = {tile_scalar<1, C>, tile_scalar<2, C>, tile_scalar<3, C>,
                                        tile_scalar<4, C>, tile_scalar<5, C>, tile_scalar<6, C>};
#ifdef MOE_HAVE_AVX512_ROWS
  static const TileFn vector[kTileN] = {tile_avx512<1, C>, tile_avx512<2, C>, tile_avx512<3, C>,
                                        tile_avx512<4, C>, tile_avx512<5, C>, tile_avx512<6, C>};
  static const TileFn bf16dot[kTileN] = {tile_bf16dot<1, C>, tile_bf16dot<2, C>, tile_bf16dot<3, C>,
                                         tile_bf16dot<4, C>, tile_bf16dot<5, C>, tile_bf16dot<6, C>};
  if (path == Path::kAvx512) return vector[rows - 1];
  if (path == Path::kBf16Dot) return bf16dot[rows - 1];
#endif
  return scalar[rows - 1];
}

struct Task {
  int64_t expert, y0, y1;
};

// a: the rows (float32, or bfloat16 for Path::kBf16Dot), `a_bytes` bytes per element. a32: for
// Path::kBf16Dot, the same rows in float32 where a tile of one row occurs (else null): one row
// runs on the float32 loop, whose conversion per weight is cheaper than packing bfloat16 pairs
// for vdpbf16ps (about 1.4x the weights per second on Zen 4, L2-resident); vdpbf16ps pays from two
// rows on.
template <typename T>
void run_w8(Path path, const void* a, int64_t a_bytes, const float* a32, int64_t X, const int8_t* q,
            const float* scale, int64_t Y, const std::vector<int64_t>& starts,
            const std::vector<Task>& tasks, T* c) {
  // Tasks are handed out from a shared counter, so a thread the OS deschedules (a loaded machine)
  // leaves its share to the others instead of holding up the region's end.
  const int64_t count = int64_t(tasks.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1, [&](int64_t, int64_t) {
    float tile[kTileN * kTileY];
    for (int64_t t = next.fetch_add(1); t < count; t = next.fetch_add(1)) {
      const Task& task = tasks[t];
      const int64_t e = task.expert, r_begin = starts[e], r_end = starts[e + 1];
      for (int64_t y = task.y0; y < task.y1; y += kTileY) {
        const int C = int(std::min<int64_t>(kTileY, task.y1 - y));
        const int8_t* qy = q + (e * Y + y) * X;
        const float* sy = scale + e * Y + y;
        for (int64_t r = r_begin; r < r_end; r += kTileN) {
          const int R = int(std::min<int64_t>(kTileN, r_end - r));
          const bool f32 = R == 1 && a32 != nullptr;
          const Path p = f32 ? Path::kAvx512 : path;
          const TileFn fn = C == kTileY ? pick_tile<kTileY>(R, p) : pick_tile<1>(R, p);
          const void* rows = f32 ? static_cast<const void*>(a32 + r * X)
                                 : static_cast<const char*>(a) + r * X * a_bytes;
          for (int c0 = 0; c0 < C; c0 += (C == kTileY ? kTileY : 1)) {
            const int cw = C == kTileY ? kTileY : 1;
            fn(rows, X, qy + c0 * X, X,
               reinterpret_cast<uintptr_t>(qy + c0 * X) + kAhead * kTileY * X, tile);
            for (int i = 0; i < R; ++i)
              for (int j = 0; j < cw; ++j) c[(r + i) * Y + y + c0 + j] = T(tile[i * cw + j] * sy[c0 + j]);
          }
        }
      }
    }
  });
}

std::vector<int64_t> read_starts(const at::Tensor& offs_E, int64_t rows) {
  const auto offs = offs_E.contiguous();
  const int32_t* p = offs.const_data_ptr<int32_t>();
  std::vector<int64_t> starts(offs.size(0) + 1, 0);
  for (int64_t e = 0; e < offs.size(0); ++e) {
    TORCH_CHECK(p[e] >= starts[e], "moe.grouped_mm_w8: offs_E must be non-decreasing, but offs_E[",
                e, "] = ", p[e], " < ", starts[e]);
    starts[e + 1] = p[e];
  }
  TORCH_CHECK(starts.back() <= rows, "moe.grouped_mm_w8: offs_E[-1] = ", starts.back(),
              " exceeds the ", rows, " rows of a_NX");
  return starts;
}

}  // namespace

at::Tensor grouped_mm_w8_cpu(const at::Tensor& a_NX, const at::Tensor& q_EYX,
                             const at::Tensor& scale_EY, const at::Tensor& offs_E) {
  check_grouped_mm_w8_args(a_NX, q_EYX, scale_EY, offs_E);
  const int64_t N = a_NX.size(0), X = a_NX.size(1), E = q_EYX.size(0), Y = q_EYX.size(1);
  const auto starts = read_starts(offs_E, N);
  const int64_t used = starts.back();
  auto c = at::empty({N, Y}, a_NX.options());
  if (used < N) c.narrow(0, used, N - used).zero_();
  if (used == 0 || Y == 0) return c;
  // bfloat16 rows as they are where the CPU has AVX512_BF16, else float32 rows (bf16/fp16 -> fp32
  // is exact); the int8 weights and scales are read in place.
  const Path path = !vec::avx512_rows() ? Path::kScalar
                    : a_NX.scalar_type() == at::kBFloat16 && has_bf16_dot() ? Path::kBf16Dot
                                                                           : Path::kAvx512;
  const auto a = path == Path::kBf16Dot ? a_NX.narrow(0, 0, used).contiguous()
                                        : a_NX.narrow(0, 0, used).to(at::kFloat).contiguous();
  bool single = false;  // a tile of one row: an expert with 1, 7, 13, ... rows
  for (int64_t e = 0; e < E; ++e) single |= (starts[e + 1] - starts[e]) % kTileN == 1;
  const auto a32 = path == Path::kBf16Dot && single ? a.to(at::kFloat) : at::Tensor();
  const auto q = q_EYX.contiguous();
  const auto s = scale_EY.contiguous();
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e)
    if (starts[e + 1] > starts[e])
      for (int64_t y = 0; y < Y; y += kBlockY) tasks.push_back({e, y, std::min(Y, y + kBlockY)});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a_NX.scalar_type(), "grouped_mm_w8", [&] {
    run_w8<scalar_t>(path, a.const_data_ptr(), a.element_size(),
                     a32.defined() ? a32.const_data_ptr<float>() : nullptr, X, q.const_data_ptr<int8_t>(),
                     s.const_data_ptr<float>(), Y, starts, tasks, c.mutable_data_ptr<scalar_t>());
  });
  return c;
}

}  // namespace moe
