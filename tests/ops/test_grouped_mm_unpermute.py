"""Tests for moe.grouped_mm_unpermute: the experts' down projection and the weighted combine in one op,
and its backward, which keeps no (N, Y) product.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), X/Y the GEMM's input/output
dims (F and D in the layer).

The op is defined as ``unpermute(grouped_mm(a, b, offs), plan, w)``: its forward equals the two ops bit
for bit on the CPU kernels. The property that defines its backward (SonicMoE, Guo et al. 2025, Sec.
3.2) is the routing weights' gradient without the expert outputs y_i = a_i @ b_e:
d w_tk = <grad_t, y_i> = <a_i, grad_t @ b_e^T>; the other gradients are d a_i = w_tk grad_t @ b_e^T and
d b_e = sum_i (w_tk a_i)^T grad_t. Checked against the float64 composite's autograd, with the error of
the kernel at most twice the same-dtype twin's (the project's GEMM rule), and the layer's saved
activations lose the T*K x D expert outputs.
"""

import pytest
import torch
from hypothesis import given, strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import moe
from moe import ops
from moe.launches import count_ops
from moe.ops.twins import grouped_mm_unpermute_backward_torch, grouped_mm_unpermute_torch

from tests.helpers.ops import META, ROUTINGS, cpu_redispatch, make_ids, rand, strided_rows
from tests.helpers.props import SETTINGS, routings

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MASKS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (False, False, False)]
m = torch.ops.moe


def _weight(E, X, Y, dtype, yx, seed):
    """b_EXY: (E, X, Y) contiguous, or (yx) the transposed view of an (E, Y, X) weight."""
    return rand(E, Y, X, dtype=dtype, seed=seed).transpose(1, 2) if yx else rand(E, X, Y, dtype=dtype, seed=seed)


def _case(T, K, E, kind, X, Y, dtype, yx, weights="f32", swiglu=False):
    """(plan, a (N, X) or with swiglu h (N, 2X), b, weights)."""
    p = ops.plan(make_ids(T, K, E, kind), E)
    a, b = rand(T * K, 2 * X if swiglu else X, dtype=dtype, seed=1), _weight(E, X, Y, dtype, yx, 2)
    w = None if weights is None else torch.rand(T, K, generator=torch.Generator().manual_seed(3)).to(
        torch.float32 if weights == "f32" else dtype)
    return p, a, b, w


def _reference(g, a, b, p, w, swiglu=False):
    """The float64 composite's gradients (d a, d b, d w) through autograd: the unpermute's weight
    gradient <grad_t, y_i> on the materialised (N, Y) product (with swiglu, of swiglu(a))."""
    a64, b64 = a.double().clone().requires_grad_(), b.double().clone().requires_grad_()
    w64 = None if w is None else w.double().clone().requires_grad_()
    rows = ops.swiglu(a64) if swiglu else a64
    ops.unpermute(ops.grouped_mm(rows, b64, p.offs_E), p, w64).backward(g.double())
    return a64.grad, b64.grad, (None if w is None else w64.grad)


def _err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def _within_rule(x, twin, ref, swiglu):
    """The 2x rule against the same-dtype twin, plus (as tests/helpers/gpu.py's error_rule) a floor
    of one rounding of the largest value: of four with swiglu, whose recomputed activation is the
    swiglu kernel's (e^x from a polynomial, relative error under 2e-7: test_swiglu.py)."""
    floor = torch.finfo(x.dtype).eps * (4 if swiglu else 1) * (ref.abs().max().item() if ref.numel() else 0.0)
    return _err(x, ref) <= 2 * _err(twin, ref) + floor + 1e-12


