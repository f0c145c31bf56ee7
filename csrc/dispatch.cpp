// moe.permute / moe.unpermute / moe.unpermute_weights_grad / moe.unpermute_backward on the CPU
// (at::parallel_for). unpermute_backward is the weighted unpermute's backward in one pass per
// token: permute(grad, weights)'s rows and unpermute_weights_grad's dot products, the same bits.
//
// Each op reads the plan (order_N, rows_TK) produced by moe.plan. Empty slots (-1) are skipped
// and never read; accumulation is in at::opmath_type (float32 for half/bfloat16), in slot order
// k = 0..K-1 so results equal the PyTorch twins in moe/ops_torch.py bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "host_cache.h"
#include "moe_ops.h"

namespace moe {

namespace {

constexpr int64_t kRowGrain = 16;
constexpr int64_t kStreamBytes = int64_t(8) << 20;  // outputs from this size: streaming stores
constexpr int64_t kAhead = 2;  // rows of software prefetch ahead in the permute gather

// Scale/weights read as the accumulation type, whatever their stored dtype (float32 or x's):
// the tensor itself when it already is contiguous acc_t (no copy), else one converted copy.
template <typename acc_t>
struct AccWeights {
  at::Tensor held;
  const acc_t* ptr = nullptr;
  explicit AccWeights(const std::optional<at::Tensor>& w_TK) {
    if (!w_TK.has_value()) return;
    held = w_TK->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    ptr = held.template const_data_ptr<acc_t>();
  }
};

void check_index(int64_t idx, int64_t limit, const char* what, int64_t where) {
  TORCH_CHECK(idx >= -1 && idx < limit, "moe: ", what, "[", where, "] = ", idx,
              " is outside [-1, ", limit, "): the plan does not match the data");
}

// <a, b> in acc_t over kLanes independent partial sums (the compiler vectorizes them, where one
// running sum is a serial chain of dependent adds), combined at the end.
template <typename acc_t, typename scalar_t>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t D) {
  constexpr int64_t kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l)
      part[l] += static_cast<acc_t>(a[d + l]) * static_cast<acc_t>(b[d + l]);
  for (; d < D; ++d) part[d % kLanes] += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// The AVX-512 row loops (cpu_vec.h) are bit-identical to the scalar ones.
using vec::kVecRows;

// o = row * w, each product rounded to scalar_t (the AVX-512 loop where `fast`: the same bits).
template <typename scalar_t>
void scale_row_to(const scalar_t* row, at::opmath_type<scalar_t> w, scalar_t* o, int64_t D, bool fast) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kVecRows<scalar_t>) {
    if (fast) {
      vec::scale_row(row, w, o, D);
      return;
    }
  }
  for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(static_cast<acc_t>(row[d]) * w);
}

template <typename scalar_t>
void permute_rows(const at::Tensor& x, const int64_t* ord, const std::optional<at::Tensor>& scale_TK,
                  int64_t N, int64_t K, int64_t num_slots, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const AccWeights<acc_t> scale(scale_TK);
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const int64_t ld = x.stride(0), D = x.size(1);
  const bool fast = kVecRows<scalar_t> && vec::avx512_rows();
  // An output far larger than the caches is written with non-temporal stores (no read for
  // ownership of each line, no eviction of what the gather reads).
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  const bool stream = fast && N * row_bytes >= kStreamBytes && row_bytes % 64 == 0 &&
                      reinterpret_cast<uintptr_t>(dst) % 64 == 0;
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = ord[i];
      check_index(s, num_slots, "order_N", i);
      // Rows are gathered in expert order, i.e. from scattered tokens: start fetching a later
      // row now (the hardware prefetcher follows within a row, not across rows).
      if (i + kAhead < end && ord[i + kAhead] >= 0 && ord[i + kAhead] < num_slots)
        for (int64_t b = 0; b < row_bytes; b += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(src + (ord[i + kAhead] / K) * ld) + b);
      scalar_t* o = dst + i * D;
      if (s < 0) {
        std::fill(o, o + D, scalar_t(0));
        continue;
      }
      const scalar_t* row = src + (s / K) * ld;
      if constexpr (kVecRows<scalar_t>) {
        if (stream && scale.ptr == nullptr) {
          vec::stream_copy(row, o, row_bytes);
          continue;
        }
        if (stream) {
          vec::scale_row_stream(row, scale.ptr[s], o, D);
          continue;
        }
      }
      if (scale.ptr == nullptr) {
        std::memcpy(o, row, row_bytes);
      } else {
        scale_row_to(row, scale.ptr[s], o, D, fast);
      }
    }
    if (stream) vec::store_fence();
  });
}

