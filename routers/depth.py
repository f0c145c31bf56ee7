"""Depth routers of Mixture-of-Recursions (Bae et al. 2025, arXiv:2507.10524, §2.2.1): how many
times the shared block runs on each token. Used by :class:`moe.mor.MixtureOfRecursions`.

Shape legend: B batch, S positions, T tokens (B*S), D hidden size, P recursion steps (Nr); a
trailing 1 is a size-1 slot or expert dim (`ids_T1`, `logits_T1`).

Both return :class:`routers.Routing` with one slot per token (K = 1):
- token choice: one router D -> P at the MoR input; the "experts" are the depths, so
  ids_TK = argmax depth (E = P), weights_TK = the alpha-scaled probability of that depth.
- expert choice: one router D -> 1 per recursion step; the step is a single expert (E = 1)
  that takes the top floor(capacity * len) tokens of each row among those the previous step
  kept (hierarchical filtering): ids_TK = 0 for a kept token, -1 otherwise, weights_TK the gate
  alpha * sigmoid(logit).
Reference code (read, not copied): raymin0223/mixture_of_recursions, model/kv_caches/ and
model/mor_model/ (LinearRouter, expert_choice_router.py, token_choice_router.py). Routers compute
in float32 (float64 for float64 input), as every router of this package.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from routers.checks import check_coefficient, check_int, check_number
from routers.losses import loss_free_bias_update_, membership_bce_loss, switch_load_balancing_loss, z_loss
from routers.routing import RouterBase, Routing, count_chosen, expert_counts, make_routing, topk_weights

EVAL_ROUTINGS = ("threshold", "topk")
DEPTH_BALANCING = ("loss", "loss_free", "none")


@dataclass(frozen=True, kw_only=True)
class ExpertChoiceConfig:
    """§2.2.1 expert-choice: step r keeps the top capacities[r] fraction of the sequence among
    the tokens kept at r-1 (hierarchical filtering); default capacity (Nr - r) / Nr."""

    capacities: tuple | None = None
    alpha: float = 0.1  # gate g = alpha * sigmoid(logit)
    router_init_std: float = 0.02  # reference LinearRouter: N(0, initializer_range), no bias
    bce_coef: float = 1e-3  # auxiliary BCE of logits vs top-k membership
    z_coef: float = 0.0  # optional router z-loss
    eval_routing: str = "threshold"  # "threshold" (causal) or "topk" (reference, non-causal)
    cap_warmup_steps: int = 0  # reference cap_warmup_step: capacity 1 -> target (warmup_capacity)


@dataclass(frozen=True, kw_only=True)
class TokenChoiceConfig:
    """§2.2.1 token-choice: one router D -> Nr at the MoR input, depth = argmax."""

    router_func: str = "softmax"  # or "sigmoid"
    alpha: float | None = None  # default 1.0 for softmax, 0.1 for sigmoid (reference)
    balancing: str = "loss"  # "loss", "loss_free" (bias, Wang et al. 2024) or "none"
    balance_coef: float = 0.1
    z_coef: float = 1e-5
    bias_rate: float = 1e-3  # loss-free bias step u, applied by update_bias()
    router_init_std: float = 0.02
    bal_warmup_steps: int = 0  # reference bal_warmup_step: every token to the deepest step at first


def warmup_capacity(target: float, forward: int, warmup_steps: int) -> float:
    """The reference's expert-choice capacity warm-up (model/mor_model/expert_choice_router.py,
    cap_warmup_step): at training forward t (1-based) the capacity is
    target + (1 - target) * (1 + cos(pi * min(1, t / warmup_steps))) / 2, from 1 down to the
    target; warmup_steps = 0: the target throughout."""
    if warmup_steps <= 0:
        return target
    return target + (1 - target) * 0.5 * (1 + math.cos(math.pi * min(1.0, forward / warmup_steps)))


def in_balancing_warmup(forward: int, warmup_steps: int) -> bool:
    """The reference's token-choice balancing warm-up (model/mor_model/token_choice_router.py,
    bal_warmup_step): training forward t (1-based) with t < warmup_steps sends every token to the
    deepest recursion (its gate the router's probability of that depth; a loss-free bias is held
    at zero), so the router learns before it decides."""
    return forward < warmup_steps


def default_capacities(num_recursions: int) -> tuple:
    """(Nr - r) / Nr for r = 0..Nr-1 (§2.2.1)."""
    return tuple((num_recursions - r) / num_recursions for r in range(num_recursions))


def capacity_schedule(cfg: ExpertChoiceConfig, num_recursions: int) -> tuple:
    """cfg.capacities (default :func:`default_capacities`), checked: one per step, in [0, 1],
    non-increasing (a step chooses among the previous step's tokens)."""
    caps = tuple(cfg.capacities) if cfg.capacities is not None else default_capacities(num_recursions)
    if len(caps) != num_recursions:
        raise ValueError(f"capacities has {len(caps)} entries, num_recursions={num_recursions}")
    caps = tuple(check_number(f"capacities[{r}]", c, ge=0.0, le=1.0) for r, c in enumerate(caps))
    if any(b > a for a, b in zip(caps, caps[1:])):
        raise ValueError(f"capacities={caps} must be non-increasing (hierarchical filtering)")
    return caps


def per_row_topk(score_BS: Tensor, active_BS: Tensor, len_B: Tensor, capacity: float) -> Tensor:
    """bool (B, S): per row, the top k = floor(capacity * len_B) active positions by score, len_B
    the row's real length (§2.2.1: the P_beta percentile of the router scores). Equal scores go
    to the earlier position (stable sort), so a row routes the same alone or in any batch.
    Departure: the reference takes max(1, int(capacity * S)), forcing one token through every
    step even when the schedule gives 0 (its issue #9); here k may be 0."""
    k_B = torch.floor(capacity * len_B.double() + 1e-6).long()
    order_BS = torch.argsort(score_BS.masked_fill(~active_BS, float("-inf")), dim=1,
                             descending=True, stable=True)
    ranks = torch.arange(order_BS.shape[1], device=order_BS.device).expand_as(order_BS)
    rank_BS = torch.empty_like(order_BS).scatter_(1, order_BS, ranks)
    return (rank_BS < k_B[:, None]) & active_BS


class ExpertChoiceStepRouter(RouterBase):
    """The router of one expert-choice recursion step: logit = theta_r^T h (bias-free, theta_r ~
    N(0, router_init_std)), gate g = alpha * sigmoid(logit).

    Training (and eval_routing="topk"): keep :func:`per_row_topk` of the active tokens, k =
    floor(capacity * len); eval_routing="threshold" in eval keeps the active tokens with
    sigmoid(logit) > 0.5 (a causal rule: the top-k membership the BCE loss trains the router to
    predict). In training, aux_losses holds "bce" (bce_coef * :func:`membership_bce_loss` over
    the active tokens) and "z_loss" (z_coef * z-loss; logsumexp of one logit is the logit), each
    only when its coefficient is > 0; ``last_stats`` keeps both unweighted (detached).
    """

    def __init__(self, hidden_size: int, capacity: float, cfg: ExpertChoiceConfig, *,
                 check_finite: bool = True) -> None:
        super().__init__()
        self._init_common(hidden_size, 1, jitter=0.0, check_finite=check_finite)
        capacity = check_number("capacity", capacity, ge=0.0, le=1.0)
        check_number("alpha", cfg.alpha, gt=0.0)
        check_number("router_init_std", cfg.router_init_std, ge=0.0)
        check_coefficient("bce_coef", cfg.bce_coef)
        check_coefficient("z_coef", cfg.z_coef)
        check_int("cap_warmup_steps", cfg.cap_warmup_steps, minimum=0)
        if cfg.eval_routing not in EVAL_ROUTINGS:
            raise ValueError(f"eval_routing={cfg.eval_routing!r} must be one of {EVAL_ROUTINGS}")
        self.top_k, self.capacity, self.cfg = 1, capacity, cfg
        self.last_stats: dict = {}
        self._init_linear(cfg.router_init_std)

    @property
    def nominal_experts_per_token(self) -> float:
        return self.capacity

    def combine_weights(self, probs_TE: Tensor, ids_TK: Tensor) -> Tensor:
        """alpha * sigmoid gate of the kept tokens (0 for the others)."""
        return self.cfg.alpha * topk_weights(probs_TE, ids_TK)

    def forward(self, x: Tensor, *, state=None, padding_mask: Optional[Tensor] = None,
                active: Optional[Tensor] = None, capacity: Optional[float] = None) -> Routing:
        """x (B, S, D) (or (T, D): one row) -> Routing over B*S tokens, E = K = 1.
        padding_mask (B, S): real tokens, whose count per row sets k; active (B, S): the tokens
        the previous step kept (default: the real ones), the only candidates and the only
        tokens in the losses. Routing.dropped_fraction is the fraction of active tokens not kept.
        capacity: this call's capacity instead of the router's (the capacity warm-up,
        :func:`warmup_capacity`). ``state`` is ignored."""
        logits_T1, valid_T, (B, S) = self._linear_logits(x, padding_mask)
        self._check_logits(logits_T1, valid_T)
        self.last_stats = {}
        capacity = self.capacity if capacity is None else check_number("capacity", capacity, ge=0.0, le=1.0)
        real_T = valid_T if valid_T is not None else torch.ones(B * S, dtype=torch.bool, device=x.device)
        active_T = real_T if active is None else active.reshape(-1) & real_T
        logit_BS = logits_T1.view(B, S)
        if capacity >= 1.0:
            keep_T = active_T
        elif self.training or self.cfg.eval_routing == "topk":
            keep_T = per_row_topk(logit_BS.detach(), active_T.view(B, S), real_T.view(B, S).sum(1),
                                  capacity).reshape(-1)
        else:
            keep_T = active_T & (logits_T1[:, 0] > 0)  # sigmoid(logit) > 0.5
        probs_T1 = torch.sigmoid(logits_T1)
        ids_T1 = torch.where(keep_T, 0, -1)[:, None]
        aux = self._losses(logits_T1, keep_T, active_T) if self.training else {}
        return make_routing(ids_TK=ids_T1, weights_TK=self.combine_weights(probs_T1, ids_T1),
                            probs_TE=probs_T1, logits_TE=logits_T1, valid_T=active_T, chosen_slots=active_T.sum(),
                            aux_losses=aux)

    def _losses(self, logits_T1, keep_T, active_T) -> dict:
        bce = membership_bce_loss(logits_T1[:, 0], keep_T, valid_T=active_T)
        z = z_loss(logits_T1, valid_T=active_T)
        self.last_stats = {"bce": bce.detach(), "z_loss": z.detach()}
        coefs = {"bce": self.cfg.bce_coef, "z_loss": self.cfg.z_coef}
        return {name: coefs[name] * loss for name, loss in (("bce", bce), ("z_loss", z)) if coefs[name] > 0}

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, capacity={self.capacity}, alpha={self.cfg.alpha}"


class TokenChoiceDepthRouter(RouterBase):
    """One router D -> P (bias-free, N(0, router_init_std)) choosing each token's depth:
    probs = alpha * softmax(logits) (or alpha * sigmoid), depth = argmax(probs + depth_bias),
    gate = probs[depth] (the bias selects only).

    In training, aux_losses holds "load_balancing" (balance_coef * the Switch loss P * sum_i f_i
    P_i, Fedus et al. 2022 Eq. 4, :func:`routers.switch_load_balancing_loss` on the alpha-scaled
    probabilities; balancing="loss" only) and "z_loss" (z_coef * z-loss of the logits, Zoph et
    al. 2022 Eq. 5), each when its coefficient is > 0; ``last_stats`` keeps the unweighted
    losses and the load fractions f (detached). balancing="loss_free" (Wang et al. 2024) adds
    the buffer depth_bias (P,), moved only by :meth:`update_bias`; training forwards add their
    load to load_sum.
    """

    def __init__(self, hidden_size: int, num_recursions: int, cfg: TokenChoiceConfig, *,
                 check_finite: bool = True) -> None:
        super().__init__()
        num_recursions = check_int("num_recursions", num_recursions)
        self._init_common(hidden_size, num_recursions, jitter=0.0, check_finite=check_finite)
        if cfg.router_func not in ("softmax", "sigmoid"):
            raise ValueError(f"router_func={cfg.router_func!r} must be 'softmax' or 'sigmoid'")
        if cfg.balancing not in DEPTH_BALANCING:
            raise ValueError(f"balancing={cfg.balancing!r} must be one of {DEPTH_BALANCING}")
        alpha = cfg.alpha if cfg.alpha is not None else (1.0 if cfg.router_func == "softmax" else 0.1)
        alpha = check_number("alpha", alpha, gt=0.0)
        check_number("router_init_std", cfg.router_init_std, ge=0.0)
        for name in ("balance_coef", "z_coef", "bias_rate"):
            check_coefficient(name, getattr(cfg, name))
        check_int("bal_warmup_steps", cfg.bal_warmup_steps, minimum=0)
        self.top_k, self.alpha, self.cfg = 1, alpha, cfg
        self.register_buffer("depth_bias", torch.zeros(num_recursions))
        self.register_buffer("load_sum", torch.zeros(num_recursions), persistent=False)
        self.last_stats: dict = {}
        self._init_linear(cfg.router_init_std)

    def forward(self, x: Tensor, *, state=None, padding_mask: Optional[Tensor] = None,
                deepest: bool = False) -> Routing:
        """x (B, S, D) or (T, D) -> Routing over T tokens: ids_TK (T, 1) the depth index (steps
        taken - 1; -1 on padding), E = P. deepest (training only): every token takes the
        deepest step and a loss-free bias is reset to zero (the balancing warm-up,
        :func:`in_balancing_warmup`). ``state`` is ignored."""
        logits_TP, valid_T, _ = self._linear_logits(x, padding_mask)
        self._check_logits(logits_TP, valid_T)
        self.last_stats = {}
        if self.cfg.router_func == "softmax":
            probs_TP = torch.softmax(logits_TP, dim=-1) * self.alpha
        else:
            probs_TP = torch.sigmoid(logits_TP) * self.alpha
        if deepest and self.training:
            self.depth_bias.zero_()
            ids_T1 = torch.full_like(logits_TP[:, :1], self.num_experts - 1, dtype=torch.long)
        else:
            choice_TP = probs_TP + self.depth_bias if self.cfg.balancing == "loss_free" else probs_TP
            ids_T1 = choice_TP.detach().argmax(-1, keepdim=True)
        weights_T1 = probs_TP.gather(-1, ids_T1)
        if valid_T is not None:
            ids_T1 = ids_T1.masked_fill(~valid_T[:, None], -1)
        aux = self._losses(logits_TP, probs_TP, ids_T1, valid_T) if self.training else {}
        return make_routing(ids_TK=ids_T1, weights_TK=weights_T1, probs_TE=probs_TP, logits_TE=logits_TP,
                            valid_T=valid_T, chosen_slots=count_chosen(ids_T1, valid_T), aux_losses=aux)

    def _losses(self, logits_TP, probs_TP, ids_T1, valid_T) -> dict:
        n = ids_T1.shape[0] if valid_T is None else int(valid_T.sum())  # host sync, as before
        if n == 0:
            return {}
        bal = switch_load_balancing_loss(probs_TP, ids_T1, valid_T=valid_T)
        z = z_loss(logits_TP, valid_T=valid_T)
        counts_P = expert_counts(ids_T1, self.num_experts)
        load_P = (counts_P.to(probs_TP.dtype) / n).detach()
        if self.cfg.balancing == "loss_free":
            self.load_sum += load_P.to(self.load_sum.dtype)
        self.last_stats = {"balancing_loss": bal.detach(), "z_loss": z.detach(), "load": load_P}
        out = {}
        if self.cfg.balancing == "loss" and self.cfg.balance_coef > 0:
            out["load_balancing"] = self.cfg.balance_coef * bal
        if self.cfg.z_coef > 0:
            out["z_loss"] = self.cfg.z_coef * z
        return out

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing (Wang et al. 2024, Alg. 1) by :func:`routers.losses.loss_free_bias_update_`:
        b_i += u * sign(mean(load) - load_i), load summed over the training forwards since the
        last call, then reset. Call it once per optimizer step, as the reference trainer does
        (trainer_pt.py); forward never moves the bias, so a recomputed forward (activation
        checkpointing) routes identically."""
        if self.cfg.balancing != "loss_free":
            raise RuntimeError("update_bias needs TokenChoiceConfig(balancing='loss_free')")
        loss_free_bias_update_(self.depth_bias, self.load_sum, self.cfg.bias_rate)
        self.load_sum.zero_()

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_recursions={self.num_experts}, "
                f"router_func={self.cfg.router_func}, balancing={self.cfg.balancing}")
