"""The streamed path of the CPU forward GEMM for weights stored (E, Y, X) (csrc/gemm_stream_yx.h):
b_EXY a transposed view of an nn.Linear-style weight, as transformers' experts hold gate_up_proj
(E, 2F, D) and down_proj (E, D, F). A tile of at most S = moe.ops.build_info()["cpu_stream_rows_yx"]
rows of one expert reads each row of the weight (one output column, contiguous along X) once, in
place, and dots it with the tile's rows of A (float32 lanes, reduced at the end); larger tiles
pack. The choice is made per tile from offs_E (read on the host). It serves grouped_mm and
gather_grouped_mm, and the data gradient g @ b^T of moekit's own (E, X, Y) weights.

What defines it: the project's GEMM rule (error against float64 at most 2x the same-dtype twin's;
its sums run in another order than the packed path's, so it shares no bits with it), rows past
offs_E[-1] exactly zero, and sums that depend only on the row of A and the column: a row's output
has the same bits whatever else its tile holds (1 to S rows), wherever the row lies (in place,
misaligned, copied from a strided A, gathered from x_TD), wherever the weight's rows start and
however the columns are split between threads. Covered at the boundaries of the choice (S, S + 1
rows), every tile height 1..S, empty experts, -1 slots, odd X (the masked last step; X below one
step), Y not a multiple of the 16-column group nor of the 8, 4 or 2 rows of B per pass, float32's
depth blocks (X = 4200), bfloat16 and float32.

Shape legend: T tokens, K top-k slots, N routed rows, E experts, X/Y GEMM input/output dims.
"""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from moe import ops
from moe.ops.twins import gather_grouped_mm_torch, grouped_mm_torch
from tests.helpers.cpu_kernels import (stream_problems, A_LAYOUTS, BF16, F32, around, assert_forward_rule, counts_plan,
                                       stream_inputs, view2d, view3d)

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

S = ops.build_info()["cpu_stream_rows_yx"] if ops.HAS_EXTENSION else 0
# (E, Y, X) buffers read as b_EXY: at an even and at an odd element offset.
YX_B = ["transposed", "transposed_misaligned"]
# Rows per expert: the choice's boundaries and a tile of every accumulator shape (8, 4 and 2 rows of
# B per pass).
COUNTS = around(S) + [5, 8]
# Y % 16 from 0 to 13 (the last group's YB-row passes cut at every place); float32 GEMMs under 64
# in a dimension run on at::mm (moe.grouped_mm's CPU choice).
SHAPES = {BF16: [(1, 5), (7, 35), (31, 16), (64, 64), (131, 130), (66, 253), (2048, 70), (4201, 23)],
          F32: [(64, 64), (65, 83), (131, 135), (66, 253), (4200, 70)]}


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype,X,Y", [(d, X, Y) for d, shapes in SHAPES.items() for X, Y in shapes])
def test_rows_at_the_boundary_follow_the_rule(dtype, X, Y):
    a, b, offs = stream_inputs(COUNTS, X, Y, dtype)
    for a_layout in A_LAYOUTS:
        for b_layout in YX_B:
            assert_forward_rule(ops.grouped_mm(view2d(a, a_layout), view3d(b, b_layout), offs), a, b, offs)


