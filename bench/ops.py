"""Op benchmarks: moekit's grouped GEMM and token dispatch against PyTorch baselines, one run.

Shape legend: T tokens, K slots per token (top-k), E experts, N routed rows (T*K), D model dim,
F expert hidden dim.

    python -m bench.ops                 # full table: float32 and bfloat16, T=4096, the reference op shapes
    python -m bench.ops --quick         # small T, few repeats: a smoke run

grouped_mm rows: the up projection x_ND (N, D) x w_EDF (E, D, F) with counts from random top-k
routing, timed for moe.ops.grouped_mm, ``torch.nn.functional.grouped_mm``, a per-expert Python
loop (the twin) and one dense mm of the same FLOPs ((N, D) x (D, F)); GFLOP/s = 2*N*D*F / time.
dispatch rows: plan + permute + unpermute (weighted) against argsort + index_select + index_add.
Times are medians over repeats; ``noise`` is the spread (max/min - 1) of the repeats of our op.
:func:`grouped_mm_rows`, :func:`dispatch_rows` and :func:`run` return plain dicts (one per row)
so a CLI can format them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from moe import ops

SHAPES = ((1024, 1792, 8, 2), (1024, 448, 64, 8), (1024, 224, 128, 8))  # (D, F, E, K)
DTYPES = (torch.float32, torch.bfloat16)


def time_fns(fns: dict[str, Callable[[], object]], *, repeat: int, warmup: int = 1
             ) -> dict[str, tuple[float, float]]:
    """{name: (median seconds, spread max/min - 1)} over ``repeat`` rounds.

    Candidates are interleaved (each round times every candidate once, in rotating order), so
    load from other processes on a shared machine hits them alike and the ratios stay fair."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: (statistics.median(t), max(t) / min(t) - 1.0) for n, t in times.items()}


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (/proc/cpuinfo: a virtual machine
    may name only the brand, "AMD EPYC"; family 25 model 17 is Zen 4), or platform.processor()
    elsewhere."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block only
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        import platform
        return platform.processor() or platform.machine()
    nums = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
    return fields["model name"] + (f" ({', '.join(nums)})" if nums else "")


def huge_pages() -> str:
    """Whether large tensors sit on 2 MiB pages: the kernel's transparent huge page mode and
    PyTorch's THP_MEM_ALLOC_ENABLE (torch then aligns CPU allocations of 2 MiB and more and
    madvises them, which "madvise" mode needs). With 4 KiB pages a weight read a few rows at a time
    across rows of many KiB takes a TLB miss per page touched: on the Zen 4 of the README,
    ``python -m bench.decode --shape mixtral`` ran 1.2-1.5x faster with THP_MEM_ALLOC_ENABLE=1
    before moekit streamed deep weights (1.05-1.1x after), and the measured copy rate rose too
    (16-17 -> 26-29 GB/s in alternating runs)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "unknown"
    env = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    return f"THP {mode}, THP_MEM_ALLOC_ENABLE={env}"


def machine_line() -> str:
    """One header line: the CPU, torch's thread count, the path moekit's CPU grouped GEMMs take
    here by dtype (moekit's kernel by instruction set: avx512 / avx512_bf16; at::mm: "aten"; the
    pure-PyTorch twins without the extension), the rows per expert up to which the forward streams
    each expert's weights, the L2 size the kernels are blocked for, and torch's own CPU kernel level
    (what at::mm and the baselines run), and the huge page setting (huge_pages)."""
    info = ops.build_info()
    gemm = ", ".join(f"{dt} {path}" for dt, path in info["cpu_gemm"].items())
    return (f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; moekit CPU GEMM: {gemm}, streamed up to "
            f"{info['cpu_stream_rows']} rows per expert, L2 {info['cpu_l2_bytes'] >> 10} KiB; torch {torch.__version__} CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; {huge_pages()}")


def random_topk_ids(T: int, E: int, K: int, *, seed: int = 0, skew: float = 0.0) -> torch.Tensor:
    """(T, K) int64 ids of a random top-k router (distinct experts per token) over Gaussian
    logits; ``skew`` > 0 adds a per-expert bias of that scale, making counts uneven."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + skew * torch.randn(E, generator=g)
    return logits.topk(K, dim=-1).indices


