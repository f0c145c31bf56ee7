"""The streamed path of the CPU forward GEMM (csrc/gemm_avx512.cpp: RowsB, micro_block): a tile of
at most S = moe.ops.build_info()["cpu_stream_rows"] rows of one expert reads the expert's weight
rows in place (B(x, y) at x * bx + y) instead of packing B panels; larger tiles pack. The choice
is made per tile from offs_E (read on the host). Up to 6 rows run on 64-column strips, 7 to 12 all
at once on 32-column strips, 13 to S in blocks of 6 on 64-column strips; a deep bfloat16 weight
(its packed panel over a quarter of L2) streams up to S_DEEP rows, each strip's depth block packed
once for all of them. It serves grouped_mm and gather_grouped_mm, and
the data gradient wherever the weight the backward multiplies by has contiguous rows (b_EXY a
transposed view of an (E, Y, X) weight, as transformers' experts hold it).

What defines it: the same operations in the same order as the packed path, so a row's output has
the same bits whether its expert has S rows (streamed) or S + 1 (packed), and the project's GEMM
rule (error against float64 at most 2x the same-dtype twin's). Covered at the boundaries of the
choice (0, 1, S - 1, S, S + 1 rows, empty experts), each kind of strip (8, 12, 13 rows), odd X (bfloat16's zero row for the missing x),
masked column tails (Y not a multiple of 16 or 32), the float32 blocks of 64 words and groups of
64 blocks (X = 4200), A gathered, strided or packed, bfloat16 and float32.

Shape legend: T tokens, N routed rows, E experts, X/Y GEMM input/output dims.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from moe import ops
from moe.ops.twins import gather_grouped_mm_torch, grouped_mm_torch
from tests.helpers.cpu_kernels import (stream_problems, A_LAYOUTS, BF16, F32, around, assert_forward_rule, counts_plan,
                                       one_thread, stream_inputs, view2d, view3d)

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

S = ops.build_info()["cpu_stream_rows"] if ops.HAS_EXTENSION else 0
# The weight layouts whose rows are contiguous along Y (streamed here when rows are few); a
# transposed (E, Y, X) buffer streams by its own rows (test_cpu_gemm_stream_yx.py).
STREAMED_B = ["contig", "odd_rows"]
# Rows per expert: the choice's boundaries and one tile of each kind of strip.
HEIGHTS = around(S) + [8, 12, 13]


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("X,Y", [(7, 33), (64, 64), (131, 130), (66, 257), (2048, 70)])
def test_rows_at_the_boundary_follow_the_rule(dtype, X, Y):
    a, b, offs = stream_inputs(HEIGHTS, X, Y, dtype)
    for a_layout in A_LAYOUTS:
        for b_layout in STREAMED_B + ["transposed"]:
            assert_forward_rule(ops.grouped_mm(view2d(a, a_layout), view3d(b, b_layout), offs), a, b, offs)


def shared_rows(s, X, Y, dtype, seed=0):
    """Experts 0 and 1 with the same weight; expert 0 has s rows, expert 1 S + 1 whose first s are
    expert 0's. Returns a, b, offs and the two row ranges that must be equal."""
    a, b, offs = stream_inputs([s, S + 1], X, Y, dtype, seed=seed)
    b[1] = b[0]
    a[s : 2 * s] = a[:s]
    return a, b, offs, (slice(0, s), slice(s, 2 * s))


# float32 from 64 in X and Y (below that at::mm runs, whose sums depend on the row count).
EQUAL_CASES = [(BF16, 7, 70), (BF16, 131, 65), (BF16, 4201, 33)] + [(F32, 131, 65), (F32, 4200, 70), (F32, 64, 200)]


