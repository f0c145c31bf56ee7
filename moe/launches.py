"""Counting the ops that run kernels, on any device: the launch count of issue 15 without a GPU.

``count_ops`` is a TorchDispatchMode that records every op reaching the dispatcher below autograd
(forward and backward alike) except those that run no kernel: views and aliases (``func.is_view``),
allocations (``empty*``), ``detach``/``lift_fresh`` and ops that return no tensor
(``aten.promote_types``, size queries). Each counted op is one entry; an op of ``torch.ops.moe``
counts once whether its compiled kernel or its twin runs (the twin's inner ops are not seen).

On CUDA one counted op is one kernel launch, except: cuBLAS may split a GEMM in two (split-K),
``_local_scalar_dense`` is a device-to-host copy, and moekit's CUDA ops launch several kernels
(csrc/cuda/*.cu): ``plan`` one at decode sizes (at most 2048 slots), two up to 1024 experts (the
counting sort), else a zero fill, the keys/histogram kernel, the offsets scan, cub's radix sort
(its own passes) and the finalize kernel; ``grouped_mm`` one at decode sizes (the weight-streaming
kernel), two on the sm90 path (the group setup, which also checks the offsets and writes the
padding zeros, and the CUTLASS GEMM), four around PyTorch's (offsets check, its setup and GEMM,
zeros); ``gather_grouped_mm`` one at decode sizes, two on the sm90 path (its setup launch also
gathers the rows: no permute kernel; one with sm90_gathered="fused", not the default yet), else
permute + grouped_mm; ``gather_grouped_mm_wgrad`` two on the sm90 path (one with
sm90_gathered="fused"), else permute + grouped_mm_wgrad; ``gather_grouped_mm_swiglu`` one at decode
sizes (the streaming kernel with SwiGLU's epilogue), one on sm90 with sm90_gathered="fused" (not the
default yet), else gather_grouped_mm's + the swiglu kernel; ``topk_route`` 2
kernels (route, then the final statistics, or with the loss statistics their partial sums whose
last block forms the final ones), 1 without statistics up to 64 tokens; ``linear_f32_backward`` 4 for bfloat16 (the split of the gradient into three
bfloat16 terms, two cuBLAS GEMMs, the sum of the weight gradient's three parts), else its ATen ops.
``unpermute_backward`` is one kernel (a warp per slot), as are ``permute``, ``unpermute`` and
``unpermute_weights_grad``; ``grouped_mm_unpermute`` is grouped_mm's launches and the unpermute
kernel (with swiglu the swiglu kernel first; on sm90 with sm90_gathered="fused" the gathered GEMM,
whose epilogue stores the weighted rows token-major, and the unpermute kernel summing each token's
contiguous rows: two, three with swiglu), its backward gather_grouped_mm's launches (the data
gradient), a zero fill of d weights, one row kernel (d a or with swiglu d h, d weights, the scaled
rows; a cast of bfloat16 weights to float32 before it) and gather_grouped_mm_wgrad's; ``grouped_mm_backward`` is three on the sm90 path (one setup launch
for its two GEMMs), else grouped_mm's and grouped_mm_wgrad's; ``gather_grouped_mm_backward`` four
on the sm90 path (the setup, which gathers x's rows too, two GEMMs, unpermute), else grouped_mm's,
gather_grouped_mm_wgrad's and unpermute.
bench/gpu_bench.py prints both this count and the profiler's.

:func:`layer_counts` measures a layer's forward and training step (forward, the layer's
auxiliary losses, backward into x and every parameter), the figures the tests hold to a budget.
"""

from __future__ import annotations

import collections
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_ops", "layer_counts", "NO_KERNEL"]

NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                       "lift_fresh", "detach", "alias", "_unsafe_view", "promote_types",
                       "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size"})
"""Op names (without namespace and overload) that allocate or re-describe memory: no kernel."""


def _runs_kernel(func) -> bool:
    name = func._schema.name.split("::")[-1]
    if func.is_view or name in NO_KERNEL:
        return False
    return any(str(r.type) in ("Tensor", "Tensor[]", "Tensor?") for r in func._schema.returns)


class count_ops(TorchDispatchMode):
    """``with count_ops() as c: ...`` -> ``c.total`` ops that run kernels, ``c.ops`` a Counter
    ``"namespace.op" -> calls`` (``str(c)`` lists them, most frequent first)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _runs_kernel(func):
            self.ops[f"{func.namespace}.{func._schema.name.split('::')[-1]}"] += 1
        return func(*args, **(kwargs or {}))

    def __str__(self) -> str:
        return f"{self.total}: " + ", ".join(f"{k} {v}" for k, v in self.ops.most_common())


def _sum(values):
    """The sum of a list of tensors without a leading ``0 +`` (which would be one more op)."""
    return functools.reduce(lambda a, b: a + b, values) if values else None


def layer_counts(layer: torch.nn.Module, x: torch.Tensor) -> dict:
    """{"forward", "train_forward", "step"}: :class:`count_ops` of an inference forward (eval
    mode, no grad: the "fwd" rows of bench/gpu_bench.py), of a training-mode forward (aux losses
    included) and of one training step: that forward, the sum of the layer's aux losses and the
    backward of (y, aux) into x and every parameter. The output's gradient and the loss seed are
    allocated outside the count (the caller's loss makes them); parameter gradients are None
    (and x's) before the step, as after ``zero_grad()``. One uncounted step runs first (lazy set-up). The
    layer is left in training mode."""
    x = x.detach().requires_grad_(True)
    dy = torch.ones_like(x)
    seed = torch.ones((), dtype=torch.float32, device=x.device)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        aux = _sum(list(getattr(layer, "aux_losses", {}).values()))
        pairs = [(y, dy)] + ([(aux, seed)] if aux is not None else [])
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    layer.train()
    step()
    out = {}
    layer.eval()
    with torch.no_grad(), count_ops() as out["forward"]:
        layer(x)
    layer.train()
    with torch.no_grad(), count_ops() as out["train_forward"]:
        layer(x)
    with count_ops() as out["step"]:
        step()
    return out
