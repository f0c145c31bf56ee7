"""Decode benchmark: one MoE layer at T = 1..64 tokens against the memory copy-rate bound, one run.

Shape legend: T tokens, D hidden size, F expert hidden size, E experts, K top-k.

    python -m bench.decode                      # the three shapes, T = 1, 2, 4, 8, 16, 32, 64
    python -m bench.decode --shape qwen3 --T 1 --T 16 --repeat 9
    python -m bench.decode --quick              # Qwen3 shape, T = 1, 8, 64, 2 repeats: a smoke run
    python -m bench.decode --threads 1          # one thread (a machine loaded by other processes)
    python -m bench.decode --linear-layout      # moekit's layer after moe.to_linear_layout

At decode sizes a MoE layer reads the weights of the distinct experts its T tokens chose (plus the
router), so its time is bounded below by those bytes over the memory copy rate. The copy rate is
measured in the same run, at each T, as one more candidate interleaved with the others (so load
from other processes hits it alike): a 256 MiB tensor copy, bytes copied per second. The bound is
``bytes / copy rate`` and each implementation's "% bound" is bound / time (100% = at the bound; a
read-only stream may beat a copy, so above 100% is possible). Candidates, bfloat16, on the same
expert weights (transformers' block holds a copy in its own (E, 2F, D) / (E, D, F) layout: its eager
loop is many times slower on transposed views) and one router weight (N(0, 0.02); top-k of the
softmax, renormalised):

  moekit      moe.MoELayer (router, plan, gathered grouped GEMM, swiglu, grouped GEMM, combine);
              with --linear-layout its expert weights are stored (E, Y, X) (moe.to_linear_layout)
  int8        the same layer after moe.quantize_experts (weight-only int8, per-channel scales):
              its time, its speed over moekit's bf16 ("x bf16") and % of its own bound (int8 bytes)
  hf_moekit   transformers' Qwen3MoeSparseMoeBlock (router + experts), experts_implementation
              "moekit" (moe.integrations.hf.register()): moekit's ops on transformers' layout, the
              weights read as transposed views
  hf_gmm      the same block, "grouped_mm"
  hf_eager    the same block, "eager" (a Python loop over the chosen experts)

The Qwen3MoeSparseMoeBlock runs at every shape: its experts are the SiLU-gated [gate; up] experts
that Mixtral's and DeepSeek-V3's routed experts share. Shapes (the slices keep each shape's three
weight copies, moekit's, transformers' and the int8 one, under ~3 GiB on a machine shared with
others):

  qwen3       Qwen3-30B-A3B layer: D 2048, F 768, E 128, k 8 (all of it)
  mixtral     Mixtral-8x7B: D 4096, F 14336, 3 of its 8 experts, k 2
  deepseek    DeepSeek-V3 routed experts: D 7168, F 2048, 12 of its 256 experts, k 8

Times are medians over interleaved repeats (bench.ops.time_fns), in inference mode. The last
column is the int8 layer's output error against the bf16 layer (relative RMS over the outputs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import torch

from bench.ops import machine_line, time_fns
from moe import MoELayer, to_linear_layout
from moe.integrations import hf
from moe.quant import Int8GroupedExperts

TOKENS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Shape:
    D: int
    F: int
    E: int
    K: int
    note: str


SHAPES = {
    "qwen3": Shape(2048, 768, 128, 8, "Qwen3-30B-A3B layer"),
    "mixtral": Shape(4096, 14336, 3, 2, "Mixtral-8x7B, 3 of its 8 experts"),
    "deepseek": Shape(7168, 2048, 12, 8, "DeepSeek-V3, 12 of its 256 routed experts"),
}
CANDIDATES = ("moekit", "hf_moekit", "int8", "hf_gmm", "hf_eager")
HF = ("hf_moekit", "hf_gmm", "hf_eager")


COPY_BYTES = 256 << 20


def copy_fn(nbytes: int = COPY_BYTES):
    """A zero-argument torch tensor copy of ``nbytes`` (both buffers touched once here)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return lambda: dst.copy_(src)


