"""Megatron-Core router adapter: :class:`MoekitRouter` (any moekit router in
``MoESubmodules.router``), :func:`topk_router_from_config` and the aux-loss plumbing shared by
the adapters (losses ride ``MoEAuxLossAutoScaler`` and go to Megatron's aux-loss tracker).

Shape legend (moe/__init__.py): S sequence length, B micro-batch size, D hidden size, T tokens (S*B, Megatron's
s-major order t = s*B + b), E experts (global), L local experts, K routing slots, N routed rows,
R recurrent router dim.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker

import routers
from moe.integrations.megatron.checkpoint import (install_native_layout, rename_sharded, router_from_megatron,
                                                  router_to_megatron)

# moekit aux-loss name -> (Megatron tracker name, the router attribute holding its coefficient)
_LOSS_NAMES = {"load_balancing": ("load_balancing_loss", "balance_loss_coeff"),
               "seq_load_balancing": ("seq_load_balancing_loss", "balance_loss_coeff"),
               "z_loss": ("z_loss", "z_loss_coeff"), "dynamic": ("dynamic_loss", "dynamic_loss_coeff")}
_LB_TYPES = {"aux_loss": "switch", "seq_aux_loss": "seq", "none": None}


def loss_and_capacity_kwargs(config) -> dict:
    """The router keywords every moekit top-k style router shares, from Megatron's config."""
    lb, coeff = config.moe_router_load_balancing_type, config.moe_aux_loss_coeff
    if isinstance(lb, (list, tuple)):
        if len(lb) != 1:
            raise ValueError(f"moe_router_load_balancing_type={lb!r}: moekit routers take one balance loss")
        lb, coeff = lb[0], coeff[0] if isinstance(coeff, (list, tuple)) else coeff
    if lb not in _LB_TYPES:
        raise ValueError(f"moe_router_load_balancing_type={lb!r} is not supported (use one of {list(_LB_TYPES)})")
    if config.moe_pad_expert_input_to_capacity:
        raise ValueError("moe_pad_expert_input_to_capacity is not supported by moekit routers")
    return dict(balance_loss=_LB_TYPES[lb], balance_loss_coeff=float(coeff or 0.0), z_loss_coeff=config.moe_z_loss_coeff or 0.0,
                capacity_factor=config.moe_expert_capacity_factor, drop_policy=config.moe_token_drop_policy,
                jitter=config.moe_input_jitter_eps or 0.0, init_std=config.init_method_std)


def topk_router_from_config(config) -> routers.TopKRouter:
    """A ``routers.TopKRouter`` that routes as Megatron's TopKRouter with this TransformerConfig:
    moe_router_score_function, moe_router_topk, moe_router_pre_softmax (softmax without it
    renormalises the top-k), moe_router_num_groups / moe_router_group_topk (group score = sum of
    the top-2 scores, DeepSeek-V3), moe_router_topk_scaling_factor, moe_router_enable_expert_bias,
    moe_expert_capacity_factor / moe_token_drop_policy, moe_router_load_balancing_type
    ("aux_loss", "seq_aux_loss", "none") with moe_aux_loss_coeff, moe_z_loss_coeff,
    moe_input_jitter_eps, init_method_std. Raises ValueError for settings it cannot reproduce."""
    score, k = config.moe_router_score_function, config.moe_router_topk
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if group_topk:
        if score == "softmax" and not config.moe_router_pre_softmax:
            raise ValueError("group-limited softmax routing needs moe_router_pre_softmax=True "
                             "(Megatron otherwise ranks groups by raw logits)")
        if k // group_topk != min(2, config.num_moe_experts // groups):
            raise ValueError(f"moe_router_topk // moe_router_group_topk = {k // group_topk}: moekit scores a "
                             "group by its top-2 experts (DeepSeek-V3), Megatron by its top-(topk // group_topk)")
    return routers.TopKRouter(
        config.hidden_size, config.num_moe_experts, k, score=score,
        norm_topk=(not config.moe_router_pre_softmax) if score == "softmax" else None,
        routed_scaling_factor=config.moe_router_topk_scaling_factor or 1.0,
        num_groups=groups if group_topk else None, topk_groups=group_topk or None,
        expert_bias=config.moe_router_enable_expert_bias, **loss_and_capacity_kwargs(config))


def _dense_routing(ids_TK: Tensor, weights_TK: Tensor, num_experts: int):
    """(T, K) ids (-1 = empty) and weights -> probs[T, E] (0 where not routed), routing_map[T, E]."""
    T = ids_TK.shape[0]
    col = ids_TK + 1  # column 0 collects the empty slots and is dropped
    probs = weights_TK.new_zeros(T, num_experts + 1).scatter(1, col, weights_TK)[:, 1:]
    routing_map = torch.zeros(T, num_experts + 1, dtype=torch.bool, device=ids_TK.device).scatter(1, col, True)[:, 1:]
    return probs, routing_map


def attach_losses(out: Tensor, aux_losses: dict, owner, config, layer_number, num_tokens, reduce_group) -> Tensor:
    """Megatron's aux-loss plumbing: each loss rides MoEAuxLossAutoScaler on ``out`` (its
    gradient is scaled like the main loss) and is logged, divided by its coefficient, to the
    aux-loss tracker. Only in training with grad enabled (Megatron skips the no-grad pass of a
    recomputed layer, so nothing is counted twice)."""
    if not (owner.training and torch.is_grad_enabled()):
        return out
    num_layers = config.num_layers + (config.mtp_num_layers or 0)
    for name, loss in aux_losses.items():
        tracker_name, coeff_attr = _LOSS_NAMES.get(name, (name, None))
        coeff = float(getattr(owner, coeff_attr, 0.0) or 0.0) if coeff_attr else 0.0
        save_to_aux_losses_tracker(tracker_name, loss / coeff if coeff > 0 else loss, layer_number, num_layers,
                                   reduce_group=reduce_group)
        out = MoEAuxLossAutoScaler.apply(out, loss * num_tokens if config.calculate_per_token_loss else loss)
    return out


