// moe.topk_route / moe.topk_route_backward on CUDA: a token-choice router in one kernel each way,
// one warp per token (the arithmetic of csrc/router.cpp, whose comment states it; the twin is
// routers.topk.route_topk).
//
// Shape legend: T tokens, E experts, K top-k slots, Z expert groups.
//
// Forward, per token: the warp reads the E logits (lane-strided), reduces max and sum for the
// softmax (or applies the sigmoid), writes probs_TE and keeps probs and choice scores
// (probs + bias) in shared memory; with groups, lane z scores group z (its two best choices) and
// the warp picks the topk_groups best groups in as many arg-max rounds; then K arg-max rounds pick
// the experts (ties: the lower id), and lane 0 applies the threshold rule (rule "xmoe" / "top_p":
// moe_ops.h's kept_slots, the CPU kernel's; the dropped slots get id -1 and weight 0), sums the
// kept probs in slot order, normalises and scales. Padded tokens (valid_T false) get ids -1 and
// weights 0; check_finite turns a real token's non-finite logit into a device-side assert. No
// host synchronisation: every size is known on the host.
//
// Statistics (csrc/router.cpp states them), deterministic, with no atomics on floats:
// the route kernel also writes, per token, logsumexp(l)^2, the sigmoid loss scores' divisor and
// the loss ids (top-k of the loss scores, with a bias or groups; rule "xmoe" counts each token's
// first slot only); route_stats_partial_kernel
// (num_seqs = B > 0) sums each (sequence, expert)'s loss scores and loss slots over ranges of
// 32 tokens in token order, and each range's real tokens and lse^2; then one block
// (route_stats_final: the partial kernel's last block to finish, or route_stats_final_kernel
// without statistics) counts counts_E and the real tokens, writes metrics, adds the ranges'
// partial sums (a warp per sequence and expert, in a fixed tree) and forms fw_BE, psum_BE, zsum
// and balance (the block's fixed-order sum of fw_BE * psum_BE). The backward adds d balance * fw_BE to each
// sequence's d psum_BE as it reads it (add_rn/mul_rn: the CPU kernel's expression). Launches: 2
// with or without statistics; 1 without statistics at decode sizes (topk_route_small_kernel routes
// and counts in one block: up to kSmallRouteTokens tokens, at most kSmallRoutePerWarp a warp).
// Shared memory per warp: 2 E values (probs, choice) and Z group scores; a block of the route
// kernel holds up to four warps, fewer when E is large; E must fit one warp's share in 48 KiB.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <limits>

#include "common.cuh"
#include "moe_ops.h"

