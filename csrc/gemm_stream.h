// The streamed path of the AVX-512 GEMM (gemm_avx512.cpp, its only includer, after gemm_pack.h):
// few rows (decode: an expert with a handful of routed rows) read B's rows in place, each word of
// B once from memory, instead of packing B panels that would be used once or twice. Included on
// x86-64 only, after MOE_TARGET is defined. Shapes as in gemm_avx512.h: C (M x Y) = A (M x X) @ B
// (X x Y), words along X as in gemm_pack.h.
//
// The depth is walked in blocks of kStreamWords words (the kStreamWords * P rows of B across all
// its columns: one stretch of memory), each block strip by strip of kYR columns; a strip's partial
// sums wait in a float32 scratch between blocks, and the caller fetches the next block's lines into
// L2 while this one runs. The sums are the packed microkernel's (gemm_avx512.cpp micro): the same
// products in the same order, blocked the same way, so the results are equal bit for bit.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <immintrin.h>

namespace moe {
namespace {

// Depth words per block of the streamed path (divides kXB). One thread, Qwen3 decode layer (ms,
// T = 64 / 8, three runs each): 8 words 69-73 / 22-24, 16: 63-73 / 21-24, 32: 59-62 / 20-23,
// 64: 63-72 / 24-26 (before the next block's lines were fetched from inside the loop, 8 was best).
constexpr int64_t kStreamWords = 32;
// Depth words per block where the strips are packed (BlockB, more than kStreamRows rows): fewer
// round trips of the partial sums through the scratch planes. Two threads, bf16, the up / down
// projections of 3 Mixtral experts at 43 rows (ms): 32 words 122 / 71, 64: 111 / 55, 128: 109 /
// 54, 256: 122 / 56; DeepSeek-V3's up projection (4 experts, X 7168) at 192 rows: 64 words 139,
// 128: 123.
constexpr int64_t kBlockWords = 128;

// Rows of B read in place (B(x, y) = B[x * bx + y], a strip of up to kYR columns): the streamed
// path, where each word of B is read from memory once and nothing is written. float32: 16 columns
// of row x per vector, the last one masked. bfloat16 (YV even): rows 2xw and 2xw+1, 32 columns
// each, interleaved by vpunpck{l,h}wd into the (x, x+1) words vdpbf16ps takes; within each 128-bit
// lane the low half's columns go to b[2j] and the high half's to b[2j+1], which order() undoes. An
// odd X reads a zero row for the missing x.
template <typename T>
struct RowsB {
  static constexpr int kVecs = kYR * int(sizeof(T)) / 64;  // 64-byte loads per row of a strip
  const T* B;
  int64_t bx, X;
  int cols;
  __mmask64 mask[kVecs];  // of each load: the columns < cols (in elements)

  MOE_TARGET RowsB(const T* B_, int64_t bx_, int64_t X_, int cols_) : B(B_), bx(bx_), X(X_), cols(cols_) {
    constexpr int per = 64 / int(sizeof(T));
    for (int j = 0; j < kVecs; ++j) {
      const int left = std::clamp(cols - per * j, 0, per);
      mask[j] = (__mmask64(1) << left) - 1;  // left <= 32
    }
  }
  template <int YV>
  MOE_TARGET void load(int64_t xw, __m512i* b) const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      static_assert(YV % 2 == 0, "bfloat16 rows are read 32 columns at a time");
      alignas(64) static const T zeros[kYR] = {};
      const T* lo = B + 2 * xw * bx;
      const T* hi = 2 * xw + 1 < X ? lo + bx : zeros;  // an odd X's last word: x + 1 reads zero
      for (int j = 0; j < YV / 2; ++j) {
        const __m512i l = _mm512_maskz_loadu_epi16(__mmask32(mask[j]), lo + 32 * j);
        const __m512i h = _mm512_maskz_loadu_epi16(__mmask32(mask[j]), hi + 32 * j);
        b[2 * j] = _mm512_unpacklo_epi16(l, h);
        b[2 * j + 1] = _mm512_unpackhi_epi16(l, h);
      }
    } else {
      const T* r = B + xw * bx;
      for (int v = 0; v < YV; ++v) b[v] = _mm512_maskz_loadu_epi32(__mmask16(mask[v]), r + 16 * v);
    }
  }
  template <int YV>
  MOE_TARGET void order(__m512* t) const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // Column c of a 32-column group: lane 8L + i (i < 4) is word 4L + i of b[2j], lane 8L + 4 + i
      // word 4L + i of b[2j + 1] (index 16 + ...) in _mm512_permutex2var_ps.
      const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
      const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
      for (int j = 0; j < YV / 2; ++j) {
        const __m512 a = t[2 * j], b = t[2 * j + 1];
        t[2 * j] = _mm512_permutex2var_ps(a, first, b);
        t[2 * j + 1] = _mm512_permutex2var_ps(a, second, b);
      }
    }
  }
};

