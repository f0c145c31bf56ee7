"""GPU timings of moekit's CUDA ops and layer: ratios against baselines and fractions of the
device's own limits, all measured in the same run.

Shape legend: T tokens, K slots, E experts, N = T*K routed rows, D model dim, F expert hidden dim.

Sections (``--only``, default all, in this order; each prints its wall time; bf16 throughout):

ceilings  always, once: a device-to-device copy of 2 GiB (TB/s counting bytes read + written)
          and a dense 8192^3 mm (TFLOP/s), on random data. Every row's ``roofline`` is
          max(bytes / copy rate, FLOPs / mm rate) / measured time, the fraction of the measured
          limit reached. Bytes per row are those any implementation must move (listed below).
ops       grouped_mm: the up projection x_ND @ w_EDF (w in nn.Linear layout, a transposed
          (E, F, D) tensor) by the default backend and moe.ops.config.cuda_gemm="native" (moekit's WMMA
          kernel), vs ``torch.nn.functional.grouped_mm`` and one dense mm of the same FLOPs;
          bytes 2*(N*D + E_used*D*F + N*F), E_used = experts with rows. permute / unpermute in
          TB/s of the bytes that must move (2*N*D*2 and (N+T)*D*2) vs a copy of the same bytes;
          plan; linear_f32_backward (the router logits' backward: d x and d w from a float32
          (T, E) gradient) vs the float32 GEMMs on upcast copies cast back that autograd runs for
          F.linear(x.float(), w.float()) (the twin), FLOPs 4*T*E*D at the dense rate.
mlp       the expert MLP forward (gather rows, up projection, SwiGLU, down projection, weighted
          combine) through moekit (GroupedExperts on a plan with combine=, what MoELayer runs: the
          second GEMM and the weighted unpermute one op, ops.grouped_mm_unpermute)
          vs the PyTorch composite a user would write (x.index_select, F.grouped_mm, F.silu(gate)
          * up, F.grouped_mm, bf16 index_add_ of the weighted rows), fwd (no_grad) and fwd+bwd
          (autograd.grad of x, both weights and the routing weights from a fixed dy). Timed: the
          MLP given its routing metadata, for both; moekit's ops.plan and the composite's
          argsort / index / offsets are computed once outside the timed region.
layer     moe.MoELayer (TopKRouter, dispatch, SwiGLU experts, weighted combine) fwd (eval,
          no_grad) and a training step (grads set to None, forward, aux loss, backward), vs the
          same router + transformers' MixtralExperts "grouped_mm" on the same weights (hf_gmm) and
          a dense SwiGLU FFN of hidden K*F (same active FLOPs). Also: kernels and memcpy/memset
          per call (torch.profiler, device-side events), and moekit and dense captured in a CUDA
          graph (PyTorch's whole-network recipe; a training step's .grad live in the graph's pool,
          rewritten by each replay), timed against eager. Bytes: the used experts' and router's
          weights + x + y (a training step: weights read once, gradients written once, + dy, dx).
decode    T in --decode-tokens (1 8 64): the eval layer forward captured in a CUDA graph, each
          replay timed from an idle device with the L2 flushed. Bound = the bytes that must be
          read (w_in + w_out of the distinct routed experts, counted on the host first, + the
          router weight) / copy rate. hf_gmm at the same T, graph-captured if it captures, else
          eager (the row says which). "int8": moe.quantize_experts on a copy of the layer (weight-only
          int8 experts, grouped_mm_w8 on the streaming kernel), graph-captured, and its speed-up over
          bf16. "tiled": the same graph with moe.ops.config.cuda_gemm =
          "torch" (PyTorch's tiled grouped GEMM instead of moekit's weight-streaming kernel,
          which "auto" runs at these sizes).

Each figure is the median of CUDA-event timings; ops rows cycle through enough input copies that
the working set exceeds twice the L2. A row that fails prints its error and the run goes on
(the exit status is 1 when any did).
Compact markdown tables per section come last; --json writes every row.

    PYTHONPATH=. python bench/gpu_bench.py [--only ops mlp layer decode] [--tokens 4096 16384]
        [--shapes mixtral-8x7b ...] [--decode-tokens 1 8 64] [--iters 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from moe import ExpertRows, ops, quantize_experts, release_step
from moe.dispatch import LocalDispatchState

DEVICE = "cuda"
BF16 = torch.bfloat16
SHAPES = {  # name: (D, F, E, K)
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 256, 8),
}
SECTIONS = ("ops", "mlp", "layer", "decode")
MODES = ("fwd", "fwd+bwd")
FAILED: list[str] = []  # labels of the rows that failed in this run (the exit status is 1 if any)
FUSED = False  # --fused: the mlp rows also time moekit with sm90_gathered="fused" (forward and backward)


# ---- timing ----------------------------------------------------------------------------------

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


def _time_cold_ms(fn, iters: int, flush: torch.Tensor) -> float:
    """Median ms of one fn() started on an idle device with the L2 flushed (flush.zero_() on a
    buffer larger than the L2, outside the timed events): a decode step's latency, launches and
    weight reads from HBM included."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _capture(fn, warmup: int = 3, before_capture=None):
    """(graph, output) of fn() captured in a CUDA graph after ``warmup`` eager calls on the
    capture stream, as PyTorch's whole-network capture does (lazy initialisation stays out of the
    graph); ``before_capture()`` runs in between (e.g. .grad set to None: a training step then
    gets its gradients allocated in the graph's pool, rewritten by every replay). Warm-up and
    capture share one side stream, as make_graphed_callables does."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph, out


def _graph_ms(fn, iters: int, flush: torch.Tensor | None = None, before_capture=None) -> float:
    """Median ms of replaying a CUDA graph of fn() (cold, as _time_cold_ms, when ``flush`` is
    given); the graph is dropped before returning (the caller releases .grad and module state)."""
    graph, out = _capture(fn, before_capture=before_capture)
    try:
        if flush is None:
            return _time_ms(graph.replay, [()], iters)
        return _time_cold_ms(graph.replay, iters, flush)
    finally:
        del graph, out


def _launches(fn) -> dict:
    """What one fn() puts on the GPU, from torch.profiler's device-side (CUDA) events: kernels,
    memcpy/memset, and the most frequent kernel names."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels, copies, names = 0, 0, {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        if e.name.startswith(("Memcpy", "Memset")):
            copies += 1
        else:
            kernels += 1
            names[e.name[:80]] = names.get(e.name[:80], 0) + 1
    if kernels + copies == 0:
        raise RuntimeError("the profiler recorded no CUDA events (CUPTI unavailable?)")
    top = dict(sorted(names.items(), key=lambda kv: -kv[1])[:12])
    return {"kernels": kernels, "memcpy_memset": copies, "top": top}