namespace moe::cuda {
namespace {

constexpr int kMaxWarps = 4;
constexpr int64_t kSmemLimit = 48 * 1024;

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The best (value, index) over the warp; ties go to the lower index. Every lane gets it.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& v, int& i) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

__device__ __forceinline__ float log_(float x) { return ::logf(x); }
__device__ __forceinline__ double log_(double x) { return ::log(x); }

// K arg-max rounds over score[0..E) (in shared memory; the taken ones become -inf): out[k] = the
// k-th best id, ties to the lower id. Every lane of the warp takes part; lane 0 writes.
template <typename T>
__device__ void topk_rounds(T* score, int E, int K, int lane, int64_t* out) {
  for (int k = 0; k < K; ++k) {
    T v = -std::numeric_limits<T>::infinity();
    int i = INT_MAX;
    for (int e = lane; e < E; e += kWarp)
      if (score[e] > v) {  // lanes scan increasing ids: a tie keeps the lower one
        v = score[e];
        i = e;
      }
    warp_argmax(v, i);
    if (i == INT_MAX) i = 0;  // unreachable for finite logits: K <= the allowed experts
    if (lane == 0) {
      out[k] = i;
      score[i] = -std::numeric_limits<T>::infinity();
    }
    __syncwarp();
  }
}

// Per-token outputs of the route kernel for the statistics kernels (null when not needed).
template <typename T>
struct TokenStats {
  T* lse2;           // (T,) logsumexp(l)^2
  T* norm;           // (T,) sum_e p_e + 1e-20 (sigmoid)
  int64_t* aux_ids;  // (T, K) the loss ids (with a bias or groups)
  unsigned* ticket;  // the statistics kernel's block counter, zeroed here (with statistics)
};

// The route kernel's arguments (every launch of one call shares them).
template <typename T>
struct RouteParams {
  const T* logits;
  int64_t ls, le;  // logits' strides (token, expert)
  const float* bias;
  const bool* valid;
  int64_t Tn;
  int E, K, Z, topk_groups;
  bool softmax, norm, check_finite;
  T scaling, threshold;
  RouteRule rule;
  TokenStats<T> st;
  int64_t* ids;
  T* weights;
  T* probs;
};

// Token t's route by one warp, `p` the warp's 2 E + Z values of shared memory.
template <typename T>
__device__ void route_token(const RouteParams<T>& a, int64_t t, int lane, T* p) {
  const int E = a.E, K = a.K, Z = a.Z, topk_groups = a.topk_groups;
  const bool softmax = a.softmax, norm = a.norm, check_finite = a.check_finite;
  const T scaling = a.scaling, threshold = a.threshold;
  const RouteRule rule = a.rule;
  const TokenStats<T>& st = a.st;
  const float* bias = a.bias;
  const bool* valid = a.valid;
  const int64_t le = a.le;
  T* probs = a.probs;
  T* choice = p + E;
  T* group = choice + E;
  const T* l = a.logits + t * a.ls;  // (read through the read-only cache: __ldg)
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const bool real = valid == nullptr || valid[t];

  if (check_finite && real) {
    bool bad = false;
    for (int e = lane; e < E; e += kWarp) bad |= !isfinite(__ldg(l + e * le));
    bad = __any_sync(0xffffffffu, bad);
    CUDA_KERNEL_ASSERT(!bad && "router logits contain NaN or inf; the router refuses to route them");
  }
  T mx = neg_inf, sum = 0;
  if (softmax || st.lse2) {
    for (int e = lane; e < E; e += kWarp) mx = max(mx, __ldg(l + e * le));
    mx = warp_max(mx);
  }
  if (softmax) {
    for (int e = lane; e < E; e += kWarp) sum += (p[e] = exp_acc(__ldg(l + e * le) - mx));
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += kWarp) p[e] = p[e] / sum;
  } else {
    for (int e = lane; e < E; e += kWarp) p[e] = T(1) / (T(1) + exp_acc(-__ldg(l + e * le)));
    if (st.lse2) {
      for (int e = lane; e < E; e += kWarp) sum += exp_acc(__ldg(l + e * le) - mx);
      sum = warp_sum(sum);
    }
  }
  if (st.lse2 && lane == 0) {
    const T lse = mx + log_(sum);
    st.lse2[t] = lse * lse;
  }
  for (int e = lane; e < E; e += kWarp) {
    probs[t * E + e] = p[e];
    choice[e] = bias ? p[e] + T(__ldg(bias + e)) : p[e];
  }
  __syncwarp();

  if (Z > 0) {  // the topk_groups best groups by the sum of their two best choice scores
    const int per = E / Z;
    for (int z = lane; z < Z; z += kWarp) {
      T best = neg_inf, second = neg_inf;
      for (int e = z * per; e < (z + 1) * per; ++e) {
        const T c = choice[e];
        if (c > best) {
          second = best;
          best = c;
        } else if (c > second) {
          second = c;
        }
      }
      group[z] = per >= 2 ? best + second : best;
    }
    __syncwarp();
    for (int g = 0; g < topk_groups; ++g) {  // a taken group's score becomes NaN (never greater)
      T v = neg_inf;
      int i = INT_MAX;
      for (int z = lane; z < Z; z += kWarp)
        if (group[z] > v) {
          v = group[z];
          i = z;
        }
      warp_argmax(v, i);
      if (lane == 0) group[i] = std::numeric_limits<T>::quiet_NaN();
      __syncwarp();
    }
    for (int e = lane; e < E; e += kWarp)
      if (!isnan(group[e / per])) choice[e] = neg_inf;
    __syncwarp();
  }

  int64_t* id = a.ids + t * K;
  T* w = a.weights + t * K;
  topk_rounds(choice, E, K, lane, id);
  if (lane == 0) {
    const T eps = softmax ? T(0) : T(1e-20);
    const int kept = int(kept_slots(rule, threshold, p, id, K));
    T wsum = 0;
    for (int k = 0; k < kept; ++k) wsum += (w[k] = p[id[k]]);
    for (int k = 0; k < K; ++k) {
      w[k] = real && k < kept ? (norm ? w[k] / (wsum + eps) : w[k]) * scaling : T(0);
      if (k >= kept) id[k] = -1;
    }
  }
  __syncwarp();
  if (st.norm) {  // the sigmoid loss scores' divisor, sum_e p_e + 1e-20
    T d = 0;
    for (int e = lane; e < E; e += kWarp) d += p[e];
    d = warp_sum(d) + T(1e-20);
    if (lane == 0) st.norm[t] = d;
    if (st.aux_ids)
      for (int e = lane; e < E; e += kWarp) choice[e] = p[e] / d;
  } else if (st.aux_ids) {
    for (int e = lane; e < E; e += kWarp) choice[e] = p[e];
  }
  __syncwarp();
  if (st.aux_ids) {  // the plain top-k of the loss scores (no bias, no groups)
    topk_rounds(choice, E, K, lane, st.aux_ids + t * K);
    if (!real && lane == 0)
      for (int k = 0; k < K; ++k) st.aux_ids[t * K + k] = -1;
  }
  if (!real && lane == 0)
    for (int k = 0; k < K; ++k) id[k] = -1;
}

