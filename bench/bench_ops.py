"""pytest-benchmark versions of the op benchmarks in bench/ops.py (same shapes and baselines).

    python -m pytest bench/bench_ops.py --benchmark-only      # T=4096, the reference op shapes

Each benchmark is grouped by (op, dtype, shape), so pytest-benchmark's table puts the candidates
of one shape side by side. The file name does not match ``test_*.py`` and ``testpaths`` is
``tests``, so ``pytest`` / ``pytest tests/`` never collect it.
Shape legend: T tokens, K top-k slots, E experts, N routed rows (T*K), D model dim, F expert
hidden dim.
"""

import pytest
import torch
import torch.nn.functional as F

from bench import fused
from bench.ops import SHAPES, dispatch_baseline, dispatch_ours, random_topk_ids
from moe import ops

T = 4096
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHAPE_IDS = [f"D{d}-F{f}-E{e}-K{k}" for d, f, e, k in SHAPES]


def _gmm_inputs(shape, dtype):
    D, Fh, E, K = shape
    ids = random_topk_ids(T, E, K)
    g = torch.Generator().manual_seed(1)
    a_ND = torch.randn(T * K, D, generator=g).to(dtype)
    w_EDF = (torch.randn(E, D, Fh, generator=g) / D**0.5).to(dtype)
    return a_ND, w_EDF, ops.plan(ids, E).offs_E


GMM_IMPLS = {
    "ours": lambda a, w, offs: ops.grouped_mm(a, w, offs),
    "F.grouped_mm": lambda a, w, offs: F.grouped_mm(a, w, offs=offs),
    "loop": lambda a, w, offs: ops.grouped_mm_torch(a, w, offs),
}


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", list(GMM_IMPLS) + ["dense"])
def test_grouped_mm(benchmark, impl, dtype, shape):
    a, w, offs = _gmm_inputs(shape, DTYPES[dtype])
    benchmark.group = f"grouped_mm {dtype} {SHAPE_IDS[SHAPES.index(shape)]}"
    benchmark.extra_info["gflop"] = 2.0 * a.shape[0] * a.shape[1] * w.shape[2] / 1e9
    if impl == "dense":  # one mm of the same FLOPs
        w0 = w[0].contiguous()
        benchmark(torch.mm, a, w0)
    else:
        benchmark(GMM_IMPLS[impl], a, w, offs)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", ["ours", "baseline"])
def test_dispatch(benchmark, impl, dtype, shape):
    D, _, E, K = shape
    g = torch.Generator().manual_seed(2)
    ids = random_topk_ids(T, E, K)
    x = torch.randn(T, D, generator=g).to(DTYPES[dtype])
    w = torch.rand(T, K, generator=g)
    benchmark.group = f"dispatch {dtype} {SHAPE_IDS[SHAPES.index(shape)]}"
    benchmark(dispatch_ours if impl == "ours" else dispatch_baseline, x, ids, w, E)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("op", ["swiglu", "gather", "linear"])
@pytest.mark.parametrize("impl", ["ours", "baseline"])
def test_fused(benchmark, impl, op, dtype, shape):
    """The pairs of bench/fused.py (moekit's fused op, and what it replaces)."""
    if op == "linear" and dtype != "bfloat16":
        pytest.skip("linear_f32 is the float32 GEMM itself for float32 inputs")
    D, Fh, E, K = shape
    pair = {"swiglu": lambda: fused._swiglu_pair(T * K, Fh, DTYPES[dtype]),
            "gather": lambda: fused._gather_pair(T, D, Fh, E, K, DTYPES[dtype]),
            "linear": lambda: fused._linear_pair(T, D, E, DTYPES[dtype])}[op]()
    benchmark.group = f"{op} {dtype} {SHAPE_IDS[SHAPES.index(shape)]}"
    benchmark(pair[0] if impl == "ours" else pair[1])