@needs_ext
@pytest.mark.parametrize("T,K,E,kind", ROUTINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", ["f32", "dtype", None])
@pytest.mark.parametrize("swiglu", [False, True])
def test_forward_equals_the_two_ops(T, K, E, kind, dtype, weights, swiglu):
    """The values of unpermute(grouped_mm(a, b), plan, w) (with swiglu, of swiglu(h)) bit for bit
    (the same kernels), the twin's within rounding; the fake kernel's shape."""
    for yx in (False, True):
        p, a, b, w = _case(T, K, E, kind, 24, 40, dtype, yx, weights, swiglu)
        got = ops.grouped_mm_unpermute(a, p, b, w, swiglu=swiglu)
        rows = ops.swiglu(a) if swiglu else a
        assert torch.equal(got, ops.unpermute(ops.grouped_mm(rows, b, p.offs_E), p, w))
        twin = grouped_mm_unpermute_torch(a, b, p.offs_E, p.order_N, p.rows_TK, w, swiglu)
        tol = dict(rtol=1e-5, atol=1e-4) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(got, twin, **tol)
        fake = m.grouped_mm_unpermute(a.to(META), b.to(META), p.offs_E.to(META), p.order_N.to(META),
                                      p.rows_TK.to(META), None if w is None else w.to(META), swiglu)
        assert fake.shape == got.shape == (T, 40) and fake.dtype == got.dtype


@needs_ext
@pytest.mark.parametrize("T,K,E,kind", ROUTINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
@pytest.mark.parametrize("swiglu", [False, True])
def test_backward_against_float64(T, K, E, kind, dtype, yx, swiglu):
    """Each gradient within twice the same-dtype twin's error of the float64 composite's autograd
    (d w from <a_i, grad_t @ b_e^T>, the reference's from <grad_t, y_i>; with swiglu d a is d h, the
    activation recomputed from h); the layouts of the fake kernel; padding rows of d a, experts
    without rows in d b and empty slots in d w zero; an output not asked for empty."""
    X, Y = 72, 80
    p, a, b, w = _case(T, K, E, kind, X, Y, dtype, yx, swiglu=swiglu)
    g = rand(T, Y, dtype=dtype, seed=4)
    ref = _reference(g, a, b, p, w, swiglu)
    twin = grouped_mm_unpermute_backward_torch(g, a, b, p.offs_E, p.order_N, p.rows_TK, w, swiglu=swiglu)
    for mask in MASKS:
        got = m.grouped_mm_unpermute_backward(g, a, b, p.offs_E, p.order_N, p.rows_TK, w, *mask, swiglu)
        fake = m.grouped_mm_unpermute_backward(g.to(META), a.to(META), b.to(META), p.offs_E.to(META),
                                               p.order_N.to(META), p.rows_TK.to(META), w.to(META), *mask, swiglu)
        for name, x, f, t, r, asked in zip(("d a", "d b", "d w"), got, fake, twin, ref, mask):
            assert x.shape == f.shape and x.stride() == f.stride() and x.dtype == f.dtype, name
            if not asked:
                assert x.shape[0] == 0, name
                continue
            assert _within_rule(x, t, r, swiglu), f"{name}: {_err(x, r)} vs twin {_err(t, r)}"
        if mask[0]:
            assert not got[0][int(p.offs_E[-1]) if E else 0:].any()
        if mask[1]:
            assert not got[1][p.counts_E == 0].any()
            if yx:
                assert got[1].stride(1) == 1  # an nn.Linear-style weight's gradient in its layout
        if mask[2]:
            assert not got[2][p.rows_TK < 0].any()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weights_gradient_is_the_unpermutes_without_y(dtype):
    """The identity the op rests on: <a_i, grad_t @ b_e^T> equals the unpermute's <grad_t, y_i> with
    y = grouped_mm(a, b) (float64: to rounding; half types: to their rounding of y)."""
    p, a, b, w = _case(64, 8, 16, "holes", 48, 56, dtype, False)
    g = rand(64, 56, dtype=dtype, seed=5)
    d_w = m.grouped_mm_unpermute_backward(g, a, b, p.offs_E, p.order_N, p.rows_TK, w, False, False, True)[2]
    y = ops.grouped_mm(a.double(), b.double(), p.offs_E)
    want = m.unpermute_weights_grad(g.double(), y, p.order_N, p.rows_TK)
    tol = {torch.float64: 1e-10, torch.float32: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(d_w.double(), want, rtol=tol, atol=tol)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_autograd_is_one_op_and_saves_no_product(dtype, yx):
    """The backward is one moe.grouped_mm_unpermute_backward with its outputs (only those asked
    for); the op saves a, b, the plan and the weights, never an (N, Y) tensor."""
    p, a0, b0, w0 = _case(40, 4, 6, "holes", 16, 24, dtype, yx)
    g = rand(40, 24, dtype=dtype, seed=6)
    want = m.grouped_mm_unpermute_backward(g, a0, b0, p.offs_E, p.order_N, p.rows_TK, w0)
    for flags in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        a = a0.clone().requires_grad_(flags[0])
        b = (b0.transpose(1, 2).clone().transpose(1, 2) if yx else b0.clone()).requires_grad_(flags[1])
        w = w0.clone().requires_grad_(flags[2])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = ops.grouped_mm_unpermute(a, p, b, w)
        assert (a.shape[0], 24) not in saved, saved
        with count_ops() as c:
            out.backward(g)
        assert dict(c.ops) == {"moe.grouped_mm_unpermute_backward": 1}, str(c)
        for t, v, asked in zip((a, b, w), want, flags):
            assert (t.grad is not None) == asked
            if asked:
                assert torch.equal(t.grad, v.to(t.dtype)) and t.grad.stride() == t.stride()


@needs_ext
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("swiglu", [False, True])
def test_gradcheck_and_double_backward_float64(yx, weighted, swiglu):
    """gradcheck in float64; with create_graph the formula runs on the differentiable ops, so second
    derivatives hold too."""
    p = ops.plan(make_ids(7, 3, 4, "holes"), 4)
    a = rand(21, 10 if swiglu else 5, dtype=torch.float64, seed=1).requires_grad_()
    b = _weight(4, 5, 6, torch.float64, yx, 2).requires_grad_()
    w = torch.rand(7, 3, dtype=torch.float64).requires_grad_()
    if weighted:
        fn, inputs = (lambda a, b, w: ops.grouped_mm_unpermute(a, p, b, w, swiglu=swiglu)), (a, b, w)
    else:
        fn, inputs = (lambda a, b: ops.grouped_mm_unpermute(a, p, b, swiglu=swiglu)), (a, b)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_opcheck(dtype, yx):
    p = ops.plan(make_ids(11, 3, 4, "holes"), 4)
    g, a = rand(11, 6, dtype=dtype, seed=1), rand(33, 5, dtype=dtype, seed=2).requires_grad_()
    b = _weight(4, 5, 6, dtype, yx, 3)
    w = torch.rand(11, 3).requires_grad_()
    opcheck(m.grouped_mm_unpermute.default, (a, b.requires_grad_(), p.offs_E, p.order_N, p.rows_TK, w))
    opcheck(m.grouped_mm_unpermute.default, (a, b, p.offs_E, p.order_N, p.rows_TK, None))
    for mask in MASKS:
        opcheck(m.grouped_mm_unpermute_backward.default,
                (g, a.detach(), b.detach(), p.offs_E, p.order_N, p.rows_TK, w.detach(), *mask))
    h = rand(33, 10, dtype=dtype, seed=5).requires_grad_()
    opcheck(m.grouped_mm_unpermute.default, (h, b, p.offs_E, p.order_N, p.rows_TK, w, True))
    for mask in MASKS:
        opcheck(m.grouped_mm_unpermute_backward.default,
                (g, h.detach(), b.detach(), p.offs_E, p.order_N, p.rows_TK, w.detach(), *mask, True))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("swiglu", [False, True])
def test_backward_bits_do_not_depend_on_the_thread_count(dtype, swiglu):
    """Each d w is one row's dot product in a fixed order, however the rows are cut into tiles
    (the GEMM tiles never split a row's columns): one thread and two give the same bits."""
    p, a, b, w = _case(300, 4, 8, "holes", 96, 72, dtype, True, swiglu=swiglu)
    g = rand(300, 72, dtype=dtype, seed=7)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(m.grouped_mm_unpermute_backward(g, a, b, p.offs_E, p.order_N, p.rows_TK, w,
                                                        swiglu=swiglu))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for u, v in zip(*outs))


@needs_ext
def test_strided_inputs_read_as_contiguous_ones():
    p, a, b, w = _case(37, 3, 5, "holes", 8, 16, torch.float32, False)
    g = rand(37, 16, seed=4)
    want = m.grouped_mm_unpermute_backward(g, a, b, p.offs_E, p.order_N, p.rows_TK, w)
    got = m.grouped_mm_unpermute_backward(strided_rows(g), strided_rows(a), b, p.offs_E, p.order_N, p.rows_TK, w)
    assert all(torch.equal(u, v) for u, v in zip(got, want))
    assert torch.equal(ops.grouped_mm_unpermute(strided_rows(a), p, b, w), ops.grouped_mm_unpermute(a, p, b, w))


P_ = ops.plan(make_ids(6, 2, 3), 3)
_a, _b, _w, _g = torch.randn(12, 4), torch.randn(3, 4, 5), torch.rand(6, 2), torch.randn(6, 5)
_f, _bw = m.grouped_mm_unpermute, m.grouped_mm_unpermute_backward
BAD = [
    ("a_rows", lambda: _f(torch.randn(11, 4), _b, P_.offs_E, P_.order_N, P_.rows_TK, _w), "a_NX"),
    ("a_cols", lambda: _f(torch.randn(12, 3), _b, P_.offs_E, P_.order_N, P_.rows_TK, _w), "a_NX"),
    ("b_dtype", lambda: _f(_a, _b.double(), P_.offs_E, P_.order_N, P_.rows_TK, _w), "b_EXY"),
    ("offs_len", lambda: _f(_a, _b, P_.offs_E[:2], P_.order_N, P_.rows_TK, _w), "offs_E"),
    ("order_dtype", lambda: _f(_a, _b, P_.offs_E, P_.order_N.int(), P_.rows_TK, _w), "order_N"),
    ("weights_shape", lambda: _f(_a, _b, P_.offs_E, P_.order_N, P_.rows_TK, _w[:, :1]), "weights_TK"),
    ("weights_dtype", lambda: _f(_a, _b, P_.offs_E, P_.order_N, P_.rows_TK, _w.double()), "weights_TK"),
    ("swiglu_width", lambda: _f(_a, _b, P_.offs_E, P_.order_N, P_.rows_TK, _w, True), "a_NX"),
    ("grad_shape", lambda: _bw(torch.randn(6, 4), _a, _b, P_.offs_E, P_.order_N, P_.rows_TK, _w), "grad_TD"),
    ("grad_dtype", lambda: _bw(_g.double(), _a, _b, P_.offs_E, P_.order_N, P_.rows_TK, _w), "grad_TD"),
    ("grad_device", lambda: cpu_redispatch("grouped_mm_unpermute_backward")(
        _g.to(META), _a, _b, P_.offs_E, P_.order_N, P_.rows_TK, _w), "grad_TD"),
    ("weights_device", lambda: cpu_redispatch("grouped_mm_unpermute")(
        _a, _b, P_.offs_E, P_.order_N, P_.rows_TK, _w.to(META)), "weights_TK"),
]
# read from the data: the compiled kernel's checks alone
DATA_BAD = [
    ("offs_not_monotone", lambda: _bw(_g, _a, _b, torch.tensor([5, 2, 12], dtype=torch.int32), P_.order_N,
                                      P_.rows_TK, _w), "offs_E"),
    ("order_out_of_range", lambda: _bw(_g, _a, _b, P_.offs_E, torch.full_like(P_.order_N, 99), P_.rows_TK, _w),
     "order_N"),
]


@needs_ext
@pytest.mark.parametrize("case,call,arg", BAD + DATA_BAD, ids=[c[0] for c in BAD + DATA_BAD])
def test_bad_input_names_the_argument(case, call, arg):
    with pytest.raises(RuntimeError, match=arg):
        call()


@pytest.mark.parametrize("case,call,arg", BAD[:-2], ids=[c[0] for c in BAD[:-2]])
def test_bad_input_on_fake_tensors_names_the_argument(case, call, arg):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError, match=arg):
        call()


@needs_ext
@given(routing=routings(), X=st.integers(1, 40), Y=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       yx=st.booleans(), weighted=st.booleans(), mask=st.sampled_from(MASKS), swiglu=st.booleans())
@SETTINGS
def test_property_against_float64(routing, X, Y, dtype, yx, weighted, mask, swiglu):
    """Random routings (empty experts, -1 slots, T = 0) and sizes: the forward equals the two ops,
    the backward is within twice the twin's error of the float64 composite."""
    ids, E = routing
    T, K = ids.shape
    p = ops.plan(ids, E)
    a = rand(T * K, 2 * X if swiglu else X, dtype=dtype, seed=1)
    b, g = _weight(E, X, Y, dtype, yx, 2), rand(T, Y, dtype=dtype, seed=3)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(4)) if weighted else None
    rows = ops.swiglu(a) if swiglu else a
    assert torch.equal(ops.grouped_mm_unpermute(a, p, b, w, swiglu=swiglu),
                       ops.unpermute(ops.grouped_mm(rows, b, p.offs_E), p, w))
    got = m.grouped_mm_unpermute_backward(g, a, b, p.offs_E, p.order_N, p.rows_TK, w, *mask, swiglu)
    twin = grouped_mm_unpermute_backward_torch(g, a, b, p.offs_E, p.order_N, p.rows_TK, w, *mask, swiglu)
    ref = _reference(g, a, b, p, w, swiglu)
    for x, t, r, asked in zip(got, twin, ref, mask):
        if asked and r is not None:
            assert _within_rule(x, t, r, swiglu)
        else:
            assert x.shape[0] == 0


