"""S-BASE routing (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models", arXiv
2202.01169: the balanced assignment of BASE layers approximated by the Sinkhorn algorithm).

Shape legend: T tokens, D hidden size, E experts, K top-k slots.

BASE (Lewis et al. 2021, Sec. 2) routes by the linear assignment that maximises the total
token-expert score sum_t h_t . w_{a_t} subject to every expert getting T/E tokens. S-BASE relaxes
it to entropy-regularised optimal transport (Cuturi 2013, Eq. 2 and Lemma 2): with the cost
exp(logits) the transport plan is P = diag(d0) exp(L) diag(d1), rows summing to 1/T (every token
routed once) and columns to 1/E (every expert the same load), found by Sinkhorn-Knopp's
alternating scalings

    d0 = (1/T) / (exp(L) d1),      d1 = (1/E) / (exp(L)^T d0)

until the last d1 update moved no d1_j by more than a fraction ``sinkhorn_tol`` (1e-4), at most
``sinkhorn_iters`` times. After a d1 update the columns sum to 1/E exactly, and each row to
(1/T) * a weighted mean of d1_new/d1_old, so every token's mass is within sinkhorn_tol of 1/T:
the tolerance bounds the imbalance of the plan. (Megatron-LM's S-BASE router, the reference
implementation, stops on the mean absolute change of d1 <= 1e-4, with no iteration cap, which
bounds neither marginal; the plan it converges to is the same.)
In training a token goes to the top-k of its row of P (no gradient through the plan); its gate
weights are the ORIGINAL router scores of those experts (sigmoid of the logits for k = 1,
softmax for k > 1, Megatron's choice), so the router weight still gets gradients. At inference
S-BASE is plain top-k of the same scores (no balancing, as the paper evaluates). No balancing
loss is needed (Megatron refuses one with Sinkhorn); the z-loss is optional.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from routers.checks import check_coefficient, check_int, check_number
from routers.losses import z_loss
from routers.routing import RouterBase, Routing, count_chosen, make_routing
from routers.topk import topk_route

SBASE_SCORES = ("sigmoid", "softmax")


def check_sinkhorn_args(tol, iters, names=("tol", "max_iters")) -> tuple:
    """The one check of the Sinkhorn stopping rule (a tolerance >= 0, iterations >= 1); names: the
    caller's names of the two arguments, for the message. Returns (tol, iters)."""
    return check_number(names[0], tol, ge=0.0), check_int(names[1], iters)


def _sync_sinkhorn_converged(d1_new: Tensor, d1_old: Tensor, tol: float) -> bool:
    """Host sync (one per iteration): did every column scaling move by at most a fraction tol?"""
    return bool((d1_new / d1_old - 1.0).abs().amax() <= tol) if d1_new.numel() else True


@torch.no_grad()
def sinkhorn(logits_TE: Tensor, *, valid_T: Optional[Tensor] = None, tol: float = 1e-4,
             max_iters: int = 100) -> Tensor:
    """The Sinkhorn-balanced transport plan P_TE of exp(logits_TE) (float32 or float64, no grad).

    Rows of real tokens sum to 1/T' (T' real tokens), columns to 1/E (Cuturi 2013, Alg. 1 with
    r = 1/T', c = 1/E): each column exactly after the last d1 update, each row within a fraction
    tol of 1/T' once the stopping rule max_j |d1_j / d1_old_j - 1| <= tol holds (checked with one
    host sync per iteration; tol=0 runs exactly max_iters iterations with no sync; if max_iters
    ends first, the rows are within the last update's fraction). Padded rows (valid_T False) are
    0 and take no load. Each row of exp(L) is scaled by exp(-max of the row) first, which d0
    absorbs (the plan is unchanged), so no exp overflows.
    """
    check_sinkhorn_args(tol, max_iters)
    L = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    T, E = L.shape
    cost_TE = torch.exp(L - L.amax(dim=1, keepdim=True))
    if valid_T is not None:
        cost_TE = cost_TE.masked_fill(~valid_T[:, None], 0.0)
        rows = valid_T.sum().to(L.dtype).clamp(min=1.0)
    else:
        rows = torch.tensor(float(max(T, 1)), dtype=L.dtype, device=L.device)
    tiny = torch.finfo(L.dtype).tiny  # guards an empty row or column only (Megatron adds 1e-8 to every sum)
    d1_E = torch.ones(E, dtype=L.dtype, device=L.device)
    for _ in range(max_iters):
        d0_T = (1.0 / rows) / (cost_TE @ d1_E).clamp(min=tiny)
        d1_new = (1.0 / E) / (d0_T @ cost_TE).clamp(min=tiny)
        done = tol > 0 and _sync_sinkhorn_converged(d1_new, d1_E, tol)
        d1_E = d1_new
        if done:
            break
    return d0_T[:, None] * cost_TE * d1_E


