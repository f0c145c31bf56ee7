"""Auxiliary router losses: load balancing (batch and per sequence), z-loss, entropy.

Shape legend: B sequences, S tokens per sequence, T tokens (B*S), E experts, K slots.
``valid`` masks (True = real token) exclude padded tokens from every loss. All losses are
scalars of at least float32, differentiable through the probabilities/logits (the counts are not).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from routers.checks import check_coefficient

BALANCE_LOSS_KINDS = ("switch", "seq", None)


def sequence_load_balancing_loss(probs_BSE: Tensor, ids_BSK: Tensor, *, valid_BS: Optional[Tensor] = None) -> Tensor:
    """Sequence-wise balance loss (DeepSeek-V3, Eq. 17-20), averaged over sequences.

    For each sequence: E * sum_i f_i * P_i with f_i = (slots routed to expert i) / (slots routed)
    and P_i = the mean over its tokens of probs_i. With a fixed top-k and no drops the slot total
    is S*K, i.e. f_i = count_i / (K*S) as in the paper; -1 slots and padded tokens are excluded.
    Sequences without a real token contribute nothing to the mean. Computed as
    :func:`balance_loss_from_statistics` of :func:`balance_statistics` (the statistics that
    ``torch.ops.moe.topk_route`` returns from its routing pass).
    """
    return balance_loss_from_statistics(*balance_statistics(probs_BSE, ids_BSK, valid_BS=valid_BS))


def balance_statistics(probs_BSE: Tensor, ids_BSK: Tensor, *, valid_BS: Optional[Tensor] = None) -> tuple:
    """(fw_BE, psum_BE), the statistics of the balance losses over B sequences of S tokens:
    psum_BE, the sum of each expert's scores over the sequence's real tokens (differentiable),
    and fw_BE, the weight of each (sequence, expert) in the loss (no gradient): f_i of
    :func:`sequence_load_balancing_loss` / (real tokens of the sequence * sequences with a real
    token), 0 for a sequence without one. The loss is E * sum(fw_BE * psum_BE)."""
    B, S, E = probs_BSE.shape
    probs = _promote(probs_BSE)
    K = ids_BSK.shape[-1]
    ids = ids_BSK.reshape(B, S * K)
    routed = (ids >= 0).to(probs.dtype)
    if valid_BS is None:
        valid_BS = torch.ones(B, S, dtype=torch.bool, device=probs.device)
    routed = routed * valid_BS[..., None].expand(B, S, K).reshape(B, S * K).to(probs.dtype)
    counts_BE = probs.new_zeros(B, E + 1).scatter_add_(1, (ids + 1).clamp(min=0), routed)[:, 1:]
    f_BE = counts_BE / counts_BE.sum(dim=1, keepdim=True).clamp(min=1.0)
    tokens_B = valid_BS.to(probs.dtype).sum(dim=1)
    psum_BE = probs.masked_fill(~valid_BS[..., None], 0.0).sum(dim=1)
    has_B = (tokens_B > 0).to(probs.dtype)
    fw_BE = f_BE * (has_B / (tokens_B.clamp(min=1.0) * has_B.sum().clamp(min=1.0)))[:, None]
    return fw_BE, psum_BE


def balance_loss_from_statistics(fw_BE: Tensor, psum_BE: Tensor, scale: float = 1.0) -> Tensor:
    """scale * E * sum(fw_BE * psum_BE): the balance loss from :func:`balance_statistics`'s (or
    ``torch.ops.moe.topk_route``'s) statistics, in two ops (a dot product and one scaling)."""
    return torch.dot(fw_BE.reshape(-1), psum_BE.reshape(-1)) * (scale * fw_BE.shape[1])


def switch_load_balancing_loss(probs_TE: Tensor, ids_TK: Tensor, *, valid_T: Optional[Tensor] = None) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, Eq. 4-6) over the whole batch.

    E * sum_i f_i * P_i, f_i = (slots routed to expert i) / (slots routed) (= count_i / (T*K) for a
    fixed top-k, Megatron's normalisation), P_i = mean over tokens of probs_TE[:, i]. Its minimum
    1 is reached by uniform routing. Hugging Face's Mixtral loss (also RMoE's) divides the
    counts by T instead of T*K, i.e. it is K times this for top-k.
    """
    valid = None if valid_T is None else valid_T[None]
    return sequence_load_balancing_loss(probs_TE[None], ids_TK[None], valid_BS=valid)


def z_loss(logits_TE: Tensor, *, valid_T: Optional[Tensor] = None) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, Eq. 5): mean over tokens of logsumexp(logits)^2."""
    lse_T = torch.logsumexp(_promote(logits_TE), dim=-1) ** 2
    return _masked_mean(lse_T, valid_T)


