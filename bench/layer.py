"""Layer benchmark: moekit's MoELayer against a dense FFN and transformers' experts, one run.

Shape legend: T tokens, D hidden size, F expert hidden size, E experts, K top-k.

    python -m bench.layer                 # full table: float32 and bfloat16, T=4096, the reference layer shapes
    python -m bench.layer --quick         # T=256, 2 repeats: a smoke run, not a measurement

Candidates, on the same weights and the same routing (moekit's TopKRouter, dropless):
  dense       a SwiGLU FFN of hidden K*F (the same active FLOPs, no router)
  hf_eager    router + transformers' MixtralExperts, experts_implementation="eager"
  hf_gmm      router + MixtralExperts, "grouped_mm" (torch.nn.functional.grouped_mm)
  hf_moekit   router + MixtralExperts, "moekit" (moe.integrations.hf: moekit's ops on
              transformers' (E, 2F, D) / (E, D, F) weights, read in place)
  moekit      moe.MoELayer (router + plan + gathered grouped_mm + swiglu + weighted unpermute)
"fwd" is an inference forward (eval, no_grad); "fwd+bwd" a training step's forward and backward
(train mode, aux loss included for the MoE rows); its rows also give the MB of activations each of
moekit, hf_gmm and dense saves for the backward ("saved MB": every saved storage once, other than
x's and the parameters'). Times are medians over interleaved repeats
(bench.ops.time_fns); the "/name" ratios are moekit's time over each baseline's (< 1 = moekit
faster) and "hf/mk" is hf_moekit's time over moekit's (the cost of going through transformers).
Targets: moekit fwd+bwd <= 1.15x dense and < 1x hf_gmm; hf/mk <= 1.10. transformers is
optional: its rows are skipped without it.

"best" is the best dense GEMM reference, the machine's limit for the layer's matrix products: each
of the layer's GEMMs ((N, D) x (D, 2F) and (N, F) x (F, D); in fwd+bwd also their data and weight
gradients) timed four ways, and the fastest taken per GEMM: with torch's matmul and with moekit's
grouped GEMM (E = 1), on one expert holding all N = T*K rows and in the dense layer's shape (T rows,
hidden K*F: the same FLOPs with fewer, wider rows). So "best" is at most the dense layer's GEMM
time, and "by" says how many of the GEMMs each implementation won ("t" torch, "m" moekit).
"best1" is the looser reference from the same timings: the faster of torch and moekit doing all
the GEMMs, on one expert holding all rows. The
layer's other work (router, dispatch, SwiGLU, combine) is outside it, so "/best" above 1 is that
work plus the grouped GEMMs' loss to the best dense GEMMs. The header names the CPU and the path
of moekit's CPU GEMMs (bench.ops.machine_line).

In fwd+bwd the input x requires a gradient, as a layer inside a model does (its data gradient is
one of the GEMMs), and every candidate's step sets it to None first. The backward starts from a
fixed gradient of the output (the same random tensor for every candidate) and 1 for the aux loss,
as if the layer sat inside a model: no loss of the benchmark's own is computed or timed.
"""

from __future__ import annotations

import argparse

import torch

from bench.ops import DTYPES, SHAPES, machine_line, time_fns
from moe import DenseFFN, MoELayer, collect_aux_losses, ops

MODES = ("fwd", "fwd+bwd")


