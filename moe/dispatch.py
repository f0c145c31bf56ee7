"""Token dispatchers: move routed tokens to their experts and the expert outputs back.

Shape legend: T tokens, D hidden size, K routing slots, E experts, N routed rows (the bound
T*K; rows past offs_E[-1] are zero padding).

Every dispatcher has no parameters and the same two methods (torchtitan's token-dispatcher
split):

    x_ND, offs_E, state = dispatcher.dispatch(x_TD, ids_TK, weights_TK)
    y_TD = dispatcher.combine(experts(x_ND, offs_E), state)

``dispatch`` returns the rows of the experts held here (``num_local_experts`` of them), sorted
by local expert, with their local offsets; ``combine`` applies the routing weights,
y_TD[t] = sum_k weights_TK[t, k] * y_ND[row(t, k)] (the gate-weighted sum of Shazeer et al.
2017, Eq. 1), accumulated in float32. ``LocalDispatcher`` serves all experts on this device;
``moe.parallel.AllToAllDispatcher`` shards them over an expert-parallel group.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from moe import ops

__all__ = ["LocalDispatcher", "LocalDispatchState"]


@dataclasses.dataclass(frozen=True)
class LocalDispatchState:
    """What combine needs: the plan of the dispatch and the routing weights (T, K)."""

    plan: ops.Plan
    weights_TK: Tensor


class LocalDispatcher(nn.Module):
    """Dropless single-device dispatch on moe.ops: plan (counting sort by expert), permute, and
    a weighted unpermute in combine. No host sync: N = T*K rows are allocated, the padding rows
    past offs_E[-1] (empty slots, id -1) are zero and never read."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def dispatch(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor):
        """x_TD (T, D), ids_TK int (T, K) with -1 for empty slots, weights_TK (T, K) ->
        (x_ND (T*K, D) sorted by expert, offs_E int32 (E,), LocalDispatchState)."""
        state = self.plan(x_TD, ids_TK, weights_TK)
        return ops.permute(x_TD, state.plan), state.plan.offs_E, state

    def plan(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> LocalDispatchState:
        """dispatch without the permuted copy: only the plan and the weights, for experts that
        read their rows from x_TD in place (:meth:`moe.GroupedExperts.gathered`)."""
        _check_dispatch_args(x_TD, ids_TK, weights_TK)
        plan = ops.plan(ids_TK, self.num_experts)
        if weights_TK.dtype not in (torch.float32, x_TD.dtype):
            weights_TK = weights_TK.to(torch.float32)
        return LocalDispatchState(plan, weights_TK)

    def combine(self, y_ND: Tensor, state: LocalDispatchState) -> Tensor:
        """y_ND (N, D) expert outputs in dispatch order -> y_TD (T, D), weighted by the routing
        weights; differentiable in y_ND and the weights."""
        if not isinstance(state, LocalDispatchState):
            raise TypeError(f"combine: state must come from LocalDispatcher.dispatch, got {type(state).__name__}")
        return ops.unpermute(y_ND, state.plan, state.weights_TK)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


def _check_dispatch_args(x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> None:
    """Shape checks only (metadata, no sync); id ranges are checked by moe.ops.plan."""
    if not isinstance(x_TD, Tensor) or x_TD.dim() != 2:
        raise ValueError(f"dispatch: x_TD must be a 2-D tensor (T, D), got "
                         f"{tuple(x_TD.shape) if isinstance(x_TD, Tensor) else type(x_TD).__name__}")
    if not isinstance(ids_TK, Tensor) or ids_TK.dim() != 2 or ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"dispatch: ids_TK must have shape (T={x_TD.shape[0]}, K), got "
                         f"{tuple(ids_TK.shape) if isinstance(ids_TK, Tensor) else type(ids_TK).__name__}")
    if not isinstance(weights_TK, Tensor) or weights_TK.shape != ids_TK.shape:
        raise ValueError(f"dispatch: weights_TK must have the shape of ids_TK {tuple(ids_TK.shape)}, got "
                         f"{tuple(weights_TK.shape) if isinstance(weights_TK, Tensor) else type(weights_TK).__name__}")
