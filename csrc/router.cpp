// moe.topk_route and moe.topk_route_backward on the CPU: a token-choice router's scores,
// selection and weights in one pass over each token's logits (routers.topk.route_topk is the
// twin; TopKRouter and RecurrentRouter call the op).
//
// Per token t (row of logits_TE):
//   p_e = softmax(l)_e or sigmoid(l_e)                       (probs_TE, returned)
//   c_e = p_e + bias_e                                        (selection only, DeepSeek-V3 Eq. 16)
//   groups (num_groups > 0): a group's score is the sum of its two best c_e; experts outside the
//   topk_groups best groups are excluded (DeepSeek-V3 Sec. 2.1.2)
//   ids_TK = the top_k experts by c_e, best first (ties: the lower expert id first)
//   w_k = p_{ids_k} (/ (sum_k p_{ids_k} + eps) if norm_topk) * scaling, eps = 1e-20 for sigmoid
// The backward takes d weights_TK and (optional) d probs_TE (the balancing losses read the probs)
// and returns d logits_TE.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "moe_ops.h"

namespace moe {

void check_topk_route_args(const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E,
                           int64_t top_k, c10::string_view score, int64_t num_groups,
                           int64_t topk_groups, double scaling) {
  TORCH_CHECK(logits_TE.dim() == 2, "moe.topk_route: logits_TE must be 2-D (T, E), got shape ",
              logits_TE.sizes());
  TORCH_CHECK(logits_TE.scalar_type() == at::kFloat || logits_TE.scalar_type() == at::kDouble,
              "moe.topk_route: logits_TE must be float32 or float64, got ", logits_TE.scalar_type());
  const int64_t E = logits_TE.size(1);
  TORCH_CHECK(E >= 1, "moe.topk_route: logits_TE must have at least one expert column");
  if (bias_E.has_value()) {
    TORCH_CHECK(bias_E->dim() == 1 && bias_E->size(0) == E, "moe.topk_route: bias_E must have shape (",
                E, ",), got ", bias_E->sizes());
    TORCH_CHECK(bias_E->is_floating_point(), "moe.topk_route: bias_E must be floating point, got ",
                bias_E->scalar_type());
    TORCH_CHECK(bias_E->device() == logits_TE.device(), "moe.topk_route: bias_E is on ",
                bias_E->device(), " but logits_TE is on ", logits_TE.device());
  }
  TORCH_CHECK(score == "softmax" || score == "sigmoid",
              "moe.topk_route: score must be 'softmax' or 'sigmoid', got '", std::string(score), "'");
  TORCH_CHECK(num_groups >= 0, "moe.topk_route: num_groups must be >= 0 (0: no groups), got ", num_groups);
  int64_t allowed = E;
  if (num_groups > 0) {
    TORCH_CHECK(E % num_groups == 0, "moe.topk_route: num_groups=", num_groups,
                " must divide the number of experts E=", E);
    TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups, "moe.topk_route: topk_groups must be in [1, num_groups=",
                num_groups, "], got ", topk_groups);
    allowed = topk_groups * (E / num_groups);
  } else {
    TORCH_CHECK(topk_groups == 0, "moe.topk_route: topk_groups must be 0 when num_groups is 0, got ", topk_groups);
  }
  TORCH_CHECK(top_k >= 1 && top_k <= allowed, "moe.topk_route: top_k must be in [1, ", allowed,
              "] (the experts it may choose from), got ", top_k);
  TORCH_CHECK(std::isfinite(scaling), "moe.topk_route: scaling must be finite, got ", scaling);
}

