"""The `moe` console script (also `python -m moe`): demo, bench and plan.

    moe demo [--quick] [--variants dense,topk,...] [--steps N] [--seeds N] [--jobs N] [--data PATH] [--resume]
    moe bench [--quick] [--out DIR]
    moe plan --hidden 2048 --layers 20 --experts 256 --top-k 8 --expert-hidden 512 --shared-experts 1
    moe plan --advise --hidden 2048 --layers 20 --tokens 1e12 [--max-params N] [--max-memory GIB]

A bad argument is one line on stderr ("moe plan: error: argument --granularity: ...") and exit
status 2, as argparse gives: each option's argparse type is its config field's kind
(moe.apps.checks), and the configs' own cross-field checks become the same one-line error.

`moe demo` runs with one torch thread unless --threads says otherwise: its matmuls are tiny, and
on a shared 2-core machine two OpenMP threads were measured 10x slower than one (spin-waiting).
Each subcommand's work lives in a module (moe.apps.demo, bench.ops / bench.fused / bench.layer,
moe.apps.planner); this file parses arguments, orchestrates and writes the files. `moe bench` runs
each benchmark in a child Python whose working directory is the source checkout's root (bench/ is
not installed: it ships with the checkout, not the wheel). demo and bench need the `apps` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

from moe.apps.checks import arg_type, field_kind

BENCH_MODULES = ("bench.ops", "bench.fused", "bench.layer")
DEMO_SEEDS = 3
DEMO_JOBS = max(1, min(2, os.cpu_count() or 1))
QUICK = dict(steps=40, seeds=2, eval_batches=4)  # --quick's settings where the option is left at its default

# The child of `moe bench`, run with cwd = the checkout root (so `bench` imports from there, as for
# `python -m bench.ops`): one module's rows (run(quick=...)) to a JSON file, its table to stdout
# with the noise cells that mean nothing at these sizes shown as "n/a" (moe.apps.plots). A closed
# stdout only stops the table: the rows are still written, and the parent exits quietly on its
# next print (see main).
_BENCH_CHILD = """import json, os, sys
from importlib import import_module
from moe.apps.plots import bench_rows_shown
name, quick, rows_path = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
mod = import_module(name)
if not (hasattr(mod, "run") and hasattr(mod, "format_table")):
    sys.exit(f"moe bench: {name} has no run(quick=...) / format_table(rows)")
rows = mod.run(quick=quick)
try:
    print(mod.format_table(bench_rows_shown(rows, quick=quick)), flush=True)
except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
with open(rows_path, "w") as f:
    json.dump(rows, f, default=str)