class SBaseRouter(RouterBase):
    """S-BASE: top-k of the Sinkhorn-balanced plan in training, plain top-k at inference.

    logits_TE = x_TD @ weight_ED^T (float32). score: the gate, "sigmoid" or "softmax" of the
    original logits (default: sigmoid for top_k = 1, softmax for top_k > 1); norm_topk
    renormalises the k gates to sum to 1 (default False, as the reference). sinkhorn_tol /
    sinkhorn_iters: the stopping rule of :func:`sinkhorn` (tol=0: a fixed number of iterations,
    no host sync, e.g. under CUDA graphs). Padded tokens take no slot and no transport mass.
    z_loss_coeff adds the router z-loss in training. Dropless (every token gets k experts).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 1,
        *,
        score: Optional[str] = None,
        norm_topk: bool = False,
        sinkhorn_tol: float = 1e-4,
        sinkhorn_iters: int = 100,
        jitter: float = 0.0,
        z_loss_coeff: float = 0.0,
        init_std: float = 0.02,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self._init_common(hidden_size, num_experts, jitter=jitter, check_finite=check_finite)
        top_k = check_int("top_k", top_k, maximum=num_experts)
        score = ("sigmoid" if top_k == 1 else "softmax") if score is None else score
        if score not in SBASE_SCORES:
            raise ValueError(f"score must be one of {SBASE_SCORES} or None, got {score!r}")
        check_sinkhorn_args(sinkhorn_tol, sinkhorn_iters, ("sinkhorn_tol", "sinkhorn_iters"))
        check_coefficient("z_loss_coeff", z_loss_coeff)
        self.top_k, self.score, self.norm_topk = top_k, score, bool(norm_topk)
        self.sinkhorn_tol, self.sinkhorn_iters = float(sinkhorn_tol), sinkhorn_iters
        self.z_loss_coeff = float(z_loss_coeff)
        self._init_linear(init_std)

    def forward(self, x: Tensor, *, state=None, padding_mask: Optional[Tensor] = None) -> Routing:
        """x (T, D) or (B, S, D) -> Routing over the T tokens. ``state`` is ignored."""
        logits_TE, valid_T, _ = self._linear_logits(x, padding_mask)
        self._check_logits(logits_TE, valid_T)
        if self.training:
            probs_TE = torch.sigmoid(logits_TE) if self.score == "sigmoid" else torch.softmax(logits_TE, dim=-1)
            plan_TE = sinkhorn(logits_TE.detach(), valid_T=valid_T, tol=self.sinkhorn_tol,
                               max_iters=self.sinkhorn_iters)
            ids_TK = plan_TE.topk(self.top_k, dim=-1).indices
            weights_TK = probs_TE.gather(1, ids_TK)
            if self.norm_topk:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        else:  # plain top-k: TopKRouter's selection (the fused kernel where moekit's ops are registered)
            ids_TK, weights_TK, probs_TE = topk_route(logits_TE, None, self.top_k, self.score, None, None,
                                                      self.norm_topk, 1.0)[:3]
        if valid_T is not None:
            ids_TK = ids_TK.masked_fill(~valid_T[:, None], -1)
        aux = {}
        if self.training and self.z_loss_coeff > 0:
            aux["z_loss"] = self.z_loss_coeff * z_loss(logits_TE, valid_T=valid_T)
        return make_routing(ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE,
                            valid_T=valid_T, chosen_slots=count_chosen(ids_TK, valid_T), aux_losses=aux)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"score={self.score}, sinkhorn_tol={self.sinkhorn_tol}, sinkhorn_iters={self.sinkhorn_iters}")
