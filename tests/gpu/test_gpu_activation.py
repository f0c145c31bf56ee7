"""GPU tests of the CUDA kernels of moe.swiglu, moe.swiglu_backward, moe.linear_f32 and
moe.linear_f32_backward (csrc/cuda/activation.cu) against the PyTorch twins, the CPU kernels and
float64.

Shape legend: F expert hidden size (h = [gate; up] has 2F columns), T tokens, D model dim,
E experts.

Every test is marked ``gpu`` and skips cleanly without a CUDA device (checked when a test runs,
never at import). The swiglu kernels evaluate the twin's expression operation by operation (IEEE
division, expf/exp, no FMA contraction), so on CUDA they equal the twin bit for bit; the CPU
kernel forms silu as g * s with its own e^x, so CUDA and CPU agree to one rounding of the output
dtype. linear_f32 follows FlashAttention's rule: its error against float64 is at most 2x that of
the float32 GEMM on upcast copies (F.linear(x.float(), w.float()), what the routers ran before).
Outputs are poisoned first (freed caching-allocator blocks of the output's size are filled with
NaN), so elements a kernel forgets to write show up.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.library import opcheck

import routers
import moe
from moe import GroupedExperts, MoELayer, ops
from moe.ops.twins import linear_f32_backward_torch, linear_f32_torch, swiglu_backward_torch, swiglu_torch

from tests.helpers.gpu import poison, without_sync
from tests.helpers.swiglu import ULP, close_to, inputs

pytestmark = pytest.mark.gpu
moe_ops = torch.ops.moe
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _acc(dtype):
    """linear_f32's output dtype: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture(autouse=True)
def _cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert ops.HAS_EXTENSION, "moe._C did not load: build it with MOE_BUILD_CUDA=1"
    for name in ("swiglu", "swiglu_backward", "linear_f32", "linear_f32_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe::{name}", "CUDA"), name
    assert "CUDA" in ops.compiled_kernels("swiglu")
    torch.manual_seed(0)


