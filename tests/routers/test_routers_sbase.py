"""SBaseRouter and sinkhorn (Clark et al. 2022's S-BASE): the balanced transport plan, top-k of it
in training, plain top-k at inference, gates from the original scores, gradients to the router."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe
import routers.sbase as sbase_mod
from moe.model import MoEConfig
from routers import SBaseRouter, TopKRouter, sinkhorn
from tests.routers.test_routers_common import check_contract

D, E = 12, 6


def make(top_k=2, seed=0, **kw):
    torch.manual_seed(seed)
    router = SBaseRouter(D, E, top_k, **kw)
    with torch.no_grad():
        router.weight.mul_(50.0)  # spread the logits so routing is not degenerate
    return router


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(1, 9), scale=st.floats(0.0, 8.0), skew=st.floats(0.0, 6.0),
       tol=st.sampled_from([1e-2, 1e-4, 1e-6]), pad=st.booleans(), seed=st.integers(0, 2**16))
def test_sinkhorn_marginals_within_tolerance(T, E, scale, skew, tol, pad, seed):
    """The defining property: every expert's load is exactly 1/E, every real token's mass is
    within a fraction tol of 1/T' (T' real tokens) once the stopping rule holds, padded tokens
    carry none. Near-permutation costs converge slowly (a 2 x 2 one with logits 6.2, -1.2 / -8.7,
    2.3 gains a factor 0.9987 per iteration); where max_iters ends first, the plan must be still
    moving: twice the iterations give another plan, closer to the marginals."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64) * scale + torch.linspace(0, skew, E, dtype=torch.float64)
    valid = torch.rand(T, generator=g) > 0.3 if pad else None
    if valid is not None:
        valid[0] = True
    real = T if valid is None else int(valid.sum())
    mask = torch.ones(T, dtype=torch.bool) if valid is None else valid

    def row_error(plan):
        return ((plan.sum(1) * real)[mask] - 1).abs().max().item()

    plan = sinkhorn(logits, valid_T=valid, tol=tol, max_iters=5_000)
    assert plan.dtype == torch.float64 and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(0), torch.full((E,), 1.0 / E, dtype=torch.float64), rtol=1e-6, atol=0)
    assert (plan.sum(1)[~mask] == 0).all()
    if row_error(plan) > tol * (1 + 1e-6) + 1e-9:  # stopped by max_iters, not by the rule
        longer = sinkhorn(logits, valid_T=valid, tol=tol, max_iters=10_000)
        assert not torch.equal(longer, plan) and row_error(longer) < row_error(plan)


def test_sinkhorn_slow_case_reaches_the_tolerance_given_the_iterations():
    """The slow 2 x 2 case above: 10,000 iterations stop short of tol = 1e-6 (rows within the last
    update's fraction, as documented), 20,000 reach it."""
    logits = torch.tensor([[6.1640, -1.1737], [-8.7152, 2.2737]], dtype=torch.float64)
    short, long = (sinkhorn(logits, tol=1e-6, max_iters=n) for n in (10_000, 20_000))
    assert ((short.sum(1) * 2 - 1).abs().max() > 1e-6) and ((long.sum(1) * 2 - 1).abs().max() <= 1e-6)


def test_sinkhorn_is_a_diagonal_scaling_of_exp_logits():
    """Sinkhorn's fixed point is diag(d0) exp(L) diag(d1) (Cuturi 2013, Lemma 2): log P - L is
    u_i + v_j, so its double-centred residual vanishes, and the scaling does not overflow."""
    torch.manual_seed(0)
    logits = torch.randn(30, 7, dtype=torch.float64) * 3 + 500.0  # exp(500+) overflows float64
    r = (sinkhorn(logits, tol=1e-10, max_iters=10_000).log() - logits)
    resid = r - r.mean(0, keepdim=True) - r.mean(1, keepdim=True) + r.mean()
    assert resid.abs().max() < 1e-9


def test_sinkhorn_fixed_iterations_never_sync(monkeypatch):
    """tol=0: exactly max_iters iterations and no host sync (CUDA-graph friendly)."""
    def no_sync(*args):
        raise AssertionError("tol=0 must not ask the host whether Sinkhorn converged")

    monkeypatch.setattr(sbase_mod, "_sync_sinkhorn_converged", no_sync)
    plan = sinkhorn(torch.randn(16, 4), tol=0.0, max_iters=50)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 0.25), rtol=1e-5, atol=0)


