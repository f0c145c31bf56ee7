// bfloat16 GEMM for the CPU grouped GEMM: AVX-512 BF16 (vdpbf16ps), fp32 accumulation.
//
// Why not at::mm per expert: oneDNN re-packs B into its VNNI layout on every call and its
// per-call setup is paid once per expert. With E=128 experts of 256 rows the per-expert calls
// reach 0.82-0.87 of one dense mm of the same FLOPs (bench/ops.py). Here B is packed once per
// tile, straight into the layout the microkernel streams from L2, and there is no per-call setup.
//
// Layout. vdpbf16ps multiplies 32-bit lanes holding bf16 pairs along K: lane n of the result
// gets  a.lo * b.lo + a.hi * b.hi  added. So both operands are read as (k, k+1) pairs:
//   A pairs  A32[m * am + kp * ak]                      (broadcast to all lanes)
//   B panel  Bp[kp][n] = (B[2kp][n], B[2kp+1][n])       64 columns wide, K zero-padded to even
// A is read in place when it is K-contiguous (the forward and the data gradient); otherwise
// (the weight gradient, A = a^T) it is packed to [kp][m] pairs first. The microkernel keeps a
// 6 x 64 fp32 tile in 24 zmm registers and rounds to bf16 (round to nearest even) on store.
// vdpbf16ps treats bf16 denormal inputs as zero and flushes denormal results (so does oneDNN's
// bf16 matmul on the same instruction, which at::mm uses for all but tiny shapes): products
// below ~1e-38 are lost, far under bf16's useful range.
#include "gemm_bf16.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOE_HAVE_AVX512BF16_KERNEL 1
#endif

namespace moe {

#ifdef MOE_HAVE_AVX512BF16_KERNEL

namespace {

#define MOE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int kMR = 6;       // rows per microkernel tile
constexpr int kNR = 64;      // columns per B panel (4 zmm of 16 fp32 lanes)
constexpr int64_t kMC = 192;  // rows per cache block of A (a multiple of kMR)
constexpr int64_t kPackWords = int64_t(1) << 20;  // 4 MiB of packed B per chunk of panels

// bf16 pairs read as 32-bit words: may_alias keeps those reads of bf16 memory well defined.
typedef uint32_t __attribute__((may_alias)) u32;

inline uint16_t bits(c10::BFloat16 v) { return v.x; }

// Pairs (lo[j], hi[j]) as 32-bit words for j < w (w <= 16; hi == nullptr: zero high halves).
// Writes all 16 words (zero past w) when `all`, else only the first w.
MOE_TARGET inline void pair16(const c10::BFloat16* lo, const c10::BFloat16* hi, int64_t w,
                              uint32_t* out, bool all) {
  const __mmask16 m = w >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << w) - 1);
  const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo));
  const __m512i h = hi == nullptr ? _mm512_setzero_si512()
                                  : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi));
  _mm512_mask_storeu_epi32(out, all ? __mmask16(0xFFFF) : m, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
}

// Packs B (K x n, strides bk, bn in elements) into panels of kNR columns: panel p holds Kp
// rows of kNR pairs, zero-padded past n and past K.
MOE_TARGET void pack_b(const c10::BFloat16* B, int64_t bk, int64_t bn, int64_t K, int64_t n,
                       uint32_t* out) {
  const int64_t Kp = (K + 1) / 2;
  const int64_t panels = (n + kNR - 1) / kNR;
  // B = W^T with W row-major (the data gradient's transposed weights): each pair is one aligned
  // 32-bit word of a row of W, so a panel is a transpose of 32-bit words, read row by row.
  const bool words = bk == 1 && K % 2 == 0 && bn % 2 == 0 &&
                     reinterpret_cast<uintptr_t>(B) % alignof(uint32_t) == 0;
  for (int64_t p = 0; p < panels; ++p) {
    uint32_t* dst = out + p * Kp * kNR;
    const int64_t c0 = p * kNR, w = std::min<int64_t>(kNR, n - c0);
    if (words) {
      for (int64_t j = 0; j < w; ++j) {
        const u32* row = reinterpret_cast<const u32*>(B + (c0 + j) * bn);
        for (int64_t kp = 0; kp < Kp; ++kp) dst[kp * kNR + j] = row[kp];
      }
      for (int64_t j = w; j < kNR; ++j)
        for (int64_t kp = 0; kp < Kp; ++kp) dst[kp * kNR + j] = 0;
      continue;
    }
    for (int64_t kp = 0; kp < Kp; ++kp) {
      const c10::BFloat16* r0 = B + (2 * kp) * bk + c0 * bn;
      const bool has1 = 2 * kp + 1 < K;
      const c10::BFloat16* r1 = r0 + bk;
      uint32_t* d = dst + kp * kNR;
      if (bn == 1) {  // rows of B contiguous: 16 pairs per step
        for (int64_t j = 0; j < kNR; j += 16)
          pair16(r0 + j, has1 ? r1 + j : nullptr, std::max<int64_t>(0, std::min<int64_t>(16, w - j)), d + j,
                 /*all=*/true);
        continue;
      }
      for (int64_t j = 0; j < w; ++j)
        d[j] = uint32_t(bits(r0[j * bn])) | (has1 ? uint32_t(bits(r1[j * bn])) << 16 : 0u);
      for (int64_t j = w; j < kNR; ++j) d[j] = 0;
    }
  }
}