def _hf_experts(layer: MoELayer, impl: str):
    """transformers' MixtralExperts holding ``layer``'s expert weights, or None without it (or,
    for "moekit", without a transformers that takes registered experts implementations)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
        if impl == "moekit":
            from moe.integrations import hf
            hf.register()
    except ImportError:
        return None
    ex = layer.experts
    cfg = MixtralConfig(hidden_size=layer.hidden_size, intermediate_size=layer.ffn_hidden_size,
                        num_local_experts=layer.num_experts, num_experts_per_tok=layer.top_k,
                        hidden_act="silu")
    cfg._experts_implementation = impl
    hf = MixtralExperts(cfg).to(ex.w_in_EDH.dtype)
    with torch.no_grad():
        hf.gate_up_proj.copy_(ex.w_in_EDH.transpose(1, 2))  # (E, 2F, D), [gate; up] as ours
        hf.down_proj.copy_(ex.w_out_EFD.transpose(1, 2))  # (E, D, F)
    return hf


def _candidates(layer: MoELayer, dense: DenseFFN, x: torch.Tensor) -> dict:
    """name -> module-like callable x -> (y, aux)."""

    def moekit(x):
        return layer(x), collect_aux_losses(layer)

    def hf_call(hf):
        def run(x):
            r = layer.router(x)
            aux = sum(r.aux_losses.values(), torch.zeros(()))
            return hf(x, r.ids_TK, r.weights_TK.to(x.dtype)), aux
        run.modules = (hf, layer.router)
        return run

    def dense_call(x):
        return dense(x), None

    dense_call.modules = (dense,)
    moekit.modules = (layer,)
    cands = {"dense": dense_call}
    for name, impl in (("hf_eager", "eager"), ("hf_gmm", "grouped_mm"), ("hf_moekit", "moekit")):
        hf = _hf_experts(layer, impl)
        if hf is not None:
            cands[name] = hf_call(hf)
    cands["moekit"] = moekit
    return cands


def _step(fn, x, mode, g_y):
    """A zero-argument timed call; the caller sets grad mode (off for "fwd"). A "fwd+bwd" step is
    a training step's: the gradients of the candidate's modules and of x (which requires one in
    this mode) are set to None first (what ``optimizer.zero_grad()`` does by default), so backward
    writes them afresh every step rather than adding into the previous step's; backward starts
    from ``g_y`` for the output and 1 for the aux loss."""
    if mode == "fwd":
        return lambda: fn(x)

    def train():
        x.grad = None
        for m in getattr(fn, "modules", ()):
            m.zero_grad(set_to_none=True)
        y, aux = fn(x)
        outs, grads = ([y], [g_y]) if aux is None or not aux.requires_grad else ([y, aux], [g_y, torch.ones_like(aux)])
        torch.autograd.backward(outs, grads)
    return train


def saved_mb(fn, x) -> float:
    """MB of the activations a training forward of ``fn`` saves for its backward: the storages of
    the saved tensors, each once, other than x's and the parameters' of ``fn.modules`` (which the
    caller holds anyway)."""
    held = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr()
                                                for m in getattr(fn, "modules", ()) for p in m.parameters()}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in held:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values()) / 1e6


def _gemms(M: int, D: int, H: int, dtype, mode: str, g: torch.Generator) -> list[dict]:
    """The layer's GEMMs on M rows of hidden H, each as {"torch": fn, "moekit": fn}: the up and down
    projections, and in fwd+bwd the down projection's data and weight gradients and the up
    projection's (in backward's order)."""
    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, w_in, h, w_out, g_y, g_h = r(M, D), r(D, 2 * H), r(M, H), r(H, D), r(M, D), r(M, 2 * H)
    offs, wgrad, mm = torch.tensor([M], dtype=torch.int32), torch.ops.moe.grouped_mm_wgrad, ops.grouped_mm
    out = [dict(torch=lambda: x @ w_in, moekit=lambda: mm(x, w_in[None], offs)),
           dict(torch=lambda: h @ w_out, moekit=lambda: mm(h, w_out[None], offs))]
    if mode == "fwd+bwd":
        out += [dict(torch=lambda: g_y @ w_out.t(), moekit=lambda: mm(g_y, w_out.t()[None], offs)),
                dict(torch=lambda: h.t() @ g_y, moekit=lambda: wgrad(h, g_y, offs)),
                dict(torch=lambda: g_h @ w_in.t(), moekit=lambda: mm(g_h, w_in.t()[None], offs)),
                dict(torch=lambda: x.t() @ g_h, moekit=lambda: wgrad(x, g_h, offs))]
    return out


def best_fns(T: int, D: int, Fh: int, K: int, dtype, mode: str, *, seed: int = 0) -> dict:
    """The timed calls of the best dense GEMM reference of one row (module docstring), keyed
    ("best", i, impl, shape): GEMM i of the layer with torch's matmul or moekit's grouped GEMM
    (E = 1), on one expert holding all T*K rows ("expert") and in the dense layer's shape (T rows,
    hidden K*F: "dense"). They are timed with the candidates, interleaved (bench.ops.time_fns), so
    load on the machine hits the reference and the layers alike."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"expert": _gemms(T * K, D, Fh, dtype, mode, g), "dense": _gemms(T, D, K * Fh, dtype, mode, g)}

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run
    return {("best", i, impl, shape): no_grad(fn) for shape, gemms in shapes.items()
            for i, gemm in enumerate(gemms) for impl, fn in gemm.items()}