def z_statistic(logits_TE: Tensor, *, valid_T: Optional[Tensor] = None) -> Tensor:
    """The sum over real tokens of logsumexp(logits)^2: :func:`z_loss` times the real tokens
    (the z statistic of ``torch.ops.moe.topk_route``)."""
    lse_T = torch.logsumexp(_promote(logits_TE), dim=-1) ** 2
    return (lse_T if valid_T is None else lse_T.masked_fill(~valid_T, 0.0)).sum()


def entropy_loss(probs_TE: Tensor, *, valid_T: Optional[Tensor] = None) -> Tensor:
    """Mean entropy -sum_i p_i log p_i of the router distribution: the "dynamic loss" of top-p
    routing (Huang et al. 2024, "Harder Tasks Need More Experts", Eq. 8), which keeps top-p
    routing from spreading every token over all experts."""
    probs = _promote(probs_TE)
    ent_T = -(probs * torch.log(probs.clamp(min=torch.finfo(probs.dtype).tiny))).sum(dim=-1)
    return _masked_mean(ent_T, valid_T)


def _promote(t: Tensor) -> Tensor:
    """At least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _masked_mean(v_T: Tensor, valid_T: Optional[Tensor]) -> Tensor:
    if valid_T is None:
        return v_T.sum() / max(v_T.shape[0], 1)
    return v_T.masked_fill(~valid_T, 0.0).sum() / valid_T.sum().to(v_T.dtype).clamp(min=1.0)


def balance_loss_args(owner: str, balance_loss, balance_loss_coeff, deprecated: dict) -> tuple:
    """(balance_loss, balance_loss_coeff), taking the deprecated keywords ``aux_loss`` /
    ``aux_loss_coeff`` (renamed: "aux loss" now means only the sum of a model's routing losses,
    :func:`moe.collect_aux_losses`). Any other keyword raises TypeError."""
    unknown = sorted(set(deprecated) - {"aux_loss", "aux_loss_coeff"})
    if unknown:
        raise TypeError(f"{owner}: unexpected keyword argument(s) {', '.join(unknown)}")
    for old, new in (("aux_loss", "balance_loss"), ("aux_loss_coeff", "balance_loss_coeff")):
        if old in deprecated:
            warnings.warn(f"{owner}: {old}= is deprecated, use {new}=", DeprecationWarning, stacklevel=3)
    return deprecated.get("aux_loss", balance_loss), deprecated.get("aux_loss_coeff", balance_loss_coeff)


def check_loss_config(balance_loss, balance_loss_coeff: float, z_loss_coeff: float) -> tuple:
    """-> (balance_loss, balance_loss_coeff, z_loss_coeff) checked (coefficients as floats)."""
    if balance_loss not in BALANCE_LOSS_KINDS:
        raise ValueError(f"balance_loss must be one of {BALANCE_LOSS_KINDS}, got {balance_loss!r}")
    return (balance_loss, check_coefficient("balance_loss_coeff", balance_loss_coeff),
            check_coefficient("z_loss_coeff", z_loss_coeff))


def balance_losses(
    *,
    balance_loss: Optional[str],
    balance_loss_coeff: float,
    z_loss_coeff: float,
    probs_TE: Tensor,
    ids_TK: Tensor,
    logits_TE: Tensor,
    valid_T: Optional[Tensor],
    seq_shape: tuple,
) -> dict:
    """The aux_losses dict of a router in training: coefficient * loss for each enabled loss.

    "load_balancing" (balance_loss="switch"), "seq_load_balancing" (balance_loss="seq", per sequence
    of the (B, S) input; a (T, D) input is one sequence) and "z_loss".
    """
    out = {}
    if balance_loss == "switch" and balance_loss_coeff > 0:
        out["load_balancing"] = balance_loss_coeff * switch_load_balancing_loss(probs_TE, ids_TK, valid_T=valid_T)
    elif balance_loss == "seq" and balance_loss_coeff > 0:
        B, S = seq_shape
        valid = None if valid_T is None else valid_T.reshape(B, S)
        out["seq_load_balancing"] = balance_loss_coeff * sequence_load_balancing_loss(
            probs_TE.reshape(B, S, probs_TE.shape[1]), ids_TK.reshape(B, S, ids_TK.shape[1]), valid_BS=valid
        )
    if z_loss_coeff > 0:
        out["z_loss"] = z_loss_coeff * z_loss(logits_TE, valid_T=valid_T)
    return out


def balance_fw_scale(balance_loss: Optional[str], balance_loss_coeff: float, num_experts: int) -> float:
    """The factor that turns :func:`balance_statistics`' fw_BE into the balance loss's own weights:
    coefficient * E with a balance loss (1.0 without), ``torch.ops.moe.topk_route``'s fw_scale.
    With it the loss is ``dot(fw_BE, psum_BE)``: one op forward and one backward, instead of a dot
    product and a scaling each way."""
    return balance_loss_coeff * num_experts if balance_loss is not None and balance_loss_coeff > 0 else 1.0


def z_loss_scale(z_loss_coeff: float, num_tokens: int) -> float:
    """``torch.ops.moe.topk_route``'s z_scale for a host-known count of real tokens: the z-loss's
    coefficient over that count, so that topk_route's zsum is the z-loss itself."""
    return z_loss_coeff / max(int(num_tokens), 1)


