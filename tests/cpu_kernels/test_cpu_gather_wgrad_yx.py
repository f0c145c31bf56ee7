"""moe.gather_grouped_mm_wgrad(..., out_yx=True): the gathered weight gradient in the layout of an
nn.Linear-style weight (transformers' experts hold gate_up_proj as (E, 2F, D) and moekit reads it
as the transposed view b_EXY).

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), X/Y GEMM input/output
dims (w_EXY = sum over e's rows of x^T g).

What defines it: the same (E, X, Y) values as out_yx=False, stored (E, Y, X) (strides X*Y, 1, X),
so that autograd hands the (E, Y, X) weight its gradient without a copy. The CPU kernel computes
g^T x with the rows of x gathered as the GEMM's B operand (csrc/grouped_mm.cpp wgrad_avx512,
csrc/gemm_pack.h pack_b): the same products summed in the same order as x^T g, so the values are
bit for bit those of out_yx=False and of grouped_mm_wgrad(g, permute(x)).transpose; the twin (per
expert at::mm of g_e^T x_e) is within the GEMM rule (error against float64 at most 2x the twin's).
The op's backward passes it where b_EXY is such a view. Runs with and without the extension
(MOE_DISABLE_EXTENSION=1: the fallback, grouped_mm_wgrad(g, permute(x)) transposed).
"""

import pytest
import torch
from torch.autograd import gradcheck
from torch.library import opcheck

from moe import ops
from moe.ops.twins import gather_grouped_mm_wgrad_torch
from tests.helpers.ops import ROUTINGS, make_ids, rand, strided_rows

wgrad = torch.ops.moe.gather_grouped_mm_wgrad
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]


def _yx_strides(w, E, X, Y):
    return w.shape == (E, X, Y) and w.stride() == (X * Y, 1, X)


