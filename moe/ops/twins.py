"""Pure-PyTorch twins of moekit's ops: the test oracle, the benchmark baseline and the fallback
when the compiled extension ``moe._C`` is absent.

Shape legend: T tokens, K slots per token, E experts, N routed rows (the bound T*K; rows past
offs_E[-1] are padding), D feature dim, X/Y GEMM input/output dims.

The twins follow the kernels' arithmetic exactly (slot order k = 0..K-1, accumulation in float32
for half/bfloat16), so the dispatch ops can be compared bit for bit. They are differentiable
through ordinary autograd.
"""

from __future__ import annotations

import torch

__all__ = [
    "plan_torch",
    "permute_torch",
    "unpermute_torch",
    "unpermute_weights_grad_torch",
    "unpermute_backward_torch",
    "grouped_mm_torch",
    "grouped_mm_wgrad_torch",
    "gather_grouped_mm_torch",
    "gather_grouped_mm_wgrad_torch",
    "grouped_mm_backward_torch",
    "gather_grouped_mm_backward_torch",
    "gather_grouped_mm_swiglu_torch",
    "grouped_mm_unpermute_torch",
    "grouped_mm_unpermute_backward_torch",
    "grouped_mm_unpermute_grads",
    "linear_f32_torch",
    "linear_f32_backward_torch",
    "swiglu_torch",
    "swiglu_backward_torch",
    "topk_route_torch",
    "topk_route_backward_torch",
    "grouped_mm_w8_torch",
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_ids(ids_TK: torch.Tensor, num_experts: int) -> None:
    if ids_TK.dim() != 2:
        raise ValueError(f"moe.plan: ids_TK must be 2-D (T, K), got shape {tuple(ids_TK.shape)}")
    if ids_TK.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"moe.plan: ids_TK must be int64 or int32 expert ids, got {ids_TK.dtype}")
    if num_experts < 1:
        raise ValueError(f"moe.plan: num_experts must be >= 1, got {num_experts}")
    if ids_TK.numel() and (ids_TK.min() < -1 or ids_TK.max() >= num_experts):  # _sync_: oracle only
        bad = ids_TK[(ids_TK < -1) | (ids_TK >= num_experts)][0].item()
        raise ValueError(f"moe.plan: ids_TK holds {bad}, outside [-1, num_experts={num_experts})")


def plan_torch(ids_TK: torch.Tensor, num_experts: int):
    """Stable sort of the T*K slots by expert id (argsort twin of the counting-sort kernel).

    Returns (counts_E int32, offs_E int32, order_N int64 of length T*K with -1 past offs_E[-1],
    rows_TK int64 with -1 in empty slots).
    """
    _check_ids(ids_TK, num_experts)
    T, K = ids_TK.shape
    S = T * K
    flat = ids_TK.reshape(-1).long()
    valid = flat >= 0
    key = torch.where(valid, flat, num_experts)  # empty slots sort last
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].int()
    offs = counts.cumsum(0).int()
    sorted_slots = torch.argsort(key, stable=True)
    arange = torch.arange(S, device=flat.device)
    order = torch.where(arange < offs[-1], sorted_slots, -1)
    rows = torch.empty_like(arange).scatter_(0, sorted_slots, arange)
    rows = torch.where(valid, rows, -1).view(T, K)
    return counts, offs, order, rows


