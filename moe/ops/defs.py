"""The ops of ``torch.ops.moe``, one :func:`define_op` call each: schema, fallback (the twin, or
a composition of other moe ops), fake kernel, metadata checks (moe/ops/checks.py, those of the
compiled kernels, run before the fake kernel and the fallback) and autograd formula. Importing ``moe.ops`` runs this
module once. The schemas equal those of csrc/registration.cpp (define_op checks it).

Shape legend: T tokens, K slots per token, E experts, N routed rows (the host-side bound T*K),
D feature dim, X/Y GEMM input/output dims, F a gated activation's output width (h is 2F).
"""

from __future__ import annotations

import torch

from moe.ops import checks, twins
from moe.ops.registry import define_op

ops = torch.ops.moe  # resolved at call time: the ops below refer to each other


def _acc(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
    fallback=twins.plan_torch, fake=_plan_fake, check=checks.check_plan_args)


# ---- permute: x_ND[i] = x_TD[order_N[i] // K] * scale_TK[t, k] ----------------------------------

def _permute_fake(x_TD, order_N, rows_TK, scale_TK=None):
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
    fallback=twins.permute_torch, fake=_permute_fake, check=checks.check_permute_args,
    backward=_permute_backward, setup_context=_permute_setup)


# ---- unpermute: y_TD[t] = sum_k weights_TK[t, k] * y_ND[rows_TK[t, k]] ---------------------------

def _unpermute_fake(y_ND, order_N, rows_TK, weights_TK=None):
    return y_ND.new_empty(rows_TK.shape[0], y_ND.shape[1])


def _unpermute_setup(ctx, inputs, output):
    y_ND, order_N, rows_TK, weights_TK = inputs
    ctx.save_for_backward(y_ND if weights_TK is not None else None, order_N, rows_TK, weights_TK)


def _unpermute_backward(ctx, g_TD):
    """permute(g, weights) into y and unpermute_weights_grad into the weights: one
    moe.unpermute_backward when weighted (with create_graph, the two differentiable ops)."""
    y_ND, order_N, rows_TK, weights_TK = ctx.saved_tensors
    need_y, need_w = ctx.needs_input_grad[0], weights_TK is not None and ctx.needs_input_grad[3]
    if weights_TK is not None and not torch.is_grad_enabled():
        g_y, g_w = ops.unpermute_backward(g_TD, y_ND, order_N, rows_TK, weights_TK, need_y, need_w)
        return (g_y if need_y else None), None, None, (_cast(g_w, weights_TK) if need_w else None)
    g_y = g_w = None
    if need_y:
        g_y = ops.permute(g_TD, order_N, rows_TK, weights_TK)
    if need_w:
        g_w = _cast(ops.unpermute_weights_grad(g_TD, y_ND, order_N, rows_TK), weights_TK)
    return g_y, None, None, g_w


unpermute = define_op(
    "unpermute", "(Tensor y_ND, Tensor order_N, Tensor rows_TK, Tensor? weights_TK=None) -> Tensor",
    fallback=twins.unpermute_torch, fake=_unpermute_fake, check=checks.check_unpermute_args,
    backward=_unpermute_backward, setup_context=_unpermute_setup)


# ---- unpermute_weights_grad: dw_TK[t, k] = <grad_TD[t], y_ND[rows_TK[t, k]]> ---------------------

def _weights_grad_fake(grad_TD, y_ND, order_N, rows_TK):
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
    check=checks.check_unpermute_weights_grad_args,
    backward=_weights_grad_backward, setup_context=_save_inputs)


# ---- unpermute_backward: (permute(grad, weights), unpermute_weights_grad(grad, y)) in one pass ----

def _unpermute_backward_fake(grad_TD, y_ND, order_N, rows_TK, weights_TK, grad_y=True, grad_weights=True):
    T, K = rows_TK.shape
    return (grad_TD.new_empty(order_N.shape[0] if grad_y else 0, grad_TD.shape[1]),
            grad_TD.new_empty(T if grad_weights else 0, K, dtype=_acc(grad_TD.dtype)))


unpermute_backward = define_op(
    "unpermute_backward",
    "(Tensor grad_TD, Tensor y_ND, Tensor order_N, Tensor rows_TK, Tensor weights_TK, bool grad_y=True, "
    "bool grad_weights=True) -> (Tensor, Tensor)",
    fallback=twins.unpermute_backward_torch, fake=_unpermute_backward_fake,
    check=checks.check_unpermute_backward_args)


