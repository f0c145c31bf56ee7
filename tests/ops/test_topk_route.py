"""Tests for moe.topk_route (torch.ops.moe.topk_route / topk_route_backward): a token-choice
router's scores, group-limited top-k and weights in one pass per token.

Shape legend: T tokens, E experts, K top-k slots, Z expert groups.
The twin is routers.topk.route_topk, the routers' own PyTorch code: the kernel picks the same
experts and its probabilities and weights agree to a few roundings (its softmax divides where
PyTorch's multiplies by a reciprocal, and sums in another order). Ties between choice scores go
to the lower expert id in the kernel; torch.topk's order among ties is unspecified.
"""

import pytest
import torch
from hypothesis import given, strategies as st
from torch.autograd import gradcheck
from torch.library import opcheck

from moe import ops
from moe.ops.registry import OPS
from moe.ops.twins import topk_route_backward_torch, topk_route_torch
from routers import TopKRouter
from routers.topk import route_topk

from tests.helpers.ops import router_logits
from tests.helpers.props import SETTINGS

needs_ext = pytest.mark.skipif("CPU" not in ops.compiled_kernels("topk_route"),
                               reason="moe._C extension not built")

# (score, E, K, Z, topk_groups, bias, norm, scaling): Mixtral, Qwen3, DeepSeek-V3-like and edge cases.
CONFIGS = [
    ("softmax", 8, 2, 0, 0, False, True, 1.0),
    ("softmax", 128, 8, 0, 0, False, True, 1.0),
    ("softmax", 16, 4, 0, 0, False, False, 1.0),
    ("sigmoid", 64, 8, 8, 4, True, True, 2.5),
    ("sigmoid", 32, 6, 4, 2, False, True, 1.0),
    ("softmax", 12, 3, 3, 1, True, False, 0.5),
    ("softmax", 1, 1, 0, 0, False, False, 1.0),
    ("sigmoid", 5, 5, 0, 0, True, True, 1.0),
]


def make(T, E, dtype=torch.float32, seed=0, bias=False):
    return router_logits(T, E, dtype, seed=seed, bias=bias)