def _same(got, want):
    """Bit for bit, NaN where the reference has NaN (and nowhere else)."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _bwd_close(dh, want, grad, h, dtype):
    """d h within one rounding of the output dtype, with an absolute floor of one rounding of its
    terms' size (d gate = grad * up * silu'(gate) cancels near gate = -1.28;
    tests/ops/test_swiglu.py)."""
    gate, up = h.double().chunk(2, dim=-1)
    g = grad.double().abs()
    size = torch.cat([g * up.abs() * (1 + gate.abs()), g * gate.abs()], -1)
    want = want.double()
    assert bool(((dh.double() - want).abs() <= ULP[dtype] * (want.abs() + size)).all())


# ---------------------------------------------------------------- swiglu

# (leading shape, F): 0 rows, F = 1 and 17 (no 16-byte vectors), 3-D input, vector paths, and one
# large enough that every thread of the grid-stride loop takes several steps.
SWIGLU_CASES = [((0,), 8), ((1,), 1), ((37,), 224), ((5, 3), 17), ((64,), 48), ((2, 3, 50), 40),
                ((3000,), 1408)]


@pytest.mark.parametrize("shape,F_", SWIGLU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_equals_twin_and_cpu_kernel(shape, F_, dtype):
    h_cpu, grad_cpu = inputs(shape, F_, dtype)
    h, grad = h_cpu.cuda(), grad_cpu.cuda()
    poison(((*shape, F_), dtype))
    out = moe_ops.swiglu(h)
    assert out.shape == (*shape, F_) and out.dtype == dtype and out.is_cuda
    _same(out, swiglu_torch(h))
    assert close_to(out.cpu(), moe_ops.swiglu(h_cpu), dtype)
    poison(((*shape, 2 * F_), dtype))
    dh = moe_ops.swiglu_backward(grad, h)
    assert dh.shape == h.shape and dh.dtype == dtype
    _same(dh, swiglu_backward_torch(grad, h))
    _bwd_close(dh.cpu(), moe_ops.swiglu_backward(grad_cpu, h_cpu), grad_cpu, h_cpu, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_layouts(dtype):
    """Strided rows (16-byte aligned: the vector path with a row stride), rows shifted by one
    element (the element path), a column-strided h and a column-major grad (copied first), and a
    3-D h whose rows are not one stride apart: all equal the contiguous result bit for bit."""
    h0, g0 = (t.cuda() for t in inputs((48,), 64, dtype, seed=5))
    want, want_dh = moe_ops.swiglu(h0), moe_ops.swiglu_backward(g0, h0)

    def within(lo, width):  # h0 in columns [lo, lo + 128) of a NaN-filled (48, width) buffer
        buf = torch.full((48, width), float("nan"), dtype=dtype, device="cuda")
        buf[:, lo:lo + 128] = h0
        return buf[:, lo:lo + 128]

    cols = torch.full((48, 256), float("nan"), dtype=dtype, device="cuda")
    cols[:, ::2] = h0
    gv = g0.t().contiguous().t()  # column-major
    for hv in (within(0, 152), within(1, 152), cols[:, ::2]):  # strided, shifted, column-strided
        assert not hv.is_contiguous() and not gv.is_contiguous()
        _same(moe_ops.swiglu(hv), want)
        _same(moe_ops.swiglu_backward(gv, hv), want_dh)
        _same(moe_ops.swiglu_backward(g0, hv), want_dh)
    h3 = h0.view(6, 8, 128).transpose(0, 1)  # (8, 6, 2F): reshape to rows copies
    g3 = g0.view(6, 8, 64).transpose(0, 1)
    _same(moe_ops.swiglu(h3), want.view(6, 8, 64).transpose(0, 1))
    _same(moe_ops.swiglu_backward(g3, h3), want_dh.view(6, 8, 128).transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_swiglu_special_values(dtype):
    """Saturation (silu -> gate or -0), NaN and +-inf propagate exactly as in the twin."""
    gate = torch.tensor([-1e4, -200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, 1e4, float("nan"),
                         float("inf"), -float("inf"), 3.0, -3.0, 1e-30, -1e-30, 0.5, -0.5])
    up = torch.linspace(-2, 2, gate.numel())
    h = torch.cat([gate, up])[None].to(dtype).cuda()
    grad = torch.ones(1, gate.numel(), dtype=dtype, device="cuda")
    _same(moe_ops.swiglu(h), swiglu_torch(h))
    _same(moe_ops.swiglu_backward(grad, h), swiglu_backward_torch(grad, h))


def test_swiglu_gradcheck_float64():
    h = torch.randn(7, 2, 10, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (h,))
    assert torch.autograd.gradgradcheck(ops.swiglu, (h,))  # create_graph: the twin


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_on_cuda(dtype):
    h = torch.randn(9, 12, dtype=dtype, device="cuda", requires_grad=True)
    opcheck(moe_ops.swiglu.default, (h,))
    opcheck(moe_ops.swiglu_backward.default, (torch.randn(9, 6, dtype=dtype, device="cuda"), h.detach()))
    opcheck(moe_ops.swiglu.default, (torch.randn(0, 4, dtype=dtype, device="cuda", requires_grad=True),))
    w = torch.randn(5, 40, dtype=dtype, device="cuda", requires_grad=True)
    for T in (33, 0):
        x = torch.randn(T, 40, dtype=dtype, device="cuda", requires_grad=True)
        opcheck(moe_ops.linear_f32.default, (x, w))


# ---------------------------------------------------------------- linear_f32


def _rule(got, ref64, base):
    """FlashAttention's rule: error vs float64 at most 2x the baseline's (+ one float32 eps of the
    largest value, as tests/gpu/test_gpu.py states it)."""
    if got.numel() == 0:
        return
    err = (got.double() - ref64).abs().max().item()
    err_base = (base.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    assert err <= 2 * err_base + torch.finfo(torch.float32).eps * scale + 1e-30, (err, err_base)


def _layout(t, kind):
    """t (rows, D) as a contiguous tensor, a row-strided view, a view shifted by one element (no
    16-byte alignment, odd row stride) or a column-major copy (copied by the kernel)."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "column_major":
        return t.t().contiguous().t()
    pad = torch.full((t.shape[0], t.shape[1] + 9), float("nan"), dtype=t.dtype, device=t.device)
    lo = 1 if kind == "shifted" else 0
    pad[:, lo:lo + t.shape[1]] = t
    return pad[:, lo:lo + t.shape[1]]


