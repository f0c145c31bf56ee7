"""Tests for moe.ops: plan / permute / unpermute / grouped_mm against their PyTorch twins.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim,
X/Y GEMM input/output dims. Dispatch ops must equal the twins bit for bit; GEMMs follow
FlashAttention's rule (error vs a float64 reference at most 2x the same-dtype PyTorch error).
Property tests over random shapes live in test_ops_props.py; bad input and the fallback path in
test_ops_errors.py.
"""

import pytest
import torch
from torch.autograd import gradcheck
from torch.library import opcheck

from moe import ops
from moe.ops.twins import (grouped_mm_torch, grouped_mm_wgrad_torch, permute_torch, plan_torch,
                           unpermute_torch, unpermute_weights_grad_torch)
from tests.helpers.ops import (ROUTINGS, check_plan_invariants, make_ids, plan_fields, rand, strided_cols,
                               strided_rows)

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# ---------------------------------------------------------------- plan


@pytest.mark.parametrize("T,K,E,kind", ROUTINGS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_plan_equals_twin_and_keeps_invariants(T, K, E, kind, index_dtype):
    ids = make_ids(T, K, E, kind).to(index_dtype)
    p = ops.plan(ids, E)
    for got, want in zip(plan_fields(p), plan_torch(ids, E)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    check_plan_invariants(p, ids, E)


def test_plan_on_non_contiguous_ids():
    ids = make_ids(40, 6, 7)
    view = ids.t().contiguous().t()  # same values, column-major strides
    assert not view.is_contiguous()
    for got, want in zip(plan_fields(ops.plan(view, 7)), plan_torch(ids, 7)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------- permute / unpermute


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("scale", [None, "float32", "same"])
@pytest.mark.parametrize("layout", [lambda x: x, strided_rows, strided_cols])
def test_permute_equals_twin(dtype, scale, layout):
    T, K, E, D = 29, 3, 6, 13
    p = ops.plan(make_ids(T, K, E), E)
    x = layout(rand(T, D, dtype=dtype))
    s = None if scale is None else rand(T, K, dtype=dtype if scale == "same" else torch.float32, seed=1)
    got = ops.permute(x, p, s)
    want = permute_torch(x, p.order_N, p.rows_TK, s)
    assert got.dtype == dtype and got.shape == (T * K, D)
    assert torch.equal(got, want)
    assert (got[int(p.offs_E[-1]):] == 0).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("weights", [None, "float32", "same"])
@pytest.mark.parametrize("layout", [lambda x: x, strided_rows, strided_cols])
def test_unpermute_equals_twin(dtype, weights, layout):
    T, K, E, D = 29, 4, 6, 13
    p = ops.plan(make_ids(T, K, E), E)
    y = rand(T * K, D, dtype=dtype)
    y[int(p.offs_E[-1]):] = float("nan")  # padding rows are never read
    y = layout(y)
    w = None if weights is None else rand(T, K, dtype=dtype if weights == "same" else torch.float32, seed=1)
    got = ops.unpermute(y, p, w)
    want = unpermute_torch(y, p.order_N, p.rows_TK, w)
    assert got.dtype == dtype and got.shape == (T, D)
    assert torch.equal(got, want)
    assert not got.isnan().any()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_permute_then_unpermute_sums_each_token_over_its_slots(dtype):
    T, K, E, D = 31, 4, 5, 9
    ids = make_ids(T, K, E)
    p = ops.plan(ids, E)
    x = rand(T, D, dtype=torch.float64)
    back = ops.unpermute(ops.permute(x.to(dtype), p), p).double()
    want = x.to(dtype).double() * (ids >= 0).sum(1, keepdim=True)
    torch.testing.assert_close(back, want, rtol=4 * torch.finfo(dtype).eps, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_unpermute_weights_grad_matches_reference(dtype):
    T, K, E, D = 23, 3, 4, 37
    p = ops.plan(make_ids(T, K, E), E)
    g, y = rand(T, D, dtype=dtype), rand(T * K, D, dtype=dtype, seed=1)
    ref = unpermute_weights_grad_torch(g.double(), y.double(), p.order_N, p.rows_TK)
    got = torch.ops.moe.unpermute_weights_grad(g, y, p.order_N, p.rows_TK)
    twin = unpermute_weights_grad_torch(g, y, p.order_N, p.rows_TK)
    assert got.dtype == twin.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (got[p.rows_TK < 0] == 0).all()
    assert (got.double() - ref).abs().max() <= 2 * (twin.double() - ref).abs().max() + 1e-12


# ---------------------------------------------------------------- grouped_mm


def gmm_case(dtype, *, transposed, E=7, X=45, Y=19, seed=0):
    """a_NX (padding rows NaN, strided), b_EXY (optionally a transposed view), offs_E with
    an empty expert, one large expert and padding rows past offs_E[-1]."""
    counts = torch.tensor([5, 0, 70, 1, 0, 9, 3][:E], dtype=torch.int32)
    offs = counts.cumsum(0).int()
    N = int(offs[-1]) + 6
    a = rand(N, X, dtype=torch.float64, seed=seed)
    b = rand(E, Y, X, dtype=torch.float64, seed=seed + 1).transpose(-2, -1) if transposed \
        else rand(E, X, Y, dtype=torch.float64, seed=seed + 1)
    a_lo = strided_rows(a.to(dtype))
    a_lo[int(offs[-1]):] = float("nan")  # rows past offs_E[-1] are never read
    return a_lo, b.to(dtype), offs


@pytest.mark.parametrize("dtype", MM_DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_mm_error_at_most_twice_torch(dtype, transposed):
    a, b, offs = gmm_case(dtype, transposed=transposed)
    n = int(offs[-1])
    ref = grouped_mm_torch(a[:n].double(), b.double(), offs)
    got = ops.grouped_mm(a, b, offs)
    twin = grouped_mm_torch(a[:n], b, offs)  # same-dtype PyTorch, one mm per expert
    assert got.dtype == dtype and got.shape == (a.shape[0], b.shape[2])
    assert (got[n:] == 0).all()
    err, err_pt = (got[:n].double() - ref).abs().max(), (twin.double() - ref).abs().max()
    assert err <= 2 * err_pt, (err, err_pt)


@pytest.mark.parametrize("dtype", MM_DTYPES)
def test_grouped_mm_wgrad_error_at_most_twice_torch(dtype):
    a, _, offs = gmm_case(dtype, transposed=False)
    n = int(offs[-1])
    g = rand(a.shape[0], 11, dtype=dtype, seed=3)
    ref = grouped_mm_wgrad_torch(a[:n].double(), g[:n].double(), offs)
    got = (torch.ops.moe.grouped_mm_wgrad if ops.HAS_EXTENSION else grouped_mm_wgrad_torch)(a, g, offs)
    twin = grouped_mm_wgrad_torch(a[:n], g[:n], offs)
    assert got.dtype == dtype and got.shape == (offs.shape[0], a.shape[1], 11)
    assert (got[offs.diff(prepend=offs.new_zeros(1)) == 0] == 0).all()  # experts without rows
    err, err_pt = (got.double() - ref).abs().max(), (twin.double() - ref).abs().max()
    assert err <= 2 * err_pt, (err, err_pt)


@pytest.mark.parametrize("counts", [[3, 0], [0, 70], [1, 1]])
def test_grouped_mm_few_rows_wide_output(counts):
    """Few rows and a wide output: the CPU kernel splits output columns across threads."""
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).int()
    n, X, Y = int(offs[-1]), 40, 300
    a, b, g = rand(n + 2, X), rand(2, X, Y, seed=1), rand(n + 2, Y, seed=2)
    for got, ref, pt in [
        (ops.grouped_mm(a, b, offs), grouped_mm_torch(a.double(), b.double(), offs),
         grouped_mm_torch(a, b, offs)),
        ((torch.ops.moe.grouped_mm_wgrad if ops.HAS_EXTENSION else grouped_mm_wgrad_torch)(a, g, offs),
         grouped_mm_wgrad_torch(a[:n].double(), g[:n].double(), offs),
         grouped_mm_wgrad_torch(a[:n], g[:n], offs)),
    ]:
        assert got.shape == pt.shape
        assert (got.double() - ref).abs().max() <= 2 * (pt.double() - ref).abs().max()


def test_grouped_mm_all_rows_on_one_expert_equals_dense_mm():
    """One expert holding every row is one dense GEMM: within the GEMM error rule of a @ b[1] (not
    bit-equal: on CPUs with AVX-512 the grouped GEMM runs moekit's own kernel, not MKL)."""
    a, b = rand(40, 24), rand(3, 24, 10, seed=1)
    offs = torch.tensor([0, 40, 40], dtype=torch.int32)
    got, ref = ops.grouped_mm(a, b, offs), a.double() @ b[1].double()
    assert (got.double() - ref).abs().max() <= 2 * ((a @ b[1]).double() - ref).abs().max()


# ---------------------------------------------------------------- autograd and opcheck


def f64_case():
    T, K, E, D, Y = 11, 3, 4, 5, 6
    p = ops.plan(make_ids(T, K, E, seed=2), E)
    req = dict(dtype=torch.float64, requires_grad=True)
    return dict(p=p, x=torch.randn(T, D, **req), w=torch.rand(T, K, **req),
                y=torch.randn(T * K, D, **req), b=torch.randn(E, Y, D, **req),
                g=torch.randn(T * K, Y, **req))


GRAD_CASES = {
    "permute": lambda c: (lambda x, w: ops.permute(x, c["p"], w), (c["x"], c["w"])),
    "unpermute": lambda c: (lambda y, w: ops.unpermute(y, c["p"], w), (c["y"], c["w"])),
    "unpermute_weights_grad": lambda c: (
        lambda x, y: torch.ops.moe.unpermute_weights_grad(x, y, c["p"].order_N, c["p"].rows_TK),
        (c["x"], c["y"])),
    "grouped_mm": lambda c: (lambda y, b: ops.grouped_mm(y, b.transpose(-2, -1), c["p"].offs_E),
                             (c["y"], c["b"])),
    "grouped_mm_wgrad": lambda c: (
        lambda y, g: torch.ops.moe.grouped_mm_wgrad(y, g, c["p"].offs_E), (c["y"], c["g"])),
    "grouped_mm_unpermute": lambda c: (lambda g, b, w: ops.grouped_mm_unpermute(g, c["p"], b, w),
                                       (c["g"], c["b"], c["w"])),
}


@needs_ext
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_float64(name):
    fn, inputs = GRAD_CASES[name](f64_case())
    assert gradcheck(fn, inputs)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_all_ops(dtype):
    c = f64_case()
    p = c["p"]
    t = {k: v.detach().to(dtype).requires_grad_() for k, v in c.items() if k != "p"}
    w32 = c["w"].detach().float().requires_grad_()
    logits = torch.randn(w32.shape[0], 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    q8 = torch.randint(-127, 128, (p.offs_E.shape[0], 3, t["y"].shape[1]), dtype=torch.int8,
                       generator=torch.Generator().manual_seed(2))
    route = torch.ops.moe.topk_route(logits.detach(), None, 2, "softmax", 2, 1, True, 1.0)
    cases = [
        ("plan", (make_ids(11, 3, 4, seed=2), 4)),
        ("permute", (t["x"], p.order_N, p.rows_TK, t["w"])),
        ("permute", (t["x"], p.order_N, p.rows_TK, None)),
        ("unpermute", (t["y"], p.order_N, p.rows_TK, w32)),
        ("unpermute_weights_grad", (t["x"], t["y"], p.order_N, p.rows_TK)),
        ("unpermute_backward", (t["x"].detach(), t["y"].detach(), p.order_N, p.rows_TK, w32.detach())),
        ("grouped_mm", (t["y"], t["b"].transpose(-2, -1), p.offs_E)),
        ("grouped_mm_wgrad", (t["y"], t["g"], p.offs_E)),
        ("gather_grouped_mm", (t["x"], p.order_N, p.rows_TK, t["b"].transpose(-2, -1)[:, :5, :].contiguous(), p.offs_E)),
        ("gather_grouped_mm_wgrad", (t["x"], p.order_N, p.rows_TK, t["g"], p.offs_E)),
        ("grouped_mm_backward", (t["g"].detach(), t["y"].detach(), t["b"].detach().transpose(-2, -1), p.offs_E)),
        ("gather_grouped_mm_backward", (t["g"].detach(), t["x"].detach(), p.order_N, p.rows_TK,
                                        t["b"].detach().transpose(-2, -1), p.offs_E, True, True)),
        ("gather_grouped_mm_backward", (t["g"].detach(), t["x"].detach(), p.order_N, p.rows_TK,
                                        t["b"].detach().transpose(-2, -1).contiguous(), p.offs_E, False, True)),
        ("gather_grouped_mm_swiglu",
         (t["x"], p.order_N, p.rows_TK, t["b"].transpose(-2, -1)[:, :5, :].contiguous(), p.offs_E, True)),
        ("grouped_mm_unpermute", (t["g"], t["b"], p.offs_E, p.order_N, p.rows_TK, w32)),
        ("grouped_mm_unpermute", (t["g"], t["b"], p.offs_E, p.order_N, p.rows_TK, None)),
        ("grouped_mm_unpermute_backward", (t["x"].detach()[:, :5].contiguous(), t["g"].detach(), t["b"].detach(),
                                           p.offs_E, p.order_N, p.rows_TK, w32.detach())),
        ("linear_f32", (t["x"], t["x"][:4].detach().clone().requires_grad_())),
        ("linear_f32_backward", (t["w"].detach()[:, :2].contiguous(), t["x"].detach(), t["x"].detach()[:2].clone())),
        ("linear_f32_backward", (t["w"].detach()[:, :2].contiguous(), t["x"].detach(), t["x"].detach()[:2].clone(),
                                 False, True)),
        ("swiglu", (t["g"],)),
        ("swiglu_backward", (t["g"].detach()[:, :3].contiguous(), t["g"].detach())),
        ("topk_route", (logits, None, 2, "softmax", 2, 1, True, 1.0)),
        ("topk_route_backward", (w32.detach()[:, :2].contiguous(), None, route[0], route[2], "softmax", True, 1.0)),
        ("grouped_mm_w8", (t["y"].detach().float(), q8, torch.rand(q8.shape[:2]) + 0.5, p.offs_E)),
    ]
    assert {n for n, _ in cases} == set(ops.registry.OPS)  # every registered op
    for name, args in cases:
        # topk_route's first output is int64: opcheck's AOT check sums every output into that
        # dtype and fails before the op runs (tests/ops/test_topk_route.py compiles it instead)
        utils = ("test_schema", "test_autograd_registration", "test_faketensor") if name == "topk_route" else None
        opcheck(getattr(torch.ops.moe, name).default, args, **({"test_utils": utils} if utils else {}))


def test_weight_gradient_of_a_transposed_weight_keeps_its_layout():
    """b_EXY passed as the transposed view of an (E, Y, X) weight (nn.Linear layout, transformers'
    experts): its gradient comes back in that layout (no (E, X, Y) -> (E, Y, X) copy by autograd)
    with the values of the per-expert float64 product."""
    torch.manual_seed(0)
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)  # (E, Y, X)
    a = torch.randn(9, 4, dtype=torch.float64)
    offs = torch.tensor([2, 2, 9], dtype=torch.int32)
    g = torch.randn(9, 5, dtype=torch.float64)
    b = w.transpose(-2, -1)
    seen = []
    b.register_hook(lambda grad: seen.append(grad.stride()))
    ops.grouped_mm(a, b, offs).backward(g)
    assert seen == [(20, 1, 4)], seen  # the gradient of b is a view of an (E, Y, X) tensor
    ref = torch.stack([g[0:2].t() @ a[0:2], torch.zeros(5, 4, dtype=torch.float64), g[2:9].t() @ a[2:9]])
    torch.testing.assert_close(w.grad, ref)
    assert torch.autograd.gradcheck(lambda t: ops.grouped_mm(a, t.transpose(-2, -1), offs), (w,))
