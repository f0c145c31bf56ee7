"""Helpers shared by the CPU kernel tests (tests/cpu_kernels/, tests/ops/test_host_cache.py): memory
layouts with NaN in every gap, grouped-GEMM inputs and the project's GEMM rule, and fresh-interpreter
runners for variables read once per process (the child reports what it measured; the test asserts).

Shape legend: N routed rows, E experts, X/Y GEMM input/output dims, R/C rows/columns of a 2-D view.
"""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import torch
from hypothesis import strategies as st

from moe import ops
from moe.ops.twins import grouped_mm_torch, grouped_mm_wgrad_torch

BF16 = torch.bfloat16
F32 = torch.float32
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
A_LAYOUTS = ["contig", "transposed", "col_slice", "misaligned", "strided_cols"]
B_LAYOUTS = ["contig", "transposed", "transposed_misaligned", "odd_rows", "strided"]


def view2d(x, layout):
    """Same values as the 2-D ``x`` in another memory layout; elements outside the view are NaN,
    so a kernel that reads past a row end (or a padding row) shows it in its output."""
    R, C = x.shape
    if layout == "contig":
        return x.clone()
    if layout == "transposed":  # stride(1) != 1 (column-major)
        return x.t().contiguous().t()
    shapes = {"col_slice": (C + 1, 0), "misaligned": (C + 2, 1), "strided_cols": (2 * C + 1, 0)}
    width, c0 = shapes[layout]
    big = torch.full((R, width), float("nan"), dtype=x.dtype)
    step = 2 if layout == "strided_cols" else 1
    big[:, c0 : c0 + step * C : step] = x
    return big[:, c0 : c0 + step * C : step]


def view3d(b, layout):
    """Same values as (E, X, Y) ``b``: contiguous, a transposed (E, Y, X) buffer (possibly at an
    odd element offset), odd row stride at an odd offset, or column stride 3; NaN in the gaps."""
    E, X, Y = b.shape
    nan = float("nan")
    if layout == "contig":
        return b.clone()
    if layout == "transposed":
        return b.transpose(-2, -1).contiguous().transpose(-2, -1)
    if layout == "transposed_misaligned":
        big = torch.full((E, Y, X + 2), nan, dtype=b.dtype)
        big[..., 1 : X + 1] = b.transpose(-2, -1)
        return big[..., 1 : X + 1].transpose(-2, -1)
    if layout == "odd_rows":
        big = torch.full((E, X + 1, Y + 3), nan, dtype=b.dtype)
        big[:, 1:, 1 : Y + 1] = b
        return big[:, 1:, 1 : Y + 1]
    big = torch.full((E, X, 3 * Y + 1), nan, dtype=b.dtype)  # "strided": column stride 3
    big[..., 1 : 1 + 3 * Y : 3] = b
    return big[..., 1 : 1 + 3 * Y : 3]


def gmm_inputs(counts, X, Y, *, pad=3, seed=0):
    """bf16 a_NX (rows past offs_E[-1] NaN: never read), b_EXY, g_NY and int32 offs_E."""
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).int()
    n = int(offs[-1])
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n + pad, X, generator=gen).to(BF16)
    g = torch.randn(n + pad, Y, generator=gen).to(BF16)
    a[n:], g[n:] = float("nan"), float("nan")
    b = torch.randn(len(counts), X, Y, generator=gen).to(BF16)
    return a, b, g, offs


def f32_inputs(counts, X, Y, *, pad=3, seed=0):
    """float32 a_NX, b_EXY, g_NY (rows past offs_E[-1] NaN: never read) and int32 offs_E."""
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).int()
    n = int(offs[-1])
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n + pad, X, generator=gen)
    g = torch.randn(n + pad, Y, generator=gen)
    a[n:], g[n:] = float("nan"), float("nan")
    return a, torch.randn(len(counts), X, Y, generator=gen), g, offs


def around(s):
    """Rows per expert at the boundaries of the streamed path's choice (s = its most rows), with
    empty experts between them."""
    return [0, 1, s - 1, 0, s, s + 1, 2]


def stream_inputs(counts, X, Y, dtype, *, seed=0, pad=2):
    """a_NX (rows past offs_E[-1] NaN: never read), b_EXY, int32 offs_E. float32 problems get a
    64-row expert at the end: the float32 kernel runs where a GEMM has 64 routed rows, and the rule
    is compared over at least 64 x 64 outputs."""
    counts = list(counts) + ([64] if dtype == F32 else [])
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).int()
    n = int(offs[-1])
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n + pad, X, generator=gen).to(dtype)
    a[n:] = float("nan")
    return a, torch.randn(len(counts), X, Y, generator=gen).to(dtype), offs


def assert_forward_rule(got, a, b, offs):
    """Padding rows exactly zero; error vs float64 at most 2x the same-dtype twin's."""
    n = int(offs[-1])
    assert got.shape == (a.shape[0], b.shape[2]) and got.dtype == a.dtype
    assert (got[n:] == 0).all() and not got.isnan().any()
    ref = grouped_mm_torch(a[:n].double(), b.double(), offs)
    twin = grouped_mm_torch(a[:n], b, offs)
    err = (got[:n].double() - ref).abs().max().item() if n else 0.0
    err_twin = (twin.double() - ref).abs().max().item() if n else 0.0
    assert err <= 2 * err_twin, (err, err_twin)