@contextlib.contextmanager
def _default_dtype(dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_layer(s: Shape) -> MoELayer:
    """A bf16 MoELayer (weights made in bf16 directly: no float32 copy of a large layer)."""
    with _default_dtype(torch.bfloat16):
        layer = MoELayer(s.D, s.F, s.E, s.K, router_kwargs={"norm_topk": True}).eval()
    torch.nn.init.normal_(layer.router.weight, std=0.02)
    return layer


def hf_block(layer: MoELayer):
    """transformers' Qwen3MoeSparseMoeBlock on ``layer``'s router weight and a copy of its expert
    weights in transformers' (E, 2F, D) / (E, D, F) layout, or None without transformers."""
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return None
    cfg = Qwen3MoeConfig(hidden_size=layer.hidden_size, moe_intermediate_size=layer.ffn_hidden_size,
                         num_experts=layer.num_experts, num_experts_per_tok=layer.top_k,
                         norm_topk_prob=True, hidden_act="silu")
    cfg._experts_implementation = "eager"
    with torch.device("meta"):
        block = Qwen3MoeSparseMoeBlock(cfg)
    ex = layer.experts
    block.gate.weight = layer.router.weight
    block.experts.gate_up_proj = torch.nn.Parameter(ex.w_in_EDH.detach().transpose(1, 2).contiguous(),
                                                    requires_grad=False)
    block.experts.down_proj = torch.nn.Parameter(ex.w_out_EFD.detach().transpose(1, 2).contiguous(),
                                                 requires_grad=False)
    return block.eval()


def _swapped(layer: MoELayer, experts):
    """layer(x) with ``experts`` in place of layer.experts for the call."""
    def run(x):
        own = layer.experts
        layer.experts = experts
        try:
            return layer(x)
        finally:
            layer.experts = own
    return run


def _hf(block, impl: str):
    def run(x):
        block.experts.config._experts_implementation = impl
        return block(x[None])[0]
    return run


def _register_moekit() -> bool:
    """Registers transformers' "moekit" experts implementation; False where this transformers is
    older than hf.MIN_TRANSFORMERS (its models take no registered implementation)."""
    try:
        hf.register()
    except ImportError:
        return False
    return True


def _bytes(s: Shape, distinct: int, int8: bool) -> int:
    """Weight bytes a forward reads: the distinct experts' (int8: codes + float32 scales) + router."""
    per_expert = 3 * s.D * s.F * (1 if int8 else 2) + (4 * (2 * s.F + s.D) if int8 else 0)
    return distinct * per_expert + s.E * s.D * 2


def _rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((got.double() - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-300)).sqrt().item()


def decode_rows(name: str, tokens=TOKENS, *, repeat: int = 7, skip=(), copy_bytes: int = COPY_BYTES,
                linear_layout: bool = False) -> list[dict]:
    """One row per T: {shape, T, distinct, rate (copy bytes/s), bound_ms, <candidate>_ms,
    <candidate>_frac, int8_x, int8_bound_ms, int8_err}; ``linear_layout`` stores moekit's expert
    weights (E, Y, X) (moe.to_linear_layout) once the other candidates have their copies."""
    s = SHAPES[name]
    layer = build_layer(s)
    int8 = Int8GroupedExperts(layer.experts)
    block = None if set(HF) <= set(skip) else hf_block(layer)
    if linear_layout:
        to_linear_layout(layer)
    fns = {"moekit": layer, "int8": _swapped(layer, int8)}
    if block is not None:
        fns.update(hf_gmm=_hf(block, "grouped_mm"), hf_eager=_hf(block, "eager"))
        if "hf_moekit" not in skip and _register_moekit():
            fns["hf_moekit"] = _hf(block, hf.NAME)
    fns = {k: v for k, v in fns.items() if k not in skip}
    copy = copy_fn(copy_bytes)
    rows = []
    g = torch.Generator().manual_seed(0)
    for T in tokens:
        x = torch.randn(T, s.D, generator=g).to(torch.bfloat16)
        with torch.inference_mode():
            distinct = int(layer.router(x).ids_TK.unique().numel())
            outs = {k: f(x) for k, f in fns.items()}
            timed = time_fns({"copy": copy, **{k: (lambda f=f: f(x)) for k, f in fns.items()}}, repeat=repeat)
        rate = copy_bytes / timed.pop("copy")[0]
        bound = _bytes(s, distinct, False) / rate
        row = {"shape": name, "T": T, "distinct": distinct, "rate": rate, "bound_ms": bound * 1e3}
        for k, (sec, _) in timed.items():
            row[f"{k}_ms"], row[f"{k}_frac"] = sec * 1e3, bound / sec
        if "int8" in timed:
            row["int8_bound_ms"] = _bytes(s, distinct, True) / rate * 1e3
            row["int8_frac"] = row["int8_bound_ms"] / row["int8_ms"]
            if "moekit" in timed:
                row["int8_x"] = row["moekit_ms"] / row["int8_ms"]
                row["int8_err"] = _rel_rms(outs["int8"], outs["moekit"])
        rows.append(row)
    return rows


def _cell(row: dict, key: str) -> str:
    if f"{key}_ms" not in row:
        return f"{'-':>13}"
    return f"{row[key + '_ms']:7.2f} {100 * row[key + '_frac']:4.0f}%"


def format_table(rows: list[dict]) -> str:
    out = [machine_line(), "bf16, times in ms, % = copy-rate bound / time, copy = the copy rate measured with "
           "each row (GB/s, bytes copied per second)"]
    shape = None
    for r in rows:
        if r["shape"] != shape:
            shape = r["shape"]
            s = SHAPES[shape]
            out += ["", f"{shape}: {s.note} (D {s.D}, F {s.F}, E {s.E}, k {s.K})",
                    f"{'T':>3} {'experts':>7} {'copy':>5} {'bound':>7}  {'moekit':>13} {'hf_moekit':>13}"
                    f" {'hf_gmm':>13} {'hf_eager':>13}  {'int8':>13} {'x bf16':>6} {'int8 err':>8}"]
        x = f"{r['int8_x']:6.2f}" if "int8_x" in r else f"{'-':>6}"
        err = f"{100 * r['int8_err']:7.2f}%" if "int8_err" in r else f"{'-':>8}"
        out.append(f"{r['T']:>3} {r['distinct']:>7} {r['rate'] / 1e9:5.1f} {r['bound_ms']:7.2f}  "
                   f"{_cell(r, 'moekit')} {_cell(r, 'hf_moekit')} {_cell(r, 'hf_gmm')} {_cell(r, 'hf_eager')}"
                   f"  {_cell(r, 'int8')} {x} {err}")
    out.append("int8's % is against its own bound (int8 codes + scales); x bf16 = moekit time / int8 time; "
               "int8 err = relative RMS of the int8 layer's output against the bf16 layer's")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default all three")
    parser.add_argument("--T", action="append", type=int, help="tokens, repeatable; default 1, 2, ..., 64")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds per candidate (default 7)")
    parser.add_argument("--skip", action="append", default=[], choices=CANDIDATES, help="repeatable")
    parser.add_argument("--quick", action="store_true", help="Qwen3 shape, T = 1, 8, 64, 2 repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--linear-layout", action="store_true",
                        help="moekit's expert weights stored (E, Y, X) (moe.to_linear_layout)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    shapes = args.shape or (["qwen3"] if args.quick else list(SHAPES))
    tokens = tuple(args.T) if args.T else ((1, 8, 64) if args.quick else TOKENS)
    if any(t < 1 for t in tokens):
        parser.error(f"--T must be >= 1, got {tokens}")
    repeat = args.repeat or (2 if args.quick else 7)
    rows = []
    for name in shapes:
        rows += decode_rows(name, tokens, repeat=repeat, skip=tuple(args.skip), linear_layout=args.linear_layout)
    if args.linear_layout:
        print("moekit: expert weights stored (E, Y, X) (moe.to_linear_layout)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
