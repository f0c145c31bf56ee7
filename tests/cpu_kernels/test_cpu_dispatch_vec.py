"""Tests for csrc/cpu_vec.h: the AVX-512 bfloat16 and float32 row loops of permute / unpermute /
unpermute_weights_grad, bit for bit equal to the PyTorch twins (and the weight-gradient dot to the
scalar float16 loop), on values that round to ties, denormals, infinities and the largest finite
values; NaN only where the definition puts it.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim.
"""

import pytest
import torch

from moe import ops
from moe.ops.twins import permute_torch, unpermute_torch, unpermute_weights_grad_torch
from tests.helpers.cpu_kernels import BF16
from tests.helpers.ops import make_ids

# Every test here is about the compiled kernels: without them the twins would only meet themselves.
pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

TIE = 2.0**-8  # 1 + TIE is the midpoint between 1 and the next bfloat16 (1 + 2^-7)
SPECIAL = [1e-39, -1e-39, 9.2e-41, -0.0, 0.0, 3.3e38, -3.3e38, 3.38e38, float("inf"), float("-inf"),
           1.0, 1.0 + 2 * TIE, TIE, -TIE, 3 * TIE, 1.5, -2.0, 1e-38, 1.2e-38]
SCALES = [1 + TIE, 1 + 3 * TIE, -(1 + TIE), 0.5, 2.0, 1e-3, 1e-30, 3.0, 1.7, 1e37, 0.999]


