"""moekit's token-dispatch and grouped-GEMM ops: the engine of every MoE layer.

    ids_TK ──plan──► Plan(counts_E, offs_E, order_N, rows_TK)
    x_TD ──permute──► x_ND ──grouped_mm(w_EXY, offs_E)──► y_NY ──unpermute(weights_TK)──► y_TD
    x_TD ──gather_grouped_mm(plan, w_EXY)──► y_NY          (the same, without the x_ND copy)

and the layers' fused helpers: swiglu (SwiGLU's gating, one pass each way) and
torch.ops.moe.linear_f32 (the routers' float32 logits from bfloat16 operands).

Shape legend: T tokens, K slots per token, E experts, N routed rows, D feature dim, X/Y GEMM
input/output dims. N is the host-side bound T*K: buffers never depend on routed counts, so the
CUDA path has no host-device sync; rows past ``offs_E[-1]`` are padding (zero, never read).

Each op has three implementations: the compiled CPU kernel and CUDA kernel registered as
``torch.ops.moe.*`` (schemas in csrc/registration.cpp), and the pure-PyTorch twin in
:mod:`moe.ops_torch`, used when the extension is absent (logged once). Autograd and fake (meta)
kernels are registered here, so the ops work under ``torch.compile`` and pass
``torch.library.opcheck``.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from moe import ops_torch
from moe.ops_torch import (  # noqa: F401  (re-exported twins)
    grouped_mm_torch,
    grouped_mm_wgrad_torch,
    permute_torch,
    plan_torch,
    unpermute_torch,
    unpermute_weights_grad_torch,
    gather_grouped_mm_torch,
    gather_grouped_mm_wgrad_torch,
    linear_f32_torch,
    swiglu_torch,
    swiglu_backward_torch,
)

__all__ = ["Plan", "plan", "permute", "unpermute", "grouped_mm", "gather_grouped_mm", "swiglu",
           "HAS_EXTENSION", "build_info", "host_cache_stats", "empty_host_cache"]

_log = logging.getLogger(__name__)


def _load_extension() -> bool:
    if os.environ.get("MOE_DISABLE_EXTENSION", "0") == "1":
        _log.warning("moekit: MOE_DISABLE_EXTENSION=1, using the pure-PyTorch ops")
        return False
    try:
        from moe import _C  # noqa: F401  (loading it registers torch.ops.moe.*)
    except ImportError as err:
        _log.warning("moekit: compiled ops unavailable (%s); using the pure-PyTorch ops", err)
        return False
    return True


HAS_EXTENSION = _load_extension()

def host_cache_stats() -> dict:
    """Usage of the CPU kernels' buffer cache (csrc/host_cache.cpp): ``cached_bytes`` (freed
    output blocks kept for reuse), ``in_use_bytes`` (blocks held by live tensors), ``hits`` /
    ``misses`` (requests served from the cache / by a new allocation) and ``limit_bytes``
    (``MOE_HOST_CACHE_MB``, read once; 0 turns the cache off). All zero without the extension."""
    if not HAS_EXTENSION:
        return dict(cached_bytes=0, in_use_bytes=0, hits=0, misses=0, limit_bytes=0)
    from moe import _C
    return _C.host_cache_stats()


def build_info() -> dict:
    """Which kernels the loaded ``moe._C`` holds: ``cuda`` (the CUDA kernels), ``sm90_gemm``
    (moekit's Hopper grouped GEMM, csrc/cuda/sm90) and the names of its forward and weight-gradient
    configurations by id (``sm90_forward_configs``, ``sm90_wgrad_configs``: the values that
    ``MOE_SM90_GEMM_CONFIG`` / ``MOE_SM90_WGRAD_CONFIG`` force). Empty without the extension."""
    if not HAS_EXTENSION:
        return dict(cuda=False, sm90_gemm=False, sm90_forward_configs=[], sm90_wgrad_configs=[])
    from moe import _C
    return _C.build_info()


def empty_host_cache() -> None:
    """Return every cached CPU buffer to the system (like ``torch.cuda.empty_cache()``)."""
    if HAS_EXTENSION:
        from moe import _C
        _C.host_cache_clear()


_TWINS = {
    "plan": ops_torch.plan_torch,
    "permute": ops_torch.permute_torch,
    "unpermute": ops_torch.unpermute_torch,
    "unpermute_weights_grad": ops_torch.unpermute_weights_grad_torch,
    "grouped_mm": ops_torch.grouped_mm_torch,
    "grouped_mm_wgrad": ops_torch.grouped_mm_wgrad_torch,
    "gather_grouped_mm": ops_torch.gather_grouped_mm_torch,
    "gather_grouped_mm_wgrad": ops_torch.gather_grouped_mm_wgrad_torch,
    "linear_f32": ops_torch.linear_f32_torch,
    "swiglu": ops_torch.swiglu_torch,
    "swiglu_backward": ops_torch.swiglu_backward_torch,
}


# (op, dispatch key) pairs with a compiled kernel, read once at import: dynamo cannot trace the
# dispatcher query, and the answer never changes after the extension is loaded.
_KERNELS = frozenset(
    (name, key)
    for name in _TWINS
    for key in ("CPU", "CUDA")
    if HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(f"moe::{name}", key)
)


def _has_kernel(name: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    return (name, key) in _KERNELS


def _op(name: str, device: torch.device):
    """The registered op for ``device`` when compiled, else the PyTorch twin."""
    return getattr(torch.ops.moe, name).default if _has_kernel(name, device) else _TWINS[name]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each routed slot goes, from :func:`plan`.

    counts_E (int32): rows routed to each expert (empty slots, id -1, are counted nowhere).
    offs_E (int32): cumulative end row of each expert's group (``F.grouped_mm``'s ``offs``).
    order_N (int64, length T*K): flat slot index (t*K + k) of routed row i; -1 past offs_E[-1].
    rows_TK (int64): routed row of each slot, -1 for empty slots (the inverse of order_N).
    """

    counts_E: torch.Tensor
    offs_E: torch.Tensor
    order_N: torch.Tensor
    rows_TK: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.rows_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.rows_TK.shape[1]

    @property
    def max_rows(self) -> int:
        """N, the host-side bound T*K on routed rows (the row count of permuted buffers)."""
        return self.order_N.shape[0]

    def _sync_num_rows(self) -> int:
        """Routed (non-empty) rows, read on the host: a device-to-host sync on CUDA."""
        return int(self.offs_E[-1])


def plan(ids_TK: torch.Tensor, num_experts: int) -> Plan:
    """Plans the dispatch of ``ids_TK`` (T, K) expert ids (-1 = empty slot) to ``num_experts``
    experts: a stable counting sort, O(T*K), deterministic. Ids outside [-1, E) raise."""
    if not isinstance(ids_TK, torch.Tensor):
        raise TypeError(f"moe.plan: ids_TK must be a tensor, got {type(ids_TK).__name__}")
    return Plan(*_op("plan", ids_TK.device)(ids_TK, int(num_experts)))


def _check_plan(op: str, p: Plan) -> None:
    if not isinstance(p, Plan):
        raise TypeError(f"moe.{op}: plan must be a moe.ops.Plan, got {type(p).__name__}")


def permute(x_TD: torch.Tensor, plan: Plan, scale_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Gathers tokens into expert-contiguous order: x_ND[i] = x_TD[order_N[i] // K], optionally
    scaled by ``scale_TK``; (N, D) with N = T*K, rows past offs_E[-1] zero. Backward: the
    scatter-add (:func:`unpermute` with the same scale)."""
    _check_plan("permute", plan)
    return _op("permute", x_TD.device)(x_TD, plan.order_N, plan.rows_TK, scale_TK)


def unpermute(y_ND: torch.Tensor, plan: Plan, weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Combines expert outputs back per token: y_TD[t] = sum_k weights_TK[t, k] * y_ND[rows_TK[t, k]]
    over non-empty slots, accumulated in float32 for bf16/fp16. ``weights_TK`` is float32 or
    y's dtype; gradients flow to y_ND and weights_TK."""
    _check_plan("unpermute", plan)
    return _op("unpermute", y_ND.device)(y_ND, plan.order_N, plan.rows_TK, weights_TK)


def grouped_mm(a_NX: torch.Tensor, b_EXY: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM: rows offs_E[e-1]:offs_E[e] of a_NX times b_EXY[e], in one call.

    ``b_EXY`` may be a transposed view (nn.Linear layout (E, Y, X) passed as
    ``w.transpose(-2, -1)``), as in ``torch.nn.functional.grouped_mm``. Rows past offs_E[-1] are
    never read and come out zero."""
    return _op("grouped_mm", a_NX.device)(a_NX, b_EXY, offs_E)


def gather_grouped_mm(x_TD: torch.Tensor, plan: Plan, b_EXY: torch.Tensor) -> torch.Tensor:
    """``grouped_mm(permute(x_TD, plan), b_EXY, plan.offs_E)`` without the permuted copy: each
    routed row is read from x_TD where it is (scattermoe's gathered GEMM). (N, Y), rows past
    offs_E[-1] zero; the same values as the two-op form, bit for bit on the CPU kernels. Its weight
    gradient reads x_TD the same way; the input gradient is the data-gradient GEMM followed by the
    sum over each token's slots (:func:`unpermute` without weights). Where there is no kernel
    (CUDA for now) it is the two-op form."""
    _check_plan("gather_grouped_mm", plan)
    if _has_kernel("gather_grouped_mm", x_TD.device):
        return torch.ops.moe.gather_grouped_mm(x_TD, plan.order_N, plan.rows_TK, b_EXY, plan.offs_E)
    return grouped_mm(permute(x_TD, plan), b_EXY, plan.offs_E)


def has_swiglu_kernel(device: torch.device) -> bool:
    """True where :func:`swiglu` runs a compiled kernel (the CPU and CUDA kernels, once moe._C is
    built with them); elsewhere it is the PyTorch twin, which layers replace with their own
    memory-saving composite."""
    return _has_kernel("swiglu", device)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating (Shazeer 2020, Eq. 5): silu(gate) * up on h = [gate; up] (..., 2F) ->
    (..., F), in one pass, computed in float32 for half/bfloat16. Backward saves only h and
    writes both halves of d h in one pass (:func:`torch.ops.moe.swiglu_backward`)."""
    return _op("swiglu", h.device)(h)


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd for the registered ops (only when the extension is loaded).
# --------------------------------------------------------------------------------------------


def _acc(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _same_device(op: str, first, **named) -> None:
    """Fake kernels run for meta/fake tensors, where the C++ device checks never run."""
    for name, t in named.items():
        if t is not None:
            torch._check(t.device == first.device,
                         lambda: f"moe.{op}: {name} is on {t.device} but the other inputs are on {first.device}")


def _register_fakes() -> None:
    reg = torch.library.register_fake

    @reg("moe::plan")
    def _(ids_TK, num_experts):
        T, K = ids_TK.shape
        i32 = dict(dtype=torch.int32, device=ids_TK.device)
        i64 = dict(dtype=torch.int64, device=ids_TK.device)
        return (ids_TK.new_empty(num_experts, **i32), ids_TK.new_empty(num_experts, **i32),
                ids_TK.new_empty(T * K, **i64), ids_TK.new_empty(T, K, **i64))

    @reg("moe::permute")
    def _(x_TD, order_N, rows_TK, scale_TK=None):
        _same_device("permute", x_TD, order_N=order_N, rows_TK=rows_TK, scale_TK=scale_TK)
        return x_TD.new_empty(order_N.shape[0], x_TD.shape[1])

    @reg("moe::unpermute")
    def _(y_ND, order_N, rows_TK, weights_TK=None):
        _same_device("unpermute", y_ND, order_N=order_N, rows_TK=rows_TK, weights_TK=weights_TK)
        return y_ND.new_empty(rows_TK.shape[0], y_ND.shape[1])

    @reg("moe::unpermute_weights_grad")
    def _(grad_TD, y_ND, order_N, rows_TK):
        _same_device("unpermute_weights_grad", y_ND, grad_TD=grad_TD, order_N=order_N, rows_TK=rows_TK)
        return y_ND.new_empty(rows_TK.shape, dtype=_acc(y_ND.dtype))

    @reg("moe::grouped_mm")
    def _(a_NX, b_EXY, offs_E):
        _same_device("grouped_mm", a_NX, b_EXY=b_EXY, offs_E=offs_E)
        return a_NX.new_empty(a_NX.shape[0], b_EXY.shape[2])

    @reg("moe::grouped_mm_wgrad")
    def _(a_NX, g_NY, offs_E):
        _same_device("grouped_mm_wgrad", a_NX, g_NY=g_NY, offs_E=offs_E)
        return a_NX.new_empty(offs_E.shape[0], a_NX.shape[1], g_NY.shape[1])

    @reg("moe::gather_grouped_mm")
    def _(x_TD, order_N, rows_TK, b_EXY, offs_E):
        _same_device("gather_grouped_mm", x_TD, order_N=order_N, rows_TK=rows_TK, b_EXY=b_EXY, offs_E=offs_E)
        return x_TD.new_empty(order_N.shape[0], b_EXY.shape[2])

    @reg("moe::gather_grouped_mm_wgrad")
    def _(x_TD, order_N, rows_TK, g_NY, offs_E):
        _same_device("gather_grouped_mm_wgrad", x_TD, order_N=order_N, rows_TK=rows_TK, g_NY=g_NY, offs_E=offs_E)
        return x_TD.new_empty(offs_E.shape[0], x_TD.shape[1], g_NY.shape[1])

    @reg("moe::linear_f32")
    def _(x_TD, weight_ED):
        _same_device("linear_f32", x_TD, weight_ED=weight_ED)
        return x_TD.new_empty(x_TD.shape[0], weight_ED.shape[0], dtype=_acc(x_TD.dtype))

    def _check_swiglu_h(op, h):
        torch._check(h.dim() >= 1 and h.shape[-1] > 0 and h.shape[-1] % 2 == 0,
                     lambda: f"moe.{op}: h's last dim must be 2F = [gate; up], a positive even number, "
                             f"got shape {tuple(h.shape)}")

    @reg("moe::swiglu")
    def _(h):
        _check_swiglu_h("swiglu", h)
        return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)

    @reg("moe::swiglu_backward")
    def _(grad, h):
        _check_swiglu_h("swiglu_backward", h)
        _same_device("swiglu_backward", h, grad=grad)
        torch._check(tuple(grad.shape) == (*h.shape[:-1], h.shape[-1] // 2),
                     lambda: f"moe.swiglu_backward: grad must have shape {(*h.shape[:-1], h.shape[-1] // 2)}, "
                             f"got {tuple(grad.shape)}")
        return h.new_empty(h.shape)


def _register_autograd() -> None:
    ops = torch.ops.moe

    def _cast(grad, like):
        return None if grad is None or like is None else grad.to(like.dtype)

    # permute: out[i] = x[t] * s[t, k] for i = rows[t, k].
    def permute_setup(ctx, inputs, output):
        x_TD, order_N, rows_TK, scale_TK = inputs
        ctx.save_for_backward(x_TD if scale_TK is not None else None, order_N, rows_TK, scale_TK)

    def permute_bwd(ctx, g_ND):
        x_TD, order_N, rows_TK, scale_TK = ctx.saved_tensors
        g_x = g_s = None
        if ctx.needs_input_grad[0]:
            g_x = ops.unpermute(g_ND, order_N, rows_TK, scale_TK)
        if scale_TK is not None and ctx.needs_input_grad[3]:
            g_s = _cast(ops.unpermute_weights_grad(x_TD, g_ND, order_N, rows_TK), scale_TK)
        return g_x, None, None, g_s

    # unpermute: out[t] = sum_k w[t, k] * y[rows[t, k]].
    def unpermute_setup(ctx, inputs, output):
        y_ND, order_N, rows_TK, weights_TK = inputs
        ctx.save_for_backward(y_ND if weights_TK is not None else None, order_N, rows_TK, weights_TK)

    def unpermute_bwd(ctx, g_TD):
        y_ND, order_N, rows_TK, weights_TK = ctx.saved_tensors
        g_y = g_w = None
        if ctx.needs_input_grad[0]:
            g_y = ops.permute(g_TD, order_N, rows_TK, weights_TK)
        if weights_TK is not None and ctx.needs_input_grad[3]:
            g_w = _cast(ops.unpermute_weights_grad(g_TD, y_ND, order_N, rows_TK), weights_TK)
        return g_y, None, None, g_w

    # unpermute_weights_grad: out[t, k] = <g[t], y[rows[t, k]]>.
    def wgrad_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def wgrad_bwd(ctx, d_TK):
        grad_TD, y_ND, order_N, rows_TK = ctx.saved_tensors
        d = d_TK.to(_acc(y_ND.dtype))
        d = d if d.dtype == y_ND.dtype or d.dtype == torch.float32 else d.to(y_ND.dtype)
        g_g = ops.unpermute(y_ND, order_N, rows_TK, d) if ctx.needs_input_grad[0] else None
        g_y = ops.permute(grad_TD, order_N, rows_TK, d) if ctx.needs_input_grad[1] else None
        return g_g, g_y, None, None

    # grouped_mm: c_e = a_e @ b_e.
    def gmm_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def gmm_bwd(ctx, g_NY):
        a_NX, b_EXY, offs_E = ctx.saved_tensors
        g_a = ops.grouped_mm(g_NY, b_EXY.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
        g_b = ops.grouped_mm_wgrad(a_NX, g_NY, offs_E) if ctx.needs_input_grad[1] else None
        return g_a, g_b, None

    # grouped_mm_wgrad: w_e = a_e^T @ g_e.
    def gmm_wgrad_bwd(ctx, d_EXY):
        a_NX, g_NY, offs_E = ctx.saved_tensors
        g_a = ops.grouped_mm(g_NY, d_EXY.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
        g_g = ops.grouped_mm(a_NX, d_EXY, offs_E) if ctx.needs_input_grad[1] else None
        return g_a, g_g, None

    # swiglu: out = silu(gate) * up; backward is one pass over h (the twin when it must be
    # differentiable itself).
    def swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def swiglu_bwd(ctx, g):
        (h,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the differentiable twin, for double backward
            return ops_torch.swiglu_backward_torch(g, h)
        return ops.swiglu_backward(g, h)

    # gather_grouped_mm(x, ., ., b, offs): c_i = x[token(i)] @ b_e, and gather_grouped_mm_wgrad
    # (x, ., ., g, offs): w_e = sum over e's rows i of x[token(i)]^T g_i. In both, d x sums each
    # token's rows of (rows_NY @ w_e^T), with (rows_NY, w_EXY) = (d c, b) or (g, d w), and the
    # other operand's gradient is the other op on x and the incoming gradient.
    def gather_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def gather_bwd(other_op, grad_is_rows):
        def bwd(ctx, grad):
            x_TD, order_N, rows_TK, z, offs_E = ctx.saved_tensors
            rows_NY, w_EXY = (grad, z) if grad_is_rows else (z, grad)
            g_x = g_z = None
            if ctx.needs_input_grad[0]:
                g_x = ops.unpermute(ops.grouped_mm(rows_NY, w_EXY.transpose(-2, -1), offs_E), order_N, rows_TK, None)
            if ctx.needs_input_grad[3]:
                g_z = other_op(x_TD, order_N, rows_TK, grad, offs_E)
            return g_x, None, None, g_z, None
        return bwd

    # linear_f32: the gradients of F.linear(x.float(), w.float()), cast back as autograd would.
    def linear_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def linear_bwd(ctx, g_TE):
        x_TD, weight_ED = ctx.saved_tensors
        acc = g_TE.dtype
        g_x = (g_TE @ weight_ED.to(acc)).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
        g_w = (g_TE.t() @ x_TD.to(acc)).to(weight_ED.dtype) if ctx.needs_input_grad[1] else None
        return g_x, g_w

    reg = torch.library.register_autograd
    reg("moe::linear_f32", linear_bwd, setup_context=linear_setup)
    reg("moe::gather_grouped_mm", gather_bwd(ops.gather_grouped_mm_wgrad, True), setup_context=gather_setup)
    reg("moe::gather_grouped_mm_wgrad", gather_bwd(ops.gather_grouped_mm, False), setup_context=gather_setup)
    reg("moe::swiglu", swiglu_bwd, setup_context=swiglu_setup)
    reg("moe::permute", permute_bwd, setup_context=permute_setup)
    reg("moe::unpermute", unpermute_bwd, setup_context=unpermute_setup)
    reg("moe::unpermute_weights_grad", wgrad_bwd, setup_context=wgrad_setup)
    reg("moe::grouped_mm", gmm_bwd, setup_context=gmm_setup)
    reg("moe::grouped_mm_wgrad", gmm_wgrad_bwd, setup_context=gmm_setup)


if HAS_EXTENSION:
    _register_fakes()
    _register_autograd()
