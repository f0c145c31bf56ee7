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
(train mode, aux loss included for the MoE rows). Times are medians over interleaved repeats
(bench.ops.time_fns); the "/name" ratios are moekit's time over each baseline's (< 1 = moekit
faster) and "hf/mk" is hf_moekit's time over moekit's (the cost of going through transformers).
Targets: moekit fwd+bwd <= 1.15x dense and < 1x hf_gmm; hf/mk <= 1.10. transformers is
optional: its rows are skipped without it.

"best" is the best dense GEMM reference, the machine's limit for the layer's matrix products: the
layer's GEMMs on one expert holding all N = T*K rows ((N, D) x (D, 2F) and (N, F) x (F, D); in
fwd+bwd also their data and weight gradients), timed with torch's matmul and with moekit's grouped
GEMM (E = 1), the faster of the two ("by": which). The layer's other work (router, dispatch,
SwiGLU, combine) is outside it, so "/best" above 1 is that work plus the grouped GEMMs' loss to
one large GEMM. The header names the CPU and the path of moekit's CPU GEMMs (bench.ops.machine_line).
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


def _step(fn, x, mode):
    """A zero-argument timed call; the caller sets grad mode (off for "fwd"). A "fwd+bwd" step is
    a training step's: the gradients of the candidate's modules are set to None first (what
    ``optimizer.zero_grad()`` does by default), so backward writes them afresh every step rather
    than adding into the previous step's."""
    if mode == "fwd":
        return lambda: fn(x)

    def train():
        for m in getattr(fn, "modules", ()):
            m.zero_grad(set_to_none=True)
        y, aux = fn(x)
        loss = y.float().square().mean() + (0 if aux is None else aux)
        loss.backward()
    return train


def best_dense(T: int, D: int, Fh: int, K: int, dtype, mode: str, *, repeat: int, seed: int = 0) -> tuple[float, str]:
    """(seconds, "torch" or "moekit"): the best dense GEMM reference of one row (module docstring):
    the layer's GEMMs on one expert holding all N = T*K rows, the faster of torch's matmul and
    moekit's grouped GEMM with E = 1."""
    N, g = T * K, torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, w_in, h, w_out, g_y, g_h = r(N, D), r(D, 2 * Fh), r(N, Fh), r(Fh, D), r(N, D), r(N, 2 * Fh)
    offs = torch.tensor([N], dtype=torch.int32)
    wgrad = torch.ops.moe.grouped_mm_wgrad
    # (forward GEMMs, gradient GEMMs) of each implementation
    gemms = {"torch": ((lambda: x @ w_in, lambda: h @ w_out),
                       (lambda: g_y @ w_out.t(), lambda: h.t() @ g_y, lambda: g_h @ w_in.t(), lambda: x.t() @ g_h)),
             "moekit": ((lambda: ops.grouped_mm(x, w_in[None], offs), lambda: ops.grouped_mm(h, w_out[None], offs)),
                        (lambda: ops.grouped_mm(g_y, w_out.t()[None], offs), lambda: wgrad(h, g_y, offs),
                         lambda: ops.grouped_mm(g_h, w_in.t()[None], offs), lambda: wgrad(x, g_h, offs)))}

    def step(fwd, bwd):
        for f in fwd + (bwd if mode == "fwd+bwd" else ()):
            f()
    with torch.no_grad():
        timed = time_fns({name: (lambda p=pair: step(*p)) for name, pair in gemms.items()}, repeat=repeat)
    name = min(timed, key=lambda n: timed[n][0])
    return timed[name][0], name


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
            x = torch.randn(T, D).to(dtype)
            cands = _candidates(layer, dense, x)
            for mode in modes:
                for m in (layer, dense):
                    m.train(mode != "fwd")
                with torch.set_grad_enabled(mode != "fwd"):
                    timed = time_fns({n: _step(f, x, mode) for n, f in cands.items()
                                      if n not in skip and f"{n}:{mode}" not in skip}, repeat=repeat)
                row = dict(dtype=str(dtype).removeprefix("torch."), T=T, D=D, F=Fh, E=E, K=K, mode=mode)
                for name, (sec, _) in timed.items():
                    row[f"{name}_ms"] = sec * 1e3
                row["noise"] = timed["moekit"][1]
                best, row["best_by"] = best_dense(T, D, Fh, K, dtype, mode, repeat=repeat, seed=seed)
                row["best_ms"] = best * 1e3
                row["vs_best"] = row["moekit_ms"] / row["best_ms"]
                for name in timed:
                    if name not in ("moekit", "hf_moekit"):
                        row[f"vs_{name}"] = row["moekit_ms"] / row[f"{name}_ms"]
                if "hf_moekit" in timed:
                    row["hf_over_moekit"] = row["hf_moekit_ms"] / row["moekit_ms"]
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
    names = [n for n in ("best", "dense", "hf_eager", "hf_gmm", "hf_moekit", "moekit")
             if any(f"{n}_ms" in r for r in rows)]
    ratios = [n for n in names if n not in ("moekit", "hf_moekit")]
    hf = any("hf_over_moekit" in r for r in rows)
    head = (f"{'dtype':<8} {'T':>5} {'D':>5} {'F':>5} {'E':>4} {'K':>2} {'mode':<8} "
            + " ".join(f"{n + ' ms':>12}" for n in names) + "  "
            + " ".join(f"{'/' + n:>9}" for n in ratios) + (f" {'hf/mk':>6}" if hf else "") + f" {'noise':>6}"
            + (f" {'best by':>7}" if "best" in names else ""))
    out = [head]
    for r in rows:
        out.append(f"{r['dtype']:<8} {r['T']:>5} {r['D']:>5} {r['F']:>5} {r['E']:>4} {r['K']:>2} "
                   f"{r['mode']:<8} " + " ".join(_cell(r, n + "_ms", 12, ".1f") for n in names) + "  "
                   + " ".join(_cell(r, "vs_" + n, 9, ".2f") for n in ratios)
                   + (" " + _cell(r, "hf_over_moekit", 6, ".2f") if hf else "") + f" {r['noise']:>6.0%}"
                   + (f" {r.get('best_by', '-'):>7}" if "best" in names else ""))
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