def dispatch_values(R, D, seed, dtype=BF16):
    """(R, D): a third normal, a third special values (ties, denormals, inf, largest), a third
    coarse values whose sums and scaled copies land exactly on bf16 midpoints."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(R, D, generator=gen) * 10.0 ** torch.randint(-3, 4, (R, D), generator=gen)
    special = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (R, D), generator=gen)]
    coarse_values = torch.tensor([1.0, 1.0 + 2 * TIE, TIE, -TIE, 0.5, 2.0])
    coarse = coarse_values[torch.randint(0, 6, (R, D), generator=gen)]
    pick = torch.randint(0, 3, (R, D), generator=gen)
    return torch.where(pick == 0, normal, torch.where(pick == 1, special, coarse)).to(dtype)


def dispatch_weights(T, K, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.tensor(SCALES)[torch.randint(0, len(SCALES), (T, K), generator=gen)]
    normal = torch.randn(T, K, generator=gen)
    return torch.where(torch.rand(T, K, generator=gen) < 0.3, normal, w).to(dtype)


def assert_same_bits(got, want):
    """Bit-for-bit equality (so -0.0 != 0.0), NaN only at the same positions (NaN payloads may
    differ: c10::BFloat16 writes 0x7FC0, ATen's vectorized conversion another pattern)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = got.isnan()
    assert torch.equal(nan, want.isnan())
    zero = torch.zeros((), dtype=got.dtype)
    bits = torch.int16 if got.element_size() == 2 else torch.int32
    assert torch.equal(torch.where(nan, zero, got).view(bits), torch.where(nan, zero, want).view(bits))


def is_tie(acc):
    """float32 values exactly halfway between two bfloat16 values."""
    return (acc.view(torch.int32) & 0xFFFF) == 0x8000


def is_denormal(x):
    x = x.float().abs()
    return (x > 0) & (x < torch.finfo(torch.float32).tiny)


DIMS = [1, 15, 17, 33, 1024]
VEC_DTYPES = [BF16, torch.float32]  # the dtypes with AVX-512 row loops


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", VEC_DTYPES)
@pytest.mark.parametrize("scale", [None, "float32", "same"])
@pytest.mark.parametrize("row_stride", [0, 3])
def test_permute_bits_equal_twin(D, dtype, scale, row_stride):
    T, K, E = 37, 3, 5
    ids = make_ids(T, K, E, seed=D)
    ids[:2, 0] = 1  # tokens 0, 1 routed: a denormal product and a tie, planted
    p = ops.plan(ids, E)
    x = dispatch_values(T, D + row_stride, seed=D, dtype=dtype)[:, :D]  # rows at odd offsets
    x[0], x[1] = 1e-38, 3.0
    s_dtype = dtype if scale == "same" else torch.float32
    s = None if scale is None else dispatch_weights(T, K, seed=1, dtype=s_dtype)
    if s is not None:
        # 0.5e-38 is denormal; 3 * (1 + 2^-7) = 3 + 3 * 2^-7 is a bf16 tie, rounded up to 3 + 2^-5
        s[0, 0], s[1, 0] = 0.5, 1 + 2 * TIE
    got = ops.permute(x, p, s)
    assert_same_bits(got, permute_torch(x, p.order_N, p.rows_TK, s))
    assert (got[int(p.offs_E[-1]):] == 0).all() and not got[int(p.offs_E[-1]):].signbit().any()
    if s is not None:
        r0, r1 = p.rows_TK[0, 0], p.rows_TK[1, 0]  # the planted cases
        assert is_denormal(got[r0]).all()
        if dtype == BF16:  # the float32 loop on the same inputs, rounded once: the same bits
            prod = ops.permute(x.float(), p, s.float())
            assert_same_bits(got, prod.to(BF16))
            assert is_tie(prod[r1]).all() and (got[r1] == 3 + 2**-5).all()


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", VEC_DTYPES)
@pytest.mark.parametrize("weights", [None, "float32", "same"])
@pytest.mark.parametrize("row_stride", [0, 3])
def test_unpermute_bits_equal_twin(D, dtype, weights, row_stride):
    T, K, E = 29, 4, 6
    ids = make_ids(T, K, E, seed=D + 1)
    ids[:2] = torch.tensor([[0, 1, -1, 2], [3, -1, 4, 5]])
    p = ops.plan(ids, E)
    y = dispatch_values(T * K, D + row_stride, seed=D + 2, dtype=dtype)[:, :D]
    y[int(p.offs_E[-1]):] = float("nan")  # padding rows are never read
    r0, r1 = p.rows_TK[0], p.rows_TK[1]  # planted: token 0 sums denormals, token 1 a bf16 tie
    y[r0[[0, 1, 3]]] = torch.tensor([1e-39, 2e-39, -5e-40]).to(dtype)[:, None]
    y[r1[[0, 2, 3]]] = torch.tensor([1.0, TIE, 0.0]).to(dtype)[:, None]
    w_dtype = dtype if weights == "same" else torch.float32
    w = None if weights is None else dispatch_weights(T, K, seed=3, dtype=w_dtype)
    if w is not None:
        w[:2] = 1.0
    got = ops.unpermute(y, p, w)
    assert_same_bits(got, unpermute_torch(y, p.order_N, p.rows_TK, w))
    assert is_denormal(got[0]).all()
    if dtype == BF16:
        acc = ops.unpermute(y.float(), p, None if w is None else w.float())  # same float32 sums
        assert_same_bits(got, acc.to(BF16))
        assert is_tie(acc[1]).all() and (got[1] == 1).all()


@pytest.mark.parametrize("dtype", VEC_DTYPES)
def test_dispatch_nan_propagates_to_the_same_positions(dtype):
    T, K, E, D = 23, 3, 4, 33
    p = ops.plan(make_ids(T, K, E, seed=5), E)
    x = dispatch_values(T, D, seed=6, dtype=dtype)
    x[torch.rand(T, D, generator=torch.Generator().manual_seed(7)) < 0.1] = float("nan")
    s = dispatch_weights(T, K, seed=8)
    s[0, 0], s[3, 1] = float("nan"), 0.0  # a NaN scale; 0 * inf = NaN
    x[3, 0] = float("inf")
    y = x.repeat_interleave(K, 0)  # (T*K, D): NaN rows, inf rows and their sums
    for got, want in [
        (ops.permute(x, p, s), permute_torch(x, p.order_N, p.rows_TK, s)),
        (ops.permute(x, p), permute_torch(x, p.order_N, p.rows_TK)),
        (ops.unpermute(y, p, s), unpermute_torch(y, p.order_N, p.rows_TK, s)),
        (ops.unpermute(y, p), unpermute_torch(y, p.order_N, p.rows_TK)),
    ]:
        assert got.isnan().any()
        assert_same_bits(got, want)
    got = ops.permute(x, p, s)  # the positions the definition gives: x's NaNs, and the NaN scale
    slot = p.order_N.clamp(min=0)
    nan_rows = x.isnan()[slot // K] | s.reshape(-1)[slot].isnan()[:, None] | \
        (x.isinf()[slot // K] & (s.reshape(-1)[slot] == 0)[:, None])
    assert torch.equal(got.isnan(), nan_rows & (p.order_N >= 0)[:, None])


def half_exact(x):
    """``x`` with every value exactly representable in float16 too (tiny ones zeroed)."""
    return torch.where(x.abs() < 2.0**-14, torch.zeros((), dtype=x.dtype), x)


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", VEC_DTYPES)
def test_unpermute_weights_grad_vec(D, dtype):
    T, K, E = 31, 3, 5
    p = ops.plan(make_ids(T, K, E, seed=D + 3), E)
    gen = torch.Generator().manual_seed(D)
    g = half_exact(torch.randn(T, D, generator=gen).to(BF16)).to(dtype)
    y = half_exact(torch.randn(T * K, D, generator=gen).to(BF16)).to(dtype)
    y[int(p.offs_E[-1]):] = float("nan")  # never read
    wgrad_op = torch.ops.moe.unpermute_weights_grad
    got = wgrad_op(g, y, p.order_N, p.rows_TK)
    assert got.dtype == torch.float32 and (got[p.rows_TK < 0] == 0).all()
    # float16 runs the scalar loop (no AVX-512 version) on the same values, exactly upcast: the
    # same products summed in the same order (16 lane sums, then lanes 0..15), bit for bit.
    scalar = wgrad_op(g.half(), y.half(), p.order_N, p.rows_TK)
    assert torch.equal(got.view(torch.int32), scalar.view(torch.int32))
    if dtype == BF16:
        f32 = wgrad_op(g.float(), y.float(), p.order_N, p.rows_TK)
        assert torch.equal(got.view(torch.int32), f32.view(torch.int32))
    ref = unpermute_weights_grad_torch(g.double(), y.double(), p.order_N, p.rows_TK)
    mag = unpermute_weights_grad_torch(g.double().abs(), y.double().abs(), p.order_N, p.rows_TK)
    u = 2.0**-24
    assert ((got.double() - ref).abs() <= D * u / (1 - D * u) * mag).all()  # Higham's bound
    twin = unpermute_weights_grad_torch(g, y, p.order_N, p.rows_TK)
    assert (got.double() - ref).abs().max() <= 2 * (twin.double() - ref).abs().max() + 1e-12


def test_unpermute_weights_grad_special_values():
    T, K, E, D = 19, 2, 3, 33
    p = ops.plan(make_ids(T, K, E, seed=9), E)
    g, y = dispatch_values(T, D, seed=10), dispatch_values(T * K, D, seed=11)
    got = torch.ops.moe.unpermute_weights_grad(g, y, p.order_N, p.rows_TK)
    f32 = torch.ops.moe.unpermute_weights_grad(g.float(), y.float(), p.order_N, p.rows_TK)
    assert got.isnan().any()  # inf * 0 and inf - inf
    assert_same_bits(got, f32)


@pytest.mark.parametrize("dtype", VEC_DTYPES)
@pytest.mark.parametrize("scale", [None, "float32"])
def test_permute_streaming_stores_bits_equal_twin(dtype, scale):
    """Outputs of 8 MiB and more are written with non-temporal stores (rows of a multiple of 64
    bytes): the same bits as the twin, the padding rows still zero. The 16 MiB output here is
    8192 rows of 1024 bf16 (2 KiB) or 4096 rows of 1024 float32 (4 KiB), incl. empty slots."""
    T, K, E, D = (2048, 4, 8, 1024) if dtype == BF16 else (1024, 4, 8, 1024)
    ids = make_ids(T, K, E, seed=3)
    ids[::7, 1] = -1  # empty slots: padding rows past offs_E[-1]
    p = ops.plan(ids, E)
    x = dispatch_values(T, D, seed=4, dtype=dtype)
    s = None if scale is None else dispatch_weights(T, K, seed=5)
    got = ops.permute(x, p, s)
    assert got.numel() * got.element_size() >= 8 << 20
    assert_same_bits(got, permute_torch(x, p.order_N, p.rows_TK, s))
    n = int(p.offs_E[-1])
    assert n < got.shape[0] and (got[n:] == 0).all()
