"""Megatron-Core: moekit routers, grouped experts and the whole MoE layer inside Megatron models.

Shape legend: S sequence length, B micro-batch size, H = D hidden size, T tokens (S*B, Megatron's
s-major order t = s*B + b), E experts (global), L local experts, K routing slots, N routed rows,
R recurrent router dim.

Megatron's MoELayer calls ``router(hidden[S, B, H], padding_mask[S, B] (True = padding))`` ->
``(probs[T, E], routing_map[T, E])``, dispatches, and calls ``experts(x_ND sorted by local expert,
tokens_per_expert[L], permuted_probs[N])`` -> ``(y_ND, None)``. The adapters here fill those slots:

- :class:`MoekitRouter`: any moekit router (``routers/``). Its aux losses ride Megatron's
  ``MoEAuxLossAutoScaler`` on the probs and go to the aux-loss tracker; a router with an
  ``expert_bias`` buffer gets a ``local_tokens_per_expert`` buffer, which Megatron's
  ``finalize_model_grads`` all-reduces and uses to move the bias (DeepSeek-V3 Sec. 2.1.2).
- :class:`RecurrentRouters`: the RMoE router (Qiu et al. 2024, Eq. 3-4) across Megatron layers.
- :class:`MoekitExperts`: ``moe.GroupedExperts`` on the local experts (probs applied here).
- :class:`MoekitMoELayer`: ``moe.MoELayer`` as a TransformerLayer mlp.
- :func:`moekit_gpt_layer_spec`: Megatron's local GPT layer spec with those pieces swapped in::

      spec = moekit_gpt_layer_spec(router="topk", experts=True)
      model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=..., max_sequence_length=...)

Importing this module imports megatron.core (``pip install moekit[megatron]``); importing
``moe`` does not. Tested with megatron-core 0.16.1; newer keyword arguments are accepted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from megatron.core import parallel_state
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
except ImportError as err:  # pragma: no cover
    raise ImportError("moe.integrations.megatron needs megatron-core: pip install moekit[megatron]") from err

import routers
from moe.experts import GroupedExperts
from moe.layer import MoELayer

__all__ = ["MoekitRouter", "RecurrentRouters", "MoekitExperts", "MoekitMoELayer", "moekit_gpt_layer_spec",
           "topk_router_from_config", "activation_from_config"]

# moekit aux-loss name -> (Megatron tracker name, the router attribute holding its coefficient)
_LOSS_NAMES = {"load_balancing": ("load_balancing_loss", "aux_loss_coeff"),
               "seq_load_balancing": ("seq_load_balancing_loss", "aux_loss_coeff"),
               "z_loss": ("z_loss", "z_loss_coeff"), "dynamic": ("dynamic_loss", "dynamic_loss_coeff")}
_LB_TYPES = {"aux_loss": "switch", "seq_aux_loss": "seq", "none": None}


def _loss_and_capacity_kwargs(config) -> dict:
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
    return dict(aux_loss=_LB_TYPES[lb], aux_loss_coeff=float(coeff or 0.0), z_loss_coeff=config.moe_z_loss_coeff or 0.0,
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
        expert_bias=config.moe_router_enable_expert_bias, **_loss_and_capacity_kwargs(config))


def activation_from_config(config) -> str:
    """moekit's activation name for Megatron's (activation_func, gated_linear_unit)."""
    names = {(F.silu, True): "swiglu", (F.gelu, True): "geglu", (F.gelu, False): "gelu", (F.relu, False): "relu"}
    key = (config.activation_func, bool(config.gated_linear_unit))
    if key not in names:
        raise ValueError(f"activation_func={config.activation_func!r} with gated_linear_unit="
                         f"{config.gated_linear_unit} has no moekit equivalent (use {sorted(names.values())})")
    return names[key]


def _dense_routing(ids_TK: Tensor, weights_TK: Tensor, num_experts: int):
    """(T, K) ids (-1 = empty) and weights -> probs[T, E] (0 where not routed), routing_map[T, E]."""
    T = ids_TK.shape[0]
    col = ids_TK + 1  # column 0 collects the empty slots and is dropped
    probs = weights_TK.new_zeros(T, num_experts + 1).scatter(1, col, weights_TK)[:, 1:]
    routing_map = torch.zeros(T, num_experts + 1, dtype=torch.bool, device=ids_TK.device).scatter(1, col, True)[:, 1:]
    return probs, routing_map


def _attach_losses(out: Tensor, aux_losses: dict, owner, config, layer_number, num_tokens, reduce_group) -> Tensor:
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


def _group_size(group) -> int:
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
    """

    def __init__(self, *, config, pg_collection=None, make_router: Optional[Callable] = None, **kwargs) -> None:
        super().__init__(config)
        self._init_common(pg_collection)
        self.router = (make_router or topk_router_from_config)(config)
        self._check_router(self.router)

    def _init_common(self, pg_collection) -> None:
        self.layer_number: Optional[int] = None
        self.tp_cp_group = pg_collection.tp_cp if pg_collection is not None else None

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
        P = _group_size(self.tp_cp_group)
        losses = {n: v / P for n, v in routing.aux_losses.items()} if P > 1 else routing.aux_losses
        num_tokens = S * B if valid_BS is None else valid_BS.sum()
        probs = _attach_losses(probs, losses, self.router, self.config, self.layer_number, num_tokens,
                               self.tp_cp_group)
        return probs, routing_map


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


