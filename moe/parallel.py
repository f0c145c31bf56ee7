"""Expert parallelism over torch.distributed: experts sharded across a process group, tokens
exchanged with all-to-all (GShard, Lepikhin et al. 2020: experts sharded over devices, tokens
dispatched and combined by all-to-all; Megatron-core's all-to-all token dispatcher).

Shape legend: T tokens on this rank, D hidden size, K routing slots, E experts (global),
W ranks in the expert-parallel group, L = E / W local experts (global expert e lives on rank
e // L, as local expert e % L), N = T*K routed-row bound, Q rows received by this rank,
C capacity slots per (source rank, expert) pair.

Dropless mode (``capacity_factor=None``)::

    ids_TK ─plan─► x_ND sorted by global expert (rows for rank r contiguous)
    counts_WL ─all_to_all─► recv_WL           (counts first: recv_WL[s, l] = rows s sends to l)
    _sync_split_sizes(counts_WL, recv_WL)     (THE host sync: split sizes to Python ints)
    x_ND ─all_to_all_single(splits)─► x_QD    (ordered by source, local expert, source's order)
    x_QD ─stable re-sort by local expert─► (local expert, source, source's order), offs_E

Capacity mode (``capacity_factor=f``): every (source, expert) pair owns C = ceil(T*K/E * f)
slots, so all splits are L*C rows: no counts exchange. T is one number for the whole group:
``capacity_tokens`` (a bound the caller passes: no host sync at all after the first dispatch),
else the largest T of the ranks, agreed at every dispatch by :meth:`_sync_check_config` (one
all_gather of a few int64 and one host sync), so ranks with different token counts size C
alike. The first C routed slots of an expert (in slot order t*K + k, Megatron's "position"
policy) are kept; the rest are dropped, exactly as if their id were -1 (no output, no gradient), and
counted in ``state.num_dropped``. Unused slots are zero rows; the experts compute on them but
combine never reads them, so they affect no output and no gradient.

combine reverses the exchange and applies the routing weights (Shazeer et al. 2017, Eq. 1:
y_t = sum_k w_tk E_{e_tk}(x_t)), accumulated in float32. Both exchanges are differentiable:
the backward of an all-to-all is the all-to-all with the splits swapped. Every rank of the
group must call dispatch/combine (and backward) the same number of times, in the same order.

The group's configuration is checked before any token moves: at the first dispatch (and again
when this rank's D, dtype or K change), :meth:`_sync_check_config` gathers every rank's E, D,
K, dtype, mode, capacity_factor, capacity_tokens and T (one all_gather of W x 9 int64, one
host sync) and every rank raises the same ValueError naming the setting and each rank's value
when they differ, or when a rank's dispatch arguments are invalid, instead of one rank
aborting the process in a mismatched all-to-all. Later dispatches check their arguments
locally (a rank that raises there leaves the others waiting in the next collective).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from einops import rearrange

from moe import ops
from moe.dispatch import ExpertRows, check_dispatch_args, combine_weights, routing_args
from routers.capacity import capacity, check_capacity_factor, keep_first_slots
from routers.checks import check_int

__all__ = ["AllToAllDispatcher", "AllToAllState"]

# The fields of _sync_check_config's int64 vector, in order, with the words of its error.
_CONFIG_FIELDS = (("E", "num_experts E"), ("D", "hidden size D (x_TD.shape[1])"),
                  ("K", "routing slots K (ids_TK.shape[1])"), ("dtype", "dtype of x_TD"),
                  ("mode", "mode"), ("capacity_factor", "capacity_factor"),
                  ("capacity_tokens", "capacity_tokens"), ("T", "T"), ("bad_args", "bad_args"))
_DTYPES = tuple(getattr(torch, n) for n in ("float32", "float64", "float16", "bfloat16", "float8_e4m3fn",
                                             "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                if hasattr(torch, n))
_MODES = ("dropless", "capacity")


class _AllToAll(torch.autograd.Function):
    """Rows of x split by ``in_splits`` go to the ranks of ``group``; rows arriving are stacked
    by source rank (sizes ``out_splits``). None splits mean equal splits. Backward: the same
    exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: Optional[list], in_splits: Optional[list], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        out = x.new_empty((rows,) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


@dataclasses.dataclass(frozen=True)
class AllToAllState:
    """What combine needs. plan: this rank's tokens by global expert (after capacity drops);
    weights_TK: routing weights. Dropless: send_splits / recv_splits (rows to / from each rank,
    host ints) and local_plan (re-sort of the Q received rows by local expert). Capacity:
    capacity C and slot_N (send-buffer slot of each routed row; E*C = none). num_dropped: int64
    scalar tensor, slots dropped by the capacity on this rank (0 when dropless)."""

    plan: ops.Plan
    weights_TK: Tensor
    num_dropped: Tensor
    send_splits: Optional[list] = None
    recv_splits: Optional[list] = None
    local_plan: Optional[ops.Plan] = None
    capacity: Optional[int] = None
    slot_N: Optional[Tensor] = None


class AllToAllDispatcher(nn.Module):
    """Dispatch to experts sharded over ``group`` (W ranks, E / W experts each); same interface
    as :class:`moe.dispatch.LocalDispatcher`.

    num_experts: E, global (must be divisible by W). group: the expert-parallel process group
    (None: the default group). capacity_factor: None = dropless (one host sync per dispatch,
    :meth:`_sync_split_sizes`); f > 0 = capacity mode, C = ceil(T*K/E * f) slots per (source
    rank, expert). capacity_tokens: the T that C is sized from, a bound on every rank's T
    (sync-free after the first dispatch); default: the largest T of the group's ranks, agreed at
    every dispatch (:meth:`_sync_check_config`, one small all_gather and host sync), so the
    ranks may hold different token counts. The first dispatch checks that all ranks agree on
    E, D, K, dtype, mode and capacity settings and raises the same ValueError on every rank
    when they do not (see the module docstring)."""

    def __init__(self, num_experts: int, group=None, *, capacity_factor: Optional[float] = None,
                 capacity_tokens: Optional[int] = None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("AllToAllDispatcher: torch.distributed is not initialized; call "
                               "init_process_group before passing group")
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"AllToAllDispatcher: num_experts must be a positive int, got {num_experts!r}")
        world = dist.get_world_size(group)
        if num_experts % world:
            raise ValueError(f"AllToAllDispatcher: num_experts={num_experts} is not divisible by the "
                             f"expert-parallel world size {world}")
        capacity_factor = check_capacity_factor(capacity_factor)
        if capacity_tokens is not None:
            if capacity_factor is None:
                raise ValueError(f"AllToAllDispatcher: capacity_tokens={capacity_tokens!r} needs capacity_factor "
                                 f"(dropless mode has no capacity)")
            capacity_tokens = check_int("capacity_tokens", capacity_tokens, minimum=0)
        self.num_experts, self.group, self.world_size = num_experts, group, world
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("AllToAllDispatcher: this process is not a member of group")
        self.num_local_experts = num_experts // world
        self.capacity_factor, self.capacity_tokens = capacity_factor, capacity_tokens
        self._agreed = None  # (D, dtype, K) the group last agreed on in _sync_check_config

    def capacity(self, num_tokens: int, top_k: int) -> int:
        """C = ceil(T*K/E * capacity_factor) slots per (source rank, expert) (the expert
        capacity of Fedus et al. 2021, Switch Transformer, Eq. 3, per source rank), with
        T = capacity_tokens when set, else ``num_tokens``."""
        if self.capacity_factor is None:
            raise ValueError("AllToAllDispatcher.capacity: dropless (capacity_factor=None) has no capacity")
        T = num_tokens if self.capacity_tokens is None else self.capacity_tokens
        return capacity(T, top_k, self.num_experts, self.capacity_factor)

    def dispatch(self, x_TD: Tensor, routing, weights_TK: Optional[Tensor] = None):
        """x_TD (T, D), routing (``ids_TK`` int (T, K) global expert ids with -1 for empty
        slots, ``weights_TK`` (T, K)) -> (ExpertRows, state): the rows this rank's L experts
        process, materialised and sorted by local expert (then source rank, then the source's
        slot order), with their offsets offs_E int32 (L,). Dropless: Q rows, all routed.
        Capacity: L*W*C rows, each expert's W*C slots holding its routed rows or zeros."""
        try:
            ids_TK, weights_TK, legacy = routing_args("AllToAllDispatcher.dispatch", routing, weights_TK)
            check_dispatch_args(x_TD, ids_TK, weights_TK)
            error, key = None, (x_TD.shape[1], x_TD.dtype, ids_TK.shape[1])
        except (TypeError, ValueError) as e:
            error, key = e, None
        T_group = self._agree(x_TD, key, error)
        weights_TK = combine_weights(weights_TK, x_TD.dtype)
        if self.capacity_factor is None:
            x_ND, offs_E, state = self._dispatch_dropless(x_TD, ids_TK, weights_TK)
        else:
            x_ND, offs_E, state = self._dispatch_capacity(x_TD, ids_TK, weights_TK, T_group)
        return (x_ND, offs_E, state) if legacy else (ExpertRows(x_ND, offs_E), state)

    def _agree(self, x_TD, key, error) -> Optional[int]:
        """Runs :meth:`_sync_check_config`, which reports a rank's invalid arguments (``error``)
        to every rank, at the first dispatch, when this rank's key (D, dtype, K) changed, and at
        every dispatch in capacity mode without capacity_tokens; otherwise raises ``error`` here.
        Returns the T that capacity mode sizes C from."""
        collective = self._agreed is None or (self.capacity_factor is not None and self.capacity_tokens is None)
        if error is not None and not collective:
            raise error
        if not collective and key == self._agreed:
            T = x_TD.shape[0]
            if self.capacity_tokens is not None and T > self.capacity_tokens:
                raise ValueError(f"dispatch: x_TD has T={T} tokens, more than capacity_tokens={self.capacity_tokens}")
            return self.capacity_tokens
        T_group = self._sync_check_config(x_TD, key, error)
        self._agreed = key
        return T_group

    def _sync_check_config(self, x_TD, key, error) -> int:
        """THE configuration check of the group (and, in capacity mode without capacity_tokens,
        the agreement on T): one all_gather of every rank's (E, D, K, dtype, mode,
        capacity_factor, capacity_tokens, T, bad arguments) as W x 9 int64 and one host sync.
        Raises the same ValueError on every rank when the ranks disagree (or a rank's
        arguments are invalid: that rank raises its own error). Returns the T capacity mode
        sizes C from: capacity_tokens, else the largest T of the group."""
        D, dtype, K = key if key is not None else (-1, None, -1)
        cf = -1 if self.capacity_factor is None else struct.unpack("<q", struct.pack("<d", self.capacity_factor))[0]
        mine = [self.num_experts, D, K, _DTYPES.index(dtype) if dtype in _DTYPES else -1,
                int(self.capacity_factor is not None), cf,
                -1 if self.capacity_tokens is None else self.capacity_tokens,
                x_TD.shape[0] if key is not None else -1, int(error is not None)]
        device = x_TD.device if isinstance(x_TD, Tensor) else _group_device(self.group)
        mine_t = torch.tensor(mine, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine_t) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine_t, group=self.group)
        rows = [dict(zip((f for f, _ in _CONFIG_FIELDS), r)) for r in torch.stack(gathered).tolist()]
        if error is not None:
            raise error
        _raise_on_disagreement(rows, self.rank)
        if self.capacity_tokens is not None:
            return self.capacity_tokens
        return max(r["T"] for r in rows)

    def combine(self, y_ND: Tensor, state: AllToAllState) -> Tensor:
        """y_ND expert outputs in dispatch order (the rows dispatch returned) -> y_TD (T, D) on
        the rank that sent the tokens: y_t = sum_k w_tk y_(t,k), float32 accumulation."""
        if not isinstance(state, AllToAllState):
            raise TypeError(f"combine: state must come from AllToAllDispatcher.dispatch, got {type(state).__name__}")
        rows = state.local_plan.max_rows if state.capacity is None else self.num_experts * state.capacity
        if not isinstance(y_ND, Tensor) or y_ND.dim() != 2 or y_ND.shape[0] != rows:
            raise ValueError(f"combine: y_ND must be 2-D with the {rows} rows dispatch returned, got "
                             f"{tuple(y_ND.shape) if isinstance(y_ND, Tensor) else type(y_ND).__name__}")
        if state.capacity is None:
            y_QD = ops.unpermute(y_ND, state.local_plan)  # back to (source, local expert, order)
            y_back = _AllToAll.apply(y_QD, state.send_splits, state.recv_splits, self.group)
            y_back = F.pad(y_back, (0, 0, 0, state.plan.max_rows - y_back.shape[0]))
        else:
            W, L, C = self.world_size, self.num_local_experts, state.capacity
            y_WLC = rearrange(y_ND, "(l w c) d -> (w l c) d", l=L, w=W, c=C)
            y_EC = _AllToAll.apply(y_WLC, None, None, self.group)
            y_back = F.pad(y_EC, (0, 0, 0, 1)).index_select(0, state.slot_N)
        return ops.unpermute(y_back, state.plan, state.weights_TK)

    def _sync_split_sizes(self, counts_WL: Tensor, recv_WL: Tensor) -> tuple[list, list]:
        """THE host-device sync of dropless expert parallelism: all_to_all_single needs its split
        sizes as host ints. counts_WL (W, L): rows this rank sends to each rank's local experts;
        recv_WL (W, L): rows each rank sends here. One device-to-host copy on CUDA. Returns
        (send_splits, recv_splits), W ints each. Capacity mode never calls it."""
        send, recv = torch.stack([counts_WL.sum(1), recv_WL.sum(1)]).tolist()
        return send, recv

    def _exchange_counts(self, counts_WL: Tensor) -> Tensor:
        """all_to_all of per-expert counts (no autograd): recv_WL[s, l] = rows from rank s for
        local expert l."""
        recv_WL = torch.empty_like(counts_WL)
        dist.all_to_all_single(recv_WL, counts_WL.contiguous(), group=self.group)
        return recv_WL

    def _dispatch_dropless(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor):
        W, L = self.world_size, self.num_local_experts
        plan = ops.plan(ids_TK, self.num_experts)
        x_ND = ops.permute(x_TD, plan)
        counts_WL = plan.counts_E.to(torch.int64).view(W, L)
        recv_WL = self._exchange_counts(counts_WL)
        send_splits, recv_splits = self._sync_split_sizes(counts_WL, recv_WL)
        x_QD = _AllToAll.apply(x_ND[: sum(send_splits)], recv_splits, send_splits, self.group)
        expert_of_block = torch.arange(L, device=x_TD.device).repeat(W)
        local_ids_Q = torch.repeat_interleave(expert_of_block, recv_WL.flatten(), output_size=x_QD.shape[0])
        local_plan = ops.plan(local_ids_Q[:, None], L)  # stable: source, then source order
        zero = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        state = AllToAllState(plan, weights_TK, zero, send_splits, recv_splits, local_plan)
        return ops.permute(x_QD, local_plan), local_plan.offs_E, state

    def _dispatch_capacity(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, T_group: int):
        K = ids_TK.shape[1]
        E, W, L, C = self.num_experts, self.world_size, self.num_local_experts, self.capacity(T_group, K)
        # Megatron's "position" policy: each expert keeps its first C routed slots in slot order
        # (one slot per token and expert, so token order is slot order).
        kept_TK, weights_TK = keep_first_slots(ids_TK, weights_TK, C, E)
        num_dropped = (ids_TK >= 0).sum() - (kept_TK >= 0).sum()
        plan = ops.plan(kept_TK, E)
        counts_E = plan.counts_E.to(torch.int64)
        start_E = plan.offs_E.to(torch.int64) - counts_E
        # send buffer: slot e*C + j holds routed row start_E[e] + j, or a zero row (index N)
        j_C = torch.arange(C, device=x_TD.device)
        src_EC = torch.where(j_C < counts_E[:, None], start_E[:, None] + j_C, plan.max_rows)
        x_EC = F.pad(ops.permute(x_TD, plan), (0, 0, 0, 1)).index_select(0, src_EC.flatten())
        x_WLC = _AllToAll.apply(x_EC, None, None, self.group)
        x_LWC = rearrange(x_WLC, "(w l c) d -> (l w c) d", w=W, l=L, c=C)
        offs_E = torch.arange(1, L + 1, dtype=torch.int32, device=x_TD.device) * (W * C)
        # inverse map for combine: routed row i -> its slot; padding rows -> E*C (a zero row)
        i_N = torch.arange(plan.max_rows, device=x_TD.device)
        e_N = torch.searchsorted(plan.offs_E.to(torch.int64), i_N, right=True).clamp(max=E - 1)
        slot_N = torch.where(i_N < plan.offs_E[-1], e_N * C + i_N - start_E[e_N], E * C)
        state = AllToAllState(plan, weights_TK, num_dropped, capacity=C, slot_N=slot_N)
        return x_LWC, offs_E, state

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, world_size={self.world_size}, "
                f"num_local_experts={self.num_local_experts}, capacity_factor={self.capacity_factor}")


