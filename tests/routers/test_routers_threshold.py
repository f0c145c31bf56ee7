"""ThresholdRouter: hand-worked vectors (probabilities 0.5/0.3/0.15/0.05 at thresholds 0.5, 0.8,
0.9), a NumPy transcription of both rules, XMoE's capacity priority, and the fused router (one
torch.ops.moe.topk_route with the rule) against the router's previous chain of PyTorch ops.

Shape legend: T tokens, D hidden size, E experts, K slots (max_experts).
"""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import moe.ops  # noqa: F401  (registers torch.ops.moe.topk_route: the router then runs the fused kernel)
from routers import ThresholdRouter, apply_capacity, capacity, entropy_loss, threshold_keep, xmoe_priority
from routers.losses import balance_losses
from routers.routing import count_chosen, make_routing, topk_weights

VECTOR = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold,n_xmoe,n_top_p", [(0.5, 1, 2), (0.8, 2, 3), (0.9, 3, 3)])
def test_hand_worked_vectors(dtype, threshold, n_xmoe, n_top_p):
    p = torch.tensor([VECTOR], dtype=dtype)
    assert threshold_keep(p, threshold, "xmoe").sum().item() == n_xmoe
    assert threshold_keep(p, threshold, "top_p").sum().item() == n_top_p


def router_with_probs(probs, **kw):
    """A ThresholdRouter whose softmax over a one-hot input reproduces ``probs`` (rows of T)."""
    T, E = probs.shape
    r = ThresholdRouter(T, E, **kw)
    r.weight.data = torch.log(torch.as_tensor(probs, dtype=torch.float32)).T.contiguous()
    return r, torch.eye(T)


@pytest.mark.parametrize("rule,threshold,expected", [("xmoe", 0.45, 1), ("xmoe", 0.85, 3), ("top_p", 0.45, 1), ("top_p", 0.55, 2), ("top_p", 0.7, 2), ("top_p", 0.85, 3)])
def test_router_keeps_the_prefix_with_raw_probabilities(rule, threshold, expected):
    perm = [2, 0, 3, 1]  # experts in a scrambled order: the router must sort them
    probs = torch.tensor([[VECTOR[perm.index(e)] for e in range(4)]])
    r, x = router_with_probs(probs, threshold=threshold, rule=rule)
    out = r(x)
    kept = out.ids_TK[0][out.ids_TK[0] >= 0].tolist()
    assert kept == perm[:expected]
    torch.testing.assert_close(out.weights_TK[0, :expected], torch.tensor(VECTOR[:expected]))
    assert (out.ids_TK[0, expected:] == -1).all() and (out.weights_TK[0, expected:] == 0).all()
    assert out.experts_per_token.item() == expected
    r.renormalize = True
    w = r(x).weights_TK[0, :expected]
    torch.testing.assert_close(w, torch.tensor(VECTOR[:expected]) / sum(VECTOR[:expected]))


def test_max_experts_caps_the_slots():
    probs = torch.full((1, 8), 1.0 / 8)
    r, x = router_with_probs(probs, threshold=0.9, rule="top_p", max_experts=3)
    out = r(x)
    assert out.ids_TK.shape == (1, 3) and (out.ids_TK >= 0).all()


def numpy_threshold(probs, threshold, rule, max_experts):
    """Direct transcription of both rules, one token at a time: (kept ids, kept probs)."""
    result = []
    for row in probs:
        order = sorted(range(len(row)), key=lambda e: -row[e])[:max_experts]
        kept, above = [], 0.0
        for rank, e in enumerate(order):
            if rule == "xmoe":
                take = rank == 0 or above < threshold
            else:
                take = above <= threshold  # cumulative <= p, plus the first to cross p
            if not take:
                break
            kept.append(e)
            above += row[e]
        result.append(kept)
    return result


