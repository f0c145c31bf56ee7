// AVX-512 GEMM for the CPU grouped GEMM: bfloat16 (vdpbf16ps) and float32 (vfmadd), fp32 accumulation.
//
// Why not at::mm per expert: oneDNN/MKL re-pack B on every call and pay their per-call setup once
// per expert. With E=128 experts of 256 rows the per-expert calls reach 0.82-0.87 of one dense mm
// of the same FLOPs in bf16 (bench/ops.py), and the weight gradients (K = the expert's rows) lose
// more. Here B is packed once per tile, straight into the layout the microkernel streams from L2,
// and there is no per-call setup.
//
// Layout. Both operands are read as 32-bit words along K: a bf16 word holds the pair (k, k+1)
// (vdpbf16ps adds  a.lo * b.lo + a.hi * b.hi  to each fp32 lane), a float word one k.
// With P elements per word (2 or 1) and Kw = ceil(K / P) words:
//   A words  A32[m * am + kw * ak]                         (broadcast to all lanes)
//   B panel  Bp[kw][n] = B[P*kw .. P*kw+P-1][n]             64 columns wide, zero-padded past K, N
// A is read in place when it is K-contiguous (the forward and the data gradient); otherwise (the
// weight gradient, A = a^T) it is packed to [kw][m] words first. The microkernel keeps a 6 x 64
// fp32 tile in 24 zmm registers; bf16 results are rounded to nearest even on store.
// vdpbf16ps treats bf16 denormal inputs as zero and flushes denormal results (so does oneDNN's
// bf16 matmul on the same instruction, which at::mm uses for all but tiny shapes): products
// below ~1e-38 are lost, far under bf16's useful range. The float32 path has no such limit.
#include "gemm_avx512.h"

#include "cpu_vec.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOE_HAVE_AVX512_GEMM 1
// GCC 12's own intrinsic headers trip -W(maybe-)uninitialized (_mm512_undefined_*): not ours.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace moe {

#ifdef MOE_HAVE_AVX512_GEMM

