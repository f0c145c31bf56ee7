"""PNG charts and text tables of the `moe` CLI (matplotlib, Agg backend: no display needed).

demo: loss curves (train loss per step, validation bits per byte at the end), the arms' validation
bits per byte and gap to dense with error bars over seeds, and an expert-load heatmap (layers x
experts, share of routed slots) per MoE variant. bench: moekit's speedup over each
baseline of every benchmark row (baseline time / moekit time, from the rows' *_ms columns).
"""

from __future__ import annotations

import re
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(xs: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def loss_curves(results: dict, path: Path) -> Path:
    """Train loss (bits per byte, EMA 0.9) of each variant against step; validation as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        hist = r["train_loss_bpb"]
        line, = ax.plot(range(1, len(hist) + 1), _smooth(hist), label=f"{name} (val {r['val_bpb']:.3f})")
        ax.plot([len(hist)], [r["val_bpb"]], "o", color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (bits per byte)")
    ax.set_title("moe demo: training loss (EMA) and final validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def expert_load_heatmap(results: dict, path: Path) -> Path | None:
    """One panel per MoE variant: rows are layers, columns experts, colour the share of the
    layer's routed slots on validation data (uniform = 1/E). None when no variant has experts."""
    moe = {k: r for k, r in results.items() if r.get("expert_load")}
    if not moe:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(moe), 1, figsize=(7, 1.2 + 1.3 * len(moe)), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], moe.items()):
        load = r["expert_load"]
        im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"{name}: load CV {r['load_cv']:.2f}, {r['experts_per_token']:.2f} experts/token",
                     fontsize=9)
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(load)))
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def seed_bars(summary: dict, path: Path) -> Path:
    """Two panels: each arm's validation bits per byte (mean over seeds, error bar = the spread,
    dots = the seeds), and its paired gap to dense (mean +- spread; below 0 = better than dense)."""
    plt = _pyplot()
    names = list(summary)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, n in enumerate(names):
        r = summary[n]
        a.errorbar([i], [r["val_bpb"]], yerr=[r["val_bpb_std"]], fmt="o", capsize=5, color="tab:blue")
        a.plot([i] * len(r["val_bpb_seeds"]), r["val_bpb_seeds"], ".", color="gray", alpha=0.7)
    a.set_xticks(range(len(names)))
    a.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    a.set_ylabel("validation bits per byte")
    a.set_title(f"mean +- spread over {len(summary[names[0]]['seeds'])} seeds (dots: seeds)", fontsize=9)
    gaps = [n for n in names if "gap_to_dense" in summary[n]]
    for i, n in enumerate(gaps):
        r = summary[n]
        b.errorbar([i], [r["gap_to_dense"]], yerr=[r["gap_to_dense_std"]], fmt="o", capsize=5,
                   color="tab:green" if r.get("vs_dense") == "better" else "tab:gray")
        b.plot([i] * len(r["gap_to_dense_seeds"]), r["gap_to_dense_seeds"], ".", color="gray", alpha=0.7)
    b.axhline(0, color="black", lw=0.8)
    b.set_xticks(range(len(gaps)))
    b.set_xticklabels(gaps, rotation=30, ha="right", fontsize=8)
    b.set_ylabel("val bits/byte - dense's (same seed)")
    b.set_title("paired gap to dense (green: below 0 in every seed, by more than 3 spreads)", fontsize=9)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pm(mean, std, digits=3) -> str:
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def results_table(results: dict) -> str:
    """The demo's final table: one row per arm, mean +- spread over seeds, paired gap to dense."""
    head = (f"{'variant':<19} {'val bits/byte':>15} {'gap to dense':>16} {'all seeds':>9} {'steps':>5} "
            f"{'tok/s':>7} {'total':>7} {'active':>7} {'exp/tok':>7} {'load CV':>7}")
    rows = [head, "-" * len(head)]
    notes = []
    for name, r in results.items():
        tps = r.get("tokens_per_s")
        gap = (_pm(r["gap_to_dense"], r["gap_to_dense_std"]) if "gap_to_dense" in r else "-")
        every = ("-" if "below_dense_every_seed" not in r else "below" if r["below_dense_every_seed"]
                 else "above" if all(g > 0 for g in r["gap_to_dense_seeds"]) else "mixed")
        ept = r.get("experts_per_token")
        rows.append(
            f"{name:<19} {_pm(r['val_bpb'], r['val_bpb_std']):>15} {gap:>16} {every:>9} "
            f"{len(r['train_loss_bpb']):>5} {tps if tps is not None else float('nan'):>7,.0f} "
            f"{_fmt_params(r['params_total']):>7} {_fmt_params(r['params_active']):>7} "
            + (f"{ept:>7.2f} {r['load_cv']:>7.3f}" if ept is not None else f"{'-':>7} {'-':>7}"))
        if "mean_recursion_depth" in r:
            notes.append(f"{name}: recursion depth {r['mean_recursion_depth']:.2f} at eval, "
                         f"{r.get('train_recursion_depth', float('nan')):.2f} in training")
        if "vs_dense" in r:
            pc = r.get("paper_comparison")
            notes.append(f"{name}: {r['vs_dense']} vs dense (pooled spread {r['gap_to_dense_pooled_std']:.3f})" + (
                f"; vs {pc['vs']} (its paper's baseline): {pc['mean']:+.3f} +- {pc['std']:.3f} "
                f"(pooled {pc['pooled_std']:.3f}), {pc['verdict']}" if pc else ""))
        if name == "xmoe" and "cap_reached_fraction" in r:
            notes.append(f"{name}: {ept:.2f} experts/token chosen by the threshold; the cap was reached "
                         f"by {r['cap_reached_fraction']:.1%} of tokens")
    rows += notes
    rows.append("better / worse: every seed on the same side and the mean gap beyond 3 spreads (the larger of "
                "the gap's std and the two arms' pooled std); else within noise")
    rows.append("val bits/byte: mean +- sample std over seeds; gap to dense: per-seed difference to dense "
                "(same data order), mean +- std;\nall seeds: below/above dense in every seed, or mixed; "
                "tok/s: training throughput; active: parameters a token uses;\nexp/tok: routed experts per "
                "token (shared experts not counted); load CV: std/mean of expert loads, mean over layers")
    return "\n".join(rows)