// A strip's depth block packed once (pack_b: words [xw - x0][kYR], column order, zero past cols)
// and read by every row tile of the block: with more than kStreamRows bfloat16 rows the strip's
// words are formed once, not once per tile of kMR rows (RowsB<bfloat16> interleaves its two rows
// at every load; up to kStreamRows rows that costs less than packing: 13-24 rows ran 10-50%
// slower packed).
struct BlockB {
  const uint32_t* p;
  int64_t x0;
  int cols;
  template <int YV>
  MOE_TARGET void load(int64_t xw, __m512i* b) const {
    for (int v = 0; v < YV; ++v)
      b[v] = _mm512_loadu_si512(reinterpret_cast<const void*>(p + (xw - x0) * kYR + 16 * v));
  }
  template <int YV>
  void order(__m512*) const {}
};

// The streamed path's microkernel: depth words [x0, x1) of micro's sums (the same operations in
// the same order: the same bits as the packed path), the partial sums kept between calls in three
// float32 planes, `plane` floats apart (row stride lds): the running acc, and micro's two levels
// mid and total (bfloat16 results keep only acc). [x0, x1) lies inside one of micro's blocks. The
// call that reaches x1 == Xw stores C.
template <typename T, int MR, int YV, typename TC, typename Src>
MOE_TARGET void micro_block(const u32* const* arow, int64_t ax, const Src& src, int64_t x0,
                            int64_t x1, int64_t Xw, float* st, int64_t plane, int64_t lds, TC* C, int64_t ldc,
                            LineCursor* pf) {
  const u32* ap[MR];
  for (int r = 0; r < MR; ++r) ap[r] = arow[r];
  const int64_t block = std::is_same_v<TC, c10::BFloat16> ? Xw : kXB;
  float *s_acc = st, *s_mid = st + plane, *s_total = st + 2 * plane;
  __m512 acc[MR][YV];
  const bool fresh = x0 % block == 0;
  // (Every loop over r and v is unrolled: an accumulator array indexed by a loop variable after the
  // main loop would be kept in memory and stored at every step.)
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < YV; ++v)
      acc[r][v] = fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(s_acc + r * lds + 16 * v);
  }
  for (int64_t xw = x0; xw < x1; ++xw) {
    if (pf->left > 0) pf->step();
    __m512i b[YV];
    src.template load<YV>(xw, b);
    const int64_t xa = xw * ax;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512i ar = _mm512_set1_epi32(int(ap[r][xa]));
#pragma GCC unroll 16
      for (int v = 0; v < YV; ++v) {
        if constexpr (std::is_same_v<T, c10::BFloat16>)
          acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)ar, (__m512bh)b[v]);
        else
          acc[r][v] = _mm512_fmadd_ps(_mm512_castsi512_ps(ar), _mm512_castsi512_ps(b[v]), acc[r][v]);
      }
    }
  }
  if (x1 < Xw && x1 % block != 0) {  // inside one of micro's blocks: keep acc
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
      for (int v = 0; v < YV; ++v) _mm512_storeu_ps(s_acc + r * lds + 16 * v, acc[r][v]);
    }
    return;
  }
  // The end of a block: micro's two levels, kXB blocks into mid, every kXB of those into total.
  __m512 total[MR][YV];  // (not acc: order() takes its address, which would keep it in memory)
  const int64_t b0 = x0 / block * block;
  const bool first = b0 % (block * kXB) == 0, last = x1 == Xw || (x1 / block) % kXB == 0;
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < YV; ++v) {
      const int64_t o = r * lds + 16 * v;
      const __m512 mid = first ? acc[r][v] : _mm512_add_ps(_mm512_loadu_ps(s_mid + o), acc[r][v]);
      if (!last) {
        _mm512_storeu_ps(s_mid + o, mid);
        continue;
      }
      total[r][v] = b0 < block * kXB ? mid : _mm512_add_ps(_mm512_loadu_ps(s_total + o), mid);
      if (x1 < Xw) _mm512_storeu_ps(s_total + o, total[r][v]);
    }
  }
  if (x1 < Xw) return;
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    src.template order<YV>(total[r]);
    store_row<YV>(C + r * ldc, total[r], src.cols);
  }
}

}  // namespace
}  // namespace moe
