"""Token-choice top-k routing: softmax or sigmoid scores, group-limited selection, the
auxiliary-loss-free expert bias, the threshold rules of variable-k routing, capacity and
balancing losses.

Shape legend: T tokens, D hidden size, E experts, K top-k slots, Z expert groups (moe/__init__.py: G is attention heads).

Follows Mixtral / Qwen3-MoE (softmax, optional renormalisation of the top-k) and DeepSeek-V3
(sigmoid affinities, node-limited group selection by the sum of each group's top-2 scores,
the bias b_i added for selection only, Eq. 12-16, and routed_scaling_factor). Tests check
identical ids and weights against the routers of Hugging Face transformers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from routers.capacity import DROP_POLICIES, apply_capacity, capacity, check_capacity_factor, keep_first_slots
from routers.checks import check_int, check_number
from routers.losses import (balance_loss_args, balance_statistics, check_loss_config, loss_free_bias_update_,
                            balance_fw_scale, losses_from_statistics, z_loss_scale, z_statistic)
from routers.routing import (RouterBase, Routing, check_logits_finite, count_chosen, expert_counts, make_routing,
                             topk_weights)


def group_limited_topk(choice_TE: Tensor, top_k: int, num_groups: int, topk_groups: int) -> Tensor:
    """ids_TK of the top-k experts among the ``topk_groups`` best of ``num_groups`` equal groups.

    A group's score is the sum of its two highest choice scores (DeepSeek-V3 Sec. 2.1.2, the
    node-limited routing; one score when a group holds one expert). The paper sums the top
    K_r/M scores per group, which is 2 for V3 (K_r=8, M=4); DeepSeek's released inference code
    and Hugging Face hard-code 2, and the parity tests pin that (Megatron uses top_k//topk_groups,
    which differs when top_k/topk_groups != 2). Choice scores include the expert bias.
    """
    T, E = choice_TE.shape
    per_group = E // num_groups
    grouped = choice_TE.view(T, num_groups, per_group)
    group_scores_TZ = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    groups_TZ = group_scores_TZ.topk(topk_groups, dim=-1).indices
    keep_TZ = torch.zeros_like(group_scores_TZ, dtype=torch.bool).scatter(1, groups_TZ, True)
    keep_TE = keep_TZ[:, :, None].expand(T, num_groups, per_group).reshape(T, E)
    masked = choice_TE.masked_fill(~keep_TE, float("-inf"))
    return masked.topk(top_k, dim=-1).indices


THRESHOLD_RULES = ("xmoe", "top_p")


def threshold_keep(probs_sorted_TK: Tensor, threshold: float, rule: str) -> Tensor:
    """bool (T, K): which ranks of the descending probabilities a token keeps.

    With c_i = sum of the probabilities ranked above i (c_0 = 0):
    rule="xmoe" (Yang et al. 2024, XMoE, threshold-based router; reference
    main_thresholdGating): keep rank i iff c_i < threshold; rank 0 is always kept.
    rule="top_p" (Huang et al. 2024, "Harder Tasks Need More Experts", Sec. 3.1, and the
    authors' code): keep every expert whose cumulative probability is <= p plus the first one
    that crosses p, i.e. rank i iff c_i <= p: the smallest prefix whose sum exceeds p. A
    cumulative sum equal to p is settled as in the authors' code (mask cumulative > p, then
    unmask the first crossing): that expert and the next are kept. So the two rules differ
    only when some c_i equals the threshold exactly (the hand-worked vectors of the tests).
    The sums c_i accumulate in float64 and are rounded to the probabilities' dtype, where they
    meet the threshold (rounded to that dtype too): torch.cumsum's arithmetic on the CPU, and
    that of ``torch.ops.moe.topk_route``'s kernels, so ties at the threshold fall the same way.
    """
    T = probs_sorted_TK.shape[0]
    upto_TK = torch.cumsum(probs_sorted_TK, dim=-1, dtype=torch.float64).to(probs_sorted_TK.dtype)
    above_TK = torch.cat([upto_TK.new_zeros(T, 1), upto_TK[:, :-1]], dim=-1)
    if rule == "xmoe":
        keep = above_TK < threshold
        keep[:, 0] = True
        return keep
    if rule == "top_p":
        return above_TK <= threshold
    raise ValueError(f"rule must be one of {THRESHOLD_RULES}, got {rule!r}")


def route_topk(logits_TE: Tensor, bias_E: Optional[Tensor], top_k: int, score: str,
               num_groups: Optional[int], topk_groups: Optional[int], norm_topk: bool,
               scaling: float, valid_T: Optional[Tensor] = None, num_seqs: int = 0,
               check_finite: bool = False, rule: str = "none", threshold: float = 1.0,
               fw_scale: float = 1.0, z_scale: float = 1.0) -> tuple:
    """(ids_TK, weights_TK, probs_TE, counts_E, metrics_2, fw_BE, psum_BE, zsum): a token-choice
    router's scores, selection and weights, and the statistics its metrics and losses need.

    probs = softmax(logits) or sigmoid(logits); the choice scores probs + bias_E (DeepSeek-V3
    Eq. 16: the bias steers selection only) pick the top_k experts, best first, optionally
    within the topk_groups best of num_groups groups (:func:`group_limited_topk`); the weights
    are the chosen probs, renormalised to sum to 1 if norm_topk (Mixtral, Qwen3-MoE;
    DeepSeek-V3 Eq. 13 for sigmoid, with a 1e-20 guard), times ``scaling``
    (routed_scaling_factor). rule "xmoe" or "top_p" (softmax scores, no bias or groups: the
    threshold router, top_k = its max_experts) keeps the prefix of each token's top_k that
    :func:`threshold_keep` keeps at ``threshold``; the other slots get id -1 and weight 0, so the
    weights are the kept probs (renormalised over them with norm_topk); rule "none" keeps all.
    Padded tokens (valid_T False) get ids -1 and weights 0; with
    check_finite, non-finite logits of a real token raise (CPU) or fail a device-side assert.
    The statistics are :func:`route_statistics`' (the loss ids of rule "xmoe": each token's
    first choice, XMoE's l_aux; fw_BE times fw_scale, zsum times z_scale). This is the PyTorch form of
    ``torch.ops.moe.topk_route``, the fused kernel the routers call once moekit's ops are
    registered (its twin, moe/ops/twins.py).
    """
    if check_finite:
        check_logits_finite(logits_TE, valid_T)
    if score == "softmax":
        probs_TE = torch.softmax(logits_TE, dim=-1)
    else:
        probs_TE = torch.sigmoid(logits_TE)
    choice_TE = probs_TE if bias_E is None else probs_TE + bias_E
    if num_groups is None:
        ids_TK = choice_TE.topk(top_k, dim=-1).indices
    else:
        ids_TK = group_limited_topk(choice_TE, top_k, num_groups, topk_groups)
    if rule != "none":
        ids_TK = ids_TK.masked_fill(~threshold_keep(probs_TE.gather(1, ids_TK), threshold, rule), -1)
    eps = 1e-20 if score == "sigmoid" else 0.0
    weights_TK = topk_weights(probs_TE, ids_TK, normalize=norm_topk, scale=scaling, eps=eps)
    if valid_T is not None:
        ids_TK = ids_TK.masked_fill(~valid_T[:, None], -1)
        weights_TK = weights_TK.masked_fill(~valid_T[:, None], 0.0)
    stats = route_statistics(logits_TE, probs_TE, ids_TK, score=score,
                             aux_topk=bias_E is not None or num_groups is not None, valid_T=valid_T,
                             num_seqs=num_seqs, first_choice=rule == "xmoe", fw_scale=fw_scale, z_scale=z_scale)
    return (ids_TK, weights_TK, probs_TE) + stats


def route_statistics(logits_TE: Tensor, probs_TE: Tensor, ids_TK: Tensor, *, score: str, aux_topk: bool,
                     valid_T: Optional[Tensor], num_seqs: int, first_choice: bool = False,
                     fw_scale: float = 1.0, z_scale: float = 1.0) -> tuple:
    """(counts_E, metrics_2, fw_BE, psum_BE, zsum, balance) of a top-k routing (ids_TK, -1 for
    padded tokens and for the slots a threshold rule dropped), before capacity.

    counts_E int64 (E,): routed slots per expert (Routing.counts_E); metrics_2 float32
    (dropped_fraction = 0, experts_per_token), Routing's metrics of a routing without drops.
    With num_seqs = B > 0 (T = B*S tokens, sequence b the tokens b*S..b*S+S-1), the statistics of
    the losses (:func:`routers.losses.losses_from_statistics`): fw_BE and psum_BE of
    :func:`routers.losses.balance_statistics` on the loss scores (the probs, normalised to sum 1
    per token for sigmoid) and the loss ids (the ids, or with aux_topk, i.e. an expert bias or
    groups, the plain top-k of the loss scores: DeepSeek-V3 Eq. 17-20 and Megatron's
    compute_routing_scores_for_aux_loss; with first_choice, the ids' first slot ids_TK[:, :1]),
    and zsum of :func:`routers.losses.z_statistic`; fw_BE comes multiplied by fw_scale (a balance
    loss's coefficient times E: :func:`routers.losses.balance_fw_scale`) and zsum by z_scale (a
    z-loss's coefficient over the tokens: :func:`statistics_scales`); balance = sum(fw_BE * psum_BE),
    the balance loss itself when fw_scale carries its coefficient. With num_seqs = 0: fw_BE and
    psum_BE are (0, E), zsum and balance 0.
    """
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    counts_E = expert_counts(ids_TK, E).clone()  # (an op's result owns its storage: no view)
    kept = counts_E.sum().to(torch.float32)
    tokens = valid_T.sum() if valid_T is not None else ids_TK.new_full((), T)
    metrics_2 = torch.stack([kept * 0.0, kept / tokens.to(torch.float32).clamp(min=1.0)])
    if num_seqs == 0:
        return (counts_E, metrics_2, probs_TE.new_zeros(0, E), probs_TE.new_zeros(0, E), probs_TE.new_zeros(()),
                probs_TE.new_zeros(()))
    scores_TE = probs_TE if score == "softmax" else probs_TE / (probs_TE.sum(dim=-1, keepdim=True) + 1e-20)
    ids_aux = ids_TK[:, :1] if first_choice else ids_TK
    if aux_topk:
        ids_aux = scores_TE.topk(K, dim=-1).indices
        if valid_T is not None:
            ids_aux = ids_aux.masked_fill(~valid_T[:, None], -1)
    B = num_seqs
    S = T // B
    fw_BE, psum_BE = balance_statistics(scores_TE.reshape(B, S, E), ids_aux.reshape(B, S, ids_aux.shape[1]),
                                        valid_BS=None if valid_T is None else valid_T.reshape(B, S))
    if fw_scale != 1.0:
        fw_BE = fw_BE * fw_scale
    zsum = z_statistic(logits_TE, valid_T=valid_T)
    balance = torch.dot(fw_BE.reshape(-1), psum_BE.reshape(-1))
    return counts_E, metrics_2, fw_BE, psum_BE, zsum * z_scale if z_scale != 1.0 else zsum, balance


def _topk_route_op():
    """``torch.ops.moe.topk_route`` where moekit's ops are registered (``import moe``), else None
    (the routers package does not import moe; :func:`route_topk` then runs)."""
    return getattr(torch.ops.moe, "topk_route", None)


def topk_route(logits_TE: Tensor, bias_E: Optional[Tensor], top_k: int, score: str,
               num_groups: Optional[int], topk_groups: Optional[int], norm_topk: bool,
               scaling: float, valid_T: Optional[Tensor] = None, num_seqs: int = 0,
               check_finite: bool = False, rule: str = "none", threshold: float = 1.0,
               fw_scale: float = 1.0, z_scale: float = 1.0) -> tuple:
    """:func:`route_topk`'s nine results through the fused kernel ``torch.ops.moe.topk_route``
    where moekit's ops are registered (one pass per token, the same experts; probabilities,
    weights and statistics to a few roundings), else through route_topk itself. Every top-k
    style router selects with it, the threshold router too (``rule``)."""
    op = _topk_route_op()
    if op is None:
        return route_topk(logits_TE, bias_E, top_k, score, num_groups, topk_groups, norm_topk, scaling,
                          valid_T, num_seqs, check_finite, rule, threshold, fw_scale, z_scale)
    return op(logits_TE, bias_E, top_k, score, num_groups or 0, topk_groups or 0, norm_topk, scaling,
              valid_T, num_seqs, check_finite, rule, threshold, fw_scale, z_scale)


def statistics_seqs(router: RouterBase, seq_shape: tuple) -> int:
    """topk_route's num_seqs for ``router`` in its mode (its balance_loss, balance_loss_coeff and
    z_loss_coeff): 0, no loss statistics, outside training or without a balance loss or z-loss;
    else the B sequences of the (B, S) input for balance_loss="seq", 1 (the batch) otherwise."""
    balance = router.balance_loss is not None and router.balance_loss_coeff > 0
    if not (router.training and (balance or router.z_loss_coeff > 0)):
        return 0
    return seq_shape[0] if router.balance_loss == "seq" else 1


def _z_count_known(router: RouterBase, valid_T: Optional[Tensor]) -> bool:
    """Whether ``router``'s z-loss is topk_route's zsum itself: a z-loss over a host-known token
    count (no padding mask), which topk_route's z_scale folds in."""
    return router.z_loss_coeff > 0 and valid_T is None