# ---- grouped_mm: c_e = a_e @ b_e; grouped_mm_wgrad: w_e = a_e^T @ g_e; grouped_mm_backward: ------
# grouped_mm's two gradients in one op (on CUDA's sm90 path its two GEMMs share one setup launch)

def _grouped_mm_fake(a_NX, b_EXY, offs_E):
    return a_NX.new_empty(a_NX.shape[0], b_EXY.shape[2])


_is_yx_layout = twins.is_yx_layout


def _grouped_mm_backward(ctx, g_NY):
    """grouped_mm's gradients: one moe.grouped_mm_backward (with create_graph, the two
    differentiable ops)."""
    a_NX, b_EXY, offs_E = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    if not torch.is_grad_enabled():
        g_a, g_b = ops.grouped_mm_backward(g_NY, a_NX, b_EXY, offs_E, need_a, need_b)
        return (g_a if need_a else None), (g_b if need_b else None), None
    g_a = ops.grouped_mm(g_NY, b_EXY.transpose(-2, -1), offs_E) if need_a else None
    g_b = None
    if need_b:
        if _is_yx_layout(b_EXY):
            g_b = ops.grouped_mm_wgrad(g_NY, a_NX, offs_E).transpose(-2, -1)
        else:
            g_b = ops.grouped_mm_wgrad(a_NX, g_NY, offs_E)
    return g_a, g_b, None


def _grouped_mm_backward_fake(grad_NY, a_NX, b_EXY, offs_E, grad_a=True, grad_b=True):
    return a_NX.new_empty(a_NX.shape[0] if grad_a else 0, a_NX.shape[1]), _weight_grad_fake(a_NX, b_EXY, grad_b)


def _exy_fake(like, E, X, Y, yx):
    """An (E, X, Y) weight gradient, stored (E, Y, X) (a transposed view) when yx."""
    return like.new_empty(E, Y, X).transpose(-2, -1) if yx else like.new_empty(E, X, Y)


def _weight_grad_fake(a, b_EXY, grad_b):
    """d b_EXY of the backward ops: in b's layout, or an empty (0, X, Y) when not asked for."""
    E, X, Y = b_EXY.shape
    return _exy_fake(a, E, X, Y, _is_yx_layout(b_EXY)) if grad_b else a.new_empty(0, X, Y)


# The backward ops have no autograd formula of their own: the forward ops' formulas call them
# only without create_graph, and use the differentiable ops with it.
grouped_mm_backward = define_op(
    "grouped_mm_backward",
    "(Tensor grad_NY, Tensor a_NX, Tensor b_EXY, Tensor offs_E, bool grad_a=True, bool grad_b=True) -> "
    "(Tensor, Tensor)",
    fallback=twins.grouped_mm_backward_torch, fake=_grouped_mm_backward_fake,
    check=checks.check_grouped_mm_backward_args)

grouped_mm = define_op(
    "grouped_mm", "(Tensor a_NX, Tensor b_EXY, Tensor offs_E) -> Tensor",
    fallback=twins.grouped_mm_torch, fake=_grouped_mm_fake, check=checks.check_grouped_mm_args,
    backward=_grouped_mm_backward, setup_context=_save_inputs)


def _wgrad_fake(a_NX, g_NY, offs_E):
    return a_NX.new_empty(offs_E.shape[0], a_NX.shape[1], g_NY.shape[1])


