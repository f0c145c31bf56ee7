"""The `moe` CLI (moe.apps): plan (parameter/FLOP counts against real models, the EL law's published
claims), demo (short runs on a temp folder of text: files, determinism, resume), bench
(orchestration in child processes, clear failures), data split, and the apps' separation from the
library (not imported by it, deprecated aliases), and the CLI's polish: a closed stdout, noise at
--quick sizes, chart labels that fit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moe
from moe import MoELayer, build_lm
from moe.apps import cli, demo, plots
from moe.apps.cli import run
from moe.apps.data import is_validation, load_corpus, stdlib_files, train_batch
from moe.apps.planner import (EL_CONSTANTS, PlanConfig, efficiency_leverage, optimal_granularity,
                              saturated_activation, size_model)

TINY = ["--dim", "16", "--layers", "4", "--heads", "2", "--ffn-hidden", "32", "--experts", "4",
        "--top-k", "2", "--seq-len", "16", "--batch", "4", "--eval-batches", "2", "--no-progress",
        "--seeds", "1", "--jobs", "1"]
TIMING_KEYS = {"tokens_per_s", "wall_time_s", "threads"}


# ---- plan: the efficiency-leverage law (arXiv:2507.17702 Eq. 13, Table 2) ----------------------

def test_el_reproduces_paper_claims():
    assert efficiency_leverage(0.031, 12, 1e22) == pytest.approx(7.2, abs=0.1)
    grid = [g / 10 for g in range(10, 1001)]
    best = max(grid, key=lambda g: efficiency_leverage(0.031, g, 1e22))
    assert 11.0 <= best <= 12.0 and optimal_granularity() == pytest.approx(best, abs=0.1)
    for G in (1, 2, 8, 12, 64):
        for C in (1e18, 1e22, 1e25):
            assert efficiency_leverage(1.0, G, C) == pytest.approx(1.0, abs=0.03)
    # leverage grows with sparsity and with compute (the paper's two power laws)
    assert efficiency_leverage(0.01, 12, 1e22) > efficiency_leverage(0.1, 12, 1e22) > 1
    assert efficiency_leverage(0.031, 12, 1e24) > efficiency_leverage(0.031, 12, 1e20)


def test_el_log_base_choice_is_the_only_one_matching():
    """log10 C with log2 G gives 7.2; the other bases miss the claims by far."""
    c = EL_CONSTANTS
    A_hat = saturated_activation(0.031)

    def el(log_c, log_g):
        lg = log_g(12)
        return A_hat ** (c["a"] + c["d"] * log_c(1e22) + c["gamma"] * lg * lg + c["beta"] * lg)

    assert el(math.log10, math.log2) == pytest.approx(efficiency_leverage(0.031, 12, 1e22))
    assert abs(el(math.log, math.log2) - 7.2) > 100
    assert abs(el(math.log10, math.log) - 7.2) > 0.25
    assert 2 ** (-c["beta"] / (2 * c["gamma"])) == pytest.approx(11.34, abs=0.01)
    assert math.e ** (-c["beta"] / (2 * c["gamma"])) > 30  # base e would put the optimum at 33


def test_saturating_transform_limits():
    assert saturated_activation(1e-9) == pytest.approx(EL_CONSTANTS["A_start"], rel=1e-5)
    assert saturated_activation(0.1) == pytest.approx(0.1 + EL_CONSTANTS["A_start"], rel=1e-6)
    assert saturated_activation(1e20) == pytest.approx(EL_CONSTANTS["A_max"], rel=1e-2)
    with pytest.raises(ValueError, match="activation ratio"):
        saturated_activation(0.0)


# ---- plan: counts against the layers moekit builds --------------------------------------------

@pytest.mark.parametrize("E,K,F,S", [(4, 1, 8, 0), (6, 2, 12, 1), (8, 3, 4, 2)])
def test_plan_counts_match_built_model(E, K, F, S):
    D, L, V = 16, 3, 40
    cfg = PlanConfig(hidden=D, layers=L, experts=E, top_k=K, expert_hidden=F, shared_experts=S,
                     vocab=V, seq_len=10, heads=2)
    r = size_model(cfg)
    model = build_lm(vocab_size=V, dim=D, n_layers=L, n_heads=2, mlp_factory=lambda i: MoELayer(
        D, F, E, K, num_shared_experts=S))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    total = sum(p.numel() for p in model.parameters())
    assert r["params_total"] == total
    assert r["params_active"] == total - sum(m.num_parameters() - m.active_parameters() for m in layers)
    ffn_flops = sum(m.flops_per_token() for m in layers)
    attn_and_head = 2 * (L * 4 * D * D + V * D) + 2 * L * 10 * D
    assert r["flops_per_token_forward"] == ffn_flops + attn_and_head
    assert r["flops_per_token_training"] == 3 * r["flops_per_token_forward"]
    assert r["activation_ratio"] == pytest.approx((K + S) / (E + S))
    assert r["memory_adam_bytes"] == 12 * total and r["memory_weights_bytes"] == 2 * total


def test_plan_cli_prints_both_granularities(capsys):
    r = run(["plan", "--hidden", "1024", "--layers", "8", "--experts", "64", "--top-k", "8",
             "--granularity", "8", "--ffn-hidden", "4096", "--shared-experts", "1"])
    out = capsys.readouterr().out
    assert r["expert_hidden"] == 512 and r["granularity_krajewski"] == 8 and r["granularity_tian"] == 4
    assert "Krajewski" in out and "2 D / F_expert = 4" in out and "d_ff / F_expert = 8" in out
    assert "EL =" in out
    with pytest.raises(SystemExit, match="top_k=9 must be <= experts=8"):
        run(["plan", "--hidden", "64", "--layers", "2", "--experts", "8", "--top-k", "9",
             "--expert-hidden", "32"])


def test_python_m_moe_plan():
    p = subprocess.run([sys.executable, "-m", "moe", "plan", "--hidden", "256", "--layers", "2",
                        "--experts", "8", "--top-k", "2", "--expert-hidden", "128", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["params_total"] > 0


PLAN_ARGS = ["plan", "--hidden", "256", "--layers", "2", "--experts", "8", "--top-k", "2",
             "--expert-hidden", "128"]


@pytest.mark.parametrize("extra", [["--json"], []])
def test_plan_into_a_closed_pipe_exits_quietly(extra):
    """`moe plan --json | head -1`, with the reader gone before the first write: status 141
    (128 + SIGPIPE), no traceback, no "Exception ignored" from the final flush."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "moe", *PLAN_ARGS, *extra], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    # stderr holds nothing but moekit's own log lines (e.g. the twins' notice under
    # MOE_DISABLE_EXTENSION=1): no traceback, no "Exception ignored".
    noise = [line for line in p.stderr.splitlines() if not line.startswith("moekit: ")]
    assert p.returncode == 141 and noise == [], p.stderr