def _op_count(fn) -> dict:
    """The ops of one fn() that run kernels, counted by moe.launches.count_ops (device-independent:
    the count the CPU tests hold to issue 15's budgets, tests/layers/test_launches.py); against the
    profiler's kernels it shows what each op launches on the GPU (CUTLASS set-up, cub passes)."""
    from moe.launches import count_ops

    with count_ops() as c:
        fn()
    torch.cuda.synchronize()
    return {"total": c.total, "ops": dict(c.ops.most_common())}


def _try(label: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), or None after printing the error: one failed row never ends the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (report and go on)
        ctx = f" (during: {exc.__context__!r})"[:300] if exc.__context__ is not None else ""
        print(f"FAILED {label}: {exc!r}"[:600] + ctx, flush=True)
        FAILED.append(label)
        return None


def _release(*modules) -> None:
    """Drops gradients and the tensors a forward left on the modules (aux_losses, last_routing: a
    graph's pool memory included), then returns cached blocks to the device."""
    for m in (m for m in modules if m is not None):
        m.zero_grad(set_to_none=True)
        release_step(m)
    gc.collect()
    torch.cuda.empty_cache()


# ---- ceilings and roofline -------------------------------------------------------------------

def measure_ceilings(iters: int, *, copy_elems: int = 1 << 30, n: int = 8192) -> dict:
    """This device's copy rate (copy_elems bf16, 2 GiB, device to device; bytes read + written)
    and dense bf16 mm rate (n^3, random data), each after a few untimed calls for the clocks."""
    src = torch.randn(copy_elems, device=DEVICE, dtype=BF16)
    dst = torch.empty_like(src)
    for _ in range(5):
        dst.copy_(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), [()], iters)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a, b = (torch.randn(n, n, device=DEVICE, dtype=BF16) for _ in range(2))
    for _ in range(10):
        torch.mm(a, b)
    mm_ms = _time_ms(lambda: torch.mm(a, b), [()], iters)
    return {"op": "ceilings", "copy_bytes": copy_bytes, "copy_ms": copy_ms,
            "copy_tb_s": copy_bytes / (copy_ms / 1e3) / 1e12, "mm_n": n, "mm_ms": mm_ms,
            "dense_tflops": 2 * n ** 3 / (mm_ms / 1e3) / 1e12}


def _roofline(ceil, ms, nbytes: float, flops: float = 0.0):
    """max(bytes / copy rate, FLOPs / mm rate) / time: the fraction of the measured limit."""
    if not ceil or not ms:
        return None
    limit_s = max(nbytes / (ceil["copy_tb_s"] * 1e12), flops / (ceil["dense_tflops"] * 1e12))
    return limit_s / (ms / 1e3)


# ---- ops -------------------------------------------------------------------------------------

