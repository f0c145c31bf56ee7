"""The one result type every router returns, and the input checks all routers share.

Shape legend: T tokens (B*S when x is (B, S, D)), D model dim (hidden_size), E experts,
K routing slots (the most experts a router can give one token), R recurrent router dim.

An empty slot is the id ``-1``: a variable-k router's unused slot, a token dropped by capacity,
or a padded token. Empty slots always carry weight 0. Metrics stay tensors (no host syncs).
"""

from __future__ import annotations

import functools

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routers.checks import check_int, check_number


@dataclass(frozen=True)
class Routing:
    """What a router decided for a flat batch of T tokens.

    ids_TK: int64 (T, K) expert ids, best first; -1 marks an empty slot.
    weights_TK: float32 (T, K) combine weights; exactly 0 in empty slots.
    probs_TE: float32 (T, E) router scores (softmax probabilities, or sigmoid affinities).
    logits_TE: float32 (T, E) router logits.
    aux_losses: name -> float32 scalar, coefficients already applied; empty in eval mode.
    state: the recurrent router's new hidden state (T, R) float32, else None.
    counts_E: int64 (E,) routed (non-empty) slots per expert, after capacity.
    dropped_fraction: float32 scalar, slots dropped by capacity / slots chosen (for expert
        choice: the fraction of tokens that no expert took).
    experts_per_token: float32 scalar, mean non-empty slots per (non-padded) token.

    Float tensors are float32 whatever x's dtype, except that float64 x gives float64 (gradcheck).
    """

    ids_TK: Tensor
    weights_TK: Tensor
    probs_TE: Tensor
    logits_TE: Tensor
    aux_losses: dict
    state: Optional[Tensor]
    counts_E: Tensor
    dropped_fraction: Tensor
    experts_per_token: Tensor

    @property
    def top_k(self) -> int:
        """K, the number of slots (the most experts any token can get)."""
        return self.ids_TK.shape[1]

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[1]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routers compute in float32 whatever the input dtype; float64 input stays float64 (so
    gradcheck can run)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expert_counts(ids_TK: Tensor, num_experts: int) -> Tensor:
    """int64 (E,) number of slots routed to each expert; -1 slots are not counted (no sync)."""
    counts = ids_TK.new_zeros(num_experts + 1, dtype=torch.int64)
    flat = (ids_TK.reshape(-1) + 1).to(torch.int64)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts[1:]


def make_routing(
    *,
    ids_TK: Tensor,
    weights_TK: Tensor,
    probs_TE: Tensor,
    logits_TE: Tensor,
    valid_T: Optional[Tensor],
    chosen_slots: Tensor,
    aux_losses: dict,
    state: Optional[Tensor] = None,
) -> Routing:
    """Blank padded tokens, zero the weight of every empty slot and compute the metrics.

    chosen_slots is the number of non-empty slots before capacity (a 0-d tensor), the
    denominator of dropped_fraction.
    """
    if valid_T is not None:
        ids_TK = ids_TK.masked_fill(~valid_T[:, None], -1)
    weights_TK = weights_TK.masked_fill(ids_TK < 0, 0.0)
    num_experts = probs_TE.shape[1]
    counts_E = expert_counts(ids_TK, num_experts)
    kept = counts_E.sum().to(torch.float32)
    chosen = chosen_slots.to(torch.float32)
    dropped_fraction = (chosen - kept) / chosen.clamp(min=1.0)
    num_tokens = valid_T.sum() if valid_T is not None else ids_TK.new_full((), ids_TK.shape[0])
    experts_per_token = kept / num_tokens.to(torch.float32).clamp(min=1.0)
    return Routing(
        ids_TK=ids_TK,
        weights_TK=weights_TK,
        probs_TE=probs_TE,
        logits_TE=logits_TE,
        aux_losses=aux_losses,
        state=state,
        counts_E=counts_E,
        dropped_fraction=dropped_fraction,
        experts_per_token=experts_per_token,
    )


def count_chosen(ids_TK: Tensor, valid_T: Optional[Tensor]) -> Tensor:
    """0-d int64: the non-empty slots of the non-padded tokens."""
    chosen = ids_TK >= 0
    if valid_T is not None:
        chosen = chosen & valid_T[:, None]
    return chosen.sum()


