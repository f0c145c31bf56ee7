"""GPU timings of moekit's CUDA ops, as ratios against baselines measured in the same run.

Shape legend: T tokens, K slots, E experts, N = T*K routed rows, D model dim, F expert hidden dim.

grouped_mm (bfloat16, default backend, and MOE_CUDA_GEMM=native: moekit's WMMA kernel; the up projection x_ND @ w_EDF with w in nn.Linear layout, i.e. a
transposed (E, F, D) tensor) vs ``torch.nn.functional.grouped_mm`` and vs one dense cuBLAS mm of
the same FLOPs, at the Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 shapes of issue 8; permute and
unpermute in effective TB/s (bytes that must move) vs a device-to-device copy of the same bytes;
the whole layer (``moe.MoELayer``: router, dispatch, SwiGLU experts, weighted combine) forward and
forward+backward vs the same router + transformers' MixtralExperts with experts_implementation
"grouped_mm" on the same weights, and vs a dense SwiGLU FFN of the same active FLOPs.
Each figure is the median of CUDA-event timings, cycling through enough input copies that the
working set exceeds twice the L2 cache. Run by bench/gpu_check.sh; prints a table last.

    PYTHONPATH=. python bench/gpu_bench.py [--tokens 4096 16384] [--iters 20] [--json out.json]
        [--only ops|layer]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import torch
import torch.nn.functional as F

from moe import ops

SHAPES = {  # name: (D, F, E, K)
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}


def _copies(bytes_per_set: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(8, math.ceil(2 * l2 / max(1, bytes_per_set))))


def _time_ms(fn, inputs, iters: int) -> float:
    """Median milliseconds of fn(*inputs[i % len(inputs)]) over `iters` runs (after warm-up)."""
    for i in range(3):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs[i % len(inputs)])
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def _routing(T: int, E: int, K: int):
    ids_TK = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    return ids_TK, ops.plan(ids_TK, E)


def _torch_grouped_mm():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm")


def bench_grouped_mm(name, T, iters):
    D, Fh, E, K = SHAPES[name]
    _, p = _routing(T, E, K)
    N = T * K
    per_set = (N * D + E * D * Fh) * 2
    sets = []
    for _ in range(_copies(per_set)):
        a = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(E, Fh, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5).transpose(1, 2)
        sets.append((a, w))
    offs = p.offs_E
    ours = _time_ms(lambda a, w: ops.grouped_mm(a, w, offs), sets, iters)
    os.environ["MOE_CUDA_GEMM"] = "native"  # moekit's own WMMA kernel, same inputs
    try:
        native = _time_ms(lambda a, w: ops.grouped_mm(a, w, offs), sets, iters)
    finally:
        os.environ.pop("MOE_CUDA_GEMM")
    tgm = _torch_grouped_mm()
    theirs = _time_ms(lambda a, w: tgm(a, w, offs=offs), sets, iters)
    dense_sets = [(a, w[0]) for a, w in sets]  # (N, D) @ (D, F): the same 2*N*D*F FLOPs
    dense = _time_ms(lambda a, w: torch.mm(a, w), dense_sets, iters)
    ref = tgm(sets[0][0], sets[0][1], offs=offs).float()
    err = (ops.grouped_mm(sets[0][0], sets[0][1], offs).float() - ref).abs().max().item()
    tflops = 2 * N * D * Fh / 1e12
    return {"op": "grouped_mm", "shape": name, "T": T, "ours_ms": ours, "native_ms": native,
            "native_tflops": tflops / (native / 1e3), "torch_grouped_mm_ms": theirs,
            "dense_ms": dense, "ours_tflops": tflops / (ours / 1e3),
            "vs_torch_grouped_mm": theirs / ours, "vs_dense": dense / ours,
            "max_abs_diff_vs_torch": err}


def bench_dispatch(name, T, iters):
    D, _, E, K = SHAPES[name]
    ids, p = _routing(T, E, K)
    N = T * K
    weights = torch.rand(T, K, device="cuda")
    per_set = (T * D + N * D) * 2
    xs = [(torch.randn(T, D, device="cuda", dtype=torch.bfloat16),) for _ in range(_copies(per_set))]
    ys = [(torch.randn(N, D, device="cuda", dtype=torch.bfloat16),) for _ in range(len(xs))]
    t_perm = _time_ms(lambda x: ops.permute(x, p), xs, iters)
    t_unperm = _time_ms(lambda y: ops.unpermute(y, p, weights), ys, iters)
    t_plan = _time_ms(lambda i: ops.plan(i, E), [(ids,)], iters)
    bytes_perm = 2 * N * D * 2  # read N rows (gathered) + write N rows
    bytes_unperm = (N * D + T * D) * 2  # read N rows + write T rows
    dst = [torch.empty(N, D, device="cuda", dtype=torch.bfloat16) for _ in range(len(ys))]
    t_copy = _time_ms(lambda y, d: d.copy_(y), [(y[0], d) for y, d in zip(ys, dst)], iters)
    copy_tbs = bytes_perm / (t_copy / 1e3) / 1e12
    rows = []
    for op, t, nbytes in (("permute", t_perm, bytes_perm), ("unpermute", t_unperm, bytes_unperm)):
        tbs = nbytes / (t / 1e3) / 1e12
        rows.append({"op": op, "shape": name, "T": T, "ours_ms": t, "ours_tb_s": tbs,
                     "d2d_copy_tb_s": copy_tbs, "vs_copy": tbs / copy_tbs})
    rows.append({"op": "plan", "shape": name, "T": T, "ours_ms": t_plan})
    return rows


def bench_layer(name, T, iters, device="cuda"):
    """Median ms of a layer forward (eval, no grad) and a training step's forward+backward."""
    from bench.layer import _candidates, _step
    from moe import DenseFFN, MoELayer

    D, Fh, E, K = SHAPES[name]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 on the GPU: no fp32 copy of the weights
    try:
        with torch.device(device):
            layer = MoELayer(D, Fh, E, K)
            dense = DenseFFN(D, K * Fh)
            x = torch.randn(T, D)
            cands = {n: f for n, f in _candidates(layer, dense, x).items() if n != "hf_eager"}
    finally:
        torch.set_default_dtype(default)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for m in (layer, dense):
            m.train(mode != "fwd")
        with torch.set_grad_enabled(mode != "fwd"):
            times = {n: _time_ms(_step(f, x, mode), [()], iters) for n, f in cands.items()}
        row = {"op": "layer", "mode": mode, "shape": name, "T": T, "ours_ms": times.pop("moekit")}
        for n, t in times.items():
            row[f"{n}_ms"] = t
            row[f"vs_{n}"] = t / row["ours_ms"]
        rows.append(row)
        for m in (layer, dense, *getattr(cands.get("hf_gmm"), "modules", ())):
            m.zero_grad(set_to_none=True)
    return rows