def _shard_experts(out: dict, experts: nn.Module, sharded_offsets: tuple, ep_group, expt_dp_group) -> dict:
    """Re-declare the expert weights in a sharded state dict: each is a ShardedTensor of global
    shape (E, ...) split over the expert-parallel group (this rank holds experts
    [ep_rank * L, (ep_rank + 1) * L)) and replicated over the expert-data-parallel group."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ptrs = {p.data_ptr() for p in experts.parameters()}
    ep_rank, ep_size = (0, 1) if ep_group is None else (ep_group.rank(), ep_group.size())
    replica = (0, 0, 0 if expt_dp_group is None else expt_dp_group.rank())
    for key, t in list(out.items()):
        if isinstance(t, ShardedTensor) and t.data.data_ptr() in ptrs:
            out[key] = ShardedTensor.from_rank_offsets(
                t.key, t.data, *sharded_offsets, (len(sharded_offsets), ep_rank, ep_size),
                replica_id=replica, prepend_axis_num=len(sharded_offsets))
    return out


class MoekitExperts(MegatronModule):
    """``moe.GroupedExperts`` as ``MoESubmodules.experts``: built as ``(num_local_experts, config,
    pg_collection=...)``; forward(x_ND sorted by local expert, tokens_per_expert[L],
    permuted_probs[N]) -> (y_ND, None) with y = p * FFN_e(x) (Megatron's weighted expert output;
    with moe_apply_probs_on_input, FFN_e(p * x)). Weights w_in_EDH (L, D, H), w_out_EFD (L, F, D),
    initialised with config.init_method / output_layer_init_method; under expert parallelism
    they carry ``allreduce=False`` (Megatron reduces them over the expert-data-parallel group)."""

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
            p.allreduce = _group_size(self.ep_group) == 1

    def forward(self, permuted_local_hidden_states: Tensor, tokens_per_expert, permuted_probs: Tensor, **kwargs):
        x_ND = permuted_local_hidden_states
        counts = torch.as_tensor(tokens_per_expert, device=x_ND.device)
        offs_E = torch.cumsum(counts, 0).to(torch.int32)
        probs_N1 = permuted_probs.reshape(-1, 1)
        if self.config.moe_apply_probs_on_input:
            return self.experts((probs_N1 * x_ND).to(x_ND.dtype), offs_E), None
        return (self.experts(x_ND, offs_E) * probs_N1).to(x_ND.dtype), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Distributed checkpointing: see :func:`_shard_experts`."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return _shard_experts(out, self.experts, sharded_offsets, self.ep_group, self.expt_dp_group)

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
    Megatron's plumbing as for :class:`MoekitRouter`."""

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
            ep_group=ep if _group_size(ep) > 1 else None)
        for p in self.layer.experts.parameters():
            p.allreduce = _group_size(ep) == 1
        self.layer_number: Optional[int] = None
        self.tp_cp_group = pg_collection.tp_cp if pg_collection is not None else None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Distributed checkpointing: the routed experts sharded over expert parallelism
        (:func:`_shard_experts`), everything else as Megatron's default."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return _shard_experts(out, self.layer.experts, sharded_offsets, self.ep_group, self.expt_dp_group)

    def forward(self, hidden_states: Tensor, padding_mask: Optional[Tensor] = None, **kwargs):
        valid_BS = None if padding_mask is None else ~padding_mask.bool()
        y = self.layer(hidden_states.transpose(0, 1), padding_mask=valid_BS).transpose(0, 1).contiguous()
        S, B = hidden_states.shape[:2]
        num_tokens = S * B if valid_BS is None else valid_BS.sum()
        y = _attach_losses(y, self.layer.last_routing.aux_losses, self.layer.router, self.config,
                           self.layer_number, num_tokens, self.tp_cp_group)
        return y, None


