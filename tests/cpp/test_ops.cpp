// ctest for the libtorch build (CMakeLists.txt): each torch.ops.moe op, reached through the
// dispatcher as a C++ user would, against simple reference loops. No Python involved.
//
// Shape legend: T tokens, K slots, E experts, N = T*K routed rows, D feature dim, X/Y GEMM dims.
// Dispatch ops must match exactly; GEMMs (float64) to 1e-12. With a CUDA build and a GPU, the
// CUDA kernels are compared with the CPU kernels too.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

int g_failures = 0;

#define EXPECT(cond, what)                                                   \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, what, #cond); \
      ++g_failures;                                                          \
    }                                                                        \
  } while (0)

using PlanT = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptT = std::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

PlanT plan(const at::Tensor& ids, int64_t E) {
  return op<PlanT(const at::Tensor&, int64_t)>("moe::plan").call(ids, E);
}
at::Tensor permute(const at::Tensor& x, const PlanT& p, const OptT& s) {
  return op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&)>(
             "moe::permute").call(x, std::get<2>(p), std::get<3>(p), s);
}
at::Tensor unpermute(const at::Tensor& y, const PlanT& p, const OptT& w) {
  return op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&)>(
             "moe::unpermute").call(y, std::get<2>(p), std::get<3>(p), w);
}
at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs) {
  return op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("moe::grouped_mm")
      .call(a, b, offs);
}
at::Tensor grouped_mm_wgrad(const at::Tensor& a, const at::Tensor& g, const at::Tensor& offs) {
  return op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
             "moe::grouped_mm_wgrad").call(a, g, offs);
}

// Random ids in [-1, E) with every third-ish slot empty and expert 0 left empty when E > 2.
at::Tensor random_ids(int64_t T, int64_t K, int64_t E, at::ScalarType dtype) {
  auto ids = at::randint(-1, E, {T, K}, at::kLong);
  if (E > 2) ids.masked_fill_(ids.eq(0), 1);
  return ids.to(dtype);
}

void test_plan(int64_t T, int64_t K, int64_t E, at::ScalarType dtype) {
  const auto ids = random_ids(T, K, E, dtype);
  const auto [counts, offs, order, rows] = plan(ids, E);
  const auto flat = ids.to(at::kLong).reshape(-1);
  const int64_t S = T * K;
  std::vector<int64_t> ref_counts(E, 0), ref_order, ref_rows(S, -1);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t s = 0; s < S; ++s)
      if (flat[s].item<int64_t>() == e) {
        ref_rows[s] = static_cast<int64_t>(ref_order.size());
        ref_order.push_back(s);  // stable: slots of one expert in flat order
        ++ref_counts[e];
      }
  const int64_t routed = static_cast<int64_t>(ref_order.size());
  int64_t end = 0;
  for (int64_t e = 0; e < E; ++e) {
    end += ref_counts[e];
    EXPECT(counts[e].item<int>() == ref_counts[e], "plan counts_E");
    EXPECT(offs[e].item<int>() == end, "plan offs_E");
  }
  EXPECT(order.numel() == S && rows.sizes() == ids.sizes(), "plan shapes");
  for (int64_t i = 0; i < S; ++i)
    EXPECT(order[i].item<int64_t>() == (i < routed ? ref_order[i] : -1), "plan order_N");
  for (int64_t s = 0; s < S; ++s)
    EXPECT(rows.reshape(-1)[s].item<int64_t>() == ref_rows[s], "plan rows_TK");
}

void test_dispatch(int64_t T, int64_t K, int64_t E, int64_t D) {
  const auto ids = random_ids(T, K, E, at::kLong);
  const auto p = plan(ids, E);
  const auto& order = std::get<2>(p);
  const auto& rows = std::get<3>(p);
  const auto x = at::randn({T, D}, at::kFloat);
  const auto scale = at::rand({T, K}, at::kFloat);
  const auto x_ND = permute(x, p, std::nullopt);
  const auto xs_ND = permute(x, p, scale);
  for (int64_t i = 0; i < T * K; ++i) {
    const int64_t s = order[i].item<int64_t>();
    const auto want = s < 0 ? at::zeros({D}) : x[s / K];
    EXPECT(at::equal(x_ND[i], want), "permute row");
    const auto want_s = s < 0 ? at::zeros({D}) : x[s / K] * scale.reshape(-1)[s];
    EXPECT(at::equal(xs_ND[i], want_s), "permute scaled row");
  }
  const auto y = at::randn({T * K, D}, at::kFloat);
  const auto w = at::rand({T, K}, at::kFloat);
  const auto out = unpermute(y, p, w);
  auto ref = at::zeros({T, D}, at::kFloat);
  auto ya = y.accessor<float, 2>();
  auto ra = ref.accessor<float, 2>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = rows[t][k].item<int64_t>();
      if (r < 0) continue;
      const float wk = w[t][k].item<float>();
      for (int64_t d = 0; d < D; ++d) ra[t][d] = ra[t][d] + wk * ya[r][d];
    }
  EXPECT(at::equal(out, ref), "unpermute (slot order, float32)");
}