def group_size(group) -> int:
    return 1 if group is None else group.size()


class MoekitRouter(MegatronModule):
    """A moekit router in ``MoESubmodules.router``: built as ``MoekitRouter(config=...,
    pg_collection=..., make_router=fn)`` where ``fn(config)`` returns the router (default
    :func:`topk_router_from_config`); see :func:`moekit_gpt_layer_spec`.

    forward(hidden[S, B, H], padding_mask[S, B] or None (True = padding)) -> (probs[T, E]
    float32, 0 where not routed; routing_map[T, E] bool), T = S*B in Megatron's order. The
    router sees (B, S, H) so per-sequence losses see whole sequences. Losses are computed on this
    rank's tokens; with tensor x context parallel size P > 1 they are scaled by 1/P (their sum
    over the P ranks is the mean of the per-rank losses).

    Checkpoints hold Megatron's TopKRouter keys: the moekit router's entries one level up
    (``<p>.weight`` (E, D), ``<p>.expert_bias`` (E) where ``<p>`` is this module's prefix, not
    ``<p>.router.weight``; moe/integrations/megatron/checkpoint.py). ``load_state_dict`` takes
    those and moekit's earlier ``<p>.router.*`` names; ``sharded_state_dict`` gives TopKRouter's
    distributed-checkpoint keys.
    """

    def __init__(self, *, config, pg_collection=None, make_router: Optional[Callable] = None, **kwargs) -> None:
        super().__init__(config)
        self._init_common(pg_collection)
        self.router = (make_router or topk_router_from_config)(config)
        self._check_router(self.router)

    def _init_common(self, pg_collection) -> None:
        self.layer_number: Optional[int] = None
        self.tp_cp_group = pg_collection.tp_cp if pg_collection is not None else None
        install_native_layout(self, router_to_megatron, lambda own: router_from_megatron(own, self._router_names()))

    def _router_names(self) -> set:
        return set() if self.router is None else set(self.router.state_dict(keep_vars=True))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Megatron's default, with the router's entries one level up (TopKRouter's keys)."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return rename_sharded(out, prefix + "router.", prefix)

    def _check_router(self, router: nn.Module) -> None:
        """Sizes must match the config; router weights get Megatron's ``sequence_parallel`` flag
        (their gradients are then all-reduced over tensor parallel, as Megatron's router's); an
        expert bias gets the ``local_tokens_per_expert`` counter finalize_model_grads reads."""
        for attr, want in (("num_experts", self.config.num_moe_experts), ("hidden_size", self.config.hidden_size)):
            if getattr(router, attr, None) != want:
                raise ValueError(f"router.{attr}={getattr(router, attr, None)!r} but the config says {want}")
        for p in router.parameters():
            p.sequence_parallel = self.config.sequence_parallel
        bias = getattr(router, "expert_bias", None)
        if self.config.moe_router_enable_expert_bias:
            if bias is None:
                raise ValueError("moe_router_enable_expert_bias=True but the moekit router has no expert_bias "
                                 "buffer (build it with expert_bias=True)")
            if not hasattr(router, "local_tokens_per_expert"):
                router.register_buffer("local_tokens_per_expert", torch.zeros_like(bias), persistent=False)

    def set_layer_number(self, layer_number: int) -> None:
        """1-based global layer number (Megatron's), used by the aux-loss tracker."""
        self.layer_number = layer_number

    def _route(self, x_BSH: Tensor, valid_BS: Optional[Tensor]):
        return self.router(x_BSH, padding_mask=valid_BS)

    def forward(self, hidden: Tensor, padding_mask: Optional[Tensor] = None, **kwargs):
        if self.router is None:
            raise RuntimeError("MoekitRouter: no router bound yet (set_layer_number was not called)")
        if hidden.dim() == 2:
            hidden = hidden[:, None]
        S, B = hidden.shape[:2]
        valid_BS = None if padding_mask is None else ~padding_mask.reshape(S, B).bool().t()
        for name in ("expert_bias", "local_tokens_per_expert"):  # Float16Module casts buffers
            buf = getattr(self.router, name, None)
            if buf is not None and buf.dtype != torch.float32:
                buf.data = buf.data.float()
        routing = self._route(hidden.transpose(0, 1), valid_BS)
        K = routing.ids_TK.shape[1]
        ids_TK = routing.ids_TK.view(B, S, K).transpose(0, 1).reshape(S * B, K)
        weights_TK = routing.weights_TK.view(B, S, K).transpose(0, 1).reshape(S * B, K)
        probs, routing_map = _dense_routing(ids_TK, weights_TK, self.router.num_experts)
        if hasattr(self.router, "local_tokens_per_expert") and torch.is_grad_enabled():
            self.router.local_tokens_per_expert += routing.counts_E.to(self.router.local_tokens_per_expert.dtype)
        P = group_size(self.tp_cp_group)
        losses = {n: v / P for n, v in routing.aux_losses.items()} if P > 1 else routing.aux_losses
        num_tokens = S * B if valid_BS is None else valid_BS.sum()
        probs = attach_losses(probs, losses, self.router, self.config, self.layer_number, num_tokens,
                               self.tp_cp_group)
        return probs, routing_map
