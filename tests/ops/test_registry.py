"""moe.ops.registry: every op is registered once, by define_op, with the same schema as the C++
library's, a fallback under CompositeExplicitAutograd, a fake kernel and (when differentiable) an
autograd formula; the compiled kernels override the fallback for their device only."""

from __future__ import annotations

import pytest
import torch

from moe import ops
from moe.ops import defs, twins
from moe.ops.registry import OPS, define_op

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

DIFFERENTIABLE = {"permute", "unpermute", "unpermute_weights_grad", "grouped_mm", "grouped_mm_wgrad",
                  "gather_grouped_mm", "gather_grouped_mm_wgrad", "gather_grouped_mm_swiglu", "grouped_mm_unpermute",
                  "linear_f32", "swiglu", "topk_route"}
WITH_AUTOGRAD = DIFFERENTIABLE | {"grouped_mm_w8"}  # its formula raises a clear error: inference only


def test_every_op_is_registered_with_its_schema_fallback_and_fake():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert len(OPS) == 21
    for name, schema in OPS.items():
        op = getattr(torch.ops.moe, name).default
        assert str(op._schema) == str(torch._C.parse_schema(f"moe::{name}{schema}")), name
        assert has(f"moe::{name}", "CompositeExplicitAutograd"), name
        assert has(f"moe::{name}", "Meta"), name  # the fake kernel
        assert has(f"moe::{name}", "Autograd") == (name in WITH_AUTOGRAD), name


@needs_ext
def test_compiled_cpu_kernels_override_the_fallback():
    for name in OPS:
        assert "CPU" in ops.compiled_kernels(name), name
    # the CPU kernel runs (not the twin): an argument check only the C++ side makes
    with pytest.raises(RuntimeError, match="order_N"):
        torch.ops.moe.permute(torch.randn(3, 4), torch.zeros(6, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int64))


def test_a_schema_that_differs_from_the_registered_one_is_refused():
    with pytest.raises(RuntimeError, match="defines"):
        define_op("plan", "(Tensor ids_TK) -> Tensor", fallback=twins.plan_torch, fake=defs._plan_fake)
    assert OPS["plan"].startswith("(Tensor ids_TK, int num_experts)")
