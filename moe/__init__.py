"""moekit: Mixture-of-Experts building blocks for PyTorch.

Shape legend used throughout the package (torchtitan style): T tokens, D model dim,
E experts, K top-k slots, N routed rows (<= T*K), F expert hidden dim, X/Y GEMM in/out dims.
"""

from moe import ops
from moe.ops import Plan

__version__ = "0.1.0"

# Public API, one line per area (helpers append their own names here).
__all__ = ["ops", "Plan"]

# Layers (issue 4): grouped experts, local dispatcher, drop-in MoE layer, model-wide aux loss.
from moe.experts import DenseFFN, GroupedExperts
from moe.dispatch import LocalDispatcher
from moe.layer import MoELayer, aux_loss, release_step
__all__ += ["GroupedExperts", "DenseFFN", "LocalDispatcher", "MoELayer", "aux_loss", "release_step"]

# Decoder block, causal LM and Mixture-of-Recursions (issue 5).
from moe.model import CausalLM, DecoderBlock, KVCache, LMCache, LMOutput, RMSNorm, SwiGLUMLP, build_lm
from moe.mor import (ExpertChoiceConfig, MixtureOfRecursions, MoRCache, TokenChoiceConfig,
                     build_mor_lm)
__all__ += ["CausalLM", "DecoderBlock", "KVCache", "LMCache", "LMOutput", "RMSNorm", "SwiGLUMLP",
            "build_lm", "ExpertChoiceConfig", "TokenChoiceConfig", "MixtureOfRecursions",
            "MoRCache", "build_mor_lm"]

# CLI (issue 7): `moe plan` math (efficiency leverage, arXiv:2507.17702 Eq. 13); `moe` = moe.cli:main.
# (moe.planner.plan is not re-exported: moe.ops.plan is the dispatch plan.)
from moe.planner import PlanConfig, efficiency_leverage, optimal_granularity
__all__ += ["PlanConfig", "efficiency_leverage", "optimal_granularity"]

# Expert parallelism (issue 4): all-to-all token dispatcher over a torch.distributed group.
from moe.parallel import AllToAllDispatcher, AllToAllState
__all__ += ["AllToAllDispatcher", "AllToAllState"]
