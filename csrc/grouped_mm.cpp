// moe.grouped_mm and moe.grouped_mm_wgrad on the CPU.
//
// Shape legend (moe_ops.h): N routed rows of a_NX, E experts, X/Y the GEMM input/output dims
// (a_NX @ b_EXY -> c_NY), T tokens and K top-k slots (the gathered forms' x_TD and rows_TK).
//
// Each expert's rows form one GEMM; the work is cut into (expert, row block, column block) tiles
// so that many small experts (E=128, F=224) still keep every core busy, and each tile calls
// at::mm_out, the optimized (MKL/oneDNN) matmul, single-threaded inside the parallel region.
// Tiles are handed out largest first from a shared counter (dynamic, LPT order), so uneven
// expert sizes do not leave a core idle. With a single tile or a single thread the loop runs
// outside any parallel region and at::mm threads by itself.
//
// at::parallel_for is an OpenMP region compiled into this library: build with -fopenmp, or
// every parallel_for here runs serially (see the #warning below).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <type_traits>
#include <vector>

#include "gemm_avx512.h"
#include "host_cache.h"
#include "moe_ops.h"

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "moekit: compile with -fopenmp, otherwise at::parallel_for runs serially"
#endif

namespace moe {

namespace {

struct Tile {
  int64_t group, begin, end;  // group index and [begin, end) along the split dimension
  int64_t col0, col1;         // [col0, col1) of the output columns
};

// Reads offs_E (on the CPU: no sync) and checks it is monotone and within the rows of a.
std::vector<int64_t> read_offsets(const char* op, const at::Tensor& offs_E, int64_t rows) {
  const auto offs = offs_E.contiguous();
  const int32_t* p = offs.const_data_ptr<int32_t>();
  std::vector<int64_t> starts(offs.size(0) + 1, 0);
  for (int64_t e = 0; e < offs.size(0); ++e) {
    TORCH_CHECK(p[e] >= starts[e], "moe.", op, ": offs_E must be non-decreasing, but offs_E[", e,
                "] = ", p[e], " < ", starts[e]);
    starts[e + 1] = p[e];
  }
  TORCH_CHECK(starts.back() <= rows, "moe.", op, ": offs_E[-1] = ", starts.back(),
              " exceeds the ", rows, " rows of a_NX");
  return starts;
}

// The rows of each group (expert), from the group starts of read_offsets.
std::vector<int64_t> group_rows(const std::vector<int64_t>& starts) {
  std::vector<int64_t> rows(starts.size() - 1);
  for (size_t e = 0; e + 1 < starts.size(); ++e) rows[e] = starts[e + 1] - starts[e];
  return rows;
}

// Splits each group's extent into blocks so that there are several tiles per thread, without
// making blocks smaller than `min_block` rows (small GEMMs lose the matmul's efficiency). When
// that leaves fewer than 4 tiles per thread (few rows, e.g. decoding), output columns are split
// too, in blocks of at least `min_cols`, so that no thread waits long for the last tile (a
// Mixtral slice of 3 experts at 11-43 rows each, 2 threads: 81 / 130 / 244 -> 70 / 115 / 217 ms
// at T = 16 / 32 / 64 against splitting only below 1 tile per thread). Tiles are returned
// largest first.
std::vector<Tile> make_tiles(const std::vector<int64_t>& extent, int64_t cols, int64_t min_block,
                             int64_t min_cols = 128) {
  const int64_t threads = at::get_num_threads();
  int64_t total = 0;
  for (int64_t n : extent) total += n;
  const int64_t target = std::max<int64_t>(min_block, total / std::max<int64_t>(1, 8 * threads));
  std::vector<Tile> tiles;
  for (size_t g = 0; g < extent.size(); ++g) {
    const int64_t n = extent[g];
    if (n == 0) continue;
    const int64_t blocks = std::max<int64_t>(1, n / target);
    const int64_t step = (n + blocks - 1) / blocks;
    for (int64_t b = 0; b < n; b += step)
      tiles.push_back({int64_t(g), b, std::min(n, b + step), 0, cols});
  }
  const int64_t col_blocks = std::min<int64_t>(
      cols / min_cols, tiles.empty() ? 1 : (4 * threads + tiles.size() - 1) / tiles.size());
  if (threads > 1 && int64_t(tiles.size()) < 4 * threads && col_blocks > 1) {
    std::vector<Tile> split;
    const int64_t step = (cols + col_blocks - 1) / col_blocks;
    for (const auto& t : tiles)
      for (int64_t c = 0; c < cols; c += step)
        split.push_back({t.group, t.begin, t.end, c, std::min(cols, c + step)});
    tiles.swap(split);
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& x, const Tile& y) {
    return (x.end - x.begin) * (x.col1 - x.col0) > (y.end - y.begin) * (y.col1 - y.col0);
  });
  return tiles;
}

// fn(tile, upcoming): `upcoming` is the tile this thread will most likely take next (the head of
// the queue when it started this one; nullptr at the end), for the kernel's prefetch.
template <typename Fn>
void run_tiles(const std::vector<Tile>& tiles, const Fn& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t count = int64_t(tiles.size());
  if (tiles.size() <= 1 || threads == 1 || at::in_parallel_region()) {
    // A single tile: at::mm threads by itself; the AVX-512 kernel runs it on this thread.
    for (int64_t i = 0; i < count; ++i) fn(tiles[i], i + 1 < count ? &tiles[i + 1] : nullptr);
    return;
  }
  std::atomic<int64_t> next{0};
  // Worker threads do not inherit this thread's dispatcher state (we run below Autograd), so
  // at::mm_out there would go through autograd again: carry the state over.
  const at::ThreadLocalState state;
  at::parallel_for(0, std::min(threads, count), 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t w = begin; w < end; ++w)  // one worker per index; each drains the queue
      for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
        const int64_t head = next.load(std::memory_order_relaxed);
        fn(tiles[i], head < count ? &tiles[head] : nullptr);
      }
  });
}