def statistics_scales(router: RouterBase, num_tokens: int, valid_T: Optional[Tensor]) -> tuple:
    """topk_route's (fw_scale, z_scale) for ``router`` over ``num_tokens`` tokens: its balance
    loss's coefficient times E (:func:`routers.losses.balance_fw_scale`), and its z-loss's
    coefficient over the tokens when their count is host-known (:func:`routers.losses.z_loss_scale`;
    else 1.0), so that :func:`statistics_losses` takes topk_route's balance as the balance loss and
    zsum as the z-loss."""
    z_scale = z_loss_scale(router.z_loss_coeff, num_tokens) if _z_count_known(router, valid_T) else 1.0
    return balance_fw_scale(router.balance_loss, router.balance_loss_coeff, router.num_experts), z_scale


def statistics_losses(router: RouterBase, num_seqs: int, zsum: Tensor, balance: Tensor,
                      valid_T: Optional[Tensor]) -> dict:
    """``router``'s balance loss and z-loss from topk_route's statistics (num_seqs from
    :func:`statistics_seqs`, fw_scale and z_scale from :func:`statistics_scales`; {} when num_seqs
    is 0): :func:`routers.losses.losses_from_statistics`."""
    if num_seqs == 0:
        return {}
    num_tokens = None if _z_count_known(router, valid_T) or router.z_loss_coeff <= 0 else valid_T.sum()
    return losses_from_statistics(balance_loss=router.balance_loss, balance_loss_coeff=router.balance_loss_coeff,
                                  z_loss_coeff=router.z_loss_coeff, balance=balance, zsum=zsum, num_tokens=num_tokens)