# ---- data --------------------------------------------------------------------------------------

def test_stdlib_corpus_split_is_deterministic():
    root, files = stdlib_files()
    assert files == sorted(files) and not any("site-packages" in p.parts for p in files)
    c1, c2 = load_corpus(max_bytes=1 << 18), load_corpus(max_bytes=1 << 18)
    assert c1.train.numel() == 1 << 18 and c1.val.numel() > 0
    assert torch.equal(c1.train, c2.train) and torch.equal(c1.val, c2.val)
    val_names = [p for p in files if is_validation(p.relative_to(root).as_posix(), 10)]
    assert 0.03 < len(val_names) / len(files) < 0.2
    b = train_batch(c1.train, step=5, seed=1, batch=3, seq_len=8)
    assert torch.equal(b, train_batch(c1.train, step=5, seed=1, batch=3, seq_len=8))
    assert not torch.equal(b, train_batch(c1.train, step=6, seed=1, batch=3, seq_len=8))


def test_data_file_and_errors(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(bytes(range(32, 132)) * 10)
    c = load_corpus(str(f))
    assert c.train.numel() == 900 and c.val.numel() == 100
    assert bytes(c.val[:5].tolist()) == bytes(range(32, 37))
    with pytest.raises(FileNotFoundError, match="--data"):
        load_corpus(str(tmp_path / "missing"))


# ---- demo --------------------------------------------------------------------------------------

def _numbers(report: dict) -> dict:
    return {v: {k: x for k, x in r.items() if k not in TIMING_KEYS} for v, r in report["variants"].items()}


@pytest.fixture(scope="module")
def full_run(text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    return out, run(["demo", "--data", str(text_dir), "--out", str(out), "--steps", "4"] + TINY)


def test_demo_writes_results_plots_and_checkpoints(full_run):
    out, report = full_run
    cfg = demo.DemoConfig(**report["config"])
    assert set(report["variants"]) == set(demo.VARIANTS)
    for name in ("results.json", "loss_curves.png", "val_bpb.png", "expert_load.png"):
        assert (out / name).stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints" / "seed0").iterdir()) == sorted(
        f"{v}.pt" for v in report["variants"])
    saved = json.loads((out / "results.json").read_text())
    assert _numbers(saved) == _numbers(report)
    v = report["variants"]
    for name, r in v.items():
        assert math.isfinite(r["val_bpb"]) and 0 < r["val_bpb"] < 9
        assert len(r["train_loss_bpb"]) == report["steps"][name] == (4 if name != "mor" else
                                                                     demo.variant_steps("mor", cfg))
        assert r["val_bpb_seeds"] == [r["val_bpb"]] and r["val_bpb_std"] == 0
        if name != "dense":
            assert r["gap_to_dense"] == pytest.approx(r["val_bpb"] - v["dense"]["val_bpb"])
    # top-k: a token skips E - K = 2 experts of 3*D*(F/K) weights in each of the L = 4 layers
    assert v["topk"]["params_total"] - v["topk"]["params_active"] == 4 * 2 * 3 * 16 * 16
    assert v["topk"]["experts_per_token"] == 2 and v["finegrained"]["experts_per_token"] == 8
    assert v["finegrained_shared"]["experts_per_token"] == 7  # + the shared one
    assert 1 <= v["xmoe"]["experts_per_token"] <= 8 and v["xmoe"]["cap_reached_fraction"] <= 1
    assert v["topk"]["dropped_fraction"] == 0
    assert v["mor"]["mean_recursion_depth"] == v["mor"]["train_recursion_depth"] == 1.5  # top-k eval routing
    assert "experts_per_token" not in v["mor"]
    assert len(v["topk"]["expert_load"]) == 4 and sum(v["topk"]["expert_load"][0]) == pytest.approx(1)


def _router_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "router" in n)