// One warp per token.
template <typename T>
__global__ void topk_route_kernel(RouteParams<T> a) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t t = int64_t(blockIdx.x) * warps + warp;
  if (a.st.ticket != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *a.st.ticket = 0u;  // for the next kernel
  if (t >= a.Tn) return;  // whole warps leave together
  route_token(a, t, lane, reinterpret_cast<T*>(smem_raw) + int64_t(warp) * (2 * a.E + a.Z));
}

constexpr int kFinalThreads = 1024;
// The statistics kernel's blocks: for the partial sums, groups of a thread per expert (whole warps),
// each group one (sequence, token range), so few experts still fill the block; and the threads of
// the final statistics in its last block (counts over all T K ids: as many as the former final
// kernel).
constexpr int kPartialThreads = kFinalThreads;
constexpr int kSmemHist = 8192;  // experts counted in shared memory (32 KiB)
// One launch without statistics (topk_route_small_kernel) up to kSmallRouteTokens tokens, when a
// block of kSmallRouteWarps warps (72-84 registers a thread: 512 threads fit an SM's registers)
// gives each warp at most kSmallRoutePerWarp tokens: the block routes them one after another,
// where the two-launch path spreads them over many blocks (a decode-sized choice, not measured).
constexpr int64_t kSmallRouteTokens = 64;
constexpr int kSmallRouteWarps = 16;
constexpr int64_t kSmallRoutePerWarp = 4;

// counts_E (in `hist`, E ints of shared memory, when smem_hist) and metrics, by the whole block
// (at most kFinalThreads threads); the ids of the Tn tokens are visible to the block.
__device__ void route_counts(const int64_t* __restrict__ ids, const bool* __restrict__ valid, int64_t Tn, int E,
                             int K, bool smem_hist, int* hist, int64_t* __restrict__ counts,
                             float* __restrict__ metrics) {
  __shared__ unsigned long long red[2][kFinalThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    if (smem_hist) {
      hist[e] = 0;
    } else {
      counts[e] = 0;
    }
  }
  __syncthreads();
  unsigned long long kept = 0, real = 0;
  for (int64_t s = threadIdx.x; s < Tn * K; s += blockDim.x) {
    const int64_t id = ids[s];
    if (id >= 0) {
      if (smem_hist) {
        atomicAdd(&hist[id], 1);
      } else {
        atomicAdd(reinterpret_cast<unsigned long long*>(counts + id), 1ull);
      }
      ++kept;
    }
  }
  for (int64_t t = threadIdx.x; t < Tn; t += blockDim.x) real += (valid == nullptr || valid[t]) ? 1 : 0;
  kept = warp_sum(kept);
  real = warp_sum(real);
  if (lane == 0) {
    red[0][warp] = kept;
    red[1][warp] = real;
  }
  __syncthreads();
  if (smem_hist)
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = hist[e];
  if (threadIdx.x == 0) {
    kept = real = 0;
    for (int w = 0; w < int(blockDim.x) / kWarp; ++w) {
      kept += red[0][w];
      real += red[1][w];
    }
    metrics[0] = 0.0f;
    metrics[1] = static_cast<float>(kept) / fmaxf(1.0f, static_cast<float>(real));
  }
}

// One block: counts_E (a shared-memory histogram when E <= kSmemHist) and metrics; with B > 0, the
// R partial sums added in a fixed order and fw_BE, psum_BE, zsum formed (the arithmetic of
// csrc/router.cpp's route_statistics; fw_BE times fw_scale, zsum times z_scale), then balance.
// The final statistics' arguments (the outputs, and what route_stats_final reads besides the
// partial sums).
template <typename T>
struct FinalArgs {
  const int64_t* ids;
  const bool* valid;
  int64_t Tn;
  int E, K;
  int64_t B, R;
  bool smem_hist;
  T* tok_B;
  int64_t* counts;
  float* metrics;
  T *fw, *psum, *zsum, *balance;
  T fw_scale, z_scale;
};