def dispatch_baseline(x_TD, ids_TK, w_TK, num_experts):
    """argsort + index_select + index_add: the usual PyTorch dispatch/combine, a round trip."""
    K = ids_TK.shape[1]
    flat = ids_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    token = order // K
    x_ND = x_TD.index_select(0, token)
    y_ND = x_ND * w_TK.reshape(-1)[order, None].to(x_ND.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token, y_ND), counts


def dispatch_ours(x_TD, ids_TK, w_TK, num_experts):
    """moe.ops plan + permute + unpermute (weighted): the same round trip."""
    p = ops.plan(ids_TK, num_experts)
    return ops.unpermute(ops.permute(x_TD, p), p, w_TK), p.counts_E


def grouped_mm_rows(*, T: int = 4096, shapes=SHAPES, dtypes=DTYPES, repeat: int = 7,
                    seed: int = 0) -> list[dict]:
    """One row per (dtype, shape): median ms and GFLOP/s of ours, F.grouped_mm, loop, dense."""
    rows = []
    for dtype in dtypes:
        for D, Fh, E, K in shapes:
            ids = random_topk_ids(T, E, K, seed=seed)
            offs = ops.plan(ids, E).offs_E
            N = T * K
            g = torch.Generator().manual_seed(seed + 1)
            a = torch.randn(N, D, generator=g).to(dtype)
            w = (torch.randn(E, D, Fh, generator=g) / D**0.5).to(dtype)
            w_dense = w[0].contiguous()
            cands = {
                "ours": lambda: ops.grouped_mm(a, w, offs),
                "F.grouped_mm": lambda: F.grouped_mm(a, w, offs=offs),
                "loop": lambda: ops.grouped_mm_torch(a, w, offs),
                "dense": lambda: torch.mm(a, w_dense),
            }
            flops = 2.0 * N * D * Fh
            row = dict(op="grouped_mm", dtype=str(dtype).removeprefix("torch."), T=T, D=D, F=Fh,
                       E=E, K=K)
            timed = time_fns(cands, repeat=repeat)
            for name, (sec, _) in timed.items():
                row[f"{name}_ms"] = sec * 1e3
                row[f"{name}_gflops"] = flops / sec / 1e9
            row["noise"] = timed["ours"][1]
            row["vs_dense"] = row["ours_gflops"] / row["dense_gflops"]
            row["vs_F.grouped_mm"] = row["ours_gflops"] / row["F.grouped_mm_gflops"]
            row["vs_loop"] = row["ours_gflops"] / row["loop_gflops"]
            rows.append(row)
    return rows


def dispatch_rows(*, T: int = 4096, shapes=SHAPES, dtypes=DTYPES, repeat: int = 7,
                  seed: int = 0) -> list[dict]:
    """One row per (dtype, shape): plan+permute+unpermute vs the argsort/index baseline, ms."""
    rows = []
    for dtype in dtypes:
        for D, _, E, K in shapes:
            g = torch.Generator().manual_seed(seed + 2)
            ids = random_topk_ids(T, E, K, seed=seed)
            x = torch.randn(T, D, generator=g).to(dtype)
            w = torch.rand(T, K, generator=g)
            timed = time_fns({"ours": lambda: dispatch_ours(x, ids, w, E),
                              "baseline": lambda: dispatch_baseline(x, ids, w, E)}, repeat=repeat)
            (ours, noise), (base, _) = timed["ours"], timed["baseline"]
            rows.append(dict(op="dispatch", dtype=str(dtype).removeprefix("torch."), T=T, D=D,
                             E=E, K=K, ours_ms=ours * 1e3, baseline_ms=base * 1e3,
                             speedup=base / ours, noise=noise))
    return rows


def sizes(quick: bool, repeat: int | None = None) -> dict:
    """T and repeats of a run: T=4096 and 7 repeats, or T=256 and 3 for a ``quick`` smoke run;
    ``repeat`` overrides the count."""
    kw = dict(T=256, repeat=3) if quick else dict(T=4096, repeat=7)
    if repeat is not None:
        kw["repeat"] = repeat
    return kw


SPEEDUP_HEAD = f"{'ours ms':>8} {'base ms':>8} {'speedup':>8} {'noise':>6}"