class TopKBase(RouterBase):
    """Selection, weighting, capacity and losses shared by TopKRouter and RecurrentRouter."""

    def _init_topk(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        score: str,
        norm_topk: Optional[bool],
        routed_scaling_factor: float,
        num_groups: Optional[int],
        topk_groups: Optional[int],
        expert_bias: bool,
        jitter: float,
        capacity_factor: Optional[float],
        drop_policy: str,
        balance_loss: Optional[str],
        balance_loss_coeff: float,
        z_loss_coeff: float,
        check_finite: bool,
    ) -> None:
        self._init_common(hidden_size, num_experts, jitter=jitter, check_finite=check_finite)
        num_experts = self.num_experts
        top_k = check_int("top_k", top_k, maximum=num_experts)
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        capacity_factor = check_capacity_factor(capacity_factor)
        balance_loss, balance_loss_coeff, z_loss_coeff = check_loss_config(balance_loss, balance_loss_coeff,
                                                                           z_loss_coeff)
        routed_scaling_factor = check_number("routed_scaling_factor", routed_scaling_factor, gt=0.0)
        if (num_groups is None) != (topk_groups is None):
            raise ValueError("num_groups and topk_groups must be given together")
        if num_groups is not None:
            num_groups = check_int("num_groups", num_groups, maximum=num_experts)
            if num_experts % num_groups:
                raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups!r}")
            topk_groups = check_int("topk_groups", topk_groups, maximum=num_groups)
            if top_k > topk_groups * (num_experts // num_groups):
                raise ValueError(
                    f"top_k={top_k} exceeds the {topk_groups * (num_experts // num_groups)} experts in "
                    f"topk_groups={topk_groups} groups"
                )
        self.top_k = top_k
        self.score = score
        self.norm_topk = (top_k > 1) if norm_topk is None else bool(norm_topk)
        self.routed_scaling_factor = routed_scaling_factor
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.balance_loss, self.balance_loss_coeff, self.z_loss_coeff = balance_loss, balance_loss_coeff, z_loss_coeff
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _route(self, logits_TE: Tensor, valid_T: Optional[Tensor], seq_shape: tuple, state=None) -> Routing:
        """Scores -> top-k ids, weights, metrics and loss statistics in one op (topk_route) ->
        losses (on the routing before drops, as Megatron) -> capacity."""
        num_seqs = statistics_seqs(self, seq_shape)
        check = self.check_finite and not torch.compiler.is_compiling()
        fw_scale, z_scale = statistics_scales(self, logits_TE.shape[0], valid_T)
        ids_TK, weights_TK, probs_TE, counts_E, metrics_2, fw_BE, psum_BE, zsum, balance = topk_route(
            logits_TE, self.expert_bias, self.top_k, self.score, self.num_groups, self.topk_groups,
            self.norm_topk, self.routed_scaling_factor, valid_T, num_seqs, check, fw_scale=fw_scale, z_scale=z_scale)
        aux = statistics_losses(self, num_seqs, zsum, balance, valid_T)
        if self.capacity_factor is None:
            return Routing(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE,
                           aux_losses=aux, state=state, counts_E=counts_E, dropped_fraction=metrics_2[0],
                           experts_per_token=metrics_2[1])
        chosen = count_chosen(ids_TK, valid_T)
        T = ids_TK.shape[0]
        cap = capacity(T, self.top_k, self.num_experts, self.capacity_factor)
        if self.drop_policy == "probs":
            ids_TK, weights_TK = apply_capacity(ids_TK, weights_TK, weights_TK, cap, self.num_experts)
        else:
            ids_TK, weights_TK = keep_first_slots(ids_TK, weights_TK, cap, self.num_experts)
        return make_routing(
            ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE,
            valid_T=valid_T, chosen_slots=chosen, aux_losses=aux, state=state,
        )

    def combine_weights(self, probs_TE: Tensor, ids_TK: Tensor) -> Tensor:
        """The chosen scores, renormalised over the token's non-empty slots with norm_topk
        (+1e-20 for sigmoid, as DeepSeek-V3), times routed_scaling_factor."""
        eps = 1e-20 if self.score == "sigmoid" else 0.0
        return topk_weights(probs_TE, ids_TK, normalize=self.norm_topk, scale=self.routed_scaling_factor, eps=eps)


class TopKRouter(TopKBase):
    """Linear router + top-k: logits_TE = x_TD @ weight_ED^T, computed in float32.

    score="softmax" (Mixtral, Qwen3-MoE, Switch) or "sigmoid" (DeepSeek-V3). norm_topk
    renormalises the k selected scores to sum to 1 (default: when top_k > 1);
    routed_scaling_factor multiplies the final weights. num_groups/topk_groups restrict the
    choice to the best topk_groups of num_groups expert groups. expert_bias=True adds the
    auxiliary-loss-free bias buffer (DeepSeek-V3 Eq. 16), used for selection only and moved by
    update_expert_bias. jitter multiplies the router input by U(1-jitter, 1+jitter) in training
    (Switch Transformer). capacity_factor=None is dropless; otherwise capacity(T, K, E, factor)
    slots per expert, dropping the lowest weights ("probs") or the latest tokens ("position").
    balance_loss "switch" (batch) or "seq" (per sequence, DeepSeek-V3) times balance_loss_coeff, plus
    z_loss_coeff * z-loss, all returned in Routing.aux_losses in training mode.
    check_finite=True raises on NaN/inf logits (on CUDA as a device-side assert: no host sync).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        score: str = "softmax",
        norm_topk: Optional[bool] = None,
        routed_scaling_factor: float = 1.0,
        num_groups: Optional[int] = None,
        topk_groups: Optional[int] = None,
        expert_bias: bool = False,
        jitter: float = 0.0,
        capacity_factor: Optional[float] = None,
        drop_policy: str = "probs",
        balance_loss: Optional[str] = "switch",
        balance_loss_coeff: float = 1e-2,
        z_loss_coeff: float = 0.0,
        init_std: float = 0.02,
        check_finite: bool = True,
        **deprecated,
    ) -> None:
        super().__init__()
        balance_loss, balance_loss_coeff = balance_loss_args("TopKRouter", balance_loss, balance_loss_coeff, deprecated)
        self._init_topk(
            hidden_size, num_experts, top_k, score=score, norm_topk=norm_topk,
            routed_scaling_factor=routed_scaling_factor, num_groups=num_groups, topk_groups=topk_groups,
            expert_bias=expert_bias, jitter=jitter, capacity_factor=capacity_factor,
            drop_policy=drop_policy, balance_loss=balance_loss, balance_loss_coeff=balance_loss_coeff,
            z_loss_coeff=z_loss_coeff, check_finite=check_finite,
        )
        self._init_linear(init_std)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def forward(self, x: Tensor, *, state=None, padding_mask: Optional[Tensor] = None) -> Routing:
        """x (T, D) or (B, S, D) -> Routing over the T (= B*S) tokens. ``state`` is ignored."""
        return self._route(*self._linear_logits(x, padding_mask))

    @torch.no_grad()
    def update_expert_bias(self, counts_E: Tensor, rate: float = 1e-3) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing (Sec. 2.1.2): after a step, b_i += rate *
        sign(mean(counts) - counts_i), lowering the bias of overloaded experts. counts_E (E,) is
        e.g. Routing.counts_E summed over the step's micro-batches (all-reduce it yourself)."""
        if self.expert_bias is None:
            raise RuntimeError("update_expert_bias needs TopKRouter(..., expert_bias=True)")
        if not isinstance(counts_E, Tensor) or tuple(counts_E.shape) != (self.num_experts,):
            raise ValueError(f"counts_E must be a tensor of shape ({self.num_experts},), got "
                             f"{tuple(counts_E.shape) if isinstance(counts_E, Tensor) else type(counts_E).__name__}")
        loss_free_bias_update_(self.expert_bias, counts_E, rate)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"score={self.score}, capacity_factor={self.capacity_factor}")
