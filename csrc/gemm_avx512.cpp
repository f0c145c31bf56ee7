// AVX-512 GEMM for the CPU grouped GEMM: bfloat16 (vdpbf16ps) and float32 (vfmadd), fp32 accumulation.
//
// Why not at::mm per expert: oneDNN/MKL re-pack B on every call and pay their per-call setup once
// per expert. With E=128 experts of 256 rows the per-expert calls reach 0.82-0.87 of one dense mm
// of the same FLOPs in bf16 (bench/ops.py), and the weight gradients (depth X = the expert's
// rows) lose more. Here B is packed once per tile, straight into the layout the microkernel
// streams from L2, and there is no per-call setup.
//
// Shapes (gemm_avx512.h): C (M x Y) = A (M x X) @ B (X x Y), M rows, depth X, Y columns.
// Layout. Both operands are read as 32-bit words along X: a bf16 word holds the pair (x, x+1)
// (vdpbf16ps adds  a.lo * b.lo + a.hi * b.hi  to each fp32 lane), a float word one x.
// With P elements per word (2 or 1) and Xw = ceil(X / P) words:
//   A words  row m's words at xw (in place: xw; packed: xw * M)   (broadcast to all lanes)
//   B panel  Bp[xw][y] = B[P*xw .. P*xw+P-1][y]             64 columns wide, zero-padded past X, Y
// A is read in place when it is X-contiguous (the forward and the data gradient), through one
// pointer per row, so its rows may be gathered (gather_grouped_mm: the rows of x_TD named by the
// plan); otherwise (the weight gradient, A = a^T) it is packed to [xw][m] words first, from
// gathered rows as well. B is packed a chunk of panels (a quarter of L2) at a time, read in memory
// order, while the microkernels of the chunk before fetch its memory lines (gemm_pack.h); its
// depth rows may be gathered too (the weight gradient g^T x in an nn.Linear-style layout: B = the rows of x).
// Few rows (decode: 1-32 rows per expert, the caller's `stream`): packing B would cost more than the
// GEMM uses it, so B's rows (by == 1) are read in place instead (gemm_stream.h), each word once
// from memory, in depth blocks whose partial sums wait in scratch while the next block is fetched
// into L2; the sums are the packed path's, bit for bit. B stored (Y x X) (bx == 1: an nn.Linear
// weight read as a transposed view) streams too, each of its rows dotted with A's rows along X
// (gemm_stream_yx.h: float32 lanes reduced at the end, not the packed path's bits). The microkernel
// keeps a 6 x 64 fp32 tile in 24 zmm registers; bf16 results are rounded to nearest even on
// store, or stored as float32 (bf16 inputs, float32 C: moe.linear_f32).
// vdpbf16ps treats bf16 denormal inputs as zero and flushes denormal results (so does oneDNN's
// bf16 matmul on the same instruction, which at::mm uses for all but tiny shapes): products
// below ~1e-38 are lost, far under bf16's useful range. The float32 path has no such limit.
#include "gemm_avx512.h"

#include "config.h"

#include "cpu_vec.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOE_HAVE_AVX512_GEMM 1
// GCC 12's own intrinsic headers trip -W(maybe-)uninitialized (_mm512_undefined_*): not ours.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#ifdef MOE_HAVE_AVX512_GEMM
// One target for both element types: the float32 instantiations use only AVX-512F/BW/VL
// intrinsics (the compiler does not invent bf16 instructions), so they run on any AVX-512 CPU.
#define MOE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#include "gemm_pack.h"    // operand packing and the next chunk's prefetch
#include "gemm_stream.h"  // B read in place: the streamed path for few rows
#include "gemm_stream_yx.h"  // the same for B stored (Y x X): rows of B dotted with rows of A
#endif

namespace moe {

int64_t cpu_l2_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? int64_t(v) : int64_t(1) << 20;
  }();
  return bytes;
}

#ifdef MOE_HAVE_AVX512_GEMM

