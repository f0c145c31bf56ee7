"""RecurrentRouter / RecurrentRouterChain (RMoE): parameter count, the shared GRU, the recurrence
h_i = GRU(W1_i x_i, h_{i-1}), recurrent gradient, explicit vs drop-in state (RecurrentState),
reset between forwards, and activation checkpointing (reentrant or not)."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe import MoELayer
from routers import RecurrentRouter, RecurrentRouterChain
from routers.recurrent import RecurrentState, gru_step


def test_paper_enwik8_parameter_count():
    # enwik8 config: 8 layers, hidden 352, 16 experts, router_dim 128
    chain = RecurrentRouterChain(8, 352, 16, 2, router_dim=128)
    assert sum(p.numel() for p in chain.parameters()) == 475_904
    # and that total is made of the paper's parts, read off the module: per layer W1 (R x D)
    # and W2 (E x R), no biases; one GRU cell (3 gates x (W_i R x R, W_h R x R, b_i, b_h)).
    cell = dict(chain.cell.named_parameters())
    assert {n: tuple(p.shape) for n, p in cell.items()} == {
        "weight_ih": (384, 128), "weight_hh": (384, 128), "bias_ih": (384,), "bias_hh": (384,)}
    for layer in chain:
        own = {n: tuple(p.shape) for n, p in layer.named_parameters() if not n.startswith("cell.")}
        assert own == {"w1_RD": (128, 352), "w2_ER": (16, 128)}
    per_layer = sum(p.numel() for n, p in chain[1].named_parameters())
    assert per_layer == 128 * 352 + 16 * 128 == 47_104
    assert sum(p.numel() for p in cell.values()) == 99_072
    assert 8 * per_layer + 99_072 == 475_904


def test_balancing_loss_vs_the_reference_mixtral_loss():
    """The RMoE code adds Mixtral's loss (f_i = count_i / T, slots of all K summed); per layer
    that is exactly K times our Switch loss (f_i = count_i / (K*T))."""
    torch.manual_seed(0)
    K, E = 2, 5
    r = RecurrentRouter(8, E, K, router_dim=6, init_std=1.0, balance_loss_coeff=1.0)
    out = r(torch.randn(40, 8))
    probs = torch.softmax(out.logits_TE, -1)
    one_hot_TKE = torch.nn.functional.one_hot(probs.topk(K, -1).indices, E).float()
    reference = E * (one_hot_TKE.mean(0) * probs.mean(0)[None]).sum()
    torch.testing.assert_close(K * out.aux_losses["load_balancing"], reference)


class TinyMoEModel(nn.Module):
    """Layers that only call ``router(x)`` (the drop-in use) with dense toy experts."""

    def __init__(self, chain, D, E, use_checkpoint=False, explicit=False, reentrant=False):
        super().__init__()
        self.router_chain = chain  # registered once: the shared cell lives here
        self.routers = nn.ModuleList(chain[i] for i in range(len(chain)))  # and again per layer
        self.experts = nn.ParameterList(nn.Parameter(torch.randn(E, D, D) * 0.3) for _ in range(len(chain)))
        self.use_checkpoint, self.explicit, self.reentrant = use_checkpoint, explicit, reentrant

    def block(self, i, x, state=None):
        r = self.routers[i](x, state=state) if self.explicit else self.routers[i](x)
        y_TED = torch.einsum("td,edf->tef", x, self.experts[i])
        picked = y_TED.gather(1, r.ids_TK.clamp(min=0)[..., None].expand(-1, -1, x.shape[1]))
        y = x + (picked * r.weights_TK[..., None]).sum(1)
        return y, sum(r.aux_losses.values()), r.state

    def forward(self, x):
        x = x.reshape(-1, x.shape[-1])
        aux, state = 0.0, None
        for i in range(len(self.routers)):
            if self.use_checkpoint:
                x, a, state = checkpoint(self.block, i, x, state if self.explicit else None,
                                         use_reentrant=self.reentrant)
            else:
                x, a, state = self.block(i, x, state if self.explicit else None)
            aux = aux + a
        return (x ** 2).mean() + aux


def make_model(**kw):
    torch.manual_seed(0)
    chain = RecurrentRouterChain(3, 8, 4, 2, router_dim=6, init_std=1.0, z_loss_coeff=1e-2)
    return TinyMoEModel(chain, 8, 4, **kw)


def test_shared_cell_counted_once():
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    assert sum("weight_ih" in n for n in names) == 1
    assert len({id(p) for p in model.parameters()}) == len(names)
    per_layer = sum(p.numel() for p in model.routers[1].parameters())
    assert per_layer == 6 * 8 + 4 * 6  # W1 and W2 only: layers 1.. do not own the cell
    assert model.routers[1].gru is model.router_chain.cell
    assert "cell" not in dict(model.routers[1].named_children())
    assert model.routers[0].gru is model.router_chain.cell  # layer 0 owns it


def test_shared_cell_seen_once_when_only_layers_are_registered():
    # Drop-in use (HF/Megatron): each MoE block registers its own chain[i] and nobody registers
    # the chain itself; the shared GRU must still be trained, and counted once.
    chain = RecurrentRouterChain(3, 8, 4, 2, router_dim=6)
    blocks = nn.ModuleList(nn.ModuleDict({"router": chain[i]}) for i in range(3))
    names = [n for n, _ in blocks.named_parameters()]
    assert sum("weight_ih" in n for n in names) == 1
    total = sum(p.numel() for p in blocks.parameters())
    assert total == sum(p.numel() for p in chain.parameters())
    x = torch.randn(5, 8)
    loss = sum(blocks[i]["router"](x).weights_TK.sum() for i in range(3))
    loss.backward()
    assert chain.cell.weight_hh.grad is not None and chain.cell.weight_hh.grad.abs().sum() > 0


def test_gru_step_is_torch_grucell():
    cell = nn.GRUCell(5, 5)
    x, h = torch.randn(7, 5), torch.randn(7, 5)
    torch.testing.assert_close(gru_step(cell, x, h), cell(x, h))
    cell64 = copy.deepcopy(cell).double()
    assert torch.autograd.gradcheck(lambda a, b: gru_step(cell64, a, b), (x.double().requires_grad_(), h.double().requires_grad_()))


def test_router_matches_the_equations():
    torch.manual_seed(0)
    chain = RecurrentRouterChain(2, 8, 5, 2, router_dim=4, init_std=1.0)
    x0, x1 = torch.randn(6, 8), torch.randn(6, 8)
    r0 = chain[0](x0)
    r1 = chain[1](x1)
    h0 = chain.cell(x0 @ chain[0].w1_RD.T, torch.zeros(6, 4))
    h1 = chain.cell(x1 @ chain[1].w1_RD.T, h0)
    torch.testing.assert_close(r0.state, h0)
    torch.testing.assert_close(r1.state, h1)
    probs = torch.softmax(h1 @ chain[1].w2_ER.T, -1)
    top = probs.topk(2, -1)
    torch.testing.assert_close(r1.probs_TE, probs)
    assert torch.equal(r1.ids_TK, top.indices)
    torch.testing.assert_close(r1.weights_TK, top.values / top.values.sum(-1, keepdim=True))


def test_explicit_and_drop_in_agree_and_layer0_restarts():
    torch.manual_seed(0)
    chain = RecurrentRouterChain(3, 8, 4, 2, router_dim=6, init_std=1.0)
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    state, explicit = None, []
    for i in range(3):
        explicit.append(chain[i](xs[i], state=state))
        state = explicit[-1].state
    for _ in range(2):  # a second forward restarts at layer 0: same results
        for i in range(3):
            r = chain[i](xs[i])
            torch.testing.assert_close(r.state, explicit[i].state)
            assert torch.equal(r.ids_TK, explicit[i].ids_TK)
    assert explicit[0].state.shape == (10, 6)
    # a state shaped like x[..., :R] is accepted too
    r = chain[1](xs[1], state=explicit[0].state.reshape(2, 5, 6))
    torch.testing.assert_close(r.state, explicit[1].state)


def test_recurrent_gradient_reaches_layer0_projection():
    torch.manual_seed(0)
    chain = RecurrentRouterChain(3, 8, 4, 2, router_dim=6, init_std=1.0)
    for i in range(3):
        r = chain[i](torch.randn(10, 8))
    (r.weights_TK * torch.randn_like(r.weights_TK)).sum().backward()  # layer 2's weights only
    assert chain[0].w1_RD.grad is not None and chain[0].w1_RD.grad.abs().sum() > 0
    assert chain[1].w1_RD.grad.abs().sum() > 0
    assert chain[0].w2_ER.grad is None  # layer 0's logits do not feed layer 2


def test_checkpointing_gives_same_loss_and_gradients():
    grads = {}
    for use_ckpt in (False, True):
        model = make_model(use_checkpoint=use_ckpt)
        loss = model(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)))
        loss.backward()
        grads[use_ckpt] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[True][0], grads[False][0])
    assert grads[True][1].keys() == grads[False][1].keys()
    assert any(".cell." in n for n in grads[False][1])  # the shared GRU got a gradient
    for n, g in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][n], g, msg=n)


def test_checkpointing_test_detects_a_single_latest_state():
    """Negative control: a chain that hands every layer the most recently produced state
    (instead of layer i-1's) is wrong under recomputation, and the comparison above sees it."""
    model = make_model(use_checkpoint=True)
    chain = model.router_chain

    def latest_state(layer_idx, x_TD, R):
        if layer_idx == 0:
            return x_TD.new_zeros(x_TD.shape[0], R)
        return chain.states[max(i for i in range(len(chain)) if i in chain.states)]

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    reference = make_model(use_checkpoint=False)
    reference(x).backward()
    chain.states.read = latest_state
    try:
        model(x).backward()
    except RuntimeError:
        return  # recomputation noticed the mismatch: also a detection
    diffs = [
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), reference.parameters())
        if p.grad is not None and q.grad is not None
    ]
    assert max(diffs) > 1e-6


