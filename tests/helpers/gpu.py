"""Helpers of the GPU tests (tests/gpu/): routings, offsets, poisoned outputs, the GEMMs' error
rule, CUDA-graph replay and host-sync checks.

Shape legend: T tokens, K slots, E experts, N routed rows, X/Y GEMM input/output dims.
"""

from __future__ import annotations

import torch


def poison(*like: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Leaves freed blocks of exactly these sizes filled with 0xFF (NaN for every float dtype,
    -1 for ints) in the caching allocator, so the next outputs of those sizes likely reuse them."""
    blocks = [torch.full((torch.Size(s).numel() * torch.empty((), dtype=d).element_size(),), 0xFF,
                         dtype=torch.uint8, device="cuda") for s, d in like for _ in range(2)]
    del blocks


def random_ids(T, K, E, *, empty=0.2, dtype=torch.int64, device="cuda"):
    """ids_TK: uniform expert ids with a fraction `empty` of -1 (dropped) slots."""
    ids = torch.randint(0, E, (T, K))
    ids[torch.rand(T, K) < empty] = -1
    return ids.to(dtype=dtype, device=device)


def offs_of(counts):
    """offs_E (E,) int32 on the GPU: the cumulative ends of the experts' row counts."""
    return torch.tensor(counts, dtype=torch.int32).cumsum(0).int().cuda()


def error_rule(got, ref64, same_dtype):
    """FlashAttention's rule: error vs float64 at most 2x the same-dtype torch error (+ eps)."""
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    base = (same_dtype.double() - ref64).abs().max().item() if got.numel() else 0.0
    scale = ref64.abs().max().item() if got.numel() else 0.0
    assert err <= 2 * base + torch.finfo(got.dtype).eps * scale + 1e-12, (err, base)


def assert_eval_graph_replays(layer, static_x):
    """The eval forward of `layer` captured in a CUDA graph (after a warm-up on a side stream)
    replays to the eager result, also after new tokens (new routing) are copied in."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(2):
            graph.replay()
            assert torch.equal(static_y, layer(static_x))
            static_x.copy_(torch.randn_like(static_x))  # new tokens, new routing


def without_sync(fn):
    """fn() under torch.cuda.set_sync_debug_mode("error"): a host-device sync inside raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def kernel_names(fn) -> list[str]:
    """The names of the device events (kernels, copies, memsets) that fn() runs. (The CUDA
    activity also records the host's runtime calls, cudaLaunchKernel and the like, as CPU events:
    those are left out.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