template <typename scalar_t>
void unpermute_rows(const at::Tensor& y, const int64_t* row_of,
                    const std::optional<at::Tensor>& weights_TK, int64_t N, int64_t T, int64_t K,
                    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const AccWeights<acc_t> w(weights_TK);
  const scalar_t* src = y.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const int64_t ld = y.stride(0), D = y.size(1);
  const bool fast = kVecRows<scalar_t> && vec::avx512_rows();
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> slot_rows(K);
    std::vector<acc_t> slot_w(K), acc(fast ? 0 : D);
    for (int64_t t = begin; t < end; ++t) {
      if constexpr (kVecRows<scalar_t>) {
        if (fast) {  // each token's slots summed in registers, 16 lanes at a time
          int64_t n = 0;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t r = row_of[t * K + k];
            check_index(r, N, "rows_TK", t * K + k);
            if (r < 0) continue;
            slot_rows[n] = src + r * ld;
            slot_w[n++] = w.ptr == nullptr ? acc_t(1) : w.ptr[t * K + k];
          }
          vec::combine_rows(slot_rows.data(), w.ptr == nullptr ? nullptr : slot_w.data(), n,
                            dst + t * D, D);
          continue;
        }
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_of[t * K + k];
        check_index(r, N, "rows_TK", t * K + k);
        if (r < 0) continue;
        const scalar_t* row = src + r * ld;
        if (w.ptr == nullptr) {
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
        } else {
          const acc_t wk = w.ptr[t * K + k];
          for (int64_t d = 0; d < D; ++d) acc[d] += wk * static_cast<acc_t>(row[d]);
        }
      }
      scalar_t* o = dst + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

// The weighted unpermute's backward, one pass over each token's slots (tokens in parallel): with
// gy, gy[r] = grad[t] * w[t, k] for slot (t, k)'s row r (permute's arithmetic: its rows, for a
// plan whose rows_TK inverts its order_N); with dw, dw[t, k] = <grad[t], y[r]> (0 for an empty
// slot). gy's rows that no slot reaches (padding) are left to the caller. grad and y contiguous.
template <typename scalar_t>
void unpermute_backward_rows(const at::Tensor& g, const at::Tensor& y, const int64_t* row_of,
                             const at::opmath_type<scalar_t>* w, int64_t N, int64_t T, int64_t K,
                             scalar_t* gy, at::opmath_type<scalar_t>* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gs = g.const_data_ptr<scalar_t>();
  const scalar_t* ys = dw != nullptr ? y.const_data_ptr<scalar_t>() : nullptr;
  const int64_t D = g.size(1);
  const bool fast = kVecRows<scalar_t> && vec::avx512_rows();
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* gt = gs + t * D;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = t * K + k, r = row_of[s];
        check_index(r, N, "rows_TK", s);
        if (r < 0) {
          if (dw != nullptr) dw[s] = acc_t(0);
          continue;
        }
        if (gy != nullptr) scale_row_to(gt, w[s], gy + r * D, D, fast);
        if (dw == nullptr) continue;
        if constexpr (kVecRows<scalar_t>) {
          if (fast) {
            dw[s] = vec::dot_row(gt, ys + r * D, D);
            continue;
          }
        }
        dw[s] = dot<acc_t>(gt, ys + r * D, D);
      }
    }
  });
}

// Zeros the rows i of out (N, D) whose order_N[i] is -1: permute's padding rows.
template <typename scalar_t>
void zero_padding_rows(const int64_t* ord, int64_t N, int64_t num_slots, scalar_t* out, int64_t D) {
  at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      check_index(ord[i], num_slots, "order_N", i);
      if (ord[i] < 0) std::fill(out + i * D, out + (i + 1) * D, scalar_t(0));
    }
  });
}

}  // namespace

