"""The ops, the layer and every router on the meta device (``torch.device("meta")``, where big models
are built before their weights load): every op goes to its fake kernel, never to the twin (which
reads data: ``.item()``, ``.tolist()``), with the compiled kernels' output shapes and dtypes, and
MoELayer and each router build and run forward and backward there.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim, X/Y GEMM
input/output dims, F expert hidden dim.
"""

import pytest
import torch

import moe
import routers
from moe import ops
from moe.ops.twins import grouped_mm_torch, plan_torch
from routers.depth import ExpertChoiceConfig, TokenChoiceConfig
from tests.helpers.ops import make_ids

META = torch.device("meta")
T, K, E, D, Y = 7, 2, 5, 6, 4


def op_calls(device):
    """(name, call) for every op of torch.ops.moe, inputs on ``device``."""
    g = torch.Generator().manual_seed(0)
    ids = make_ids(T, K, E).to(device)
    p = ops.plan(ids, E)
    x = torch.randn(T, D, generator=g).to(device)
    w = torch.rand(T, K, generator=g).to(device)
    b = torch.randn(E, D, Y, generator=g).to(device)
    y_ND = torch.randn(T * K, Y, generator=g).to(device)
    x_ND = torch.randn(T * K, D, generator=g).to(device)
    h = torch.randn(T, 2 * Y, dtype=torch.bfloat16, generator=g).to(device)
    logits = torch.randn(T, E, generator=g).to(device)
    bias = torch.randn(E, generator=g).to(device)
    probs = torch.softmax(logits, -1)
    route_ids = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1).to(device)
    q8 = torch.randint(-127, 128, (E, Y, D), dtype=torch.int8, generator=g).to(device)
    scale8 = torch.rand(E, Y, generator=g).to(device)
    m = torch.ops.moe
    return [
        ("plan", lambda: m.plan(ids, E)),
        ("permute", lambda: m.permute(x, p.order_N, p.rows_TK, w)),
        ("unpermute", lambda: m.unpermute(y_ND, p.order_N, p.rows_TK, w)),
        ("unpermute_weights_grad", lambda: m.unpermute_weights_grad(x.to(torch.bfloat16), x_ND.to(torch.bfloat16),
                                                                    p.order_N, p.rows_TK)),
        ("unpermute_backward", lambda: m.unpermute_backward(x, x_ND, p.order_N, p.rows_TK, w, True, False)),
        ("grouped_mm", lambda: m.grouped_mm(x_ND, b, p.offs_E)),
        ("grouped_mm_wgrad", lambda: m.grouped_mm_wgrad(x_ND, y_ND, p.offs_E)),
        ("gather_grouped_mm", lambda: m.gather_grouped_mm(x, p.order_N, p.rows_TK, b, p.offs_E)),
        ("gather_grouped_mm_wgrad", lambda: m.gather_grouped_mm_wgrad(x, p.order_N, p.rows_TK, y_ND, p.offs_E)),
        ("gather_grouped_mm_swiglu", lambda: m.gather_grouped_mm_swiglu(x, p.order_N, p.rows_TK, b, p.offs_E, True)),
        ("grouped_mm_backward", lambda: m.grouped_mm_backward(y_ND, x_ND, b, p.offs_E, True, False)),
        ("gather_grouped_mm_backward", lambda: m.gather_grouped_mm_backward(y_ND, x, p.order_N, p.rows_TK,
                                                                            b.transpose(1, 2).contiguous().transpose(1, 2),
                                                                            p.offs_E)),
        ("grouped_mm_unpermute", lambda: m.grouped_mm_unpermute(x_ND, b, p.offs_E, p.order_N, p.rows_TK, w)),
        ("grouped_mm_unpermute_backward", lambda: m.grouped_mm_unpermute_backward(
            x[:, :Y].contiguous(), x_ND, b.transpose(1, 2).contiguous().transpose(1, 2), p.offs_E, p.order_N,
            p.rows_TK, w, True, True, True)),
        ("linear_f32", lambda: m.linear_f32(x.to(torch.bfloat16), b[0].t().to(torch.bfloat16))),
        ("linear_f32_backward", lambda: m.linear_f32_backward(logits[:, :Y], x.to(torch.bfloat16),
                                                              b[0].t().to(torch.bfloat16), True, False)),
        ("swiglu", lambda: m.swiglu(h)),
        ("swiglu_backward", lambda: m.swiglu_backward(h[:, :Y], h)),
        ("topk_route", lambda: m.topk_route(logits, bias, K, "sigmoid", 0, 0, True, 2.0)),
        ("topk_route_backward", lambda: m.topk_route_backward(w, None, route_ids, probs, "softmax", True, 1.0)),
        ("grouped_mm_w8", lambda: m.grouped_mm_w8(x_ND, q8, scale8, p.offs_E)),
    ]


