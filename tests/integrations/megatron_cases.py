"""Megatron-Core cases for tests/integrations/test_megatron.py, run OUTSIDE pytest's process:

    python tests/integrations/megatron_cases.py OUT.json CASE [CASE ...]

installs the CPU shim (tests/integrations/megatron_shim.py), initialises Megatron (gloo, TP=PP=EP=1), runs
each case, and writes {case: {"ok": bool, "error": traceback or ""}} to OUT.json. The case
"ep2" starts two more gloo processes (expert parallel 2) and compares with expert parallel 1.

Shape legend: S sequence, B micro-batch, T = S*B tokens, E experts, L local experts, K top-k.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.integrations import megatron_shim  # noqa: E402

S, B, VOCAB = 8, 2, 64


def make_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, num_moe_experts=4,
                moe_router_topk=2, moe_ffn_hidden_size=24, use_cpu_initialization=True,
                moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=1e-2, add_bias_linear=False, bias_dropout_fusion=False,
                gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
                gated_linear_unit=True, activation_func=F.silu)
    base.update(overrides)
    return TransformerConfig(**base)


def make_gpt(config, spec, seed=0):
    from megatron.core.models.gpt.gpt_model import GPTModel

    torch.manual_seed(seed)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=S)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    return ids, torch.arange(S)[None].expand(B, S), torch.roll(ids, -1, 1)


def gpt_loss(model, seed=1, padding_mask=None):
    ids, pos, labels = batch(seed)
    kwargs = {} if padding_mask is None else {"padding_mask": padding_mask}
    return model(ids, pos, None, labels=labels, **kwargs).float().mean()


def tracker_values():
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}


def fresh():
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()


# ---- forward + backward with each injection -----------------------------------------------------

def _threshold(config):
    import routers

    return routers.ThresholdRouter(config.hidden_size, config.num_moe_experts, threshold=0.6, max_experts=3)


INJECTIONS = {"topk": dict(router="topk"), "threshold": dict(router=_threshold),
              "recurrent": dict(router="recurrent"), "experts": dict(experts=True),
              "whole": dict(router="topk", whole_layer=True)}


def case_gpt(injection: str, dispatcher: str):
    from moe.integrations.megatron import moekit_gpt_layer_spec

    fresh()
    config = make_config(num_layers=3 if injection == "recurrent" else 2, moe_token_dispatcher_type=dispatcher)
    model = make_gpt(config, moekit_gpt_layer_spec(**INJECTIONS[injection]))
    loss = gpt_loss(model)
    assert torch.isfinite(loss), loss
    loss.backward()
    names = [n for n, p in model.named_parameters() if "mlp" in n]
    moekit = [n for n in names if any(s in n for s in ("router.router", "experts.experts", "mlp.layer"))]
    assert moekit, f"no moekit parameter in {names}"
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n}: no finite grad"
    for n in moekit:
        assert dict(model.named_parameters())[n].grad.abs().sum() > 0, f"{n}: zero grad"
    values = tracker_values()["load_balancing_loss"]  # logged by every MoE layer's router
    assert (values[: config.num_layers] > 0).all(), values


def case_gpt_bf16():
    """bf16 model under Megatron's Float16Module: moekit weights in bf16, the router computes in
    float32 and keeps its expert bias and token counter in float32."""
    from megatron.core.transformer.module import Float16Module

    from moe.integrations.megatron import moekit_gpt_layer_spec

    config = make_config(bf16=True, params_dtype=torch.bfloat16, moe_router_score_function="sigmoid",
                         moe_router_enable_expert_bias=True)
    model = make_gpt(config, moekit_gpt_layer_spec(router="topk", experts=True))
    wrapped = Float16Module(config, model)
    router = model.decoder.layers[0].mlp.router.router
    assert model.decoder.layers[0].mlp.experts.experts.w_in_EDH.dtype == torch.bfloat16
    loss = gpt_loss(wrapped)
    loss.backward()
    assert torch.isfinite(loss)
    assert router.expert_bias.dtype == router.local_tokens_per_expert.dtype == torch.float32
    assert router.local_tokens_per_expert.sum() == S * B * config.moe_router_topk
    assert all(p.grad is not None for n, p in model.named_parameters() if "mlp" in n)


# ---- parity with Megatron ----------------------------------------------------------------------

def _pg():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def case_router_parity(kind: str):
    """Same weights -> same probs, routing map, aux-loss gradients, tracker values, token counts."""
    from megatron.core.transformer.moe.router import TopKRouter as MegatronTopK

    from moe.integrations.megatron import MoekitRouter

    cfg = {"softmax": dict(),
           "pre_softmax": dict(moe_router_pre_softmax=True, moe_router_topk=1, moe_z_loss_coeff=1e-3),
           "sigmoid": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                           moe_router_topk_scaling_factor=2.5, moe_router_load_balancing_type="seq_aux_loss"),
           "group": dict(moe_router_score_function="sigmoid", num_moe_experts=8, moe_router_topk=4,
                         moe_router_num_groups=4, moe_router_group_topk=2, moe_router_enable_expert_bias=True),
           "group_softmax": dict(num_moe_experts=8, moe_router_topk=4, moe_router_num_groups=4,
                                 moe_router_group_topk=2, moe_router_pre_softmax=True),
           "capacity": dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs")}[kind]
    config = make_config(moe_router_dtype="fp32", **cfg)
    torch.manual_seed(0)
    ref = MegatronTopK(config=config, pg_collection=_pg())
    ours = MoekitRouter(config=config, pg_collection=_pg())
    ref.set_layer_number(1)
    ours.set_layer_number(1)
    with torch.no_grad():
        ours.router.weight.copy_(ref.weight)
        if ref.expert_bias is not None:
            ref.expert_bias.copy_(torch.linspace(-0.05, 0.05, config.num_moe_experts))
            ours.router.expert_bias.copy_(ref.expert_bias)
    x = torch.randn(S, B, config.hidden_size)
    mix = torch.randn(S * B, config.num_moe_experts)
    got = []
    for router in (ref, ours):
        fresh()
        router.zero_grad()
        xr = x.clone().requires_grad_()
        probs, routing_map = router(xr)
        (probs * mix).sum().backward()
        got.append((probs.detach(), routing_map, xr.grad, router.weight.grad if router is ref else router.router.weight.grad,
                    tracker_values(), getattr(router, "local_tokens_per_expert", None)))
    (p0, m0, gx0, gw0, t0, c0), (p1, m1, gx1, gw1, t1, c1) = got
    assert torch.equal(m0, m1), "routing maps differ"
    if kind == "capacity":  # capacity ceil(T*K/E) = 8 per expert: something was dropped
        assert m0.sum() < S * B * config.moe_router_topk and (m0.sum(0) <= 8).all(), m0.sum(0)
    assert_close(p1, p0)
    assert_close(gx1, gx0)
    assert_close(gw1, gw0)
    assert set(t0) == set(t1), (t0.keys(), t1.keys())
    for k in t0:
        assert_close(t1[k], t0[k])
    if c0 is not None:
        assert_close(ours.router.local_tokens_per_expert, c0)


def _copy_experts(seq_mlp, ours):
    """SequentialMLP local experts (fc1 (H, D), fc2 (D, F)) -> moekit w_in_EDH, w_out_EFD."""
    with torch.no_grad():
        for e, expert in enumerate(seq_mlp.local_experts):
            ours.experts.w_in_EDH[e].copy_(expert.linear_fc1.weight.t())
            ours.experts.w_out_EFD[e].copy_(expert.linear_fc2.weight.t())


def case_experts_parity(activation: str):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from moe.integrations.megatron import MoekitExperts

    act = {"swiglu": dict(gated_linear_unit=True, activation_func=F.silu),
           "gelu": dict(gated_linear_unit=False, activation_func=F.gelu),
           "probs_on_input": dict(moe_apply_probs_on_input=True, moe_router_topk=1, moe_router_pre_softmax=True)}[activation]
    config = make_config(**act)
    experts_spec = get_gpt_layer_local_spec(num_experts=4).submodules.mlp.submodules.experts
    torch.manual_seed(0)
    ref = build_module(experts_spec, 4, config, pg_collection=_pg())
    ours = MoekitExperts(4, config, pg_collection=_pg())
    _copy_experts(ref, ours)
    counts = torch.tensor([5, 0, 7, 3])  # an expert with no token
    x = torch.randn(int(counts.sum()), config.hidden_size)
    p = torch.rand(int(counts.sum()))
    outs = []
    for mod in (ref, ours):
        xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
        y, bias = mod(xr, counts, pr)
        assert bias is None
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xr.grad, pr.grad))
    for a, b in zip(outs[1], outs[0]):
        assert_close(a, b)
    for e, expert in enumerate(ref.local_experts):
        assert_close(ours.experts.w_in_EDH.grad[e], expert.linear_fc1.weight.grad.t())
        assert_close(ours.experts.w_out_EFD.grad[e], expert.linear_fc2.weight.grad.t())
    assert all(getattr(q, "allreduce", None) is True for q in ours.parameters())
    ours.backward_dw()


def _our_name(name: str, whole: bool):
    """Megatron-native parameter name -> (moekit-injected name, expert index or None)."""
    mlp = ".mlp.layer." if whole else ".mlp."
    if ".mlp.router.weight" in name:
        return name.replace(".mlp.router.weight", f"{mlp}router.weight" if whole else ".mlp.router.router.weight"), None
    if ".mlp.experts.local_experts." in name:
        prefix, rest = name.split(".mlp.experts.local_experts.")
        e, fc = int(rest.split(".")[0]), rest.split(".")[1]
        experts = f"{prefix}{mlp}experts." if whole else f"{prefix}.mlp.experts.experts."
        return experts + ("w_in_EDH" if fc == "linear_fc1" else "w_out_EFD"), e
    return name, None


def case_gpt_loss_parity(variant: str):
    """Megatron-native GPT vs the same weights with moekit router + experts (either dispatcher)
    or the whole moekit layer: same loss, same gradients."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from moe.integrations.megatron import moekit_gpt_layer_spec

    whole = variant == "whole"
    config = make_config(moe_token_dispatcher_type="allgather" if whole else variant, moe_router_dtype="fp32")
    ref = make_gpt(config, get_gpt_layer_local_spec(num_experts=4))
    ours = make_gpt(config, moekit_gpt_layer_spec(router="topk", experts=not whole, whole_layer=whole), seed=5)
    ours_p = dict(ours.named_parameters())
    assert len(ours_p) < len(dict(ref.named_parameters()))  # E experts -> one stacked tensor
    with torch.no_grad():
        for name, p in ref.named_parameters():
            ours_name, e = _our_name(name, whole)
            (ours_p[ours_name] if e is None else ours_p[ours_name][e]).copy_(p if e is None else p.t())
    losses = []
    for model in (ref, ours):
        fresh()
        loss = gpt_loss(model)
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[1], losses[0])
    for name, p in ref.named_parameters():
        ours_name, e = _our_name(name, whole)
        g = ours_p[ours_name].grad
        assert_close(g if e is None else g[e].t(), p.grad, atol=1e-5, rtol=1e-4, msg=name)