def test_explicit_state_with_checkpointing():
    grads = {}
    for use_ckpt in (False, True):
        model = make_model(use_checkpoint=use_ckpt, explicit=True)
        model(torch.randn(10, 8, generator=torch.Generator().manual_seed(2))).backward()
        grads[use_ckpt] = [p.grad for p in model.parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b)


def test_out_of_order_or_stale_state_is_an_error():
    chain = RecurrentRouterChain(3, 8, 4, 2, router_dim=6)
    with pytest.raises(RuntimeError, match="layer 1 has not run"):
        chain[2](torch.randn(4, 8))
    chain[0](torch.randn(4, 8))
    chain[1](torch.randn(4, 8))
    chain[0](torch.randn(3, 8))  # a new forward with another batch size, layer 1 skipped
    with pytest.raises(RuntimeError, match="did not run in this forward"):
        chain[2](torch.randn(3, 8))
    chain.reset()
    with pytest.raises(RuntimeError, match="has not run"):
        chain[1](torch.randn(3, 8))


def test_bad_state_names_the_argument():
    r = RecurrentRouter(8, 4, 2, router_dim=6)
    with pytest.raises(ValueError, match="state"):
        r(torch.randn(4, 8), state=torch.zeros(4, 5))
    with pytest.raises(TypeError, match="state"):
        r(torch.randn(4, 8), state=[0.0])
    with pytest.raises(ValueError, match="cell"):
        RecurrentRouter(8, 4, 2, router_dim=6, cell=nn.GRUCell(5, 5))