@pytest.mark.parametrize("dtype,X,Y", EQUAL_CASES)
@pytest.mark.parametrize("s", [1, 12, 13, "S-1", "S"])
def test_streamed_rows_equal_packed_rows_bit_for_bit(dtype, X, Y, s):
    s = {"S-1": S - 1, "S": S}.get(s, s)
    a, b, offs, (r0, r1) = shared_rows(s, X, Y, dtype)
    for a_layout in ["contig", "misaligned", "transposed"]:  # in place, odd offset, packed
        for b_layout in STREAMED_B:
            c = ops.grouped_mm(view2d(a, a_layout), view3d(b, b_layout), offs)
            assert torch.equal(c[r0], c[r1]), (a_layout, b_layout)
    assert_forward_rule(c, a, b, offs)


S_DEEP = ops.build_info()["cpu_stream_rows_deep"] if ops.HAS_EXTENSION else 0
# The shallowest bfloat16 depth X whose packed panel (64 columns of (x, x+1) words down the whole
# depth: 128 X bytes) exceeds a quarter of this CPU's L2: there tiles of up to S_DEEP rows stream.
X_DEEP = 2 * (ops.build_info()["cpu_l2_bytes"] // 1024) + 1 if ops.HAS_EXTENSION else 0


@pytest.mark.parametrize("Y", [70, 1500])
@pytest.mark.parametrize("s", [S, S + 1, 40, S_DEEP])
def test_deep_weights_stream_further_with_the_same_bits(s, Y):
    """A deep bfloat16 weight (X_DEEP) streams tiles of S + 1 .. S_DEEP rows, its strips packed once
    per depth block for every tile of the rows (gemm_stream.h BlockB), in blocks of kBlockWords
    words: a row's output has the same bits in a tile of 13 rows (streamed from B's rows), of s
    rows (streamed deep; S rows: from B's rows) and of more than S_DEEP rows (packed: one thread
    and 1600 rows, so the tiles of that expert have 200). Y 70: a masked column tail; Y 1500: at
    s >= S several column ranges, whose partial sums share one range's scratch; odd X: the zero
    row of the last word; a in place and packed."""
    a, b, offs = stream_inputs([13, s, 1600], X_DEEP, Y, BF16)
    b[1] = b[0]
    b[2] = b[0]
    a[13 : 26] = a[:13]
    a[13 + s : 26 + s] = a[:13]
    first = [slice(0, 13), slice(13, 26), slice(13 + s, 26 + s)]
    with one_thread():
        for a_layout in ["contig", "transposed"]:
            c = ops.grouped_mm(view2d(a, a_layout), b, offs)
            for rows in first[1:]:
                assert torch.equal(c[first[0]], c[rows]), a_layout
    assert_forward_rule(c, a, b, offs)


def test_deep_weights_stream_gathered_rows():
    """gather_grouped_mm on a deep weight: the rows read from x_TD where they are, bit for bit the
    GEMM on the permuted copy."""
    p = counts_plan([40, 0, S_DEEP], T_extra=3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(p.rows_TK.shape[0], X_DEEP, generator=gen).to(BF16)
    b = torch.randn(3, X_DEEP, 40, generator=gen).to(BF16)
    got = ops.gather_grouped_mm(x, p, b)
    assert torch.equal(got, ops.grouped_mm(ops.permute(x, p), b, p.offs_E))
    assert_forward_rule(got, ops.permute(x, p), b, p.offs_E)


def test_the_deep_rule():
    """Which tiles stream: up to S rows always; up to S_DEEP rows bfloat16 weights deeper than
    X_DEEP - 1 (the panel of X_DEEP - 1 or X_DEEP - 2 rows is exactly a quarter of L2); float32 never
    past S (its rows are read as they are, with nothing to form once)."""
    from moe.ops._extension import _C

    assert _C.cpu_gemm_streams(S, 10**6, False) and _C.cpu_gemm_streams(S, 7, True)
    assert not _C.cpu_gemm_streams(S + 1, X_DEEP - 1, True)
    assert _C.cpu_gemm_streams(S + 1, X_DEEP, True) and _C.cpu_gemm_streams(S_DEEP, X_DEEP, True)
    assert not _C.cpu_gemm_streams(S_DEEP + 1, X_DEEP, True)
    assert not _C.cpu_gemm_streams(S + 1, X_DEEP, False)


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("X,Y", [(9, 40), (130, 131), (2048, 66)])
def test_gathered_rows_at_the_boundary(dtype, X, Y):
    """gather_grouped_mm streams the same tiles, each row read from x_TD where it is: bit for bit
    the GEMM on the permuted copy, and the rule against the twin."""
    counts = HEIGHTS + ([64] if dtype == F32 else [])
    p = counts_plan(counts, T_extra=3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(p.rows_TK.shape[0], X, generator=gen).to(dtype)
    b = torch.randn(len(counts), X, Y, generator=gen).to(dtype)
    for b_layout in STREAMED_B:
        bv = view3d(b, b_layout)
        got = ops.gather_grouped_mm(x, p, bv)
        assert torch.equal(got, ops.grouped_mm(ops.permute(x, p), bv, p.offs_E))
        n = int(p.offs_E[-1])
        ref = gather_grouped_mm_torch(x.double(), p.order_N, p.rows_TK, b.double(), p.offs_E)
        twin = gather_grouped_mm_torch(x, p.order_N, p.rows_TK, b, p.offs_E)
        assert (got[n:] == 0).all()
        assert (got[:n].double() - ref[:n]).abs().max() <= 2 * (twin[:n].double() - ref[:n]).abs().max()


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_data_gradient_of_a_transposed_weight(dtype):
    """b_EXY a transposed view of an (E, Y, X) weight: the forward streams its rows along X
    (gemm_stream_yx.h), the data gradient g @ b^T reads the (E, Y, X) rows in place here (streamed
    for few rows). Both gradients within the rule of the twin's."""
    X, Y = 96, 130
    a, b, offs = stream_inputs(around(S), X, Y, dtype, pad=0)
    w_EYX = b.transpose(1, 2).contiguous().requires_grad_()
    a.requires_grad_()
    g = torch.randn(a.shape[0], Y, generator=torch.Generator().manual_seed(5)).to(dtype)
    ga, gw = torch.autograd.grad(ops.grouped_mm(a, w_EYX.transpose(1, 2), offs), (a, w_EYX), g)
    a64, w64 = a.detach().double().requires_grad_(), w_EYX.detach().double().requires_grad_()
    ra, rw = torch.autograd.grad(grouped_mm_torch(a64, w64.transpose(1, 2), offs), (a64, w64), g.double())
    at, wt = a.detach().clone().requires_grad_(), w_EYX.detach().clone().requires_grad_()
    ta, tw = torch.autograd.grad(grouped_mm_torch(at, wt.transpose(1, 2), offs), (at, wt), g)
    for got, ref, twin in [(ga, ra, ta), (gw, rw, tw)]:
        assert got.shape == twin.shape and got.dtype == dtype
        assert (got.double() - ref).abs().max() <= 2 * (twin.double() - ref).abs().max()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=stream_problems(S, STREAMED_B, gathered=True))
def test_streamed_path_property(p):
    a, b, offs = stream_inputs(p["counts"], p["X"], p["Y"], p["dtype"], seed=p["seed"])
    bv = view3d(b, p["b_layout"])
    got = ops.grouped_mm(view2d(a, p["a_layout"]), bv, offs)
    assert_forward_rule(got, a, b, offs)
    if p["gathered"]:  # the same rows gathered from a token-ordered x
        counts = offs.diff(prepend=offs.new_zeros(1)).tolist()
        plan = counts_plan(counts, seed=p["seed"])
        x = torch.empty(plan.rows_TK.shape[0], p["X"], dtype=a.dtype)
        x[plan.order_N[: int(offs[-1])]] = a[: int(offs[-1])]  # one slot per token: order_N is the token
        assert torch.equal(ops.gather_grouped_mm(x, plan, bv)[: int(offs[-1])], got[: int(offs[-1])])
