"""moe.apps robustness (issue 18 items 1, 2, 4, 5, 10; issues 16 and 19 on `moe plan`): `moe demo
--resume` is exact wherever Ctrl-C lands (in a step, between opt.step() and the step counter, in
the final evaluation); bad CLI arguments are one-line errors with exit status 2; --data refuses a
binary file; `moe plan` counts C without embeddings, derives it from --tokens, warns far outside
the law's fitted range; `moe plan --advise` ranks sparsity candidates within caps."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from moe.apps import cli, demo
from moe.apps.advice import REASONING_TPP, AdviceConfig, advise, candidates
from moe.apps.checks import arg_type, check
from moe.apps.data import load_corpus
from moe.apps.planner import (EL_FIT_COMPUTE, PlanConfig, compute_range_warning, efficiency_leverage,
                              size_model)

TINY = ["--dim", "16", "--layers", "4", "--heads", "2", "--ffn-hidden", "32", "--experts", "4",
        "--top-k", "2", "--seq-len", "16", "--batch", "4", "--eval-batches", "2", "--no-progress",
        "--steps", "4", "--seeds", "1", "--jobs", "1"]
TIMING_KEYS = {"tokens_per_s", "wall_time_s", "threads"}
VARIANTS = "topk,recurrent"  # a plain router and one with state across layers


@pytest.fixture(autouse=True)
def python_handles_sigint():
    """These tests send Ctrl-C. A pytest started as a background job (`cmd &`) inherits SIGINT
    ignored, and so would the demo's subprocesses; each test gets Python's own handler back (the
    subprocesses then start with the default one)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _demo_args(text_dir, out, *extra):
    return ["demo", "--data", str(text_dir), "--out", str(out), "--variants", VARIANTS, *TINY, *extra]


def _numbers(report: dict) -> dict:
    return {v: {k: x for k, x in r.items() if k not in TIMING_KEYS} for v, r in report["variants"].items()}


@pytest.fixture(scope="module")
def uninterrupted(text_dir, tmp_path_factory):
    return _numbers(cli.run(_demo_args(text_dir, tmp_path_factory.mktemp("whole"))))


@pytest.fixture
def after_opt_step():
    """Call action(n) after the n-th optimizer step of the test (1-based), through torch's global
    optimizer post-hook: the point between opt.step() and the demo's step counter."""
    handles = []

    def install(action):
        count = [0]

        def hook(opt, args, kwargs):
            count[0] += 1
            action(count[0])

        handles.append(register_optimizer_step_post_hook(hook))
        return count

    yield install
    for h in handles:
        h.remove()


def _checkpoint_steps(path):
    """(the demo's step counter, Adam's step count) of a checkpoint: equal in a consistent one."""
    state = torch.load(path, weights_only=False)
    adam = {int(v["step"]) for v in state["optim"]["state"].values()}
    assert len(adam) == 1
    return state["step"], adam.pop()