def test_standalone_router_owns_its_cell_and_initialises_explicitly():
    torch.manual_seed(0)
    r = RecurrentRouter(8, 4, 2, router_dim=6)
    assert "cell.weight_ih" in dict(r.named_parameters())
    assert torch.isfinite(r.w1_RD).all() and r.w1_RD.std() > 0
    bound = 6 ** -0.5
    assert r.cell.weight_hh.abs().max() <= bound
    x = torch.randn(5, 8)
    torch.testing.assert_close(r(x).state, r.cell(x @ r.w1_RD.T, torch.zeros(5, 6)))


def test_deepcopy_and_state_dict():
    model = make_model()
    model(torch.randn(4, 8))
    clone = copy.deepcopy(model)  # stored states are activations: not copied
    assert len(clone.router_chain.states) == 0
    assert clone.routers[1].gru is clone.router_chain.cell
    assert clone.routers[1].states is clone.router_chain.states is clone.routers[0].states
    sd = model.state_dict()
    assert "router_chain.layers.0.cell.weight_ih" in sd and "routers.1.w1_RD" in sd
    fresh = make_model()
    fresh.load_state_dict(sd)
    x = torch.randn(4, 8)
    torch.testing.assert_close(fresh(x), model(x))


# ---- the recurrence, explicit state, RecurrentState ---------------------------------------------

