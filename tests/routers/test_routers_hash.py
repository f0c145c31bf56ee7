"""HashRouter (Roller et al. 2021's hash layers, the HASH baseline of Clark et al. 2022): a token id
always goes to the same experts whatever its context or batch; loads are balanced over a uniform
vocabulary; MoELayer and the LM pass the ids through."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe
from moe.model import MoEConfig
from routers import HashRouter, balanced_hash_table, frequency_balanced_hash_table
from tests.routers.test_routers_common import check_contract

D, E, V = 12, 6, 50


@settings(max_examples=60, deadline=None)
@given(V=st.integers(1, 300), E=st.integers(1, 17), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_table_is_balanced_and_distinct(V, E, data, seed):
    """Over a uniform vocabulary each slot gives every expert floor(V/E) or ceil(V/E) ids, and a
    token's K experts are distinct."""
    K = data.draw(st.integers(1, E))
    table = balanced_hash_table(V, E, K, seed=seed)
    assert table.shape == (V, K) and table.dtype == torch.int64
    assert ((table >= 0) & (table < E)).all()
    for j in range(K):
        loads = torch.bincount(table[:, j], minlength=E)
        assert loads.min() >= V // E and loads.max() <= -(-V // E)
    assert (table.sort(dim=1).values.diff(dim=1) > 0).all()
    assert torch.equal(table, balanced_hash_table(V, E, K, seed=seed))


@settings(max_examples=40, deadline=None)
@given(V=st.integers(1, 200), E=st.integers(1, 9), data=st.data(), seed=st.integers(0, 2**16))
def test_frequency_balanced_table_bounds_the_token_loads(V, E, data, seed):
    """Roller et al.'s balanced assignment: the expected token loads of the experts differ by at
    most the largest count (greedy list scheduling); count-0 ids spread round-robin."""
    K = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(seed)
    counts = (torch.rand(V, generator=g) ** 4 * 1000).floor()  # skewed, with ties and zeros
    table = frequency_balanced_hash_table(counts, E, K, seed=seed)
    assert table.shape == (V, K) and (table.sort(dim=1).values.diff(dim=1) > 0).all()
    load = torch.zeros(E, dtype=torch.float64).index_add_(0, table.reshape(-1), counts.double().repeat_interleave(K))
    assert load.max() - load.min() <= counts.max()
    zero = frequency_balanced_hash_table(torch.zeros(V), E, K, seed=seed)
    per_expert = torch.bincount(zero.reshape(-1), minlength=E)
    assert per_expert.max() - per_expert.min() <= 1


def test_router_takes_token_counts():
    counts = torch.arange(V, dtype=torch.float32)
    router = HashRouter(D, E, V, 2, token_counts=counts, seed=4)
    assert torch.equal(router.expert_VK, frequency_balanced_hash_table(counts, E, 2, seed=4))
    for bad in (torch.ones(V + 1), -torch.ones(V), [1.0] * V):
        with pytest.raises(ValueError, match="token_counts"):
            HashRouter(D, E, V, token_counts=bad)


def test_seeds_give_different_hashes_and_pairs_vary():
    a, b = balanced_hash_table(1000, 8, 2, seed=0), balanced_hash_table(1000, 8, 2, seed=1)
    assert (a != b).any(dim=1).float().mean() > 0.5
    pairs = {tuple(p) for p in a.sort(dim=1).values.tolist()}
    assert len(pairs) > 8, "a token's second expert is not a fixed function of its first"


@pytest.mark.parametrize("K", [1, 2, E])
def test_same_id_same_experts_whatever_the_context(K):
    """The defining property: routing is a function of the token id only (not of x, of the
    neighbours, of the batch, of the mode)."""
    torch.manual_seed(0)
    router = HashRouter(D, E, V, K, seed=3)
    ids = torch.randint(0, V, (4, 9))
    out = router(torch.randn(4, 9, D), input_ids=ids)
    check_contract(router, out, 36)
    assert out.aux_losses == {}
    assert torch.equal(out.ids_TK, router.expert_VK[ids.reshape(-1)])
    torch.testing.assert_close(out.weights_TK, torch.full((36, K), 1.0 / K))
    perm = torch.randperm(36)
    other = router(torch.randn(36, D) * 100, input_ids=ids.reshape(-1)[perm])  # new context, new x
    assert torch.equal(other.ids_TK, out.ids_TK[perm])
    router.eval()
    alone = [router(torch.randn(1, D), input_ids=ids.reshape(-1)[t:t + 1]).ids_TK for t in range(36)]
    assert torch.equal(torch.cat(alone), out.ids_TK)


