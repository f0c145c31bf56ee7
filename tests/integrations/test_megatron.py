"""Megatron-Core integration (moe.integrations.megatron), tested on CPU.

Megatron needs a CPU shim (tests/integrations/megatron_shim.py) that patches torch.cuda and a few
Megatron functions, so no Megatron code runs in pytest's process: the cases
(tests/integrations/megatron_cases.py) run in three subprocesses, started together and bounded by
a timeout: one for the single-process cases, one for the checkpoint round trips (native Megatron
<-> moekit, torch.save and distributed checkpoints; the writer needs psutil) and one for expert
parallel 2 (which starts two gloo workers); each case is reported here as its own test. Skipped
when megatron-core is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES_PY = os.path.join(ROOT, "tests", "integrations", "megatron_cases.py")
TIMEOUT_S = int(os.environ.get("MOEKIT_MEGATRON_TIMEOUT", "300"))  # per group of cases

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None
                                or importlib.util.find_spec("megatron.core") is None,
                                reason="megatron-core is not installed (pip install moekit[megatron])")

# Importing the cases module defines the case table only: it imports neither megatron nor the
# shim's patches (install() runs in the subprocess).
from tests.integrations.megatron_cases import CASES  # noqa: E402

CHECKPOINT = [name for name in CASES if name.startswith("checkpoint_")]
SINGLE = [name for name in CASES if name != "ep2" and name not in CHECKPOINT]
GROUPS = {"single": SINGLE, "checkpoint": CHECKPOINT, "ep": ["ep2"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """Run the selected cases, in one subprocess per group -> {case: {"ok", "error"}}."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_megatron_case"}
    tmp = tmp_path_factory.mktemp("megatron")
    procs = {}
    for group, cases in GROUPS.items():
        cases = [c for c in cases if c in selected]
        if not cases:
            continue
        env = dict(os.environ, MOEKIT_MEGATRON_PORT=str(_free_port()), OMP_NUM_THREADS="1")
        out, log = tmp / f"{group}.json", open(tmp / f"{group}.log", "w")
        # own session: on timeout the whole group (the ep2 workers included) is killed
        procs[group] = (subprocess.Popen([sys.executable, CASES_PY, str(out), *cases], cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
                        cases, out, log)
    merged = {}
    for group, (proc, cases, out, log) in procs.items():
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        found = json.loads(out.read_text()) if out.exists() else {}
        tail = (tmp / f"{group}.log").read_text()[-4000:]
        missing = {"ok": False, "error": f"case did not run (exit code {proc.returncode}, limit {TIMEOUT_S} s); "
                                         f"log tail:\n{tail}"}
        merged.update({case: found.get(case, missing) for case in cases})
    return merged


@pytest.mark.parametrize("case", SINGLE + CHECKPOINT + GROUPS["ep"])
def test_megatron_case(results, case):
    """See tests/integrations/megatron_cases.py: forward+backward of a tiny GPTModel with each injection and
    both dispatchers, parity with Megatron's TopKRouter / SequentialMLP / GPT loss, the recurrent
    router across layers (with recompute), a DDP + finalize_model_grads step moving the expert
    bias, newer-version signatures and padding, Megatron's native checkpoint layouts both ways
    (SequentialMLP, GroupedMLP, the whole layer; torch.save and distributed checkpoints), and
    expert parallel 2 vs 1."""
    assert results[case]["ok"], results[case]["error"]


def test_import_moe_does_not_import_megatron():
    code = ("import json, sys, moe, moe.integrations;"
            "print(json.dumps([m for m in sys.modules if m.split('.')[0] == 'megatron']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120, capture_output=True,
                         text=True)
    bad = json.loads(out.stdout.strip().splitlines()[-1])
    assert not bad, bad


def test_shim_not_installed_here():
    import torch

    assert not getattr(torch.cuda, "_moekit_shim", False)
    assert torch.cuda.current_device.__module__ == "torch.cuda"


def test_library_never_uses_the_shim():
    for package in ("moe", "routers"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name)) as f:
                        assert "megatron_shim" not in f.read(), os.path.join(dirpath, name)
