"""Tests for csrc/gemm_bf16.cpp, the AVX-512 BF16 grouped GEMM (moe.grouped_mm, moe.grouped_mm_wgrad).

Every packing path: A read in place or packed, B packed by rows, by 32-bit words (transposed view)
or by a strided gather, odd K zero-padded, masked column tails, 6-row microtiles, 192-row cache
blocks and B packed in chunks of at most 4 MiB. Rule (FlashAttention's): error vs float64 at most
2x the same-dtype PyTorch error; rows past offs_E[-1] exactly zero; experts without rows get a zero
gradient. Also MOE_CPU_GEMM (unset/""/"auto": the kernel, "aten": at::mm, else an error) and the
accepted denormal flush of vdpbf16ps. On a CPU without avx512_bf16 the same tests check at::mm.

Shape legend: N routed rows, E experts, X/Y GEMM input/output dims, K the reduction dim.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from moe import ops
from tests.helpers.cpu_kernels import (A_LAYOUTS, B_LAYOUTS, BF16, check_forward, check_wgrad,
                                       cpu_has_avx512_bf16, gmm_inputs, one_thread, run_json, run_saved,
                                       view2d, view3d, wgrad)

# Every test here is about the compiled kernels: without them the twins would only meet themselves.
pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

# (X, Y, rows per expert). X is the forward's K: 1, odd, even, multiples of 16/64 and not; Y
# below 16, in 65..130 and past it (masked tails of 64-column panels); rows 0/1/5/6/7 around the
# 6-row microtile, 193 and 400 around the 192-row block; the 3000-row expert makes 250-row tiles
# that cross the block; Y=257 with few rows makes the grouped GEMM split columns (col0=129).
FWD_CASES = [
    (1, 17, [0, 1, 5, 6, 7]),
    (2, 1, [3, 0, 193]),
    (7, 65, [6, 7, 0, 1]),
    (16, 15, [400, 5]),
    (33, 130, [1, 193, 0, 6]),
    (64, 64, [7, 7, 7, 0]),
    (130, 100, [5, 0, 0, 6, 1, 7, 2, 3, 9, 11]),
    (9, 70, [3000, 0, 5]),
    (40, 257, [3, 1]),
    (3, 131, [0, 0, 0]),
]


@pytest.mark.parametrize("X,Y,counts", FWD_CASES)
@pytest.mark.parametrize("a_layout", A_LAYOUTS)
def test_grouped_mm_bf16_every_path(X, Y, counts, a_layout):
    a, b, _, offs = gmm_inputs(counts, X, Y)
    a = view2d(a, a_layout)
    for b_layout in B_LAYOUTS:
        check_forward(a, view3d(b, b_layout), offs)


# (X, Y, rows per expert, padding rows) for the weight gradient, whose K is an expert's row count:
# K = 1, odd, even, 193, 400; X = 500 over 8 experts makes 250-row output tiles (past the 192
# block). An even row count N (pad 2) lets a transposed a (and g) be read in place for experts
# with an even row count starting at an even row; pad 3 makes every such stride odd.
WGRAD_CASES = [
    (1, 1, [0, 1, 5], 3),
    (17, 65, [6, 7, 0, 193], 2),
    (200, 20, [400, 0, 3], 2),
    (500, 20, [1, 2, 3, 4, 5, 6, 7, 0], 2),
    (64, 130, [2, 9, 0, 0, 1], 3),
    (5, 300, [3, 1], 3),
    (31, 66, [8, 4, 0, 2], 2),
]


@pytest.mark.parametrize("X,Y,counts,pad", WGRAD_CASES)
@pytest.mark.parametrize("a_layout", A_LAYOUTS)
def test_grouped_mm_wgrad_bf16_every_path(X, Y, counts, pad, a_layout):
    a, _, g, offs = gmm_inputs(counts, X, Y, pad=pad, seed=1)
    a = view2d(a, a_layout)
    for g_layout in ["contig", "transposed", "misaligned", "strided_cols"]:
        check_wgrad(a, view2d(g, g_layout), offs)


def test_grouped_mm_bf16_single_thread_blocks():
    """One thread: tiles of whole experts, so 193/400-row experts run through the 192-row block."""
    with one_thread():
        for X, Y, counts in [(9, 70, [400, 193, 0, 1]), (10, 65, [1500, 7])]:
            a, b, g, offs = gmm_inputs(counts, X, Y, pad=2, seed=2)
            check_forward(a, b, offs)
            check_forward(a, view3d(b, "transposed"), offs)
            check_wgrad(view2d(a, "transposed"), g, offs)


def test_grouped_mm_bf16_packs_b_in_chunks():
    """K = X = 2048 is 1024 pairs: 16 panels of 64 columns fill one 4 MiB chunk of packed B, so
    Y = 1100 (18 panels, the last 12 columns wide) takes two chunks; a transposed ``a`` is packed
    again for each. One thread keeps each expert's columns in one call (no column split)."""
    a, b, _, offs = gmm_inputs([7, 7], 2048, 1100, seed=5)
    with one_thread():
        for a_layout in ["contig", "transposed"]:  # A in place / A packed per chunk
            for b_layout in ["contig", "transposed", "strided"]:  # B by rows / words / gather
                check_forward(view2d(a, a_layout), view3d(b, b_layout), offs)


