"""GPU tests of the CUDA kernels of moe.topk_route / moe.topk_route_backward (csrc/cuda/router.cu)
against the CPU kernel and the twin (routers.topk.route_topk), the threshold rules included.

Shape legend: T tokens, E experts, K top-k slots, Z expert groups.

Every test is marked ``gpu`` and skips cleanly without a CUDA device. The CUDA kernel picks the
same experts as the CPU kernel (ties: the lower id in both); its softmax sums in a warp's order,
so probabilities and weights agree to a few roundings. No host synchronisation: a CUDA-graph
capture of the router's forward must succeed.
"""

from __future__ import annotations

import pytest
import torch

from moe import ops  # noqa: F401  (registers torch.ops.moe.*)
from routers import ThresholdRouter, TopKRouter

from tests.helpers.ops import router_logits

pytestmark = pytest.mark.gpu

# (score, E, K, Z, topk_groups, bias, norm, scaling): Mixtral, Qwen3, DeepSeek-V3 and edge cases
CONFIGS = [
    ("softmax", 8, 2, 0, 0, False, True, 1.0),
    ("softmax", 128, 8, 0, 0, False, True, 1.0),
    ("sigmoid", 256, 8, 8, 4, True, True, 2.5),
    ("softmax", 60, 4, 0, 0, False, False, 1.0),
    ("sigmoid", 33, 33, 0, 0, True, True, 1.0),
    ("softmax", 1, 1, 0, 0, False, False, 1.0),
    ("softmax", 96, 6, 32, 3, True, True, 1.0),
    ("softmax", 1500, 4, 0, 0, False, True, 1.0),  # statistics: two partial blocks across the experts
]


def assert_route_matches(cuda, cpu, dtype):
    """topk_route's nine results on CUDA against the CPU kernel's: ids, counts, metrics and fw_BE
    equal, the other float results (balance too) to float tolerance."""
    assert torch.equal(cuda[0].cpu(), cpu[0]) and torch.equal(cuda[3].cpu(), cpu[3])
    assert torch.equal(cuda[4].cpu(), cpu[4])
    assert torch.equal(cuda[5].cpu(), cpu[5])  # fw_BE: integer counts, the CPU's arithmetic
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    for i in (1, 2, 6, 7, 8):
        torch.testing.assert_close(cuda[i].cpu(), cpu[i], **tol)


@pytest.mark.parametrize("T", [0, 1, 37, 64, 65, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_cuda_matches_cpu(cfg, dtype, T):
    """Without statistics: up to 64 tokens (and 4 a warp) the one-launch kernel
    (topk_route_small_kernel), otherwise the route kernel and the final statistics kernel."""
    score, E, K, Z, G, bias, norm, scale = cfg
    logits, b = router_logits(T, E, dtype, bias=bias)
    cpu = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale)
    cuda = torch.ops.moe.topk_route(logits.cuda(), None if b is None else b.cuda(), K, score, Z, G, norm, scale)
    assert_route_matches(cuda, cpu, dtype)
    gw, gp = torch.randn_like(cpu[1]), torch.randn_like(cpu[2])
    d_cpu = torch.ops.moe.topk_route_backward(gw, gp, cpu[0], cpu[2], score, norm, scale)
    d_cuda = torch.ops.moe.topk_route_backward(gw.cuda(), gp.cuda(), cuda[0], cuda[2], score, norm, scale)
    btol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d_cuda.cpu(), d_cpu, **btol)