"""


class UsageError(SystemExit):
    """A bad argument: one line ("moe plan: error: ..."), exit status 2 as argparse gives.
    main() prints it; str(e) is the line, e.code is 2."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as UsageError: one line naming the argument, no usage block."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _require_apps(command: str, *modules: str) -> None:
    """A clear exit when the `apps` extra's packages are missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"moe {command} needs {', '.join(missing)}: pip install \"moekit[apps]\"")


def _demo_parser(sub) -> None:
    from moe.apps.demo import ALL_VARIANTS, VARIANTS, DemoConfig

    p = sub.add_parser("demo", help="train tiny byte-level MoE LMs on CPU and compare routers",
                       description="Train byte-level causal LMs (default data: this Python's standard "
                       "library sources; no downloads) and compare, at equal active parameters: "
                       + ", ".join(VARIANTS) + ".")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (default: {','.join(VARIANTS)})")
    p.add_argument("--seeds", type=arg_type("positive_int"), default=DEMO_SEEDS,
                   help=f"seeds --seed, --seed+1, ... (default {DEMO_SEEDS}): mean and spread per arm")
    p.add_argument("--jobs", type=arg_type("positive_int"), default=DEMO_JOBS,
                   help=f"runs trained at once, in separate processes (default {DEMO_JOBS}: "
                   "the cores; 1 = in this process, one after another)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['steps']} steps, {QUICK['seeds']} seeds, {QUICK['eval_batches']} eval "
                   "batches (unless given)")
    p.add_argument("--data", default=None, help="a text file or folder (default: stdlib sources)")
    p.add_argument("--out", default="moe_demo_out", type=arg_type("out_dir"),
                   help="output folder (default ./moe_demo_out)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--stop-after", type=arg_type("positive_int"), default=None, metavar="N",
                   help="train each variant at most N more steps, checkpoint, stop (continue with --resume)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=arg_type("nonnegative_int"), default=1,
                   help="torch CPU threads during the demo (default 1: the tiny matmuls gain little "
                   "from more, and on busy cores OpenMP threads spin; 0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    defaults = DemoConfig()
    for f in fields(DemoConfig):
        p.add_argument("--" + f.name.replace("_", "-"),
                       type=arg_type(f.metadata["kind"]) if "kind" in f.metadata else type(f.default),
                       default=getattr(defaults, f.name), help=f"(default {getattr(defaults, f.name)})")


def _plan_parser(sub) -> None:
    from moe.apps.advice import AdviceConfig
    from moe.apps.planner import PlanConfig

    p = sub.add_parser("plan", help="parameters, FLOPs, memory and efficiency leverage of a config",
                       description="Parameters, FLOPs/token, memory and the efficiency leverage of "
                       "arXiv:2507.17702 (Eq. 13, Table 2) for an MoE LM config; with --advise, "
                       "candidate (experts, top-k, granularity, shared) configurations for a compute "
                       "budget ranked by that leverage.")

    def arg(flag, cls=PlanConfig, **kw):  # an option whose type is its config field's kind
        p.add_argument(flag, type=arg_type(field_kind(cls, flag[2:].replace("-", "_"))), **kw)

    arg("--hidden", required=True, help="model dim D")
    arg("--layers", required=True)
    arg("--experts", help="routed experts E")
    arg("--top-k", help="routed experts per token K")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--expert-hidden", type=arg_type(field_kind(PlanConfig, "expert_hidden")),
                   help="expert FFN hidden F")
    g.add_argument("--granularity", type=arg_type(field_kind(PlanConfig, "granularity")),
                   help="Krajewski granularity: F = ffn_hidden / G")
    arg("--ffn-hidden", help="dense reference d_ff (default 4*hidden); --advise: the active FFN width")
    arg("--shared-experts", default=0)
    arg("--shared-hidden", help="(default: expert hidden)")
    arg("--vocab", default=32000)
    arg("--seq-len", default=2048)
    arg("--batch", default=1, help="sequences per step (activation memory)")
    arg("--heads", default=8)
    c = p.add_mutually_exclusive_group()
    c.add_argument("--compute", type=arg_type(field_kind(PlanConfig, "compute")),
                   help="training FLOPs C for EL (counted without embedding and head)")
    c.add_argument("--tokens", type=arg_type(field_kind(PlanConfig, "tokens")),
                   help="training tokens: C = tokens x non-embedding training FLOPs/token")
    arg("--param-bytes", default=2, help="bytes per weight/gradient (default 2)")
    p.add_argument("--advise", action="store_true",
                   help="rank candidate (E, K, G, S) configurations for the --compute/--tokens budget")
    arg("--max-params", cls=AdviceConfig, help="--advise: cap on total parameters")
    p.add_argument("--max-memory", type=arg_type(field_kind(AdviceConfig, "max_memory_gib")),
                   metavar="GIB", help="--advise: cap on weights + gradients + Adam state, GiB")
    arg("--top", cls=AdviceConfig, default=10, help="--advise: how many to print (default 10)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moe", description="moekit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    b = sub.add_parser("bench", help="op and layer benchmarks side by side")
    b.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    b.add_argument("--out", default=".", type=arg_type("out_dir"),
                   help="folder for bench_results.json and bench.png")
    _plan_parser(sub)
    return parser


def run_demo(args) -> dict:
    """Check the arguments, load the data, train the variants with --threads torch threads."""
    import torch

    from moe.apps.data import load_corpus
    from moe.apps.demo import ALL_VARIANTS, DemoConfig, check_variant

    _require_apps("demo", "tqdm", "matplotlib")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad or not variants:
        raise UsageError(f"moe demo: error: --variants {args.variants!r}: unknown {bad}; choose from "
                         f"{ALL_VARIANTS}")
    if args.quick:
        defaults = build_parser().parse_args(["demo"])
        for name, value in QUICK.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"moe demo: error: --device {args.device!r} is not usable here: {e}") from e
    t0 = time.perf_counter()
    try:
        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
        for v in variants:
            check_variant(v, cfg)
        corpus = load_corpus(args.data)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"moe demo: error: {e}") from e
    for split in ("train", "val"):
        if getattr(corpus, split).numel() <= cfg.seq_len:
            raise UsageError(f"moe demo: error: the {split} split of --data has "
                             f"{getattr(corpus, split).numel()} bytes, fewer than --seq-len "
                             f"(seq_len={cfg.seq_len}) + 1")
    prev_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _demo(args, cfg, corpus, variants, device, t0)
    finally:
        torch.set_num_threads(prev_threads)  # no process-wide state left behind


def _demo(args, cfg, corpus, variants, device, t0) -> dict:
    """Train each (variant, seed), in --jobs processes, then write results.json, the plots, and
    print the table (mean +- spread over seeds, each arm's paired gap to dense)."""
    import torch

    from moe.apps import plots
    from moe.apps.demo import DemoConfig, ResumeError, train_variant, variant_steps
    from moe.apps.seeds import run_dir, run_parallel, summarize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(cfg.seed, cfg.seed + args.seeds))
    jobs = [(v, s) for s in seeds for v in variants]
    print(f"data: {corpus.source}: {corpus.num_files} files, {corpus.train.numel():,} train / "
          f"{corpus.val.numel():,} validation bytes; {len(variants)} arms x {len(seeds)} seeds, "
          f"{cfg.steps} steps" + (f" (mor {variant_steps('mor', cfg)}: equal training FLOPs)"
                                 if "mor" in variants else "") + f", {min(args.jobs, len(jobs))} at a time",
          flush=True)
    done = []

    def on_done(v, s, r):
        done.append((v, s))
        if not args.no_progress or args.jobs > 1:
            what = (f"stopped at step {r['stopped_at']}" if "stopped_at" in r
                    else f"val {r['val_bpb']:.3f} bits/byte")
            print(f"[{len(done)}/{len(jobs)}] {v} seed {s}: {what}", flush=True)

    try:
        if args.jobs > 1 and len(jobs) > 1:
            by_job = run_parallel(jobs, cfg, data=args.data, out=out, workers=min(args.jobs, len(jobs)),
                                  threads=torch.get_num_threads(), resume=args.resume,
                                  stop_after=args.stop_after, on_done=on_done)
        else:
            by_job = {}
            for v, s in jobs:
                by_job[v, s] = train_variant(v, replace(cfg, seed=s), corpus.train, corpus.val,
                                             ckpt_dir=run_dir(out, s), resume=args.resume,
                                             stop_after=args.stop_after, progress=not args.no_progress,
                                             device=device)
                if len(jobs) > 1:
                    on_done(v, s, by_job[v, s])
    except ResumeError as e:
        raise UsageError(f"moe demo: error: {e}") from e
    stopped = {f"{v} seed {s}": r for (v, s), r in by_job.items() if "stopped_at" in r}
    if stopped:
        print(f"stopped (checkpoints in {out / 'checkpoints'}; continue with --resume): "
              + ", ".join(f"{k} at step {r['stopped_at']}" for k, r in stopped.items()))
        return dict(stopped=stopped)
    runs = {v: {s: by_job[v, s] for s in seeds} for v in variants}
    summary = summarize(runs, seeds)
    report = dict(config={f.name: getattr(cfg, f.name) for f in fields(DemoConfig)}, seeds=seeds,
                  steps={v: variant_steps(v, cfg) for v in variants},
                  data=dict(source=corpus.source, files=corpus.num_files,
                            train_bytes=corpus.train.numel(), val_bytes=corpus.val.numel()),
                  torch=torch.__version__, device=str(device), threads=torch.get_num_threads(),
                  jobs=min(args.jobs, len(jobs)), wall_time_s=time.perf_counter() - t0, variants=summary,
                  runs={v: {str(s): r for s, r in by_seed.items()} for v, by_seed in runs.items()})
    (out / "results.json").write_text(json.dumps(report, indent=1))
    plots.loss_curves(summary, out / "loss_curves.png")
    bars = plots.seed_bars(summary, out / "val_bpb.png")
    heat = plots.expert_load_heatmap(summary, out / "expert_load.png")
    print(plots.results_table(summary))
    print(f"wrote {out / 'results.json'}, {out / 'loss_curves.png'}, {bars}"
          + (f", {heat}" if heat else "") + f", checkpoints in {out / 'checkpoints'}")
    return report


