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
//   rule "xmoe" / "top_p" (the threshold router; softmax, no bias or groups): with a_k the sum of
//   p over the slots ranked above k (accumulated in double, rounded to the logits' dtype, as
//   torch.cumsum on the CPU), slot k > 0 is kept iff a_k < threshold ("xmoe", XMoE's threshold
//   gating) or a_k <= threshold ("top_p", top-p routing), compared in the logits' dtype; a_k
//   never decreases, so a token keeps a prefix (slot 0 always); the other slots get id -1 and
//   weight 0 (routers.topk.threshold_keep)
//   w_k = p_{ids_k} (/ (sum_k p_{ids_k} + eps) if norm_topk) * scaling over the kept slots, eps =
//   1e-20 for sigmoid
//   padded tokens (valid_T false): ids -1, weights 0; check_finite: a real token's non-finite
//   logit raises a ValueError
// Statistics, in the same call: counts_E (routed slots per expert, real tokens) and metrics
// (dropped_fraction 0, experts_per_token); with num_seqs = B > 0, over B sequences of S = T/B
// tokens, the loss statistics of routers.topk.route_statistics: s_e the loss scores (p_e, or for
// sigmoid p_e / (sum_j p_j + 1e-20)), the loss ids (ids_TK, or with a bias or groups the top_k of
// s, or with rule "xmoe" each token's first slot: XMoE's l_aux), psum_BE[b, e] = sum of s_e over
// b's real tokens, fw_BE[b, e] = f_be * has_b / (max(1, tokens_b) * max(1, sequences with a
// token)) * fw_scale with f_be = (b's loss slots on e) / max(1, b's loss slots), zsum = z_scale *
// the sum over real tokens of logsumexp(l)^2, balance = sum over (b, e) of fw_BE * psum_BE (a
// balance loss, its coefficient in fw_scale). The sums over tokens run in token order after the
// parallel pass (deterministic).
// The backward takes d weights_TK, (optional) d probs_TE, d psum_BE, d zsum (z_scale: zsum's
// factor in the forward) and d balance (with fw_BE: psum_BE's gradient gains d balance * fw_BE)
// and returns
// d logits_TE; slots with id -1 (padded tokens, slots a rule dropped) carry no gradient, and the
// renormalisation runs over the others, so the rules need nothing more there.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "moe_ops.h"