def _routing(T: int, E: int, K: int):
    ids_TK = torch.rand(T, E, device=DEVICE).topk(K, dim=1).indices
    return ids_TK, ops.plan(ids_TK, E)


def _torch_grouped_mm():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm")


def bench_grouped_mm(name, T, iters, ceil=None):
    D, Fh, E, K = SHAPES[name]
    _, p = _routing(T, E, K)
    N = T * K
    per_set = (N * D + E * D * Fh) * 2
    sets = []
    for _ in range(_copies(per_set)):
        a = torch.randn(N, D, device=DEVICE, dtype=BF16)
        w = (torch.randn(E, Fh, D, device=DEVICE, dtype=BF16) / D ** 0.5).transpose(1, 2)
        sets.append((a, w))
    offs = p.offs_E
    used = int((p.counts_E > 0).sum())  # host sync, before any timing
    ours = _time_ms(lambda a, w: ops.grouped_mm(a, w, offs), sets, iters)
    with ops.config.override(cuda_gemm="native"):  # moekit's own WMMA kernel, same inputs
        native = _time_ms(lambda a, w: ops.grouped_mm(a, w, offs), sets, iters)
    tgm = _torch_grouped_mm()
    theirs = _time_ms(lambda a, w: tgm(a, w, offs=offs), sets, iters)
    dense_sets = [(a, w[0]) for a, w in sets]  # (N, D) @ (D, F): the same 2*N*D*F FLOPs
    dense = _time_ms(lambda a, w: torch.mm(a, w), dense_sets, iters)
    ref = tgm(sets[0][0], sets[0][1], offs=offs).float()
    err = (ops.grouped_mm(sets[0][0], sets[0][1], offs).float() - ref).abs().max().item()
    flops = 2 * N * D * Fh
    nbytes = 2 * (N * D + used * D * Fh + N * Fh)
    return {"op": "grouped_mm", "shape": name, "T": T, "ours_ms": ours, "native_ms": native,
            "native_tflops": flops / 1e12 / (native / 1e3), "torch_grouped_mm_ms": theirs,
            "dense_ms": dense, "ours_tflops": flops / 1e12 / (ours / 1e3),
            "vs_torch_grouped_mm": theirs / ours, "vs_dense": dense / ours,
            "max_abs_diff_vs_torch": err, "experts_used": used, "bytes": nbytes, "flops": flops,
            "roofline": _roofline(ceil, ours, nbytes, flops),
            "torch_grouped_mm_roofline": _roofline(ceil, theirs, nbytes, flops)}


def bench_dispatch(name, T, iters, ceil=None):
    D, _, E, K = SHAPES[name]
    ids, p = _routing(T, E, K)
    N = T * K
    weights = torch.rand(T, K, device=DEVICE)
    per_set = (T * D + N * D) * 2
    xs = [(torch.randn(T, D, device=DEVICE, dtype=BF16),) for _ in range(_copies(per_set))]
    ys = [(torch.randn(N, D, device=DEVICE, dtype=BF16),) for _ in range(len(xs))]
    t_perm = _time_ms(lambda x: ops.permute(x, p), xs, iters)
    t_unperm = _time_ms(lambda y: ops.unpermute(y, p, weights), ys, iters)
    t_plan = _time_ms(lambda i: ops.plan(i, E), [(ids,)], iters)
    bytes_perm = 2 * N * D * 2  # read N rows (gathered) + write N rows
    bytes_unperm = (N * D + T * D) * 2  # read N rows + write T rows
    bytes_plan = 3 * 8 * N + 2 * 4 * E  # ids in; order_N, rows_TK, counts_E, offs_E out
    dst = [torch.empty(N, D, device=DEVICE, dtype=BF16) for _ in range(len(ys))]
    t_copy = _time_ms(lambda y, d: d.copy_(y), [(y[0], d) for y, d in zip(ys, dst)], iters)
    copy_tbs = bytes_perm / (t_copy / 1e3) / 1e12
    rows = []
    for op, t, nbytes in (("permute", t_perm, bytes_perm), ("unpermute", t_unperm, bytes_unperm)):
        tbs = nbytes / (t / 1e3) / 1e12
        rows.append({"op": op, "shape": name, "T": T, "ours_ms": t, "ours_tb_s": tbs,
                     "d2d_copy_tb_s": copy_tbs, "vs_copy": tbs / copy_tbs, "bytes": nbytes,
                     "roofline": _roofline(ceil, t, nbytes)})
    rows.append({"op": "plan", "shape": name, "T": T, "ours_ms": t_plan, "bytes": bytes_plan,
                 "roofline": _roofline(ceil, t_plan, bytes_plan)})
    return rows