namespace {

// One target for both element types: the float32 instantiations use only AVX-512F/BW/VL
// intrinsics (the compiler does not invent bf16 instructions), so they run on any AVX-512 CPU.
#define MOE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int kMR = 6;        // rows per microkernel tile
constexpr int kNR = 64;       // columns per B panel (4 zmm of 16 fp32 lanes)
constexpr int64_t kMC = 192;  // rows per cache block of A (a multiple of kMR)
constexpr int64_t kKB = 64;   // K words per block of partial sums in the microkernel
constexpr int64_t kPackWords = int64_t(1) << 20;  // 4 MiB of packed B per chunk of panels

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

// Word j < w (w <= 16) from row `lo` (and `hi`, the next k, for bf16; nullptr: zero) at 16
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

// Word (k = P*kw ..) of a strided column: element at p, the next k at p + step (if it exists).
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

// Packs B (K x n, strides bk, bn in elements) into panels of kNR columns: panel p holds Kw
// rows of kNR words, zero-padded past n and past K.
template <typename T>
MOE_TARGET void pack_b(const T* B, int64_t bk, int64_t bn, int64_t K, int64_t n, uint32_t* out) {
  constexpr int64_t P = kPer<T>;
  const int64_t Kw = (K + P - 1) / P;
  const int64_t panels = (n + kNR - 1) / kNR;
  // B = W^T with W row-major (the data gradient's transposed weights): each word is an aligned
  // word of a row of W, so a panel is a transpose of 32-bit words, read row by row.
  const bool rows_of_words = bk == 1 && K % P == 0 && bn % P == 0 &&
                             reinterpret_cast<uintptr_t>(B) % alignof(uint32_t) == 0;
  for (int64_t p = 0; p < panels; ++p) {
    uint32_t* dst = out + p * Kw * kNR;
    const int64_t c0 = p * kNR, w = std::min<int64_t>(kNR, n - c0);
    if (rows_of_words) {
      const int64_t j16 = w / 16 * 16, k16 = Kw / 16 * 16;
      for (int64_t j = 0; j < j16; j += 16)  // 16 x 16 blocks in registers
        for (int64_t kw = 0; kw < k16; kw += 16)
          transpose16(reinterpret_cast<const u32*>(B + (c0 + j) * bn) + kw, bn / P,
                      dst + kw * kNR + j, kNR);
      for (int64_t j = 0; j < w; ++j) {  // the rest one word at a time
        const u32* row = reinterpret_cast<const u32*>(B + (c0 + j) * bn);
        for (int64_t kw = j < j16 ? k16 : 0; kw < Kw; ++kw) dst[kw * kNR + j] = row[kw];
      }
      for (int64_t j = w; j < kNR; ++j)
        for (int64_t kw = 0; kw < Kw; ++kw) dst[kw * kNR + j] = 0;
      continue;
    }
    for (int64_t kw = 0; kw < Kw; ++kw) {
      const T* r0 = B + (P * kw) * bk + c0 * bn;
      const bool has1 = P * kw + 1 < K;
      uint32_t* d = dst + kw * kNR;
      if (bn == 1) {  // rows of B contiguous: 16 words per step
        int64_t j = 0;
        for (; j < w; j += 16)
          words16(r0 + j, has1 ? r0 + bk + j : nullptr, std::min<int64_t>(16, w - j), d + j, /*all=*/true);
        for (; j < kNR; ++j) d[j] = 0;
        continue;
      }
      for (int64_t j = 0; j < w; ++j) d[j] = word(r0 + j * bn, bk, has1);
      for (int64_t j = w; j < kNR; ++j) d[j] = 0;
    }
  }
}

// Packs A (M x K) to words laid out [kw][m], zero-padded past K. A(m, k) = A[mo(m) + ko(k)] with
// mo(m) = m_off ? m_off[m] : m * am and ko(k) = k_off ? k_off[k] : k * ak (element offsets: the
// offset tables are the rows of a gathered operand).
template <typename T>
MOE_TARGET void pack_a(const T* A, int64_t am, int64_t ak, const int64_t* m_off, const int64_t* k_off,
                       int64_t M, int64_t K, uint32_t* out) {
  constexpr int64_t P = kPer<T>;
  const int64_t Kw = (K + P - 1) / P;
  for (int64_t kw = 0; kw < Kw; ++kw) {
    const int64_t k = P * kw;
    const bool has1 = k + 1 < K;
    const int64_t o0 = k_off ? k_off[k] : k * ak;
    const int64_t o1 = !has1 ? 0 : k_off ? k_off[k + 1] : (k + 1) * ak;
    uint32_t* d = out + kw * M;
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

// C[MR x (16*NV)] = sum over kw of A words x B panel words; stores the first `cols` columns.
// float32 sums run in blocks of kKB words; block sums are added in groups of kKB, and the group
// sums into the total: rounding error grows like 2 kKB + K / kKB^2 rather than K (the 2x-of-torch
// error rule holds at K in the tens of thousands, the weight gradient's rows per expert, where
// one running FMA chain, or one level of blocks, would not).
// Row r of A is the word sequence arow[r][kw * ak] (A in place: ak = 1; packed: ak = rows).
// TC: the type of C (T, or float for bfloat16 inputs with a float32 result).
template <typename T, int MR, int NV, typename TC>
MOE_TARGET void micro(const u32* const* arow, int64_t ak, const uint32_t* Bp, int64_t Kw,
                      TC* C, int64_t ldc, int cols) {
  const u32* ap[MR];
  for (int r = 0; r < MR; ++r) ap[r] = arow[r];
  // bf16 results are rounded to 8 bits of mantissa: one running sum is accurate enough there.
  const int64_t block = std::is_same_v<TC, c10::BFloat16> ? Kw : kKB;
  __m512 acc[MR][NV], mid[MR][NV], total[MR][NV];
  for (int64_t k0 = 0; k0 < Kw; k0 += block) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    const int64_t k1 = std::min(Kw, k0 + block);
    for (int64_t kw = k0; kw < k1; ++kw) {
      __m512i b[NV];
      for (int v = 0; v < NV; ++v)
        b[v] = _mm512_loadu_si512(reinterpret_cast<const void*>(Bp + kw * kNR + 16 * v));
      const int64_t ka = kw * ak;
      for (int r = 0; r < MR; ++r) {
        const __m512i ar = _mm512_set1_epi32(int(ap[r][ka]));
        for (int v = 0; v < NV; ++v) {
          if constexpr (std::is_same_v<T, c10::BFloat16>)
            acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)ar, (__m512bh)b[v]);
          else
            acc[r][v] = _mm512_fmadd_ps(_mm512_castsi512_ps(ar), _mm512_castsi512_ps(b[v]), acc[r][v]);
        }
      }
    }
    // Two levels: kKB blocks add into `mid`, and every kKB of those into `total`.
    const bool first = k0 % (block * kKB) == 0, last = k1 == Kw || (k1 / block) % kKB == 0;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        mid[r][v] = first ? acc[r][v] : _mm512_add_ps(mid[r][v], acc[r][v]);
        if (last) total[r][v] = k0 < block * kKB ? mid[r][v] : _mm512_add_ps(total[r][v], mid[r][v]);
      }
  }
  for (int r = 0; r < MR; ++r) {
    TC* c = C + r * ldc;
    for (int v = 0; v < NV; ++v) {
      const int left = cols - 16 * v;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      if constexpr (std::is_same_v<TC, c10::BFloat16>)
        _mm256_mask_storeu_epi16(c + 16 * v, mask, (__m256i)_mm512_cvtneps_pbh(total[r][v]));
      else
        _mm512_mask_storeu_ps(c + 16 * v, mask, total[r][v]);
    }
  }
}