def test_layer_saves_no_expert_outputs():
    """MoELayer (local dispatch) combines through the op: its forward equals the two-op path's bit
    for bit, its gradients agree, and its saved activations hold T*K*(D + F) values fewer: no (N, D)
    expert outputs and no (N, F) activation (SwiGLU is recomputed from h in the backward)."""
    torch.manual_seed(0)
    T, D, F, E, K = 48, 32, 24, 8, 4  # 2F != D: h (N, 2F) is not mistaken for an (N, D) output
    layer = moe.MoELayer(D, F, E, K)
    x = torch.randn(T, D)

    def run(fused):
        saved = []
        xr = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if fused:
                y = layer(xr)
            else:  # the dispatcher's combine on the experts' (N, D) outputs
                rows, state = layer.dispatcher.dispatch(xr, layer.router(xr))
                y = layer.dispatcher.combine(layer.experts(rows), state)
        layer.zero_grad()
        y.backward(torch.ones_like(y))
        grads = [xr.grad] + [p.grad.clone() for p in layer.parameters()]
        values = sum(t.numel() for t in {t.data_ptr(): t for t in saved if t.numel()}.values())
        return y.detach(), grads, values, [tuple(t.shape) for t in saved]

    y1, g1, n1, shapes1 = run(True)
    y0, g0, n0, _ = run(False)
    assert torch.equal(y1, y0)
    for u, v in zip(g1, g0):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    assert (T * K, D) not in shapes1 and (T * K, F) not in shapes1, shapes1
    assert n0 - n1 == T * K * (D + F), (n0, n1)