// float32 and bfloat16 run on moekit's AVX-512 kernel where the CPU has it (gemm_avx512.cpp),
// one single-threaded call per tile; every other case on at::mm. float32 GEMMs narrower than
// kMinSide in X, Y or (forward) routed rows stay on at::mm: there packing does not pay off, and at::mm rounds as
// the PyTorch twin does on one thread (a handful of outputs is too few to compare the error of two
// equally accurate summation orders).
constexpr int64_t kMinSide = 64;

bool use_avx512(at::ScalarType dtype, int64_t X, int64_t Y, int64_t rows) {
  if (!avx512_gemm_available(dtype)) return false;
  return dtype != at::kFloat || (X >= kMinSide && Y >= kMinSide && rows >= kMinSide);
}
// a_NX's rows: row i is a_NX[i], or with `gather` (element offsets of the routed rows, from
// gather_offsets) the row of a that starts at gather[i]. A tile of at most kStreamRows rows (of
// kStreamRowsDeep, bfloat16, where X is deep: avx512_streams) streams its expert's weight (read
// in place by rows along Y, or along X where b_EXY is a transposed view of an (E, Y, X) weight:
// gemm_avx512.h); larger tiles pack it.
template <typename T>
void grouped_avx512(const at::Tensor& a, const int64_t* gather, const at::Tensor& b_EXY,
                    at::Tensor& c, const std::vector<int64_t>& starts, const std::vector<Tile>& tiles) {
  const T* ap = a.const_data_ptr<T>();
  const T* b = b_EXY.const_data_ptr<T>();
  T* out = c.mutable_data_ptr<T>();
  const int64_t X = a.size(1), Y = c.size(1);
  const int64_t sa0 = a.stride(0), sa1 = a.stride(1);
  const int64_t sb0 = b_EXY.stride(0), sb1 = b_EXY.stride(1), sb2 = b_EXY.stride(2);
  const bool nt = c.numel() * int64_t(sizeof(T)) >= kNtStoreBytes;
  run_tiles(tiles, [&](const Tile& t, const Tile* up) {
    const int64_t r0 = starts[t.group] + t.begin;
    NextB<T> next;
    if (up != nullptr) next = {b + up->group * sb0 + up->col0 * sb2, X, up->col1 - up->col0};
    Gather rows;
    if (gather != nullptr) rows.a_rows = gather + r0;
    avx512_gemm(t.end - t.begin, t.col1 - t.col0, X, gather ? ap : ap + r0 * sa0, sa0, sa1,
                b + t.group * sb0 + t.col0 * sb2, sb1, sb2, out + r0 * Y + t.col0, Y, next, rows,
                avx512_streams(t.end - t.begin, X, std::is_same_v<T, c10::BFloat16>), nt);
  });
}