@pytest.mark.parametrize("D,L,E,K,F,G", [(64, 4, 8, 2, 256, 4), (16, 6, 4, 1, 48, 3)])
def test_demo_arms_have_dense_active_parameters(D, L, E, K, F, G):
    """Every MoE arm applies 3*D*F FFN weights per token, as dense does: its active parameters
    are dense's plus its router's, exactly (shared experts counted active, xmoe at its nominal 2K
    of 2E experts of F/2K); mor has fewer parameters and as many training FLOPs as dense."""
    cfg = demo.DemoConfig(dim=D, layers=L, heads=4 if D % 8 == 0 else 2, ffn_hidden=F, experts=E,
                          top_k=K, granularity=G, steps=600)
    dense = demo.build_model("dense", cfg)
    dense_active = demo.param_counts(dense)[1]
    assert demo.param_counts(dense)[0] == dense_active
    for name in ("topk", "finegrained", "finegrained_shared", "recurrent", "sbase", "hash"):
        model = demo.build_model(name, cfg)
        total, active = demo.param_counts(model)
        assert active - dense_active == _router_params(model), name
        assert total > active
    xmoe = demo.build_model("xmoe", cfg)
    nominal = [2 * K] * L  # 2K experts of F/(2K): K experts' worth of F/K
    assert demo.param_counts(xmoe, nominal)[1] - dense_active == _router_params(xmoe)
    fine = [m for m in demo.build_model("finegrained_shared", cfg).modules() if isinstance(m, MoELayer)][0]
    assert (fine.num_experts, fine.top_k, fine.num_shared_experts) == (E * G - 1, K * G - 1, 1)
    mor = demo.build_model("mor", cfg)
    assert demo.param_counts(mor)[0] < demo.param_counts(dense)[0]
    flops = {v: demo.variant_steps(v, cfg) * demo.train_flops_per_token(v, cfg) for v in ("dense", "mor")}
    assert demo.variant_steps("mor", cfg) > cfg.steps
    assert flops["mor"] == pytest.approx(flops["dense"], rel=1 / cfg.steps)