def check_sharding(model):
    """Megatron's distributed-checkpoint access check (every global element saved exactly once
    across ranks) without writing files -> {sharded key: ShardedTensor}."""
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    sharded = model.sharded_state_dict()
    save_preprocess(sharded, validate_access_integrity=True)
    return {t.key: t for t in sharded.values() if hasattr(t, "global_shape")}


# ---- the recurrent router across layers ----------------------------------------------------------

def case_recurrent():
    """Cell registered once; state flows layer to layer through the chain's one RecurrentState; MoE
    and full-layer recompute give the same loss and the same gradients (the recurrent gradient
    included) as no recompute; reset at each forward, two eval forwards agree."""
    from moe.integrations.megatron import RecurrentRouters, moekit_gpt_layer_spec

    models, results = [], []
    builder = RecurrentRouters(router_dim=8)
    spec = moekit_gpt_layer_spec(router=builder)  # builds every model
    recomputes = {"none": {}, "moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
                  "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}
    for kw in recomputes.values():
        config = make_config(num_layers=3, **kw)
        model = make_gpt(config, spec)
        if models:
            model.load_state_dict(models[0].state_dict())
            assert not set(map(id, model.parameters())) & set(map(id, models[0].parameters()))
        models.append(model)
        states = {id(layer.mlp.router.router.states) for layer in model.decoder.layers}
        assert states == {id(builder.chain.states)}, "one RecurrentState per model, the chain's"
        cells = [n for n, _ in model.named_parameters() if "cell" in n]
        assert len(cells) == 4 and all(n.startswith("decoder.layers.0.mlp.router.") for n in cells), cells
        assert sum("cell" in k for k in model.state_dict()) == 4
        cell = [t for k, t in check_sharding(model).items() if k.endswith("cell.weight_ih")]
        assert len(cell) == 1 and cell[0].global_shape == (24, 8), cell  # one tensor, no per-layer axis
        inputs, outputs = [], []

        def record(module, args, out):
            inputs.append(args[0].detach())
            outputs.append(out[0].detach())

        hooks = [layer.mlp.router.register_forward_hook(record) for layer in model.decoder.layers]
        loss = gpt_loss(model)
        loss.backward()
        for h in hooks:
            h.remove()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    # state flows: replay layer by layer with the chain itself, passing states explicitly
    layers = [layer.mlp.router for layer in models[0].decoder.layers]
    h = None
    for i, adapter in enumerate(layers):
        routing = adapter.router(inputs[i].transpose(0, 1), state=h)
        h = routing.state
        E = routing.probs_TE.shape[1]
        probs = torch.zeros(B, S, E).scatter(2, routing.ids_TK.view(B, S, -1), routing.weights_TK.view(B, S, -1))
        assert_close(outputs[i], probs.transpose(0, 1).reshape(S * B, E))
    (l0, g0) = results[0]
    for name, (l1, g1) in zip(list(recomputes)[1:], results[1:]):
        assert_close(l1, l0, msg=name)
        for n in g0:
            assert_close(g1[n], g0[n], msg=f"{name}: {n}")
    w1 = g0["decoder.layers.0.mlp.router.router.w1_RD"]
    assert w1.abs().sum() > 0
    model, chain = models[-1], builder.chain  # the model built last
    assert models[0].decoder.layers[0].mlp.router.router.states is not chain.states
    chain.reset_on_forward(model)
    model.eval()
    with torch.no_grad():
        first = gpt_loss(model)
        assert len(chain.states) == 3
        assert_close(gpt_loss(model), first, rtol=0, atol=0)


# ---- Megatron training step: DDP + finalize_model_grads moves the expert bias ---------------------

def case_expert_bias_step():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from moe.integrations.megatron import moekit_gpt_layer_spec

    rate = 0.01
    config = make_config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                         moe_router_bias_update_rate=rate, moe_aux_loss_coeff=0.0,
                         moe_router_load_balancing_type="none")
    model = make_gpt(config, moekit_gpt_layer_spec(router="topk", experts=True))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    routers_ = [layer.mlp.router.router for layer in model.decoder.layers]
    ddp.zero_grad_buffer()
    loss = gpt_loss(ddp)
    loss.backward()
    counts = [r.local_tokens_per_expert.clone() for r in routers_]
    assert all(c.sum() == S * B * config.moe_router_topk for c in counts), counts
    before = [r.expert_bias.clone() for r in routers_]
    finalize_model_grads([ddp])
    for r, c, b in zip(routers_, counts, before):
        assert_close(r.expert_bias, b + rate * torch.sign(c.mean() - c))
        assert not torch.equal(r.expert_bias, b)
        assert r.local_tokens_per_expert.sum() == 0  # reset for the next step
    assert all(p.main_grad.abs().sum() > 0 for n, p in model.named_parameters() if "experts" in n)


