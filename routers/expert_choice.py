"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
Sec. 3.2: k = n*c/e; S = Softmax(X W_g) in R^{n x e}; G, I = TopK(S^T, k); P = Onehot(I)).

Shape legend: T tokens, D hidden size, E experts, C tokens per expert, K slots (= E).

S = softmax(X W^T) over experts (each token's row sums to 1); every expert takes its top-C
tokens by its column of S, C = ceil(T/E * c) (the paper's k = n*c/e, rounded up) with c the
capacity factor (the mean number of experts per token); the gate weights G are those scores.
A token may get 0..E experts, so ids_TK has E slots, the chosen experts first (ascending id)
and -1 after.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from routers.capacity import capacity, check_capacity_factor
from routers.checks import check_coefficient
from routers.losses import z_loss
from routers.routing import RouterBase, Routing, expert_counts, make_routing


class ExpertChoiceRouter(RouterBase):
    """Each expert picks its top-C tokens of the batch.

    Non-causal: an expert's choice of a token depends on every other token in the batch
    (future positions included), so it suits encoders and training-time batches, not
    autoregressive decoding. Padded tokens are never picked. Routing.dropped_fraction is the
    fraction of real tokens that no expert took. z_loss_coeff adds the router z-loss.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        capacity_factor: float = 2.0,
        *,
        z_loss_coeff: float = 0.0,
        init_std: float = 0.02,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self._init_common(hidden_size, num_experts, jitter=0.0, check_finite=check_finite)
        self.capacity_factor = check_capacity_factor(capacity_factor, allow_none=False)
        self.z_loss_coeff = check_coefficient("z_loss_coeff", z_loss_coeff)
        self.top_k = self.num_experts
        self._init_linear(init_std)

    @property
    def nominal_experts_per_token(self) -> float:
        """The mean experts per token: the capacity factor (E experts of C = T*f/E tokens each)."""
        return self.capacity_factor

    def forward(self, x: Tensor, *, state=None, padding_mask: Optional[Tensor] = None) -> Routing:
        """x (T, D) or (B, S, D) -> Routing with K = E slots. ``state`` is ignored."""
        logits_TE, valid_T, _ = self._linear_logits(x, padding_mask)
        (T, E), device = logits_TE.shape, logits_TE.device
        self._check_logits(logits_TE, valid_T)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        C = min(T, capacity(T, 1, E, self.capacity_factor))
        scores_TE = probs_TE if valid_T is None else probs_TE.masked_fill(~valid_T[:, None], float("-inf"))
        top_CE = scores_TE.topk(C, dim=0, sorted=False).indices
        picked_TE = torch.zeros(T, E, dtype=torch.bool, device=device).scatter(0, top_CE, True)
        if valid_T is not None:
            picked_TE = picked_TE & valid_T[:, None]
        expert_ids = torch.arange(E, device=device)
        # Chosen experts first, ascending id; unchosen ones sort after them and become -1.
        key_TE = torch.where(picked_TE, expert_ids, expert_ids + E)
        key_TK = key_TE.sort(dim=-1).values
        ids_TK = torch.where(key_TK < E, key_TK, -1)
        weights_TK = probs_TE.gather(1, ids_TK.clamp(min=0)).masked_fill(ids_TK < 0, 0.0)
        aux = {}
        if self.training and self.z_loss_coeff > 0:
            aux["z_loss"] = self.z_loss_coeff * z_loss(logits_TE, valid_T=valid_T)
        routing = make_routing(
            ids_TK=ids_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE,
            valid_T=valid_T, chosen_slots=expert_counts(ids_TK, E).sum(), aux_losses=aux,
        )
        got_none = (ids_TK[:, 0] < 0).to(torch.float32)
        real = torch.ones_like(got_none) if valid_T is None else valid_T.to(torch.float32)
        dropped = (got_none * real).sum() / real.sum().clamp(min=1.0)
        return dataclasses.replace(routing, dropped_fraction=dropped)
