"""moekit's Hopper grouped GEMM (csrc/cuda/sm90) on an H200: every tile configuration against
PyTorch's grouped GEMM and one dense mm of the same FLOPs, with the fraction of the roofline.

Shape legend: T tokens, K slots, E experts, N = T*K routed rows, D model dim, F expert hidden dim,
X/Y the GEMM input/output dims.

Rows: the Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 expert shapes at T tokens, bf16, random
top-k routing; "up" is x_ND @ w_EDF (X=D, Y=F), "down" is h_NF @ w_EFD (X=F, Y=D), both with the
weight in nn.Linear layout (a transposed view, as moe.GroupedExperts' autograd passes it for the
data gradient and HF checkpoints store it); "wgrad" is the weight gradient a_ND^T g_NF per expert.
Columns: moekit with each config forced (moe.ops.config.sm90_forward_config=c, for wgrad sm90_wgrad_config=c)
and with its own choice
(auto; at most build_info()["cuda_stream_rows"] rows per expert on average it is the
weight-streaming kernel), PyTorch's kernel through moekit's op (cuda_gemm="torch"), the
weight-streaming kernel forced (cuda_gemm="stream", forward only), torch's F.grouped_mm, a dense
mm of the same FLOPs; at decode sizes (T <= 256) the "up" rows also time the first projection
with SwiGLU's epilogue (moe.ops.gather_grouped_mm_swiglu on x_TD and an (E, 2F, D) weight: one
streaming launch) against gather_grouped_mm then swiglu (swiglu_fused_ms, swiglu_two_ms);
roofline = max(bytes / copy rate, FLOPs / dense rate) / time, where bytes =
A + the routed experts' weights + C (each read or written once) and both rates are measured in this
run. Timings: medians of CUDA events with input sets rotating past twice the L2.

    PYTHONPATH=. python bench/gpu_gemm_sweep.py [--tokens 2048 4096 16384] [--json out.json]
    PYTHONPATH=. python bench/gpu_gemm_sweep.py --tokens 1 8 64 256 --proj up down  # decode sizes
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench.gpu_bench import SHAPES, _copies, _roofline, _routing, _time_ms, measure_ceilings
from moe import ops


def sweep_row(name, T, proj, iters, rates):
    D, Fh, E, K = SHAPES[name]
    ids, p = _routing(T, E, K)
    N, offs = T * K, p.offs_E
    X, Y = (D, Fh) if proj in ("up", "wgrad") else (Fh, D)
    used = int(torch.unique(ids).numel())  # experts with rows: their weights must be read
    flops = 2 * N * X * Y
    nbytes = (N * X + used * X * Y + N * Y) * 2
    sets = []
    for _ in range(_copies((N * X + E * X * Y) * 2)):
        a = torch.randn(N, X, device="cuda", dtype=torch.bfloat16)
        if proj == "wgrad":
            sets.append((a, torch.randn(N, Y, device="cuda", dtype=torch.bfloat16)))
        else:
            sets.append((a, (torch.randn(E, Y, X, device="cuda", dtype=torch.bfloat16) / X ** 0.5).transpose(1, 2)))
    if proj == "wgrad":
        fn = lambda a, g: torch.ops.moe.grouped_mm_wgrad(a, g, offs)  # noqa: E731
    else:
        fn = lambda a, w: ops.grouped_mm(a, w, offs)  # noqa: E731
    row = {"shape": name, "T": T, "proj": proj, "used_experts": used, "flops": flops, "bytes": nbytes}
    info = ops.build_info()
    setting = "sm90_wgrad_config" if proj == "wgrad" else "sm90_forward_config"
    configs = range(len(info["sm90_wgrad_configs" if proj == "wgrad" else "sm90_forward_configs"]))
    for c in configs:
        with ops.config.override(cuda_gemm="auto", **{setting: c}):
            try:
                row[f"c{c}_ms"] = _time_ms(fn, sets, iters)
            except RuntimeError as err:
                row[f"c{c}_ms"] = float("nan")
                row[f"c{c}_error"] = str(err)[:200]
    backends = (("auto_ms", "auto"), ("torch_ms", "torch")) + (() if proj == "wgrad" else (("stream_ms", "stream"),))
    for key, backend in backends:
        with ops.config.override(cuda_gemm=backend, **{setting: "auto"}):
            row[key] = _time_ms(fn, sets, iters)
    tgm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    if proj == "wgrad":
        row["F_grouped_mm_ms"] = _time_ms(lambda a, g: tgm(a.t(), g, offs=offs), sets, iters)
    else:
        row["F_grouped_mm_ms"] = _time_ms(lambda a, w: tgm(a, w, offs=offs), sets, iters)
    if proj == "up" and T <= 256:  # decode sizes: SwiGLU as the gathered GEMM's epilogue, against the two ops
        glu_sets = [(torch.randn(T, D, device="cuda", dtype=torch.bfloat16),
                     (torch.randn(E, 2 * Fh, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5).transpose(1, 2))
                    for _ in range(_copies((T * D + E * D * 2 * Fh) * 2))]
        with ops.config.override(cuda_gemm="auto"):
            row["swiglu_fused_ms"] = _time_ms(lambda x, w: ops.gather_grouped_mm_swiglu(x, p, w), glu_sets, iters)
            row["swiglu_two_ms"] = _time_ms(lambda x, w: ops.swiglu(ops.gather_grouped_mm(x, p, w)), glu_sets, iters)
        del glu_sets
    dense_sets = [(torch.randn(N, X, device="cuda", dtype=torch.bfloat16),
                   torch.randn(X, Y, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    row["dense_ms"] = _time_ms(torch.mm, dense_sets, iters)
    best = min(((row[f"c{c}_ms"], c) for c in configs), key=lambda t: (t[0] != t[0], t[0]),
               default=(row["auto_ms"], -1))
    roofline = _roofline(rates, row["auto_ms"], nbytes, flops)
    row.update(best_config=best[1], floor_ms=roofline * row["auto_ms"], roofline=roofline,
               vs_F_grouped_mm=row["F_grouped_mm_ms"] / row["auto_ms"],
               vs_dense=row["dense_ms"] / row["auto_ms"], vs_torch_backend=row["torch_ms"] / row["auto_ms"])
    return row


def _fmt(v):
    return "nan" if v != v else f"{v:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 16384])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--proj", nargs="+", default=["up", "down", "wgrad"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    t0 = time.time()
    rates = measure_ceilings(10)
    print(f"ceilings: copy {rates['copy_tb_s']:.2f} TB/s, dense bf16 mm {rates['dense_tflops']:.0f} TFLOP/s; "
          f"build {ops.build_info()}")
    rows = []
    for name in args.shapes:
        for T in args.tokens:
            for proj in args.proj:
                try:
                    rows.append(sweep_row(name, T, proj, args.iters, rates))
                except Exception as err:  # noqa: BLE001  (one bad row must not lose the others)
                    print(f"FAILED {name} T={T} {proj}: {type(err).__name__}: {err}"[:300])
                torch.cuda.empty_cache()
    print(f"sweep took {time.time() - t0:.0f} s")
    info = ops.build_info()
    print("forward configs:", dict(enumerate(info["sm90_forward_configs"])))
    print("wgrad configs:", dict(enumerate(info["sm90_wgrad_configs"])))
    ncfg = max(len(info["sm90_forward_configs"]), len(info["sm90_wgrad_configs"]))
    cols = [f"c{c}_ms" for c in range(ncfg)] + ["auto_ms", "torch_ms", "stream_ms", "F_grouped_mm_ms", "dense_ms",
                                                "vs_F_grouped_mm", "vs_dense", "roofline"]
    if any("swiglu_fused_ms" in r for r in rows):
        cols += ["swiglu_fused_ms", "swiglu_two_ms"]
    print("| shape | T | proj | best | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['shape']} | {r['T']} | {r['proj']} | c{r['best_config']} | "
              + " | ".join(_fmt(r.get(c, float("nan"))) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": rates, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