def test_recurrent_arm_matches_topk_balancing_and_reference_gru_init():
    cfg = demo.DemoConfig(dim=32, heads=2, ffn_hidden=64, balance_coeff=3e-3)
    topk, rec = demo.build_model("topk", cfg), demo.build_model("recurrent", cfg)
    coeff = {m.router.balance_loss_coeff for model in (topk, rec) for m in model.modules()
             if isinstance(m, MoELayer)}
    assert coeff == {3e-3}
    cell = rec.router_chain.cell
    bias = torch.cat([cell.bias_ih, cell.bias_hh])
    assert bias.abs().max() > 0 and bias.std().item() == pytest.approx(0.02, rel=0.25)  # N(0, 0.02)
    assert (cell.weight_hh.abs() < 0.2).all()  # not torch's U(-1/sqrt(R), 1/sqrt(R)) = U(-0.35, 0.35)
    same = [(m.num_experts, m.ffn_hidden_size, m.top_k) for model in (topk, rec) for m in model.modules()
            if isinstance(m, MoELayer)]
    assert same == [(cfg.experts, cfg.ffn_hidden // cfg.top_k, cfg.top_k)] * (2 * cfg.layers)  # topk's experts


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.07])
def test_xmoe_cap_never_binds(threshold):
    """The xmoe arm's ceil(t * 2E) slots always hold the threshold's mass: every token's chosen
    experts reach t, for sharp, flat and exactly uniform router probabilities."""
    cfg = demo.DemoConfig(xmoe_threshold=threshold)
    router = [m for m in demo.build_model("xmoe", cfg).modules() if isinstance(m, MoELayer)][0].router
    assert router.top_k == demo.xmoe_cap(cfg) < 2 * cfg.experts
    torch.manual_seed(0)
    for scale in (0.0, 0.01, 1.0, 30.0):
        with torch.no_grad():
            router.weight.normal_(std=scale)
        r = router(torch.randn(512, cfg.dim))
        chosen = torch.where(r.ids_TK >= 0, r.probs_TE.gather(1, r.ids_TK.clamp(min=0)), 0.0).sum(1)
        assert (chosen >= threshold - 1e-6).all(), scale


def test_verdicts_say_within_noise_unless_every_seed_agrees_beyond_3_std():
    from moe.apps.seeds import summarize, verdict

    assert verdict(-0.03, 0.008, [-0.04, -0.03, -0.02]) == "better"
    assert verdict(-0.03, 0.011, [-0.04, -0.03, -0.02]) == "within noise"  # 3 std > |mean|
    assert verdict(-0.01, 0.001, [-0.011, 0.0001, -0.01]) == "within noise"  # one seed disagrees
    assert verdict(0.05, 0.01, [0.04, 0.05, 0.06]) == "worse"
    assert verdict(-0.03, 0.008, [-0.04, -0.03, -0.02], pooled=0.011) == "within noise"  # the arms' own spread
    runs = {"dense": {0: dict(val_bpb=2.0, train_loss_bpb=[3.0]), 1: dict(val_bpb=2.1, train_loss_bpb=[3.0])},
            "topk": {0: dict(val_bpb=2.3, train_loss_bpb=[3.0]), 1: dict(val_bpb=2.4, train_loss_bpb=[3.0])},
            "recurrent": {0: dict(val_bpb=1.9, train_loss_bpb=[3.0]), 1: dict(val_bpb=2.0, train_loss_bpb=[2.0])}}
    s = summarize(runs, [0, 1])
    assert s["topk"]["gap_to_dense_seeds"] == pytest.approx([0.3, 0.3]) and s["topk"]["vs_dense"] == "worse"
    assert s["recurrent"]["paper_comparison"]["seeds"] == pytest.approx([-0.4, -0.4])
    assert s["recurrent"]["train_loss_bpb"] == [2.5] and s["dense"]["val_bpb_std"] == pytest.approx(0.1 / 2 ** 0.5)
    assert s["topk"]["gap_to_dense_pooled_std"] == pytest.approx(0.1 / 2 ** 0.5)  # both arms' std 0.0707
    assert s["topk"]["gap_to_dense_std"] == pytest.approx(0.0)


