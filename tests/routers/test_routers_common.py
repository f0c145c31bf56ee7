"""Properties every router shares: the Routing contract, edge cases, bad input, gradients."""

import math

import pytest
import torch

from routers import (
    ExpertChoiceRouter,
    RecurrentRouter,
    RecurrentRouterChain,
    Routing,
    ThresholdRouter,
    TopKRouter,
    expert_counts,
)

D, E = 12, 6

FACTORIES = {
    "topk_softmax": lambda: TopKRouter(D, E, 2, z_loss_coeff=1e-3),
    "topk_k1": lambda: TopKRouter(D, E, 1),
    "topk_sigmoid_groups_bias": lambda: TopKRouter(
        D, E, 2, score="sigmoid", num_groups=3, topk_groups=2, expert_bias=True, routed_scaling_factor=2.5
    ),
    "topk_capacity_seq": lambda: TopKRouter(D, E, 2, capacity_factor=0.5, balance_loss="seq"),
    "threshold_xmoe": lambda: ThresholdRouter(D, E, threshold=0.6, capacity_factor=1.0),
    "threshold_top_p": lambda: ThresholdRouter(D, E, threshold=0.4, rule="top_p", max_experts=4, dynamic_loss_coeff=1e-3),
    "recurrent": lambda: RecurrentRouter(D, E, 2, router_dim=8, init_std=0.5),
    "expert_choice": lambda: ExpertChoiceRouter(D, E, 2.0, z_loss_coeff=1e-3),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    router = FACTORIES[name]()
    with torch.no_grad():
        for p in router.parameters():  # spread the logits so routing is not degenerate
            p.mul_(10.0)
    return router


def check_contract(router, out, T, num_real=None):
    K = router.top_k
    assert isinstance(out, Routing)
    assert out.ids_TK.shape == (T, K) and out.ids_TK.dtype == torch.int64
    assert out.weights_TK.shape == (T, K) and out.weights_TK.dtype == torch.float32
    assert out.probs_TE.shape == (T, E) and out.probs_TE.dtype == torch.float32
    assert out.logits_TE.shape == (T, E) and out.logits_TE.dtype == torch.float32
    assert out.top_k == K and out.num_experts == E
    assert ((out.ids_TK >= -1) & (out.ids_TK < E)).all()
    empty = out.ids_TK < 0
    assert (out.weights_TK[empty] == 0).all(), "-1 slots must carry no weight"
    assert (out.weights_TK >= 0).all()
    assert torch.equal(out.counts_E, torch.bincount(out.ids_TK[~empty], minlength=E))
    for t in range(T):  # no expert twice in a token's slots
        real = out.ids_TK[t][out.ids_TK[t] >= 0]
        assert real.unique().numel() == real.numel()
    for v in (out.dropped_fraction, out.experts_per_token):
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32
    num_real = T if num_real is None else num_real
    assert out.experts_per_token.item() == pytest.approx((~empty).sum().item() / max(num_real, 1))
    assert 0.0 <= out.dropped_fraction.item() <= 1.0
    for name, loss in out.aux_losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), name


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("shape", [(7, D), (2, 5, D), (1, 1, D)])
def test_contract_and_determinism(name, shape):
    router = make(name)
    x = torch.randn(*shape)
    T = math.prod(shape[:-1])
    out = router(x)
    check_contract(router, out, T)
    assert out.aux_losses, "every router here has a loss enabled in training"
    again = router(x)
    assert torch.equal(out.ids_TK, again.ids_TK) and torch.equal(out.weights_TK, again.weights_TK)
    router.eval()
    assert router(x).aux_losses == {}, "no aux losses in eval"


@pytest.mark.parametrize("name", FACTORIES)
def test_low_precision_input_is_routed_in_float32(name):
    router = make(name)
    x = torch.randn(9, D)
    out32 = router(x.to(torch.bfloat16).to(torch.float32))
    out16 = router(x.to(torch.bfloat16))
    check_contract(router, out16, 9)
    assert torch.equal(out16.ids_TK, out32.ids_TK)
    torch.testing.assert_close(out16.weights_TK, out32.weights_TK)


@pytest.mark.parametrize("name", FACTORIES)
def test_autocast_does_not_round_the_router(name):
    """Under bfloat16 autocast (mixed-precision training) a router still computes in float32:
    the same routing, bit for bit, as without autocast."""
    router = make(name).train()
    x = torch.randn(2, 9, D)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = router(x)
    check_contract(router, mixed, 18)
    for field in ("ids_TK", "weights_TK", "logits_TE"):
        assert torch.equal(getattr(mixed, field), getattr(plain, field)), field
    assert mixed.aux_losses.keys() == plain.aux_losses.keys()
    for k in plain.aux_losses:
        assert torch.equal(mixed.aux_losses[k], plain.aux_losses[k]), k