@pytest.mark.parametrize("T,D,E", [(4096, 1024, 128), (37, 33, 5), (1, 1, 1), (300, 64, 1), (513, 2048, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "shifted", "column_major"])
def test_linear_f32_within_the_half_gemm_error(T, D, E, dtype, layout):
    x = _layout(torch.randn(T, D, device="cuda").to(dtype), layout)
    w = _layout((torch.randn(E, D, device="cuda") * 0.05).to(dtype), layout)
    poison(((T, E), torch.float32))
    got = moe_ops.linear_f32(x, w)
    assert got.dtype == torch.float32 and got.shape == (T, E) and got.is_cuda
    assert not got.isnan().any()
    # The same-dtype PyTorch computation: the half-precision tensor-core GEMM with a float32
    # output (torch.mm's out_dtype), whose accumulation is what cuBLAS gives every bf16 GEMM. Measured
    # on an H200 (bench/RESULTS_H200.md), that is 3-14x the error of a float32 SIMT GEMM on upcast
    # copies, so the float32 GEMM is not the baseline on CUDA; and on the row-major operands the
    # kernel multiplies (cuBLAS picked a 14x more accurate algorithm for column-major ones).
    try:
        base = torch.mm(x.contiguous(), w.contiguous().t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # torch without mm(out_dtype=): upcast copies, tf32 allowed
        base = F.linear(x.float(), w.float())
    _rule(got, x.double() @ w.double().t(), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_f32_float32_is_the_twins_gemm(dtype):
    x, w = torch.randn(70, 48, dtype=dtype, device="cuda"), torch.randn(9, 48, dtype=dtype, device="cuda")
    got = moe_ops.linear_f32(x, w)
    assert got.dtype == dtype
    _same(got, linear_f32_torch(x, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,E", [(0, 16, 4), (5, 16, 0), (5, 0, 3)])
def test_linear_f32_empty(T, D, E, dtype):
    """No tokens or no experts: an empty output; D = 0: the empty sums, zeros."""
    x, w = torch.randn(T, D, dtype=dtype, device="cuda"), torch.randn(E, D, dtype=dtype, device="cuda")
    poison(((T, E), _acc(dtype)))
    got = moe_ops.linear_f32(x, w)
    assert got.shape == (T, E) and got.dtype == _acc(dtype)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_f32_gradients_are_those_of_the_float32_linear(dtype):
    """The gradients of F.linear(x.float(), w.float()) cast back (equal up to the order of the
    float32 sums: the weight gradient is the transposed GEMM of autograd's)."""
    x0, w0 = torch.randn(50, 40, dtype=dtype, device="cuda"), torch.randn(7, 40, dtype=dtype, device="cuda")
    g = torch.randn(50, 7, dtype=_acc(dtype), device="cuda")
    res = []
    for fn in (moe_ops.linear_f32, linear_f32_torch):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        fn(x, w).backward(g)
        res.append((x.grad, w.grad))
    for got, want in zip(*res):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want)


def test_linear_f32_gradcheck_float64():
    x = torch.randn(6, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(moe_ops.linear_f32, (x, w))


# ---------------------------------------------------------------- linear_f32_backward


def _grad_layout(g, kind):
    """grad_TE contiguous, column-major, or the broadcast ones of sum().backward()."""
    if kind == "column_major":
        return g.t().contiguous().t()
    if kind == "broadcast":
        return torch.ones((), dtype=g.dtype, device=g.device).expand(g.shape)
    return g


@pytest.mark.parametrize("T,D,E", [(4096, 1024, 128), (37, 33, 5), (1, 1, 1), (300, 64, 1), (513, 2048, 64)])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "shifted", "column_major"])
@pytest.mark.parametrize("grad", ["contiguous", "column_major", "broadcast"])
def test_linear_f32_backward_bf16_within_the_float32_error(T, D, E, layout, grad):
    """bfloat16: the three-term split of the float32 gradient on tensor cores (activation.cu)
    is within the error rule of the float32 GEMMs on upcast copies cast back (the twin, what
    autograd ran before) against float64, for both outputs; outputs poisoned first, all written."""
    x = _layout(torch.randn(T, D, device="cuda").to(torch.bfloat16), layout)
    w = _layout((torch.randn(E, D, device="cuda") * 0.05).to(torch.bfloat16), layout)
    g = _grad_layout(torch.randn(T, E, device="cuda") * 1e-3, grad)
    poison(((T, D), torch.bfloat16), ((E, D), torch.bfloat16))
    g_x, g_w = moe_ops.linear_f32_backward(g, x, w)
    assert g_x.shape == (T, D) and g_w.shape == (E, D) and g_x.dtype == g_w.dtype == torch.bfloat16
    assert not g_x.isnan().any() and not g_w.isnan().any()
    base_x, base_w = linear_f32_backward_torch(g.contiguous(), x, w)
    _rule(g_x, g.double() @ w.double(), base_x)
    _rule(g_w, g.double().t() @ x.double(), base_w)


@pytest.mark.parametrize("grad_x,grad_weight", [(True, False), (False, True), (False, False)])
def test_linear_f32_backward_bf16_one_output(grad_x, grad_weight):
    """An output not asked for is an empty (0, D); the other equals the two-output call's."""
    x = torch.randn(70, 96, device="cuda").to(torch.bfloat16)
    w = torch.randn(12, 96, device="cuda").to(torch.bfloat16)
    g = torch.randn(70, 12, device="cuda")
    both = moe_ops.linear_f32_backward(g, x, w)
    got = moe_ops.linear_f32_backward(g, x, w, grad_x, grad_weight)
    for a, b, asked in zip(got, both, (grad_x, grad_weight)):
        assert a.shape == (b.shape if asked else (0, 96))
        if asked:
            _same(a, b)


def test_linear_f32_backward_bf16_splits_exactly():
    """The split loses nothing: gradients just off a bfloat16 rounding tie ((1 + 2^-8) 2^k, the
    offset 2^(k-20) only in the third term h3), through an all-ones weight (d x = g) and a one-hot
    x (d w = g^T), come out as g rounded once to bfloat16: without h3 they would round to even."""
    n = 64
    k = torch.arange(n, device="cuda", dtype=torch.float64) % 41 - 20
    sign = torch.where(torch.arange(n, device="cuda") % 2 == 0, 1.0, -1.0).double()
    flip = torch.where(torch.arange(n, device="cuda") % 4 < 2, 1.0, -1.0).double()
    g = (flip * ((1 + 2.0 ** -8) * 2.0 ** k + sign * 2.0 ** (k - 20))).float().unsqueeze(1)  # (T, E=1)
    assert torch.equal(g.double().squeeze(1), flip * ((1 + 2.0 ** -8) * 2.0 ** k + sign * 2.0 ** (k - 20)))
    want = g.to(torch.bfloat16)
    assert not torch.equal(want, (g.double() - flip.unsqueeze(1) * sign.unsqueeze(1) * 2.0 ** (k.unsqueeze(1) - 20))
                           .to(torch.bfloat16))  # the offset decides the rounding
    w = torch.ones(1, n, dtype=torch.bfloat16, device="cuda")
    x = torch.eye(n, dtype=torch.bfloat16, device="cuda")
    g_x, g_w = moe_ops.linear_f32_backward(g, x, w)
    _same(g_x, want.expand(n, n))
    _same(g_w, want.t())


def test_linear_f32_backward_bf16_non_finite_gradients_propagate():
    """An infinite or NaN gradient element stands alone in the split: d x and d w are inf / NaN
    exactly where the float32 GEMMs' are."""
    x = torch.randn(40, 64, device="cuda").to(torch.bfloat16)
    w = torch.randn(6, 64, device="cuda").to(torch.bfloat16)
    w[2, :5] = 0  # inf * 0: NaN, as in float32
    g = torch.randn(40, 6, device="cuda")
    g[3, 2], g[7, 4], g[9, 1] = float("inf"), float("nan"), -float("inf")
    got, want = moe_ops.linear_f32_backward(g, x, w), linear_f32_backward_torch(g, x, w)
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_linear_f32_backward_other_dtypes_are_the_twin(dtype):
    x, w = torch.randn(70, 48, dtype=dtype, device="cuda"), torch.randn(9, 48, dtype=dtype, device="cuda")
    g = torch.randn(70, 9, dtype=_acc(dtype), device="cuda")
    for a, b in zip(moe_ops.linear_f32_backward(g, x, w), linear_f32_backward_torch(g, x, w)):
        _same(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,E", [(0, 16, 4), (5, 16, 0), (5, 0, 3)])
def test_linear_f32_backward_empty(T, D, E, dtype):
    x, w = torch.randn(T, D, dtype=dtype, device="cuda"), torch.randn(E, D, dtype=dtype, device="cuda")
    poison(((T, D), dtype), ((E, D), dtype))
    g_x, g_w = moe_ops.linear_f32_backward(torch.randn(T, E, dtype=_acc(dtype), device="cuda"), x, w)
    assert g_x.shape == (T, D) and g_w.shape == (E, D)
    assert not g_x.any() and not g_w.any()


def test_linear_f32_backward_bf16_kernels_without_sync():
    """linear_f32's bfloat16 backward: one moe::linear_f32_backward, no aten mm or cast, its split
    and sum kernels, and no host sync; an opcheck on CUDA."""
    x = torch.randn(300, 256, device="cuda").to(torch.bfloat16).requires_grad_()
    w = torch.randn(32, 256, device="cuda").to(torch.bfloat16).requires_grad_()
    g = torch.randn(300, 32, device="cuda")

    def step():
        x.grad = w.grad = None
        moe_ops.linear_f32(x, w).backward(g)

    step()  # warm-up: cuBLAS handles and workspaces
    without_sync(step)
    host, kernels = _profile(step)
    assert "moe::linear_f32_backward" in host and not {"aten::mm", "aten::_to_copy"} & host, sorted(host)
    assert any("split3_kernel" in k for k in kernels) and any("sum3_kernel" in k for k in kernels), sorted(kernels)
    opcheck(moe_ops.linear_f32_backward.default, (g, x.detach(), w.detach()))
    opcheck(moe_ops.linear_f32_backward.default, (g, x.detach(), w.detach(), False, True))


# ---------------------------------------------------------------- the layers and the router


def _profile(fn):
    """(names of the dispatcher ops recorded on the host, names of the CUDA kernels) run by fn."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    return ({e.name for e in events if e.device_type == DeviceType.CPU},
            {e.name for e in events if e.device_type == DeviceType.CUDA})


def _module(kind):
    if kind == "grouped":
        m = GroupedExperts(4, 32, 48).cuda().bfloat16()
        args = (moe.ExpertRows(torch.randn(40, 32, dtype=torch.bfloat16, device="cuda"),
                               torch.tensor([10, 10, 25, 40], dtype=torch.int32, device="cuda")),)
        return m, args
    m = MoELayer(64, 96, 16, 4, num_shared_experts=1).cuda().bfloat16()
    return m, (torch.randn(3, 50, 64, dtype=torch.bfloat16, device="cuda"),)


@pytest.mark.parametrize("kind", ["grouped", "moelayer"])
def test_layers_run_the_cuda_kernels_without_host_sync(kind, monkeypatch):
    """GroupedExperts and MoELayer in bfloat16 on CUDA run swiglu's CUDA kernels both ways (and the
    router's linear_f32), no aten silu kernel, and no host sync (sync_debug_mode "error"); outputs
    and gradients match autograd's composite silu(gate) * up within bfloat16 rounding."""
    m, args = _module(kind)

    def step():
        for p in m.parameters():
            p.grad = None
        y = m(*args)
        loss = y.float().square().mean()
        if kind == "moelayer":
            loss = loss + moe.collect_aux_losses(m)
        loss.backward()
        return y.detach().float(), [p.grad.float() for p in m.parameters()]

    step()  # warm-up: cuBLAS handles and workspaces
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y1, g1 = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    host, kernels = _profile(step)
    assert {"moe::swiglu", "moe::swiglu_backward"} <= host, sorted(host)
    assert any("swiglu_kernel" in k for k in kernels) and any("swiglu_backward_kernel" in k for k in kernels)
    assert not any("silu" in k for k in kernels), sorted(kernels)
    if kind == "moelayer":
        assert "moe::linear_f32" in host
    def composite(h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    monkeypatch.setattr(ops, "swiglu", composite)
    host2, kernels2 = _profile(step)
    assert "moe::swiglu" not in host2 and any("silu" in k for k in kernels2)
    y2, g2 = step()
    assert torch.allclose(y1, y2, rtol=2 ** -6, atol=1e-2 * y2.abs().max().item())
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=2 ** -5, atol=2e-2 * b.abs().max().item())


def test_bf16_router_uses_linear_f32_on_cuda(monkeypatch):
    """A bfloat16 TopKRouter on CUDA computes its logits with moe.linear_f32 and gets the float32
    GEMM's logits within the rounding of two float32 sums of the same exact products: each is
    within D roundings of at most 2u (u = 2^-24, 2u for truncating tensor-core adds) of the exact
    sum, so |difference| <= 4 D u (|x| @ |w|^T); and the same routing."""
    import routers.routing as rr

    D = 64
    r = routers.TopKRouter(D, 16, 4).cuda().bfloat16()
    x = torch.randn(200, D, dtype=torch.bfloat16, device="cuda")
    assert rr._linear_f32_op() is not None
    fast = r(x)
    assert fast.logits_TE.dtype == torch.float32 and "linear_f32" in fast.logits_TE.grad_fn.name()
    monkeypatch.setattr(rr, "_linear_f32_op", lambda: None)
    slow = r(x)
    assert "linear_f32" not in slow.logits_TE.grad_fn.name()
    bound = 4 * D * 2.0 ** -24 * (x.float().abs() @ r.weight.float().abs().t())
    assert bool(((fast.logits_TE - slow.logits_TE).abs() <= bound).all())
    assert torch.equal(fast.ids_TK, slow.ids_TK)
    torch.testing.assert_close(fast.weights_TK, slow.weights_TK)
