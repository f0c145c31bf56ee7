"""Tests for moe.mor: Mixture-of-Recursions (Bae et al. 2025) routers, sharing, KV caches,
causal inference, padding, edge cases, and a tiny training smoke test."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from moe.layer import collect_aux_losses
from moe.model import DecoderBlock, build_lm
from moe.mor import (ExpertChoiceConfig, MixtureOfRecursions, TokenChoiceConfig, build_mor_lm,
                     compact, default_capacities)
from routers.depth import warmup_capacity

EC, TC = ExpertChoiceConfig, TokenChoiceConfig
ROUTERS = [EC(), TC(), TC(router_func="sigmoid", balancing="loss_free")]
KVS = ["recursion_wise", "recursive_sharing"]


def _mor(router, nr=3, kv="recursion_wise", n_blocks=1, seed=0, dim=16):
    torch.manual_seed(seed)
    blocks = [DecoderBlock(dim, 2, mlp_hidden=24) for _ in range(n_blocks)]
    return MixtureOfRecursions(blocks, num_recursions=nr, router=router, kv_cache=kv).double()


def _mor_lm(router, kv="recursion_wise", seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=13, dim=16, n_layers=5, n_heads=2, num_recursions=3, mlp_hidden=24)
    args.update(kw)
    return build_mor_lm(router=router, kv_cache=kv, **args).double()


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


def _logits(router, h):
    """The router's linear map h @ theta^T: (..., D) -> (..., out)."""
    return h @ router.weight.T


# ----------------------------------------------------------------------------- sharing
@pytest.mark.parametrize("sharing,L,unique", [("middle_cycle", 5, 3), ("cycle", 6, 2)])
def test_parameter_count_is_the_shared_one_and_weights_are_tied(sharing, L, unique):
    mor = _mor_lm(EC(), sharing=sharing, n_layers=L)
    van = build_lm(vocab_size=13, dim=16, n_layers=L, n_heads=2, mlp_hidden=24)
    per_block = _n_params(van.layers[0])
    routers = 3 * 16  # one D -> 1 linear per recursion step
    assert _n_params(mor) == _n_params(van) - (L - unique) * per_block + routers
    blocks = {id(m) for m in mor.modules() if isinstance(m, DecoderBlock)}
    assert len(blocks) == unique  # no hidden copies
    # tied: the shared attention (and norms) run once per recursion step, with the same tensors
    core = next(m for m in mor.modules() if isinstance(m, MixtureOfRecursions))
    calls = []
    hooks = [core.block[0].attn.register_forward_pre_hook(lambda m, a: calls.append(m.qkv.weight)),
             core.block[0].attn_norm.register_forward_pre_hook(lambda m, a: calls.append(m.weight))]
    mor.train()(torch.randint(0, 13, (1, 9)))
    assert len(calls) == 2 * 3 and len({id(w) for w in calls}) == 2
    for h in hooks:
        h.remove()


# ----------------------------------------------------------------------------- expert choice
def _expert_choice_reference(mor, x, train, bce_terms=None):
    """Row by row: top-k among previous selection (train) or sigmoid > 0.5 (eval), the block on
    the selected tokens as their own sequence at original positions, h += g * f(h).
    bce_terms[r] collects (logits of the tokens active at step r, top-k membership targets)."""
    out = []
    for b in range(x.shape[0]):
        h, sel = x[b].clone(), torch.arange(x.shape[1])
        for r, cap in enumerate(mor.capacities):
            logit, prev = _logits(mor.routers[r], h).squeeze(-1), sel
            if cap < 1 and train:
                k = int(cap * x.shape[1] + 1e-6)
                sel = sel[logit[sel].topk(k).indices].sort().values
            elif cap < 1:
                sel = sel[logit[sel] > 0]
            if bce_terms is not None and len(prev):
                bce_terms.setdefault(r, []).append((logit[prev], torch.isin(prev, sel).double()))
            if len(sel) == 0:
                break
            y = mor.block[0](h[sel][None], sel[None])[0]
            h = h.index_add(0, sel, mor.cfg.alpha * torch.sigmoid(logit[sel])[:, None] * y)
        out.append(h)
    return torch.stack(out)