def _group_device(group) -> torch.device:
    """Where the group's collectives take tensors when x_TD gives no device: CUDA for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_on_disagreement(rows: list, rank: int) -> None:
    """rows: each rank's fields of _sync_check_config (the same list on every rank), so every
    rank raises the same error, naming each setting the ranks disagree on and each rank's value."""
    bad = [r for r, row in enumerate(rows) if row["bad_args"]]
    if bad:
        raise ValueError(f"AllToAllDispatcher.dispatch: rank(s) {bad} of the expert-parallel group got invalid "
                         f"arguments (their own error says which); no rank exchanged tokens")
    problems = []
    for field, words in _CONFIG_FIELDS[:7]:
        values = [row[field] for row in rows]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {_show(field, v)}" for r, v in enumerate(values))
            problems.append(f"{words} ({shown})")
    cap = rows[0]["capacity_tokens"]
    over = [(r, row["T"]) for r, row in enumerate(rows) if cap >= 0 and row["T"] > cap]
    if over and not problems:
        problems.append(f"T within capacity_tokens={cap} (" + ", ".join(f"rank {r}: T={t}" for r, t in over) + ")")
    if problems:
        raise ValueError("AllToAllDispatcher: the ranks of the expert-parallel group disagree on "
                         + "; ".join(problems) + f" (this is rank {rank}); no rank exchanged tokens")


def _show(field: str, value: int):
    """A field of _sync_check_config's vector as the user wrote it."""
    if field == "dtype":
        return _DTYPES[value] if 0 <= value < len(_DTYPES) else "another dtype"
    if field == "mode":
        return _MODES[value]
    if field == "capacity_factor":
        return None if value == -1 else struct.unpack("<d", struct.pack("<q", value))[0]
    if field == "capacity_tokens":
        return None if value == -1 else value
    return value