def test_training_balances_what_top_k_would_collapse():
    """Skewed logits send almost every token to the same experts under top-k; S-BASE's top-1 of
    the plan spreads them close to T/E each."""
    T = 512
    router = SBaseRouter(D, E, 1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.linspace(0.0, 8.0, E)  # logits = x_0 * ramp: one feature decides
    x = torch.randn(T, D)
    x[:, 0] = x[:, 0].abs() + 1.0
    plain = torch.bincount(x[:, 0:1].mul(torch.linspace(0.0, 8.0, E)).argmax(1), minlength=E)
    assert plain.max() == T  # top-k: every token on the last expert
    counts = router(x).counts_E
    assert counts.sum() == T and counts.max() <= 2 * T // E and counts.min() >= T // (2 * E)


@pytest.mark.parametrize("top_k,score", [(1, None), (2, None), (3, "sigmoid"), (2, "softmax")])
def test_eval_is_plain_top_k(top_k, score):
    router = make(top_k, score=score).eval()
    ref = TopKRouter(D, E, top_k, score=router.score, norm_topk=False).eval()
    ref.load_state_dict(router.state_dict())
    x = torch.randn(3, 9, D)
    ours, theirs = router(x), ref(x)
    assert torch.equal(ours.ids_TK, theirs.ids_TK)
    assert torch.equal(ours.weights_TK, theirs.weights_TK)
    assert ours.aux_losses == {}


@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_training_routes_on_the_plan_with_original_gates(top_k):
    router = make(top_k, z_loss_coeff=1e-3)
    x = torch.randn(2, 11, D)
    out = router(x)
    plan = sinkhorn(out.logits_TE, tol=router.sinkhorn_tol, max_iters=router.sinkhorn_iters)
    assert torch.equal(out.ids_TK, plan.topk(top_k, dim=-1).indices)
    expected_score = "sigmoid" if top_k == 1 else "softmax"
    assert router.score == expected_score
    torch.testing.assert_close(out.weights_TK, out.probs_TE.gather(1, out.ids_TK), rtol=0, atol=0)
    scores = torch.sigmoid(out.logits_TE) if top_k == 1 else torch.softmax(out.logits_TE, -1)
    torch.testing.assert_close(out.probs_TE, scores)
    assert set(out.aux_losses) == {"z_loss"}
    check_contract(router, out, 22)


def test_gradients_reach_the_router_weight():
    router = make(2, norm_topk=True)
    out = router(torch.randn(20, D))
    (out.weights_TK * torch.randn(20, 2)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_padding_and_empty_batches():
    router = make(2)
    x = torch.randn(2, 5, D)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False
    out = router(x, padding_mask=mask)
    check_contract(router, out, 10, num_real=7)
    assert (out.ids_TK[mask.reshape(-1) == 0] == -1).all()
    real = router(x[mask][None])  # padded tokens take no transport mass: same as dropping them
    assert torch.equal(out.ids_TK[mask.reshape(-1)], real.ids_TK)
    empty = router(torch.randn(0, D))
    assert empty.ids_TK.shape == (0, 2) and empty.counts_E.sum() == 0


def test_in_moe_layer_and_lm():
    torch.manual_seed(0)
    layer = moe.MoELayer(D, 8, E, router=SBaseRouter(D, E, 2))
    x = torch.randn(2, 7, D, requires_grad=True)
    layer(x).square().mean().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    lm = moe.build_lm(vocab_size=31, dim=16, n_layers=2, n_heads=2,
                      moe=MoEConfig(num_experts=4, ffn_hidden_size=8, top_k=2, router="sbase"))
    ids = torch.randint(0, 31, (2, 10))
    lm(ids, labels=ids).loss.backward()
    assert all(layer.router.weight.grad is not None for layer in lm.modules() if isinstance(layer, moe.MoELayer))


@pytest.mark.parametrize("kwargs,name", [
    (dict(top_k=0), "top_k"), (dict(top_k=E + 1), "top_k"), (dict(score="relu"), "score"),
    (dict(sinkhorn_tol=-1.0), "sinkhorn_tol"), (dict(sinkhorn_iters=0), "sinkhorn_iters"),
    (dict(sinkhorn_iters=2.5), "sinkhorn_iters"), (dict(z_loss_coeff=-1.0), "z_loss_coeff"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SBaseRouter(D, E, **kwargs)


def test_bad_sinkhorn_arguments():
    with pytest.raises(ValueError, match="tol"):
        sinkhorn(torch.randn(3, 2), tol=float("nan"))
    with pytest.raises(ValueError, match="max_iters"):
        sinkhorn(torch.randn(3, 2), max_iters=0)
    with pytest.raises(ValueError, match="router must be one of"):
        MoEConfig(num_experts=4, ffn_hidden_size=8, router="sinkhorn")