at::Tensor permute_cpu(const at::Tensor& x_TD, const at::Tensor& order_N,
                       const at::Tensor& rows_TK, const std::optional<at::Tensor>& scale_TK) {
  check_dispatch_args("permute", x_TD, "x_TD", rows_TK.size(0), "T, the plan's tokens", order_N,
                      rows_TK);
  if (scale_TK.has_value()) check_weights_arg("permute", "scale_TK", *scale_TK, rows_TK, x_TD);
  const int64_t N = order_N.size(0), K = rows_TK.size(1), D = x_TD.size(1), num_slots = rows_TK.numel();
  const auto x = x_TD.stride(1) == 1 ? x_TD : x_TD.contiguous();
  const auto order = order_N.contiguous();
  auto out = empty_cpu({N, D}, x.options());
  const int64_t* ord = order.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute_cpu", [&] {
    permute_rows<scalar_t>(x, ord, scale_TK, N, K, num_slots, out);
  });
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& y_ND, const at::Tensor& order_N,
                         const at::Tensor& rows_TK, const std::optional<at::Tensor>& weights_TK) {
  check_dispatch_args("unpermute", y_ND, "y_ND", order_N.size(0), "N, the plan's rows", order_N,
                      rows_TK);
  if (weights_TK.has_value()) check_weights_arg("unpermute", "weights_TK", *weights_TK, rows_TK, y_ND);
  const int64_t N = y_ND.size(0), T = rows_TK.size(0), K = rows_TK.size(1), D = y_ND.size(1);
  const auto y = y_ND.stride(1) == 1 ? y_ND : y_ND.contiguous();
  const auto rows = rows_TK.contiguous();
  auto out = empty_cpu({T, D}, y.options());
  const int64_t* row_of = rows.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_cpu", [&] {
    unpermute_rows<scalar_t>(y, row_of, weights_TK, N, T, K, out);
  });
  return out;
}

at::Tensor unpermute_weights_grad_cpu(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                      const at::Tensor& order_N, const at::Tensor& rows_TK) {
  check_unpermute_weights_grad_args(grad_TD, y_ND, order_N, rows_TK);
  const int64_t N = y_ND.size(0), T = rows_TK.size(0), K = rows_TK.size(1);
  const auto y = y_ND.contiguous();
  const auto g = grad_TD.contiguous();
  const auto rows = rows_TK.contiguous();
  auto out = at::empty({T, K}, y.options().dtype(accum_dtype(y.scalar_type())));
  const int64_t* row_of = rows.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_wgrad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    unpermute_backward_rows<scalar_t>(g, y, row_of, nullptr, N, T, K, nullptr, out.mutable_data_ptr<acc_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                                          const at::Tensor& order_N, const at::Tensor& rows_TK,
                                                          const at::Tensor& weights_TK, bool grad_y,
                                                          bool grad_weights) {
  check_unpermute_backward_args(grad_TD, y_ND, order_N, rows_TK, weights_TK);
  const int64_t N = y_ND.size(0), T = rows_TK.size(0), K = rows_TK.size(1), D = grad_TD.size(1);
  const auto g = grad_TD.contiguous();
  const auto y = grad_weights ? y_ND.contiguous() : y_ND;
  const auto rows = rows_TK.contiguous();
  const auto order = order_N.contiguous();
  auto gy = grad_y ? empty_cpu({N, D}, g.options()) : at::empty({0, D}, g.options());
  auto dw = at::empty({grad_weights ? T : 0, K}, g.options().dtype(accum_dtype(g.scalar_type())));
  if (!grad_y && !grad_weights) return {gy, dw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "moe_unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AccWeights<acc_t> w(weights_TK);
    scalar_t* gy_ptr = grad_y ? gy.mutable_data_ptr<scalar_t>() : nullptr;
    unpermute_backward_rows<scalar_t>(g, y, rows.const_data_ptr<int64_t>(), w.ptr, N, T, K, gy_ptr,
                                      grad_weights ? dw.mutable_data_ptr<acc_t>() : nullptr);
    if (grad_y) zero_padding_rows<scalar_t>(order.const_data_ptr<int64_t>(), N, T * K, gy_ptr, D);
  });
  return {gy, dw};
}

}  // namespace moe