def checkout_root() -> Path:
    """The folder that holds the moe package: a source checkout's root, where bench/ lives."""
    import moe

    return Path(moe.__file__).resolve().parent.parent


def _bench_rows(name: str, quick: bool, root: Path, tmp: Path) -> list[dict]:
    """Run one benchmark module in a child Python (cwd = root); its table streams to stdout."""
    rows_path = tmp / f"{name}.json"
    done = subprocess.run([sys.executable, "-c", _BENCH_CHILD, name, str(int(quick)), str(rows_path)],
                          cwd=root)
    if done.returncode != 0:
        raise SystemExit(f"moe bench: {name} failed with exit status {done.returncode} (its error is "
                         f"printed above)")
    return json.loads(rows_path.read_text())


def run_bench(args) -> dict:
    from moe.apps import plots

    _require_apps("bench", "matplotlib")
    root = checkout_root()
    if not (root / "bench" / "__init__.py").is_file():
        raise SystemExit(f"moe bench: no bench/ folder in {root}: the benchmarks ship with the source "
                         f"checkout, not the wheel; run it from a checkout (pip install -e .)")
    sections = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in BENCH_MODULES:
            print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
            sections[name] = plots.bench_rows_saved(_bench_rows(name, args.quick, root, Path(tmp)),
                                                    quick=args.quick)
    report = dict(quick=args.quick, sections=sections)
    if any(r.get("noise_raw") is not None for rows in sections.values() for r in rows):
        report["noise_note"] = plots.NOISE_NOTE
        print(plots.NOISE_NOTE)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_results.json").write_text(json.dumps(report, indent=1, default=str))
    chart = plots.bench_chart(sections, out / "bench.png")
    print(f"wrote {out / 'bench_results.json'}" + (f", {chart}" if chart else ""))
    return sections