def permute_torch(x_TD, order_N, rows_TK, scale_TK=None):
    """x_ND[i] = x_TD[order_N[i] // K] (times scale_TK.flatten()[order_N[i]]); 0 where order_N < 0."""
    K = rows_TK.shape[1]
    valid = order_N >= 0
    slot = order_N.clamp(min=0)
    out = x_TD.index_select(0, slot // K)
    if scale_TK is not None:
        acc = _acc_dtype(x_TD.dtype)
        out = (out.to(acc) * scale_TK.reshape(-1)[slot].to(acc)[:, None]).to(x_TD.dtype)
    return torch.where(valid[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def unpermute_torch(y_ND, order_N, rows_TK, weights_TK=None):
    """y_TD[t] = sum_k weights_TK[t, k] * y_ND[rows_TK[t, k]] over non-empty slots, in slot order,
    accumulated in float32 for half/bfloat16."""
    del order_N  # part of the op's signature (its backward needs it), not of the forward
    T, K = rows_TK.shape
    acc = _acc_dtype(y_ND.dtype)
    out = torch.zeros(T, y_ND.shape[1], dtype=acc, device=y_ND.device)
    for k in range(K):
        r = rows_TK[:, k]
        term = y_ND.index_select(0, r.clamp(min=0)).to(acc)
        if weights_TK is not None:
            term = weights_TK[:, k].to(acc)[:, None] * term
        out = out + torch.where((r >= 0)[:, None], term, torch.zeros((), dtype=acc, device=y_ND.device))
    return out.to(y_ND.dtype)


def unpermute_weights_grad_torch(grad_TD, y_ND, order_N, rows_TK):
    """dw_TK[t, k] = <grad_TD[t], y_ND[rows_TK[t, k]]> (0 for empty slots), float32 for half types."""
    del order_N
    acc = _acc_dtype(y_ND.dtype)
    T, K = rows_TK.shape
    rows = rows_TK.reshape(-1)
    y = y_ND.index_select(0, rows.clamp(min=0)).to(acc).view(T, K, y_ND.shape[1])
    dots = (grad_TD.to(acc)[:, None, :] * y).sum(-1)
    return torch.where(rows_TK >= 0, dots, torch.zeros((), dtype=acc, device=y_ND.device))


def unpermute_backward_torch(grad_TD, y_ND, order_N, rows_TK, weights_TK, grad_y=True, grad_weights=True):
    """(permute_torch(grad_TD, ..., weights_TK), unpermute_weights_grad_torch(grad_TD, y_ND, ...)):
    the weighted unpermute's backward; an output not asked for is an empty (0, D) / (0, K)."""
    D, K = grad_TD.shape[1], rows_TK.shape[1]
    g_y = permute_torch(grad_TD, order_N, rows_TK, weights_TK) if grad_y else grad_TD.new_empty(0, D)
    g_w = (unpermute_weights_grad_torch(grad_TD, y_ND, order_N, rows_TK) if grad_weights
           else grad_TD.new_empty(0, K, dtype=_acc_dtype(grad_TD.dtype)))
    return g_y, g_w


def _group_bounds(offs_E: torch.Tensor) -> list[int]:
    return [0] + offs_E.tolist()  # _sync_: the twin loops over experts on the host


def grouped_mm_torch(a_NX, b_EXY, offs_E):
    """c_NY[offs[e-1]:offs[e]] = a_NX[offs[e-1]:offs[e]] @ b_EXY[e] (per-expert loop); rows past
    offs_E[-1] are zero."""
    bounds = _group_bounds(offs_E)
    pieces = [a_NX[s:e] @ b_EXY[g] for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
    pieces.append(a_NX.new_zeros(a_NX.shape[0] - bounds[-1], b_EXY.shape[2]))
    return torch.cat(pieces, 0)


def grouped_mm_wgrad_torch(a_NX, g_NY, offs_E):
    """g_EXY[e] = a_NX[rows of e]^T @ g_NY[rows of e]; zero for experts with no rows."""
    bounds = _group_bounds(offs_E)
    blocks = [a_NX[s:e].t() @ g_NY[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.stack(blocks, 0) if blocks else a_NX.new_zeros(0, a_NX.shape[1], g_NY.shape[1])


def gather_grouped_mm_torch(x_TD, order_N, rows_TK, b_EXY, offs_E):
    """grouped_mm on the permuted rows: grouped_mm(permute(x_TD), b_EXY, offs_E)."""
    return grouped_mm_torch(permute_torch(x_TD, order_N, rows_TK), b_EXY, offs_E)


def gather_grouped_mm_wgrad_torch(x_TD, order_N, rows_TK, g_NY, offs_E, out_yx=False):
    """grouped_mm_wgrad on the permuted rows: grouped_mm_wgrad(permute(x_TD), g_NY, offs_E),
    (E, X, Y); with out_yx the same values stored (E, Y, X), computed as g_e^T x_e per expert."""
    x_ND = permute_torch(x_TD, order_N, rows_TK)
    if out_yx:
        return grouped_mm_wgrad_torch(g_NY, x_ND, offs_E).transpose(-2, -1)
    return grouped_mm_wgrad_torch(x_ND, g_NY, offs_E)


def is_yx_layout(b_EXY) -> bool:
    """True when b_EXY is a transposed view of an (E, Y, X) weight (nn.Linear layout, e.g.
    transformers' experts): the backward ops then return its gradient in that layout,
    (g_e^T a_e)^T, so that autograd does not copy an (E, X, Y) gradient into the weight's strides
    (csrc/moe_ops.h's is_yx_layout, the same rule)."""
    return b_EXY.dim() == 3 and b_EXY.stride(-2) == 1 and b_EXY.stride(-1) != 1


def grouped_mm_backward_torch(grad_NY, a_NX, b_EXY, offs_E, grad_a=True, grad_b=True):
    """(grouped_mm(grad_NY, b_EXY^T), the weight gradient in b_EXY's layout): grouped_mm's two
    gradients; an output not asked for is an empty (0, X) / (0, X, Y)."""
    X, Y = a_NX.shape[1], b_EXY.shape[2]
    g_a = grouped_mm_torch(grad_NY, b_EXY.transpose(-2, -1), offs_E) if grad_a else a_NX.new_empty(0, X)
    if not grad_b:
        g_b = b_EXY.new_empty(0, X, Y)
    elif is_yx_layout(b_EXY):
        g_b = grouped_mm_wgrad_torch(grad_NY, a_NX, offs_E).transpose(-2, -1)
    else:
        g_b = grouped_mm_wgrad_torch(a_NX, grad_NY, offs_E)
    return g_a, g_b


def gather_grouped_mm_backward_torch(grad_NY, x_TD, order_N, rows_TK, b_EXY, offs_E, grad_x=True, grad_b=True):
    """(d x_TD, d b_EXY) of gather_grouped_mm: each token's rows of grad_NY @ b_e^T summed
    (unpermute), and gather_grouped_mm_wgrad in b_EXY's layout; empty (0, X) / (0, X, Y) when not
    asked for."""
    X, Y = x_TD.shape[1], b_EXY.shape[2]
    g_x = (unpermute_torch(grouped_mm_torch(grad_NY, b_EXY.transpose(-2, -1), offs_E), order_N, rows_TK)
           if grad_x else x_TD.new_empty(0, X))
    g_b = (gather_grouped_mm_wgrad_torch(x_TD, order_N, rows_TK, grad_NY, offs_E, is_yx_layout(b_EXY))
           if grad_b else b_EXY.new_empty(0, X, Y))
    return g_x, g_b


def grouped_mm_unpermute_torch(a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK=None, swiglu=False):
    """unpermute_torch(grouped_mm_torch(a, b_EXY, offs_E), ..., weights_TK) with a = a_NX, or
    swiglu_torch(a_NX) with swiglu (a_NX is then h = [gate; up]): the down projection and the
    weighted combine, (T, Y)."""
    a = swiglu_torch(a_NX) if swiglu else a_NX
    return unpermute_torch(grouped_mm_torch(a, b_EXY, offs_E), order_N, rows_TK, weights_TK)


def grouped_mm_unpermute_grads(gather_mm, gather_wgrad, act, act_backward, grad_TD, a_NX, b_EXY, offs_E, order_N,
                               rows_TK, weights_TK=None, grad_a=True, grad_b=True, grad_weights=True, swiglu=False):
    """(d a_NX, d b_EXY in b's layout, d weights_TK) of y_TD = sum_k w_tk (a_i @ b_e) without the
    (N, Y) product (SonicMoE, Guo et al. 2025, Sec. 3.2): with g_i = grad_TD[token(i)] @ b_e^T (the
    gathered data-gradient GEMM ``gather_mm``), d a_i = w_i g_i, d w_i = <a_i, g_i> (which equals
    <grad_t, a_i @ b_e>, the unpermute's weight gradient) and d b_e = sum over e's rows of
    (w_i a_i)^T grad_t (``gather_wgrad`` on the scaled rows). With ``swiglu`` a_NX is h = [gate; up],
    a = ``act(h)`` is recomputed (not saved) and d h = ``act_backward(d a, h)``. g, the products and
    the sums are in float32 for half types; an output not asked for (d weights always without
    weights) is an empty (0, a's width) / (0, X, Y) / (0, K). ``gather_mm`` / ``gather_wgrad`` /
    ``act`` / ``act_backward``: the twins, or the registered ops (the ops' fallback, differentiable
    for double backward)."""
    acc = _acc_dtype(a_NX.dtype)
    h_NH = a_NX
    a_NX = act(h_NH) if swiglu else a_NX
    (N, X), Y, K = a_NX.shape, b_EXY.shape[2], rows_TK.shape[1]
    weighted = weights_TK is not None
    grad_weights = grad_weights and weighted
    zero = torch.zeros((), dtype=acc, device=a_NX.device)
    valid = order_N >= 0
    w_N = (weights_TK.reshape(-1)[order_N.clamp(min=0)].to(acc) if weighted
           else torch.ones(N, dtype=acc, device=a_NX.device))
    w_N = torch.where(valid, w_N, zero)[:, None]
    g = (gather_mm(grad_TD, order_N, rows_TK, b_EXY.transpose(-2, -1), offs_E).to(acc)
         if grad_a or grad_weights else None)
    d_a = (g * w_N).to(a_NX.dtype) if grad_a else h_NH.new_empty(0, h_NH.shape[1])
    if grad_a and swiglu:
        d_a = act_backward(d_a, h_NH)
    if grad_weights:
        dots = (a_NX.to(acc) * g).sum(-1)
        rows = rows_TK.reshape(-1).clamp(min=0)
        d_w = torch.where(rows_TK >= 0, dots[rows].view(rows_TK.shape), zero)
    else:
        d_w = a_NX.new_empty(0, K, dtype=acc)
    if grad_b:
        aw = (a_NX.to(acc) * w_N).to(a_NX.dtype) if weighted or swiglu else a_NX
        d_b = gather_wgrad(grad_TD, order_N, rows_TK, aw, offs_E, not is_yx_layout(b_EXY)).transpose(-2, -1)
    else:
        d_b = b_EXY.new_empty(0, X, Y)
    return d_a, d_b, d_w


def grouped_mm_unpermute_backward_torch(grad_TD, a_NX, b_EXY, offs_E, order_N, rows_TK, weights_TK=None,
                                        grad_a=True, grad_b=True, grad_weights=True, swiglu=False):
    """:func:`grouped_mm_unpermute_grads` on the twins (g rounded to the data dtype, as the
    same-dtype PyTorch GEMM leaves it)."""
    return grouped_mm_unpermute_grads(gather_grouped_mm_torch, gather_grouped_mm_wgrad_torch, swiglu_torch,
                                      swiglu_backward_torch, grad_TD, a_NX, b_EXY, offs_E, order_N, rows_TK,
                                      weights_TK, grad_a, grad_b, grad_weights, swiglu)


def linear_f32_torch(x_TD, weight_ED):
    """x_TD @ weight_ED^T on float32 copies (float64 stays float64): the routers' logits."""
    acc = _acc_dtype(x_TD.dtype)
    return torch.nn.functional.linear(x_TD.to(acc), weight_ED.to(acc))


def linear_f32_backward_torch(grad_TE, x_TD, weight_ED, grad_x=True, grad_weight=True):
    """(d x_TD, d weight_ED) of linear_f32: grad_TE @ weight and grad_TE^T @ x on copies in grad's
    dtype (float32; float64 for float64), cast back to the operands' dtype, as autograd computes
    them for F.linear(x.float(), w.float()). An output not asked for is an empty (0, D)."""
    acc, D = grad_TE.dtype, x_TD.shape[1]
    g_x = (grad_TE @ weight_ED.to(acc)).to(x_TD.dtype) if grad_x else x_TD.new_empty(0, D)
    g_w = (grad_TE.t() @ x_TD.to(acc)).to(weight_ED.dtype) if grad_weight else weight_ED.new_empty(0, D)
    return g_x, g_w


def gather_grouped_mm_swiglu_torch(x_TD, order_N, rows_TK, b_EXY, offs_E, keep_h=False):
    """(swiglu_torch(h), h or an empty (0, 2F)) with h = gather_grouped_mm_torch(...): the
    gathered first projection with SwiGLU's epilogue."""
    h = gather_grouped_mm_torch(x_TD, order_N, rows_TK, b_EXY, offs_E)
    return swiglu_torch(h), (h if keep_h else h.new_empty(0, h.shape[1]))


def swiglu_torch(h):
    """silu(gate) * up on h = [gate; up] (..., 2F) -> (..., F) (Shazeer 2020, Eq. 5), computed in
    float32 for half/bfloat16 and rounded once, as the kernel does."""
    acc = _acc_dtype(h.dtype)
    gate, up = h.to(acc).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(h.dtype)


def swiglu_backward_torch(grad, h):
    """d h = [grad * up * s (1 + gate (1 - s)); grad * gate * s], s = sigmoid(gate): silu'(g) =
    s + g s (1 - s). (..., F), (..., 2F) -> (..., 2F), in float32 for half/bfloat16."""
    acc = _acc_dtype(h.dtype)
    gate, up = h.to(acc).chunk(2, dim=-1)
    g = grad.to(acc)
    s = torch.sigmoid(gate)
    return torch.cat([g * up * (s * (1 + gate * (1 - s))), g * (gate * s)], dim=-1).to(h.dtype)


def topk_route_torch(logits_TE, bias_E, top_k, score, num_groups, topk_groups, norm_topk, scaling,
                     valid_T=None, num_seqs=0, check_finite=False, rule="none", threshold=1.0, fw_scale=1.0,
                     z_scale=1.0):
    """(ids_TK, weights_TK, probs_TE, counts_E, metrics_2, fw_BE, psum_BE, zsum, balance):
    routers.topk.route_topk, the routers' own PyTorch code (num_groups = topk_groups = 0: no
    group limit; rule "xmoe" / "top_p": the threshold router's)."""
    from routers.topk import route_topk

    return route_topk(logits_TE, bias_E, top_k, score, num_groups or None, topk_groups or None, norm_topk, scaling,
                      valid_T, num_seqs, check_finite, rule, threshold, fw_scale, z_scale)


def topk_route_backward_torch(grad_weights_TK, grad_probs_TE, ids_TK, probs_TE, score, norm_topk, scaling,
                              grad_psum_BE=None, grad_zsum=None, logits_TE=None, valid_T=None, z_scale=1.0,
                              grad_balance=None, fw_BE=None):
    """d logits_TE of topk_route. With p_k = probs at ids_k, D = sum_k p_k + eps and
    w_k = s p_k / D (norm_topk) or s p_k: d p_k = s (g_k / D - sum_j g_j p_j / D^2) or s g_k,
    scattered onto d probs (slots with id -1 carry none); psum_BE's gradient adds to each real
    token's d scores (sigmoid: through s = p / (sum p + 1e-20)); then softmax's p (dp - <dp, p>)
    or sigmoid's dp p (1 - p); zsum's (times z_scale, zsum's factor) adds 2 g lse(l) softmax(l) to
    each real token's d logits. balance = sum(fw_BE * psum_BE) adds grad_balance * fw_BE to
    psum_BE's gradient (fw_BE has none)."""
    if grad_balance is not None:
        from_balance = grad_balance * fw_BE
        grad_psum_BE = from_balance if grad_psum_BE is None else grad_psum_BE + from_balance
    live_TK = ids_TK >= 0
    ids0_TK = ids_TK.clamp(min=0)
    p_TK = probs_TE.gather(1, ids0_TK) * live_TK
    g_TK = grad_weights_TK * scaling * live_TK
    if norm_topk:
        denom = p_TK.sum(dim=-1, keepdim=True) + (1e-20 if score == "sigmoid" else 0.0)
        dot = (g_TK * p_TK).sum(dim=-1, keepdim=True)
        g_TK = torch.where(live_TK, g_TK / denom - dot / (denom * denom), 0.0)  # (a padded token: 0 / 0)
    dp_TE = torch.zeros_like(probs_TE) if grad_probs_TE is None else grad_probs_TE.clone()
    dp_TE.scatter_add_(1, ids0_TK, g_TK)
    real_T1 = None if valid_T is None else valid_T[:, None]
    if grad_psum_BE is not None:
        T, E = probs_TE.shape
        B = grad_psum_BE.shape[0]
        gs_TE = grad_psum_BE[:, None, :].expand(B, T // B, E).reshape(T, E)
        if real_T1 is not None:
            gs_TE = gs_TE * real_T1
        if score == "sigmoid":
            d_T1 = probs_TE.sum(dim=-1, keepdim=True) + 1e-20
            gs_TE = (gs_TE - (gs_TE * (probs_TE / d_T1)).sum(dim=-1, keepdim=True)) / d_T1
        dp_TE = dp_TE + gs_TE
    if score == "softmax":
        out = probs_TE * (dp_TE - (dp_TE * probs_TE).sum(dim=-1, keepdim=True))
    else:
        out = dp_TE * probs_TE * (1 - probs_TE)
    if grad_zsum is not None:
        lse_T1 = torch.logsumexp(logits_TE, dim=-1, keepdim=True)
        dz_TE = 2 * (grad_zsum * z_scale) * lse_T1 * torch.softmax(logits_TE, dim=-1)
        out = out + (dz_TE if real_T1 is None else dz_TE * real_T1)
    return out


# ---- weight-only int8 experts (inference) -----------------------------------------------------

def grouped_mm_w8_torch(a_NX, q_EYX, scale_EY, offs_E):
    """c_NY[i] = (a_NX[i] @ q_EYX[e]^T) * scale_EY[e] for the rows i of expert e (offs_E as in
    grouped_mm), in float32 and rounded once to a_NX's dtype; rows past offs_E[-1] are zero. The
    int8 weights are dequantised per expert (float32 copies of one expert at a time)."""
    bounds = _group_bounds(offs_E)
    bad = [e for e in range(len(bounds) - 1) if bounds[e + 1] < bounds[e]]
    if bad:
        raise RuntimeError(f"moe.grouped_mm_w8: offs_E must be non-decreasing, but offs_E[{bad[0]}] = "
                           f"{bounds[bad[0] + 1]} < {bounds[bad[0]]}")
    if bounds[-1] > a_NX.shape[0]:
        raise RuntimeError(f"moe.grouped_mm_w8: offs_E[-1] = {bounds[-1]} exceeds the {a_NX.shape[0]} rows of a_NX")
    a = a_NX.float()
    pieces = [(a[s:e] @ q_EYX[g].float().t()) * scale_EY[g]
              for g, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])) if e > s]
    pieces.append(a.new_zeros(a_NX.shape[0] - bounds[-1], q_EYX.shape[1]))
    return torch.cat(pieces, 0).to(a_NX.dtype)