def best_of(timed: dict) -> tuple[float, str, float]:
    """(seconds, "by", seconds of "best1") from the timings of :func:`best_fns`' calls: per GEMM
    the fastest call ("by" counts the GEMMs each implementation won: "t4 m2" is torch 4, moekit
    2), summed; "best1" is the looser reference of the same timings, the faster of the two
    implementations doing all the GEMMs on one expert holding all rows."""
    keys = [k for k in timed if isinstance(k, tuple) and k[0] == "best"]
    total, wins, sets = 0.0, {"torch": 0, "moekit": 0}, {"torch": 0.0, "moekit": 0.0}
    for i in sorted({k[1] for k in keys}):
        fastest = min((k for k in keys if k[1] == i), key=lambda k: timed[k][0])
        total += timed[fastest][0]
        wins[fastest[2]] += 1
        for name in sets:
            sets[name] += timed["best", i, name, "expert"][0]
    return total, f"t{wins['torch']} m{wins['moekit']}", min(sets.values())


def layer_rows(*, T: int = 4096, shapes=SHAPES, dtypes=DTYPES, modes=MODES, repeat: int = 5,
               seed: int = 0, skip=()) -> list[dict]:
    """One row per (dtype, shape, mode): median ms of each candidate and moekit's ratios.
    ``skip`` holds "name" or "name:mode" entries left out (e.g. "hf_eager:fwd+bwd", whose
    backward materialises a full (E, 2F, D) gradient per expert and takes minutes on a CPU)."""
    rows = []
    for dtype in dtypes:
        for D, Fh, E, K in shapes:
            torch.manual_seed(seed)
            layer = MoELayer(D, Fh, E, K).to(dtype)
            dense = DenseFFN(D, K * Fh).to(dtype)
            x, g_y = torch.randn(T, D).to(dtype), torch.randn(T, D).to(dtype)
            cands = _candidates(layer, dense, x)
            for mode in modes:
                for m in (layer, dense):
                    m.train(mode != "fwd")
                x.requires_grad_(mode != "fwd")
                fns = {n: _step(f, x, mode, g_y) for n, f in cands.items() if n not in skip and f"{n}:{mode}" not in skip}
                fns.update(best_fns(T, D, Fh, K, dtype, mode, seed=seed))
                with torch.set_grad_enabled(mode != "fwd"):
                    timed = time_fns(fns, repeat=repeat)
                row = dict(dtype=str(dtype).removeprefix("torch."), T=T, D=D, F=Fh, E=E, K=K, mode=mode)
                best, row["best_by"], best1 = best_of(timed)
                timed = {n: t for n, t in timed.items() if isinstance(n, str)}
                for name, (sec, _) in timed.items():
                    row[f"{name}_ms"] = sec * 1e3
                row["noise"] = timed["moekit"][1]
                row["best_ms"], row["best1_ms"] = best * 1e3, best1 * 1e3
                row["vs_best"], row["vs_best1"] = row["moekit_ms"] / row["best_ms"], row["moekit_ms"] / row["best1_ms"]
                for name in timed:
                    if name not in ("moekit", "hf_moekit"):
                        row[f"vs_{name}"] = row["moekit_ms"] / row[f"{name}_ms"]
                if "hf_moekit" in timed:
                    row["hf_over_moekit"] = row["hf_moekit_ms"] / row["moekit_ms"]
                if mode == "fwd+bwd":  # the activations each candidate keeps for its backward
                    for name in ("moekit", "hf_gmm", "dense"):
                        if name in cands and name in timed:
                            row[f"{name}_saved_mb"] = saved_mb(cands[name], x)
                rows.append(row)
                layer.zero_grad(set_to_none=True)
                dense.zero_grad(set_to_none=True)
    return rows


