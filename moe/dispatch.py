"""Token dispatchers: move routed tokens to their experts and the expert outputs back.

Shape legend: T tokens, D hidden size, K routing slots, E experts, N routed rows (the bound
T*K; rows past offs_E[-1] are zero padding).

One contract from router to experts (torchtitan's token-dispatcher split, with scattermoe's
gathered rows)::

    routing = router(x)                                  # routers.Routing: ids_TK, weights_TK, ...
    rows, state = dispatcher.dispatch(x_TD, routing)     # ExpertRows for the experts held here
    y_TD = dispatcher.combine(experts(rows), state)      # experts: ExpertRows -> y_ND

:class:`ExpertRows` is either materialised (``x`` is x_ND, the rows sorted by expert) or a
gathered view (``x`` is x_TD and ``plan`` says which token each expert row reads: experts that
know it, like :class:`moe.GroupedExperts`, read the rows in place and skip the T*K x D copy;
any other module calls :meth:`ExpertRows.materialize`). ``combine`` applies the routing weights,
y_TD[t] = sum_k weights_TK[t, k] * y_ND[row(t, k)] (the gate-weighted sum of Shazeer et al.
2017, Eq. 1), accumulated in float32.

With ``LocalDispatcher`` and :class:`moe.GroupedExperts`, MoELayer asks the experts for the combined
output, ``experts(rows, combine=state)``: the same values as ``combine(experts(rows), state)``, with
the second projection and the weighted unpermute in one op (``ops.grouped_mm_unpermute``, whose
backward keeps no (N, D) expert outputs).

``LocalDispatcher`` serves all experts on this device (gathered rows);
``moe.parallel.AllToAllDispatcher`` shards them over an expert-parallel group (materialised
rows). A new dispatcher implements the same two methods and ``num_local_experts``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from moe import ops

__all__ = ["ExpertRows", "LocalDispatcher", "LocalDispatchState", "check_dispatch_args", "combine_weights",
           "routing_args"]


@dataclasses.dataclass(frozen=True)
class ExpertRows:
    """The rows the experts held here process, sorted by (local) expert.

    x: x_ND (N, D), the rows themselves, or, when ``plan`` is set, x_TD (T, D): the tokens, of
        which expert row i is x_TD[plan.order_N[i] // K] (a gathered view).
    offs_E: int32 (E,), cumulative end row of each expert's group; rows past offs_E[-1] are
        padding (zero, never read).
    plan: the dispatch plan of a gathered view, else None.
    """

    x: Tensor
    offs_E: Tensor
    plan: Optional[ops.Plan] = None

    @property
    def gathered(self) -> bool:
        return self.plan is not None

    @property
    def num_rows(self) -> int:
        """N, the row count of the expert outputs (the host-side bound, padding included)."""
        return self.plan.max_rows if self.plan is not None else self.x.shape[0]

    def materialize(self) -> "ExpertRows":
        """The same rows as an (N, D) tensor (a permuted copy for a gathered view)."""
        if self.plan is None:
            return self
        return ExpertRows(ops.permute(self.x, self.plan), self.offs_E)


@dataclasses.dataclass(frozen=True)
class LocalDispatchState:
    """What combine needs: the plan of the dispatch and the routing weights (T, K)."""

    plan: ops.Plan
    weights_TK: Tensor


def combine_weights(weights_TK: Tensor, dtype: torch.dtype) -> Tensor:
    """The routing weights as the weighted unpermute takes them: float32, or the rows' ``dtype``
    (any other dtype is cast to float32)."""
    return weights_TK if weights_TK.dtype in (torch.float32, dtype) else weights_TK.to(torch.float32)


def routing_args(op: str, routing, weights_TK):
    """(ids_TK, weights_TK, legacy) from dispatch's arguments: a Routing, or the deprecated
    (ids_TK, weights_TK) pair."""
    if weights_TK is None:
        if not (hasattr(routing, "ids_TK") and hasattr(routing, "weights_TK")):
            raise TypeError(f"{op}: routing must be a routers.Routing (ids_TK, weights_TK), got "
                            f"{type(routing).__name__}")
        return routing.ids_TK, routing.weights_TK, False
    warnings.warn(f"{op}(x_TD, ids_TK, weights_TK) is deprecated: pass the router's Routing, "
                  f"{op}(x_TD, routing), which returns (ExpertRows, state)", DeprecationWarning, stacklevel=3)
    return routing, weights_TK, True


class LocalDispatcher(nn.Module):
    """Dropless single-device dispatch on moe.ops: plan (counting sort by expert) and a weighted
    unpermute in combine. The rows are a gathered view of x_TD: no copy unless the experts
    materialise it. No host sync: N = T*K rows, the padding rows past offs_E[-1] (empty slots,
    id -1) are zero and never read."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def dispatch(self, x_TD: Tensor, routing, weights_TK: Optional[Tensor] = None):
        """x_TD (T, D), routing (``ids_TK`` int (T, K) with -1 for empty slots, ``weights_TK``
        (T, K)) -> (ExpertRows gathered from x_TD, LocalDispatchState)."""
        ids_TK, weights_TK, legacy = routing_args("LocalDispatcher.dispatch", routing, weights_TK)
        check_dispatch_args(x_TD, ids_TK, weights_TK)
        plan = ops.plan(ids_TK, self.num_experts)
        state = LocalDispatchState(plan, combine_weights(weights_TK, x_TD.dtype))
        if legacy:
            return ops.permute(x_TD, plan), plan.offs_E, state
        return ExpertRows(x_TD, plan.offs_E, plan), state

    def combine(self, y_ND: Tensor, state: LocalDispatchState) -> Tensor:
        """y_ND (N, D) expert outputs in dispatch order -> y_TD (T, D), weighted by the routing
        weights; differentiable in y_ND and the weights."""
        if not isinstance(state, LocalDispatchState):
            raise TypeError(f"combine: state must come from LocalDispatcher.dispatch, got {type(state).__name__}")
        return ops.unpermute(y_ND, state.plan, state.weights_TK)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


def check_dispatch_args(x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> None:
    """Shape checks every dispatcher runs (metadata, no sync); id ranges are checked by
    moe.ops.plan."""
    if not isinstance(x_TD, Tensor) or x_TD.dim() != 2:
        raise ValueError(f"dispatch: x_TD must be a 2-D tensor (T, D), got "
                         f"{tuple(x_TD.shape) if isinstance(x_TD, Tensor) else type(x_TD).__name__}")
    if not isinstance(ids_TK, Tensor) or ids_TK.dim() != 2 or ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"dispatch: ids_TK must have shape (T={x_TD.shape[0]}, K), got "
                         f"{tuple(ids_TK.shape) if isinstance(ids_TK, Tensor) else type(ids_TK).__name__}")
    if not isinstance(weights_TK, Tensor) or weights_TK.shape != ids_TK.shape:
        raise ValueError(f"dispatch: weights_TK must have the shape of ids_TK {tuple(ids_TK.shape)}, got "
                         f"{tuple(weights_TK.shape) if isinstance(weights_TK, Tensor) else type(weights_TK).__name__}")