def assert_compiles_alike(f, logits):
    """f(x) -> (ids, loss) gives the same ids, loss and d loss / d x eager and under torch.compile
    (aot_eager, dynamic shapes, one graph)."""
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ids1, l1 = f(x1)
    ids2, l2 = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)(x2)
    l1.backward()
    l2.backward()
    assert torch.equal(ids1, ids2)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_op_is_registered():
    assert "topk_route" in OPS and "topk_route_backward" in OPS


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_kernel_matches_twin(cfg, dtype):
    score, E, K, Z, G, bias, norm, scale = cfg
    logits, b = make(257, E, dtype, bias=bias)
    ids, w, p = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale)[:3]
    ids_t, w_t, p_t = topk_route_torch(logits, b, K, score, Z, G, norm, scale)[:3]
    tol = dict(rtol=4e-7, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
    assert ids.dtype == torch.int64 and w.dtype == dtype and p.dtype == dtype
    assert torch.equal(ids, ids_t)
    torch.testing.assert_close(p, p_t, **tol)
    torch.testing.assert_close(w, w_t, **tol)
    # the backward, from random output gradients: p (dp - <dp, p>) cancels, so an absolute
    # floor of a few roundings of |dp| ~ 1
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    gw, gp = torch.randn_like(w), torch.randn_like(p)
    d = torch.ops.moe.topk_route_backward(gw, gp, ids, p, score, norm, scale)
    torch.testing.assert_close(d, topk_route_backward_torch(gw, gp, ids, p, score, norm, scale), **tol)
    d0 = torch.ops.moe.topk_route_backward(gw, None, ids, p, score, norm, scale)
    torch.testing.assert_close(d0, topk_route_backward_torch(gw, None, ids, p, score, norm, scale), **tol)


@given(T=st.integers(0, 40), E=st.integers(1, 24), data=st.data())
@SETTINGS
def test_properties(T, E, data):
    """Whatever the kernel: K distinct ids per token within the allowed groups, best choice first,
    weights = the chosen probs (normalised), probs a softmax / sigmoid of the logits."""
    K = data.draw(st.integers(1, E))
    score = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    norm = data.draw(st.booleans())
    divisors = [z for z in range(1, E + 1) if E % z == 0]
    Z = data.draw(st.sampled_from([0] + divisors))
    G = 0
    if Z:
        G = data.draw(st.integers(-(-K // (E // Z)), Z))  # enough groups to hold K experts
    logits, b = make(T, E, torch.float64, seed=data.draw(st.integers(0, 1000)), bias=data.draw(st.booleans()))
    ids, w, p = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, 1.0)[:3]
    assert ids.shape == (T, K) and w.shape == (T, K) and p.shape == (T, E)
    ref_p = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    torch.testing.assert_close(p, ref_p, rtol=1e-13, atol=1e-15)
    assert bool(((ids >= 0) & (ids < E)).all())
    assert all(len(set(row)) == K for row in ids.tolist())
    choice = p + (b if b is not None else 0)
    picked = choice.gather(1, ids)
    assert bool((picked[:, :-1] >= picked[:, 1:]).all()), "ids are best first"
    if Z:
        groups = ids // (E // Z)
        assert all(len(set(row)) <= G for row in groups.tolist())
    else:  # no expert left out beats the worst chosen one
        left = choice.scatter(1, ids, float("-inf"))
        assert bool((left.max(-1).values <= picked[:, -1]).all()) if T and K < E else True
    ref_w = p.gather(1, ids)
    if norm:
        ref_w = ref_w / (ref_w.sum(-1, keepdim=True) + (1e-20 if score == "sigmoid" else 0.0))
    torch.testing.assert_close(w, ref_w, rtol=1e-13, atol=1e-15)


@needs_ext
def test_ties_go_to_the_lower_id():
    logits = torch.zeros(3, 8)
    ids, w, _ = torch.ops.moe.topk_route(logits, None, 3, "softmax", 0, 0, True, 1.0)[:3]
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 3))
    ids, _, _ = torch.ops.moe.topk_route(logits, None, 2, "sigmoid", 4, 2, True, 1.0)[:3]
    assert ids.tolist() == [[0, 1]] * 3  # groups 0 and 1 tie with the rest: the first two win


@pytest.mark.parametrize("cfg", CONFIGS)
def test_gradcheck(cfg):
    score, E, K, Z, G, bias, norm, scale = cfg
    logits, b = make(6, E, torch.float64, seed=3, bias=bias)
    logits.requires_grad_()
    b = b.double() if b is not None else None

    def f(x):
        _, w, p = torch.ops.moe.topk_route(x, b, K, score, Z, G, norm, scale)[:3]
        return w, p

    assert gradcheck(f, (logits,))
    # and the gradient equals autograd through the routers' PyTorch code
    gw = torch.randn(6, K, dtype=torch.float64)
    gp = torch.randn(6, E, dtype=torch.float64)
    _, w, p = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale)[:3]
    (d,) = torch.autograd.grad((w * gw).sum() + (p * gp).sum(), logits)
    _, w2, p2 = route_topk(logits, b, K, score, Z or None, G or None, norm, scale)[:3]
    (d2,) = torch.autograd.grad((w2 * gw).sum() + (p2 * gp).sum(), logits)
    torch.testing.assert_close(d, d2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_opcheck(cfg):
    score, E, K, Z, G, bias, norm, scale = cfg
    logits, b = make(9, E, bias=bias)
    # opcheck's AOT-autograd check sums the outputs into the first one's dtype (int64 ids here),
    # which fails before the op is involved: test_compiled_gradients covers that path instead.
    opcheck(torch.ops.moe.topk_route.default, (logits.requires_grad_(), b, K, score, Z, G, norm, scale),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    ids, w, p = torch.ops.moe.topk_route(logits.detach(), b, K, score, Z, G, norm, scale)[:3]
    opcheck(torch.ops.moe.topk_route_backward.default, (torch.randn_like(w), torch.randn_like(p), ids, p, score, norm, scale))


def test_empty_batch():
    ids, w, p = torch.ops.moe.topk_route(torch.zeros(0, 8), None, 2, "softmax", 0, 0, True, 1.0)[:3]
    assert ids.shape == (0, 2) and w.shape == (0, 2) and p.shape == (0, 8)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 8), None, 9, "softmax", 0, 0, True, 1.0), "top_k must be in"),
    ((torch.zeros(4, 8), None, 0, "softmax", 0, 0, True, 1.0), "top_k must be in"),
    ((torch.zeros(4, 8), None, 2, "relu", 0, 0, True, 1.0), "score must be"),
    ((torch.zeros(4, 8), None, 2, "softmax", 3, 1, True, 1.0), "num_groups=3 must divide"),
    ((torch.zeros(4, 8), None, 2, "softmax", 4, 5, True, 1.0), "topk_groups must be in"),
    ((torch.zeros(4, 8), None, 5, "softmax", 4, 2, True, 1.0), r"top_k must be in \[1, 4\]"),
    ((torch.zeros(4, 8), None, 2, "softmax", 0, 2, True, 1.0), "topk_groups must be 0"),
    ((torch.zeros(4, 8), torch.zeros(7), 2, "softmax", 0, 0, True, 1.0), "bias_E must have shape"),
    ((torch.zeros(4, 8, dtype=torch.bfloat16), None, 2, "softmax", 0, 0, True, 1.0), "float32 or float64"),
    ((torch.zeros(8), None, 2, "softmax", 0, 0, True, 1.0), "must be 2-D"),
    ((torch.zeros(4, 8), None, 2, "softmax", 0, 0, True, float("nan")), "scaling must be finite"),
])
def test_bad_input_names_the_argument(args, match):
    """The kernel, the twin (moe/ops/checks.py) and the fake kernel give the same error."""
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moe.topk_route(*args)
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moe.topk_route(*meta)


