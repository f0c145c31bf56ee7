"""The ops of ``torch.ops.moe``, one :func:`define_op` call each: schema, fallback (the twin, or
a composition of other moe ops), fake kernel and autograd formula. Importing ``moe.ops`` runs this
module once. The schemas equal those of csrc/registration.cpp (define_op checks it).

Shape legend: T tokens, K slots per token, E experts, N routed rows (the host-side bound T*K),
D feature dim, X/Y GEMM input/output dims, F a gated activation's output width (h is 2F).
"""

from __future__ import annotations

import torch

from moe.ops import twins
from moe.ops.registry import define_op

ops = torch.ops.moe  # resolved at call time: the ops below refer to each other


def _acc(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _same_device(op: str, first, **named) -> None:
    """Fake kernels run for meta/fake tensors, where the C++ device checks never run."""
    for name, t in named.items():
        if t is not None:
            torch._check(t.device == first.device,
                         lambda: f"moe.{op}: {name} is on {t.device} but the other inputs are on {first.device}")


def _cast(grad, like):
    return None if grad is None or like is None else grad.to(like.dtype)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


# ---- plan: a stable counting sort of the T*K slots by expert ---------------------------------

def _plan_fake(ids_TK, num_experts):
    T, K = ids_TK.shape
    i32 = dict(dtype=torch.int32, device=ids_TK.device)
    i64 = dict(dtype=torch.int64, device=ids_TK.device)
    return (ids_TK.new_empty(num_experts, **i32), ids_TK.new_empty(num_experts, **i32),
            ids_TK.new_empty(T * K, **i64), ids_TK.new_empty(T, K, **i64))


plan = define_op(
    "plan", "(Tensor ids_TK, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)",
    fallback=twins.plan_torch, fake=_plan_fake)


# ---- permute: x_ND[i] = x_TD[order_N[i] // K] * scale_TK[t, k] ----------------------------------

def _permute_fake(x_TD, order_N, rows_TK, scale_TK=None):
    _same_device("permute", x_TD, order_N=order_N, rows_TK=rows_TK, scale_TK=scale_TK)
    return x_TD.new_empty(order_N.shape[0], x_TD.shape[1])


def _permute_setup(ctx, inputs, output):
    x_TD, order_N, rows_TK, scale_TK = inputs
    ctx.save_for_backward(x_TD if scale_TK is not None else None, order_N, rows_TK, scale_TK)


def _permute_backward(ctx, g_ND):
    x_TD, order_N, rows_TK, scale_TK = ctx.saved_tensors
    g_x = g_s = None
    if ctx.needs_input_grad[0]:
        g_x = ops.unpermute(g_ND, order_N, rows_TK, scale_TK)
    if scale_TK is not None and ctx.needs_input_grad[3]:
        g_s = _cast(ops.unpermute_weights_grad(x_TD, g_ND, order_N, rows_TK), scale_TK)
    return g_x, None, None, g_s


permute = define_op(
    "permute", "(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor? scale_TK=None) -> Tensor",
    fallback=twins.permute_torch, fake=_permute_fake,
    backward=_permute_backward, setup_context=_permute_setup)


# ---- unpermute: y_TD[t] = sum_k weights_TK[t, k] * y_ND[rows_TK[t, k]] ---------------------------

def _unpermute_fake(y_ND, order_N, rows_TK, weights_TK=None):
    _same_device("unpermute", y_ND, order_N=order_N, rows_TK=rows_TK, weights_TK=weights_TK)
    return y_ND.new_empty(rows_TK.shape[0], y_ND.shape[1])


def _unpermute_setup(ctx, inputs, output):
    y_ND, order_N, rows_TK, weights_TK = inputs
    ctx.save_for_backward(y_ND if weights_TK is not None else None, order_N, rows_TK, weights_TK)


def _unpermute_backward(ctx, g_TD):
    y_ND, order_N, rows_TK, weights_TK = ctx.saved_tensors
    g_y = g_w = None
    if ctx.needs_input_grad[0]:
        g_y = ops.permute(g_TD, order_N, rows_TK, weights_TK)
    if weights_TK is not None and ctx.needs_input_grad[3]:
        g_w = _cast(ops.unpermute_weights_grad(g_TD, y_ND, order_N, rows_TK), weights_TK)
    return g_y, None, None, g_w


unpermute = define_op(
    "unpermute", "(Tensor y_ND, Tensor order_N, Tensor rows_TK, Tensor? weights_TK=None) -> Tensor",
    fallback=twins.unpermute_torch, fake=_unpermute_fake,
    backward=_unpermute_backward, setup_context=_unpermute_setup)


# ---- unpermute_weights_grad: dw_TK[t, k] = <grad_TD[t], y_ND[rows_TK[t, k]]> ---------------------

def _weights_grad_fake(grad_TD, y_ND, order_N, rows_TK):
    _same_device("unpermute_weights_grad", y_ND, grad_TD=grad_TD, order_N=order_N, rows_TK=rows_TK)
    return y_ND.new_empty(rows_TK.shape, dtype=_acc(y_ND.dtype))


def _weights_grad_backward(ctx, d_TK):
    grad_TD, y_ND, order_N, rows_TK = ctx.saved_tensors
    d = d_TK.to(_acc(y_ND.dtype))
    d = d if d.dtype == y_ND.dtype or d.dtype == torch.float32 else d.to(y_ND.dtype)
    g_g = ops.unpermute(y_ND, order_N, rows_TK, d) if ctx.needs_input_grad[0] else None
    g_y = ops.permute(grad_TD, order_N, rows_TK, d) if ctx.needs_input_grad[1] else None
    return g_g, g_y, None, None


unpermute_weights_grad = define_op(
    "unpermute_weights_grad", "(Tensor grad_TD, Tensor y_ND, Tensor order_N, Tensor rows_TK) -> Tensor",
    fallback=twins.unpermute_weights_grad_torch, fake=_weights_grad_fake,
    backward=_weights_grad_backward, setup_context=_save_inputs)


# ---- grouped_mm: c_e = a_e @ b_e; grouped_mm_wgrad: w_e = a_e^T @ g_e ----------------------------

def _grouped_mm_fake(a_NX, b_EXY, offs_E):
    _same_device("grouped_mm", a_NX, b_EXY=b_EXY, offs_E=offs_E)
    return a_NX.new_empty(a_NX.shape[0], b_EXY.shape[2])


def _grouped_mm_backward(ctx, g_NY):
    a_NX, b_EXY, offs_E = ctx.saved_tensors
    g_a = ops.grouped_mm(g_NY, b_EXY.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
    g_b = None
    if ctx.needs_input_grad[1]:
        if b_EXY.dim() == 3 and b_EXY.stride(-2) == 1 and b_EXY.stride(-1) != 1:
            # b is a transposed view of an (E, Y, X) weight (nn.Linear layout, e.g. transformers'
            # experts): write its gradient in that layout, (g_e^T a_e)^T, so that autograd does not
            # copy an (E, X, Y) gradient into the weight's strides.
            g_b = ops.grouped_mm_wgrad(g_NY, a_NX, offs_E).transpose(-2, -1)
        else:
            g_b = ops.grouped_mm_wgrad(a_NX, g_NY, offs_E)
    return g_a, g_b, None


grouped_mm = define_op(
    "grouped_mm", "(Tensor a_NX, Tensor b_EXY, Tensor offs_E) -> Tensor",
    fallback=twins.grouped_mm_torch, fake=_grouped_mm_fake,
    backward=_grouped_mm_backward, setup_context=_save_inputs)


def _wgrad_fake(a_NX, g_NY, offs_E):
    _same_device("grouped_mm_wgrad", a_NX, g_NY=g_NY, offs_E=offs_E)
    return a_NX.new_empty(offs_E.shape[0], a_NX.shape[1], g_NY.shape[1])


def _wgrad_backward(ctx, d_EXY):
    a_NX, g_NY, offs_E = ctx.saved_tensors
    g_a = ops.grouped_mm(g_NY, d_EXY.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
    g_g = ops.grouped_mm(a_NX, d_EXY, offs_E) if ctx.needs_input_grad[1] else None
    return g_a, g_g, None


grouped_mm_wgrad = define_op(
    "grouped_mm_wgrad", "(Tensor a_NX, Tensor g_NY, Tensor offs_E) -> Tensor",
    fallback=twins.grouped_mm_wgrad_torch, fake=_wgrad_fake,
    backward=_wgrad_backward, setup_context=_save_inputs)


# ---- gather_grouped_mm(x, ., ., b, offs): c_i = x[token(i)] @ b_e, and gather_grouped_mm_wgrad
# (x, ., ., g, offs): w_e = sum over e's rows i of x[token(i)]^T g_i. Their fallback is the
# two-op form on the registered ops (permute, then the GEMM: each runs its kernel where there is
# one, so CUDA gets its kernels, not the twin's loop). In both backwards, d x sums each token's
# rows of (rows_NY @ w_e^T), with (rows_NY, w_EXY) = (d c, b) or (g, d w), and the other
# operand's gradient is the other op on x and the incoming gradient.

def _gather_fallback(x_TD, order_N, rows_TK, b_EXY, offs_E):
    return ops.grouped_mm(ops.permute(x_TD, order_N, rows_TK, None), b_EXY, offs_E)


def _gather_wgrad_fallback(x_TD, order_N, rows_TK, g_NY, offs_E):
    return ops.grouped_mm_wgrad(ops.permute(x_TD, order_N, rows_TK, None), g_NY, offs_E)


def _gather_fake(x_TD, order_N, rows_TK, b_EXY, offs_E):
    _same_device("gather_grouped_mm", x_TD, order_N=order_N, rows_TK=rows_TK, b_EXY=b_EXY, offs_E=offs_E)
    return x_TD.new_empty(order_N.shape[0], b_EXY.shape[2])


def _gather_wgrad_fake(x_TD, order_N, rows_TK, g_NY, offs_E):
    _same_device("gather_grouped_mm_wgrad", x_TD, order_N=order_N, rows_TK=rows_TK, g_NY=g_NY, offs_E=offs_E)
    return x_TD.new_empty(offs_E.shape[0], x_TD.shape[1], g_NY.shape[1])


def _gather_backward(grad_is_rows: bool):
    def backward(ctx, grad):
        x_TD, order_N, rows_TK, z, offs_E = ctx.saved_tensors
        rows_NY, w_EXY = (grad, z) if grad_is_rows else (z, grad)
        other = ops.gather_grouped_mm_wgrad if grad_is_rows else ops.gather_grouped_mm
        g_x = g_z = None
        if ctx.needs_input_grad[0]:
            g_x = ops.unpermute(ops.grouped_mm(rows_NY, w_EXY.transpose(-2, -1), offs_E), order_N, rows_TK, None)
        if ctx.needs_input_grad[3]:
            g_z = other(x_TD, order_N, rows_TK, grad, offs_E)
        return g_x, None, None, g_z, None
    return backward


gather_grouped_mm = define_op(
    "gather_grouped_mm", "(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor b_EXY, Tensor offs_E) -> Tensor",
    fallback=_gather_fallback, fake=_gather_fake,
    backward=_gather_backward(True), setup_context=_save_inputs)

gather_grouped_mm_wgrad = define_op(
    "gather_grouped_mm_wgrad", "(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor g_NY, Tensor offs_E) -> Tensor",
    fallback=_gather_wgrad_fallback, fake=_gather_wgrad_fake,
    backward=_gather_backward(False), setup_context=_save_inputs)


# ---- linear_f32: x_TD @ weight_ED^T in float32 (the routers' logits) ------------------------------

def _linear_fake(x_TD, weight_ED):
    _same_device("linear_f32", x_TD, weight_ED=weight_ED)
    return x_TD.new_empty(x_TD.shape[0], weight_ED.shape[0], dtype=_acc(x_TD.dtype))


def _linear_backward(ctx, g_TE):
    """The gradients of F.linear(x.float(), w.float()), cast back as autograd would."""
    x_TD, weight_ED = ctx.saved_tensors
    acc = g_TE.dtype
    g_x = (g_TE @ weight_ED.to(acc)).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
    g_w = (g_TE.t() @ x_TD.to(acc)).to(weight_ED.dtype) if ctx.needs_input_grad[1] else None
    return g_x, g_w


linear_f32 = define_op(
    "linear_f32", "(Tensor x_TD, Tensor weight_ED) -> Tensor",
    fallback=twins.linear_f32_torch, fake=_linear_fake,
    backward=_linear_backward, setup_context=_save_inputs)


# ---- swiglu: silu(gate) * up on h = [gate; up]; backward one pass over h -------------------------

def _check_swiglu_h(op, h):
    torch._check(h.dim() >= 1 and h.shape[-1] > 0 and h.shape[-1] % 2 == 0,
                 lambda: f"moe.{op}: h's last dim must be 2F = [gate; up], a positive even number, "
                         f"got shape {tuple(h.shape)}")


def _swiglu_fake(h):
    _check_swiglu_h("swiglu", h)
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


def _swiglu_backward_fake(grad, h):
    _check_swiglu_h("swiglu_backward", h)
    _same_device("swiglu_backward", h, grad=grad)
    torch._check(tuple(grad.shape) == (*h.shape[:-1], h.shape[-1] // 2),
                 lambda: f"moe.swiglu_backward: grad must have shape {(*h.shape[:-1], h.shape[-1] // 2)}, "
                         f"got {tuple(grad.shape)}")
    return h.new_empty(h.shape)


def _swiglu_backward(ctx, g):
    (h,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the differentiable twin, for double backward
        return twins.swiglu_backward_torch(g, h)
    return ops.swiglu_backward(g, h)


swiglu_backward = define_op(
    "swiglu_backward", "(Tensor grad, Tensor h) -> Tensor",
    fallback=twins.swiglu_backward_torch, fake=_swiglu_backward_fake)

swiglu = define_op(
    "swiglu", "(Tensor h) -> Tensor",
    fallback=twins.swiglu_torch, fake=_swiglu_fake,
    backward=_swiglu_backward, setup_context=_save_inputs)


# ---- grouped_mm_w8: c_i = (a_i @ q_e^T) * scale_e, weight-only int8 experts (inference) --------

def _grouped_mm_w8_fake(a_NX, q_EYX, scale_EY, offs_E):
    twins.check_grouped_mm_w8_args(a_NX, q_EYX, scale_EY, offs_E)
    return a_NX.new_empty(a_NX.shape[0], q_EYX.shape[1])


def _grouped_mm_w8_backward(ctx, g_NY):
    raise RuntimeError("moe.grouped_mm_w8 is for inference: int8 experts have no gradient (run under "
                       "torch.no_grad() / torch.inference_mode(), or train the bfloat16 experts)")


grouped_mm_w8 = define_op(
    "grouped_mm_w8", "(Tensor a_NX, Tensor q_EYX, Tensor scale_EY, Tensor offs_E) -> Tensor",
    fallback=twins.grouped_mm_w8_torch, fake=_grouped_mm_w8_fake,
    backward=_grouped_mm_w8_backward, setup_context=lambda ctx, inputs, output: None)
