// Operand packing for the AVX-512 GEMM (gemm_avx512.cpp, its only includer): A and B as 32-bit
// words along X, the GEMM depth (a bfloat16 word holds the pair x, x+1), B in panels of kYR of
// its Y columns, and the memory lines of B's next chunk for a software prefetch. Included by
// gemm_avx512.cpp on x86-64 only, after it defines MOE_TARGET. Shapes as in gemm_avx512.h:
// C (M x Y) = A (M x X) @ B (X x Y).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <immintrin.h>

namespace moe {
namespace {

constexpr int kYR = 64;      // columns per B panel (4 zmm of 16 fp32 lanes)
constexpr int64_t kXB = 64;  // X words per block of float32 partial sums in the microkernels

// Elements read as 32-bit words: may_alias keeps those reads of bf16/float memory well defined.
typedef uint32_t __attribute__((may_alias)) u32;

template <typename T>
constexpr int64_t kPer = std::is_same_v<T, c10::BFloat16> ? 2 : 1;  // elements per word

inline uint32_t bits(c10::BFloat16 v) { return v.x; }
inline uint32_t bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

// Word j < w (w <= 16) from row `lo` (and `hi`, the next x, for bf16; nullptr: zero) at 16
// consecutive columns. Writes all 16 words (zero past w) when `all`, else only the first w.
template <typename T>
MOE_TARGET inline void words16(const T* lo, const T* hi, int64_t w, uint32_t* out, bool all) {
  const __mmask16 m = w >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << w) - 1);
  __m512i v;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo));
    const __m512i h = hi == nullptr ? _mm512_setzero_si512()
                                    : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi));
    v = _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
  } else {
    v = _mm512_maskz_loadu_epi32(m, lo);
  }
  _mm512_mask_storeu_epi32(out, all ? __mmask16(0xFFFF) : m, v);
}

// Word (x = P*xw ..) of a strided column: element at p, the next x at p + step (if it exists).
template <typename T>
inline uint32_t word(const T* p, int64_t step, bool has_next) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return bits(p[0]) | (has_next ? bits(p[step]) << 16 : 0u);
  return bits(p[0]);
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for a 16 x 16 block of 32-bit words.
MOE_TARGET inline void transpose16(const u32* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst) {
  __m512i r[16], a[16], b[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(reinterpret_cast<const void*>(src + i * ld_src));
  for (int i = 0; i < 16; i += 2) {  // within 128-bit lanes: pairs of rows
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // quads of rows: b[i + q] holds column 4L + q of rows i..i+3
    b[i + 0] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {  // gather lane L of the four quads: column 4L + q
    const __m512i e0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x88);
    const __m512i e1 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x88);
    const __m512i o0 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xDD);
    const __m512i o1 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xDD);
    _mm512_storeu_si512(dst + (0 + q) * ld_dst, _mm512_shuffle_i32x4(e0, e1, 0x88));
    _mm512_storeu_si512(dst + (8 + q) * ld_dst, _mm512_shuffle_i32x4(e0, e1, 0xDD));
    _mm512_storeu_si512(dst + (4 + q) * ld_dst, _mm512_shuffle_i32x4(o0, o1, 0x88));
    _mm512_storeu_si512(dst + (12 + q) * ld_dst, _mm512_shuffle_i32x4(o0, o1, 0xDD));
  }
}

