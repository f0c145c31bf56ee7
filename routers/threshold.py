"""Variable-k routing by a probability threshold: XMoE threshold gating and top-p routing.

Shape legend: T tokens, D hidden size, E experts, K slots (max_experts, or E).

Experts are ranked by softmax probability, descending; a token keeps a prefix of that ranking
and the remaining slots are -1. Capacity (when set) drops slots by XMoE's priority.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from routers.capacity import apply_capacity, capacity, check_capacity_factor, xmoe_priority
from routers.checks import check_coefficient, check_int, check_number
from routers.losses import balance_loss_args, check_loss_config, entropy_loss
from routers.routing import RouterBase, Routing, count_chosen, make_routing, topk_weights
from routers.topk import THRESHOLD_RULES, statistics_losses, statistics_scales, statistics_seqs, topk_route


class ThresholdRouter(RouterBase):
    """Softmax router that gives each token as many experts as its probability mass needs.

    threshold in (0, 1]; rule "xmoe" or "top_p" (see routers.topk.threshold_keep). max_experts
    caps the slots K (default E). Weights are the raw probabilities of the kept experts (both
    references), or renormalised to sum to 1 when renormalize=True. Routed by one
    ``torch.ops.moe.topk_route`` with the rule. capacity_factor=None is dropless; otherwise
    each expert keeps ceil(T/E * capacity_factor) slots (XMoE's capacity: the factor counts
    expert slots per token; the reference's min_capacity floor is not applied) chosen by XMoE's
    priority (K - rank) + probability, so every first choice outranks every second choice (the
    reference uses (ranks in use - rank) + probability: the same order). Slots are dropped one
    by one: a token can lose its second expert and keep its first. balance_loss="switch"/"seq":
    balance loss E * sum_i f_i P_i with f_i from each token's top-1 expert for rule="xmoe" (the
    XMoE code's l_aux, computed before drops) and from all kept experts for rule="top_p";
    dynamic_loss_coeff adds top-p routing's entropy ("dynamic") loss; z_loss_coeff the z-loss.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        threshold: float,
        rule: str = "xmoe",
        max_experts: Optional[int] = None,
        renormalize: bool = False,
        capacity_factor: Optional[float] = None,
        balance_loss: Optional[str] = "switch",
        balance_loss_coeff: float = 1e-2,
        z_loss_coeff: float = 0.0,
        dynamic_loss_coeff: float = 0.0,
        jitter: float = 0.0,
        init_std: float = 0.02,
        check_finite: bool = True,
        **deprecated,
    ) -> None:
        super().__init__()
        balance_loss, balance_loss_coeff = balance_loss_args("ThresholdRouter", balance_loss, balance_loss_coeff, deprecated)
        self._init_common(hidden_size, num_experts, jitter=jitter, check_finite=check_finite)
        threshold = check_number("threshold", threshold, gt=0.0, le=1.0)
        if rule not in THRESHOLD_RULES:
            raise ValueError(f"rule must be one of {THRESHOLD_RULES}, got {rule!r}")
        E = self.num_experts
        self.top_k = E if max_experts is None else check_int("max_experts", max_experts, maximum=E)
        self.capacity_factor = check_capacity_factor(capacity_factor)
        self.balance_loss, self.balance_loss_coeff, self.z_loss_coeff = check_loss_config(
            balance_loss, balance_loss_coeff, z_loss_coeff)
        self.dynamic_loss_coeff = check_coefficient("dynamic_loss_coeff", dynamic_loss_coeff)
        self.threshold, self.rule, self.renormalize = threshold, rule, bool(renormalize)
        self._init_linear(init_std)

    def forward(self, x: Tensor, *, state=None, padding_mask: Optional[Tensor] = None) -> Routing:
        """x (T, D) or (B, S, D) -> Routing with K = max_experts slots. ``state`` is ignored.

        One ``torch.ops.moe.topk_route`` with the rule (routers.topk.topk_route: the fused kernel
        where moekit's ops are registered, else its PyTorch twin route_topk) gives the kept ids,
        weights, counts, metrics and the statistics of the balance and z losses; the entropy loss
        and capacity follow in PyTorch."""
        logits_TE, valid_T, seq_shape = self._linear_logits(x, padding_mask)
        num_seqs = statistics_seqs(self, seq_shape)
        check = self.check_finite and not torch.compiler.is_compiling()
        fw_scale, z_scale = statistics_scales(self, logits_TE.shape[0], valid_T)
        ids_TK, weights_TK, probs_TE, counts_E, metrics_2, fw_BE, psum_BE, zsum, balance = topk_route(
            logits_TE, None, self.top_k, "softmax", None, None, self.renormalize, 1.0, valid_T, num_seqs, check,
            self.rule, self.threshold, fw_scale, z_scale)
        aux = statistics_losses(self, num_seqs, zsum, balance, valid_T)
        if self.training and self.dynamic_loss_coeff > 0:
            aux["dynamic"] = self.dynamic_loss_coeff * entropy_loss(probs_TE, valid_T=valid_T)
        if self.capacity_factor is None:
            return Routing(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE,
                           aux_losses=aux, state=None, counts_E=counts_E, dropped_fraction=metrics_2[0],
                           experts_per_token=metrics_2[1])
        chosen = count_chosen(ids_TK, valid_T)
        cap = capacity(ids_TK.shape[0], 1, self.num_experts, self.capacity_factor)
        priority_TK = xmoe_priority(probs_TE.gather(1, ids_TK.clamp(min=0)))  # (empty slots: not ranked)
        ids_TK, weights_TK = apply_capacity(ids_TK, weights_TK, priority_TK, cap, self.num_experts)
        return make_routing(
            ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE,
            valid_T=valid_T, chosen_slots=chosen, aux_losses=aux,
        )

    def combine_weights(self, probs_TE: Tensor, ids_TK: Tensor) -> Tensor:
        """The kept experts' probabilities, renormalised to sum to 1 with renormalize (the weights
        of forward's op; a token without a kept slot, e.g. replayed, gets zeros)."""
        weights_TK = topk_weights(probs_TE, ids_TK)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        return weights_TK

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, rule={self.rule}, "
                f"threshold={self.threshold}, max_experts={self.top_k}")
