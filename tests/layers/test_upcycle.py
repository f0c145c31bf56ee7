"""Sparse upcycling (moe.upcycle): at initialisation the upcycled layer computes the dense FFN,
for random router weights (tied per virtual group when G > 1), up to rounding, for G = 1 and
G > 1, every activation and bias; noise breaks the copies apart; the layer then trains; the
model-level helper swaps a small LM's MLPs without changing its logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe
import routers

D, FH = 12, 24


class GatedMLP(nn.Module):
    """The gate/up/down MLP of transformers' Llama-style models."""

    def __init__(self, act, bias=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, FH, bias=bias), nn.Linear(D, FH, bias=bias)
        self.down_proj, self.act_fn = nn.Linear(FH, D, bias=bias), act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _dense(kind: str):
    if kind == "swiglu_mlp":
        return moe.SwiGLUMLP(D, FH)
    if kind == "gated_silu":
        return GatedMLP(nn.SiLU(), bias=True)
    if kind == "gated_gelu":
        return GatedMLP(nn.GELU())
    activation, bias = kind.split("_") if "_" in kind else (kind, "")
    return moe.DenseFFN(D, FH, activation=activation, bias=bias == "bias")


DENSE = ["swiglu", "swiglu_bias", "geglu", "gelu_bias", "relu", "swiglu_mlp", "gated_silu", "gated_gelu"]


def _randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


@pytest.mark.parametrize("kind", DENSE)
@pytest.mark.parametrize("E,k,G", [(4, 1, 1), (4, 2, 1), (3, 2, 2), (4, 2, 4), (2, 1, 3)])
def test_upcycled_layer_computes_the_dense_ffn_for_any_router(kind, E, k, G):
    torch.manual_seed(E * 100 + k * 10 + G)
    dense = _dense(kind).double()
    _randomize(dense, 1)
    layer = moe.upcycle(dense, E, k, granularity=G, router_init_std=1.0)  # O(1) router: varied routing
    assert layer.num_experts == E * G and layer.top_k == k * G and layer.experts.ffn_hidden_size == FH // G
    x = torch.randn(5, 7, D, dtype=torch.float64)
    ref = dense(x)
    for seed in range(3):  # any router weights (tied within each virtual group for G > 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            rows = torch.randn(E, D, generator=g, dtype=torch.float64) * 2.0
            layer.router.weight.copy_(rows.repeat_interleave(G, dim=0))
        y = layer(x)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        used = layer.last_routing.counts_E.view(E, G)
        assert (used == used[:, :1]).all()  # whole copies: every segment of a chosen copy
    assert len(set(layer.last_routing.ids_TK[:, 0].tolist())) > 1  # the router does route


def test_upcycled_layer_float32_and_any_g1_router():
    """float32: within rounding of the float64 reference; G = 1 with a variable-k router whose
    weights sum to 1 (the threshold router, renormalised)."""
    dense = moe.DenseFFN(D, FH)
    _randomize(dense, 2)
    x = torch.randn(40, D)
    ref64 = dense.double()(x.double())
    dense.float()
    router = routers.ThresholdRouter(D, 6, threshold=0.7, renormalize=True, init_std=1.0)
    layer = moe.upcycle(dense, 6, 6, router=router)
    y = layer(x)
    err_ours, err_dense = (y.double() - ref64).abs().max(), (dense(x).double() - ref64).abs().max()
    assert err_ours <= 8 * err_dense + 1e-6
    assert layer.last_routing.experts_per_token > 1


def test_softmax_then_topk_scaling_is_exact_for_a_uniform_router():
    """He et al.'s factor without renormalisation: E*G/k, exact when every probability is 1/(E*G)
    (zero router) and the tied top-k picks whole copies."""
    dense = moe.DenseFFN(D, FH).double()
    _randomize(dense, 3)
    layer = moe.upcycle(dense, 4, 1, granularity=1, norm_topk=False, router_init_std=0.0)
    x = torch.randn(9, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)


def test_noise_breaks_the_copies_and_the_layer_trains():
    torch.manual_seed(0)
    dense = moe.DenseFFN(D, FH)
    _randomize(dense, 4)
    layer = moe.upcycle(dense, 4, 2, granularity=2, noise=0.05, generator=torch.Generator().manual_seed(0))
    w = layer.experts.w_in_EDH
    assert not torch.equal(w[0], w[2]) and (w[0] - w[2]).abs().max() < 0.2  # copies of segment 0, apart
    x = torch.randn(64, D)
    ref = dense(x)
    rel = (layer(x) - ref).norm() / ref.norm()
    assert 0 < rel < 0.2
    target = torch.randn(64, D)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean() + moe.collect_aux_losses(layer)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert layer.router.weight.grad.abs().sum() > 0


def test_upcycle_model_keeps_the_lm_and_trains():
    torch.manual_seed(0)
    lm = moe.build_lm(vocab_size=50, dim=D, n_layers=3, n_heads=2, mlp_hidden=FH).double()
    ids = torch.randint(0, 50, (4, 16))
    ref = lm(ids).logits
    names = moe.upcycle_model(lm, 4, 2, granularity=2, select=lambda name, m: name != "layers.1.mlp")
    assert names == ["layers.0.mlp", "layers.2.mlp"]
    assert isinstance(lm.layers[0].mlp, moe.MoELayer) and isinstance(lm.layers[1].mlp, moe.SwiGLUMLP)
    torch.testing.assert_close(lm(ids).logits, ref, rtol=1e-10, atol=1e-10)
    assert moe.upcycle_model(lm, 4, 2) == ["layers.1.mlp"]  # MoELayers (and their shared experts) stay
    lm.float()
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        out = lm(ids, labels=ids)
        (out.loss + moe.collect_aux_losses(lm)).backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]


def test_hf_mlp_upcycles():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 8))
    ref = model(input_ids=ids).logits
    names = moe.upcycle_model(model, 4, 1, granularity=2, router_init_std=1.0)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-10, atol=1e-10)


def test_upcycle_errors_name_the_argument():
    dense = moe.DenseFFN(D, FH)
    with pytest.raises(ValueError, match="granularity=5 must divide"):
        moe.upcycle(dense, 4, 1, granularity=5)
    with pytest.raises(ValueError, match="k=5 exceeds num_experts=4"):
        moe.upcycle(dense, 4, 5)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        moe.upcycle(dense, 0, 1)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        moe.upcycle(dense, 4, 1, noise=-1.0)
    with pytest.raises(TypeError, match="ffn must be"):
        moe.upcycle(nn.Linear(D, D), 4, 1)
    with pytest.raises(TypeError, match="act_fn"):
        moe.upcycle(GatedMLP(nn.Tanh()), 4, 1)
    with pytest.raises(ValueError, match="linear weight of shape"):
        moe.upcycle(dense, 2, 1, granularity=2, router=routers.RecurrentRouter(D, 4, 2, router_dim=4))