def test_ctrl_c_between_opt_step_and_counter_resumes_exactly(text_dir, tmp_path, uninterrupted,
                                                             after_opt_step):
    """A real SIGINT right after opt.step() of recurrent's 3rd step (topk's 4 come first): the
    step finishes, the checkpoint holds step 3 with Adam at step 3 (before: 136 vs 137), and
    --resume gives the uninterrupted run's numbers exactly."""
    after_opt_step(lambda n: n == 4 + 3 and os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(demo.DemoInterrupted, match=r"recurrent saved its checkpoint at step 3 of 4"):
        cli.run(_demo_args(text_dir, tmp_path))
    assert _checkpoint_steps(tmp_path / "checkpoints" / "seed0" / "recurrent.pt") == (3, 3)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert _numbers(cli.run(_demo_args(text_dir, tmp_path, "--resume"))) == uninterrupted


def test_hard_interrupt_mid_step_keeps_the_last_consistent_checkpoint(text_dir, tmp_path, uninterrupted,
                                                                      after_opt_step):
    """KeyboardInterrupt raised where it lands (a second Ctrl-C, or no signal handler off the main
    thread) after opt.step() of step 3: nothing half-done is saved; the periodic checkpoint of
    step 2 stays, the message says so, and the resume is exact."""
    def boom(n):
        if n == 3:
            raise KeyboardInterrupt

    after_opt_step(boom)
    with pytest.raises(demo.DemoInterrupted, match=r"during topk's training \(2 steps done\): its "
                                                   r"checkpoint holds step 2 of 4"):
        cli.run(_demo_args(text_dir, tmp_path, "--ckpt-every", "2"))
    assert _checkpoint_steps(tmp_path / "checkpoints" / "seed0" / "topk.pt") == (2, 2)
    assert _numbers(cli.run(_demo_args(text_dir, tmp_path, "--resume"))) == uninterrupted


def test_ctrl_c_during_final_evaluation_keeps_the_training(text_dir, tmp_path, uninterrupted,
                                                           monkeypatch, capsys, after_opt_step):
    """Ctrl-C in topk's final evaluation: the checkpoint of its last step is on disk, `moe demo`
    exits 130 saying so, and --resume only evaluates (no optimizer step) to the same numbers."""
    real_evaluate = demo.evaluate

    def interrupted_evaluate(model, batches):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "evaluate", interrupted_evaluate)
    assert cli.main(_demo_args(text_dir, tmp_path)) == 130
    err = capsys.readouterr().err
    assert "interrupted during topk's evaluation (4 steps done): its checkpoint holds step 4 of 4" in err
    assert "it only evaluates" in err and "Traceback" not in err
    assert _checkpoint_steps(tmp_path / "checkpoints" / "seed0" / "topk.pt") == (4, 4)
    monkeypatch.setattr(demo, "evaluate", real_evaluate)
    steps = after_opt_step(lambda n: None)
    resumed = cli.run(_demo_args(text_dir, tmp_path, "--resume", "--variants", "topk"))
    assert steps[0] == 0 and _numbers(resumed)["topk"] == uninterrupted["topk"]


