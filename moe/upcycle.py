"""Sparse upcycling: a dense FFN becomes an MoE layer whose experts start from its weights.

Shape legend (moe/__init__.py): D model dim, F the dense FFN's hidden dim, E copies of the FFN
(coarse experts), G granularity, K = k*G routed slots; the layer has E*G experts of hidden F/G.

- Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts
  from Dense Checkpoints"): every expert is a copy of the dense MLP, the router is new. With
  G = 1 the output is sum_k w_k FFN(x) = FFN(x) whenever the weights sum to 1 (norm_topk), for
  any router.
- Fine-grained upcycling (He et al. 2024, "Upcycling Large Language Models into Mixture of
  Experts", arXiv 2410.07524: the virtual-group initialisation and weight scaling; its
  reference code, Megatron-Core's ``moe/upcycling_utils.py``; Qwen1.5-MoE's practice): the FFN
  hidden is cut into G segments, FFN(x) = sum_g W_down[:, g] act(W_gate[g] x) * (W_up[g] x),
  and expert e = c*G + g holds segment g (c = e // G, its "virtual group"). The router's rows
  are equal within a virtual group (one random row per copy, repeated G times), so the k*G
  chosen experts are k whole copies, every segment of copy c with the same weight w_c; with
  norm_topk the k*G weights sum to 1, the output is FFN(x) / G, and the down projections are
  scaled by G. Without norm_topk (softmax-then-top-K) the reference's factor is
  (E*G) * G / (k*G) = E*G/k, which restores the output when the router's probabilities are
  uniform (1 / (E*G) each); then equality is approximate.

Departure from the reference code: it spreads the factor over the projections (s^(1/3) on each
of the gated projections, s^(1/2) on both for a plain activation), which preserves the output
only for activations homogeneous of that degree (ReLU, not SiLU); here the whole factor goes on
the down projection, where the output is linear in it, so the output is preserved exactly (up
to rounding) for every activation. ``noise`` adds N(0, (noise * std(W))^2) to each expert's copy
of each weight W, independently per expert, to break the symmetry between copies (zero by
default, which keeps the output exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.experts import DenseFFN
from moe.layer import MoELayer
from moe.model import SwiGLUMLP

__all__ = ["upcycle", "upcycle_model", "dense_ffn_weights", "DenseWeights"]


@dataclass(frozen=True)
class DenseWeights:
    """A dense FFN's weights: y = down_DF act(gate_FD x + b_gate) [* (up_FD x + b_up)] + b_down.
    up_FD is None for an ungated activation ("gelu", "relu"); biases may be None."""

    activation: str
    gate_FD: Tensor
    up_FD: Optional[Tensor]
    down_DF: Tensor
    b_gate_F: Optional[Tensor] = None
    b_up_F: Optional[Tensor] = None
    b_down_D: Optional[Tensor] = None


def _bias(linear: nn.Linear, rows: slice = slice(None)) -> Optional[Tensor]:
    return None if linear.bias is None else linear.bias[rows]


def _gated_activation(act) -> Optional[str]:
    """'swiglu' for SiLU, 'geglu' for exact GELU (torch's or transformers' classes), else None."""
    if act is F.silu or type(act).__name__ in ("SiLU", "SiLUActivation"):
        return "swiglu"
    exact_gelu = isinstance(act, nn.GELU) and act.approximate == "none"
    if act is F.gelu or exact_gelu or type(act).__name__ == "GELUActivation":
        return "geglu"
    return None


def dense_ffn_weights(ffn: nn.Module) -> DenseWeights:
    """The weights of a dense FFN: moekit's :class:`moe.DenseFFN` (any activation),
    :class:`moe.SwiGLUMLP`, or a module with ``gate_proj``, ``up_proj``, ``down_proj`` Linear
    layers and a SiLU or exact GELU ``act_fn`` (Llama, Qwen, Mistral MLPs of transformers).
    Raises TypeError naming the module otherwise."""
    if isinstance(ffn, DenseFFN):
        Fh = ffn.ffn_hidden_size
        w, lin = ffn.w_in.weight, ffn.w_in
        if ffn.activation in ("swiglu", "geglu"):
            return DenseWeights(ffn.activation, w[:Fh], w[Fh:], ffn.w_out.weight, _bias(lin, slice(0, Fh)),
                                _bias(lin, slice(Fh, None)), _bias(ffn.w_out))
        return DenseWeights(ffn.activation, w, None, ffn.w_out.weight, _bias(lin), None, _bias(ffn.w_out))
    if isinstance(ffn, SwiGLUMLP):
        Fh = ffn.w2.in_features
        return DenseWeights("swiglu", ffn.w13.weight[:Fh], ffn.w13.weight[Fh:], ffn.w2.weight)
    parts = [getattr(ffn, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if all(isinstance(p, nn.Linear) for p in parts):
        activation = _gated_activation(getattr(ffn, "act_fn", None))
        if activation is None:
            raise TypeError(f"ffn ({type(ffn).__name__}) has act_fn {getattr(ffn, 'act_fn', None)!r}: upcycle "
                            "supports SiLU (SwiGLU) and exact GELU (GEGLU) gated MLPs")
        gate, up, down = parts
        return DenseWeights(activation, gate.weight, up.weight, down.weight, _bias(gate), _bias(up), _bias(down))
    raise TypeError(f"ffn must be a moe.DenseFFN, a moe.SwiGLUMLP or a module with gate_proj/up_proj/down_proj "
                    f"Linear layers, got {type(ffn).__name__}")


def _check_sizes(num_experts, k, granularity, F_hidden: int) -> None:
    for name, v in (("num_experts", num_experts), ("k", k), ("granularity", granularity)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if k > num_experts:
        raise ValueError(f"k={k} exceeds num_experts={num_experts}")
    if F_hidden % granularity:
        raise ValueError(f"granularity={granularity} must divide the FFN hidden size {F_hidden}")


def _noisy(w: Tensor, noise: float, generator) -> Tensor:
    if noise == 0:
        return w
    std = w.float().std() if w.numel() > 1 else w.float().abs().mean()
    n = torch.randn(w.shape, generator=generator, dtype=torch.float32, device="cpu").to(w.device)
    return w + (noise * std * n).to(w.dtype)


def _virtual_group_router(D: int, E: int, G: int, k: int, norm_topk: bool, init_std: float,
                          generator, router_kwargs: dict) -> nn.Module:
    import routers

    router = routers.TopKRouter(D, E * G, k * G, norm_topk=norm_topk, init_std=init_std, **router_kwargs)
    with torch.no_grad():
        rows = torch.randn(E, D, generator=generator) * init_std
        router.weight.copy_(rows.repeat_interleave(G, dim=0))
    return router


def upcycle(ffn: nn.Module, num_experts: int, k: int, *, granularity: int = 1, noise: float = 0.0,
            norm_topk: bool = True, router: Optional[nn.Module] = None, router_init_std: float = 0.02,
            router_kwargs: Optional[dict] = None, generator: Optional[torch.Generator] = None,
            **layer_kwargs) -> MoELayer:
    """A :class:`moe.MoELayer` upcycled from the dense FFN ``ffn`` (see the module docstring).

    num_experts E copies of the FFN, k copies per token; granularity G cuts each copy into G
    experts of hidden F/G (E*G experts, top k*G, DeepSeekMoE's segmentation as in
    ``MoELayer.fine_grained``). Default router: ``routers.TopKRouter(D, E*G, k*G,
    norm_topk=norm_topk, init_std=router_init_std, **router_kwargs)`` with virtual-group rows
    (N(0, router_init_std) per copy, repeated G times). ``router=``: your router (with G = 1 the
    output is preserved when its weights sum to 1 per token; with G > 1 it needs a linear
    ``weight`` (E*G, D), whose rows are tied per virtual group here). Down projections are
    scaled by G (norm_topk) or by E*G/k (He et al.'s softmax-then-top-K factor). noise: relative
    std of the Gaussian noise added to each expert's copy. layer_kwargs go to MoELayer (e.g.
    ``num_shared_experts`` is not supported: every expert is routed). The layer has the FFN's
    dtype and device; at initialisation with noise=0 and norm_topk, its output is the FFN's,
    for any router weights, up to rounding.
    """
    dense = dense_ffn_weights(ffn)
    Fh, D = dense.gate_FD.shape
    _check_sizes(num_experts, k, granularity, Fh)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    if "num_shared_experts" in layer_kwargs or "activation" in layer_kwargs or "bias" in layer_kwargs:
        raise ValueError("upcycle sets activation and bias from the FFN and has no shared experts")
    E, G = num_experts, granularity
    if router is None:
        router = _virtual_group_router(D, E, G, k, norm_topk, router_init_std, generator, router_kwargs or {})
    elif router_kwargs:
        raise ValueError("router_kwargs configure the default router; set them on the router you pass")
    elif G > 1:
        w = getattr(router, "weight", None)
        if not isinstance(w, Tensor) or tuple(w.shape) != (E * G, D):
            raise ValueError(f"granularity={G} needs a router with a linear weight of shape ({E * G}, {D}) "
                             "(its rows are tied per virtual group)")
        with torch.no_grad():
            w.copy_(w[::G].repeat_interleave(G, dim=0))
    has_bias = dense.b_gate_F is not None
    layer = MoELayer(D, Fh // G, E * G, router=router, activation=dense.activation, bias=has_bias, **layer_kwargs)
    layer.granularity = G
    layer.to(device=dense.gate_FD.device, dtype=dense.gate_FD.dtype)
    scale = float(G) if norm_topk else float(E * G) / k
    _copy_experts(layer, dense, E, G, scale, noise, generator)
    return layer


@torch.no_grad()
def _copy_experts(layer: MoELayer, dense: DenseWeights, E: int, G: int, scale: float, noise: float,
                  generator) -> None:
    ex = layer.experts
    f = dense.gate_FD.shape[0] // G
    for e in range(E * G):
        seg = slice((e % G) * f, (e % G + 1) * f)
        w_in = dense.gate_FD[seg].t() if dense.up_FD is None else torch.cat(
            (dense.gate_FD[seg].t(), dense.up_FD[seg].t()), dim=1)
        ex.w_in_EDH[e].copy_(_noisy(w_in, noise, generator))
        ex.w_out_EFD[e].copy_(_noisy(dense.down_DF[:, seg].t() * scale, noise, generator))
        if ex.b_in_EH is not None:
            b_in = dense.b_gate_F[seg] if dense.up_FD is None else torch.cat((dense.b_gate_F[seg], dense.b_up_F[seg]))
            ex.b_in_EH[e].copy_(b_in)
            ex.b_out_ED[e].copy_(dense.b_down_D if dense.b_down_D is not None else torch.zeros_like(ex.b_out_ED[e]))


def _is_dense_ffn(module: nn.Module) -> bool:
    try:
        dense_ffn_weights(module)
    except TypeError:
        return False
    return True


def upcycle_model(model: nn.Module, num_experts: int, k: int, *, select: Optional[Callable] = None,
                  **upcycle_kwargs) -> list:
    """Replaces, in place, every dense FFN of ``model`` that :func:`dense_ffn_weights` reads
    (moe.DenseFFN, moe.SwiGLUMLP, gate/up/down MLPs of transformers models), except those inside
    an MoELayer (shared experts), by ``upcycle(ffn, num_experts, k, **upcycle_kwargs)``.
    ``select(name, module) -> bool`` chooses among them (e.g. every other layer, as Komatsuzaki et
    al. upcycle half of the MLP layers in some runs; the shared-expert MLPs of transformers' MoE
    blocks are gate/up/down MLPs too, leave them out with it). Returns the replaced modules' names.
    A transformers model's config is not updated (save the model with torch, not save_pretrained).
    """
    inside_moe = {id(m) for layer in model.modules() if isinstance(layer, MoELayer) for m in layer.modules()}
    targets = [(name, m) for name, m in model.named_modules()
               if name and id(m) not in inside_moe and _is_dense_ffn(m) and (select is None or select(name, m))]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, upcycle(m, num_experts, k, **upcycle_kwargs))
    return [name for name, _ in targets]
