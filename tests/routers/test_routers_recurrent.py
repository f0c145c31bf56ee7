"""RecurrentRouter / RecurrentRouterChain (RMoE): parameter count, the shared GRU, recurrent
gradient, explicit vs drop-in state, and activation checkpointing."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from routers import RecurrentRouter, RecurrentRouterChain
from routers.recurrent import gru_step


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
    r = RecurrentRouter(8, E, K, router_dim=6, init_std=1.0, aux_loss_coeff=1.0)
    out = r(torch.randn(40, 8))
    probs = torch.softmax(out.logits_TE, -1)
    one_hot_TKE = torch.nn.functional.one_hot(probs.topk(K, -1).indices, E).float()
    reference = E * (one_hot_TKE.mean(0) * probs.mean(0)[None]).sum()
    torch.testing.assert_close(K * out.aux_losses["load_balancing"], reference)


class TinyMoEModel(nn.Module):
    """Layers that only call ``router(x)`` (the drop-in use) with dense toy experts."""

    def __init__(self, chain, D, E, use_checkpoint=False, explicit=False):
        super().__init__()
        self.router_chain = chain  # registered once: the shared cell lives here
        self.routers = nn.ModuleList(chain[i] for i in range(len(chain)))  # and again per layer
        self.experts = nn.ParameterList(nn.Parameter(torch.randn(E, D, D) * 0.3) for _ in range(len(chain)))
        self.use_checkpoint, self.explicit = use_checkpoint, explicit

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
                x, a, state = checkpoint(self.block, i, x, state if self.explicit else None, use_reentrant=False)
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

    def latest_state(layer_idx, x_TD):
        if layer_idx == 0:
            return x_TD.new_zeros(x_TD.shape[0], 6)
        return chain._states[max(chain._states)]

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    reference = make_model(use_checkpoint=False)
    reference(x).backward()
    chain._input_state = latest_state
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
    assert len(clone.router_chain._states) == 0
    assert clone.routers[1].gru is clone.router_chain.cell
    assert clone.routers[1]._chain is clone.router_chain
    sd = model.state_dict()
    assert "router_chain.layers.0.cell.weight_ih" in sd and "routers.1.w1_RD" in sd
    fresh = make_model()
    fresh.load_state_dict(sd)
    x = torch.randn(4, 8)
    torch.testing.assert_close(fresh(x), model(x))
