"""Non-temporal stores of the CPU grouped GEMMs (csrc/gemm_avx512.h, kNtStoreBytes): a grouped_mm
or grouped_mm_wgrad whose output takes at least moe.ops.build_info()["cpu_nt_store_bytes"] writes
its full, aligned 16-lane vectors with streaming stores, and the rest (a row's last columns,
vectors that rows of an odd width leave misaligned) with plain masked stores.

What defines it: the values do not change, only how they reach memory. So a GEMM above the size
has the same bits as the same rows computed in pieces below it (each row's sums depend only on its
row of A and the column, not on the tile: test_cpu_gemm_f32/bf16), and follows the GEMM rule
against the twin. Y = 1030 makes rows start at every alignment and leaves a masked tail.

Shape legend: N routed rows, E experts, X/Y GEMM input/output dims.
"""

import pytest
import torch

from moe import ops
from moe.ops.twins import grouped_mm_torch, grouped_mm_wgrad_torch
from tests.helpers.cpu_kernels import BF16, F32, wgrad

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

NT_BYTES = ops.build_info()["cpu_nt_store_bytes"] if ops.HAS_EXTENSION else 0
Y = 1030


def _rule(got, twin, *args):
    """The GEMM rule: error against float64 at most twice the same-dtype twin's."""
    ref = twin(*(t.double() if t.is_floating_point() else t for t in args))
    err = (got.double() - ref).abs().max().item()
    assert err <= 2 * (twin(*args).double() - ref).abs().max().item()


def _offs(counts):
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_forward_above_the_size_has_the_bits_of_its_pieces(dtype):
    size = dtype.itemsize
    N = NT_BYTES // (Y * size) + 64  # the whole output just above the size
    X, counts = 64, [N // 3, N // 3, N - 2 * (N // 3)]  # X >= 64: float32 on the AVX-512 kernel
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, X, generator=g).to(dtype)
    b = torch.randn(len(counts), X, Y, generator=g).to(dtype)
    got = ops.grouped_mm(a, b, _offs(counts))
    assert got.numel() * size >= NT_BYTES
    start = 0
    for e, n in enumerate(counts):  # one expert at a time: each output under the size
        piece = ops.grouped_mm(a[start:start + n], b[e:e + 1], _offs([n]))
        assert piece.numel() * size < NT_BYTES
        assert torch.equal(got[start:start + n], piece), f"expert {e}"
        start += n
    _rule(got, grouped_mm_torch, a, b, _offs(counts))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_wgrad_above_the_size_has_the_bits_of_its_pieces(dtype):
    size = dtype.itemsize
    X = 1000
    E = NT_BYTES // (X * Y * size) + 1
    counts = [16 + 3 * e for e in range(E)]
    g = torch.Generator().manual_seed(1)
    a = torch.randn(sum(counts), X, generator=g).to(dtype)
    gy = torch.randn(sum(counts), Y, generator=g).to(dtype)
    got = wgrad(a, gy, _offs(counts))
    assert got.numel() * size >= NT_BYTES
    start = 0
    for e, n in enumerate(counts):
        piece = wgrad(a[start:start + n], gy[start:start + n], _offs([n]))
        assert torch.equal(got[e], piece[0]), f"expert {e}"
        start += n
    _rule(got, grouped_mm_wgrad_torch, a, gy, _offs(counts))
