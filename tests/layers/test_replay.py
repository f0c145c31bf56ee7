"""Routing replay (moe.replay): a replayed forward routes exactly the recorded ids, its weights
are the router's own rule at those ids (so with unchanged parameters the recorded pass is
reproduced bit for bit) and gradients reach the router; the same for transformers' gates.
routing_consistency reports 0 for identical settings, finds planted differences and aligns the
tokens of row-by-row and KV-cached runs with the full forward."""

from __future__ import annotations

import copy

import pytest
import torch

import moe
import moe.replay as R
import routers

D, F, E = 16, 24, 6


def _router(kind: str, i: int = 0, chain=None):
    if kind == "topk":
        return routers.TopKRouter(D, E, 2, balance_loss=None)
    if kind == "sigmoid":
        return routers.TopKRouter(D, E, 2, score="sigmoid", routed_scaling_factor=2.5, balance_loss=None)
    if kind == "threshold":
        return routers.ThresholdRouter(D, E, threshold=0.6, renormalize=True, balance_loss=None)
    return chain[i]


def _lm(kind: str, seed: int = 0, **layer_kw):
    torch.manual_seed(seed)
    chain = (routers.RecurrentRouterChain(2, D, E, 2, router_dim=8, balance_loss=None)
             if kind == "recurrent" else None)
    lm = moe.build_lm(vocab_size=40, dim=D, n_layers=2, n_heads=2,
                      mlp_factory=lambda i: moe.MoELayer(D, F, E, router=_router(kind, i, chain), **layer_kw))
    if chain is not None:
        chain.reset_on_forward(lm)
    with torch.no_grad():  # router weights of O(1): routing is sensitive to them
        for r in R.find_routers(lm).values():
            for p in r.parameters():
                p.normal_(0, 1.0)
    return lm


def _layers(lm):
    return {n + ".router": m for n, m in lm.named_modules() if isinstance(m, moe.MoELayer)}


def _perturb_routers(lm, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in R.find_routers(lm).values():
            for p in r.parameters():
                p.add_(torch.randn(p.shape, generator=g))


KINDS = ["topk", "sigmoid", "threshold", "recurrent"]


@pytest.mark.parametrize("kind", KINDS)
def test_replayed_training_forward_routes_the_recorded_ids(kind):
    lm = _lm(kind)
    ids = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(1))
    lm.eval()
    with R.record(lm) as rec, torch.no_grad():
        lm(ids)
    assert rec.layers == list(_layers(lm))
    _perturb_routers(lm)
    lm.train()
    lm(ids)  # without replay the perturbed routers choose other experts (so the test can fail)
    fresh = {n: layer.last_routing.ids_TK.clone() for n, layer in _layers(lm).items()}
    assert any(not torch.equal(fresh[n], rec[n][0].ids_TK) for n in fresh)
    with R.replay(lm, rec):
        out = lm(ids, labels=ids)
    for n, layer in _layers(lm).items():
        assert torch.equal(layer.last_routing.ids_TK, rec[n][0].ids_TK)
        r = layer.last_routing
        assert torch.equal(r.counts_E, routers.expert_counts(rec[n][0].ids_TK, E))
    out.loss.backward()  # the weights are the current router's: the task loss trains the router
    for r in R.find_routers(lm).values():
        grads = [p.grad for p in r.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_replay_with_unchanged_router_reproduces_the_recorded_pass(kind):
    """Recomputed weights follow each router's own rule (renormalised, sigmoid and scaled,
    variable k): replaying a pass on the same parameters gives its output bit for bit."""
    lm = _lm(kind).eval()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    with R.record(lm) as rec, torch.no_grad():
        ref = lm(ids).logits
    for mode in R.WEIGHT_MODES:
        with R.replay(lm, rec, weights=mode), torch.no_grad():
            assert torch.equal(lm(ids).logits, ref)
        for n, layer in _layers(lm).items():
            torch.testing.assert_close(layer.last_routing.weights_TK, rec[n][0].weights_TK, rtol=0, atol=0)


def test_recorded_weights_are_constants():
    """weights="recorded": the rollout's gate; the task loss then gives the router no gradient."""
    lm = _lm("topk")
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    with R.record(lm) as rec, torch.no_grad():
        lm(ids)
    _perturb_routers(lm)
    with R.replay(lm, rec, weights="recorded"):
        lm(ids, labels=ids).loss.backward()
    for n, layer in _layers(lm).items():
        assert torch.equal(layer.last_routing.weights_TK, rec[n][0].weights_TK)
        assert layer.router.weight.grad is None or not layer.router.weight.grad.any()


def test_replay_a_mini_batch_and_cycle_calls():
    """RoutingRecord.select takes rows of the batch; a router called once per forward replays
    the same ids on every forward (several updates on one rollout)."""
    lm = _lm("topk").eval()
    ids = torch.randint(0, 40, (4, 7), generator=torch.Generator().manual_seed(4))
    with R.record(lm) as rec, torch.no_grad():
        lm(ids)
    _perturb_routers(lm)
    sub = rec.select(slice(1, 3))
    with R.replay(lm, sub):
        for _ in range(2):
            lm(ids[1:3])
            for n, layer in _layers(lm).items():
                assert torch.equal(layer.last_routing.ids_TK, rec[n][0].ids_TK.view(4, 7, -1)[1:3].reshape(14, -1))


def test_replay_errors_name_the_problem():
    lm = _lm("topk")
    ids = torch.randint(0, 40, (2, 5))
    with R.record(lm, weights=False) as rec, torch.no_grad():
        lm(ids)
    with pytest.raises(ValueError, match="weights must be one of"):
        with R.replay(lm, rec, weights="ids"):
            pass
    with pytest.raises(ValueError, match="weights=True"):
        with R.replay(lm, rec, weights="recorded"), torch.no_grad():
            lm(ids)
    with pytest.raises(ValueError, match="routes 15 tokens but the record has 10"):
        with R.replay(lm, rec), torch.no_grad():
            lm(torch.randint(0, 40, (3, 5)))
    with pytest.raises(ValueError, match="has no call of router"):
        with R.replay(lm, R.RoutingRecord()), torch.no_grad():
            lm(ids)
    with pytest.raises(TypeError, match="RoutingRecord"):
        with R.replay(lm, {}):
            pass
    with pytest.raises(ValueError, match="no router"):
        with R.record(torch.nn.Linear(2, 2)):
            pass
    assert not any(m._forward_hooks for m in lm.modules())  # every hook is removed on exit


# ---- routing consistency -------------------------------------------------------------------------

def test_consistency_is_zero_for_identical_settings():
    lm = _lm("topk")
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(6))
    for setting in ("float32", "eval", "batched"):
        assert R.routing_consistency(lm, ids, setting, setting) == {n: 0.0 for n in _layers(lm)}