def test_backward_rejects_ids_out_of_range():
    probs = torch.softmax(torch.randn(3, 4), -1)
    ids = torch.tensor([[0, 1], [2, 4], [3, 0]])
    with pytest.raises(RuntimeError, match="outside|out of bounds"):
        torch.ops.moe.topk_route_backward(torch.ones(3, 2), None, ids, probs, "softmax", True, 1.0)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kwargs", [
    dict(score="softmax"),
    dict(score="sigmoid", num_groups=4, topk_groups=2, expert_bias=True, routed_scaling_factor=2.5),
    dict(score="softmax", norm_topk=False, capacity_factor=1.0),
    dict(score="softmax", balance_loss="seq", z_loss_coeff=1e-2),
    dict(score="sigmoid", expert_bias=True, balance_loss="seq", z_loss_coeff=1e-2),
])
def test_router_uses_the_op_with_its_own_results(kwargs, padded, monkeypatch):
    """TopKRouter through the op gives the ids, weights, losses, metrics and gradients of its
    PyTorch code (the statistics of the losses and metrics included)."""
    torch.manual_seed(0)
    router = TopKRouter(32, 16, 4, **kwargs)
    if router.expert_bias is not None:
        router.expert_bias.normal_(0, 0.05)
    x = torch.randn(2, 50, 32)
    mask = None
    if padded:
        mask = torch.ones(2, 50, dtype=torch.bool)
        mask[1, 30:] = False
    c = torch.randn(100, 4)  # (the plain sum of renormalised weights is constant: no gradient)
    r1 = router(x, padding_mask=mask)
    loss1 = ((r1.weights_TK * c).sum() + sum(r1.aux_losses.values()))
    (g1,) = torch.autograd.grad(loss1, router.weight)
    monkeypatch.setattr("routers.topk._topk_route_op", lambda: None)
    r2 = router(x, padding_mask=mask)
    assert torch.equal(r1.counts_E, r2.counts_E) and r1.aux_losses.keys() == r2.aux_losses.keys()
    assert torch.equal(r1.dropped_fraction, r2.dropped_fraction)
    assert torch.equal(r1.experts_per_token, r2.experts_per_token)
    loss2 = ((r2.weights_TK * c).sum() + sum(r2.aux_losses.values()))
    (g2,) = torch.autograd.grad(loss2, router.weight)
    assert torch.equal(r1.ids_TK, r2.ids_TK)
    torch.testing.assert_close(r1.weights_TK, r2.weights_TK, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r1.probs_TE, r2.probs_TE, rtol=1e-6, atol=1e-7)
    for name in r1.aux_losses:
        torch.testing.assert_close(r1.aux_losses[name], r2.aux_losses[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6 * g2.abs().max().item())


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3]])
def test_compiled_gradients(cfg):
    """torch.compile (AOT autograd, dynamic shapes) through the fake kernel and the registered
    backward gives the eager outputs and gradients."""
    score, E, K, Z, G, bias, norm, scale = cfg
    logits, b = make(33, E, bias=bias)

    def f(x):
        ids, w, p = torch.ops.moe.topk_route(x, b, K, score, Z, G, norm, scale)[:3]
        return ids, (w * torch.arange(1, K + 1)).sum() + (p * p).sum()

    assert_compiles_alike(f, logits)


# ---- the statistics of the metrics and losses (counts_E, metrics, fw_BE, psum_BE, zsum) --------

def make_valid(T, seed=0):
    """A padding mask with a padded stretch, one padded token elsewhere, and (when T >= 12) a
    whole padded sequence of 4 tokens at the end."""
    valid = torch.ones(T, dtype=torch.bool)
    valid[1:3] = False
    if T >= 12:
        valid[-4:] = False
    return valid


STAT_CONFIGS = [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[4], CONFIGS[5], CONFIGS[7]]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,padded", [(1, False), (1, True), (4, True), (3, False)])
@pytest.mark.parametrize("cfg", STAT_CONFIGS)
def test_statistics_match_twin(cfg, B, padded, dtype):
    score, E, K, Z, G, bias, norm, scale = cfg
    T = 12 * 8
    logits, b = make(T, E, dtype, seed=1, bias=bias)
    valid = make_valid(T) if padded else None
    out = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale, valid, B, True)
    ref = topk_route_torch(logits, b, K, score, Z, G, norm, scale, valid, B, True)
    ids, w, p, counts, metrics, fw, psum, zsum, balance = out
    assert torch.equal(ids, ref[0]) and torch.equal(counts, ref[3])
    assert counts.dtype == torch.int64 and metrics.dtype == torch.float32
    assert fw.shape == psum.shape == (B, E) and zsum.shape == ()
    if padded:
        assert bool((ids[~valid] == -1).all()) and bool((w[~valid] == 0).all())
    torch.testing.assert_close(metrics, ref[4], rtol=0, atol=0)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    for got, want in zip(out[5:], ref[5:]):
        torch.testing.assert_close(got, want, **tol)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,padded", [(0, False), (1, False), (4, True)])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4]])