void test_grouped_mm(int64_t N, int64_t X, int64_t Y, const std::vector<int>& offs_v, bool b_t) {
  const int64_t E = static_cast<int64_t>(offs_v.size());
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const auto a = at::randn({N, X}, opts);
  const auto b = b_t ? at::randn({E, Y, X}, opts).transpose(1, 2) : at::randn({E, X, Y}, opts);
  const auto offs = at::tensor(offs_v, at::kInt);
  const auto c = grouped_mm(a, b, offs);
  const auto g = at::randn({N, Y}, opts);
  const auto wg = grouped_mm_wgrad(a, g, offs);
  auto ref = at::zeros({N, Y}, opts);
  auto ref_w = at::zeros({E, X, Y}, opts);
  int64_t lo = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t hi = offs_v[e];
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t y = 0; y < Y; ++y) {
        double acc = 0;
        for (int64_t x = 0; x < X; ++x) acc += a[r][x].item<double>() * b[e][x][y].item<double>();
        ref[r][y] = acc;
      }
    for (int64_t x = 0; x < X; ++x)
      for (int64_t y = 0; y < Y; ++y) {
        double acc = 0;
        for (int64_t r = lo; r < hi; ++r) acc += a[r][x].item<double>() * g[r][y].item<double>();
        ref_w[e][x][y] = acc;
      }
    lo = hi;
  }
  EXPECT(at::allclose(c, ref, 1e-12, 1e-12), "grouped_mm vs loops (rows past offs_E[-1] zero)");
  EXPECT(at::allclose(wg, ref_w, 1e-12, 1e-12), "grouped_mm_wgrad vs loops (empty experts zero)");
}

// gather_grouped_mm(_wgrad) on x_TD equal grouped_mm(_wgrad) on permute(x_TD), bit for bit.
void test_gather_grouped_mm(at::ScalarType dtype) {
  const int64_t T = 40, K = 3, E = 5, X = 70, Y = 66;
  const auto p = plan(random_ids(T, K, E, at::kLong), E);
  const auto x = at::randn({T, X}).to(dtype);
  const auto b = at::randn({E, X, Y}).to(dtype);
  const auto g = at::randn({T * K, Y}).to(dtype);
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&);
  const auto& offs = std::get<1>(p);
  const auto got = op<Sig>("moe::gather_grouped_mm").call(x, std::get<2>(p), std::get<3>(p), b, offs);
  using SigW = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, bool);
  const auto wgrad = op<SigW>("moe::gather_grouped_mm_wgrad");
  const auto got_w = wgrad.call(x, std::get<2>(p), std::get<3>(p), g, offs, false);
  const auto got_yx = wgrad.call(x, std::get<2>(p), std::get<3>(p), g, offs, true);
  const auto x_ND = permute(x, p, std::nullopt);
  EXPECT(at::equal(got, grouped_mm(x_ND, b, offs)), "gather_grouped_mm == grouped_mm(permute(x))");
  EXPECT(at::equal(got_w, grouped_mm_wgrad(x_ND, g, offs)),
         "gather_grouped_mm_wgrad == grouped_mm_wgrad(permute(x))");
  EXPECT(at::equal(got_yx, got_w) && got_yx.stride(1) == 1,
         "gather_grouped_mm_wgrad(out_yx=true): the same values, stored (E, Y, X)");
}

