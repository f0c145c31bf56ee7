"""Tests for the float32 path of csrc/gemm_avx512.cpp (moe.grouped_mm, moe.grouped_mm_wgrad).

float32 runs on the AVX-512F kernel (FMA, K summed in blocks of kKB = 64 words whose partial sums
are added to a running total) when X >= 64, Y >= 64 and, forward, offs_E[-1] >= 64; else on
at::mm, bit for bit the per-expert PyTorch twin when single-threaded (see SMALL_FWD). Covered: K
not a multiple of 16/64, several kKB blocks, masked 64-column panel tails, A read in place or
packed, B packed generically, by 16-word rows or by 16x16 transposes (tails in both directions),
6-row microtiles, 192-row cache blocks, B packed in chunks of at most 2^20 words. Rule: error vs
float64 at most 2x that of the float32 twin, over >= 64x64 outputs per call; rows past
offs_E[-1] exactly zero; experts without rows get a zero gradient. MOE_CPU_GEMM=aten: at::mm, bit
for bit the twin (single-threaded).

Shape legend: N routed rows, E experts, X/Y GEMM input/output dims, K the reduction dim.
"""

import os
import textwrap

import pytest
import torch

from moe import ops
from moe.ops.twins import grouped_mm_torch, grouped_mm_wgrad_torch
from tests.helpers.cpu_kernels import (A_LAYOUTS, B_LAYOUTS, f32_inputs, one_thread, run_json, view2d, view3d,
                                       wgrad)

F32 = torch.float32
G_LAYOUTS = ["contig", "transposed", "misaligned", "strided_cols"]


def cpu_has_avx512_f32():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl"} <= set(flags)


pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")
needs_kernel = pytest.mark.skipif(not cpu_has_avx512_f32(), reason="CPU lacks avx512f/bw/vl")
KERNEL_ACTIVE = cpu_has_avx512_f32() and os.environ.get("MOE_CPU_GEMM", "auto") in ("", "auto")


def assert_rule(got, ref, twin):
    """Max error vs float64 at most 2x that of the same-dtype PyTorch twin."""
    assert got.shape == twin.shape and got.dtype == twin.dtype == F32
    assert got.numel() >= 64 * 64 and not got.isnan().any()
    err = (got.double() - ref).abs().max().item()
    err_pt = (twin.double() - ref).abs().max().item()
    assert err <= 2 * err_pt, (err, err_pt)


def check_forward(a, b, offs, ref=None):
    n = int(offs[-1])
    got = ops.grouped_mm(a, b, offs)
    assert got.shape == (a.shape[0], b.shape[2])
    assert (got[n:] == 0).all() and not got[n:].isnan().any()  # padding rows exactly zero
    if ref is None:
        ref = grouped_mm_torch(a[:n].double(), b.double(), offs)
    assert_rule(got[:n], ref, grouped_mm_torch(a[:n], b, offs))


def check_wgrad(a, g, offs, ref=None):
    n = int(offs[-1])
    got = wgrad(a, g, offs)
    assert got.shape == (offs.shape[0], a.shape[1], g.shape[1])
    empty = offs.diff(prepend=offs.new_zeros(1)) == 0
    assert (got[empty] == 0).all() and not got[empty].isnan().any()  # experts without rows
    if ref is None:
        ref = grouped_mm_wgrad_torch(a[:n].double(), g[:n].double(), offs)
    assert_rule(got, ref, grouped_mm_wgrad_torch(a[:n], g[:n], offs))


# (X, Y, rows per expert), all at or above the thresholds. X (= K): 65 (one kKB block and one
# word), 100, 1000 (15 blocks + 40 words), 64 (exactly). Y: 70, 130, 100, 300 (masked panel
# tails). Rows 0/1/5/6/7 around the 6-row microtile. X=70, Y=100 with a transposed b: 16x16
# transposes over 64 of 70 words plus 6 single words, panel widths 64 and 36 (32 by blocks + 4).
# One 70-row expert with Y=300: with more than one thread its columns are split (col0 = 150).
FWD_CASES = [
    (65, 70, [0, 1, 5, 6, 7, 50]),
    (100, 130, [13, 0, 100, 6]),
    (1000, 64, [64, 7]),
    (64, 64, [0, 64]),
    (70, 100, [3, 0, 61, 7]),
    (70, 300, [70]),
]