def losses_from_statistics(*, balance_loss: Optional[str], balance_loss_coeff: float, z_loss_coeff: float,
                           balance: Tensor, zsum: Tensor, num_tokens: Optional[Tensor] = None) -> dict:
    """:func:`balance_losses`' dict from ``torch.ops.moe.topk_route``'s statistics, computed with
    fw_scale = :func:`balance_fw_scale` (so its balance, sum(fw_BE * psum_BE), is the balance loss)
    and, where the token count is host-known (num_tokens None), z_scale = :func:`z_loss_scale` (so
    its zsum is the z-loss). num_tokens: the real tokens as a 0-d tensor when a padding mask makes
    the count data (z_scale 1.0): the z-loss is then zsum's mean over them times the coefficient,
    the only op these losses cost."""
    out = {}
    if balance_loss is not None and balance_loss_coeff > 0:
        out["load_balancing" if balance_loss == "switch" else "seq_load_balancing"] = balance
    if z_loss_coeff > 0:
        out["z_loss"] = zsum if num_tokens is None else zsum * z_loss_coeff / num_tokens.to(zsum.dtype).clamp(min=1.0)
    return out


def membership_bce_loss(logits_T: Tensor, selected_T: Tensor, *, valid_T: Optional[Tensor] = None) -> Tensor:
    """Mean binary cross-entropy of sigmoid(logits_T) against the bool selection selected_T: the
    auxiliary loss of Mixture-of-Recursions' expert-choice routers (Bae et al. 2025, §2.2.1), which
    trains each step's router to predict its own top-k membership, so eval can threshold at 0.5."""
    logits = _promote(logits_T)
    bce_T = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, selected_T.to(logits.dtype), reduction="none")
    return _masked_mean(bce_T, valid_T)


@torch.no_grad()
def loss_free_bias_update_(bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free balancing (Wang et al. 2024, Alg. 1; DeepSeek-V3 Sec. 2.1.2), in place:
    b_i += rate * sign(mean(load) - load_i), lowering the bias of the overloaded choices. load_E
    (E,) is any per-choice load (token counts, or load fractions summed over micro-batches),
    compared in float32 (float64 when it is float64). The one bias rule of moekit's routers
    (TopKRouter's expert bias and the token-choice depth bias of Mixture-of-Recursions)."""
    rate = check_coefficient("rate", rate)
    dtype = torch.float64 if load_E.dtype == torch.float64 else torch.float32
    load = load_E.to(device=bias_E.device, dtype=dtype)
    return bias_E.add_(torch.sign(load.mean() - load), alpha=rate)