def test_uniform_vocabulary_balances_the_loads():
    router = HashRouter(D, 8, 4096, 2, seed=0)
    ids = torch.arange(4096)
    counts = router(torch.zeros(4096, D), input_ids=ids).counts_E
    assert torch.equal(counts, torch.full((8,), 4096 * 2 // 8))


def test_probs_logits_and_padding():
    router = HashRouter(D, E, V, 2)
    ids = torch.randint(0, V, (2, 5))
    ids[1, 3:] = -100  # padding positions may hold anything
    mask = ids >= 0
    out = router(torch.randn(2, 5, D), input_ids=ids, padding_mask=mask)
    check_contract(router, out, 10, num_real=8)
    assert (out.ids_TK[~mask.reshape(-1)] == -1).all()
    torch.testing.assert_close(out.probs_TE.sum(1), torch.ones(10))
    torch.testing.assert_close(torch.softmax(out.logits_TE, -1), out.probs_TE)
    empty = router(torch.randn(0, D), input_ids=torch.zeros(0, dtype=torch.long))
    assert empty.ids_TK.shape == (0, 2)
    assert router(torch.randn(3, D, dtype=torch.float64), input_ids=torch.arange(3)).weights_TK.dtype == torch.float64


def test_table_is_saved_with_the_model():
    a, b = HashRouter(D, E, V, seed=0), HashRouter(D, E, V, seed=1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.expert_VK, b.expert_VK)


def test_bad_input_ids_name_themselves():
    router = HashRouter(D, E, V)
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match="input_ids"):
        router(x)
    with pytest.raises(TypeError, match="input_ids"):
        router(x, input_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids has shape"):
        router(x, input_ids=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size=50"):
        router(x, input_ids=torch.full((2, 3), V))
    for kwargs, name in ((dict(vocab_size=0), "vocab_size"), (dict(top_k=E + 1), "top_k"),
                         (dict(seed=1.5), "seed"), (dict(num_experts=0), "num_experts")):
        args = dict(hidden_size=D, num_experts=E, vocab_size=V) | kwargs
        with pytest.raises(ValueError, match=name):
            HashRouter(**args)


def test_moe_layer_passes_ids_and_tokens_are_independent():
    torch.manual_seed(0)
    layer = moe.MoELayer(D, 8, E, router=HashRouter(D, E, V, 2))
    assert layer.routes_on_input_ids and not moe.MoELayer(D, 8, E, 2).routes_on_input_ids
    x, ids = torch.randn(3, 4, D), torch.randint(0, V, (3, 4))
    y = layer(x, input_ids=ids)
    assert torch.equal(layer.last_routing.ids_TK, layer.router.expert_VK[ids.reshape(-1)])
    flat = layer(x.reshape(12, D), input_ids=ids.reshape(12))  # (T, D) input: ids of shape (T,)
    torch.testing.assert_close(flat, y.reshape(12, D))
    one = layer(x[1:2, 2:3], input_ids=ids[1:2, 2:3])  # a token's output needs only its x and id
    torch.testing.assert_close(one[0, 0], y[1, 2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input_ids"):
        layer(x)
    topk = moe.MoELayer(D, 8, E, 2)
    torch.testing.assert_close(topk(x, input_ids=ids), topk(x))  # other routers ignore the ids


def test_lm_routes_on_its_input_ids_with_padding_and_cache():
    torch.manual_seed(0)
    lm = moe.build_lm(vocab_size=V, dim=16, n_layers=2, n_heads=2,
                      moe=MoEConfig(num_experts=4, ffn_hidden_size=8, top_k=1, router="hash"))
    layers = [m for m in lm.modules() if isinstance(m, moe.MoELayer)]
    assert not torch.equal(layers[0].router.expert_VK, layers[1].router.expert_VK)  # seed = layer index
    ids = torch.randint(0, V, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    out = lm(ids, labels=ids, attention_mask=mask)
    for layer in layers:
        assert torch.equal(layer.last_routing.ids_TK[:, 0], layer.router.expert_VK[ids[mask], 0])
    out.loss.backward()
    assert all(p.grad is not None for p in layers[0].experts.parameters())
    lm.eval()
    full = lm(ids, attention_mask=mask).logits
    cache = lm.new_cache()
    first = lm(ids[:, :4], attention_mask=mask[:, :4], cache=cache).logits
    rest = lm(ids[:, 4:], cache=cache).logits  # cached decoding routes the new ids
    torch.testing.assert_close(torch.cat((first, rest), 1)[mask], full[mask], rtol=1e-4, atol=1e-5)
    assert lm.generate(ids[:, :3], 4).shape == (2, 7)