template <typename T>
__device__ void route_stats_final(const FinalArgs<T>& f, const T* psum_part, const int* cnt_part, T* z_part,
                                  const int* tok_part, int* hist) {
  const int64_t* __restrict__ ids = f.ids;
  const bool* __restrict__ valid = f.valid;
  const int64_t Tn = f.Tn, B = f.B, R = f.R;
  const int E = f.E, K = f.K;
  const bool smem_hist = f.smem_hist;
  T* __restrict__ tok_B = f.tok_B;
  int64_t* __restrict__ counts = f.counts;
  float* __restrict__ metrics = f.metrics;
  T* __restrict__ fw = f.fw;
  T* __restrict__ psum = f.psum;
  T* __restrict__ zsum = f.zsum;
  T* __restrict__ balance = f.balance;
  const T fw_scale = f.fw_scale, z_scale = f.z_scale;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  route_counts(ids, valid, Tn, E, K, smem_hist, hist, counts, metrics);
  if (B == 0) {
    if (threadIdx.x == 0) zsum[0] = balance[0] = T(0);
    return;
  }
  // One warp per (sequence, expert): lane-strided partials, then the warp's tree (a fixed order).
  const int warps = blockDim.x / kWarp;
  for (int64_t i = warp; i < B * E; i += warps) {  // fw holds the loss-slot counts for now
    T acc = 0;
    int cnt = 0;
    for (int64_t r = lane; r < R; r += kWarp) {  // other blocks' writes: read past L1
      acc += __ldcg(psum_part + r * B * E + i);
      cnt += __ldcg(cnt_part + r * B * E + i);
    }
    acc = warp_sum(acc);
    cnt = warp_sum(cnt);
    if (lane == 0) {
      psum[i] = acc;
      fw[i] = T(cnt);
    }
  }
  for (int64_t b = warp; b < B; b += warps) {  // z_part's row r = 0 then holds each sequence's sum
    int tok = 0;
    T z = 0;
    for (int64_t r = lane; r < R; r += kWarp) {
      tok += __ldcg(tok_part + r * B + b);
      z += __ldcg(z_part + r * B + b);
    }
    tok = warp_sum(tok);
    z = warp_sum(z);
    if (lane == 0) {
      tok_B[b] = T(tok);
      z_part[b] = z;
    }
  }
  __syncthreads();
  __shared__ T has_total;
  if (threadIdx.x == 0) {
    T z = 0, h = 0;
    for (int64_t b = 0; b < B; ++b) {
      z += R > 0 ? z_part[b] : T(0);
      h += tok_B[b] > T(0) ? T(1) : T(0);
    }
    zsum[0] = z * z_scale;
    has_total = h;
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    T slots = 0;
    for (int e = 0; e < E; ++e) slots += fw[b * E + e];
    const T has = tok_B[b] > T(0) ? T(1) : T(0);
    const T scale = has / (max(T(1), tok_B[b]) * max(T(1), has_total)) * fw_scale;
    for (int e = 0; e < E; ++e) fw[b * E + e] = fw[b * E + e] / max(T(1), slots) * scale;
  }
  // balance = sum of fw_BE * psum_BE: thread-strided partials, the warps' trees, then the warps in
  // order (a fixed order: deterministic, not the CPU's sequential one).
  __syncthreads();  // every thread's fw rows written (global memory, visible within the block)
  __shared__ T warp_part[kFinalThreads / kWarp];
  T part = 0;
  for (int64_t i = threadIdx.x; i < B * E; i += blockDim.x) part = fma_rn(fw[i], psum[i], part);
  part = warp_sum(part);
  if (lane == 0) warp_part[warp] = part;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = 0;
    for (int w = 0; w < int(blockDim.x) / kWarp; ++w) total = add_rn(total, warp_part[w]);
    balance[0] = total;
  }
}

// route_stats_final in a launch of its own: no statistics (B = 0) or no tokens.
template <typename T>
__global__ void route_stats_final_kernel(FinalArgs<T> f, const T* psum_part, const int* cnt_part, T* z_part,
                                         const int* tok_part) {
  extern __shared__ int hist[];  // E counts when f.smem_hist
  route_stats_final(f, psum_part, cnt_part, z_part, tok_part, hist);
}

