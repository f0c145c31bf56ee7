"""Megatron-Core recurrent router: :class:`RecurrentRouters`, the RMoE router (Qiu et al. 2024,
Eq. 3-4) shared across Megatron layers.

Shape legend (moe/__init__.py): S sequence length, B micro-batch size, D hidden size, T tokens (S*B, Megatron's
s-major order t = s*B + b), E experts (global), L local experts, K routing slots, N routed rows,
R recurrent router dim.

Megatron's layers call ``router(hidden)`` with no state, so layer n routes with the n-th router of
one ``routers.RecurrentRouterChain`` called without ``state=``: the chain's ``RecurrentState``
(routers/recurrent.py) carries h from layer to layer and the recurrent gradient across Megatron's
recompute. Nothing here stores states.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.module import MegatronModule

import routers
from moe.integrations.megatron.router import MoekitRouter, loss_and_capacity_kwargs


class _RecurrentLayerRouter(MoekitRouter):
    """One Megatron layer's router: chain[layer_number - 1] of its RecurrentRouters' chain (bound
    at set_layer_number), routed as any moekit router."""

    def __init__(self, *, config, pg_collection=None, owner: "RecurrentRouters", **kwargs) -> None:
        MegatronModule.__init__(self, config)
        self._init_common(pg_collection)
        self.router = None
        if config.pipeline_model_parallel_size > 1:
            raise ValueError("the recurrent router needs all layers on one pipeline stage")
        self._owner = owner  # a plain object: the builder that hands out the chain's layers
        self.idx = None

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        self.idx = layer_number - 1
        self.router = self._owner._bind(self.config, self.idx)
        self._check_router(self.router)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """As :class:`MoekitRouter`'s (the router's entries one level up), except the shared cell
        (held by layer 1 only): one replicated tensor without the per-layer axis."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        cell_ptrs = {p.data_ptr() for p in self.router.gru.parameters()} if self.idx == 0 else set()
        for key, t in list(out.items()):
            if isinstance(t, ShardedTensor) and t.data.data_ptr() in cell_ptrs:
                out[key] = ShardedTensor.from_rank_offsets(t.key, t.data, replica_id=t.replica_id)
        return out


class RecurrentRouters:
    """``MoESubmodules.router`` for the layerwise recurrent router (RMoE, Qiu et al. 2024,
    Eq. 3-4): ONE GRU cell shared by every MoE layer of a model.

    On the first layer it builds a ``routers.RecurrentRouterChain(config.num_layers, ...)``
    (``self.chain``) with ``router_dim``, the config's losses / capacity / jitter /
    init_method_std (as :func:`topk_router_from_config`) and ``router_kwargs`` over them; layer n
    (1-based) routes with chain[n-1] (softmax top-k, renormalised: the paper's routing). The
    shared cell is registered exactly once in the model (under layer 1's router; in a distributed
    checkpoint it is one tensor, not one per layer), so DDP, optimizers and checkpoints see it
    once. The state flows through ``chain.states`` (routers.recurrent.RecurrentState): layer 1
    starts each forward from zeros; a recomputed layer (MoE or full-layer recompute) reads the
    same stored input state, and the gradient that the next layer sends back through the state
    reaches the recomputed layer too. ``self.chain.reset_on_forward(model)`` frees the last
    forward's states at the start of each forward. Building a second model with the same builder
    starts a new chain (``self.chain`` is the last one). One forward at a time per model.
    """

    def __init__(self, router_dim: int = 128, **router_kwargs) -> None:
        self.router_dim, self.router_kwargs = router_dim, router_kwargs
        self.chain: Optional[routers.RecurrentRouterChain] = None  # of the model built last
        self._bound: set = set()

    def __call__(self, *, config, pg_collection=None, **kwargs) -> MoekitRouter:
        return _RecurrentLayerRouter(config=config, pg_collection=pg_collection, owner=self)

    def _bind(self, config, idx: int) -> routers.RecurrentRouter:
        if self.chain is None or idx in self._bound:  # a layer number seen again: a new model
            kwargs = {**loss_and_capacity_kwargs(config), **self.router_kwargs}
            self.chain = routers.RecurrentRouterChain(config.num_layers, config.hidden_size, config.num_moe_experts,
                                                      config.moe_router_topk, router_dim=self.router_dim, **kwargs)
            self._bound = set()
        if not 0 <= idx < len(self.chain):
            raise ValueError(f"layer number {idx + 1} is outside the chain's {len(self.chain)} layers")
        self._bound.add(idx)
        return self.chain[idx]