// Packs B (X x cols, strides bx, by in elements) into panels of kYR columns: panel p holds Xw
// rows of kYR words, zero-padded past cols and past X. With `rows` (a gathered B), row x of B
// starts at B + rows[x] instead of B + x * bx. B is read in its memory order, so that the
// hardware prefetchers stream it: a transposed W a panel (kYR rows of W) at a time, and rows of
// B a word row (x, x+1) at a time across every panel (reading one panel's columns of all X rows
// instead touches each line of B in a separate pass and stalls on every load).
template <typename T>
MOE_TARGET void pack_b(const T* B, int64_t bx, int64_t by, const int64_t* rows, int64_t X, int64_t cols,
                       uint32_t* out) {
  constexpr int64_t P = kPer<T>;
  const int64_t Xw = (X + P - 1) / P;
  const int64_t panels = (cols + kYR - 1) / kYR;
  auto row = [&](int64_t x) { return rows ? rows[x] : x * bx; };
  // B = W^T with W row-major (the data gradient's transposed weights): each word is an aligned
  // word of a row of W, so a panel is a transpose of 32-bit words, read row by row.
  const bool rows_of_words = rows == nullptr && bx == 1 && X % P == 0 && by % P == 0 &&
                             reinterpret_cast<uintptr_t>(B) % alignof(uint32_t) == 0;
  if (rows_of_words) {
    for (int64_t p = 0; p < panels; ++p) {
      uint32_t* dst = out + p * Xw * kYR;
      const int64_t c0 = p * kYR, w = std::min<int64_t>(kYR, cols - c0);
      const int64_t j16 = w / 16 * 16, x16 = Xw / 16 * 16;
      for (int64_t j = 0; j < j16; j += 16)  // 16 x 16 blocks in registers
        for (int64_t xw = 0; xw < x16; xw += 16)
          transpose16(reinterpret_cast<const u32*>(B + (c0 + j) * by) + xw, by / P,
                      dst + xw * kYR + j, kYR);
      for (int64_t j = 0; j < w; ++j) {  // the rest one word at a time
        const u32* row = reinterpret_cast<const u32*>(B + (c0 + j) * by);
        for (int64_t xw = j < j16 ? x16 : 0; xw < Xw; ++xw) dst[xw * kYR + j] = row[xw];
      }
      for (int64_t j = w; j < kYR; ++j)
        for (int64_t xw = 0; xw < Xw; ++xw) dst[xw * kYR + j] = 0;
    }
    return;
  }
  for (int64_t xw = 0; xw < Xw; ++xw) {
    const bool has1 = P * xw + 1 < X;
    const int64_t o0 = row(P * xw), step = has1 ? row(P * xw + 1) - o0 : 0;
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t c0 = p * kYR, w = std::min<int64_t>(kYR, cols - c0);
      const T* r0 = B + o0 + c0 * by;
      uint32_t* d = out + p * Xw * kYR + xw * kYR;
      if (by == 1) {  // rows of B contiguous: 16 words per step
        int64_t j = 0;
        for (; j < w; j += 16)
          words16(r0 + j, has1 ? r0 + step + j : nullptr, std::min<int64_t>(16, w - j), d + j, /*all=*/true);
        for (; j < kYR; ++j) d[j] = 0;
        continue;
      }
      for (int64_t j = 0; j < w; ++j) d[j] = word(r0 + j * by, step, has1);
      for (int64_t j = w; j < kYR; ++j) d[j] = 0;
    }
  }
}

// Packs A (M x X) to words laid out [xw][m], zero-padded past X. A(m, x) = A[mo(m) + xo(x)] with
// mo(m) = m_off ? m_off[m] : m * am and xo(x) = x_off ? x_off[x] : x * ax (element offsets: the
// offset tables are the rows of a gathered operand).
template <typename T>
MOE_TARGET void pack_a(const T* A, int64_t am, int64_t ax, const int64_t* m_off, const int64_t* x_off,
                       int64_t M, int64_t X, uint32_t* out) {
  constexpr int64_t P = kPer<T>;
  const int64_t Xw = (X + P - 1) / P;
  for (int64_t xw = 0; xw < Xw; ++xw) {
    const int64_t x = P * xw;
    const bool has1 = x + 1 < X;
    const int64_t o0 = x_off ? x_off[x] : x * ax;
    const int64_t o1 = !has1 ? 0 : x_off ? x_off[x + 1] : (x + 1) * ax;
    uint32_t* d = out + xw * M;
    if (am == 1 && m_off == nullptr) {  // the weight gradient's a^T: rows of a, contiguous along m
      for (int64_t m = 0; m < M; m += 16)
        words16(A + o0 + m, has1 ? A + o1 + m : nullptr, std::min<int64_t>(16, M - m), d + m,
                /*all=*/false);
      continue;
    }
    for (int64_t m = 0; m < M; ++m) {
      const T* row = A + (m_off ? m_off[m] : m * am);
      d[m] = word(row + o0, o1 - o0, has1);
    }
  }
}