// Packs A (M x K, strides am, ak in elements) to pairs laid out [kp][m], zero-padded past K.
MOE_TARGET void pack_a(const c10::BFloat16* A, int64_t am, int64_t ak, int64_t M, int64_t K,
                       uint32_t* out) {
  const int64_t Kp = (K + 1) / 2;
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const c10::BFloat16* c0 = A + (2 * kp) * ak;
    const bool has1 = 2 * kp + 1 < K;
    uint32_t* d = out + kp * M;
    if (am == 1) {  // the weight gradient's a^T: two rows of a, contiguous along m
      for (int64_t m = 0; m < M; m += 16)
        pair16(c0 + m, has1 ? c0 + ak + m : nullptr, std::min<int64_t>(16, M - m), d + m,
               /*all=*/false);
      continue;
    }
    for (int64_t m = 0; m < M; ++m)
      d[m] = uint32_t(bits(c0[m * am])) | (has1 ? uint32_t(bits(c0[m * am + ak])) << 16 : 0u);
  }
}

// C[MR x (16*NV)] = sum over kp of A pairs x B panel pairs; stores the first `cols` columns.
template <int MR, int NV>
MOE_TARGET void micro(const u32* A, int64_t am, int64_t ak, const uint32_t* Bp, int64_t Kp,
                      c10::BFloat16* C, int64_t ldc, int cols) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < Kp; ++kp) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v)
      b[v] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(Bp + kp * kNR + 16 * v));
    const u32* a = A + kp * ak;
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(int(a[r * am]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    uint16_t* c = reinterpret_cast<uint16_t*>(C + r * ldc);
    for (int v = 0; v < NV; ++v) {
      const int left = cols - 16 * v;
      if (left <= 0) break;
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(acc[r][v]);
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      _mm256_mask_storeu_epi16(c + 16 * v, mask, h);
    }
  }
}

template <int NV>
MOE_TARGET void micro_rows(int mr, const u32* A, int64_t am, int64_t ak, const uint32_t* Bp,
                           int64_t Kp, c10::BFloat16* C, int64_t ldc, int cols) {
  switch (mr) {
    case 6: return micro<6, NV>(A, am, ak, Bp, Kp, C, ldc, cols);
    case 5: return micro<5, NV>(A, am, ak, Bp, Kp, C, ldc, cols);
    case 4: return micro<4, NV>(A, am, ak, Bp, Kp, C, ldc, cols);
    case 3: return micro<3, NV>(A, am, ak, Bp, Kp, C, ldc, cols);
    case 2: return micro<2, NV>(A, am, ak, Bp, Kp, C, ldc, cols);
    default: return micro<1, NV>(A, am, ak, Bp, Kp, C, ldc, cols);
  }
}

