"""Which part of moe.MoELayer's training step breaks CUDA-graph capture: each case captures one
forward+backward in a fresh process (a failed capture leaves the process's RNG and allocator
in a state the next capture trips over) and prints OK or the error with its C++ frames.

    PYTHONPATH=. python bench/gpu_graph_diag.py            # all cases
    PYTHONPATH=. python bench/gpu_graph_diag.py CASE       # one case, in this process
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

D, F, E, K, B, S = 64, 96, 16, 4, 2, 48

CASES = ("dense", "router2d", "router3d", "experts_auto", "experts_native", "layer2d_noaux",
         "layer2d", "layer3d_bf16loss", "layer3d_bf16loss_native")


def _step_fn(case: str):
    import moe
    import routers
    torch.manual_seed(0)
    dt = torch.bfloat16
    if case == "dense":
        m = moe.DenseFFN(D, F).cuda().to(dt)
        x = torch.randn(B * S, D, device="cuda", dtype=dt)
        return m, lambda: m(x).float().square().mean()
    if case.startswith("router"):
        m = routers.TopKRouter(D, E, K).cuda().to(dt)
        x = torch.randn(B, S, D, device="cuda", dtype=dt)
        if case == "router2d":
            x = x.reshape(-1, D)
        def f():
            r = m(x)
            return r.weights_TK.sum() + sum(r.aux_losses.values())
        return m, f
    if case.startswith("experts"):
        moe.ops.config.cuda_gemm = case.split("_")[1]
        m = moe.GroupedExperts(E, D, F).cuda().to(dt)
        x = torch.randn(B * S, D, device="cuda", dtype=dt)
        ids = torch.rand(B * S, E, device="cuda").topk(K, dim=1).indices
        plan = moe.ops.plan(ids, E)
        rows = moe.ExpertRows(x, plan.offs_E, plan)
        return m, lambda: m(rows).float().square().mean()
    if case.endswith("native"):
        moe.ops.config.cuda_gemm = "native"
    m = moe.MoELayer(D, F, E, K).cuda().to(dt)
    x = torch.randn(B, S, D, device="cuda", dtype=dt)
    if case.startswith("layer2d"):
        x = x.reshape(-1, D)
    if case == "layer2d_noaux":
        return m, lambda: m(x).float().square().mean()
    if case == "layer2d":
        return m, lambda: m(x).float().square().mean() + moe.collect_aux_losses(m)
    return m, lambda: m(x).square().mean() + moe.collect_aux_losses(m)


def run_one(case: str) -> None:
    m, f = _step_fn(case)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            m.zero_grad(set_to_none=True)
            f().backward()
    torch.cuda.current_stream().wait_stream(stream)
    m.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        f().backward()
    g.replay()
    torch.cuda.synchronize()
    print(f"{case}: OK")


def main() -> None:
    if len(sys.argv) > 1:
        run_one(sys.argv[1])
        return
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1")
    for case in CASES:
        r = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, env=env, timeout=120)
        if r.returncode == 0:
            print(r.stdout.strip().splitlines()[-1])
            continue
        lines = (r.stdout + r.stderr).splitlines()
        err = [ln for ln in lines if "Error" in ln or "error" in ln][:3]
        frames = [ln.strip() for ln in lines if ln.strip().startswith("frame #")][:14]
        print(f"{case}: FAILED {' | '.join(err)[:400]}")
        for fr in frames:
            print(f"    {fr[:230]}")


if __name__ == "__main__":
    main()