@settings(max_examples=50, deadline=None)
@given(
    logits=st.integers(1, 6).flatmap(
        lambda E: st.lists(st.lists(st.floats(-4, 4), min_size=E, max_size=E), min_size=0, max_size=6)
    ),
    threshold=st.floats(0.05, 1.0),
    rule=st.sampled_from(["xmoe", "top_p"]),
    cap=st.integers(1, 6),
)
def test_matches_numpy_transcription(logits, threshold, rule, cap):
    assume(logits)
    probs64 = np.asarray(torch.softmax(torch.tensor(logits, dtype=torch.float32), -1), dtype=np.float64)
    E = probs64.shape[1]
    max_experts = min(cap, E)
    # away from the decision boundaries (float32 vs float64 sums) and from ties in the ranking
    for row in probs64:
        s = np.sort(row)[::-1]
        assume(np.all(np.abs(np.cumsum(s) - threshold) > 1e-5))
        assume(np.all(np.diff(s) < -1e-6) if E > 1 else True)
    r, x = router_with_probs(torch.tensor(probs64), threshold=threshold, rule=rule, max_experts=max_experts)
    out = r(x)
    expected = numpy_threshold(probs64, threshold, rule, max_experts)
    for t, kept in enumerate(expected):
        ids = out.ids_TK[t]
        assert ids[: len(kept)].tolist() == kept
        assert (ids[len(kept):] == -1).all()
        np.testing.assert_allclose(out.weights_TK[t, : len(kept)].detach().numpy(), probs64[t, kept], rtol=1e-4, atol=1e-6)


def test_xmoe_priority_first_choices_outrank_second_choices():
    # token 0: first choice expert 1 (0.55), second choice expert 0 (0.45)
    # token 1: first choice expert 0 (0.34), a low-confidence first choice
    probs = torch.tensor([[0.45, 0.55, 0.0], [0.34, 0.33, 0.33]]) + 1e-9
    probs = probs / probs.sum(-1, keepdim=True)
    r, x = router_with_probs(probs, threshold=0.9, rule="xmoe", capacity_factor=1.5)  # cap ceil(2/3*1.5)=1
    assert capacity(2, 1, 3, 1.5) == 1
    out = r(x)
    # expert 0 is wanted by token 0 (2nd choice, p=.45) and token 1 (1st choice, p=.34):
    # the first choice wins although its probability is lower.
    assert 0 not in out.ids_TK[0].tolist() and out.ids_TK[1, 0].item() == 0
    assert (out.counts_E <= 1).all()
    assert out.dropped_fraction.item() > 0
    pr = xmoe_priority(torch.tensor([[0.45, 0.3], [0.9, 0.05]]))
    assert pr[0, 0] > pr[1, 1] and pr[1, 0] > pr[0, 0] and pr[0, 1] > pr[1, 1]


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 20), E=st.integers(1, 6), cf=st.floats(0.2, 3.0), seed=st.integers(0, 2**16),
       rule=st.sampled_from(["xmoe", "top_p"]))
def test_capacity_never_exceeded_and_priority_respected(T, E, cf, seed, rule):
    torch.manual_seed(seed)
    r = ThresholdRouter(5, E, threshold=0.7, rule=rule, capacity_factor=cf)
    r.weight.data.normal_(0, 2.0)
    free = ThresholdRouter(5, E, threshold=0.7, rule=rule)
    free.weight.data.copy_(r.weight.data)
    x = torch.randn(T, 5)
    out, ref = r(x), free(x)
    cap = capacity(T, 1, E, cf)
    assert (out.counts_E <= cap).all()
    assert torch.equal(out.counts_E, ref.counts_E.clamp(max=cap))  # drops only over capacity
    assert (out.weights_TK[out.ids_TK < 0] == 0).all()
    kept = out.ids_TK >= 0
    assert torch.equal(out.ids_TK[kept], ref.ids_TK[kept])
    # per expert, every kept slot has XMoE priority >= every dropped slot
    prio = xmoe_priority(ref.weights_TK)
    dropped = (ref.ids_TK >= 0) & ~kept
    for e in range(E):
        kept_p, drop_p = prio[kept & (ref.ids_TK == e)], prio[dropped & (ref.ids_TK == e)]
        if len(kept_p) and len(drop_p):
            assert kept_p.min() >= drop_p.max()