# transformers' eager experts backward materialises a full (E, 2F, D) gradient per expert: it
# takes minutes per step on a CPU at E=128, so `moe bench` leaves it out (forward is kept).
DEFAULT_SKIP = ("hf_eager:fwd+bwd",)


def run(*, quick: bool = False, dtypes=DTYPES, skip=DEFAULT_SKIP) -> list[dict]:
    """All layer rows; ``quick`` uses T=256 and 2 repeats (a smoke run, not a measurement)."""
    kw = dict(T=256, repeat=2) if quick else dict(T=4096, repeat=5)
    return layer_rows(dtypes=dtypes, skip=skip, **kw)


def _cell(row: dict, key: str, width: int, fmt: str) -> str:
    return f"{row[key]:>{width}{fmt}}" if key in row else f"{'-':>{width}}"


def format_table(rows: list[dict]) -> str:
    names = [n for n in ("best", "best1", "dense", "hf_eager", "hf_gmm", "hf_moekit", "moekit")
             if any(f"{n}_ms" in r for r in rows)]
    ratios = [n for n in names if n not in ("moekit", "hf_moekit")]
    hf = any("hf_over_moekit" in r for r in rows)
    saved = [n for n in ("moekit", "hf_gmm", "dense") if any(f"{n}_saved_mb" in r for r in rows)]
    head = (f"{'dtype':<8} {'T':>5} {'D':>5} {'F':>5} {'E':>4} {'K':>2} {'mode':<8} "
            + " ".join(f"{n + ' ms':>12}" for n in names) + "  "
            + " ".join(f"{'/' + n:>9}" for n in ratios) + (f" {'hf/mk':>6}" if hf else "") + f" {'noise':>6}"
            + (f" {'best by':>7}" if "best" in names else "")
            + "".join(f" {n + ' MB':>10}" for n in saved))
    out = [head]
    for r in rows:
        out.append(f"{r['dtype']:<8} {r['T']:>5} {r['D']:>5} {r['F']:>5} {r['E']:>4} {r['K']:>2} "
                   f"{r['mode']:<8} " + " ".join(_cell(r, n + "_ms", 12, ".1f") for n in names) + "  "
                   + " ".join(_cell(r, "vs_" + n, 9, ".2f") for n in ratios)
                   + (" " + _cell(r, "hf_over_moekit", 6, ".2f") if hf else "") + f" {r['noise']:>6.0%}"
                   + (f" {r.get('best_by', '-'):>7}" if "best" in names else "")
                   + "".join(" " + _cell(r, n + "_saved_mb", 10, ".0f") for n in saved))
    return "\n".join(out)


def _transformers_version() -> str:
    try:
        from importlib.metadata import version
        return version("transformers")
    except Exception:  # not installed
        return "absent"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=256, 2 repeats (smoke run)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], action="append",
                        help="restrict to these dtypes (repeatable)")
    parser.add_argument("--mode", choices=MODES, action="append", help="restrict to these modes")
    parser.add_argument("--shape", type=int, action="append", choices=range(len(SHAPES)),
                        help=f"index into {SHAPES} (repeatable)")
    parser.add_argument("--tokens", type=int, help="T (default 4096, 256 with --quick)")
    parser.add_argument("--repeat", type=int, help="repeats (default 5, 2 with --quick)")
    parser.add_argument("--skip", action="append", default=None,
                        help='leave out a candidate, "name" or "name:mode" (default: hf_eager:fwd+bwd)')
    args = parser.parse_args(argv)
    kw = dict(T=256, repeat=2) if args.quick else dict(T=4096, repeat=5)
    kw.update({k: v for k, v in (("T", args.tokens), ("repeat", args.repeat)) if v is not None})
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else DTYPES
    shapes = tuple(SHAPES[i] for i in args.shape) if args.shape else SHAPES
    rows = layer_rows(dtypes=dtypes, shapes=shapes, modes=tuple(args.mode or MODES),
                      skip=tuple(args.skip) if args.skip is not None else DEFAULT_SKIP, **kw)
    print(f"{machine_line()}; extension={'yes' if ops.HAS_EXTENSION else 'no (twins)'}, "
          f"transformers {_transformers_version()}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
