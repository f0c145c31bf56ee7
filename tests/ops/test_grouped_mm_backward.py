"""Tests for moe.grouped_mm_backward and moe.gather_grouped_mm_backward: the two gradients of
grouped_mm / gather_grouped_mm in one op.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim, X/Y the
GEMM's input/output dims.

Each op is defined as the pair of ops the autograd formulas called before:
- grouped_mm_backward(grad, a, b) = (grouped_mm(grad, b^T), the weight gradient in b's layout:
  grouped_mm_wgrad(a, grad), or grouped_mm_wgrad(grad, a)^T for a transposed (E, Y, X) view);
- gather_grouped_mm_backward(grad, x, plan, b) = (unpermute(grouped_mm(grad, b^T), plan),
  gather_grouped_mm_wgrad(x, plan, grad, b's layout)).
On the CPU kernels the outputs equal those ops' bit for bit (the same kernels run), an output not
asked for is empty, and the layers' gradients are the same as before (the formulas call these ops,
or the differentiable pair with create_graph). On CUDA's sm90 path the two GEMMs share one setup
launch (tests/gpu/test_gpu.py, the grouped_mm group).
"""

import pytest
import torch
from hypothesis import given, strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

from moe import ops
from moe.launches import count_ops
from moe.ops.twins import gather_grouped_mm_backward_torch, grouped_mm_backward_torch

from tests.helpers.ops import META, ROUTINGS, cpu_redispatch, make_ids, rand, strided_rows
from tests.helpers.props import SETTINGS, routings

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MASKS = [(True, True), (True, False), (False, True), (False, False)]
m = torch.ops.moe


def _weight(E, X, Y, dtype, yx, seed):
    """b_EXY: (E, X, Y) contiguous, or (yx) the transposed view of an (E, Y, X) weight."""
    if yx:
        return rand(E, Y, X, dtype=dtype, seed=seed).transpose(1, 2)
    return rand(E, X, Y, dtype=dtype, seed=seed)


def _pair(grad, a, b, offs, grad_a, grad_b):
    """The autograd formula's former two ops (None where not asked for)."""
    d_a = m.grouped_mm(grad, b.transpose(1, 2), offs) if grad_a else None
    d_b = None
    if grad_b:
        d_b = m.grouped_mm_wgrad(grad, a, offs).transpose(1, 2) if b.stride(1) == 1 else m.grouped_mm_wgrad(a, grad, offs)
    return d_a, d_b


def _gathered_pair(grad, x, p, b, grad_x, grad_b):
    d_x = ops.unpermute(m.grouped_mm(grad, b.transpose(1, 2), p.offs_E), p) if grad_x else None
    d_b = m.gather_grouped_mm_wgrad(x, p.order_N, p.rows_TK, grad, p.offs_E, b.stride(1) == 1) if grad_b else None
    return d_x, d_b


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(
        rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-4 if dtype == torch.float32 else 5e-2)


def _check_outputs(got, want, twin, fake, mask, dtype):
    for g, w, t, f, asked in zip(got, want, twin, fake, mask):
        assert g.dtype == dtype
        assert g.shape == f.shape and g.stride() == f.stride()  # the fake kernel's layout
        if not asked:
            assert g.shape[0] == 0
            continue
        assert torch.equal(g, w)
        torch.testing.assert_close(g, t, **_tol(dtype))


