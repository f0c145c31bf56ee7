"""Property tests (hypothesis) for moe.ops over random shapes and routings.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim,
X/Y GEMM input/output dims. Routings include T=0, empty (-1) slots, experts with zero rows and
all rows on one expert; D is drawn so it is usually not a multiple of 8; inputs are often
non-contiguous views (x a strided view, b a transposed view).
"""

import torch
from hypothesis import given, strategies as st

from moe import ops
from moe.ops.twins import grouped_mm_torch, permute_torch, plan_torch, unpermute_torch

from tests.helpers.ops import check_plan_invariants, plan_fields
from tests.helpers.props import SETTINGS, routings

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def maybe_strided(x, strided):
    """Same values; a column-strided view (stride(1) == 3, NaN in the gaps) when ``strided``."""
    if not strided:
        return x
    big = torch.full((x.shape[0], 3 * x.shape[1] + 1), float("nan"), dtype=x.dtype)
    big[:, 1 : 1 + 3 * x.shape[1] : 3] = x
    return big[:, 1 : 1 + 3 * x.shape[1] : 3]


@SETTINGS
@given(r=routings(max_T=200), int32=st.booleans())
def test_plan_property(r, int32):
    ids, E = r
    ids = ids.int() if int32 else ids
    p = ops.plan(ids, E)
    for got, want in zip(plan_fields(p), plan_torch(ids, E)):
        assert torch.equal(got, want)
    check_plan_invariants(p, ids, E)


@SETTINGS
@given(r=routings(), D=st.integers(1, 37), dtype=st.sampled_from(DTYPES), strided=st.booleans(),
       weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_permute_unpermute_property(r, D, dtype, strided, weighted, seed):
    ids, E = r
    T, K = ids.shape
    p = ops.plan(ids, E)
    g = torch.Generator().manual_seed(seed)
    x = maybe_strided(torch.randn(T, D, generator=g).to(dtype), strided)
    w = torch.rand(T, K, generator=g) if weighted else None
    x_ND = ops.permute(x, p, w)
    assert torch.equal(x_ND, permute_torch(x, p.order_N, p.rows_TK, w))
    n = int(p.offs_E[-1])
    assert (x_ND[n:] == 0).all()
    y = maybe_strided(torch.randn(T * K, D, generator=g).to(dtype), strided)
    y_TD = ops.unpermute(y, p, w)
    assert torch.equal(y_TD, unpermute_torch(y, p.order_N, p.rows_TK, w))
    if not weighted:  # x_ND[i] is row t of x for each slot of t: the gather is a true gather
        t_of_row = p.order_N[:n] // K
        assert torch.equal(x_ND[:n], x[t_of_row])


@SETTINGS
@given(r=routings(max_T=40), X=st.integers(1, 29), Y=st.integers(1, 23),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       transposed=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_grouped_mm_property(r, X, Y, dtype, transposed, strided, seed):
    ids, E = r
    E = min(E, 64)  # keep the per-expert reference loop short
    ids = ids.clamp(max=E - 1)
    p = ops.plan(ids, E)
    N, n = p.max_rows, int(p.offs_E[-1])
    g = torch.Generator().manual_seed(seed)
    a64 = torch.randn(N, X, generator=g, dtype=torch.float64)
    b64 = (torch.randn(E, Y, X, generator=g, dtype=torch.float64).transpose(-2, -1) if transposed
           else torch.randn(E, X, Y, generator=g, dtype=torch.float64))
    a = maybe_strided(a64.to(dtype), strided)
    if N > n:
        a[n:] = float("nan")  # never read
    b = b64.to(dtype)
    got = ops.grouped_mm(a, b, p.offs_E)
    assert got.shape == (N, Y) and got.dtype == dtype
    assert (got[n:] == 0).all()
    ref = grouped_mm_torch(a[:n].double(), b.double(), p.offs_E)
    # The same-dtype PyTorch computation, as torch runs it with its threads and on one thread (the
    # kernel's tiles call at::mm single-threaded inside its parallel region, and MKL's small-M
    # kernels round differently with one thread): the 2x rule holds against the larger error.
    twins = [grouped_mm_torch(a[:n], b, p.offs_E)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        twins.append(grouped_mm_torch(a[:n], b, p.offs_E))
    finally:
        torch.set_num_threads(threads)
    err = (got[:n].double() - ref).abs().max() if n else torch.tensor(0.0)
    err_pt = max((t.double() - ref).abs().max() for t in twins) if n else torch.tensor(0.0)
    assert err <= 2 * err_pt, (err, err_pt)
