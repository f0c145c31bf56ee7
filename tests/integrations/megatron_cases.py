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
    _assert_same_state(ours.state_dict(), ref.state_dict())  # TopKRouter's keys, the same tensors
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
    across ranks) without writing files -> {sharded key: [ShardedTensor, ...]} (factories applied)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    sharded, _ = save_preprocess(model.sharded_state_dict(), validate_access_integrity=True)
    out = {}
    for t in nested_values(sharded):
        if hasattr(t, "global_shape"):
            out.setdefault(t.key, []).append(t)
    return out


# ---- checkpoints in Megatron's native layouts, both ways --------------------------------------------

def _assert_same_state(got: dict, want: dict):
    """Same keys and, per key, the same value bit for bit (None for _extra_state)."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, v in want.items():
        if v is None:
            assert got[k] is None, k
        else:
            assert got[k].shape == v.shape and got[k].dtype == v.dtype and torch.equal(got[k], v), k


def case_expert_layouts():
    """MoekitExperts <-> SequentialMLP (gated and not, with biases) and <-> GroupedMLP (float32
    weights; GroupedMLP's gmm from the shim): moekit loads Megatron's state dict strictly, holds
    what the hand-written mapping (_copy_experts) holds and gives Megatron's output; Megatron
    loads moekit's state dict back bit for bit. Conversion functions are inverses; bad checkpoints
    fail naming the Megatron key."""
    import pytest
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from moe.integrations.megatron import MoekitExperts
    from moe.integrations.megatron.checkpoint import experts_from_megatron, experts_to_megatron

    cases = {"swiglu_bias": (dict(add_bias_linear=True), False), "gelu_bias": (
        dict(add_bias_linear=True, gated_linear_unit=False, activation_func=F.gelu), False),
        "grouped": (dict(moe_grouped_gemm=True, bf16=True), True), "grouped_gelu": (
        dict(moe_grouped_gemm=True, bf16=True, gated_linear_unit=False, activation_func=F.gelu), True)}
    counts = torch.tensor([5, 0, 7, 3])  # an expert with no token
    x, p = torch.randn(15, 16), torch.rand(15)
    for name, (cfg, grouped) in cases.items():
        config = make_config(**cfg)
        spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=grouped).submodules.mlp.submodules.experts
        torch.manual_seed(0)
        ref, back = (build_module(spec, 4, config, pg_collection=_pg()) for _ in range(2))
        ours = MoekitExperts(4, config, pg_collection=_pg())
        with torch.no_grad():
            for t in ref.parameters():  # biases too (Megatron zeroes them)
                t.add_(torch.randn_like(t) * 0.1)
        ours.load_state_dict(ref.state_dict())
        assert ours.checkpoint_layout == ("grouped" if grouped else "sequential")
        if not grouped:
            oracle = MoekitExperts(4, config, pg_collection=_pg())
            _copy_experts(ref, oracle)
            assert torch.equal(ours.experts.w_in_EDH, oracle.experts.w_in_EDH), name
            assert torch.equal(ours.experts.w_out_EFD, oracle.experts.w_out_EFD), name
        with torch.no_grad():  # (Megatron's expert MLP adds its bias in place on a view: no autograd with bias)
            assert_close(ours(x, counts, p)[0], ref(x, counts, p)[0], msg=name)
        back.load_state_dict(ours.state_dict())
        _assert_same_state(back.state_dict(), ref.state_dict())
        mine = {k: t for k, t in ours.experts.state_dict().items()}
        for layout in ("sequential", "grouped"):
            if layout == "grouped" and "b_in_EH" in mine:
                with pytest.raises(ValueError, match="GroupedMLP has no expert biases"):
                    experts_to_megatron(mine, layout)
                continue
            _assert_same_state(experts_from_megatron(experts_to_megatron(mine, layout), 4), mine)
    with pytest.raises(ValueError, match="layout='nope'"):
        experts_to_megatron(mine, "nope")
    config = make_config()
    ours = MoekitExperts(4, config, pg_collection=_pg())
    theirs = ours.state_dict()
    assert any(k.startswith("local_experts.3.") for k in theirs) and not any("w_in_EDH" in k for k in theirs)
    legacy = {"experts." + k: t for k, t in ours.experts.state_dict().items()}  # moekit's earlier names
    MoekitExperts(4, config, pg_collection=_pg()).load_state_dict(legacy)
    broken = {k: t for k, t in theirs.items() if k != "local_experts.2.linear_fc1.weight"}
    with pytest.raises(RuntimeError, match="no 'local_experts.2.linear_fc1.weight'"):
        MoekitExperts(4, config, pg_collection=_pg()).load_state_dict(broken)
    with pytest.raises(RuntimeError, match=r"local_experts \[2, 3\] but this module holds 2"):
        MoekitExperts(2, config, pg_collection=_pg()).load_state_dict(theirs)
    from moe.integrations.megatron import MoekitMoELayer, MoekitRouter

    for build in (lambda: MoekitRouter(config=config, pg_collection=_pg()), lambda: MoekitMoELayer(config, _pg())):
        mod = build()  # moekit's earlier checkpoints (its own parameter names) still load
        legacy = {n: t.detach() for n, t in mod.named_parameters()}
        build().load_state_dict(legacy)


CKPT_VARIANTS = {  # name -> (config overrides, moekit spec, Megatron expert layout)
    "sequential": (dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_topk_scaling_factor=2.0), dict(router="topk", experts=True), False),
    "grouped": (dict(moe_grouped_gemm=True, bf16=True, params_dtype=torch.bfloat16),
                dict(router="topk", experts=True), True),
    "whole": (dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                   moe_shared_expert_intermediate_size=20), dict(router="topk", whole_layer=True), False),
}
# bf16 loss error floor (see _check_loss); a swapped gate/up moves the loss >5x more
BF16_LOSS_ATOL = 2e-2


def _ckpt_models(variant):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    from moe.integrations.megatron import moekit_gpt_layer_spec

    cfg, spec, grouped = CKPT_VARIANTS[variant]
    config = make_config(moe_router_dtype="fp32", init_method_std=0.2, **cfg)  # experts that move the loss

    def build(kind, seed):
        native = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=grouped)
        model = make_gpt(config, native if kind == "native" else moekit_gpt_layer_spec(**spec), seed=seed)
        return (Float16Module(config, model) if config.bf16 else model), model

    return config, build


def _train(run, model, seed, steps=3, lr=0.05):
    """A few SGD steps, then expert biases set to distinct values (they decide routing, so a bias
    that is not carried over changes the loss)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i in range(steps):
        fresh()
        opt.zero_grad()
        gpt_loss(run, seed=seed + i).backward()
        opt.step()
    g = torch.Generator().manual_seed(seed)
    for n, b in model.named_buffers():
        if n.endswith("expert_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _eval_loss(run):
    run.eval()
    with torch.no_grad():
        loss = gpt_loss(run, seed=99)
    run.train()
    return loss


def _swap_gate_up(state: dict) -> dict:
    """The same checkpoint with fc1's gate and up halves exchanged (a layout mistake to detect)."""
    out = dict(state)
    for k, t in state.items():
        if k.endswith("linear_fc1.weight"):
            out[k] = torch.cat(t.chunk(2, 0)[::-1])
        elif k.endswith("weight1"):
            L = 4
            out[k] = t.reshape(L, t.shape[0], 2, -1).flip(2).reshape(t.shape)
    return out


def _fp32_loss(state: dict):
    """The float32 loss of a checkpoint (either layout): a float32 moekit model holding it (the
    sequential variant shows float32 moekit and Megatron agree)."""
    from moe.integrations.megatron import moekit_gpt_layer_spec

    model = make_gpt(make_config(moe_router_dtype="fp32"), moekit_gpt_layer_spec(router="topk", experts=True))
    model.load_state_dict({k: None if v is None else v.float() for k, v in state.items()})
    return _eval_loss(model)


def _check_loss(got, want, config, msg, *, theirs=None, state=None):
    """float32: the same loss. bf16 (``state`` given): against the checkpoint's float32 loss,
    ``got``'s error is at most 2x the error of ``theirs`` (the other library's bf16 loss on the same
    checkpoint) or BF16_LOSS_ATOL (one routing decision flipped by bf16 rounding moves the loss
    ~1e-2 here)."""
    if not config.bf16:
        assert_close(got, want, msg=msg)
        return
    ref = _fp32_loss(state)
    err, their_err = (got - ref).abs(), (theirs - ref).abs()
    assert err <= max(2 * their_err, BF16_LOSS_ATOL), f"{msg}: error {err:.2e}, the other's {their_err:.2e}"


def case_checkpoint_roundtrip(variant: str, distributed: bool):
    """Native Megatron (SequentialMLP, GroupedMLP, or MoELayer with shared experts for the whole
    moekit layer) trains a few steps and saves: torch.save of its state_dict, or a distributed
    checkpoint (megatron.core.dist_checkpointing, loaded with strict="raise_all": the same sharded
    keys, nothing missing or unexpected). The moekit spec loads it (holding the same tensors: its
    state_dict equals Megatron's bit for bit) and gets Megatron's loss; trains, saves; native
    Megatron loads that (bit for bit again) and gets moekit's loss. Loading a checkpoint with
    fc1's gate and up halves swapped changes the loss far beyond the tolerance."""
    import tempfile

    from megatron.core import dist_checkpointing

    config, build = _ckpt_models(variant)
    run_n, native = build("native", 0)
    _train(run_n, native, seed=20)
    want = _eval_loss(run_n)
    with tempfile.TemporaryDirectory() as tmp:
        def save(model, name):
            path = os.path.join(tmp, name)
            if distributed:
                os.makedirs(path)
                dist_checkpointing.save(model.sharded_state_dict(), path)
            else:
                torch.save(model.state_dict(), path)
            return path

        def load(model, path):
            state = (dist_checkpointing.load(model.sharded_state_dict(), path, strict="raise_all") if distributed
                     else torch.load(path, weights_only=True))
            model.load_state_dict(state)  # strict
            return state

        first = save(native, "native")
        run_o, ours = build("moekit", 5)
        load(ours, first)
        _assert_same_state(ours.state_dict(), native.state_dict())
        loaded = _eval_loss(run_o)
        _check_loss(loaded, want, config, f"{variant}: moekit loading Megatron's checkpoint", theirs=want,
                    state=native.state_dict())
        _train(run_o, ours, seed=40)
        trained = _eval_loss(run_o)
        assert (trained - want).abs() > 1e-3, "moekit's training did not change the loss"
        second = save(ours, "moekit")
        run_b, back = build("native", 7)
        load(back, second)
        _assert_same_state(back.state_dict(), ours.state_dict())
        returned = _eval_loss(run_b)
        _check_loss(returned, trained, config, f"{variant}: Megatron loading moekit's checkpoint", theirs=trained,
                    state=ours.state_dict())
        back.load_state_dict(_swap_gate_up(back.state_dict()))
        off = (_eval_loss(run_b) - returned).abs()
        print(f"{variant} distributed={distributed}: loss {float(want):.5f} (moekit loaded: "
              f"{float(loaded - want):+.1e}) -> trained {float(trained):.5f} (Megatron loaded: "
              f"{float(returned - trained):+.1e}); gate/up swapped: {float(off):.2e} off", flush=True)
        assert off > 5 * (BF16_LOSS_ATOL if config.bf16 else 1e-4), f"{variant}: gate/up swap moves the loss by {off}"


def _optim_sharded(model, opt, model_sharded: dict) -> dict:
    """A torch optimizer's distributed-checkpoint entries as Megatron's optimizers build them: each
    state tensor sharded (and transformed, through the parameter's factory) like its parameter."""
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    ids = get_param_id_to_sharded_param_map(model_sharded, [p for g in opt.param_groups for p in g["params"]])
    state = opt.state_dict()
    optim_state_to_sharding_state(state, ids, exclude_keys=("step",))
    return state


def _adam_state_as_model(model, opt, key: str) -> dict:
    """The optimizer's ``key`` state in the model's checkpoint layout: the model's state_dict()
    with that state in place of each parameter (the parameters are restored after)."""
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(opt.state[p][key])
        out = {k: None if v is None else v.clone() for k, v in model.state_dict().items()}
        for p, value in zip(model.parameters(), saved):
            p.copy_(value)
    return out


def case_optimizer_checkpoint():
    """Optimizer states in a distributed checkpoint, both ways: Adam's exp_avg / exp_avg_sq of
    native Megatron (SequentialMLP) load into moekit's optimizer through moekit's sharded state
    dict (and back), holding the same values in Megatron's layout bit for bit."""
    import tempfile

    from megatron.core import dist_checkpointing

    config, build = _ckpt_models("sequential")
    models = {kind: build(kind, seed)[1] for kind, seed in (("native", 0), ("moekit", 5))}
    opts = {kind: torch.optim.Adam(model.parameters(), lr=1e-2) for kind, model in models.items()}
    fresh()
    gpt_loss(models["moekit"], seed=4).backward()
    opts["moekit"].step()  # the destination's states exist before the first load
    for src, dst in (("native", "moekit"), ("moekit", "native")):
        fresh()
        opts[src].zero_grad()
        gpt_loss(models[src], seed=7).backward()
        opts[src].step()  # src's states differ from dst's before the load
        fc1 = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"
        assert not torch.equal(_adam_state_as_model(models[src], opts[src], "exp_avg")[fc1],
                               _adam_state_as_model(models[dst], opts[dst], "exp_avg")[fc1])
        with tempfile.TemporaryDirectory() as tmp:
            msd = models[src].sharded_state_dict()
            dist_checkpointing.save({"model": msd, "optimizer": _optim_sharded(models[src], opts[src], msd)}, tmp)
            msd = models[dst].sharded_state_dict()
            loaded = dist_checkpointing.load({"model": msd, "optimizer": _optim_sharded(models[dst], opts[dst], msd)},
                                             tmp, strict="raise_all")
        models[dst].load_state_dict(loaded["model"])
        steps = opts[dst].state_dict()["state"]  # "step" is not sharded (Megatron keeps it apart)
        for pid, st in loaded["optimizer"]["state"].items():
            st["step"] = steps[pid]["step"]
        opts[dst].load_state_dict(loaded["optimizer"])
        for key in ("exp_avg", "exp_avg_sq"):
            _assert_same_state(_adam_state_as_model(models[dst], opts[dst], key),
                               _adam_state_as_model(models[src], opts[src], key))


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
        cell = [t for k, ts in check_sharding(model).items() if k.endswith("cell.weight_ih") for t in ts]
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
        # Megatron's key and global shape (layers, E, H, D); gate and up halves as two fragments
        shards = check_sharding(model)["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
        assert len(shards) == 4 and all(t.global_shape == (2, 4, 48, 16) for t in shards), shards
        assert sorted(t.global_offset for t in shards) == [(layer, rank * L, h, 0) for layer in (0, 1)
                                                           for h in (0, 24)], shards
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
CASES.update({f"checkpoint_{v}_{kind}": (case_checkpoint_roundtrip, v, kind == "dist")
              for v in CKPT_VARIANTS for kind in ("torch", "dist")})
CASES.update({"expert_layouts": (case_expert_layouts,), "checkpoint_optimizer": (case_optimizer_checkpoint,)})
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