def test_grouped_mm_wgrad_bf16_packs_b_in_chunks():
    """Weight gradient, K = an expert's rows: 2100 (1050 pairs) and 2101 (odd, zero-padded to
    1051) both give 15 panels per chunk, so Y = 1000 (16 panels, the last 40 columns wide) takes
    two chunks and A = a^T is packed again for each. N = 4204 is even, so for the first expert a
    transposed a (and g) is read in place; the second starts at row 2100 with an odd K: packed."""
    a, _, g, offs = gmm_inputs([2100, 0, 2101], 13, 1000, pad=3, seed=6)
    with one_thread():
        for a_layout in ["contig", "transposed"]:
            for g_layout in ["contig", "transposed"]:
                check_wgrad(view2d(a, a_layout), view2d(g, g_layout), offs)


def test_grouped_mm_bf16_empty_dims():
    """X = 0 (the forward's K): every routed row is an empty sum, zero. Y = 0 and no rows at all."""
    a, b, g, offs = gmm_inputs([3, 0, 4], 0, 19)
    c = ops.grouped_mm(a, b, offs)
    assert c.shape == (a.shape[0], 19) and (c == 0).all() and not c.isnan().any()
    assert wgrad(a, g, offs).shape == (3, 0, 19)
    for counts, X, Y in [([3, 4], 5, 0), ([0, 0], 5, 4)]:
        a, b, g, offs = gmm_inputs(counts, X, Y, pad=0)
        check_forward(a, b, offs)
        check_wgrad(a, g, offs)


def test_grouped_mm_bf16_reused_block_padding_is_zero():
    """A cached output block comes back with the old tensor's bytes: padding rows and experts
    without rows must still be written as zero, never left as stale NaN."""
    counts, X, Y = [0, 2000, 0, 5], 20, 400  # 2010 x 400 bf16 outputs: 1.6 MB, cached
    a, b, g, offs = gmm_inputs(counts, X, Y, pad=10, seed=3)
    for _ in range(3):  # each round frees a NaN-filled output of each shape, then reuses it
        c = ops.grouped_mm(a, b, offs)
        check_forward(a, b, offs)
        c.fill_(float("nan"))
        del c
        w = wgrad(a.t().contiguous().t(), g, offs)  # (4, 20, 400): small, but exercise it too
        w.fill_(float("nan"))
        del w
        check_wgrad(a, g, offs)