def _case(T, K, E, kind, X, Y, dtype, seed=0):
    p = ops.plan(make_ids(T, K, E, kind, seed=seed), E)
    return p, rand(T, X, dtype=dtype, seed=seed + 1), rand(T * K, Y, dtype=dtype, seed=seed + 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,kind", ROUTINGS)
def test_same_values_stored_yx(T, K, E, kind, dtype):
    """Edge routings (T=0, k=1, one expert, empty slots, every row on one expert, E >> rows):
    out_yx gives the values of out_yx=False, in the (E, Y, X) layout, bit for bit where the
    compiled kernel runs, and within the GEMM rule of the twin elsewhere."""
    X, Y = 72, 66  # two 64-column panels, a partial one; bf16 word pairs
    p, x, g = _case(T, K, E, kind, X, Y, dtype)
    w = wgrad(x, p.order_N, p.rows_TK, g, p.offs_E)
    w_yx = wgrad(x, p.order_N, p.rows_TK, g, p.offs_E, True)
    assert _yx_strides(w_yx, E, X, Y) and w_yx.dtype == dtype
    assert torch.equal(w_yx, torch.ops.moe.grouped_mm_wgrad(g, ops.permute(x, p), p.offs_E).transpose(1, 2))
    if ops.HAS_EXTENSION:
        assert torch.equal(w_yx, w)
    if T * K and dtype != torch.float16:
        ref = gather_grouped_mm_wgrad_torch(x.double(), p.order_N, p.rows_TK, g.double(), p.offs_E, True)
        twin = gather_grouped_mm_wgrad_torch(x, p.order_N, p.rows_TK, g, p.offs_E, True)
        assert _yx_strides(twin, E, X, Y)
        assert (w_yx.double() - ref).abs().max() <= 2 * (twin.double() - ref).abs().max() + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("X,Y,T,K,E", [(1024, 448, 96, 8, 4), (130, 70, 203, 3, 3), (64, 200, 61, 1, 2),
                                       (97, 64, 40, 2, 5)])
def test_kernel_shapes(X, Y, T, K, E, dtype):
    """Sizes on the AVX-512 path: many panels of x's columns, odd expert row counts (the last
    bfloat16 word of a gathered depth pair has one row), X not a multiple of 16 or 64, several
    192-row blocks of g^T; bit for bit the default layout's values."""
    p, x, g = _case(T, K, E, "rand", X, Y, dtype, seed=7)
    w = wgrad(x, p.order_N, p.rows_TK, g, p.offs_E)
    w_yx = wgrad(x, p.order_N, p.rows_TK, g, p.offs_E, True)
    assert _yx_strides(w_yx, E, X, Y)
    ref = gather_grouped_mm_wgrad_torch(x.double(), p.order_N, p.rows_TK, g.double(), p.offs_E)
    twin = gather_grouped_mm_wgrad_torch(x, p.order_N, p.rows_TK, g, p.offs_E, True)
    assert (w_yx.double() - ref).abs().max() <= 2 * (twin.double() - ref).abs().max()
    if ops.HAS_EXTENSION:
        assert torch.equal(w_yx, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["x_strided_rows", "x_transposed", "g_transposed"])
def test_non_contiguous_inputs(layout, dtype):
    T, K, E, X, Y = 90, 3, 4, 80, 70
    p, x, g = _case(T, K, E, "holes", X, Y, dtype, seed=3)
    xv = {"x_strided_rows": strided_rows, "x_transposed": lambda t: t.t().contiguous().t()}.get(layout, lambda t: t)(x)
    gv = g.t().contiguous().t() if layout == "g_transposed" else g
    want = wgrad(x, p.order_N, p.rows_TK, g, p.offs_E, True)
    got = wgrad(xv, p.order_N, p.rows_TK, gv, p.offs_E, True)
    assert _yx_strides(got, E, X, Y) and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_of_a_transposed_weight_is_in_its_layout(dtype):
    """gather_grouped_mm on b_EXY = w_EYX.transpose(1, 2): the gradient autograd passes to the
    view is already (E, Y, X)-strided (no copy into w's layout), w.grad is contiguous, and both
    gradients equal those of a contiguous (E, X, Y) weight bit for bit (kernel) or within the
    GEMM rule (twins)."""
    T, K, E, X, Y = 70, 4, 5, 96, 80
    p, x, g = _case(T, K, E, "holes", X, Y, dtype, seed=5)
    w_EYX = rand(E, Y, X, dtype=dtype, seed=9).requires_grad_()
    b_view = w_EYX.transpose(1, 2)
    out = ops.gather_grouped_mm(x, p, b_view)
    (d_view,) = torch.autograd.grad(out, b_view, g, retain_graph=True)
    assert _yx_strides(d_view, E, X, Y)
    out.backward(g)
    assert w_EYX.grad.is_contiguous()
    b = w_EYX.detach().transpose(1, 2).contiguous().requires_grad_()
    ops.gather_grouped_mm(x, p, b).backward(g)
    assert b.grad.is_contiguous()
    if ops.HAS_EXTENSION:
        assert torch.equal(w_EYX.grad, b.grad.transpose(1, 2))
    else:
        torch.testing.assert_close(w_EYX.grad, b.grad.transpose(1, 2), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_gradcheck_float64():
    T, K, E, X, Y = 9, 3, 4, 5, 6
    p = ops.plan(make_ids(T, K, E, seed=2), E)
    req = dict(dtype=torch.float64, requires_grad=True)
    x, g = torch.randn(T, X, **req), torch.randn(T * K, Y, **req)
    assert gradcheck(lambda x, g: wgrad(x, p.order_N, p.rows_TK, g, p.offs_E, True), (x, g))
    w = torch.randn(E, Y, X, **req)
    assert gradcheck(lambda x, w: ops.gather_grouped_mm(x, p, w.transpose(1, 2)), (x, w))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    T, K, E, X, Y = 11, 3, 4, 8, 6
    p = ops.plan(make_ids(T, K, E, seed=2), E)
    x = torch.randn(T, X, dtype=dtype, requires_grad=True)
    g = torch.randn(T * K, Y, dtype=dtype, requires_grad=True)
    opcheck(wgrad, (x, p.order_N, p.rows_TK, g, p.offs_E, True))
    opcheck(torch.ops.moe.gather_grouped_mm.default,
            (x, p.order_N, p.rows_TK, torch.randn(E, Y, X, dtype=dtype).transpose(1, 2).requires_grad_(), p.offs_E))
