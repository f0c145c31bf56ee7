"""Kernel launches per MoE layer (issue 15), counted on any device by moe.launches.count_ops: an
inference forward (the "fwd" rows of bench/gpu_bench.py), a training-mode forward (aux losses
included) and a training step (forward, aux losses, backward into x and every parameter).

The issue's budgets are 12 launches per forward and 30 per training step. One counted op is one
launch on CUDA except where moekit's CUDA ops launch several (moe/launches.py lists them; the GPU
profile in bench/gpu_bench.py shows both). Measured (CPU, extension loaded, T=64, E=16, K=4):

| layer | dtype | forward | train forward | step | before (main at 652d53b) |
|---|---|---|---|---|---|
| default TopKRouter | float32 | 5 | 5 | 11 | 31 / 62 / 83 |
| default TopKRouter | bfloat16 | 5 | 5 | 10 | 31 / 62 / 87 |
| DeepSeek-V3 router (sigmoid, groups, bias, seq loss) | bfloat16 | 5 | 5 | 10 | 31 / 66 / 98 |
| default + z-loss | bfloat16 | 5 | 5 | 11 | 31 / 67 / 102 |
| one shared expert | bfloat16 | 9 | 9 | 20 | 35 / 66 / 97 |
| ThresholdRouter, xmoe (max_experts=4) | float32 | 5 | 5 | 11 | 44 / 72 / 93 |
| ThresholdRouter, xmoe (max_experts=4) | bfloat16 | 5 | 5 | 10 | 44 / 72 / 97 |
| ThresholdRouter, top_p, renormalize, seq loss | bfloat16 | 5 | 5 | 10 | 46 / 75 / 110 |

A bfloat16 router's logits are one moe.linear_f32 each way (its backward one
moe.linear_f32_backward, not the float32 GEMMs on upcast copies with their four casts); a float32
router's are F.linear (one GEMM forward, two backward). The experts' SwiGLU, second GEMM and
weighted combine are one moe.grouped_mm_unpermute in training (swiglu=True), and its backward one
moe.grouped_mm_unpermute_backward (d h, d W_out and the routing weights' gradient without the expert
outputs), and the first GEMM's backward one moe.gather_grouped_mm_backward (before that op, 6 / 6 /
14 at float32: the second GEMM and the combine were two ops each way, SwiGLU's backward a third). The balance
loss costs no op of its own (moe.topk_route folds the coefficient into fw_BE, fw_scale, and
returns sum(fw_BE * psum_BE) as balance; its gradient is formed inside moe.topk_route_backward). The SwiGLU experts' first
GEMM and activation are one op (moe.gather_grouped_mm_swiglu) without autograd. The z-loss costs no op of its own
(topk_route's z_scale makes zsum the loss; with a padding mask, whose real-token count is data,
it keeps a scaling each way), only the sum of the two losses. A
shared expert is a dense FFN: two GEMMs, the SwiGLU and the sum with the routed output forward (4
ops), four GEMMs, the SwiGLU backward and the gradient sums into x backward; it too is within the
issue's budgets.
The threshold router routes in the same one moe.topk_route (its rule); "before" is its chain of
PyTorch ops (main at 6e6a137). Its entropy ("dynamic") loss and XMoE capacity stay PyTorch ops:
top_p with dynamic_loss_coeff is 5 / 13 / 29, xmoe with capacity_factor=1.5 45 / 45 / 52 (bfloat16).
"""

import pytest
import torch

import moe
import routers
from moe.launches import count_ops, layer_counts

D, F, E, K, T = 64, 32, 16, 4, 64

DSV3 = dict(score="sigmoid", num_groups=4, topk_groups=2, expert_bias=True, routed_scaling_factor=2.5,
            balance_loss="seq", balance_loss_coeff=1e-4)

# (name, MoELayer kwargs, dtype, budget (forward, train forward, step))
CASES = [
    ("default", {}, torch.float32, (12, 12, 30)),
    ("default", {}, torch.bfloat16, (12, 12, 30)),
    ("deepseek-v3 router", dict(router_kwargs=DSV3), torch.bfloat16, (12, 12, 30)),
    ("z-loss", dict(router_kwargs=dict(z_loss_coeff=1e-3)), torch.bfloat16, (12, 12, 30)),
    ("shared expert", dict(num_shared_experts=1), torch.bfloat16, (12, 12, 30)),
]