def test_consistency_finds_a_planted_difference():
    """A setting whose copy of the model has layer 1's router perturbed: layer 0 (before it)
    reports 0, layer 1 the fraction of tokens whose top-k set really changed."""
    lm = _lm("topk")
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(7))

    def planted(model, batch, forward):
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            m.layers[1].mlp.router.weight[0] += 3.0
            with R.record(m) as rec:
                m(batch)
        return rec

    got = R.routing_consistency(lm, ids, "eval", planted)
    with R.record(lm) as a, torch.no_grad():
        lm.eval()(ids)
    b = planted(lm, ids, None)
    n1 = "layers.1.mlp.router"
    want = (a[n1][0].ids_TK.sort(1).values != b[n1][0].ids_TK.sort(1).values).any(1).float().mean().item()
    assert got["layers.0.mlp.router"] == 0.0 and got[n1] == want > 0


def test_consistency_alone_vs_batched_sees_capacity_drops():
    """With a capacity the experts a token keeps depend on the other tokens of the batch: run
    alone, a row keeps all its slots. Dropless, the rows agree."""
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(8))
    dropless = R.routing_consistency(_lm("topk"), ids, "batched", "alone")
    assert max(dropless.values()) <= 0.05  # only float rounding of other GEMM shapes could flip a tie
    torch.manual_seed(0)
    lm = moe.build_lm(vocab_size=40, dim=D, n_layers=2, n_heads=2,
                      mlp_factory=lambda i: moe.MoELayer(D, F, E, 2, capacity_factor=0.5))
    capped = R.routing_consistency(lm, ids, "batched", "alone")
    assert min(capped.values()) > 0.1


def test_consistency_kv_cached_decoding_is_aligned_with_the_full_forward():
    """Token-by-token decoding gives each token the routing of the full forward (tokens aligned
    through RoutingRecord.ids; misaligned tokens would differ for most of them)."""
    lm = _lm("topk")
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(9))
    got = R.routing_consistency(lm, ids, "full", "kv_cached")
    assert max(got.values()) <= 0.05
    assert max(R.routing_consistency(lm, ids, "eval", "bfloat16").values()) <= 0.5