def bench_router_backward(name, T, iters, ceil=None):
    """linear_f32_backward (bfloat16: the three-term split on tensor cores) vs the twin."""
    from moe.ops.twins import linear_f32_backward_torch

    D, _, E, _ = SHAPES[name]
    per_set = (T * D + E * D) * 2 + T * E * 4
    sets = [(torch.randn(T, E, device=DEVICE) * 1e-3, torch.randn(T, D, device=DEVICE, dtype=BF16),
             (torch.randn(E, D, device=DEVICE) * 0.02).to(BF16)) for _ in range(_copies(per_set))]
    op = torch.ops.moe.linear_f32_backward
    ours = _time_ms(lambda g, x, w: op(g, x, w), sets, iters)
    twin = _time_ms(lambda g, x, w: linear_f32_backward_torch(g, x, w), sets, iters)
    g, x, w = sets[0]
    refs = (g.double() @ w.double(), g.double().t() @ x.double())
    errs = [max((a.double() - r).abs().max().item() for a, r in zip(out, refs))
            for out in (op(g, x, w), linear_f32_backward_torch(g, x, w))]
    flops = 4 * T * E * D
    nbytes = 2 * (2 * T * D + 2 * E * D) + 4 * T * E  # x, w in; d x, d w out; g in
    return {"op": "linear_f32_backward", "shape": name, "T": T, "ours_ms": ours, "baseline_ms": twin,
            "speedup": twin / ours, "ours_tflops": flops / 1e12 / (ours / 1e3), "max_err": errs[0],
            "baseline_max_err": errs[1], "bytes": nbytes, "flops": flops,
            "roofline": _roofline(ceil, ours, nbytes, flops)}