def test_demo_quick_parallel_matches_sequential(text_dir, tmp_path):
    """--quick with two seeds in two processes: completes, and each (arm, seed) has the numbers of
    the same run in this process (same seed, same numbers, across processes)."""
    args = ["demo", "--quick", "--data", str(text_dir), "--variants", "dense,finegrained", "--steps", "3"]
    args += [a for a in TINY if a not in ("--seeds", "1", "--jobs")]
    par = run(args + ["--out", str(tmp_path / "p"), "--jobs", "2"])
    seq = run(args + ["--out", str(tmp_path / "s"), "--jobs", "1"])
    assert par["seeds"] == [0, 1] and par["jobs"] == 2
    strip = lambda rep: {v: {s: {k: x for k, x in r.items() if k not in TIMING_KEYS} for s, r in by.items()}
                         for v, by in rep["runs"].items()}
    assert strip(par) == strip(seq)
    fg = par["variants"]["finegrained"]
    gaps = [par["runs"]["finegrained"][s]["val_bpb"] - par["runs"]["dense"][s]["val_bpb"] for s in ("0", "1")]
    assert fg["gap_to_dense_seeds"] == gaps and fg["gap_to_dense"] == pytest.approx(sum(gaps) / 2)
    assert fg["gap_to_dense_std"] == pytest.approx(abs(gaps[0] - gaps[1]) / math.sqrt(2))


def test_demo_same_seed_same_numbers(full_run, text_dir, tmp_path):
    _, first = full_run
    again = run(["demo", "--data", str(text_dir), "--out", str(tmp_path / "b"), "--steps", "4"] + TINY)
    assert _numbers(again) == _numbers(first)
    other = run(["demo", "--data", str(text_dir), "--out", str(tmp_path / "c"), "--steps", "4",
                 "--seed", "1", "--variants", "dense,topk"] + TINY)
    assert other["variants"]["topk"]["val_bpb"] != first["variants"]["topk"]["val_bpb"]


def test_demo_resume_continues_exactly(full_run, text_dir, tmp_path):
    _, first = full_run
    args = ["demo", "--data", str(text_dir), "--out", str(tmp_path), "--steps", "4"] + TINY
    stopped = run(args + ["--stop-after", "2"])
    assert {r["stopped_at"] for r in stopped["stopped"].values()} == {2}
    assert not (tmp_path / "results.json").exists()
    resumed = run(args + ["--resume"])
    assert _numbers(resumed) == _numbers(first)
    again = run(args + ["--resume", "--variants", "topk"])  # finished: reused, not retrained
    assert again["runs"]["topk"] == resumed["runs"]["topk"]
    with pytest.raises(SystemExit, match="different config"):
        run(args[:-len(TINY)] + [a if a != "32" else "64" for a in TINY] + ["--resume"])


def test_demo_bad_arguments_name_the_argument(text_dir, tmp_path):
    base = ["demo", "--data", str(text_dir), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="unknown"):
        run(base + ["--variants", "dense,nope"])
    with pytest.raises(SystemExit, match="--steps: '0' is not an integer >= 1"):
        run(base + ["--steps", "0"])
    with pytest.raises(SystemExit, match="ffn_hidden=30 must be divisible"):
        run(base + ["--ffn-hidden", "30"])
    with pytest.raises(SystemExit, match="layers=5: mor's middle-cycle sharing"):
        run(base + ["--layers", "5"])
    with pytest.raises(SystemExit, match="--data"):
        run(["demo", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="seq_len=64"):  # 3 bytes of text: no window fits
        (tmp_path / "tiny.txt").write_text("abc")
        run(["demo", "--data", str(tmp_path / "tiny.txt"), "--out", str(tmp_path), "--seq-len", "64"])


# ---- bench ----------------------------------------------------------------------------------

def _fake_checkout(root: Path, sections: dict) -> Path:
    """A checkout root whose bench/ holds modules with run(quick) / format_table(rows)."""
    (root / "bench").mkdir(parents=True)
    (root / "bench" / "__init__.py").write_text("")
    for name, rows in sections.items():
        (root / "bench" / f"{name}.py").write_text(textwrap.dedent(f"""
            def run(quick=False):
                return [dict(r, quick=quick) for r in {rows!r}]

            def format_table(rows):
                return "bench.{name}: %d rows" % len(rows)
            """))
    return root


def test_bench_runs_each_module_in_the_checkout(monkeypatch, tmp_path, capfd):
    root = _fake_checkout(tmp_path / "checkout", dict(
        ops=[dict(op="grouped_mm", T=256, ours_ms=2.0, dense_ms=2.6, loop_ms=8.0)],
        layer=[dict(mode="fwd", moekit_ms=5.0, hf_gmm_ms=4.0)],
        fused=[dict(op="swiglu", ours_ms=1.0, baseline_ms=3.0)]))
    monkeypatch.setattr(cli, "checkout_root", lambda: root)
    sections = run(["bench", "--quick", "--out", str(tmp_path / "out")])
    out = capfd.readouterr().out
    assert "bench.ops: 1 rows" in out and "bench.layer: 1 rows" in out and "bench.fused: 1 rows" in out
    saved = json.loads((tmp_path / "out" / "bench_results.json").read_text())
    assert saved["quick"] and saved["sections"] == json.loads(json.dumps(sections))
    assert saved["sections"]["bench.ops"][0]["quick"] is True
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0
    assert plots.bench_speedups(sections["bench.ops"][0]) == pytest.approx(dict(dense=1.3, loop=4.0))
    assert plots.bench_speedups(sections["bench.layer"][0]) == pytest.approx(dict(hf_gmm=0.8))


def test_bench_failures_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "checkout_root", lambda: tmp_path)  # a wheel install: no bench/
    with pytest.raises(SystemExit, match="no bench/ folder"):
        run(["bench", "--quick", "--out", str(tmp_path / "out")])
    _fake_checkout(tmp_path, {})
    monkeypatch.setattr(cli, "BENCH_MODULES", ("bench.nope",))
    with pytest.raises(SystemExit, match="bench.nope failed with exit status 1"):
        run(["bench", "--quick", "--out", str(tmp_path / "out")])


