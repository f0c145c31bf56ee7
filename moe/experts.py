"""Expert feed-forward networks: all routed experts in stacked tensors (one grouped GEMM per
projection), and the dense FFN used for shared experts and as the dense baseline.

Shape legend: N routed rows (sorted by expert), E experts, D hidden size (model dim), F expert
hidden size, H the first projection's width (2F for gated activations: [gate; up], else F).

Gated activations are the GLU variants of Shazeer 2020 ("GLU Variants Improve Transformer",
Eq. 5-6): SwiGLU(x) = (Swish(x W) * x V) W2 and GEGLU(x) = (GELU(x W) * x V) W2; "gelu" and
"relu" are the plain FFN(x) = act(x W1) W2 of Vaswani et al. 2017 (Eq. 2).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe import ops
from moe.dispatch import ExpertRows, LocalDispatchState

__all__ = ["ACTIVATIONS", "GroupedExperts", "DenseFFN", "activate", "row_bias", "to_linear_layout"]

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
_GATED = ("swiglu", "geglu")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def activate(h_NH: Tensor, activation: str) -> Tensor:
    """(N, H) first-projection output -> (N, F): act(gate) * up for the gated activations
    (h = [gate; up], H = 2F), act(h) otherwise (H = F). SwiGLU is the op ``moe.ops.swiglu``
    (a one-pass kernel each way where compiled, its twin elsewhere; backward saves only h)."""
    if activation == "swiglu":
        return ops.swiglu(h_NH)
    if activation == "geglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.gelu(gate) * up
    return F.gelu(h_NH) if activation == "gelu" else F.relu(h_NH)


def _legacy_rows(x: Tensor, offs_E: Optional[Tensor], plan: Optional[ops.Plan], warn: bool = True) -> ExpertRows:
    """ExpertRows from the deprecated forward arguments (x_ND, offs_E) or (x_TD, plan=plan)."""
    if (offs_E is None) == (plan is None):
        raise ValueError("GroupedExperts: pass ExpertRows (or, deprecated, x_ND with offs_E, or x_TD with plan=)")
    if plan is not None and not isinstance(plan, ops.Plan):
        raise TypeError(f"GroupedExperts: plan must be a moe.ops.Plan, got {type(plan).__name__}")
    if warn:
        warnings.warn("GroupedExperts(x_ND, offs_E) / (x_TD, plan=) is deprecated: pass "
                      "moe.ExpertRows(x_ND, offs_E) or the dispatcher's rows", DeprecationWarning, stacklevel=3)
    return ExpertRows(x, offs_E, None) if plan is None else ExpertRows(x, plan.offs_E, plan)


def row_bias(b_EY: Tensor, offs_E: Tensor, num_rows: int) -> Tensor:
    """(N, Y) bias of each routed row's expert; zero past offs_E[-1] (padding rows stay zero).
    The expert of row i is searchsorted(offs_E, i, right=True): no host sync."""
    rows = torch.arange(num_rows, device=offs_E.device, dtype=offs_E.dtype)
    expert_N = torch.searchsorted(offs_E, rows, right=True)
    return F.pad(b_EY, (0, 0, 0, 1))[expert_N]


class GroupedExperts(nn.Module):
    """E expert FFNs y = act(x W_in[e] + b_in[e]) W_out[e] + b_out[e] on rows sorted by expert.

    Parameters (every one has the expert dim E first, so expert parallelism slices dim 0):
    w_in_EDH (E, D, H) with H = 2F ([gate; up]) for swiglu/geglu, else F; w_out_EFD (E, F, D);
    with bias=True also b_in_EH (E, H) and b_out_ED (E, D). Initialised as nn.Linear does for
    each expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = D for the first projection and F
    for the second. forward never sees routing: only rows and the offsets of their groups.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        _check_positive("num_experts", num_experts)
        _check_positive("hidden_size", hidden_size)
        _check_positive("ffn_hidden_size", ffn_hidden_size)
        _check_activation(activation)
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.activation = activation
        H = 2 * ffn_hidden_size if activation in _GATED else ffn_hidden_size
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, hidden_size, H))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        if bias:
            self.b_in_EH = nn.Parameter(torch.empty(num_experts, H))
            self.b_out_ED = nn.Parameter(torch.empty(num_experts, hidden_size))
        else:
            self.register_parameter("b_in_EH", None)
            self.register_parameter("b_out_ED", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b, fan_in in ((self.w_in_EDH, self.b_in_EH, self.hidden_size),
                             (self.w_out_EFD, self.b_out_ED, self.ffn_hidden_size)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def forward(self, rows: ExpertRows, offs_E: Optional[Tensor] = None, *, plan: Optional[ops.Plan] = None,
                combine: Optional[LocalDispatchState] = None) -> Tensor:
        """rows: :class:`moe.ExpertRows` from a dispatcher -> y_ND (N, D) in expert-row order;
        rows past offs_E[-1] come out zero. A gathered view (x_TD and its plan) is read in place:
        the first projection gathers each routed row from x_TD (ops.gather_grouped_mm), and so
        does its weight gradient, so backward keeps x_TD rather than a T*K x D buffer; the same
        values as on the materialised rows (bit for bit on the CPU kernels). With SwiGLU and no
        bias, the activation is that GEMM's epilogue (ops.gather_grouped_mm_swiglu: one op, and on
        CUDA at decode sizes one launch). The deprecated forms ``experts(x_ND, offs_E)`` and
        ``experts(x_TD, plan=plan)`` still work.

        With ``combine``, the state of LocalDispatcher.dispatch, the outputs come combined per token:
        y_TD (T, D), the values of ``dispatcher.combine(experts(rows), combine)``, with the second
        projection and the weighted combine in one op (:meth:`combined`)."""
        if not isinstance(rows, ExpertRows):
            rows = _legacy_rows(rows, offs_E, plan)
        elif offs_E is not None or plan is not None:
            raise ValueError("GroupedExperts: pass the ExpertRows alone (offs_E and plan are in it)")
        if combine is not None:
            if not isinstance(combine, LocalDispatchState):
                raise TypeError(f"GroupedExperts: combine must be a LocalDispatchState, got {type(combine).__name__}")
            return self.combined(rows, combine.plan, combine.weights_TK)
        return self._outputs(rows)

    def _outputs(self, rows: ExpertRows) -> Tensor:
        """y_ND = a_NF W_out[e] + b_out[e], (N, D) in expert-row order."""
        y_ND = ops.grouped_mm(self._hidden(rows), self.w_out_EFD, rows.offs_E)
        if self.b_out_ED is not None:
            y_ND = y_ND + row_bias(self.b_out_ED, rows.offs_E, rows.num_rows)
        return y_ND

    def combined(self, rows: ExpertRows, plan: ops.Plan, weights_TK: Optional[Tensor]) -> Tensor:
        """The experts' outputs combined per token, y_TD[t] = sum_k weights_TK[t, k] y_ND[row(t, k)]
        (Shazeer et al. 2017, Eq. 1) for the dispatch ``plan`` of ``rows``: (T, D), the values of
        ``ops.unpermute(experts(rows), plan, weights_TK)`` (LocalDispatcher.combine). The second
        projection and the combine are one op, ops.grouped_mm_unpermute, whose backward keeps the
        hidden a_NF (the weight gradient's operand anyway) and not the (N, D) expert outputs: the
        routing weights' gradient <a_i, grad_t @ W_out[e]^T> comes from the data-gradient GEMM
        (SonicMoE, Guo et al. 2025, Sec. 3.2), so a layer's saved activations shrink by T*K*D
        values. With SwiGLU under autograd the op also applies the activation (swiglu=True): it keeps
        the first projection's h and recomputes a_NF in the backward, as SonicMoE caches only the
        inputs and h, so T*K*F values fewer again (without autograd the first GEMM's SwiGLU epilogue
        serves, and nothing is kept). With an output bias (b_out) it is the two ops, which keep the
        (N, D) outputs. (Through the module, with its hooks: ``experts(rows, combine=state)``.)"""
        if not isinstance(rows, ExpertRows) or not isinstance(plan, ops.Plan):
            raise TypeError("GroupedExperts.combined: rows must be moe.ExpertRows and plan a moe.ops.Plan")
        if rows.num_rows != plan.max_rows:
            raise ValueError(f"GroupedExperts.combined: the rows have N={rows.num_rows}, the plan {plan.max_rows}")
        if self.b_out_ED is not None:  # the op has no bias term: the outputs, then the combine
            return ops.unpermute(self._outputs(rows), plan, weights_TK)
        if self.activation == "swiglu" and torch.is_grad_enabled():
            # SwiGLU inside the op: its backward keeps h alone, the activation is recomputed
            return ops.grouped_mm_unpermute(self._projection(rows), plan, self.w_out_EFD, weights_TK, swiglu=True)
        return ops.grouped_mm_unpermute(self._hidden(rows), plan, self.w_out_EFD, weights_TK)

    def _hidden(self, rows: ExpertRows) -> Tensor:
        """a_NF = act(rows W_in[e] + b_in[e]), (N, F) in expert-row order (with SwiGLU and no bias on a
        gathered view, the activation is the gathered GEMM's epilogue)."""
        if rows.gathered and self.activation == "swiglu" and self.b_in_EH is None:
            self._check_gathered(rows)
            return ops.gather_grouped_mm_swiglu(rows.x, rows.plan, self.w_in_EDH)
        return activate(self._projection(rows), self.activation)

    def _projection(self, rows: ExpertRows) -> Tensor:
        """h_NH = rows W_in[e] + b_in[e], (N, H): a gathered view is read in place."""
        if rows.gathered:
            self._check_gathered(rows)
            h_NH = ops.gather_grouped_mm(rows.x, rows.plan, self.w_in_EDH)
        else:
            self._check_inputs(rows.x, rows.offs_E)
            h_NH = ops.grouped_mm(rows.x, self.w_in_EDH, rows.offs_E)
        if self.b_in_EH is not None:
            h_NH = h_NH + row_bias(self.b_in_EH, rows.offs_E, rows.num_rows)
        return h_NH

    def _check_gathered(self, rows: ExpertRows) -> None:
        self._check_rows("x_TD", "T", rows.x)
        if rows.plan.num_experts != self.num_experts:
            raise ValueError(f"GroupedExperts: the plan has {rows.plan.num_experts} experts, "
                             f"the module {self.num_experts}")

    def gathered(self, x_TD: Tensor, plan: ops.Plan) -> Tensor:
        """Deprecated: ``experts(ExpertRows(x_TD, plan.offs_E, plan))``."""
        warnings.warn("GroupedExperts.gathered(x_TD, plan) is deprecated: call "
                      "experts(moe.ExpertRows(x_TD, plan.offs_E, plan))", DeprecationWarning, stacklevel=2)
        return self(_legacy_rows(x_TD, None, plan, warn=False))

    def _check_rows(self, name: str, rows: str, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"GroupedExperts: {name} must have shape ({rows}, hidden_size={self.hidden_size}), got {shape}")
        if x.dtype != self.w_in_EDH.dtype:
            raise TypeError(f"GroupedExperts: {name} is {x.dtype} but the expert weights are "
                            f"{self.w_in_EDH.dtype}; cast the input or the module")

    def _check_inputs(self, x_ND: Tensor, offs_E: Tensor) -> None:
        self._check_rows("x_ND", "N", x_ND)
        if not isinstance(offs_E, Tensor) or tuple(offs_E.shape) != (self.num_experts,):
            shape = tuple(offs_E.shape) if isinstance(offs_E, Tensor) else type(offs_E).__name__
            raise ValueError(f"GroupedExperts: offs_E must have shape (num_experts={self.num_experts},), got {shape}")

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"ffn_hidden_size={self.ffn_hidden_size}, activation={self.activation}, "
                f"bias={self.b_in_EH is not None}")


def to_linear_layout(model: nn.Module) -> nn.Module:
    """Stores the weights of every :class:`GroupedExperts` in ``model`` (``model`` itself when it is
    one) transposed in memory, in place, and returns the model: w_in_EDH and w_out_EFD keep their
    shapes and values, with (E, Y, X) strides, the nn.Linear layout that transformers' experts use
    (each output column's weights contiguous along the depth).

    The ops read such a weight as the transposed view it is. On the CPU at decode sizes (an expert
    with at most ``moe.ops.build_info()["cpu_stream_rows_yx"]`` rows) the forward then dots each weight
    row with the tile's rows (csrc/gemm_stream_yx.h) instead of streaming rows of (X, Y) whose bf16
    pairs must be interleaved for every tile: 1.1-1.5x faster at T = 1..64 on the Qwen3-30B-A3B
    layer (``python -m bench.decode --linear-layout``). Training runs at the same speed on the CPU
    (gradients come in the weights' layout); the results differ from the default layout's in the
    order of the sums only. It is opt-in: the weights become non-contiguous Parameters (``.view()``
    on them fails), and on a GPU the layer has been timed in the default layout only (moekit's sm90
    GEMM is built, tested and swept in both)."""
    modules = [model] if isinstance(model, GroupedExperts) else [m for m in model.modules() if isinstance(m, GroupedExperts)]
    with torch.no_grad():
        for m in modules:
            for name in ("w_in_EDH", "w_out_EFD"):
                w = getattr(m, name)
                if w.stride(-2) != 1:  # already (E, Y, X): nothing to do
                    w.data = w.data.transpose(-2, -1).contiguous().transpose(-2, -1)
    return model


class DenseFFN(nn.Module):
    """A dense FFN y = act(x W_in + b_in) W_out + b_out on x (..., D): the shared experts of
    DeepSeekMoE (Dai et al. 2024, Eq. 9, K_s shared experts merged into one FFN of hidden
    K_s * F_shared) and the dense baseline of the benchmarks. w_in (H, D) and w_out (D, F) are
    nn.Linear layers (H = 2F, [gate; up], for the gated activations)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                 bias: bool = False) -> None:
        super().__init__()
        _check_positive("hidden_size", hidden_size)
        _check_positive("ffn_hidden_size", ffn_hidden_size)
        _check_activation(activation)
        self.hidden_size, self.ffn_hidden_size, self.activation = hidden_size, ffn_hidden_size, activation
        H = 2 * ffn_hidden_size if activation in _GATED else ffn_hidden_size
        self.w_in = nn.Linear(hidden_size, H, bias=bias)
        self.w_out = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return self.w_out(activate(self.w_in(x), self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