def topk_weights(probs_TE: Tensor, ids_TK: Tensor, *, normalize: bool = False, scale: float = 1.0,
                 eps: float = 0.0) -> Tensor:
    """The combine weights of the experts ids_TK (T, K) from the scores probs_TE (T, E): each
    slot's score, 0 in empty slots (-1); with ``normalize`` divided by the token's sum over its
    non-empty slots (+ eps), then times ``scale`` (Mixtral / Qwen3-MoE's renormalised top-k,
    DeepSeek-V3's Eq. 13 with routed_scaling_factor). The one weight rule of the top-k style
    routers, also used to recompute weights at replayed ids (moe.replay)."""
    weights_TK = probs_TE.gather(1, ids_TK.clamp(min=0)).masked_fill(ids_TK < 0, 0.0)
    if normalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + eps)
    return weights_TK * scale if scale != 1.0 else weights_TK


def _linear_f32_op():
    """``torch.ops.moe.linear_f32`` where moekit's ops are registered (``import moe`` registers
    them; the dispatcher then runs the compiled kernel or its twin), else None. x @ W^T for
    bfloat16 x and W with float32 accumulation and a float32 result: the float32 GEMM on upcast
    copies up to the order of the sums (every bfloat16 product is exact in float32), without
    the copies. The routers package does not import moe: without it, the float32 GEMM runs."""
    return getattr(torch.ops.moe, "linear_f32", None)


