"""Megatron-Core layer spec: :func:`moekit_gpt_layer_spec`, Megatron's local GPT layer spec with
the moekit router, experts or whole MoE layer swapped in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Union

from moe.integrations.megatron.experts import MoekitExperts, MoekitMoELayer
from moe.integrations.megatron.recurrent import RecurrentRouters
from moe.integrations.megatron.router import MoekitRouter, topk_router_from_config


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
    another (a recurrent router gives each its own chain). The model's checkpoints (state dict and
    distributed) use the native keys of the Megatron modules replaced, so checkpoints of a
    ``get_gpt_layer_local_spec`` model load into it and its load into that model
    (moe/integrations/megatron/checkpoint.py)."""
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
