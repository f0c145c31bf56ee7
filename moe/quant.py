"""Weight-only int8 experts for inference: :func:`quantize_experts` and :class:`Int8GroupedExperts`.

Shape legend: N routed rows (sorted by expert), E experts, D hidden size, F expert hidden size,
H the first projection's width (2F for gated activations), X / Y a projection's input / output dim.

Each expert projection W (Y, X) is stored as int8 with one float32 scale per output channel, the
symmetric absmax rule of LLM.int8() (Dettmers et al. 2022, Sec. 3.1, Eq. 1) taken row-wise as its
vector-wise quantization does (Sec. 3.2) for the weights alone:

    s_y = max_x |W_yx| / 127,      Q_yx = round(W_yx / s_y) in [-127, 127],      W_yx ~ s_y Q_yx

so |W_yx - s_y Q_yx| <= s_y / 2, and a projection's output c_y = s_y sum_x a_x Q_yx (float32 sums,
``torch.ops.moe.grouped_mm_w8``; on AVX512_BF16 CPUs bfloat16 rows are summed by vdpbf16ps, float32
sums of the exact products with denormals flushed; on CUDA by the weight-streaming kernel,
csrc/cuda/stream_gemm.cuh, with no host sync) is within (s_y / 2) sum_x |a_x| of a @ W^T, plus
float rounding.
Activations stay in the model's dtype (bfloat16 or float32). The weights are half the bytes of
bfloat16, which is what bounds a decode step (a few tokens, each reading its k experts' weights).
No backward: the int8 experts are for inference and raise when a gradient is asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe import ops
from moe.dispatch import ExpertRows
from moe.experts import GroupedExperts, activate, row_bias

__all__ = ["Int8GroupedExperts", "Int8HFExperts", "quantize_experts", "quantize_weight"]


def quantize_weight(w_EYX: Tensor) -> tuple[Tensor, Tensor]:
    """(E, Y, X) float weights -> (q_EYX int8, scale_EY float32), per output channel (the formula
    of the module docstring); a channel of zeros gets scale 0 and zero codes."""
    if not isinstance(w_EYX, Tensor) or w_EYX.dim() != 3 or not w_EYX.is_floating_point():
        shape = tuple(w_EYX.shape) if isinstance(w_EYX, Tensor) else type(w_EYX).__name__
        raise ValueError(f"quantize_weight: w_EYX must be a 3-D float tensor (E, Y, X), got {shape}")
    E, Y, X = w_EYX.shape
    q_EYX = torch.empty(E, Y, X, dtype=torch.int8, device=w_EYX.device)
    scale_EY = torch.empty(E, Y, dtype=torch.float32, device=w_EYX.device)
    for e in range(E):  # one expert's float32 copy at a time
        w = w_EYX[e].detach().float()
        torch.div(w.abs().amax(dim=-1), 127.0, out=scale_EY[e])
        q = torch.round(w / scale_EY[e].clamp_min(torch.finfo(torch.float32).tiny)[:, None])
        q_EYX[e] = q.clamp_(-127, 127)
    return q_EYX, scale_EY


class Int8GroupedExperts(nn.Module):
    """The int8 inference copy of a :class:`moe.GroupedExperts`: the same forward contract
    (ExpertRows -> y_ND (N, D)), its projections run by ``moe.ops.grouped_mm_w8``.

    Buffers (no parameters): q_in_EHD (E, H, D) int8 and s_in_EH (E, H) float32 for the first
    projection, q_out_EDF (E, D, F) int8 and s_out_ED (E, D) for the second (nn.Linear layout:
    each output channel's inputs contiguous, which the kernel streams), and the biases, if any, in
    the source dtype. Activations must have the source weights' dtype (bfloat16 or float32).
    """

    def __init__(self, experts: GroupedExperts) -> None:
        super().__init__()
        if not isinstance(experts, GroupedExperts):
            raise TypeError(f"Int8GroupedExperts: experts must be a moe.GroupedExperts, got {type(experts).__name__}")
        dtype = experts.w_in_EDH.dtype
        if dtype not in (torch.bfloat16, torch.float32, torch.float16):
            raise TypeError(f"Int8GroupedExperts: the experts' weights must be bfloat16/float32/float16, got {dtype}")
        self.num_experts, self.hidden_size = experts.num_experts, experts.hidden_size
        self.ffn_hidden_size, self.activation, self.dtype = experts.ffn_hidden_size, experts.activation, dtype
        q_in, s_in = quantize_weight(experts.w_in_EDH.transpose(1, 2))
        q_out, s_out = quantize_weight(experts.w_out_EFD.transpose(1, 2))
        self.register_buffer("q_in_EHD", q_in)
        self.register_buffer("s_in_EH", s_in)
        self.register_buffer("q_out_EDF", q_out)
        self.register_buffer("s_out_ED", s_out)
        for name in ("b_in_EH", "b_out_ED"):
            b = getattr(experts, name)
            self.register_buffer(name, None if b is None else b.detach().clone())

    def forward(self, rows: ExpertRows) -> Tensor:
        """rows (materialised or gathered, as from a dispatcher) -> y_ND (N, D) in rows.x's dtype;
        rows past offs_E[-1] come out zero."""
        if not isinstance(rows, ExpertRows):
            raise TypeError(f"Int8GroupedExperts: rows must be moe.ExpertRows, got {type(rows).__name__}")
        x = rows.x
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Int8GroupedExperts is for inference: its int8 weights have no gradient and "
                               "the input requires grad; run under torch.no_grad() / torch.inference_mode()")
        if x.dim() != 2 or x.shape[1] != self.hidden_size or x.dtype != self.dtype:
            raise ValueError(f"Int8GroupedExperts: rows.x must be ({'T' if rows.gathered else 'N'}, "
                             f"hidden_size={self.hidden_size}) {self.dtype}, got {x.dtype} of shape {tuple(x.shape)}")
        rows = rows.materialize()  # at decode sizes the permuted copy is a few rows
        offs_E, N = rows.offs_E, rows.num_rows
        h_NH = torch.ops.moe.grouped_mm_w8(rows.x, self.q_in_EHD, self.s_in_EH, offs_E)
        if self.b_in_EH is not None:
            h_NH = h_NH + row_bias(self.b_in_EH, offs_E, N)
        y_ND = torch.ops.moe.grouped_mm_w8(activate(h_NH, self.activation), self.q_out_EDF, self.s_out_ED, offs_E)
        if self.b_out_ED is not None:
            y_ND = y_ND + row_bias(self.b_out_ED, offs_E, N)
        return y_ND

    def weight_bytes(self) -> int:
        """Bytes of the int8 weights and their scales (what a forward over every expert reads)."""
        return sum(b.numel() * b.element_size() for b in (self.q_in_EHD, self.s_in_EH, self.q_out_EDF, self.s_out_ED))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"ffn_hidden_size={self.ffn_hidden_size}, activation={self.activation}, dtype={self.dtype}")


def _is_hf_experts(module: nn.Module) -> bool:
    """A transformers (>= 5) experts module: decorated by ``use_experts_implementation``."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated", "down_proj"))


