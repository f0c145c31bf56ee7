"""Tests for moe.gather_grouped_mm_swiglu: the gathered first projection with SwiGLU's epilogue.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), X the model dim, F the
FFN width (the projection's Y is 2F = [gate; up]).

gather_grouped_mm_swiglu(x, plan, b) is defined as swiglu(gather_grouped_mm(x, plan, b)): on the
CPU kernels it must equal those two ops bit for bit, forward and gradients (with keep_h, h is
gather_grouped_mm's result), and the twin within the GEMM error rule. keep_h=False keeps no h:
its backward refuses. MoELayer's SwiGLU experts call it (one op where there were two).
"""

import pytest
import torch
from hypothesis import given, strategies as st
from torch.autograd import gradcheck
from torch.library import opcheck

import moe
from moe import ops
from moe.launches import count_ops
from moe.ops.twins import gather_grouped_mm_swiglu_torch

from tests.helpers.ops import ROUTINGS, make_ids, rand
from tests.helpers.props import SETTINGS, routings

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
fused = torch.ops.moe.gather_grouped_mm_swiglu


def two_ops(x, p, b):
    h = ops.gather_grouped_mm(x, p, b)
    return ops.swiglu(h), h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,kind", ROUTINGS)
def test_equals_gather_then_swiglu(T, K, E, kind, dtype):
    p = ops.plan(make_ids(T, K, E, kind), E)
    X, F = 72, 20
    x, b = rand(T, X, dtype=dtype), rand(E, X, 2 * F, dtype=dtype, seed=1)
    a, h = fused(x, p.order_N, p.rows_TK, b, p.offs_E, True)
    a_ref, h_ref = two_ops(x, p, b)
    assert a.shape == (T * K, F) and torch.equal(a, a_ref) and torch.equal(h, h_ref)
    a2, h2 = fused(x, p.order_N, p.rows_TK, b, p.offs_E)  # keep_h=False: no h
    assert torch.equal(a2, a_ref) and h2.shape == (0, 2 * F) and h2.dtype == dtype
    if T * K and dtype != torch.float16:  # the twin within the GEMM rule (SwiGLU is 1-Lipschitz-ish)
        ref = gather_grouped_mm_swiglu_torch(x.double(), p.order_N, p.rows_TK, b.double(), p.offs_E)[0]
        twin = gather_grouped_mm_swiglu_torch(x, p.order_N, p.rows_TK, b, p.offs_E)[0]
        assert (a.double() - ref).abs().max() <= 2 * (twin.double() - ref).abs().max() + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["default", "nn_linear"])
