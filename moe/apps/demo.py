"""`moe demo`: train small byte-level causal LMs on CPU and compare routers at equal active parameters.

Shape legend (moe/__init__.py): B batch, S sequence length (bytes), D model dim, L layers, E experts,
K top-k, G granularity, F dense SwiGLU hidden (the baseline's FFN). Every MoE arm's FFN applies
3*D*F weights per token, as the dense FFN does (asserted by tests/test_cli.py):

    dense               SwiGLU FFN of hidden F                                (moe.model.SwiGLUMLP)
    topk                E experts of F/K, softmax top-K, Switch loss          (routers.TopKRouter)
    finegrained         DeepSeekMoE segmentation (Dai et al. 2024, Sec. 3.1): G*E experts of F/(G*K),
                        top G*K (MoELayer.fine_grained); default E = 16, G = 4: 64 experts, top-8
    finegrained_shared  the same with one shared expert carved out (Sec. 3.2, Eq. 9-11): 63 routed,
                        top-7, + 1 shared of F/(G*K)
    recurrent           topk's experts routed by the RMoE GRU chain (Qiu et al. 2025, Eq. 4-6) with
                        the same balance coefficient as topk; GRU initialised as the reference's
                        CustomGRUCell (every weight and bias N(0, 0.02): routers.recurrent)
    xmoe                2E experts of F/(2K), XMoE threshold router (Yang et al. 2024): the fewest
                        experts whose probability mass t reaches the threshold, with ceil(t * 2E)
                        slots (xmoe_cap: a cap that never binds; results report experts per token
                        and how often the cap was reached); t = 0.3, calibrated to about 2K experts
                        per token, so its active parameters equal dense's (Calibration below)
    mor                 Mixture-of-Recursions (Bae et al. 2025) with middle-cycle sharing (Sec. 2.1):
                        first and last layers unique, the L-2 middle layers one shared block run
                        Nr = 2 times, expert-choice capacities (1, 1/2); dense blocks, so fewer
                        parameters; trained on more tokens at the dense model's training FLOPs
                        (the paper's equal-compute comparison, Sec. 3.1): mor_steps()
    sbase, hash         optional (--variants): S-BASE (Clark et al. 2022) and hash routing (Roller et
                        al. 2021) on topk's experts (moe.model.MoEConfig)

Active parameters are the ones a token touches on average (measured experts per token for xmoe).
Reproducible: torch.manual_seed(seed) before each model is built, batches a pure function of
(seed, step) (moe.apps.data), so the arms of one seed see the same data in the same order
(paired), no dropout or router jitter. Checkpoints hold model, optimizer, scheduler, RNG state,
loss history and step counter of one step boundary, written atomically, so --resume continues
exactly wherever a run stopped, Ctrl-C included (train_variant).

Calibration (2-core AMD EPYC; each figure is a `moe demo` run with the options it names). The
arms start far from converged, and these small LMs' training losses fall in sudden drops whose
timing varies from seed to seed; until every run is past them, the seed spread is as large as
the effects (300 steps, 8 experts, lr 3e-3: fine-grained -0.042 +-
0.023 bits/byte against dense). So the defaults train faster and sparser: lr 6e-3, 450 steps,
E = 16 (fine-grained: 64 experts of 32, top-8), where fine-grained measured -0.109 / -0.086 /
-0.104 against dense in seeds 0-2 (at lr 3e-3 and 500 steps: -0.101 / -0.023 / -0.093, one seed
not yet past the drop). --xmoe-threshold: 0.3 chose 3.87 experts per token (of 32) at seed 0
and 0.4 chose 5.50; 2K = 4 keeps its active parameters at dense's, so 0.3. MoR, seeds 0 and 1:
--mor-alpha 0.1 (the reference's) gave 2.390 / 2.431 bits/byte and 1.0 gave
2.408 / 2.424, within noise, so the reference's 0.1; --mor-eval-routing: per-row top-k ("topk":
eval depth = train depth, 1.50), beat the causal sigmoid > 0.5 rule ("threshold", depth
1.18-1.37 against 1.50 in training) in all four runs, by 0.004-0.018 bits/byte, so "topk". Both
are DemoConfig fields, and results report the eval-time depth next to the train-time one.
The reference's warm-ups are options (moe.MixtureOfRecursions counts the training forwards):
mor_cap_warmup > 0, expert choice's capacity warm-up (ExpertChoiceConfig.cap_warmup_steps), and
with mor_routing="token" (token-choice depth routing, whose balanced depths cost the same
compute), mor_bal_warmup > 0, its balancing warm-up (TokenChoiceConfig.bal_warmup_steps).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from moe import ExpertChoiceConfig, MixtureOfRecursions, MoELayer, TokenChoiceConfig, build_lm, build_mor_lm
from moe.apps.checks import check_fields, kind
from moe.apps.data import train_batch, val_batches

VARIANTS = ("dense", "topk", "finegrained", "finegrained_shared", "recurrent", "xmoe", "mor")
EXTRA_VARIANTS = ("sbase", "hash")
ALL_VARIANTS = VARIANTS + EXTRA_VARIANTS
MOR_EVAL_ROUTINGS = ("topk", "threshold")
MOR_RECURSIONS = 2


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Model, data and optimiser settings shared by every variant (each field's kind, in its
    metadata, is checked here and is the CLI option's argparse type: moe.apps.checks)."""

    dim: int = field(default=64, metadata=kind("positive_int"))
    layers: int = field(default=4, metadata=kind("positive_int"))
    heads: int = field(default=4, metadata=kind("positive_int"))
    ffn_hidden: int = field(default=256, metadata=kind("positive_int"))  # F: the dense SwiGLU hidden
    experts: int = field(default=16, metadata=kind("positive_int"))
    top_k: int = field(default=2, metadata=kind("positive_int"))
    granularity: int = field(default=4, metadata=kind("positive_int"))
    balance_coeff: float = field(default=1e-2, metadata=kind("positive_float"))
    xmoe_threshold: float = field(default=0.3, metadata=kind("probability"))
    mor_alpha: float = field(default=0.1, metadata=kind("positive_float"))
    mor_eval_routing: str = field(default="topk", metadata=kind("mor_eval_routing"))
    mor_routing: str = field(default="expert", metadata=kind("mor_routing"))
    mor_cap_warmup: int = field(default=0, metadata=kind("nonnegative_int"))
    mor_bal_warmup: int = field(default=0, metadata=kind("nonnegative_int"))
    seq_len: int = field(default=128, metadata=kind("positive_int"))
    batch: int = field(default=16, metadata=kind("positive_int"))
    steps: int = field(default=450, metadata=kind("positive_int"))
    lr: float = field(default=6e-3, metadata=kind("positive_float"))
    seed: int = field(default=0, metadata=kind("nonnegative_int"))
    eval_batches: int = field(default=32, metadata=kind("positive_int"))
    ckpt_every: int = field(default=100, metadata=kind("positive_int"))

    def __post_init__(self):
        check_fields(self)
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} must be <= experts={self.experts}")
        if self.ffn_hidden % (2 * self.top_k * self.granularity):
            raise ValueError(f"ffn_hidden={self.ffn_hidden} must be divisible by 2*top_k*granularity="
                             f"{2 * self.top_k * self.granularity} (expert sizes F/K, F/2K, F/GK)")
        if self.granularity * self.top_k < 2:
            raise ValueError(f"granularity={self.granularity} * top_k={self.top_k} must be >= 2 "
                             "(finegrained_shared carves one shared expert out of them)")
        if self.mor_cap_warmup and self.mor_routing != "expert":
            raise ValueError("mor_cap_warmup is the expert-choice capacity warm-up: it needs mor_routing='expert'")
        if self.mor_bal_warmup and self.mor_routing != "token":
            raise ValueError("mor_bal_warmup is the token-choice balancing warm-up: it needs mor_routing='token'")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads} with an even "
                             f"head dim dim/heads (rotary embeddings)")