namespace {

constexpr int kMR = 6;        // rows per microkernel tile
constexpr int64_t kMC = 192;  // rows per cache block of A (a multiple of kMR)
// A quarter of this CPU's L2: the packed B of one chunk of panels (at least one panel), so that
// the next chunk's lines, fetched into L2 while this one runs, are still there when packed; and
// the streamed path's partial sums of one range of columns.
int64_t l2_quarter_bytes() {
  static const int64_t bytes = cpu_l2_bytes() / 4;
  return bytes;
}
constexpr int64_t kWordBytes = int64_t(sizeof(uint32_t));

// Where the microkernel reads B's words: a packed panel (PanelB), or B's own rows (RowsB, the
// streamed path for few rows). load(xw, b) sets b[v] to the words of depth word xw for columns
// 16v..16v+15 (RowsB<bf16>: in its interleaved order); order(t) puts a row of results back in
// column order.
struct PanelB {
  const uint32_t* p;
  template <int YV>
  MOE_TARGET void load(int64_t xw, __m512i* b) const {
    for (int v = 0; v < YV; ++v) b[v] = _mm512_loadu_si512(reinterpret_cast<const void*>(p + xw * kYR + 16 * v));
  }
  template <int YV>
  void order(__m512*) const {}
};

// C[MR x (16*YV)] = sum over xw of A words x B words (from `src`); stores the first `cols` columns.
// float32 sums run in blocks of kXB words; block sums are added in groups of kXB, and the group
// sums into the total: rounding error grows like 2 kXB + X / kXB^2 rather than X (the 2x-of-torch
// error rule holds at X in the tens of thousands, the weight gradient's rows per expert, where
// one running FMA chain, or one level of blocks, would not).
// Row r of A is the word sequence arow[r][xw * ax] (A in place: ax = 1; packed: ax = rows).
// TC: the type of C (T, or float for bfloat16 inputs with a float32 result).
template <typename T, int MR, int YV, typename TC, typename Src>
MOE_TARGET void micro(const u32* const* arow, int64_t ax, const Src& src, int64_t Xw,
                      TC* C, int64_t ldc, int cols, bool nt, LineCursor* pf) {
  const u32* ap[MR];
  for (int r = 0; r < MR; ++r) ap[r] = arow[r];
  // bf16 results are rounded to 8 bits of mantissa: one running sum is accurate enough there.
  const int64_t block = std::is_same_v<TC, c10::BFloat16> ? Xw : kXB;
  __m512 acc[MR][YV], mid[MR][YV], total[MR][YV];
  for (int64_t x0 = 0; x0 < Xw; x0 += block) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < YV; ++v) acc[r][v] = _mm512_setzero_ps();
    const int64_t x1 = std::min(Xw, x0 + block);
    for (int64_t xw = x0; xw < x1; ++xw) {
      if (pf->left > 0) pf->step();
      __m512i b[YV];
      src.template load<YV>(xw, b);
      const int64_t xa = xw * ax;
      for (int r = 0; r < MR; ++r) {
        const __m512i ar = _mm512_set1_epi32(int(ap[r][xa]));
        for (int v = 0; v < YV; ++v) {
          if constexpr (std::is_same_v<T, c10::BFloat16>)
            acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)ar, (__m512bh)b[v]);
          else
            acc[r][v] = _mm512_fmadd_ps(_mm512_castsi512_ps(ar), _mm512_castsi512_ps(b[v]), acc[r][v]);
        }
      }
    }
    // Two levels: kXB blocks add into `mid`, and every kXB of those into `total`.
    const bool first = x0 % (block * kXB) == 0, last = x1 == Xw || (x1 / block) % kXB == 0;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < YV; ++v) {
        mid[r][v] = first ? acc[r][v] : _mm512_add_ps(mid[r][v], acc[r][v]);
        if (last) total[r][v] = x0 < block * kXB ? mid[r][v] : _mm512_add_ps(total[r][v], mid[r][v]);
      }
  }
  for (int r = 0; r < MR; ++r) {
    src.template order<YV>(total[r]);
    if (nt) store_row<YV, TC, true>(C + r * ldc, total[r], cols);
    else store_row<YV>(C + r * ldc, total[r], cols);
  }
}