// out[e][x, y] = sum over e's rows r of a[r, x] g[r, y], a's rows gathered as in grouped_avx512.
// Each tile is one plain GEMM (gemm_avx512.h) whose depth is the expert's n rows. out (E, X, Y)
// row-major: C = a^T g, A = a^T (packed by the kernel), M rows a slice of X, columns a slice of
// Y. With `yx` out is stored (E, Y, X) (strides X*Y, 1, X: nn.Linear's layout): C = g^T a, the
// tile's M rows a slice of Y, its columns a slice of X, B = a with its depth rows gathered. Both
// sum the same products in the same order: the values are equal bit for bit.
template <typename T>
void wgrad_avx512(const at::Tensor& a, const int64_t* gather, const at::Tensor& g_NY, bool yx,
                  at::Tensor& out, const std::vector<int64_t>& starts, const std::vector<Tile>& tiles) {
  const T* ap = a.const_data_ptr<T>();
  const T* g = g_NY.const_data_ptr<T>();
  T* dst = out.mutable_data_ptr<T>();
  const int64_t X = a.size(1), Y = g_NY.size(1);
  const int64_t sa0 = a.stride(0), sa1 = a.stride(1);
  const int64_t sg0 = g_NY.stride(0), sg1 = g_NY.stride(1);
  // The operand whose rows are read as the GEMM's A^T (packed) and the one read as B, with the
  // element offset of a row's start: a's rows through `gather` when there is one.
  const T *pa = ap, *pb = g;
  int64_t la0 = sa0, la1 = sa1, lb0 = sg0, lb1 = sg1, M = X;
  if (yx) std::swap(pa, pb), std::swap(la0, lb0), std::swap(la1, lb1), M = Y;
  const int64_t* ga = yx ? nullptr : gather;  // a^T's gathered depth (columns of A)
  const int64_t* gb = yx ? gather : nullptr;  // B's gathered depth rows
  const int64_t ldc = yx ? X : Y;
  const bool nt = out.numel() * int64_t(sizeof(T)) >= kNtStoreBytes;
  run_tiles(tiles, [&](const Tile& t, const Tile* up) {
    const int64_t r0 = starts[t.group], n = starts[t.group + 1] - r0;
    NextB<T> next;
    if (up != nullptr) {
      const int64_t u0 = starts[up->group];
      next = {(gb ? pb : pb + u0 * lb0) + up->col0 * lb1, starts[up->group + 1] - u0, up->col1 - up->col0,
              gb ? gb + u0 : nullptr};
    }
    Gather rows;
    rows.a_cols = ga ? ga + r0 : nullptr;
    rows.b_rows = gb ? gb + r0 : nullptr;
    avx512_gemm(t.end - t.begin, t.col1 - t.col0, n, (ga ? pa : pa + r0 * la0) + t.begin * la1, la1, la0,
                (gb ? pb : pb + r0 * lb0) + t.col0 * lb1, lb0, lb1,
                dst + (t.group * M + t.begin) * ldc + t.col0, ldc, next, rows, /*stream=*/false, nt);
  });
}

// Element offset in x_TD of each routed row's token, (order_N[i] / K) * x_TD.stride(0), for the
// routed rows i < `routed` (the rest are padding, never read). A routed row must name a slot.
std::vector<int64_t> gather_offsets(const char* op, const at::Tensor& order_N, int64_t K,
                                    int64_t slots, int64_t routed, int64_t ld) {
  const auto order = order_N.contiguous();
  const int64_t* ord = order.const_data_ptr<int64_t>();
  std::vector<int64_t> off(routed);
  for (int64_t i = 0; i < routed; ++i) {
    TORCH_CHECK(ord[i] >= 0 && ord[i] < slots, "moe.", op, ": order_N[", i, "] = ", ord[i],
                " is outside [0, ", slots, ") for a routed row (< offs_E[-1]): the plan does not match the data");
    off[i] = (ord[i] / K) * ld;
  }
  return off;
}