namespace moe {

void check_topk_route_args(const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E,
                           int64_t top_k, c10::string_view score, int64_t num_groups,
                           int64_t topk_groups, double scaling, const std::optional<at::Tensor>& valid_T,
                           int64_t num_seqs, c10::string_view rule, double threshold, double fw_scale,
                           double z_scale) {
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
  const int64_t T = logits_TE.size(0);
  if (valid_T.has_value())
    TORCH_CHECK(valid_T->dim() == 1 && valid_T->size(0) == T && valid_T->scalar_type() == at::kBool &&
                    valid_T->device() == logits_TE.device(),
                "moe.topk_route: valid_T must be a bool tensor of shape (", T, ",) on ", logits_TE.device(),
                ", got ", valid_T->scalar_type(), " ", valid_T->sizes(), " on ", valid_T->device());
  TORCH_CHECK(num_seqs >= 0 && (num_seqs == 0 || T % num_seqs == 0),
              "moe.topk_route: num_seqs must be 0 (no loss statistics) or divide T=", T, ", got ", num_seqs);
  TORCH_CHECK(rule == "none" || rule == "xmoe" || rule == "top_p",
              "moe.topk_route: rule must be 'none', 'xmoe' or 'top_p', got '", std::string(rule), "'");
  TORCH_CHECK(threshold > 0.0 && threshold <= 1.0, "moe.topk_route: threshold must be in (0, 1], got ", threshold);
  TORCH_CHECK(std::isfinite(fw_scale), "moe.topk_route: fw_scale must be finite, got ", fw_scale);
  TORCH_CHECK(std::isfinite(z_scale), "moe.topk_route: z_scale must be finite, got ", z_scale);
  if (rule != "none") {
    TORCH_CHECK(score == "softmax", "moe.topk_route: rule='", std::string(rule),
                "' needs score='softmax' (it cuts the cumulative probability), got '", std::string(score), "'");
    TORCH_CHECK(!bias_E.has_value() && num_groups == 0, "moe.topk_route: rule='", std::string(rule),
                "' takes no bias_E and no groups (num_groups=0): it ranks by probability");
  }
}

RouteRule route_rule(c10::string_view rule) {
  return rule == "xmoe" ? RouteRule::kXmoe : rule == "top_p" ? RouteRule::kTopP : RouteRule::kNone;
}

void check_topk_route_backward_args(const at::Tensor& grad_weights_TK,
                                    const std::optional<at::Tensor>& grad_probs_TE,
                                    const at::Tensor& ids_TK, const at::Tensor& probs_TE,
                                    c10::string_view score, const std::optional<at::Tensor>& grad_psum_BE,
                                    const std::optional<at::Tensor>& grad_zsum,
                                    const std::optional<at::Tensor>& logits_TE,
                                    const std::optional<at::Tensor>& valid_T, double z_scale,
                                    const std::optional<at::Tensor>& grad_balance,
                                    const std::optional<at::Tensor>& fw_BE) {
  TORCH_CHECK(std::isfinite(z_scale), "moe.topk_route_backward: z_scale must be finite, got ", z_scale);
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
  const int64_t T = probs_TE.size(0), E = probs_TE.size(1);
  const auto dt = probs_TE.scalar_type();
  if (grad_psum_BE.has_value())
    TORCH_CHECK(grad_psum_BE->dim() == 2 && grad_psum_BE->size(1) == E && grad_psum_BE->size(0) >= 1 &&
                    T % grad_psum_BE->size(0) == 0 && grad_psum_BE->scalar_type() == dt &&
                    grad_psum_BE->device() == probs_TE.device(),
                op, ": grad_psum_BE must be (B, E=", E, ") with B dividing T=", T, ", of probs_TE's dtype ", dt,
                " on ", probs_TE.device(), ", got ", grad_psum_BE->scalar_type(), " ", grad_psum_BE->sizes());
  if (grad_zsum.has_value()) {
    TORCH_CHECK(grad_zsum->dim() == 0 && grad_zsum->scalar_type() == dt && grad_zsum->device() == probs_TE.device(),
                op, ": grad_zsum must be a 0-d ", dt, " tensor on ", probs_TE.device(), ", got ",
                grad_zsum->scalar_type(), " ", grad_zsum->sizes());
    TORCH_CHECK(logits_TE.has_value(), op, ": grad_zsum needs logits_TE (the z statistic's input)");
  }
  if (logits_TE.has_value())
    TORCH_CHECK(logits_TE->sizes() == probs_TE.sizes() && logits_TE->scalar_type() == dt &&
                    logits_TE->device() == probs_TE.device(),
                op, ": logits_TE must match probs_TE (", dt, " ", probs_TE.sizes(), "), got ",
                logits_TE->scalar_type(), " ", logits_TE->sizes());
  if (valid_T.has_value())
    TORCH_CHECK(valid_T->dim() == 1 && valid_T->size(0) == T && valid_T->scalar_type() == at::kBool &&
                    valid_T->device() == probs_TE.device(),
                op, ": valid_T must be a bool tensor of shape (", T, ",), got ", valid_T->scalar_type(), " ",
                valid_T->sizes());
  if (grad_balance.has_value()) {
    TORCH_CHECK(grad_balance->dim() == 0 && grad_balance->scalar_type() == dt &&
                    grad_balance->device() == probs_TE.device(),
                op, ": grad_balance must be a 0-d ", dt, " tensor on ", probs_TE.device(), ", got ",
                grad_balance->scalar_type(), " ", grad_balance->sizes());
    TORCH_CHECK(fw_BE.has_value(), op, ": grad_balance needs fw_BE (balance = sum(fw_BE * psum_BE))");
  }
  if (fw_BE.has_value()) {
    TORCH_CHECK(fw_BE->dim() == 2 && fw_BE->size(1) == E && fw_BE->size(0) >= 1 && T % fw_BE->size(0) == 0 &&
                    fw_BE->scalar_type() == dt && fw_BE->device() == probs_TE.device(),
                op, ": fw_BE must be (B, E=", E, ") with B dividing T=", T, ", of probs_TE's dtype ", dt, " on ",
                probs_TE.device(), ", got ", fw_BE->scalar_type(), " ", fw_BE->sizes());
    if (grad_psum_BE.has_value())
      TORCH_CHECK(fw_BE->sizes() == grad_psum_BE->sizes(), op, ": fw_BE ", fw_BE->sizes(), " and grad_psum_BE ",
                  grad_psum_BE->sizes(), " must have one shape (B, E)");
  }
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

// The options of one routing call, and where its per-token results go.
template <typename T>
struct RouteArgs {
  const float* bias;
  const bool* valid;  // null: every token is real
  int64_t K, Z, topk_groups;
  bool softmax, norm, check_finite;
  bool stats, aux_topk;  // loss statistics; their ids are the top-k of the loss scores
  RouteRule rule;
  T threshold;
  int64_t loss_k;        // the loss ids are the first loss_k of each token's K (1 for "xmoe")
  T scaling;
  T fw_scale, z_scale;   // fw_BE's and zsum's factors (stats)
  T* lse2;               // (T,) logsumexp(l)^2 (stats)
  T* norm_T;             // (T,) sum_j p_j + 1e-20, the sigmoid loss scores' divisor (stats, sigmoid)
  int64_t* aux_ids;      // (T, K) the loss ids (stats, aux_topk)
};

template <typename T>
void route_rows(const at::Tensor& logits, const RouteArgs<T>& a, at::Tensor& ids, at::Tensor& weights,
                at::Tensor& probs) {
  const int64_t Tn = logits.size(0), E = logits.size(1), K = a.K, Z = a.Z;
  const T* lp = logits.const_data_ptr<T>();
  const int64_t ls = logits.stride(0), le = logits.stride(1);
  T* pp = probs.mutable_data_ptr<T>();
  T* wp = weights.mutable_data_ptr<T>();
  int64_t* ip = ids.mutable_data_ptr<int64_t>();
  const T eps = a.softmax ? T(0) : T(1e-20);
  std::atomic<bool> not_finite{false};
  at::parallel_for(0, Tn, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> choice(E), group_score(std::max<int64_t>(Z, 1)), best_v(K);
    std::vector<int64_t> best_i(K), group_best_i(std::max<int64_t>(a.topk_groups, 1));
    std::vector<char> allowed(E, 1);
    std::vector<T> group_best_v(std::max<int64_t>(a.topk_groups, 1));
    for (int64_t t = begin; t < end; ++t) {
      const T* l = lp + t * ls;
      T* p = pp + t * E;
      const bool real = a.valid == nullptr || a.valid[t];
      if (a.check_finite && real)
        for (int64_t e = 0; e < E; ++e)
          if (!std::isfinite(l[e * le])) not_finite.store(true, std::memory_order_relaxed);
      T mx = -std::numeric_limits<T>::infinity(), sum = 0;
      if (a.softmax || a.stats) {
        for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e * le]);
      }
      if (a.softmax) {
        for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e * le] - mx));
        for (int64_t e = 0; e < E; ++e) p[e] = p[e] / sum;
      } else {
        for (int64_t e = 0; e < E; ++e) p[e] = T(1) / (T(1) + std::exp(-l[e * le]));
        if (a.stats)
          for (int64_t e = 0; e < E; ++e) sum += std::exp(l[e * le] - mx);
      }
      if (a.stats) {
        const T lse = mx + std::log(sum);
        a.lse2[t] = lse * lse;
      }
      for (int64_t e = 0; e < E; ++e) choice[e] = a.bias ? p[e] + T(a.bias[e]) : p[e];
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
          insert_topk(group_score[z], z, group_best_v.data(), group_best_i.data(), ng, a.topk_groups);
        std::fill(allowed.begin(), allowed.end(), 0);
        for (int64_t g = 0; g < ng; ++g)
          std::fill(allowed.begin() + group_best_i[g] * per, allowed.begin() + (group_best_i[g] + 1) * per, 1);
      }
      int64_t n = 0;
      for (int64_t e = 0; e < E; ++e)
        if (allowed[e]) insert_topk(choice[e], e, best_v.data(), best_i.data(), n, K);
      T* w = wp + t * K;
      int64_t* id = ip + t * K;
      const int64_t kept = kept_slots(a.rule, a.threshold, p, best_i.data(), K);
      T wsum = 0;
      for (int64_t k = 0; k < K; ++k) {
        id[k] = k < kept ? best_i[k] : -1;
        w[k] = k < kept ? p[best_i[k]] : T(0);
        wsum += w[k];
      }
      for (int64_t k = 0; k < kept; ++k) w[k] = (a.norm ? w[k] / (wsum + eps) : w[k]) * a.scaling;
      if (!real)
        for (int64_t k = 0; k < K; ++k) {
          id[k] = -1;
          w[k] = T(0);
        }
      if (a.stats && !a.softmax) {
        T d = 0;
        for (int64_t e = 0; e < E; ++e) d += p[e];
        a.norm_T[t] = d + T(1e-20);
      }
      if (a.stats && a.aux_topk) {  // the plain top-k of the loss scores (no bias, no groups)
        int64_t na = 0;
        for (int64_t e = 0; e < E; ++e)
          insert_topk(a.softmax ? p[e] : p[e] / a.norm_T[t], e, best_v.data(), best_i.data(), na, K);
        for (int64_t k = 0; k < K; ++k) a.aux_ids[t * K + k] = real ? best_i[k] : -1;
      }
    }
  });
  TORCH_CHECK_VALUE(!not_finite.load(), "router logits contain NaN or inf (x or the router weights are not finite); "
                    "the router refuses to route them");
}

