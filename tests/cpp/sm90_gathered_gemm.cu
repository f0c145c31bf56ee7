// Host-side check of the layout claims of moekit's gathered sm90 GEMM (csrc/cuda/sm90/
// gathered_gemm.cuh), run on the CPU by tests/ops/test_sm90_gathered_gemm.py (nvcc, CUTLASS's headers):
//   - for tiles 128 and 256 columns wide, B's shared-memory layout, as wgmma reads it, is the order
//     in which the TMA box writes it (64-column blocks in turn: [block][depth][column] for row-major
//     b, [block][column][depth] for b_col) under the 128-byte swizzle; A's is its rows of 64 depth
//     values in that swizzle (cp.async writes through it);
//   - in the m64nNk16 accumulators of each of the 256 consumer threads, v and v + N / 4 are the same
//     row's tile columns c and c + N / 2 (c < N / 2: with SwiGLU a gate column and its up column),
//     v + 1 is column c + 1 (v even), and the row lies in the thread's warp group's 64; a thread's
//     accumulators hold two rows, coord(0)'s where (v / 2) % 2 == 0, else coord(2)'s (the
//     token-major epilogue reads each row's slot once);
//   - the weight gradient's layouts (WgradLayouts, written by cp.async in 16-byte chunks of 8
//     consecutive columns at one depth) keep each chunk contiguous and 16-byte aligned, and cover
//     every element of a stage once; its accumulators pair as above;
//   - the tiles (tile_of) cover every (routed row, column block) exactly once over random routings
//     (empty experts, padding rows, rows not a multiple of kTM), each real tile inside its expert's
//     rows and each padding tile inside [offs_E[E-1], N).
// Prints the number of mismatches and exits 1 if there are any.
#include <cstdio>
#include <vector>

#include "cuda/sm90/gathered_gemm.cuh"

using namespace cute;
using namespace moe::cuda::sm90::gathered;

namespace {

// The element offset of pre-swizzle element offset `pre` in a 1024-byte-aligned bf16 buffer under
// the 128-byte swizzle: chunk (byte bits 4-6) ^= row (byte bits 7-9).
int swizzled(int pre) {
  int byte = pre * 2;
  byte ^= ((byte >> 7) & 7) << 4;
  return byte / 2;
}

alignas(1024) bf16 buffer[8 * 256 * kTK];  // room for any stage count and tile here

template <class Layout>
int offset(int i, int j, int s) {
  auto t = make_tensor(make_smem_ptr(buffer), Layout{});
  return int(&t(i, j, s) - buffer);
}

// The accumulator pairing of a 2 x m64nNk16 tiled MMA, for each of the 256 consumer threads: v and
// v + N / 4 (v < N / 4) are one row's columns c < N / 2 and c + N / 2, v + 1 is c + 1 (v even), and
// the row lies in the thread's warp group's 64; coord(v)'s row is coord(0)'s where (v / 2) % 2 == 0, else
// coord(2)'s (another row).
template <class Mma, int N>
int check_accumulators() {
  int bad = 0;
  Mma mma;
  for (int t = 0; t < kConsumers; ++t) {
    auto coord = mma.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<kTM>, Int<N>>{}));
    bad += int(size(coord)) != N / 2;
    for (int v = 0; v < N / 4; ++v) {
      const int row = get<0>(coord(v)), col = get<1>(coord(v));
      bad += col >= N / 2 || get<0>(coord(v + N / 4)) != row || get<1>(coord(v + N / 4)) != col + N / 2;
      bad += row / 64 != t / 128;
      if (v % 2 == 0) bad += get<0>(coord(v + 1)) != row || get<1>(coord(v + 1)) != col + 1 || col % 2 != 0;
    }
    for (int v = 0; v < N / 2; ++v)  // two rows a thread: coord(0)'s where (v / 2) % 2 == 0, else coord(2)'s
      bad += get<0>(coord(v)) != get<0>(coord((v / 2) % 2 == 0 ? 0 : 2)) || get<0>(coord(0)) == get<0>(coord(2));
  }
  return bad;
}

