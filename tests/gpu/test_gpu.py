"""GPU tests of moekit's CUDA kernels (csrc/cuda/) against the CPU kernels and the PyTorch twins.

Shape legend: T tokens, K slots, E experts, N = T*K routed rows, D feature dim, F expert hidden
dim, X/Y GEMM input/output dims.

Every test is marked ``gpu`` and skips cleanly without a CUDA device (checked when a test runs,
never at import). Dispatch ops must equal the CPU kernels bit for bit; GEMMs follow
FlashAttention's rule: error against a float64 reference at most 2x that of the same-dtype PyTorch
computation. Outputs are poisoned first (freed caching-allocator blocks of the output's size are
filled with NaN/garbage), so rows a kernel forgets to write show up.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moe import ops
from moe.ops import twins

from tests.helpers.gpu import (assert_eval_graph_replays, error_rule, kernel_names, offs_of, poison, random_ids,
                               without_sync)

pytestmark = pytest.mark.gpu
moe_ops = torch.ops.moe


@pytest.fixture(autouse=True)
def _cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert ops.HAS_EXTENSION, "moe._C did not load: build it with MOE_BUILD_CUDA=1"
    for name in ("plan", "permute", "unpermute", "unpermute_weights_grad", "unpermute_backward", "grouped_mm",
                 "grouped_mm_wgrad", "grouped_mm_backward", "gather_grouped_mm", "gather_grouped_mm_wgrad",
                 "gather_grouped_mm_backward", "grouped_mm_unpermute", "grouped_mm_unpermute_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe::{name}", "CUDA"), name
    torch.manual_seed(0)


def _poisoned_plan(ids_TK, E):
    T, K = ids_TK.shape
    poison(((E,), torch.int32), ((E,), torch.int32), ((T * K,), torch.int64), ((T, K), torch.int64))
    return moe_ops.plan(ids_TK, E)


PLAN_CASES = [(0, 2, 4), (1, 1, 1), (37, 3, 5), (1000, 4, 8), (257, 8, 256), (4096, 8, 300),
              (2000, 2, 10000), (16384, 8, 256),
              # decode sizes, the one-block plan: 256 slots (one item per thread), 264 and 2048
              # (eight), E = 4096 (its largest); E = 4097 (the radix-sort path); the counting sort
              # from 2049 slots up to E = 1024, the radix sort above
              (1, 8, 128), (32, 8, 128), (33, 8, 128), (256, 8, 256), (64, 8, 4096), (64, 8, 4097),
              (600, 4, 1024), (1000, 4, 2000), (2049, 1, 1), (65536, 4, 8), (32769, 8, 64)]  # 128, 129 blocks


@pytest.mark.parametrize("T,K,E", PLAN_CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_plan_equals_cpu_kernel(T, K, E, dtype):
    ids = random_ids(T, K, E, dtype=dtype)
    if T > 4:
        ids[: T // 4] = min(3, E - 1)  # a heavy expert
    got = _poisoned_plan(ids, E)
    want = moe_ops.plan(ids.cpu(), E)
    for g, w, name in zip(got, want, ("counts_E", "offs_E", "order_N", "rows_TK")):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w), name
    assert all(torch.equal(g.cpu(), t.cpu()) for g, t in zip(got, twins.plan_torch(ids, E)))
    assert all(torch.equal(a, b) for a, b in zip(got, moe_ops.plan(ids, E)))  # deterministic


def test_plan_launches():
    """At most 2048 slots and 4096 experts: one launch (plan_block_kernel); up to 128 blocks of 2048
    slots with at most 1024 experts: two (the counting sort); otherwise the radix-sort path."""
    def kernels(T, K, E):
        ids = random_ids(T, K, E)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            moe_ops.plan(ids, E)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    small = kernels(64, 8, 128)
    assert len(small) == 1 and "plan_block_kernel" in small[0], small
    large = kernels(4096, 8, 256)
    assert len(large) == 2 and "plan_hist_kernel" in large[0] and "plan_place_kernel" in large[1], large
    assert any("plan_keys_kernel" in n for n in kernels(1000, 4, 2000))
    assert any("plan_keys_kernel" in n for n in kernels(32769, 8, 64))  # 129 blocks of 2048 slots


def test_plan_all_rows_on_one_expert_and_all_empty():
    for fill in (5, -1):
        ids = torch.full((333, 3), fill, device="cuda")
        got = _poisoned_plan(ids, 7)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, moe_ops.plan(ids.cpu(), 7)))


def test_plan_bad_id_trips_device_assert():
    """Out-of-range ids raise a device-side assert (no host sync); the context is then unusable,
    so this runs in a subprocess."""
    code = ("import torch, moe.ops; ids = torch.tensor([[0, 7]], device='cuda');"
            "torch.ops.moe.plan(ids, 4); torch.cuda.synchronize()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "assert" in (res.stderr + res.stdout).lower()


@pytest.mark.parametrize("backend,N,wgrad", [("auto", 256, False), ("auto", 256, True), ("auto", 8, False),
                                             ("native", 256, True), ("torch", 256, False)])
def test_grouped_mm_bad_offsets_trip_device_assert(backend, N, wgrad):
    """Decreasing offsets raise a device-side assert on every GEMM path (moekit's sm90 setup
    kernel, the weight-streaming kernel at N = 8, the WMMA kernels, the check before PyTorch's),
    never a silent result: in a subprocess, as the context is then unusable."""
    op = "grouped_mm_wgrad(a, a[:, :64], offs)" if wgrad else "grouped_mm(a, b, offs)"
    code = ("import torch, moe.ops; from moe import ops; ops.config.cuda_gemm = %r;"
            "a = torch.randn(%d, 64, device='cuda', dtype=torch.bfloat16);"
            "b = torch.randn(2, 64, 64, device='cuda', dtype=torch.bfloat16);"
            "offs = torch.tensor([4, 2], device='cuda', dtype=torch.int32);"
            "torch.ops.moe.%s; torch.cuda.synchronize()" % (backend, N, op))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "assert" in (res.stderr + res.stdout).lower(), res.stderr[-2000:]


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
DISPATCH_CASES = [(0, 2, 3, 16), (37, 3, 5, 13), (300, 8, 64, 1000), (512, 2, 8, 4096),
                  (50, 3, 6, 2100)]  # 2100: rows split in chunks, the last one partial


@pytest.mark.parametrize("T,K,E,D", DISPATCH_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wdtype", [None, torch.float32, "same"])
def test_permute_unpermute_equal_cpu_kernel(T, K, E, D, dtype, wdtype):
    ids = random_ids(T, K, E)
    p = moe_ops.plan(ids, E)
    p_cpu = [t.cpu() for t in p]
    x = torch.randn(T, D + 8, device="cuda", dtype=dtype)[:, :D]  # row-strided view
    w = None if wdtype is None else torch.rand(T, K, device="cuda", dtype=dtype if wdtype == "same" else wdtype)
    w_cpu = None if w is None else w.cpu()
    poison(((T * K, D), dtype))
    x_ND = moe_ops.permute(x, p[2], p[3], w)
    assert torch.equal(x_ND.cpu(), moe_ops.permute(x.cpu(), p_cpu[2], p_cpu[3], w_cpu))
    y = torch.randn(T * K, D, device="cuda", dtype=dtype)
    n = int(p[1][-1]) if E else 0
    y[n:] = float("nan")  # padding rows are never read
    poison(((T, D), dtype))
    out = moe_ops.unpermute(y, p[2], p[3], w)
    want = moe_ops.unpermute(y.cpu(), p_cpu[2], p_cpu[3], w_cpu)
    assert torch.equal(out.cpu(), want) and not out.isnan().any()
    g = torch.randn(T, D, device="cuda", dtype=dtype)
    poison(((T, K), ops._acc(dtype)))
    dw = moe_ops.unpermute_weights_grad(g, y, p[2], p[3])
    want_dw = moe_ops.unpermute_weights_grad(g.cpu(), y.cpu(), p_cpu[2], p_cpu[3])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(dw.cpu(), want_dw, rtol=tol, atol=tol * max(1, D ** 0.5))


@pytest.mark.parametrize("T,K,E,D", DISPATCH_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wdtype", [torch.float32, "same"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_unpermute_backward_equals_the_two_ops(T, K, E, D, dtype, wdtype, layout):
    """moe.unpermute_backward on CUDA: gradient rows equal permute(grad, weights) (CUDA and CPU) bit
    for bit, padding rows zero; the weights' gradient equals unpermute_weights_grad on CUDA bit for
    bit (one kernel serves both) and the CPU's within float rounding; each output alone too;
    outputs poisoned first."""
    ids = random_ids(T, K, E)
    p = moe_ops.plan(ids, E)
    p_cpu = [t.cpu() for t in p]
    g = torch.randn(T, D + 8, device="cuda", dtype=dtype)[:, :D] if layout == "strided" else \
        torch.randn(T, D, device="cuda", dtype=dtype)
    y = torch.randn(T * K, D, device="cuda", dtype=dtype)
    w = torch.rand(T, K, device="cuda", dtype=dtype if wdtype == "same" else wdtype)
    for grad_y, grad_w in ((True, True), (True, False), (False, True)):
        poison(((T * K, D), dtype), ((T, K), ops._acc(dtype)))
        gy, dw = moe_ops.unpermute_backward(g, y, p[2], p[3], w, grad_y, grad_w)
        assert gy.shape == (T * K if grad_y else 0, D) and dw.shape == (T if grad_w else 0, K)
        if grad_y:
            assert torch.equal(gy, moe_ops.permute(g, p[2], p[3], w))
            assert torch.equal(gy.cpu(), moe_ops.permute(g.cpu(), p_cpu[2], p_cpu[3], w.cpu()))
        if grad_w:
            assert torch.equal(dw, moe_ops.unpermute_weights_grad(g, y, p[2], p[3]))
            want = moe_ops.unpermute_weights_grad(g.cpu(), y.cpu(), p_cpu[2], p_cpu[3])
            tol = 1e-10 if dtype == torch.float64 else 1e-4
            torch.testing.assert_close(dw.cpu(), want, rtol=tol, atol=tol * max(1, D ** 0.5))


def test_weighted_unpermute_backward_is_one_kernel_without_sync():
    """ops.unpermute's weighted backward on CUDA: one moe::unpermute_backward kernel (no permute,
    no unpermute_weights_grad), no host sync; opcheck on CUDA."""
    ids = random_ids(300, 4, 16)
    p = ops.plan(ids, 16)
    y = torch.randn(1200, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(300, 4, device="cuda", requires_grad=True)
    g = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)

    def step():
        y.grad = w.grad = None
        ops.unpermute(y, p, w).backward(g)

    step()  # warm-up
    without_sync(step)
    names = kernel_names(lambda: ops.unpermute(y, p, w).backward(g))
    assert sum("unpermute_backward_kernel" in n for n in names) == 1, names
    assert not any("permute_kernel" in n and "unpermute" not in n for n in names), names
    for mask in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(moe_ops.unpermute_backward.default, (g, y.detach(), p.order_N, p.rows_TK, w.detach(), *mask))


@pytest.fixture(params=["auto", "native", "torch", "stream"])
def gemm_backend(request):
    """The CUDA GEMM backends (moe.ops.config.cuda_gemm): "auto" (the weight-streaming kernel at
    decode sizes; bf16 on sm90 runs moekit's own CUTLASS 3 kernels where built, else PyTorch's
    grouped GEMM), "native" (moekit's WMMA kernels, every dtype), "torch" (PyTorch's CUTLASS
    grouped GEMM for aligned bf16 on sm90/sm100) and "stream" (the weight-streaming kernel for
    every forward GEMM whose layout it takes)."""
    with ops.config.override(cuda_gemm=request.param):
        yield request.param


def _sm90_gemm() -> bool:
    """moekit's Hopper grouped GEMM is compiled in and this is a compute capability 9.0 GPU."""
    return ops.build_info()["sm90_gemm"] and torch.cuda.get_device_capability() == (9, 0)