// counts_E and metrics (every call); fw_BE, psum_BE and zsum (num_seqs > 0). Sums over tokens
// run in token order (psum_BE in parallel over experts), so the results do not depend on threads.
template <typename T>
void route_statistics(const at::Tensor& ids, const at::Tensor& probs, const RouteArgs<T>& a, int64_t B,
                      at::Tensor& counts, at::Tensor& metrics, at::Tensor& fw, at::Tensor& psum, at::Tensor& zsum,
                      at::Tensor& balance) {
  const int64_t Tn = probs.size(0), E = probs.size(1), K = a.K;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  std::fill(cnt, cnt + E, 0);
  int64_t real = 0, kept = 0;
  for (int64_t t = 0; t < Tn; ++t) {
    real += (a.valid == nullptr || a.valid[t]) ? 1 : 0;
    for (int64_t k = 0; k < K; ++k)
      if (id[t * K + k] >= 0) {
        ++cnt[id[t * K + k]];
        ++kept;
      }
  }
  float* m = metrics.mutable_data_ptr<float>();
  m[0] = 0.0f;
  m[1] = static_cast<float>(kept) / std::max(1.0f, static_cast<float>(real));
  T* z = zsum.mutable_data_ptr<T>();
  z[0] = T(0);
  T* bal = balance.mutable_data_ptr<T>();
  bal[0] = T(0);
  if (B == 0) return;
  const int64_t S = Tn / B;
  const int64_t* lid = a.aux_topk ? a.aux_ids : id;
  const T* p = probs.const_data_ptr<T>();
  T* ps = psum.mutable_data_ptr<T>();
  T* f = fw.mutable_data_ptr<T>();
  std::fill(f, f + B * E, T(0));
  std::vector<T> tokens(B, T(0));
  for (int64_t t = 0; t < Tn; ++t) {
    if (a.valid != nullptr && !a.valid[t]) continue;
    tokens[t / S] += T(1);
    z[0] += a.lse2[t];
    for (int64_t k = 0; k < a.loss_k; ++k)
      if (lid[t * K + k] >= 0) f[(t / S) * E + lid[t * K + k]] += T(1);
  }
  z[0] = z[0] * a.z_scale;
  at::parallel_for(0, E, 16, [&](int64_t e0, int64_t e1) {  // each expert's sum in token order, row-wise
    for (int64_t b = 0; b < B; ++b) {
      T* acc = ps + b * E;
      std::fill(acc + e0, acc + e1, T(0));
      for (int64_t t = b * S; t < (b + 1) * S; ++t) {
        if (a.valid != nullptr && !a.valid[t]) continue;
        const T* pt = p + t * E;
        if (a.softmax) {
          for (int64_t e = e0; e < e1; ++e) acc[e] += pt[e];
        } else {
          for (int64_t e = e0; e < e1; ++e) acc[e] += pt[e] / a.norm_T[t];
        }
      }
    }
  });
  T has_total = 0;
  for (int64_t b = 0; b < B; ++b) has_total += tokens[b] > T(0) ? T(1) : T(0);
  for (int64_t b = 0; b < B; ++b) {
    T slots = 0;
    for (int64_t e = 0; e < E; ++e) slots += f[b * E + e];
    const T has = tokens[b] > T(0) ? T(1) : T(0);
    const T scale = has / (std::max(T(1), tokens[b]) * std::max(T(1), has_total)) * a.fw_scale;
    for (int64_t e = 0; e < E; ++e) f[b * E + e] = f[b * E + e] / std::max(T(1), slots) * scale;
  }
  for (int64_t i = 0; i < B * E; ++i) bal[0] += f[i] * ps[i];  // balance, in (b, e) order
}