# The benchmarks' ``noise`` is max/min - 1 of the repeats of moekit's op. At --quick sizes (2-3
# repeats of a sub-millisecond op) one descheduled repeat makes it 4,911%: timer and scheduler
# jitter, not a property of the op. Such a spread is reported as "n/a": always for --quick runs,
# and for any row whose moekit median is under NOISE_MIN_MS.
NOISE_MIN_MS = 0.1
NOISE_NOTE = (f"noise n/a: the spread (max/min - 1) of 2-3 repeats at --quick sizes, or of an op "
              f"under {NOISE_MIN_MS} ms, is timer and scheduler jitter, not a measurement")


def _ours_ms(row: dict):
    return row.get("ours_ms", row.get("moekit_ms"))


def noise_is_reliable(row: dict, *, quick: bool) -> bool:
    """Whether a benchmark row's ``noise`` means something: a full-size run (not ``quick``) of an
    op whose median took at least NOISE_MIN_MS."""
    ms = _ours_ms(row)
    return not quick and isinstance(ms, (int, float)) and ms >= NOISE_MIN_MS


class _Unmeasured(float):
    """A NaN that formats as "n/a" under any format spec's width: the benchmark modules' tables
    format noise as ``{noise:>6.0%}``; this keeps their columns without editing them."""

    def __new__(cls):
        return super().__new__(cls, float("nan"))

    def __format__(self, spec: str) -> str:
        width = re.match(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)", spec).group(1)
        return format("n/a", ">" + width)


def bench_rows_shown(rows: list[dict], *, quick: bool) -> list[dict]:
    """Copies of a benchmark module's rows for its format_table: noise that
    :func:`noise_is_reliable` rejects becomes a value printed as "n/a"."""
    return [dict(r, noise=_Unmeasured()) if "noise" in r and not noise_is_reliable(r, quick=quick)
            else r for r in rows]


def bench_rows_saved(rows: list[dict], *, quick: bool) -> list[dict]:
    """Copies of a benchmark module's rows for bench_results.json: rejected noise becomes null,
    the measured spread kept as ``noise_raw``."""
    return [dict(r, noise=None, noise_raw=r["noise"]) if "noise" in r and not noise_is_reliable(
        r, quick=quick) else r for r in rows]


def bench_speedups(row: dict) -> dict:
    """{baseline: baseline time / moekit time} of one benchmark row (> 1: moekit faster), from
    its ``*_ms`` columns; moekit's column is ``ours_ms`` or ``moekit_ms``."""
    ours = _ours_ms(row)
    if not isinstance(ours, (int, float)) or ours <= 0:
        return {}
    return {k[:-3]: v / ours for k, v in row.items()
            if k.endswith("_ms") and k not in ("ours_ms", "moekit_ms") and isinstance(v, (int, float))}


def bench_chart(sections: dict, path: Path) -> Path | None:
    """Horizontal bars: moekit's speedup over every baseline of every benchmark row, computed
    from the rows' times (the modules' own ratio columns differ in direction). The figure is as
    wide as its longest label needs and is saved with ``bbox_inches="tight"``, so no label is
    clipped."""
    bars = []
    for section, rows in sections.items():
        for row in rows:
            label = " ".join(str(v) for k, v in row.items() if isinstance(v, (str, int))
                             and not isinstance(v, bool) and k not in ("T",))
            bars += [(f"{section}: {label} vs {base}", val) for base, val in bench_speedups(row).items()]
    if not bars:
        return None
    plt = _pyplot()
    label_in = 0.055 * max(len(k) for k, _ in bars)  # ~0.055 in per character at 7 pt
    # laid out at the dpi it is saved at: text does not scale exactly with dpi, and a layout
    # measured at matplotlib's default 100 dpi clipped the labels of the 110 dpi PNG
    fig, ax = plt.subplots(figsize=(max(11.0, 7.0 + label_in), 0.8 + 0.25 * len(bars)), dpi=110)
    ax.barh(range(len(bars)), [v for _, v in bars],
            color=["tab:green" if v >= 1 else "tab:red" for _, v in bars])
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels([k for k, _ in bars], fontsize=7)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("baseline time / moekit time (> 1: moekit faster)")
    ax.set_title("moe bench")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