def test_strided_logits_and_ties():
    logits = torch.zeros(5, 16, device="cuda")
    ids, w, _ = torch.ops.moe.topk_route(logits, None, 4, "softmax", 0, 0, True, 1.0)[:3]
    assert ids.tolist() == [[0, 1, 2, 3]] * 5
    wide = torch.randn(40, 32, device="cuda")[:, ::2]  # a column stride of 2
    a = torch.ops.moe.topk_route(wide, None, 3, "sigmoid", 4, 2, True, 1.0)
    b = torch.ops.moe.topk_route(wide.contiguous(), None, 3, "sigmoid", 4, 2, True, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def captured_forward(router, x):
    """router(x) captured in a CUDA graph (after a warm-up on a side stream) and replayed twice (the
    statistics kernel's block counter is zeroed again by each replay's route kernel)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        router(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = router(x)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    return out


def test_router_forward_captures_in_a_cuda_graph():
    """No host sync in the fused router: its forward captures (check_finite is a device assert)."""
    router = TopKRouter(64, 32, 4, score="sigmoid", num_groups=4, topk_groups=2, expert_bias=True).cuda().eval()
    x = torch.randn(256, 64, device="cuda")
    eager, out = router(x), captured_forward(router, x)
    assert torch.equal(out.ids_TK, eager.ids_TK)
    torch.testing.assert_close(out.weights_TK, eager.weights_TK)


def _cuda_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("T", [1, 4, 5, 64, 65])
@pytest.mark.parametrize("E,dtype", [(128, torch.float32), (1500, torch.float64), (8, torch.float64)])
def test_small_batches_route_in_one_launch(E, dtype, T):
    """Decode sizes without statistics (B = 0): one kernel routes and counts, padded tokens
    included, up to 64 tokens and 4 a warp (16 warps; E = 1500 float64 leaves shared memory for one
    warp, so 4 tokens); the results are the CPU kernel's. Otherwise the route and final statistics
    kernels."""
    logits, _ = router_logits(T, E, dtype, seed=5)
    valid = torch.ones(T, dtype=torch.bool)
    if T > 1:  # token 0 stays real
        valid[1 + T // 3:1 + T // 3 + max(1, T // 4)] = False
    cpu = torch.ops.moe.topk_route(logits, None, 4, "softmax", 0, 0, True, 1.0, valid)
    args = (logits.cuda(), None, 4, "softmax", 0, 0, True, 1.0, valid.cuda())
    cuda = torch.ops.moe.topk_route(*args)
    assert_route_matches(cuda, cpu, dtype)
    assert float(cuda[7]) == 0.0 and float(cuda[8]) == 0.0 and cuda[5].shape == (0, E)
    names = _cuda_kernels(lambda: torch.ops.moe.topk_route(*args))
    if T <= (4 if E == 1500 else 64):
        assert len(names) == 1 and "topk_route_small_kernel" in names[0], names
    else:
        assert len(names) == 2 and "topk_route_kernel" in names[0] and "route_stats_final" in names[1], names


@pytest.mark.parametrize("T,B,padded", [(37, 1, False), (4096, 1, True), (4096, 8, True), (0, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_cuda_statistics_match_cpu(cfg, dtype, T, B, padded):
    """counts_E, metrics, fw_BE (exact: integer counts and the CPU's arithmetic), psum_BE and zsum
    (sums in another order), balance, and the backward with psum_BE's, zsum's and balance's
    gradients; two launches (the final statistics in the partial kernel's last block), the same
    bits on a second call; with B > 1 fw_BE carries a balance loss's fw_scale (the same arithmetic, so still
    exact) and zsum a z-loss's z_scale (its gradient too)."""
    score, E, K, Z, G, bias, norm, scale = cfg
    fw_scale, z_scale = (0.37 * E, 1e-3 / max(T, 1)) if B > 1 else (1.0, 1.0)
    logits, b = router_logits(T, E, dtype, bias=bias)
    valid = None
    if padded:
        valid = torch.ones(T, dtype=torch.bool)
        valid[5:40] = False
        valid[-(T // max(B, 2)):] = False  # a whole padded sequence (B > 1), the second half (B = 1)
    args = (K, score, Z, G, norm, scale)
    cpu = torch.ops.moe.topk_route(logits, b, *args, valid, B, True, "none", 1.0, fw_scale, z_scale)
    cuda_args = (logits.cuda(), None if b is None else b.cuda(), *args, None if valid is None else valid.cuda(), B,
                 True, "none", 1.0, fw_scale, z_scale)
    cuda = torch.ops.moe.topk_route(*cuda_args)
    assert_route_matches(cuda, cpu, dtype)
    names = _cuda_kernels(lambda: torch.ops.moe.topk_route(*cuda_args))
    if T > 0:  # the statistics' last partial block forms the final ones: two launches
        assert len(names) == 2 and "topk_route_kernel" in names[0] and "route_stats_partial" in names[1], names
    again = torch.ops.moe.topk_route(*cuda_args)  # the ticket is zeroed again by each call's route kernel
    assert all(torch.equal(x, y) for x, y in zip(again, cuda))
    gw, gp = torch.randn_like(cpu[1]), torch.randn_like(cpu[2])
    gs, gz, gb = torch.randn(B, E, dtype=dtype), torch.randn((), dtype=dtype), torch.randn((), dtype=dtype)
    btol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for g_psum, g_bal in ((gs, None), (gs, gb), (None, gb)):
        d_cpu = torch.ops.moe.topk_route_backward(gw, gp, cpu[0], cpu[2], score, norm, scale, g_psum, gz, logits,
                                                  valid, z_scale, g_bal, None if g_bal is None else cpu[5])
        d_cuda = torch.ops.moe.topk_route_backward(
            gw.cuda(), gp.cuda(), cuda[0], cuda[2], score, norm, scale, None if g_psum is None else g_psum.cuda(),
            gz.cuda(), logits.cuda(), None if valid is None else valid.cuda(), z_scale,
            None if g_bal is None else g_bal.cuda(), None if g_bal is None else cuda[5])
        torch.testing.assert_close(d_cuda.cpu(), d_cpu, **btol)


def test_training_router_captures_in_a_cuda_graph():
    """The training forward (losses from the fused statistics) has no host sync either."""
    router = TopKRouter(64, 32, 4, balance_loss="seq", z_loss_coeff=1e-3).cuda().train()
    x = torch.randn(4, 64, 64, device="cuda")
    eager, out = router(x), captured_forward(router, x)
    for name in eager.aux_losses:
        torch.testing.assert_close(out.aux_losses[name], eager.aux_losses[name])
    assert torch.equal(out.counts_E, eager.counts_E)


# (rule, E, K, threshold, norm): the threshold router's rules, K = max_experts (K = E included)
RULE_CONFIGS = [
    ("xmoe", 8, 8, 0.5, False),
    ("xmoe", 128, 8, 0.8, True),
    ("top_p", 60, 60, 0.5, True),
    ("top_p", 256, 16, 0.3, False),
    ("top_p", 12, 12, 1.0, False),
    ("xmoe", 1, 1, 0.5, False),
]


@pytest.mark.parametrize("T,B,padded", [(0, 0, False), (37, 0, False), (4096, 1, True), (4096, 8, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", RULE_CONFIGS)
def test_cuda_rule_matches_cpu(cfg, dtype, T, B, padded):
    """The kept prefix (ids -1 past it), the weights over the kept slots, counts, metrics and the
    loss statistics (xmoe: first choices) as the CPU kernel, and the backward."""
    rule, E, K, threshold, norm = cfg
    logits, _ = router_logits(T, E, dtype, seed=7)
    valid = None
    if padded:
        valid = torch.ones(T, dtype=torch.bool)
        valid[5:40] = False
        valid[-(T // max(B, 2)):] = False
    args = (K, "softmax", 0, 0, norm, 1.0)
    cpu = torch.ops.moe.topk_route(logits, None, *args, valid, B, True, rule, threshold)
    cuda = torch.ops.moe.topk_route(logits.cuda(), None, *args, None if valid is None else valid.cuda(), B, True,
                                    rule, threshold)
    assert_route_matches(cuda, cpu, dtype)
    gw, gp = torch.randn_like(cpu[1]), torch.randn_like(cpu[2])
    d_cpu = torch.ops.moe.topk_route_backward(gw, gp, cpu[0], cpu[2], "softmax", norm, 1.0, None, None, None, valid)
    d_cuda = torch.ops.moe.topk_route_backward(gw.cuda(), gp.cuda(), cuda[0], cuda[2], "softmax", norm, 1.0, None,
                                               None, None, None if valid is None else valid.cuda())
    btol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d_cuda.cpu(), d_cpu, **btol)


@pytest.mark.parametrize("rule", ["xmoe", "top_p"])
def test_rule_ties_at_the_threshold(rule):
    """Uniform probabilities 1/4: the sums above the ranks, 0, 1/4, 1/2, 3/4, are exact; at
    threshold 1/2 xmoe keeps 2 experts, top_p 3 (the lower ids first)."""
    ids, w = torch.ops.moe.topk_route(torch.zeros(5, 4, device="cuda"), None, 4, "softmax", 0, 0, False, 1.0, None,
                                      0, False, rule, 0.5)[:2]
    n = 2 if rule == "xmoe" else 3
    assert ids.tolist() == [list(range(n)) + [-1] * (4 - n)] * 5
    assert w.tolist() == [[0.25] * n + [0.0] * (4 - n)] * 5


def test_threshold_router_captures_in_a_cuda_graph():
    """The threshold router's training forward (one fused op, the entropy loss, capacity) has no
    host sync: it captures in a CUDA graph."""
    router = ThresholdRouter(64, 32, threshold=0.6, rule="top_p", max_experts=6, balance_loss="seq",
                             z_loss_coeff=1e-3, dynamic_loss_coeff=1e-3, capacity_factor=1.5).cuda().train()
    x = torch.randn(4, 64, 64, device="cuda")
    eager, out = router(x), captured_forward(router, x)
    assert torch.equal(out.ids_TK, eager.ids_TK) and torch.equal(out.counts_E, eager.counts_E)
    for name in eager.aux_losses:
        torch.testing.assert_close(out.aux_losses[name], eager.aux_losses[name])
