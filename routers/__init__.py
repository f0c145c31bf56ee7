"""moekit routers: decide which experts each token goes to; never move tokens.

Shape legend: T tokens (B*S), D hidden size, E experts, K routing slots, R recurrent router dim.
Every router is an nn.Module with ``num_experts``, ``top_k`` (max slots), ``hidden_size`` and
``forward(x, *, state=None, padding_mask=None) -> Routing``; ``-1`` in ``Routing.ids_TK`` marks
an empty slot (variable k, capacity drop or padding) and carries weight 0. The depth routers of
Mixture-of-Recursions (routers.depth, configs ``routers.depth.ExpertChoiceConfig`` /
``TokenChoiceConfig``) return the same Routing, their "experts" being recursion depths or steps.
"""

from routers.capacity import apply_capacity, capacity, keep_first_slots, position_priority, xmoe_priority
from routers.depth import (ExpertChoiceStepRouter, TokenChoiceDepthRouter, capacity_schedule, default_capacities,
                           per_row_topk)
from routers.expert_choice import ExpertChoiceRouter
from routers.losses import (entropy_loss, loss_free_bias_update_, membership_bce_loss, sequence_load_balancing_loss,
                            switch_load_balancing_loss, z_loss)
from routers.recurrent import RecurrentRouter, RecurrentRouterChain, RecurrentState
from routers.routing import Routing, expert_counts
from routers.threshold import ThresholdRouter
from routers.topk import TopKRouter, group_limited_topk, threshold_keep

__all__ = [
    "Routing",
    "TopKRouter",
    "ThresholdRouter",
    "RecurrentRouter",
    "RecurrentRouterChain",
    "RecurrentState",
    "ExpertChoiceRouter",
    "switch_load_balancing_loss",
    "sequence_load_balancing_loss",
    "z_loss",
    "entropy_loss",
    "capacity",
    "apply_capacity",
    "keep_first_slots",
    "position_priority",
    "xmoe_priority",
    "threshold_keep",
    "group_limited_topk",
    "expert_counts",
    "TokenChoiceDepthRouter",
    "ExpertChoiceStepRouter",
    "capacity_schedule",
    "default_capacities",
    "per_row_topk",
    "membership_bce_loss",
    "loss_free_bias_update_",
]

from routers.hash import HashRouter, balanced_hash_table, frequency_balanced_hash_table  # noqa: E402
from routers.sbase import SBaseRouter, sinkhorn  # noqa: E402

__all__ += ["SBaseRouter", "sinkhorn", "HashRouter", "balanced_hash_table", "frequency_balanced_hash_table"]