@pytest.mark.parametrize("train", [True, False])
def test_expert_choice_matches_rowwise_reference(train):
    mor = _mor(EC()).train(train)
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(mor(x), _expert_choice_reference(mor, x, train), rtol=0, atol=1e-12)
    if train:  # capacity schedule (Nr - r)/Nr of the sequence, hierarchical
        assert mor.last_stats["tokens"] == [36, 24, 12]
        assert (mor.last_depth.sum(1) == 12 + 8 + 4).all()
    else:
        assert 0 < mor.last_stats["tokens"][1] < 36  # thresholding is not degenerate here


def test_expert_choice_bce_aux_loss_is_topk_membership():
    mor = _mor(EC(z_coef=1e-4)).train()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mor(x)
    terms = {}
    _expert_choice_reference(mor, x, True, terms)
    bce = z = 0.0
    for r, rows in terms.items():  # mean over the tokens active at step r, summed over steps
        logit, tgt = torch.cat([t[0] for t in rows]), torch.cat([t[1] for t in rows])
        bce = bce + F.binary_cross_entropy_with_logits(logit, tgt)
        z = z + logit.pow(2).mean()
    assert [int(torch.cat([t[1] for t in terms[r]]).sum()) for r in terms] == [12, 8, 4]
    torch.testing.assert_close(mor.last_stats["bce"], bce.detach())
    assert mor.aux_losses.keys() == {"bce", "z_loss"}
    torch.testing.assert_close(mor.aux_losses["bce"], 1e-3 * bce)
    torch.testing.assert_close(mor.aux_losses["z_loss"], 1e-4 * z)
    mor.eval()(x)
    assert mor.aux_losses == {}


def test_attention_flops_per_step_fall_as_k_over_T_squared():
    mor = _mor(EC(), nr=3).train()
    T = 12
    mor(torch.randn(2, T, 16, dtype=torch.float64))
    flops = mor.last_stats["attn_flops"]
    ks = [T, 8, 4]
    for f, k in zip(flops, ks):
        assert f * T * T == flops[0] * k * k  # exactly (k/T)^2 of the full-sequence step
    assert flops[0] == 4 * 2 * 2 * T * T * 8  # B*H*T*T*A multiply-adds for QK^T and PV


# ----------------------------------------------------------------------------- token choice
def test_token_choice_matches_rowwise_reference_and_losses():
    mor = _mor(TC(), nr=3).train()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    y = mor(x)
    for b in range(2):
        probs = torch.softmax(_logits(mor.router, x[b]), -1)
        depth = probs.argmax(-1)
        out, h = x[b].clone(), x[b].clone()
        for r in range(3):
            idx = torch.nonzero(depth >= r).squeeze(-1)
            if len(idx) == 0:
                break
            f = mor.block[0](h[idx][None], idx[None])[0]
            fin = depth[idx] == r
            out[idx[fin]] += probs[idx[fin], r][:, None] * f[fin]
            h[idx[~fin]] = f[~fin]
        torch.testing.assert_close(y[b], out, rtol=0, atol=1e-12)
        assert torch.equal(mor.last_depth[b], depth + 1)
    logits = _logits(mor.router, x)
    probs = torch.softmax(logits, -1).reshape(-1, 3)
    load = torch.bincount(probs.argmax(-1), minlength=3).double() / 20
    bal = (probs.mean(0) * 3 * load).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    assert mor.aux_losses.keys() == {"load_balancing", "z_loss"}
    torch.testing.assert_close(mor.aux_losses["load_balancing"], 0.1 * bal)
    torch.testing.assert_close(mor.aux_losses["z_loss"], 1e-5 * z)


def test_loss_free_bias_moves_toward_balance_once_per_update():
    """Reference trainer: b_i += u * sign(mean(load) - load_i) after the optimizer step, load
    averaged over the micro-batches; forward itself never moves the bias."""
    mor = _mor(TC(balancing="loss_free", bias_rate=0.01), nr=3).train()
    loads = []
    for _ in range(2):  # two micro-batches, one update
        mor(torch.randn(2, 10, 16, dtype=torch.float64))
        loads.append(mor.last_stats["load"])
        assert torch.equal(mor.router.depth_bias, torch.zeros(3, dtype=torch.float64))
        assert mor.aux_losses.keys() == {"z_loss"}
        assert mor.aux_losses["z_loss"].item() == pytest.approx(1e-5 * mor.last_stats["z_loss"].item())
    load = loads[0] + loads[1]
    mor.update_router_bias()
    torch.testing.assert_close(mor.router.depth_bias, 0.01 * torch.sign(load.mean() - load), rtol=0, atol=0)
    assert torch.equal(mor.router.load_sum, torch.zeros(3, dtype=torch.float64))
    mor.eval()(torch.randn(2, 10, 16, dtype=torch.float64))  # eval forwards record no load
    assert torch.equal(mor.router.load_sum, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="loss_free"):
        _mor(TC()).update_router_bias()


