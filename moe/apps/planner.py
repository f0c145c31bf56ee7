"""`moe plan`: parameters, FLOPs, memory and predicted efficiency leverage of an MoE LM config.

Shape letters as in moe/__init__.py (D model dim, E routed experts, K experts per token, F expert
hidden dim, V vocabulary). The scalars of the formulas keep the paper's symbols: L layers, S shared
experts, A activation ratio, G granularity, C training compute; they name no tensor dims.

The model counted is the one moekit builds (moe.model.CausalLM of DecoderBlocks whose MLP is a
moe.MoELayer): per layer two RMSNorms (2D), attention without biases (4D^2), a linear router
(D*E) and SwiGLU experts (3*D*F each); an untied embedding and head (V*D each) and a final norm.

Efficiency leverage (Tian et al. 2025, "Towards Greater Leverage", arXiv:2507.17702, Eq. 13 with
the Table 2 fit; restated as Eq. 1 of the Ling 2.0 report, arXiv:2510.22115 Sec. 2.3.2):

    EL(A, G, C) = A_hat ** (alpha + gamma * (log G)^2 + beta * log G),  alpha = a + d * log C

A = (K + S) / (E + S) is the activation ratio, G = 2 D / F their granularity, C the training
compute in FLOPs, counted without the embedding and output head (compute_budget). The law was fitted
on budgets EL_FIT_COMPUTE; `moe plan` warns when C is far outside them. A_hat is "a saturating
transformation of the activation ratio as defined in Clark et al. (2022)" (Ling 2.0 report, text
under Eq. 1). Clark et al.'s transform of the expert count E is
1/E_hat = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max; carried over to A:

    1/A_hat = 1/(A + (1/A_start - 1/A_max)^-1) + 1/A_max

so A_hat -> A_start as A -> 0 (EL saturates for extreme sparsity), A_hat ~ A + A_start in the
fitted range (A_max = 5.28e16 is far above any A), and A_hat -> A_max for large A. The paper
does not print the log bases. log10 for C and log2 for G are the only choice among {2, e, 10}
that reproduces its claims (tests/test_cli.py checks each):
  * EL(A=3.1%, G=12, C=1e22) = 7.24 ("about 7x"); ln C gives ~5600, ln G gives 6.9;
  * the EL-optimal G is 2 ** (-beta / (2 gamma)) = 11.3, inside the reported 8-12 optimum
    (base e would put it at 33, base 10 at 3184);
  * EL(A=1) = 0.99 at any G and C (a dense model has no leverage over itself).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from types import MappingProxyType

from moe.apps.checks import check_fields, kind

# Table 2 of arXiv:2507.17702 (its fitted constants); read-only.
EL_CONSTANTS = MappingProxyType(dict(a=1.23, d=-7.61e-2, gamma=1.67e-2, beta=-1.17e-1,
                                     A_start=1.63e-2, A_max=5.28e16))


def saturated_activation(A: float, *, A_start: float = EL_CONSTANTS["A_start"],
                         A_max: float = EL_CONSTANTS["A_max"]) -> float:
    """A_hat = 1 / (1/(A + (1/A_start - 1/A_max)^-1) + 1/A_max) (Clark et al. 2022 transform, on A)."""
    if not A > 0:
        raise ValueError(f"activation ratio A={A} must be > 0")
    return 1.0 / (1.0 / (A + 1.0 / (1.0 / A_start - 1.0 / A_max)) + 1.0 / A_max)


def el_exponent(G: float, C: float, *, constants=EL_CONSTANTS) -> float:
    """alpha + gamma (log2 G)^2 + beta log2 G with alpha = a + d log10 C (arXiv:2507.17702 Eq. 13)."""
    if not G > 0:
        raise ValueError(f"granularity G={G} must be > 0")
    if not C > 0:
        raise ValueError(f"compute budget C={C} must be > 0 FLOPs")
    lg = math.log2(G)
    alpha = constants["a"] + constants["d"] * math.log10(C)
    return alpha + constants["gamma"] * lg * lg + constants["beta"] * lg


def efficiency_leverage(A: float, G: float, C: float, *, constants=EL_CONSTANTS) -> float:
    """Predicted compute ratio dense/MoE at equal loss (arXiv:2507.17702 Eq. 13, Table 2)."""
    A_hat = saturated_activation(A, A_start=constants["A_start"], A_max=constants["A_max"])
    return A_hat ** el_exponent(G, C, constants=constants)


def optimal_granularity(*, constants=EL_CONSTANTS) -> float:
    """argmax_G EL = 2 ** (-beta / (2 gamma)) (the exponent is most negative there, A_hat < 1)."""
    return 2.0 ** (-constants["beta"] / (2.0 * constants["gamma"]))


# The compute budgets (training FLOPs) the law's constants were fitted on, and the one budget it was
# validated at beyond them (Ling-mini-beta: 0.85B active parameters x 1T tokens, 6 x 0.85e9 x 1e12
# = 5.1e21). The fitted range is the span of the paper's scaling-law experiments as recalled from
# its experiment section: the paper's body could not be read from this machine, so it is not
# re-checked (nor is the non-embedding convention of compute_budget).
EL_FIT_COMPUTE = (1e18, 3e20)
EL_VALIDATED_COMPUTE = 5.1e21
FAR_OUTSIDE = 10.0  # a warning when C is more than this factor outside EL_FIT_COMPUTE


def compute_range_warning(C: float) -> str | None:
    """A warning when C lies more than FAR_OUTSIDE times outside the fitted compute range, else None."""
    lo, hi = EL_FIT_COMPUTE
    factor = lo / C if C < lo else C / hi
    if factor <= FAR_OUTSIDE:
        return None
    side = "below" if C < lo else "above"
    return (f"C = {C:.3g} FLOPs is {factor:.3g}x {side} the compute range the EL law was fitted on "
            f"({lo:.0e}-{hi:.0e} FLOPs; validated once at {EL_VALIDATED_COMPUTE:.2g}): its EL is an "
            f"extrapolation")


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """An MoE LM: expert_hidden F, or Krajewski granularity g (F = ffn_hidden / g). The training
    compute C of the EL law is `compute`, or `tokens` x the non-embedding training FLOPs per token
    (at most one of them; neither: C = 1e22, the budget of the paper's headline example)."""

    hidden: int = field(metadata=kind("positive_int"))
    layers: int = field(metadata=kind("positive_int"))
    experts: int = field(metadata=kind("positive_int"))
    top_k: int = field(metadata=kind("positive_int"))
    expert_hidden: int | None = field(default=None, metadata=kind("positive_int"))
    granularity: float | None = field(default=None, metadata=kind("positive_float"))
    ffn_hidden: int | None = field(default=None, metadata=kind("positive_int"))  # dense d_ff (default 4 D)
    shared_experts: int = field(default=0, metadata=kind("nonnegative_int"))
    shared_hidden: int | None = field(default=None, metadata=kind("positive_int"))  # default: expert_hidden
    vocab: int = field(default=32000, metadata=kind("positive_int"))
    seq_len: int = field(default=2048, metadata=kind("positive_int"))
    batch: int = field(default=1, metadata=kind("positive_int"))
    heads: int = field(default=8, metadata=kind("positive_int"))
    compute: float | None = field(default=None, metadata=kind("positive_float"))  # training FLOPs C for EL
    tokens: float | None = field(default=None, metadata=kind("positive_float"))  # training tokens
    param_bytes: int = field(default=2, metadata=kind("positive_int"))  # bf16 weights and gradients
    act_bytes: int = field(default=2, metadata=kind("positive_int"))  # bf16 activations

    def __post_init__(self):
        check_fields(self)
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} must be <= experts={self.experts}")
        if (self.expert_hidden is None) == (self.granularity is None):
            raise ValueError("give exactly one of expert_hidden and granularity")
        if self.compute is not None and self.tokens is not None:
            raise ValueError(f"give at most one of compute={self.compute} and tokens={self.tokens} "
                             "(C = tokens x non-embedding training FLOPs/token)")
        if self.granularity is not None:
            F = self.d_ff / self.granularity
            if not (math.isfinite(F) and round(F) >= 1):
                raise ValueError(f"granularity={self.granularity} gives expert_hidden = ffn_hidden / "
                                 f"granularity = {self.d_ff} / {self.granularity} = {F:.4g}, not an "
                                 f"integer >= 1")

    @property
    def d_ff(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.hidden

    @property
    def F(self) -> int:
        return self.expert_hidden if self.expert_hidden is not None else round(self.d_ff / self.granularity)

    @property
    def F_shared(self) -> int:
        return self.shared_hidden if self.shared_hidden is not None else self.F


def compute_budget(cfg: PlanConfig, flops_per_token_non_embedding: float) -> tuple[float, str]:
    """(C, where it came from): --compute as given; else tokens x M, M the non-embedding training
    FLOPs per token (3x the forward matmuls of attention, router and active experts, plus the
    attention scores; no embedding or head: the C = M x tokens of DeepSeek LLM, arXiv:2401.02954
    Sec. 3, which the efficiency-leverage experiments count compute by); else the default 1e22.
    The attention scores are counted as moekit's attention counts them (2 L seq D forward, causal);
    DeepSeek's M counts 4 L seq D: a difference of about 10% in C at seq = 2 D with a 4 D FFN,
    about 1% in EL (whose exponent moves by d log10 C)."""
    if cfg.compute is not None:
        return cfg.compute, "--compute"
    if cfg.tokens is not None:
        return cfg.tokens * flops_per_token_non_embedding, \
            "--tokens x non-embedding training FLOPs/token"
    return 1e22, "default 1e22 (neither --compute nor --tokens)"


def size_model(cfg: PlanConfig) -> dict:
    """Parameter counts, FLOPs per token, memory and EL of `cfg` (plain dict, JSON-ready).

    FLOPs per token, forward: 2 per multiply-add of every active matmul weight (attention
    projections, router, K routed + S shared experts, head) plus attention 2 * L * seq_len * D
    (Kaplan et al. 2020, Table 1); training = 3x forward (backward = 2x forward).
    Memory: weights and gradients at param_bytes; Adam m and v in fp32 (8 B/param) plus an fp32
    master copy when param_bytes < 4. Activations kept for backward per token (flash attention,
    no S^2 scores, no dropout; cf. Korthikanti et al. 2022 Sec. 4.1): per layer act_bytes *
    (9 D + (K + S)(D + 3 F)) + 4 (E + H) bytes (norm inputs, qkv/q/k/v/attention output, out-proj
    and router inputs; per routed row its input, gate/up outputs and SwiGLU product; fp32 router
    probabilities and softmax statistics), plus the fp32 logits 4 V.
    EL's C: see compute_budget (non-embedding training FLOPs x tokens).
    """
    D, L, E, K, S, V = cfg.hidden, cfg.layers, cfg.experts, cfg.top_k, cfg.shared_experts, cfg.vocab
    F, Fs = cfg.F, cfg.F_shared
    attn, norms, router = 4 * D * D, 2 * D, D * E
    expert, shared = 3 * D * F, 3 * D * Fs
    layer_total = attn + norms + router + E * expert + S * shared
    layer_active = attn + norms + router + K * expert + S * shared
    embed, head = V * D, V * D
    total = L * layer_total + embed + head + D
    active = L * layer_active + embed + head + D
    matmul_active = L * (attn + router + K * expert + S * shared) + head
    fwd = 2 * matmul_active + 2 * L * cfg.seq_len * D
    train = 3 * fwd
    opt_bytes = 8 + (4 if cfg.param_bytes < 4 else 0)
    act_token = L * (cfg.act_bytes * (9 * D + (K + S) * (D + 3 * F)) + 4 * (E + cfg.heads)) + 4 * V
    tokens_step = cfg.seq_len * cfg.batch
    train_non_embedding = 3 * (fwd - 2 * head)  # M: the head's matmul out, attention kept
    C, source = compute_budget(cfg, train_non_embedding)
    A = (K + S) / (E + S)
    G = 2 * D / F
    return dict(
        config=asdict(cfg), expert_hidden=F, shared_hidden=Fs, ffn_hidden=cfg.d_ff,
        params_total=total, params_active=active,
        params_total_non_embedding=total - embed - head, params_active_non_embedding=active - embed - head,
        flops_per_token_forward=fwd, flops_per_token_training=train,
        flops_per_step_training=train * tokens_step,
        memory_weights_bytes=total * cfg.param_bytes, memory_grads_bytes=total * cfg.param_bytes,
        memory_adam_bytes=total * opt_bytes, memory_activations_per_token_bytes=act_token,
        memory_activations_per_step_bytes=act_token * tokens_step,
        activation_ratio=A, granularity_tian=G, granularity_krajewski=cfg.d_ff / F,
        flops_per_token_training_non_embedding=train_non_embedding,
        compute=C, compute_source=source, compute_warning=compute_range_warning(C),
        tokens=cfg.tokens if cfg.tokens is not None else C / train_non_embedding,
        saturated_activation=saturated_activation(A), efficiency_leverage=efficiency_leverage(A, G, C),
        optimal_granularity_tian=optimal_granularity(),
    )


def human_count(x: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= unit:
            return f"{x / unit:.3g}{s}"
    return f"{x:.4g}"


def human_bytes(x: float) -> str:
    for unit, s in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= unit:
            return f"{x / unit:.3g} {s}"
    return f"{x:.0f} B"


def format_plan(r: dict) -> str:
    """Human-readable report of :func:`size_model`'s dict."""
    c, n, b = r["config"], human_count, human_bytes
    lines = [
        f"config: D={c['hidden']} L={c['layers']} E={c['experts']} top_k={c['top_k']} "
        f"shared={c['shared_experts']} F_expert={r['expert_hidden']} d_ff={r['ffn_hidden']} "
        f"V={c['vocab']} seq={c['seq_len']} batch={c['batch']}",
        f"parameters        total {n(r['params_total'])} ({n(r['params_total_non_embedding'])} "
        f"non-embedding)   active {n(r['params_active'])} ({n(r['params_active_non_embedding'])} "
        f"non-embedding)",
        f"FLOPs/token       forward {n(r['flops_per_token_forward'])}   training (3x) "
        f"{n(r['flops_per_token_training'])}   per step {n(r['flops_per_step_training'])}   "
        f"non-embedding training (M) {n(r['flops_per_token_training_non_embedding'])}",
        f"memory            weights {b(r['memory_weights_bytes'])}   grads "
        f"{b(r['memory_grads_bytes'])}   Adam {b(r['memory_adam_bytes'])}",
        f"activations       {b(r['memory_activations_per_token_bytes'])}/token   "
        f"{b(r['memory_activations_per_step_bytes'])}/step (seq x batch)",
        f"activation ratio  A = (top_k + shared)/(experts + shared) = {r['activation_ratio']:.4f}"
        f"   A_hat = {r['saturated_activation']:.4f}",
        f"granularity       Tian et al.: G = 2 D / F_expert = {r['granularity_tian']:.3g}   "
        f"Krajewski et al.: G = d_ff / F_expert = {r['granularity_krajewski']:.3g}",
        f"efficiency lev.   EL = {r['efficiency_leverage']:.3g} at C = {r['compute']:.3g} FLOPs = "
        f"{n(r['tokens'])} tokens x M ({r['compute_source']}); EL-optimal Tian G = "
        f"{r['optimal_granularity_tian']:.3g}",
    ]
    if r["compute_warning"]:
        lines.append(f"warning: {r['compute_warning']}")
    return "\n".join(lines)