// The microkernels by shape: K::run<MR, YV>(args...) with MR = mr (1..6) rows and YV =
// ceil(cols / 16) vectors of 16 columns (rounded up to even with `pairs`: RowsB<bfloat16>).
template <typename T, typename TC>
struct Micro {
  template <int MR, int YV, typename... A>
  MOE_TARGET static void run(const A&... a) { micro<T, MR, YV, TC>(a...); }
};
template <typename T, typename TC>
struct MicroBlock {
  template <int MR, int YV, typename... A>
  MOE_TARGET static void run(const A&... a) { micro_block<T, MR, YV, TC>(a...); }
};

template <typename K, int YV, typename... A>
MOE_TARGET void by_rows(int mr, const A&... a) {
  switch (mr) {
    case 6: return K::template run<6, YV>(a...);
    case 5: return K::template run<5, YV>(a...);
    case 4: return K::template run<4, YV>(a...);
    case 3: return K::template run<3, YV>(a...);
    case 2: return K::template run<2, YV>(a...);
    default: return K::template run<1, YV>(a...);
  }
}

// The same for kMR + 1 .. 2 kMR rows on at most 32 columns (YV = 2 for RowsB<bfloat16>).
template <typename K, bool pairs, typename... A>
MOE_TARGET void by_shape_tall(int mr, int cols, const A&... a) {
  constexpr int YV = 2;
  if constexpr (!pairs) {
    if (cols <= 16) {
      switch (mr) {
        case 12: return K::template run<12, 1>(a...);
        case 11: return K::template run<11, 1>(a...);
        case 10: return K::template run<10, 1>(a...);
        case 9: return K::template run<9, 1>(a...);
        case 8: return K::template run<8, 1>(a...);
        default: return K::template run<7, 1>(a...);
      }
    }
  }
  switch (mr) {
    case 12: return K::template run<12, YV>(a...);
    case 11: return K::template run<11, YV>(a...);
    case 10: return K::template run<10, YV>(a...);
    case 9: return K::template run<9, YV>(a...);
    case 8: return K::template run<8, YV>(a...);
    default: return K::template run<7, YV>(a...);
  }
}