# ---- signatures of newer Megatron versions; padding --------------------------------------------

def case_signatures():
    from moe.integrations.megatron import MoekitExperts, MoekitMoELayer, MoekitRouter

    config = make_config()
    router = MoekitRouter(config=config, pg_collection=_pg(), is_mtp_layer=False)
    x = torch.randn(S, B, config.hidden_size)
    pad = torch.zeros(S, B, dtype=torch.bool)
    pad[-3:, 1] = True  # the last 3 tokens of sequence 1 are padding
    router.train()
    probs, routing_map = router(x, pad, some_future_kwarg=1)
    t_pad = pad.reshape(-1)
    assert (probs[t_pad] == 0).all() and not routing_map[t_pad].any()
    assert (routing_map[~t_pad].sum(-1) == config.moe_router_topk).all()
    experts = MoekitExperts(4, config, pg_collection=_pg(), is_mtp_layer=True)
    y, bias = experts(torch.randn(6, config.hidden_size), torch.tensor([1, 2, 3, 0]), torch.rand(6))
    assert y.shape == (6, config.hidden_size) and bias is None
    y, _ = experts(torch.randn(0, config.hidden_size), [0, 0, 0, 0], torch.rand(0))  # no token here
    y.sum().backward()
    assert y.shape == (0, config.hidden_size)
    assert all(p.grad is not None and not p.grad.any() for p in experts.parameters())
    layer = MoekitMoELayer(config, pg_collection=_pg())
    y, bias = layer(x, padding_mask=pad.t(), inference_context=None)
    assert y.shape == x.shape and bias is None
    assert (y[pad] == 0).all()  # padded tokens reach no expert
    # through GPTModel: padding_mask (B, S), True = padding, reaches the moekit router
    from moe.integrations.megatron import moekit_gpt_layer_spec

    model = make_gpt(config, moekit_gpt_layer_spec(router="topk"))
    maps = []
    model.decoder.layers[1].mlp.router.register_forward_hook(lambda m, a, o: maps.append(o[1]) and None)
    gpt_loss(model, padding_mask=pad.t().contiguous()).backward()
    assert not maps[0][t_pad].any() and (maps[0][~t_pad].sum(-1) == config.moe_router_topk).all()