def speedup_cells(r: dict) -> str:
    """The ours / baseline / speedup / noise cells of a row timed against one baseline."""
    return (f"{r['ours_ms']:>8.2f} {r['baseline_ms']:>8.2f} {r['speedup']:>7.2f}x "
            f"{r['noise']:>6.0%}")


def dtypes_arg(args) -> tuple:
    """The --dtype choices as torch dtypes (all of DTYPES when none was given)."""
    return tuple(getattr(torch, d) for d in args.dtype) if args.dtype else DTYPES


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--quick, --dtype and --repeat, shared by the op benchmarks' command lines."""
    parser.add_argument("--quick", action="store_true", help="T=256, 3 repeats (smoke run)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], action="append",
                        help="restrict to these dtypes (repeatable)")
    parser.add_argument("--repeat", type=int, help="timed rounds per row (median is reported)")


def run(*, quick: bool = False, dtypes=DTYPES, only: str | None = None,
        repeat: int | None = None, shapes=SHAPES, T: int | None = None) -> list[dict]:
    """All op benchmark rows (``only``: "grouped_mm" or "dispatch" for one family). ``quick``
    uses T=256 and 3 repeats: a smoke run, not a measurement. ``shapes`` / ``T`` replace the
    default (D, F, E, K) shapes and token count."""
    kw = sizes(quick, repeat)
    kw["shapes"] = shapes
    if T is not None:
        kw["T"] = T
    rows = []
    if only in (None, "grouped_mm"):
        rows += grouped_mm_rows(dtypes=dtypes, **kw)
    if only in (None, "dispatch"):
        rows += dispatch_rows(dtypes=dtypes, **kw)
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`run`'s rows: grouped GEMM first, then dispatch."""
    out = []
    gmm = [r for r in rows if r["op"] == "grouped_mm"]
    if gmm:
        out.append(f"{'grouped_mm':<10} {'dtype':<8} {'T':>5} {'D':>5} {'F':>5} {'E':>4} {'K':>2} "
                   f"{'ours':>7} {'F.gmm':>7} {'loop':>7} {'dense':>7}  {'/dense':>6} "
                   f"{'/F.gmm':>6} {'/loop':>6} {'noise':>6}   (GFLOP/s)")
        for r in gmm:
            out.append(f"{'':<10} {r['dtype']:<8} {r['T']:>5} {r['D']:>5} {r['F']:>5} {r['E']:>4} "
                       f"{r['K']:>2} {r['ours_gflops']:>7.1f} {r['F.grouped_mm_gflops']:>7.1f} "
                       f"{r['loop_gflops']:>7.1f} {r['dense_gflops']:>7.1f}  {r['vs_dense']:>6.2f} "
                       f"{r['vs_F.grouped_mm']:>6.2f} {r['vs_loop']:>6.2f} {r['noise']:>6.0%}")
    disp = [r for r in rows if r["op"] == "dispatch"]
    if disp:
        out.append(f"{'dispatch':<10} {'dtype':<8} {'T':>5} {'D':>5} {'E':>4} {'K':>2} {SPEEDUP_HEAD}")
        for r in disp:
            out.append(f"{'':<10} {r['dtype']:<8} {r['T']:>5} {r['D']:>5} {r['E']:>4} {r['K']:>2} "
                       f"{speedup_cells(r)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser)
    parser.add_argument("--only", choices=["grouped_mm", "dispatch"], help="one op family")
    parser.add_argument("--shape", action="append", metavar="D,F,E,K",
                        help="a (D, F, E, K) shape instead of the defaults (repeatable), e.g. "
                             "4096,28672,3,2: 3 Mixtral experts' up projection")
    parser.add_argument("--T", type=int, help="tokens (default 4096, or 256 with --quick)")
    args = parser.parse_args(argv)
    shapes = tuple(tuple(int(v) for v in s.split(",")) for s in args.shape) if args.shape else SHAPES
    if any(len(s) != 4 for s in shapes):
        parser.error("--shape takes four integers D,F,E,K")
    rows = run(quick=args.quick, dtypes=dtypes_arg(args), only=args.only, repeat=args.repeat,
               shapes=shapes, T=args.T)
    print(machine_line())
    print(format_table(rows))


if __name__ == "__main__":
    main()