template <typename K, bool pairs, typename... A>
MOE_TARGET void by_shape(int mr, int cols, const A&... a) {
  switch ((cols + 15) / 16) {
    case 4: return by_rows<K, 4>(mr, a...);
    case 3: return by_rows<K, pairs ? 4 : 3>(mr, a...);
    case 2: return by_rows<K, 2>(mr, a...);
    default: return by_rows<K, pairs ? 2 : 1>(mr, a...);
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

template <typename T, typename TC = T>
void gemm(int64_t M, int64_t Y, int64_t X, const T* A, int64_t am, int64_t ax, Gather gather,
          const T* B, int64_t bx, int64_t by, TC* C, int64_t ldc, NextB<T> next, bool stream = false,
          bool nt_store = false) {
  if (M == 0 || Y == 0) return;
  if (X == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + Y, TC(0.0f));
    return;
  }
  constexpr int64_t P = kPer<T>;
  const int64_t *a_rows = gather.a_rows, *a_cols = gather.a_cols, *b_rows = gather.b_rows;
  thread_local Scratch a_buf, b_buf;
  const int64_t Xw = (X + P - 1) / P;
  const int64_t panels = (Y + kYR - 1) / kYR;
  // B is packed a chunk of panels at a time (a quarter of L2), so the scratch stays bounded
  // however large one expert's weight is.
  const int64_t chunk = std::max<int64_t>(1, l2_quarter_bytes() / (Xw * kYR * kWordBytes));
  // A in place when its words are contiguous, else packed [xw][m].
  bool rows_even = a_rows != nullptr || am % P == 0;
  for (int64_t m = 0; a_rows != nullptr && P > 1 && m < M; ++m) rows_even = rows_even && a_rows[m] % P == 0;
  const bool direct = ax == 1 && a_cols == nullptr && X % P == 0 && rows_even &&
                      reinterpret_cast<uintptr_t>(A) % alignof(uint32_t) == 0;
  const u32* rowp[kMC];
  uint32_t* a_all = nullptr;  // every row block of A packed, block m0 at word m0 * Xw (see below)
  auto pack_rows = [&](int64_t m0, int64_t mc, uint32_t* Ap) {
    pack_a(a_rows ? A : A + m0 * am, am, ax, a_rows ? a_rows + m0 : nullptr, a_cols, mc, X, Ap);
  };
  // Sets rowp for rows [m0, m0 + mc): A's rows in place, or packed; returns their word stride.
  auto a_rows_at = [&](int64_t m0, int64_t mc) -> int64_t {
    if (direct) {
      for (int64_t r = 0; r < mc; ++r)
        rowp[r] = reinterpret_cast<const u32*>(A + (a_rows ? a_rows[m0 + r] : (m0 + r) * am));
      return 1;
    }
    uint32_t* Ap = a_all ? a_all + m0 * Xw : scratch(a_buf, Xw * mc);
    if (a_all == nullptr) pack_rows(m0, mc, Ap);
    for (int64_t r = 0; r < mc; ++r) rowp[r] = Ap + r;
    return mc;
  };
  if (stream && by != 1 && bx == 1 && b_rows == nullptr && M <= kStreamRowsYX) {
    // Few rows, B stored (Y x X): each row of B dotted with A's rows (gemm_stream_yx.h), which
    // are read along X in place when they are contiguous there, else copied so first.
    const T* arow[kStreamRowsYX];
    if (ax == 1 && a_cols == nullptr) {
      for (int64_t m = 0; m < M; ++m) arow[m] = A + (a_rows ? a_rows[m] : m * am);
    } else {
      T* Ar = reinterpret_cast<T*>(scratch(a_buf, (M * X * int64_t(sizeof(T)) + 3) / 4));
      for (int64_t m = 0; m < M; ++m) {
        const T* src = A + (a_rows ? a_rows[m] : m * am);
        for (int64_t x = 0; x < X; ++x) Ar[m * X + x] = src[a_cols ? a_cols[x] : x * ax];
        arow[m] = Ar + m * X;
      }
    }
    stream_yx(int(M), arow, B, by, X, Y, next, C, ldc);
    return;
  }
  if (stream && by == 1 && b_rows == nullptr && M <= kMC) {
    // Few rows (or a deep B: avx512_streams): B's rows read in place. Depth blocks of kStreamWords
    // words (kBlockWords above kStreamRows rows; the depth * P rows of B across a range of
    // columns), strip by strip of kYR columns (kYR / 2 for 7-12 rows); the partial sums wait in
    // scratch (L1/L2) between blocks, and the next block's lines are fetched into L2 while this
    // one runs (during the last: the next call's first).
    thread_local Scratch s_buf;
    const int64_t a_x = a_rows_at(0, M);
    // 7 to 2 * kMR rows: every row in one pass over strips of kYR / 2 columns (12 x 2 vectors of
    // accumulators), so B's words are loaded once rather than once per block of kMR rows.
    const int64_t width = M > kMR && M <= 2 * kMR ? kYR / 2 : kYR;
    constexpr bool pairs = std::is_same_v<T, c10::BFloat16>;
    // Columns in ranges whose partial sums (3 planes of M x range floats) take at most a quarter
    // of this CPU's L2: a range runs down the whole depth before the next one starts, so the
    // scratch (one range's planes, reused by the next) stays in L2 however wide B is (Mixtral's
    // up projection: 28672 columns). The sums of each column are the same, in the same order,
    // whatever the ranges.
    const int64_t range = std::max<int64_t>(kYR, l2_quarter_bytes() / (3 * M * int64_t(sizeof(float))) / kYR * kYR);
    const int64_t lds = std::min(range, panels * kYR), plane = M * lds;
    float* st = reinterpret_cast<float*>(scratch(s_buf, 3 * plane));
    // More than kStreamRows bfloat16 rows (a deep B, avx512_streams): each strip's depth block
    // (kBlockWords) is packed once into `blk` (BlockB) and its tiles read that, instead of each
    // tile forming the (x, x+1) words from B's two rows again (RowsB). The same words: the same bits.
    thread_local Scratch k_buf;
    uint32_t* blk = pairs && M > kStreamRows ? scratch(k_buf, kBlockWords * kYR) : nullptr;
    const int64_t depth = blk != nullptr ? kBlockWords : kStreamWords;
    for (int64_t ya = 0; ya < Y; ya += range) {
      const int64_t yb = std::min(Y, ya + range), cols = yb - ya;
      const int64_t calls = width < kYR ? (cols + width - 1) / width : (cols + kYR - 1) / kYR * ((M + kMR - 1) / kMR);
      for (int64_t x0 = 0; x0 < Xw; x0 += depth) {
        const int64_t x1 = std::min(Xw, x0 + depth);
        // The lines of the next block: this range's next rows, the next range's first, or the
        // next call's first block.
        const PanelLines<T> ahead =
            x1 < Xw ? PanelLines<T>(B + P * x1 * bx, bx, 1, nullptr, std::min(X, P * (x1 + depth)) - P * x1, ya, cols)
            : yb < Y ? PanelLines<T>(B, bx, 1, nullptr, std::min(X, P * depth), yb, std::min(range, Y - yb))
            : next.B != nullptr && next.rows == nullptr
                ? PanelLines<T>(next.B, bx, 1, nullptr, std::min(next.X, P * depth), 0, std::min(range, next.Y))
                : PanelLines<T>();
        const int64_t L = ahead.lines();
        int64_t i = 0;
        for (int64_t c0 = ya; c0 < yb; c0 += width) {
          const RowsB<T> strip(B + c0, bx, X, int(std::min<int64_t>(width, yb - c0)));
          if (width < kYR) {  // all rows at once on a half-width strip
            LineCursor pf;
            if (L > 0) pf = LineCursor(ahead, L * i / calls, L * (i + 1) / calls, x1 - x0);
            ++i;
            by_shape_tall<MicroBlock<T, TC>, pairs>(int(M), strip.cols, rowp, a_x, strip, x0, x1, Xw,
                                                    st + (c0 - ya), plane, lds, C + c0, ldc, &pf);
            pf.finish();
            continue;
          }
          // Tiles of kMR rows down the strip, reading B's words from `src` (paired: RowsB's
          // interleaved column order, which by_shape's even vector counts keep).
          auto row_tiles = [&](const auto& src, auto paired) {
            for (int64_t r = 0; r < M; r += kMR, ++i) {
              LineCursor pf;
              if (L > 0) pf = LineCursor(ahead, L * i / calls, L * (i + 1) / calls, x1 - x0);
              by_shape<MicroBlock<T, TC>, decltype(paired)::value>(
                  int(std::min<int64_t>(kMR, M - r)), src.cols, rowp + r, a_x, src, x0, x1, Xw,
                  st + r * lds + (c0 - ya), plane, lds, C + r * ldc + c0, ldc, &pf);
              pf.finish();
            }
          };
          if (blk != nullptr) {
            pack_b(B + P * x0 * bx + c0, bx, 1, nullptr, std::min(X, P * x1) - P * x0, strip.cols, blk);
            row_tiles(BlockB{blk, x0, strip.cols}, std::false_type{});
          } else {
            row_tiles(strip, std::bool_constant<pairs>{});
          }
        }
      }
    }
    for (auto* buf : {&a_buf, &s_buf})  // (k_buf is one block: kBlockWords * kYR words)
      if (buf->size > kKeepWords) *buf = Scratch();
    return;
  }
  // Each chunk of panels (a quarter of L2) is packed whole before its microkernels
  // run (pack_b reads B in memory order), and during the last quarter of its microkernel calls
  // (at least 8) the lines of the next chunk's B, or of the first chunk of the next call's B (the
  // next expert's weight), are fetched into L2, spread evenly over those calls and within each
  // call over its depth loop (LineCursor, a few lines per step): late enough that the lines are
  // still in L2 when packed, and never in a burst. Measured on the Zen 4 of the README (L2 1 MiB):
  // - E=128 x 256 rows, bf16 (1024 x 448), perf: packing took 9.5% of the microkernels' cycles
  //   with the former panel-by-panel packing, 6-10% with the fetches spread over all the calls,
  //   4-6% over the last quarter (one thread, this GEMM alone: 14%);
  // - the same fetches issued before each call, in one burst, against within its loop (one
  //   thread, the forward of the up projection, E=128): 152 -> 139 ms at 256 rows per expert
  //   (one expert of all the rows: 141 ms), 86 -> 73 ms at 128 (68 ms); spread over the last half
  //   of the calls or all of them instead of the last quarter: 140-144 / 73, 143 / 74 ms;
  // - Mixtral's experts at 21-43 rows each (bench.decode --shape mixtral --T 32 --T 64, one
  //   thread): 4 MiB chunks (whose fetched lines overflow L2) 310 / 437 ms, L2 / 4: 245 / 350 ms;
  //   the layer's training step (bench.layer, bf16) is the same either way.
  // A packed (the weight gradient's a^T) is packed once per call where it fits in half of L2,
  // rather than again for every chunk of B: the weight gradient of 1 MiB of g rows per expert
  // (E=128, float32, D=1024) runs 4 chunks. Larger A is packed per chunk, one row block at a time
  // (the scratch stays bounded).
  if (!direct && M * Xw * kWordBytes <= 2 * l2_quarter_bytes()) {
    uint32_t* all = scratch(a_buf, Xw * M);
    for (int64_t m0 = 0; m0 < M; m0 += kMC) pack_rows(m0, std::min(kMC, M - m0), all + m0 * Xw);
    a_all = all;
  }
  int64_t calls = 0;  // microkernel calls per panel: ceil(mc / kMR) over the row blocks
  for (int64_t m0 = 0; m0 < M; m0 += kMC) calls += (std::min(kMC, M - m0) + kMR - 1) / kMR;
  const int64_t next_chunk =
      next.B == nullptr ? 0 : std::max<int64_t>(1, l2_quarter_bytes() / ((next.X + P - 1) / P * kYR * kWordBytes));
  for (int64_t p0 = 0; p0 < panels; p0 += chunk) {
    const int64_t np = std::min(chunk, panels - p0), y0 = p0 * kYR, y1 = y0 + np * kYR;
    uint32_t* Bp = scratch(b_buf, np * Xw * kYR);
    pack_b(B + y0 * by, bx, by, b_rows, X, std::min(np * kYR, Y - y0), Bp);
    const PanelLines<T> ahead =
        y1 < Y ? PanelLines<T>(B, bx, by, b_rows, X, y1, std::min(chunk * kYR, Y - y1))
        : next.B != nullptr ? PanelLines<T>(next.B, bx, by, next.rows, next.X, 0, std::min(next_chunk * kYR, next.Y))
                            : PanelLines<T>();
    const int64_t L = ahead.lines(), total = calls * np;
    const int64_t win = std::min(total, std::max<int64_t>(8, total / 4)), skip = total - win;
    int64_t i = 0;
    for (int64_t m0 = 0; m0 < M; m0 += kMC) {
      const int64_t mc = std::min(kMC, M - m0);
      const int64_t a_x = a_rows_at(m0, mc);
      for (int64_t p = 0; p < np; ++p) {
        const int64_t c0 = y0 + p * kYR;
        const int cols = int(std::min<int64_t>(kYR, Y - c0));
        const uint32_t* panel = Bp + p * Xw * kYR;
        for (int64_t r = 0; r < mc; r += kMR, ++i) {
          LineCursor pf;
          if (L > 0 && i >= skip) pf = LineCursor(ahead, L * (i - skip) / win, L * (i - skip + 1) / win, Xw);
          const int mr = int(std::min<int64_t>(kMR, mc - r));
          by_shape<Micro<T, TC>, false>(mr, cols, rowp + r, a_x, PanelB{panel}, Xw, C + (m0 + r) * ldc + c0,
                                        ldc, cols, nt_store, &pf);
          pf.finish();
        }
      }
    }
  }
  if (nt_store) _mm_sfence();  // the non-temporal stores are visible before the caller goes on
  for (auto* buf : {&a_buf, &b_buf})  // keep a typical call's scratch, not an outlier's
    if (buf->size > kKeepWords) *buf = Scratch();
}

bool cpu_has(bool bf16) {  // AVX-512F/BW/VL as for the dispatch loops, plus BF16 for bfloat16
  return vec::avx512_rows() && (!bf16 || __builtin_cpu_supports("avx512bf16"));
}

}  // namespace