RouterArg = Union[None, str, Callable, RecurrentRouters]


def _router_builder(router: RouterArg):
    if router is None:
        return None
    if isinstance(router, RecurrentRouters):
        return router
    if router == "topk":
        return functools.partial(MoekitRouter, make_router=topk_router_from_config)
    if router == "recurrent":
        return RecurrentRouters()
    if callable(router) and not isinstance(router, str):
        return functools.partial(MoekitRouter, make_router=router)
    raise ValueError(f"router must be None, 'topk', 'recurrent', a RecurrentRouters or fn(config) -> moekit "
                     f"router, got {router!r}")


def moekit_gpt_layer_spec(*, router: RouterArg = None, experts: bool = False, whole_layer: bool = False,
                          **local_spec_kwargs):
    """Megatron's local GPT layer spec (``get_gpt_layer_local_spec``, MoE variant) with moekit
    pieces swapped in. router: None (Megatron's TopKRouter), "topk" (:func:`topk_router_from_config`),
    "recurrent" (a fresh :class:`RecurrentRouters`), a RecurrentRouters, or fn(config) -> moekit
    router (e.g. ``lambda c: routers.ThresholdRouter(c.hidden_size, c.num_moe_experts,
    threshold=0.5)``). experts=True: :class:`MoekitExperts`. whole_layer=True: the mlp is a
    :class:`MoekitMoELayer` (router as above, None meaning "topk", a RecurrentRouters excepted).
    Other keywords go to get_gpt_layer_local_spec. A spec may build several models one after
    another (a recurrent router gives each its own chain)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    # num_experts only selects the MoE variant of the spec; the count comes from the config.
    spec = get_gpt_layer_local_spec(num_experts=local_spec_kwargs.pop("num_experts", 1), **local_spec_kwargs)
    build_router = _router_builder(router)
    if whole_layer:
        if experts or isinstance(build_router, RecurrentRouters):
            raise ValueError("whole_layer=True replaces the whole MoE layer: pass experts=False and a "
                             "non-recurrent router")
        make = None if router is None else build_router.keywords["make_router"]
        mlp = ModuleSpec(module=MoekitMoELayer, params={"make_router": make})
    else:
        moe_spec = spec.submodules.mlp
        subs = moe_spec.submodules
        subs = dataclasses.replace(subs, router=build_router or subs.router,
                                   experts=MoekitExperts if experts else subs.experts)
        mlp = dataclasses.replace(moe_spec, submodules=subs)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))