// The forward on the rows of `a`: a_NX itself (gather == nullptr), or the rows of x_TD at the
// offsets `gather` (AVX-512 dtypes only). Rows past offs_E[-1] are zero.
at::Tensor grouped_forward(const at::Tensor& a, const int64_t* gather, const at::Tensor& b_EXY,
                           const std::vector<int64_t>& starts, int64_t N) {
  const int64_t Y = b_EXY.size(2), E = b_EXY.size(0);
  auto c = empty_cpu({N, Y}, a.options());
  c.narrow(0, starts[E], N - starts[E]).zero_();  // rows past offs_E[-1] are zero, never garbage
  const auto tiles = make_tiles(group_rows(starts), Y, /*min_block=*/64);
  if (gather != nullptr || use_avx512(a.scalar_type(), a.size(1), Y, starts[E])) {
    AT_DISPATCH_SWITCH(a.scalar_type(), "moe_grouped_mm_avx512",
                       AT_DISPATCH_CASE(at::kFloat, [&] { grouped_avx512<scalar_t>(a, gather, b_EXY, c, starts, tiles); })
                       AT_DISPATCH_CASE(at::kBFloat16, [&] { grouped_avx512<scalar_t>(a, gather, b_EXY, c, starts, tiles); }));
    return c;
  }
  run_tiles(tiles, [&](const Tile& t, const Tile*) {
    const int64_t r0 = starts[t.group] + t.begin, n = t.end - t.begin, ny = t.col1 - t.col0;
    auto out = c.narrow(0, r0, n).narrow(1, t.col0, ny);
    at::mm_out(out, a.narrow(0, r0, n), b_EXY.select(0, t.group).narrow(1, t.col0, ny));
  });
  return c;
}

// The weight gradient on the rows of `a`, gathered as in grouped_forward: (E, X, Y), stored
// (E, Y, X) with `yx` (gathered a on the AVX-512 path only).
at::Tensor grouped_wgrad(const at::Tensor& a, const int64_t* gather, const at::Tensor& g_NY,
                         const std::vector<int64_t>& starts, bool yx = false) {
  const int64_t X = a.size(1), Y = g_NY.size(1), E = int64_t(starts.size()) - 1;
  auto out = yx ? empty_cpu({E, Y, X}, a.options()).transpose(1, 2) : empty_cpu({E, X, Y}, a.options());
  // Tiles split the output's rows (X, or Y with yx) so no two tiles reduce into the same element.
  std::vector<int64_t> extent(E, yx ? Y : X);
  for (int64_t e = 0; e < E; ++e) {
    if (starts[e + 1] == starts[e]) {
      out.select(0, e).zero_();  // an expert with no rows gets a zero gradient
      extent[e] = 0;
    }
  }
  const auto tiles = make_tiles(extent, yx ? X : Y, /*min_block=*/64);
  // (The GEMM depth here is each expert's rows: a few-row expert still has X x Y >= 64 x 64
  // outputs to compare.)
  if (gather != nullptr || use_avx512(a.scalar_type(), X, Y, /*rows=*/kMinSide)) {
    AT_DISPATCH_SWITCH(a.scalar_type(), "moe_grouped_mm_wgrad_avx512",
                       AT_DISPATCH_CASE(at::kFloat, [&] { wgrad_avx512<scalar_t>(a, gather, g_NY, yx, out, starts, tiles); })
                       AT_DISPATCH_CASE(at::kBFloat16, [&] { wgrad_avx512<scalar_t>(a, gather, g_NY, yx, out, starts, tiles); }));
    return out;
  }
  TORCH_INTERNAL_ASSERT(!yx, "moe.grouped_wgrad: the (E, Y, X) layout is on the AVX-512 path only");
  run_tiles(tiles, [&](const Tile& t, const Tile*) {
    const int64_t r0 = starts[t.group], n = starts[t.group + 1] - r0, x0 = t.begin;
    const int64_t ny = t.col1 - t.col0;
    auto dst = out.select(0, t.group).narrow(0, x0, t.end - x0).narrow(1, t.col0, ny);
    at::mm_out(dst, a.narrow(0, r0, n).narrow(1, x0, t.end - x0).t(),
               g_NY.narrow(0, r0, n).narrow(1, t.col0, ny));
  });
  return out;
}

}  // namespace