@needs_kernel
@pytest.mark.parametrize("X,Y,counts", FWD_CASES)
@pytest.mark.parametrize("a_layout", A_LAYOUTS)
def test_grouped_mm_f32_every_path(X, Y, counts, a_layout):
    a, b, _, offs = f32_inputs(counts, X, Y)
    a = view2d(a, a_layout)  # contig/col_slice/misaligned: read in place; else packed
    for b_layout in B_LAYOUTS:  # rows / 16x16 transposes / generic (strided)
        check_forward(a, view3d(b, b_layout), offs)


# (X, Y, rows per expert, padding rows). Here K is an expert's row count: 1, 5, 6, 7, 193, 300,
# 65, 1000 (16 kKB blocks), 129 and 77 (a transposed g: 16x16 transposes plus 1 and 13 single
# words, panels 64 and 36 wide). X = 130 splits into two tiles of 65 output rows (A offset).
WGRAD_CASES = [
    (65, 70, [0, 1, 5, 6, 7, 193], 3),
    (100, 130, [300, 0, 65], 2),
    (64, 64, [1000, 2], 2),
    (70, 100, [129, 77, 0], 3),
    (130, 257, [40, 24], 2),
]


@needs_kernel
@pytest.mark.parametrize("X,Y,counts,pad", WGRAD_CASES)
@pytest.mark.parametrize("a_layout", A_LAYOUTS)
def test_grouped_mm_wgrad_f32_every_path(X, Y, counts, pad, a_layout):
    a, _, g, offs = f32_inputs(counts, X, Y, pad=pad, seed=1)
    a = view2d(a, a_layout)  # A = a^T: read in place when a is transposed, else packed
    for g_layout in G_LAYOUTS:  # B = g: a transposed g goes through the 16x16 transposes
        check_wgrad(a, view2d(g, g_layout), offs)


@needs_kernel
def test_grouped_mm_f32_single_thread_cache_blocks():
    """One thread: forward tiles of 229 rows (1612 routed rows / 8 -> 7 blocks of the 1600-row
    expert) cross the 192-row block, leaving 37 = 6*6 + 1 rows; the weight gradient of 5 experts
    with rows and X = 200 keeps each expert whole (1000 / 8 = 125-row target): 200 = 192 + 6 + 2."""
    with one_thread():
        a, b, _, offs = f32_inputs([1600, 5, 0, 7], 128, 65, seed=2)
        for a_layout, b_layout in [("contig", "contig"), ("transposed", "transposed")]:
            check_forward(view2d(a, a_layout), view3d(b, b_layout), offs)
        a, _, g, offs = f32_inputs([70, 0, 1, 6, 13, 2], 200, 65, pad=2, seed=3)
        for a_layout, g_layout in [("contig", "contig"), ("transposed", "transposed")]:
            check_wgrad(view2d(a, a_layout), view2d(g, g_layout), offs)


@needs_kernel
def test_grouped_mm_f32_packs_b_in_chunks():
    """K = X = 2100 words per panel row: 2^20 // (2100 * 64) = 7 panels per chunk, so Y = 1000
    (16 panels, the last 40 columns wide) takes 3 chunks (7, 7, 2); a transposed ``a`` is packed
    again for each. One thread keeps each expert's columns in one call."""
    a, b, _, offs = f32_inputs([40, 30], 2100, 1000, seed=5)
    ref = grouped_mm_torch(a[:70].double(), b.double(), offs)
    with one_thread():
        for a_layout in ["contig", "transposed"]:
            for b_layout in ["contig", "transposed", "strided"]:  # rows / transposes / generic
                check_forward(view2d(a, a_layout), view3d(b, b_layout), offs, ref)


@needs_kernel
def test_grouped_mm_wgrad_f32_packs_b_in_chunks():
    """Weight gradient, K = an expert's rows: 1100 gives 14 panels per chunk and 2100 gives 7, so
    Y = 1000 (16 panels) takes 2 and 3 chunks; A = a^T is packed again for each. 16500 rows make
    one panel larger than a chunk (chunk = max(1, 0) panels): Y = 70 then takes 2 chunks."""
    with one_thread():
        for counts, X, Y in [([1100, 0, 2100], 70, 1000), ([16500], 64, 70)]:
            a, _, g, offs = f32_inputs(counts, X, Y, pad=2, seed=6)
            n = int(offs[-1])
            ref = grouped_mm_wgrad_torch(a[:n].double(), g[:n].double(), offs)
            for a_layout in ["contig", "transposed"]:
                for g_layout in ["contig", "transposed"]:
                    check_wgrad(view2d(a, a_layout), view2d(g, g_layout), offs, ref)


