"""Tests for moe.swiglu (torch.ops.moe.swiglu / swiglu_backward): SwiGLU's gating in one pass.

Shape legend: N rows, F expert hidden size, H = 2F the first projection's width ([gate; up]).
The kernel computes in float32 (float64 for float64) and rounds once, as the twin
moe.ops.twins.swiglu_torch does: the two agree to one rounding of the output dtype (the kernel's
e^x is a polynomial, not libm's), and the kernel's error against float64 is at most that of
PyTorch's own silu(gate) * up in the same dtype (which rounds twice).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.autograd import gradcheck
from torch.library import opcheck

from moe import DenseFFN, ExpertRows, GroupedExperts, ops
from moe.ops.twins import swiglu_backward_torch, swiglu_torch

from tests.helpers.props import SETTINGS
from tests.helpers.swiglu import ULP, close_to, inputs

needs_ext = pytest.mark.skipif("CPU" not in ops.compiled_kernels("swiglu"),
                               reason="moe._C extension not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def ref64(h, g):
    """float64 forward and input gradient by autograd through silu(gate) * up."""
    h64 = h.double().requires_grad_()
    gate, up = h64.chunk(2, dim=-1)
    out = F.silu(gate) * up
    (dh,) = torch.autograd.grad(out, h64, g.double())
    return out.detach(), dh


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,F_", [((37,), 224), ((5, 3), 17), ((1,), 1), ((64,), 48), ((0,), 8)])
def test_kernel_matches_twin(dtype, shape, F_):
    h, grad = inputs(shape, F_, dtype)
    out = torch.ops.moe.swiglu(h)
    dh = torch.ops.moe.swiglu_backward(grad, h)
    assert out.shape == (*shape, F_) and out.dtype == dtype
    assert dh.shape == h.shape and dh.dtype == dtype
    assert close_to(out, swiglu_torch(h), dtype)
    # d gate = grad * up * s (1 + g (1 - s)) cancels near g = -1.28 (silu' = 0): an absolute
    # floor of one rounding of its terms' size, grad * up * (1 + |g|) (and grad * g for d up).
    gate, up = h.double().chunk(2, dim=-1)
    size = torch.cat([grad.double().abs() * up.abs() * (1 + gate.abs()), grad.double().abs() * gate.abs()], -1)
    twin = swiglu_backward_torch(grad, h).double()
    assert bool(((dh.double() - twin).abs() <= ULP[dtype] * (twin.abs() + size)).all())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_at_most_pytorchs(dtype):
    """FlashAttention's rule: error vs float64 no more than PyTorch's same-dtype silu(g) * u
    (forward and input gradient)."""
    h, grad = inputs((4096,), 224, dtype, seed=1)
    want, want_dh = ref64(h, grad)
    hp = h.clone().requires_grad_()
    gate, up = hp.chunk(2, dim=-1)
    torch_out = F.silu(gate) * up
    (torch_dh,) = torch.autograd.grad(torch_out, hp, grad)
    ours = torch.ops.moe.swiglu(h)
    ours_dh = torch.ops.moe.swiglu_backward(grad, h)
    for o, t, r in ((ours, torch_out, want), (ours_dh, torch_dh, want_dh)):
        err = (o.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        assert err <= err_torch, (err, err_torch)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_values(dtype):
    """Large |gate| saturates (silu -> gate or -0), NaN propagates, +-inf as in float64."""
    gate = torch.tensor([-1e4, -200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, 1e4, float("nan"),
                         float("inf"), 3.0, -3.0, 1e-30, -1e-30, 0.5, -0.5])
    up = torch.ones_like(gate) * 1.5
    h = torch.cat([gate, up])[None].to(dtype)
    out = torch.ops.moe.swiglu(h)[0].double()
    want = swiglu_torch(h.double())[0]
    finite = want.isfinite()
    assert torch.isnan(out[9]) and torch.isnan(want[9])
    assert out[10] == float("inf")
    assert bool((out[finite] - want[finite]).abs().le(ULP[dtype] * want[finite].abs() + 1e-30).all())
    grad = torch.ones(1, gate.numel(), dtype=dtype)
    dh = torch.ops.moe.swiglu_backward(grad, h)[0].double()
    want_dh = swiglu_backward_torch(grad.double(), h.double())[0]
    ok = want_dh.isfinite()
    assert torch.isnan(dh[9]) and torch.isnan(dh[gate.numel() + 9])
    assert bool((dh[ok] - want_dh[ok]).abs().le(ULP[dtype] * want_dh[ok].abs() + 1e-30).all())


@needs_ext
def test_non_contiguous_input():
    """A column-strided h (every other column) and a transposed-then-viewed grad give the same
    values as their contiguous copies."""
    h, grad = inputs((33,), 40, torch.bfloat16, seed=3)
    wide = torch.zeros(33, 2 * h.shape[1], dtype=h.dtype)
    wide[:, ::2] = h
    hs = wide[:, ::2]
    gs = grad.t().contiguous().t()
    assert not hs.is_contiguous() and not gs.is_contiguous()
    assert torch.equal(torch.ops.moe.swiglu(hs), torch.ops.moe.swiglu(h))
    assert torch.equal(torch.ops.moe.swiglu_backward(gs, hs), torch.ops.moe.swiglu_backward(grad, h))


@needs_ext
def test_gradcheck_float64():
    h = torch.randn(7, 2, 10, dtype=torch.float64, requires_grad=True)
    assert gradcheck(ops.swiglu, (h,))
    # create_graph=True takes the differentiable twin: second derivatives are there too
    assert torch.autograd.gradgradcheck(ops.swiglu, (h,))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    h = torch.randn(9, 12, dtype=dtype, requires_grad=True)
    opcheck(torch.ops.moe.swiglu.default, (h,))
    opcheck(torch.ops.moe.swiglu_backward.default, (torch.randn(9, 6, dtype=dtype), h.detach()))
    opcheck(torch.ops.moe.swiglu.default, (torch.randn(0, 4, dtype=dtype, requires_grad=True),))


BAD = [
    ("odd", lambda: torch.ops.moe.swiglu(torch.randn(3, 5)), "last dim must be 2F"),
    ("zero_width", lambda: torch.ops.moe.swiglu(torch.randn(3, 0)), "last dim must be 2F"),
    ("scalar", lambda: torch.ops.moe.swiglu(torch.tensor(1.0)), "h must have at least one dim"),
    ("int", lambda: torch.ops.moe.swiglu(torch.ones(3, 4, dtype=torch.long)), "h must be float"),
    ("grad_shape", lambda: torch.ops.moe.swiglu_backward(torch.randn(3, 3), torch.randn(3, 4)),
     "grad must have shape"),
    ("grad_dtype", lambda: torch.ops.moe.swiglu_backward(torch.randn(3, 2, dtype=torch.float64),
                                                         torch.randn(3, 4)), "grad is"),
    ("grad_odd_h", lambda: torch.ops.moe.swiglu_backward(torch.randn(3, 2), torch.randn(3, 5)),
     "last dim must be 2F"),
]


@needs_ext
@pytest.mark.parametrize("case,call,msg", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case, call, msg):
    with pytest.raises(RuntimeError, match=msg):
        call()


@needs_ext
@SETTINGS
@given(N=st.integers(0, 70), F_=st.integers(1, 80), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 31 - 1), scale=st.sampled_from([0.1, 1.0, 8.0, 60.0]))
def test_property_matches_float64(N, F_, dtype, seed, scale):
    """Any shape (F not a multiple of 16: the masked tail), any scale: the forward within one
    rounding of float64 silu(gate) * up computed from the same inputs."""
    h, grad = inputs((N,), F_, dtype, seed=seed, scale=scale)
    want, _ = ref64(h, grad)
    assert close_to(torch.ops.moe.swiglu(h), want, dtype)


def _graph_names(y):
    """Names of the autograd nodes behind y."""
    seen, todo, names = set(), [y.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        todo.extend(n for n, _ in fn.next_functions)
    return names


@needs_ext
@pytest.mark.parametrize("module", ["dense", "grouped"])
def test_layers_use_the_kernel_and_match_the_composite(module, monkeypatch):
    """DenseFFN and GroupedExperts run "swiglu" through the op, and their outputs and gradients
    match autograd's composite silu(gate) * up within bf16 rounding."""
    torch.manual_seed(0)
    if module == "dense":
        m = DenseFFN(32, 48).to(torch.bfloat16)
        args = (torch.randn(5, 7, 32, dtype=torch.bfloat16),)
        w_in = m.w_in.weight
    else:
        m = GroupedExperts(4, 32, 48).to(torch.bfloat16)
        args = (ExpertRows(torch.randn(40, 32, dtype=torch.bfloat16), torch.tensor([10, 10, 25, 40], dtype=torch.int32)),)
        w_in = m.w_in_EDH

    def run():
        w_in.grad = None
        y = m(*args)
        y.float().square().sum().backward()
        return y.detach().float(), w_in.grad.float(), _graph_names(y)

    def composite(h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    y1, g1, names1 = run()
    monkeypatch.setattr(ops, "swiglu", composite)
    y2, g2, names2 = run()
    assert any("moe_swiglu" in n for n in names1) and not any("SiluBackward" in n for n in names1)
    assert any("SiluBackward" in n for n in names2) and not any("moe_swiglu" in n for n in names2)
    assert torch.allclose(y1, y2, rtol=2 ** -6, atol=1e-2 * y2.abs().max().item())
    assert torch.allclose(g1, g2, rtol=2 ** -5, atol=2e-2 * g2.abs().max().item())