// Per (expert e, sequence b, token range r): the loss scores' and loss slots' sums over the range's
// real tokens, in token order (the loss slots: the first loss_k of each token's K); the thread of
// expert 0 also sums the range's real tokens and lse^2. A block's threads are groups of `lanes`
// (E rounded up to whole warps, at most kPartialThreads) threads, one item (b, r) a group, so E
// threads of each group work (grid: ceil(E / kPartialThreads) x the item blocks, flattened in x).
// The last block to finish (a ticket counter that the route kernel zeroed: the classic
// threadfence reduction) then forms every statistic (route_stats_final, partial sums read past L1),
// so statistics cost one launch after the route kernel; which block is last does not change a bit,
// nor does how items are packed into blocks (each (e, b, r) sum is one thread's loop).
template <typename T>
__global__ void __launch_bounds__(kPartialThreads)
    route_stats_partial_kernel(const T* __restrict__ probs, const T* __restrict__ norm,
                               const int64_t* __restrict__ loss_ids, const bool* __restrict__ valid,
                               const T* __restrict__ lse2, int64_t S, int64_t chunk, int E, int K, int loss_k,
                               int64_t B, int64_t R, int lanes, T* psum_part, int* cnt_part, T* z_part,
                               int* tok_part, unsigned* ticket, FinalArgs<T> f) {
  extern __shared__ int hist[];  // E counts for the final statistics when f.smem_hist
  const int64_t e_blocks = (E + kPartialThreads - 1) / kPartialThreads;
  const int64_t e_block = blockIdx.x % e_blocks, item_block = blockIdx.x / e_blocks;
  const int groups = blockDim.x / lanes;
  const int e = int(e_block) * kPartialThreads + int(threadIdx.x) % lanes;
  const int64_t item = item_block * groups + threadIdx.x / lanes;  // b + B r
  if (item < B * R) {
    const int64_t b = item % B, r = item / B;
    const int64_t t0 = b * S + r * chunk, t1 = min(b * S + S, t0 + chunk);
    if (e < E) {
      const int64_t out = item * E + e;
      T acc = 0;
      int cnt = 0;
      for (int64_t t = t0; t < t1; ++t) {
        if (valid != nullptr && !valid[t]) continue;
        const T pe = probs[t * E + e];
        acc += norm ? pe / norm[t] : pe;
        for (int k = 0; k < loss_k; ++k) cnt += loss_ids[t * K + k] == e ? 1 : 0;
      }
      psum_part[out] = acc;
      cnt_part[out] = cnt;
    }
    if (e == 0) {
      T z = 0;
      int tok = 0;
      for (int64_t t = t0; t < t1; ++t)
        if (valid == nullptr || valid[t]) {
          z += lse2[t];
          ++tok;
        }
      z_part[item] = z;
      tok_part[item] = tok;
    }
  }
  __threadfence();  // this block's partial sums reach L2 before its ticket
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == gridDim.x - 1u;
  __syncthreads();
  if (!last) return;  // block-uniform
  __threadfence();
  route_stats_final(f, psum_part, cnt_part, z_part, tok_part, hist);
}


// Small batches without loss statistics (B = 0, 0 < T <= kSmallRouteTokens: decode), in one
// launch: the block's warps route the tokens in turn, then the block counts (route_counts). Shared
// memory: each warp's 2 E + Z values, then the histogram's E ints (smem_hist).
template <typename T>
__global__ void __launch_bounds__(kSmallRouteWarps* kWarp, 1)
    topk_route_small_kernel(RouteParams<T> a, bool smem_hist, int64_t* __restrict__ counts,
                            float* __restrict__ metrics, T* __restrict__ zsum, T* __restrict__ balance) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t per_warp = 2 * a.E + a.Z;
  T* mine = reinterpret_cast<T*>(smem_raw) + warp * per_warp;
  for (int64_t t = warp; t < a.Tn; t += warps) route_token(a, t, lane, mine);
  __syncthreads();  // the block's ids (global memory) are visible to all its threads
  int* hist = reinterpret_cast<int*>(reinterpret_cast<T*>(smem_raw) + warps * per_warp);
  route_counts(a.ids, a.valid, a.Tn, a.E, a.K, smem_hist, hist, counts, metrics);
  if (threadIdx.x == 0) zsum[0] = balance[0] = T(0);
}

