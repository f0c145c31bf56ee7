"""Tests for moe.model: RMSNorm, RoPE, cached causal attention with explicit positions,
DecoderBlock with a pluggable MLP slot, CausalLM (loss, aux collection, padding, generate)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from moe.model import (CausalLM, CausalSelfAttention, DecoderBlock, KVCache, RMSNorm, SwiGLUMLP,
                       build_lm, rotary)


def _lm(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=13, dim=16, n_layers=2, n_heads=2, mlp_hidden=24)
    args.update(kw)
    return build_lm(**args).double().eval()


def test_rmsnorm_matches_definition():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    n = RMSNorm(8).double()
    nn.init.normal_(n.weight)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref, rtol=0, atol=1e-12)


def test_rotary_scores_depend_only_on_relative_position():
    q = torch.randn(1, 2, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 1, 8, dtype=torch.float64)

    def score(pq, pk):
        rq = rotary(q, torch.tensor([[pq]]), 10000.0)
        rk = rotary(k, torch.tensor([[pk]]), 10000.0)
        return (rq * rk).sum(-1)

    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=0, atol=1e-10)
    assert not torch.allclose(score(7, 3), score(7, 2))
    torch.testing.assert_close(rotary(q, torch.tensor([[5]]), 1e4).norm(), q.norm())


def test_attention_on_subset_equals_masked_full_attention():
    """Running on a subset at explicit positions == full attention restricted to that subset."""
    torch.manual_seed(0)
    att = CausalSelfAttention(16, 2).double()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 6])
    pos = torch.arange(7)[None]
    sub = att(x[:, keep], pos[:, keep], torch.ones(1, 4, dtype=torch.bool))
    valid = torch.zeros(1, 7, dtype=torch.bool)
    valid[0, keep] = True
    full = att(x, pos, valid)
    torch.testing.assert_close(sub, full[:, keep], rtol=0, atol=1e-12)


def test_flop_counter_matches_torch_count_of_the_math_attention():
    att = CausalSelfAttention(16, 2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pos, valid = torch.arange(5).expand(2, 5), torch.ones(2, 5, dtype=torch.bool)
    cache = KVCache()
    att(x[:, :3], pos[:, :3], valid[:, :3], cache)
    att.flops = 0
    att(x[:, 3:], pos[:, 3:], valid[:, 3:], cache)  # S=2 queries against M=5 keys
    q, k = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 5, 8)
    with FlopCounterMode(display=False) as fc:
        torch.softmax(q @ k.transpose(-1, -2), -1) @ k
    assert att.flops == fc.get_total_flops() == 4 * 2 * 2 * 2 * 5 * 8


def test_block_incremental_cache_equals_full_forward():
    torch.manual_seed(1)
    blk = DecoderBlock(16, 4, mlp_hidden=32).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    full = blk(x)
    cache = blk.new_cache()
    parts = [blk(x[:, :4], torch.arange(4).expand(2, 4), None, cache)]
    for t in range(4, 9):
        parts.append(blk(x[:, t:t + 1], torch.full((2, 1), t), None, cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)
    assert cache.num_tokens() == 18


class _RecordingMLP(nn.Module):
    """Stands in for moe.MoELayer: (..., D) -> (..., D) and an `aux_losses` dict."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        self.aux_losses = {"square": x.pow(2).mean()}
        return self.lin(x)


def test_mlp_slot_takes_any_module_and_aux_losses_are_collected():
    torch.manual_seed(0)
    model = build_lm(vocab_size=11, dim=8, n_layers=2, n_heads=2,
                     mlp_factory=lambda i: _RecordingMLP(8))
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = model(ids, attention_mask=mask)
    mlps = [layer.mlp for layer in model.layers]
    assert mlps[0].shapes == [(10, 8)]  # padding never reaches the MLP (routing slots)
    assert out.aux_losses.keys() == {"square"}  # summed by name over the layers
    torch.testing.assert_close(out.aux_losses["square"],
                               mlps[0].aux_losses["square"] + mlps[1].aux_losses["square"])
    with pytest.warns(DeprecationWarning, match="aux_losses"):  # the old name: their sum
        torch.testing.assert_close(out.aux_loss, out.aux_losses["square"])
    out.aux_losses["square"].backward()
    assert model.embed.weight.grad is not None


