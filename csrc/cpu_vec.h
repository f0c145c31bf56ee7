// AVX-512 row loops for bfloat16 and float32 dispatch (permute with scale, unpermute, its
// weight gradient).
//
// The extension is compiled for baseline x86-64, where the compiler converts bfloat16 one
// element at a time and float32 four at a time. These versions are compiled for AVX-512
// (function target attributes) and chosen at run time (avx512_rows()). They compute exactly what the scalar loops compute, bit for
// bit: bf16 -> fp32 is exact, fp32 -> bf16 rounds to nearest even with NaN -> 0x7FC0 (as
// c10::BFloat16 does, denormals kept), and products and sums are separate roundings in the same
// order (the build passes -ffp-contract=off, so no fused multiply-add).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOE_HAVE_AVX512_ROWS 1
// GCC 12's own intrinsic headers trip -W(maybe-)uninitialized (_mm512_undefined_*): not ours.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace moe::vec {

// bfloat16 and float32 have AVX-512 row loops (here and in activation.cpp), used where the CPU has
// AVX-512 (avx512_rows()); the other dtypes always run the scalar loops.
template <typename T>
constexpr bool kVecRows =
#ifdef MOE_HAVE_AVX512_ROWS
    std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>;
#else
    false;
#endif

#ifdef MOE_HAVE_AVX512_ROWS

#define MOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

inline bool avx512_rows() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return ok;
}

MOE_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

MOE_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// c10::BFloat16's round_to_nearest_even on 16 lanes.
MOE_AVX512 inline __m256i round16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

MOE_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m = 0xFFFF) {
  _mm256_mask_storeu_epi16(p, m, round16(v));
}

MOE_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MOE_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MOE_AVX512 inline void store16(float* p, __m512 v, __mmask16 m = 0xFFFF) {
  _mm512_mask_storeu_ps(p, m, v);
}

inline __mmask16 tail_mask(int64_t n) { return __mmask16((1u << n) - 1); }

// o[d] = T(float(x[d]) * w)      (T: c10::BFloat16 or float)
template <typename T>
MOE_AVX512 inline void scale_row(const T* x, float w, T* o, int64_t D) {
  const __m512 wv = _mm512_set1_ps(w);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) store16(o + d, _mm512_mul_ps(load16(x + d), wv));
  if (d < D) {
    const __mmask16 m = tail_mask(D - d);
    store16(o + d, _mm512_mul_ps(load16(x + d, m), wv), m);
  }
}

// o[d] = T(sum over k < n of w[k] * float(rows[k][d]))   (w == nullptr: weights 1), accumulated
// in registers 16 lanes at a time, without a buffer: the scalar loop's operations (acc = 0, then
// acc += w_k * x_k in slot order) on each element, so the same bits.
template <typename T>
MOE_AVX512 inline void combine_rows(const T* const* rows, const float* w, int64_t n, T* o, int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; ++k) {
      const __m512 x = load16(rows[k] + d);
      acc = _mm512_add_ps(acc, w == nullptr ? x : _mm512_mul_ps(_mm512_set1_ps(w[k]), x));
    }
    store16(o + d, acc);
  }
  if (d < D) {
    const __mmask16 m = tail_mask(D - d);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; ++k) {
      const __m512 x = load16(rows[k] + d, m);
      acc = _mm512_add_ps(acc, w == nullptr ? x : _mm512_mul_ps(_mm512_set1_ps(w[k]), x));
    }
    store16(o + d, acc, m);
  }
}

// <a, b> in float over 16 partial sums, lane l holding the terms d = l (mod 16), summed l = 0..15
// at the end: the order of the scalar dot in dispatch.cpp.
template <typename T>
MOE_AVX512 inline float dot_row(const T* a, const T* b, int64_t D) {
  __m512 part = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) part = _mm512_add_ps(part, _mm512_mul_ps(load16(a + d), load16(b + d)));
  if (d < D) {
    const __mmask16 m = tail_mask(D - d);
    part = _mm512_mask_add_ps(part, m, part, _mm512_mul_ps(load16(a + d, m), load16(b + d, m)));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, part);
  float sum = 0;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  return sum;
}

// dst[0:bytes] = src[0:bytes] with non-temporal stores (dst 64-byte aligned, bytes % 64 == 0):
// for outputs much larger than the caches, which would only be evicted again before use. The
// caller issues store_fence() before the data is read by another thread.
MOE_AVX512 inline void stream_copy(const void* src, void* dst, int64_t bytes) {
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  for (int64_t b = 0; b < bytes; b += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + b),
                        _mm512_loadu_si512(reinterpret_cast<const void*>(s + b)));
}

inline void store_fence() { _mm_sfence(); }

// scale_row with non-temporal stores (same values; o 64-byte aligned, D * sizeof(T) % 64 == 0).
MOE_AVX512 inline void scale_row_stream(const c10::BFloat16* x, float w, c10::BFloat16* o, int64_t D) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t d = 0; d < D; d += 32) {
    const __m256i lo = round16(_mm512_mul_ps(load16(x + d), wv));
    const __m256i hi = round16(_mm512_mul_ps(load16(x + d + 16), wv));
    _mm512_stream_si512(reinterpret_cast<__m512i*>(o + d),
                        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
  }
}

MOE_AVX512 inline void scale_row_stream(const float* x, float w, float* o, int64_t D) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t d = 0; d < D; d += 16) _mm512_stream_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(x + d), wv));
}

#else

inline bool avx512_rows() { return false; }
inline void stream_copy(const void*, void*, int64_t) {}
inline void store_fence() {}

#endif

}  // namespace moe::vec