at::Tensor grouped_mm_cpu(const at::Tensor& a_NX, const at::Tensor& b_EXY,
                          const at::Tensor& offs_E) {
  check_grouped_mm_args(a_NX, b_EXY, offs_E);
  const int64_t N = a_NX.size(0);
  return grouped_forward(a_NX, nullptr, b_EXY, read_offsets("grouped_mm", offs_E, N), N);
}

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& a_NX, const at::Tensor& g_NY,
                                const at::Tensor& offs_E) {
  check_grouped_mm_wgrad_args(a_NX, g_NY, offs_E);
  return grouped_wgrad(a_NX, nullptr, g_NY, read_offsets("grouped_mm_wgrad", offs_E, a_NX.size(0)));
}

// The gathered forms: the same GEMMs on permute(x_TD), with each routed row read from x_TD where
// it is (no T*K x X copy). On the AVX-512 path the result is the same, bit for bit, as the
// GEMM on the permuted copy (the same words in the same order); elsewhere it is that composite.
at::Tensor gather_grouped_mm_cpu(const at::Tensor& x_TD, const at::Tensor& order_N,
                                 const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                 const at::Tensor& offs_E) {
  check_gather_grouped_mm_args(x_TD, order_N, rows_TK, b_EXY, offs_E);
  const int64_t N = order_N.size(0), E = b_EXY.size(0);
  const auto starts = read_offsets("gather_grouped_mm", offs_E, N);
  if (!use_avx512(x_TD.scalar_type(), x_TD.size(1), b_EXY.size(2), starts[E]))
    return grouped_mm_cpu(permute_cpu(x_TD, order_N, rows_TK, std::nullopt), b_EXY, offs_E);
  const auto x = x_TD.stride(1) == 1 ? x_TD : x_TD.contiguous();
  const auto off = gather_offsets("gather_grouped_mm", order_N, rows_TK.size(1), rows_TK.numel(),
                                  starts[E], x.stride(0));
  return grouped_forward(x, off.data(), b_EXY, starts, N);
}

// The gathered first projection and SwiGLU in one op: these two kernels (the same bits as calling
// them in turn); h_NH comes back for the backward when keep_h, else an empty (0, 2F).
std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_swiglu_cpu(const at::Tensor& x_TD, const at::Tensor& order_N,
                                                                const at::Tensor& rows_TK, const at::Tensor& b_EXY,
                                                                const at::Tensor& offs_E, bool keep_h) {
  check_gather_grouped_mm_swiglu_args(x_TD, order_N, rows_TK, b_EXY, offs_E);
  at::Tensor h = gather_grouped_mm_cpu(x_TD, order_N, rows_TK, b_EXY, offs_E);
  at::Tensor a = swiglu_cpu(h);
  return {a, keep_h ? h : h.new_empty({0, h.size(1)})};
}

// out_yx: the same (E, X, Y) values stored (E, Y, X), computed as g^T x (see wgrad_avx512).
at::Tensor gather_grouped_mm_wgrad_cpu(const at::Tensor& x_TD, const at::Tensor& order_N,
                                       const at::Tensor& rows_TK, const at::Tensor& g_NY,
                                       const at::Tensor& offs_E, bool out_yx) {
  check_gather_grouped_mm_wgrad_args(x_TD, order_N, rows_TK, g_NY, offs_E);
  const int64_t E = offs_E.size(0);
  const auto starts = read_offsets("gather_grouped_mm_wgrad", offs_E, order_N.size(0));
  if (!use_avx512(x_TD.scalar_type(), x_TD.size(1), g_NY.size(1), /*rows=*/kMinSide)) {
    const auto x_ND = permute_cpu(x_TD, order_N, rows_TK, std::nullopt);
    return out_yx ? grouped_mm_wgrad_cpu(g_NY, x_ND, offs_E).transpose(1, 2)
                  : grouped_mm_wgrad_cpu(x_ND, g_NY, offs_E);
  }
  const auto x = x_TD.stride(1) == 1 ? x_TD : x_TD.contiguous();
  const auto off = gather_offsets("gather_grouped_mm_wgrad", order_N, rows_TK.size(1),
                                  rows_TK.numel(), starts[E], x.stride(0));
  return grouped_wgrad(x, off.data(), g_NY, starts, out_yx);
}