def test_state_is_the_gru_of_the_projection_and_the_previous_state():
    """The method (Eq. 4-6): h_i = GRU(W1_i x_i, h_{i-1}), h_0 = 0, one cell for every layer,
    logits_i = W2_i h_i. The explicit loop, the drop-in chain and this recursion agree."""
    torch.manual_seed(0)
    L, T, D, E, R = 4, 7, 8, 5, 6
    chain = RecurrentRouterChain(L, D, E, 2, router_dim=R, init_std=1.0)
    xs = [torch.randn(T, D) for _ in range(L)]
    h, expected = torch.zeros(T, R), []
    for i in range(L):
        h = chain.cell(xs[i] @ chain[i].w1_RD.T, h)
        expected.append(h)
    state = torch.zeros(T, R)
    for i in range(L):
        explicit = chain[i](xs[i], state=state)
        drop_in = chain[i](xs[i])
        torch.testing.assert_close(explicit.state, expected[i])
        torch.testing.assert_close(drop_in.state, expected[i])
        torch.testing.assert_close(explicit.logits_TE, expected[i] @ chain[i].w2_ER.T)
        assert torch.equal(explicit.ids_TK, drop_in.ids_TK)
        state = explicit.state


def test_explicit_state_leaves_the_chain_alone():
    chain = RecurrentRouterChain(3, 8, 4, 2, router_dim=6)
    chain[1](torch.randn(5, 8), state=torch.zeros(5, 6))
    assert len(chain.states) == 0 and isinstance(chain.states, RecurrentState)
    assert all(layer.states is chain.states for layer in chain)
    assert RecurrentRouter(8, 4, 2, router_dim=6).states is None  # standalone: zeros, nothing stored


def test_moelayer_loop_with_explicit_state_equals_the_chain():
    """Users who run the layers themselves hand on ``layer.last_routing.state``."""
    torch.manual_seed(0)
    L, D, E = 3, 8, 4
    chain = RecurrentRouterChain(L, D, E, 2, router_dim=6, init_std=1.0)
    layers = nn.ModuleList(MoELayer(D, 6, E, router=chain[i]) for i in range(L)).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y, prev = x, None
    for layer in layers:
        y = layer(y, state=None if prev is None else prev.last_routing.state)
        prev = layer
    explicit = [layer.last_routing for layer in layers]
    chain.reset()
    z = x
    for layer in layers:  # drop-in: the chain hands the state on
        z = layer(z)
    torch.testing.assert_close(z, y)
    for layer, r in zip(layers, explicit):
        torch.testing.assert_close(layer.last_routing.state, r.state)
        assert torch.equal(layer.last_routing.ids_TK, r.ids_TK)


class TwoLayers(nn.Module):
    def __init__(self, chain, explicit):
        super().__init__()
        self.chain, self.explicit = chain, explicit

    def forward(self, x0, x1):
        self.chain.reset()
        r0 = self.chain[0](x0)
        r1 = self.chain[1](x1, state=r0.state) if self.explicit else self.chain[1](x1)
        return r1.state, r1.probs_TE


@pytest.mark.parametrize("explicit", [False, True])
def test_gradient_through_the_state_gradcheck(explicit):
    """float64 gradcheck of layer 1's state and probabilities w.r.t. both layers' inputs and every
    parameter (W1, W2 per layer, the shared cell): layer 1's gradient reaches x_0 and W1_0
    through h_0 (the paper's recurrent gradient)."""
    torch.manual_seed(0)
    model = TwoLayers(RecurrentRouterChain(2, 5, 3, 2, router_dim=4, init_std=0.5), explicit).double()
    names = [n for n, _ in model.named_parameters()]
    assert sum(".cell." in n for n in names) == 4
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(x0, x1, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x0, x1))

    assert torch.autograd.gradcheck(f, (x0, x1, *params))
    h1, _ = f(x0, x1, *params)
    g_x0, g_w1 = torch.autograd.grad(h1.sum(), (x0, params[names.index("chain.layers.0.w1_RD")]))
    assert g_x0.abs().sum() > 0 and g_w1.abs().sum() > 0