def case_replay():
    """moe.replay through the Megatron adapter: the MoekitRouter's moekit router is hooked, so a
    replayed forward gives Megatron the recorded routing map, and the router still gets gradients."""
    import moe.replay
    from moe.integrations.megatron import moekit_gpt_layer_spec

    model = make_gpt(make_config(), moekit_gpt_layer_spec(router="topk"))
    maps = []
    for layer in model.decoder.layers:
        layer.mlp.router.register_forward_hook(lambda m, a, o: maps.append(o[1].clone()) and None)
    model.eval()
    with moe.replay.record(model) as rec, torch.no_grad():
        gpt_loss(model)
    assert rec.layers == [f"decoder.layers.{i}.mlp.router.router" for i in range(2)], rec.layers
    recorded, maps[:] = list(maps), []
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.mlp.router.router.weight.add_(torch.randn_like(layer.mlp.router.router.weight))
    model.train()
    gpt_loss(model)
    assert any(not torch.equal(a, b) for a, b in zip(maps, recorded))  # the perturbed routers differ
    maps[:] = []
    with moe.replay.replay(model, rec):
        gpt_loss(model).backward()
    assert all(torch.equal(a, b) for a, b in zip(maps, recorded))
    assert all(layer.mlp.router.router.weight.grad.abs().sum() > 0 for layer in model.decoder.layers)


