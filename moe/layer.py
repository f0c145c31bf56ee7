"""MoELayer: a drop-in replacement for a transformer FFN, and the fine-grained constructor.

Shape legend: T tokens (all leading dims of x flattened), D hidden size, E routed experts,
K routing slots, N routed rows (T*K), F routed expert hidden size.

    x (..., D) ──router──► Routing(ids_TK, weights_TK, aux_losses)
        └─► dispatcher.dispatch ──► ExpertRows ──► GroupedExperts ──► dispatcher.combine ──► + shared(x)

With the default LocalDispatcher the rows are a gathered view of x: the experts' first
projection reads each routed row from x in place (ops.gather_grouped_mm), the same values without
the T*K x D permuted copy, in forward or backward (moe/dispatch.py has the contract); and the
experts' second projection and the weighted combine are one op (GroupedExperts.combined,
ops.grouped_mm_unpermute): the same values, and the backward keeps no T*K x D expert outputs (nor,
under autograd with SwiGLU, the T*K x F activation). The experts module is then called as
``experts(rows, combine=state)`` and returns y_TD (T, D): its forward hooks see the combined output.

The output is y = sum_k g_k(x) E_{ids_k}(x) + S(x) (Shazeer et al. 2017, Eq. 1, plus the shared
experts of DeepSeekMoE, Dai et al. 2024, Eq. 9). Routers come from ``routers/``: any of them plugs
in, the threshold router (variable k, empty slots -1) and a recurrent chain's layer included.
After a forward the layer keeps ``aux_losses`` (its routing losses by name, coefficients applied,
differentiable; empty in eval) and ``last_routing``; :func:`collect_aux_losses` sums every
module's ``aux_losses`` over a model (the one sum of auxiliary losses in moekit).

CUDA graphs: the forward has no host sync, so a whole training step (forward, loss with
``collect_aux_losses(model)``, backward) captures as it is in ``torch.cuda.CUDAGraph`` (PyTorch's
whole-network capture: warm-up steps on the capture stream, then the captured one). After eager
steps on another stream, call :func:`release_step` first: the ``aux_losses`` and
``last_routing`` a forward leaves keep its autograd graph alive, and with it the parameters'
gradient accumulators, which remember the stream they were made on; a captured backward then has
to synchronise with that stream, which CUDA refuses during capture.
``torch.cuda.make_graphed_callables`` replays only what forward returns, so losses kept on the
module would be left from the capture; build the layer with ``return_aux_loss=True`` there:
forward returns ``(y, total auxiliary loss)`` and keeps no ``aux_losses`` on the module, so
``collect_aux_losses(model)`` does not count them twice (tests/gpu/test_gpu_graphs.py).
"""

from __future__ import annotations

import functools
import operator
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from moe.dispatch import LocalDispatcher
from moe.experts import DenseFFN, GroupedExperts

__all__ = ["MoELayer", "collect_aux_losses", "release_step", "aux_loss"]


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _ep_world_size(ep_group) -> int:
    size = getattr(ep_group, "size", None)
    if callable(size):
        return int(size())
    import torch.distributed as dist

    return dist.get_world_size(ep_group)