template <typename T>
struct RouteGrads {
  const T* gp;       // (T, E) d probs, or null
  const T* gpsum;    // (B, E) d psum_BE, or null
  int64_t S;         // tokens per sequence (with gpsum)
  T gz;              // d zsum times z_scale (0 without)
  const T* logits;   // (T, E) contiguous (with gz)
  const bool* valid;
};

template <typename T>
void route_backward_rows(const at::Tensor& gw, const RouteGrads<T>& g_in, const at::Tensor& ids,
                         const at::Tensor& probs, bool softmax, bool norm, T scaling, at::Tensor& out) {
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
      const bool real = g_in.valid == nullptr || g_in.valid[t];
      T* dp = o_all + t * E;  // d probs first, then d logits in place
      for (int64_t e = 0; e < E; ++e) dp[e] = g_in.gp ? g_in.gp[t * E + e] : T(0);
      // w_k = s * p_k / (S + eps) with S = sum_j p_j: d p_k = s * (g_k / (S + eps) - sum_j g_j p_j / (S + eps)^2)
      // (slots with id -1, padded tokens, carry a constant 0 weight: no gradient)
      T denom = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) {
        TORCH_CHECK(id[k] >= -1 && id[k] < E, "moe.topk_route_backward: ids_TK[", t, ", ", k, "] = ", id[k],
                    " is outside [-1, E=", E, ")");
        if (id[k] >= 0) denom += p[id[k]];
      }
      denom += eps;
      for (int64_t k = 0; k < K; ++k)
        if (id[k] >= 0) dot += g[k] * scaling * p[id[k]];
      for (int64_t k = 0; k < K; ++k) {
        if (id[k] < 0) continue;
        const T gs = g[k] * scaling;
        dp[id[k]] += norm ? gs / denom - dot / (denom * denom) : gs;
      }
      if (g_in.gpsum && real) {  // psum_BE[b] += s: s = p (softmax) or p / (sum p + 1e-20) (sigmoid)
        const T* gs = g_in.gpsum + (t / g_in.S) * E;
        if (softmax) {
          for (int64_t e = 0; e < E; ++e) dp[e] += gs[e];
        } else {
          T d = 0, sdot = 0;
          for (int64_t e = 0; e < E; ++e) d += p[e];
          d += T(1e-20);
          for (int64_t e = 0; e < E; ++e) sdot += gs[e] * (p[e] / d);
          for (int64_t e = 0; e < E; ++e) dp[e] += (gs[e] - sdot) / d;
        }
      }
      if (softmax) {
        T s = 0;
        for (int64_t e = 0; e < E; ++e) s += dp[e] * p[e];
        for (int64_t e = 0; e < E; ++e) dp[e] = p[e] * (dp[e] - s);
      } else {
        for (int64_t e = 0; e < E; ++e) dp[e] = dp[e] * p[e] * (T(1) - p[e]);
      }
      if (g_in.logits && real && g_in.gz != T(0)) {  // zsum += lse^2: d l_e = 2 lse softmax(l)_e
        const T* l = g_in.logits + t * E;
        T mx = -std::numeric_limits<T>::infinity(), sum = 0;
        for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
        for (int64_t e = 0; e < E; ++e) sum += std::exp(l[e] - mx);
        const T c = T(2) * g_in.gz * (mx + std::log(sum)) / sum;
        for (int64_t e = 0; e < E; ++e) dp[e] += c * std::exp(l[e] - mx);
      }
    }
  });
}

}  // namespace