def case_gradcheck():
    """float64 gradcheck of the router adapter's probs (eval: no aux loss) and of the experts
    adapter (w.r.t. tokens and probs); in training the aux losses riding on the probs give x
    exactly the gradient of their sum."""
    from moe.integrations.megatron import MoekitExperts, MoekitRouter

    config = make_config(params_dtype=torch.float64, moe_router_score_function="sigmoid",
                         moe_router_load_balancing_type="seq_aux_loss", moe_z_loss_coeff=1e-2)
    torch.manual_seed(0)
    router = MoekitRouter(config=config, pg_collection=_pg()).double().eval()
    x = torch.randn(4, 2, config.hidden_size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: router(h)[0], (x,))
    router.train()
    (router(x)[0] * 0).sum().backward()  # only the attached aux losses send a gradient
    x2 = x.detach().clone().requires_grad_()
    aux = router.router(x2.transpose(0, 1)).aux_losses
    assert set(aux) == {"seq_load_balancing", "z_loss"}, aux
    sum(aux.values()).backward()
    assert_close(x.grad, x2.grad)
    experts = MoekitExperts(4, config, pg_collection=_pg())
    assert experts.experts.w_in_EDH.dtype == torch.float64
    xs = torch.randn(7, config.hidden_size, dtype=torch.float64, requires_grad=True)
    p = torch.rand(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: experts(a, torch.tensor([3, 0, 4, 0]), b)[0], (xs, p))


