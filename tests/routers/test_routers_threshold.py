"""ThresholdRouter: hand-worked vectors (probabilities 0.5/0.3/0.15/0.05 at thresholds 0.5, 0.8,
0.9), a NumPy transcription of both rules, and XMoE's capacity priority."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from routers import ThresholdRouter, capacity, threshold_keep, xmoe_priority

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