@st.composite
def gemm_problems(draw):
    E = draw(st.integers(1, 10))
    counts = draw(st.lists(st.one_of(st.sampled_from([0, 1, 5, 6, 7, 12, 193]), st.integers(0, 40)),
                           min_size=E, max_size=E))
    X = draw(st.one_of(st.sampled_from([1, 2, 3, 16, 31, 64]), st.integers(1, 90)))
    Y = draw(st.one_of(st.sampled_from([1, 15, 16, 17, 64, 65, 129]), st.integers(1, 140)))
    return dict(counts=counts, X=X, Y=Y, pad=draw(st.integers(0, 4)), seed=draw(st.integers(0, 2**20)),
                a_layout=draw(st.sampled_from(A_LAYOUTS)), b_layout=draw(st.sampled_from(B_LAYOUTS)),
                g_layout=draw(st.sampled_from(A_LAYOUTS)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=gemm_problems())
def test_grouped_mm_bf16_property(p):
    a, b, g, offs = gmm_inputs(p["counts"], p["X"], p["Y"], pad=p["pad"], seed=p["seed"])
    a = view2d(a, p["a_layout"])
    check_forward(a, view3d(b, p["b_layout"]), offs)
    check_wgrad(a, view2d(g, p["g_layout"]), offs)


# ---------------------------------------------------------------- denormals and MOE_CPU_GEMM

KERNEL_ACTIVE = cpu_has_avx512_bf16() and os.environ.get("MOE_CPU_GEMM", "auto") in ("", "auto")


@pytest.mark.skipif(not KERNEL_ACTIVE, reason="needs the AVX-512 BF16 kernel (CPU flag, MOE_CPU_GEMM)")
def test_grouped_mm_bf16_flushes_denormals_as_documented():
    """The accepted limitation (csrc/gemm_bf16.cpp): vdpbf16ps reads denormal inputs as zero and
    flushes each denormal product, so these come out exactly as the float64 product with both
    flushes applied; where nothing is denormal the result is the exact product."""
    t = 2.0**-63
    A = torch.tensor([[1.0, 0.0], [t, 0.0], [1.5, 0.75],  # normal products only
                      [0.0, t], [1e-39, 0.0], [t, t], [t, -t]], dtype=torch.float64).to(BF16)
    B = torch.tensor([[t, 2.0**100, 2.0], [2.0**-64, 0.0, 4.0]], dtype=torch.float64).to(BF16)
    tiny = torch.finfo(torch.float32).tiny  # 2^-126, the smallest normal

    def daz(x):  # denormals (and anything below the smallest normal) read as zero
        return torch.where(x.abs() < tiny, 0.0, x)

    prods = daz(A.double())[:, :, None] * daz(B.double())[None]  # (rows, K, Y)
    want = daz(prods).sum(1)
    exact = A.double() @ B.double()
    # Rows 0-2 are unaffected: t * 2^-63 = 2^-126 is normal. Row 3's 2^-127 and the 1e-39 input of
    # row 4 (even times 2^100) are lost; rows 5-6 lose their 2^-127 term.
    assert torch.equal(want[:3], exact[:3]) and (want[3:] != exact[3:]).any(1).all()
    assert want[3:5, :2].eq(0).all()
    got = ops.grouped_mm(A, B[None], torch.tensor([7], dtype=torch.int32))
    assert torch.equal(got.double(), want)
    got_w = wgrad(A.t().contiguous(), B, torch.tensor([2], dtype=torch.int32))  # (A^T)^T B
    assert torch.equal(got_w[0].double(), want)


# A 2^-63 * 2^-64 product: the kernel flushes it, at::mm keeps it (on tiny shapes, here). probe()
# returns (row 1 exact, the product flushed, equal to at::mm).
GEMM_PROBE = """
    import json
    import torch
    from moe import ops
    a = torch.tensor([[0.0, 2.0 ** -63], [1.0, 3.0]]).to(torch.bfloat16)
    b = torch.tensor([[[1.0, 2.0], [2.0 ** -64, -1.0]]]).to(torch.bfloat16)
    offs = torch.tensor([2], dtype=torch.int32)
    def probe():
        c = ops.grouped_mm(a, b, offs)
        return (torch.equal(c[1], torch.tensor([1.0, -1.0], dtype=torch.bfloat16)), bool(c[0, 0] == 0),
                torch.equal(c, a @ b[0]))
"""


@pytest.mark.parametrize("value", ["", "auto"])
def test_moe_cpu_gemm_auto_uses_the_kernel(value):
    row1_exact, flushed, _ = run_json(GEMM_PROBE + """
    print(json.dumps(probe()))
    """, MOE_CPU_GEMM=value)
    assert row1_exact
    if cpu_has_avx512_bf16():
        assert flushed


def test_moe_cpu_gemm_aten_uses_at_mm():
    """MOE_CPU_GEMM=aten (read once per process) forces at::mm: bit for bit at::mm per expert on
    the probe, and the usual checks on a larger problem (outputs computed in the child)."""
    out = run_saved(GEMM_PROBE + """
    import os
    from tests.helpers.cpu_kernels import gmm_inputs, view2d, view3d, wgrad
    a2, b2, g2, offs2 = gmm_inputs([5, 0, 193, 7], 33, 70, seed=4)
    fwd = [ops.grouped_mm(a2, view3d(b2, lay), offs2) for lay in ["contig", "transposed"]]
    torch.save(dict(probe=probe(), fwd=fwd, wgrad=wgrad(view2d(a2, "transposed"), g2, offs2)),
               os.environ["MOE_TEST_OUT"])
    """, MOE_CPU_GEMM="aten")
    row1_exact, _, same_as_mm = out["probe"]
    assert row1_exact and same_as_mm
    a, b, g, offs = gmm_inputs([5, 0, 193, 7], 33, 70, seed=4)
    for lay, got in zip(["contig", "transposed"], out["fwd"]):
        check_forward(a, view3d(b, lay), offs, got=got)
    check_wgrad(view2d(a, "transposed"), g, offs, got=out["wgrad"])


BAD_GEMM_VALUES = ["avx512", "AUTO", " aten", "aten ", "0"]


def test_moe_cpu_gemm_bad_value_names_the_variable():
    """Any other value: a RuntimeError naming MOE_CPU_GEMM and the value at the first bfloat16 GEMM
    (forward or weight gradient). It is read again until it is valid: "auto" then works."""
    out = run_json(GEMM_PROBE + f"""
    import os
    errors = []
    for value in {BAD_GEMM_VALUES!r}:
        os.environ["MOE_CPU_GEMM"] = value
        for call in (probe, lambda: torch.ops.moe.grouped_mm_wgrad(a, a, offs)):
            try:
                call()
                errors.append(None)
            except Exception as err:
                errors.append([type(err).__name__, str(err)])
    os.environ["MOE_CPU_GEMM"] = "auto"
    print(json.dumps(dict(errors=errors, probe=probe())))
    """, MOE_CPU_GEMM="avx512")
    assert len(out["errors"]) == 2 * len(BAD_GEMM_VALUES)
    for i, error in enumerate(out["errors"]):
        value = BAD_GEMM_VALUES[i // 2]
        assert error is not None, f"no error for MOE_CPU_GEMM={value!r}"
        assert error[0] == "RuntimeError" and "MOE_CPU_GEMM" in error[1] and repr(value) in error[1], error
    row1_exact, flushed, _ = out["probe"]
    assert row1_exact
    if cpu_has_avx512_bf16():
        assert flushed