def check_variant(variant: str, cfg: DemoConfig) -> None:
    """ValueError naming the setting when ``variant`` cannot be built from cfg."""
    if variant not in ALL_VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {ALL_VARIANTS}")
    if variant == "mor" and (cfg.layers < 2 + MOR_RECURSIONS or (cfg.layers - 2) % MOR_RECURSIONS):
        raise ValueError(f"layers={cfg.layers}: mor's middle-cycle sharing needs layers - 2 to be a "
                         f"positive multiple of {MOR_RECURSIONS}")


def build_model(variant: str, cfg: DemoConfig) -> nn.Module:
    """The CausalLM of one variant (vocabulary 256 bytes), built after torch.manual_seed(cfg.seed)."""
    check_variant(variant, cfg)
    import routers
    from moe.model import MoEConfig

    torch.manual_seed(cfg.seed)
    D, L, E, K, F, G = cfg.dim, cfg.layers, cfg.experts, cfg.top_k, cfg.ffn_hidden, cfg.granularity
    lm = dict(vocab_size=256, dim=D, n_heads=cfg.heads)
    bal = dict(balance_loss_coeff=cfg.balance_coeff)
    if variant == "dense":
        return build_lm(n_layers=L, mlp_hidden=F, **lm)
    if variant == "mor":
        router = (ExpertChoiceConfig(alpha=cfg.mor_alpha, eval_routing=cfg.mor_eval_routing,
                                     cap_warmup_steps=cfg.mor_cap_warmup) if cfg.mor_routing == "expert"
                  else TokenChoiceConfig(bal_warmup_steps=cfg.mor_bal_warmup))
        return build_mor_lm(n_layers=L, num_recursions=MOR_RECURSIONS, sharing="middle_cycle", mlp_hidden=F,
                            router=router, **lm)
    if variant == "topk":
        return build_lm(n_layers=L, mlp_factory=lambda i: MoELayer(D, F // K, E, K, router_kwargs=bal), **lm)
    if variant in ("finegrained", "finegrained_shared"):
        shared = int(variant == "finegrained_shared")
        return build_lm(n_layers=L, mlp_factory=lambda i: MoELayer.fine_grained(
            D, F // K, E, K, granularity=G, num_shared_experts=shared, router_kwargs=bal), **lm)
    if variant in EXTRA_VARIANTS:
        # S-BASE balances by its Sinkhorn assignment and hash routing by construction: no loss
        return build_lm(n_layers=L, moe=MoEConfig(num_experts=E, ffn_hidden_size=F // K, top_k=K, router=variant),
                        **lm)
    if variant == "xmoe":
        return build_lm(n_layers=L, mlp_factory=lambda i: MoELayer(
            D, F // (2 * K), 2 * E, router=routers.ThresholdRouter(
                D, 2 * E, threshold=cfg.xmoe_threshold, rule="xmoe", max_experts=xmoe_cap(cfg), **bal)), **lm)
    chain = routers.RecurrentRouterChain(L, D, E, K, router_dim=max(8, D // 4), gru_init="reference", **bal)
    model = build_lm(n_layers=L, mlp_factory=lambda i: MoELayer(D, F // K, E, router=chain[i]), **lm)
    model.router_chain = chain  # registers the shared GRU cell once
    chain.reset_on_forward(model)  # the drop-in state starts from zeros at every model forward
    return model


def xmoe_cap(cfg: DemoConfig) -> int:
    """The xmoe arm's slots per token, ceil(threshold * 2E): a cap the threshold rule never
    reaches past, since any n probabilities' top m hold at least m/n of the mass, so the top
    ceil(t n) reach t (fewer slots than 2E, so less dispatch work)."""
    return min(2 * cfg.experts, math.ceil(cfg.xmoe_threshold * 2 * cfg.experts))


def train_flops_per_token(variant: str, cfg: DemoConfig) -> float:
    """Training FLOPs per token, 3x the forward's (forward + backward): 2 per multiply-add of each
    weight matrix a token passes (attention 4 D^2, FFN 3 D F at equal active width, the output head
    256 D; routers left out), plus causal attention's 2 S D per layer (QK^T and AV over S/2 keys
    on average). A MoR step of capacity c runs on a c share of the tokens, each attending over
    c S keys of its recursion's cache: c (2 D^2 * 4 + 6 D F) + c^2 2 S D per shared layer."""
    D, L, F, S = cfg.dim, cfg.layers, cfg.ffn_hidden, cfg.seq_len
    block, attn = 2 * (4 * D * D + 3 * D * F), 2 * S * D
    head = 2 * 256 * D
    if variant != "mor":
        return 3 * (L * (block + attn) + head)
    caps = [(MOR_RECURSIONS - r) / MOR_RECURSIONS for r in range(MOR_RECURSIONS)]  # routers.depth defaults
    shared = (L - 2) // MOR_RECURSIONS
    per_layer = sum(c * block + c * c * attn for c in caps)
    return 3 * (2 * (block + attn) + shared * per_layer + head)


def variant_steps(variant: str, cfg: DemoConfig) -> int:
    """Training steps of a variant: cfg.steps, except mor, which gets the dense model's training
    FLOPs (cfg.steps x its FLOPs per token / mor's, rounded)."""
    if variant != "mor":
        return cfg.steps
    return round(cfg.steps * train_flops_per_token("dense", cfg) / train_flops_per_token("mor", cfg))


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _mor_depth(model: nn.Module):
    """The mean recursion depth of the model's last forward (None without MoR)."""
    d = [m.last_depth.float().mean().item() for m in model.modules()
         if isinstance(m, MixtureOfRecursions) and m.last_depth is not None]
    return sum(d) / len(d) if d else None


def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over min(100, steps/10) steps, then cosine decay to 10%."""
    warm = max(1, min(100, steps // 10))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    """Validation bits per byte and routing statistics over fixed windows (eval mode)."""
    model.eval()
    layers = moe_layers(model)
    counts = [torch.zeros(m.num_experts, dtype=torch.float64) for m in layers]
    ept, dropped, nats, depth = [[] for _ in layers], [[] for _ in layers], [], []
    at_cap = [[] for _ in layers]
    for x in batches:
        nats.append(model(x, labels=x).loss.item())
        for i, m in enumerate(layers):
            r = m.last_routing
            counts[i] += r.counts_E.double().cpu()
            ept[i].append(r.experts_per_token.item())
            dropped[i].append(r.dropped_fraction.item())
            at_cap[i].append(((r.ids_TK >= 0).sum(1) >= m.top_k).double().mean().item())
        depth += [m.last_depth.float().mean().item() for m in model.modules()
                  if isinstance(m, MixtureOfRecursions)]
    model.train()
    out = dict(val_bpb=sum(nats) / len(nats) / math.log(2))
    if layers:
        load = [c / c.sum().clamp(min=1) for c in counts]
        cv = [(c.std(unbiased=False) / c.mean()).item() if c.sum() > 0 else 0.0 for c in counts]
        out.update(experts_per_token=sum(map(sum, ept)) / sum(map(len, ept)),
                   experts_per_token_by_layer=[sum(e) / len(e) for e in ept],
                   load_cv=sum(cv) / len(cv), load_cv_by_layer=cv,
                   dropped_fraction=sum(map(sum, dropped)) / sum(map(len, dropped)),
                   cap_reached_fraction=sum(map(sum, at_cap)) / sum(map(len, at_cap)),
                   expert_load=[row.tolist() for row in load])
    if depth:
        out["mean_recursion_depth"] = sum(depth) / len(depth)
    return out


def param_counts(model: nn.Module, experts_per_token_by_layer=None) -> tuple[int, float]:
    """(total, active): active replaces each MoE layer's E experts by the experts a token uses
    (measured per layer when given, else the layer's nominal k)."""
    total = sum(p.numel() for p in model.parameters())
    active = float(total)
    for i, m in enumerate(moe_layers(model)):
        k = None if experts_per_token_by_layer is None else experts_per_token_by_layer[i]
        active -= m.num_parameters() - m.active_parameters(experts_per_token=k)
    return total, active


def _save(path: Path, state: dict) -> None:
    """Write state to path atomically: to a temporary file, then os.replace, so a checkpoint on
    disk is always a whole one (an interrupted save leaves the previous checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class DemoInterrupted(KeyboardInterrupt):
    """Ctrl-C during `moe demo`; its message says what is saved (the CLI prints it)."""


@contextmanager
def interrupts_between_steps():
    """Within the block, Ctrl-C (SIGINT) sets a flag instead of raising; the training loop reads
    it (the yielded callable) between steps, where model, optimizer, scheduler, RNG and step counter
    all belong to the same step, and checkpoints there. A second Ctrl-C raises at once (nothing is
    written then: the last checkpoint on disk stays consistent). It takes over only Python's own
    handler in the main thread: where SIGINT is ignored (a background job) or handled by the host
    program, or off the main thread (no signal handlers there), nothing changes and a Ctrl-C
    raises where it lands, which train_variant handles too."""
    flag = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield lambda: False
        return

    def on_sigint(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(flag)
    finally:
        signal.signal(signal.SIGINT, previous)


def train_variant(variant: str, cfg: DemoConfig, train: torch.Tensor, val: torch.Tensor, *,
                  ckpt_dir: Path, resume: bool = False, stop_after: int | None = None,
                  progress: bool = True, device: torch.device | str = "cpu", should_stop=None) -> dict:
    """Train one variant for steps (or until stop_after steps this call), checkpointing every
    cfg.ckpt_every steps, on Ctrl-C, and on the last step before the final evaluation; return its
    result dict (no result if stopped early).

    A checkpoint holds the model, optimizer, scheduler, RNG state, loss history and the step
    counter of one step boundary (the data order is a function of the step: moe.apps.data), so
    `--resume` continues exactly wherever the run was interrupted: a Ctrl-C in a step finishes
    that step and saves (interrupts_between_steps); one in the final evaluation keeps the
    training, and the resumed run only evaluates. should_stop() (a worker process's stop event,
    moe.apps.seeds) true between steps stops it the same way. Raises DemoInterrupted saying what
    is saved."""
    from tqdm import tqdm

    steps = variant_steps(variant, cfg)
    model = build_model(variant, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path, step, history, depth, saved_step = ckpt_dir / f"{variant}.pt", 0, [], [], None
    if resume and path.exists():
        state = torch.load(path, weights_only=False, map_location=device)
        saved = {k: v for k, v in state["config"].items() if k not in ("steps", "ckpt_every")}
        mine = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "ckpt_every")}
        if saved != mine:
            raise ResumeError(f"--resume: checkpoint {path} was trained with a different config "
                              f"{ {k: v for k, v in saved.items() if mine.get(k) != v} }; use a fresh --out")
        if state["step"] > steps:
            raise ResumeError(f"--resume: checkpoint {path} is at step {state['step']} > --steps {steps}")
        if state.get("result") is not None and state["step"] == steps:
            return state["result"]
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"].cpu())
        step, history, saved_step = state["step"], state["history"], state["step"]
        depth = state.get("depth", [None] * step)

    def save(result=None):
        nonlocal saved_step
        _save(path, dict(variant=variant, config=asdict(cfg), step=step, model=model.state_dict(),
                         optim=opt.state_dict(), sched=sched.state_dict(), rng=torch.get_rng_state(),
                         history=history, depth=depth, result=result))
        saved_step = step

    end = steps if stop_after is None else min(steps, step + stop_after)
    tokens, elapsed, phase = 0, 0.0, "training"
    bar = tqdm(total=steps, initial=step, desc=f"{variant:<11}", disable=not progress,
               dynamic_ncols=True, leave=True)
    try:
        with interrupts_between_steps() as interrupted:
            while step < end:
                x = train_batch(train, step=step, seed=cfg.seed, batch=cfg.batch,
                                seq_len=cfg.seq_len).to(device)
                t0 = time.perf_counter()
                out = model(x, labels=x)
                opt.zero_grad(set_to_none=True)
                (out.loss + sum(out.aux_losses.values(), out.loss.new_zeros(()))).backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                elapsed += time.perf_counter() - t0
                tokens += x.numel()
                step += 1
                history.append(out.loss.item() / math.log(2))
                depth.append(_mor_depth(model))
                bar.update(1)
                bar.set_postfix(loss_bpb=f"{history[-1]:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
                if interrupted() or (should_stop is not None and should_stop()):
                    save()
                    raise DemoInterrupted(f"interrupted: {variant} saved its checkpoint at step {step} "
                                          f"of {steps} ({path}); continue with --resume")
                if step % cfg.ckpt_every == 0 and step < end:
                    save()
        save()  # the last step of this call: Ctrl-C in the evaluation below keeps the training
        if step < steps:
            return dict(stopped_at=step)
        phase = "evaluation"
        metrics = evaluate(model, [b.to(device) for b in val_batches(
            val, batch=cfg.batch, seq_len=cfg.seq_len, num_batches=cfg.eval_batches)])
        total, active = param_counts(model, metrics.get("experts_per_token_by_layer"))
        result = dict(variant=variant, steps=step, params_total=total, params_active=active,
                      tokens_per_s=tokens / elapsed if elapsed else None, train_loss_bpb=history,
                      **metrics)
        tail = [d for d in depth[-max(1, steps // 10):] if d is not None]
        if tail:  # MoR: the mean depth of the last tenth of training next to the eval-time depth
            result["train_recursion_depth"] = sum(tail) / len(tail)
        save(result)
        return result
    except DemoInterrupted:
        raise
    except KeyboardInterrupt:
        kept = (f"its checkpoint holds step {saved_step} of {steps} ({path}); continue with --resume"
                if saved_step is not None else "no checkpoint of it was written yet; --resume starts it over")
        raise DemoInterrupted(f"interrupted during {variant}'s {phase} ({step} steps done): {kept}"
                              + (" (it only evaluates)" if phase == "evaluation" else "")) from None
    finally:
        bar.close()


class ResumeError(ValueError):
    """--resume found a checkpoint that does not belong to this run."""
