"""moe.to_linear_layout: GroupedExperts' weights stored (E, Y, X) in memory, shapes and values kept.

Shape legend: T tokens, D hidden size, F expert hidden size, E experts, K top-k; a weight (E, X, Y)
is stored with (E, Y, X) strides (stride(-2) == 1), the nn.Linear layout.
"""

import copy

import pytest
import torch
from torch import nn

import moe
from moe import GroupedExperts, MoELayer, collect_aux_losses, to_linear_layout

WEIGHTS = ("w_in_EDH", "w_out_EFD")


def _layer(dtype, E=6, K=2, seed=0):
    torch.manual_seed(seed)
    return MoELayer(64, 48, E, K).to(dtype)


def _is_linear(w):
    return w.stride(-2) == 1 and w.stride(-1) == w.shape[-2]


def test_weights_keep_shape_and_values_in_the_linear_layout():
    layer = _layer(torch.float32)
    before = {n: getattr(layer.experts, n).detach().clone() for n in WEIGHTS}
    params = {n: getattr(layer.experts, n) for n in WEIGHTS}
    assert to_linear_layout(layer) is layer
    for n in WEIGHTS:
        w = getattr(layer.experts, n)
        assert w is params[n] and isinstance(w, nn.Parameter)  # same Parameter: optimizers keep it
        assert _is_linear(w) and torch.equal(w, before[n])
    strides = [getattr(layer.experts, n).stride() for n in WEIGHTS]
    to_linear_layout(layer)  # idempotent
    assert [getattr(layer.experts, n).stride() for n in WEIGHTS] == strides


def test_every_grouped_experts_in_a_model_and_a_bare_module():
    model = nn.Sequential(_layer(torch.float32), nn.Linear(64, 64), _layer(torch.float32, seed=1))
    to_linear_layout(model)
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    assert len(experts) == 2 and all(_is_linear(getattr(m, n)) for m in experts for n in WEIGHTS)
    bare = GroupedExperts(4, 16, 8)
    assert to_linear_layout(bare) is bare and _is_linear(bare.w_in_EDH)
    assert not _is_linear(torch.empty(4, 16, 8)) and _is_linear(torch.empty(4, 8, 16).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 40, 300])  # few rows per expert (streamed) and many (packed)
def test_forward_and_gradients_match_the_default_layout(dtype, T):
    ref = _layer(dtype).train()
    lin = to_linear_layout(copy.deepcopy(ref))
    x = torch.randn(T, 64).to(dtype)
    g = torch.randn(T, 64).to(dtype)
    outs, grads = [], []
    for layer in (ref, lin):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        aux = collect_aux_losses(layer)
        torch.autograd.backward([y, aux], [g, torch.ones_like(aux)])
        outs.append(y)
        grads.append([xi.grad] + [getattr(layer.experts, n).grad for n in WEIGHTS])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, **tol)
    for n in WEIGHTS:  # gradients arrive in the weight's layout: no copy into its strides
        assert getattr(lin.experts, n).grad.stride() == getattr(lin.experts, n).stride()


def test_state_dict_round_trip_and_optimizer_step():
    lin = to_linear_layout(_layer(torch.float32))
    fresh = _layer(torch.float32, seed=7)
    fresh.load_state_dict(lin.state_dict())
    for n in WEIGHTS:
        assert torch.equal(getattr(fresh.experts, n), getattr(lin.experts, n))
        assert not _is_linear(getattr(fresh.experts, n))  # the loading module keeps its own layout
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    lin(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    assert all(_is_linear(getattr(lin.experts, n)) for n in WEIGHTS)


def test_exported():
    assert "to_linear_layout" in moe.__all__ and moe.to_linear_layout is to_linear_layout