def _wgrad_backward(ctx, d_EXY):
    a_NX, g_NY, offs_E = ctx.saved_tensors
    g_a = ops.grouped_mm(g_NY, d_EXY.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
    g_g = ops.grouped_mm(a_NX, d_EXY, offs_E) if ctx.needs_input_grad[1] else None
    return g_a, g_g, None


grouped_mm_wgrad = define_op(
    "grouped_mm_wgrad", "(Tensor a_NX, Tensor g_NY, Tensor offs_E) -> Tensor",
    fallback=twins.grouped_mm_wgrad_torch, fake=_wgrad_fake, check=checks.check_grouped_mm_wgrad_args,
    backward=_wgrad_backward, setup_context=_save_inputs)


# ---- gather_grouped_mm(x, ., ., b, offs): c_i = x[token(i)] @ b_e, and gather_grouped_mm_wgrad
# (x, ., ., g, offs, out_yx): w_e = sum over e's rows i of x[token(i)]^T g_i, (E, X, Y), stored
# (E, Y, X) when out_yx (the layout of an nn.Linear-style weight read as a transposed view: the
# CPU kernel computes g^T x with x's rows gathered, so no (E, X, Y) result is copied into the
# weight's layout; the values are the same). Their fallback is the two-op form on the registered
# ops (permute, then the GEMM: each runs its kernel where there is one, not the twin's loop); on
# CUDA both have their own entry: gather_grouped_mm's weight-streaming kernel reads x_TD through the
# plan at decode sizes (csrc/cuda/stream_gemm.cuh), and on the sm90 path the GEMM's setup launch
# copies the permuted rows (no permute kernel); else the same two-op form. In both backwards, d x
# sums each token's rows of (rows_NY @ w_e^T), with (rows_NY, w_EXY) = (d c, b) or (g, d w), and
# the other operand's gradient is the other op on x and the incoming gradient (the weight gradient
# in b's layout); gather_grouped_mm's is one op, gather_grouped_mm_backward (on CUDA's sm90 path
# its two GEMMs share one setup launch).

def _gather_fallback(x_TD, order_N, rows_TK, b_EXY, offs_E):
    return ops.grouped_mm(ops.permute(x_TD, order_N, rows_TK, None), b_EXY, offs_E)


def _gather_wgrad_fallback(x_TD, order_N, rows_TK, g_NY, offs_E, out_yx=False):
    x_ND = ops.permute(x_TD, order_N, rows_TK, None)
    if out_yx:
        return ops.grouped_mm_wgrad(g_NY, x_ND, offs_E).transpose(-2, -1)
    return ops.grouped_mm_wgrad(x_ND, g_NY, offs_E)


def _gather_fake(x_TD, order_N, rows_TK, b_EXY, offs_E):
    return x_TD.new_empty(order_N.shape[0], b_EXY.shape[2])


def _gather_wgrad_fake(x_TD, order_N, rows_TK, g_NY, offs_E, out_yx=False):
    return _exy_fake(x_TD, offs_E.shape[0], x_TD.shape[1], g_NY.shape[1], out_yx)


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])  # the tensors (out_yx only sets the output's layout)


def _d_gathered_x(rows_NY, w_EXY, order_N, rows_TK, offs_E):
    """d x_TD of a gathered GEMM: each token's rows of rows_NY @ w_e^T, summed."""
    return ops.unpermute(ops.grouped_mm(rows_NY, w_EXY.transpose(-2, -1), offs_E), order_N, rows_TK, None)


def _gathered_grads(g_NY, x_TD, order_N, rows_TK, b_EXY, offs_E, need_x, need_b):
    """(d x_TD, d b_EXY) of gather_grouped_mm for the incoming g_NY (None where not needed): one
    moe.gather_grouped_mm_backward (with create_graph, the differentiable ops)."""
    if not torch.is_grad_enabled():
        g_x, g_b = ops.gather_grouped_mm_backward(g_NY, x_TD, order_N, rows_TK, b_EXY, offs_E, need_x, need_b)
        return (g_x if need_x else None), (g_b if need_b else None)
    g_x = _d_gathered_x(g_NY, b_EXY, order_N, rows_TK, offs_E) if need_x else None
    g_b = (ops.gather_grouped_mm_wgrad(x_TD, order_N, rows_TK, g_NY, offs_E, _is_yx_layout(b_EXY))
           if need_b else None)
    return g_x, g_b


def _gather_backward(ctx, g_NY):
    x_TD, order_N, rows_TK, b_EXY, offs_E = ctx.saved_tensors
    need = ctx.needs_input_grad
    g_x, g_b = _gathered_grads(g_NY, x_TD, order_N, rows_TK, b_EXY, offs_E, need[0], need[3])
    return g_x, None, None, g_b, None


def _gather_wgrad_backward(ctx, d_EXY):
    """gather_grouped_mm_wgrad's gradients (double backward): d x sums each token's rows of
    g_NY @ d_e^T, and d g is gather_grouped_mm on d."""
    x_TD, order_N, rows_TK, g_NY, offs_E = ctx.saved_tensors
    g_x = _d_gathered_x(g_NY, d_EXY, order_N, rows_TK, offs_E) if ctx.needs_input_grad[0] else None
    g_g = ops.gather_grouped_mm(x_TD, order_N, rows_TK, d_EXY, offs_E) if ctx.needs_input_grad[3] else None
    return g_x, None, None, g_g, None, None


