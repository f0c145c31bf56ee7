"""Tests for moe.unpermute_backward: the weighted unpermute's backward in one pass,
(permute(grad_TD, plan, weights_TK), unpermute_weights_grad(grad_TD, y_ND, plan)).

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim.

The op is defined as those two ops: on the CPU kernels its outputs equal theirs bit for bit (the
same row and dot routines), and the twins' exactly; unpermute's gradients are the same as before
(its autograd formula calls this op, or the two differentiable ops with create_graph).
"""

import pytest
import torch
from hypothesis import given, strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import moe
from moe import ops
from moe.launches import count_ops
from moe.ops.twins import unpermute_backward_torch

from tests.helpers.ops import META, ROUTINGS, cpu_redispatch, make_ids, rand, strided_rows
from tests.helpers.props import SETTINGS, routings

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MASKS = [(True, True), (True, False), (False, True), (False, False)]
m = torch.ops.moe


def _inputs(T, K, E, kind, dtype, w_dtype, D=24, seed=0):
    p = ops.plan(make_ids(T, K, E, kind, seed=seed), E)
    g = rand(T, D, dtype=dtype, seed=seed + 1)
    y = rand(T * K, D, dtype=dtype, seed=seed + 2)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(seed + 3)).to(w_dtype)
    return p, g, y, w


def _two_ops(g, y, p, w, grad_y, grad_weights):
    return (m.permute(g, p.order_N, p.rows_TK, w) if grad_y else None,
            m.unpermute_weights_grad(g, y, p.order_N, p.rows_TK) if grad_weights else None)


@needs_ext
@pytest.mark.parametrize("T,K,E,kind", ROUTINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_float32", [True, False])
def test_equals_the_two_ops(T, K, E, kind, dtype, w_float32):
    """Both outputs equal permute's and unpermute_weights_grad's bit for bit, and the twin's
    exactly; padding rows (order_N = -1) are zero, empty slots' gradients zero."""
    p, g, y, w = _inputs(T, K, E, kind, dtype, torch.float32 if w_float32 else dtype)
    for grad_y, grad_weights in MASKS:
        got = m.unpermute_backward(g, y, p.order_N, p.rows_TK, w, grad_y, grad_weights)
        twin = unpermute_backward_torch(g, y, p.order_N, p.rows_TK, w, grad_y, grad_weights)
        assert got[0].shape == ((T * K if grad_y else 0), 24) and got[0].dtype == dtype
        assert got[1].shape == ((T if grad_weights else 0), K)
        assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        for a, b in zip(got, _two_ops(g, y, p, w, grad_y, grad_weights)):
            if b is not None:
                assert torch.equal(a, b)
        assert torch.equal(got[0], twin[0])
        if grad_weights:  # the dot products: the kernel's lane order vs the twin's sum
            torch.testing.assert_close(got[1], twin[1], rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-5)
        if grad_y:
            assert not got[0][p.order_N < 0].any()
        if grad_weights:
            assert not got[1][p.rows_TK < 0].any()


@needs_ext
def test_strided_inputs_read_as_contiguous_ones():
    p, g, y, w = _inputs(37, 3, 5, "holes", torch.bfloat16, torch.float32)
    want = m.unpermute_backward(g, y, p.order_N, p.rows_TK, w)
    got = m.unpermute_backward(strided_rows(g), strided_rows(y), p.order_N, p.rows_TK, w.t().contiguous().t())
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_unpermute_backward_is_one_op(dtype):
    """The weighted unpermute's backward is one moe.unpermute_backward with the gradients of the
    two-op formula; unweighted, it is one permute; a frozen y asks for the weights' only."""
    p, g, y0, w0 = _inputs(40, 4, 6, "holes", dtype, torch.float32)
    for y_grad, w_grad in ((True, True), (True, False), (False, True)):
        y, w = y0.clone().requires_grad_(y_grad), w0.clone().requires_grad_(w_grad)
        out = ops.unpermute(y, p, w)
        with count_ops() as c:
            out.backward(g)
        assert dict(c.ops) == {"moe.unpermute_backward": 1}, str(c)
        want = _two_ops(g, y0, p, w0, True, True)
        assert (y.grad is not None) == y_grad and (w.grad is not None) == w_grad
        if y_grad:
            assert torch.equal(y.grad, want[0])
        if w_grad:
            assert torch.equal(w.grad, want[1])
    y = y0.clone().requires_grad_()
    out = ops.unpermute(y, p)
    with count_ops() as c:
        out.backward(g)
    assert dict(c.ops) == {"moe.permute": 1}, str(c)


@needs_ext
def test_unpermute_gradcheck_and_double_backward_float64():
    p, g, y, w = _inputs(11, 3, 4, "holes", torch.float64, torch.float64, D=5)
    y, w = y.requires_grad_(), w.requires_grad_()
    fn = lambda y, w: ops.unpermute(y, p, w)  # noqa: E731
    assert gradcheck(fn, (y, w))
    assert gradgradcheck(fn, (y, w))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    p, g, y, w = _inputs(11, 3, 4, "holes", dtype, torch.float32, D=5)
    for grad_y, grad_weights in MASKS:
        opcheck(m.unpermute_backward.default, (g, y, p.order_N, p.rows_TK, w, grad_y, grad_weights))


P_ = ops.plan(make_ids(6, 2, 3), 3)
_g, _y, _w = torch.randn(6, 4), torch.randn(12, 4), torch.rand(6, 2)
BAD = [
    ("grad_rows", lambda: m.unpermute_backward(torch.randn(7, 4), _y, P_.order_N, P_.rows_TK, _w), "grad_TD"),
    ("y_rows", lambda: m.unpermute_backward(_g, torch.randn(11, 4), P_.order_N, P_.rows_TK, _w), "y_ND"),
    ("y_dtype", lambda: m.unpermute_backward(_g, _y.double(), P_.order_N, P_.rows_TK, _w), "grad_TD"),
    ("weights_shape", lambda: m.unpermute_backward(_g, _y, P_.order_N, P_.rows_TK, torch.rand(6, 3)), "weights_TK"),
    ("weights_dtype", lambda: m.unpermute_backward(_g, _y, P_.order_N, P_.rows_TK, _w.double()), "weights_TK"),
    ("order_dtype", lambda: m.unpermute_backward(_g, _y, P_.order_N.int(), P_.rows_TK, _w), "order_N"),
    ("rows_range", lambda: m.unpermute_backward(_g, _y, P_.order_N, torch.full_like(P_.rows_TK, 12), _w), "rows_TK"),
    ("weights_device", lambda: cpu_redispatch("unpermute_backward")(_g, _y, P_.order_N, P_.rows_TK,
                                                                    _w.to(META)), "weights_TK"),
]


@needs_ext
@pytest.mark.parametrize("case,call,arg", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case, call, arg):
    with pytest.raises(RuntimeError, match=arg):
        call()


@needs_ext
@given(routing=routings(), D=st.integers(1, 40), dtype=st.sampled_from(DTYPES), w_float32=st.booleans())
@SETTINGS
def test_property_equals_the_two_ops(routing, D, dtype, w_float32):
    ids, E = routing
    T, K = ids.shape
    p = ops.plan(ids, E)
    g, y = rand(T, D, dtype=dtype, seed=1), rand(T * K, D, dtype=dtype, seed=2)
    w = torch.rand(T, K).to(torch.float32 if w_float32 else dtype)
    got = m.unpermute_backward(g, y, p.order_N, p.rows_TK, w)
    assert all(torch.equal(a, b) for a, b in zip(got, _two_ops(g, y, p, w, True, True)))