def every_height(X, Y, dtype, seed=0):
    """S experts with one weight; expert s - 1 holds the first s of S rows, in reverse order (so a
    row sits at another place in every tile). Returns a, b, offs and, per expert, the row indices
    of a whose outputs must equal those of the last expert's rows 0..s-1."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(S, X, generator=gen).to(dtype)
    rows = [torch.arange(s - 1, -1, -1) for s in range(1, S + 1)]
    a = torch.cat([base[r] for r in rows] + [torch.full((2, X), float("nan"), dtype=dtype)])
    b = torch.randn(1, X, Y, generator=gen).to(dtype).expand(S, X, Y).contiguous()
    offs = torch.tensor([len(r) for r in rows]).cumsum(0).int()
    return a, b, offs, rows


@pytest.mark.parametrize("dtype,X,Y", [(BF16, 7, 70), (BF16, 131, 17), (BF16, 2048, 40), (BF16, 33, 257),
                                       (F32, 131, 65), (F32, 4200, 70), (F32, 64, 200)])
def test_a_rows_output_does_not_depend_on_its_tile_or_layout(dtype, X, Y):
    """Every tile height 1..S (each its own accumulator shape), A in place, misaligned or copied
    (strided, transposed), B at an even or odd offset: the same bits for the same row."""
    a, b, offs, rows = every_height(X, Y, dtype)
    starts = [0] + offs.tolist()
    ref = None
    for a_layout in ["contig", "misaligned", "transposed", "strided_cols"]:
        for b_layout in YX_B:
            c = ops.grouped_mm(view2d(a, a_layout), view3d(b, b_layout), offs)
            last = c[starts[-2] : starts[-1]].flip(0)  # the last expert's outputs of rows 0..S-1
            for e, r in enumerate(rows):
                assert torch.equal(c[starts[e] : starts[e + 1]], last[r]), (a_layout, b_layout, e)
            ref = c if ref is None else ref
            assert torch.equal(c, ref), (a_layout, b_layout)
    assert_forward_rule(ref, a, b, offs)


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("s", [1, S])
def test_columns_split_between_threads_keep_the_bits(dtype, s):
    """Four ATen threads and fewer tiles: the grouped GEMM splits each expert's columns (a tile
    starting at column 129, no multiple of 16); one thread computes them all. Same bits."""
    X, Y = 96, 257
    a, b, offs = stream_inputs([s], X, Y, dtype)
    bv = view3d(b, "transposed")
    with threads(1):
        one = ops.grouped_mm(a, bv, offs)
    with threads(4):
        split = ops.grouped_mm(a, bv, offs)
    assert torch.equal(one, split)
    assert_forward_rule(split, a, b, offs)


def check_gathered(x, p, b):
    """gather_grouped_mm on the (E, Y, X) views of b: bit for bit grouped_mm on permute(x), rows
    past offs_E[-1] zero, and the rule against the gathered twin."""
    n = int(p.offs_E[-1])
    ref = gather_grouped_mm_torch(x.double(), p.order_N, p.rows_TK, b.double(), p.offs_E)
    twin = gather_grouped_mm_torch(x, p.order_N, p.rows_TK, b, p.offs_E)
    for b_layout in YX_B:
        bv = view3d(b, b_layout)
        got = ops.gather_grouped_mm(x, p, bv)
        assert torch.equal(got, ops.grouped_mm(ops.permute(x, p), bv, p.offs_E))
        assert (got[n:] == 0).all()
        assert (got[:n].double() - ref[:n]).abs().max() <= 2 * (twin[:n].double() - ref[:n]).abs().max()


@pytest.mark.parametrize("dtype,X,Y", [(BF16, 9, 40), (BF16, 130, 131), (BF16, 2048, 66), (F32, 130, 131),
                                       (F32, 2048, 66)])
def test_gathered_rows_at_the_boundary(dtype, X, Y):
    """One slot per token, some tokens routed nowhere (-1), experts of 0..S+1 rows."""
    counts = COUNTS + ([64] if dtype == F32 else [])
    p = counts_plan(counts, T_extra=3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(p.rows_TK.shape[0], X, generator=gen).to(dtype)
    check_gathered(x, p, torch.randn(len(counts), X, Y, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gathered_top_k_with_empty_slots(dtype):
    """K = 3 slots per token over E = 24 experts (about 4 rows each), about a fifth of the slots -1
    (a capacity drop or a variable-k router), a token with every slot empty; float32 with a 64-row
    expert (its kernel's threshold)."""
    T, K, E, X, Y = 40 if dtype == BF16 else 90, 3, 24, 130, 70
    gen = torch.Generator().manual_seed(2)
    ids_TK = torch.randint(0, E, (T, K), generator=gen)
    ids_TK[torch.rand(T, K, generator=gen) < 0.2] = -1
    ids_TK[0] = -1
    if dtype == F32:
        ids_TK[1:70, 0] = 5
    p = ops.plan(ids_TK, E)
    x = torch.randn(T, X, generator=gen).to(dtype)
    check_gathered(x, p, torch.randn(E, X, Y, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_data_gradient_of_a_row_major_weight(dtype):
    """moekit's own (E, X, Y) weight: the data gradient g @ b^T multiplies by a transposed view of
    it, streamed here for few rows. Both gradients within the rule of the twin's."""
    X, Y = 96, 130
    a, b, offs = stream_inputs(COUNTS, X, Y, dtype, pad=0)
    a.requires_grad_(), b.requires_grad_()
    g = torch.randn(a.shape[0], Y, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = torch.autograd.grad(ops.grouped_mm(a, b, offs), (a, b), g)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = torch.autograd.grad(grouped_mm_torch(a64, b64, offs), (a64, b64), g.double())
    at, bt = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    twin = torch.autograd.grad(grouped_mm_torch(at, bt, offs), (at, bt), g)
    for mine, r, t in zip(got, ref, twin):
        assert mine.shape == t.shape and mine.dtype == dtype
        assert (mine.double() - r).abs().max() <= 2 * (t.double() - r).abs().max()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=stream_problems(S, YX_B))
def test_streamed_yx_path_property(p):
    a, b, offs = stream_inputs(p["counts"], p["X"], p["Y"], p["dtype"], seed=p["seed"])
    assert_forward_rule(ops.grouped_mm(view2d(a, p["a_layout"]), view3d(b, p["b_layout"]), offs), a, b, offs)
