"""TopKRouter: parity with Hugging Face transformers' routers, DeepSeek-V3 groups and bias,
capacity, and the balancing losses."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routers import (
    TopKRouter,
    apply_capacity,
    capacity,
    position_priority,
    sequence_load_balancing_loss,
    switch_load_balancing_loss,
    z_loss,
)

transformers = pytest.importorskip("transformers")


def sorted_by_id(ids, weights):
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


def assert_same_routing(ours, hf_ids, hf_weights):
    ids, w = sorted_by_id(ours.ids_TK, ours.weights_TK)
    hf_ids, hf_w = sorted_by_id(hf_ids.to(torch.int64), hf_weights.to(torch.float32))
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(w, hf_w, rtol=1e-6, atol=1e-7)


def hf_router(kind, **cfg):
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as cls

        config = MixtralConfig(**cfg)
    elif kind == "qwen3":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as cls

        config = Qwen3MoeConfig(**cfg)
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as cls

        config = DeepseekV3Config(**cfg)
    gate = cls(config)
    with torch.no_grad():
        gate.weight.normal_(0, 1.0)
    return gate


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mixtral_parity(k):
    torch.manual_seed(k)
    gate = hf_router("mixtral", hidden_size=16, num_local_experts=8, num_experts_per_tok=k)
    ours = TopKRouter(16, 8, k, norm_topk=True)
    ours.weight.data.copy_(gate.weight.data)
    x = torch.randn(2, 9, 16)
    logits, weights, ids = gate(x)
    out = ours(x)
    torch.testing.assert_close(out.logits_TE, logits)
    assert_same_routing(out, ids, weights)


@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe_parity(norm):
    torch.manual_seed(int(norm))
    gate = hf_router("qwen3", hidden_size=16, num_experts=10, num_experts_per_tok=4, norm_topk_prob=norm)
    ours = TopKRouter(16, 10, 4, norm_topk=norm)
    ours.weight.data.copy_(gate.weight.data)
    x = torch.randn(3, 7, 16)
    _, weights, ids = gate(x)
    assert_same_routing(ours(x), ids, weights)


@pytest.mark.parametrize("norm,groups,topk_groups", [(True, 4, 2), (False, 4, 3), (True, 1, 1), (True, 8, 2)])
def test_deepseek_v3_parity(norm, groups, topk_groups):
    torch.manual_seed(groups + topk_groups)
    gate = hf_router(
        "deepseek", hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=groups,
        topk_group=topk_groups, routed_scaling_factor=2.5, norm_topk_prob=norm,
    )
    with torch.no_grad():
        gate.e_score_correction_bias.normal_(0, 0.3)
    ours = TopKRouter(16, 16, 4, score="sigmoid", norm_topk=norm, num_groups=groups, topk_groups=topk_groups,
                      expert_bias=True, routed_scaling_factor=2.5)
    ours.weight.data.copy_(gate.weight.data)
    ours.expert_bias.copy_(gate.e_score_correction_bias)
    x = torch.randn(4, 8, 16)
    logits, weights, ids = gate(x)
    out = ours(x)
    torch.testing.assert_close(out.logits_TE, logits)
    assert_same_routing(out, ids, weights)


def test_group_limited_routing_stays_in_topk_groups():
    torch.manual_seed(0)
    r = TopKRouter(8, 12, 4, score="sigmoid", num_groups=4, topk_groups=2)
    r.weight.data.normal_(0, 2.0)
    out = r(torch.randn(64, 8))
    groups_per_token = [len(set((row // 3).tolist())) for row in out.ids_TK]
    assert max(groups_per_token) <= 2
    # and it does bind: ungrouped routing spreads over more groups for some tokens
    free = TopKRouter(8, 12, 4, score="sigmoid")
    free.weight.data.copy_(r.weight.data)
    assert max(len(set((row // 3).tolist())) for row in free(torch.randn(64, 8)).ids_TK) > 2


def test_expert_bias_moves_selection_not_weights():
    torch.manual_seed(1)
    r = TopKRouter(8, 6, 2, score="sigmoid", expert_bias=True, balance_loss=None)
    x = torch.randn(20, 8)
    base = r(x)
    r.expert_bias[3] = 10.0  # expert 3 now wins every selection ...
    biased = r(x)
    assert (biased.ids_TK == 3).any(dim=-1).all()
    # ... but its weight is still computed from the unbiased sigmoid score
    s = torch.sigmoid(base.logits_TE)
    w = s.gather(1, biased.ids_TK)
    torch.testing.assert_close(biased.weights_TK, w / w.sum(-1, keepdim=True))
    torch.testing.assert_close(biased.probs_TE, base.probs_TE)


def test_update_expert_bias_sign_rule():
    r = TopKRouter(4, 4, 1, expert_bias=True)
    r.update_expert_bias(torch.tensor([10, 2, 4, 4]), rate=0.5)  # mean 5
    assert r.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    r.update_expert_bias(torch.tensor([5, 5, 5, 5]))
    assert r.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert not any(name == "expert_bias" for name, _ in r.named_parameters())
    assert "expert_bias" in r.state_dict()
    with pytest.raises(ValueError, match="counts_E"):
        r.update_expert_bias(torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="expert_bias=True"):
        TopKRouter(4, 4, 1).update_expert_bias(torch.ones(4))


def test_bias_balances_a_skewed_router():
    torch.manual_seed(0)
    r = TopKRouter(8, 4, 1, expert_bias=True).eval()
    r.weight.data.normal_(0, 1.0)
    r.weight.data[0] += 0.5
    x = torch.randn(128, 8)
    spread = []
    with torch.no_grad():
        for _ in range(60):
            counts = r(x).counts_E
            spread.append(counts.float().std().item())
            r.update_expert_bias(counts, rate=1e-2)
    assert spread[0] > 10
    assert sum(spread[-20:]) / 20 < spread[0] / 4


def test_softmax_k1_keeps_the_probability_as_weight():
    r = TopKRouter(8, 5, 1)  # Switch: norm_topk defaults to False for k=1
    out = r(torch.randn(6, 8))
    torch.testing.assert_close(out.weights_TK[:, 0], out.probs_TE.max(-1).values)


def test_jitter_only_in_training():
    torch.manual_seed(0)
    r = TopKRouter(8, 5, 2, jitter=0.5)
    r.weight.data.normal_(0, 1.0)
    x = torch.randn(50, 8)
    assert not torch.equal(r(x).logits_TE, r(x).logits_TE)
    r.eval()
    torch.testing.assert_close(r(x).logits_TE, x @ r.weight.T)


# ---- capacity ------------------------------------------------------------------------------


def test_capacity_formula():
    assert capacity(10, 2, 4, 1.0) == 5
    assert capacity(10, 2, 4, 1.25) == math.ceil(6.25)
    assert capacity(3, 1, 8, 1.0) == 1
    assert capacity(3, 1, 8, 1.0, min_capacity=4) == 4
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity(3, 1, 8, 0)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 24), E=st.integers(1, 6), k=st.integers(1, 3), cf=st.floats(0.1, 2.0),
       policy=st.sampled_from(["probs", "position"]), seed=st.integers(0, 2**16))
def test_capacity_never_exceeded(T, E, k, cf, policy, seed):
    k = min(k, E)
    torch.manual_seed(seed)
    r = TopKRouter(4, E, k, capacity_factor=cf, drop_policy=policy)
    r.weight.data.normal_(0, 3.0)
    free = TopKRouter(4, E, k)
    free.weight.data.copy_(r.weight.data)
    x = torch.randn(T, 4)
    out, ref = r(x), free(x)
    cap = capacity(T, k, E, cf)
    assert (out.counts_E <= cap).all()
    assert (out.weights_TK[out.ids_TK < 0] == 0).all()
    # every kept slot is a dropless slot with the same weight; experts under capacity keep all
    kept = out.ids_TK >= 0
    assert torch.equal(out.ids_TK[kept], ref.ids_TK[kept])
    assert torch.equal(out.weights_TK[kept], ref.weights_TK[kept])
    assert torch.equal(out.counts_E, ref.counts_E.clamp(max=cap))
    chosen = T * k
    assert out.dropped_fraction.item() == pytest.approx((chosen - out.counts_E.sum().item()) / max(chosen, 1))


def test_drop_policies_keep_the_right_slots():
    # 4 tokens all on expert 0 (k=1, E=2), capacity ceil(4*1/2*0.5) = 1
    ids = torch.zeros(4, 1, dtype=torch.int64)
    w = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    by_prob, _ = apply_capacity(ids, w, w, 1, 2)
    assert by_prob[:, 0].tolist() == [-1, 0, -1, -1]
    by_pos, w_pos = apply_capacity(ids, w, position_priority(ids), 2, 2)
    assert by_pos[:, 0].tolist() == [0, 0, -1, -1]
    assert w_pos[:, 0].tolist() == [pytest.approx(0.2), pytest.approx(0.9), 0.0, 0.0]


def test_router_drop_policy_position_keeps_earliest_tokens():
    r = TopKRouter(2, 2, 1, capacity_factor=0.5, drop_policy="position")
    r.weight.data = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])  # three want expert 0
    out = r(x)  # capacity ceil(4/2 * 0.5) = 1
    assert out.ids_TK[:, 0].tolist() == [0, -1, -1, 1]
    assert out.dropped_fraction.item() == pytest.approx(0.5)
    r.drop_policy = "probs"
    assert r(x).ids_TK[:, 0].tolist() == [-1, 0, -1, 1]


def test_capacity_ignores_padded_tokens():
    r = TopKRouter(2, 2, 1, capacity_factor=0.5, drop_policy="position")
    r.weight.data = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    out = r(x, padding_mask=torch.tensor([False, True, True, True]))
    assert out.ids_TK[:, 0].tolist() == [-1, 0, -1, 1]  # the padded token 0 takes no capacity


# ---- losses --------------------------------------------------------------------------------


def test_switch_loss_formula_and_minimum():
    E, K = 4, 2
    probs = torch.softmax(torch.randn(10, E), -1)
    ids = probs.topk(K, -1).indices
    f = torch.bincount(ids.reshape(-1), minlength=E).float() / (10 * K)
    expected = E * (f * probs.mean(0)).sum()
    torch.testing.assert_close(switch_load_balancing_loss(probs, ids), expected)
    uniform = torch.full((8, E), 1.0 / E)
    ids_rr = torch.arange(8 * K).reshape(8, K) % E
    torch.testing.assert_close(switch_load_balancing_loss(uniform, ids_rr), torch.tensor(1.0))
    # -1 slots and padded tokens are excluded
    ids_pad = torch.cat([ids, torch.full((3, K), -1)])
    probs_pad = torch.cat([probs, torch.rand(3, E)])
    valid = torch.arange(13) < 10
    torch.testing.assert_close(switch_load_balancing_loss(probs_pad, ids_pad, valid_T=valid), expected)


def test_sequence_loss_is_mean_of_per_sequence_switch_losses():
    probs = torch.softmax(torch.randn(3, 5, 6), -1)
    ids = probs.topk(2, -1).indices
    per_seq = torch.stack([switch_load_balancing_loss(probs[b], ids[b]) for b in range(3)])
    torch.testing.assert_close(sequence_load_balancing_loss(probs, ids), per_seq.mean())
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2] = False  # an all-padding sequence does not count
    torch.testing.assert_close(sequence_load_balancing_loss(probs, ids, valid_BS=valid), per_seq[:2].mean())


def test_z_loss_formula():
    logits = torch.randn(7, 5)
    torch.testing.assert_close(z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())


def test_router_aux_losses_use_coefficients():
    torch.manual_seed(0)
    r = TopKRouter(6, 4, 2, balance_loss="seq", balance_loss_coeff=0.3, z_loss_coeff=0.01)
    x = torch.randn(2, 5, 6)
    out = r(x)
    assert set(out.aux_losses) == {"seq_load_balancing", "z_loss"}
    probs = out.probs_TE.reshape(2, 5, 4)
    ids = out.ids_TK.reshape(2, 5, 2)
    torch.testing.assert_close(out.aux_losses["seq_load_balancing"], 0.3 * sequence_load_balancing_loss(probs, ids))
    torch.testing.assert_close(out.aux_losses["z_loss"], 0.01 * z_loss(out.logits_TE))
    r.balance_loss = "switch"
    assert set(r(x).aux_losses) == {"load_balancing", "z_loss"}
    r.balance_loss, r.z_loss_coeff = None, 0.0
    assert r(x).aux_losses == {}


def test_sigmoid_aux_loss_uses_normalised_unbiased_scores():
    torch.manual_seed(0)
    r = TopKRouter(6, 8, 2, score="sigmoid", expert_bias=True, balance_loss_coeff=1.0)
    r.expert_bias[0] = 5.0
    out = r(torch.randn(12, 6))
    s = out.probs_TE / out.probs_TE.sum(-1, keepdim=True)
    expected = switch_load_balancing_loss(s, s.topk(2, -1).indices)
    torch.testing.assert_close(out.aux_losses["load_balancing"], expected)


def test_balance_loss_gradient_pushes_towards_balance():
    torch.manual_seed(0)
    r = TopKRouter(6, 4, 1, balance_loss_coeff=1.0)
    r.weight.data.normal_(0, 1.0)
    x = torch.randn(64, 6)
    opt = torch.optim.SGD(r.parameters(), lr=1.0)
    first = None
    for _ in range(30):
        loss = r(x).aux_losses["load_balancing"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert r(x).aux_losses["load_balancing"].item() < first


def test_seq_loss_is_deepseek_v3_eq_17_to_20():
    """L = alpha * sum_i f_i P_i per sequence, f_i = E/(K*S) * #{t: s_it in top-K of s_t}
    (unbiased, all groups), P_i = mean_t s_it / sum_j s_jt; averaged over the B sequences."""
    torch.manual_seed(4)
    B, S, E, K, alpha = 3, 7, 8, 2, 0.1
    r = TopKRouter(6, E, K, score="sigmoid", num_groups=4, topk_groups=2, expert_bias=True,
                   balance_loss="seq", balance_loss_coeff=alpha)
    r.weight.data.normal_(0, 1.0)
    r.expert_bias.normal_(0, 0.5)  # moves selection, but not the loss's top-K
    out = r(torch.randn(B, S, 6))
    s_TE = torch.sigmoid(out.logits_TE)
    assert not torch.equal(out.ids_TK.sort(-1).values, s_TE.topk(K, -1).indices.sort(-1).values)
    s = s_TE.reshape(B, S, E)
    expected = []
    for b in range(B):
        hits = torch.zeros(E)
        for t in range(S):
            for e in s[b, t].topk(K).indices.tolist():
                hits[e] += 1
        f = E / (K * S) * hits
        P = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        expected.append(alpha * (f * P).sum())
    torch.testing.assert_close(out.aux_losses["seq_load_balancing"], torch.stack(expected).mean())


def test_deprecated_aux_loss_keywords_map_to_balance_loss():
    """The loss-type option was renamed balance_loss ("aux loss" is only the model-wide sum); the
    old keywords and attribute still work, with a DeprecationWarning, and typos still raise."""
    with pytest.warns(DeprecationWarning, match="is deprecated, use balance_loss"):
        r = TopKRouter(6, 4, 2, aux_loss="seq", aux_loss_coeff=0.3)
    assert r.balance_loss == "seq" and r.balance_loss_coeff == 0.3
    with pytest.warns(DeprecationWarning, match="balance_loss"):
        r.aux_loss = None
    assert r.balance_loss is None
    with pytest.raises(TypeError, match="aux_los"):
        TopKRouter(6, 4, 2, aux_los="seq")


@pytest.mark.parametrize("T,K,E,C", [(300, 4, 16, 50), (37, 3, 5, 4), (10, 2, 4, 0), (0, 2, 4, 0), (50, 2, 3, 100)])
def test_keep_first_slots_is_apply_capacity_with_position_priority(T, K, E, C):
    """The position policy from ranks within each expert equals the dense-priority form."""
    from routers.capacity import apply_capacity, keep_first_slots, position_priority

    g = torch.Generator().manual_seed(T + C)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    ids[torch.rand(T, K, generator=g) < 0.2] = -1
    w = torch.rand(T, K, generator=g).masked_fill(ids < 0, 0)
    want = apply_capacity(ids, w, position_priority(ids), C, E)
    got = keep_first_slots(ids, w, C, E)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
