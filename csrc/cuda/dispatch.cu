// moe.plan / moe.permute / moe.unpermute / moe.unpermute_weights_grad / moe.unpermute_backward on
// CUDA.
//
// Shape legend: T tokens, K top-k slots per token, E experts, N routed rows (the host-side bound
// T*K, also the count num_slots of slots; rows past offs_E[E-1] are padding), D feature dim.
//
// plan: see csrc/cuda/plan.cuh (one launch at decode sizes, a two-launch counting sort, or cub's
// radix sort), the same plan as the CPU kernel bit for bit.
//
// unpermute_backward (the weighted unpermute's backward: permute(grad, weights) and the weights'
// gradient in one pass) and unpermute_weights_grad share one kernel, a warp per slot.
// permute / unpermute / unpermute_weights_grad: one warp per output row, 16-byte vectors when
// the row strides and pointers allow it (else one element at a time). unpermute accumulates in
// at::opmath_type (float32 for half/bfloat16) in slot order k = 0..K-1 with separately rounded
// multiplies and adds (no FMA), so it equals the CPU kernel bit for bit. Empty slots (-1) are
// never read; padding rows of permute's output are written with zeros.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include "gather.cuh"
#include "plan.cuh"
#include "moe_ops.h"

namespace moe::cuda {
namespace {

// (rows / warps per block, chunks of kChunk vectors per row) for permute and unpermute.
dim3 chunked_grid(int64_t rows, int64_t nvec) {
  const int64_t chunks = ceil_div(nvec, kChunk);
  TORCH_CHECK(chunks <= 65535, "moe: feature dim too large for one launch (", nvec, " vectors)");
  return dim3(rows_grid(rows, kWarpsPerBlock), static_cast<unsigned>(std::max<int64_t>(1, chunks)));
}

// Calls fn(W{}) with W the C++ type of the optional weights (float when absent or float32).
template <typename scalar_t, typename Fn>
void with_weight_type(const std::optional<at::Tensor>& w, Fn&& fn) {
  if (!w.has_value() || w->scalar_type() == at::kFloat) {
    fn(float{});
  } else {
    fn(scalar_t{});
  }
}

template <typename W>
const W* weight_ptr(const std::optional<at::Tensor>& w) {
  return w.has_value() ? w->template const_data_ptr<W>() : nullptr;
}

}  // namespace

PlanTensors plan_cuda(const at::Tensor& ids_TK, int64_t num_experts) {
  check_plan_args(ids_TK, num_experts);
  TORCH_CHECK(ids_TK.numel() < (int64_t{1} << 31), "moe.plan: ids_TK has too many slots (",
              ids_TK.numel(), "): counts are int32");
  c10::cuda::CUDAGuard guard(ids_TK.device());
  const auto ids = ids_TK.contiguous();
  const int64_t T = ids.size(0), K = ids.size(1), num_slots = T * K;
  const int E = static_cast<int>(num_experts);
  auto i32 = ids.options().dtype(at::kInt);
  auto order = at::empty({num_slots}, ids.options().dtype(at::kLong));
  auto rows = at::empty({T, K}, ids.options().dtype(at::kLong));
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (num_slots > 0 && num_slots <= kBlockPlanSlots && E <= kBlockPlanMaxExperts) {  // one launch
    auto counts = at::empty({E}, i32);
    auto offs = at::empty({E}, i32);
    // One item per thread up to 256 slots, else 8; the slot field holds every item's index,
    // padding included (8 or 11 bits), under the id's (at most 13).
    const bool one = num_slots <= kBlockPlanThreads;
    const int slot_bits = one ? 8 : 11;
    static_assert(kBlockPlanThreads == 256 && kBlockPlanSlots == 2048 && kBlockPlanMaxExperts <= 4096,
                  "slot_bits and the 13 id bits below must fit 32-bit keys");
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_plan_block_cuda", [&] {
      auto kernel = one ? plan_block_kernel<index_t, 1> : plan_block_kernel<index_t, kBlockPlanMaxItems>;
      kernel<<<1, kBlockPlanThreads, 0, stream>>>(
          ids.const_data_ptr<index_t>(), static_cast<int>(num_slots), E, slot_bits,
          counts.mutable_data_ptr<int>(), offs.mutable_data_ptr<int>(), order.mutable_data_ptr<int64_t>(),
          rows.mutable_data_ptr<int64_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {counts, offs, order, rows};
  }
  // Two launches, the counting sort, while its table is small: each block reads all of it, so the
  // reads grow as blocks^2 * E (128 blocks: 262144 slots, 64 MiB at E = 1024); beyond, the radix sort.
  if (num_slots > 0 && E <= kCountPlanMaxExperts && ceil_div(num_slots, kChunkSlots) <= kCountPlanMaxBlocks) {
    auto counts = at::empty({E}, i32);
    auto offs = at::empty({E}, i32);
    const int64_t nblocks = ceil_div(num_slots, kChunkSlots);
    auto hist = at::empty({nblocks, E}, i32);
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_plan_count_cuda", [&] {
      plan_hist_kernel<index_t><<<unsigned(nblocks), kCountPlanThreads, 0, stream>>>(
          ids.const_data_ptr<index_t>(), num_slots, E, hist.mutable_data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      plan_place_kernel<index_t><<<unsigned(nblocks), kCountPlanThreads, 0, stream>>>(
          ids.const_data_ptr<index_t>(), num_slots, E, hist.const_data_ptr<int>(),
          counts.mutable_data_ptr<int>(), offs.mutable_data_ptr<int>(), order.mutable_data_ptr<int64_t>(),
          rows.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {counts, offs, order, rows};
  }
  auto counts = at::zeros({E}, i32);
  auto offs = at::empty({E}, i32);
  auto keys = at::empty({4, num_slots}, i32);  // keys in/out, slots in/out
  int* key_in = keys[0].mutable_data_ptr<int>();
  int* key_out = keys[1].mutable_data_ptr<int>();
  int* val_in = keys[2].mutable_data_ptr<int>();
  int* val_out = keys[3].mutable_data_ptr<int>();
  if (num_slots > 0) {
    const bool smem_hist = E <= kSmemHistMax;
    const size_t smem = smem_hist ? size_t(E) * sizeof(int) : 0;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_plan_cuda", [&] {
      plan_keys_kernel<index_t><<<flat_grid(num_slots, kThreads), kThreads, smem, stream>>>(
          ids.const_data_ptr<index_t>(), num_slots, E, smem_hist, key_in, val_in,
          counts.mutable_data_ptr<int>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  offsets_kernel<<<1, kScanThreads, 0, stream>>>(counts.const_data_ptr<int>(), E,
                                                  offs.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_slots == 0) return {counts, offs, order, rows};
  const int end_bit = 32 - __builtin_clz(static_cast<unsigned>(E));  // keys are in [0, E]
  size_t temp_bytes = 0;  // size query: host-only, no device work
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, key_in, key_out, val_in,
                                                 val_out, static_cast<int>(num_slots), 0, end_bit, stream));
  auto temp = at::empty({static_cast<int64_t>(temp_bytes)}, ids.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.mutable_data_ptr(), temp_bytes, key_in,
                                                 key_out, val_in, val_out, static_cast<int>(num_slots), 0,
                                                 end_bit, stream));
  plan_finalize_kernel<<<flat_grid(num_slots, kThreads), kThreads, 0, stream>>>(
      key_out, val_out, num_slots, E, order.mutable_data_ptr<int64_t>(), rows.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, offs, order, rows};
}

at::Tensor permute_cuda(const at::Tensor& x_TD, const at::Tensor& order_N,
                        const at::Tensor& rows_TK, const std::optional<at::Tensor>& scale_TK) {
  check_dispatch_args("permute", x_TD, "x_TD", rows_TK.size(0), "T, the plan's tokens", order_N,
                      rows_TK);
  if (scale_TK.has_value()) check_weights_arg("permute", "scale_TK", *scale_TK, rows_TK, x_TD);
  c10::cuda::CUDAGuard guard(x_TD.device());
  const int64_t N = order_N.size(0), K = rows_TK.size(1), D = x_TD.size(1), num_slots = rows_TK.numel();
  const auto x = unit_inner(x_TD);
  const auto order = order_N.contiguous();
  const auto scale = scale_TK.has_value() ? std::optional<at::Tensor>(scale_TK->contiguous())
                                          : std::nullopt;
  auto out = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute_cuda", [&] {
    with_weight_type<scalar_t>(scale, [&](auto w_tag) {
      using W = decltype(w_tag);
      constexpr int V = kVec16<scalar_t>;
      const bool vec = vec16_ok(x.const_data_ptr(), D, x.stride(0), sizeof(scalar_t)) &&
                       vec16_ok(out.const_data_ptr(), D, D, sizeof(scalar_t));
      auto launch = [&](auto kernel, int64_t nvec) {
        kernel<<<chunked_grid(N, nvec), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), x.stride(0), order.const_data_ptr<int64_t>(),
            weight_ptr<W>(scale), N, num_slots, static_cast<int>(K), nvec, out.mutable_data_ptr<scalar_t>());
      };
      if (vec) launch(permute_kernel<scalar_t, W, V>, D / V);
      else launch(permute_kernel<scalar_t, W, 1>, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

namespace {

// unpermute's launch: y's rows through rows_TK (N routed rows), or with slot_major (order_N given) a
// row per slot.
at::Tensor launch_unpermute(const at::Tensor& y_, int64_t N, const at::Tensor& rows_TK,
                            const std::optional<at::Tensor>& weights_TK, const int64_t* slot_major) {
  const int64_t T = rows_TK.size(0), K = rows_TK.size(1), D = y_.size(1);
  const auto y = unit_inner(y_);
  const auto rows = rows_TK.contiguous();
  const auto w = weights_TK.has_value() ? std::optional<at::Tensor>(weights_TK->contiguous())
                                        : std::nullopt;
  auto out = at::empty({T, D}, y.options());
  if (T == 0 || D == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_cuda", [&] {
    with_weight_type<scalar_t>(w, [&](auto w_tag) {
      using W = decltype(w_tag);
      constexpr int V = kVec16<scalar_t>;
      const bool vec = vec16_ok(y.const_data_ptr(), D, y.stride(0), sizeof(scalar_t)) &&
                       vec16_ok(out.const_data_ptr(), D, D, sizeof(scalar_t));
      auto launch = [&](auto kernel, int64_t nvec) {
        kernel<<<chunked_grid(T, nvec), kThreads, 0, stream>>>(
            y.const_data_ptr<scalar_t>(), y.stride(0), rows.const_data_ptr<int64_t>(),
            weight_ptr<W>(w), T, static_cast<int>(K), N, nvec, slot_major, out.mutable_data_ptr<scalar_t>());
      };
      if (vec) launch(unpermute_kernel<scalar_t, W, V>, D / V);
      else launch(unpermute_kernel<scalar_t, W, 1>, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

at::Tensor unpermute_cuda(const at::Tensor& y_ND, const at::Tensor& order_N,
                          const at::Tensor& rows_TK, const std::optional<at::Tensor>& weights_TK) {
  check_dispatch_args("unpermute", y_ND, "y_ND", order_N.size(0), "N, the plan's rows", order_N,
                      rows_TK);
  if (weights_TK.has_value()) check_weights_arg("unpermute", "weights_TK", *weights_TK, rows_TK, y_ND);
  c10::cuda::CUDAGuard guard(y_ND.device());
  return launch_unpermute(y_ND, y_ND.size(0), rows_TK, weights_TK, /*slot_major=*/nullptr);
}

at::Tensor sum_slots_cuda(const at::Tensor& y_SD, const at::Tensor& order_N, const at::Tensor& rows_TK) {
  TORCH_INTERNAL_ASSERT(y_SD.dim() == 2 && y_SD.size(0) == rows_TK.numel() && y_SD.is_cuda() &&
                        order_N.is_contiguous());
  c10::cuda::CUDAGuard guard(y_SD.device());
  return launch_unpermute(y_SD, order_N.size(0), rows_TK, std::nullopt, order_N.const_data_ptr<int64_t>());
}

namespace {

// unpermute_backward_kernel over the S slots: gy (with weights) and/or dw. The 16-byte vectors
// when grad's and y's rows allow them, as unpermute_weights_grad alone decides (so the dot
// products have its bits; gy, contiguous with D a multiple of the vector, then allows them too).
void launch_unpermute_backward(const at::Tensor& g, const at::Tensor& y, const at::Tensor& rows,
                               const at::Tensor* order, const std::optional<at::Tensor>& weights, int64_t N,
                               at::Tensor* gy, at::Tensor* dw) {
  const int64_t S = rows.numel(), K = rows.size(1), D = g.size(1);
  if (S == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "moe_unpermute_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_weight_type<scalar_t>(weights, [&](auto w_tag) {
      using W = decltype(w_tag);
      constexpr int V = kVec16<scalar_t>;
      const bool vec = vec16_ok(g.const_data_ptr(), D, g.stride(0), sizeof(scalar_t)) &&
                       (dw == nullptr || vec16_ok(y.const_data_ptr(), D, y.stride(0), sizeof(scalar_t))) &&
                       (gy == nullptr || vec16_ok(gy->const_data_ptr(), D, D, sizeof(scalar_t)));
      auto launch = [&](auto kernel, int64_t nvec) {
        kernel<<<rows_grid(S, kWarpsPerBlock), kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), g.stride(0), dw != nullptr ? y.const_data_ptr<scalar_t>() : nullptr,
            y.stride(0), rows.const_data_ptr<int64_t>(), order != nullptr ? order->const_data_ptr<int64_t>() : nullptr,
            weight_ptr<W>(weights), S, static_cast<int>(K), N, nvec,
            gy != nullptr ? gy->mutable_data_ptr<scalar_t>() : nullptr,
            dw != nullptr ? dw->mutable_data_ptr<acc_t>() : nullptr);
      };
      if (vec) launch(unpermute_backward_kernel<scalar_t, W, V>, D / V);
      else launch(unpermute_backward_kernel<scalar_t, W, 1>, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

at::Tensor unpermute_weights_grad_cuda(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                       const at::Tensor& order_N, const at::Tensor& rows_TK) {
  check_unpermute_weights_grad_args(grad_TD, y_ND, order_N, rows_TK);
  c10::cuda::CUDAGuard guard(y_ND.device());
  const int64_t T = rows_TK.size(0), K = rows_TK.size(1);
  const auto y = unit_inner(y_ND);
  const auto g = unit_inner(grad_TD);
  const auto rows = rows_TK.contiguous();
  auto out = at::empty({T, K}, y.options().dtype(accum_dtype(y.scalar_type())));
  launch_unpermute_backward(g, y, rows, nullptr, std::nullopt, y_ND.size(0), nullptr, &out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                                           const at::Tensor& order_N, const at::Tensor& rows_TK,
                                                           const at::Tensor& weights_TK, bool grad_y,
                                                           bool grad_weights) {
  check_unpermute_backward_args(grad_TD, y_ND, order_N, rows_TK, weights_TK);
  c10::cuda::CUDAGuard guard(grad_TD.device());
  const int64_t N = y_ND.size(0), T = rows_TK.size(0), K = rows_TK.size(1), D = grad_TD.size(1);
  const auto g = unit_inner(grad_TD);
  const auto y = grad_weights ? unit_inner(y_ND) : y_ND;
  const auto rows = rows_TK.contiguous();
  const auto order = order_N.contiguous();
  const std::optional<at::Tensor> w(weights_TK.contiguous());
  auto gy = at::empty({grad_y ? N : 0, D}, g.options());
  auto dw = at::empty({grad_weights ? T : 0, K}, g.options().dtype(accum_dtype(g.scalar_type())));
  if (grad_y || grad_weights)
    launch_unpermute_backward(g, y, rows, &order, w, N, grad_y ? &gy : nullptr, grad_weights ? &dw : nullptr);
  return {gy, dw};
}

}  // namespace moe::cuda

TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("plan", &moe::cuda::plan_cuda);
  m.impl("permute", &moe::cuda::permute_cuda);
  m.impl("unpermute", &moe::cuda::unpermute_cuda);
  m.impl("unpermute_weights_grad", &moe::cuda::unpermute_weights_grad_cuda);
  m.impl("unpermute_backward", &moe::cuda::unpermute_backward_cuda);
}
