// The streamed path of the AVX-512 GEMM for B stored (Y x X) (gemm_avx512.cpp, its only includer,
// after gemm_pack.h): B(x, y) = B[x + y * by], each of B's rows one output column y, contiguous
// along X. That is an nn.Linear-style (E, Y, X) weight read as the transposed view b_EXY
// (transformers' experts hold gate_up_proj (E, 2F, D) and down_proj (E, D, F) so) and the data
// gradient's b^T of moekit's own (E, X, Y) weights. Few rows (decode: a tile of at most
// kStreamRowsYX) would pack B panels by transposing 32-bit words, then use each once or twice;
// here each row of B is read once from memory, in place, and dotted with the tile's rows of A.
// Included on x86-64 only, after MOE_TARGET is defined. Shapes as in gemm_avx512.h: C (M x Y) =
// A (M x X) @ B (X x Y), M <= kStreamRowsYX.
//
// Vectors run along X: a step is 64 bytes of a row of A and of a row of B (32 bfloat16, taken by
// vdpbf16ps as 16 pairs, or 16 float32 for vfmadd), the last step masked (an odd X included), so
// each accumulator holds 16 lanes of partial sums of one output. The outputs are cut in groups of
// kYG columns; a group's depth in blocks of kDotSteps steps (a block of the tile's rows of A stays
// in L1 while the group's rows of B pass: each B word is read once); each block's sums are added
// to a float32 scratch of 16 lanes per output, and the group's 16-lane sums are reduced
// horizontally, kYG outputs at once, into one vector per row of C (store_row). While a group runs,
// each step fetches into L2 the same x of the rows kYG further on (at the last group: the first
// rows of the next call's B). The sums run in another order than the packed path's (lanes, then a
// tree), so the results are not its bits; the error stays within the project's GEMM rule.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <immintrin.h>

namespace moe {
namespace {

constexpr int kYG = 16;             // output columns per group (one vector of results per row)
constexpr int64_t kDotSteps = 16;   // steps per depth block (1 KiB of each row: A's block in L1)

// 64 bytes of a row along X, the elements past `mask` (one bit per element) read as zero.
template <typename T>
MOE_TARGET inline __m512i load_x(const T* p, uint32_t mask) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return _mm512_maskz_loadu_epi16(__mmask32(mask), p);
  else
    return _mm512_maskz_loadu_epi32(__mmask16(mask), p);
}

template <typename T>
MOE_TARGET inline __m512 madd(__m512 acc, __m512i a, __m512i b) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  else
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
}

// Steps [s0, s1) of `steps` of MR rows of A (arow) dotted with YB rows of B (brow): adds each
// accumulator's 16 lanes to sums[(r * kYG + j) * 16] (sets them at s0 == 0). fetch[j]: the row
// whose x is fetched into L2 while row j's is read.
template <typename T, int MR, int YB>
MOE_TARGET void dot_block(const T* const* arow, const T* const* brow, const T* const* fetch, int64_t X,
                          int64_t s0, int64_t s1, int64_t steps, float* sums) {
  constexpr int64_t S = 64 / int64_t(sizeof(T));  // elements per step
  const uint32_t tail = X % S == 0 ? ~0u : (1u << (X % S)) - 1;
  __m512 acc[MR][YB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < YB; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t x = s * S;
    const uint32_t mask = s + 1 < steps ? ~0u : tail;
#pragma GCC unroll 16
    for (int j = 0; j < YB; ++j) __builtin_prefetch(fetch[j] + x, 0, 2);
    // Hold the fewer of the two operands' vectors: the accumulators, those and one more fit the
    // 32 zmm registers (MR * YB <= 24).
    if constexpr (MR <= YB) {
      __m512i a[MR];
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) a[r] = load_x(arow[r] + x, mask);
#pragma GCC unroll 16
      for (int j = 0; j < YB; ++j) {
        const __m512i b = load_x(brow[j] + x, mask);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) acc[r][j] = madd<T>(acc[r][j], a[r], b);
      }
    } else {
      __m512i b[YB];
#pragma GCC unroll 16
      for (int j = 0; j < YB; ++j) b[j] = load_x(brow[j] + x, mask);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512i a = load_x(arow[r] + x, mask);
#pragma GCC unroll 16
        for (int j = 0; j < YB; ++j) acc[r][j] = madd<T>(acc[r][j], a, b[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < YB; ++j) {
      float* o = sums + (r * kYG + j) * 16;
      _mm512_storeu_ps(o, s0 == 0 ? acc[r][j] : _mm512_add_ps(_mm512_loadu_ps(o), acc[r][j]));
    }
  }
}

