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
// the experts (ties: the lower id), and lane 0 sums the chosen probs in slot order, normalises
// and scales. No host synchronisation: every size is known on the host.
// Shared memory per warp: 2 E values (probs, choice) and Z group scores; a block holds up to four
// warps, fewer when E is large; E must fit one warp's share in 48 KiB.
#include <ATen/Dispatch.h>
#include <torch/library.h>

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

__device__ __forceinline__ float exp_(float x) { return ::expf(x); }
__device__ __forceinline__ double exp_(double x) { return ::exp(x); }

template <typename T>
__global__ void topk_route_kernel(const T* __restrict__ logits, int64_t ls, int64_t le,
                                  const float* __restrict__ bias, int64_t Tn, int E, int K, bool softmax,
                                  int Z, int topk_groups, bool norm, T scaling, int64_t* __restrict__ ids,
                                  T* __restrict__ weights, T* __restrict__ probs) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t t = int64_t(blockIdx.x) * warps + warp;
  if (t >= Tn) return;  // whole warps leave together
  T* p = reinterpret_cast<T*>(smem_raw) + int64_t(warp) * (2 * E + Z);
  T* choice = p + E;
  T* group = choice + E;
  const T* l = logits + t * ls;
  const T neg_inf = -std::numeric_limits<T>::infinity();

  if (softmax) {
    T mx = neg_inf;
    for (int e = lane; e < E; e += kWarp) mx = max(mx, l[e * le]);
    mx = warp_max(mx);
    T sum = 0;
    for (int e = lane; e < E; e += kWarp) sum += (p[e] = exp_(l[e * le] - mx));
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += kWarp) p[e] = p[e] / sum;
  } else {
    for (int e = lane; e < E; e += kWarp) p[e] = T(1) / (T(1) + exp_(-l[e * le]));
  }
  for (int e = lane; e < E; e += kWarp) {
    probs[t * E + e] = p[e];
    choice[e] = bias ? p[e] + T(bias[e]) : p[e];
  }
  __syncwarp();

  if (Z > 0) {  // the topk_groups best groups by the sum of their two best choice scores
    const int per = E / Z;
    for (int z = lane; z < Z; z += kWarp) {
      T a = neg_inf, b = neg_inf;
      for (int e = z * per; e < (z + 1) * per; ++e) {
        const T c = choice[e];
        if (c > a) {
          b = a;
          a = c;
        } else if (c > b) {
          b = c;
        }
      }
      group[z] = per >= 2 ? a + b : a;
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

  int64_t* id = ids + t * K;
  T* w = weights + t * K;
  for (int k = 0; k < K; ++k) {
    T v = neg_inf;
    int i = INT_MAX;
    for (int e = lane; e < E; e += kWarp)
      if (choice[e] > v) {  // lanes scan increasing ids: a tie keeps the lower one
        v = choice[e];
        i = e;
      }
    warp_argmax(v, i);
    if (i == INT_MAX) i = 0;  // unreachable for finite logits: K <= the allowed experts
    if (lane == 0) {
      id[k] = i;
      choice[i] = neg_inf;
    }
    __syncwarp();
  }
  if (lane == 0) {
    const T eps = softmax ? T(0) : T(1e-20);
    T sum = 0;
    for (int k = 0; k < K; ++k) sum += (w[k] = p[id[k]]);
    for (int k = 0; k < K; ++k) w[k] = (norm ? w[k] / (sum + eps) : w[k]) * scaling;
  }
}

template <typename T>
__global__ void topk_route_backward_kernel(const T* __restrict__ gw, const T* __restrict__ gp,
                                           const int64_t* __restrict__ ids, const T* __restrict__ probs,
                                           int64_t Tn, int E, int K, bool softmax, bool norm, T scaling,
                                           T* __restrict__ out) {
  extern __shared__ unsigned char smem_raw[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t t = int64_t(blockIdx.x) * warps + warp;
  if (t >= Tn) return;
  T* dp = reinterpret_cast<T*>(smem_raw) + int64_t(warp) * E;
  const T* p = probs + t * E;
  const T* g = gw + t * K;
  const int64_t* id = ids + t * K;
  for (int e = lane; e < E; e += kWarp) dp[e] = gp ? gp[t * E + e] : T(0);
  T denom = 0, dot = 0;
  if (lane == 0) {  // in slot order, as the CPU kernel
    for (int k = 0; k < K; ++k) {
      CUDA_KERNEL_ASSERT(id[k] >= 0 && id[k] < E && "moe.topk_route_backward: ids_TK outside [0, E)");
      denom += p[id[k]];
    }
    denom += softmax ? T(0) : T(1e-20);
    for (int k = 0; k < K; ++k) dot += g[k] * scaling * p[id[k]];
  }
  denom = __shfl_sync(0xffffffffu, denom, 0);
  dot = __shfl_sync(0xffffffffu, dot, 0);
  __syncwarp();
  for (int k = lane; k < K; k += kWarp) {  // ids of one token are distinct: no two lanes collide
    const T gs = g[k] * scaling;
    dp[id[k]] += norm ? gs / denom - dot / (denom * denom) : gs;
  }
  __syncwarp();
  if (softmax) {
    T s = 0;
    for (int e = lane; e < E; e += kWarp) s += dp[e] * p[e];
    s = warp_sum(s);
    for (int e = lane; e < E; e += kWarp) out[t * E + e] = p[e] * (dp[e] - s);
  } else {
    for (int e = lane; e < E; e += kWarp) out[t * E + e] = dp[e] * p[e] * (T(1) - p[e]);
  }
}

// Warps per block and shared bytes for `per_warp` bytes a warp: up to four warps in 48 KiB.
std::pair<int, int64_t> warp_layout(const char* op, int64_t per_warp, int64_t E) {
  TORCH_CHECK(per_warp <= kSmemLimit, "moe.", op, ": E=", E, " experts do not fit one warp's shared memory on CUDA (",
              per_warp, " bytes > ", kSmemLimit, "); use the routers' PyTorch path (routers.topk.route_topk)");
  const int warps = int(std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, kSmemLimit / per_warp)));
  return {warps, per_warp * warps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_route_cuda(
    const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E, int64_t top_k,
    c10::string_view score, int64_t num_groups, int64_t topk_groups, bool norm_topk, double scaling) {
  check_topk_route_args(logits_TE, bias_E, top_k, score, num_groups, topk_groups, scaling);
  const c10::cuda::CUDAGuard guard(logits_TE.device());
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  auto probs = at::empty({T, E}, logits_TE.options());
  auto weights = at::empty({T, top_k}, logits_TE.options());
  auto ids = at::empty({T, top_k}, logits_TE.options().dtype(at::kLong));
  if (T == 0) return {ids, weights, probs};
  at::Tensor bias;
  if (bias_E.has_value()) bias = bias_E->to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES(logits_TE.scalar_type(), "moe_topk_route_cuda", [&] {
    const auto [warps, smem] = warp_layout("topk_route", int64_t(sizeof(scalar_t)) * (2 * E + num_groups), E);
    topk_route_kernel<scalar_t><<<rows_grid(T, warps), warps * kWarp, smem, at::cuda::getCurrentCUDAStream()>>>(
        logits_TE.const_data_ptr<scalar_t>(), logits_TE.stride(0), logits_TE.stride(1),
        bias.defined() ? bias.const_data_ptr<float>() : nullptr, T, int(E), int(top_k), score == "softmax",
        int(num_groups), int(topk_groups), norm_topk, scalar_t(scaling), ids.mutable_data_ptr<int64_t>(),
        weights.mutable_data_ptr<scalar_t>(), probs.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ids, weights, probs};
}

at::Tensor topk_route_backward_cuda(const at::Tensor& grad_weights_TK, const std::optional<at::Tensor>& grad_probs_TE,
                                    const at::Tensor& ids_TK, const at::Tensor& probs_TE, c10::string_view score,
                                    bool norm_topk, double scaling) {
  check_topk_route_backward_args(grad_weights_TK, grad_probs_TE, ids_TK, probs_TE, score);
  const c10::cuda::CUDAGuard guard(probs_TE.device());
  const auto probs = probs_TE.contiguous();
  const auto gw = grad_weights_TK.contiguous();
  const auto ids = ids_TK.contiguous();
  at::Tensor gp;
  if (grad_probs_TE.has_value()) gp = grad_probs_TE->contiguous();
  auto out = at::empty_like(probs);
  const int64_t T = probs.size(0), E = probs.size(1);
  if (T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "moe_topk_route_backward_cuda", [&] {
    const auto [warps, smem] = warp_layout("topk_route_backward", int64_t(sizeof(scalar_t)) * E, E);
    topk_route_backward_kernel<scalar_t><<<rows_grid(T, warps), warps * kWarp, smem,
                                           at::cuda::getCurrentCUDAStream()>>>(
        gw.const_data_ptr<scalar_t>(), gp.defined() ? gp.const_data_ptr<scalar_t>() : nullptr,
        ids.const_data_ptr<int64_t>(), probs.const_data_ptr<scalar_t>(), T, int(E), int(ids.size(1)),
        score == "softmax", norm_topk, scalar_t(scaling), out.mutable_data_ptr<scalar_t>());
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