template <typename T>
__global__ void topk_route_backward_kernel(const T* __restrict__ gw, const T* __restrict__ gp,
                                           const int64_t* __restrict__ ids, const T* __restrict__ probs,
                                           int64_t Tn, int E, int K, bool softmax, bool norm, T scaling,
                                           const T* __restrict__ gpsum, int64_t S, const T* __restrict__ gz, T z_scale,
                                           const T* __restrict__ logits, const bool* __restrict__ valid,
                                           const T* __restrict__ gbal, const T* __restrict__ fw,
                                           T* __restrict__ out) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t t = int64_t(blockIdx.x) * warps + warp;
  if (t >= Tn) return;
  T* dp = reinterpret_cast<T*>(smem_raw) + int64_t(warp) * E;
  const T* p = probs + t * E;
  const T* g = gw + t * K;
  const int64_t* id = ids + t * K;
  const bool real = valid == nullptr || valid[t];
  for (int e = lane; e < E; e += kWarp) dp[e] = gp ? gp[t * E + e] : T(0);
  T denom = 0, dot = 0;
  if (lane == 0) {  // in slot order, as the CPU kernel; id -1 (a padded token) carries no gradient
    for (int k = 0; k < K; ++k) {
      CUDA_KERNEL_ASSERT(id[k] >= -1 && id[k] < E && "moe.topk_route_backward: ids_TK outside [-1, E)");
      if (id[k] >= 0) denom += p[id[k]];
    }
    denom += softmax ? T(0) : T(1e-20);
    for (int k = 0; k < K; ++k)
      if (id[k] >= 0) dot += g[k] * scaling * p[id[k]];
  }
  denom = __shfl_sync(0xffffffffu, denom, 0);
  dot = __shfl_sync(0xffffffffu, dot, 0);
  __syncwarp();
  for (int k = lane; k < K; k += kWarp) {  // ids of one token are distinct: no two lanes collide
    if (id[k] < 0) continue;
    const T gs = g[k] * scaling;
    dp[id[k]] += norm ? gs / denom - dot / (denom * denom) : gs;
  }
  __syncwarp();
  if ((gpsum != nullptr || gbal != nullptr) && real) {  // psum_BE[b] += the loss scores s (p, or p / (sum p + 1e-20))
    // d psum_BE[b, e]: grad_psum's, plus d balance * fw_BE[b, e] (the CPU kernel's expression)
    const int64_t row = (t / S) * E;
    const T gb = gbal != nullptr ? gbal[0] : T(0);
    auto gs = [&](int e) {
      const T g0 = gpsum != nullptr ? gpsum[row + e] : T(0);
      return gbal != nullptr ? add_rn(g0, mul_rn(gb, fw[row + e])) : g0;
    };
    if (softmax) {
      for (int e = lane; e < E; e += kWarp) dp[e] += gs(e);
    } else {
      T d = 0;
      for (int e = lane; e < E; e += kWarp) d += p[e];
      d = warp_sum(d) + T(1e-20);
      T sdot = 0;
      for (int e = lane; e < E; e += kWarp) sdot += gs(e) * (p[e] / d);
      sdot = warp_sum(sdot);
      for (int e = lane; e < E; e += kWarp) dp[e] += (gs(e) - sdot) / d;
    }
    __syncwarp();
  }
  T c = 0, mx = 0;
  const T* l = logits != nullptr ? logits + t * E : nullptr;
  if (l != nullptr && real) {  // zsum += lse^2: d l_e = 2 lse softmax(l)_e
    mx = -std::numeric_limits<T>::infinity();
    for (int e = lane; e < E; e += kWarp) mx = max(mx, l[e]);
    mx = warp_max(mx);
    T sum = 0;
    for (int e = lane; e < E; e += kWarp) sum += exp_acc(l[e] - mx);
    sum = warp_sum(sum);
    c = T(2) * (gz[0] * z_scale) * (mx + log_(sum)) / sum;  // the CPU kernel's order
  }
  if (softmax) {
    T s = 0;
    for (int e = lane; e < E; e += kWarp) s += dp[e] * p[e];
    s = warp_sum(s);
    for (int e = lane; e < E; e += kWarp)
      out[t * E + e] = p[e] * (dp[e] - s) + (c != T(0) ? c * exp_acc(l[e] - mx) : T(0));
  } else {
    for (int e = lane; e < E; e += kWarp)
      out[t * E + e] = dp[e] * p[e] * (T(1) - p[e]) + (c != T(0) ? c * exp_acc(l[e] - mx) : T(0));
  }
}

// Warps per block and shared bytes for `per_warp` bytes a warp: up to four warps in 48 KiB.
std::pair<int, int64_t> warp_layout(const char* op, int64_t per_warp, int64_t E) {
  TORCH_CHECK(per_warp <= kSmemLimit, "moe.", op, ": E=", E, " experts do not fit one warp's shared memory on CUDA (",
              per_warp, " bytes > ", kSmemLimit, "); use the routers' PyTorch path (routers.topk.route_topk)");
  const int warps = int(std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, kSmemLimit / per_warp)));
  return {warps, per_warp * warps};
}