GMM_CASES = [  # (N, X, Y, counts per expert): padding rows when sum(counts) < N
    (64, 32, 48, [10, 0, 30, 24]), (200, 100, 72, [0, 150, 0]), (133, 13, 7, [33, 0, 50, 20]),
    (512, 256, 384, [512]), (0, 16, 16, [0, 0]), (1000, 1024, 1792, [400, 0, 1, 127, 300, 0, 100, 60]),
    (600, 64, 40, [(7 * e) % 5 for e in range(256)]),  # E = 256, many empty experts
]


@pytest.mark.parametrize("N,X,Y,counts", GMM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_transposed", [False, True])
def test_grouped_mm_and_wgrad(N, X, Y, counts, dtype, b_transposed, gemm_backend):
    _check_grouped_mm_and_wgrad(N, X, Y, counts, dtype, b_transposed)


def _check_grouped_mm_and_wgrad(N, X, Y, counts, dtype, b_transposed):
    """grouped_mm and grouped_mm_wgrad on one case: the 2x-error rule against float64, zero
    padding rows and empty experts, rows past offs_E[-1] never read (NaN there), deterministic."""
    E, offs = len(counts), offs_of(counts)
    a = torch.randn(N, X, device="cuda", dtype=dtype)
    a[sum(counts):] = float("nan")  # rows past offs_E[-1] are never read
    b = (torch.randn(E, Y, X, device="cuda", dtype=dtype).transpose(1, 2) if b_transposed
         else torch.randn(E, X, Y, device="cuda", dtype=dtype))
    poison(((N, Y), dtype))
    c = moe_ops.grouped_mm(a, b, offs)
    ref = twins.grouped_mm_torch(a.double(), b.double(), offs)
    assert torch.equal(c[sum(counts):], torch.zeros_like(c[sum(counts):]))
    error_rule(c, ref, twins.grouped_mm_torch(a, b, offs))
    assert torch.equal(c, moe_ops.grouped_mm(a, b, offs))  # deterministic
    a = torch.nan_to_num(a)
    g = torch.randn(N, Y, device="cuda", dtype=dtype)
    poison(((E, X, Y), dtype))
    w = moe_ops.grouped_mm_wgrad(a, g, offs)
    error_rule(w, twins.grouped_mm_wgrad_torch(a.double(), g.double(), offs),
          twins.grouped_mm_wgrad_torch(a, g, offs))
    empty = torch.tensor(counts, device="cuda") == 0
    assert torch.equal(w[empty], torch.zeros_like(w[empty]))


@pytest.mark.parametrize("dtype,aligned", [(torch.bfloat16, True), (torch.bfloat16, False),
                                           (torch.float16, True)])
def test_grouped_mm_backend_choice(dtype, aligned, monkeypatch):
    """Which kernels run: cuda_gemm="native" always runs moekit's WMMA kernels; "auto" hands bf16
    with aligned dims to moekit's sm90 kernels where built (else PyTorch's grouped GEMM on
    sm90/sm100); "torch" to PyTorch's; a bad MOE_CUDA_GEMM is an error naming it."""
    X, Y = (64, 48) if aligned else (60, 48)
    a = torch.randn(100, X, device="cuda", dtype=dtype)
    b = torch.randn(3, X, Y, device="cuda", dtype=dtype)
    offs = offs_of([30, 0, 50])

    def kernels(backend):
        with ops.config.override(cuda_gemm=backend), \
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            moe_ops.grouped_mm(a, b, offs)
            moe_ops.grouped_mm_wgrad(a, a[:, :Y], offs)
            torch.cuda.synchronize()
        return " ".join(e.name for e in prof.events())

    assert "grouped_mm_kernel" in kernels("native") and "grouped_mm_wgrad_kernel" in kernels("native")
    cap = torch.cuda.get_device_capability()
    cutlass_ok = dtype == torch.bfloat16 and aligned
    torch_path = cutlass_ok and (cap == (9, 0) or cap[0] == 10)
    for backend in ("auto", "torch"):
        names = kernels(backend)
        assert ("grouped_mm_kernel" not in names) == torch_path, (backend, names)
        assert ("grouped_mm_wgrad_kernel" not in names) == torch_path, (backend, names)
        ours = backend == "auto" and cutlass_ok and _sm90_gemm()
        assert ("grouped_gemm_setup_kernel" in names) == ours, (backend, names)
    monkeypatch.setenv("MOE_CUDA_GEMM", "fast")  # the default, read at each use while unset
    with pytest.raises(RuntimeError, match="MOE_CUDA_GEMM"):
        moe_ops.grouped_mm(a, b, offs)


def test_sm90_gemm_is_built_where_expected():
    """bench/gpu_check.sh sets MOE_EXPECT_SM90=1: there the Hopper kernels must be compiled in, so
    the sm90 tests below cannot pass by skipping."""
    if os.environ.get("MOE_EXPECT_SM90") != "1":
        pytest.skip("MOE_EXPECT_SM90 is not set")
    assert ops.build_info()["sm90_gemm"], ops.build_info()
    assert torch.cuda.get_device_capability() == (9, 0)


SM90_CASES = [  # aligned bf16 problems (X, Y multiples of 8), counts per expert
    (64, 32, 48, [10, 0, 30, 24]), (512, 256, 384, [512]), (0, 16, 16, [0, 0]),
    (1000, 1024, 1792, [400, 0, 1, 127, 300, 0, 100, 60]),
    (600, 64, 40, [(7 * e) % 5 for e in range(256)]),        # E = 256, many empty experts
    (3000, 128, 136, [(e * 37) % 3 for e in range(1500)]),   # E = 1500: past PyTorch's 1024 groups
    (4096, 512, 256, [256] * 16),                           # full tiles, every config's sweet spot
]


@pytest.mark.parametrize("config", range(6))
@pytest.mark.parametrize("N,X,Y,counts", SM90_CASES)
@pytest.mark.parametrize("b_transposed", [False, True])
def test_sm90_grouped_mm_every_config(config, N, X, Y, counts, b_transposed, monkeypatch):
    """Each configuration of moekit's Hopper GEMM (moe.ops.config.sm90_forward_config, and
    sm90_wgrad_config cycled): the 2x-error rule against float64, zero padding rows and
    empty experts, never reading rows past offs_E[-1], deterministic."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    info = ops.build_info()
    if config >= len(info["sm90_forward_configs"]):
        pytest.skip(f"this build has {len(info['sm90_forward_configs'])} forward configs")
    with ops.config.override(cuda_gemm="auto", sm90_forward_config=config,
                             sm90_wgrad_config=config % len(info["sm90_wgrad_configs"])):
        _check_grouped_mm_and_wgrad(N, X, Y, counts, torch.bfloat16, b_transposed)


def test_sm90_config_env_is_checked(monkeypatch):
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2, 32, 48, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("MOE_SM90_GEMM_CONFIG", "99")
    with pytest.raises(RuntimeError, match="MOE_SM90_GEMM_CONFIG"):
        moe_ops.grouped_mm(a, b, offs_of([30, 34]))
    monkeypatch.setenv("MOE_SM90_WGRAD_CONFIG", "x")
    with pytest.raises(RuntimeError, match="MOE_SM90_WGRAD_CONFIG"):
        moe_ops.grouped_mm_wgrad(a, a, offs_of([30, 34]))
    with pytest.raises(ValueError, match="sm90_forward_config"):
        ops.config.sm90_forward_config = 99


BACKWARD_CASES = [  # (N, X, Y, counts): aligned bf16 (the CUTLASS paths), E = 256, unaligned, decode sizes
    (64, 32, 48, [10, 0, 30, 24]), (1000, 1024, 1792, [400, 0, 1, 127, 300, 0, 100, 60]),
    (600, 64, 40, [(7 * e) % 5 for e in range(256)]), (100, 60, 48, [30, 0, 50]), (48, 64, 128, [1, 0, 2, 1] * 8),
]
MASKS = [(True, True), (True, False), (False, True)]


def _weight(E, X, Y, yx):
    """b_EXY in bf16: (E, X, Y) contiguous, or (yx) the transposed view of an (E, Y, X) weight."""
    if yx:
        return torch.randn(E, Y, X, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return torch.randn(E, X, Y, device="cuda", dtype=torch.bfloat16)


def _weight_grad(grad, a, b, offs):
    """The weight gradient in b's layout, from grouped_mm_wgrad (the former autograd formula)."""
    if b.stride(1) == 1:
        return moe_ops.grouped_mm_wgrad(grad, a, offs).transpose(1, 2)
    return moe_ops.grouped_mm_wgrad(a, grad, offs)


@pytest.mark.parametrize("N,X,Y,counts", BACKWARD_CASES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_grouped_mm_backward_equals_the_two_ops(N, X, Y, counts, yx, gemm_backend):
    """moe.grouped_mm_backward (outputs poisoned) equals grouped_mm(grad, b^T) and the weight
    gradient in b's layout bit for bit, under every GEMM backend (on sm90 its two GEMMs share one
    setup launch: the same kernels and configurations); padding rows and experts with no rows are
    zero."""
    E, offs = len(counts), offs_of(counts)
    grad = torch.randn(N, Y, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(N, X, device="cuda", dtype=torch.bfloat16)
    b = _weight(E, X, Y, yx)
    want = (moe_ops.grouped_mm(grad, b.transpose(1, 2), offs), _weight_grad(grad, a, b, offs))
    for mask in MASKS:
        poison(((N, X), torch.bfloat16), ((E, X, Y), torch.bfloat16))
        got = moe_ops.grouped_mm_backward(grad, a, b, offs, *mask)
        for g, w, asked in zip(got, want, mask):
            assert g.shape[0] == 0 if not asked else (torch.equal(g, w) and g.stride() == w.stride())
        if mask[0]:
            assert not got[0][sum(counts):].any()
        if mask[1]:
            assert not got[1][torch.tensor(counts, device="cuda") == 0].any()


GATHER_BACKWARD_CASES = [(300, 4, 8, 64, 128), (64, 8, 256, 128, 64), (8, 2, 64, 64, 128), (100, 2, 3, 60, 48)]


@pytest.mark.parametrize("T,K,E,D,Y", GATHER_BACKWARD_CASES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_gather_grouped_mm_backward_equals_the_ops(T, K, E, D, Y, yx, gemm_backend):
    """moe.gather_grouped_mm_backward equals unpermute(grouped_mm(grad, b^T)) and
    gather_grouped_mm_wgrad bit for bit, and both outputs meet the 2x-error rule against the float64
    twin."""
    counts, offs, order, rows = moe_ops.plan(random_ids(T, K, E), E)
    grad = torch.randn(T * K, Y, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    b = _weight(E, D, Y, yx)
    want = (moe_ops.unpermute(moe_ops.grouped_mm(grad, b.transpose(1, 2), offs), order, rows, None),
            moe_ops.gather_grouped_mm_wgrad(x, order, rows, grad, offs, yx))
    ref = twins.gather_grouped_mm_backward_torch(grad.double(), x.double(), order, rows, b.double(), offs)
    same = twins.gather_grouped_mm_backward_torch(grad, x, order, rows, b, offs)
    for mask in MASKS:
        poison(((T, D), torch.bfloat16), ((E, D, Y), torch.bfloat16))
        got = moe_ops.gather_grouped_mm_backward(grad, x, order, rows, b, offs, *mask)
        for g, w, r, s_, asked in zip(got, want, ref, same, mask):
            if not asked:
                assert g.shape[0] == 0
                continue
            assert torch.equal(g, w) and g.stride() == w.stride()
            error_rule(g, r, s_)


UNPERMUTE_GEMM_CASES = [(300, 4, 8, 64, 128), (64, 8, 256, 128, 64), (8, 2, 64, 64, 128), (100, 2, 3, 60, 48),
                        (0, 2, 4, 64, 64)]


@pytest.mark.parametrize("T,K,E,X,Y", UNPERMUTE_GEMM_CASES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("swiglu", [False, True])
def test_grouped_mm_unpermute_equals_the_ops(T, K, E, X, Y, yx, dtype, swiglu, gemm_backend):
    """moe.grouped_mm_unpermute equals unpermute(grouped_mm(a, b), w) (with swiglu, of swiglu(h)) bit
    for bit; its backward's three outputs (no (N, Y) product: d w = <a_i, grad_t @ b_e^T>; with swiglu
    d h, the activation recomputed) meet the 2x-error rule against the float64 twin (the same-dtype
    twin as the base), with poisoned outputs, padding rows of d a zero; no host sync; opcheck."""
    counts, offs, order, rows = moe_ops.plan(random_ids(T, K, E), E)
    a = torch.randn(T * K, 2 * X if swiglu else X, device="cuda", dtype=dtype)
    b = _weight(E, X, Y, yx).to(dtype)
    w = torch.rand(T, K, device="cuda")
    g = torch.randn(T, Y, device="cuda", dtype=dtype)
    got = moe_ops.grouped_mm_unpermute(a, b, offs, order, rows, w, swiglu)
    a_rows = moe_ops.swiglu(a) if swiglu else a
    assert torch.equal(got, moe_ops.unpermute(moe_ops.grouped_mm(a_rows, b, offs), order, rows, w))
    ref = twins.grouped_mm_unpermute_backward_torch(g.double(), a.double(), b.double(), offs, order, rows, w.double(),
                                                    swiglu=swiglu)
    same = twins.grouped_mm_unpermute_backward_torch(g, a, b, offs, order, rows, w, swiglu=swiglu)
    for mask in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        poison((tuple(a.shape), dtype), ((E, X, Y), dtype), ((T, K), torch.float32))
        out = moe_ops.grouped_mm_unpermute_backward(g, a, b, offs, order, rows, w, *mask, swiglu)
        for o, r, s_, asked in zip(out, ref, same, mask):
            if not asked:
                assert o.shape[0] == 0
                continue
            error_rule(o, r, s_)
        if mask[0] and T:
            assert not out[0][int(offs[-1]):].any()
    a_, b_, w_ = (t.clone().requires_grad_() for t in (a, b, w))

    def step():
        a_.grad = b_.grad = w_.grad = None
        ops.grouped_mm_unpermute(a_, ops.Plan(counts, offs, order, rows), b_, w_, swiglu=swiglu).backward(g)

    step()
    without_sync(step)
    torch.library.opcheck(moe_ops.grouped_mm_unpermute.default, (a_, b_, offs, order, rows, w_, swiglu))
    torch.library.opcheck(moe_ops.grouped_mm_unpermute_backward.default,
                          (g, a, b, offs, order, rows, w, True, True, True, swiglu))


def test_sm90_backward_shares_one_setup_launch():
    """On the sm90 path a grouped GEMM's backward is one setup launch and its two CUTLASS GEMMs (the
    gathered one: the setup launch also gathers x's rows, and the unpermute sums d x), with no host
    sync."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    T, K, E, D, Y = 512, 4, 8, 256, 384
    counts, offs, order, rows = moe_ops.plan(random_ids(T, K, E, empty=0.0), E)
    grad = torch.randn(T * K, Y, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    with ops.config.override(cuda_gemm="auto", sm90_gathered="unfused"):
        for yx in (False, True):
            b = _weight(E, D, Y, yx)
            calls = {"plain": (lambda: moe_ops.grouped_mm_backward(grad, a, b, offs), 2, []),
                     "gathered": (lambda: moe_ops.gather_grouped_mm_backward(grad, x, order, rows, b, offs), 2,
                                  ["unpermute_kernel"]),
                     "gathered forward": (lambda: moe_ops.gather_grouped_mm(x, order, rows, b, offs), 1, []),
                     "gathered swiglu": (lambda: moe_ops.gather_grouped_mm_swiglu(x, order, rows, b, offs, True), 1,
                                         ["swiglu_kernel"]),
                     "gathered wgrad": (lambda: moe_ops.gather_grouped_mm_wgrad(x, order, rows, grad, offs, yx), 1, [])}
            for what, (call, gemms, extra) in calls.items():
                names = kernel_names(call)
                assert sum("grouped_gemm_setup_kernel" in n for n in names) == 1, (what, names)
                assert sum("cutlass" in n.lower() and "setup" not in n for n in names) == gemms, (what, names)
                assert len(names) == 1 + gemms + len(extra), (what, names)  # no permute kernel, copy or memset
                assert all(any(k in n for n in names) for k in extra), (what, names)
                without_sync(call)


GATHERED_CASES = [  # (T, K, E, D, F, x layout) for moekit's gathered sm90 GEMM (Y = 2F); all above
    # the decode sizes (N > 4 E), where "auto" would run the streaming kernel instead
    (300, 4, 8, 64, 64, "contiguous"), (160, 8, 256, 128, 128, "contiguous"),  # E = 256, empty experts
    (100, 2, 3, 200, 64, "strided"),  # D = 200: the last depth block is partial (zeros past D)
    (512, 8, 128, 2048, 768, "contiguous"),  # Qwen3-30B-A3B's D and F
    (5, 4, 4, 64, 64, "contiguous"), (700, 2, 1, 64, 192, "contiguous"),  # one expert, 3 column blocks
    # 256-wide tiles (F a multiple of 128 and at least a wide tile per SM: N / 128 * 2F / 256 >= 132 on
    # an H100 or H200; the Qwen3 case too): a partial depth block; 3 column blocks
    (4400, 4, 8, 200, 128, "strided"), (3000, 8, 16, 128, 384, "contiguous"),
]
# the weight gradient takes any D and Y = 2F that are multiples of 8: partial M and N blocks
GATHERED_WGRAD_CASES = GATHERED_CASES + [(100, 2, 3, 200, 36, "contiguous"), (300, 4, 8, 72, 100, "strided")]


def _gathered_inputs(T, K, E, D, F, kind, yx):
    counts, offs, order, rows = moe_ops.plan(random_ids(T, K, E), E)
    x = _x_layout(torch.randn(T, D, device="cuda", dtype=torch.bfloat16), kind)
    return counts, offs, order, rows, x, _weight(E, D, 2 * F, yx) / D ** 0.5


@pytest.mark.parametrize("T,K,E,D,F,kind", GATHERED_CASES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_sm90_gathered_gemm_swiglu(T, K, E, D, F, kind, yx):
    """moekit's gathered sm90 GEMM with SwiGLU's epilogue (sm90_gathered="fused"): one launch, no
    host sync; h meets the 2x-error rule against the float64 twin (for b (E, D, 2F) and the
    transposed nn.Linear layout), as the path it replaces does; act is moe.swiglu of that h bit for
    bit, with and without keep_h; padding rows (dropped slots) are zero; gradients through the saved
    h meet the rule too."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    counts, offs, order, rows, x, b = _gathered_inputs(T, K, E, D, F, kind, yx)
    N = T * K
    with ops.config.override(cuda_gemm="auto", sm90_gathered="fused"):
        call = lambda keep: moe_ops.gather_grouped_mm_swiglu(x, order, rows, b, offs, keep)  # noqa: E731
        names = kernel_names(lambda: call(True))
        assert len(names) == 1 and "gathered_gemm_kernel" in names[0], names
        without_sync(lambda: call(True))
        poison(((N, F), torch.bfloat16), ((N, 2 * F), torch.bfloat16))
        act, h = call(True)
        poison(((N, F), torch.bfloat16))
        act_only, no_h = call(False)
    assert h.shape == (N, 2 * F) and no_h.shape == (0, 2 * F)
    ref = twins.gather_grouped_mm_torch(x.double(), order, rows, b.double(), offs)
    same = twins.gather_grouped_mm_torch(x, order, rows, b, offs)
    error_rule(h, ref, same)
    assert torch.equal(act, moe_ops.swiglu(h)) and torch.equal(act_only, act)
    real = int(offs[-1])
    assert not h[real:].any() and not act[real:].any()
    with ops.config.override(cuda_gemm="auto", sm90_gathered="unfused"):
        error_rule(moe_ops.gather_grouped_mm_swiglu(x, order, rows, b, offs, True)[1], ref, same)  # what it replaces
    # gradients through the fused forward's saved h
    xg, bg = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    grad = torch.randn(N, F, device="cuda", dtype=torch.bfloat16)
    with ops.config.override(cuda_gemm="auto", sm90_gathered="fused"):
        ops.gather_grouped_mm_swiglu(xg, ops.Plan(counts, offs, order, rows), bg).backward(grad)
    x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
    twins.gather_grouped_mm_swiglu_torch(x64, order, rows, b64, offs)[0].backward(grad.double())
    xs, bs = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    twins.gather_grouped_mm_swiglu_torch(xs, order, rows, bs, offs)[0].backward(grad)
    error_rule(xg.grad, x64.grad, xs.grad)
    error_rule(bg.grad, b64.grad, bs.grad)


@pytest.mark.parametrize("T,K,E,D,F,kind", GATHERED_CASES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_sm90_gathered_gemm_plain(T, K, E, D, F, kind, yx):
    """The same kernel without the epilogue serves gather_grouped_mm (Y = 2F, a multiple of 128):
    one launch, no host sync, the 2x-error rule against the float64 twin, zero padding rows."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    counts, offs, order, rows, x, b = _gathered_inputs(T, K, E, D, F, kind, yx)
    with ops.config.override(cuda_gemm="auto", sm90_gathered="fused"):
        call = lambda: moe_ops.gather_grouped_mm(x, order, rows, b, offs)  # noqa: E731
        names = kernel_names(call)
        assert len(names) == 1 and "gathered_gemm_kernel" in names[0], names
        without_sync(call)
        poison(((T * K, 2 * F), torch.bfloat16))
        got = call()
    error_rule(got, twins.gather_grouped_mm_torch(x.double(), order, rows, b.double(), offs),
               twins.gather_grouped_mm_torch(x, order, rows, b, offs))
    assert not got[int(offs[-1]):].any()


@pytest.mark.parametrize("T,K,E,D,F,kind", GATHERED_WGRAD_CASES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_sm90_gathered_gemm_wgrad(T, K, E, D, F, kind, yx):
    """gather_grouped_mm_wgrad in one launch of the gathered engine (x_TD's rows read in place):
    the 2x-error rule against the float64 twin, in b's layout (yx: the transposed (E, Y, D) storage),
    zeros for the experts with no rows, no host sync; gather_grouped_mm_backward with it is four
    launches (d x's setup and GEMM, the gathered wgrad, unpermute) and its d b the same bits."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    counts, offs, order, rows, x, b = _gathered_inputs(T, K, E, D, F, kind, yx)
    Y = 2 * F
    g = torch.randn(T * K, Y, device="cuda", dtype=torch.bfloat16)
    with ops.config.override(cuda_gemm="auto", sm90_gathered="fused"):
        call = lambda: moe_ops.gather_grouped_mm_wgrad(x, order, rows, g, offs, yx)  # noqa: E731
        names = kernel_names(call)
        assert len(names) == 1 and "gathered_wgrad_kernel" in names[0], names
        without_sync(call)
        poison(((E, D, Y), torch.bfloat16))
        got = call()
        backward = lambda: moe_ops.gather_grouped_mm_backward(g, x, order, rows, b, offs)  # noqa: E731
        names = kernel_names(backward)
        assert len(names) == 4 and sum("gathered_wgrad_kernel" in n for n in names) == 1, names
        without_sync(backward)
        d_x, d_b = backward()
    assert got.shape == (E, D, Y) and (got.stride(1) == 1) == yx
    error_rule(got, twins.gather_grouped_mm_wgrad_torch(x.double(), order, rows, g.double(), offs, yx),
               twins.gather_grouped_mm_wgrad_torch(x, order, rows, g, offs, yx))
    assert not got[counts.cuda() == 0].any()
    assert torch.equal(d_b, got)
    with ops.config.override(cuda_gemm="auto", sm90_gathered="unfused"):
        assert torch.equal(d_x, moe_ops.gather_grouped_mm_backward(g, x, order, rows, b, offs, True, False)[0])


# (T, K, E, F, D): the down projection's depth F and output D (a multiple of 128)
COMBINE_CASES = [(300, 4, 8, 64, 128), (64, 8, 256, 128, 128),  # E = 256, many empty experts
                 (512, 8, 128, 768, 2048),  # Qwen3-30B-A3B's F and D
                 (4400, 4, 8, 200, 256),  # 256-wide tiles, a partial depth block
                 (5, 4, 4, 64, 384), (0, 2, 4, 64, 128)]  # T = 0: the two ops' path


@pytest.mark.parametrize("T,K,E,F,D", COMBINE_CASES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, None], ids=["w_f32", "w_bf16", "no_weights"])
def test_sm90_gathered_gemm_token_major_combine(T, K, E, F, D, yx, wdtype):
    """grouped_mm_unpermute with sm90_gathered="fused": the gathered kernel reads a's rows in place (a
    strided view too) and its epilogue multiplies each row by its routing weight (float32 or bfloat16,
    read as they are) and stores it token-major, then the combine is a contiguous sum over each
    token's k rows: two launches (with swiglu the swiglu kernel first), no host sync; outputs
    poisoned, the 2x-error rule against the float64 twin with the same-dtype composite as the base;
    tokens whose slots were all dropped are zero; opcheck."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    ids = random_ids(T, K, E)
    ids[:3] = -1  # tokens with every slot dropped
    counts, offs, order, rows = moe_ops.plan(ids, E)
    h = torch.randn(T * K, 2 * F, device="cuda", dtype=torch.bfloat16)
    b = _weight(E, F, D, yx) / F ** 0.5
    w = torch.rand(T, K, device="cuda").to(wdtype) if wdtype else None
    w64 = w.double() if wdtype else None
    for swiglu in (False, True):
        a = h if swiglu else h[:, :F]  # (rows 2F apart: read in place)
        with ops.config.override(cuda_gemm="auto", sm90_gathered="fused"):
            call = lambda: moe_ops.grouped_mm_unpermute(a, b, offs, order, rows, w, swiglu)  # noqa: E731
            if T:
                names = kernel_names(call)
                assert len(names) == 2 + swiglu and "gathered_gemm_kernel" in names[-2], names
                assert "unpermute_kernel" in names[-1], names
            without_sync(call)
            poison(((T * K, D), torch.bfloat16), ((T, D), torch.bfloat16))
            got = call()
            torch.library.opcheck(moe_ops.grouped_mm_unpermute.default, (a, b, offs, order, rows, w, swiglu))
        assert got.shape == (T, D)
        error_rule(got, twins.grouped_mm_unpermute_torch(a.double(), b.double(), offs, order, rows, w64, swiglu),
                   twins.grouped_mm_unpermute_torch(a, b, offs, order, rows, w, swiglu))
        assert not got[(rows < 0).all(1)].any()


def test_sm90_gathered_gemm_falls_back_and_passes_opcheck():
    """Where the kernels' rules fail (F not a multiple of 64, float32) the ops run the unfused path
    with the setting on; opcheck passes with it on (both gathered GEMMs and the weight gradient);
    "auto" is still the unfused path."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    T, K, E, D = 200, 4, 8, 64
    counts, offs, order, rows = moe_ops.plan(random_ids(T, K, E), E)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    fused = lambda names: any("gathered_gemm_kernel" in n for n in names)  # noqa: E731
    with ops.config.override(cuda_gemm="auto", sm90_gathered="fused"):
        for F, dtype in ((48, torch.bfloat16), (64, torch.float32)):
            xd, b = x.to(dtype), torch.randn(E, D, 2 * F, device="cuda", dtype=dtype)
            assert not fused(kernel_names(lambda: moe_ops.gather_grouped_mm_swiglu(xd, order, rows, b, offs, True)))
            assert not fused(kernel_names(lambda: moe_ops.gather_grouped_mm(xd, order, rows, b, offs)))
            act, h = moe_ops.gather_grouped_mm_swiglu(xd, order, rows, b, offs, True)
            if dtype == torch.float32:  # (the wgrad kernel takes any D and Y that are multiples of 8)
                g = torch.randn(T * K, 2 * F, device="cuda", dtype=dtype)
                assert not any("gathered_wgrad" in n for n in kernel_names(
                    lambda: moe_ops.gather_grouped_mm_wgrad(xd, order, rows, g, offs, False)))
            assert torch.equal(act, moe_ops.swiglu(h))
        b = torch.randn(E, D, 128, device="cuda", dtype=torch.bfloat16)
        for keep in (False, True):
            torch.library.opcheck(moe_ops.gather_grouped_mm_swiglu.default, (x, order, rows, b, offs, keep))
        torch.library.opcheck(moe_ops.gather_grouped_mm.default, (x, order, rows, b, offs))
        g = torch.randn(T * K, 128, device="cuda", dtype=torch.bfloat16)
        for yx in (False, True):
            torch.library.opcheck(moe_ops.gather_grouped_mm_wgrad.default, (x, order, rows, g, offs, yx))
    with ops.config.override(cuda_gemm="auto", sm90_gathered="auto"):
        assert not fused(kernel_names(lambda: moe_ops.gather_grouped_mm_swiglu(x, order, rows, b, offs, True)))
        assert not fused(kernel_names(lambda: moe_ops.gather_grouped_mm(x, order, rows, b, offs)))


def test_sm90_gathered_gemm_token_major_combine_falls_back():
    """grouped_mm_unpermute with sm90_gathered="fused" where the kernel's rules fail (Y not a multiple
    of 128, float32, rows not 16-byte vectors) runs the two ops: no gathered kernel, their bits."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    T, K, E, F = 200, 4, 8, 64
    counts, offs, order, rows = moe_ops.plan(random_ids(T, K, E), E)
    h = torch.randn(T * K, 2 * F + 8, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    cases = [(h[:, :F], 192, torch.bfloat16), (h[:, :F], 128, torch.float32), (h[:, 1:F + 1], 128, torch.bfloat16)]
    with ops.config.override(cuda_gemm="auto", sm90_gathered="fused"):
        for a, Y, dtype in cases:
            a = a.to(dtype) if dtype != a.dtype else a
            b = torch.randn(E, F, Y, device="cuda", dtype=dtype)
            call = lambda: moe_ops.grouped_mm_unpermute(a, b, offs, order, rows, w, False)  # noqa: E731
            assert not any("gathered_gemm_kernel" in n for n in kernel_names(call))
            assert torch.equal(call(), moe_ops.unpermute(moe_ops.grouped_mm(a, b, offs), order, rows, w))


@pytest.mark.parametrize("op", ["gather_grouped_mm_swiglu(x, order, rows, b, offs, False)",
                                "gather_grouped_mm_wgrad(x, order, rows, g, offs)",
                                "grouped_mm_unpermute(g, b, offs, order, rows, None, False)",
                                # a valid order_N that rows_TK does not match: the combine's device assert
                                "grouped_mm_unpermute(g, b, offs, torch.arange(256, device='cuda'), rows, None, False)"])
def test_sm90_gathered_gemm_bad_order_traps(op):
    """A bad order_N stops the gathered kernels with a trap (an assert's call would serialise their
    wgmma pipelines), and rows_TK that does not match order_N stops the token-major combine (it would
    read rows nobody wrote): an error at the next sync, never a silent result; in a subprocess, as the
    context is then unusable."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    code = ("import torch, moe.ops; from moe import ops; ops.config.sm90_gathered = 'fused';"
            "x = torch.randn(64, 64, device='cuda', dtype=torch.bfloat16);"
            "b = torch.randn(2, 64, 128, device='cuda', dtype=torch.bfloat16);"
            "g = torch.randn(256, 64, device='cuda', dtype=torch.bfloat16);"
            "order = torch.full((256,), 10 ** 6, device='cuda', dtype=torch.int64);"
            "rows = torch.zeros(64, 4, device='cuda', dtype=torch.int64);"
            "offs = torch.tensor([128, 256], device='cuda', dtype=torch.int32);"
            "torch.ops.moe.%s; torch.cuda.synchronize()" % op)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "error" in (res.stderr + res.stdout).lower(), res.stderr[-2000:]


GATHER_CASES = [  # (T, K, E, D, Y, x layout): the setup launch gathers 16-byte rows; else the permute kernel
    (300, 4, 8, 64, 128, "contiguous"), (64, 8, 256, 128, 64, "contiguous"), (100, 2, 3, 64, 48, "strided"),
    (100, 2, 3, 60, 48, "contiguous"), (50, 2, 4, 64, 32, "odd_stride"), (1, 4, 4, 64, 32, "contiguous"),
]


def _x_layout(x, kind):
    if kind == "contiguous":
        return x
    pad = 8 if kind == "strided" else 3  # row stride D + 8 (16-byte rows) or D + 3 (not)
    big = torch.full((x.shape[0], x.shape[1] + pad), float("nan"), dtype=x.dtype, device=x.device)
    big[:, :x.shape[1]] = x
    return big[:, :x.shape[1]]


@pytest.mark.parametrize("T,K,E,D,Y,kind", GATHER_CASES)
@pytest.mark.parametrize("yx", [False, True], ids=["exy", "yx"])
def test_gather_grouped_mm_and_wgrad_equal_permute_then_the_gemm(T, K, E, D, Y, kind, yx, gemm_backend):
    """gather_grouped_mm and gather_grouped_mm_wgrad (outputs poisoned) equal grouped_mm and
    grouped_mm_wgrad on permute(x) bit for bit, under every backend and x layout (on sm90 the
    GEMM's setup launch gathers the rows: a copy, the same bytes as the permute kernel's)."""
    counts, offs, order, rows = moe_ops.plan(random_ids(T, K, E), E)
    x = _x_layout(torch.randn(T, D, device="cuda", dtype=torch.bfloat16), kind)
    b, g = _weight(E, D, Y, yx), torch.randn(T * K, Y, device="cuda", dtype=torch.bfloat16)
    x_ND = moe_ops.permute(x, order, rows, None)
    poison(((T * K, Y), torch.bfloat16), ((T * K, D), torch.bfloat16))
    assert torch.equal(moe_ops.gather_grouped_mm(x, order, rows, b, offs), moe_ops.grouped_mm(x_ND, b, offs))
    want = moe_ops.grouped_mm_wgrad(g, x_ND, offs).transpose(1, 2) if yx else moe_ops.grouped_mm_wgrad(x_ND, g, offs)
    poison(((E, D, Y), torch.bfloat16))
    got = moe_ops.gather_grouped_mm_wgrad(x, order, rows, g, offs, yx)
    assert torch.equal(got, want) and got.stride() == want.stride()


def _layer(x_TD, ids_TK, w_TK, w1_EDF, w2_EFD, *, twin=False):
    """plan -> permute -> grouped_mm -> silu -> grouped_mm -> unpermute (weighted)."""
    E = w1_EDF.shape[0]
    if twin:
        _, offs, order, rows = twins.plan_torch(ids_TK, E)
        x_ND = twins.permute_torch(x_TD, order, rows)
        h = F.silu(twins.grouped_mm_torch(x_ND, w1_EDF, offs))
        return twins.unpermute_torch(twins.grouped_mm_torch(h, w2_EFD, offs), order, rows, w_TK)
    p = ops.plan(ids_TK, E)
    h = F.silu(ops.grouped_mm(ops.permute(x_TD, p), w1_EDF, p.offs_E))
    return ops.unpermute(ops.grouped_mm(h, w2_EFD, p.offs_E), p, w_TK)


def _layer_inputs(T=96, K=2, E=6, D=40, Fh=56, dtype=torch.float32, device="cuda"):
    ids = random_ids(T, K, E, device=device)
    ids[:, 0][ids[:, 0] == 2] = 1  # expert 2 gets fewer rows; some slots empty
    x = torch.randn(T, D, device=device, dtype=dtype)
    w = torch.rand(T, K, device=device, dtype=torch.float32)
    w1 = torch.randn(E, D, Fh, device=device, dtype=dtype) / D ** 0.5
    w2 = (torch.randn(E, D, Fh, device=device, dtype=dtype) / Fh ** 0.5).transpose(1, 2)  # nn.Linear layout
    return [ids] + [t.requires_grad_() for t in (x, w, w1, w2)]


def _grads(inputs, **kw):
    ids, *params = inputs
    out = _layer(params[0], ids, *params[1:], **kw)
    out.backward(torch.ones_like(out))
    return [out] + [p.grad for p in params]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_layer_gradients(dtype, gemm_backend):
    """CUDA autograd (forward and every gradient) vs float64 and vs the same-dtype twins."""
    inputs = _layer_inputs(dtype=dtype)
    ref = _grads([inputs[0]] + [t.detach().double().requires_grad_() for t in inputs[1:]])
    twin = _grads([inputs[0]] + [t.detach().clone().requires_grad_() for t in inputs[1:]], twin=True)
    for got, r, tw in zip(_grads(inputs), ref, twin):
        error_rule(got, r, tw)


def test_layer_cuda_equals_cpu_float64_and_gradcheck():
    inputs = _layer_inputs(T=24, D=8, Fh=12, dtype=torch.float64)
    cpu = [inputs[0].cpu()] + [t.detach().cpu().requires_grad_() for t in inputs[1:]]
    for got, want in zip(_grads(inputs), _grads(cpu)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
    ids, x, w, w1, w2 = _layer_inputs(T=8, D=5, Fh=6, dtype=torch.float64)
    w = w.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: _layer(a[0], ids, *a[1:]), (x, w, w1, w2))


def test_opcheck_on_cuda():
    ids = random_ids(20, 2, 4)
    p = moe_ops.plan(ids, 4)
    x = torch.randn(20, 24, device="cuda", requires_grad=True)
    w = torch.rand(20, 2, device="cuda", requires_grad=True)
    y = torch.randn(40, 24, device="cuda", requires_grad=True)
    b = torch.randn(4, 24, 16, device="cuda", requires_grad=True)
    cases = [(moe_ops.plan, (ids, 4)), (moe_ops.permute, (x, p[2], p[3], w)),
             (moe_ops.unpermute, (y, p[2], p[3], w)),
             (moe_ops.unpermute_weights_grad, (x, y, p[2], p[3])),
             (moe_ops.grouped_mm, (y, b, p[1])), (moe_ops.grouped_mm_wgrad, (y, y.detach()[:, :16], p[1]))]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


def test_opcheck_on_cuda_bf16_gemm_backends(gemm_backend):
    """opcheck on aligned bf16 GEMMs, the inputs that reach the CUTLASS paths (moekit's sm90
    kernels under "auto" on compute capability 9.0, PyTorch's under "torch"), both B layouts.
    (gradcheck runs in float64, which these bf16-only kernels never see: the float64 cases above.)"""
    y = torch.randn(40, 24, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offs = offs_of([10, 0, 25, 5])
    b = torch.randn(4, 24, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b_t = torch.randn(4, 16, 24, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    for args in ((y, b, offs), (y, b_t, offs)):
        torch.library.opcheck(moe_ops.grouped_mm.default, args)
        torch.library.opcheck(moe_ops.grouped_mm_backward.default, (y.detach()[:, :16], y.detach(), args[1].detach(), offs))
    torch.library.opcheck(moe_ops.grouped_mm_wgrad.default, (y, y.detach()[:, :16], offs))
    ids = random_ids(20, 2, 4)
    _, offs4, order, rows = moe_ops.plan(ids, 4)
    x = torch.randn(20, 24, device="cuda", dtype=torch.bfloat16)
    for w in (b, b_t):
        torch.library.opcheck(moe_ops.gather_grouped_mm_backward.default,
                              (y.detach()[:, :16], x, order, rows, w.detach(), offs4))


def test_layer_has_no_host_sync_and_replays_in_a_cuda_graph(gemm_backend):
    ids, x, w, w1, w2 = _layer_inputs(T=256, K=4, E=16, D=64, Fh=96, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _layer(x, ids, w, w1, w2)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    args = [t.detach() for t in (x, w, w1, w2)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _layer(args[0], ids, *args[1:])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _layer(args[0], ids, *args[1:])
    graph.replay()
    assert torch.equal(static_out, _layer(args[0], ids, *args[1:]))
    ids.copy_(random_ids(*ids.shape, 16))  # new routing: offsets are read on the device at replay
    args[0].copy_(torch.randn_like(args[0]))
    graph.replay()
    assert torch.equal(static_out, _layer(args[0], ids, *args[1:]))


@pytest.mark.parametrize("shared", [0, 1])
def test_moelayer_has_no_host_sync_and_replays_in_a_cuda_graph(shared, gemm_backend):
    """The drop-in layer itself (TopKRouter with aux losses, dropless dispatch, grouped experts,
    optional shared expert): forward and backward under sync_debug_mode="error", and the eval
    forward captured in a CUDA graph replays to the eager result, also after new inputs."""
    import moe

    torch.manual_seed(0)
    layer = moe.MoELayer(64, 96, 16, 4, num_shared_experts=shared).cuda().bfloat16()
    x = torch.randn(3, 50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        (y.float().square().mean() + moe.collect_aux_losses(layer)).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in layer.parameters())
    layer.eval()
    assert_eval_graph_replays(layer, x.detach().clone())


def test_sm90_gathered_gemm_in_the_layer():
    """MoELayer (Qwen3-like proportions) with sm90_gathered="fused": the training step takes the
    gathered kernels (no permute kernel, no setup launch's gather): the up projection forward and its
    weight gradient, grouped_mm_unpermute's forward (the token-major epilogue) and, in its backward,
    the data gradient (grad_TD's rows read in place) and the weight gradient; it has no host sync, and its output
    and gradients meet the 2x-error rule against the float64 layer as the unfused step's do; the eval
    forward replays in a CUDA graph."""
    if not _sm90_gemm():
        pytest.skip("needs moekit's sm90 grouped GEMM on a compute capability 9.0 GPU")
    import moe

    torch.manual_seed(0)
    ref64 = moe.MoELayer(256, 128, 16, 4).cuda().double()
    x = torch.randn(2, 400, 256, device="cuda", dtype=torch.float64)

    def step(layer, x):
        x = x.detach().clone().requires_grad_()
        y = layer(x)
        (y.float().square().mean() + moe.collect_aux_losses(layer)).backward()
        return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]

    want = step(ref64, x)
    got = {}
    for setting in ("fused", "unfused"):
        layer = moe.MoELayer(256, 128, 16, 4).cuda().bfloat16()
        layer.load_state_dict(ref64.state_dict())
        with ops.config.override(cuda_gemm="auto", sm90_gathered=setting):
            got[setting] = step(layer, x.bfloat16())
            if setting == "fused":
                names = kernel_names(lambda: step(layer, x.bfloat16()))
                assert sum("gathered_gemm_kernel" in n for n in names) == 3, names
                assert sum("gathered_wgrad_kernel" in n for n in names) == 2, names
                assert not any("permute_kernel" in n and "unpermute" not in n for n in names), names
                without_sync(lambda: step(layer, x.bfloat16()))
                layer.eval()
                assert_eval_graph_replays(layer, x.bfloat16())
    for fused, unfused, ref in zip(got["fused"], got["unfused"], want):
        error_rule(fused, ref, unfused)