@needs_kernel
def test_grouped_mm_f32_large_k_blocked_sum():
    """K = 8192: 128 blocks of 64 words. Forward (64 x 8192 @ 8192 x 64) and weight gradient
    (8192 rows, X = Y = 64) both keep the rule. Little margin: at this K the kernel's error is
    typically 1.2-1.8x torch's (its running total adds K/64 partial sums in sequence)."""
    a, b, _, offs = f32_inputs([64], 8192, 64, pad=0, seed=7)
    check_forward(a, b, offs)
    a, _, g, offs = f32_inputs([8192], 64, 64, pad=0, seed=8)
    check_wgrad(a, g, offs)


# Below a threshold float32 stays on at::mm: bit for bit the twin, under two conditions that are
# MKL's, not moekit's: one thread (with more, the twin's at::mm splits an expert's rows across
# threads while the grouped op runs whole tiles single-threaded; the last bits then differ), and
# 16-byte aligned output rows for experts under 4 rows (MKL's small-M path rounds differently at
# other alignments; c is 64-byte aligned, so Y % 4 == 0 or experts of 0 or >= 4 rows). Experts
# under 128 rows and X < 128, Y < 256 make one at::mm call per expert, as in the twin.
SMALL_FWD = [(63, 100, [40, 0, 50, 1]), (100, 63, [7, 60, 0, 9]), (100, 100, [4, 0, 6]),
             (64, 64, [63]), (1000, 128, [10, 3])]
SMALL_WGRAD = [(63, 100, [40, 0, 90, 1]), (100, 63, [7, 60, 1]), (63, 63, [500])]


@pytest.mark.parametrize("X,Y,counts", SMALL_FWD)
def test_grouped_mm_f32_below_threshold_is_at_mm(X, Y, counts):
    a, b, _, offs = f32_inputs(counts, X, Y, seed=9)  # the twin's padding rows are zero too
    with one_thread():
        for a_layout, b_layout in [("contig", "contig"), ("transposed", "transposed"),
                                   ("strided_cols", "strided")]:
            av, bv = view2d(a, a_layout), view3d(b, b_layout)
            assert torch.equal(ops.grouped_mm(av, bv, offs), grouped_mm_torch(av, bv, offs))


@pytest.mark.parametrize("X,Y,counts", SMALL_WGRAD)
def test_grouped_mm_wgrad_f32_below_threshold_is_at_mm(X, Y, counts):
    a, _, g, offs = f32_inputs(counts, X, Y, seed=10)
    n = int(offs[-1])
    with one_thread():
        for a_layout, g_layout in [("contig", "contig"), ("transposed", "transposed")]:
            av, gv = view2d(a, a_layout), view2d(g, g_layout)
            assert torch.equal(wgrad(av, gv, offs), grouped_mm_wgrad_torch(av[:n], gv[:n], offs))


# The same kernel-sized problem in both modes: on the kernel it differs from at::mm somewhere
# (another summation order over K = 1000), under MOE_CPU_GEMM=aten it is the twin bit for bit.
# One thread, experts under 128 rows, X < 128 and Y < 256: one at::mm call per expert.
SAME_AS_TWIN = """
    import torch
    from moe import ops
    from moe.ops.twins import grouped_mm_torch, grouped_mm_wgrad_torch
    from tests.helpers.cpu_kernels import f32_inputs, one_thread, wgrad
    def same_as_twin():
        a, b, _, offs = f32_inputs([13, 0, 100, 6], 1000, 130, pad=0, seed=11)
        a2, _, g, offs2 = f32_inputs([120, 0, 1000], 100, 130, pad=0, seed=12)
        with one_thread():
            return (torch.equal(ops.grouped_mm(a, b, offs), grouped_mm_torch(a, b, offs)),
                    torch.equal(wgrad(a2, g, offs2), grouped_mm_wgrad_torch(a2, g, offs2)))
"""


@pytest.mark.skipif(not KERNEL_ACTIVE, reason="needs the float32 kernel (CPU flags, MOE_CPU_GEMM)")
def test_grouped_mm_f32_kernel_is_used():
    namespace = {}
    exec(textwrap.dedent(SAME_AS_TWIN), namespace)
    assert namespace["same_as_twin"]() == (False, False)


def test_moe_cpu_gemm_aten_f32_is_the_twin():
    same = run_json(SAME_AS_TWIN + """
    import json
    print(json.dumps(same_as_twin()))
    """, MOE_CPU_GEMM="aten")
    assert same == [True, True]