void check_topk_route_backward_args(const at::Tensor& grad_weights_TK,
                                    const std::optional<at::Tensor>& grad_probs_TE,
                                    const at::Tensor& ids_TK, const at::Tensor& probs_TE,
                                    c10::string_view score) {
  const char* op = "moe.topk_route_backward";
  TORCH_CHECK(probs_TE.dim() == 2 && (probs_TE.scalar_type() == at::kFloat || probs_TE.scalar_type() == at::kDouble),
              op, ": probs_TE must be a 2-D float32 or float64 tensor, got ", probs_TE.scalar_type(), " ",
              probs_TE.sizes());
  TORCH_CHECK(ids_TK.dim() == 2 && ids_TK.scalar_type() == at::kLong && ids_TK.size(0) == probs_TE.size(0),
              op, ": ids_TK must be int64 (T, K) with T=", probs_TE.size(0), ", got ", ids_TK.scalar_type(),
              " ", ids_TK.sizes());
  TORCH_CHECK(grad_weights_TK.sizes() == ids_TK.sizes() && grad_weights_TK.scalar_type() == probs_TE.scalar_type(),
              op, ": grad_weights_TK must have ids_TK's shape ", ids_TK.sizes(), " and probs_TE's dtype ",
              probs_TE.scalar_type(), ", got ", grad_weights_TK.scalar_type(), " ", grad_weights_TK.sizes());
  if (grad_probs_TE.has_value())
    TORCH_CHECK(grad_probs_TE->sizes() == probs_TE.sizes() && grad_probs_TE->scalar_type() == probs_TE.scalar_type(),
                op, ": grad_probs_TE must match probs_TE (", probs_TE.scalar_type(), " ", probs_TE.sizes(),
                "), got ", grad_probs_TE->scalar_type(), " ", grad_probs_TE->sizes());
  for (const auto* t : {&grad_weights_TK, &ids_TK})
    TORCH_CHECK(t->device() == probs_TE.device(), op, ": all inputs must be on ", probs_TE.device());
  TORCH_CHECK(score == "softmax" || score == "sigmoid",
              op, ": score must be 'softmax' or 'sigmoid', got '", std::string(score), "'");
}

namespace {

// Inserts (value, id) into the descending list best[0..n) of capacity k; ids arrive in
// increasing order, so a tie keeps the earlier (lower) id first.
template <typename T>
inline void insert_topk(T value, int64_t id, T* best_v, int64_t* best_i, int64_t& n, int64_t k) {
  if (n == k && !(value > best_v[k - 1])) return;
  int64_t j = n < k ? n++ : k - 1;
  while (j > 0 && value > best_v[j - 1]) {
    best_v[j] = best_v[j - 1];
    best_i[j] = best_i[j - 1];
    --j;
  }
  best_v[j] = value;
  best_i[j] = id;
}

template <typename T>
void route_rows(const at::Tensor& logits, const float* bias, int64_t K, bool softmax, int64_t Z,
                int64_t topk_groups, bool norm, T scaling, at::Tensor& ids, at::Tensor& weights,
                at::Tensor& probs) {
  const int64_t Tn = logits.size(0), E = logits.size(1);
  const T* lp = logits.const_data_ptr<T>();
  const int64_t ls = logits.stride(0), le = logits.stride(1);
  T* pp = probs.mutable_data_ptr<T>();
  T* wp = weights.mutable_data_ptr<T>();
  int64_t* ip = ids.mutable_data_ptr<int64_t>();
  const T eps = softmax ? T(0) : T(1e-20);
  at::parallel_for(0, Tn, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> choice(E), group_score(std::max<int64_t>(Z, 1)), best_v(K);
    std::vector<int64_t> best_i(K), group_best_i(std::max<int64_t>(topk_groups, 1));
    std::vector<char> allowed(E, 1);
    std::vector<T> group_best_v(std::max<int64_t>(topk_groups, 1));
    for (int64_t t = begin; t < end; ++t) {
      const T* l = lp + t * ls;
      T* p = pp + t * E;
      if (softmax) {
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e * le]);
        T sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e * le] - mx));
        for (int64_t e = 0; e < E; ++e) p[e] = p[e] / sum;
      } else {
        for (int64_t e = 0; e < E; ++e) p[e] = T(1) / (T(1) + std::exp(-l[e * le]));
      }
      for (int64_t e = 0; e < E; ++e) choice[e] = bias ? p[e] + T(bias[e]) : p[e];
      if (Z > 0) {  // the topk_groups best groups by the sum of their two best choice scores
        const int64_t per = E / Z;
        for (int64_t z = 0; z < Z; ++z) {
          T two[2];
          int64_t ids2[2], n2 = 0;
          for (int64_t e = z * per; e < (z + 1) * per; ++e) insert_topk(choice[e], e, two, ids2, n2, per >= 2 ? 2 : 1);
          group_score[z] = n2 == 2 ? two[0] + two[1] : two[0];
        }
        int64_t ng = 0;
        for (int64_t z = 0; z < Z; ++z)
          insert_topk(group_score[z], z, group_best_v.data(), group_best_i.data(), ng, topk_groups);
        std::fill(allowed.begin(), allowed.end(), 0);
        for (int64_t g = 0; g < ng; ++g)
          std::fill(allowed.begin() + group_best_i[g] * per, allowed.begin() + (group_best_i[g] + 1) * per, 1);
      }
      int64_t n = 0;
      for (int64_t e = 0; e < E; ++e)
        if (allowed[e]) insert_topk(choice[e], e, best_v.data(), best_i.data(), n, K);
      T* w = wp + t * K;
      int64_t* id = ip + t * K;
      T sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        id[k] = best_i[k];
        w[k] = p[best_i[k]];
        sum += w[k];
      }
      for (int64_t k = 0; k < K; ++k) w[k] = (norm ? w[k] / (sum + eps) : w[k]) * scaling;
    }
  });
}