def test_ctrl_c_with_runs_in_worker_processes_saves_each_and_resumes(text_dir, tmp_path):
    """`moe demo --jobs 2`: Ctrl-C to the whole process group (as a terminal sends it) while two
    runs train in workers: each saves its step, exit 130 saying what is saved, no traceback, and
    --resume finishes with the numbers of an uninterrupted run."""
    args = [sys.executable, "-m", "moe", *_demo_args(text_dir, tmp_path), "--jobs", "2", "--seeds", "2",
            "--variants", "dense,topk", "--steps", "100", "--ckpt-every", "10"]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    ckpts = tmp_path / "checkpoints"
    for _ in range(600):  # until both workers have trained past a checkpoint
        if len(list(ckpts.glob("seed*/*.pt"))) >= 2:
            break
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "Traceback" not in err and "saved its checkpoint at step" in err, err
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([a if a != str(tmp_path) else str(tmp_path / "whole") for a in args],
                           capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stderr
    strip = lambda rep: {v: {s: {k: x for k, x in r.items() if k not in TIMING_KEYS} for s, r in by.items()}
                         for v, by in rep["runs"].items()}
    assert strip(json.loads((tmp_path / "results.json").read_text())) == strip(
        json.loads((tmp_path / "whole" / "results.json").read_text()))


def test_sigint_is_deferred_only_where_python_handles_it():
    """Ctrl-C sets the flag and a second one raises; an ignored SIGINT (a background job) stays
    ignored; the previous handler comes back."""
    with demo.interrupts_between_steps() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupted()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with demo.interrupts_between_steps() as interrupted:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not interrupted()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous checkpoint whole and no partial file in its place."""
    path = tmp_path / "v.pt"
    demo._save(path, dict(step=1))

    def failing_save(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        demo._save(path, dict(step=2))
    assert torch.load(path)["step"] == 1


# ---- one-line errors, exit status 2 -----------------------------------------------------------

PLAN = ["plan", "--hidden", "256", "--layers", "2", "--experts", "8", "--top-k", "2"]


@pytest.mark.parametrize("argv,says", [
    (PLAN + ["--granularity", "inf"], "--granularity: 'inf' is not a finite number > 0"),
    (PLAN + ["--granularity", "1e-320"], "granularity=1e-320 gives expert_hidden"),
    (PLAN + ["--granularity", "2", "--ffn-hidden", "0"], "--ffn-hidden: '0' is not an integer >= 1"),
    (PLAN + ["--expert-hidden", "64", "--ffn-hidden", "-5"], "--ffn-hidden: '-5' is not an integer >= 1"),
    (PLAN + ["--expert-hidden", "64", "--shared-hidden", "-500"], "--shared-hidden: '-500' is not"),
    (PLAN + ["--expert-hidden", "64", "--compute", "inf"], "--compute: 'inf' is not a finite number > 0"),
    (PLAN + ["--expert-hidden", "64", "--compute", "1e21", "--tokens", "1e9"], "not allowed with"),
    (PLAN[:5], "required: --experts, --top-k, --expert-hidden or --granularity"),
    (PLAN[:5] + ["--advise"], "give exactly one of compute"),
    (PLAN + ["--advise", "--tokens", "1e9"], "--advise chooses --experts, --top-k itself"),
    (["demo", "--xmoe-threshold", "2"], "--xmoe-threshold: '2' is not a number in (0, 1]"),
    (["demo", "--lr", "nan"], "--lr: 'nan' is not a finite number > 0"),
    (["demo", "--lr", "-1"], "--lr: '-1' is not a finite number > 0"),
    (["demo", "--dim", "18", "--heads", "4"], "dim=18 must be a multiple of heads=4"),
    (["demo", "--threads", "-1"], "--threads: '-1' is not an integer >= 0"),
    (["demo", "--stop-after", "0"], "--stop-after: '0' is not an integer >= 1"),
])
def test_bad_argument_is_one_line_exit_2(argv, says, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"moe {argv[0]}: error: ") and says in captured.err, captured.err


def test_demo_out_pointing_at_a_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("x")
    for out in (f, f / "sub"):
        assert cli.main(["demo", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out: '{out}' is not a folder" in err and f"'{f}' is a file" in err


def test_python_m_moe_bad_argument_has_no_traceback():
    p = subprocess.run([sys.executable, "-m", "moe", *PLAN, "--granularity", "inf"],
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if not line.startswith("moekit: ")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr


def test_one_check_per_kind_for_configs_and_cli():
    """The config and the CLI apply the same rule: a ValueError naming the field, an argparse error."""
    for kind_name, bad in (("positive_int", 0), ("positive_int", True), ("nonnegative_int", -1),
                           ("positive_float", math.inf), ("positive_float", 1e-320 * 0),
                           ("probability", 1.5), ("probability", math.nan)):
        with pytest.raises(ValueError, match=f"^x={bad!r} must be"):
            check("x", bad, kind_name)
    assert check("x", 1e-320, "positive_float") == 1e-320 and arg_type("probability")("1") == 1.0
    with pytest.raises(ValueError, match="lr=nan must be a finite number > 0"):
        demo.DemoConfig(lr=math.nan)
    with pytest.raises(ValueError, match="shared_hidden=-500 must be an integer >= 1"):
        PlanConfig(hidden=8, layers=1, experts=2, top_k=1, expert_hidden=4, shared_hidden=-500)


# ---- --data: binary files ------------------------------------------------------------------

def test_data_refuses_a_binary_file_as_folders_skip_them(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("plain text " * 200)
    (tmp_path / "b.txt").write_text("more text " * 200)
    blob = tmp_path / "model.bin"
    blob.write_bytes(bytes(range(256)) * 8)
    assert load_corpus(str(tmp_path)).num_files == 2  # the folder skips model.bin
    with pytest.raises(ValueError, match="model.bin is a binary file"):
        load_corpus(str(blob))
    assert cli.main(["demo", "--data", str(blob), "--out", str(tmp_path / "o")]) == 2
    assert "is a binary file" in capsys.readouterr().err


# ---- plan: compute C as the EL law counts it ------------------------------------------------

def test_plan_derives_non_embedding_compute_from_tokens(capsys):
    D, L, E, K, S, F, V, T = 256, 2, 8, 2, 1, 64, 32000, 2048
    r = cli.run(PLAN + ["--expert-hidden", str(F), "--shared-experts", str(S), "--tokens", "1e12"])
    # M: 3 x (2 x the active non-embedding matmul weights + the attention scores 2 L T D)
    M = 3 * (2 * L * (4 * D * D + D * E + (K + S) * 3 * D * F) + 2 * L * T * D)
    assert r["flops_per_token_training_non_embedding"] == M
    assert r["flops_per_token_training"] - M == 3 * 2 * V * D  # the head, left out of C
    assert r["compute"] == pytest.approx(1e12 * M) and r["tokens"] == 1e12
    assert r["compute_source"].startswith("--tokens x non-embedding")
    assert r["efficiency_leverage"] == pytest.approx(efficiency_leverage(
        (K + S) / (E + S), 2 * D / F, 1e12 * M))
    out = capsys.readouterr().out
    assert "--tokens x non-embedding training FLOPs/token" in out and "1T tokens" in out
    given = cli.run(PLAN + ["--expert-hidden", str(F), "--compute", "3e19"])
    assert given["compute"] == 3e19 and given["compute_source"] == "--compute"
    assert given["tokens"] == pytest.approx(3e19 / given["flops_per_token_training_non_embedding"])


def test_plan_warns_far_outside_the_fitted_compute(capsys):
    lo, hi = EL_FIT_COMPUTE
    assert compute_range_warning(lo) is None and compute_range_warning(hi * 10) is None
    assert "below" in compute_range_warning(lo / 11) and "above" in compute_range_warning(hi * 11)
    cli.run(PLAN + ["--expert-hidden", "64", "--compute", "1e19"])
    assert "warning" not in capsys.readouterr().out
    r = cli.run(PLAN + ["--expert-hidden", "64", "--compute", "1e25"])
    assert "warning: C = 1e+25 FLOPs is 3.33e+04x above" in capsys.readouterr().out
    assert r["compute_warning"].startswith("C = 1e+25")
    assert cli.main(PLAN + ["--expert-hidden", "64", "--compute", "1e25", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["compute_warning"] and "moe plan: warning" in captured.err


# ---- plan --advise: sparsity candidates ranked by EL -------------------------------------------

def test_advice_ranks_candidates_within_caps():
    cfg = AdviceConfig(hidden=1024, layers=12, tokens=1e11, max_params=2e10, max_memory_gib=100, top=500)
    a = advise(cfg)
    ranked = a["ranked"]
    assert 0 < len(ranked) == a["candidates_within_caps"] < a["candidates_considered"]
    els = [r["efficiency_leverage"] for r in ranked]
    assert els == sorted(els, reverse=True)
    for r in ranked:
        assert (r["top_k"] + r["shared_experts"]) * r["expert_hidden"] == 4 * 1024  # equal active width
        assert r["params_total"] <= 2e10 and r["memory_training_state_bytes"] <= 100 * 2**30
        assert r["efficiency_leverage"] == pytest.approx(efficiency_leverage(
            r["activation_ratio"], 2 * 1024 / r["expert_hidden"], r["compute"]))
        assert r["reasoning_caution"] == (r["tokens"] / r["params_total"] < REASONING_TPP)
    # the cap binds: some candidate outside it leverages more than the best inside
    everyone = [size_model(c) for c in candidates(cfg)]
    assert max(r["efficiency_leverage"] for r in everyone) > els[0]
    assert {r["reasoning_caution"] for r in ranked} == {True, False}  # 1e11 tokens: TPP 10 to 1000s


def test_plan_advise_cli_text_and_json(capsys):
    argv = ["plan", "--advise", "--hidden", "1024", "--layers", "12", "--tokens", "2e11",
            "--max-params", "3e9", "--top", "5"]
    a = cli.run(argv)
    out = capsys.readouterr().out
    assert len(a["ranked"]) == 5 and "ranked by EL" in out and out.count("\n") >= 7
    assert ("reasoning caution" in out) == any(r["reasoning_caution"] for r in a["ranked"])
    assert cli.main(argv + ["--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["ranked"] == json.loads(json.dumps(a["ranked"]))
    assert saved["config"]["max_params"] == 3e9 and saved["reasoning_tpp"] == REASONING_TPP
