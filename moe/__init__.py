"""moekit: Mixture-of-Experts building blocks for PyTorch.

Shape legend, one meaning per letter across the Python and C++ code (a tensor's suffix names its
dims, torchtitan style: ``x_TD`` is (T, D)):

    B batch          S positions (query)   U key positions      G attention heads   A head dim
    T tokens         D model dim           V vocabulary         E experts           K top-k slots
    N routed rows (the host-side bound T*K)                     F FFN hidden dim
    H a first projection's width (2F for gated activations)     X / Y a GEMM's input / output dim
    M rows of one plain GEMM (C++ GEMM routines)               C capacity per expert
    W expert-parallel ranks   L local experts (E / W)           Q rows an expert-parallel rank receives
    Z expert groups (group-limited routing)
    R recurrent router dim (RMoE)   P recursion steps (MoR)     J tokens of one recursion step (MoR)
"""

from moe import ops
from moe.ops import Plan

__version__ = "0.1.0"

# Public API, one line per area (helpers append their own names here).
__all__ = ["ops", "Plan"]

# Layers: the router -> dispatcher -> experts contract (ExpertRows), grouped experts, the local
# dispatcher, the drop-in MoE layer, the model-wide sum of auxiliary losses.
from moe.dispatch import ExpertRows, LocalDispatcher
from moe.experts import DenseFFN, GroupedExperts, to_linear_layout
from moe.layer import MoELayer, aux_loss, collect_aux_losses, release_step
__all__ += ["ExpertRows", "GroupedExperts", "to_linear_layout", "DenseFFN", "LocalDispatcher", "MoELayer", "collect_aux_losses",
            "release_step"]

# Decoder block, causal LM and Mixture-of-Recursions.
from moe.model import CausalLM, DecoderBlock, KVCache, LMCache, LMOutput, RMSNorm, SwiGLUMLP, build_lm
from moe.mor import (ExpertChoiceConfig, MixtureOfRecursions, MoRCache, TokenChoiceConfig,
                     build_mor_lm)
__all__ += ["CausalLM", "DecoderBlock", "KVCache", "LMCache", "LMOutput", "RMSNorm", "SwiGLUMLP",
            "build_lm", "ExpertChoiceConfig", "TokenChoiceConfig", "MixtureOfRecursions",
            "MoRCache", "build_mor_lm"]

# The applications (CLI, demo, plots, planner) live in moe.apps, which the library never imports.
# moe.PlanConfig / efficiency_leverage / optimal_granularity: deprecated aliases of moe.apps.planner's.
_MOVED_TO_APPS = {"PlanConfig": "moe.apps.planner", "efficiency_leverage": "moe.apps.planner",
                  "optimal_granularity": "moe.apps.planner"}


def __getattr__(name: str):
    if name not in _MOVED_TO_APPS:
        raise AttributeError(f"module 'moe' has no attribute {name!r}")
    import importlib
    import warnings

    where = _MOVED_TO_APPS[name]
    warnings.warn(f"moe.{name} moved to {where}.{name}; the alias moe.{name} will be removed in "
                  f"the next release", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(where), name)


# Expert parallelism: all-to-all token dispatcher over a torch.distributed group.
from moe.parallel import AllToAllDispatcher, AllToAllState
__all__ += ["AllToAllDispatcher", "AllToAllState"]

# Routing replay and consistency (RL on MoE: moe.replay.record / replay / routing_consistency) and
# sparse upcycling of dense FFNs into MoE layers.
from moe import replay
from moe.upcycle import upcycle, upcycle_model
__all__ += ["replay", "upcycle", "upcycle_model"]

# Weight-only int8 experts for inference.
from moe.quant import Int8GroupedExperts, quantize_experts
__all__ += ["Int8GroupedExperts", "quantize_experts"]