bool avx512_streams(int64_t M, int64_t X, bool bf16) {
  static_assert(kStreamRowsDeep <= kMC, "the streamed path holds every row's pointer (rowp)");
  if (M <= kStreamRows) return true;
  return bf16 && M <= kStreamRowsDeep && (X + 1) / 2 * kYR * kWordBytes > l2_quarter_bytes();
}

bool avx512_gemm_available(at::ScalarType dtype) {
  static const bool f32 = cpu_has(false), bf16 = cpu_has(true);
  if (config::cpu_gemm() == config::CpuGemm::kAten) return false;  // at::mm, for comparisons
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kFloat ? f32 : false;
}

void avx512_gemm(int64_t M, int64_t Y, int64_t X, const c10::BFloat16* A, int64_t am, int64_t ax,
                 const c10::BFloat16* B, int64_t bx, int64_t by, c10::BFloat16* C, int64_t ldc,
                 NextB<c10::BFloat16> next, Gather gather, bool stream, bool nt_store) {
  gemm(M, Y, X, A, am, ax, gather, B, bx, by, C, ldc, next, stream, nt_store);
}

void avx512_gemm(int64_t M, int64_t Y, int64_t X, const float* A, int64_t am, int64_t ax,
                 const float* B, int64_t bx, int64_t by, float* C, int64_t ldc, NextB<float> next,
                 Gather gather, bool stream, bool nt_store) {
  gemm(M, Y, X, A, am, ax, gather, B, bx, by, C, ldc, next, stream, nt_store);
}

