"""Tests for the gathered grouped GEMM (moe.gather_grouped_mm / _wgrad) and moe.linear_f32.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim,
X/Y GEMM input/output dims.

gather_grouped_mm(x_TD, plan, b) is defined as grouped_mm(permute(x_TD, plan), b, offs_E): on the
CPU kernels it must equal that two-op form bit for bit (the same words reach the same
microkernel), forward and gradients, and the two-op twin within the GEMM error rule.
linear_f32(x, w) is F.linear(x.float(), w.float()): within that GEMM's own error against float64,
and its gradients are exactly that expression's, computed by one moe.linear_f32_backward (on the
CPU the same ATen ops, so bit for bit; on CUDA bfloat16 a split of the float32 gradient into three
bfloat16 terms, tests/gpu/test_gpu_activation.py).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import routers
import moe
from moe import MoELayer, ops
from moe.dispatch import LocalDispatcher
from moe.launches import count_ops
from moe.ops.twins import (gather_grouped_mm_torch, gather_grouped_mm_wgrad_torch, linear_f32_backward_torch,
                           linear_f32_torch)

from tests.helpers.ops import META, ROUTINGS, cpu_redispatch, make_ids, rand, strided_cols, strided_rows
from tests.helpers.props import SETTINGS, routings

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def two_op(x, p, b):
    return ops.grouped_mm(ops.permute(x, p), b, p.offs_E)


# ---------------------------------------------------------------- gather_grouped_mm


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,kind", ROUTINGS)
def test_gather_equals_permute_then_grouped_mm(T, K, E, kind, dtype):
    p = ops.plan(make_ids(T, K, E, kind), E)
    X, Y = 72, 40  # bf16 words, several panels, a partial one
    x, b, g = rand(T, X, dtype=dtype), rand(E, X, Y, dtype=dtype, seed=1), rand(T * K, Y, dtype=dtype, seed=2)
    got = ops.gather_grouped_mm(x, p, b)
    assert torch.equal(got, two_op(x, p, b))
    w = torch.ops.moe.gather_grouped_mm_wgrad(x, p.order_N, p.rows_TK, g, p.offs_E)
    assert torch.equal(w, torch.ops.moe.grouped_mm_wgrad(ops.permute(x, p), g, p.offs_E))
    if T * K and dtype != torch.float16:  # the twin (per-expert at::mm) within the GEMM rule
        ref = gather_grouped_mm_torch(x.double(), p.order_N, p.rows_TK, b.double(), p.offs_E)
        twin = gather_grouped_mm_torch(x, p.order_N, p.rows_TK, b, p.offs_E)
        assert (got.double() - ref).abs().max() <= 2 * (twin.double() - ref).abs().max() + 1e-12
        refw = gather_grouped_mm_wgrad_torch(x.double(), p.order_N, p.rows_TK, g.double(), p.offs_E)
        twinw = gather_grouped_mm_wgrad_torch(x, p.order_N, p.rows_TK, g, p.offs_E)
        assert (w.double() - refw).abs().max() <= 2 * (twinw.double() - refw).abs().max() + 1e-12


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["rows", "cols", "b_transposed"])
def test_gather_non_contiguous_inputs(dtype, layout):
    T, K, E, X, Y = 90, 3, 6, 80, 70
    p = ops.plan(make_ids(T, K, E), E)
    x, b = rand(T, X, dtype=dtype), rand(E, X, Y, dtype=dtype, seed=1)
    xv = {"rows": strided_rows, "cols": strided_cols}.get(layout, lambda t: t)(x)
    bv = b.transpose(1, 2).contiguous().transpose(1, 2) if layout == "b_transposed" else b
    assert torch.equal(ops.gather_grouped_mm(xv, p, bv), two_op(x, p, b))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_gradients_equal_the_two_op_form(dtype):
    T, K, E, X, Y = 70, 4, 5, 64, 48
    p = ops.plan(make_ids(T, K, E, seed=3), E)
    x0, b0, g = rand(T, X, dtype=dtype), rand(E, X, Y, dtype=dtype, seed=1), rand(T * K, Y, dtype=dtype, seed=2)
    grads = []
    for fn in (lambda x, b: ops.gather_grouped_mm(x, p, b), lambda x, b: two_op(x, p, b)):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        fn(x, b).backward(g)
        grads.append((x.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@needs_ext
def test_gather_gradcheck_float64():
    T, K, E, X, Y = 9, 3, 4, 5, 6
    p = ops.plan(make_ids(T, K, E, seed=2), E)
    req = dict(dtype=torch.float64, requires_grad=True)
    x, b, g = torch.randn(T, X, **req), torch.randn(E, X, Y, **req), torch.randn(T * K, Y, **req)
    assert gradcheck(lambda x, b: ops.gather_grouped_mm(x, p, b), (x, b))
    wg = torch.ops.moe.gather_grouped_mm_wgrad
    assert gradcheck(lambda x, g: wg(x, p.order_N, p.rows_TK, g, p.offs_E), (x, g))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gather_and_linear_opcheck(dtype):
    T, K, E, X, Y = 11, 3, 4, 8, 6
    p = ops.plan(make_ids(T, K, E, seed=2), E)
    x = torch.randn(T, X, dtype=dtype, requires_grad=True)
    opcheck(torch.ops.moe.gather_grouped_mm.default,
            (x, p.order_N, p.rows_TK, torch.randn(E, X, Y, dtype=dtype, requires_grad=True), p.offs_E))
    opcheck(torch.ops.moe.gather_grouped_mm_wgrad.default,
            (x, p.order_N, p.rows_TK, torch.randn(T * K, Y, dtype=dtype, requires_grad=True), p.offs_E))
    opcheck(torch.ops.moe.linear_f32.default, (x, torch.randn(5, X, dtype=dtype, requires_grad=True)))


@needs_ext
@SETTINGS
@given(r=routings(max_T=40), X=st.integers(1, 29), Y=st.integers(1, 23),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 31 - 1))
def test_gather_property(r, X, Y, dtype, seed):
    ids, E = r
    p = ops.plan(ids, E)
    T, K = ids.shape
    x, b = rand(T, X, dtype=dtype, seed=seed), rand(E, X, Y, dtype=dtype, seed=seed + 1)
    g = rand(T * K, Y, dtype=dtype, seed=seed + 2)
    assert torch.equal(ops.gather_grouped_mm(x, p, b), two_op(x, p, b))
    assert torch.equal(torch.ops.moe.gather_grouped_mm_wgrad(x, p.order_N, p.rows_TK, g, p.offs_E),
                       torch.ops.moe.grouped_mm_wgrad(ops.permute(x, p), g, p.offs_E))


T_, K_, E_, X_, Y_ = 6, 2, 3, 4, 5
P_ = ops.plan(make_ids(T_, K_, E_, seed=1), E_) if ops.HAS_EXTENSION else None


def _gmm(x=None, b=None, offs=None, order=None):
    gm = torch.ops.moe.gather_grouped_mm
    return lambda: gm(torch.randn(T_, X_) if x is None else x, P_.order_N if order is None else order,
                      P_.rows_TK, torch.randn(E_, X_, Y_) if b is None else b,
                      P_.offs_E if offs is None else offs)


BAD = [
    ("x_rows", lambda: _gmm(x=torch.randn(T_ + 1, X_))(), "x_TD"),
    ("x_int", lambda: _gmm(x=torch.ones(T_, X_, dtype=torch.long))(), "x_TD"),
    ("b_rank", lambda: _gmm(b=torch.randn(X_, Y_))(), "b_EXY"),
    ("b_dtype", lambda: _gmm(b=torch.randn(E_, X_, Y_, dtype=torch.float64))(), "b_EXY"),
    ("b_inner", lambda: _gmm(b=torch.randn(E_, X_ + 1, Y_))(), "b_EXY"),
    ("b_experts", lambda: _gmm(b=torch.randn(E_ + 1, X_, Y_))(), "offs_E"),
    ("offs_int64", lambda: _gmm(offs=P_.offs_E.long())(), "offs_E"),
    ("order_out_of_range", lambda: _gmm(order=torch.full_like(P_.order_N, T_ * K_))(), "order_N"),
    ("wgrad_g_rows", lambda: torch.ops.moe.gather_grouped_mm_wgrad(
        torch.randn(T_, X_), P_.order_N, P_.rows_TK, torch.randn(T_ * K_ + 1, Y_), P_.offs_E), "g_NY"),
    ("linear_shape", lambda: torch.ops.moe.linear_f32(torch.randn(3, 4), torch.randn(5, 6)), "weight_ED"),
    ("linear_dtype", lambda: torch.ops.moe.linear_f32(torch.randn(3, 4).bfloat16(), torch.randn(5, 4)), "weight_ED"),
    ("linear_rank", lambda: torch.ops.moe.linear_f32(torch.randn(3, 4, 1), torch.randn(5, 4)), "x_TD"),
    ("linear_bwd_grad_shape", lambda: torch.ops.moe.linear_f32_backward(
        torch.randn(3, 6), torch.randn(3, 4), torch.randn(5, 4)), "grad_TE"),
    ("linear_bwd_grad_dtype", lambda: torch.ops.moe.linear_f32_backward(
        torch.randn(3, 5).bfloat16(), torch.randn(3, 4).bfloat16(), torch.randn(5, 4).bfloat16()), "grad_TE"),
    ("linear_bwd_weight", lambda: torch.ops.moe.linear_f32_backward(
        torch.randn(3, 5), torch.randn(3, 4), torch.randn(5, 3)), "linear_f32_backward: x_TD has D=4"),
]


@needs_ext
@pytest.mark.parametrize("case,call,arg", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case, call, arg):
    with pytest.raises(RuntimeError, match=arg):
        call()


DEVICE_CASES = [
    ("gather_b", lambda: cpu_redispatch("gather_grouped_mm")(torch.randn(T_, X_), P_.order_N, P_.rows_TK,
                                                   torch.randn(E_, X_, Y_, device=META), P_.offs_E), "b_EXY"),
    ("gather_offs", lambda: cpu_redispatch("gather_grouped_mm")(torch.randn(T_, X_), P_.order_N, P_.rows_TK,
                                                      torch.randn(E_, X_, Y_), P_.offs_E.to(META)), "offs_E"),
    ("gather_wgrad_g", lambda: cpu_redispatch("gather_grouped_mm_wgrad")(
        torch.randn(T_, X_), P_.order_N, P_.rows_TK, torch.randn(T_ * K_, Y_, device=META), P_.offs_E), "g_NY"),
    ("linear_weight", lambda: cpu_redispatch("linear_f32")(torch.randn(3, 4), torch.randn(5, 4, device=META)), "weight_ED"),
    ("linear_bwd_grad", lambda: cpu_redispatch("linear_f32_backward")(
        torch.randn(3, 5, device=META), torch.randn(3, 4), torch.randn(5, 4)), "grad_TE"),
    ("swiglu_grad", lambda: cpu_redispatch("swiglu_backward")(torch.randn(3, 2, device=META), torch.randn(3, 4)), "grad"),
]


@needs_ext
@pytest.mark.parametrize("case,call,arg", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_kernel_device_mismatch_names_the_argument(case, call, arg):
    with pytest.raises(RuntimeError, match=arg):
        call()


@needs_ext
def test_layer_reads_rows_in_place_and_matches_the_permuted_path():
    """MoELayer with its LocalDispatcher takes the gathered path (no permute node in the graph);
    a dispatcher that hands the experts materialised rows takes permute + grouped_mm; outputs
    and every gradient are equal."""
    torch.manual_seed(0)
    a = MoELayer(32, 24, 6, 2).to(torch.bfloat16)

    class Plain(LocalDispatcher):
        def dispatch(self, x_TD, routing):
            rows, state = super().dispatch(x_TD, routing)
            return rows.materialize(), state

    b = MoELayer(32, 24, 6, 2, dispatcher=Plain(6)).to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 17, 32, dtype=torch.bfloat16)
    outs = []
    for m in (a, b):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y.float().square().sum() + moe.collect_aux_losses(m)).backward()
        names, todo, seen = set(), [y.grad_fn], set()
        while todo:
            fn = todo.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                names.add(fn.name())
                todo.extend(n for n, _ in fn.next_functions)
        outs.append((y, xi.grad, [p.grad for p in m.parameters()], names))
    assert any("gather_grouped_mm" in n for n in outs[0][3])
    assert not any("moe_permute" in n for n in outs[0][3]) and any("moe_permute" in n for n in outs[1][3])
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for ga, gb in zip(outs[0][2], outs[1][2]):
        assert torch.equal(ga, gb)


@needs_ext
def test_layer_calls_its_experts_module():
    """The gathered path goes through layer.experts(rows), so module hooks run (FSDP's,
    profilers'); GroupedExperts refuses extra offs_E / plan next to ExpertRows."""
    layer = MoELayer(16, 8, 4, 2)
    calls = []
    layer.experts.register_forward_pre_hook(lambda mod, args: calls.append(args[0]))
    layer(torch.randn(5, 16))
    assert len(calls) == 1 and isinstance(calls[0], moe.ExpertRows) and isinstance(calls[0].plan, ops.Plan)
    p = ops.plan(make_ids(5, 2, 4), 4)
    with pytest.raises(ValueError, match="ExpertRows alone"):
        layer.experts(moe.ExpertRows(torch.randn(5, 16), p.offs_E, p), p.offs_E)


# ---------------------------------------------------------------- linear_f32


@needs_ext
@pytest.mark.parametrize("T,D,E", [(4096, 1024, 128), (37, 33, 5), (1, 1, 1), (0, 16, 4), (300, 64, 1)])
def test_linear_f32_bf16_within_the_float32_gemm_error(T, D, E):
    x, w = rand(T, D, dtype=torch.bfloat16), (rand(E, D, seed=1) * 0.05).to(torch.bfloat16)
    got = torch.ops.moe.linear_f32(x, w)
    assert got.dtype == torch.float32 and got.shape == (T, E)
    ref = x.double() @ w.double().t()
    base = F.linear(x.float(), w.float())
    if T:
        assert (got.double() - ref).abs().max() <= 2 * (base.double() - ref).abs().max() + 1e-30


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_linear_f32_gradients_are_those_of_the_float32_linear(dtype):
    x0, w0 = rand(50, 40, dtype=dtype), rand(7, 40, dtype=dtype, seed=1)
    g = rand(50, 7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, seed=2)
    res = []
    for fn in (torch.ops.moe.linear_f32, linear_f32_torch):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = fn(x, w)
        out.backward(g)
        res.append((out, x.grad, w.grad))
    assert res[0][0].dtype == res[1][0].dtype
    if dtype != torch.bfloat16:  # other dtypes run the float32 linear itself
        assert torch.equal(res[0][0], res[1][0])
    assert torch.equal(res[0][1], res[1][1]) and torch.equal(res[0][2], res[1][2])
    assert res[0][1].dtype == dtype and res[0][2].dtype == dtype


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_x,grad_weight", [(True, True), (True, False), (False, True), (False, False)])
def test_linear_f32_backward_is_the_float32_gemms_cast_back(dtype, grad_x, grad_weight):
    """The op's outputs are the twin's bit for bit (the same ATen ops on the CPU), in the
    operands' dtype, with an empty (0, D) for an output not asked for; a strided and a broadcast
    gradient (what sum().backward() hands over) give the same values as a contiguous one."""
    x, w = rand(23, 9, dtype=dtype), rand(6, 9, dtype=dtype, seed=1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = rand(6, 23, dtype=acc, seed=2).t()  # column-major
    for grad in (g, g.contiguous(), torch.ones((), dtype=acc).expand(23, 6)):
        got = torch.ops.moe.linear_f32_backward(grad, x, w, grad_x, grad_weight)
        want = linear_f32_backward_torch(grad.contiguous(), x, w, grad_x, grad_weight)
        assert got[0].shape == (23 if grad_x else 0, 9) and got[1].shape == (6 if grad_weight else 0, 9)
        for a, b in zip(got, want):
            assert a.dtype == dtype and torch.equal(a, b)


def test_three_bfloat16_terms_hold_a_float32_exactly():
    """The lemma behind the CUDA bfloat16 backward (csrc/cuda/activation.cu): h1 = bf16(g),
    h2 = bf16(g - h1), h3 = bf16(g - h1 - h2) sum back to g exactly in float32, for normal g
    down to 2^-110 (below, h3 would be a bfloat16 subnormal), and two terms would not do."""
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    g = g * torch.exp2(torch.randint(-108, 100, g.shape, generator=torch.Generator().manual_seed(1)).float())
    g = g[g.abs() >= 2.0 ** -110]
    h1 = g.bfloat16()
    r1 = g - h1.float()
    h2 = r1.bfloat16()
    h3 = (r1 - h2.float()).bfloat16()
    assert torch.equal(h3.float(), r1 - h2.float())  # the third term is exact
    assert torch.equal((h1.float() + h2.float()) + h3.float(), g)
    assert not torch.equal(h1.float() + h2.float(), g)
    assert len(g) > 190_000


@needs_ext
@pytest.mark.parametrize("T,E,D", [(0, 4, 8), (5, 0, 8), (5, 4, 0)])
def test_linear_f32_backward_empty_sums_are_zero(T, E, D):
    x, w = rand(T, D, dtype=torch.bfloat16), rand(E, D, dtype=torch.bfloat16, seed=1)
    g_x, g_w = torch.ops.moe.linear_f32_backward(torch.randn(T, E), x, w)
    assert g_x.shape == (T, D) and g_w.shape == (E, D)
    assert not g_x.any() and not g_w.any()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_f32_backward_is_one_op(dtype):
    """linear_f32's backward is one moe.linear_f32_backward: no casts of its own (the launch
    budget, tests/layers/test_launches.py); with a frozen weight it asks for d x only."""
    x = rand(40, 16, dtype=dtype).requires_grad_()
    for w_grad in (True, False):
        w = rand(8, 16, dtype=dtype, seed=1).requires_grad_(w_grad)
        out = torch.ops.moe.linear_f32(x, w)
        g = torch.randn_like(out)
        with count_ops() as c:
            out.backward(g)
        assert dict(c.ops) == {"moe.linear_f32_backward": 1}, str(c)
        assert (w.grad is not None) == w_grad
        assert torch.equal(x.grad, linear_f32_backward_torch(g, x.detach(), w.detach())[0])
        x.grad = None


@needs_ext
def test_linear_f32_double_backward_float64():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(torch.ops.moe.linear_f32, (x, w))


@needs_ext
def test_linear_f32_gradcheck_float64():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(torch.ops.moe.linear_f32, (x, w))


@needs_ext
def test_bf16_router_uses_linear_f32_and_routes_as_the_float32_path(monkeypatch):
    """A bfloat16 TopKRouter computes its logits with moe.linear_f32 (float32 logits from the
    bfloat16 operands) and routes as the upcast float32 GEMM does; with jitter in training it
    takes the float32 path."""
    import routers.routing as rr

    torch.manual_seed(0)
    r = routers.TopKRouter(64, 16, 4).to(torch.bfloat16)
    x = torch.randn(200, 64, dtype=torch.bfloat16)
    fast = r(x)
    assert fast.logits_TE.dtype == torch.float32
    assert "linear_f32" in fast.logits_TE.grad_fn.name()
    monkeypatch.setattr(rr, "_linear_f32_op", lambda: None)
    slow = r(x)
    assert "linear_f32" not in slow.logits_TE.grad_fn.name()
    assert torch.allclose(fast.logits_TE, slow.logits_TE, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast.ids_TK, slow.ids_TK)
    monkeypatch.undo()
    jit = routers.TopKRouter(64, 16, 4, jitter=0.1).to(torch.bfloat16).train()
    assert "linear_f32" not in jit(x).logits_TE.grad_fn.name()
