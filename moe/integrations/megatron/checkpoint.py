"""Megatron-Core checkpoint layouts for the moekit adapters: conversion functions both ways, the
state-dict hooks that make ``state_dict()`` / ``load_state_dict()`` speak Megatron's native keys,
and the sharded (distributed-checkpoint) entries Megatron's own modules write.

Shape legend (moe/__init__.py): D hidden size, E experts (global), L local experts, F expert
hidden size, H the first projection's width (2F for gated activations, else F).

Key mapping, relative to the adapter's own prefix ``p`` (e.g. ``decoder.layers.0.mlp.router.``
for the router, ``decoder.layers.0.mlp.experts.`` for the experts), Megatron-Core 0.16.1:

- MoekitRouter ``router.weight`` (E, D), ``router.expert_bias`` (E) <-> TopKRouter ``p.weight``,
  ``p.expert_bias`` (the same tensors); another moekit router's ``router.<name>`` <-> ``p.<name>``
  (no Megatron counterpart: the recurrent router's cell, for instance).
- MoekitExperts ``experts.w_in_EDH`` (L, D, H) <-> SequentialMLP
  ``p.local_experts.{e}.linear_fc1.weight`` (H, D) = ``w_in_EDH[e].T``, or GroupedMLP ``p.weight1``
  (D, L*H) = ``w_in_EDH.reshape(D, L*H)``.
- MoekitExperts ``experts.w_out_EFD`` (L, F, D) <-> SequentialMLP
  ``p.local_experts.{e}.linear_fc2.weight`` (D, F) = ``w_out_EFD[e].T``, or GroupedMLP ``p.weight2``
  (L*F, D) = ``w_out_EFD.reshape(L*F, D)``.
- MoekitExperts ``experts.b_in_EH`` (L, H) / ``experts.b_out_ED`` (L, D) <-> SequentialMLP
  ``p.local_experts.{e}.linear_fc1.bias`` / ``linear_fc2.bias`` (row e; GroupedMLP has none).
- MoekitMoELayer ``layer.router.*`` <-> MoELayer ``p.router.*``; ``layer.experts.*`` <->
  ``p.experts.*`` as above; shared experts ``layer.shared_experts.w_in.*`` / ``w_out.*`` <->
  SharedExpertMLP ``p.shared_experts.linear_fc1.*`` / ``linear_fc2.*`` (the same tensors).

The gated first projection is ``[gate; up]`` in both libraries: Megatron's ``glu`` (mlp.py,
experts.py) and ``bias_swiglu_impl`` take ``silu(chunk 0) * chunk 1`` of fc1's output, moekit's
``moe.ops.swiglu`` ``silu(h[:, :F]) * h[:, F:]``. GroupedMLP's ``weight1`` is NOT column-blocked
per expert: its forward reinterprets the (D, L*H) storage as (L, D, H) (``weight1.view(L, D, -1)``),
so ``weight1.reshape(L, D, H)`` is moekit's ``w_in_EDH`` exactly. SequentialMLP also saves one
``_extra_state`` (None) per linear layer; they are written and dropped on load.

Distributed checkpoints (``sharded_state_dict``) use the global keys of Megatron's
SequentialMLP / GroupedMLP (``<layers>.mlp.experts.experts.linear_fc1.weight`` of global shape
(layers, E, H, D), split into its gate and up halves; ``linear_fc2.weight`` (layers, E, D, F);
the per-expert ``_extra_state`` objects) and of TopKRouter (``<layers>.mlp.router.weight``), so
a checkpoint written by either library loads into the other.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

EXPERT_LAYOUTS = ("sequential", "grouped")  # Megatron's SequentialMLP / (legacy) GroupedMLP


def check_layout(layout: str) -> str:
    """The one check of an expert-layout argument."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"layout={layout!r}: use one of {EXPERT_LAYOUTS} (Megatron's SequentialMLP or GroupedMLP)")
    return layout


def experts_to_megatron(state: Mapping[str, Optional[Tensor]],
                        layout: str = "sequential") -> Dict[str, Optional[Tensor]]:
    """moekit experts {"w_in_EDH": (L, D, H), "w_out_EFD": (L, F, D), optional "b_in_EH" (L, H),
    "b_out_ED" (L, D)} -> Megatron's state-dict entries relative to the experts module:
    ``local_experts.{e}.linear_fc1.weight`` (H, D) ... for layout="sequential" (SequentialMLP),
    ``weight1`` (D, L*H) / ``weight2`` (L*F, D) for layout="grouped" (GroupedMLP, no biases).
    Tensors are views where the layout allows (no copy)."""
    check_layout(layout)
    w_in, w_out = state["w_in_EDH"], state["w_out_EFD"]
    b_in, b_out = state.get("b_in_EH"), state.get("b_out_ED")
    L, D, H = w_in.shape
    if layout == "grouped":
        if b_in is not None or b_out is not None:
            raise ValueError("layout='grouped': Megatron's GroupedMLP has no expert biases (add_bias_linear=False); "
                             "save as 'sequential' (the adapters' checkpoint_layout attribute)")
        return {"weight1": w_in.reshape(D, L * H), "weight2": w_out.reshape(-1, D)}
    out: Dict[str, Optional[Tensor]] = {}
    for e in range(L):
        for fc, w, b in (("linear_fc1", w_in, b_in), ("linear_fc2", w_out, b_out)):
            out[f"local_experts.{e}.{fc}.weight"] = w[e].t()
            if b is not None:
                out[f"local_experts.{e}.{fc}.bias"] = b[e]
            out[f"local_experts.{e}.{fc}._extra_state"] = None
    return out


def _need(state: Mapping, key: str):
    if key not in state:
        raise KeyError(f"the checkpoint has no '{key}'")
    return state[key]


def experts_from_megatron(state: Mapping[str, Optional[Tensor]], num_local_experts: int) -> Dict[str, Tensor]:
    """Inverse of :func:`experts_to_megatron`: Megatron's expert entries (either layout, relative
    to the experts module; ``_extra_state`` entries ignored) -> {"w_in_EDH", "w_out_EFD"[,
    "b_in_EH", "b_out_ED"]}. Raises KeyError / ValueError naming the Megatron key that is
    missing or has the wrong size."""
    L = num_local_experts
    if "weight1" in state or "weight2" in state:
        w1, w2 = _need(state, "weight1"), _need(state, "weight2")
        D = w1.shape[0]
        if w1.dim() != 2 or w1.shape[1] % L or w2.dim() != 2 or w2.shape[1] != D or w2.shape[0] % L:
            raise ValueError(f"weight1 {tuple(w1.shape)} / weight2 {tuple(w2.shape)} are not GroupedMLP's "
                             f"(D, L*H) / (L*F, D) with L={L} local experts")
        return {"w_in_EDH": w1.reshape(L, D, -1), "w_out_EFD": w2.reshape(L, -1, D)}
    extra = sorted({int(k.split(".")[1]) for k in state if k.startswith("local_experts.")} - set(range(L)))
    if extra:
        raise ValueError(f"the checkpoint has local_experts {extra} but this module holds {L} local experts")
    out = {"w_in_EDH": torch.stack([_need(state, f"local_experts.{e}.linear_fc1.weight").t() for e in range(L)]),
           "w_out_EFD": torch.stack([_need(state, f"local_experts.{e}.linear_fc2.weight").t() for e in range(L)])}
    for fc, name in (("linear_fc1", "b_in_EH"), ("linear_fc2", "b_out_ED")):
        if f"local_experts.0.{fc}.bias" in state:
            out[name] = torch.stack([_need(state, f"local_experts.{e}.{fc}.bias") for e in range(L)])
    return out


# ---- state-dict hooks ------------------------------------------------------------------------------

def take_prefixed(state_dict: dict, prefix: str) -> dict:
    """Remove and return the entries under ``prefix`` (prefix stripped)."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    return {k[len(prefix):]: state_dict.pop(k) for k in keys}


def install_native_layout(module: nn.Module, to_native: Callable[[dict], dict],
                          from_native: Callable[[dict], dict]) -> None:
    """``module.state_dict()`` gives ``to_native(own entries)``; ``module.load_state_dict`` (or a
    parent's) accepts ``from_native``'s input: both fns map {relative key: tensor} dicts. An error
    in ``from_native`` becomes a load error naming the module's prefix."""

    def save_hook(mod, state_dict, prefix, local_metadata):
        state_dict.update({prefix + k: v for k, v in to_native(take_prefixed(state_dict, prefix)).items()})

    def load_hook(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own = take_prefixed(state_dict, prefix)
        try:
            own = from_native(own)
        except (KeyError, ValueError) as err:
            error_msgs.append(f"{type(mod).__name__} at '{prefix}': {err.args[0]}")
        state_dict.update({prefix + k: v for k, v in own.items()})

    module.register_state_dict_post_hook(save_hook)
    module.register_load_state_dict_pre_hook(load_hook)


def router_to_megatron(own: dict, inner: str = "router.") -> dict:
    """{``router.weight``, ...} -> {``weight``, ...}: the wrapped moekit router's entries one level
    up, as TopKRouter holds them."""
    return {k[len(inner):] if k.startswith(inner) else k: v for k, v in own.items()}


def router_from_megatron(own: dict, names, inner: str = "router.") -> dict:
    """Inverse of :func:`router_to_megatron` for the wrapped router's own ``names``; entries already
    under ``inner`` (moekit's earlier layout) are kept."""
    return {inner + k if k in names else k: v for k, v in own.items()}


def experts_module_to_megatron(own: dict, layout: str) -> dict:
    """State-dict entries of a module holding ``moe.GroupedExperts`` as ``experts`` (relative keys)
    -> the same entries with the experts in Megatron's ``layout``."""
    mine = take_prefixed(own, "experts.")
    return {**own, **experts_to_megatron(mine, layout)}


def experts_module_from_megatron(own: dict, num_local_experts: int) -> dict:
    """Inverse of :func:`experts_module_to_megatron` for either layout; moekit's own names
    (``experts.w_in_EDH``, ...) pass through. ``_extra_state`` entries are dropped."""
    own = {k: v for k, v in own.items() if not k.endswith("_extra_state")}
    names = [k for k in own if k.startswith("local_experts.") or k in ("weight1", "weight2")]
    theirs = {k: own.pop(k) for k in names}
    if not theirs:
        return own
    return {**own, **{"experts." + k: v for k, v in experts_from_megatron(theirs, num_local_experts).items()}}


_SHARED = (("w_in.", "linear_fc1."), ("w_out.", "linear_fc2."))  # moe.DenseFFN -> Megatron's MLP


def moe_layer_to_megatron(own: dict, layout: str) -> dict:
    """State-dict entries of a module holding ``moe.MoELayer`` as ``layer`` (relative keys) ->
    Megatron MoELayer's: ``router.*``, ``experts.*`` in ``layout``, ``shared_experts.linear_fc1.*``
    / ``linear_fc2.*`` (with their ``_extra_state``)."""
    router, experts, shared = (take_prefixed(own, f"layer.{n}.") for n in ("router", "experts", "shared_experts"))
    out = {**own, **{"router." + k: v for k, v in router.items()}}
    out.update({"experts." + k: v for k, v in experts_to_megatron(experts, layout).items()})
    for ours, theirs in _SHARED if shared else ():
        out.update({f"shared_experts.{theirs}{k}": v for k, v in take_prefixed(shared, ours).items()})
        out[f"shared_experts.{theirs}_extra_state"] = None
    return {**out, **{"layer.shared_experts." + k: v for k, v in shared.items()}}


def moe_layer_from_megatron(own: dict, num_local_experts: int) -> dict:
    """Inverse of :func:`moe_layer_to_megatron` (either expert layout); moekit's own ``layer.*``
    names pass through; ``_extra_state`` entries are dropped."""
    own = {k: v for k, v in own.items() if not k.endswith("_extra_state")}
    router, experts, shared = (take_prefixed(own, f"{n}.") for n in ("router", "experts", "shared_experts"))
    out = {**own, **{"layer.router." + k: v for k, v in router.items()}}
    if experts:
        out.update({"layer.experts." + k: v for k, v in experts_from_megatron(experts, num_local_experts).items()})
    for ours, theirs in _SHARED:
        out.update({f"layer.shared_experts.{ours}{k}": v for k, v in take_prefixed(shared, theirs).items()})
    return {**out, **{"shared_experts." + k: v for k, v in shared.items()}}


def sharded_dense_ffn(ffn: nn.Module, prefix: str, sharded_offsets: tuple) -> dict:
    """Distributed-checkpoint entries of a ``moe.DenseFFN`` under Megatron MLP's keys
    (``prefix + "linear_fc1.weight"`` (H, D), gated ones split in halves as Megatron's
    ``apply_swiglu_sharded_factory``; ``linear_fc2.weight`` (D, F); ``_extra_state``)."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = {}
    for ours, theirs in _SHARED:
        linear = getattr(ffn, ours[:-1])
        state.update({theirs + n: t for n, t in (("weight", linear.weight), ("bias", linear.bias)) if t is not None})
        state[theirs + "_extra_state"] = None
    out = make_sharded_tensors_for_checkpoint(state, prefix, {"linear_fc1.weight": 0, "linear_fc1.bias": 0,
                                                              "linear_fc2.weight": 1}, sharded_offsets)
    if ffn.w_in.weight.shape[0] != ffn.w_out.weight.shape[1]:  # gated: H = 2F
        for n in ("linear_fc1.weight", "linear_fc1.bias"):
            if prefix + n in out:
                out[prefix + n] = apply_swiglu_sharded_factory(out[prefix + n], sharded_offsets)
    return out


# ---- distributed checkpoints -------------------------------------------------------------------

_EXPERT_TENSORS = {  # moekit name -> (Megatron's name, transposed, split in [gate; up] halves when gated)
    "w_in_EDH": ("linear_fc1.weight", True, True), "w_out_EFD": ("linear_fc2.weight", True, False),
    "b_in_EH": ("linear_fc1.bias", False, True), "b_out_ED": ("linear_fc2.bias", False, False)}


def _build_expert_shards(key, t, replica_id, flattened_range, *, offsets, ep, transpose, halves):
    """(L, ...) moekit tensor -> Megatron's expert ShardedTensor(s): transposed to (L, H, D) /
    (L, D, F) for weights, rows [ep_rank * L, (ep_rank + 1) * L) of the global E axis, and for the
    gated fc1 the gate and up halves as fragments 0 and 1 of the H axis (as GroupedMLP writes)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if flattened_range is not None:
        raise ValueError("moekit experts: flattened (legacy distributed-optimizer) checkpoint shards are not supported")
    n = len(offsets)
    x = t.transpose(-1, -2) if transpose else t
    parts = x.chunk(2, dim=1) if halves else (x,)
    shards = [ShardedTensor.from_rank_offsets(key, part.contiguous(), *offsets, (n, *ep),
                                              *(((n + 1, i, 2),) if halves else ()),
                                              replica_id=replica_id, prepend_axis_num=n)
              for i, part in enumerate(parts)]
    return shards if halves else shards[0]


def _merge_expert_shards(sub, *, transpose, halves):
    x = torch.cat(sub, dim=1) if halves else sub
    return x.transpose(-1, -2) if transpose else x


def sharded_experts(experts: nn.Module, dict_prefix: str, key_prefix: str, sharded_offsets: tuple,
                    metadata, ep_group, expt_dp_group) -> dict:
    """Distributed-checkpoint entries of a ``moe.GroupedExperts`` (local experts of this
    expert-parallel rank): dict keys ``dict_prefix + "w_in_EDH"`` ... (the local state-dict
    names), sharded keys Megatron's (``key_prefix + "experts.linear_fc1.weight"`` ..., with
    key_prefix the prefix of Megatron's experts module), one factory per parameter (so the
    optimizer's states shard the same way), plus SequentialMLP's ``_extra_state`` objects."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    if (metadata or {}).get("singleton_local_shards", False):
        raise ValueError("moekit experts: metadata singleton_local_shards=True is not supported")
    ep_rank, ep_size = (0, 1) if ep_group is None else (ep_group.rank(), ep_group.size())
    dp_rank = 0 if expt_dp_group is None else expt_dp_group.rank()
    L, n = experts.num_experts, len(sharded_offsets)
    gated = experts.w_in_EDH.shape[-1] != experts.w_out_EFD.shape[1]
    out = {}
    for name, (native, transpose, halves) in _EXPERT_TENSORS.items():
        t = getattr(experts, name, None)
        if t is None:
            continue
        halves = halves and gated
        out[dict_prefix + name] = ShardedTensorFactory(
            f"{key_prefix}experts.{native}", t,
            functools.partial(_build_expert_shards, offsets=sharded_offsets, ep=(ep_rank, ep_size),
                              transpose=transpose, halves=halves),
            functools.partial(_merge_expert_shards, transpose=transpose, halves=halves), (0, 0, dp_rank))
    for e in range(L):
        g = ep_rank * L + e
        for fc in ("linear_fc1", "linear_fc2"):
            out[f"{key_prefix}expert{g}.{fc}._extra_state"] = make_sharded_object_for_checkpoint(
                None, f"{key_prefix}experts.{fc}._extra_state", (*sharded_offsets, (n, g, ep_size * L)),
                (0, 0, dp_rank))
    return out


def rename_sharded(out: dict, old_prefix: str, new_prefix: str) -> dict:
    """Move the entries under ``old_prefix`` (dict keys and sharded keys) to ``new_prefix``."""
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    moved = take_prefixed(out, old_prefix)
    replace_prefix_for_sharding(moved, old_prefix, new_prefix)
    out.update({new_prefix + k: v for k, v in moved.items()})
    return out