def bench_router(name, T, iters, ceil=None):
    """topk_route with the loss statistics (the training router's one op: scores, top-k, weights,
    counts, metrics, and the balance and z losses' statistics over B sequences) vs its twin, the
    routers' PyTorch code on the same device; B = 1 (switch loss) and T / 1024 sequences (seq loss).
    Bytes: the float32 logits read and the (T, E) float32 probs written."""
    from moe.ops.twins import topk_route_torch

    _, _, E, K = SHAPES[name]
    sets = [(torch.randn(T, E, device=DEVICE),) for _ in range(_copies(T * E * 8))]
    rows = []
    for B in sorted({1, max(1, T // 1024)}):
        args = (None, K, "softmax", 0, 0, True, 1.0, None, B, False, "none", 1.0, 0.01 * E, 1e-3 / T)
        ours = _time_ms(lambda lg: torch.ops.moe.topk_route(lg, *args), sets, iters)
        twin = _time_ms(lambda lg: topk_route_torch(lg, *args), sets, iters)
        nbytes = 2 * T * E * 4
        rows.append({"op": "topk_route", "shape": name, "T": T, "num_seqs": B, "ours_ms": ours, "baseline_ms": twin,
                     "speedup": twin / ours, "bytes": nbytes, "roofline": _roofline(ceil, ours, nbytes, 0)})
    return rows


# ---- the expert MLP: moekit vs the PyTorch composite -----------------------------------------

def _bf16_on_device(build):
    """build() with bf16 as the default dtype, on DEVICE: no fp32 copy of the weights anywhere."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(BF16)
    try:
        with torch.device(DEVICE):
            return build()
    finally:
        torch.set_default_dtype(default)


def _mlp_work(D, Fh, T, K, used, mode):
    """(bytes, FLOPs) of the expert MLP: the used experts' w_in (D x 2F) and w_out (F x D), x in,
    y out; a training step reads the weights once and writes their gradients once, + dy, dx."""
    w, act, flops = 2 * used * 3 * D * Fh, 2 * 2 * T * D, 6 * T * K * D * Fh
    return (w + act, flops) if mode == "fwd" else (2 * w + 2 * act, 3 * flops)


def bench_mlp(name, T, iters, ceil=None):
    from moe import GroupedExperts

    D, Fh, E, K = SHAPES[name]
    torch.manual_seed(0)
    ids, p = _routing(T, E, K)
    experts = _bf16_on_device(lambda: GroupedExperts(E, D, Fh))
    x = torch.randn(T, D, device=DEVICE, dtype=BF16, requires_grad=True)
    weights = torch.rand(T, K, device=DEVICE, requires_grad=True)  # float32, as routers give them
    dy = torch.randn(T, D, device=DEVICE, dtype=BF16)
    w_in, w_out = experts.w_in_EDH, experts.w_out_EFD  # (E, D, 2F) [gate; up], (E, F, D)
    # The composite's routing metadata, precomputed as moekit's plan is (neither is timed).
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_idx = order // K
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    used = int((counts > 0).sum())
    gmm = _torch_grouped_mm()

    def moekit():  # what MoELayer runs: the second GEMM and the weighted combine are one op
        return experts(ExpertRows(x, p.offs_E, p), combine=LocalDispatchState(p, weights))

    def gathered(fn):  # fn with moekit's one-launch gathered sm90 GEMMs (forward and weight gradient)
        def run():
            with ops.config.override(sm90_gathered="fused"):
                return fn()
        return run

    moekit_fused = gathered(moekit)

    def composite():
        h = gmm(x.index_select(0, token_idx), w_in, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = gmm(F.silu(gate) * up, w_out, offs=offs)
        w = weights.reshape(-1).index_select(0, order).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token_idx, y * w[:, None])

    with torch.no_grad():
        ref = moekit().float()
        diff = (composite().float() - ref).abs().max().item()
        fused_diff = (moekit_fused().float() - ref).abs().max().item() if FUSED else None
        scale = ref.abs().max().item()
    inputs = (x, w_in, w_out, weights)
    cands = (("moekit", moekit, False), ("composite", composite, False)) + ((("fused", moekit, True),) if FUSED else ())
    rows = []
    for mode in MODES:
        if mode == "fwd":
            with torch.no_grad():
                t = {n: _time_ms(gathered(f) if g else f, [()], iters) for n, f, g in cands}
        else:
            step = lambda f: (lambda: torch.autograd.grad(f(), inputs, dy))  # noqa: E731
            t = {n: _time_ms(gathered(step(f)) if g else step(f), [()], iters) for n, f, g in cands}
        nbytes, flops = _mlp_work(D, Fh, T, K, used, mode)
        fused = {} if not FUSED else {
            "fused_ms": t["fused"], "fused_vs_unfused": t["moekit"] / t["fused"],
            "fused_vs_composite": t["composite"] / t["fused"], "max_abs_diff_fused_vs_unfused": fused_diff}
        rows.append({"op": "mlp", "mode": mode, "shape": name, "T": T, "ours_ms": t["moekit"],
                     "composite_ms": t["composite"], "vs_composite": t["composite"] / t["moekit"],
                     "ours_tflops": flops / 1e12 / (t["moekit"] / 1e3), "experts_used": used,
                     "bytes": nbytes, "flops": flops, "roofline": _roofline(ceil, t["moekit"], nbytes, flops),
                     "composite_roofline": _roofline(ceil, t["composite"], nbytes, flops),
                     "max_abs_diff_vs_composite": diff, "max_abs_out": scale, **fused})
    return rows


# ---- the layer: eager, launches, CUDA graphs ---------------------------------------------------

def _build_layer(name, dense: bool = True):
    """(MoELayer, DenseFFN of hidden K*F or None, {name: x -> (y, aux)}) in bf16 on DEVICE; the
    candidates are bench.layer's moekit, hf_gmm (when transformers is there) and dense."""
    from bench.layer import _candidates
    from moe import DenseFFN, MoELayer

    D, Fh, E, K = SHAPES[name]
    torch.manual_seed(0)

    def build():
        layer = MoELayer(D, Fh, E, K)
        ffn = DenseFFN(D, K * Fh) if dense else None
        cands = _candidates(layer, ffn, None)  # (x is not used to build them)
        return layer, ffn, {n: f for n, f in cands.items() if n != "hf_eager" and (dense or n != "dense")}

    return _bf16_on_device(build)


def _layer_work(D, Fh, E, K, T, used, mode, *, moe: bool = True):
    """(bytes, FLOPs) of a layer call: the weights it must read (moe: the used experts' w_in and
    w_out + the router weight; dense: its FFN of hidden K*F), x in and y out; a training step
    reads the weights once and writes their gradients once, + dy, dx, and does 3x the FLOPs."""
    params = used * 3 * D * Fh + E * D if moe else 3 * D * K * Fh
    flops = 2 * T * (K * 3 * D * Fh + (E * D if moe else 0))
    w, act = 2 * params, 2 * 2 * T * D
    return (w + act, flops) if mode == "fwd" else (2 * w + 2 * act, 3 * flops)


def bench_layer(name, T, iters, ceil=None):
    """Per mode: eager ms of moekit / hf_gmm / dense, moekit and dense captured in CUDA graphs,
    and (last, after every timing of this shape) the launches of one eager call."""
    from bench.layer import _step

    D, Fh, E, K = SHAPES[name]
    layer, dense, cands = _build_layer(name)
    modules = (layer, dense, *getattr(cands.get("hf_gmm"), "modules", ()))
    x = torch.randn(T, D, device=DEVICE, dtype=BF16)
    layer.eval()
    with torch.no_grad():
        layer(x)
    used = int((layer.last_routing.counts_E > 0).sum())  # host sync, before any timing
    rows = []
    for mode in MODES:
        for m in (layer, dense):
            m.train(mode != "fwd")
        label = f"layer {name} T={T} {mode}"
        with torch.set_grad_enabled(mode != "fwd"):
            times = {n: _time_ms(_step(f, x, mode), [()], iters) for n, f in cands.items()}
            graphs = {}
            for n in ("moekit", "dense"):
                _release(*modules)
                graphs[n] = _try(f"{label} {n} graph", _graph_ms, _step(cands[n], x, mode), iters,
                                 before_capture=lambda: _release(*modules))
        _release(*modules)
        ours = times.pop("moekit")
        row = {"op": "layer", "mode": mode, "shape": name, "T": T, "ours_ms": ours, "experts_used": used}
        for n, t in times.items():
            row[f"{n}_ms"] = t
            row[f"vs_{n}"] = t / ours
        row["graph_ms"], row["dense_graph_ms"] = graphs["moekit"], graphs["dense"]
        if graphs["moekit"]:
            row["eager_over_graph"] = ours / graphs["moekit"]
            if graphs["dense"]:
                row["graph_vs_dense_graph"] = graphs["dense"] / graphs["moekit"]
        nbytes, flops = _layer_work(D, Fh, E, K, T, used, mode)
        dbytes, dflops = _layer_work(D, Fh, E, K, T, used, mode, moe=False)
        row.update(bytes=nbytes, flops=flops, roofline=_roofline(ceil, ours, nbytes, flops),
                   graph_roofline=_roofline(ceil, graphs["moekit"], nbytes, flops),
                   dense_roofline=_roofline(ceil, row.get("dense_ms"), dbytes, dflops),
                   dense_graph_roofline=_roofline(ceil, graphs["dense"], dbytes, dflops))
        rows.append(row)
    for row in rows:  # the profiler last: its CUPTI set-up never precedes a timing of this shape
        mode = row["mode"]
        for m in (layer, dense):
            m.train(mode != "fwd")
        with torch.set_grad_enabled(mode != "fwd"):
            row["launches"] = {n: _try(f"layer {name} T={T} {mode} {n} launches", _launches, _step(f, x, mode))
                               for n, f in cands.items()}
            row["ops"] = _try(f"layer {name} T={T} {mode} ops", _op_count, _step(cands["moekit"], x, mode))
        _release(*modules)
    return rows


# ---- decode: a few tokens, the layer in a CUDA graph, against the bytes it must read -----------

def bench_decode(name, tokens, iters, ceil=None):
    D, Fh, E, K = SHAPES[name]
    layer, _, cands = _build_layer(name, dense=False)
    hf = cands.get("hf_gmm")
    layer.eval()
    int8 = _try(f"decode {name} int8 layer", lambda: quantize_experts(copy.deepcopy(layer)))
    flush = torch.empty(max(256 << 20, 2 * torch.cuda.get_device_properties(0).L2_cache_size),
                        dtype=torch.int8, device=DEVICE)
    rows = []
    with torch.no_grad():
        for T in tokens:
            label = f"decode {name} T={T}"
            x = torch.randn(T, D, device=DEVICE, dtype=BF16)
            layer(x)
            ids = layer.last_routing.ids_TK
            distinct = int(ids[ids >= 0].unique().numel())  # host sync, before any timing
            nbytes = 2 * (distinct * 3 * D * Fh + E * D)
            flops = 2 * T * (K * 3 * D * Fh + E * D)
            row = {"op": "decode", "shape": name, "T": T, "experts_read": distinct, "bytes": nbytes,
                   "bound_ms": nbytes / (ceil["copy_tb_s"] * 1e12) * 1e3 if ceil else None}
            row["ours_ms"] = _try(f"{label} moekit graph", _graph_ms, lambda: layer(x), iters, flush)
            _release(layer)
            with ops.config.override(cuda_gemm="torch"):  # read at capture: the tiled GEMMs
                row["tiled_ms"] = _try(f"{label} moekit graph tiled", _graph_ms, lambda: layer(x), iters, flush)
            _release(layer)
            if int8 is not None:  # weight-only int8 experts: half the expert bytes
                row["int8_ms"] = _try(f"{label} moekit int8 graph", _graph_ms, lambda: int8(x), iters, flush)
                _release(int8)
                if row["int8_ms"] and row["ours_ms"]:
                    row["int8_speedup"] = row["ours_ms"] / row["int8_ms"]
            row["eager_ms"] = _try(f"{label} moekit eager", _time_cold_ms, lambda: layer(x), iters, flush)
            if hf is not None:
                try:
                    row["hf_gmm_ms"], row["hf_gmm_mode"] = _graph_ms(lambda: hf(x), iters, flush), "graph"
                except Exception as exc:  # noqa: BLE001  (report, then time it eagerly)
                    print(f"{label} hf_gmm does not capture, timed eagerly: {exc!r}"[:400], flush=True)
                    row["hf_gmm_mode"] = f"eager (capture failed: {type(exc).__name__})"
                    row["hf_gmm_ms"] = _try(f"{label} hf_gmm eager", _time_cold_ms, lambda: hf(x), iters, flush)
                _release(layer, *hf.modules)
            for key, ms in (("roofline", row["ours_ms"]), ("eager_roofline", row["eager_ms"]),
                            ("hf_gmm_roofline", row.get("hf_gmm_ms"))):
                row[key] = _roofline(ceil, ms, nbytes, flops)
            if row["ours_ms"] and row["bound_ms"]:
                row["fraction"] = row["bound_ms"] / row["ours_ms"]
            if row["ours_ms"] and row.get("hf_gmm_ms"):
                row["vs_hf_gmm"] = row["hf_gmm_ms"] / row["ours_ms"]
            rows.append(row)
    return rows


# ---- tables ----------------------------------------------------------------------------------

def _f(v, fmt: str = ".3f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def _ops_table(rows) -> list[str]:
    out = ["| op | shape | T | ours ms | figure | vs baseline | roofline |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["op"] == "grouped_mm":
            fig = f"{r['ours_tflops']:.0f} TFLOP/s"
            vs = (f"{r['vs_torch_grouped_mm']:.2f}x F.grouped_mm, {r['vs_dense']:.2f}x dense; native "
                  f"{r['native_tflops']:.0f} TFLOP/s")
        elif r["op"] == "plan":
            fig, vs = "", ""
        elif r["op"] == "linear_f32_backward":
            fig = f"{r['ours_tflops']:.0f} TFLOP/s"
            vs = (f"{r['speedup']:.2f}x the float32 GEMMs + casts; max err {r['max_err']:.2g} vs "
                  f"{r['baseline_max_err']:.2g}")
        else:
            fig = f"{r['ours_tb_s']:.2f} TB/s"
            vs = f"{r['vs_copy']:.2f}x d2d copy ({r['d2d_copy_tb_s']:.2f} TB/s)"
        out.append(f"| {r['op']} | {r['shape']} | {r['T']} | {r['ours_ms']:.3f} | {fig} | {vs} | "
                   f"{_f(r.get('roofline'), '.2f')} |")
    return out


def _mlp_table(rows) -> list[str]:
    out = ["| mlp | shape | T | moekit ms | composite ms | composite / moekit | roofline moekit / composite | "
           "max diff (max out) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['shape']} | {r['T']} | {r['ours_ms']:.3f} | {r['composite_ms']:.3f} | "
                   f"{r['vs_composite']:.2f} | {_f(r['roofline'], '.2f')} / {_f(r['composite_roofline'], '.2f')} | "
                   f"{r['max_abs_diff_vs_composite']:.2g} ({r['max_abs_out']:.2g}) |")
    fused = [r for r in rows if "fused_ms" in r]
    if fused:
        out += ["", "| mlp, fused up projection | shape | T | fused ms | unfused / fused | composite / fused | "
                "max diff fused vs unfused |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['mode']} | {r['shape']} | {r['T']} | {r['fused_ms']:.3f} | {r['fused_vs_unfused']:.2f} | "
                f"{r['fused_vs_composite']:.2f} | {r['max_abs_diff_fused_vs_unfused']:.2g} |" for r in fused]
    return out


def _launch_cell(r) -> str:
    """"moekit k+m (o ops), hf_gmm ..., dense ...": profiler kernels + memcpy/memset, and for
    moekit the ops count_ops counts in the same call (the step's loss ops included)."""
    cells = []
    for n in ("moekit", "hf_gmm", "dense"):
        if n in r.get("launches", {}):
            c = r["launches"][n]
            ops = f" ({r['ops']['total']} ops)" if n == "moekit" and r.get("ops") else ""
            cells.append(f"{n} {c['kernels']}+{c['memcpy_memset']}{ops}" if c else f"{n} -")
    return ", ".join(cells)


def _layer_table(rows) -> list[str]:
    out = ["| layer | shape | T | moekit ms | vs hf_gmm | vs dense | graph ms | eager / graph | dense graph ms | "
           "dense graph / graph | roofline eager / graph | launches (kernels+memcpy) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['shape']} | {r['T']} | {r['ours_ms']:.2f} | "
                   f"{_f(r.get('vs_hf_gmm'), '.2f')} | {_f(r.get('vs_dense'), '.2f')} | "
                   f"{_f(r.get('graph_ms'), '.2f')} | "
                   f"{_f(r.get('eager_over_graph'), '.2f')} | {_f(r.get('dense_graph_ms'), '.2f')} | "
                   f"{_f(r.get('graph_vs_dense_graph'), '.2f')} | {_f(r['roofline'], '.2f')} / "
                   f"{_f(r['graph_roofline'], '.2f')} | {_launch_cell(r)} |")
    return out


def _decode_table(rows) -> list[str]:
    out = ["| decode | shape | experts read | bound us | graph us | fraction | tiled us | int8 us (x bf16) | eager us | "
           "hf_gmm us | hf_gmm / graph |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    us = lambda ms: None if ms is None else 1e3 * ms  # noqa: E731
    for r in rows:
        hf = f"{_f(us(r.get('hf_gmm_ms')), '.1f')} ({r.get('hf_gmm_mode', 'n/a')})"
        out.append(f"| T={r['T']} | {r['shape']} | {r['experts_read']} | {_f(us(r['bound_ms']), '.1f')} | "
                   f"{_f(us(r['ours_ms']), '.1f')} | {_f(r.get('fraction'), '.2f')} | {_f(us(r.get('tiled_ms')), '.1f')} | "
                   f"{_f(us(r.get('int8_ms')), '.1f')} ({_f(r.get('int8_speedup'), '.2f')}) | "
                   f"{_f(us(r['eager_ms']), '.1f')} | "
                   f"{hf} | {_f(r.get('vs_hf_gmm'), '.2f')} |")
    return out


def tables(ceil, rows) -> str:
    out = []
    if ceil:
        out += ["| ceilings | d2d copy TB/s | dense bf16 mm TFLOP/s |", "|---|---|---|",
                f"| measured | {ceil['copy_tb_s']:.2f} | {ceil['dense_tflops']:.0f} |", ""]
    for ops_, fmt in ((("grouped_mm", "permute", "unpermute", "plan", "linear_f32_backward"), _ops_table), (("mlp",), _mlp_table),
                      (("layer",), _layer_table), (("decode",), _decode_table)):
        sel = [r for r in rows if r["op"] in ops_]
        if sel:
            out += fmt(sel) + [""]
    return "\n".join(out)


# ---- main ------------------------------------------------------------------------------------

def _rows(label, fn, *args):
    """fn's rows (a dict or a list of them), printed as JSON lines; none if it fails."""
    t0 = time.perf_counter()
    got = _try(label, fn, *args)
    got = [] if got is None else [got] if isinstance(got, dict) else got
    for r in got:
        print(json.dumps(r), flush=True)
    print(f"  {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    return got


def run_section(section, args, ceil) -> list[dict]:
    heavy = max(5, args.iters // 2)
    rows = []
    if section == "decode":
        for name in args.shapes:
            rows += _rows(f"decode {name}", bench_decode, name, args.decode_tokens, args.iters, ceil)
        return rows
    for T in args.tokens:
        for name in args.shapes:
            if section == "ops":
                rows += _rows(f"grouped_mm {name} T={T}", bench_grouped_mm, name, T, args.iters, ceil)
                rows += _rows(f"dispatch {name} T={T}", bench_dispatch, name, T, args.iters, ceil)
                rows += _rows(f"router {name} T={T}", bench_router, name, T, args.iters, ceil)
                rows += _rows(f"router backward {name} T={T}", bench_router_backward, name, T, args.iters, ceil)
            elif section == "mlp":
                rows += _rows(f"mlp {name} T={T}", bench_mlp, name, T, heavy, ceil)
            else:
                rows += _rows(f"layer {name} T={T}", bench_layer, name, T, heavy, ceil)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--decode-tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None,
                        help="sections to run (default: all)")
    parser.add_argument("--fused", action="store_true",
                        help='mlp: also time sm90_gathered="fused" (moekit\'s one-launch gathered sm90 GEMMs)')
    args = parser.parse_args()
    global FUSED
    FUSED = args.fused
    assert ops.HAS_EXTENSION and ops._has_kernel("grouped_mm", torch.device("cuda")), \
        "moe._C has no CUDA kernels: build with MOE_BUILD_CUDA=1"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    if args.only is None or "layer" in args.only:  # the profiler once before any CUDA graph exists
        from torch.profiler import _utils  # (PyTorch's workaround for profiling after graphs)

        _try("profiler init", getattr(_utils, "_init_for_cuda_graphs", lambda: None))
    t0 = time.perf_counter()
    ceil = _try("ceilings", measure_ceilings, args.iters)
    wall = {"ceilings": time.perf_counter() - t0}
    print(json.dumps(ceil), f"\nsection ceilings: {wall['ceilings']:.1f} s", flush=True)
    rows = []
    for section in SECTIONS:
        if args.only is None or section in args.only:
            t0 = time.perf_counter()
            rows += run_section(section, args, ceil)
            wall[section] = time.perf_counter() - t0
            print(f"section {section}: {wall[section]:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "ceilings": ceil, "wall_s": wall, "rows": rows}, f, indent=1)
    print(tables(ceil, rows))
    if FAILED:
        print(f"FAILED rows ({len(FAILED)}): {', '.join(FAILED)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