def test_loss_is_shifted_next_token_cross_entropy():
    model = _lm()
    ids = torch.randint(0, 13, (2, 7))
    out = model(ids, labels=ids)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert out.aux_losses == {}


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_run_alone(side):
    model = _lm(seed=2)
    a, b = torch.randint(0, 13, (1, 7)), torch.randint(0, 13, (1, 4))
    pad = torch.zeros(1, 3, dtype=torch.long)
    b_pad = torch.cat((pad, b), 1) if side == "left" else torch.cat((b, pad), 1)
    mask_b = (torch.arange(7) >= 3) if side == "left" else (torch.arange(7) < 4)
    out = model(torch.cat((a, b_pad)), attention_mask=torch.stack((torch.ones(7), mask_b)).long())
    torch.testing.assert_close(out.logits[0], model(a).logits[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.logits[1, mask_b], model(b).logits[0], rtol=0, atol=1e-12)
    assert torch.isfinite(out.logits).all()


def test_changing_later_tokens_never_changes_earlier_logits():
    model = _lm(seed=3)
    ids = torch.randint(0, 13, (1, 10))
    other = ids.clone()
    other[0, 6:] = (other[0, 6:] + 1) % 13
    torch.testing.assert_close(model(ids).logits[:, :6], model(other).logits[:, :6],
                               rtol=0, atol=1e-12)


def _greedy_without_cache(model, ids, n):
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), 1)
    return ids


def test_generate_with_cache_equals_recomputation_and_left_padding():
    model = _lm(seed=4)
    ids = torch.randint(0, 13, (2, 5))
    gen = model.generate(ids, 6)
    assert torch.equal(gen, _greedy_without_cache(model, ids, 6))
    short = torch.randint(0, 13, (1, 3))
    batch = torch.cat((ids[:1], torch.cat((torch.zeros(1, 2, dtype=torch.long), short), 1)))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    g = model.generate(batch, 4, attention_mask=mask)
    assert torch.equal(g[1, 5:], _greedy_without_cache(model, short, 4)[0, 3:])
    assert torch.equal(g[0], _greedy_without_cache(model, ids[:1], 4)[0])


def test_generate_restores_training_mode_and_samples_in_range():
    model = _lm().train()
    gen = model.generate(torch.zeros(3, 1, dtype=torch.long), 5, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert model.training and gen.shape == (3, 6) and int(gen.max()) < 13


def test_sequence_length_one_and_empty_sequence():
    model = _lm()
    assert model(torch.tensor([[3]])).logits.shape == (1, 1, 13)
    assert model(torch.zeros(2, 0, dtype=torch.long)).logits.shape == (2, 0, 13)


def test_bad_inputs_and_configs_name_the_argument():
    model = _lm()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[0, 13]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="n_heads"):
        DecoderBlock(10, 3)
    with pytest.raises(ValueError, match="head dim"):
        DecoderBlock(6, 2)
    with pytest.raises(ValueError, match="n_layers"):
        build_lm(vocab_size=5, dim=8, n_layers=0, n_heads=2)
    with pytest.raises(ValueError, match="vocab_size"):
        CausalLM(0, 8, [])


def test_gradcheck_float64_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    pos = torch.arange(4).expand(2, 4)
    blk = DecoderBlock(8, 2, mlp_hidden=12).double()
    assert torch.autograd.gradcheck(lambda t: blk(t, pos, valid), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(RMSNorm(8).double(), (x,))
    assert torch.autograd.gradcheck(SwiGLUMLP(8, 6).double(), (x,))


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 9), split=st.integers(0, 9), seed=st.integers(0, 99))
def test_chunked_cached_forward_equals_full_property(b, s, split, seed):
    model = _lm(seed=seed % 3)
    ids = torch.randint(0, 13, (b, s), generator=torch.Generator().manual_seed(seed))
    split = min(split, s)
    cache = model.new_cache()
    parts = [model(ids[:, :split], cache=cache).logits, model(ids[:, split:], cache=cache).logits]
    torch.testing.assert_close(torch.cat(parts, 1), model(ids).logits, rtol=0, atol=1e-11)
    assert cache.num_tokens() == 2 * b * s
