"""`moe demo` over several seeds: the (variant, seed) runs in parallel processes, and the summary
over seeds (mean, spread, each arm's paired gap to dense).

Each run is moe.apps.demo.train_variant of DemoConfig(seed=s); the arms of one seed see the same
batches in the same order (moe.apps.data: batches are a function of (seed, step)), so an arm's gap
to dense is taken per seed (paired) before its mean and spread. Spread = the sample standard
deviation over seeds (n - 1 in the denominator; 0 for one seed).
"""

from __future__ import annotations

import math
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

_WORKER: dict = {}  # the corpus of one worker process, loaded once by _init_worker


def _init_worker(data, threads: int, stop) -> None:
    """A worker ignores SIGINT (the parent owns Ctrl-C and sets ``stop``), loads the corpus once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from moe.apps.data import load_corpus

    torch.set_num_threads(max(1, threads))
    _WORKER.update(corpus=load_corpus(data), stop=stop)


def _run_one(variant, cfg, ckpt_dir, resume, stop_after):
    from moe.apps.demo import train_variant

    corpus, stop = _WORKER["corpus"], _WORKER["stop"]
    return train_variant(variant, cfg, corpus.train, corpus.val, ckpt_dir=ckpt_dir, resume=resume,
                         stop_after=stop_after, progress=False, should_stop=stop.is_set)


def run_dir(out: Path, seed: int) -> Path:
    """Checkpoint folder of one seed."""
    return Path(out) / "checkpoints" / f"seed{seed}"


def run_parallel(jobs: list[tuple[str, int]], cfg, *, data, out: Path, workers: int, threads: int,
                 resume: bool, stop_after, on_done) -> dict:
    """Train every (variant, seed) of ``jobs`` in ``workers`` spawned processes (``threads`` torch
    threads each); on_done(variant, seed, result) as each finishes. Returns {(variant, seed): result}.

    Ctrl-C is the parent's (workers ignore SIGINT): it sets a shared event that each running
    train_variant reads between steps, so each finishes its step, saves and stops; runs not yet
    started are cancelled; then DemoInterrupted is raised. A second Ctrl-C raises at once."""
    from moe.apps.demo import DemoInterrupted

    ctx = get_context("spawn")
    results, interrupted, stop = {}, [], ctx.Event()

    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)
        stop.set()

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(data, threads, stop)) as pool:
            pending = {pool.submit(_run_one, v, replace(cfg, seed=s), run_dir(out, s), resume, stop_after): (v, s)
                       for v, s in jobs}
            messages = []
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                if interrupted:
                    for f in pending:
                        f.cancel()
                for f in done:
                    v, s = pending.pop(f)
                    try:
                        results[v, s] = f.result()
                        on_done(v, s, results[v, s])
                    except KeyboardInterrupt as e:  # DemoInterrupted: what it saved
                        messages.append(str(e).removeprefix("interrupted: ").removesuffix(
                            "; continue with --resume"))
                pending = {f: vs for f, vs in pending.items() if not f.cancelled()}
            if interrupted or messages:
                raise DemoInterrupted("interrupted: " + "; ".join(messages or ["no run had started"])
                                      + "; continue with --resume")
    finally:
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)
    return results


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _mean_of(rows: list, key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if len(vals) == len(rows) else None


# The papers' own comparisons, reported as paired gaps next to the gap to dense: (arm, its baseline)
PAPER_PAIRS = (("recurrent", "topk"), ("xmoe", "topk"), ("finegrained", "topk"),
               ("finegrained_shared", "finegrained"))


def pooled_std(a: list[float], b: list[float]) -> float:
    """The pooled spread of two arms over the same seeds: sqrt((s_a^2 + s_b^2) / 2), s the sample
    standard deviations."""
    return math.sqrt((_mean_std(a)[1] ** 2 + _mean_std(b)[1] ** 2) / 2)


def paired_gap(runs: dict, arm: str, base: str, seeds: list[int]) -> dict:
    """arm's val_bpb minus base's, per seed (same data order): mean, std, per seed, and the two
    arms' pooled spread."""
    a, b = ([runs[v][s]["val_bpb"] for s in seeds] for v in (arm, base))
    gaps = [x - y for x, y in zip(a, b)]
    m, sd = _mean_std(gaps)
    return dict(vs=base, mean=m, std=sd, seeds=gaps, pooled_std=pooled_std(a, b))


def verdict(mean: float, std: float, gaps: list[float], pooled: float = 0.0) -> str:
    """'better' / 'worse' when every seed agrees and |mean| is beyond 3 spreads, the larger of the
    paired gap's std and the two arms' pooled std; else 'within noise'."""
    spread = max(std, pooled)
    if all(g < 0 for g in gaps) and mean + 3 * spread < 0:
        return "better"
    if all(g > 0 for g in gaps) and mean - 3 * spread > 0:
        return "worse"
    return "within noise"


def summarize(runs: dict, seeds: list[int]) -> dict:
    """{variant: summary} from runs {variant: {seed: result}}: val_bpb (mean), val_bpb_std,
    val_bpb_seeds; gap_to_dense (mean of the per-seed differences, negative = better than dense),
    gap_to_dense_std, gap_to_dense_seeds, gap_to_dense_pooled_std (the two arms' pooled spread),
    below_dense_every_seed, vs_dense (verdict);
    paper_comparison (the paired gap to the arm its paper compares with, PAPER_PAIRS); every other numeric result
    averaged over seeds, train_loss_bpb the mean curve, expert_load the mean map."""
    out = {}
    dense = runs.get("dense")
    for v, by_seed in runs.items():
        rows = [by_seed[s] for s in seeds]
        bpb = [r["val_bpb"] for r in rows]
        mean, std = _mean_std(bpb)
        s = dict(variant=v, seeds=list(seeds), val_bpb=mean, val_bpb_std=std, val_bpb_seeds=bpb)
        for key in rows[0]:
            if key not in s and key != "variant":
                m = _mean_of(rows, key)
                if m is not None:
                    s[key] = m
        n = min(len(r["train_loss_bpb"]) for r in rows)
        s["train_loss_bpb"] = [sum(r["train_loss_bpb"][i] for r in rows) / len(rows) for i in range(n)]
        if rows[0].get("expert_load"):
            s["expert_load"] = [[sum(r["expert_load"][i][e] for r in rows) / len(rows)
                                 for e in range(len(rows[0]["expert_load"][i]))]
                                for i in range(len(rows[0]["expert_load"]))]
        if dense is not None and v != "dense":
            d = paired_gap(runs, v, "dense", seeds)
            s.update(gap_to_dense=d["mean"], gap_to_dense_std=d["std"], gap_to_dense_seeds=d["seeds"],
                     gap_to_dense_pooled_std=d["pooled_std"], below_dense_every_seed=all(x < 0 for x in d["seeds"]),
                     vs_dense=verdict(d["mean"], d["std"], d["seeds"], d["pooled_std"]))
        for arm, base in PAPER_PAIRS:
            if arm == v and base in runs:
                s["paper_comparison"] = p = paired_gap(runs, arm, base, seeds)
                p["verdict"] = verdict(p["mean"], p["std"], p["seeds"], p["pooled_std"])
        out[v] = s
    return out