def case_errors():
    """Settings the adapters cannot honour fail at build time, naming the setting."""
    import pytest

    import routers
    from moe.integrations.megatron import (MoekitMoELayer, MoekitRouter, RecurrentRouters, activation_from_config,
                                           moekit_gpt_layer_spec, topk_router_from_config)

    cases = [
        (lambda: topk_router_from_config(make_config(num_moe_experts=8, moe_router_topk=4, moe_router_num_groups=4,
                                                     moe_router_group_topk=2)), "moe_router_pre_softmax"),
        (lambda: topk_router_from_config(make_config(num_moe_experts=8, moe_router_topk=6, moe_router_num_groups=4,
                                                     moe_router_group_topk=2, moe_router_pre_softmax=True)),
         "moe_router_group_topk"),
        (lambda: topk_router_from_config(make_config(moe_router_load_balancing_type="sinkhorn",
                                                     moe_aux_loss_coeff=0.0)), "moe_router_load_balancing_type"),
        (lambda: MoekitRouter(config=make_config(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid"),
                              make_router=lambda c: routers.ThresholdRouter(c.hidden_size, c.num_moe_experts,
                                                                             threshold=0.5)), "expert_bias"),
        (lambda: MoekitRouter(config=make_config(), make_router=lambda c: routers.TopKRouter(8, 4, 2)), "hidden_size"),
        (lambda: activation_from_config(make_config(activation_func=F.relu, gated_linear_unit=True)), "activation_func"),
        (lambda: MoekitMoELayer(make_config(), make_router=RecurrentRouters()), "recurrent"),
        (lambda: moekit_gpt_layer_spec(router="topk", experts=True, whole_layer=True), "experts=False"),
        (lambda: moekit_gpt_layer_spec(router="nope"), "router must be"),
    ]
    for build, words in cases:
        with pytest.raises(ValueError, match=words):
            build()


# ---- expert parallel 2 vs 1 ---------------------------------------------------------------------

EP_VARIANTS = {"experts": dict(router="topk", experts=True), "whole": dict(router="topk", whole_layer=True)}


def _is_expert(name: str) -> bool:
    return ".mlp.experts.experts." in name or ".mlp.layer.experts." in name


def _ep_model(ep: int, variant: str, state=None):
    from moe.integrations.megatron import moekit_gpt_layer_spec

    config = make_config(moe_token_dispatcher_type="alltoall", expert_model_parallel_size=ep, moe_router_dtype="fp32")
    model = make_gpt(config, moekit_gpt_layer_spec(**EP_VARIANTS[variant]))
    if state is not None:
        rank, L = torch.distributed.get_rank(), config.num_moe_experts // ep
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n][rank * L:(rank + 1) * L] if _is_expert(n) else state[n])
    return model


