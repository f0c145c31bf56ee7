"""Hugging Face transformers: an experts implementation named "moekit".

Shape legend: T tokens, D hidden size, K routing slots, E experts, N routed rows (T*K),
H the first projection's width (2F gated, [gate; up] concatenated or interleaved), F expert hidden.

transformers (>= 5.7, :data:`MIN_TRANSFORMERS`: the first release whose ``experts_implementation``
accepts a registered implementation) decorates its experts classes with
``use_experts_implementation``: their forward(hidden_states_TD, top_k_index_TK, top_k_weights_TK)
looks up ``config._experts_implementation`` in ``ExpertsInterface``. :func:`register` adds
"moekit" there, so a model built with ``experts_implementation="moekit"`` (or switched by
``model.set_experts_implementation("moekit")``) runs its experts on moe.ops: plan, the gathered
grouped GEMM (rows read from hidden_states in place; permute + grouped_mm when the dtypes
differ) and grouped_mm on the HF weight layout read in place (transposed or not, with biases;
the weight gradients are written in the weights' own layout, so autograd copies none: for an
(E, 2F, D) gate_up_proj through ``gather_grouped_mm_wgrad(..., out_yx=True)``), the gate
(moe.ops.swiglu where it is transformers' default SiLU on [gate; up], as the gathered GEMM's
epilogue, moe.ops.gather_grouped_mm_swiglu, when there is no bias; else the class's own
``_apply_gate``: GPT-OSS's interleaved, clamped SwiGLU included) and the weighted unpermute (in
bfloat16 it sums the weighted products in float32 and rounds once, where eager rounds each
product and each sum: the two differ by bfloat16 rounding, moekit's being the more accurate);
without a down bias or post-expert norm the down projection and the weighted unpermute are one
op, moe.ops.grouped_mm_unpermute, whose backward keeps no T*K x D expert outputs (under autograd,
with transformers' default SiLU gate on [gate; up], the op applies SwiGLU too: its backward keeps
the first projection's h alone and recomputes the activation).
Expert ids outside [0, E) are empty slots. transformers is imported only inside :func:`register`
and, once imported by the model that calls it, by the forward's gate check.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe import ops
from moe.dispatch import combine_weights
from moe.experts import row_bias

__all__ = ["register", "moekit_experts_forward", "NAME", "MIN_TRANSFORMERS"]

NAME = "moekit"
MIN_TRANSFORMERS = "5.7"  # pyproject's hf extra; .ci/run tests 5.7.0 and the newest


def _grouped_linear(x_NX: Tensor, w: Tensor, offs_E: Tensor, b_EY, is_transposed: bool) -> Tensor:
    """HF weights are (E, Y, X) (nn.Linear layout) or, when is_transposed, (E, X, Y)."""
    w_EXY = w if is_transposed else w.transpose(-2, -1)
    out_NY = ops.grouped_mm(x_NX.to(w.dtype), w_EXY, offs_E)
    return out_NY if b_EY is None else out_NY + row_bias(b_EY, offs_E, x_NX.shape[0]).to(out_NY.dtype)


def _empty_slots(top_k_index_TK: Tensor, E: int) -> Tensor:
    """(T, K) int64 ids with every id outside [0, E) set to -1 (the library's empty slot), on the
    device, no host sync. transformers' expert-parallel code hands a rank's experts placeholder ids
    >= E for the routes to other ranks' experts (AllReduceEP: id E, weight 0); its own backends drop
    them whether or not the module carries ``_is_expert_parallel`` (eager skips id E, grouped_mm's
    sort and histc leave ids >= E past the last offset), so this does too. A dropped slot adds
    nothing and gets no weight gradient."""
    ids_TK = top_k_index_TK.to(torch.int64)
    return ids_TK.masked_fill((ids_TK < 0) | (ids_TK >= E), -1)


def _is_concatenated_swiglu(experts) -> bool:
    """True when the module's gate is transformers' default one, ``act_fn(gate) * up`` on
    h = [gate; up] concatenated, with act_fn exactly SiLU (Mixtral, Qwen2/Qwen3-MoE, OLMoE,
    DeepSeek-V3): SwiGLU, which :func:`moe.ops.swiglu` computes in one pass each way. Any other
    gate (GPT-OSS's interleaved clamped SwiGLU, an overridden ``_apply_gate``, another or a
    subclassed activation) answers False and keeps the class's own."""
    try:
        from transformers.activations import SiLUActivation
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    act = getattr(experts, "act_fn", None)
    is_silu = act is torch.nn.functional.silu or type(act) in (torch.nn.SiLU, SiLUActivation)
    return (is_silu and getattr(experts, "is_concatenated", False) and "_apply_gate" not in vars(experts)
            and getattr(type(experts), "_apply_gate", None) is _default_apply_gate)


def _gate(experts, h_NH: Tensor) -> Tensor:
    """(N, H) -> (N, F): moe.ops.swiglu for SiLU-gated [gate; up] (float32 inside for half types,
    rounded once), else the class's ``_apply_gate``; ``act_fn`` alone without a gate."""
    if not experts.has_gate:
        return experts.act_fn(h_NH)
    return ops.swiglu(h_NH) if _is_concatenated_swiglu(experts) else experts._apply_gate(h_NH)


def moekit_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The "moekit" experts forward: hidden_states (T, D), top_k_index (T, K), top_k_weights
    (T, K) -> (T, D) in hidden_states' dtype. ``self`` is a transformers experts module."""
    E = self.num_experts  # the local expert count (transformers' EP sharding sets it per rank)
    ids_TK = _empty_slots(top_k_index, E)
    plan = ops.plan(ids_TK, E)
    has_bias = getattr(self, "has_bias", False)
    if self.has_gate:
        w_in, b_in = self.gate_up_proj, (self.gate_up_proj_bias if has_bias else None)
    else:
        w_in, b_in = self.up_proj, (self.up_proj_bias if has_bias else None)
    w_out, b_out = self.down_proj, (self.down_proj_bias if has_bias else None)
    # the down projection and the weighted combine in one op (its backward keeps no (N, D) outputs),
    # and under autograd with SiLU-gated [gate; up] the SwiGLU too (its backward keeps h alone)
    one_op = b_out is None and not getattr(self, "has_post_expert_norm", False)
    swiglu = self.has_gate and _is_concatenated_swiglu(self)
    inside = one_op and swiglu and torch.is_grad_enabled()  # SwiGLU applied by the down projection's op
    w_in_EXY = w_in if self.is_transposed else w_in.transpose(-2, -1)
    gathered = hidden_states.dtype == w_in.dtype  # the first projection reads the routed rows in place
    if gathered and b_in is None and swiglu and not inside:  # SwiGLU as the first GEMM's epilogue
        a_NX = ops.gather_grouped_mm_swiglu(hidden_states, plan, w_in_EXY)
    else:
        if gathered:
            h_NH = ops.gather_grouped_mm(hidden_states, plan, w_in_EXY)
            if b_in is not None:
                h_NH = h_NH + row_bias(b_in, plan.offs_E, plan.max_rows).to(h_NH.dtype)
        else:
            h_NH = _grouped_linear(ops.permute(hidden_states, plan), w_in, plan.offs_E, b_in, self.is_transposed)
        a_NX = h_NH if inside else _gate(self, h_NH)
    if one_op:
        w_EXY = w_out if self.is_transposed else w_out.transpose(-2, -1)
        y_TD = ops.grouped_mm_unpermute(a_NX.to(w_out.dtype), plan, w_EXY, combine_weights(top_k_weights, w_out.dtype),
                                        swiglu=inside)
        return y_TD.to(hidden_states.dtype)
    y_ND = _grouped_linear(a_NX, w_out, plan.offs_E, b_out, self.is_transposed)
    if getattr(self, "has_post_expert_norm", False):
        y_ND = self.post_expert_norm(y_ND)
    return ops.unpermute(y_ND, plan, combine_weights(top_k_weights, y_ND.dtype)).to(hidden_states.dtype)


def register() -> None:
    """Registers "moekit" in transformers' ExpertsInterface (idempotent). Raises ImportError
    naming the requirement when transformers is missing or older than :data:`MIN_TRANSFORMERS`
    (5.0-5.6 have ExpertsInterface but their models accept only their own implementations)."""
    try:
        import transformers
        from packaging.version import Version
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as err:
        raise ImportError(f"moe.integrations.hf.register needs transformers >= {MIN_TRANSFORMERS} "
                          "(transformers.integrations.moe.ExpertsInterface)") from err
    if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
        raise ImportError(f"moe.integrations.hf.register needs transformers >= {MIN_TRANSFORMERS}, found "
                          f"{transformers.__version__} (its experts_implementation takes no registered one)")
    ExpertsInterface.register(NAME, moekit_experts_forward)