def _table(rows) -> str:
    out = ["| op | shape | T | ours ms | figure | vs baseline |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["op"] == "grouped_mm":
            fig = f"{r['ours_tflops']:.0f} TFLOP/s"
            vs = (f"{r['vs_torch_grouped_mm']:.2f}x F.grouped_mm, {r['vs_dense']:.2f}x dense; native "
                  f"{r['native_tflops']:.0f} TFLOP/s")
        elif r["op"] == "plan":
            fig, vs = "", ""
        elif r["op"] == "layer":
            fig = r["mode"]
            vs = ", ".join(f"{r[k]:.2f}x {k[3:]}" for k in r if k.startswith("vs_"))
        else:
            fig = f"{r['ours_tb_s']:.2f} TB/s"
            vs = f"{r['vs_copy']:.2f}x d2d copy ({r['d2d_copy_tb_s']:.2f} TB/s)"
        out.append(f"| {r['op']} | {r['shape']} | {r['T']} | {r['ours_ms']:.3f} | {fig} | {vs} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", choices=("ops", "layer"), default=None)
    args = parser.parse_args()
    assert ops.HAS_EXTENSION and ops._has_kernel("grouped_mm", torch.device("cuda")), \
        "moe._C has no CUDA kernels: build with MOE_BUILD_CUDA=1"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []
    for T in args.tokens:
        for name in args.shapes:
            if args.only != "layer":
                rows.append(bench_grouped_mm(name, T, args.iters))
                rows += bench_dispatch(name, T, args.iters)
                print(json.dumps(rows[-4:]), flush=True)
            if args.only != "ops":
                try:
                    rows += bench_layer(name, T, max(5, args.iters // 2))
                    print(json.dumps(rows[-2:]), flush=True)
                except Exception as exc:  # report and go on: the op rows still matter
                    print(f"layer {name} T={T} failed: {exc!r}", flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(_table(rows))


if __name__ == "__main__":
    main()