@pytest.mark.parametrize("name", FACTORIES)
def test_aux_losses_are_differentiable(name):
    router = make(name)
    out = router(torch.randn(2, 6, D))
    total = out.weights_TK.sum() + sum(out.aux_losses.values(), torch.zeros(()))
    total.backward()
    grads = [p.grad for p in router.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", FACTORIES)
def test_empty_batch(name):
    router = make(name)
    for shape in [(0, D), (0, 4, D), (3, 0, D)]:
        out = router(torch.randn(*shape))
        check_contract(router, out, 0)
        assert out.counts_E.sum() == 0 and out.experts_per_token == 0


@pytest.mark.parametrize("name", FACTORIES)
def test_padding_mask_blanks_tokens_and_losses(name):
    router = make(name)
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = router(x, padding_mask=mask)
    check_contract(router, out, 10, num_real=8)
    pad = ~mask.reshape(-1)
    assert (out.ids_TK[pad] == -1).all() and (out.weights_TK[pad] == 0).all()
    # Garbage (even NaN) in padded rows changes nothing for the real tokens or the losses.
    x2 = x.clone()
    x2[1, 3:] = float("nan")
    out2 = router(x2, padding_mask=mask.reshape(-1))
    assert torch.equal(out.ids_TK, out2.ids_TK)
    for k in out.aux_losses:
        torch.testing.assert_close(out.aux_losses[k], out2.aux_losses[k])
    # Without capacity, a padded batch routes real tokens as the batch of real tokens alone.
    if getattr(router, "capacity_factor", 1) is None:
        alone = router(x[0])
        assert torch.equal(alone.ids_TK, out.ids_TK[:5])


@pytest.mark.parametrize("name", FACTORIES)
def test_bad_input_names_the_argument(name):
    router = make(name)
    with pytest.raises(ValueError, match="hidden_size"):
        router(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="x must have shape"):
        router(torch.randn(D))
    with pytest.raises(TypeError, match="floating"):
        router(torch.ones(4, D, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be"):
        router([[0.0] * D])
    bad = torch.randn(4, D)
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        router(bad)
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        router(bad)
    with pytest.raises(ValueError, match="padding_mask"):
        router(torch.randn(2, 3, D), padding_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        router(torch.randn(2, 3, D), padding_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="x is on meta"):
        router(torch.randn(4, D, device="meta"))


def test_check_finite_false_skips_the_sync_check():
    router = TopKRouter(D, E, 2, check_finite=False)
    out = router(torch.full((3, D), float("nan")))
    assert out.ids_TK.shape == (3, 2)  # garbage in, garbage out, but no host sync


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", FACTORIES)
def test_forward_has_no_host_sync_on_cuda(name):
    router = make(name).cuda()
    router.check_finite = False
    x = torch.randn(2, 8, D, device="cuda")
    mask = torch.ones(2, 8, dtype=torch.bool, device="cuda")
    router(x, padding_mask=mask)  # warm-up (lazy init may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = router(x, padding_mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_contract(router, out, 16)


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(D, 4, 5)
    with pytest.raises(ValueError, match="top_k"):
        RecurrentRouter(D, 4, 0)
    with pytest.raises(ValueError, match="top_k"):
        RecurrentRouterChain(2, D, 4, 5)
    with pytest.raises(ValueError, match="hidden_size"):
        TopKRouter(0, 4, 1)
    with pytest.raises(ValueError, match="num_experts"):
        ExpertChoiceRouter(D, 0, 1.0)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            ThresholdRouter(D, 4, threshold=bad)
    with pytest.raises(ValueError, match="capacity_factor"):
        TopKRouter(D, 4, 1, capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(D, 4, -1.0)
    with pytest.raises(ValueError, match="balance_loss"):
        TopKRouter(D, 4, 1, balance_loss="gshard")
    with pytest.raises(ValueError, match="score"):
        TopKRouter(D, 4, 1, score="relu")
    with pytest.raises(ValueError, match="drop_policy"):
        TopKRouter(D, 4, 1, drop_policy="random")
    with pytest.raises(ValueError, match="num_groups"):
        TopKRouter(D, 6, 1, num_groups=4, topk_groups=1)
    with pytest.raises(ValueError, match="topk_groups"):
        TopKRouter(D, 6, 1, num_groups=3, topk_groups=4)
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(D, 6, 3, num_groups=3, topk_groups=1)
    with pytest.raises(ValueError, match="max_experts"):
        ThresholdRouter(D, 4, threshold=0.5, max_experts=5)
    with pytest.raises(ValueError, match="rule"):
        ThresholdRouter(D, 4, threshold=0.5, rule="top_k")
    with pytest.raises(ValueError, match="router_dim"):
        RecurrentRouter(D, 4, 1, router_dim=0)


def test_router_attributes():
    assert TopKRouter(D, E, 2).top_k == 2
    assert ThresholdRouter(D, E, threshold=0.5).top_k == E
    assert ThresholdRouter(D, E, threshold=0.5, max_experts=3).top_k == 3
    assert ExpertChoiceRouter(D, E, 1.0).top_k == E
    r = RecurrentRouter(D, E, 2, router_dim=4)
    assert (r.hidden_size, r.num_experts, r.top_k) == (D, E, 2)


def test_expert_counts_ignores_empty_slots():
    ids = torch.tensor([[0, -1], [2, 0], [-1, -1]])
    assert expert_counts(ids, 3).tolist() == [2, 0, 1]


@pytest.mark.parametrize("name", ["topk_softmax", "topk_sigmoid_groups_bias", "threshold_top_p", "recurrent", "expert_choice"])
def test_gradcheck_float64(name):
    router = make(name).double()
    router.check_finite = False
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    ids = router(x).ids_TK

    def weights(x_in, *params):  # the routing is piecewise smooth: keep the selection fixed
        out = router(x_in)
        assert torch.equal(out.ids_TK, ids)
        return out.weights_TK, sum(out.aux_losses.values(), torch.zeros((), dtype=torch.float64))

    params = [p for p in router.parameters()]
    assert torch.autograd.gradcheck(weights, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)