def test_checkout_root_holds_the_benchmarks():
    assert (cli.checkout_root() / "moe" / "__init__.py").is_file()
    assert (cli.checkout_root() / "bench" / "ops.py").is_file()  # the tests run from a checkout


def test_bench_into_a_pipe_closed_after_one_line_exits_quietly(tmp_path):
    """`moe bench | head -1`: the reader leaves after the first header; neither the child that
    prints the table nor the parent prints a traceback, and the parent exits with 141."""
    root = _fake_checkout(tmp_path / "checkout", dict(ops=[dict(op="mm", ours_ms=2.0, base_ms=3.0)]))
    code = (f"from pathlib import Path; from moe.apps import cli; "
            f"cli.checkout_root = lambda: Path({str(root)!r}); cli.BENCH_MODULES = ('bench.ops',) * 2; "
            f"raise SystemExit(cli.main(['bench', '--quick', '--out', {str(tmp_path / 'out')!r}]))")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline() == "== bench.ops (quick)\n"
        p.stdout.close()
        err = p.stderr.read()
        assert p.wait(timeout=120) == 141 and "Traceback" not in err and "Exception" not in err, err
    finally:
        p.kill()
        p.wait()


def test_noise_cells_are_na_where_the_spread_means_nothing():
    full, short = dict(ours_ms=2.0, noise=0.123), dict(moekit_ms=plots.NOISE_MIN_MS / 2, noise=0.4)
    assert plots.noise_is_reliable(full, quick=False)
    assert not plots.noise_is_reliable(dict(full, noise=49.11), quick=True)  # the 4,911% of --quick
    assert not plots.noise_is_reliable(short, quick=False)
    assert plots.noise_is_reliable(dict(moekit_ms=plots.NOISE_MIN_MS), quick=False)
    # the benchmark modules format noise as {noise:>6.0%}: the rejected value keeps the column
    shown = plots.bench_rows_shown([full, short, dict(ours_ms=1.0)], quick=False)
    assert [f"{r['noise']:>6.0%}" for r in shown[:2]] == ["   12%", "   n/a"]
    assert f"{shown[1]['noise']:.0%}|{shown[1]['noise']:*^7}" == "n/a|    n/a"
    assert shown[0] is full and short["noise"] == 0.4 and "noise" not in shown[2]
    quick = plots.bench_rows_shown([full], quick=True)
    assert f"{quick[0]['noise']:>6.0%}" == "   n/a"
    saved = plots.bench_rows_saved([full, short, dict(ours_ms=1.0)], quick=False)
    assert saved == [full, dict(short, noise=None, noise_raw=0.4), dict(ours_ms=1.0)]


