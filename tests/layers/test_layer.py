"""GroupedExperts, LocalDispatcher and MoELayer: outputs equal a per-expert reference for every
router (variable k and empty slots included), fine-grained and shared experts preserve
parameters and FLOPs, aux losses, torch.compile, gradcheck in float64, bad input and edge cases.

Shape legend: T tokens, D hidden, E experts, K slots, F expert hidden.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import moe
import routers
from moe import ExpertRows, GroupedExperts, LocalDispatcher, MoELayer, ops
from routers import Routing

ACTS = {"swiglu": lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
        "geglu": lambda h: F.gelu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
        "gelu": F.gelu, "relu": F.relu}


def expert_outputs(ex: GroupedExperts, x_TD):
    """(E, T, D): every expert applied to every token, one plain matmul chain per expert."""
    outs = []
    for e in range(ex.num_experts):
        h = x_TD @ ex.w_in_EDH[e] + (0 if ex.b_in_EH is None else ex.b_in_EH[e])
        outs.append(ACTS[ex.activation](h) @ ex.w_out_EFD[e] + (0 if ex.b_out_ED is None else ex.b_out_ED[e]))
    return torch.stack(outs)


def reference(layer: MoELayer, x, routing: Routing):
    """y_t = sum_k w_tk * E_{ids_tk}(x_t) over non-empty slots + shared(x_t)."""
    x_TD = x.reshape(-1, layer.hidden_size)
    Y_ETD = expert_outputs(layer.experts, x_TD)
    ids, w = routing.ids_TK, routing.weights_TK.to(x.dtype)
    T = x_TD.shape[0]
    picked_TKD = Y_ETD[ids.clamp(min=0), torch.arange(T)[:, None]]
    y = (picked_TKD * torch.where(ids >= 0, w, 0)[..., None]).sum(1)
    if layer.shared_experts is not None:
        sh = layer.shared_experts
        y = y + F.linear(ACTS[sh.activation](F.linear(x_TD, sh.w_in.weight, sh.w_in.bias)), sh.w_out.weight, sh.w_out.bias)
    return y.reshape(x.shape)


class FixedRouter(nn.Module):
    """Routes by given ids/weights (any plug-in router only has to return a Routing)."""

    def __init__(self, hidden_size, num_experts, ids_TK, weights_TK):
        super().__init__()
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, ids_TK.shape[1]
        self.ids_TK, self.weights_TK = ids_TK, weights_TK

    def forward(self, x, *, state=None, padding_mask=None):
        T, E = self.ids_TK.shape[0], self.num_experts
        zeros = torch.zeros(T, E)
        return Routing(ids_TK=self.ids_TK, weights_TK=self.weights_TK, probs_TE=zeros, logits_TE=zeros,
                       aux_losses={}, state=None, counts_E=routers.expert_counts(self.ids_TK, E),
                       dropped_fraction=torch.zeros(()), experts_per_token=torch.ones(()))


class Stack(nn.Module):
    """Two MoE layers sharing a recurrent router chain (registered once, with its GRU cell)."""

    def __init__(self, layers, chain):
        super().__init__()
        self.layers, self.chain = nn.ModuleList(layers), chain

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def make_router(kind, D, E):
    if kind == "topk":
        return routers.TopKRouter(D, E, 2, balance_loss="seq", z_loss_coeff=1e-3, init_std=0.5)
    if kind == "threshold":
        return routers.ThresholdRouter(D, E, threshold=0.6, max_experts=3, init_std=0.5)
    if kind == "expert_choice":
        return routers.ExpertChoiceRouter(D, E, 1.5, init_std=0.5)
    raise ValueError(kind)


# ---- experts and dispatcher ------------------------------------------------------------------

@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_experts_match_per_expert_loop(activation, bias):
    torch.manual_seed(0)
    ex = GroupedExperts(4, 6, 5, activation=activation, bias=bias).double()
    counts = torch.tensor([3, 0, 5, 1])  # an expert with zero rows
    N = 12  # 9 routed rows + 3 padding rows
    x_ND = torch.randn(N, 6, dtype=torch.float64)
    offs_E = counts.cumsum(0).int()
    y = ex(ExpertRows(x_ND, offs_E))
    with pytest.warns(DeprecationWarning, match="ExpertRows"):
        assert torch.equal(ex(x_ND, offs_E), y)  # the deprecated (x_ND, offs_E) form
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts)
    ref = expert_outputs(ex, x_ND[:9])[expert_of_row, torch.arange(9)]
    torch.testing.assert_close(y[:9], ref)
    assert torch.equal(y[9:], torch.zeros(3, 6, dtype=torch.float64))


def test_grouped_experts_layout_and_init():
    ex = GroupedExperts(3, 64, 32, activation="swiglu", bias=True)
    assert [p.shape[0] for p in ex.parameters()] == [3] * 4  # EP slices dim 0 of every parameter
    assert ex.w_in_EDH.shape == (3, 64, 64) and ex.w_out_EFD.shape == (3, 32, 64)
    assert ex.w_in_EDH.abs().max() <= 64 ** -0.5 and ex.w_out_EFD.abs().max() <= 32 ** -0.5
    assert ex.w_out_EFD.abs().max() > 0.9 * 32 ** -0.5  # uniform over the nn.Linear bound
    assert GroupedExperts(3, 8, 4, activation="relu").w_in_EDH.shape == (3, 8, 4)


def test_local_dispatcher_roundtrip_is_weighted_sum():
    torch.manual_seed(0)
    d = LocalDispatcher(5)
    assert d.num_local_experts == 5 and not list(d.parameters())
    x_TD = torch.randn(7, 4, dtype=torch.float64)
    ids_TK = torch.tensor([[0, 3], [4, -1], [3, 3], [-1, -1], [1, 0], [4, 2], [2, -1]])
    w_TK = torch.rand(7, 2, dtype=torch.float64)
    rows, state = d.dispatch(x_TD, SimpleNamespace(ids_TK=ids_TK, weights_TK=w_TK))
    assert rows.gathered and rows.x is x_TD and rows.num_rows == 14  # a view: no copy
    x_ND, offs_E = rows.materialize().x, rows.offs_E
    with pytest.warns(DeprecationWarning, match="routing"):
        legacy = d.dispatch(x_TD, ids_TK, w_TK)  # the old (x_ND, offs_E, state) form
    assert torch.equal(legacy[0], x_ND) and torch.equal(legacy[1], offs_E)
    counts = torch.bincount(ids_TK[ids_TK >= 0], minlength=5)
    assert torch.equal(offs_E, counts.cumsum(0).int())
    expert_of_row = torch.repeat_interleave(torch.arange(5), counts)
    for i, e in enumerate(expert_of_row.tolist()):  # row i holds a token routed to expert e
        assert any(torch.equal(x_ND[i], x_TD[t]) for t in (ids_TK == e).any(1).nonzero().flatten().tolist())
    y = d.combine(x_ND, state)
    ref = (x_TD[:, None, :] * torch.where(ids_TK >= 0, w_TK, 0)[..., None]).sum(1)
    torch.testing.assert_close(y, ref)


# ---- the layer equals the reference, for every router ----------------------------------------

@pytest.mark.parametrize("kind", ["topk", "threshold", "expert_choice"])
def test_layer_matches_reference_for_each_router(kind):
    torch.manual_seed(0)
    layer = MoELayer(8, 6, 5, router=make_router(kind, 8, 5), num_shared_experts=2,
                     shared_ffn_hidden_size=3).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, reference(layer, x, layer.last_routing))
    if kind == "threshold":
        assert (layer.last_routing.ids_TK == -1).any()  # variable k really exercised


def test_recurrent_chain_is_drop_in():
    torch.manual_seed(0)
    chain = routers.RecurrentRouterChain(2, 8, 4, 2, router_dim=6)
    model = Stack([MoELayer(8, 6, 4, router=chain[i]) for i in range(2)], chain).double()
    layers = model.layers
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y = model(x)
    h0 = layers[0].last_routing.state
    explicit = chain[1](layers[0](x), state=h0)
    assert torch.equal(layers[1].last_routing.ids_TK, explicit.ids_TK)
    torch.testing.assert_close(y, reference(layers[1], layers[0](x), layers[1].last_routing))
    y.sum().backward()
    assert chain[0].w1_RD.grad.abs().sum() > 0  # layer 1's output trains layer 0's router


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 13), E=st.integers(1, 6), data=st.data(), D=st.sampled_from([3, 8]),
       Fh=st.sampled_from([2, 5]), activation=st.sampled_from(list(ACTS)), bias=st.booleans(),
       shared=st.integers(0, 2), capacity=st.sampled_from([None, 1.0]))
def test_layer_property_random_shapes(T, E, data, D, Fh, activation, bias, shared, capacity):
    k = data.draw(st.integers(1, E))
    torch.manual_seed(T * 31 + E)
    layer = MoELayer(D, Fh, E, k, num_shared_experts=shared, activation=activation, bias=bias,
                     capacity_factor=capacity, router_kwargs=dict(init_std=1.0)).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, reference(layer, x, layer.last_routing))
    y.square().sum().backward()
    assert x.grad.shape == x.shape


def test_bfloat16_error_within_twice_pytorch():
    """bf16 layer vs float64 truth: error at most 2x that of the same computation in plain bf16."""
    torch.manual_seed(0)
    layer = MoELayer(64, 48, 8, 2).to(torch.bfloat16)
    x = torch.randn(96, 64, dtype=torch.bfloat16)
    y = layer(x).double()
    r = layer.last_routing
    truth = reference(layer.double(), x.double(), r)
    plain = reference(layer.to(torch.bfloat16), x, r).double()
    assert (y - truth).abs().max() <= 2 * (plain - truth).abs().max() + 1e-6


# ---- drop-in behaviour, aux losses ------------------------------------------------------------

def test_shapes_and_router_gets_sequences():
    torch.manual_seed(0)
    seen = []
    layer = MoELayer(8, 4, 4, 2)
    layer.router.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    for shape in [(5, 8), (2, 3, 8), (2, 2, 3, 8), (8,)]:
        assert layer(torch.randn(shape)).shape == shape
    assert seen == [(5, 8), (2, 3, 8), (12, 8), (1, 8)]


def test_aux_loss_train_eval_and_model_sum():
    torch.manual_seed(0)
    model = nn.Sequential(MoELayer(8, 4, 4, 2, router_kwargs=dict(balance_loss="seq", z_loss_coeff=1e-2)),
                          nn.Linear(8, 8), MoELayer(8, 4, 4, 1))
    x = torch.randn(2, 6, 8)
    model(x)
    l0, l2 = model[0].aux_losses, model[2].aux_losses
    assert set(l0) == {"seq_load_balancing", "z_loss"} and set(l2) == {"load_balancing"}
    assert l0 == model[0].last_routing.aux_losses
    total = moe.collect_aux_losses(model)
    torch.testing.assert_close(total, sum(l0.values()) + l2["load_balancing"])
    by_name = moe.collect_aux_losses(model, by_name=True)
    assert set(by_name) == {"seq_load_balancing", "z_loss", "load_balancing"}
    with pytest.warns(DeprecationWarning):
        torch.testing.assert_close(moe.aux_loss(model), total)
    total.backward()
    assert model[0].router.weight.grad.abs().sum() > 0
    model.eval()
    model(x)
    assert model[0].aux_losses == {} and moe.collect_aux_losses(model).item() == 0
    assert moe.collect_aux_losses(nn.Linear(2, 2)).item() == 0


def test_padding_mask_and_capacity_drops():
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 4, 2, num_shared_experts=1, capacity_factor=0.5).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    y = layer(x, padding_mask=mask)
    r = layer.last_routing
    assert (r.ids_TK[10:] == -1).all() and r.dropped_fraction > 0
    torch.testing.assert_close(y, reference(layer, x, r))
    torch.testing.assert_close(y[1, 4:], layer.shared_experts(x[1, 4:]))  # padded: shared only


# ---- fine-grained and shared experts ----------------------------------------------------------

@pytest.mark.parametrize("shared", [0, 1, 2])
def test_fine_grained_preserves_params_and_flops(shared):
    D, Fh, E, k = 16, 64, 4, 2
    base = None
    for G in (1, 2, 4, 8, 16):
        if shared >= k * G:
            continue
        layer = MoELayer.fine_grained(D, Fh, E, k, G, num_shared_experts=shared)
        assert (layer.num_experts, layer.top_k) == (E * G - shared, k * G - shared)
        assert layer.ffn_hidden_size == Fh // G and layer.granularity == G
        sizes = (layer.num_parameters(router=False), layer.active_parameters(router=False),
                 layer.flops_per_token(router=False))
        base = base or (3 * D * Fh * E, 3 * D * Fh * k, 2 * 3 * D * Fh * k)
        assert sizes == base, G
        assert layer.num_parameters() - sizes[0] == D * layer.num_experts  # + the router
        n_real = sum(p.numel() for p in layer.parameters())
        assert n_real == layer.num_parameters()
        assert layer.flops_per_token() == sizes[2] + 2 * D * layer.num_experts


def test_shared_experts_are_one_dense_ffn():
    layer = MoELayer(8, 6, 4, 2, num_shared_experts=3, shared_ffn_hidden_size=5)
    assert layer.shared_experts.w_in.weight.shape == (2 * 15, 8)
    assert layer.active_parameters(router=False) == 2 * 3 * 8 * 6 + 3 * 8 * 15


# ---- torch.compile, gradcheck -----------------------------------------------------------------

def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = MoELayer(16, 12, 4, 2, num_shared_experts=1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    (y.square().sum() + moe.collect_aux_losses(layer)).backward()
    g_x, g_w = x.grad.clone(), layer.experts.w_in_EDH.grad.clone()
    x.grad = None
    layer.zero_grad()
    y_ref = layer(x)
    (y_ref.square().sum() + moe.collect_aux_losses(layer)).backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g_x, x.grad)
    torch.testing.assert_close(g_w, layer.experts.w_in_EDH.grad)


@pytest.mark.parametrize("kind", ["topk", "threshold", "expert_choice", "recurrent"])
def test_gradcheck_float64(kind):
    """Routing is piecewise constant in its inputs; at these seeds no eps=1e-6 step flips it, so
    gradcheck checks x, the router and every expert parameter (biases and shared experts too)."""
    torch.manual_seed(1)
    D, E = 6, 4
    if kind == "recurrent":
        chain = routers.RecurrentRouterChain(2, D, E, 2, router_dim=5, init_std=0.5)
        model = Stack([MoELayer(D, 3, E, router=chain[0], bias=True),
                       MoELayer(D, 3, E, router=chain[1], num_shared_experts=1)], chain)
    else:
        model = MoELayer(D, 3, E, router=make_router(kind, D, E), bias=True, num_shared_experts=1)
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ---- bad input and edge cases -----------------------------------------------------------------

def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 4, 4, 5)
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 4, 4, 0)
    with pytest.raises(ValueError, match="ffn_hidden_size=12 is not divisible by granularity=8"):
        MoELayer.fine_grained(8, 12, 4, 2, 8)
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoELayer.fine_grained(8, 16, 4, 1, 2, num_shared_experts=2)
    with pytest.raises(ValueError, match="router has num_experts=3"):
        MoELayer(8, 4, 4, router=routers.TopKRouter(8, 3, 1))
    with pytest.raises(ValueError, match="capacity_factor"):
        MoELayer(8, 4, 4, router=routers.TopKRouter(8, 4, 1), capacity_factor=1.0)
    with pytest.raises(ValueError, match="activation"):
        MoELayer(8, 4, 4, 2, activation="tanh")

    class Group:  # a stand-in process group of 3 ranks: the check runs before any communication
        def size(self):
            return 3

    with pytest.raises(ValueError, match="num_experts=4 is not divisible by the expert-parallel world size 3"):
        MoELayer(8, 4, 4, 2, ep_group=Group())


def test_bad_inputs_name_themselves():
    layer = MoELayer(8, 4, 4, 2)
    with pytest.raises(ValueError, match=r"x has shape \(3, 7\).*hidden_size=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([1.0] * 8)
    with pytest.raises(TypeError, match="x_ND is torch.float64"):
        layer.experts(ExpertRows(torch.randn(3, 8, dtype=torch.float64), torch.tensor([1, 2, 3, 3], dtype=torch.int32)))
    with pytest.raises(ValueError, match="offs_E"):
        layer.experts(ExpertRows(torch.randn(3, 8), torch.tensor([3], dtype=torch.int32)))
    with pytest.raises(ValueError, match="ids_TK"):
        layer.dispatcher.dispatch(torch.randn(3, 8), SimpleNamespace(ids_TK=torch.zeros(2, 2, dtype=torch.long),
                                                                     weights_TK=torch.ones(2, 2)))
    with pytest.raises(ValueError, match="weights_TK"):
        layer.dispatcher.dispatch(torch.randn(3, 8), SimpleNamespace(ids_TK=torch.zeros(3, 2, dtype=torch.long),
                                                                     weights_TK=torch.ones(3, 1)))
    with pytest.raises(TypeError, match="routing"):
        layer.dispatcher.dispatch(torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_empty_batch(shape):
    layer = MoELayer(8, 4, 4, 2, num_shared_experts=1)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == shape
    (y.sum() + moe.collect_aux_losses(layer)).backward()
    assert x.grad.shape == shape
    assert layer.experts.w_in_EDH.grad is not None and layer.experts.w_in_EDH.grad.abs().sum() == 0


def test_all_tokens_to_one_expert():
    torch.manual_seed(0)
    T, D, E = 9, 6, 4
    ids = torch.full((T, 2), 2)
    ids[:, 1] = -1
    router = FixedRouter(D, E, ids, torch.rand(T, 2, dtype=torch.float64).masked_fill(ids < 0, 0))
    layer = MoELayer(D, 5, E, router=router).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, reference(layer, x, layer.last_routing))
    y.sum().backward()
    g = layer.experts.w_in_EDH.grad
    assert g[2].abs().sum() > 0 and g[[0, 1, 3]].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activations(dtype):
    # moe.experts.activate: swiglu is the op moe.ops.swiglu (kernel or twin; its own tests are in
    # tests/ops/test_swiglu.py), geglu the formula gelu(gate) * up (Shazeer 2020, Eq. 5-6).
    from moe.experts import activate

    torch.manual_seed(0)
    h = torch.randn(37, 2 * 24, dtype=dtype)
    assert torch.equal(activate(h, "swiglu"), ops.swiglu(h))
    gate, up = h.chunk(2, dim=-1)
    assert torch.equal(activate(h, "geglu"), torch.nn.functional.gelu(gate) * up)
    for activation in ("swiglu", "geglu"):
        h64 = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: activate(t, activation), (h64,))


def test_return_aux_loss_gives_the_same_step_and_keeps_nothing_on_the_module():
    """MoELayer(return_aux_loss=True) returns (y, aux_loss) equal to the default layer's y and
    aux losses, keeps no aux_losses (so moe.collect_aux_losses does not count them twice), and release_step drops
    what a forward leaves on the modules."""
    torch.manual_seed(0)
    kept = moe.MoELayer(32, 48, 6, 2)
    returned = moe.MoELayer(32, 48, 6, 2, return_aux_loss=True)
    returned.load_state_dict(kept.state_dict())
    x = torch.randn(2, 10, 32)
    y_kept = kept(x)
    y, aux = returned(x)
    torch.testing.assert_close(y, y_kept, rtol=0, atol=0)
    torch.testing.assert_close(aux, moe.collect_aux_losses(kept), rtol=0, atol=0)
    assert aux.requires_grad and returned.aux_losses == {} and float(moe.collect_aux_losses(returned)) == 0.0
    moe.release_step(kept)
    assert kept.aux_losses == {} and kept.last_routing is None


def test_layer_builds_and_runs_on_the_meta_device():
    """A big model is built on the meta device first (torch.device("meta")): the layer and its
    router run there through the ops' fake kernels, never the twins (which would read data)."""
    with torch.device("meta"):
        layer = MoELayer(16, 32, 4, 2, num_shared_experts=1)
        x = torch.randn(3, 5, 16)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == x.shape
    assert set(layer.aux_losses) == {"load_balancing"}