def test_balance_is_the_dot_of_fw_and_psum(cfg, B, padded, dtype):
    """balance = sum(fw_BE * psum_BE) (with fw_BE's fw_scale; in (b, e) order on the CPU), 0
    without statistics: the balance loss itself, as the routers' formula computes it."""
    score, E, K, Z, G, bias, norm, scale = cfg
    T = 48
    logits, b = make(T, E, dtype, seed=7, bias=bias)
    valid = make_valid(T) if padded else None
    out = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale, valid, B, False, "none", 1.0, 0.3 * E)
    fw, psum, balance = out[5], out[6], out[8]
    assert balance.shape == () and balance.dtype == dtype
    want = (fw.double() * psum.double()).sum()
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(balance.double(), want, **tol)
    if B == 0:
        assert balance.item() == 0.0
    elif score == "softmax" and b is None:  # the loss scores are the probs, the loss ids the ids
        from routers.losses import balance_statistics

        S = T // B
        ref_fw, ref_psum = balance_statistics(out[2].reshape(B, S, E), out[0].reshape(B, S, K),
                                              valid_BS=None if valid is None else valid.reshape(B, S))
        torch.testing.assert_close(balance, 0.3 * E * (ref_fw * ref_psum).sum(), **tol)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fw_scale", [0.25, -3.0, 0.0])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4]])
def test_fw_scale_multiplies_fw_only(cfg, fw_scale, dtype):
    """fw_scale (a balance loss's coefficient times E) multiplies fw_BE and nothing else, in the
    kernel as in the twin."""
    score, E, K, Z, G, bias, norm, scale = cfg
    T, B = 48, 4
    logits, b = make(T, E, dtype, seed=3, bias=bias)
    valid = make_valid(T)
    plain = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale, valid, B)
    scaled = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale, valid, B, False, "none", 1.0, fw_scale)
    twin = topk_route_torch(logits, b, K, score, Z, G, norm, scale, valid, B, False, "none", 1.0, fw_scale)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    assert plain[5].abs().sum() > 0
    torch.testing.assert_close(scaled[5], plain[5] * fw_scale, **tol)
    torch.testing.assert_close(scaled[5], twin[5], **tol)
    for i in (0, 1, 2, 3, 4, 6, 7):
        assert torch.equal(scaled[i], plain[i]), i


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4]])
def test_z_scale_multiplies_zsum_and_its_gradient(cfg, padded, dtype):
    """z_scale (a z-loss's coefficient over the tokens) multiplies zsum and nothing else, in the kernel
    as in the twin; the backward takes the same factor (kernel against twin, and against z_scale
    times the unscaled gradient)."""
    score, E, K, Z, G, bias, norm, scale = cfg
    T, B, zs = 48, 4, 0.37
    logits, b = make(T, E, dtype, seed=6, bias=bias)
    valid = make_valid(T) if padded else None
    plain = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale, valid, B)
    scaled = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale, valid, B, False, "none", 1.0, 1.0, zs)
    twin = topk_route_torch(logits, b, K, score, Z, G, norm, scale, valid, B, False, "none", 1.0, 1.0, zs)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(scaled[7], plain[7] * zs, **tol)
    torch.testing.assert_close(scaled[7], twin[7], **tol)
    for i in range(7):
        assert torch.equal(scaled[i], plain[i]), i
    ids, w, p = plain[:3]
    gw, gz = torch.zeros_like(w), torch.tensor(1.5, dtype=dtype)
    args = (gw, None, ids, p, score, norm, scale, None, gz, logits, valid)
    d1 = torch.ops.moe.topk_route_backward(*args, zs)
    d0 = torch.ops.moe.topk_route_backward(*args)
    btol = dict(rtol=1e-5, atol=2e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d1, topk_route_backward_torch(*args, zs), **btol)
    torch.testing.assert_close(d1, d0 * zs, **btol)
    assert d0.abs().sum() > 0


def test_z_scale_gradcheck():
    """zsum's gradient through the op's autograd formula, with z_scale, against finite differences."""
    logits, _ = make(12, 8, torch.float64, seed=7)
    logits.requires_grad_()
    f = lambda x: torch.ops.moe.topk_route(x, None, 2, "softmax", 0, 0, True, 1.0, None, 2,  # noqa: E731
                                           False, "none", 1.0, 0.5, 0.25)[7]
    assert gradcheck(f, (logits,))