def test_bench_report_shows_na_noise_at_quick_sizes(monkeypatch, tmp_path, capfd):
    root = tmp_path / "checkout"
    (root / "bench").mkdir(parents=True)
    (root / "bench" / "__init__.py").write_text("")
    (root / "bench" / "ops.py").write_text(textwrap.dedent("""
        def run(quick=False):
            return [dict(op="mm", ours_ms=0.02 if quick else 2.0, base_ms=3.0,
                         noise=49.11 if quick else 0.05)]

        def format_table(rows):
            return "\\n".join(f"{r['op']:<4} {r['noise']:>6.0%}|" for r in rows)
        """))
    monkeypatch.setattr(cli, "checkout_root", lambda: root)
    monkeypatch.setattr(cli, "BENCH_MODULES", ("bench.ops",))
    quick = run(["bench", "--quick", "--out", str(tmp_path / "q")])
    out = capfd.readouterr().out
    assert "mm      n/a|" in out and "4911%" not in out and plots.NOISE_NOTE in out
    saved = json.loads((tmp_path / "q" / "bench_results.json").read_text())
    assert saved["sections"]["bench.ops"][0]["noise"] is None == quick["bench.ops"][0]["noise"]
    assert saved["sections"]["bench.ops"][0]["noise_raw"] == 49.11
    assert saved["noise_note"] == plots.NOISE_NOTE
    run(["bench", "--out", str(tmp_path / "full")])
    out = capfd.readouterr().out
    assert "mm       5%|" in out and "n/a" not in out
    saved = json.loads((tmp_path / "full" / "bench_results.json").read_text())
    assert saved["sections"]["bench.ops"][0]["noise"] == 0.05 and "noise_note" not in saved


def test_bench_chart_labels_lie_inside_the_saved_figure(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig

    def savefig(fig, path, **kw):  # the labels' extents as laid out, at the dpi of the PNG
        fig.set_dpi(kw.get("dpi", fig.dpi))
        fig.canvas.draw()
        renderer, ax = fig.canvas.get_renderer(), fig.axes[0]
        lo, hi = sorted(ax.get_xlim())
        x_ticks = [t for minor in (False, True) for x, t in zip(ax.get_xticks(minor=minor),
                                                                ax.get_xticklabels(minor=minor))
                   if lo <= x <= hi]  # the ones drawn: inside the view
        texts = ax.get_yticklabels() + x_ticks + [ax.title, ax.xaxis.label]
        boxes = {t.get_text(): t.get_window_extent(renderer) for t in texts if t.get_text()}
        saved.append((fig.bbox.frozen(), boxes, len(ax.get_yticklabels()), kw))
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    long_row = dict(op="grouped_mm_with_a_very_long_name", dtype="bfloat16", D=1024, F=1792, E=128,
                    K=8, mode="fwd+bwd", ours_ms=1.0, dense_ms=0.9, loop_ms=3.0)
    path = plots.bench_chart({"bench.ops": [long_row] * 3, "bench.layer": [dict(moekit_ms=1.0,
                                                                                 hf_gmm_ms=2.0)]},
                             tmp_path / "bench.png")
    assert path.stat().st_size > 0 and len(saved) == 1
    fig_box, boxes, n_bars, kw = saved[0]
    assert kw.get("bbox_inches") == "tight" and n_bars == 7
    assert any("grouped_mm_with_a_very_long_name" in t for t in boxes)
    for text, box in boxes.items():
        assert fig_box.x0 <= box.x0 and box.x1 <= fig_box.x1, text
        assert fig_box.y0 <= box.y0 and box.y1 <= fig_box.y1, text


# ---- the library does not import its applications ---------------------------------------------

def test_library_does_not_import_apps():
    p = subprocess.run([sys.executable, "-c", "import moe, routers, sys; "
                        "print([m for m in sys.modules if m.startswith('moe.apps')])"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr + p.stdout


def test_planner_aliases_are_deprecated():
    for name in ("PlanConfig", "efficiency_leverage", "optimal_granularity"):
        with pytest.warns(DeprecationWarning, match=f"moe.apps.planner.{name}"):
            assert getattr(moe, name) is globals()[name]
    assert not {"PlanConfig", "efficiency_leverage", "optimal_granularity"} & set(moe.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moe.nope