@pytest.mark.parametrize("activation,bias", [("swiglu", True), ("gelu", False), ("geglu", True), ("relu", False)])
def test_layer_combined_equals_the_two_ops_in_every_configuration(activation, bias):
    """experts(rows, combine=state) gives the values of dispatcher.combine(experts(rows), state), bit
    for bit, with and without autograd, for every activation and with expert biases (which take the
    two ops: the fused op has no bias term); materialised rows too."""
    torch.manual_seed(0)
    layer = moe.MoELayer(32, 24, 8, 4, activation=activation, bias=bias)
    x = torch.randn(40, 32)
    routing = layer.router(x)
    rows, state = layer.dispatcher.dispatch(x, routing)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for r in (rows, rows.materialize()):
                want = layer.dispatcher.combine(layer.experts(r), state)
                assert torch.equal(layer.experts(r, combine=state), want)


def test_layer_runs_overridden_experts_and_combine_as_written():
    """A GroupedExperts subclass with its own forward (no combine argument) and a LocalDispatcher
    subclass with its own combine keep MoELayer's two calls: neither override is bypassed."""
    calls = []

    class Experts(moe.GroupedExperts):
        def forward(self, rows):
            calls.append("experts")
            return super().forward(rows)

    class Dispatcher(moe.LocalDispatcher):
        def combine(self, y_ND, state):
            calls.append("combine")
            return super().combine(y_ND, state)

    torch.manual_seed(0)
    layer = moe.MoELayer(32, 24, 8, 4)
    x = torch.randn(40, 32)
    want = layer(x)
    layer.experts.__class__ = Experts
    assert torch.equal(layer(x), want) and calls == ["experts"]
    calls.clear()
    layer.experts.__class__, layer.dispatcher.__class__ = moe.GroupedExperts, Dispatcher
    assert torch.equal(layer(x), want) and calls == ["combine"]
