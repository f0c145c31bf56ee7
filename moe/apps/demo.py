"""`moe demo`: train small byte-level causal LMs on CPU and compare routers at equal active parameters.

Shape legend (moe/__init__.py): B batch, S sequence length (bytes), D model dim, E experts, K top-k,
F dense SwiGLU hidden (the baseline's FFN); every variant's FFN touches about 3*D*F weights
per token:

    dense        SwiGLU FFN of hidden F                                  (moe.model.SwiGLUMLP)
    topk         E experts of F/K, top-K softmax router, Switch aux loss  (routers.TopKRouter)
    recurrent    the same experts, routed by the GRU router chain (RMoE)  (routers.RecurrentRouterChain)
    xmoe         2E experts of F/(2K), XMoE threshold router, at most 2K  (routers.ThresholdRouter)
    finegrained  DeepSeekMoE segmentation of topk by 2, 1 shared expert   (MoELayer.fine_grained)
    mor          dense blocks, Mixture-of-Recursions: L unique blocks run as 2L layers
                 (cycle sharing, 2 recursions, expert-choice capacities 1 and 1/2) (moe.mor)

Active parameters are the ones a token touches on average (measured experts per token for the
variable-k router); MoR reuses its L blocks, so its active = total = the dense model's.
Reproducible: torch.manual_seed(seed) before each model is built, batches a pure function of
(seed, step) (moe.apps.data), no dropout or router jitter. Checkpoints hold model, optimizer,
scheduler, RNG state, loss history and step counter of one step boundary, written atomically, so
--resume continues exactly wherever a run stopped, Ctrl-C included (train_variant).
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

from moe import ExpertChoiceConfig, MixtureOfRecursions, MoELayer, build_lm, build_mor_lm
from moe.apps.checks import check_fields, kind
from moe.apps.data import train_batch, val_batches

VARIANTS = ("dense", "topk", "recurrent", "xmoe", "finegrained", "mor")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Model, data and optimiser settings shared by every variant (each field's kind, in its
    metadata, is checked here and is the CLI option's argparse type: moe.apps.checks)."""

    dim: int = field(default=64, metadata=kind("positive_int"))
    layers: int = field(default=4, metadata=kind("positive_int"))
    heads: int = field(default=4, metadata=kind("positive_int"))
    ffn_hidden: int = field(default=256, metadata=kind("positive_int"))  # F: the dense SwiGLU hidden
    experts: int = field(default=8, metadata=kind("positive_int"))
    top_k: int = field(default=2, metadata=kind("positive_int"))
    xmoe_threshold: float = field(default=0.5, metadata=kind("probability"))
    seq_len: int = field(default=128, metadata=kind("positive_int"))
    batch: int = field(default=16, metadata=kind("positive_int"))
    steps: int = field(default=200, metadata=kind("positive_int"))
    lr: float = field(default=3e-3, metadata=kind("positive_float"))
    seed: int = field(default=0, metadata=kind("nonnegative_int"))
    eval_batches: int = field(default=8, metadata=kind("positive_int"))
    ckpt_every: int = field(default=100, metadata=kind("positive_int"))

    def __post_init__(self):
        check_fields(self)
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} must be <= experts={self.experts}")
        if self.ffn_hidden % (4 * self.top_k):
            raise ValueError(f"ffn_hidden={self.ffn_hidden} must be divisible by 4*top_k={4 * self.top_k} "
                             "(expert sizes F/K, F/2K of every variant)")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads} with an even "
                             f"head dim dim/heads (rotary embeddings)")