def test_state_dict_names_and_old_checkpoints_load():
    """Parameter names are those of the inline routers (routers.{r}.weight, router.weight); the
    token-choice bias saved as `router_bias` loads into router.depth_bias."""
    assert [k for k in _mor(EC()).state_dict() if "router" in k] == [f"routers.{r}.weight" for r in range(3)]
    mor = _mor(TC(balancing="loss_free"))
    assert [k for k in mor.state_dict() if "router" in k] == ["router.weight", "router.depth_bias"]
    old = {k: v for k, v in mor.state_dict().items() if k != "router.depth_bias"}
    old["router_bias"] = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
    mor.load_state_dict(old)
    assert mor.router.depth_bias.tolist() == [0.5, -0.5, 0.0]


def test_capacity_warmup_follows_the_reference_schedule():
    """cap_warmup_step (expert_choice_router.py): capacity c + (1 - c)(1 + cos(pi min(1, t/W)))/2
    at training forward t: 1 at the start, the target from t = W on."""
    assert warmup_capacity(0.5, 1, 0) == 0.5 and warmup_capacity(0.5, 0, 10) == 1.0
    assert warmup_capacity(0.5, 10, 10) == 0.5 and warmup_capacity(0.5, 50, 10) == 0.5
    assert warmup_capacity(0.5, 5, 10) == pytest.approx(0.75)  # half way: cos(pi/2) = 0