@pytest.mark.parametrize("name,kwargs,dtype,budget", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_layer_launches_within_budget(name, kwargs, dtype, budget):
    torch.manual_seed(0)
    layer = moe.MoELayer(D, F, E, K, **kwargs).to(dtype)
    counts = layer_counts(layer, torch.randn(2, T // 2, D, dtype=dtype))
    for (what, c), limit in zip(counts.items(), budget):
        assert c.total <= limit, f"{name} {dtype} {what}: {c}"
    # no small elementwise op of the router, its losses or metrics is left in the forward
    small = {"aten._to_copy", "aten.fill_", "aten.zeros", "aten.ones", "aten.masked_fill", "aten.scatter_add_",
             "aten.clamp", "aten.div", "aten.sum"}
    assert not small & set(counts["train_forward"].ops), str(counts["train_forward"])


THRESHOLD_CASES = [
    ("xmoe", dict(threshold=0.6), torch.float32),
    ("xmoe", dict(threshold=0.6), torch.bfloat16),
    ("top_p", dict(threshold=0.5, rule="top_p", renormalize=True, balance_loss="seq"), torch.bfloat16),
]


@pytest.mark.parametrize("name,kwargs,dtype", THRESHOLD_CASES, ids=[f"{c[0]}-{c[2]}" for c in THRESHOLD_CASES])
def test_threshold_router_launches_within_budget(name, kwargs, dtype):
    """The threshold router (one moe.topk_route with its rule) within the issue's budgets."""
    torch.manual_seed(0)
    router = routers.ThresholdRouter(D, E, max_experts=K, **kwargs)
    layer = moe.MoELayer(D, F, E, router=router).to(dtype)
    counts = layer_counts(layer, torch.randn(2, T // 2, D, dtype=dtype))
    for (what, c), limit in zip(counts.items(), (12, 12, 30)):
        assert c.total <= limit, f"threshold {name} {dtype} {what}: {c}"
    assert counts["train_forward"].ops["moe.topk_route"] == 1, str(counts["train_forward"])


@pytest.mark.parametrize("balance", ["switch", "seq"])
def test_balance_loss_costs_no_op_of_its_own(balance):
    """The balance loss is moe.topk_route's balance = sum(fw_BE * psum_BE), its coefficient folded
    into fw_BE (fw_scale), and its gradient reaches psum_BE inside moe.topk_route_backward: the
    same op counts as the same layer without the loss. Its value is coefficient * E *
    sum(fw * psum), the routers' PyTorch formula."""
    from routers.losses import balance_statistics

    def counts(**kw):
        torch.manual_seed(0)
        layer = moe.MoELayer(D, F, E, K, router_kwargs=dict(balance_loss_coeff=0.01, **kw))
        return layer, layer_counts(layer, torch.randn(2, T // 2, D))

    with_loss, c = counts(balance_loss=balance)
    _, c0 = counts(balance_loss=None)
    assert c["train_forward"].ops == c0["train_forward"].ops, f"{c['train_forward']} vs {c0['train_forward']}"
    assert c["step"].ops == c0["step"].ops, f"{c['step']} vs {c0['step']}"
    r = with_loss.last_routing
    B = 2 if balance == "seq" else 1
    fw, psum = balance_statistics(r.probs_TE.reshape(B, -1, E), r.ids_TK.reshape(B, -1, K))
    (name, loss), = with_loss.aux_losses.items()
    torch.testing.assert_close(loss, 0.01 * E * (fw * psum).sum(), rtol=1e-5, atol=0)


def test_z_loss_costs_no_op_of_its_own():
    """With the token count host-known, moe.topk_route's zsum times z_scale is the z-loss: no op
    forward or backward beyond the sum of the two losses; its value is the routers' formula."""
    from routers.losses import z_loss

    def counts(z):
        torch.manual_seed(0)
        layer = moe.MoELayer(D, F, E, K, router_kwargs=dict(z_loss_coeff=z))
        return layer, layer_counts(layer, torch.randn(2, T // 2, D))

    with_z, c = counts(1e-3)
    _, c0 = counts(0.0)
    assert c["train_forward"].total == c0["train_forward"].total, f"{c['train_forward']} vs {c0['train_forward']}"
    assert c["step"].total - c0["step"].total == 1, f"{c['step']} vs {c0['step']}"  # the losses' sum
    torch.testing.assert_close(with_z.aux_losses["z_loss"], 1e-3 * z_loss(with_z.last_routing.logits_TE),
                               rtol=1e-5, atol=0)


def test_count_ops_skips_views_and_allocations():
    x = torch.randn(4, 6)
    with count_ops() as c:
        y = x.view(6, 4).t()[1:].unsqueeze(0)
        torch.empty(3)
        z = x + 1
        (z * 2).sum()
        y.reshape(-1)  # not contiguous: a copy, which counts
    assert c.total == 4 and c.ops == {"aten.add": 1, "aten.mul": 1, "aten.sum": 1, "aten.clone": 1}, str(c)


def test_routing_metrics_keep_their_values():
    """The fused route's counts_E, dropped_fraction and experts_per_token are the values of
    make_routing's PyTorch formulas (with padding, which makes them data-dependent)."""
    from routers.routing import count_chosen, expert_counts

    torch.manual_seed(0)
    layer = moe.MoELayer(D, F, E, K)
    x = torch.randn(2, 10, D)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    layer(x, padding_mask=mask)
    r = layer.last_routing
    counts = expert_counts(r.ids_TK, E)
    assert torch.equal(r.counts_E, counts) and int(counts.sum()) == 16 * K
    chosen = count_chosen(r.ids_TK, mask.reshape(-1)).float()
    assert r.dropped_fraction.dtype == torch.float32 and float(r.dropped_fraction) == float((chosen - chosen) / chosen)
    assert r.experts_per_token.dtype == torch.float32 and float(r.experts_per_token) == float(K)