// The memory lines of B's columns [c0, c0 + w), X rows, for a software prefetch (LineCursor)
// spread over the last microkernel calls of the chunk before them. An expert's weight is read from memory once
// per GEMM (E x D x F bytes in all, 16x a dense layer's at E=128, K=8); packing it when the chunk
// is reached would stall on those reads, so they are started a chunk ahead. Rows of B
// along y (by == 1, gathered or not) or along x (bx == 1) only; other layouts are not prefetched.
template <typename T>
struct PanelLines {
  const char* base = nullptr;
  const int64_t* rows = nullptr;  // gathered rows: segment s starts at base + rows[s] elements
  int64_t seg_stride = 0, seg_lines = 0, segs = 0;  // segs runs of seg_lines lines, seg_stride bytes apart

  PanelLines() = default;
  PanelLines(const T* B, int64_t bx, int64_t by, const int64_t* b_rows, int64_t X, int64_t c0, int64_t w) {
    constexpr int64_t sz = sizeof(T);
    if (by == 1 && b_rows != nullptr) {  // rows anywhere: one line more covers any alignment
      base = reinterpret_cast<const char*>(B + c0);
      rows = b_rows;
      seg_lines = (w * sz + 63) / 64 + 1;
      segs = X;
    } else if (by == 1) {
      set(B + c0, bx * sz, w * sz, X);
    } else if (bx == 1 && b_rows == nullptr) {
      set(B + c0 * by, by * sz, X * sz, w);
    }
  }
  void set(const T* p, int64_t stride, int64_t bytes, int64_t count) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    base = reinterpret_cast<const char*>(a & ~uintptr_t(63));
    seg_stride = stride;
    seg_lines = (int64_t(a & 63) + bytes + 63) / 64;
    segs = count;
  }
  int64_t lines() const { return seg_lines * segs; }
};

// The start of p's 64-byte line.
inline const char* line_of(const char* p) {
  return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63));
}

// Lines [from, to) of a PanelLines fetched from inside a microkernel's depth loop, `per` lines per
// step, so that the fetches of one call are spread over its whole run rather than issued in one
// burst before it (a burst of hundreds fills the core's miss queues: most of those lines were
// still being read from memory when pack_b reached them). Whatever is left after the loop is
// fetched by finish().
struct LineCursor {
  const char* base = nullptr;
  const int64_t* rows = nullptr;
  int64_t esize = 0, seg_stride = 0, seg_lines = 0;
  int64_t seg = 0, line = 0, left = 0, per = 1;

  LineCursor() = default;
  template <typename T>
  LineCursor(const PanelLines<T>& p, int64_t from, int64_t to, int64_t steps)
      : base(p.base), rows(p.rows), esize(int64_t(sizeof(T))), seg_stride(p.seg_stride), seg_lines(p.seg_lines),
        seg(from / p.seg_lines), line(from - seg * p.seg_lines), left(to - from),
        per(steps > 0 ? std::max<int64_t>(1, (to - from + steps - 1) / steps) : 1) {}
  inline void step() {
    for (int64_t j = 0; j < per && left > 0; ++j, --left) {
      const char* start = rows ? line_of(base + rows[seg] * esize) : base + seg * seg_stride;
      __builtin_prefetch(start + line * 64, 0, 2);  // into L2 (the hint T1)
      if (++line == seg_lines) line = 0, ++seg;
    }
  }
  inline void finish() {
    per = left;
    step();
  }
};

// Stores one row of a microkernel's float32 sums (YV vectors of 16 columns) into c, float32 or
// bfloat16 (rounded to nearest even), masked to its first `cols` columns. With NT the full vectors
// at aligned addresses are written with non-temporal stores (kNtStoreBytes), the rest as without.
template <int YV, typename TC, bool NT = false>
MOE_TARGET inline void store_row(TC* c, const __m512* row, int cols) {
#pragma GCC unroll 16
  for (int v = 0; v < YV; ++v) {
    const int left = cols - 16 * v;
    if (left <= 0) break;
    TC* p = c + 16 * v;
    if constexpr (NT) {
      if (left >= 16 && reinterpret_cast<uintptr_t>(p) % (16 * sizeof(TC)) == 0) {
        if constexpr (std::is_same_v<TC, c10::BFloat16>)
          _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(row[v]));
        else
          _mm512_stream_ps(reinterpret_cast<float*>(p), row[v]);
        continue;
      }
    }
    const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    if constexpr (std::is_same_v<TC, c10::BFloat16>)
      _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(row[v]));
    else
      _mm512_mask_storeu_ps(p, mask, row[v]);
  }
}

}  // namespace

}  // namespace moe