def _check_hf_experts(experts: nn.Module) -> None:
    """The layout Int8HFExperts runs: SiLU on [gate; up] concatenated, (E, Y, X) weights, no bias."""
    from transformers.integrations.moe import _default_apply_gate  # the class's gate must be the default

    act = getattr(experts, "act_fn", None)
    silu = act is torch.nn.functional.silu or isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    why = [w for w, bad in (("its gate is not SiLU on [gate; up] concatenated",
                             not (experts.has_gate and experts.is_concatenated and silu)
                             or getattr(type(experts), "_apply_gate", None) is not _default_apply_gate),
                            ("its weights are transposed", experts.is_transposed),
                            ("it has biases", getattr(experts, "has_bias", False)),
                            ("it has a post-expert norm", getattr(experts, "has_post_expert_norm", False)))
           if bad]
    if why:
        raise ValueError(f"quantize_experts: {type(experts).__name__} is not supported in int8: {'; '.join(why)}")


class Int8HFExperts(nn.Module):
    """A transformers experts module (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3's routed experts:
    SiLU-gated [gate; up], nn.Linear layout, no bias) in int8, with the experts' call signature:
    forward(hidden_states (T, D), top_k_index (T, K), top_k_weights (T, K)) -> (T, D). Ids outside
    [0, E) are empty slots (transformers' expert-parallel placeholders), as in moekit's
    experts implementation. It replaces the module, so it runs whatever experts_implementation the
    model's config names. Buffers: q_in_EHD/s_in_EH from gate_up_proj (E, 2F, D), q_out_EDF/s_out_ED
    from down_proj (E, D, F), already in the kernel's (E, Y, X) layout."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        _check_hf_experts(experts)
        self.num_experts, self.dtype = experts.num_experts, experts.gate_up_proj.dtype
        for name, w in (("in", experts.gate_up_proj), ("out", experts.down_proj)):
            q, s = quantize_weight(w)
            self.register_buffer(f"q_{name}_{'EHD' if name == 'in' else 'EDF'}", q)
            self.register_buffer(f"s_{name}_{'EH' if name == 'in' else 'ED'}", s)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            raise RuntimeError("Int8HFExperts is for inference: its int8 weights have no gradient and "
                               "hidden_states requires grad; run under torch.no_grad() / torch.inference_mode()")
        E = self.num_experts
        ids_TK = top_k_index.to(torch.int64)
        p = ops.plan(ids_TK.masked_fill((ids_TK < 0) | (ids_TK >= E), -1), E)
        x_ND = ops.permute(hidden_states.to(self.dtype), p)
        h_NH = torch.ops.moe.grouped_mm_w8(x_ND, self.q_in_EHD, self.s_in_EH, p.offs_E)
        y_ND = torch.ops.moe.grouped_mm_w8(ops.swiglu(h_NH), self.q_out_EDF, self.s_out_ED, p.offs_E)
        w_TK = top_k_weights if top_k_weights.dtype in (torch.float32, y_ND.dtype) else top_k_weights.float()
        return ops.unpermute(y_ND, p, w_TK).to(hidden_states.dtype)


def quantize_experts(model: nn.Module) -> nn.Module:
    """Replaces every :class:`moe.GroupedExperts` in ``model`` by its :class:`Int8GroupedExperts`
    and every transformers experts module by its :class:`Int8HFExperts` (in place; ``model`` itself
    when it is one) and returns the model, for inference. The float expert weights are released
    with the replaced modules."""
    if isinstance(model, GroupedExperts):
        return Int8GroupedExperts(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_experts: model must be an nn.Module, got {type(model).__name__}")
    if _is_hf_experts(model):
        return Int8HFExperts(model)
    targets: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, GroupedExperts) or _is_hf_experts(child):
                targets.append((parent, name, child))
    for parent, name, child in targets:
        setattr(parent, name, Int8GroupedExperts(child) if isinstance(child, GroupedExperts) else Int8HFExperts(child))
    return model

