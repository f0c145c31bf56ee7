"""The Python face of the ops: :class:`Plan` and one function per op, each a thin call of
``torch.ops.moe.<op>`` (the dispatcher picks the compiled kernel or the twin).

Shape legend: T tokens, K slots per token, E experts, N routed rows (the host-side bound T*K;
rows past ``offs_E[-1]`` are padding, zero, never read), D feature dim, X/Y GEMM input/output
dims.
"""

from __future__ import annotations

import dataclasses

import torch

from moe.ops.checks import MAX_EXPERTS, check_int

__all__ = ["MAX_EXPERTS", "Plan", "plan", "permute", "unpermute", "grouped_mm", "gather_grouped_mm", "swiglu",
           "linear_f32", "gather_grouped_mm_swiglu", "grouped_mm_unpermute"]

ops = torch.ops.moe


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
    experts: a stable counting sort, O(T*K + E), deterministic. Ids outside [-1, E) raise;
    ``num_experts`` is an int (a bool or float raises a TypeError) in [1, ``MAX_EXPERTS`` = 2^20]
    (the plan holds O(E) counts and offsets)."""
    if not isinstance(ids_TK, torch.Tensor):
        raise TypeError(f"moe.plan: ids_TK must be a tensor, got {type(ids_TK).__name__}")
    return Plan(*ops.plan(ids_TK, check_int("plan", "num_experts", num_experts)))


def _check_plan(op: str, p: Plan) -> None:
    if not isinstance(p, Plan):
        raise TypeError(f"moe.{op}: plan must be a moe.ops.Plan, got {type(p).__name__}")


def permute(x_TD: torch.Tensor, plan: Plan, scale_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Gathers tokens into expert-contiguous order: x_ND[i] = x_TD[order_N[i] // K], optionally
    scaled by ``scale_TK``; (N, D) with N = T*K, rows past offs_E[-1] zero. Backward: the
    scatter-add (:func:`unpermute` with the same scale)."""
    _check_plan("permute", plan)
    return ops.permute(x_TD, plan.order_N, plan.rows_TK, scale_TK)


def unpermute(y_ND: torch.Tensor, plan: Plan, weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Combines expert outputs back per token: y_TD[t] = sum_k weights_TK[t, k] * y_ND[rows_TK[t, k]]
    over non-empty slots, accumulated in float32 for bf16/fp16. ``weights_TK`` is float32 or
    y's dtype; gradients flow to y_ND and weights_TK."""
    _check_plan("unpermute", plan)
    return ops.unpermute(y_ND, plan.order_N, plan.rows_TK, weights_TK)


def grouped_mm(a_NX: torch.Tensor, b_EXY: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM: rows offs_E[e-1]:offs_E[e] of a_NX times b_EXY[e], in one call.

    ``b_EXY`` may be a transposed view (nn.Linear layout (E, Y, X) passed as
    ``w.transpose(-2, -1)``), as in ``torch.nn.functional.grouped_mm``. Rows past offs_E[-1] are
    never read and come out zero."""
    return ops.grouped_mm(a_NX, b_EXY, offs_E)


def gather_grouped_mm(x_TD: torch.Tensor, plan: Plan, b_EXY: torch.Tensor) -> torch.Tensor:
    """``grouped_mm(permute(x_TD, plan), b_EXY, plan.offs_E)`` without the permuted copy: each
    routed row is read from x_TD where it is (scattermoe's gathered GEMM). (N, Y), rows past
    offs_E[-1] zero; the same values as the two-op form, bit for bit on the CPU kernels. Its weight
    gradient reads x_TD the same way; the input gradient is the data-gradient GEMM followed by the
    sum over each token's slots (:func:`unpermute` without weights). Where there is no kernel
    (CUDA for now) the op's fallback is the two-op form on the registered ops."""
    _check_plan("gather_grouped_mm", plan)
    return ops.gather_grouped_mm(x_TD, plan.order_N, plan.rows_TK, b_EXY, plan.offs_E)


def gather_grouped_mm_swiglu(x_TD: torch.Tensor, plan: Plan, b_EXY: torch.Tensor) -> torch.Tensor:
    """``swiglu(gather_grouped_mm(x_TD, plan, b_EXY))`` in one op, b_EXY's Y = 2F = [gate; up]:
    (N, F), the same values as the two ops (on CUDA at decode sizes one launch: the streaming GEMM
    with SwiGLU's epilogue). The first projection's h_NH is kept for the backward only when
    autograd will need it (grad mode and x_TD or b_EXY requiring grad)."""
    _check_plan("gather_grouped_mm_swiglu", plan)
    keep_h = torch.is_grad_enabled() and (x_TD.requires_grad or b_EXY.requires_grad)
    return ops.gather_grouped_mm_swiglu(x_TD, plan.order_N, plan.rows_TK, b_EXY, plan.offs_E, keep_h)[0]


def grouped_mm_unpermute(a_NX: torch.Tensor, plan: Plan, b_EXY: torch.Tensor,
                         weights_TK: torch.Tensor | None = None, *, swiglu: bool = False) -> torch.Tensor:
    """``unpermute(grouped_mm(a_NX, b_EXY, plan.offs_E), plan, weights_TK)`` in one op: the experts'
    down projection and the weighted combine, y_TD[t] = sum_k w_tk a_i b_e over t's routed slots
    (i its row, e its expert; the gate-weighted sum of Shazeer et al. 2017, Eq. 1), (T, Y): the
    two ops' values, bit for bit, except on sm90 with ``moe.ops.config.sm90_gathered = "fused"``,
    where moekit's gathered GEMM multiplies each row by its weight in its epilogue and stores it
    token-major, so that the combine is a contiguous sum over k (each weighted product rounded
    once: values within the GEMMs' error rule, not the two ops' bits). The backward saves a_NX, not the (N, Y) expert outputs: the
    routing weights' gradient is <a_i, grad_t @ b_e^T> (SonicMoE, Guo et al. 2025, Sec. 3.2),
    formed from the gathered data-gradient GEMM that d a_NX needs anyway, so the T*K x Y product is
    neither kept nor recomputed. ``weights_TK`` float32 or a's dtype (None: the plain sum). With
    ``swiglu``, a_NX is the first projection's h = [gate; up] (N, 2X) and the GEMM's rows are
    ``swiglu(h)``: the backward saves h alone and recomputes the activation (SonicMoE's minimal
    caching), and its d a_NX is d h (SwiGLU's backward done in the same op)."""
    _check_plan("grouped_mm_unpermute", plan)
    return ops.grouped_mm_unpermute(a_NX, b_EXY, plan.offs_E, plan.order_N, plan.rows_TK, weights_TK, swiglu)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating (Shazeer 2020, Eq. 5): silu(gate) * up on h = [gate; up] (..., 2F) ->
    (..., F), in one pass, computed in float32 for half/bfloat16. Backward saves only h and
    writes both halves of d h in one pass (``torch.ops.moe.swiglu_backward``)."""
    return ops.swiglu(h)


def linear_f32(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """x_TD @ weight_ED^T with float32 accumulation and a float32 result (float64 stays float64):
    the routers' logits. For bfloat16 operands the kernels multiply the bfloat16 values directly
    (every product is exact in float32), the same values as the float32 GEMM on upcast copies up
    to the order of the sums, without the copies."""
    return ops.linear_f32(x_TD, weight_ED)