MOE_TARGET void micro_any(int mr, const u32* A, int64_t am, int64_t ak, const uint32_t* Bp,
                          int64_t Kp, c10::BFloat16* C, int64_t ldc, int cols) {
  switch ((cols + 15) / 16) {
    case 4: return micro_rows<4>(mr, A, am, ak, Bp, Kp, C, ldc, cols);
    case 3: return micro_rows<3>(mr, A, am, ak, Bp, Kp, C, ldc, cols);
    case 2: return micro_rows<2>(mr, A, am, ak, Bp, Kp, C, ldc, cols);
    default: return micro_rows<1>(mr, A, am, ak, Bp, Kp, C, ldc, cols);
  }
}

// Per-thread scratch for the packed operands, grown as needed and kept for the next call.
uint32_t* scratch(std::vector<uint32_t>& buf, int64_t n) {
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

bool detect() {
  // MOE_CPU_GEMM: unset/"auto" uses this kernel where the CPU has AVX-512 BF16; "aten" forces
  // at::mm (for comparisons).
  const char* s = std::getenv("MOE_CPU_GEMM");
  if (s != nullptr && *s != '\0' && std::strcmp(s, "auto") != 0) {
    TORCH_CHECK(std::strcmp(s, "aten") == 0, "MOE_CPU_GEMM must be \"auto\" or \"aten\", got '", s, "'");
    return false;
  }
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

}  // namespace

bool bf16_gemm_available() {
  static const bool ok = detect();
  return ok;
}

void bf16_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t am, int64_t ak,
               const c10::BFloat16* B, int64_t bk, int64_t bn, c10::BFloat16* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, c10::BFloat16(0.0f));
    return;
  }
  thread_local std::vector<uint32_t> a_buf, b_buf;
  const int64_t Kp = (K + 1) / 2;
  const int64_t panels = (N + kNR - 1) / kNR;
  // B is packed a chunk of panels at a time (all of it for the usual expert shapes), so the
  // scratch stays bounded however large one expert's weight is.
  const int64_t chunk = std::max<int64_t>(1, kPackWords / (Kp * kNR));
  // A in place when its pairs are contiguous 32-bit words, else packed [kp][m].
  const bool direct = ak == 1 && K % 2 == 0 && am % 2 == 0 &&
                      reinterpret_cast<uintptr_t>(A) % alignof(uint32_t) == 0;
  for (int64_t p0 = 0; p0 < panels; p0 += chunk) {
    const int64_t np = std::min(chunk, panels - p0), n0 = p0 * kNR;
    uint32_t* Bp = scratch(b_buf, np * Kp * kNR);
    pack_b(B + n0 * bn, bk, bn, K, std::min(N - n0, np * kNR), Bp);
    for (int64_t m0 = 0; m0 < M; m0 += kMC) {
      const int64_t mc = std::min(kMC, M - m0);
      const u32* A32;
      int64_t a_m, a_k;
      if (direct) {
        A32 = reinterpret_cast<const u32*>(A + m0 * am);
        a_m = am / 2;
        a_k = 1;
      } else {
        uint32_t* Ap = scratch(a_buf, Kp * mc);
        pack_a(A + m0 * am, am, ak, mc, K, Ap);
        A32 = Ap;
        a_m = 1;
        a_k = mc;
      }
      for (int64_t p = 0; p < np; ++p) {
        const int64_t c0 = n0 + p * kNR;
        const int cols = int(std::min<int64_t>(kNR, N - c0));
        const uint32_t* panel = Bp + p * Kp * kNR;
        for (int64_t r = 0; r < mc; r += kMR) {
          const int mr = int(std::min<int64_t>(kMR, mc - r));
          micro_any(mr, A32 + r * a_m, a_m, a_k, panel, Kp, C + (m0 + r) * ldc + c0, ldc, cols);
        }
      }
    }
  }
  for (auto* buf : {&a_buf, &b_buf})  // keep a typical call's scratch, not an outlier's
    if (buf->capacity() > size_t(2 * kPackWords)) std::vector<uint32_t>().swap(*buf);
}

#else  // not x86-64 GCC/Clang: at::mm does every bfloat16 GEMM

bool bf16_gemm_available() { return false; }

void bf16_gemm(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t,
               const c10::BFloat16*, int64_t, int64_t, c10::BFloat16*, int64_t) {
  TORCH_CHECK(false, "moekit: the AVX-512 BF16 GEMM is not compiled on this platform");
}

#endif

}  // namespace moe
