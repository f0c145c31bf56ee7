"""moekit: Mixture-of-Experts building blocks for PyTorch.

Shape legend used throughout the package (torchtitan style): T tokens, D model dim,
E experts, K top-k slots, N routed rows (<= T*K), F expert hidden dim, X/Y GEMM in/out dims.
"""

from moe import ops
from moe.ops import Plan

__version__ = "0.1.0"

# Public API, one line per area (helpers append their own names here).
__all__ = ["ops", "Plan"]

# Layers: the router -> dispatcher -> experts contract (ExpertRows), grouped experts, the local
# dispatcher, the drop-in MoE layer, the model-wide sum of auxiliary losses.
from moe.dispatch import ExpertRows, LocalDispatcher
from moe.experts import DenseFFN, GroupedExperts
from moe.layer import MoELayer, aux_loss, collect_aux_losses, release_step
__all__ += ["ExpertRows", "GroupedExperts", "DenseFFN", "LocalDispatcher", "MoELayer", "collect_aux_losses",
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
