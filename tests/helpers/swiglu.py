"""Inputs and the one-rounding comparison shared by the SwiGLU tests (CPU and CUDA kernels).

Shape legend: F expert hidden size, H = 2F the first projection's width ([gate; up]).
"""

import torch

# One rounding of the output dtype (relative), plus the float32 e^x polynomial's 2e-7.
ULP = {torch.float32: 2e-6, torch.float64: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def close_to(a, b, dtype):
    """|a - b| <= ULP(dtype) |b| + floor: agreement to one rounding of the output dtype. The floor
    is the subnormal spacing (float16 outputs under 6e-5 round to multiples of 6e-8), and at
    least 1e-30: silu(g) for g < -88.7 is 0 in float32, as in PyTorch, where e^-g overflows."""
    a, b = a.double(), b.double()
    tol = ULP[dtype] * b.abs() + max(1e-30, torch.finfo(dtype).tiny * ULP[dtype])
    return bool(((a - b).abs() <= tol).all())


def inputs(shape, F_, dtype, seed=0, scale=4.0):
    """h (..., 2F) scaled by ``scale`` and an output gradient (..., F), both in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, 2 * F_, generator=g) * scale).to(dtype)
    grad = torch.randn(*shape, F_, generator=g).to(dtype)
    return h, grad
