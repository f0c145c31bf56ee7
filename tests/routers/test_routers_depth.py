"""Tests for routers.depth: the depth routers of Mixture-of-Recursions (Bae et al. 2025) and the
loss-free bias rule they share with TopKRouter."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import routers
from routers.depth import (ExpertChoiceConfig, ExpertChoiceStepRouter, TokenChoiceConfig,
                           TokenChoiceDepthRouter, capacity_schedule, per_row_topk)
from routers.losses import loss_free_bias_update_

EC, TC = ExpertChoiceConfig, TokenChoiceConfig


def _step_router(capacity, seed=0, dim=8, **cfg):
    torch.manual_seed(seed)
    return ExpertChoiceStepRouter(dim, capacity, EC(**cfg)).double()


def _rows(B, S, lens, seed=0, dim=8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, dim, dtype=torch.float64, generator=gen)
    valid = torch.arange(S)[None] < torch.tensor(lens)[:, None]
    return x, valid


# ----------------------------------------------------------------------------- expert choice
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 11), st.sampled_from([0.0, 0.25, 1 / 3, 0.5, 0.9, 1.0]),
       st.data())
def test_expert_choice_step_keeps_floor_capacity_len_of_the_active_tokens(B, S, cap, data):
    """Training: each row keeps exactly min(floor(cap * len), active) tokens, all of them active
    (a subset of the previous step: hierarchical), the highest logits, never padding."""
    lens = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    x, valid = _rows(B, S, lens, seed=S)
    act = data.draw(st.lists(st.lists(st.booleans(), min_size=S, max_size=S), min_size=B, max_size=B))
    active = torch.tensor(act) & valid
    router = _step_router(cap).train()
    routing = router(x, padding_mask=valid, active=active)
    keep = (routing.ids_TK[:, 0] >= 0).view(B, S)
    logit = routing.logits_TE[:, 0].view(B, S)
    for b in range(B):
        k = min(math.floor(cap * lens[b] + 1e-6), int(active[b].sum()))
        assert int(keep[b].sum()) == k
        assert not (keep[b] & ~active[b]).any()
        if 0 < k < int(active[b].sum()):  # every kept logit >= every dropped active logit
            assert logit[b][keep[b]].min() >= logit[b][active[b] & ~keep[b]].max()
    assert int(routing.counts_E.sum()) == int(keep.sum())
    w, p = routing.weights_TK[:, 0].view(B, S), routing.probs_TE[:, 0].view(B, S)
    torch.testing.assert_close(p, torch.sigmoid(logit))
    torch.testing.assert_close(w[keep], 0.1 * p[keep], rtol=0, atol=0)
    assert (w[~keep] == 0).all()


def test_expert_choice_steps_chain_hierarchically_with_the_default_schedule():
    caps = capacity_schedule(EC(), 4)
    assert caps == (1.0, 0.75, 0.5, 0.25)
    x, valid = _rows(3, 12, [12, 9, 5])
    active, counts = valid, []
    for r, c in enumerate(caps):
        routing = _step_router(c, seed=r).train()(x, padding_mask=valid, active=active)
        keep = (routing.ids_TK[:, 0] >= 0).view(3, 12)
        assert not (keep & ~active).any()
        active = keep
        counts.append(keep.sum(1).tolist())
    assert counts == [[12, 9, 5], [9, 6, 3], [6, 4, 2], [3, 2, 1]]


def test_expert_choice_ties_go_to_the_earlier_position():
    score = torch.zeros(2, 6)
    active = torch.tensor([[True] * 6, [False, True, True, False, True, True]])
    keep = per_row_topk(score, active, torch.tensor([6, 6]), 0.5)
    assert keep.tolist() == [[True] * 3 + [False] * 3, [False, True, True, False, True, False]]


def test_expert_choice_eval_thresholds_at_half_or_takes_topk():
    x, valid = _rows(2, 9, [9, 6])
    router = _step_router(0.5).eval()
    routing = router(x, padding_mask=valid)
    keep = (routing.ids_TK[:, 0] >= 0).view(2, 9)
    logit = routing.logits_TE[:, 0].view(2, 9)
    assert torch.equal(keep, valid & (torch.sigmoid(logit) > 0.5))
    assert routing.aux_losses == {} and router.last_stats == {}
    topk = _step_router(0.5, eval_routing="topk").eval()(x, padding_mask=valid)
    assert (topk.ids_TK[:, 0] >= 0).view(2, 9).sum(1).tolist() == [4, 3]


@pytest.mark.parametrize("bce_coef,z_coef", [(1e-3, 0.0), (0.5, 1e-2), (0.0, 0.0)])
def test_expert_choice_aux_losses_are_the_weighted_bce_and_z_loss(bce_coef, z_coef):
    x, valid = _rows(2, 8, [8, 5])
    active = valid & (torch.arange(8) % 3 != 1)
    router = _step_router(0.5, bce_coef=bce_coef, z_coef=z_coef).train()
    routing = router(x, padding_mask=valid, active=active)
    keep = (routing.ids_TK[:, 0] >= 0).view(2, 8)
    lg = routing.logits_TE[:, 0].view(2, 8)[active]
    bce = F.binary_cross_entropy_with_logits(lg, keep[active].double())
    z = lg.pow(2).mean()  # logsumexp over one logit is the logit
    expected = {k: c * v for k, c, v in (("bce", bce_coef, bce), ("z_loss", z_coef, z)) if c > 0}
    assert routing.aux_losses.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(routing.aux_losses[k], expected[k])
    torch.testing.assert_close(router.last_stats["bce"], bce)
    torch.testing.assert_close(router.last_stats["z_loss"], z)
    assert routing.dropped_fraction.item() == pytest.approx(1 - keep.sum().item() / active.sum().item())


# ----------------------------------------------------------------------------- token choice
@pytest.mark.parametrize("func,alpha", [("softmax", 1.0), ("sigmoid", 0.1)])
def test_token_choice_routing_depth_gate_and_losses(func, alpha):
    torch.manual_seed(0)
    router = TokenChoiceDepthRouter(8, 3, TC(router_func=func)).double().train()
    x, valid = _rows(2, 7, [7, 4])
    routing = router(x, padding_mask=valid)
    logits = x @ router.weight.T
    probs = alpha * (torch.softmax(logits, -1) if func == "softmax" else torch.sigmoid(logits))
    depth = probs.argmax(-1).masked_fill(~valid, -1)
    assert torch.equal(routing.ids_TK[:, 0], depth.reshape(-1))
    gate = probs.gather(-1, depth.clamp(min=0)[..., None])[..., 0] * valid
    torch.testing.assert_close(routing.weights_TK[:, 0], gate.reshape(-1), rtol=0, atol=0)
    # MoR's balancing loss sum_i P_i * Nr * f_i (P_i the mean alpha-scaled probability, f_i the
    # share of real tokens at depth i) and the z-loss, on the real tokens only
    n = int(valid.sum())
    f = torch.bincount(depth[valid], minlength=3).double() / n
    bal = (probs[valid].mean(0) * 3 * f).sum()
    z = torch.logsumexp(logits[valid], -1).pow(2).mean()
    assert routing.aux_losses.keys() == {"load_balancing", "z_loss"}
    torch.testing.assert_close(routing.aux_losses["load_balancing"], 0.1 * bal)
    torch.testing.assert_close(routing.aux_losses["z_loss"], 1e-5 * z)
    torch.testing.assert_close(router.last_stats["load"], f)
    assert torch.equal(routing.counts_E, torch.bincount(depth[valid], minlength=3))
    assert router.eval()(x, padding_mask=valid).aux_losses == {}


def test_token_choice_loss_free_bias_moves_by_minus_u_sign_of_load_minus_mean():
    torch.manual_seed(1)
    u = 0.05
    router = TokenChoiceDepthRouter(8, 4, TC(balancing="loss_free", bias_rate=u)).double().train()
    loads = []
    for seed in range(3):
        routing = router(_rows(2, 9, [9, 9], seed=seed)[0])
        assert "load_balancing" not in routing.aux_losses  # loss-free: no balancing loss
        assert torch.equal(router.depth_bias, torch.zeros(4, dtype=torch.float64))  # not in forward
        loads.append(router.last_stats["load"])
    load = sum(loads)
    torch.testing.assert_close(router.load_sum, load, rtol=0, atol=0)
    router.update_bias()
    torch.testing.assert_close(router.depth_bias, -u * torch.sign(load - load.mean()), rtol=0, atol=0)
    assert torch.equal(router.load_sum, torch.zeros(4, dtype=torch.float64))
    with torch.no_grad():  # the bias selects (a large one wins every token), the gate ignores it
        router.depth_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    routing = router.eval()(_rows(2, 9, [9, 9])[0])
    assert (routing.ids_TK == 2).all()
    probs = torch.softmax(routing.logits_TE, -1)
    torch.testing.assert_close(routing.weights_TK[:, 0], probs[:, 2], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="loss_free"):
        TokenChoiceDepthRouter(8, 4, TC()).update_bias()


def test_one_bias_rule_for_topk_experts_and_depths():
    counts = torch.tensor([5, 1, 3, 3])
    topk = routers.TopKRouter(8, 4, 2, expert_bias=True)
    topk.update_expert_bias(counts, rate=0.1)
    bias = torch.zeros(4)
    loss_free_bias_update_(bias, counts, 0.1)
    assert torch.equal(topk.expert_bias, bias)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


def test_bad_configs_raise_value_errors_naming_the_field():
    for make, name in [(lambda: ExpertChoiceStepRouter(8, 1.5, EC()), "capacity"),
                       (lambda: ExpertChoiceStepRouter(8, 0.5, EC(alpha=-1.0)), "alpha"),
                       (lambda: ExpertChoiceStepRouter(8, 0.5, EC(router_init_std=-1.0)), "router_init_std"),
                       (lambda: ExpertChoiceStepRouter(8, 0.5, EC(eval_routing="oracle")), "eval_routing"),
                       (lambda: TokenChoiceDepthRouter(8, 3, TC(router_func="relu")), "router_func"),
                       (lambda: TokenChoiceDepthRouter(8, 3, TC(balancing="aux")), "balancing"),
                       (lambda: TokenChoiceDepthRouter(8, 3, TC(alpha=0.0)), "alpha"),
                       (lambda: capacity_schedule(EC(capacities=(1.0, 0.5)), 3), "capacities"),
                       (lambda: capacity_schedule(EC(capacities=(0.5, 1.0)), 2), "non-increasing")]:
        with pytest.raises(ValueError, match=name):
            make()