def _float32_forward(forward):
    """forward run with autocast off on x's device: a router computes its logits, scores and
    losses in float32 at least (compute_dtype), and autocast would round its matmuls to 16 bits
    (then moe.topk_route refuses the bfloat16 logits)."""

    @functools.wraps(forward)
    def run(self, x, *args, **kwargs):
        device = x.device.type if isinstance(x, Tensor) else "cpu"
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return forward(self, x, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return forward(self, x, *args, **kwargs)

    return run


class RouterBase(nn.Module):
    """Input checks and the float32 flattening every router does first. Every subclass's forward
    runs with autocast off (_float32_forward)."""

    hidden_size: int
    num_experts: int
    top_k: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = _float32_forward(cls.__dict__["forward"])

    @property
    def aux_loss(self):
        """Deprecated name of ``balance_loss`` (the load-balancing loss type)."""
        warnings.warn("router.aux_loss is deprecated: use router.balance_loss", DeprecationWarning, stacklevel=2)
        return self.balance_loss

    @aux_loss.setter
    def aux_loss(self, value) -> None:
        warnings.warn("router.aux_loss is deprecated: use router.balance_loss", DeprecationWarning, stacklevel=2)
        self.balance_loss = value

    @property
    def nominal_experts_per_token(self) -> float:
        """Experts a token uses, nominally: k (the maximum for variable-k routers); expert choice
        overrides it. Layers size their active parameters and FLOPs with it."""
        return self.top_k

    def _init_common(self, hidden_size: int, num_experts: int, *, jitter: float, check_finite: bool) -> None:
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.num_experts = check_int("num_experts", num_experts)
        self.jitter = check_number("jitter", jitter, ge=0.0, lt=1.0)
        self.check_finite = bool(check_finite)

    def _prepare(self, x: Tensor, padding_mask: Optional[Tensor], device: torch.device, upcast: bool = True):
        """x (T, D) or (B, S, D) -> (x_TD in compute_dtype, valid_T bool or None, (B, S)).

        (T, D) input counts as one sequence (B=1) for the sequence-level loss. Multiplicative
        jitter (Switch Transformer, Sec. 2.4) is applied to the router input in training only.
        upcast=False keeps x's dtype (for moe.linear_f32, which takes bfloat16 operands; never
        with jitter, which is applied in float32).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ValueError(f"x must have shape (T, D) or (B, S, D), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has last dim {x.shape[-1]}, expected hidden_size={self.hidden_size}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.device != device:
            raise ValueError(f"x is on {x.device} but the router's parameters are on {device}")
        seq_shape = tuple(x.shape[:2]) if x.dim() == 3 else (1, x.shape[0])
        x_TD = x.reshape(-1, self.hidden_size)
        if upcast:
            x_TD = x_TD.to(compute_dtype(x.dtype))
        valid_T = None
        if padding_mask is not None:
            if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
                raise TypeError("padding_mask must be a bool tensor (True = real token)")
            if tuple(padding_mask.shape) not in (tuple(x.shape[:-1]), (x_TD.shape[0],)):
                raise ValueError(
                    f"padding_mask has shape {tuple(padding_mask.shape)}, expected "
                    f"{tuple(x.shape[:-1])} or ({x_TD.shape[0]},)"
                )
            if padding_mask.device != x.device:
                raise ValueError(f"padding_mask is on {padding_mask.device} but x is on {x.device}")
            valid_T = padding_mask.reshape(-1)
            x_TD = x_TD.masked_fill(~valid_T[:, None], 0.0)  # padded rows: whatever they hold, route zeros
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        return x_TD, valid_T, seq_shape

    def combine_weights(self, probs_TE: Tensor, ids_TK: Tensor) -> Tensor:
        """weights_TK (T, K) this router gives the experts ids_TK (T, K; -1 empty) from its scores
        probs_TE (T, E): the score of each chosen expert (routers that renormalise or scale
        override it). moe.replay recomputes the weights of replayed ids with it."""
        return topk_weights(probs_TE, ids_TK)

    def _init_linear(self, init_std: float) -> None:
        """A linear gate: weight (E, D), the layout of Hugging Face's router ``weight``."""
        self.init_std = check_number("init_std", init_std, ge=0.0)
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_size))
        nn.init.normal_(self.weight, std=self.init_std)

    def reset_parameters(self) -> None:
        """Explicit init of the linear gate: N(0, init_std)."""
        nn.init.normal_(self.weight, std=self.init_std)

    def _linear_logits(self, x: Tensor, padding_mask: Optional[Tensor]):
        """-> (logits_TE = x_TD @ weight^T in the compute dtype, valid_T, seq_shape)."""
        op = _linear_f32_op()
        fast = (op is not None and isinstance(x, Tensor) and x.dtype == torch.bfloat16
                and self.weight.dtype == torch.bfloat16 and not (self.training and self.jitter > 0))
        x_TD, valid_T, seq_shape = self._prepare(x, padding_mask, self.weight.device, upcast=not fast)
        if fast:  # the same float32 logits, from the bfloat16 operands
            return op(x_TD, self.weight), valid_T, seq_shape
        return F.linear(x_TD, self.weight.to(x_TD.dtype)), valid_T, seq_shape

    def _check_logits(self, logits_TE: Tensor, valid_T: Optional[Tensor]) -> None:
        if not self.check_finite or torch.compiler.is_compiling():
            return
        check_logits_finite(logits_TE, valid_T)


def check_logits_finite(logits_TE: Tensor, valid_T: Optional[Tensor]) -> None:
    """Refuse NaN/inf router logits of real tokens: a ValueError on the CPU (reading the flag is
    free), a device-side assert elsewhere (torch._assert_async: no host sync). The top-k routers
    pass check_finite to ``torch.ops.moe.topk_route``, whose kernels check in their pass."""
    if logits_TE.device.type == "cpu":
        _check_finite(logits_TE, valid_T)
    else:  # no host sync on accelerators: a device-side assert fails the next sync point
        torch._assert_async(_all_finite(logits_TE, valid_T), _NOT_FINITE)


_NOT_FINITE = ("router logits contain NaN or inf (x or the router weights are not finite); "
               "the router refuses to route them")


def _all_finite(logits_TE: Tensor, valid_T: Optional[Tensor]) -> Tensor:
    finite = torch.isfinite(logits_TE).all(dim=-1)
    if valid_T is not None:
        finite = finite | ~valid_T
    return finite.all()


def _check_finite(logits_TE: Tensor, valid_T: Optional[Tensor]) -> None:
    """Raise if any non-padded router logit is NaN or inf (CPU: reading the flag is free).
    On CUDA the same check is a device-side assert (torch._assert_async), so it costs no host
    sync; ``check_finite=False`` on the router turns both off."""
    if not bool(_all_finite(logits_TE, valid_T)):
        raise ValueError(_NOT_FINITE)