def _meta_of(out):
    outs = out if isinstance(out, tuple) else (out,)
    return [(tuple(t.shape), t.dtype) for t in outs]


def test_every_op_is_covered():
    assert sorted(name for name, _ in op_calls("cpu")) == sorted(ops.registry.OPS)


@pytest.mark.parametrize("name", [name for name, _ in op_calls("cpu")])
def test_op_on_meta_runs_the_fake_kernel_with_the_kernels_shapes(name):
    cpu, meta = dict(op_calls("cpu"))[name](), dict(op_calls(META))[name]()
    outs = meta if isinstance(meta, tuple) else (meta,)
    assert all(t.device.type == "meta" for t in outs)
    assert _meta_of(meta) == _meta_of(cpu)


def test_the_twins_cannot_run_on_meta():
    """Why meta must reach the fake kernels: the twins read data."""
    ids = make_ids(T, K, E).to(META)
    with pytest.raises((RuntimeError, NotImplementedError)):
        plan_torch(ids, E)
    with pytest.raises((RuntimeError, NotImplementedError)):
        grouped_mm_torch(torch.randn(T, D, device=META), torch.randn(E, D, Y, device=META),
                         torch.zeros(E, dtype=torch.int32, device=META))


F = 8
ROUTERS = {
    "topk_softmax": lambda: routers.TopKRouter(D, E, 2, z_loss_coeff=1e-3),
    "topk_sigmoid_groups_bias": lambda: routers.TopKRouter(D, E + 1, 2, score="sigmoid", num_groups=3, topk_groups=2,
                                                           expert_bias=True, routed_scaling_factor=2.5),
    "topk_capacity_seq": lambda: routers.TopKRouter(D, E, 2, capacity_factor=0.5, balance_loss="seq"),
    "threshold_xmoe": lambda: routers.ThresholdRouter(D, E, threshold=0.6, capacity_factor=1.0),
    "threshold_top_p": lambda: routers.ThresholdRouter(D, E, threshold=0.4, rule="top_p", max_experts=3),
    "recurrent": lambda: routers.RecurrentRouter(D, E, 2, router_dim=8),
    "recurrent_chain_layer0": lambda: routers.RecurrentRouterChain(2, D, E, 2)[0],
    "expert_choice": lambda: routers.ExpertChoiceRouter(D, E, 2.0, z_loss_coeff=1e-3),
}
DEPTH_ROUTERS = {
    "expert_choice_step": lambda: routers.ExpertChoiceStepRouter(D, 0.5, ExpertChoiceConfig()),
    "token_choice_depth": lambda: routers.TokenChoiceDepthRouter(D, 3, TokenChoiceConfig()),
}


def _check_routing_on_meta(out, router, T_):
    assert out.ids_TK.device.type == "meta" and out.ids_TK.shape == (T_, router.top_k)
    assert out.weights_TK.shape == (T_, router.top_k) and out.counts_E.shape == (router.num_experts,)
    assert all(v.device.type == "meta" and v.dim() == 0 for v in out.aux_losses.values())


@pytest.mark.parametrize("name", list(ROUTERS) + list(DEPTH_ROUTERS))
def test_router_builds_and_runs_on_meta(name):
    with torch.device(META):
        router = {**ROUTERS, **DEPTH_ROUTERS}[name]()
        x = torch.randn(2, 5, D)
    assert all(p.device.type == "meta" for p in router.parameters())
    _check_routing_on_meta(router(x), router, 10)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_layer_with_each_router_builds_and_runs_forward_and_backward_on_meta(name):
    with torch.device(META):
        router = ROUTERS[name]()
        layer = moe.MoELayer(D, F, router.num_experts, router=router, num_shared_experts=1)
        x = torch.randn(2, 5, D, requires_grad=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == x.shape
    _check_routing_on_meta(layer.last_routing, router, 10)
    (y.sum() + moe.collect_aux_losses(layer)).backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape
    for w in (layer.experts.w_in_EDH, layer.experts.w_out_EFD):  # through the GEMMs' weight gradients
        assert w.grad is not None and w.grad.device.type == "meta" and w.grad.shape == w.shape
    for p in layer.parameters():
        if p.grad is not None:
            assert p.grad.device.type == "meta" and p.grad.shape == p.shape