// swiglu against silu(gate) * up in float64 loops; linear_f32 against float64 dot products.
void test_swiglu_and_linear_f32() {
  const auto h = at::randn({7, 2 * 19}, at::kDouble) * 3;
  const auto out = op<at::Tensor(const at::Tensor&)>("moe::swiglu").call(h);
  const auto grad = at::randn({7, 19}, at::kDouble);
  const auto dh = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("moe::swiglu_backward").call(grad, h);
  auto ref = at::zeros({7, 19}, at::kDouble), ref_d = at::zeros({7, 38}, at::kDouble);
  for (int64_t n = 0; n < 7; ++n)
    for (int64_t f = 0; f < 19; ++f) {
      const double g = h[n][f].item<double>(), u = h[n][19 + f].item<double>(), d = grad[n][f].item<double>();
      const double s = 1.0 / (1.0 + std::exp(-g));
      ref[n][f] = g * s * u;
      ref_d[n][f] = d * u * s * (1 + g * (1 - s));
      ref_d[n][19 + f] = d * g * s;
    }
  EXPECT(at::allclose(out, ref, 1e-12, 1e-14), "swiglu vs loops");
  EXPECT(at::allclose(dh, ref_d, 1e-12, 1e-14), "swiglu_backward vs loops");
  const auto x = at::randn({37, 50}).to(at::kBFloat16), w = at::randn({9, 50}).to(at::kBFloat16);
  const auto logits = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("moe::linear_f32").call(x, w);
  EXPECT(logits.scalar_type() == at::kFloat, "linear_f32 returns float32 for bfloat16 operands");
  const auto ref_l = at::matmul(x.to(at::kDouble), w.to(at::kDouble).t());
  EXPECT(at::allclose(logits.to(at::kDouble), ref_l, 1e-5, 1e-5), "linear_f32 vs float64");
}

void test_bad_ids() {
  bool raised = false;
  try {
    plan(at::tensor({0, 3, 1}, at::kLong).view({3, 1}), 3);
  } catch (const c10::Error& err) {
    raised = std::string(err.what()).find("ids_TK") != std::string::npos;
  }
  EXPECT(raised, "plan with an id >= num_experts raises an error naming ids_TK");
}

// On a CUDA build with a GPU: the CUDA kernels equal the CPU kernels (dispatch ops exactly).
void test_cuda_matches_cpu() {
  if (!at::hasCUDA()) {
    std::printf("moe_ops_test: no CUDA device, CUDA-vs-CPU checks skipped\n");
    return;
  }
  const auto ids = random_ids(300, 4, 9, at::kLong);
  const auto p = plan(ids, 9), pc = plan(ids.cuda(), 9);
  EXPECT(at::equal(std::get<0>(p), std::get<0>(pc).cpu()), "cuda plan counts_E");
  EXPECT(at::equal(std::get<1>(p), std::get<1>(pc).cpu()), "cuda plan offs_E");
  EXPECT(at::equal(std::get<2>(p), std::get<2>(pc).cpu()), "cuda plan order_N");
  EXPECT(at::equal(std::get<3>(p), std::get<3>(pc).cpu()), "cuda plan rows_TK");
  const auto x = at::randn({300, 40});
  const auto w = at::rand({300, 4});
  EXPECT(at::equal(permute(x, p, w), permute(x.cuda(), pc, w.cuda()).cpu()), "cuda permute");
  const auto y = at::randn({1200, 40});
  EXPECT(at::equal(unpermute(y, p, w), unpermute(y.cuda(), pc, w.cuda()).cpu()), "cuda unpermute");
  const auto a = at::randn({1200, 40}, at::kDouble);
  const auto b = at::randn({9, 40, 24}, at::kDouble);
  const auto& offs = std::get<1>(p);
  EXPECT(at::allclose(grouped_mm(a, b, offs), grouped_mm(a.cuda(), b.cuda(), offs.cuda()).cpu(),
                      1e-10, 1e-10), "cuda grouped_mm float64");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dtype : {at::kLong, at::kInt}) {
    test_plan(37, 3, 5, dtype);
    test_plan(16, 1, 1, dtype);  // all rows on one expert, k = 1
  }
  test_plan(0, 4, 3, at::kLong);  // T = 0
  test_dispatch(23, 2, 4, 13);    // D not a multiple of 8, empty slots
  test_dispatch(9, 4, 7, 8);
  test_grouped_mm(20, 7, 5, {0, 6, 6, 15}, false);  // empty experts, 5 padding rows
  test_grouped_mm(20, 7, 5, {3, 3, 20}, true);      // transposed (nn.Linear layout) b
  test_grouped_mm(8, 4, 3, {0, 0}, false);          // nothing routed: all zeros
  test_gather_grouped_mm(at::kFloat);
  test_gather_grouped_mm(at::kBFloat16);
  test_gather_grouped_mm(at::kDouble);
  test_swiglu_and_linear_f32();
  test_bad_ids();
  test_cuda_matches_cpu();
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("moe_ops_test: all checks passed\n");
  return 0;
}