def run_plan(args) -> dict:
    """Size one config, or with --advise rank candidate configs for a compute budget."""
    from moe.apps.advice import AdviceConfig, advise, format_advice
    from moe.apps.planner import PlanConfig, format_plan, size_model

    try:
        if args.advise:
            given = [f for f in ("experts", "top_k", "expert_hidden", "granularity", "shared_experts",
                                 "shared_hidden") if getattr(args, f) not in (None, 0)]
            if given:
                raise ValueError(f"--advise chooses {', '.join('--' + f.replace('_', '-') for f in given)} "
                                 "itself; leave them out")
            r = advise(AdviceConfig(hidden=args.hidden, layers=args.layers, ffn_hidden=args.ffn_hidden,
                                    vocab=args.vocab, seq_len=args.seq_len, batch=args.batch,
                                    heads=args.heads, compute=args.compute, tokens=args.tokens,
                                    max_params=args.max_params, max_memory_gib=args.max_memory,
                                    param_bytes=args.param_bytes, top=args.top))
            print(json.dumps(r, indent=1) if args.json else format_advice(r))
            return r
        missing = [f"--{f.replace('_', '-')}" for f in ("experts", "top_k") if getattr(args, f) is None]
        if args.expert_hidden is None and args.granularity is None:
            missing.append("--expert-hidden or --granularity")
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)} (or --advise)")
        cfg = PlanConfig(hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=args.top_k,
                         expert_hidden=args.expert_hidden, granularity=args.granularity,
                         ffn_hidden=args.ffn_hidden, shared_experts=args.shared_experts,
                         shared_hidden=args.shared_hidden, vocab=args.vocab, seq_len=args.seq_len,
                         batch=args.batch, heads=args.heads, compute=args.compute, tokens=args.tokens,
                         param_bytes=args.param_bytes)
    except ValueError as e:
        raise UsageError(f"moe plan: error: {e}") from e
    r = size_model(cfg)
    print(json.dumps(r, indent=1) if args.json else format_plan(r))
    if r["compute_warning"] and args.json:
        print(f"moe plan: warning: {r['compute_warning']}", file=sys.stderr)
    return r


def run(argv: list[str] | None = None) -> dict:
    """Parse argv and run the subcommand; returns its result (a dict, for tests and scripts)."""
    args = build_parser().parse_args(argv)
    return {"demo": run_demo, "bench": run_bench, "plan": run_plan}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moe` console script and `python -m moe`: exit status 0 on success.

    A closed stdout (`moe plan --json | head -1`) ends any subcommand quietly with status 141, the
    128 + SIGPIPE that a shell reports for a C tool the closed pipe killed (so `set -o pipefail`
    still sees that the output was cut short). stdout is pointed at /dev/null first, so the
    interpreter's final flush of what is still buffered does not raise a second time."""
    try:
        run(argv)
        sys.stdout.flush()  # a pipe closed under buffered output raises here, not at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # moe demo's DemoInterrupted says what it saved
        print("\n" + (str(e) or "interrupted (nothing saved)"), file=sys.stderr)
        return 130
    return 0