RouteBuffers route_buffers(const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E, int64_t top_k,
                           const std::optional<at::Tensor>& valid_T, int64_t num_seqs) {
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1), B = num_seqs;
  const auto opts = logits_TE.options();
  at::Tensor bias, valid;
  if (bias_E.has_value()) bias = bias_E->to(at::kFloat).contiguous();
  if (valid_T.has_value()) valid = valid_T->contiguous();
  return {at::empty({T, top_k}, opts.dtype(at::kLong)), at::empty({T, top_k}, opts), at::empty({T, E}, opts),
          at::empty({E}, opts.dtype(at::kLong)), at::empty({2}, opts.dtype(at::kFloat)),
          at::empty({B, E}, opts), at::empty({B, E}, opts), at::empty({}, opts), at::empty({}, opts), bias, valid};
}

RouteOutputs topk_route_cpu(const at::Tensor& logits_TE, const std::optional<at::Tensor>& bias_E, int64_t top_k,
                            c10::string_view score, int64_t num_groups, int64_t topk_groups, bool norm_topk,
                            double scaling, const std::optional<at::Tensor>& valid_T, int64_t num_seqs,
                            bool check_finite, c10::string_view rule, double threshold, double fw_scale,
                            double z_scale) {
  check_topk_route_args(logits_TE, bias_E, top_k, score, num_groups, topk_groups, scaling, valid_T, num_seqs, rule,
                        threshold, fw_scale, z_scale);
  const int64_t T = logits_TE.size(0), B = num_seqs;
  at::Tensor ids, weights, probs, counts, metrics, fw, psum, zsum, balance, bias, valid;
  std::tie(ids, weights, probs, counts, metrics, fw, psum, zsum, balance, bias, valid) =
      route_buffers(logits_TE, bias_E, top_k, valid_T, num_seqs);
  const bool softmax = score == "softmax", aux_topk = bias.defined() || num_groups > 0;
  const RouteRule r = route_rule(rule);
  AT_DISPATCH_FLOATING_TYPES(logits_TE.scalar_type(), "moe_topk_route_cpu", [&] {
    std::vector<scalar_t> lse2(B > 0 ? T : 0), norm_T(B > 0 && !softmax ? T : 0);
    std::vector<int64_t> aux_ids(B > 0 && aux_topk ? T * top_k : 0);
    RouteArgs<scalar_t> a{bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                          valid.defined() ? valid.const_data_ptr<bool>() : nullptr,
                          top_k, num_groups, topk_groups, softmax, norm_topk, check_finite, B > 0, aux_topk,
                          r, scalar_t(threshold), r == RouteRule::kXmoe ? 1 : top_k,
                          scalar_t(scaling), scalar_t(fw_scale), scalar_t(z_scale), lse2.data(), norm_T.data(), aux_ids.data()};
    route_rows<scalar_t>(logits_TE, a, ids, weights, probs);
    route_statistics<scalar_t>(ids, probs, a, B, counts, metrics, fw, psum, zsum, balance);
  });
  return {ids, weights, probs, counts, metrics, fw, psum, zsum, balance};
}