template <typename T, int NV, typename TC>
MOE_TARGET void micro_rows(int mr, const u32* const* arow, int64_t ak, const uint32_t* Bp,
                           int64_t Kw, TC* C, int64_t ldc, int cols) {
  switch (mr) {
    case 6: return micro<T, 6, NV, TC>(arow, ak, Bp, Kw, C, ldc, cols);
    case 5: return micro<T, 5, NV, TC>(arow, ak, Bp, Kw, C, ldc, cols);
    case 4: return micro<T, 4, NV, TC>(arow, ak, Bp, Kw, C, ldc, cols);
    case 3: return micro<T, 3, NV, TC>(arow, ak, Bp, Kw, C, ldc, cols);
    case 2: return micro<T, 2, NV, TC>(arow, ak, Bp, Kw, C, ldc, cols);
    default: return micro<T, 1, NV, TC>(arow, ak, Bp, Kw, C, ldc, cols);
  }
}

template <typename T, typename TC>
MOE_TARGET void micro_any(int mr, const u32* const* arow, int64_t ak, const uint32_t* Bp,
                          int64_t Kw, TC* C, int64_t ldc, int cols) {
  switch ((cols + 15) / 16) {
    case 4: return micro_rows<T, 4, TC>(mr, arow, ak, Bp, Kw, C, ldc, cols);
    case 3: return micro_rows<T, 3, TC>(mr, arow, ak, Bp, Kw, C, ldc, cols);
    case 2: return micro_rows<T, 2, TC>(mr, arow, ak, Bp, Kw, C, ldc, cols);
    default: return micro_rows<T, 1, TC>(mr, arow, ak, Bp, Kw, C, ldc, cols);
  }
}

// Per-thread scratch for the packed operands: grown as needed (never zero-filled: every word
// used is packed first) and kept for the next call unless it outgrew kKeepWords.
struct Scratch {
  std::unique_ptr<uint32_t[]> words;
  int64_t size = 0;
};
constexpr int64_t kKeepWords = int64_t(8) << 20;  // 32 MiB

uint32_t* scratch(Scratch& buf, int64_t n) {
  if (buf.size < n) {
    buf.words.reset(new uint32_t[n]);
    buf.size = n;
  }
  return buf.words.get();
}