def test_fw_scale_must_be_finite():
    args = (torch.zeros(4, 8), None, 2, "softmax", 0, 0, True, 1.0, None, 1, False, "none", 1.0, float("nan"))
    with pytest.raises(RuntimeError, match="fw_scale must be finite"):
        torch.ops.moe.topk_route(*args)
    with pytest.raises(RuntimeError, match="fw_scale must be finite"):
        torch.ops.moe.topk_route(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    with pytest.raises(RuntimeError, match="z_scale must be finite"):
        torch.ops.moe.topk_route(*args[:-1], 1.0, float("inf"))
    probs = torch.softmax(torch.randn(4, 8), -1)
    with pytest.raises(RuntimeError, match="z_scale must be finite"):
        torch.ops.moe.topk_route_backward(torch.ones(4, 2), None, torch.tensor([[0, 1]] * 4), probs, "softmax",
                                          True, 1.0, None, None, None, None, float("nan"))


@pytest.mark.parametrize("B,padded", [(1, False), (2, True)])
@pytest.mark.parametrize("cfg", CONFIGS[:6])
def test_statistics_gradcheck(cfg, B, padded):
    """psum_BE's, zsum's and balance's gradients (with the weights' and probs'): numerically, and
    equal to autograd through the routers' PyTorch code."""
    score, E, K, Z, G, bias, norm, scale = cfg
    T = 12
    logits, b = make(T, E, torch.float64, seed=4, bias=bias)
    logits.requires_grad_()
    b = b.double() if b is not None else None
    valid = make_valid(T) if padded else None

    def f(x, fn=torch.ops.moe.topk_route):
        _, w, p, _, _, _, psum, zsum, balance = fn(x, b, K, score, Z, G, norm, scale, valid, B, False, "none", 1.0,
                                                   0.7)
        return w, p, psum, zsum, balance

    assert gradcheck(f, (logits,))
    g = [torch.randn(T, K, dtype=torch.float64), torch.randn(T, E, dtype=torch.float64),
         torch.randn(B, E, dtype=torch.float64), torch.randn((), dtype=torch.float64),
         torch.randn((), dtype=torch.float64)]
    (d,) = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(f(logits), g)), logits)
    twin = lambda x, *a: route_topk(x, *a[:3], a[3] or None, a[4] or None, *a[5:])  # noqa: E731
    (d2,) = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(f(logits, twin), g)), logits)
    torch.testing.assert_close(d, d2, rtol=1e-12, atol=1e-14)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", STAT_CONFIGS)
