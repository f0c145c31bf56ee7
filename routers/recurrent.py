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

Deliberate departures from the reference code: (1) explicit initialisation (the reference
leaves W1/W2 as torch.empty); (2) the balancing loss. The reference adds Mixtral's loss
once per model over the logits of all layers concatenated, with f_i = count_i / T (top-k
slots summed, so K times Megatron's count_i / (K*T)) and coefficient 1e-3. A per-layer
router cannot see the other layers, so each layer returns its own Switch loss (Megatron's
normalisation, see routers.losses); for one layer the reference's value is exactly
K * ours, i.e. aux_loss_coeff = K * 1e-3 reproduces its per-layer scale.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routers.routing import Routing
from routers.topk import TopKBase


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
    """One layer of the RMoE router: Routing.state is h_i, pass it to the next layer.

    ``cell=None`` makes a standalone router that owns its GRU cell. Inside a
    RecurrentRouterChain the chain owns the shared cell and this router only holds a reference
    to it (not registered as a submodule, so model.parameters() sees the cell once).
    Other keywords (capacity_factor, aux_loss, ...) are TopKRouter's; the paper's routing is
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
        norm_topk: bool = True,
        jitter: float = 0.0,
        capacity_factor: Optional[float] = None,
        drop_policy: str = "probs",
        aux_loss: Optional[str] = "switch",
        aux_loss_coeff: float = 1e-2,
        z_loss_coeff: float = 0.0,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self._init_topk(
            hidden_size, num_experts, top_k, score="softmax", norm_topk=norm_topk,
            routed_scaling_factor=1.0, num_groups=None, topk_groups=None, expert_bias=False,
            jitter=jitter, capacity_factor=capacity_factor, drop_policy=drop_policy,
            aux_loss=aux_loss, aux_loss_coeff=aux_loss_coeff, z_loss_coeff=z_loss_coeff,
            check_finite=check_finite,
        )
        if not isinstance(router_dim, int) or router_dim < 1:
            raise ValueError(f"router_dim must be a positive int, got {router_dim!r}")
        self.router_dim = router_dim
        self.init_std = float(init_std)
        self.w1_RD = nn.Parameter(torch.empty(router_dim, hidden_size))
        self.w2_ER = nn.Parameter(torch.empty(num_experts, router_dim))
        if cell is None:
            self.cell = nn.GRUCell(router_dim, router_dim)
        else:
            if not isinstance(cell, nn.GRUCell) or cell.input_size != router_dim or cell.hidden_size != router_dim:
                raise ValueError(f"cell must be an nn.GRUCell({router_dim}, {router_dim}), got {cell!r}")
            object.__setattr__(self, "_shared_cell", cell)  # a reference, not a submodule
        object.__setattr__(self, "_chain", None)  # set by RecurrentRouterChain, a reference too
        self.layer_idx = 0
        self.reset_parameters()

    @property
    def gru(self) -> nn.GRUCell:
        shared = self.__dict__.get("_shared_cell")
        return shared if shared is not None else self._modules["cell"]

    def reset_parameters(self) -> None:
        """Explicit init (the reference leaves W1/W2 uninitialised): N(0, init_std) for W1, W2;
        an owned GRU cell gets torch's U(-1/sqrt(R), 1/sqrt(R))."""
        nn.init.normal_(self.w1_RD, std=self.init_std)
        nn.init.normal_(self.w2_ER, std=self.init_std)
        if "cell" in self._modules:
            _reset_gru(self.cell)

    def forward(self, x: Tensor, *, state: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None) -> Routing:
        """x (T, D) or (B, S, D); state h_{i-1} of shape (T, R) (or x.shape[:-1] + (R,)).

        Without ``state``: zeros, or inside a chain the state this forward's previous layer
        produced (see RecurrentRouterChain). Returns Routing with .state = h_i, float32 (T, R).
        """
        x_TD, valid_T, seq_shape = self._prepare(x, padding_mask, self.w1_RD.device)
        T = x_TD.shape[0]
        if state is None:
            chain = self._chain
            state = chain._input_state(self.layer_idx, x_TD) if chain is not None else x_TD.new_zeros(T, self.router_dim)
        h_prev = self._check_state(state, x, T).to(x_TD.dtype)
        h_TR = gru_step(self.gru, F.linear(x_TD, self.w1_RD.to(x_TD.dtype)), h_prev)
        if self._chain is not None:
            self._chain._states[self.layer_idx] = h_TR
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


def _reset_gru(cell: nn.GRUCell) -> None:
    bound = 1.0 / math.sqrt(cell.hidden_size)
    for p in cell.parameters():
        nn.init.uniform_(p, -bound, bound)


class _StateStore(dict):
    """Per-forward states by layer index. Copies and pickles as empty (the states are
    activations with autograd history, not model state)."""

    def __deepcopy__(self, memo):
        return _StateStore()

    def __reduce__(self):
        return (_StateStore, ())


class RecurrentRouterChain(nn.Module):
    """The RMoE router of a whole model: one shared GRU cell (``cell``) and a RecurrentRouter per
    layer (``layers``, ``chain[i]``).

    Explicit use: ``r = chain[i](x, state=h)``; pass ``r.state`` to layer i+1 (None at layer 0).
    Drop-in use, for models whose layers only call ``mlp(x)``: call ``chain[i](x)``. Layer 0
    starts from zeros (every forward restarts the recurrence); layer i > 0 reads the state
    layer i-1 stored in this chain during the current forward. States are stored per layer
    index, so a layer recomputed by activation checkpointing reads the same input state as in
    the forward. Limitation: one forward at a time per chain; a second forward before the
    first one's backward (e.g. interleaved pipeline micro-batches) overwrites the stored
    states that recomputation needs: pass ``state=`` explicitly there. ``reset()`` drops them.
    The shared cell is a submodule of layer 0's router, so a model that registers only the
    per-layer routers (each in its MoE block) still sees it, once; registering the chain too
    is harmless (parameters() de-duplicates it, state_dict lists it like tied weights).
    """

    def __init__(self, num_layers: int, hidden_size: int, num_experts: int, top_k: int,
                 router_dim: int = 128, **router_kwargs) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(router_dim, int) or router_dim < 1:
            raise ValueError(f"router_dim must be a positive int, got {router_dim!r}")
        # Layer 0 owns the shared cell as a submodule; layers 1.. hold a reference. So the cell
        # is in parameters() exactly once whether the model registers the chain, the per-layer
        # routers (e.g. each inside its MoE block), or both (then it is de-duplicated).
        first = RecurrentRouter(hidden_size, num_experts, top_k, router_dim=router_dim, **router_kwargs)
        self.layers = nn.ModuleList(
            [first] + [RecurrentRouter(hidden_size, num_experts, top_k, router_dim=router_dim, cell=first.gru,
                                       **router_kwargs) for _ in range(num_layers - 1)]
        )
        for i, layer in enumerate(self.layers):
            object.__setattr__(layer, "_chain", self)
            layer.layer_idx = i
        self._states = _StateStore()

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
        """Forget the states stored by the last forward (frees their autograd graph)."""
        self._states.clear()

    def _input_state(self, layer_idx: int, x_TD: Tensor) -> Tensor:
        T, R = x_TD.shape[0], self.cell.hidden_size
        if layer_idx == 0:
            return x_TD.new_zeros(T, R)
        prev = self._states.get(layer_idx - 1)
        if prev is None:
            raise RuntimeError(
                f"RecurrentRouterChain: layer {layer_idx} was called without state= but layer "
                f"{layer_idx - 1} has not run yet; call the layers in order or pass state="
            )
        if prev.shape[0] != T:
            raise RuntimeError(
                f"RecurrentRouterChain: layer {layer_idx - 1}'s stored state has {prev.shape[0]} tokens but "
                f"x has {T}; layer {layer_idx - 1} did not run in this forward (pass state= explicitly)"
            )
        return prev