def test_state_is_reset_between_model_forwards():
    model = make_model().eval()
    chain = model.router_chain
    handle = chain.reset_on_forward(model)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(len(chain.states)))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        a = model(x)
        assert len(chain.states) == 3
        b = model(x)
    assert seen == [0, 0]  # the reset hook ran first, each time
    assert torch.equal(a, b)
    handle.remove()
    with torch.no_grad():
        model(torch.randn(3, 8))  # without reset, layer 0 still restarts from zeros
        assert torch.equal(model(x), a)


def test_copies_keep_one_state_per_chain():
    model = make_model()
    model.router_chain.reset_on_forward(model)
    x = torch.randn(4, 8)
    model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        chain = clone.router_chain
        assert len(chain.states) == 0 and chain.states is not model.router_chain.states
        assert all(r.states is chain.states for r in clone.routers)
        clone(x)  # its hook resets its own state, not the original's
        assert len(chain.states) == 3 and len(model.router_chain.states) == 3
        torch.testing.assert_close(clone(x), model(x))


@pytest.mark.parametrize("explicit", [False, True])
def test_reentrant_checkpointing_gives_same_gradients(explicit):
    """checkpoint(use_reentrant=True) runs the forward without grad, so the stored states have no
    history; the recurrent gradient still reaches the lower layers (RecurrentState hands layer
    i's gradient to layer i-1's recompute)."""
    grads = {}
    for use_ckpt in (False, True):
        model = make_model(use_checkpoint=use_ckpt, explicit=explicit, reentrant=True)
        x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
        loss = model(x)
        loss.backward()
        grads[use_ckpt] = (loss.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[True][0], grads[False][0])
    torch.testing.assert_close(grads[True][1], grads[False][1])
    for n, g in grads[False][2].items():
        torch.testing.assert_close(grads[True][2][n], g, msg=n)
    assert grads[True][2]["router_chain.layers.0.w1_RD"].abs().sum() > 0


@pytest.mark.parametrize("T_next", [5, 3])
def test_a_forward_that_skips_layer_0_is_an_error_whatever_T(T_next):
    """Issue 18 item 8: after a full forward, layer i > 0 called in a new forward without layer 0
    used to route from the previous forward's h_{i-1} when T was unchanged. A forward starts at
    layer 0 and runs each layer once: both ways of skipping raise, with T equal or not."""
    torch.manual_seed(0)
    chain = RecurrentRouterChain(3, 8, 4, 2, router_dim=6, init_std=1.0)
    for i in range(3):
        chain[i](torch.randn(5, 8))
    x = torch.randn(T_next, 8)
    with pytest.raises(RuntimeError, match="layer 1 already ran since layer 0 last ran"):
        chain[1](x)  # a new forward that skipped layer 0
    with pytest.raises(RuntimeError, match="layer 2 already ran since layer 0 last ran"):
        chain[2](x)
    chain[0](x)
    with pytest.raises(RuntimeError, match="layer 1 did not run in this forward"):
        chain[2](x)  # layer 1 skipped: its state is the previous forward's
    # the states are untouched by the refused calls: a forward in order gives the recursion
    xs = [torch.randn(T_next, 8) for _ in range(3)]
    h = torch.zeros(T_next, 6)
    for i in range(3):
        h = chain.cell(xs[i] @ chain[i].w1_RD.T, h)
        torch.testing.assert_close(chain[i](xs[i]).state, h)


def test_a_layer_called_twice_in_one_forward_is_an_error():
    chain = RecurrentRouterChain(2, 8, 4, 2, router_dim=6)
    x = torch.randn(4, 8)
    chain[0](x)
    chain[1](x)
    with pytest.raises(RuntimeError, match="layer 1 already ran"):
        chain[1](x)
    chain[0](x)  # layer 0 again: a new forward
    chain[1](x)
    chain[1](x, state=torch.zeros(4, 6))  # explicit state: no chain bookkeeping, allowed


def test_recomputation_in_backward_is_not_a_new_forward():
    """Recomputed layers (called inside backward) re-run layers 0..L-1 of the forward they
    recompute without counting as a new forward: a forward after that backward starts cleanly,
    and a layer skipped after it is still refused."""
    model = make_model(use_checkpoint=True)
    chain = model.router_chain
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    model(x).backward()  # recomputes layers 2, 1, 0 in backward
    model(x).backward()
    with pytest.raises(RuntimeError, match="layer 1 already ran"):
        chain[1](x.reshape(-1, 8))