def test_statistics_backward_kernel_matches_twin(cfg, dtype):
    score, E, K, Z, G, bias, norm, scale = cfg
    T, B = 48, 4
    logits, b = make(T, E, dtype, seed=2, bias=bias)
    valid = make_valid(T)
    ids, w, p = torch.ops.moe.topk_route(logits, b, K, score, Z, G, norm, scale, valid, B)[:3]
    gw, gp = torch.randn_like(w), torch.randn_like(p)
    gs, gz = torch.randn(B, E, dtype=dtype), torch.randn((), dtype=dtype)
    gb, fw = torch.randn((), dtype=dtype), torch.rand(B, E, dtype=dtype)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for grads in ((gs, gz, None, None), (gs, gz, gb, fw), (None, None, gb, fw)):
        args = (gw, gp, ids, p, score, norm, scale, grads[0], grads[1], logits, valid, 1.0, grads[2], grads[3])
        torch.testing.assert_close(torch.ops.moe.topk_route_backward(*args), topk_route_backward_torch(*args), **tol)
    # balance's gradient is psum_BE's times fw_BE: the same as passing that as grad_psum_BE
    with_balance = torch.ops.moe.topk_route_backward(gw, gp, ids, p, score, norm, scale, None, None, logits, valid,
                                                     1.0, gb, fw)
    as_psum = torch.ops.moe.topk_route_backward(gw, gp, ids, p, score, norm, scale, gb * fw, None, logits, valid)
    assert torch.equal(with_balance, as_psum)


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3]])
def test_statistics_opcheck(cfg):
    score, E, K, Z, G, bias, norm, scale = cfg
    logits, b = make(12, E, bias=bias)
    valid = make_valid(12)
    opcheck(torch.ops.moe.topk_route.default, (logits.requires_grad_(), b, K, score, Z, G, norm, scale, valid, 3, True),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    opcheck(torch.ops.moe.topk_route.default,
            (logits, b, K, score, Z, G, norm, scale, valid, 3, True, "none", 1.0, 0.5),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    ids, w, p = torch.ops.moe.topk_route(logits.detach(), b, K, score, Z, G, norm, scale, valid, 3)[:3]
    opcheck(torch.ops.moe.topk_route_backward.default,
            (torch.randn_like(w), None, ids, p, score, norm, scale, torch.randn(3, E), torch.randn(()),
             logits.detach(), valid))
    opcheck(torch.ops.moe.topk_route_backward.default,
            (torch.randn_like(w), None, ids, p, score, norm, scale, None, None, None, valid, 1.0, torch.randn(()),
             torch.rand(3, E)))


def test_check_finite_refuses_real_tokens_only():
    logits = torch.randn(6, 8)
    logits[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        torch.ops.moe.topk_route(logits, None, 2, "softmax", 0, 0, True, 1.0, None, 0, True)
    valid = torch.ones(6, dtype=torch.bool)
    valid[2] = False
    ids = torch.ops.moe.topk_route(logits, None, 2, "softmax", 0, 0, True, 1.0, valid, 0, True)[0]
    assert ids[2].tolist() == [-1, -1]
    torch.ops.moe.topk_route(logits, None, 2, "softmax", 0, 0, True, 1.0)  # unchecked: routes


@pytest.mark.parametrize("extra,match", [
    ((torch.ones(5, dtype=torch.bool), 0), r"valid_T must be a bool tensor of shape \(4,\)"),
    ((torch.ones(4), 0), "valid_T must be a bool tensor"),
    ((None, 3), "num_seqs must be 0 .* or divide T=4"),
    ((None, -1), "num_seqs must be 0"),
])
def test_bad_statistics_args_name_the_argument(extra, match):
    args = (torch.zeros(4, 8), None, 2, "softmax", 0, 0, True, 1.0) + extra
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moe.topk_route(*args)
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moe.topk_route(*meta)


@pytest.mark.parametrize("extra,match", [
    ((torch.zeros(3, 4), None, None, None), r"grad_psum_BE must be \(B, E=4\) with B dividing T=4"),
    ((None, torch.zeros(()), None, None), "grad_zsum needs logits_TE"),
    ((None, torch.zeros(1), torch.zeros(4, 4), None), "grad_zsum must be a 0-d"),
    ((None, None, torch.zeros(4, 5), None), "logits_TE must match probs_TE"),
    ((None, None, None, torch.ones(3, dtype=torch.bool)), "valid_T must be a bool tensor"),
    ((None, None, None, None, 1.0, torch.zeros(())), "grad_balance needs fw_BE"),
    ((None, None, None, None, 1.0, torch.zeros(1), torch.zeros(1, 4)), "grad_balance must be a 0-d"),
    ((None, None, None, None, 1.0, torch.zeros(()), torch.zeros(3, 4)), r"fw_BE must be \(B, E=4\) with B dividing"),
    ((torch.zeros(2, 4), None, None, None, 1.0, torch.zeros(()), torch.zeros(1, 4)), "must have one shape"),
])
def test_bad_backward_statistics_args_name_the_argument(extra, match):
    probs = torch.softmax(torch.randn(4, 4), -1)
    args = (torch.ones(4, 2), None, torch.tensor([[0, 1]] * 4), probs, "softmax", True, 1.0) + extra
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moe.topk_route_backward(*args)


# ---- the threshold rules (rule "xmoe" / "top_p": the threshold router) ----------------------------

# (rule, E, K, threshold, norm): K = max_experts (K = E included), one expert, threshold 1
RULE_CONFIGS = [
    ("xmoe", 8, 8, 0.5, False),
    ("xmoe", 16, 4, 0.8, True),
    ("top_p", 8, 8, 0.5, True),
    ("top_p", 64, 8, 0.3, False),
    ("top_p", 12, 12, 1.0, False),
    ("xmoe", 5, 3, 1.0, True),
    ("xmoe", 1, 1, 0.5, False),
]


def rule_args(cfg, *extra):
    """topk_route's arguments for a RULE_CONFIGS entry, with valid_T, num_seqs, check_finite."""
    rule, E, K, threshold, norm = cfg
    valid_T, num_seqs, check = extra if extra else (None, 0, False)
    return (K, "softmax", 0, 0, norm, 1.0, valid_T, num_seqs, check, rule, threshold)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,padded", [(0, False), (1, True), (4, True), (3, False)])
@pytest.mark.parametrize("cfg", RULE_CONFIGS)
def test_rule_kernel_matches_twin(cfg, B, padded, dtype):
    """All nine results, and the backward with every gradient, equal the twin's: ids, counts and
    metrics exactly, the rest to a few roundings."""
    T, E = 12 * 8, cfg[1]
    logits, _ = make(T, E, dtype, seed=5)
    valid = make_valid(T) if padded else None
    args = rule_args(cfg, valid, B, True)
    out = torch.ops.moe.topk_route(logits, None, *args)
    ref = topk_route_torch(logits, None, *args)
    ids, w, p, counts, metrics, fw, psum, zsum, balance = out
    assert torch.equal(ids, ref[0]) and torch.equal(counts, ref[3])
    torch.testing.assert_close(metrics, ref[4], rtol=0, atol=0)
    kept = ids >= 0
    assert bool((kept[:, :-1] >= kept[:, 1:]).all()), "a prefix of the slots is kept"
    assert bool((w[~kept] == 0).all())
    if valid is not None:
        assert bool((~kept[~valid]).all()) and bool(kept[valid, 0].all())
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    for got, want in zip((w, p, fw, psum, zsum, balance), (ref[1], ref[2]) + tuple(ref[5:])):
        torch.testing.assert_close(got, want, **tol)
    gw, gp = torch.randn_like(w), torch.randn_like(p)
    gs, gz = (torch.randn(B, E, dtype=dtype), torch.randn((), dtype=dtype)) if B else (None, None)
    bargs = (gw, gp, ids, p, "softmax", cfg[4], 1.0, gs, gz, logits if B else None, valid)
    btol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.ops.moe.topk_route_backward(*bargs), topk_route_backward_torch(*bargs), **btol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule,threshold,kept", [
    ("xmoe", 0.25, 1), ("top_p", 0.25, 2), ("xmoe", 0.5, 2), ("top_p", 0.5, 3),
    ("xmoe", 0.75, 3), ("top_p", 0.75, 4), ("xmoe", 1.0, 4), ("top_p", 1.0, 4),
])
def test_rule_ties_at_the_threshold(rule, threshold, kept, dtype):
    """Sums above a rank exactly at the threshold (the hand-worked vectors' case): uniform
    probabilities 1/4 (equal logits), whose sums 0, 1/4, 1/2, 3/4 are exact in the kernel and the
    twin. "xmoe" keeps a rank while the sum above it is < threshold, "top_p" while it is <=: at a
    tie top_p keeps one expert more."""
    logits = torch.zeros(3, 4, dtype=dtype)
    two = torch.tensor([0.0, float("-inf"), 0.0, float("-inf")], dtype=dtype)  # 1/2, 1/2: a tie at 0.5
    for fn in (torch.ops.moe.topk_route, topk_route_torch):
        ids, w = fn(logits, None, 4, "softmax", 0, 0, False, 1.0, None, 0, False, rule, threshold)[:2]
        assert ((ids >= 0).sum(-1) == kept).all() and (ids[:, kept:] == -1).all()
        assert all(len(set(row[:kept])) == kept for row in ids.tolist())  # (torch.topk orders ties its way)
        torch.testing.assert_close(w, torch.tensor([[0.25] * kept + [0.0] * (4 - kept)] * 3, dtype=dtype))
        n = 1 if rule == "xmoe" else 2  # the sum above rank 1 is 1/2 = the threshold
        ids2, w2 = fn(two[None], None, 4, "softmax", 0, 0, True, 1.0, None, 0, False, rule, 0.5)[:2]
        assert set(ids2[0, :n].tolist()) <= {0, 2} and len(set(ids2[0, :n].tolist())) == n
        assert (ids2[0, n:] == -1).all()
        torch.testing.assert_close(w2[0], torch.tensor([1 / n] * n + [0.0] * (4 - n), dtype=dtype))


@given(T=st.integers(0, 30), E=st.integers(1, 20), data=st.data())
@SETTINGS
def test_rule_properties(T, E, data):
    """Whatever the kernel: each token keeps a prefix of its top-K by probability, exactly the
    ranks its rule keeps (sums above each rank in float64, rounded to the dtype), with the kept
    probabilities (renormalised) as weights; counts and experts_per_token count the kept slots;
    the loss slots are the first choice (xmoe) or the kept slots (top_p)."""
    K = data.draw(st.integers(1, E))
    rule = data.draw(st.sampled_from(["xmoe", "top_p"]))
    threshold = data.draw(st.sampled_from([1.0, 0.5]) | st.floats(1e-3, 1.0))
    norm = data.draw(st.booleans())
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    logits, _ = make(T, E, dtype, seed=data.draw(st.integers(0, 1000)))
    ids, w, p, counts, metrics, fw, psum, zsum, _ = torch.ops.moe.topk_route(
        logits, None, K, "softmax", 0, 0, norm, 1.0, None, 1, False, rule, threshold)
    kept = ids >= 0
    n_T = kept.sum(-1)
    assert bool((n_T >= min(1, T)).all()) and bool((kept[:, :-1] >= kept[:, 1:]).all())
    full = p.topk(K, dim=-1).values if T else p.new_zeros(0, K)
    picked = p.gather(1, ids.clamp(min=0))
    torch.testing.assert_close(picked[kept], full[kept], rtol=0, atol=0)  # the best n_T by probability
    above = torch.cumsum(full.double(), -1) - full.double()  # the sum above each rank, checked away from ties
    tied = ((above - threshold).abs() < 1e-5).any()
    if not tied and T:
        want = above < threshold if rule == "xmoe" else above <= threshold
        want[:, 0] = True
        stop = (~want).to(torch.int64).cumsum(-1) == 0
        assert torch.equal(kept, stop)
    ref_w = picked * kept
    if norm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True).clamp(min=1e-300)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(w, ref_w, **tol)
    assert torch.equal(counts, torch.bincount(ids[kept], minlength=E))
    assert metrics[1].item() == pytest.approx(n_T.sum().item() / max(T, 1), rel=1e-6)
    slots = torch.bincount(ids[:, 0][kept[:, 0]], minlength=E) if rule == "xmoe" else counts
    slots = slots.to(dtype)
    torch.testing.assert_close(fw[0] * T, slots / slots.sum().clamp(min=1), **tol)