def test_gradients_equal_the_two_op_form(dtype, layout):
    """d x and d b through the fused op are those through gather_grouped_mm then swiglu, bit for
    bit, for b in the (E, X, 2F) layout and as a transposed (E, 2F, X) nn.Linear weight."""
    T, K, E, X, F = 70, 4, 5, 64, 24
    p = ops.plan(make_ids(T, K, E, seed=3), E)
    x0, b0, g = rand(T, X, dtype=dtype), rand(E, X, 2 * F, dtype=dtype, seed=1), rand(T * K, F, dtype=dtype, seed=2)
    if layout == "nn_linear":
        b0 = b0.transpose(1, 2).contiguous().transpose(1, 2)
    grads = []
    for fn in (lambda x, b: ops.gather_grouped_mm_swiglu(x, p, b), lambda x, b: two_ops(x, p, b)[0]):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        fn(x, b).backward(g)
        grads.append((x.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1].stride() == b0.stride()


def test_gradcheck_float64_and_double_backward():
    T, K, E, X, F = 9, 3, 4, 5, 3
    p = ops.plan(make_ids(T, K, E, seed=2), E)
    req = dict(dtype=torch.float64, requires_grad=True)
    x, b = torch.randn(T, X, **req), torch.randn(E, X, 2 * F, **req)
    fn = lambda x, b: ops.gather_grouped_mm_swiglu(x, p, b)  # noqa: E731
    assert gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


def test_keep_h_false_refuses_backward_and_the_wrapper_keeps_h_for_autograd():
    T, K, E, X, F = 8, 2, 3, 6, 4
    p = ops.plan(make_ids(T, K, E, seed=1), E)
    x, b = torch.randn(T, X, requires_grad=True), torch.randn(E, X, 2 * F)
    a, h = fused(x, p.order_N, p.rows_TK, b, p.offs_E, False)
    assert h.shape == (0, 2 * F)
    with pytest.raises(RuntimeError, match="keep_h=False"):
        a.sum().backward()
    ops.gather_grouped_mm_swiglu(x, p, b).sum().backward()  # keeps h: grad mode and x requires grad
    assert x.grad is not None
    with torch.no_grad(), count_ops() as c:
        ops.gather_grouped_mm_swiglu(x, p, b)
    assert c.ops == {"moe.gather_grouped_mm_swiglu": 1}, str(c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    T, K, E, X, F = 11, 3, 4, 8, 3
    p = ops.plan(make_ids(T, K, E, seed=2), E)
    x = torch.randn(T, X, dtype=dtype, requires_grad=True)
    b = torch.randn(E, X, 2 * F, dtype=dtype, requires_grad=True)
    opcheck(fused.default, (x, p.order_N, p.rows_TK, b, p.offs_E, True))
    opcheck(fused.default, (x.detach(), p.order_N, p.rows_TK, b.detach(), p.offs_E, False))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_names_the_argument(device):
    T, K, E, X = 6, 2, 3, 4
    p = ops.plan(make_ids(T, K, E, seed=1), E)
    args = [torch.randn(T, X), p.order_N, p.rows_TK, torch.randn(E, X, 5), p.offs_E]
    move = lambda a: a.to(device) if isinstance(a, torch.Tensor) else a  # noqa: E731
    with pytest.raises(RuntimeError, match=r"gather_grouped_mm_swiglu: b_EXY's Y must be 2F .* got 5"):
        fused(*map(move, args))
    args[3] = torch.randn(E, X + 1, 6)
    with pytest.raises(RuntimeError, match=r"gather_grouped_mm_swiglu: x_TD has X=4 columns but b_EXY has X=5"):
        fused(*map(move, args))
    args[3] = torch.randn(E + 1, X, 6)
    with pytest.raises(RuntimeError, match=r"gather_grouped_mm_swiglu: offs_E has 3 entries but b_EXY has E=4"):
        fused(*map(move, args))


@SETTINGS
@given(r=routings(max_T=40), X=st.integers(1, 29), F=st.integers(1, 17),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 31 - 1))
def test_property(r, X, F, dtype, seed):
    ids, E = r
    p = ops.plan(ids, E)
    T, _ = ids.shape
    x, b = rand(T, X, dtype=dtype, seed=seed), rand(E, X, 2 * F, dtype=dtype, seed=seed + 1)
    a, h = fused(x, p.order_N, p.rows_TK, b, p.offs_E, True)
    a_ref, h_ref = two_ops(x, p, b)
    assert torch.equal(a, a_ref) and torch.equal(h, h_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_runs_swiglu_as_the_first_gemms_epilogue(dtype, monkeypatch):
    """MoELayer's SwiGLU experts: one moe.gather_grouped_mm_swiglu where gather_grouped_mm and
    swiglu were, with the same output and gradients as the experts calling those two ops."""
    torch.manual_seed(0)
    layer = moe.MoELayer(32, 16, 4, 2).to(dtype)
    x = torch.randn(3, 5, 32, dtype=dtype)
    with torch.no_grad(), count_ops() as c:
        layer(x)
    assert c.ops["moe.gather_grouped_mm_swiglu"] == 1, str(c)
    assert "moe.swiglu" not in c.ops and "moe.gather_grouped_mm" not in c.ops, str(c)

    def step():
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.float().square().sum().backward()
        return [y, xg.grad] + [q.grad for q in layer.parameters()]

    fused_out = step()
    monkeypatch.setattr(ops, "gather_grouped_mm_swiglu", lambda x, p, b: two_ops(x, p, b)[0])
    with torch.no_grad(), count_ops() as c:
        layer(x)
    assert "moe.gather_grouped_mm_swiglu" not in c.ops and c.ops["moe.swiglu"] == 1, str(c)
    for got, want in zip(fused_out, step()):
        assert torch.equal(got, want)
