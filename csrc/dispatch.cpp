// moe.permute / moe.unpermute / moe.unpermute_weights_grad on the CPU (at::parallel_for).
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

// AVX-512 versions of the bfloat16 row loops (cpu_vec.h), bit-identical to the scalar ones; the
// overloads for other dtypes return false and the scalar loop runs.
template <typename T, typename A>
bool fast_scale_row(const T*, A, T*, int64_t) { return false; }
template <typename T, typename A>
bool fast_axpy_row(const T*, const A*, A*, int64_t) { return false; }
template <typename A, typename T>
bool fast_store_row(const A*, T*, int64_t) { return false; }
template <typename T, typename A>
bool fast_dot_row(const T*, const T*, int64_t, A*) { return false; }

template <typename T>
constexpr bool can_stream() {
#ifdef MOE_HAVE_AVX512_ROWS
  return std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>;
#else
  return false;
#endif
}
template <typename T, typename A>
void stream_scale_row(const T*, A, T*, int64_t) {}  // never called: can_stream<T>() is false
template <typename T, typename A>
void fast_combine_rows(const T* const*, const A*, int64_t, T*, int64_t) {}  // likewise

#ifdef MOE_HAVE_AVX512_ROWS
template <typename T>
void stream_scale_row(const T* x, float w, T* o, int64_t D)
  requires(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) {
  vec::scale_row_stream(x, w, o, D);
}
template <typename T>
void fast_combine_rows(const T* const* rows, const float* w, int64_t n, T* o, int64_t D)
  requires(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) {
  vec::combine_rows(rows, w, n, o, D);
}
template <typename T>
bool fast_scale_row(const T* x, float w, T* o, int64_t D)
  requires(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) {
  vec::scale_row(x, w, o, D);
  return true;
}
template <typename T>
bool fast_axpy_row(const T* x, const float* w, float* acc, int64_t D)
  requires(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) {
  vec::axpy_row(x, w, acc, D);
  return true;
}
template <typename T>
bool fast_store_row(const float* acc, T* o, int64_t D)
  requires(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) {
  vec::store_row(acc, o, D);
  return true;
}
template <typename T>
bool fast_dot_row(const T* a, const T* b, int64_t D, float* out)
  requires(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>) {
  *out = vec::dot_row(a, b, D);
  return true;
}
#endif

}  // namespace

