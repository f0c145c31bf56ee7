// moe.grouped_mm and moe.grouped_mm_wgrad on the CPU.
//
// Each expert's rows form one GEMM; the work is cut into (expert, row block) tiles so that many
// small experts (E=128, F=224) still keep every core busy, and each tile calls at::mm_out, the
// optimized (oneDNN/MKL) matmul. Inside at::parallel_for each mm runs single-threaded; one large
// expert (or a single group) is left to at::mm's own threading instead.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "moe_ops.h"

namespace moe {

namespace {

struct Tile {
  int64_t group, begin, end;  // group index and [begin, end) along the split dimension
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

// Splits each group's extent into blocks so that there are several tiles per thread, without
// making blocks smaller than `min_block` (small GEMMs lose the matmul's efficiency).
std::vector<Tile> make_tiles(const std::vector<int64_t>& extent, int64_t min_block) {
  const int64_t threads = at::get_num_threads();
  int64_t total = 0;
  for (int64_t n : extent) total += n;
  const int64_t target = std::max<int64_t>(min_block, total / std::max<int64_t>(1, 4 * threads));
  std::vector<Tile> tiles;
  for (size_t g = 0; g < extent.size(); ++g) {
    const int64_t n = extent[g];
    if (n == 0) continue;
    const int64_t blocks = std::max<int64_t>(1, n / target);
    const int64_t step = (n + blocks - 1) / blocks;
    for (int64_t b = 0; b < n; b += step) tiles.push_back({int64_t(g), b, std::min(n, b + step)});
  }
  return tiles;
}

void run_tiles(const std::vector<Tile>& tiles, const std::function<void(const Tile&)>& fn) {
  if (tiles.size() <= 1 || at::get_num_threads() == 1) {
    for (const auto& t : tiles) fn(t);  // a single tile keeps at::mm's own threading
    return;
  }
  at::parallel_for(0, int64_t(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(tiles[i]);
  });
}

}  // namespace

at::Tensor grouped_mm_cpu(const at::Tensor& a_NX, const at::Tensor& b_EXY,
                          const at::Tensor& offs_E) {
  check_grouped_mm_args(a_NX, b_EXY, offs_E);
  const int64_t N = a_NX.size(0), Y = b_EXY.size(2), E = b_EXY.size(0);
  const auto starts = read_offsets("grouped_mm", offs_E, N);
  auto c = at::empty({N, Y}, a_NX.options());
  c.narrow(0, starts[E], N - starts[E]).zero_();  // rows past offs_E[-1] are zero, never garbage
  std::vector<int64_t> rows(E);
  for (int64_t e = 0; e < E; ++e) rows[e] = starts[e + 1] - starts[e];
  const auto tiles = make_tiles(rows, /*min_block=*/64);
  run_tiles(tiles, [&](const Tile& t) {
    const int64_t r0 = starts[t.group] + t.begin, n = t.end - t.begin;
    auto out = c.narrow(0, r0, n);
    at::mm_out(out, a_NX.narrow(0, r0, n), b_EXY.select(0, t.group));
  });
  return c;
}

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& a_NX, const at::Tensor& g_NY,
                                const at::Tensor& offs_E) {
  check_grouped_mm_wgrad_args(a_NX, g_NY, offs_E);
  const int64_t N = a_NX.size(0), X = a_NX.size(1), Y = g_NY.size(1), E = offs_E.size(0);
  const auto starts = read_offsets("grouped_mm_wgrad", offs_E, N);
  auto out = at::empty({E, X, Y}, a_NX.options());
  // Tiles split X (the output's rows) so no two tiles reduce into the same output element.
  std::vector<int64_t> extent(E, X);
  for (int64_t e = 0; e < E; ++e) {
    if (starts[e + 1] == starts[e]) {
      out.select(0, e).zero_();  // an expert with no rows gets a zero gradient
      extent[e] = 0;
    }
  }
  const auto tiles = make_tiles(extent, /*min_block=*/64);
  run_tiles(tiles, [&](const Tile& t) {
    const int64_t r0 = starts[t.group], n = starts[t.group + 1] - r0, x0 = t.begin;
    auto dst = out.select(0, t.group).narrow(0, x0, t.end - x0);
    at::mm_out(dst, a_NX.narrow(0, r0, n).narrow(1, x0, t.end - x0).t(), g_NY.narrow(0, r0, n));
  });
  return out;
}

}  // namespace moe
