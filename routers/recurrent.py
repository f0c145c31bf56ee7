"""Layerwise recurrent router (RMoE: Qiu et al., "Layerwise Recurrent Router for
Mixture-of-Experts", ICLR 2025, Sec. 3, and the authors' code, llama_moe_rnn/).

Shape legend: T tokens, D hidden size, E experts, K top-k slots, R router_dim (GRU size).

Equations (numbered Eq. 4-6 in the ICLR 2025 / arXiv v2 text, cited as Eq. 3-4 in issue 3):
  projection  x'_i = W1_i x_i                (W1_i: R x D, no bias, one per layer)
  recurrence  h_i  = GRU(x'_i, h_{i-1})      (ONE cell shared by all layers, h_0 = 0)
  router      logits_i = W2_i h_i            (W2_i: E x R, no bias), softmax, top-k,
              top-k weights renormalised to sum to 1.
x_i is the input of layer i's MoE block: in the reference, the hidden state AFTER the
post-attention RMSNorm (the tensor the experts see), so a router called as ``mlp(x)`` gets
the right input. h_i is both the router output and the next layer's state, and it is NOT
detached: the loss of layer i trains the projections of the layers below it (the paper's
"recurrent gradient"). The GRU is torch.nn.GRUCell's (gates r, z, n; two biases per gate),
which is what the reference's CustomGRUCell computes.

Initialisation: W1, W2 ~ N(0, init_std) (the reference's HF port leaves them as torch.empty).
The GRU cell: gru_init="torch" (default) is torch's U(-1/sqrt(R), 1/sqrt(R)) for weights and
biases; gru_init="reference" is the reference's CustomGRUCell.init_weights, which applies the
config's init_method (Megatron's N(0, init_method_std), init_std here) to every weight AND bias.

Balancing loss (a deliberate departure): the reference adds Mixtral's loss ONCE per model,
coefficient 1e-3, over the logits of all L layers concatenated (f_i = count_i / (L*T) with the
top-k slots summed, P_i the mean probability over the L*T rows). A per-layer router cannot see
the other layers, so each layer returns its own Switch loss (Megatron's normalisation
f_i = count_i / (K*T), see routers.losses), and the model sums the L of them. When the layers'
f and P agree, the reference's one loss equals K * (the mean of our per-layer losses), so
its pressure is reproduced by balance_loss_coeff = K * 1e-3 / L per layer (the L per-layer
losses are summed; with unequal layers the two differ by the layers' f-P covariance).

State passing: ``RecurrentRouter(x, state=h_prev)`` -> Routing with ``.state`` = h_new is the
primitive (MoELayer forwards ``state=`` and keeps ``last_routing``). RecurrentRouterChain adds
one convenience for models whose layers call ``mlp(x)`` only: a RecurrentState object, shared by
its routers, that carries h_i to layer i+1 within a forward (the Megatron adapter uses it too).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routers.checks import check_int, check_number
from routers.losses import balance_loss_args
from routers.routing import Routing
from routers.topk import TopKBase

GRU_INITS = ("torch", "reference")


def gru_step(cell: nn.GRUCell, x_TR: Tensor, h_TR: Tensor) -> Tensor:
    """torch.nn.GRUCell's update (gates r, z, n; two biases per gate) in x_TR's dtype whatever
    the dtype of the cell's parameters."""
    f32 = x_TR.dtype
    b_ih = None if cell.bias_ih is None else cell.bias_ih.to(f32)
    b_hh = None if cell.bias_hh is None else cell.bias_hh.to(f32)
    gi_r, gi_z, gi_n = F.linear(x_TR, cell.weight_ih.to(f32), b_ih).chunk(3, dim=-1)
    gh_r, gh_z, gh_n = F.linear(h_TR, cell.weight_hh.to(f32), b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    return (1.0 - z) * n + z * h_TR


class RecurrentRouter(TopKBase):
    """One layer of the RMoE router: ``forward(x, state=h_{i-1})`` returns Routing with
    ``.state`` = h_i (Eq. 4-6); pass it to the next layer.

    ``cell=None`` makes a standalone router that owns its GRU cell. Inside a
    RecurrentRouterChain the chain owns the shared cell and this router only holds a reference
    to it (not registered as a submodule, so model.parameters() sees the cell once), its index
    ``layer_idx`` and the chain's :class:`RecurrentState` ``states`` (None when standalone).
    Other keywords (capacity_factor, balance_loss, ...) are TopKRouter's; the paper's routing is
    softmax top-k with renormalised weights (norm_topk=True).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        router_dim: int = 128,
        cell: Optional[nn.GRUCell] = None,
        init_std: float = 0.02,
        gru_init: str = "torch",
        norm_topk: bool = True,
        jitter: float = 0.0,
        capacity_factor: Optional[float] = None,
        drop_policy: str = "probs",
        balance_loss: Optional[str] = "switch",
        balance_loss_coeff: float = 1e-2,
        z_loss_coeff: float = 0.0,
        check_finite: bool = True,
        **deprecated,
    ) -> None:
        super().__init__()
        balance_loss, balance_loss_coeff = balance_loss_args("RecurrentRouter", balance_loss, balance_loss_coeff, deprecated)
        self._init_topk(
            hidden_size, num_experts, top_k, score="softmax", norm_topk=norm_topk,
            routed_scaling_factor=1.0, num_groups=None, topk_groups=None, expert_bias=False,
            jitter=jitter, capacity_factor=capacity_factor, drop_policy=drop_policy,
            balance_loss=balance_loss, balance_loss_coeff=balance_loss_coeff, z_loss_coeff=z_loss_coeff,
            check_finite=check_finite,
        )
        self.router_dim = router_dim = check_int("router_dim", router_dim)
        self.init_std = check_number("init_std", init_std, ge=0.0)
        if gru_init not in GRU_INITS:
            raise ValueError(f"gru_init={gru_init!r} must be one of {GRU_INITS}")
        self.gru_init = gru_init
        self.w1_RD = nn.Parameter(torch.empty(router_dim, self.hidden_size))
        self.w2_ER = nn.Parameter(torch.empty(self.num_experts, router_dim))
        if cell is None:
            self.cell = nn.GRUCell(router_dim, router_dim)
        else:
            if not isinstance(cell, nn.GRUCell) or cell.input_size != router_dim or cell.hidden_size != router_dim:
                raise ValueError(f"cell must be an nn.GRUCell({router_dim}, {router_dim}), got {cell!r}")
            object.__setattr__(self, "_shared_cell", cell)  # a reference, not a submodule
        self.states: Optional[RecurrentState] = None  # set by RecurrentRouterChain
        self.layer_idx = 0
        self.reset_parameters()

    @property
    def gru(self) -> nn.GRUCell:
        shared = self.__dict__.get("_shared_cell")
        return shared if shared is not None else self._modules["cell"]

    def reset_parameters(self) -> None:
        """N(0, init_std) for W1, W2; an owned GRU cell as gru_init says (module docstring)."""
        nn.init.normal_(self.w1_RD, std=self.init_std)
        nn.init.normal_(self.w2_ER, std=self.init_std)
        if "cell" in self._modules:
            _reset_gru(self.cell, self.gru_init, self.init_std)

    def forward(self, x: Tensor, *, state: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None) -> Routing:
        """x (T, D) or (B, S, D); state h_{i-1} of shape (T, R) or x.shape[:-1] + (R,).
        Returns Routing with .state = h_i, float32 (T, R).

        With ``state`` (the primitive): routes from that state and nothing else, no side effect.
        Without it: zeros (h_0) for a standalone router; in a chain, h_{i-1} read from
        ``self.states`` and h_i written back to it (the drop-in use, see RecurrentState).
        """
        x_TD, valid_T, seq_shape = self._prepare(x, padding_mask, self.w1_RD.device)
        T = x_TD.shape[0]
        chained = state is None and self.states is not None
        if chained:
            state = self.states.read(self.layer_idx, x_TD, self.router_dim)
        elif state is None:
            state = x_TD.new_zeros(T, self.router_dim)
        h_prev = self._check_state(state, x, T).to(x_TD.dtype)
        h_TR = gru_step(self.gru, F.linear(x_TD, self.w1_RD.to(x_TD.dtype)), h_prev)
        if chained:
            h_TR = self.states.write(self.layer_idx, h_TR)
        logits_TE = F.linear(h_TR, self.w2_ER.to(x_TD.dtype))
        return self._route(logits_TE, valid_T, seq_shape, state=h_TR)

    def _check_state(self, state, x: Tensor, T: int) -> Tensor:
        if not isinstance(state, Tensor):
            raise TypeError(f"state must be a tensor or None, got {type(state).__name__}")
        allowed = ((T, self.router_dim), tuple(x.shape[:-1]) + (self.router_dim,))
        if tuple(state.shape) not in allowed:
            raise ValueError(f"state has shape {tuple(state.shape)}, expected {allowed[0]} (T, router_dim)")
        if state.device != x.device or not state.is_floating_point():
            raise ValueError(f"state must be a floating tensor on {x.device}, got {state.dtype} on {state.device}")
        return state.reshape(T, self.router_dim)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"router_dim={self.router_dim}, layer_idx={self.layer_idx}")


def _reset_gru(cell: nn.GRUCell, gru_init: str = "torch", std: float = 0.02) -> None:
    """torch's U(-1/sqrt(R), 1/sqrt(R)), or the reference's N(0, std) for every weight and bias."""
    bound = 1.0 / math.sqrt(cell.hidden_size)
    for p in cell.parameters():
        if gru_init == "reference":
            nn.init.normal_(p, std=std)
        else:
            nn.init.uniform_(p, -bound, bound)


class _AddGrad(torch.autograd.Function):
    """Identity on h_TR; its backward adds g_TR, a gradient of h_TR computed earlier, to h_TR's."""

    @staticmethod
    def forward(ctx, h_TR: Tensor, g_TR: Tensor) -> Tensor:
        ctx.save_for_backward(g_TR)
        return h_TR.view_as(h_TR)

    @staticmethod
    def backward(ctx, grad_TR: Tensor):
        (g_TR,) = ctx.saved_tensors
        return grad_TR + g_TR, None


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread: a layer called then is
    a recomputation (activation checkpointing, reentrant or not), not a new forward."""
    return torch._C._current_graph_task_id() != -1


class RecurrentState:
    """The states a RecurrentRouterChain hands from layer to layer when its layers are called
    without ``state=`` (drop-in use): h_i by layer index, for the current model forward. One
    object per chain, ``chain.states``; each router of the chain holds it as ``router.states``.

    ``read(i)`` is h_{i-1} for layer i (zeros at layer 0: h_0 = 0, every forward restarts the
    recurrence); ``write(i, h)`` stores h_i. Layer i reads layer i-1's entry, not the latest one,
    so a layer recomputed during backward (activation checkpointing) reads the same input state
    as in its forward: recomputation runs top-down, layer i before layer i-1.

    What a forward is: layer 0, called outside a backward pass, starts one; every layer i > 0
    then runs at most once, after layer i-1, in that forward. So a layer i > 0 whose layer i-1
    has not run since layer 0 last ran, or that already ran since then (a new forward that
    skipped layer 0), raises RuntimeError instead of routing from the previous forward's state,
    whatever the token count. Calls inside a backward pass are recomputations (activation
    checkpointing): they read the states of the forward they recompute and start nothing.

    Recompute whose forward ran without grad (``checkpoint(use_reentrant=True)``, Megatron's
    recompute): the stored h_{i-1} has no autograd history, so recomputed layer i routes from a
    leaf copy of it kept here; layer i's backward fills the leaf's gradient, and the next
    ``write(i-1, h)`` with grad enabled (layer i-1's recompute) adds that gradient to its new h
    (``_AddGrad``): the recurrent gradient reaches the layers below as without recompute. A
    recompute with grad (``use_reentrant=False``) just reads the stored tensors.

    ``reset()`` drops the states and pending gradients: call it at the start of each model
    forward, e.g. through ``reset_on_forward(model)`` (a forward pre-hook). Without it in-order
    forwards still work (layer 0 starts from zeros, each layer overwrites its entry) but the
    last forward's states stay alive until overwritten. Never reset between a forward and the
    backward that recomputes it. One forward at a time: interleaved forwards (e.g. pipeline
    micro-batches) overwrite states a recompute needs; pass ``state=`` explicitly there. The
    states are activations, not model state: a copy or pickle starts empty.
    """

    def __init__(self) -> None:
        self._h: dict = {}  # layer i -> h_i (T, R) written in this forward
        self._leaves: dict = {}  # layer i -> the leaf recomputed layer i routed from
        self._forward = 0  # forwards started (layer 0 called outside a backward pass)
        self._written_in: dict = {}  # layer i -> the forward that wrote h_i

    def __len__(self) -> int:
        return len(self._h)

    def __contains__(self, i: int) -> bool:
        return i in self._h

    def __getitem__(self, i: int) -> Tensor:
        """h_i, the state layer i wrote in this forward."""
        return self._h[i]

    def reset(self) -> None:
        """Forget the stored states and pending gradients (frees their autograd graph)."""
        self._h.clear()
        self._leaves.clear()
        self._written_in.clear()

    def reset_on_forward(self, model: nn.Module):
        """Calls reset() at the start of every forward of ``model`` (a forward pre-hook, which
        recomputation does not run); returns the hook's handle (``handle.remove()``)."""
        return model.register_forward_pre_hook(self._reset_hook)

    def _reset_hook(self, module: nn.Module, args) -> None:
        self.reset()

    def read(self, i: int, x_TD: Tensor, R: int) -> Tensor:
        """h_{i-1} (T, R) for layer i, whose input is x_TD."""
        T, recompute = x_TD.shape[0], _in_backward()
        if i == 0:
            self._forward += 0 if recompute else 1
            return x_TD.new_zeros(T, R)
        prev = self._h.get(i - 1)
        if prev is None:
            raise RuntimeError(
                f"RecurrentRouterChain: layer {i} was called without state= but layer {i - 1} has not "
                f"run yet; call the layers in order or pass state="
            )
        if not recompute and self._written_in.get(i) == self._forward:
            raise RuntimeError(
                f"RecurrentRouterChain: layer {i} already ran since layer 0 last ran: a new forward must "
                f"start at layer 0 (h_0 = 0), or pass state= explicitly"
            )
        if not recompute and self._written_in[i - 1] != self._forward:
            raise RuntimeError(
                f"RecurrentRouterChain: layer {i - 1} did not run in this forward (its stored state is "
                f"from an earlier one); call the layers in order from layer 0 or pass state="
            )
        if prev.shape[0] != T:
            raise RuntimeError(
                f"RecurrentRouterChain: layer {i - 1} routed {prev.shape[0]} tokens in this forward but "
                f"layer {i}'s x has {T}"
            )
        if torch.is_grad_enabled() and not prev.requires_grad:  # recompute after a no-grad forward
            prev = prev.detach().requires_grad_()
            self._leaves[i] = prev
        return prev

    def write(self, i: int, h_TR: Tensor) -> Tensor:
        """Stores h_i; returns it, carrying the gradient layer i+1's recompute left for it."""
        leaf = self._leaves.pop(i + 1, None) if torch.is_grad_enabled() else None
        g_TR = None if leaf is None else leaf.grad
        if g_TR is not None and h_TR.requires_grad and g_TR.shape == h_TR.shape:
            h_TR = _AddGrad.apply(h_TR, g_TR)
        # Without grad, keep a separate tensor: the returned one may become the output of a
        # reentrant checkpoint (and get its grad_fn) if the caller returns it.
        self._h[i] = h_TR if torch.is_grad_enabled() else h_TR.detach()
        self._written_in[i] = self._forward
        return h_TR

    def __deepcopy__(self, memo) -> "RecurrentState":
        return RecurrentState()

    def __reduce__(self):
        return (RecurrentState, ())

    def __repr__(self) -> str:
        return f"RecurrentState(layers={sorted(self._h)}, pending_gradients={sorted(self._leaves)})"


class RecurrentRouterChain(nn.Module):
    """The RMoE router of a whole model: one shared GRU cell (``cell``) and a RecurrentRouter per
    layer (``layers``, ``chain[i]``).

    Explicit use (the primitive): ``r = chain[i](x, state=h)`` with h the previous layer's
    ``r.state`` (None at layer 0); through MoELayers, ``layer(x, state=prev.last_routing.state)``.
    Drop-in use, for models whose layers only call ``mlp(x)``: ``chain[i](x)`` reads h_{i-1} from
    and writes h_i to ``chain.states``, the chain's one :class:`RecurrentState` (its docstring
    has the rules: layer 0 starts from zeros and starts a forward, in which each later layer runs
    once, in order, or raises; ``chain.reset()`` or ``chain.reset_on_forward(model)`` at the start
    of each model forward frees the last one's states; a recomputed layer reads the same input state as in its
    forward, and the recurrent gradient crosses recomputed layers, reentrant or not).
    The shared cell is a submodule of layer 0's router, so a model that registers only the
    per-layer routers (each in its MoE block) still sees it, once; registering the chain too
    is harmless (parameters() de-duplicates it, state_dict lists it like tied weights).
    """

    def __init__(self, num_layers: int, hidden_size: int, num_experts: int, top_k: int,
                 router_dim: int = 128, **router_kwargs) -> None:
        super().__init__()
        num_layers = check_int("num_layers", num_layers)
        router_dim = check_int("router_dim", router_dim)
        first = RecurrentRouter(hidden_size, num_experts, top_k, router_dim=router_dim, **router_kwargs)
        self.layers = nn.ModuleList(
            [first] + [RecurrentRouter(hidden_size, num_experts, top_k, router_dim=router_dim, cell=first.gru,
                                       **router_kwargs) for _ in range(num_layers - 1)]
        )
        self.states = RecurrentState()
        for i, layer in enumerate(self.layers):
            layer.states, layer.layer_idx = self.states, i

    @property
    def cell(self) -> nn.GRUCell:
        """The GRU cell shared by all layers (owned by layer 0's router)."""
        return self.layers[0].gru

    def __getitem__(self, i: int) -> RecurrentRouter:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def reset(self) -> None:
        """``self.states.reset()``: forget the states stored by the last forward."""
        self.states.reset()

    def reset_on_forward(self, model: nn.Module):
        """``self.states.reset_on_forward(model)``: reset at the start of each forward of model."""
        return self.states.reset_on_forward(model)
