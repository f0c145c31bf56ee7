"""Benchmarks of moekit's fused CPU ops against what they replace, one run.

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D model dim,
F expert hidden dim.

    python -m bench.fused               # T=4096, the reference layer shapes, float32 and bfloat16
    python -m bench.fused --quick       # T=256, 3 repeats: a smoke run, not a measurement

Rows (times in ms, medians of interleaved repeats; speedup = baseline / ours):
  swiglu   forward+backward of moe.swiglu on h (N, 2F) against PyTorch's silu(gate) * up under
           autograd (what a model writes), at the routed rows of each shape
  gather   gather_grouped_mm + its weight gradient (x_TD read in place) against permute +
           grouped_mm + grouped_mm_wgrad on the permuted copy (moekit's two-op form)
  linear   the router logits, torch.ops.moe.linear_f32(x, w) against F.linear(x.float(),
           w.float()) (bfloat16 only: for float32 both are the float32 GEMM)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.ops import (DTYPES, SHAPES, SPEEDUP_HEAD, add_run_args, dtypes_arg, random_topk_ids,
                       sizes, speedup_cells, time_fns)
from moe import ops


def _swiglu_pair(N: int, Fh: int, dtype):
    h = torch.randn(N, 2 * Fh).to(dtype).requires_grad_()
    g = torch.randn(N, Fh).to(dtype)

    def ours():
        h.grad = None
        ops.swiglu(h).backward(g)

    def baseline():
        h.grad = None
        gate, up = h.chunk(2, dim=-1)
        (F.silu(gate) * up).backward(g)

    return ours, baseline


def _gather_pair(T: int, D: int, Fh: int, E: int, K: int, dtype):
    p = ops.plan(random_topk_ids(T, E, K), E)
    x, w = torch.randn(T, D).to(dtype), torch.randn(E, D, 2 * Fh).to(dtype)
    g = torch.randn(T * K, 2 * Fh).to(dtype)
    wgrad = torch.ops.moe.gather_grouped_mm_wgrad

    def ours():
        ops.gather_grouped_mm(x, p, w)
        wgrad(x, p.order_N, p.rows_TK, g, p.offs_E)

    def baseline():
        x_ND = ops.permute(x, p)
        ops.grouped_mm(x_ND, w, p.offs_E)
        torch.ops.moe.grouped_mm_wgrad(x_ND, g, p.offs_E)

    return ours, baseline


def _linear_pair(T: int, D: int, E: int, dtype):
    x, w = torch.randn(T, D).to(dtype), (torch.randn(E, D) * 0.02).to(dtype)
    return (lambda: torch.ops.moe.linear_f32(x, w)), (lambda: F.linear(x.float(), w.float()))


def fused_rows(*, T: int = 4096, shapes=SHAPES, dtypes=DTYPES, repeat: int = 7) -> list[dict]:
    """One row per (op, dtype, shape): ours_ms, baseline_ms, speedup, noise (ours' spread)."""
    if not ops.HAS_EXTENSION:
        raise RuntimeError("bench.fused times the compiled ops: build moe._C first")
    rows = []
    for dtype in dtypes:
        for D, Fh, E, K in shapes:
            pairs = {"swiglu": _swiglu_pair(T * K, Fh, dtype),
                     "gather": _gather_pair(T, D, Fh, E, K, dtype)}
            if dtype == torch.bfloat16:
                pairs["linear"] = _linear_pair(T, D, E, dtype)
            for name, (ours, base) in pairs.items():
                timed = time_fns({"ours": ours, "baseline": base}, repeat=repeat)
                (o, noise), (b, _) = timed["ours"], timed["baseline"]
                rows.append(dict(op=name, dtype=str(dtype).removeprefix("torch."), T=T, D=D, F=Fh,
                                 E=E, K=K, ours_ms=o * 1e3, baseline_ms=b * 1e3, speedup=b / o,
                                 noise=noise))
    return rows


def run(*, quick: bool = False, dtypes=DTYPES, repeat: int | None = None) -> list[dict]:
    """All rows; ``quick`` uses T=256 and 3 repeats (a smoke run, not a measurement)."""
    return fused_rows(dtypes=dtypes, **sizes(quick, repeat))


def format_table(rows: list[dict]) -> str:
    out = [f"{'op':<7} {'dtype':<8} {'T':>5} {'D':>5} {'F':>5} {'E':>4} {'K':>2} {SPEEDUP_HEAD}"]
    for r in rows:
        out.append(f"{r['op']:<7} {r['dtype']:<8} {r['T']:>5} {r['D']:>5} {r['F']:>5} {r['E']:>4} "
                   f"{r['K']:>2} {speedup_cells(r)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser)
    args = parser.parse_args(argv)
    rows = run(quick=args.quick, dtypes=dtypes_arg(args), repeat=args.repeat)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(rows))


if __name__ == "__main__":
    main()