// The memory lines of B's panel of columns [c0, c0 + w), K rows, for a software prefetch spread
// over the microkernel calls of the panel before it. An expert's weight is read from memory
// once per GEMM (E x D x F bytes in all, 16x a dense layer's at E=128, k=8); packing it when the
// panel is reached would stall on those reads, so they are started one panel ahead. Rows of B
// along n (bn == 1) or along k (bk == 1) only; other layouts are not prefetched.
template <typename T>
struct PanelLines {
  const char* base = nullptr;
  int64_t seg_stride = 0, seg_lines = 0, segs = 0;  // segs runs of seg_lines lines, seg_stride bytes apart

  PanelLines() = default;
  PanelLines(const T* B, int64_t bk, int64_t bn, int64_t K, int64_t c0, int64_t w) {
    constexpr int64_t sz = sizeof(T);
    if (bn == 1) {
      set(B + c0, bk * sz, w * sz, K);
    } else if (bk == 1) {
      set(B + c0 * bn, bn * sz, K * sz, w);
    }
  }
  void set(const T* p, int64_t stride, int64_t bytes, int64_t n) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    base = reinterpret_cast<const char*>(a & ~uintptr_t(63));
    seg_stride = stride;
    seg_lines = (int64_t(a & 63) + bytes + 63) / 64;
    segs = n;
  }
  int64_t lines() const { return seg_lines * segs; }
  // Lines [from, to) of the panel, segment by segment (into L2: the hint T1).
  void fetch(int64_t from, int64_t to) const {
    int64_t seg = from / seg_lines, line = from - seg * seg_lines;
    for (int64_t i = from; i < to; ++i) {
      __builtin_prefetch(base + seg * seg_stride + line * 64, 0, 2);
      if (++line == seg_lines) line = 0, ++seg;
    }
  }
};

template <typename T, typename TC = T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t am, int64_t ak, const int64_t* a_rows,
          const int64_t* a_cols, const T* B, int64_t bk, int64_t bn, TC* C, int64_t ldc, NextB<T> next) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, TC(0.0f));
    return;
  }
  constexpr int64_t P = kPer<T>;
  thread_local Scratch a_buf, b_buf;
  const int64_t Kw = (K + P - 1) / P;
  const int64_t panels = (N + kNR - 1) / kNR;
  // B is packed a chunk of panels at a time (all of it for the usual expert shapes), so the
  // scratch stays bounded however large one expert's weight is.
  const int64_t chunk = std::max<int64_t>(1, kPackWords / (Kw * kNR));
  // A in place when its words are contiguous, else packed [kw][m].
  bool rows_even = a_rows != nullptr || am % P == 0;
  for (int64_t m = 0; a_rows != nullptr && P > 1 && m < M; ++m) rows_even = rows_even && a_rows[m] % P == 0;
  const bool direct = ak == 1 && a_cols == nullptr && K % P == 0 && rows_even &&
                      reinterpret_cast<uintptr_t>(A) % alignof(uint32_t) == 0;
  const u32* rowp[kMC];
  for (int64_t p0 = 0; p0 < panels; p0 += chunk) {
    const int64_t np = std::min(chunk, panels - p0), n0 = p0 * kNR;
    uint32_t* Bp = scratch(b_buf, np * Kw * kNR);
    for (int64_t m0 = 0; m0 < M; m0 += kMC) {
      const int64_t mc = std::min(kMC, M - m0);
      int64_t a_k;
      if (direct) {
        for (int64_t r = 0; r < mc; ++r)
          rowp[r] = reinterpret_cast<const u32*>(A + (a_rows ? a_rows[m0 + r] : (m0 + r) * am));
        a_k = 1;
      } else {
        uint32_t* Ap = scratch(a_buf, Kw * mc);
        pack_a(a_rows ? A : A + m0 * am, am, ak, a_rows ? a_rows + m0 : nullptr, a_cols, mc, K, Ap);
        for (int64_t r = 0; r < mc; ++r) rowp[r] = Ap + r;
        a_k = mc;
      }
      const int64_t calls = (mc + kMR - 1) / kMR;
      for (int64_t p = 0; p < np; ++p) {
        const int64_t c0 = n0 + p * kNR;
        const int cols = int(std::min<int64_t>(kNR, N - c0));
        uint32_t* panel = Bp + p * Kw * kNR;
        // The first row block packs each panel as it reaches it, and fetches the next one's
        // lines while its microkernels run.
        // The very last panel fetches the first panel of the next call's B instead.
        const bool first = m0 == 0;
        if (first) pack_b(B + c0 * bn, bk, bn, K, cols, panel);
        const int64_t c1 = c0 + kNR;
        const bool last = m0 + kMC >= M && p0 + np == panels && p + 1 == np;
        const PanelLines<T> ahead =
            first && p + 1 < np ? PanelLines<T>(B, bk, bn, K, c1, std::min<int64_t>(kNR, N - c1))
            : last && next.B != nullptr ? PanelLines<T>(next.B, bk, bn, next.K, 0, std::min<int64_t>(kNR, next.N))
                                        : PanelLines<T>();
        const int64_t L = ahead.lines();
        for (int64_t r = 0, i = 0; r < mc; r += kMR, ++i) {
          if (L > 0) ahead.fetch(L * i / calls, L * (i + 1) / calls);
          const int mr = int(std::min<int64_t>(kMR, mc - r));
          micro_any<T, TC>(mr, rowp + r, a_k, panel, Kw, C + (m0 + r) * ldc + c0, ldc, cols);
        }
      }
    }
  }
  for (auto* buf : {&a_buf, &b_buf})  // keep a typical call's scratch, not an outlier's
    if (buf->size > kKeepWords) *buf = Scratch();
}