RouteOutputs topk_route_cuda(const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E, int64_t top_k,
                             c10::string_view score, int64_t num_groups, int64_t topk_groups, bool norm_topk,
                             double scaling, const std::optional<at::Tensor>& valid_T, int64_t num_seqs,
                             bool check_finite, c10::string_view rule, double threshold, double fw_scale,
                             double z_scale) {
  check_topk_route_args(logits_TE, bias_E, top_k, score, num_groups, topk_groups, scaling, valid_T, num_seqs, rule,
                        threshold, fw_scale, z_scale);
  const c10::cuda::CUDAGuard guard(logits_TE.device());
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1), B = num_seqs, K = top_k;
  const auto opts = logits_TE.options();
  at::Tensor ids, weights, probs, counts, metrics, fw, psum, zsum, balance, bias, valid;
  std::tie(ids, weights, probs, counts, metrics, fw, psum, zsum, balance, bias, valid) =
      route_buffers(logits_TE, bias_E, top_k, valid_T, num_seqs);
  const bool* vp = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  const bool softmax = score == "softmax", aux_topk = bias.defined() || num_groups > 0;
  const RouteRule r = route_rule(rule);
  const int loss_k = r == RouteRule::kXmoe ? 1 : int(K);  // XMoE's l_aux: each token's first choice
  const int64_t S = B > 0 ? T / B : 0;
  // token ranges of 32 tokens per sequence (at most 1024): enough blocks to hide the loads' latency
  const int64_t R = B > 0 ? std::clamp<int64_t>(ceil_div(S, 32), 1, 1024) : 0;
  const int64_t chunk = R > 0 ? ceil_div(S, R) : 0;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits_TE.scalar_type(), "moe_topk_route_cuda", [&] {
    using T_ = scalar_t;
    // workspace: lse2 (T), norm (T, sigmoid), psum partials (R B E), z partials (R B), tok_B (B)
    auto ws = at::empty({B > 0 ? 2 * T + R * B * E + R * B + B : 0}, opts);
    auto iws = at::empty({B > 0 ? R * B * E + R * B + 1 : 0}, opts.dtype(at::kInt));  // + the ticket
    auto aux = at::empty({B > 0 && aux_topk ? T * K : 0}, opts.dtype(at::kLong));
    T_* w0 = ws.mutable_data_ptr<T_>();
    unsigned* ticket = B > 0 ? reinterpret_cast<unsigned*>(iws.mutable_data_ptr<int>() + R * B * E + R * B) : nullptr;
    TokenStats<T_> st{B > 0 ? w0 : nullptr, B > 0 && !softmax ? w0 + T : nullptr,
                      B > 0 && aux_topk ? aux.mutable_data_ptr<int64_t>() : nullptr, ticket};
    const RouteParams<T_> rp{logits_TE.const_data_ptr<T_>(), logits_TE.stride(0), logits_TE.stride(1),
                             bias.defined() ? bias.const_data_ptr<float>() : nullptr, vp, T, int(E), int(K),
                             int(num_groups), int(topk_groups), softmax, norm_topk, check_finite, T_(scaling),
                             T_(threshold), r, st, ids.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<T_>(),
                             probs.mutable_data_ptr<T_>()};
    const int64_t per_warp = int64_t(sizeof(T_)) * (2 * E + num_groups);
    const bool smem_hist = E <= kSmemHist;
    const int64_t hist_bytes = smem_hist ? E * int64_t(sizeof(int)) : 0;
    // (route_counts' own 512 static bytes come on top of the dynamic share: keep 1 KiB for them)
    const int64_t small_warps =
        std::min<int64_t>({kSmallRouteWarps, T, (kSmemLimit - 1024 - hist_bytes) / per_warp});
    if (B == 0 && T > 0 && T <= kSmallRouteTokens && small_warps >= 1 &&
        ceil_div(T, small_warps) <= kSmallRoutePerWarp) {  // one launch
      topk_route_small_kernel<T_><<<1, small_warps * kWarp, small_warps * per_warp + hist_bytes, stream>>>(
          rp, smem_hist, counts.mutable_data_ptr<int64_t>(), metrics.mutable_data_ptr<float>(),
          zsum.mutable_data_ptr<T_>(), balance.mutable_data_ptr<T_>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (T > 0) {
      const auto [warps, smem] = warp_layout("topk_route", per_warp, E);
      topk_route_kernel<T_><<<rows_grid(T, warps), warps * kWarp, smem, stream>>>(rp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    T_* psum_part = B > 0 ? w0 + 2 * T : nullptr;
    T_* z_part = B > 0 ? psum_part + R * B * E : nullptr;
    T_* tok_B = B > 0 ? z_part + R * B : nullptr;
    int* cnt_part = B > 0 ? iws.mutable_data_ptr<int>() : nullptr;
    int* tok_part = B > 0 ? cnt_part + R * B * E : nullptr;
    const FinalArgs<T_> fin{ids.const_data_ptr<int64_t>(), vp, T, int(E), int(K), B, T > 0 ? R : 0, smem_hist, tok_B,
                            counts.mutable_data_ptr<int64_t>(), metrics.mutable_data_ptr<float>(),
                            fw.mutable_data_ptr<T_>(), psum.mutable_data_ptr<T_>(), zsum.mutable_data_ptr<T_>(),
                            balance.mutable_data_ptr<T_>(), T_(fw_scale), T_(z_scale)};
    const size_t hist_smem = smem_hist ? E * sizeof(int) : 0;
    if (B > 0 && T > 0) {  // the partial sums, and the final statistics in their last block
      // groups of whole warps, one (sequence, range) item each: ceil(E / 32) warps for E <= 1024
      const int lanes = int(std::min<int64_t>(ceil_div(E, kWarp) * kWarp, kPartialThreads));
      const int64_t blocks = ceil_div(E, kPartialThreads) * ceil_div(B * R, kPartialThreads / lanes);
      TORCH_CHECK(blocks < (int64_t{1} << 31), "moe.topk_route: too many sequences for one CUDA launch");
      route_stats_partial_kernel<T_><<<unsigned(blocks), kPartialThreads, hist_smem, stream>>>(
          probs.const_data_ptr<T_>(), st.norm, aux_topk ? st.aux_ids : ids.const_data_ptr<int64_t>(), vp, st.lse2,
          S, chunk, int(E), int(K), loss_k, B, R, lanes, psum_part, cnt_part, z_part, tok_part, ticket, fin);
    } else {
      route_stats_final_kernel<T_><<<1, kFinalThreads, hist_smem, stream>>>(fin, psum_part, cnt_part, z_part,
                                                                           tok_part);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ids, weights, probs, counts, metrics, fw, psum, zsum, balance};
}

at::Tensor topk_route_backward_cuda(const at::Tensor& grad_weights_TK, const std::optional<at::Tensor>& grad_probs_TE,
                                    const at::Tensor& ids_TK, const at::Tensor& probs_TE, c10::string_view score,
                                    bool norm_topk, double scaling, const std::optional<at::Tensor>& grad_psum_BE,
                                    const std::optional<at::Tensor>& grad_zsum,
                                    const std::optional<at::Tensor>& logits_TE,
                                    const std::optional<at::Tensor>& valid_T, double z_scale,
                                    const std::optional<at::Tensor>& grad_balance,
                                    const std::optional<at::Tensor>& fw_BE) {
  check_topk_route_backward_args(grad_weights_TK, grad_probs_TE, ids_TK, probs_TE, score, grad_psum_BE, grad_zsum,
                                 logits_TE, valid_T, z_scale, grad_balance, fw_BE);
  const c10::cuda::CUDAGuard guard(probs_TE.device());
  const auto probs = probs_TE.contiguous();
  const auto gw = grad_weights_TK.contiguous();
  const auto ids = ids_TK.contiguous();
  at::Tensor gp, gpsum, logits, valid, fw;
  if (grad_probs_TE.has_value()) gp = grad_probs_TE->contiguous();
  if (grad_psum_BE.has_value()) gpsum = grad_psum_BE->contiguous();
  if (grad_zsum.has_value()) logits = logits_TE->contiguous();
  if (valid_T.has_value()) valid = valid_T->contiguous();
  if (grad_balance.has_value()) fw = fw_BE->contiguous();
  auto out = at::empty_like(probs);
  const int64_t T = probs.size(0), E = probs.size(1);
  const int64_t B = gpsum.defined() ? gpsum.size(0) : fw.defined() ? fw.size(0) : 1;
  if (T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "moe_topk_route_backward_cuda", [&] {
    const auto [warps, smem] = warp_layout("topk_route_backward", int64_t(sizeof(scalar_t)) * E, E);
    topk_route_backward_kernel<scalar_t><<<rows_grid(T, warps), warps * kWarp, smem,
                                           at::cuda::getCurrentCUDAStream()>>>(
        gw.const_data_ptr<scalar_t>(), gp.defined() ? gp.const_data_ptr<scalar_t>() : nullptr,
        ids.const_data_ptr<int64_t>(), probs.const_data_ptr<scalar_t>(), T, int(E), int(ids.size(1)),
        score == "softmax", norm_topk, scalar_t(scaling),
        gpsum.defined() ? gpsum.const_data_ptr<scalar_t>() : nullptr, T / B,
        grad_zsum.has_value() ? grad_zsum->const_data_ptr<scalar_t>() : nullptr, scalar_t(z_scale),
        logits.defined() ? logits.const_data_ptr<scalar_t>() : nullptr,
        valid.defined() ? valid.const_data_ptr<bool>() : nullptr,
        grad_balance.has_value() ? grad_balance->const_data_ptr<scalar_t>() : nullptr,
        fw.defined() ? fw.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace moe::cuda

TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("topk_route", &moe::cuda::topk_route_cuda);
  m.impl("topk_route_backward", &moe::cuda::topk_route_backward_cuda);
}
