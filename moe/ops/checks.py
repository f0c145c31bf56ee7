"""Argument checks of the ops on the Python side, one helper per kind of argument.

- :func:`check_int`: the integer arguments of the op wrappers (``moe.ops.plan``'s num_experts):
  an int, never a bool or a float that would be truncated.
- ``check_<op>_args``: the metadata checks of csrc/checks.cpp (ranks, dtypes, sizes, devices;
  never tensor data, so no host sync), the same rules and argument names. ``define_op`` runs them
  before an op's fake kernel (meta and fake tensors, ``torch.compile``) and before its fallback
  (the twins, where no compiled kernel is registered), so every path rejects what the compiled
  kernels reject. Data checks (ids in range, offsets monotone) stay in the kernels and twins.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim, X/Y
GEMM input/output dims.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["MAX_EXPERTS", "check_int"]

MAX_EXPERTS = 1 << 20
"""The most experts ``moe.ops.plan`` takes (csrc/checks.cpp's kMaxExperts): a plan holds counts_E
and offs_E (int32 each) and its kernels O(E) scratch, so an absurd ``num_experts`` (up to 2^31 - 1)
would allocate gigabytes for ids that need a handful; 2^20 costs at most 16 MiB."""

_INDEX = (torch.int64, torch.int32)
_MM = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_int(op: str, name: str, value):
    """``value`` as an int, or a TypeError naming ``moe.<op>``'s argument ``name``: Python and
    NumPy integers (and torch.SymInt while tracing) pass; bool, float and tensors do not (a
    float would be truncated, a tensor read with a host sync)."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"moe.{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check(cond, op: str, message: str) -> None:
    torch._check(cond, lambda: f"moe.{op}: {message}")


def _shape(t) -> tuple:
    return tuple(t.shape)


def check_plan_args(ids_TK, num_experts) -> None:
    _check(ids_TK.dim() == 2, "plan", f"ids_TK must be 2-D (T, K), got shape {_shape(ids_TK)}")
    _check(ids_TK.dtype in _INDEX, "plan", f"ids_TK must be int64 or int32 expert ids, got {ids_TK.dtype}")
    _check(1 <= num_experts <= MAX_EXPERTS, "plan",
           f"num_experts must be in [1, 2^20 = {MAX_EXPERTS}] (the plan holds counts_E and offs_E, "
           f"one int32 each per expert), got {num_experts}")


def check_dispatch_args(op, x, x_name, rows, order_N, rows_TK) -> None:
    """x (``rows`` x D, "T" the plan's tokens or "N" its rows) against a plan's order_N, rows_TK."""
    _check(order_N.dim() == 1 and order_N.dtype == torch.int64, op,
           f"order_N must be a 1-D int64 tensor (Plan.order_N), got {order_N.dtype} of shape {_shape(order_N)}")
    _check(rows_TK.dim() == 2 and rows_TK.dtype == torch.int64, op,
           f"rows_TK must be a 2-D int64 tensor (Plan.rows_TK), got {rows_TK.dtype} of shape {_shape(rows_TK)}")
    _check(order_N.shape[0] == rows_TK.numel(), op,
           f"order_N has {order_N.shape[0]} rows but rows_TK has {rows_TK.numel()} slots "
           "(both come from one Plan)")
    _check(x.dim() == 2, op, f"{x_name} must be 2-D, got shape {_shape(x)}")
    _check(x.dtype.is_floating_point, op, f"{x_name} must be a floating tensor, got {x.dtype}")
    if rows == "T":
        expect, desc = rows_TK.shape[0], "T, the plan's tokens"
    else:
        expect, desc = order_N.shape[0], "N, the plan's rows"
    _check(x.shape[0] == expect, op, f"{x_name} has {x.shape[0]} rows, expected {expect} ({desc})")
    _check(x.device == order_N.device and x.device == rows_TK.device, op,
           f"{x_name} is on {x.device} but the plan (order_N/rows_TK) is on {order_N.device}")


def check_weights_arg(op, name, w_TK, rows_TK, x) -> None:
    if w_TK is None:
        return
    _check(w_TK.shape == rows_TK.shape, op,
           f"{name} must have shape {_shape(rows_TK)} (T, K), got {_shape(w_TK)}")
    _check(w_TK.dtype in (x.dtype, torch.float32), op,
           f"{name} must be float32 or match the data dtype {x.dtype}, got {w_TK.dtype}")
    _check(w_TK.device == x.device, op, f"{name} is on {w_TK.device} but the data is on {x.device}")


def check_permute_args(x_TD, order_N, rows_TK, scale_TK=None) -> None:
    check_dispatch_args("permute", x_TD, "x_TD", "T", order_N, rows_TK)
    check_weights_arg("permute", "scale_TK", scale_TK, rows_TK, x_TD)


def check_unpermute_args(y_ND, order_N, rows_TK, weights_TK=None) -> None:
    check_dispatch_args("unpermute", y_ND, "y_ND", "N", order_N, rows_TK)
    check_weights_arg("unpermute", "weights_TK", weights_TK, rows_TK, y_ND)


def check_unpermute_weights_grad_args(grad_TD, y_ND, order_N, rows_TK, op="unpermute_weights_grad") -> None:
    check_dispatch_args(op, y_ND, "y_ND", "N", order_N, rows_TK)
    check_dispatch_args(op, grad_TD, "grad_TD", "T", order_N, rows_TK)
    _check(grad_TD.dtype == y_ND.dtype and grad_TD.shape[1] == y_ND.shape[1], op,
           f"grad_TD ({grad_TD.dtype}, D={grad_TD.shape[1]}) must match y_ND ({y_ND.dtype}, D={y_ND.shape[1]})")


def check_unpermute_backward_args(grad_TD, y_ND, order_N, rows_TK, weights_TK, grad_y=True,
                                  grad_weights=True) -> None:
    op = "unpermute_backward"
    check_unpermute_weights_grad_args(grad_TD, y_ND, order_N, rows_TK, op)
    check_weights_arg(op, "weights_TK", weights_TK, rows_TK, grad_TD)


def _check_offs(op, offs_E, a, a_name="a_NX") -> None:
    _check(offs_E.dim() == 1 and offs_E.dtype == torch.int32, op,
           "offs_E must be a 1-D int32 tensor (cumulative end row of each expert), "
           f"got {offs_E.dtype} of shape {_shape(offs_E)}")
    _check(offs_E.device == a.device, op, f"offs_E is on {offs_E.device} but {a_name} is on {a.device}")


def check_grouped_mm_args(a_NX, b_EXY, offs_E, op="grouped_mm") -> None:
    _check(a_NX.dim() == 2, op, f"a_NX must be 2-D (N, X), got shape {_shape(a_NX)}")
    _check(b_EXY.dim() == 3, op, f"b_EXY must be 3-D (E, X, Y), got shape {_shape(b_EXY)}")
    _check(a_NX.dtype in _MM, op, f"a_NX must be float32/float64/bfloat16/float16, got {a_NX.dtype}")
    _check(a_NX.dtype == b_EXY.dtype, op, f"a_NX is {a_NX.dtype} but b_EXY is {b_EXY.dtype}")
    _check(a_NX.device == b_EXY.device, op, f"a_NX is on {a_NX.device} but b_EXY is on {b_EXY.device}")
    _check(a_NX.shape[1] == b_EXY.shape[1], op,
           f"a_NX has X={a_NX.shape[1]} columns but b_EXY has X={b_EXY.shape[1]} rows per expert")
    _check_offs(op, offs_E, a_NX)
    _check(offs_E.shape[0] == b_EXY.shape[0], op,
           f"offs_E has {offs_E.shape[0]} entries but b_EXY has E={b_EXY.shape[0]} experts")


def _check_grad_rows(op, grad_NY, rows, Y, like, like_name) -> None:
    """A backward op's incoming gradient: (rows, Y) in ``like``'s dtype, on its device."""
    _check(grad_NY.dim() == 2 and _shape(grad_NY) == (rows, Y), op,
           f"grad_NY must have shape (N, Y) = {(rows, Y)}, got {_shape(grad_NY)}")
    _check(grad_NY.dtype == like.dtype, op, f"grad_NY is {grad_NY.dtype} but {like_name} is {like.dtype}")
    _check(grad_NY.device == like.device, op, f"grad_NY is on {grad_NY.device} but {like_name} is on {like.device}")


def check_grouped_mm_backward_args(grad_NY, a_NX, b_EXY, offs_E, grad_a=True, grad_b=True) -> None:
    op = "grouped_mm_backward"
    check_grouped_mm_args(a_NX, b_EXY, offs_E, op)
    _check_grad_rows(op, grad_NY, a_NX.shape[0], b_EXY.shape[2], a_NX, "a_NX")


def check_grouped_mm_wgrad_args(a_NX, g_NY, offs_E) -> None:
    op = "grouped_mm_wgrad"
    _check(a_NX.dim() == 2 and g_NY.dim() == 2, op,
           f"a_NX and g_NY must be 2-D, got shapes {_shape(a_NX)} and {_shape(g_NY)}")
    _check(a_NX.dtype in _MM and a_NX.dtype == g_NY.dtype, op,
           f"a_NX and g_NY must share a float dtype, got {a_NX.dtype} and {g_NY.dtype}")
    _check(a_NX.shape[0] == g_NY.shape[0], op, f"a_NX has {a_NX.shape[0]} rows but g_NY has {g_NY.shape[0]}")
    _check(a_NX.device == g_NY.device, op, f"a_NX is on {a_NX.device} but g_NY is on {g_NY.device}")
    _check_offs(op, offs_E, a_NX)


def _check_gather_common(op, x_TD, order_N, rows_TK, other, other_name, offs_E) -> None:
    check_dispatch_args(op, x_TD, "x_TD", "T", order_N, rows_TK)
    _check(x_TD.dtype in _MM, op, f"x_TD must be float32/float64/bfloat16/float16, got {x_TD.dtype}")
    _check(other.dtype == x_TD.dtype, op, f"x_TD is {x_TD.dtype} but {other_name} is {other.dtype}")
    _check(other.device == x_TD.device, op, f"{other_name} is on {other.device} but x_TD is on {x_TD.device}")
    _check_offs(op, offs_E, x_TD, "x_TD")


def check_gather_grouped_mm_args(x_TD, order_N, rows_TK, b_EXY, offs_E, op="gather_grouped_mm") -> None:
    _check(b_EXY.dim() == 3, op, f"b_EXY must be 3-D (E, X, Y), got shape {_shape(b_EXY)}")
    _check_gather_common(op, x_TD, order_N, rows_TK, b_EXY, "b_EXY", offs_E)
    _check(x_TD.shape[1] == b_EXY.shape[1], op,
           f"x_TD has X={x_TD.shape[1]} columns but b_EXY has X={b_EXY.shape[1]} rows per expert")
    _check(offs_E.shape[0] == b_EXY.shape[0], op,
           f"offs_E has {offs_E.shape[0]} entries but b_EXY has E={b_EXY.shape[0]} experts")


def check_gather_grouped_mm_backward_args(grad_NY, x_TD, order_N, rows_TK, b_EXY, offs_E, grad_x=True,
                                          grad_b=True) -> None:
    op = "gather_grouped_mm_backward"
    check_gather_grouped_mm_args(x_TD, order_N, rows_TK, b_EXY, offs_E, op)
    _check_grad_rows(op, grad_NY, order_N.shape[0], b_EXY.shape[2], x_TD, "x_TD")


def check_gather_grouped_mm_swiglu_args(x_TD, order_N, rows_TK, b_EXY, offs_E, keep_h=False) -> None:
    op = "gather_grouped_mm_swiglu"
    check_gather_grouped_mm_args(x_TD, order_N, rows_TK, b_EXY, offs_E, op)
    Y = b_EXY.shape[2]
    _check(Y > 0 and Y % 2 == 0, op, f"b_EXY's Y must be 2F = [gate; up], a positive even number, got {Y}")


def check_gather_grouped_mm_wgrad_args(x_TD, order_N, rows_TK, g_NY, offs_E, out_yx=False) -> None:
    op = "gather_grouped_mm_wgrad"
    _check(g_NY.dim() == 2, op, f"g_NY must be 2-D (N, Y), got shape {_shape(g_NY)}")
    _check_gather_common(op, x_TD, order_N, rows_TK, g_NY, "g_NY", offs_E)
    _check(g_NY.shape[0] == order_N.shape[0], op,
           f"g_NY has {g_NY.shape[0]} rows but the plan has N={order_N.shape[0]}")


def check_grouped_mm_unpermute_args(a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK=None, swiglu=False,
                                    op="grouped_mm_unpermute") -> None:
    if swiglu:  # a_NX is h = [gate; up]
        _check(a_NX.dim() == 2 and b_EXY.dim() == 3 and a_NX.shape[1] == 2 * b_EXY.shape[1], op,
               f"with swiglu, a_NX must be h = [gate; up] with 2 * X = 2 * b_EXY.size(1) columns, got a_NX "
               f"{_shape(a_NX)} and b_EXY {_shape(b_EXY)}")
        check_grouped_mm_args(a_NX.narrow(1, 0, b_EXY.shape[1]), b_EXY, offs_E, op)
    else:
        check_grouped_mm_args(a_NX, b_EXY, offs_E, op)
    check_dispatch_args(op, a_NX, "a_NX", "N", order_N, rows_TK)
    check_weights_arg(op, "weights_TK", weights_TK, rows_TK, a_NX)


def check_grouped_mm_unpermute_backward_args(grad_TD, a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK=None,
                                             grad_a=True, grad_b=True, grad_weights=True, swiglu=False) -> None:
    op = "grouped_mm_unpermute_backward"
    check_grouped_mm_unpermute_args(a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK, swiglu, op)
    want = (rows_TK.shape[0], b_EXY.shape[2])
    _check(grad_TD.dim() == 2 and _shape(grad_TD) == want, op,
           f"grad_TD must have shape (T, Y) = {want}, got {_shape(grad_TD)}")
    _check(grad_TD.dtype == a_NX.dtype, op, f"grad_TD is {grad_TD.dtype} but a_NX is {a_NX.dtype}")
    _check(grad_TD.device == a_NX.device, op, f"grad_TD is on {grad_TD.device} but a_NX is on {a_NX.device}")


def check_linear_f32_args(x_TD, weight_ED, op="linear_f32") -> None:
    _check(x_TD.dim() == 2, op, f"x_TD must be 2-D (T, D), got shape {_shape(x_TD)}")
    _check(weight_ED.dim() == 2, op, f"weight_ED must be 2-D (E, D), got shape {_shape(weight_ED)}")
    _check(x_TD.dtype in _MM, op, f"x_TD must be float32/float64/bfloat16/float16, got {x_TD.dtype}")
    _check(weight_ED.dtype == x_TD.dtype, op, f"x_TD is {x_TD.dtype} but weight_ED is {weight_ED.dtype}")
    _check(weight_ED.device == x_TD.device, op,
           f"weight_ED is on {weight_ED.device} but x_TD is on {x_TD.device}")
    _check(weight_ED.shape[1] == x_TD.shape[1], op,
           f"x_TD has D={x_TD.shape[1]} but weight_ED has D={weight_ED.shape[1]}")


def check_linear_f32_backward_args(grad_TE, x_TD, weight_ED, grad_x=True, grad_weight=True) -> None:
    op = "linear_f32_backward"
    check_linear_f32_args(x_TD, weight_ED, op)
    want = (x_TD.shape[0], weight_ED.shape[0])
    _check(grad_TE.dim() == 2 and _shape(grad_TE) == want, op,
           f"grad_TE must have shape (T, E) = {want}, got {_shape(grad_TE)}")
    acc = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    _check(grad_TE.dtype == acc, op,
           f"grad_TE must be {acc} (linear_f32's output dtype for {x_TD.dtype} operands), got {grad_TE.dtype}")
    _check(grad_TE.device == x_TD.device, op, f"grad_TE is on {grad_TE.device} but x_TD is on {x_TD.device}")


def check_swiglu_args(h, op="swiglu") -> None:
    _check(h.dim() >= 1, op, "h must have at least one dim (..., 2F), got a scalar")
    _check(h.dtype in _MM, op, f"h must be float32/float64/bfloat16/float16, got {h.dtype}")
    _check(h.shape[-1] > 0 and h.shape[-1] % 2 == 0, op,
           f"h's last dim must be 2F = [gate; up], a positive even number, got shape {_shape(h)}")


def check_swiglu_backward_args(grad, h) -> None:
    op = "swiglu_backward"
    check_swiglu_args(h, op)
    _check(grad.dtype == h.dtype, op, f"grad is {grad.dtype} but h is {h.dtype}")
    _check(grad.device == h.device, op, f"grad is on {grad.device} but h is on {h.device}")
    want = (*h.shape[:-1], h.shape[-1] // 2)
    _check(_shape(grad) == want, op,
           f"grad must have shape {want} (h's with the last dim halved), got {_shape(grad)}")


def check_topk_route_args(logits_TE, bias_E, top_k, score, num_groups, topk_groups, norm_topk, scaling,
                          valid_T=None, num_seqs=0, check_finite=False, rule="none", threshold=1.0,
                          fw_scale=1.0, z_scale=1.0) -> None:
    op = "topk_route"
    _check(logits_TE.dim() == 2, op, f"logits_TE must be 2-D (T, E), got shape {_shape(logits_TE)}")
    _check(logits_TE.dtype in (torch.float32, torch.float64), op,
           f"logits_TE must be float32 or float64, got {logits_TE.dtype}")
    E = logits_TE.shape[1]
    _check(E >= 1, op, "logits_TE must have at least one expert column")
    if bias_E is not None:
        _check(bias_E.dim() == 1 and bias_E.shape[0] == E, op, f"bias_E must have shape ({E},), got {_shape(bias_E)}")
        _check(bias_E.is_floating_point(), op, f"bias_E must be floating point, got {bias_E.dtype}")
        _check(bias_E.device == logits_TE.device, op, f"bias_E is on {bias_E.device} but logits_TE is on {logits_TE.device}")
    _check(score in ("softmax", "sigmoid"), op, f"score must be 'softmax' or 'sigmoid', got '{score}'")
    _check(num_groups >= 0, op, f"num_groups must be >= 0 (0: no groups), got {num_groups}")
    allowed = E
    if num_groups > 0:
        _check(E % num_groups == 0, op, f"num_groups={num_groups} must divide the number of experts E={E}")
        _check(1 <= topk_groups <= num_groups, op, f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
        allowed = topk_groups * (E // num_groups)
    else:
        _check(topk_groups == 0, op, f"topk_groups must be 0 when num_groups is 0, got {topk_groups}")
    _check(1 <= top_k <= allowed, op, f"top_k must be in [1, {allowed}] (the experts it may choose from), got {top_k}")
    _check(math.isfinite(scaling), op, f"scaling must be finite, got {scaling}")
    T = logits_TE.shape[0]
    if valid_T is not None:
        _check(valid_T.dim() == 1 and valid_T.shape[0] == T and valid_T.dtype == torch.bool
               and valid_T.device == logits_TE.device, op,
               f"valid_T must be a bool tensor of shape ({T},) on {logits_TE.device}, got {valid_T.dtype} "
               f"{_shape(valid_T)} on {valid_T.device}")
    _check(num_seqs >= 0 and (num_seqs == 0 or T % num_seqs == 0), op,
           f"num_seqs must be 0 (no loss statistics) or divide T={T}, got {num_seqs}")
    _check(rule in ("none", "xmoe", "top_p"), op, f"rule must be 'none', 'xmoe' or 'top_p', got '{rule}'")
    _check(0.0 < threshold <= 1.0, op, f"threshold must be in (0, 1], got {threshold}")
    _check(math.isfinite(fw_scale), op, f"fw_scale must be finite, got {fw_scale}")
    _check(math.isfinite(z_scale), op, f"z_scale must be finite, got {z_scale}")
    if rule != "none":
        _check(score == "softmax", op,
               f"rule='{rule}' needs score='softmax' (it cuts the cumulative probability), got '{score}'")
        _check(bias_E is None and num_groups == 0, op,
               f"rule='{rule}' takes no bias_E and no groups (num_groups=0): it ranks by probability")


def check_topk_route_backward_args(grad_weights_TK, grad_probs_TE, ids_TK, probs_TE, score, norm_topk, scaling,
                                   grad_psum_BE=None, grad_zsum=None, logits_TE=None, valid_T=None,
                                   z_scale=1.0, grad_balance=None, fw_BE=None) -> None:
    op = "topk_route_backward"
    _check(math.isfinite(z_scale), op, f"z_scale must be finite, got {z_scale}")
    _check(probs_TE.dim() == 2 and probs_TE.dtype in (torch.float32, torch.float64), op,
           f"probs_TE must be a 2-D float32 or float64 tensor, got {probs_TE.dtype} {_shape(probs_TE)}")
    _check(ids_TK.dim() == 2 and ids_TK.dtype == torch.int64 and ids_TK.shape[0] == probs_TE.shape[0], op,
           f"ids_TK must be int64 (T, K) with T={probs_TE.shape[0]}, got {ids_TK.dtype} {_shape(ids_TK)}")
    _check(_shape(grad_weights_TK) == _shape(ids_TK) and grad_weights_TK.dtype == probs_TE.dtype, op,
           f"grad_weights_TK must have ids_TK's shape {_shape(ids_TK)} and probs_TE's dtype {probs_TE.dtype}, "
           f"got {grad_weights_TK.dtype} {_shape(grad_weights_TK)}")
    if grad_probs_TE is not None:
        _check(_shape(grad_probs_TE) == _shape(probs_TE) and grad_probs_TE.dtype == probs_TE.dtype, op,
               f"grad_probs_TE must match probs_TE ({probs_TE.dtype} {_shape(probs_TE)}), "
               f"got {grad_probs_TE.dtype} {_shape(grad_probs_TE)}")
    for t in (grad_weights_TK, ids_TK) + ((grad_probs_TE,) if grad_probs_TE is not None else ()):
        _check(t.device == probs_TE.device, op, f"all inputs must be on {probs_TE.device}")
    _check(score in ("softmax", "sigmoid"), op, f"score must be 'softmax' or 'sigmoid', got '{score}'")
    T, E = probs_TE.shape
    dt, dev = probs_TE.dtype, probs_TE.device
    if grad_psum_BE is not None:
        _check(grad_psum_BE.dim() == 2 and grad_psum_BE.shape[1] == E and grad_psum_BE.shape[0] >= 1
               and T % grad_psum_BE.shape[0] == 0 and grad_psum_BE.dtype == dt and grad_psum_BE.device == dev, op,
               f"grad_psum_BE must be (B, E={E}) with B dividing T={T}, of probs_TE's dtype {dt} on {dev}, "
               f"got {grad_psum_BE.dtype} {_shape(grad_psum_BE)}")
    if grad_zsum is not None:
        _check(grad_zsum.dim() == 0 and grad_zsum.dtype == dt and grad_zsum.device == dev, op,
               f"grad_zsum must be a 0-d {dt} tensor on {dev}, got {grad_zsum.dtype} {_shape(grad_zsum)}")
        _check(logits_TE is not None, op, "grad_zsum needs logits_TE (the z statistic's input)")
    if logits_TE is not None:
        _check(_shape(logits_TE) == _shape(probs_TE) and logits_TE.dtype == dt and logits_TE.device == dev, op,
               f"logits_TE must match probs_TE ({dt} {_shape(probs_TE)}), got {logits_TE.dtype} {_shape(logits_TE)}")
    if valid_T is not None:
        _check(valid_T.dim() == 1 and valid_T.shape[0] == T and valid_T.dtype == torch.bool and valid_T.device == dev,
               op, f"valid_T must be a bool tensor of shape ({T},), got {valid_T.dtype} {_shape(valid_T)}")
    if grad_balance is not None:
        _check(grad_balance.dim() == 0 and grad_balance.dtype == dt and grad_balance.device == dev, op,
               f"grad_balance must be a 0-d {dt} tensor on {dev}, got {grad_balance.dtype} {_shape(grad_balance)}")
        _check(fw_BE is not None, op, "grad_balance needs fw_BE (balance = sum(fw_BE * psum_BE))")
    if fw_BE is not None:
        _check(fw_BE.dim() == 2 and fw_BE.shape[1] == E and fw_BE.shape[0] >= 1 and T % fw_BE.shape[0] == 0
               and fw_BE.dtype == dt and fw_BE.device == dev, op,
               f"fw_BE must be (B, E={E}) with B dividing T={T}, of probs_TE's dtype {dt} on {dev}, "
               f"got {fw_BE.dtype} {_shape(fw_BE)}")
        if grad_psum_BE is not None:
            _check(fw_BE.shape == grad_psum_BE.shape, op,
                   f"fw_BE {_shape(fw_BE)} and grad_psum_BE {_shape(grad_psum_BE)} must have one shape (B, E)")


def check_grouped_mm_w8_args(a_NX, q_EYX, scale_EY, offs_E) -> None:
    """The checks of csrc/grouped_mm_int8.cpp (metadata only), for the twin and the fake kernel:
    a_NX (N, X) float32/bfloat16/float16, q_EYX (E, Y, X) int8, scale_EY (E, Y) float32, offs_E
    (E,) int32, one device. Raises RuntimeError naming the argument."""
    def need(cond, msg):
        torch._check(bool(cond), lambda: f"moe.grouped_mm_w8: {msg}")

    need(a_NX.dim() == 2, f"a_NX must be 2-D (N, X), got shape {tuple(a_NX.shape)}")
    need(a_NX.dtype in (torch.float32, torch.bfloat16, torch.float16),
         f"a_NX must be float32/bfloat16/float16, got {a_NX.dtype}")
    need(q_EYX.dim() == 3 and q_EYX.dtype == torch.int8,
         f"q_EYX must be a 3-D int8 tensor (E, Y, X), got {q_EYX.dtype} of shape {tuple(q_EYX.shape)}")
    E, Y, X = q_EYX.shape
    need(X == a_NX.shape[1], f"a_NX has X={a_NX.shape[1]} columns but q_EYX has X={X} inputs per channel")
    need(scale_EY.dtype == torch.float32 and tuple(scale_EY.shape) == (E, Y),
         f"scale_EY must be float32 of shape (E, Y) = ({E}, {Y}), got {scale_EY.dtype} of shape "
         f"{tuple(scale_EY.shape)}")
    need(offs_E.dim() == 1 and offs_E.dtype == torch.int32 and offs_E.shape[0] == E,
         f"offs_E must be 1-D int32 of length E={E} (cumulative end row of each expert), got "
         f"{offs_E.dtype} of shape {tuple(offs_E.shape)}")
    for name, t in (("q_EYX", q_EYX), ("scale_EY", scale_EY), ("offs_E", offs_E)):
        need(t.device == a_NX.device, f"{name} is on {t.device} but a_NX is on {a_NX.device}")
