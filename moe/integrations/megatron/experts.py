"""Megatron-Core experts and whole-layer adapters: :class:`MoekitExperts` (``moe.GroupedExperts``
on the local experts), :class:`MoekitMoELayer` (``moe.MoELayer`` as a TransformerLayer mlp),
:func:`activation_from_config`. Both save and load Megatron's native checkpoint keys
(SequentialMLP's or GroupedMLP's experts, TopKRouter's router, SharedExpertMLP's shared experts;
the mapping is in moe/integrations/megatron/checkpoint.py).

Shape legend (moe/__init__.py): S sequence length, B micro-batch size, D hidden size, T tokens (S*B, Megatron's
s-major order t = s*B + b), E experts (global), L local experts, K routing slots, N routed rows,
R recurrent router dim.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from moe.dispatch import ExpertRows
from moe.experts import GroupedExperts
from moe.integrations.megatron.checkpoint import (check_layout, experts_module_from_megatron,
                                                  experts_module_to_megatron, install_native_layout,
                                                  moe_layer_from_megatron, moe_layer_to_megatron, rename_sharded,
                                                  sharded_dense_ffn, sharded_experts, take_prefixed)
from moe.integrations.megatron.recurrent import RecurrentRouters
from moe.integrations.megatron.router import attach_losses, group_size, topk_router_from_config
from moe.layer import MoELayer


def activation_from_config(config) -> str:
    """moekit's activation name for Megatron's (activation_func, gated_linear_unit)."""
    names = {(F.silu, True): "swiglu", (F.gelu, True): "geglu", (F.gelu, False): "gelu", (F.relu, False): "relu"}
    key = (config.activation_func, bool(config.gated_linear_unit))
    if key not in names:
        raise ValueError(f"activation_func={config.activation_func!r} with gated_linear_unit="
                         f"{config.gated_linear_unit} has no moekit equivalent (use {sorted(names.values())})")
    return names[key]


class MoekitExperts(MegatronModule):
    """``moe.GroupedExperts`` as ``MoESubmodules.experts``: built as ``(num_local_experts, config,
    pg_collection=...)``; forward(x_ND sorted by local expert, tokens_per_expert[L],
    permuted_probs[N]) -> (y_ND, None) with y = p * FFN_e(x) (Megatron's weighted expert output;
    with moe_apply_probs_on_input, FFN_e(p * x)). Weights w_in_EDH (L, D, H), w_out_EFD (L, F, D),
    initialised with config.init_method / output_layer_init_method; under expert parallelism
    they carry ``allreduce=False`` (Megatron reduces them over the expert-data-parallel group).

    Checkpoints: ``state_dict()`` writes the experts as Megatron's GroupedMLP (``weight1`` (D, L*H),
    ``weight2`` (L*F, D)) when ``config.moe_grouped_gemm`` is set, else as SequentialMLP
    (``local_experts.{e}.linear_fc1.weight`` (H, D), ``linear_fc2.weight`` (D, F), biases,
    ``_extra_state``); ``checkpoint_layout`` ("sequential" / "grouped") overrides it.
    ``load_state_dict`` reads either layout (and moekit's own ``experts.w_in_EDH`` names);
    ``sharded_state_dict`` gives both modules' distributed-checkpoint keys
    (moe/integrations/megatron/checkpoint.py)."""

    def __init__(self, num_local_experts: int, config, pg_collection=None, **kwargs) -> None:
        super().__init__(config)
        if config.expert_tensor_parallel_size not in (None, 1):
            raise ValueError("MoekitExperts does not support expert_tensor_parallel_size > 1")
        self.experts = GroupedExperts(num_local_experts, config.hidden_size, config.moe_ffn_hidden_size,
                                      activation=activation_from_config(config), bias=config.add_bias_linear)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.experts.to(device=device, dtype=config.params_dtype)
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.experts.w_in_EDH)
                config.output_layer_init_method(self.experts.w_out_EFD)
                for b in (self.experts.b_in_EH, self.experts.b_out_ED):
                    if b is not None:
                        b.zero_()
        self.ep_group = pg_collection.ep if pg_collection is not None else parallel_state.get_expert_model_parallel_group()
        self.expt_dp_group = (pg_collection.expt_dp if pg_collection is not None
                              else parallel_state.get_expert_data_parallel_group())
        for p in self.experts.parameters():
            p.allreduce = group_size(self.ep_group) == 1
        self.checkpoint_layout = "grouped" if config.moe_grouped_gemm else "sequential"
        install_native_layout(self,
                              lambda own: experts_module_to_megatron(own, check_layout(self.checkpoint_layout)),
                              lambda own: experts_module_from_megatron(own, num_local_experts))

    def forward(self, permuted_local_hidden_states: Tensor, tokens_per_expert, permuted_probs: Tensor, **kwargs):
        x_ND = permuted_local_hidden_states
        counts = torch.as_tensor(tokens_per_expert, device=x_ND.device)
        offs_E = torch.cumsum(counts, 0).to(torch.int32)
        probs_N1 = permuted_probs.reshape(-1, 1)
        if self.config.moe_apply_probs_on_input:
            return self.experts(ExpertRows((probs_N1 * x_ND).to(x_ND.dtype), offs_E)), None
        return (self.experts(ExpertRows(x_ND, offs_E)) * probs_N1).to(x_ND.dtype), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Distributed checkpointing with SequentialMLP's / GroupedMLP's keys (global shape (E, H, D)
        for fc1, split over expert parallelism, replicated over expert data parallelism)."""
        return sharded_experts(self.experts, prefix + "experts.", prefix, sharded_offsets, metadata, self.ep_group,
                               self.expt_dp_group)

    def backward_dw(self) -> None:
        """Megatron's delayed weight-gradient hook: moekit computes weight gradients in the normal
        backward, so there is nothing left to do."""


class MoekitMoELayer(MegatronModule):
    """``moe.MoELayer`` as a TransformerLayer ``mlp``: forward(x[S, B, H], padding_mask[B, S] or
    None (True = padding)) -> (y[S, B, H], None). Built with config (and optionally
    pg_collection); ``make_router(config)`` gives the router (default
    :func:`topk_router_from_config`). Shared experts come from
    moe_shared_expert_intermediate_size; under expert parallelism moekit's own all-to-all
    dispatcher shards the experts (``allreduce=False`` on their weights). Aux losses go through
    Megatron's plumbing as for :class:`MoekitRouter`.

    Checkpoints hold Megatron MoELayer's keys (``router.weight``, the experts as
    :class:`MoekitExperts` writes them, ``shared_experts.linear_fc1.weight`` ...), loaded from
    either expert layout or moekit's own ``layer.*`` names; ``sharded_state_dict`` gives MoELayer's
    distributed-checkpoint keys (moe/integrations/megatron/checkpoint.py)."""

    def __init__(self, config, pg_collection=None, *, make_router: Optional[Callable] = None, **kwargs) -> None:
        super().__init__(config)
        if isinstance(make_router, RecurrentRouters):
            raise ValueError("the whole-layer adapter takes a router factory fn(config); use the router "
                             "adapter (moekit_gpt_layer_spec(router=...)) for the recurrent router")
        if config.moe_shared_expert_gate:
            raise ValueError("moe_shared_expert_gate is not supported by moe.MoELayer")
        if config.tensor_model_parallel_size > 1:
            raise ValueError("the whole-layer adapter needs tensor_model_parallel_size=1 (use the router and "
                             "experts adapters inside Megatron's MoELayer with tensor parallelism)")
        ep = pg_collection.ep if pg_collection is not None else parallel_state.get_expert_model_parallel_group()
        self.ep_group, self.expt_dp_group = ep, (pg_collection.expt_dp if pg_collection is not None
                                                 else parallel_state.get_expert_data_parallel_group())
        shared = config.moe_shared_expert_intermediate_size
        self.layer = MoELayer(
            config.hidden_size, config.moe_ffn_hidden_size, config.num_moe_experts,
            router=(make_router or topk_router_from_config)(config), activation=activation_from_config(config),
            bias=config.add_bias_linear, num_shared_experts=1 if shared else 0, shared_ffn_hidden_size=shared,
            ep_group=ep if group_size(ep) > 1 else None)
        for p in self.layer.experts.parameters():
            p.allreduce = group_size(ep) == 1
        self.layer_number: Optional[int] = None
        self.tp_cp_group = pg_collection.tp_cp if pg_collection is not None else None
        self.checkpoint_layout = "grouped" if config.moe_grouped_gemm else "sequential"
        install_native_layout(self, lambda own: moe_layer_to_megatron(own, check_layout(self.checkpoint_layout)),
                              lambda own: moe_layer_from_megatron(own, self.layer.experts.num_experts))

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Distributed checkpointing with Megatron MoELayer's keys: the router's (TopKRouter), the
        routed experts' (SequentialMLP / GroupedMLP, split over expert parallelism), the shared
        experts' (SharedExpertMLP); anything else as Megatron's default."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        take_prefixed(out, prefix + "layer.experts.")
        out.update(sharded_experts(self.layer.experts, prefix + "layer.experts.", prefix + "experts.",
                                   sharded_offsets, metadata, self.ep_group, self.expt_dp_group))
        if self.layer.shared_experts is not None:
            take_prefixed(out, prefix + "layer.shared_experts.")
            out.update(sharded_dense_ffn(self.layer.shared_experts, prefix + "shared_experts.", sharded_offsets))
        return rename_sharded(out, prefix + "layer.router.", prefix + "router.")

    def forward(self, hidden_states: Tensor, padding_mask: Optional[Tensor] = None, **kwargs):
        valid_BS = None if padding_mask is None else ~padding_mask.bool()
        y = self.layer(hidden_states.transpose(0, 1), padding_mask=valid_BS).transpose(0, 1).contiguous()
        S, B = hidden_states.shape[:2]
        num_tokens = S * B if valid_BS is None else valid_BS.sum()
        y = attach_losses(y, self.layer.last_routing.aux_losses, self.layer.router, self.config,
                           self.layer_number, num_tokens, self.tp_cp_group)
        return y, None