class MoELayer(nn.Module):
    """Mixture-of-Experts FFN: ``y = layer(x)`` for x (..., hidden_size), y of x's shape.

    Args: hidden_size D, ffn_hidden_size F of each routed expert, num_experts E (routed), top_k
    (the default router's k; with ``router=`` it may be omitted and is the router's slot count).
    router: any router of ``routers/`` (default ``routers.TopKRouter(D, E, top_k,
    capacity_factor=capacity_factor, **router_kwargs)``). num_shared_experts /
    shared_ffn_hidden_size (default F): one dense FFN of hidden num_shared * shared_ffn, added
    to every token (DeepSeekMoE). activation: "swiglu" | "geglu" | "gelu" | "relu"; bias for
    the experts. dispatcher: a token dispatcher (default ``LocalDispatcher``); ep_group: an
    expert-parallel process group, which makes ``moe.parallel.AllToAllDispatcher(num_experts,
    ep_group, capacity_factor=ep_capacity_factor, capacity_tokens=ep_capacity_tokens)`` and keeps
    num_experts / world_size experts here. ep_capacity_factor is its padded capacity mode; C is
    sized from ep_capacity_tokens, a bound on every rank's T (sync-free), else from the largest T
    of the ranks, agreed at each forward (one small all_gather and host sync).
    x of shape (B, S, D) reaches the router as (B, S, D) (sequence-level losses), any other
    shape as (T, D). forward(x, *, padding_mask=None, state=None) forwards both to the router.
    return_aux_loss: forward returns ``(y, aux_loss)`` instead of keeping aux_loss on the module
    (which then stays None): the form ``torch.cuda.make_graphed_callables`` and other
    transforms that see only a forward's outputs need.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int,
                 top_k: Optional[int] = None, *, router: Optional[nn.Module] = None,
                 num_shared_experts: int = 0, shared_ffn_hidden_size: Optional[int] = None,
                 activation: str = "swiglu", bias: bool = False,
                 capacity_factor: Optional[float] = None, router_kwargs: Optional[dict] = None,
                 dispatcher=None, ep_group=None, ep_capacity_factor: Optional[float] = None,
                 ep_capacity_tokens: Optional[int] = None, return_aux_loss: bool = False) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size),
                            ("num_experts", num_experts)):
            _check_positive(name, value)
        self.hidden_size, self.ffn_hidden_size, self.num_experts = hidden_size, ffn_hidden_size, num_experts
        self.router = self._make_router(top_k, router, capacity_factor, router_kwargs or {})
        self.top_k = self.router.top_k
        self.dispatcher = self._make_dispatcher(dispatcher, ep_group, ep_capacity_factor, ep_capacity_tokens)
        self.experts = GroupedExperts(self.dispatcher.num_local_experts, hidden_size, ffn_hidden_size,
                                      activation=activation, bias=bias)
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        self.num_shared_experts = num_shared_experts
        self.shared_ffn_hidden_size = ffn_hidden_size if shared_ffn_hidden_size is None else shared_ffn_hidden_size
        _check_positive("shared_ffn_hidden_size", self.shared_ffn_hidden_size)
        self.shared_experts = (DenseFFN(hidden_size, num_shared_experts * self.shared_ffn_hidden_size,
                                        activation=activation, bias=bias) if num_shared_experts else None)
        self.granularity = 1
        self.return_aux_loss = bool(return_aux_loss)
        self.aux_losses: dict = {}
        self.last_routing = None

    def _make_router(self, top_k, router, capacity_factor, router_kwargs) -> nn.Module:
        E, D = self.num_experts, self.hidden_size
        if router is None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= E:
                raise ValueError(f"top_k must be an int in [1, num_experts={E}], got {top_k!r}")
            from routers import TopKRouter

            return TopKRouter(D, E, top_k, capacity_factor=capacity_factor, **router_kwargs)
        if capacity_factor is not None or router_kwargs:
            raise ValueError("capacity_factor and router_kwargs configure the default router; "
                             "set them on the router you pass")
        if getattr(router, "num_experts", None) != E or getattr(router, "hidden_size", None) != D:
            raise ValueError(f"router has num_experts={getattr(router, 'num_experts', None)} and hidden_size="
                             f"{getattr(router, 'hidden_size', None)}, expected num_experts={E}, hidden_size={D}")
        if top_k is not None and top_k != router.top_k:
            raise ValueError(f"top_k={top_k!r} but router.top_k={router.top_k}; omit top_k with router=")
        return router

    def _make_dispatcher(self, dispatcher, ep_group, ep_capacity_factor, ep_capacity_tokens):
        E = self.num_experts
        if ep_group is None:
            for name, value in (("ep_capacity_factor", ep_capacity_factor),
                                ("ep_capacity_tokens", ep_capacity_tokens)):
                if value is not None:
                    raise ValueError(f"{name} needs ep_group")
            return LocalDispatcher(E) if dispatcher is None else dispatcher
        if dispatcher is not None:
            raise ValueError("pass either dispatcher or ep_group, not both")
        world = _ep_world_size(ep_group)
        if E % world:
            raise ValueError(f"num_experts={E} is not divisible by the expert-parallel world size {world}")
        from moe.parallel import AllToAllDispatcher

        return AllToAllDispatcher(E, ep_group, capacity_factor=ep_capacity_factor,
                                  capacity_tokens=ep_capacity_tokens)

    @classmethod
    def fine_grained(cls, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int,
                     granularity: int, num_shared_experts: int = 0, **kwargs) -> "MoELayer":
        """Fine-grained expert segmentation (DeepSeekMoE, Dai et al. 2024, Sec. 3.1-3.2; the
        granularity G of Krajewski et al. 2024): each of the E experts of hidden F becomes G
        experts of hidden F/G and k becomes k*G, so parameters and FLOPs are unchanged. Of the
        E*G fine experts, K_s = num_shared_experts are shared (always active, hidden F/G each) and
        carved out of the budget as in DeepSeekMoE Eq. 9-11: E*G - K_s routed experts, top
        k*G - K_s."""
        _check_positive("granularity", granularity)
        _check_positive("top_k", top_k)
        if not isinstance(ffn_hidden_size, int) or ffn_hidden_size % granularity:
            raise ValueError(f"ffn_hidden_size={ffn_hidden_size!r} is not divisible by granularity={granularity}")
        if not isinstance(num_shared_experts, int) or not 0 <= num_shared_experts < top_k * granularity:
            raise ValueError(f"num_shared_experts must be an int in [0, top_k*granularity={top_k * granularity}), "
                             f"got {num_shared_experts!r}")
        if "shared_ffn_hidden_size" in kwargs:
            raise ValueError("fine_grained sets shared_ffn_hidden_size = ffn_hidden_size // granularity")
        fine = ffn_hidden_size // granularity
        layer = cls(hidden_size, fine, num_experts * granularity - num_shared_experts,
                    top_k * granularity - num_shared_experts, num_shared_experts=num_shared_experts,
                    shared_ffn_hidden_size=fine, **kwargs)
        layer.granularity = granularity
        return layer

    @property
    def _experts_combine(self) -> bool:
        """Whether the experts apply the combine themselves (``experts(rows, combine=state)``): the
        library's LocalDispatcher and GroupedExperts, their combine and forward not overridden (a
        subclass's own forward or combine runs as written)."""
        return (type(self.dispatcher).combine is LocalDispatcher.combine
                and getattr(type(self.experts), "forward", None) is GroupedExperts.forward)

    @property
    def routes_on_input_ids(self) -> bool:
        """True when the router routes on token ids (routers.HashRouter): forward then needs input_ids."""
        return bool(getattr(self.router, "routes_on_input_ids", False))

    def forward(self, x: Tensor, *, padding_mask: Optional[Tensor] = None, state=None,
                input_ids: Optional[Tensor] = None):
        """x (..., D) -> y (..., D), or (y, aux_loss) with return_aux_loss. padding_mask
        (x.shape[:-1], True = real token) keeps padded tokens out of the routed experts and the
        losses; ``state`` goes to the router; input_ids (x.shape[:-1], the tokens' ids) go to a
        router that routes on them (``routes_on_input_ids``) and are ignored by the others."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has shape {tuple(x.shape)}: its last dim must be hidden_size={self.hidden_size}")
        x_TD = x.reshape(-1, self.hidden_size)
        if x.dim() != 3 and padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        ids = {}
        if self.routes_on_input_ids:
            flat = x.dim() != 3 and isinstance(input_ids, Tensor)
            ids = {"input_ids": input_ids.reshape(-1) if flat else input_ids}
        routing = self.router(x if x.dim() == 3 else x_TD, state=state, padding_mask=padding_mask, **ids)
        rows, dispatch_state = self.dispatcher.dispatch(x_TD, routing)
        if self._experts_combine:  # the local combine is a weighted unpermute: one op with the last GEMM
            y_TD = self.experts(rows, combine=dispatch_state)
        else:
            y_TD = self.dispatcher.combine(self.experts(rows), dispatch_state)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        self.last_routing = routing
        if self.return_aux_loss:  # the sum of the losses, or a zero without any (no "0 +": one op less)
            losses = list(routing.aux_losses.values())
            total = (functools.reduce(operator.add, losses) if losses
                     else torch.zeros((), dtype=torch.float32, device=x.device))
            return y_TD.reshape(x.shape), total
        self.aux_losses = dict(routing.aux_losses)
        return y_TD.reshape(x.shape)

    @property
    def aux_loss(self) -> Optional[Tensor]:
        """Deprecated: the sum of :attr:`aux_losses` (None before the first forward)."""
        warnings.warn("MoELayer.aux_loss is deprecated: read layer.aux_losses (a dict) or "
                      "moe.collect_aux_losses(layer)", DeprecationWarning, stacklevel=2)
        if self.last_routing is None:
            return None
        return collect_aux_losses(self)

    # ---- sizes (the `moe plan` CLI and the docs use these) -----------------------------------

    def _router_params(self, matrices_only: bool = False) -> int:
        return sum(p.numel() for p in self.router.parameters() if not matrices_only or p.dim() >= 2)

    def _expert_params(self, active: bool, matrices_only: bool, experts_per_token) -> int:
        per_expert = sum(p[0].numel() for p in self.experts.parameters() if not matrices_only or p.dim() == 3)
        routed = self.nominal_experts_per_token() if experts_per_token is None else experts_per_token
        shared = 0 if self.shared_experts is None else sum(
            p.numel() for p in self.shared_experts.parameters() if not matrices_only or p.dim() >= 2)
        return (routed if active else self.num_experts) * per_expert + shared

    def nominal_experts_per_token(self) -> float:
        """k for token-choice routers (the maximum for variable-k ones), the capacity factor for
        expert choice (its mean experts per token)."""
        return getattr(self.router, "nominal_experts_per_token", self.top_k)

    def num_parameters(self, *, router: bool = True) -> int:
        """Total parameters over all E experts (all ranks under expert parallelism) + shared
        experts (+ router)."""
        return self._expert_params(False, False, None) + (self._router_params() if router else 0)

    def active_parameters(self, *, router: bool = True, experts_per_token=None) -> float:
        """Parameters one token uses: experts_per_token (default nominal_experts_per_token())
        routed experts + shared experts (+ router)."""
        return self._expert_params(True, False, experts_per_token) + (self._router_params() if router else 0)

    def flops_per_token(self, *, router: bool = True, experts_per_token=None) -> float:
        """Forward matmul FLOPs per token: 2 per multiply-add of every active weight matrix
        (routed, shared, and router); biases and activations are not counted."""
        active = self._expert_params(True, True, experts_per_token)
        return 2 * (active + (self._router_params(matrices_only=True) if router else 0))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"num_shared_experts={self.num_shared_experts}, granularity={self.granularity}")


def release_step(model: nn.Module) -> None:
    """Drops the ``aux_losses`` and ``last_routing`` that the modules of ``model`` keep after a
    forward, so that the step's autograd graph is freed (before capturing a training step in a
    CUDA graph on a new stream; see the module docstring)."""
    for m in model.modules():
        if getattr(m, "aux_losses", None):
            m.aux_losses = {}
        if getattr(m, "last_routing", None) is not None:
            m.last_routing = None


def collect_aux_losses(model: nn.Module, *, by_name: bool = False):
    """The one sum of a model's auxiliary losses: every module of ``model`` (itself included)
    that keeps an ``aux_losses`` dict after its forward (MoELayer, MixtureOfRecursions, ...:
    name -> weighted, differentiable scalar; empty in eval) contributes its values. Returns the
    total (a zero tensor when there are none), or with ``by_name`` a dict name -> total over
    modules. Reads the modules only: no global state."""
    totals: dict = {}
    for m in model.modules():
        losses = getattr(m, "aux_losses", None)
        if isinstance(losses, dict):
            for name, value in losses.items():
                totals[name] = value if name not in totals else totals[name] + value
    if by_name:
        return totals
    if not totals:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return sum(totals.values())


def aux_loss(model: nn.Module) -> Tensor:
    """Deprecated name of :func:`collect_aux_losses`."""
    warnings.warn("moe.aux_loss(model) is deprecated: use moe.collect_aux_losses(model)",
                  DeprecationWarning, stacklevel=2)
    return collect_aux_losses(model)