def counts_plan(counts, T_extra=0, seed=0):
    """A one-slot plan whose experts get ``counts`` rows (tokens in a shuffled order), over
    T = sum(counts) + T_extra tokens (the extra ones routed nowhere: id -1)."""
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ids = torch.cat([ids, torch.full((T_extra,), -1)])
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))
    return ops.plan(ids[perm][:, None], len(counts))


def wgrad(a_NX, g_NY, offs_E):
    return torch.ops.moe.grouped_mm_wgrad(a_NX, g_NY, offs_E)


def assert_twice_torch(got, ref, twin):
    """The project's GEMM rule: max error vs float64 at most 2x that of same-dtype PyTorch."""
    assert got.shape == twin.shape and got.dtype == twin.dtype == BF16
    assert not got.isnan().any()
    err = (got.double() - ref).abs().max().item() if got.numel() else 0.0
    err_pt = (twin.double() - ref).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * err_pt, (err, err_pt)


def check_forward(a, b, offs, got=None):
    """The bf16 forward rule; ``got`` is ops.grouped_mm(a, b, offs) (computed here when None)."""
    n = int(offs[-1])
    got = ops.grouped_mm(a, b, offs) if got is None else got
    assert got.shape == (a.shape[0], b.shape[2])
    assert (got[n:] == 0).all() and not got[n:].isnan().any()  # padding rows exactly zero
    assert_twice_torch(got[:n], grouped_mm_torch(a[:n].double(), b.double(), offs),
                       grouped_mm_torch(a[:n], b, offs))


def check_wgrad(a, g, offs, got=None):
    """The bf16 weight-gradient rule; ``got`` is wgrad(a, g, offs) (computed here when None)."""
    n = int(offs[-1])
    got = wgrad(a, g, offs) if got is None else got
    assert got.shape == (offs.shape[0], a.shape[1], g.shape[1])
    empty = offs.diff(prepend=offs.new_zeros(1)) == 0
    assert (got[empty] == 0).all() and not got[empty].isnan().any()  # experts without rows
    assert_twice_torch(got, grouped_mm_wgrad_torch(a[:n].double(), g[:n].double(), offs),
                       grouped_mm_wgrad_torch(a[:n], g[:n], offs))


@contextlib.contextmanager
def one_thread():
    """A single ATen thread: the grouped GEMM then never splits an expert's output columns."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cpu_has_avx512_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def run_python(code, **env):
    """Runs ``code`` in a fresh interpreter, where variables read once per process (``None``:
    unset) take effect; asserts it printed OK and returns its stdout."""
    full_env = {k: v for k, v in os.environ.items() if k not in env}
    full_env.update({k: v for k, v in env.items() if v is not None})
    full_env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=full_env, cwd=ROOT, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), (res.returncode,
                                                                       res.stderr[-3000:])
    return res.stdout


def run_json(code, **env):
    """Runs ``code`` in a fresh interpreter (see run_python); its last stdout line is one JSON
    value, the measurements the calling test asserts on. Returns that value."""
    return json.loads(run_python(textwrap.dedent(code) + "\nprint('OK')\n", **env).strip().splitlines()[-2])


def run_saved(code, **env):
    """Runs ``code`` in a fresh interpreter (see run_python), where it saves one object with
    ``torch.save(obj, os.environ["MOE_TEST_OUT"])``; returns that object (tensors the calling test
    checks in its own process)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.pt")
        run_python(textwrap.dedent(code) + "\nprint('OK')\n", MOE_TEST_OUT=path, **env)
        return torch.load(path)


@st.composite
def stream_problems(draw, S, b_layouts, gathered=False):
    """A random grouped GEMM around the streamed paths' bound S (rows per expert): up to 8 experts
    of 0..2S+2 rows (S - 1, S, S + 1 often), X and Y from 1 (bfloat16) or 64 (float32: smaller
    float32 GEMMs run on at::mm) to 300, an A layout and one of ``b_layouts``; ``gathered`` also
    draws whether the rows are gathered."""
    dtype = draw(st.sampled_from([BF16, F32]))
    E = draw(st.integers(1, 8))
    counts = draw(st.lists(st.one_of(st.sampled_from([0, 1, S - 1, S, S + 1]), st.integers(0, 2 * S + 2)),
                           min_size=E, max_size=E))
    lo = 64 if dtype == F32 else 1
    X = draw(st.one_of(st.sampled_from([lo, lo + 1, 2 * lo + 3]), st.integers(lo, 300)))
    Y = draw(st.one_of(st.sampled_from([lo, lo + 1, 129]), st.integers(lo, 300)))
    p = dict(counts=counts, X=X, Y=Y, dtype=dtype, seed=draw(st.integers(0, 2**20)),
             a_layout=draw(st.sampled_from(A_LAYOUTS)), b_layout=draw(st.sampled_from(b_layouts)))
    if gathered:
        p["gathered"] = draw(st.booleans())
    return p
