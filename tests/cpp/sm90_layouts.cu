// Host-side check of the layout claims of moekit's fused sm90 kernel (csrc/cuda/sm90/
// gather_swiglu.cuh), run on the CPU by tests/ops/test_sm90_layouts.py (nvcc, CUTLASS's headers):
//   - B's shared-memory layout, as wgmma reads it, is the order in which the TMA box writes it
//     ([half][depth][column] for row-major b, [half][column][depth] for b_col) under the 128-byte
//     swizzle; A's is its rows of 64 depth values in that swizzle (cp.async writes through it);
//   - in the m64n128k16 accumulators of each of the 256 consumer threads, v and v + 32 are the same
//     row's gate column c and up column c + 64 (c < 64), v + 1 is column c + 1 (v even), and the
//     row lies in the thread's warp group's 64.
// Prints the number of mismatches and exits 1 if there are any.
#include <cstdio>

#include "cuda/sm90/gather_swiglu.cuh"

using namespace cute;
using namespace moe::cuda::sm90::fused_swiglu;

namespace {

// The element offset of pre-swizzle element offset `pre` in a 1024-byte-aligned bf16 buffer under
// the 128-byte swizzle: chunk (byte bits 4-6) ^= row (byte bits 7-9).
int swizzled(int pre) {
  int byte = pre * 2;
  byte ^= ((byte >> 7) & 7) << 4;
  return byte / 2;
}

alignas(1024) bf16 buffer[kStages * kTN * kTK];

template <class Layout>
int offset(int i, int j, int s) {
  auto t = make_tensor(make_smem_ptr(buffer), Layout{});
  return int(&t(i, j, s) - buffer);
}

template <bool B_COL>
int check() {
  using L = Layouts<B_COL>;
  int bad = 0;
  for (int s = 0; s < kStages; ++s)
    for (int k = 0; k < kTK; ++k) {
      for (int r = 0; r < kTM; ++r)
        bad += offset<typename L::LayoutA>(r, k, s) != s * kTM * kTK + swizzled(r * kTK + k);
      for (int n = 0; n < kTN; ++n) {
        const int half = n / kTF, c = n % kTF;
        const int pre = B_COL ? half * kTF * kTK + c * kTK + k : half * kTK * kTF + k * kTF + c;
        bad += offset<typename L::LayoutB>(n, k, s) != s * kTN * kTK + swizzled(pre);
      }
    }
  typename L::Mma mma;
  for (int t = 0; t < kConsumers; ++t) {
    auto coord = mma.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<kTM>, Int<kTN>>{}));
    bad += int(size(coord)) != 64;
    for (int v = 0; v < 32; ++v) {
      const int row = get<0>(coord(v)), col = get<1>(coord(v));
      bad += col >= kTF || get<0>(coord(v + 32)) != row || get<1>(coord(v + 32)) != col + kTF;
      bad += row / 64 != t / 128;
      if (v % 2 == 0) bad += get<0>(coord(v + 1)) != row || get<1>(coord(v + 1)) != col + 1 || col % 2 != 0;
    }
  }
  return bad;
}

}  // namespace

int main() {
  const int row_major = check<false>(), col_major = check<true>();
  std::printf("mismatches: row-major b %d, b_col %d\n", row_major, col_major);
  return row_major + col_major == 0 ? 0 : 1;
}
