"""`moe plan --advise`: sparsity advice, candidate (E, K, G, S) configurations ranked by efficiency leverage.

Scalars as in moe.apps.planner (D model dim, E routed experts, K routed experts per token, S shared
experts, F expert hidden, A activation ratio, G granularity, C training compute); no tensors here.

Given a model's trunk (D, L, vocabulary, sequence length), a compute budget (C, or training tokens)
and optional caps on total parameters and on training-state memory, each candidate keeps the
dense reference's active FFN width, (K + S) F = ffn_hidden (default 4 D), so every candidate
costs the same FLOPs per token up to its router; they differ in how many experts hold those
weights (E) and how finely they are cut (F, hence G = 2 D / F). The candidates that fit the
caps are ranked by the efficiency leverage of arXiv:2507.17702 (Eq. 13, moe.apps.planner), which
grows as A = (K + S) / (E + S) falls (saturating below A_start) and peaks at G near 11; with no
cap the sparsest candidates win, so a cap is what makes the ranking an answer ("Parameters vs
FLOPs", Abnar et al. 2025, arXiv:2501.12370: the best sparsity depends on the parameter budget).

Reasoning caution (Nakamura et al. 2025, "Optimal Sparsity of Mixture-of-Experts Language Models
for Reasoning Tasks", arXiv:2508.18672, abstract v2): at a fixed compute budget, memorization
keeps improving with total parameters, but reasoning accuracy peaks at an optimal number of
training tokens per total parameter (TPP) and saturates or regresses for sparser models, even
after GRPO or with more test-time compute. The optimum is quoted as TPP near 20 in summaries of
the paper (its figures could not be read from this machine); a candidate whose TPP = tokens /
total parameters is below REASONING_TPP is flagged, not removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moe.apps.checks import check_fields, kind
from moe.apps.planner import PlanConfig, compute_range_warning, human_bytes, human_count, size_model

REASONING_TPP = 20.0  # arXiv:2508.18672: reasoning is best near this many tokens per total parameter
EXPERT_COUNTS = (8, 16, 32, 64, 128, 256, 512, 1024)  # the E of the candidate grid
ACTIVE_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # the K + S of the grid: F = ffn_hidden / (K + S)


@dataclass(frozen=True, kw_only=True)
class AdviceConfig:
    """The trunk, budget and caps of a sparsity search; exactly one of compute and tokens."""

    hidden: int = field(metadata=kind("positive_int"))
    layers: int = field(metadata=kind("positive_int"))
    ffn_hidden: int | None = field(default=None, metadata=kind("positive_int"))  # active FFN width (4 D)
    vocab: int = field(default=32000, metadata=kind("positive_int"))
    seq_len: int = field(default=2048, metadata=kind("positive_int"))
    batch: int = field(default=1, metadata=kind("positive_int"))
    heads: int = field(default=8, metadata=kind("positive_int"))
    compute: float | None = field(default=None, metadata=kind("positive_float"))
    tokens: float | None = field(default=None, metadata=kind("positive_float"))
    max_params: float | None = field(default=None, metadata=kind("positive_float"))  # total parameters
    max_memory_gib: float | None = field(default=None, metadata=kind("positive_float"))  # weights+grads+Adam
    param_bytes: int = field(default=2, metadata=kind("positive_int"))
    top: int = field(default=10, metadata=kind("positive_int"))

    def __post_init__(self):
        check_fields(self)
        if (self.compute is None) == (self.tokens is None):
            raise ValueError("sparsity advice needs a compute budget: give exactly one of compute "
                             "(training FLOPs) and tokens")


def candidates(cfg: AdviceConfig) -> list[PlanConfig]:
    """Every (E, K, S, F) of the grid with (K + S) F = ffn_hidden, K >= 1, S in {0, 1}, E > K."""
    d_ff = cfg.ffn_hidden if cfg.ffn_hidden is not None else 4 * cfg.hidden
    out = []
    for n in ACTIVE_SPLITS:
        if d_ff % n:
            continue
        for S in (0, 1):
            K = n - S
            for E in EXPERT_COUNTS:
                if K >= 1 and E > K:
                    out.append(PlanConfig(
                        hidden=cfg.hidden, layers=cfg.layers, experts=E, top_k=K, expert_hidden=d_ff // n,
                        ffn_hidden=d_ff, shared_experts=S, vocab=cfg.vocab, seq_len=cfg.seq_len,
                        batch=cfg.batch, heads=cfg.heads, compute=cfg.compute, tokens=cfg.tokens,
                        param_bytes=cfg.param_bytes))
    return out


def _row(r: dict) -> dict:
    c = r["config"]
    state = r["memory_weights_bytes"] + r["memory_grads_bytes"] + r["memory_adam_bytes"]
    tpp = r["tokens"] / r["params_total"]
    return dict(compute=r["compute"], tokens=r["tokens"], experts=c["experts"], top_k=c["top_k"],
                shared_experts=c["shared_experts"],
                expert_hidden=r["expert_hidden"], granularity_tian=r["granularity_tian"],
                activation_ratio=r["activation_ratio"], efficiency_leverage=r["efficiency_leverage"],
                params_total=r["params_total"], params_active=r["params_active"],
                flops_per_token_training=r["flops_per_token_training"], memory_training_state_bytes=state,
                tokens_per_parameter=tpp, reasoning_caution=tpp < REASONING_TPP)


def advise(cfg: AdviceConfig) -> dict:
    """The top cfg.top candidates by EL (ties: fewer total parameters) among those within the caps,
    with their parameters, FLOPs, memory, TPP and the reasoning flag (plain dict, JSON-ready)."""
    rows = [_row(size_model(c)) for c in candidates(cfg)]
    max_bytes = None if cfg.max_memory_gib is None else cfg.max_memory_gib * 2**30
    fits = [r for r in rows
            if (cfg.max_params is None or r["params_total"] <= cfg.max_params)
            and (max_bytes is None or r["memory_training_state_bytes"] <= max_bytes)]
    fits.sort(key=lambda r: (-r["efficiency_leverage"], r["params_total"]))
    C = [r["compute"] for r in rows]
    return dict(config=asdict(cfg), compute_min=min(C), compute_max=max(C),
                compute_source="--compute" if cfg.compute is not None else
                "--tokens x each candidate's non-embedding training FLOPs/token",
                compute_warning=compute_range_warning(max(C)) or compute_range_warning(min(C)),
                candidates_considered=len(rows), candidates_within_caps=len(fits),
                reasoning_tpp=REASONING_TPP, ranked=fits[:cfg.top])


def format_advice(a: dict) -> str:
    """The ranked table of :func:`advise`'s dict, with the compute it used and the flags explained."""
    lo, hi = a["compute_min"], a["compute_max"]
    lines = [f"sparsity advice: C = {lo:.3g}{'' if hi <= lo * 1.0005 else f' to {hi:.3g}'} FLOPs "
             f"({a['compute_source']}); {a['candidates_within_caps']} of {a['candidates_considered']} "
             f"candidates within the caps, ranked by EL (arXiv:2507.17702 Eq. 13)"]
    if a["compute_warning"]:
        lines.append(f"warning: {a['compute_warning']}")
    if not a["ranked"]:
        lines.append("no candidate fits the caps: raise --max-params / --max-memory")
        return "\n".join(lines)
    lines.append(f"{'E':>5} {'K':>3} {'S':>2} {'F':>6} {'G':>5} {'A':>7} {'EL':>6} {'total':>7} "
                 f"{'active':>7} {'FLOPs/tok':>9} {'memory':>10} {'tokens':>7} {'TPP':>7}")
    for r in a["ranked"]:
        lines.append(f"{r['experts']:>5} {r['top_k']:>3} {r['shared_experts']:>2} {r['expert_hidden']:>6} "
                     f"{r['granularity_tian']:>5.3g} {r['activation_ratio']:>7.4f} "
                     f"{r['efficiency_leverage']:>6.3g} {human_count(r['params_total']):>7} "
                     f"{human_count(r['params_active']):>7} "
                     f"{human_count(r['flops_per_token_training']):>9} "
                     f"{human_bytes(r['memory_training_state_bytes']):>10} {human_count(r['tokens']):>7} "
                     f"{r['tokens_per_parameter']:>7.3g}"
                     + ("  reasoning caution" if r["reasoning_caution"] else ""))
    if any(r["reasoning_caution"] for r in a["ranked"]):
        lines.append(f"reasoning caution: fewer than {a['reasoning_tpp']:.0f} training tokens per total "
                     f"parameter; arXiv:2508.18672 finds reasoning accuracy saturates or regresses for "
                     f"MoE models this sparse at fixed compute (memorization still gains)")
    lines.append("G = 2 D / F (Tian et al.); memory = weights + gradients + Adam (no activations); "
                 "every candidate keeps the active FFN width (K + S) F = ffn_hidden")
    return "\n".join(lines)