def build_model(variant: str, cfg: DemoConfig) -> nn.Module:
    """The CausalLM of one variant (vocabulary 256 bytes), built after torch.manual_seed(cfg.seed)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    torch.manual_seed(cfg.seed)
    D, L, E, K, F = cfg.dim, cfg.layers, cfg.experts, cfg.top_k, cfg.ffn_hidden
    lm = dict(vocab_size=256, dim=D, n_heads=cfg.heads)
    if variant == "dense":
        return build_lm(n_layers=L, mlp_hidden=F, **lm)
    if variant == "mor":
        return build_mor_lm(n_layers=2 * L, num_recursions=2, sharing="cycle", mlp_hidden=F,
                            router=ExpertChoiceConfig(), **lm)
    if variant == "topk":
        return build_lm(n_layers=L, mlp_factory=lambda i: MoELayer(D, F // K, E, K), **lm)
    if variant == "finegrained":
        return build_lm(n_layers=L, mlp_factory=lambda i: MoELayer.fine_grained(
            D, F // K, E, K, granularity=2, num_shared_experts=1), **lm)
    if variant == "xmoe":
        from routers import ThresholdRouter

        return build_lm(n_layers=L, mlp_factory=lambda i: MoELayer(
            D, F // (2 * K), 2 * E, router=ThresholdRouter(
                D, 2 * E, threshold=cfg.xmoe_threshold, rule="xmoe", max_experts=2 * K)), **lm)
    from routers import RecurrentRouterChain

    chain = RecurrentRouterChain(L, D, E, K, router_dim=max(8, D // 4))
    model = build_lm(n_layers=L, mlp_factory=lambda i: MoELayer(D, F // K, E, router=chain[i]), **lm)
    model.router_chain = chain  # registers the shared GRU cell once
    chain.reset_on_forward(model)  # the drop-in state starts from zeros at every model forward
    return model


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


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
    for x in batches:
        nats.append(model(x, labels=x).loss.item())
        for i, m in enumerate(layers):
            r = m.last_routing
            counts[i] += r.counts_E.double().cpu()
            ept[i].append(r.experts_per_token.item())
            dropped[i].append(r.dropped_fraction.item())
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
                  progress: bool = True, device: torch.device | str = "cpu") -> dict:
    """Train one variant for cfg.steps (or until stop_after steps this call), checkpointing every
    cfg.ckpt_every steps, on Ctrl-C, and on the last step before the final evaluation; return its
    result dict (no result if stopped early).

    A checkpoint holds the model, optimizer, scheduler, RNG state, loss history and the step
    counter of one step boundary (the data order is a function of the step: moe.apps.data), so
    `--resume` continues exactly wherever the run was interrupted: a Ctrl-C in a step finishes
    that step and saves (interrupts_between_steps); one in the final evaluation keeps the
    training, and the resumed run only evaluates. Raises DemoInterrupted saying what is saved."""
    from tqdm import tqdm

    model = build_model(variant, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path, step, history, saved_step = ckpt_dir / f"{variant}.pt", 0, [], None
    if resume and path.exists():
        state = torch.load(path, weights_only=False, map_location=device)
        saved = {k: v for k, v in state["config"].items() if k not in ("steps", "ckpt_every")}
        mine = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "ckpt_every")}
        if saved != mine:
            raise ResumeError(f"--resume: checkpoint {path} was trained with a different config "
                              f"{ {k: v for k, v in saved.items() if mine.get(k) != v} }; use a fresh --out")
        if state["step"] > cfg.steps:
            raise ResumeError(f"--resume: checkpoint {path} is at step {state['step']} > --steps {cfg.steps}")
        if state.get("result") is not None and state["step"] == cfg.steps:
            return state["result"]
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"].cpu())
        step, history, saved_step = state["step"], state["history"], state["step"]

    def save(result=None):
        nonlocal saved_step
        _save(path, dict(variant=variant, config=asdict(cfg), step=step, model=model.state_dict(),
                         optim=opt.state_dict(), sched=sched.state_dict(), rng=torch.get_rng_state(),
                         history=history, result=result))
        saved_step = step

    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    tokens, elapsed, phase = 0, 0.0, "training"
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{variant:<11}", disable=not progress,
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
                bar.update(1)
                bar.set_postfix(loss_bpb=f"{history[-1]:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
                if interrupted():
                    save()
                    raise DemoInterrupted(f"interrupted: {variant} saved its checkpoint at step {step} "
                                          f"of {cfg.steps} ({path}); continue with --resume")
                if step % cfg.ckpt_every == 0 and step < end:
                    save()
        save()  # the last step of this call: Ctrl-C in the evaluation below keeps the training
        if step < cfg.steps:
            return dict(stopped_at=step)
        phase = "evaluation"
        metrics = evaluate(model, [b.to(device) for b in val_batches(
            val, batch=cfg.batch, seq_len=cfg.seq_len, num_batches=cfg.eval_batches)])
        total, active = param_counts(model, metrics.get("experts_per_token_by_layer"))
        result = dict(variant=variant, steps=step, params_total=total, params_active=active,
                      tokens_per_s=tokens / elapsed if elapsed else None, train_loss_bpb=history,
                      **metrics)
        save(result)
        return result
    except DemoInterrupted:
        raise
    except KeyboardInterrupt:
        kept = (f"its checkpoint holds step {saved_step} of {cfg.steps} ({path}); continue with --resume"
                if saved_step is not None else "no checkpoint of it was written yet; --resume starts it over")
        raise DemoInterrupted(f"interrupted during {variant}'s {phase} ({step} steps done): {kept}"
                              + (" (it only evaluates)" if phase == "evaluation" else "")) from None
    finally:
        bar.close()


class ResumeError(ValueError):
    """--resume found a checkpoint that does not belong to this run."""
