// The configuration tables of moekit's sm90 grouped GEMM and the choice among their entries, from
// host-known sizes only (no CUTLASS kernels in this unit).
#include "grouped_gemm_sm90.h"

namespace moe::cuda::sm90 {

namespace {

struct Entry {
  Config config;
  size_t (*workspace)(const GroupedGemm&);
  const char* (*run)(const GroupedGemm&, void*, cudaStream_t);
};

// Names: CUTLASS's tile M x N x K (the problem's rows x Y x X, grouped_gemm_sm90.h); pp =
// ping-pong (two consumer warp groups on alternate tiles, so one's epilogue overlaps the other's
// MMAs), co = cooperative (both on one tile); c2 = a cluster of 2 CTAs along CUTLASS's M sharing
// each B tile by TMA multicast (each group's row tiles round up to 2), c1 = no cluster.
const Entry kForward[] = {
    {{"64x128x128_pp_c2", 64, 128, 128}, forward_workspace<0>, forward_run<0>},
    {{"128x256x64_co_c2", 128, 256, 64}, forward_workspace<1>, forward_run<1>},
    {{"128x128x64_co_c2", 128, 128, 64}, forward_workspace<2>, forward_run<2>},
    {{"256x128x64_co_c1", 256, 128, 64}, forward_workspace<3>, forward_run<3>},
    {{"128x256x64_co_c1", 128, 256, 64}, forward_workspace<4>, forward_run<4>},
    {{"64x256x64_pp_c1", 64, 256, 64}, forward_workspace<5>, forward_run<5>},
};
const Entry kWgrad[] = {
    {{"128x256x64_co_c2", 128, 256, 64}, wgrad_workspace<0>, wgrad_run<0>},
    {{"128x128x64_pp_c1", 128, 128, 64}, wgrad_workspace<1>, wgrad_run<1>},
    {{"64x256x64_pp_c1", 64, 256, 64}, wgrad_workspace<2>, wgrad_run<2>},
};
constexpr int kNumForward = sizeof(kForward) / sizeof(kForward[0]);
constexpr int kNumWgrad = sizeof(kWgrad) / sizeof(kWgrad[0]);

const Entry* entry(bool wgrad, int id) {
  if (id < 0 || id >= (wgrad ? kNumWgrad : kNumForward)) return nullptr;
  return wgrad ? &kWgrad[id] : &kForward[id];
}

}  // namespace

int num_configs(bool wgrad) { return wgrad ? kNumWgrad : kNumForward; }

Config config(bool wgrad, int id) {
  const Entry* e = entry(wgrad, id);
  return e ? e->config : Config{"invalid", 0, 0, 0};
}

// Chosen from the H200 sweep of bench/gpu_gemm_sweep.py (bench/RESULTS_H200.md, session 5): the
// 64 x 256 ping-pong tile without a cluster wins up to about a thousand rows per expert (one
// 64-row strip at a time keeps partial tiles cheap, and one warp group's epilogue hides behind
// the other's MMAs); cooperative 128 x 256 tiles win once there are thousands of rows per expert
// to fill them, and with the 2-CTA cluster where many rows meet narrow outputs. The weight
// gradient's depth (CUTLASS's K) is each expert's rows: ping-pong 128 x 128 where those are many
// and the total small, else cooperative 128 x 256.
int choose_config(bool wgrad, int64_t N, int64_t E, int64_t X, int64_t Y) {
  (void)X;
  const int64_t rows = E > 0 ? N / E : N;  // mean rows per expert (host bound)
  if (wgrad) return rows >= 256 && N <= 16384 ? 1 : 0;
  if (rows >= 2048) return 4;
  if (N > 65536 && Y <= 1024) return 1;
  return 5;
}

size_t workspace_bytes(const GroupedGemm& g, int id) {
  const Entry* e = entry(g.wgrad, id);
  return e ? e->workspace(g) : 0;
}

const char* run(const GroupedGemm& g, int id, void* workspace, cudaStream_t stream) {
  const Entry* e = entry(g.wgrad, id);
  if (e == nullptr) return "moe.grouped_mm (sm90): config id out of range";
  return e->run(g, workspace, stream);
}

}  // namespace moe::cuda::sm90