def _ep_worker(rank, world, reference):
    """Expert parallel 2 = data parallel 2 here: each rank runs its own micro-batch; its loss
    equals the EP=1 loss on that micro-batch. Expert weights get the gradient of both ranks'
    losses (tokens of both reach them); the other weights' gradients, summed over ranks, too."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    megatron_shim.install()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(1234)
    L = 4 // world
    for variant, (state, losses, grad_sum) in reference.items():
        model = _ep_model(world, variant, state)
        loss = gpt_loss(model, seed=10 + rank)
        loss.backward()
        assert_close(loss.detach(), losses[rank], msg=variant)
        for n, p in model.named_parameters():
            g = p.grad.clone()
            if _is_expert(n):
                assert_close(g, grad_sum[n][rank * L:(rank + 1) * L], msg=n)
                assert getattr(p, "allreduce", None) is False, n
            else:
                torch.distributed.all_reduce(g)
                assert_close(g, grad_sum[n], atol=1e-6, rtol=1e-4, msg=n)
        shards = [t for k, t in check_sharding(model).items() if k.endswith("w_in_EDH")]
        assert len(shards) == 1 and shards[0].global_shape[:2] == (2, 4), shards  # (layers, E, D, H)
        assert shards[0].global_offset[1] == rank * L, shards
    return True


def case_ep2():
    from tests.helpers.dist import run_workers

    reference = {}
    for variant in EP_VARIANTS:
        model = _ep_model(1, variant)
        losses = []
        for rank in range(2):
            loss = gpt_loss(model, seed=10 + rank)
            loss.backward()
            losses.append(loss.detach())
        reference[variant] = ({n: p.detach().clone() for n, p in model.named_parameters()}, losses,
                              {n: p.grad.clone() for n, p in model.named_parameters()})
    assert run_workers(_ep_worker, 2, reference, timeout=150) == [True, True]


CASES = {f"gpt_{inj}_{disp}": (case_gpt, inj, disp) for inj in INJECTIONS for disp in ("allgather", "alltoall")
         if not (inj == "whole" and disp == "alltoall")}
CASES.update({f"router_parity_{k}": (case_router_parity, k)
              for k in ("softmax", "pre_softmax", "sigmoid", "group", "group_softmax", "capacity")})
CASES.update({f"experts_parity_{a}": (case_experts_parity, a) for a in ("swiglu", "gelu", "probs_on_input")})
CASES.update({f"gpt_loss_parity_{d}": (case_gpt_loss_parity, d) for d in ("allgather", "alltoall", "whole")})
CASES.update({"gpt_bf16": (case_gpt_bf16,), "recurrent": (case_recurrent,), "expert_bias_step": (case_expert_bias_step,),
              "signatures": (case_signatures,), "gradcheck": (case_gradcheck,), "errors": (case_errors,), "replay": (case_replay,),
              "ep2": (case_ep2,)})


def main(argv) -> None:
    out_path, names = argv[0], argv[1:] or sorted(CASES)
    megatron_shim.init_distributed(port=int(os.environ.get("MOEKIT_MEGATRON_PORT", "29533")))
    torch.set_num_threads(1)
    results = {}
    for name in names:
        fn, *args = CASES[name]
        fresh()  # Megatron's aux-loss tracker is process-global and sized by its first user
        try:
            fn(*args)
            results[name] = {"ok": True, "error": ""}
        except Exception:  # noqa: BLE001  (reported per case to the pytest driver)
            results[name] = {"ok": False, "error": traceback.format_exc()}
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