def _gather_backward_fake(grad_NY, x_TD, order_N, rows_TK, b_EXY, offs_E, grad_x=True, grad_b=True):
    return x_TD.new_empty(x_TD.shape[0] if grad_x else 0, x_TD.shape[1]), _weight_grad_fake(x_TD, b_EXY, grad_b)


gather_grouped_mm_backward = define_op(
    "gather_grouped_mm_backward",
    "(Tensor grad_NY, Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor b_EXY, Tensor offs_E, bool grad_x=True, "
    "bool grad_b=True) -> (Tensor, Tensor)",
    fallback=twins.gather_grouped_mm_backward_torch, fake=_gather_backward_fake,
    check=checks.check_gather_grouped_mm_backward_args)

gather_grouped_mm = define_op(
    "gather_grouped_mm", "(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor b_EXY, Tensor offs_E) -> Tensor",
    fallback=_gather_fallback, fake=_gather_fake, check=checks.check_gather_grouped_mm_args,
    backward=_gather_backward, setup_context=_gather_setup)

# ---- gather_grouped_mm_swiglu(x, ., ., b, offs, keep_h) = (swiglu(h), h if keep_h) with h =
# gather_grouped_mm(x, ., ., b, offs), b's Y = 2F = [gate; up]: the first projection with SwiGLU's
# epilogue. On CUDA at decode sizes one streaming launch (the same bits as the two ops there, h
# written only with keep_h); elsewhere the two kernels. h is what the backward needs: d h =
# swiglu_backward(d a, h), then gather_grouped_mm's backward; keep_h=False saves none (inference)
# and its backward raises ----------------------------------------------------------------------

def _gather_swiglu_fallback(x_TD, order_N, rows_TK, b_EXY, offs_E, keep_h=False):
    h = ops.gather_grouped_mm(x_TD, order_N, rows_TK, b_EXY, offs_E)
    return ops.swiglu(h), (h if keep_h else h.new_empty(0, h.shape[1]))