def test_consistency_train_mode_with_jitter_differs():
    torch.manual_seed(0)
    lm = moe.build_lm(vocab_size=40, dim=D, n_layers=1, n_heads=2, mlp_factory=lambda i: moe.MoELayer(
        D, F, E, router=routers.TopKRouter(D, E, 2, jitter=0.9)))
    ids = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(10))
    assert R.routing_consistency(lm, ids, "eval", "train")["layers.0.mlp.router"] > 0
    with pytest.raises(ValueError, match="a setting must be one of"):
        R.routing_consistency(lm, ids, "eval", "fp8")
    with pytest.raises(ValueError, match="kv_cached"):
        R.routing_consistency(moe.MoELayer(D, F, E, 2), torch.randn(2, 3, D), "full", "kv_cached")


# ---- Hugging Face gates --------------------------------------------------------------------------

def _hf_models():
    transformers = pytest.importorskip("transformers")
    from moe.integrations import hf

    hf.register()
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return {
        "mixtral": transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4,
                                              num_experts_per_tok=2),
        "qwen3_moe": transformers.Qwen3MoeConfig(**common, head_dim=8, intermediate_size=64, moe_intermediate_size=24,
                                                 num_experts=6, num_experts_per_tok=3, norm_topk_prob=False),
        "deepseek_v3": transformers.DeepseekV3Config(
            **dict(common, num_key_value_heads=4), intermediate_size=64, moe_intermediate_size=16,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5),
        "gpt_oss": transformers.GptOssConfig(**common, head_dim=8, intermediate_size=24, num_local_experts=4,
                                             num_experts_per_tok=2, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"]),
    }, transformers


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_hf_gates_record_and_replay(arch):
    configs, transformers = _hf_models()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[arch], experts_implementation="moekit").float()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.normal_(0, 1.0)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model.eval()
    with R.record(model) as rec, torch.no_grad():
        ref = model(input_ids=ids).logits
    assert rec.layers and all(n.endswith(("mlp.gate", "mlp.router")) for n in rec.layers)
    with R.replay(model, rec), torch.no_grad():  # the gate's own weight rule: the same pass
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-6, atol=1e-6)
    _perturb_routers(model)
    model.train()
    with R.replay(model, rec), R.record(model) as again:
        model(input_ids=ids).logits.square().mean().backward()
    for n in rec.layers:
        assert torch.equal(again[n][0].ids_TK, rec[n][0].ids_TK)
        assert model.get_submodule(n).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config", ["expert_choice", "token_choice"])
def test_replay_mixture_of_recursions_depth_routers(config):
    """MoR's depth routers return Routing too: the same hook replays which tokens recurse."""
    cfg = moe.ExpertChoiceConfig(alpha=0.7) if config == "expert_choice" else moe.TokenChoiceConfig()
    torch.manual_seed(0)
    lm = moe.build_mor_lm(vocab_size=40, dim=D, n_layers=4, n_heads=2, num_recursions=2, router=cfg)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(11))
    lm.eval()
    with R.record(lm) as rec, torch.no_grad():
        ref = lm(ids).logits
    assert rec.layers
    with R.replay(lm, rec), torch.no_grad():
        assert torch.equal(lm(ids).logits, ref)
    _perturb_routers(lm)
    lm.train()
    with R.record(lm) as fresh, torch.no_grad():
        lm(ids)
    assert any(not torch.equal(a.ids_TK, b.ids_TK) for n in rec.layers for a, b in zip(fresh[n], rec[n]))
    with R.replay(lm, rec), R.record(lm) as again:
        lm(ids, labels=ids).loss.backward()
    for n in rec.layers:
        assert all(torch.equal(a.ids_TK, b.ids_TK) for a, b in zip(again[n], rec[n]))


def test_decoding_steps_merge_into_one_training_forward():
    """A KV-cached decoding pass, merged, replays in one full forward over the same tokens."""
    lm = _lm("threshold").eval()
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(12))
    with R.record(lm) as rec, torch.no_grad():
        cache = lm.new_cache()
        lm(ids[:, :3], cache=cache)
        for s in range(3, 8):
            lm(ids[:, s:s + 1], cache=cache)
    assert all(len(c) == 6 for c in rec.calls.values())
    merged = rec.merged()
    with R.record(lm) as full, torch.no_grad():
        lm(ids)
    for n in rec.layers:
        (call,) = merged[n]
        assert call.lead_shape == (2, 8) and call.weights_TK.shape == call.ids_TK.shape
        assert R.topk_set_changes(call.ids_TK, full[n][0].ids_TK).float().mean() <= 0.1
    _perturb_routers(lm)
    with R.replay(lm, merged, weights="recorded"), R.record(lm) as again, torch.no_grad():
        lm(ids)
    for n in rec.layers:
        assert torch.equal(again[n][0].ids_TK, merged[n][0].ids_TK)
        assert torch.equal(again[n][0].weights_TK, merged[n][0].weights_TK)