// The backward ops: the two gradients of grouped_mm / gather_grouped_mm in one op, the same kernels
// (and bits) as the autograd formulas' former pair of calls. d b comes in b's layout: an
// nn.Linear-style b (a transposed (E, Y, X) view) gets grouped_mm_wgrad(grad, a) transposed.
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad_NY, const at::Tensor& a_NX,
                                                           const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                                           bool grad_a, bool grad_b) {
  check_grouped_mm_backward_args(grad_NY, a_NX, b_EXY, offs_E);
  const int64_t X = a_NX.size(1), Y = b_EXY.size(2);
  at::Tensor d_a = grad_a ? grouped_mm_cpu(grad_NY, b_EXY.transpose(1, 2), offs_E) : a_NX.new_empty({0, X});
  at::Tensor d_b = !grad_b ? b_EXY.new_empty({0, X, Y})
                   : is_yx_layout(b_EXY) ? grouped_mm_wgrad_cpu(grad_NY, a_NX, offs_E).transpose(1, 2)
                                         : grouped_mm_wgrad_cpu(a_NX, grad_NY, offs_E);
  return {d_a, d_b};
}

// d x_TD sums each token's rows of grad_NY @ b_e^T (unpermute); d b is gather_grouped_mm_wgrad.
std::tuple<at::Tensor, at::Tensor> gather_grouped_mm_backward_cpu(const at::Tensor& grad_NY, const at::Tensor& x_TD,
                                                                  const at::Tensor& order_N, const at::Tensor& rows_TK,
                                                                  const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                                                  bool grad_x, bool grad_b) {
  check_gather_grouped_mm_backward_args(grad_NY, x_TD, order_N, rows_TK, b_EXY, offs_E);
  const int64_t D = x_TD.size(1), Y = b_EXY.size(2);
  at::Tensor d_x = grad_x ? unpermute_cpu(grouped_mm_cpu(grad_NY, b_EXY.transpose(1, 2), offs_E), order_N, rows_TK,
                                          std::nullopt)
                          : x_TD.new_empty({0, D});
  at::Tensor d_b = grad_b ? gather_grouped_mm_wgrad_cpu(x_TD, order_N, rows_TK, grad_NY, offs_E, is_yx_layout(b_EXY))
                          : b_EXY.new_empty({0, D, Y});
  return {d_x, d_b};
}


// ---- grouped_mm_unpermute: the down projection and the weighted combine in one op ---------------
//
// Forward: unpermute(grouped_mm(a, b), weights), the two kernels (the same bits as calling them).
// Backward (SonicMoE, Guo et al. 2025, Sec. 3.2): with g_i = grad_TD[token(i)] @ b_e^T (the gathered
// data-gradient GEMM, read through the plan: no T*K x Y copy), d a_i = w_i g_i, d w_i = <a_i, g_i>
// (= <grad_t, a_i @ b_e>, the unpermute's formula, without the (N, Y) product y_ND: nothing of size
// T*K x Y is saved or written) and d b_e = sum over e's rows of (w_i a_i)^T grad_t (the gathered
// weight gradient on the scaled rows). On the AVX-512 path g_i is formed tile by tile in float32
// (for bfloat16 one rounding of d a) and consumed while in cache, never written whole; else it is
// the GEMM's output in the accumulation dtype.

at::Tensor grouped_mm_unpermute_cpu(const at::Tensor& a_NX, const at::Tensor& b_EXY, const at::Tensor& offs_E,
                                    const at::Tensor& order_N, const at::Tensor& rows_TK,
                                    const std::optional<at::Tensor>& weights_TK, bool swiglu) {
  check_grouped_mm_unpermute_args(a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK, swiglu);
  const at::Tensor a = swiglu ? swiglu_cpu(a_NX) : a_NX;
  return unpermute_cpu(grouped_mm_cpu(a, b_EXY, offs_E), order_N, rows_TK, weights_TK);
}

namespace {

// The backward's rows, i in [i0, i1) (slot s = order_N[i], g_i = grad_TD[token(i)] @ b_e^T, row i of
// g at g + (i - i0) * X): with a_i the GEMM's A row (a's row, or with `swiglu` silu(gate) * up of
// h = a's row, recomputed by the swiglu kernel's row function: the forward's bits), aw[i] = w_s a_i,
// d_w[s] = <a_i, g_i> (summed in double, four running sums over the columns by x % 4, added in one
// fixed order: the same bits whatever the tiling) and d_a[i] = w_s g_i (with `swiglu`, rounded, then
// swiglu_backward's row function: d h as the two ops would give it for that d a). g may be null (aw
// alone).
template <typename T, typename Acc>
struct UnpermuteRows {
  const T* a;  // rows of X values, or of h = [gate; up] (2X, unit stride) with swiglu
  int64_t sa0, sa1, X;
  bool swiglu;
  const int64_t* ord;
  const Acc* w;  // per slot, null without weights
  T* d_a;        // (N, a's width); null where not asked for (likewise d_w, aw)
  Acc* d_w;
  T* aw;