@pytest.mark.parametrize("B,padded", [(1, False), (2, True)])
@pytest.mark.parametrize("cfg", RULE_CONFIGS[:4] + RULE_CONFIGS[5:6])
def test_rule_gradcheck(cfg, B, padded):
    """float64: the weights', probs', psum_BE's and zsum's gradients numerically, and equal to
    autograd through the twin (dropped slots carry none; renormalised over the kept)."""
    T, E = 12, cfg[1]
    logits, _ = make(T, E, torch.float64, seed=6)
    logits.requires_grad_()
    valid = make_valid(T) if padded else None

    def f(x, fn=torch.ops.moe.topk_route):
        _, w, p, _, _, _, psum, zsum, balance = fn(x, None, *rule_args(cfg, valid, B, False))
        return w, p, psum, zsum, balance

    assert gradcheck(f, (logits,))
    K = cfg[2]
    g = [torch.randn(T, K, dtype=torch.float64), torch.randn(T, E, dtype=torch.float64),
         torch.randn(B, E, dtype=torch.float64), torch.randn((), dtype=torch.float64),
         torch.randn((), dtype=torch.float64)]
    (d,) = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(f(logits), g)), logits)
    (d2,) = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(f(logits, topk_route_torch), g)), logits)
    torch.testing.assert_close(d, d2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cfg", RULE_CONFIGS[1:3])
def test_rule_opcheck(cfg):
    logits, _ = make(12, cfg[1])
    valid = make_valid(12)
    opcheck(torch.ops.moe.topk_route.default, (logits.requires_grad_(), None) + rule_args(cfg, valid, 3, True),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    opcheck(torch.ops.moe.topk_route.default, (logits, None) + rule_args(cfg),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_rule_compiled_gradients():
    """torch.compile (AOT autograd, dynamic shapes) of the threshold rule: the eager outputs and
    gradients."""
    cfg = RULE_CONFIGS[2]
    logits, _ = make(33, cfg[1])

    def f(x):
        ids, w, p, _, _, _, psum, zsum, _ = torch.ops.moe.topk_route(x, None, *rule_args(cfg, None, 3, False))
        return ids, (w * torch.arange(1, cfg[2] + 1)).sum() + (p * p).sum() + (psum * psum).sum() + zsum

    assert_compiles_alike(f, logits)


@pytest.mark.parametrize("args,match", [
    ((None, 2, "softmax", 0, 0, True, 1.0, None, 0, False, "top_k", 0.5), "rule must be 'none', 'xmoe' or 'top_p'"),
    ((None, 2, "softmax", 0, 0, True, 1.0, None, 0, False, "xmoe", 0.0), r"threshold must be in \(0, 1\], got 0"),
    ((None, 2, "softmax", 0, 0, True, 1.0, None, 0, False, "top_p", 1.5), r"threshold must be in \(0, 1\]"),
    ((None, 2, "softmax", 0, 0, True, 1.0, None, 0, False, "top_p", float("nan")), r"threshold must be in \(0, 1\]"),
    ((None, 2, "softmax", 0, 0, True, 1.0, None, 0, False, "none", -1.0), r"threshold must be in \(0, 1\]"),
    ((None, 2, "sigmoid", 0, 0, True, 1.0, None, 0, False, "xmoe", 0.5), "rule='xmoe' needs score='softmax'"),
    ((torch.zeros(8), 2, "softmax", 0, 0, True, 1.0, None, 0, False, "top_p", 0.5), "rule='top_p' takes no bias_E"),
    ((None, 2, "softmax", 4, 2, True, 1.0, None, 0, False, "xmoe", 0.5), "takes no bias_E and no groups"),
])
def test_bad_rule_args_name_the_argument(args, match):
    """The kernel, the twin and the fake kernel refuse the same rule arguments, naming them."""
    args = (torch.zeros(4, 8),) + args
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moe.topk_route(*args)
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moe.topk_route(*meta)