at::Tensor permute_cpu(const at::Tensor& x_TD, const at::Tensor& order_N,
                       const at::Tensor& rows_TK, const std::optional<at::Tensor>& scale_TK) {
  check_dispatch_args("permute", x_TD, "x_TD", rows_TK.size(0), "T, the plan's tokens", order_N,
                      rows_TK);
  if (scale_TK.has_value()) check_weights_arg("permute", "scale_TK", *scale_TK, rows_TK, x_TD);
  const int64_t N = order_N.size(0), K = rows_TK.size(1), D = x_TD.size(1), S = rows_TK.numel();
  const auto x = x_TD.stride(1) == 1 ? x_TD : x_TD.contiguous();
  const auto order = order_N.contiguous();
  auto out = empty_cpu({N, D}, x.options());
  const int64_t* ord = order.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AccWeights<acc_t> scale(scale_TK);
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t ld = x.stride(0);
    const bool fast = vec::avx512_rows();
    // An output far larger than the caches is written with non-temporal stores (no read for
    // ownership of each line, no eviction of what the gather reads).
    const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
    const bool stream = fast && can_stream<scalar_t>() && N * row_bytes >= kStreamBytes &&
                        row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0;
    at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s = ord[i];
        check_index(s, S, "order_N", i);
        // Rows are gathered in expert order, i.e. from scattered tokens: start fetching a later
        // row's first lines now (the hardware prefetcher follows within a row, not across rows).
        if (i + kAhead < end && ord[i + kAhead] >= 0 && ord[i + kAhead] < S)
          for (int64_t b = 0; b < D * int64_t(sizeof(scalar_t)); b += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(src + (ord[i + kAhead] / K) * ld) + b);
        scalar_t* o = dst + i * D;
        if (s < 0) {
          std::fill(o, o + D, scalar_t(0));
          continue;
        }
        const scalar_t* row = src + (s / K) * ld;
        if (stream) {
          if (scale.ptr == nullptr)
            vec::stream_copy(row, o, row_bytes);
          else
            stream_scale_row(row, scale.ptr[s], o, D);
        } else if (scale.ptr == nullptr) {
          std::memcpy(o, row, D * sizeof(scalar_t));
        } else {
          const acc_t w = scale.ptr[s];
          if (fast && fast_scale_row(row, w, o, D)) continue;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(static_cast<acc_t>(row[d]) * w);
        }
      }
      if (stream) vec::store_fence();
    });
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
    using acc_t = at::opmath_type<scalar_t>;
    const AccWeights<acc_t> w(weights_TK);
    const scalar_t* src = y.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t ld = y.stride(0);
    const bool fast = vec::avx512_rows();
    at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(D);
      std::vector<const scalar_t*> slot_rows(K);
      std::vector<acc_t> slot_w(K);
      for (int64_t t = begin; t < end; ++t) {
        if (fast && can_stream<scalar_t>()) {  // bf16/fp32 on AVX-512: sum in registers
          int64_t n = 0;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t r = row_of[t * K + k];
            check_index(r, N, "rows_TK", t * K + k);
            if (r < 0) continue;
            slot_rows[n] = src + r * ld;
            slot_w[n++] = w.ptr == nullptr ? acc_t(1) : w.ptr[t * K + k];
          }
          fast_combine_rows(slot_rows.data(), w.ptr == nullptr ? nullptr : slot_w.data(), n, dst + t * D, D);
          continue;
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = row_of[t * K + k];
          check_index(r, N, "rows_TK", t * K + k);
          if (r < 0) continue;
          const scalar_t* row = src + r * ld;
          if (fast && fast_axpy_row(row, w.ptr == nullptr ? nullptr : w.ptr + t * K + k, acc.data(), D))
            continue;
          if (w.ptr == nullptr) {
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
          } else {
            const acc_t wk = w.ptr[t * K + k];
            for (int64_t d = 0; d < D; ++d) acc[d] += wk * static_cast<acc_t>(row[d]);
          }
        }
        scalar_t* o = dst + t * D;
        if (fast && fast_store_row(acc.data(), o, D)) continue;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return out;
}

at::Tensor unpermute_weights_grad_cpu(const at::Tensor& grad_TD, const at::Tensor& y_ND,
                                      const at::Tensor& order_N, const at::Tensor& rows_TK) {
  check_unpermute_weights_grad_args(grad_TD, y_ND, order_N, rows_TK);
  const int64_t N = y_ND.size(0), T = rows_TK.size(0), K = rows_TK.size(1), D = y_ND.size(1);
  const auto y = y_ND.contiguous();
  const auto g = grad_TD.contiguous();
  const auto rows = rows_TK.contiguous();
  auto out = at::empty({T, K}, y.options().dtype(accum_dtype(y.scalar_type())));
  const int64_t* row_of = rows.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_wgrad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ys = y.const_data_ptr<scalar_t>();
    const scalar_t* gs = g.const_data_ptr<scalar_t>();
    acc_t* dw = out.mutable_data_ptr<acc_t>();
    const bool fast = vec::avx512_rows();
    at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = row_of[t * K + k];
          check_index(r, N, "rows_TK", t * K + k);
          if (r < 0) {
            dw[t * K + k] = acc_t(0);
            continue;
          }
          if (!(fast && fast_dot_row(gs + t * D, ys + r * D, D, dw + t * K + k)))
            dw[t * K + k] = dot<acc_t>(gs + t * D, ys + r * D, D);
        }
      }
    });
  });
  return out;
}

}  // namespace moe