@needs_ext
@pytest.mark.parametrize("T,K,E,kind", ROUTINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_grouped_mm_backward_equals_the_two_ops(T, K, E, kind, dtype, yx):
    """Both outputs equal grouped_mm's and grouped_mm_wgrad's bit for bit (d b in b's layout, as the
    fake kernel says), the twin's within rounding; padding rows of d a and experts with no rows
    in d b are zero."""
    p = ops.plan(make_ids(T, K, E, kind), E)
    N, X, Y = T * K, 24, 40
    grad, a, b = rand(N, Y, dtype=dtype, seed=1), rand(N, X, dtype=dtype, seed=2), _weight(E, X, Y, dtype, yx, 3)
    for mask in MASKS:
        got = m.grouped_mm_backward(grad, a, b, p.offs_E, *mask)
        fake = m.grouped_mm_backward(grad.to(META), a.to(META), b.to(META), p.offs_E.to(META), *mask)
        twin = grouped_mm_backward_torch(grad, a, b, p.offs_E, *mask)
        _check_outputs(got, _pair(grad, a, b, p.offs_E, *mask), twin, fake, mask, dtype)
        if mask[0]:
            assert not got[0][int(p.offs_E[-1]) if E else 0:].any()
        if mask[1]:
            assert not got[1][p.counts_E == 0].any()
        if mask[1] and yx:
            assert got[1].stride(1) == 1  # the gradient of an nn.Linear-style weight in its layout


@needs_ext
@pytest.mark.parametrize("T,K,E,kind", ROUTINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_gather_grouped_mm_backward_equals_the_ops(T, K, E, kind, dtype, yx):
    """d x equals unpermute(grouped_mm(grad, b^T)) and d b gather_grouped_mm_wgrad bit for bit, the
    twin's within rounding; tokens with every slot empty get zero gradient."""
    p = ops.plan(make_ids(T, K, E, kind), E)
    D, Y = 24, 40
    grad, x, b = rand(T * K, Y, dtype=dtype, seed=1), rand(T, D, dtype=dtype, seed=2), _weight(E, D, Y, dtype, yx, 3)
    for mask in MASKS:
        got = m.gather_grouped_mm_backward(grad, x, p.order_N, p.rows_TK, b, p.offs_E, *mask)
        fake = m.gather_grouped_mm_backward(grad.to(META), x.to(META), p.order_N.to(META), p.rows_TK.to(META),
                                            b.to(META), p.offs_E.to(META), *mask)
        twin = gather_grouped_mm_backward_torch(grad, x, p.order_N, p.rows_TK, b, p.offs_E, *mask)
        _check_outputs(got, _gathered_pair(grad, x, p, b, *mask), twin, fake, mask, dtype)
        if mask[0] and T:
            assert not got[0][(p.rows_TK < 0).all(1)].any()


@needs_ext
def test_strided_inputs_read_as_contiguous_ones():
    p = ops.plan(make_ids(37, 3, 5, "holes"), 5)
    grad, a, b = rand(111, 16, seed=1), rand(111, 8, seed=2), _weight(5, 8, 16, torch.float32, False, 3)
    want = m.grouped_mm_backward(grad, a, b, p.offs_E)
    got = m.grouped_mm_backward(strided_rows(grad), strided_rows(a), b, p.offs_E)
    assert all(torch.equal(u, v) for u, v in zip(got, want))
    x = rand(37, 8, seed=4)
    want = m.gather_grouped_mm_backward(grad, x, p.order_N, p.rows_TK, b, p.offs_E)
    got = m.gather_grouped_mm_backward(strided_rows(grad), strided_rows(x), p.order_N, p.rows_TK, b, p.offs_E)
    assert all(torch.equal(u, v) for u, v in zip(got, want))


def _grads(fn, inputs, g):
    inputs = [t.detach().clone().requires_grad_(r) for t, r in inputs]
    fn(*inputs).backward(g)
    return [t.grad for t in inputs]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_grouped_mm_backward_is_one_op(dtype, yx):
    """grouped_mm's backward is one moe.grouped_mm_backward with the two ops' gradients; a frozen
    weight or a frozen input asks for one output only."""
    p = ops.plan(make_ids(40, 4, 6, "holes"), 6)
    g, a0 = rand(160, 24, dtype=dtype, seed=1), rand(160, 16, dtype=dtype, seed=2)
    b0 = _weight(6, 16, 24, dtype, yx, 3)
    want = _pair(g, a0, b0, p.offs_E, True, True)
    for a_grad, b_grad in ((True, True), (True, False), (False, True)):
        a = a0.clone().requires_grad_(a_grad)
        b = b0.detach().clone() if not yx else b0.transpose(1, 2).clone().transpose(1, 2)
        b.requires_grad_(b_grad)
        out = ops.grouped_mm(a, b, p.offs_E)
        with count_ops() as c:
            out.backward(g)
        assert dict(c.ops) == {"moe.grouped_mm_backward": 1}, str(c)
        for t, w, asked in ((a, want[0], a_grad), (b, want[1], b_grad)):
            assert (t.grad is not None) == asked
            if asked:
                assert torch.equal(t.grad, w) and t.grad.stride() == t.stride()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swiglu", [False, True])
def test_gathered_backward_is_one_op(dtype, swiglu):
    """gather_grouped_mm's backward, and gather_grouped_mm_swiglu's after swiglu_backward, is one
    moe.gather_grouped_mm_backward with the former ops' gradients."""
    p = ops.plan(make_ids(40, 4, 6, "holes"), 6)
    x0, b0 = rand(40, 16, dtype=dtype, seed=1), _weight(6, 16, 24, dtype, True, 2)
    g = rand(160, 12 if swiglu else 24, dtype=dtype, seed=3)
    for x_grad, b_grad in ((True, True), (True, False), (False, True)):
        x = x0.clone().requires_grad_(x_grad)
        b = b0.transpose(1, 2).clone().transpose(1, 2).requires_grad_(b_grad)
        if swiglu:
            out = ops.gather_grouped_mm_swiglu(x, p, b)
            g_h = m.swiglu_backward(g, m.gather_grouped_mm(x0, p.order_N, p.rows_TK, b0, p.offs_E))
            expect_ops = {"moe.swiglu_backward": 1, "moe.gather_grouped_mm_backward": 1}
        else:
            out, g_h = ops.gather_grouped_mm(x, p, b), g
            expect_ops = {"moe.gather_grouped_mm_backward": 1}
        with count_ops() as c:
            out.backward(g)
        assert dict(c.ops) == expect_ops, str(c)
        want = _gathered_pair(g_h, x0, p, b0, True, True)
        for t, w, asked in ((x, want[0], x_grad), (b, want[1], b_grad)):
            assert (t.grad is not None) == asked
            if asked:
                assert torch.equal(t.grad, w) and t.grad.stride() == t.stride()


@needs_ext
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_gradcheck_and_double_backward_float64(yx):
    """With create_graph the formulas take the differentiable ops: second derivatives hold."""
    p = ops.plan(make_ids(7, 3, 4, "holes"), 4)
    a = rand(21, 5, dtype=torch.float64, seed=1).requires_grad_()
    x = rand(7, 5, dtype=torch.float64, seed=2).requires_grad_()
    b = _weight(4, 5, 6, torch.float64, yx, 3).requires_grad_()
    assert gradcheck(lambda a, b: ops.grouped_mm(a, b, p.offs_E), (a, b))
    assert gradgradcheck(lambda a, b: ops.grouped_mm(a, b, p.offs_E), (a, b))
    assert gradcheck(lambda x, b: ops.gather_grouped_mm(x, p, b), (x, b))
    assert gradgradcheck(lambda x, b: ops.gather_grouped_mm(x, p, b), (x, b))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_opcheck(dtype, yx):
    p = ops.plan(make_ids(11, 3, 4, "holes"), 4)
    grad, a, x = rand(33, 6, dtype=dtype, seed=1), rand(33, 5, dtype=dtype, seed=2), rand(11, 5, dtype=dtype, seed=3)
    b = _weight(4, 5, 6, dtype, yx, 4)
    for mask in MASKS:
        opcheck(m.grouped_mm_backward.default, (grad, a, b, p.offs_E, *mask))
        opcheck(m.gather_grouped_mm_backward.default, (grad, x, p.order_N, p.rows_TK, b, p.offs_E, *mask))


P_ = ops.plan(make_ids(6, 2, 3), 3)
_g, _a, _x, _b = torch.randn(12, 5), torch.randn(12, 4), torch.randn(6, 4), torch.randn(3, 4, 5)
_gb = m.grouped_mm_backward
_ggb = m.gather_grouped_mm_backward
BAD = [
    ("grad_rows", lambda: _gb(torch.randn(11, 5), _a, _b, P_.offs_E), "grad_NY"),
    ("grad_cols", lambda: _gb(torch.randn(12, 4), _a, _b, P_.offs_E), "grad_NY"),
    ("grad_dtype", lambda: _gb(_g.double(), _a, _b, P_.offs_E), "grad_NY"),
    ("a_x", lambda: _gb(_g, torch.randn(12, 3), _b, P_.offs_E), "a_NX"),
    ("b_rank", lambda: _gb(_g, _a, _b[0], P_.offs_E), "b_EXY"),
    ("offs_dtype", lambda: _gb(_g, _a, _b, P_.offs_E.long()), "offs_E"),
    ("offs_not_monotone", lambda: _gb(_g, _a, _b, torch.tensor([5, 2, 12], dtype=torch.int32)), "offs_E"),
    ("grad_device", lambda: cpu_redispatch("grouped_mm_backward")(_g.to(META), _a, _b, P_.offs_E), "grad_NY"),
    ("gather_grad_rows", lambda: _ggb(torch.randn(13, 5), _x, P_.order_N, P_.rows_TK, _b, P_.offs_E), "grad_NY"),
    ("gather_grad_dtype", lambda: _ggb(_g.double(), _x, P_.order_N, P_.rows_TK, _b, P_.offs_E), "grad_NY"),
    ("gather_x_cols", lambda: _ggb(_g, torch.randn(6, 3), P_.order_N, P_.rows_TK, _b, P_.offs_E), "x_TD"),
    ("gather_order_dtype", lambda: _ggb(_g, _x, P_.order_N.int(), P_.rows_TK, _b, P_.offs_E), "order_N"),
    ("gather_rows_range", lambda: _ggb(_g, _x, P_.order_N, torch.full_like(P_.rows_TK, 12), _b, P_.offs_E), "rows_TK"),
    ("gather_grad_device", lambda: cpu_redispatch("gather_grouped_mm_backward")(
        _g.to(META), _x, P_.order_N, P_.rows_TK, _b, P_.offs_E), "grad_NY"),
]


@needs_ext
@pytest.mark.parametrize("case,call,arg", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case, call, arg):
    with pytest.raises(RuntimeError, match=arg):
        call()


@needs_ext
@given(routing=routings(), X=st.integers(1, 40), Y=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       yx=st.booleans(), mask=st.sampled_from(MASKS))
@SETTINGS
def test_property_equals_the_ops(routing, X, Y, dtype, yx, mask):
    ids, E = routing
    T, K = ids.shape
    p = ops.plan(ids, E)
    grad, a, x = rand(T * K, Y, dtype=dtype, seed=1), rand(T * K, X, dtype=dtype, seed=2), rand(T, X, dtype=dtype, seed=3)
    b = _weight(E, X, Y, dtype, yx, 4)
    for got, want in ((m.grouped_mm_backward(grad, a, b, p.offs_E, *mask), _pair(grad, a, b, p.offs_E, *mask)),
                      (m.gather_grouped_mm_backward(grad, x, p.order_N, p.rows_TK, b, p.offs_E, *mask),
                       _gathered_pair(grad, x, p, b, *mask))):
        for g, w in zip(got, want):
            assert g.shape[0] == 0 if w is None else torch.equal(g, w)
