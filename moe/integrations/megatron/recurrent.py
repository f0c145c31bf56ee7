"""Megatron-Core recurrent router: :class:`RecurrentRouters`, the RMoE router (Qiu et al. 2024,
Eq. 3-4) shared across Megatron layers, and the bridge that carries the state's gradient across
recomputed layers.

Shape legend: S sequence length, B micro-batch size, H = D hidden size, T tokens (S*B, Megatron's
s-major order t = s*B + b), E experts (global), L local experts, K routing slots, N routed rows,
R recurrent router dim.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from megatron.core.transformer.module import MegatronModule

import routers
from moe.integrations.megatron.router import MoekitRouter, _loss_and_capacity_kwargs


class _InjectGrad(torch.autograd.Function):
    """Identity on ``out``; in backward also sends the stored gradient ``g`` into ``h``."""

    @staticmethod
    def forward(ctx, out, h, g):
        ctx.save_for_backward(g)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return grad_out, g, None


class _RecurrentLayerRouter(MoekitRouter):
    """One Megatron layer's view of a RecurrentRouters chain (bound at set_layer_number)."""

    def __init__(self, *, config, pg_collection=None, owner: "RecurrentRouters", **kwargs) -> None:
        MegatronModule.__init__(self, config)
        self._init_common(pg_collection)
        self.router = None
        if config.pipeline_model_parallel_size > 1:
            raise ValueError("the recurrent router needs all layers on one pipeline stage")
        object.__setattr__(self, "_owner", owner)  # a reference, not a submodule
        self.idx = None

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        self.router, cell, self._run = self._owner._bind(self.config, layer_number - 1)
        self.idx = layer_number - 1
        if cell is not None and not any(m is cell for m in self.router.modules()):
            self.shared_cell = cell  # registered once in the model: under layer 1's router
        self._check_router(self.router)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """As Megatron's default, except the shared cell (held by layer 1 only): one replicated
        tensor without the per-layer axis."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        cell_ptrs = {p.data_ptr() for p in self._run.chain.cell.parameters()} if self.idx == 0 else set()
        for key, t in list(out.items()):
            if isinstance(t, ShardedTensor) and t.data.data_ptr() in cell_ptrs:
                out[key] = ShardedTensor.from_rank_offsets(t.key, t.data, replica_id=t.replica_id)
        return out

    def _route(self, x_BSH: Tensor, valid_BS: Optional[Tensor]):
        run, i = self._run, self.idx
        state = None
        if i > 0:
            state = run.states.get(i - 1)
            if state is None or state.shape[0] != x_BSH.shape[0] * x_BSH.shape[1]:
                raise RuntimeError(f"recurrent router: layer {i + 1} ran before layer {i} in this forward")
            if torch.is_grad_enabled() and not state.requires_grad:
                # Layer i-1 ran without grad (MoE/full-layer recompute): route from a leaf and hand
                # its gradient to layer i-1's recompute, which runs after this one's backward.
                state = state.detach().requires_grad_()
                run.leaves[i] = state
        routing = self.router(x_BSH, state=state, padding_mask=valid_BS)
        run.states[i] = routing.state
        return routing

    def forward(self, hidden: Tensor, padding_mask: Optional[Tensor] = None, **kwargs):
        probs, routing_map = super().forward(hidden, padding_mask)
        leaf = self._run.leaves.get(self.idx + 1)
        if torch.is_grad_enabled() and leaf is not None and leaf.grad is not None:
            h = self._run.states[self.idx]
            if h.requires_grad and h.shape == leaf.grad.shape:
                probs = _InjectGrad.apply(probs, h, leaf.grad)
            del self._run.leaves[self.idx + 1]
        return probs, routing_map


@dataclasses.dataclass
class _ChainRun:
    """Per-model state of a chain: the routers, each layer's output state of the current forward
    and the leaves that carry gradients across recomputed layers (activations, not parameters)."""

    chain: routers.RecurrentRouterChain
    bound: set
    states: dict
    leaves: dict


class RecurrentRouters:
    """``MoESubmodules.router`` for the layerwise recurrent router (RMoE, Qiu et al. 2024,
    Eq. 3-4): ONE GRU cell shared by every MoE layer of a model.

    On the first layer it builds a ``routers.RecurrentRouterChain(config.num_layers, ...)`` with
    ``router_dim``, the config's losses / capacity / jitter / init_method_std (as
    :func:`topk_router_from_config`) and ``router_kwargs`` over them; layer n (1-based) routes
    with chain[n-1] (softmax top-k, renormalised: the paper's routing). The shared
    cell is registered exactly once in the model (under layer 1's router; in a distributed
    checkpoint it is one tensor, not one per layer), so DDP, optimizers and checkpoints see it once. Within a forward the state flows layer to layer (layer 1
    starts from zeros); a recomputed layer reads the same stored input state, and the gradient
    that the next layer sends back through the state reaches the recomputed layer too. Building a
    second model with the same builder starts a new chain. One forward at a time per model.
    """

    def __init__(self, router_dim: int = 128, **router_kwargs) -> None:
        self.router_dim, self.router_kwargs = router_dim, router_kwargs
        self._run: Optional[_ChainRun] = None

    def __call__(self, *, config, pg_collection=None, **kwargs) -> MoekitRouter:
        return _RecurrentLayerRouter(config=config, pg_collection=pg_collection, owner=self)

    def _bind(self, config, idx: int):
        if self._run is None or idx in self._run.bound:
            chain = routers.RecurrentRouterChain(config.num_layers, config.hidden_size, config.num_moe_experts,
                                                 config.moe_router_topk, router_dim=self.router_dim,
                                                 **{**_loss_and_capacity_kwargs(config), **self.router_kwargs})
            self._run = _ChainRun(chain, set(), {}, {})
        self._run.bound.add(idx)
        if not 0 <= idx < len(self._run.chain):
            raise ValueError(f"layer number {idx + 1} is outside the chain's {len(self._run.chain)} layers")
        return self._run.chain[idx], self._run.chain.cell if idx == 0 else None, self._run
