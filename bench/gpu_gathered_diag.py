"""Which cases of moekit's gathered sm90 GEMMs (csrc/cuda/sm90/gathered_gemm.cu, the setting
moe.ops.config.sm90_gathered = "fused") work: each case runs in a fresh process (a trap or fault
loses the process's CUDA context, so later cases would fail for it) and prints OK with its error
against the float64 twin and the unfused path's, or the failure's last lines. bench/gpu_check.sh
runs it when the sm90_gathered test group hits a CUDA error.

    PYTHONPATH=. python bench/gpu_gathered_diag.py          # all cases
    PYTHONPATH=. python bench/gpu_gathered_diag.py CASE     # one case, in this process
"""

from __future__ import annotations

import subprocess
import sys

import torch

# (T, K, E, D, F): small first, so a failure that needs no size shows on the smallest
SHAPES = {"small": (300, 4, 8, 64, 64), "odd_depth": (100, 2, 3, 200, 64), "qwen3": (512, 8, 128, 2048, 768)}
OPS = ("swiglu", "plain", "wgrad", "combine")  # combine: grouped_mm_unpermute (the token-major epilogue)
CASES = [f"{op}-{layout}-{shape}" for shape in SHAPES for op in OPS for layout in ("exy", "yx")]


def run_case(case: str) -> str:
    from moe import ops
    from moe.ops import twins

    op, layout, shape = case.split("-")
    T, K, E, D, F = SHAPES[shape]
    torch.manual_seed(0)
    mo = torch.ops.moe
    ids = torch.randint(0, E, (T, K), device="cuda")
    ids[torch.rand(T, K, device="cuda") < 0.2] = -1  # dropped slots
    _, offs, order, rows = mo.plan(ids, E)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    Y = 2 * F
    b = (torch.randn(E, Y, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) if layout == "yx"
         else torch.randn(E, D, Y, device="cuda", dtype=torch.bfloat16)) / D ** 0.5
    g = torch.randn(T * K, Y, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16)  # combine: the routed rows themselves
    w = torch.rand(T, K, device="cuda")
    yx = layout == "yx"
    call = {"swiglu": lambda: mo.gather_grouped_mm_swiglu(x, order, rows, b, offs, True)[1],
            "plain": lambda: mo.gather_grouped_mm(x, order, rows, b, offs),
            "wgrad": lambda: mo.gather_grouped_mm_wgrad(x, order, rows, g, offs, yx),
            "combine": lambda: mo.grouped_mm_unpermute(a, b, offs, order, rows, w, False)}[op]
    twin = {"swiglu": lambda *a: twins.gather_grouped_mm_torch(*a, offs),
            "plain": lambda *a: twins.gather_grouped_mm_torch(*a, offs),
            "wgrad": lambda *a: twins.gather_grouped_mm_wgrad_torch(*a, offs, yx),
            "combine": lambda a, o, r, b: twins.grouped_mm_unpermute_torch(a, b, offs, o, r, w.double())}[op]
    other = g if op == "wgrad" else b
    with ops.config.override(cuda_gemm="auto", sm90_gathered="fused"):
        got = call()
        torch.cuda.synchronize()
    with ops.config.override(cuda_gemm="auto", sm90_gathered="unfused"):
        unfused = call()
    ref = twin((a if op == "combine" else x).double(), order, rows, other.double())
    err = (got.double() - ref).abs().max().item()
    base = (unfused.double() - ref).abs().max().item()
    within = err <= 2 * base + torch.finfo(torch.bfloat16).eps * ref.abs().max().item()  # tests/helpers' rule
    return f"OK err {err:.3g} unfused {base:.3g} ({'within' if within else 'OVER'} the 2x rule)"


def main() -> None:
    if len(sys.argv) > 1:
        print(run_case(sys.argv[1]), flush=True)
        return
    for case in CASES:
        try:
            res = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            print(f"{case:28s} FAILED: no result in 120 s", flush=True)
            continue
        tail = (res.stdout.strip().splitlines() or [""])[-1] if res.returncode == 0 else \
            " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])[:300]
        print(f"{case:28s} {'' if res.returncode == 0 else 'FAILED '}{tail}", flush=True)


if __name__ == "__main__":
    main()