at::Tensor topk_route_backward_cpu(const at::Tensor& grad_weights_TK, const std::optional<at::Tensor>& grad_probs_TE,
                                   const at::Tensor& ids_TK, const at::Tensor& probs_TE, c10::string_view score,
                                   bool norm_topk, double scaling, const std::optional<at::Tensor>& grad_psum_BE,
                                   const std::optional<at::Tensor>& grad_zsum,
                                   const std::optional<at::Tensor>& logits_TE,
                                   const std::optional<at::Tensor>& valid_T, double z_scale,
                                   const std::optional<at::Tensor>& grad_balance,
                                   const std::optional<at::Tensor>& fw_BE) {
  check_topk_route_backward_args(grad_weights_TK, grad_probs_TE, ids_TK, probs_TE, score, grad_psum_BE, grad_zsum,
                                 logits_TE, valid_T, z_scale, grad_balance, fw_BE);
  const auto probs = probs_TE.contiguous();
  const auto gw = grad_weights_TK.contiguous();
  const auto ids = ids_TK.contiguous();
  at::Tensor gp, gpsum, logits, valid;
  if (grad_probs_TE.has_value()) gp = grad_probs_TE->contiguous();
  if (grad_psum_BE.has_value()) gpsum = grad_psum_BE->contiguous();
  if (grad_zsum.has_value()) logits = logits_TE->contiguous();
  if (valid_T.has_value()) valid = valid_T->contiguous();
  auto out = at::empty_like(probs);
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "moe_topk_route_backward_cpu", [&] {
    if (grad_balance.has_value()) {  // psum_BE's gradient gains d balance * fw_BE (a (B, E) host loop)
      const auto fw = fw_BE->contiguous();
      const scalar_t gb = grad_balance->item<scalar_t>();
      const scalar_t* f = fw.const_data_ptr<scalar_t>();
      auto eff = at::empty(fw.sizes(), fw.options());
      scalar_t* o = eff.mutable_data_ptr<scalar_t>();
      const scalar_t* gs = gpsum.defined() ? gpsum.const_data_ptr<scalar_t>() : nullptr;
      for (int64_t i = 0; i < fw.numel(); ++i) o[i] = (gs ? gs[i] : scalar_t(0)) + gb * f[i];
      gpsum = eff;
    }
    RouteGrads<scalar_t> g{gp.defined() ? gp.const_data_ptr<scalar_t>() : nullptr,
                           gpsum.defined() ? gpsum.const_data_ptr<scalar_t>() : nullptr,
                           gpsum.defined() ? probs.size(0) / gpsum.size(0) : 1,
                           grad_zsum.has_value() ? grad_zsum->item<scalar_t>() * scalar_t(z_scale) : scalar_t(0),
                           logits.defined() ? logits.const_data_ptr<scalar_t>() : nullptr,
                           valid.defined() ? valid.const_data_ptr<bool>() : nullptr};
    route_backward_rows<scalar_t>(gw, g, ids, probs, score == "softmax", norm_topk, scalar_t(scaling), out);
  });
  return out;
}

}  // namespace moe
