"""GPU tests of the weight-streaming grouped GEMM (csrc/cuda/stream_gemm.cuh): moe.grouped_mm and
moe.gather_grouped_mm at decode sizes, where each chosen expert has a few rows.

Shape legend: T tokens, K slots, E experts, N routed rows, X/Y GEMM input/output dims, D model dim.

Every test is marked ``gpu`` and skips cleanly without a CUDA device. moe.ops.config.cuda_gemm =
"stream" forces the kernel on every forward GEMM whose layout it takes; "auto" picks it at most
build_info()["cuda_stream_rows"] rows per expert on average. GEMMs follow FlashAttention's rule
(error against float64 at most 2x that of the same-dtype PyTorch computation); outputs are poisoned
first, so rows the kernel forgets to write show up. The cases cover one, two, three, four and more
rows per expert (passes of 1, 2 and 4 rows, several passes), empty experts, padding rows, partial
column tiles in both weight layouts, depths that end inside a step, E = 256 and gathered rows.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from moe import ops
from moe.ops import twins

from tests.helpers.gpu import (assert_eval_graph_replays, error_rule, kernel_names, offs_of, poison,
                               random_ids, without_sync)
from tests.helpers.props import SETTINGS, routings

pytestmark = pytest.mark.gpu
moe_ops = torch.ops.moe
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moe::gather_grouped_mm", "CUDA")
    torch.manual_seed(0)


def _kernels(fn) -> str:
    return " ".join(kernel_names(fn))


def _weights(E, X, Y, dtype, transposed, pad=0):
    """b (E, X, Y); `pad` extra elements on its contiguous dim (strides past the extent)."""
    if transposed:  # the nn.Linear layout: b[e, x, y] with x contiguous
        return torch.randn(E, Y, X + pad, device="cuda", dtype=dtype)[..., :X].transpose(1, 2)
    return torch.randn(E, X, Y + pad, device="cuda", dtype=dtype)[..., :Y]


CASES = [  # (counts per expert, padding rows, X, Y)
    ([1] * 8 + [0] * 8, 0, 64, 96),                 # T = 1, k = 8: one row per chosen expert
    ([0, 1, 2, 3, 4, 5, 8, 9, 13, 0], 3, 136, 200),  # every pass size, several passes, partial tiles
    ([3] * 256, 0, 32, 16),                          # E = 256
    ([2, 0, 7], 5, 1032, 40),                        # depth ends inside a step
    ([0, 0, 0], 4, 64, 64),                          # padding rows only
    # E = 300 > N: the grid is min(E, N) + 1 wide and each CTA finds its expert past the first
    # 128 (the ballot search's chunks), experts 255 and 299 included
    ([1 if e in (0, 131, 200, 255, 299) else 0 for e in range(300)], 2, 32, 40),
]


@pytest.mark.parametrize("counts,pad,X,Y", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_stream_grouped_mm(counts, pad, X, Y, dtype, transposed, strided):
    """strided: a's row stride and b's strides past their extents (16 bytes' worth more)."""
    E, rows = len(counts), sum(counts)
    N = rows + pad
    extra = 16 // torch.empty((), dtype=dtype).element_size() if strided else 0
    a = torch.randn(N, X + extra, device="cuda", dtype=dtype)[:, :X]
    a[rows:] = float("nan")  # rows past offs_E[-1] are never read
    b = _weights(E, X, Y, dtype, transposed, extra)
    offs = offs_of(counts)
    with ops.config.override(cuda_gemm="stream"):
        assert "stream_gemm_kernel" in _kernels(lambda: moe_ops.grouped_mm(a, b, offs))
        poison(((N, Y), dtype))
        c = moe_ops.grouped_mm(a, b, offs)
        assert torch.equal(c, moe_ops.grouped_mm(a, b, offs))  # deterministic
    assert torch.equal(c[rows:], torch.zeros_like(c[rows:]))
    error_rule(c[:rows], twins.grouped_mm_torch(a.double(), b.double(), offs)[:rows],
          twins.grouped_mm_torch(a, b, offs)[:rows])
    cpu = moe_ops.grouped_mm(a.cpu(), b.cpu(), offs.cpu())
    error_rule(c[:rows].cpu(), twins.grouped_mm_torch(a.double(), b.double(), offs)[:rows].cpu(), cpu[:rows])


def _gather_inputs(T, K, E, D, Y, dtype, transposed, *, crowd=0):
    ids = random_ids(T, K, E)
    if crowd:
        ids[:crowd, 0] = 1  # expert 1 gets `crowd` rows or more: several passes
    big = torch.randn(T, D + 8, device="cuda", dtype=dtype)
    big[(ids < 0).all(1)] = float("nan")  # tokens with no routed slot are never read
    x = big[:, :D]  # a row stride past D
    p = moe_ops.plan(ids, E)
    return x, p, _weights(E, D, Y, dtype, transposed)


@pytest.mark.parametrize("T,K,E,D,Y,crowd", [(1, 8, 128, 64, 96, 0), (6, 4, 16, 136, 200, 0),
                                             (13, 2, 8, 64, 40, 13), (64, 8, 128, 32, 48, 9)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_stream_gather_grouped_mm(T, K, E, D, Y, crowd, dtype, transposed):
    """x_TD's rows read through the plan (dropped slots -1: padding rows come out zero)."""
    x, (_, offs, order, rows_TK), b = _gather_inputs(T, K, E, D, Y, dtype, transposed, crowd=crowd)
    args = (order, rows_TK, b, offs)
    with ops.config.override(cuda_gemm="stream"):
        names = _kernels(lambda: moe_ops.gather_grouped_mm(x, *args))
        assert "stream_gemm_kernel" in names and "permute" not in names, names
        poison(((order.shape[0], Y), dtype))
        c = moe_ops.gather_grouped_mm(x, *args)
    used = int(offs[-1])
    assert torch.equal(c[used:], torch.zeros_like(c[used:]))
    ref = twins.gather_grouped_mm_torch(x.double(), order, rows_TK, b.double(), offs)
    error_rule(c, ref, twins.gather_grouped_mm_torch(x, *args))
    assert torch.isfinite(c.float()).all()
    with ops.config.override(cuda_gemm="native"):  # the two-op form on moekit's WMMA kernels
        error_rule(moe_ops.gather_grouped_mm(x, *args), ref, twins.gather_grouped_mm_torch(x, *args))


@pytest.mark.parametrize("T,K,E,D,F,crowd", [(1, 8, 128, 64, 64, 0), (6, 4, 16, 136, 96, 0),
                                             (13, 2, 8, 64, 32, 13), (64, 8, 128, 32, 48, 9), (5, 2, 4, 32, 20, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("keep_h", [False, True])
def test_stream_gather_swiglu(T, K, E, D, F, crowd, dtype, transposed, keep_h):
    """moe.gather_grouped_mm_swiglu at decode sizes: one launch (the streaming kernel with SwiGLU's
    epilogue) where F is a multiple of half the kernel's column block (F = 20 is not, F = 48 not
    for 16-bit row-major weights: the two-kernel path), with the same
    bits as gather_grouped_mm then swiglu on CUDA, h included (keep_h), padding rows zero, and
    within the GEMM rule of the twin."""
    x, (_, offs, order, rows_TK), b = _gather_inputs(T, K, E, D, 2 * F, dtype, transposed, crowd=crowd)
    args = (order, rows_TK, b, offs)
    vec = 16 // x.element_size()
    half = (16 if transposed else 4 * vec)
    with ops.config.override(cuda_gemm="stream"):
        names = kernel_names(lambda: moe_ops.gather_grouped_mm_swiglu(x, *args, keep_h))
        if F % half == 0:
            assert len(names) == 1 and "stream_gemm_kernel" in names[0], names
        else:  # the streamed h, then the swiglu kernel
            assert len(names) == 2 and "swiglu" in names[1], names
        poison(((order.shape[0], F), dtype), ((order.shape[0], 2 * F), dtype))
        a, h = moe_ops.gather_grouped_mm_swiglu(x, *args, keep_h)
        h_ref = moe_ops.gather_grouped_mm(x, *args)
        a_ref = moe_ops.swiglu(h_ref)
    assert torch.equal(a, a_ref)
    assert torch.equal(h, h_ref) if keep_h else h.shape == (0, 2 * F)
    used = int(offs[-1])
    assert torch.equal(a[used:], torch.zeros_like(a[used:]))
    ref = twins.gather_grouped_mm_swiglu_torch(x.double(), order, rows_TK, b.double(), offs)[0]
    error_rule(a, ref, twins.gather_grouped_mm_swiglu_torch(x, *args)[0])


def test_stream_gather_swiglu_gradients_equal_the_two_ops():
    """float64 at decode sizes: the fused op's gradients (keep_h) are those of gather_grouped_mm then
    swiglu on CUDA, bit for bit; gradcheck and opcheck."""
    x, p, b = _gather_inputs(5, 3, 6, 8, 32, torch.float64, True)  # F = 16: the fused launch
    _, offs, order, rows_TK = p
    x, b = x.detach().clone().requires_grad_(), b.detach().requires_grad_()
    with ops.config.override(cuda_gemm="stream"):
        fused = lambda x_, b_: ops.gather_grouped_mm_swiglu(x_, ops.Plan(*p), b_)  # noqa: E731
        with torch.no_grad():
            assert len(kernel_names(lambda: fused(x, b))) == 1
        g1 = torch.autograd.grad(fused(x, b).square().sum(), (x, b))
        two = moe_ops.swiglu(moe_ops.gather_grouped_mm(x, order, rows_TK, b, offs))
        g2 = torch.autograd.grad(two.square().sum(), (x, b))
        assert all(torch.equal(u, v) for u, v in zip(g1, g2))
        assert torch.autograd.gradcheck(fused, (x, b))
        torch.library.opcheck(moe_ops.gather_grouped_mm_swiglu.default, (x, order, rows_TK, b, offs, True))


def test_auto_streams_at_decode_sizes_only():
    """"auto" streams at <= cuda_stream_rows rows per expert on average, tiles above it; layouts
    the kernel does not take (row-major b with Y not a multiple of 8 bf16) go to the other
    kernels, also under "stream"."""
    limit = ops.build_info()["cuda_stream_rows"]
    E, X, Y = 16, 64, 48
    b = torch.randn(E, X, Y, device="cuda", dtype=torch.bfloat16)
    for N, streams in ((limit * E, True), (limit * E + 1, False)):
        a = torch.randn(N, X, device="cuda", dtype=torch.bfloat16)
        offs = offs_of([N // E] * (E - 1) + [N - (N // E) * (E - 1)])
        with ops.config.override(cuda_gemm="auto"):
            assert ("stream_gemm_kernel" in _kernels(lambda: moe_ops.grouped_mm(a, b, offs))) == streams, N
    a = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(E, 64, 60, device="cuda", dtype=torch.bfloat16)
    with ops.config.override(cuda_gemm="stream"):
        c = moe_ops.grouped_mm(a, b, offs_of([2] * E))
        assert "stream_gemm_kernel" not in _kernels(lambda: moe_ops.grouped_mm(a, b, offs_of([2] * E)))
    error_rule(c, twins.grouped_mm_torch(a.double(), b.double(), offs_of([2] * E)),
          twins.grouped_mm_torch(a, b, offs_of([2] * E)))


@pytest.mark.parametrize("transposed", [False, True])
def test_stream_gradients_gradcheck_and_opcheck(transposed):
    """float64: gather_grouped_mm and grouped_mm through autograd on the streaming kernel (the
    backward's d x GEMM streams too, with the weights transposed) pass gradcheck and equal the CPU
    kernels' gradients; opcheck on both ops."""
    x, (_, offs, order, rows_TK), b = _gather_inputs(5, 3, 6, 8, 10, torch.float64, transposed)
    x = x.detach().clone().requires_grad_()
    b = b.detach().requires_grad_()
    with ops.config.override(cuda_gemm="stream"):
        names = _kernels(lambda: moe_ops.gather_grouped_mm(x, order, rows_TK, b, offs).sum().backward())
        assert names.count("stream_gemm_kernel") >= 2, names  # the forward and the d x GEMM
        x.grad = b.grad = None
        assert torch.autograd.gradcheck(
            lambda x_, b_: moe_ops.gather_grouped_mm(x_, order, rows_TK, b_, offs), (x, b))
        y = moe_ops.gather_grouped_mm(x, order, rows_TK, b, offs)
        gx, gb = torch.autograd.grad(y.square().sum(), (x, b))
        torch.library.opcheck(moe_ops.gather_grouped_mm.default, (x, order, rows_TK, b, offs))
        a = torch.randn(12, 8, device="cuda", dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(moe_ops.grouped_mm.default, (a, b, offs_of([3, 0, 4, 1, 2, 1])))
    xc, bc = x.detach().cpu().requires_grad_(), b.detach().cpu().requires_grad_()
    yc = moe_ops.gather_grouped_mm(xc, order.cpu(), rows_TK.cpu(), bc, offs.cpu())
    gxc, gbc = torch.autograd.grad(yc.square().sum(), (xc, bc))
    for got, want in ((y, yc), (gx, gxc), (gb, gbc)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


def test_decode_layer_has_no_host_sync_and_replays_in_a_cuda_graph():
    """The drop-in layer at decode size (T = 4 tokens, 16 experts, top-4: 1 row per expert on
    average, so "auto" streams both projections): no host sync, a CUDA graph replays to the eager
    result after new tokens, and the eager result is close to the tiled kernels' ("native")."""
    import moe

    torch.manual_seed(0)
    layer = moe.MoELayer(64, 96, 16, 4).cuda().bfloat16().eval()
    x = torch.randn(1, 4, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert "stream_gemm_kernel" in _kernels(lambda: layer(x))
        y = without_sync(lambda: layer(x))
        with ops.config.override(cuda_gemm="native"):
            torch.testing.assert_close(y, layer(x), rtol=2e-2, atol=2e-2)
    assert_eval_graph_replays(layer, x.clone())


# ---- moe.grouped_mm_w8 (weight-only int8 experts) on CUDA: the same kernel, int8 weights ------

W8_CASES = [  # (counts per expert, padding rows, X, Y): X % 16 == 0 streams, else the fallback
    ([1] * 8 + [0] * 8, 0, 64, 96), ([0, 1, 2, 3, 4, 5, 9, 0], 3, 144, 70), ([3] * 256, 0, 32, 16),
    ([2, 0, 7], 5, 1040, 40), ([0, 0], 4, 64, 64), ([2, 5, 1], 1, 40, 24),
    ([3 if e in (7, 140, 299) else 0 for e in range(300)], 1, 32, 24)]


@pytest.mark.parametrize("counts,pad,X,Y", W8_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grouped_mm_w8_on_cuda(counts, pad, X, Y, dtype):
    """Against the CPU kernel and the twin (float32 sums, then the channel scale, one rounding):
    within the twin's own error against float64 (twice, + one output rounding); padding rows zero;
    rows past offs_E[-1] never read; the streaming kernel runs where X is a multiple of 16."""
    from moe.quant import quantize_weight

    E, rows = len(counts), sum(counts)
    N = rows + pad
    a = torch.randn(N, X, device="cuda", dtype=dtype)
    a[rows:] = float("nan")
    q, s = quantize_weight(torch.randn(E, Y, X) * 0.02)
    q, s, offs = q.cuda(), s.cuda(), offs_of(counts)
    names = kernel_names(lambda: moe_ops.grouped_mm_w8(a, q, s, offs))
    int8_kernel = any("stream_gemm_kernel" in n and "signed char" in n for n in names)  # W = int8_t
    assert int8_kernel == (X % 16 == 0), names  # else the float32 fallback (which may stream floats)
    poison(((N, Y), dtype))
    c = moe_ops.grouped_mm_w8(a, q, s, offs)
    assert c.dtype == dtype and torch.equal(c[rows:], torch.zeros_like(c[rows:]))
    w64 = (q.double() * s.double()[..., None]).transpose(1, 2)  # (E, X, Y): q * scale in float64
    ref = twins.grouped_mm_torch(a[:rows].double(), w64, offs)
    twin = twins.grouped_mm_w8_torch(a[:rows].cpu(), q.cpu(), s.cpu(), offs.cpu())
    error_rule(c[:rows], ref[:rows], twin.to(c.device))
    cpu = moe_ops.grouped_mm_w8(a.cpu(), q.cpu(), s.cpu(), offs.cpu())
    error_rule(c[:rows], ref[:rows], cpu[:rows].to(c.device))
    assert torch.equal(c, moe_ops.grouped_mm_w8(a, q, s, offs))  # deterministic
    torch.library.opcheck(moe_ops.grouped_mm_w8.default, (torch.nan_to_num(a), q, s, offs))


def test_int8_layer_decode_on_cuda_no_sync_and_cuda_graph():
    """moe.quantize_experts on the GPU layer at decode size: int8 experts on the streaming kernel,
    no host sync, a CUDA graph replays to the eager result, and the output is close to the bf16
    layer's (absmax int8: about 1% relative RMS)."""
    import moe

    torch.manual_seed(0)
    layer = moe.MoELayer(64, 96, 16, 4).cuda().bfloat16().eval()
    x = torch.randn(1, 4, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x).float()
        moe.quantize_experts(layer)
        assert "stream_gemm_kernel" in _kernels(lambda: layer(x))
        y = without_sync(lambda: layer(x))
        rel = ((y.float() - want).square().mean() / want.square().mean()).sqrt().item()
        assert rel < 0.05, rel
    assert_eval_graph_replays(layer, x.clone())


# ---- properties over random routings (hypothesis): the CUDA plan's paths and the streaming GEMM
# (gathered), against the CPU kernels and the twin ---------------------------------------------

# The autouse _cuda fixture only skips and seeds: running it once per test, not per example, is fine.
PROPS = settings(SETTINGS, suppress_health_check=[*SETTINGS.suppress_health_check,
                                                  HealthCheck.function_scoped_fixture])

@PROPS
@given(routing=routings(max_T=600), scale=st.sampled_from([1, 8]))
def test_plan_paths_equal_the_cpu_plan(routing, scale):
    """The one-block (<= 2048 slots) and counting-sort plans equal the CPU plan bit for bit;
    `scale` repeats the tokens to cross from one to the other (the radix-sort path, E > 1024 or
    more than 128 blocks: test_gpu.py's PLAN_CASES)."""
    ids, E = routing
    ids = ids.repeat(scale, 1)
    got = moe_ops.plan(ids.cuda(), E)
    for g, w in zip(got, moe_ops.plan(ids, E)):
        assert torch.equal(g.cpu(), w)


@PROPS
@given(routing=routings(max_T=48), D=st.sampled_from([8, 32, 72]), Y=st.sampled_from([8, 24, 40, 200]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), transposed=st.booleans())
def test_stream_matches_the_twin_on_random_routings(routing, D, Y, dtype, transposed):
    ids, E = routing
    x = torch.randn(ids.shape[0], D, device="cuda", dtype=dtype)
    _, offs, order, rows_TK = moe_ops.plan(ids.cuda(), E)
    b = _weights(E, D, Y, dtype, transposed)
    with ops.config.override(cuda_gemm="stream"):
        c = moe_ops.gather_grouped_mm(x, order, rows_TK, b, offs)
    ref = twins.gather_grouped_mm_torch(x.double(), order, rows_TK, b.double(), offs)
    error_rule(c, ref, twins.gather_grouped_mm_torch(x, order, rows_TK, b, offs))