def test_aux_losses():
    torch.manual_seed(0)
    r = ThresholdRouter(6, 4, threshold=0.5, rule="top_p", z_loss_coeff=1e-3, dynamic_loss_coeff=1e-2)
    out = r(torch.randn(3, 4, 6))
    assert set(out.aux_losses) == {"load_balancing", "z_loss", "dynamic"}
    p = out.probs_TE
    torch.testing.assert_close(out.aux_losses["dynamic"], 1e-2 * -(p * p.log()).sum(-1).mean())
    x = ThresholdRouter(6, 4, threshold=0.5)(torch.randn(8, 6))  # xmoe: f from the top-1 expert
    from routers import switch_load_balancing_loss

    torch.testing.assert_close(x.aux_losses["load_balancing"], 1e-2 * switch_load_balancing_loss(x.probs_TE, x.ids_TK[:, :1]))


def test_xmoe_aux_loss_is_the_reference_l_aux():
    """XMoE's l_aux: E * sum_e mean_t(probs) * mean_t(onehot(argmax)), over the routing before
    capacity drops, whatever the number of experts each token keeps."""
    torch.manual_seed(3)
    E = 6
    r = ThresholdRouter(5, E, threshold=0.9, capacity_factor=1.5, balance_loss_coeff=1.0)
    r.weight.data.normal_(0, 0.3)  # flat router: tokens keep several experts, some dropped
    out = r(torch.randn(30, 5))
    assert out.experts_per_token.item() > 1 and out.dropped_fraction.item() > 0
    probs = torch.softmax(out.logits_TE, -1)
    top1 = torch.nn.functional.one_hot(probs.argmax(-1), E).float()
    torch.testing.assert_close(out.aux_losses["load_balancing"], E * (probs.mean(0) * top1.mean(0)).sum())


# ---- the fused router (torch.ops.moe.topk_route with the rule) against its previous PyTorch path --

def previous_forward(r, x, padding_mask=None):
    """ThresholdRouter.forward as it was before the fused op (main at 6e6a137), op for op: softmax,
    top-K, threshold_keep, the combine weights, balance_losses on each token's first choice (xmoe)
    or its kept slots (top_p), the entropy loss, XMoE's capacity and make_routing."""
    logits_TE, valid_T, seq_shape = r._linear_logits(x, padding_mask)
    r._check_logits(logits_TE, valid_T)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    sorted_TK, ids_TK = probs_TE.topk(r.top_k, dim=-1, sorted=True)
    keep_TK = threshold_keep(sorted_TK, r.threshold, r.rule)
    if valid_T is not None:
        keep_TK = keep_TK & valid_T[:, None]
    ids_TK = ids_TK.masked_fill(~keep_TK, -1)
    weights_TK = topk_weights(probs_TE, ids_TK)
    if r.renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    chosen = count_chosen(ids_TK, valid_T)
    aux = {}
    if r.training:
        aux = balance_losses(balance_loss=r.balance_loss, balance_loss_coeff=r.balance_loss_coeff,
                             z_loss_coeff=r.z_loss_coeff, probs_TE=probs_TE,
                             ids_TK=ids_TK[:, :1] if r.rule == "xmoe" else ids_TK, logits_TE=logits_TE,
                             valid_T=valid_T, seq_shape=seq_shape)
        if r.dynamic_loss_coeff > 0:
            aux["dynamic"] = r.dynamic_loss_coeff * entropy_loss(probs_TE, valid_T=valid_T)
    if r.capacity_factor is not None:
        cap = capacity(ids_TK.shape[0], 1, r.num_experts, r.capacity_factor)
        ids_TK, weights_TK = apply_capacity(ids_TK, weights_TK, xmoe_priority(sorted_TK), cap, r.num_experts)
    return make_routing(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE,
                        valid_T=valid_T, chosen_slots=chosen, aux_losses=aux)