// The forward's layouts for tiles TN wide: A's rows of 64 depth values in the swizzle (cp.async
// writes through it); B's in the TMA box's fill order, 64-column blocks in turn ([block][depth]
// [column] for row-major b, [block][column][depth] for b_col; with SwiGLU the gate's blocks, then
// the up blocks).
template <bool B_COL, int TN>
int check() {
  using L = Layouts<B_COL, TN>;
  int bad = 0;
  for (int s = 0; s < L::kStages; ++s)
    for (int k = 0; k < kTK; ++k) {
      for (int r = 0; r < kTM; ++r)
        bad += offset<typename L::LayoutA>(r, k, s) != s * kTM * kTK + swizzled(r * kTK + k);
      for (int n = 0; n < TN; ++n) {
        const int block = n / kBlock, c = n % kBlock;
        const int pre = B_COL ? block * kBlock * kTK + c * kTK + k : block * kTK * kBlock + k * kBlock + c;
        bad += offset<typename L::LayoutB>(n, k, s) != s * TN * kTK + swizzled(pre);
      }
    }
  return bad + check_accumulators<typename L::Mma, TN>();
}

// A cp.async-written operand layout (rows x depth x stage): each 16-byte chunk (8 consecutive rows
// at one depth) is contiguous and aligned, and the stage's elements are a permutation of its slots.
template <class Layout, int ROWS>
int check_chunks() {
  int bad = 0;
  for (int s = 0; s < WgradLayouts::kStages; ++s) {
    std::vector<int> seen(ROWS * kTK, 0);
    for (int k = 0; k < kTK; ++k)
      for (int m = 0; m < ROWS; ++m) {
        const int at = offset<Layout>(m, k, s) - s * ROWS * kTK;
        bad += at < 0 || at >= ROWS * kTK || (m % 8 != 0 ? at != offset<Layout>(m - m % 8, k, s) - s * ROWS * kTK + m % 8
                                                        : at % 8 != 0);
        if (at >= 0 && at < ROWS * kTK) ++seen[at];
      }
    for (int c : seen) bad += c != 1;
  }
  return bad;
}

int check_wgrad() {
  return check_chunks<WgradLayouts::LayoutA, kTM>() + check_chunks<WgradLayouts::LayoutB, kWgradN>() +
         check_accumulators<WgradLayouts::Mma, kWgradN>();
}

// The routings: E experts with random counts (a third of them empty), N = their sum + padding.
int check_tiles() {
  int bad = 0;
  unsigned seed = 12345;
  auto next = [&seed](int n) { seed = seed * 1664525u + 1013904223u; return int((seed >> 8) % unsigned(n)); };
  for (int trial = 0; trial < 300; ++trial) {
    const int E = 1 + next(trial % 3 == 0 ? 300 : 12), col_blocks = 1 + next(4);
    std::vector<int> offs(E), tiles(E + 1, 0);
    int end = 0;
    for (int e = 0; e < E; ++e) {
      end += next(3) == 0 ? 0 : next(trial % 2 ? 40 : 700);
      offs[e] = end;
    }
    const int N = end + (trial % 4 == 0 ? next(400) : 0);
    for (int e = 0; e < E; ++e) {
      int lo, hi;
      expert_rows(offs.data(), N, e, lo, hi);
      tiles[e + 1] = tiles[e] + row_blocks(hi - lo);
    }
    const int blocks = tiles[E] + row_blocks(N - end);
    std::vector<int> seen(size_t(N) * col_blocks, 0);
    for (int t = 0; t < blocks * col_blocks; ++t) {
      const OutputTile tl = tile_of(tiles.data(), offs.data(), E, N, end, col_blocks, t);
      int lo = end, hi = N;
      if (tl.e >= 0) expert_rows(offs.data(), N, tl.e, lo, hi);
      bad += tl.rows < 1 || tl.rows > kTM || tl.row0 < lo || tl.row0 + tl.rows > hi || tl.cb < 0 ||
             tl.cb >= col_blocks;
      for (int r = tl.row0; r < tl.row0 + tl.rows && r >= 0 && r < N && tl.cb >= 0 && tl.cb < col_blocks; ++r)
        ++seen[size_t(r) * col_blocks + tl.cb];
    }
    for (int c : seen) bad += c != 1;
  }
  return bad;
}

}  // namespace

int main() {
  const int row_major = check<false, 128>() + check<false, 256>(), col_major = check<true, 128>() + check<true, 256>();
  const int wgrad = check_wgrad(), tiles = check_tiles();
  std::printf("mismatches: row-major b %d, b_col %d, wgrad %d, tiles %d\n", row_major, col_major, wgrad, tiles);
  return row_major + col_major + wgrad + tiles == 0 ? 0 : 1;
}
