"""Mixture-of-Recursions (Bae et al. 2025, arXiv:2507.10524): one shared block applied up to Nr
times, with a router giving each token its own recursion depth.

Shape legend: B batch, S positions, J tokens gathered for one recursion step (padded to the
row maximum, `kvalid_BJ` marks real ones), D model dim, P recursion steps (Nr).
The depth routers live in routers/ (:mod:`routers.depth`, on the package's losses and bias rule);
this module moves the tokens: it gathers each step's tokens, runs the shared block on them and
scatters the results back. The KV cache keyed by step is :class:`moe.model.MoRCache`.
Reference code (read, not copied): raymin0223/mixture_of_recursions, model/mor_model/.
Departure (their issues #9, #10): the reference routes only with a top-k over the whole
sequence, which is non-causal. Here eval mode decides each token from its own score
(expert-choice: sigmoid(logit) > 0.5, the top-k membership the BCE auxiliary loss trains the
router to predict; token-choice is per-token already), so cached decoding equals a
full forward. Training mode is the paper's top-k. Also: padding masks are supported (the
reference raises NotImplementedError); the shared block is one set of modules called at every
step, so attention, MLP and norms are tied by construction (their issue #17 fixed untied
attention copies).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moe.model import CausalLM, DecoderBlock, MoRCache
from routers.depth import (ExpertChoiceConfig, ExpertChoiceStepRouter, TokenChoiceConfig,
                           TokenChoiceDepthRouter, capacity_schedule, default_capacities,
                           in_balancing_warmup, warmup_capacity)

__all__ = ["MixtureOfRecursions", "build_mor_lm", "ExpertChoiceConfig", "TokenChoiceConfig",
           "MoRCache", "KV_STRATEGIES", "compact", "default_capacities"]

KV_STRATEGIES = ("recursion_wise", "recursive_sharing")


def _sync_max_count(sel_BS: torch.Tensor) -> int:
    return int(sel_BS.sum(1).max()) if sel_BS.numel() else 0


def compact(sel_BS: torch.Tensor):
    """Selected positions of each row in causal (ascending) order: idx_BJ, kvalid_BJ.
    idx rows are distinct (a prefix of a permutation), so scatters through them never collide."""
    order_BS = torch.argsort((~sel_BS).to(torch.int8), dim=1, stable=True)
    J = _sync_max_count(sel_BS)
    kvalid_BJ = torch.arange(J, device=sel_BS.device) < sel_BS.sum(1, keepdim=True)
    return order_BS[:, :J], kvalid_BJ


def _gather(t_BS_, idx_BJ):
    if t_BS_.dim() == 3:
        return t_BS_.gather(1, idx_BJ[..., None].expand(-1, -1, t_BS_.shape[-1]))
    return t_BS_.gather(1, idx_BJ)


def _accumulate(total: dict, losses: dict) -> None:
    """total[name] += value for each auxiliary loss (name -> scalar tensor)."""
    for name, value in losses.items():
        total[name] = total[name] + value if name in total else value


class MixtureOfRecursions(nn.Module):
    """Shared block (a ModuleList of DecoderBlocks, weights tied across steps) applied up to Nr
    times per token. forward(x_BSD, pos_BS=None, valid_BS=None, cache=None) -> y_BSD.

    Expert-choice step r (§2.2.1): g = alpha*sigmoid(theta_r^T h) from the step's router
    ``routers[r]`` (:class:`routers.depth.ExpertChoiceStepRouter`); for the chosen tokens
    h <- h + g * f(h), others keep h. f is the whole shared block *including its own residual*
    (f(h) = h + Attn + MLP, attention only among chosen tokens at their own positions): the
    reference scatter-adds weight * block output onto the step input (expert_choice_router.py,
    "combine results"), so it is not h + g * (f(h) - h). Token-choice (§2.2.1, ``router``, a
    :class:`routers.depth.TokenChoiceDepthRouter`): with depth i = argmax, h <- f(h) unweighted
    for steps < i, output x + g_i * f(h) at step i, x the MoR input (token_choice_router.py).
    After forward: `aux_losses` (name -> weighted router loss summed over steps: "bce", "z_loss"
    for expert choice, "load_balancing", "z_loss" for token choice; empty in eval), `last_depth`
    (B, S) steps taken (-1 on padding), `last_stats` (dict of unweighted losses and per-step
    attention FLOPs / token counts). Modules of the shared block that keep an `aux_losses` dict
    (a moe.MoELayer) hold its sum over the steps they ran. Forward has no side effects on
    routing: the loss-free bias only moves in update_router_bias().

    Warm-ups, as the reference counts them (training forwards t = 1, 2, ... of this module,
    `train_forwards`, saved in its state dict): ExpertChoiceConfig(cap_warmup_steps=W) runs
    step r at capacity :func:`routers.depth.warmup_capacity` (1 falling to capacities[r] by a
    half cosine over W forwards); TokenChoiceConfig(bal_warmup_steps=W) sends every token to the
    deepest step while t < W (:func:`routers.depth.in_balancing_warmup`). Eval uses the targets.
    """

    def __init__(self, block, *, num_recursions: int, router, kv_cache: str = "recursion_wise"):
        super().__init__()
        self.block = nn.ModuleList(block if isinstance(block, (list, tuple, nn.ModuleList))
                                   else [block])
        dim = self.block[0].attn_norm.weight.shape[0] if len(self.block) else 0
        if num_recursions < 1:
            raise ValueError(f"num_recursions={num_recursions} must be >= 1")
        if len(self.block) == 0:
            raise ValueError("block must hold at least one DecoderBlock")
        if kv_cache not in KV_STRATEGIES:
            raise ValueError(f"kv_cache={kv_cache!r} must be one of {KV_STRATEGIES}")
        self.num_recursions, self.kv_cache, self.cfg = num_recursions, kv_cache, router
        if isinstance(router, ExpertChoiceConfig):
            self.capacities = capacity_schedule(router, num_recursions)
            if kv_cache == "recursive_sharing" and self.capacities[0] != 1.0:
                raise ValueError(f"capacities[0]={self.capacities[0]} must be 1.0 for "
                                 "kv_cache='recursive_sharing'")
            self.routers = nn.ModuleList(ExpertChoiceStepRouter(dim, c, router)
                                         for c in self.capacities)
        elif isinstance(router, TokenChoiceConfig):
            self.router = TokenChoiceDepthRouter(dim, num_recursions, router)
        else:
            raise ValueError(f"router must be ExpertChoiceConfig or TokenChoiceConfig, "
                             f"got {router!r}")
        self.aux_losses: dict = {}
        self.last_depth, self.last_stats, self._inner_aux = None, {}, {}
        self.train_forwards = 0  # training forwards so far: the warm-ups' clock (a host int, no sync)
        self.register_load_state_dict_pre_hook(_upgrade_old_state)

    def get_extra_state(self):
        return {"train_forwards": self.train_forwards}

    def set_extra_state(self, state) -> None:
        self.train_forwards = int(state["train_forwards"])

    @property
    def aux_loss(self):
        """Deprecated: the sum of :attr:`aux_losses` (None before the first forward)."""
        warnings.warn("MixtureOfRecursions.aux_loss is deprecated: read mor.aux_losses (a dict) "
                      "or moe.collect_aux_losses(model)", DeprecationWarning, stacklevel=2)
        if self.last_depth is None:
            return None
        return sum(self.aux_losses.values(), torch.zeros((), device=self.last_depth.device))

    def _depth_routers(self):
        return list(self.routers) if isinstance(self.cfg, ExpertChoiceConfig) else [self.router]

    @torch.no_grad()
    def reset_router_parameters(self):
        """Router weights ~ N(0, router_init_std) as the reference LinearRouter (std 0.02 =
        Llama initializer_range); a small start keeps sigmoid/softmax near uniform."""
        for router in self._depth_routers():
            router.reset_parameters()

    @torch.no_grad()
    def update_router_bias(self):
        """Loss-free balancing of the token-choice router (TokenChoiceDepthRouter.update_bias):
        b_i += u * sign(mean(load) - load_i), load summed over the training forwards since the
        last call. Call it once per optimizer step."""
        if not isinstance(self.cfg, TokenChoiceConfig):
            raise RuntimeError("update_router_bias needs TokenChoiceConfig(balancing='loss_free')")
        self.router.update_bias()

    def new_cache(self) -> MoRCache:
        return MoRCache()

    def _step(self, r, h_BSD, pos_BS, sel_BS, cache):
        """Run the shared block on the tokens sel_BS: returns idx_BJ, kvalid_BJ, y_BJD."""
        idx_BJ, kvalid_BJ = compact(sel_BS)
        self.last_stats["tokens"][r] = int(sel_BS.sum())
        if idx_BJ.shape[1] == 0:
            return idx_BJ, kvalid_BJ, None
        y, pos_BJ = _gather(h_BSD, idx_BJ), _gather(pos_BS, idx_BJ)
        flops0 = sum(blk.attn.flops for blk in self.block)
        for j, blk in enumerate(self.block):
            if self.kv_cache == "recursive_sharing" and r > 0:
                y = blk(y, pos_BJ, kvalid_BJ, shared_kv=cache.site(0, j))
            else:
                y = blk(y, pos_BJ, kvalid_BJ, cache=cache.site(r, j))
        for m in self.block.modules():  # MoE layers in the block: sum over recursion steps
            losses = getattr(m, "aux_losses", None)
            if isinstance(losses, dict):
                _accumulate(self._inner_aux.setdefault(m, {}), losses)
        self.last_stats["attn_flops"][r] = sum(blk.attn.flops for blk in self.block) - flops0
        return idx_BJ, kvalid_BJ, y

    def forward(self, x_BSD, pos_BS=None, valid_BS=None, cache: MoRCache | None = None):
        B, S, D = x_BSD.shape
        if pos_BS is None:
            pos_BS = torch.arange(S, device=x_BSD.device).expand(B, S)
        if valid_BS is None:
            valid_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        cache = cache if cache is not None else MoRCache()
        self.last_stats = {"attn_flops": [0] * self.num_recursions,
                           "tokens": [0] * self.num_recursions}
        self.aux_losses, self._inner_aux = {}, {}
        if self.training:
            self.train_forwards += 1
        if isinstance(self.cfg, ExpertChoiceConfig):
            y = self._expert_choice(x_BSD, pos_BS, valid_BS, cache)
        else:
            y = self._token_choice(x_BSD, pos_BS, valid_BS, cache)
        for m, losses in self._inner_aux.items():
            m.aux_losses = losses
        self._inner_aux = {}
        return y

    def _expert_choice(self, x_BSD, pos_BS, valid_BS, cache):
        (B, S, D), h = x_BSD.shape, x_BSD
        active_BS, depth_BS = valid_BS, torch.zeros_like(pos_BS)
        stats = {"bce": x_BSD.new_zeros(()), "z_loss": x_BSD.new_zeros(())}
        for r, router in enumerate(self.routers):
            capacity = (warmup_capacity(router.capacity, self.train_forwards, self.cfg.cap_warmup_steps)
                        if self.training else None)
            routing = router(h, padding_mask=valid_BS, active=active_BS, capacity=capacity)
            _accumulate(self.aux_losses, routing.aux_losses)
            _accumulate(stats, router.last_stats)
            sel_BS = (routing.ids_TK[:, 0] >= 0).view(B, S)
            gate_BS = routing.weights_TK[:, 0].view(B, S).to(h.dtype)  # alpha * sigmoid(logit)
            idx_BJ, kvalid_BJ, y_BJD = self._step(r, h, pos_BS, sel_BS, cache)
            if y_BJD is None:
                break
            w_BJ1 = (_gather(gate_BS, idx_BJ) * kvalid_BJ)[..., None]
            h = h.scatter_add(1, idx_BJ[..., None].expand(-1, -1, D), w_BJ1 * y_BJD)
            depth_BS, active_BS = depth_BS + sel_BS.long(), sel_BS
        self.last_stats.update(stats)
        self.last_depth = depth_BS.masked_fill(~valid_BS, -1)
        return h

    def _token_choice(self, x_BSD, pos_BS, valid_BS, cache):
        B, S, D = x_BSD.shape
        deepest = self.training and in_balancing_warmup(self.train_forwards, self.cfg.bal_warmup_steps)
        routing = self.router(x_BSD, padding_mask=valid_BS, deepest=deepest)
        depth_BS = routing.ids_TK[:, 0].view(B, S)  # steps - 1; -1 on padding
        gate_BS = routing.weights_TK[:, 0].view(B, S).to(x_BSD.dtype)
        out, h = x_BSD, x_BSD
        for r in range(self.num_recursions):
            sel_BS = depth_BS >= r
            idx_BJ, kvalid_BJ, y_BJD = self._step(r, h, pos_BS, sel_BS, cache)
            if y_BJD is None:
                break
            done_BJ1 = ((_gather(depth_BS, idx_BJ) == r) & kvalid_BJ)[..., None]
            w_BJ1 = _gather(gate_BS, idx_BJ)[..., None] * done_BJ1
            out = out.scatter_add(1, idx_BJ[..., None].expand(-1, -1, D), w_BJ1 * y_BJD)
            keep_BJD = torch.where(done_BJ1 | ~kvalid_BJ[..., None], _gather(h, idx_BJ), y_BJD)
            h = h.scatter(1, idx_BJ[..., None].expand(-1, -1, D), keep_BJD)
        self.aux_losses = dict(routing.aux_losses)
        self.last_stats.update(self.router.last_stats)
        self.last_depth = (depth_BS + 1).masked_fill(~valid_BS, -1)
        return out


def _upgrade_old_state(module, state_dict, prefix, *args) -> None:
    """Older checkpoints: before the depth routers moved to routers/ the token-choice bias was
    ``router_bias`` (now ``router.depth_bias``); before the warm-ups there was no train_forwards."""
    old = prefix + "router_bias"
    if old in state_dict:
        state_dict[prefix + "router.depth_bias"] = state_dict.pop(old)
    state_dict.setdefault(prefix + "_extra_state", {"train_forwards": 0})  # saved before the warm-ups


def build_mor_lm(*, vocab_size: int, dim: int, n_layers: int, n_heads: int, num_recursions: int,
                 router=None, sharing: str = "middle_cycle", kv_cache: str = "recursion_wise",
                 mlp_hidden: int | None = None, mlp_factory=None) -> CausalLM:
    """A MoR LM of effective depth n_layers (§2.1 parameter sharing). "cycle": the n_layers/Nr
    unique layers form the shared block; "middle_cycle": first and last layers unique, the
    (n_layers-2)/Nr middle ones shared. mlp_factory(i) -> module replaces the dense MLP of
    unique layer i (e.g. a moe.MoELayer)."""
    if sharing not in ("cycle", "middle_cycle"):
        raise ValueError(f"sharing={sharing!r} must be 'cycle' or 'middle_cycle'")
    if num_recursions < 1:
        raise ValueError(f"num_recursions={num_recursions} must be >= 1")
    middle = n_layers - (2 if sharing == "middle_cycle" else 0)
    if middle < num_recursions or middle % num_recursions:
        need = "n_layers - 2" if sharing == "middle_cycle" else "n_layers"
        raise ValueError(f"n_layers={n_layers} does not fit sharing={sharing!r}: {need} must be "
                         f"a positive multiple of num_recursions={num_recursions}")
    count = iter(range(n_layers))

    def make():
        i = next(count)
        return DecoderBlock(dim, n_heads, mlp_hidden=mlp_hidden,
                            mlp=mlp_factory(i) if mlp_factory else None)

    first = [make()] if sharing == "middle_cycle" else []
    shared = [make() for _ in range(middle // num_recursions)]
    mor = MixtureOfRecursions(shared, num_recursions=num_recursions, kv_cache=kv_cache,
                              router=router if router is not None else ExpertChoiceConfig())
    last = [make()] if sharing == "middle_cycle" else []
    return CausalLM(vocab_size, dim, first + [mor] + last)