def routed_loss(out, c_TK):
    """A loss through the weights (c_TK: the plain sum of renormalised weights is constant) and
    every aux loss."""
    return (out.weights_TK * c_TK).sum() + sum(out.aux_losses.values())


@pytest.mark.parametrize("fused", [True, False], ids=["op", "twin"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kwargs", [
    dict(rule="xmoe", threshold=0.6),
    dict(rule="xmoe", threshold=0.9, renormalize=True, balance_loss="seq", z_loss_coeff=1e-2),
    dict(rule="xmoe", threshold=0.8, max_experts=3, capacity_factor=1.0, z_loss_coeff=1e-2),
    dict(rule="top_p", threshold=0.5, dynamic_loss_coeff=1e-2),
    dict(rule="top_p", threshold=0.7, renormalize=True, max_experts=4, balance_loss="seq"),
    dict(rule="top_p", threshold=1.0, renormalize=True, capacity_factor=1.5, z_loss_coeff=1e-3),
    dict(rule="top_p", threshold=0.3, balance_loss=None),
])
def test_fused_router_matches_the_previous_path(kwargs, padded, fused, monkeypatch):
    """ThresholdRouter through the fused op (and through its twin, routers.topk.route_topk, where
    moekit's ops are not registered) gives the ids, counts and metrics of the previous chain of
    PyTorch ops exactly, and its weights, probabilities, losses and gradients to float tolerance."""
    torch.manual_seed(0)
    r = ThresholdRouter(32, 16, init_std=0.2, **kwargs)
    if not fused:
        monkeypatch.setattr("routers.topk._topk_route_op", lambda: None)
    x = torch.randn(2, 40, 32)
    mask = None
    if padded:
        mask = torch.ones(2, 40, dtype=torch.bool)
        mask[1, 25:] = False
        mask[0, 3] = False
    c = torch.randn(80, r.top_k)
    for training in (True, False):
        r.train(training)
        got, want = r(x, padding_mask=mask), previous_forward(r, x, mask)
        assert torch.equal(got.ids_TK, want.ids_TK) and torch.equal(got.counts_E, want.counts_E)
        assert torch.equal(got.dropped_fraction, want.dropped_fraction)
        assert torch.equal(got.experts_per_token, want.experts_per_token)
        n_T = (want.ids_TK >= 0).sum(-1)
        assert n_T.min() < n_T.max(), "tokens keep different numbers of experts"
        torch.testing.assert_close(got.weights_TK, want.weights_TK, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.probs_TE, want.probs_TE, rtol=1e-6, atol=1e-7)
        assert got.aux_losses.keys() == want.aux_losses.keys()
        assert bool(got.aux_losses) == (training and kwargs.get("balance_loss", "switch") is not None)
        for name in got.aux_losses:
            torch.testing.assert_close(got.aux_losses[name], want.aux_losses[name], rtol=1e-5, atol=1e-7)
        (g1,) = torch.autograd.grad(routed_loss(got, c), r.weight)
        (g2,) = torch.autograd.grad(routed_loss(want, c), r.weight)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6 * g2.abs().max().item())


@pytest.mark.parametrize("fused", [True, False], ids=["op", "twin"])
@pytest.mark.parametrize("rule", ["xmoe", "top_p"])
def test_fused_router_gradcheck(rule, fused, monkeypatch):
    """float64: the router's weights, probabilities and losses are differentiable numerically
    right through the fused op (and its twin)."""
    if not fused:
        monkeypatch.setattr("routers.topk._topk_route_op", lambda: None)
    torch.manual_seed(1)
    r = ThresholdRouter(6, 5, threshold=0.7, rule=rule, renormalize=True, balance_loss="seq", z_loss_coeff=0.1,
                        dynamic_loss_coeff=0.1, init_std=0.5).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False

    def f(w):
        out = torch.func.functional_call(r, {"weight": w}, (x,), {"padding_mask": mask})
        return (out.weights_TK, out.probs_TE) + tuple(out.aux_losses.values())

    assert torch.autograd.gradcheck(f, (r.weight.detach().clone().requires_grad_(),))