  void operator()(const Acc* g, int64_t i0, int64_t i1) const {
    const int64_t H = swiglu ? 2 * X : X;
    thread_local std::vector<T> act, d_act;  // with swiglu: a_i and the rounded w_s g_i
    if (swiglu) act.resize(X), d_act.resize(X);
    for (int64_t i = i0; i < i1; ++i) {
      const Acc wi = w ? w[ord[i]] : Acc(1);
      const T* ai = a + i * sa0;
      int64_t step = sa1;
      if (swiglu) {
        swiglu_row(ai, ai + X, act.data(), X);
        ai = act.data(), step = 1;
      }
      if (aw)
        for (int64_t x = 0; x < X; ++x) aw[i * X + x] = static_cast<T>(wi * static_cast<Acc>(ai[x * step]));
      if (g == nullptr) continue;
      const Acc* gi = g + (i - i0) * X;
      T* da = d_a == nullptr ? nullptr : swiglu ? d_act.data() : d_a + i * H;
      double dot[4] = {0, 0, 0, 0};
      for (int64_t x = 0; x < X; ++x) {
        dot[x % 4] += static_cast<double>(ai[x * step]) * static_cast<double>(gi[x]);
        if (da) da[x] = static_cast<T>(wi * gi[x]);
      }
      if (d_w) d_w[ord[i]] = static_cast<Acc>((dot[0] + dot[1]) + (dot[2] + dot[3]));
      if (da && swiglu) {
        const T* h = a + i * sa0;
        swiglu_backward_row(da, h, h + X, d_a + i * H, d_a + i * H + X, X);
      }
    }
  }
};

// The AVX-512 path: each tile (an expert's row block, all X columns: the dot products need whole
// rows) computes its rows of g in float32 (for bfloat16, the kernel's unrounded sums: one rounding
// of d a) into this thread's scratch, then runs the rows' epilogue on them while they are in cache;
// no (N, X) g is written. grad's rows are gathered through `off` (gather_offsets).
template <typename T>
void unpermute_dgrad_tiles(const at::Tensor& grad, const std::vector<int64_t>& off, const at::Tensor& b_EXY,
                           const std::vector<int64_t>& starts, const UnpermuteRows<T, float>& rows) {
  const int64_t X = b_EXY.size(1), Y = b_EXY.size(2);
  const auto tiles = make_tiles(group_rows(starts), X, /*min_block=*/64, /*min_cols=*/X + 1);  // never split X
  const int64_t sb0 = b_EXY.stride(0), sb1 = b_EXY.stride(1), sb2 = b_EXY.stride(2);
  const T* gp = grad.const_data_ptr<T>();
  const T* b = b_EXY.const_data_ptr<T>();
  run_tiles(tiles, [&](const Tile& t, const Tile*) {
    thread_local std::vector<float> scratch;
    const int64_t r0 = starts[t.group] + t.begin, m = t.end - t.begin;
    scratch.resize(m * X);
    Gather g_rows;
    g_rows.a_rows = off.data() + r0;
    // B (depth Y, column x) = b[e, x, y]: b_e^T read in place
    if constexpr (std::is_same_v<T, float>)
      avx512_gemm(m, X, Y, gp, grad.stride(0), 1, b + t.group * sb0, sb2, sb1, scratch.data(), X, NextB<float>{},
                  g_rows);
    else
      avx512_gemm(m, X, Y, gp, grad.stride(0), 1, b + t.group * sb0, sb2, sb1, scratch.data(), X, g_rows);
    rows(scratch.data(), r0, r0 + m);
  });
}

// unpermute_dgrad_tiles where the AVX-512 kernel has the dtype (float32, bfloat16): true when it ran.
template <typename T, typename Acc>
bool unpermute_dgrad_avx512(const at::Tensor& grad, const std::vector<int64_t>& off, const at::Tensor& b_EXY,
                            const std::vector<int64_t>& starts, const UnpermuteRows<T, Acc>& rows) {
  if constexpr (std::is_same_v<Acc, float> && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>)) {
    unpermute_dgrad_tiles<T>(grad, off, b_EXY, starts, rows);
    return true;
  }
  return false;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_unpermute_backward_cpu(
    const at::Tensor& grad_TD, const at::Tensor& a_NX, const at::Tensor& b_EXY, const at::Tensor& offs_E,
    const at::Tensor& order_N, const at::Tensor& rows_TK, const std::optional<at::Tensor>& weights_TK,
    bool grad_a, bool grad_b, bool grad_weights, bool swiglu) {
  check_grouped_mm_unpermute_backward_args(grad_TD, a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK, swiglu);
  const int64_t N = a_NX.size(0), H = a_NX.size(1), X = b_EXY.size(1), Y = b_EXY.size(2), E = b_EXY.size(0);
  const int64_t T = rows_TK.size(0), K = rows_TK.size(1);
  const auto acc = accum_dtype(a_NX.scalar_type());
  const bool weighted = weights_TK.has_value();
  grad_weights = grad_weights && weighted;
  const auto starts = read_offsets("grouped_mm_unpermute_backward", offs_E, N);
  const int64_t routed = starts[E];
  auto rows_of = [&](bool want, int64_t width) {  // (N, width), the padding rows past offs_E[-1] zero
    if (!want) return a_NX.new_empty({0, width});
    auto t = empty_cpu({N, width}, a_NX.options());
    t.narrow(0, routed, N - routed).zero_();
    return t;
  };
  at::Tensor d_a = rows_of(grad_a, H);
  at::Tensor d_w = at::zeros({grad_weights ? T : 0, K}, a_NX.options().dtype(acc));
  // the weight gradient's rows w a (a itself without weights and SwiGLU)
  at::Tensor aw = grad_b && (weighted || swiglu) ? rows_of(true, X) : at::Tensor();
  const auto a_rows = swiglu && a_NX.stride(1) != 1 ? a_NX.contiguous() : a_NX;
  const auto grad = grad_TD.stride(1) == 1 ? grad_TD : grad_TD.contiguous();
  const auto off = gather_offsets("grouped_mm_unpermute_backward", order_N, K, rows_TK.numel(), routed,
                                  grad.stride(0));
  if (grad_a || grad_weights || aw.defined()) {
    const auto order = order_N.contiguous();
    const auto w = weighted ? weights_TK->to(acc).contiguous() : at::Tensor();
    const bool need_g = grad_a || grad_weights;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a_NX.scalar_type(), "moe_grouped_mm_unpermute_rows", [&] {
      using Acc = at::opmath_type<scalar_t>;
      const UnpermuteRows<scalar_t, Acc> rows{
          a_rows.const_data_ptr<scalar_t>(), a_rows.stride(0), a_rows.stride(1), X, swiglu, order.const_data_ptr<int64_t>(),
          weighted ? w.const_data_ptr<Acc>() : nullptr, grad_a ? d_a.mutable_data_ptr<scalar_t>() : nullptr,
          grad_weights ? d_w.mutable_data_ptr<Acc>() : nullptr, aw.defined() ? aw.mutable_data_ptr<scalar_t>() : nullptr};
      if (need_g && use_avx512(a_NX.scalar_type(), Y, X, routed) &&
          unpermute_dgrad_avx512(grad, off, b_EXY, starts, rows))
        return;
      // else g = the gathered GEMM's output (at::mm's path) in Acc, then the rows' pass
      const auto g = need_g ? gather_grouped_mm_cpu(grad, order_N, rows_TK, b_EXY.transpose(1, 2), offs_E).to(acc)
                            : at::Tensor();
      const Acc* gp = need_g ? g.const_data_ptr<Acc>() : nullptr;
      at::parallel_for(0, routed, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, X)), [&](int64_t i0, int64_t i1) {
        rows(gp ? gp + i0 * X : nullptr, i0, i1);
      });
    });
  }
  at::Tensor d_b = !grad_b ? b_EXY.new_empty({0, X, Y})
                   : gather_grouped_mm_wgrad_cpu(grad, order_N, rows_TK, aw.defined() ? aw : a_NX, offs_E,
                                                 !is_yx_layout(b_EXY)).transpose(1, 2);
  return {d_a, d_b, d_w};
}

}  // namespace moe
