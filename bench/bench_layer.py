"""pytest-benchmark suite for the MoE layer (the same candidates as ``python -m bench.layer``).

    python -m pytest bench/bench_layer.py --benchmark-only                       # T=256 (quick)
    MOE_BENCH_T=4096 python -m pytest bench/bench_layer.py --benchmark-only      # the reference layer size

Shape legend: T tokens, D hidden size, F expert hidden size, E experts, K top-k. Each benchmark
times one call (forward, or forward+backward) of one candidate on one (dtype, shape); compare
candidates with ``--benchmark-group-by=param:shape,param:dtype,param:mode``. Speed is measured
here and in bench/, never asserted in tests/.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.layer import MODES, _candidates, _step
from bench.ops import SHAPES
from moe import DenseFFN, MoELayer

T = int(os.environ.get("MOE_BENCH_T", "256"))
NAMES = ("dense", "hf_eager", "hf_gmm", "moekit")

_cache: dict = {}


def _setup(shape, dtype):
    key = (shape, dtype)
    if key not in _cache:
        _cache.clear()  # one shape's weights at a time
        D, Fh, E, K = shape
        torch.manual_seed(0)
        layer = MoELayer(D, Fh, E, K).to(dtype)
        dense = DenseFFN(D, K * Fh).to(dtype)
        x = torch.randn(T, D).to(dtype)
        _cache[key] = (layer, dense, x, _candidates(layer, dense, x))
    return _cache[key]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"D{d}-F{f}-E{e}-K{k}" for d, f, e, k in SHAPES])
def test_layer(benchmark, shape, dtype, name, mode):
    layer, dense, x, cands = _setup(shape, dtype)
    if name not in cands:
        pytest.skip("transformers is not installed")
    if name == "hf_eager" and mode == "fwd+bwd" and shape[2] > 8:
        pytest.skip("transformers' eager backward builds a full (E, 2F, D) gradient per expert: minutes")
    for m in (layer, dense):
        m.train(mode != "fwd")
    step = _step(cands[name], x, mode)
    with torch.set_grad_enabled(mode != "fwd"):
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    layer.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
