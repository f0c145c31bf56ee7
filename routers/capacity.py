"""Expert capacity: how many slots each expert may take, and which slots it keeps.

Shape legend: T tokens, E experts, K slots. Slots over capacity become ``-1`` with weight 0.
Every size here comes from host-known shapes, so nothing syncs with the device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from routers.checks import check_number

DROP_POLICIES = ("probs", "position")


def capacity(T: int, K: int, E: int, factor: float, *, min_capacity: Optional[int] = None) -> int:
    """Per-expert capacity ceil(T*K/E * factor) (GShard / Switch Transformer, Eq. 3): the one
    capacity rule of moekit (routers, and the expert-parallel dispatcher per source rank)."""
    factor = check_capacity_factor(factor, allow_none=False)
    raw = T * K / E * factor
    if not math.isfinite(raw):
        raise ValueError(f"capacity_factor={factor!r} makes the capacity of {T} tokens x {K} slots / {E} "
                         f"experts overflow")
    cap = math.ceil(raw)
    if min_capacity is not None:
        cap = max(cap, min_capacity)
    return cap


def check_capacity_factor(capacity_factor: Optional[float], *, allow_none: bool = True) -> Optional[float]:
    """The one validation of a capacity factor: a finite number > 0 (or None = dropless, where
    allowed); returns it as float (or None). inf, NaN and bools are refused."""
    if capacity_factor is None:
        if allow_none:
            return None
        raise ValueError("capacity_factor must be a finite number > 0 here, got None (dropless)")
    return check_number("capacity_factor", capacity_factor, gt=0.0)


def apply_capacity(
    ids_TK: Tensor, weights_TK: Tensor, priority_TK: Tensor, capacity: int, num_experts: int
) -> tuple[Tensor, Tensor]:
    """Keep, for every expert, its ``capacity`` routed slots of highest priority; drop the rest.

    ids_TK int64 (T, K) with -1 for empty slots (a token routes to an expert at most once);
    priority_TK float (T, K), finite on routed slots. Returns (ids_TK, weights_TK) with the
    dropped slots set to -1 / 0. Ties at the cut are broken by torch.topk; the capacity is never
    exceeded.
    """
    T = ids_TK.shape[0]
    if capacity >= T:  # one slot per token per expert at most: nothing can overflow
        return ids_TK, weights_TK
    routed = ids_TK >= 0
    col = (ids_TK + 1).clamp(min=0)
    prio = priority_TK.to(torch.promote_types(priority_TK.dtype, torch.float32))
    prio = torch.where(routed, prio, float("-inf"))
    prio_TE = prio.new_full((T, num_experts + 1), float("-inf")).scatter(1, col, prio)[:, 1:]
    top_CE = prio_TE.topk(capacity, dim=0, sorted=False).indices
    keep_TE = torch.zeros(T, num_experts, dtype=torch.bool, device=ids_TK.device).scatter(0, top_CE, True)
    keep_TK = keep_TE.gather(1, ids_TK.clamp(min=0)) & routed
    return ids_TK.masked_fill(~keep_TK, -1), weights_TK.masked_fill(~keep_TK, 0.0)


def keep_first_slots(
    ids_TK: Tensor, weights_TK: Tensor, capacity: int, num_experts: int
) -> tuple[Tensor, Tensor]:
    """``apply_capacity`` with :func:`position_priority` (Megatron's "position" policy: each expert
    keeps its first ``capacity`` routed slots in slot order t*K + k; a token routes to an expert at
    most once, so that is token order), from each slot's rank within its expert: one stable sort
    of the T*K slots instead of a dense (T, E) priority table. Same result; no host sync."""
    if capacity >= ids_TK.shape[0]:
        return ids_TK, weights_TK
    flat = ids_TK.reshape(-1).long()
    key = torch.where(flat >= 0, flat, num_experts)  # empty slots sort last, in their own group
    order = torch.argsort(key, stable=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))
    counts = torch.bincount(key, minlength=num_experts + 1)
    rank = position - (counts.cumsum(0) - counts)[key]  # position within the slot's expert
    drop_TK = ((flat >= 0) & (rank >= capacity)).view_as(ids_TK)
    return ids_TK.masked_fill(drop_TK, -1), weights_TK.masked_fill(drop_TK, 0.0)


def position_priority(ids_TK: Tensor) -> Tensor:
    """Earlier tokens first (Megatron's "position" drop policy): priority T - t for all slots of t."""
    T, K = ids_TK.shape
    t = torch.arange(T, 0, -1, device=ids_TK.device, dtype=torch.float32)
    return t[:, None].expand(T, K)


def xmoe_priority(probs_TK: Tensor) -> Tensor:
    """XMoE capacity priority (Yang et al. 2024, threshold gating; reference fairseq code):
    (K - rank) + probability, for slots sorted by descending probability. Since probabilities are
    in [0, 1], any token's rank-r choice outranks every token's rank-(r+1) choice, and within one
    rank the more probable slot wins."""
    K = probs_TK.shape[1]
    ranks = torch.arange(K, 0, -1, device=probs_TK.device, dtype=torch.float64)
    return ranks[None, :] + probs_TK.to(torch.float64)  # float64: p stays resolvable next to K