template <typename T>
void route_backward_rows(const at::Tensor& gw, const T* gp, const at::Tensor& ids, const at::Tensor& probs,
                         bool softmax, bool norm, T scaling, at::Tensor& out) {
  const int64_t Tn = probs.size(0), E = probs.size(1), K = ids.size(1);
  const T* p_all = probs.const_data_ptr<T>();
  const T* gw_all = gw.const_data_ptr<T>();
  const int64_t* id_all = ids.const_data_ptr<int64_t>();
  T* o_all = out.mutable_data_ptr<T>();
  const T eps = softmax ? T(0) : T(1e-20);
  at::parallel_for(0, Tn, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* p = p_all + t * E;
      const T* g = gw_all + t * K;
      const int64_t* id = id_all + t * K;
      T* dp = o_all + t * E;  // d probs first, then d logits in place
      for (int64_t e = 0; e < E; ++e) dp[e] = gp ? gp[t * E + e] : T(0);
      // w_k = s * p_k / (S + eps) with S = sum_j p_j: d p_k = s * (g_k / (S + eps) - sum_j g_j p_j / (S + eps)^2)
      T denom = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) {
        TORCH_CHECK(id[k] >= 0 && id[k] < E, "moe.topk_route_backward: ids_TK[", t, ", ", k, "] = ", id[k],
                    " is outside [0, E=", E, ")");
        denom += p[id[k]];
      }
      denom += eps;
      for (int64_t k = 0; k < K; ++k) dot += g[k] * scaling * p[id[k]];
      for (int64_t k = 0; k < K; ++k) {
        const T gs = g[k] * scaling;
        dp[id[k]] += norm ? gs / denom - dot / (denom * denom) : gs;
      }
      if (softmax) {
        T s = 0;
        for (int64_t e = 0; e < E; ++e) s += dp[e] * p[e];
        for (int64_t e = 0; e < E; ++e) dp[e] = p[e] * (dp[e] - s);
      } else {
        for (int64_t e = 0; e < E; ++e) dp[e] = dp[e] * p[e] * (T(1) - p[e]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_route_cpu(
    const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E, int64_t top_k,
    c10::string_view score, int64_t num_groups, int64_t topk_groups, bool norm_topk, double scaling) {
  check_topk_route_args(logits_TE, bias_E, top_k, score, num_groups, topk_groups, scaling);
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  auto probs = at::empty({T, E}, logits_TE.options());
  auto weights = at::empty({T, top_k}, logits_TE.options());
  auto ids = at::empty({T, top_k}, logits_TE.options().dtype(at::kLong));
  at::Tensor bias;
  if (bias_E.has_value()) bias = bias_E->to(at::kFloat).contiguous();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(logits_TE.scalar_type(), "moe_topk_route_cpu", [&] {
    route_rows<scalar_t>(logits_TE, bp, top_k, score == "softmax", num_groups, topk_groups, norm_topk,
                         scalar_t(scaling), ids, weights, probs);
  });
  return {ids, weights, probs};
}

at::Tensor topk_route_backward_cpu(const at::Tensor& grad_weights_TK, const std::optional<at::Tensor>& grad_probs_TE,
                                   const at::Tensor& ids_TK, const at::Tensor& probs_TE, c10::string_view score,
                                   bool norm_topk, double scaling) {
  check_topk_route_backward_args(grad_weights_TK, grad_probs_TE, ids_TK, probs_TE, score);
  const auto probs = probs_TE.contiguous();
  const auto gw = grad_weights_TK.contiguous();
  const auto ids = ids_TK.contiguous();
  at::Tensor gp;
  if (grad_probs_TE.has_value()) gp = grad_probs_TE->contiguous();
  auto out = at::empty_like(probs);
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "moe_topk_route_backward_cpu", [&] {
    route_backward_rows<scalar_t>(gw, gp.defined() ? gp.const_data_ptr<scalar_t>() : nullptr, ids, probs,
                                  score == "softmax", norm_topk, scalar_t(scaling), out);
  });
  return out;
}

}  // namespace moe