// Lane j of the result: the sum of the 16 floats at rows + 16 j (j < 16), by a tree of adds.
MOE_TARGET inline __m512 reduce16(const float* rows) {
  // The tree leaves slot s's sum in lane 4 (s % 4) + s / 4: slot s takes row 4 (s % 4) + s / 4
  // (the same map), so lane j holds row j's.
  __m512 v[16];
  for (int s = 0; s < 16; ++s) v[s] = _mm512_loadu_ps(rows + 16 * (4 * (s % 4) + s / 4));
  for (int i = 0; i < 8; ++i)  // lanes 0-7 of 2i's halves added, 8-15 of 2i+1's
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane L: slot 4i + L's four partial sums
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane L: two partial sums of slot 8i + L, then two of 8i + 4 + L
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
}

// C (MR x Y) = A @ B with B (Y x X) rows at B + y * by, A's rows at arow[r] (contiguous along X).
// `next`: the B of the call likely to run next on this thread (its rows' stride by as well).
template <typename T, typename TC, int MR, int YB>
MOE_TARGET void stream_yx_rows(const T* const* arow, const T* B, int64_t by, int64_t X, int64_t Y,
                               const NextB<T>& next, TC* C, int64_t ldc) {
  static_assert(kYG % YB == 0 && MR * YB <= 24, "the accumulators and operands fit 32 zmm");
  constexpr int64_t S = 64 / int64_t(sizeof(T));
  const int64_t steps = (X + S - 1) / S;
  alignas(64) float sums[MR * kYG * 16];
  // Row y of this B (clamped: past Y the last row's sums are computed and not stored), and the
  // row fetched while it is read: y + kYG here, or of the next B (the same X), or itself.
  auto row = [&](int64_t y) { return B + std::min(y, Y - 1) * by; };
  auto ahead = [&](int64_t y) {
    const int64_t q = y + kYG - Y;
    if (q < 0) return B + (y + kYG) * by;
    return next.B != nullptr && next.rows == nullptr && next.X == X && q < next.Y ? next.B + q * by : row(y);
  };
  for (int64_t y0 = 0; y0 < Y; y0 += kYG) {
    const int cols = int(std::min<int64_t>(kYG, Y - y0));
    const int groups = (cols + YB - 1) / YB;  // groups of YB rows of B with a column < Y
    for (int64_t s0 = 0; s0 < steps; s0 += kDotSteps) {
      for (int g = 0; g < groups; ++g) {
        const T *brow[YB], *fetch[YB];
        for (int j = 0; j < YB; ++j) brow[j] = row(y0 + g * YB + j), fetch[j] = ahead(y0 + g * YB + j);
        dot_block<T, MR, YB>(arow, brow, fetch, X, s0, std::min(steps, s0 + kDotSteps), steps,
                             sums + g * YB * 16);
      }
    }
    for (int r = 0; r < MR; ++r) {
      float* rs = sums + r * kYG * 16;
      std::fill(rs + groups * YB * 16, rs + kYG * 16, 0.0f);  // columns past Y: not computed
      const __m512 c = reduce16(rs);
      store_row<1>(C + r * ldc + y0, &c, cols);
    }
  }
}

// stream_yx_rows for M = 1..kStreamRowsYX rows (the accumulators: YB = 8, 4 or 2 columns by M).
template <typename T, typename TC>
MOE_TARGET void stream_yx(int M, const T* const* arow, const T* B, int64_t by, int64_t X, int64_t Y,
                          const NextB<T>& next, TC* C, int64_t ldc) {
  switch (M) {
    case 1: return stream_yx_rows<T, TC, 1, 8>(arow, B, by, X, Y, next, C, ldc);
    case 2: return stream_yx_rows<T, TC, 2, 8>(arow, B, by, X, Y, next, C, ldc);
    case 3: return stream_yx_rows<T, TC, 3, 8>(arow, B, by, X, Y, next, C, ldc);
    case 4: return stream_yx_rows<T, TC, 4, 4>(arow, B, by, X, Y, next, C, ldc);
    case 5: return stream_yx_rows<T, TC, 5, 4>(arow, B, by, X, Y, next, C, ldc);
    case 6: return stream_yx_rows<T, TC, 6, 4>(arow, B, by, X, Y, next, C, ldc);
    case 7: return stream_yx_rows<T, TC, 7, 2>(arow, B, by, X, Y, next, C, ldc);
    case 8: return stream_yx_rows<T, TC, 8, 2>(arow, B, by, X, Y, next, C, ldc);
    case 9: return stream_yx_rows<T, TC, 9, 2>(arow, B, by, X, Y, next, C, ldc);
    case 10: return stream_yx_rows<T, TC, 10, 2>(arow, B, by, X, Y, next, C, ldc);
    case 11: return stream_yx_rows<T, TC, 11, 2>(arow, B, by, X, Y, next, C, ldc);
    case 12: return stream_yx_rows<T, TC, 12, 2>(arow, B, by, X, Y, next, C, ldc);
    default: TORCH_INTERNAL_ASSERT(false, "moekit: stream_yx takes 1 to 12 rows, not ", M);
  }
}

}  // namespace
}  // namespace moe
