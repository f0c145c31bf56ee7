"""PNG charts and text tables of the `moe` CLI (matplotlib, Agg backend: no display needed).

demo: loss curves (train loss per step, validation bits per byte at the end) and an expert-load
heatmap (layers x experts, share of routed slots) per MoE variant. bench: moekit's speedup over each
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


def results_table(results: dict) -> str:
    """The demo's final table: one row per variant."""
    head = (f"{'variant':<12} {'val bpb':>8} {'tok/s':>8} {'total':>8} {'active':>8} "
            f"{'exp/tok':>8} {'load CV':>8} {'dropped':>8}")
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        moe = "experts_per_token" in r
        tps = r.get("tokens_per_s")
        rows.append(
            f"{name:<12} {r['val_bpb']:>8.3f} {tps if tps is not None else float('nan'):>8,.0f} "
            f"{_fmt_params(r['params_total']):>8} {_fmt_params(r['params_active']):>8} "
            + (f"{r['experts_per_token']:>8.2f} {r['load_cv']:>8.3f} {r['dropped_fraction']:>8.1%}"
               if moe else f"{'-':>8} {'-':>8} {'-':>8}")
            + (f"   (MoR mean depth {r['mean_recursion_depth']:.2f})" if "mean_recursion_depth" in r else ""))
    rows.append("val bpb: validation bits per byte; tok/s: training throughput; active: parameters a "
                "token uses;\nexp/tok: routed experts per token (shared experts not counted); load CV: "
                "std/mean of expert loads, mean over layers")
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