void avx512_gemm(int64_t M, int64_t Y, int64_t X, const c10::BFloat16* A, int64_t am, int64_t ax,
                 const c10::BFloat16* B, int64_t bx, int64_t by, float* C, int64_t ldc, Gather gather) {
  gemm<c10::BFloat16, float>(M, Y, X, A, am, ax, gather, B, bx, by, C, ldc, {});
}

#else  // not x86-64 GCC/Clang: at::mm does every GEMM

bool avx512_gemm_available(at::ScalarType) { return false; }

bool avx512_streams(int64_t M, int64_t, bool) { return M <= kStreamRows; }

void avx512_gemm(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t,
                 const c10::BFloat16*, int64_t, int64_t, c10::BFloat16*, int64_t,
                 NextB<c10::BFloat16>, Gather, bool, bool) {
  TORCH_CHECK(false, "moekit: the AVX-512 GEMM is not compiled on this platform");
}

void avx512_gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*,
                 int64_t, int64_t, float*, int64_t, NextB<float>, Gather, bool, bool) {
  TORCH_CHECK(false, "moekit: the AVX-512 GEMM is not compiled on this platform");
}

void avx512_gemm(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t,
                 const c10::BFloat16*, int64_t, int64_t, float*, int64_t, Gather) {
  TORCH_CHECK(false, "moekit: the AVX-512 GEMM is not compiled on this platform");
}

#endif

}  // namespace moe
