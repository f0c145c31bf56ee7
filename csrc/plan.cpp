// moe.plan on the CPU: a stable counting sort of the slots by expert id, O(T*K).
#include <ATen/Dispatch.h>

#include <vector>

#include "moe_ops.h"

namespace moe {

template <typename index_t>
static void plan_kernel(const index_t* ids, int64_t T, int64_t K, int64_t E, int32_t* counts,
                        int32_t* offs, int64_t* order, int64_t* rows) {
  const int64_t num_slots = T * K;
  std::vector<int64_t> cursor(E, 0);
  for (int64_t s = 0; s < num_slots; ++s) {
    const int64_t id = static_cast<int64_t>(ids[s]);
    TORCH_CHECK(id >= -1 && id < E, "moe.plan: ids_TK[", s / K, ", ", s % K, "] = ", id,
                " is outside [-1, num_experts=", E, ")");
    if (id >= 0) ++cursor[id];
  }
  int64_t end = 0;
  for (int64_t e = 0; e < E; ++e) {
    counts[e] = static_cast<int32_t>(cursor[e]);
    cursor[e] = end;  // becomes the next free row of expert e
    end += counts[e];
    offs[e] = static_cast<int32_t>(end);
  }
  for (int64_t s = 0; s < num_slots; ++s) {
    const int64_t id = static_cast<int64_t>(ids[s]);
    if (id < 0) {
      rows[s] = -1;
      continue;
    }
    const int64_t r = cursor[id]++;
    order[r] = s;
    rows[s] = r;
  }
  for (int64_t r = end; r < num_slots; ++r) order[r] = -1;
}

PlanTensors plan_cpu(const at::Tensor& ids_TK, int64_t num_experts) {
  check_plan_args(ids_TK, num_experts);
  TORCH_CHECK(ids_TK.numel() < (int64_t{1} << 31), "moe.plan: ids_TK has too many slots (",
              ids_TK.numel(), "): counts are int32");
  const auto ids = ids_TK.contiguous();
  const int64_t T = ids.size(0), K = ids.size(1);
  auto i32 = ids.options().dtype(at::kInt);
  auto i64 = ids.options().dtype(at::kLong);
  auto counts = at::empty({num_experts}, i32);
  auto offs = at::empty({num_experts}, i32);
  auto order = at::empty({T * K}, i64);
  auto rows = at::empty({T, K}, i64);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_plan_cpu", [&] {
    plan_kernel<index_t>(ids.const_data_ptr<index_t>(), T, K, num_experts,
                         counts.mutable_data_ptr<int32_t>(), offs.mutable_data_ptr<int32_t>(),
                         order.mutable_data_ptr<int64_t>(), rows.mutable_data_ptr<int64_t>());
  });
  return {counts, offs, order, rows};
}

}  // namespace moe
