"""Mixture-of-Recursions (Bae et al. 2025, arXiv:2507.10524): one shared block applied up to Nr
times, with a router giving each token its own recursion depth.

Shape legend: B batch, S positions, K tokens gathered for one recursion step (padded to the
row maximum, `kvalid_BK` marks real ones), D model dim, R recursions (Nr).
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

import torch
import torch.nn.functional as F
from torch import nn

from moe.model import CausalLM, DecoderBlock
from moe.mor_routing import (  # noqa: F401 (re-exported: moe.mor is the public path)
    KV_STRATEGIES, ExpertChoiceConfig, MoRCache, TokenChoiceConfig, _gather, _sync_max_count, _topk_mask, compact,
    default_capacities)


class MixtureOfRecursions(nn.Module):
    """Shared block (a ModuleList of DecoderBlocks, weights tied across steps) applied up to Nr
    times per token. forward(x_BSD, pos_BS=None, valid_BS=None, cache=None) -> y_BSD.

    Expert-choice step r (§2.2.1): g = alpha*sigmoid(theta_r^T h); for the chosen tokens
    h <- h + g * f(h), others keep h. f is the whole shared block *including its own residual*
    (f(h) = h + Attn + MLP, attention only among chosen tokens at their own positions): the
    reference scatter-adds weight * block output onto the step input (expert_choice_router.py,
    "combine results"), so it is not h + g * (f(h) - h). Token-choice (§2.2.1): with
    depth i = argmax, h <- f(h) unweighted for steps < i, output x + g_i * f(h) at step i, x the
    MoR input (token_choice_router.py). Routers: bias-free linear, weights N(0, 0.02)
    (reference LinearRouter). After forward: `aux_loss` (weighted router losses, 0 in eval),
    `last_depth` (B, S) steps taken (-1 on padding), `last_stats` (dict of losses and per-step
    attention FLOPs / token counts). Forward has no side effects on routing: the loss-free
    bias only moves in update_router_bias().
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
            self.capacities = self._check_expert(router, num_recursions, kv_cache)
            self.routers = nn.ModuleList(nn.Linear(dim, 1, bias=False)
                                         for _ in range(num_recursions))
        elif isinstance(router, TokenChoiceConfig):
            self.alpha = self._check_token(router)
            self.router = nn.Linear(dim, num_recursions, bias=False)
            self.register_buffer("router_bias", torch.zeros(num_recursions))
            self.register_buffer("load_sum", torch.zeros(num_recursions), persistent=False)
        else:
            raise ValueError(f"router must be ExpertChoiceConfig or TokenChoiceConfig, "
                             f"got {router!r}")
        self.aux_loss, self.last_depth, self.last_stats, self._inner_aux = None, None, {}, {}
        self.reset_router_parameters()

    @torch.no_grad()
    def reset_router_parameters(self):
        """Router weights ~ N(0, router_init_std) as the reference LinearRouter (std 0.02 =
        Llama initializer_range); a small start keeps sigmoid/softmax near uniform."""
        for lin in (self.routers if isinstance(self.cfg, ExpertChoiceConfig) else [self.router]):
            lin.weight.normal_(0.0, self.cfg.router_init_std)

    @torch.no_grad()
    def update_router_bias(self):
        """Loss-free balancing (Wang et al. 2024, Alg. 1): b_i += u * sign(mean(load) - load_i),
        load summed over the training forwards since the last call. Call it once per optimizer
        step, as the reference trainer does (trainer_pt.py); forward never moves the bias, so a
        recomputed forward (activation checkpointing) routes identically."""
        if not isinstance(self.cfg, TokenChoiceConfig) or self.cfg.balancing != "loss_free":
            raise RuntimeError("update_router_bias needs TokenChoiceConfig(balancing='loss_free')")
        self.router_bias += self.cfg.bias_rate * torch.sign(self.load_sum.mean() - self.load_sum)
        self.load_sum.zero_()

    @staticmethod
    def _check_expert(cfg, nr, kv_cache):
        caps = tuple(cfg.capacities) if cfg.capacities is not None else default_capacities(nr)
        if len(caps) != nr:
            raise ValueError(f"capacities has {len(caps)} entries, num_recursions={nr}")
        if any(not 0.0 <= c <= 1.0 for c in caps):
            raise ValueError(f"capacities={caps} must lie in [0, 1]")
        if any(b > a for a, b in zip(caps, caps[1:])):
            raise ValueError(f"capacities={caps} must be non-increasing (hierarchical filtering)")
        if kv_cache == "recursive_sharing" and caps[0] != 1.0:
            raise ValueError(f"capacities[0]={caps[0]} must be 1.0 for "
                             "kv_cache='recursive_sharing'")
        if not cfg.alpha > 0:
            raise ValueError(f"alpha={cfg.alpha} must be > 0")
        if not cfg.router_init_std >= 0:
            raise ValueError(f"router_init_std={cfg.router_init_std} must be >= 0")
        if cfg.eval_routing not in ("threshold", "topk"):
            raise ValueError(f"eval_routing={cfg.eval_routing!r} must be 'threshold' or 'topk'")
        return caps

    @staticmethod
    def _check_token(cfg):
        if cfg.router_func not in ("softmax", "sigmoid"):
            raise ValueError(f"router_func={cfg.router_func!r} must be 'softmax' or 'sigmoid'")
        if cfg.balancing not in ("loss", "loss_free", "none"):
            raise ValueError(f"balancing={cfg.balancing!r} must be 'loss', 'loss_free' or 'none'")
        alpha = cfg.alpha
        if alpha is None:
            alpha = 1.0 if cfg.router_func == "softmax" else 0.1
        if not alpha > 0:
            raise ValueError(f"alpha={alpha} must be > 0")
        if not cfg.router_init_std >= 0:
            raise ValueError(f"router_init_std={cfg.router_init_std} must be >= 0")
        return alpha

    def new_cache(self) -> MoRCache:
        return MoRCache()

    def _step(self, r, h_BSD, pos_BS, sel_BS, cache):
        """Run the shared block on the tokens sel_BS: returns idx_BK, kvalid_BK, y_BKD."""
        idx_BK, kvalid_BK = compact(sel_BS)
        if idx_BK.shape[1] == 0:
            return idx_BK, kvalid_BK, None
        y, pos_BK = _gather(h_BSD, idx_BK), _gather(pos_BS, idx_BK)
        flops0 = sum(blk.attn.flops for blk in self.block)
        for j, blk in enumerate(self.block):
            if self.kv_cache == "recursive_sharing" and r > 0:
                y = blk(y, pos_BK, kvalid_BK, shared_kv=cache.site(0, j))
            else:
                y = blk(y, pos_BK, kvalid_BK, cache=cache.site(r, j))
        self._collect_inner_aux()
        self.last_stats["attn_flops"][r] = sum(blk.attn.flops for blk in self.block) - flops0
        return idx_BK, kvalid_BK, y

    def _collect_inner_aux(self):
        for m in self.block.modules():
            a = getattr(m, "aux_loss", None)
            if isinstance(a, torch.Tensor):
                self._inner_aux[m] = self._inner_aux.get(m, 0) + a

    def forward(self, x_BSD, pos_BS=None, valid_BS=None, cache: MoRCache | None = None):
        B, S, D = x_BSD.shape
        if pos_BS is None:
            pos_BS = torch.arange(S, device=x_BSD.device).expand(B, S)
        if valid_BS is None:
            valid_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        cache = cache if cache is not None else MoRCache()
        self.last_stats = {"attn_flops": [0] * self.num_recursions,
                           "tokens": [0] * self.num_recursions}
        self._inner_aux = {}
        if isinstance(self.cfg, ExpertChoiceConfig):
            y = self._expert_choice(x_BSD, pos_BS, valid_BS, cache)
        else:
            y = self._token_choice(x_BSD, pos_BS, valid_BS, cache)
        for m, a in self._inner_aux.items():  # MoE layers in the block: sum over recursion steps
            m.aux_loss = a
        self._inner_aux = {}
        return y

    def _expert_choice(self, x_BSD, pos_BS, valid_BS, cache):
        cfg, h = self.cfg, x_BSD
        active_BS, depth_BS = valid_BS, torch.zeros_like(pos_BS)
        bce = z = x_BSD.new_zeros(())
        for r in range(self.num_recursions):
            logit_BS = self.routers[r](h).squeeze(-1)
            cap = self.capacities[r]
            if cap >= 1.0:
                sel_BS = active_BS
            elif self.training or cfg.eval_routing == "topk":
                sel_BS = _topk_mask(logit_BS.detach(), active_BS, valid_BS.sum(1), cap)
            else:
                sel_BS = active_BS & (logit_BS > 0)  # sigmoid(logit) > 0.5
            if self.training and bool(active_BS.any()):
                lg = logit_BS[active_BS]
                bce = bce + F.binary_cross_entropy_with_logits(lg, sel_BS[active_BS].to(lg.dtype))
                z = z + lg.pow(2).mean()  # logsumexp over a single logit is the logit
            gate_BS = cfg.alpha * torch.sigmoid(logit_BS)
            idx_BK, kvalid_BK, y_BKD = self._step(r, h, pos_BS, sel_BS, cache)
            self.last_stats["tokens"][r] = int(sel_BS.sum())
            if y_BKD is None:
                break
            w_BK1 = (_gather(gate_BS, idx_BK) * kvalid_BK)[..., None]
            h = h.scatter_add(1, idx_BK[..., None].expand(-1, -1, h.shape[-1]), w_BK1 * y_BKD)
            depth_BS, active_BS = depth_BS + sel_BS.long(), sel_BS
        self.aux_loss = cfg.bce_coef * bce + cfg.z_coef * z
        self.last_stats.update(bce=bce.detach(), z_loss=z.detach())
        self.last_depth = depth_BS.masked_fill(~valid_BS, -1)
        return h

    def _token_choice(self, x_BSD, pos_BS, valid_BS, cache):
        cfg, nr = self.cfg, self.num_recursions
        logits_BSR = self.router(x_BSD)
        act = torch.softmax if cfg.router_func == "softmax" else (lambda t, dim: torch.sigmoid(t))
        probs_BSR = act(logits_BSR, dim=-1) * self.alpha
        choice_BSR = probs_BSR + self.router_bias if cfg.balancing == "loss_free" else probs_BSR
        depth_BS = choice_BSR.detach().argmax(-1)
        gate_BS = probs_BSR.gather(-1, depth_BS[..., None]).squeeze(-1)
        out, h = x_BSD, x_BSD
        for r in range(nr):
            sel_BS = valid_BS & (depth_BS >= r)
            idx_BK, kvalid_BK, y_BKD = self._step(r, h, pos_BS, sel_BS, cache)
            self.last_stats["tokens"][r] = int(sel_BS.sum())
            if y_BKD is None:
                break
            d_BK = _gather(depth_BS, idx_BK)
            done_BK1 = ((d_BK == r) & kvalid_BK)[..., None]
            w_BK1 = _gather(gate_BS, idx_BK)[..., None] * done_BK1
            out = out.scatter_add(1, idx_BK[..., None].expand(-1, -1, h.shape[-1]), w_BK1 * y_BKD)
            keep_BKD = torch.where(done_BK1 | ~kvalid_BK[..., None], _gather(h, idx_BK), y_BKD)
            h = h.scatter(1, idx_BK[..., None].expand(-1, -1, h.shape[-1]), keep_BKD)
        self._token_losses(logits_BSR, probs_BSR, depth_BS, valid_BS)
        self.last_depth = (depth_BS + 1).masked_fill(~valid_BS, -1)
        return out

    def _token_losses(self, logits_BSR, probs_BSR, depth_BS, valid_BS):
        """Balancing loss sum_i P_i f_i (Fedus et al. 2022, Eq. 4; f_i = Nr * load share, P_i the
        mean alpha-scaled probability), router z-loss (Zoph et al. 2022, Eq. 5) on the logits;
        loss_free accumulates the load for update_router_bias()."""
        cfg, nr, zero = self.cfg, self.num_recursions, logits_BSR.new_zeros(())
        n = int(valid_BS.sum())
        if not self.training or n == 0:
            self.aux_loss = zero
            return
        counts_R = torch.bincount(depth_BS[valid_BS], minlength=nr).to(probs_BSR.dtype)
        bal = (probs_BSR[valid_BS].mean(0) * nr * counts_R / n).sum()
        z = torch.logsumexp(logits_BSR[valid_BS], dim=-1).pow(2).mean()
        if cfg.balancing == "loss_free":
            self.load_sum += (counts_R / n).detach().to(self.load_sum.dtype)
        use_bal = cfg.balance_coef if cfg.balancing == "loss" else 0.0
        self.aux_loss = use_bal * bal + cfg.z_coef * z
        self.last_stats.update(balancing_loss=bal.detach(), z_loss=z.detach(),
                               load=(counts_R / n).detach())


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