// MOE_CPU_GEMM: unset/"auto" uses these kernels where the CPU has the instructions; "aten"
// forces at::mm (for comparisons).
bool use_aten() {
  const char* s = std::getenv("MOE_CPU_GEMM");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return false;
  TORCH_CHECK(std::strcmp(s, "aten") == 0, "MOE_CPU_GEMM must be \"auto\" or \"aten\", got '", s, "'");
  return true;
}

bool cpu_has(bool bf16) {  // AVX-512F/BW/VL as for the dispatch loops, plus BF16 for bfloat16
  return vec::avx512_rows() && (!bf16 || __builtin_cpu_supports("avx512bf16"));
}

}  // namespace

bool avx512_gemm_available(at::ScalarType dtype) {
  static const bool aten = use_aten();
  static const bool f32 = cpu_has(false), bf16 = cpu_has(true);
  if (aten) return false;
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kFloat ? f32 : false;
}

void avx512_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t am, int64_t ak,
                 const c10::BFloat16* B, int64_t bk, int64_t bn, c10::BFloat16* C, int64_t ldc,
                 NextB<c10::BFloat16> next, GatherA gather) {
  gemm(M, N, K, A, am, ak, gather.rows, gather.cols, B, bk, bn, C, ldc, next);
}

void avx512_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t am, int64_t ak,
                 const float* B, int64_t bk, int64_t bn, float* C, int64_t ldc, NextB<float> next,
                 GatherA gather) {
  gemm(M, N, K, A, am, ak, gather.rows, gather.cols, B, bk, bn, C, ldc, next);
}

void avx512_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t am, int64_t ak,
                 const c10::BFloat16* B, int64_t bk, int64_t bn, float* C, int64_t ldc) {
  gemm<c10::BFloat16, float>(M, N, K, A, am, ak, nullptr, nullptr, B, bk, bn, C, ldc, {});
}

#else  // not x86-64 GCC/Clang: at::mm does every GEMM

bool avx512_gemm_available(at::ScalarType) { return false; }

void avx512_gemm(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t,
                 const c10::BFloat16*, int64_t, int64_t, c10::BFloat16*, int64_t,
                 NextB<c10::BFloat16>, GatherA) {
  TORCH_CHECK(false, "moekit: the AVX-512 GEMM is not compiled on this platform");
}

void avx512_gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*,
                 int64_t, int64_t, float*, int64_t, NextB<float>, GatherA) {
  TORCH_CHECK(false, "moekit: the AVX-512 GEMM is not compiled on this platform");
}

void avx512_gemm(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t,
                 const c10::BFloat16*, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "moekit: the AVX-512 GEMM is not compiled on this platform");
}

#endif

}  // namespace moe