def _gather_swiglu_fake(x_TD, order_N, rows_TK, b_EXY, offs_E, keep_h=False):
    N, Y = order_N.shape[0], b_EXY.shape[2]
    return x_TD.new_empty(N, Y // 2), x_TD.new_empty(N if keep_h else 0, Y)


def _gather_swiglu_setup(ctx, inputs, output):
    ctx.keep_h = inputs[5]  # (defaults filled in by register_autograd)
    ctx.save_for_backward(*inputs[:5], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero (0 or N, 2F) gradient for h, which has none


def _gather_swiglu_backward(ctx, g_a, _g_h):
    x_TD, order_N, rows_TK, b_EXY, offs_E, h = ctx.saved_tensors
    if g_a is None:
        return (None,) * 6
    if torch.is_grad_enabled():  # create_graph=True: h recomputed through the differentiable op (the
        # saved h is an output, not a function of x and b), then swiglu's differentiable twin
        h = ops.gather_grouped_mm(x_TD, order_N, rows_TK, b_EXY, offs_E)
        g_h = twins.swiglu_backward_torch(g_a, h)
    elif not ctx.keep_h:
        raise RuntimeError("moe.gather_grouped_mm_swiglu: called with keep_h=False, so no h was saved for the "
                           "backward; pass keep_h=True to differentiate it")
    else:
        g_h = ops.swiglu_backward(g_a, h)
    need = ctx.needs_input_grad
    g_x, g_b = _gathered_grads(g_h, x_TD, order_N, rows_TK, b_EXY, offs_E, need[0], need[3])
    return g_x, None, None, g_b, None, None


gather_grouped_mm_swiglu = define_op(
    "gather_grouped_mm_swiglu",
    "(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor b_EXY, Tensor offs_E, bool keep_h=False) -> "
    "(Tensor, Tensor)",
    fallback=_gather_swiglu_fallback, fake=_gather_swiglu_fake, check=checks.check_gather_grouped_mm_swiglu_args,
    backward=_gather_swiglu_backward, setup_context=_gather_swiglu_setup)

gather_grouped_mm_wgrad = define_op(
    "gather_grouped_mm_wgrad",
    "(Tensor x_TD, Tensor order_N, Tensor rows_TK, Tensor g_NY, Tensor offs_E, bool out_yx=False) -> Tensor",
    fallback=_gather_wgrad_fallback, fake=_gather_wgrad_fake, check=checks.check_gather_grouped_mm_wgrad_args,
    backward=_gather_wgrad_backward, setup_context=_gather_setup)


# ---- grouped_mm_unpermute(a, b, offs, ., ., w, swiglu) = unpermute(grouped_mm(a', b, offs), ., ., w) with
# a' = a, or swiglu(a) with swiglu (a is then h = [gate; up]): the experts' down projection (after their
# activation) and the weighted combine in one op. Its value is the ops' (their kernels run), except on
# sm90 with sm90_gathered="fused" (the gathered GEMM's token-major epilogue: weighted rows, then a
# contiguous sum; within the GEMMs' error rule); its backward, grouped_mm_unpermute_backward, needs
# no (N, Y) product: d w_i = <a'_i, grad_t @ b_e^T>
# (SonicMoE, Guo et al. 2025, Sec. 3.2; twins.grouped_mm_unpermute_grads), so a (which the weight
# gradient needs anyway) is saved and the T*K x Y expert outputs are not; with swiglu, h is saved and
# the activation recomputed, as SonicMoE caches only the first projection's output. The backward's
# fallback is that formula on the registered ops (differentiable: the create_graph path) ------------

def _gmm_unpermute_fallback(a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK=None, swiglu=False):
    a = ops.swiglu(a_NX) if swiglu else a_NX
    return ops.unpermute(ops.grouped_mm(a, b_EXY, offs_E), order_N, rows_TK, weights_TK)


def _gmm_unpermute_fake(a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK=None, swiglu=False):
    return a_NX.new_empty(rows_TK.shape[0], b_EXY.shape[2])


def _gmm_unpermute_grads(*args):
    """The backward's formula on the registered ops (SwiGLU's backward by its differentiable twin)."""
    return twins.grouped_mm_unpermute_grads(ops.gather_grouped_mm, ops.gather_grouped_mm_wgrad, ops.swiglu,
                                            twins.swiglu_backward_torch, *args)


def _gmm_unpermute_backward_fake(grad_TD, a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK=None, grad_a=True,
                                 grad_b=True, grad_weights=True, swiglu=False):
    (N, X), (T, K) = a_NX.shape, rows_TK.shape
    T_w = T if grad_weights and weights_TK is not None else 0
    return (a_NX.new_empty(N if grad_a else 0, X), _weight_grad_fake(a_NX, b_EXY, grad_b),
            a_NX.new_empty(T_w, K, dtype=_acc(a_NX.dtype)))


def _gmm_unpermute_backward(ctx, g_TD):
    """One moe.grouped_mm_unpermute_backward (with create_graph, the same formula on the
    differentiable ops)."""
    a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK = ctx.saved_tensors
    need = ctx.needs_input_grad  # fewer entries when the optional arguments were not passed
    need_a, need_b, need_w = need[0], need[1], weights_TK is not None and need[5]
    grads = _gmm_unpermute_grads if torch.is_grad_enabled() else ops.grouped_mm_unpermute_backward
    g_a, g_b, g_w = grads(g_TD, a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK, need_a, need_b, need_w, ctx.swiglu)
    out = ((g_a if need_a else None), (g_b if need_b else None), None, None, None,
           (_cast(g_w, weights_TK) if need_w else None), None)
    return out[:len(need)]


def _gmm_unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.swiglu = inputs[6] if len(inputs) > 6 else False


grouped_mm_unpermute_backward = define_op(
    "grouped_mm_unpermute_backward",
    "(Tensor grad_TD, Tensor a_NX, Tensor b_EXY, Tensor offs_E, Tensor order_N, Tensor rows_TK, "
    "Tensor? weights_TK=None, bool grad_a=True, bool grad_b=True, bool grad_weights=True, bool swiglu=False) -> "
    "(Tensor, Tensor, Tensor)",
    fallback=_gmm_unpermute_grads, fake=_gmm_unpermute_backward_fake,
    check=checks.check_grouped_mm_unpermute_backward_args)

grouped_mm_unpermute = define_op(
    "grouped_mm_unpermute",
    "(Tensor a_NX, Tensor b_EXY, Tensor offs_E, Tensor order_N, Tensor rows_TK, Tensor? weights_TK=None, "
    "bool swiglu=False) -> Tensor",
    fallback=_gmm_unpermute_fallback, fake=_gmm_unpermute_fake, check=checks.check_grouped_mm_unpermute_args,
    backward=_gmm_unpermute_backward, setup_context=_gmm_unpermute_setup)


# ---- linear_f32: x_TD @ weight_ED^T in float32 (the routers' logits); its backward one op -------

def _linear_fake(x_TD, weight_ED):
    return x_TD.new_empty(x_TD.shape[0], weight_ED.shape[0], dtype=_acc(x_TD.dtype))


def _linear_backward_fake(grad_TE, x_TD, weight_ED, grad_x=True, grad_weight=True):
    T, D = x_TD.shape
    return x_TD.new_empty(T if grad_x else 0, D), weight_ED.new_empty(weight_ED.shape[0] if grad_weight else 0, D)


def _linear_backward(ctx, g_TE):
    """The gradients of F.linear(x.float(), w.float()), cast back as autograd would: one
    moe.linear_f32_backward (with create_graph, the differentiable twin)."""
    x_TD, weight_ED = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():
        g_x, g_w = twins.linear_f32_backward_torch(g_TE, x_TD, weight_ED, need_x, need_w)
    else:
        g_x, g_w = ops.linear_f32_backward(g_TE, x_TD, weight_ED, need_x, need_w)
    return (g_x if need_x else None), (g_w if need_w else None)


linear_f32_backward = define_op(
    "linear_f32_backward",
    "(Tensor grad_TE, Tensor x_TD, Tensor weight_ED, bool grad_x=True, bool grad_weight=True) -> (Tensor, Tensor)",
    fallback=twins.linear_f32_backward_torch, fake=_linear_backward_fake,
    check=checks.check_linear_f32_backward_args)

linear_f32 = define_op(
    "linear_f32", "(Tensor x_TD, Tensor weight_ED) -> Tensor",
    fallback=twins.linear_f32_torch, fake=_linear_fake, check=checks.check_linear_f32_args,
    backward=_linear_backward, setup_context=_save_inputs)


# ---- swiglu: silu(gate) * up on h = [gate; up]; backward one pass over h -------------------------

def _swiglu_fake(h):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


def _swiglu_backward_fake(grad, h):
    return h.new_empty(h.shape)


def _swiglu_backward(ctx, g):
    (h,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the differentiable twin, for double backward
        return twins.swiglu_backward_torch(g, h)
    return ops.swiglu_backward(g, h)


swiglu_backward = define_op(
    "swiglu_backward", "(Tensor grad, Tensor h) -> Tensor",
    fallback=twins.swiglu_backward_torch, fake=_swiglu_backward_fake,
    check=checks.check_swiglu_backward_args)

swiglu = define_op(
    "swiglu", "(Tensor h) -> Tensor",
    fallback=twins.swiglu_torch, fake=_swiglu_fake, check=checks.check_swiglu_args,
    backward=_swiglu_backward, setup_context=_save_inputs)


# ---- topk_route: a token-choice router's scores, top-k, weights and the statistics of its metrics
# and losses (counts_E, metrics, fw_BE, psum_BE, zsum, balance: routers.topk.route_statistics) in
# one pass per token; psum_BE, zsum and balance are differentiable, the backward takes their
# gradients too. rule "xmoe" / "top_p" keeps a prefix of the top_k (routers.topk.threshold_keep at
# threshold: the threshold router), the other slots -1 with weight 0: the backward is the same
# formula. fw_BE (no gradient) comes times fw_scale and balance = sum(fw_BE * psum_BE) (its
# gradient reaches psum_BE as grad * fw_BE), so a balance loss with its coefficient is balance;
# zsum times z_scale (so is its gradient), so a z-loss over a host-known token count is zsum: no
# op of their own ----------------------------------------------------------------------------

def _topk_route_fake(logits_TE, bias_E, top_k, score, num_groups, topk_groups, norm_topk, scaling,
                     valid_T=None, num_seqs=0, check_finite=False, rule="none", threshold=1.0, fw_scale=1.0,
                     z_scale=1.0):
    T, E = logits_TE.shape
    return (logits_TE.new_empty(T, top_k, dtype=torch.int64), logits_TE.new_empty(T, top_k),
            logits_TE.new_empty(T, E), logits_TE.new_empty(E, dtype=torch.int64),
            logits_TE.new_empty(2, dtype=torch.float32), logits_TE.new_empty(num_seqs, E),
            logits_TE.new_empty(num_seqs, E), logits_TE.new_empty(()), logits_TE.new_empty(()))


def _topk_route_backward_fake(grad_weights_TK, grad_probs_TE, ids_TK, probs_TE, score, norm_topk, scaling,
                              grad_psum_BE=None, grad_zsum=None, logits_TE=None, valid_T=None, z_scale=1.0,
                              grad_balance=None, fw_BE=None):
    return torch.empty_like(probs_TE)


def _topk_route_setup(ctx, inputs, output):
    ids_TK, _, probs_TE, counts_E, metrics_2, fw_BE = output[:6]
    logits_TE, valid_T, num_seqs = inputs[0], inputs[8], inputs[9]
    stats = num_seqs > 0
    ctx.save_for_backward(ids_TK, probs_TE, logits_TE if stats else None, valid_T, fw_BE if stats else None)
    ctx.score, ctx.norm_topk, ctx.scaling, ctx.z_scale = inputs[3], inputs[6], inputs[7], inputs[14]
    ctx.mark_non_differentiable(ids_TK, counts_E, metrics_2, fw_BE)
    ctx.set_materialize_grads(False)  # no zero (T, E) gradient for probs nobody differentiated


def _topk_route_backward(ctx, g_ids, g_weights, g_probs, g_counts, g_metrics, g_fw, g_psum, g_zsum, g_balance):
    """d logits_TE from the weights', the probs' and (with num_seqs > 0) psum_BE's, zsum's and
    balance's gradients, in one moe.topk_route_backward."""
    ids_TK, probs_TE, logits_TE, valid_T, fw_BE = ctx.saved_tensors
    if g_weights is None:
        g_weights = torch.zeros_like(ids_TK, dtype=probs_TE.dtype)
    if logits_TE is None:  # num_seqs = 0: psum_BE, zsum and balance are constants
        g_psum = g_zsum = g_balance = None
    g_logits = ops.topk_route_backward(g_weights, g_probs, ids_TK, probs_TE, ctx.score, ctx.norm_topk, ctx.scaling,
                                       g_psum, g_zsum, logits_TE if g_zsum is not None else None, valid_T,
                                       ctx.z_scale, g_balance, fw_BE if g_balance is not None else None)
    return (g_logits,) + (None,) * 14


topk_route_backward = define_op(
    "topk_route_backward",
    "(Tensor grad_weights_TK, Tensor? grad_probs_TE, Tensor ids_TK, Tensor probs_TE, str score, "
    "bool norm_topk, float scaling, Tensor? grad_psum_BE=None, Tensor? grad_zsum=None, "
    "Tensor? logits_TE=None, Tensor? valid_T=None, float z_scale=1.0, Tensor? grad_balance=None, "
    "Tensor? fw_BE=None) -> Tensor",
    fallback=twins.topk_route_backward_torch, fake=_topk_route_backward_fake,
    check=checks.check_topk_route_backward_args)

topk_route = define_op(
    "topk_route",
    "(Tensor logits_TE, Tensor? bias_E, int top_k, str score, int num_groups, int topk_groups, "
    "bool norm_topk, float scaling, Tensor? valid_T=None, int num_seqs=0, bool check_finite=False, "
    "str rule=\"none\", float threshold=1.0, float fw_scale=1.0, float z_scale=1.0) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fallback=twins.topk_route_torch, fake=_topk_route_fake, check=checks.check_topk_route_args,
    backward=_topk_route_backward, setup_context=_topk_route_setup)


# ---- grouped_mm_w8: c_i = (a_i @ q_e^T) * scale_e, weight-only int8 experts (inference) --------

def _grouped_mm_w8_fake(a_NX, q_EYX, scale_EY, offs_E):
    return a_NX.new_empty(a_NX.shape[0], q_EYX.shape[1])


def _grouped_mm_w8_backward(ctx, g_NY):
    raise RuntimeError("moe.grouped_mm_w8 is for inference: int8 experts have no gradient (run under "
                       "torch.no_grad() / torch.inference_mode(), or train the bfloat16 experts)")


grouped_mm_w8 = define_op(
    "grouped_mm_w8", "(Tensor a_NX, Tensor q_EYX, Tensor scale_EY, Tensor offs_E) -> Tensor",
    fallback=twins.grouped_mm_w8_torch, fake=_grouped_mm_w8_fake, check=checks.check_grouped_mm_w8_args,
    backward=_grouped_mm_w8_backward, setup_context=lambda ctx, inputs, output: None)
