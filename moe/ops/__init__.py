"""moekit's token-dispatch and grouped-GEMM ops: the engine of every MoE layer.

    ids_TK ──plan──► Plan(counts_E, offs_E, order_N, rows_TK)
    x_TD ──permute──► x_ND ──grouped_mm(w_EXY, offs_E)──► y_NY ──unpermute(weights_TK)──► y_TD
    x_TD ──gather_grouped_mm(plan, w_EXY)──► y_NY          (the same, without the x_ND copy)
    a_NX ──grouped_mm_unpermute(plan, w_EXY, weights_TK)──► y_TD   (the last two, y_NY not kept)

and the layers' fused helpers: swiglu (SwiGLU's gating, one pass each way),
gather_grouped_mm_swiglu (the gathered first projection with SwiGLU's epilogue) and linear_f32
(the routers' float32 logits from bfloat16 operands).

Shape legend: T tokens, K slots per token, E experts, N routed rows, D feature dim, X/Y GEMM
input/output dims. N is the host-side bound T*K: buffers never depend on routed counts, so the
CUDA path has no host-device sync; rows past ``offs_E[-1]`` are padding (zero, never read).

The package, one job per module:

- ``_extension``: loads the compiled ``moe._C`` (C++ CPU and CUDA kernels), ``build_info``,
  the CPU host cache's stats.
- ``registry``: :func:`define_op`, the one way an op is registered (schema, fallback, fake,
  autograd); the fallback runs wherever no compiled kernel is registered.
- ``defs``: the ops, one define_op call each.
- ``checks``: the ops' argument checks on the Python side (the fake kernels' and the fallbacks'
  mirror of csrc/checks.cpp; :func:`~moe.ops.checks.check_int` for the wrappers' int arguments).
- ``twins``: the pure-PyTorch twins (the oracle of the tests, the fallback of the dispatcher).
- ``functional``: :class:`Plan` and the Python functions below.
- ``config``: ``moe.ops.config``, the kernels' backend settings (read by the C++ side).

``torch.ops.moe.*`` exists as soon as ``moe.ops`` is imported, with or without the compiled
extension (``MOE_DISABLE_EXTENSION=1`` forces the twins).
"""

from __future__ import annotations

from moe.ops._extension import HAS_EXTENSION, build_info, empty_host_cache, host_cache_stats
from moe.ops import defs as _defs  # noqa: F401  (registers torch.ops.moe.*)
from moe.ops.config import config
from moe.ops.functional import (MAX_EXPERTS, Plan, gather_grouped_mm, gather_grouped_mm_swiglu, grouped_mm,
                                grouped_mm_unpermute, linear_f32, permute, plan, swiglu, unpermute)
from moe.ops.registry import compiled_kernels
from moe.ops.twins import (  # noqa: F401  (the twins, by their historical names)
    gather_grouped_mm_backward_torch,
    gather_grouped_mm_swiglu_torch,
    gather_grouped_mm_torch,
    gather_grouped_mm_wgrad_torch,
    grouped_mm_backward_torch,
    grouped_mm_torch,
    grouped_mm_unpermute_backward_torch,
    grouped_mm_unpermute_torch,
    grouped_mm_wgrad_torch,
    linear_f32_backward_torch,
    linear_f32_torch,
    permute_torch,
    plan_torch,
    swiglu_backward_torch,
    swiglu_torch,
    unpermute_torch,
    unpermute_backward_torch,
    unpermute_weights_grad_torch,
)

__all__ = ["MAX_EXPERTS", "Plan", "plan", "permute", "unpermute", "grouped_mm", "gather_grouped_mm",
           "gather_grouped_mm_swiglu", "grouped_mm_unpermute", "swiglu", "linear_f32", "config", "HAS_EXTENSION", "build_info", "compiled_kernels",
           "host_cache_stats", "empty_host_cache"]