def test_expert_choice_capacity_warmup_keeps_more_tokens_first_and_counts_training_forwards():
    W, S = 8, 32
    mor = _mor(EC(cap_warmup_steps=W), nr=2).train()
    x = torch.randn(2, S, 16, dtype=torch.float64)
    kept = []
    for t in range(1, W + 3):
        mor(x)
        assert mor.train_forwards == t
        kept.append(int((mor.last_depth == 2).sum(1)[0]))
        assert kept[-1] == int(warmup_capacity(0.5, t, W) * S + 1e-6)  # floor(capacity * len) per row
    assert kept[0] > kept[W // 2] > kept[W - 1] == S // 2 and kept[-1] == S // 2
    mor.eval()(x)
    assert mor.train_forwards == W + 2  # eval forwards do not count
    fresh = _mor(EC(cap_warmup_steps=W), nr=2)
    fresh.load_state_dict(mor.state_dict())
    assert fresh.train_forwards == W + 2  # the clock is in the state dict: a resumed run goes on


def test_token_choice_balancing_warmup_sends_every_token_deepest_first():
    """bal_warmup_step (token_choice_router.py): training forwards t < W take every token to the
    deepest step (gate = its probability), with a loss-free bias held at zero; then argmax."""
    W, P = 3, 3
    mor = _mor(TC(bal_warmup_steps=W, balancing="loss_free"), nr=P).train()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    for t in range(1, W):
        mor.router.depth_bias.fill_(0.25)
        mor(x)
        assert (mor.last_depth == P).all() and (mor.router.depth_bias == 0).all()
    mor.router.depth_bias.zero_()
    mor(x)  # t = W: the router decides
    assert not (mor.last_depth == P).all()
    logits = _logits(mor.router, x).reshape(-1, P)
    assert torch.equal(mor.last_depth.reshape(-1), logits.argmax(-1) + 1)


def test_deprecated_aux_loss_is_the_sum_of_aux_losses():
    mor = _mor(EC(z_coef=1e-4)).train()
    with pytest.warns(DeprecationWarning, match="aux_losses"):
        assert mor.aux_loss is None  # before the first forward
    mor(torch.randn(2, 6, 16, dtype=torch.float64))
    with pytest.warns(DeprecationWarning, match="aux_losses"):
        torch.testing.assert_close(mor.aux_loss, mor.aux_losses["bce"] + mor.aux_losses["z_loss"])


@pytest.mark.parametrize("router", [EC(), TC(), TC(router_func="sigmoid")])
def test_routers_are_bias_free_linear_with_normal_002_init(router):
    """Reference LinearRouter: nn.Linear(D, out, bias=False), weight ~ N(0, initializer_range)."""
    mor = _mor(router, nr=4, dim=64)
    lins = list(mor.routers) if isinstance(router, EC) else [mor.router]
    assert all([n for n, _ in lin.named_parameters()] == ["weight"] for lin in lins)  # no bias
    assert [tuple(lin.weight.shape) for lin in lins] == ([(1, 64)] * 4 if isinstance(router, EC)
                                                         else [(4, 64)])
    w = torch.cat([lin.weight.flatten() for lin in lins])  # 256 draws; default init has std 0.072
    assert 0.017 < w.std().item() < 0.023 and abs(w.mean().item()) < 0.005
    torch.manual_seed(7)
    mor.reset_router_parameters()
    torch.manual_seed(7)
    for lin in lins:  # exactly the N(0, 0.02) draws, in router order
        assert torch.equal(lin.weight, torch.empty_like(lin.weight).normal_(0.0, 0.02))


# ----------------------------------------------------------------------------- caches, causality
@pytest.mark.parametrize("kv,fraction", [("recursion_wise", (3 + 1, 2 * 3)),
                                         ("recursive_sharing", (1, 3))])
def test_kv_cache_memory_fraction(kv, fraction):
    mor = _mor(EC(), nr=3, kv=kv, n_blocks=2).train()
    cache = mor.new_cache()
    B, T = 2, 12
    with torch.no_grad():
        mor(torch.randn(B, T, 16, dtype=torch.float64), cache=cache)
    vanilla = 3 * 2 * B * T  # Nr steps x 2 layers in the block, every token cached at each
    num, den = fraction
    assert cache.num_tokens() * den == num * vanilla  # exact integer ratio


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kv", KVS)
def test_incremental_decoding_equals_full_forward(router, kv):
    model = _mor_lm(router, kv, seed=1).eval()
    ids = torch.randint(0, 13, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the batch
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache()
        parts = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
        for t in range(5, 11):
            parts.append(model(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1)[mask.bool()], full[mask.bool()], rtol=0, atol=1e-11)
    gen = model.generate(ids[:1, :4], 5)
    assert gen.shape == (1, 9)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("kv", KVS)
def test_eval_outputs_at_t_ignore_tokens_after_t(router, kv):
    model = _mor_lm(router, kv, seed=2).eval()
    ids = torch.randint(0, 13, (3, 12))
    with torch.no_grad():
        base = model(ids).logits
        for t in (0, 5, 10):
            other = ids.clone()
            other[:, t + 1:] = torch.randint(0, 13, other[:, t + 1:].shape)
            torch.testing.assert_close(model(other).logits[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-11)
    depth = model.layers[1].last_depth
    assert depth.min() >= 1 and depth.unique().numel() > 1  # routing really varies per token


def test_training_topk_is_non_causal_which_is_why_eval_thresholds():
    """The paper's top-k lets later tokens evict earlier ones (a causality leak at inference);
    thresholds don't."""
    mor = _mor(EC(capacities=(1.0, 0.5)), nr=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 16, dtype=torch.float64, generator=gen)
    changed = {True: 0, False: 0}
    for train in (True, False):
        mor.train(train)(x)
        before = mor.last_depth[0, :4].clone()
        for _ in range(6):
            x2 = x.clone()
            x2[0, 4:] = 3 * torch.randn(4, 16, dtype=torch.float64, generator=gen)
            mor(x2)
            changed[train] += int(not torch.equal(mor.last_depth[0, :4], before))
    assert changed[True] > 0 and changed[False] == 0


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("router", ROUTERS)
def test_padded_batch_equals_rows_alone(router):
    for train in (True, False):
        mor = _mor(router, nr=3).train(train)
        a, b = torch.randn(1, 9, 16, dtype=torch.float64), torch.randn(1, 6, 16, dtype=torch.float64)
        x = torch.cat((a, torch.cat((b, torch.zeros(1, 3, 16, dtype=torch.float64)), 1)))
        valid = torch.arange(9)[None] < torch.tensor([[9], [6]])
        y = mor(x, None, valid)
        depth = mor.last_depth.clone()
        torch.testing.assert_close(y[0], mor(a)[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(y[1, :6], mor(b)[0], rtol=0, atol=1e-12)
        assert (depth[1, 6:] == -1).all() and torch.equal(y[1, 6:], x[1, 6:])
        if isinstance(router, TC):  # forward never moves the loss-free bias
            assert torch.equal(mor.router.depth_bias, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("train", [True, False])
def test_expert_choice_ties_go_to_the_earlier_position_in_any_batch(train):
    """All router logits equal (zero weights): top-k keeps the first k positions of each row,
    alone or padded in a batch (stable tie-break; an unstable sort could pick any k)."""
    mor = _mor(EC(capacities=(1.0, 0.5), eval_routing="topk"), nr=2).train(train)
    for lin in mor.routers:
        nn.init.zeros_(lin.weight)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    valid = torch.arange(10)[None] < torch.tensor([[10], [7]])
    y = mor(x, None, valid)
    assert mor.last_depth.tolist() == [[2] * 5 + [1] * 5, [2] * 3 + [1] * 4 + [-1] * 3]
    torch.testing.assert_close(y[1, :7], mor(x[1:, :7])[0], rtol=0, atol=1e-12)
    assert mor.last_depth.tolist() == [[2] * 3 + [1] * 4]


def test_capacity_zero_and_full():
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mor = _mor(EC(capacities=(1.0, 0.0, 0.0))).train()
    y = mor(x)
    assert (mor.last_depth == 1).all() and mor.last_stats["attn_flops"][1:] == [0, 0]
    mor_full = _mor(EC(capacities=(1.0, 1.0, 1.0))).eval()
    y_full, h = mor_full(x), x
    for r in range(3):  # every token, every step: the plain recursive block with the update rule
        h = h + 0.1 * torch.sigmoid(_logits(mor_full.routers[r], h)) * mor_full.block[0](h)
    torch.testing.assert_close(y_full, h, rtol=0, atol=1e-12)
    assert (mor_full.last_depth == 3).all() and y.shape == x.shape


@pytest.mark.parametrize("router", [EC(), TC()])
def test_single_recursion_equals_plain_shared_block(router):
    mor = _mor(router, nr=1).train()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    y = mor(x)
    if isinstance(router, EC):
        gate = 0.1 * torch.sigmoid(_logits(mor.routers[0], x))
    else:
        gate = torch.ones(2, 7, 1, dtype=torch.float64)  # softmax over one depth
    torch.testing.assert_close(y, x + gate * mor.block[0](x), rtol=0, atol=1e-12)
    assert (mor.last_depth == 1).all()


@pytest.mark.parametrize("router", ROUTERS)
def test_sequence_length_one(router):
    model = _mor_lm(router)
    for train in (True, False):
        out = model.train(train)(torch.tensor([[4], [7]]), labels=torch.tensor([[4], [7]]))
        assert out.logits.shape == (2, 1, 13) and torch.isfinite(collect_aux_losses(model))
        assert all(torch.isfinite(v) for v in out.aux_losses.values())


def test_moe_layers_inside_the_shared_block_report_the_sum_over_steps():
    class FakeMoE(nn.Module):
        def forward(self, x):
            self.aux_losses = {"fake": x.new_ones(()), "other": x.new_full((), 0.5)}
            return x

    torch.manual_seed(0)
    mor = MixtureOfRecursions([DecoderBlock(8, 2, mlp=FakeMoE())], num_recursions=3,
                              router=EC(capacities=(1.0, 0.5, 0.0))).train()
    mor(torch.randn(1, 4, 8))
    # steps 0 and 1 ran, step 2 selected nobody: the sum over steps, per name
    assert {k: v.item() for k, v in mor.block[0].mlp.aux_losses.items()} == {"fake": 2.0, "other": 1.0}
    assert collect_aux_losses(mor, by_name=True).keys() == {"fake", "other", "bce"}


def test_bad_configs_raise_value_errors_naming_the_argument():
    kw = dict(vocab_size=11, dim=8, n_heads=2, num_recursions=3)
    with pytest.raises(ValueError, match="n_layers"):
        build_mor_lm(n_layers=7, sharing="cycle", **kw)
    with pytest.raises(ValueError, match="n_layers"):
        build_mor_lm(n_layers=6, sharing="middle_cycle", **kw)
    with pytest.raises(ValueError, match="sharing"):
        build_mor_lm(n_layers=6, sharing="sequence", **kw)
    blk = [DecoderBlock(8, 2)]
    bad = [(dict(num_recursions=0, router=EC()), "num_recursions"),
           (dict(num_recursions=3, router=EC(capacities=(1.0, 0.3, 0.6))), "capacities"),
           (dict(num_recursions=3, router=EC(capacities=(1.0, 0.5))), "capacities"),
           (dict(num_recursions=2, router=EC(capacities=(1.0, 1.5))), "capacities"),
           (dict(num_recursions=2, router=EC(capacities=(0.8, 0.5)), kv_cache="recursive_sharing"),
            "capacities"),
           (dict(num_recursions=2, router=EC(alpha=0.0)), "alpha"),
           (dict(num_recursions=2, router=EC(eval_routing="oracle")), "eval_routing"),
           (dict(num_recursions=2, router=EC(), kv_cache="paged"), "kv_cache"),
           (dict(num_recursions=2, router=TC(router_func="relu")), "router_func"),
           (dict(num_recursions=2, router=TC(balancing="aux")), "balancing"),
           (dict(num_recursions=2, router=EC(cap_warmup_steps=-1)), "cap_warmup_steps"),
           (dict(num_recursions=2, router=TC(bal_warmup_steps=2.5)), "bal_warmup_steps"),
           (dict(num_recursions=2, router="expert"), "router")]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            MixtureOfRecursions(blk, **kwargs)
    assert default_capacities(4) == (1.0, 0.75, 0.5, 0.25)


@pytest.mark.parametrize("router", [EC(), TC()])
def test_gradcheck_float64(router):
    mor = _mor(router, nr=2, dim=8).train()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    assert torch.autograd.gradcheck(lambda t: mor(t, None, valid), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: (mor(t, None, valid), sum(mor.aux_losses.values()))[1],
                                     (x,), fast_mode=True)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=1, max_size=4))
def test_compact_property(rows):
    sel = torch.tensor(rows)
    idx, kvalid = compact(sel)
    for b in range(sel.shape[0]):
        assert torch.equal(idx[b][kvalid[b]], torch.nonzero(sel[b]).squeeze(-1))
        assert len(set(idx[b].tolist())) == idx.shape[1]  # distinct: scatters never collide


# ----------------------------------------------------------------------------- training smoke
def _batch(gen, B=16, T=16, V=16):
    start = torch.randint(0, V, (B, 1), generator=gen)
    step = torch.randint(1, 4, (B, 1), generator=gen)
    return (start + step * torch.arange(T)) % V


def test_tiny_mor_and_vanilla_lm_of_equal_budget_both_learn():
    torch.manual_seed(0)
    van = build_lm(vocab_size=16, dim=32, n_layers=3, n_heads=2, mlp_hidden=64)
    mor = build_mor_lm(vocab_size=16, dim=32, n_layers=4, n_heads=2, num_recursions=2,
                       mlp_hidden=64, sharing="middle_cycle")
    assert abs(_n_params(mor) - _n_params(van)) <= 0.01 * _n_params(van)
    for model in (van, mor):
        gen = torch.Generator().manual_seed(1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(60):
            ids = _batch(gen, B=8)
            out = model(ids, labels=ids)
            (out.loss + sum(out.aux_losses.values(), out.loss.new_zeros(()))).backward()
            opt.step()
            opt.zero_grad()
            losses.append(out.loss.item())
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        assert last < 0.4 * first, (type(model), first, last)


def test_moe_layer_in_the_shared_block_and_aux_collection():
    moe = pytest.importorskip("moe")
    if not hasattr(moe, "MoELayer"):
        pytest.skip("moe.MoELayer not available")
    torch.manual_seed(0)
    model = build_mor_lm(vocab_size=13, dim=16, n_layers=4, n_heads=2, num_recursions=2,
                         mlp_factory=lambda i: moe.MoELayer(16, 8, 4, 2)).double()
    ids = torch.randint(0, 13, (2, 8))
    out = model.train()(ids, labels=ids)
    assert out.aux_losses.keys() == {"bce", "load_balancing"}  # MoR's router, the MoE layers'
    torch.testing.assert_close(sum(out.aux_losses.values()), moe.collect_aux_losses(model))
    (out.loss + moe.collect_aux_losses(model)).backward()
    shared = model.layers[1].block[0].mlp
    assert any(p.grad is not None for p in shared.parameters())
    model.eval()
    with torch.no_grad():
        full, cache = model(ids).logits, model.new_cache()
        parts = [model(ids[:, :3], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-10)
