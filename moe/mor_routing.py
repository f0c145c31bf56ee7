"""Mixture-of-Recursions (Bae et al. 2025, arXiv:2507.10524) routing pieces used by
:class:`moe.mor.MixtureOfRecursions`: the router configs and capacity schedule (§2.2.1), the
per-step token selection (top-k mask, compaction, gathers) and the KV cache keyed by recursion
step (§2.2.2). Re-exported from ``moe.mor``.

Shape legend: B batch, S positions, K tokens gathered for one recursion step (padded to the
row maximum, `kvalid_BK` marks real ones), D model dim, R recursions (Nr).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.model import KVCache

KV_STRATEGIES = ("recursion_wise", "recursive_sharing")


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


@dataclass(frozen=True, kw_only=True)
class TokenChoiceConfig:
    """§2.2.1 token-choice: one router D -> Nr at the MoR input, depth = argmax."""

    router_func: str = "softmax"  # or "sigmoid"
    alpha: float | None = None  # default 1.0 for softmax, 0.1 for sigmoid (reference)
    balancing: str = "loss"  # "loss", "loss_free" (bias, Wang et al. 2024) or "none"
    balance_coef: float = 0.1
    z_coef: float = 1e-5
    bias_rate: float = 1e-3  # loss-free bias step u, applied by update_router_bias()
    router_init_std: float = 0.02


def default_capacities(num_recursions: int) -> tuple:
    """(Nr - r) / Nr for r = 0..Nr-1 (§2.2.1)."""
    return tuple((num_recursions - r) / num_recursions for r in range(num_recursions))


def _sync_max_count(sel_BS: torch.Tensor) -> int:
    return int(sel_BS.sum(1).max()) if sel_BS.numel() else 0


def compact(sel_BS: torch.Tensor):
    """Selected positions of each row in causal (ascending) order: idx_BK, kvalid_BK.
    idx rows are distinct (a prefix of a permutation), so scatters through them never collide."""
    order_BS = torch.argsort((~sel_BS).to(torch.int8), dim=1, stable=True)
    K = _sync_max_count(sel_BS)
    kvalid_BK = torch.arange(K, device=sel_BS.device) < sel_BS.sum(1, keepdim=True)
    return order_BS[:, :K], kvalid_BK


def _topk_mask(score_BS, active_BS, len_B, capacity: float):
    """Per-row top-k among active tokens, k = floor(capacity * len_B) with len_B the row's real
    sequence length (§2.2.1: the P_beta percentile of the router scores). Equal scores go to
    the earlier position (stable sort), so a row routes the same alone or in any batch.
    Departure: the reference takes max(1, int(capacity * S)), forcing one token through every
    step even when the schedule gives 0 (its issue #9); here k may be 0."""
    k_B = torch.floor(capacity * len_B.double() + 1e-6).long()
    order = torch.argsort(score_BS.masked_fill(~active_BS, float("-inf")), dim=1,
                          descending=True, stable=True)
    rank_BS = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1],
                                               device=order.device).expand_as(order))
    return (rank_BS < k_B[:, None]) & active_BS


def _gather(t_BS_, idx_BK):
    if t_BS_.dim() == 3:
        return t_BS_.gather(1, idx_BK[..., None].expand(-1, -1, t_BS_.shape[-1]))
    return t_BS_.gather(1, idx_BK)


class MoRCache:
    """KV caches of one MoR module, keyed (recursion step r, layer j of the shared block).
    recursion_wise: every step caches its own selected tokens (§2.2.2, memory (Nr+1)/2Nr of
    vanilla under the default schedule); recursive_sharing: only step 0 caches (memory 1/Nr)."""

    def __init__(self):
        self.sites: dict = {}

    def site(self, r: int, j: int) -> KVCache:
        return self.sites.setdefault((r, j), KVCache())

    def num_tokens(self) -> int:
        return sum(c.num_tokens() for c in self.sites.values())
