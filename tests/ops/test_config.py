"""moe.ops.config: the backend settings, one object, read by the C++ side (csrc/config.h), with
the MOE_* environment variables as defaults. The settings' effect on the kernels is tested where
the kernels are (tests/cpu_kernels, tests/gpu); here: names, values, validation, override, the
environment default, and that the C++ side really reads what Python sets."""

from __future__ import annotations

import pytest
import torch

from moe import ops
from moe.ops.config import NAMES

from tests.helpers.cpu_kernels import run_json

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")


@needs_ext
def test_the_python_and_cpp_tables_name_the_same_settings():
    assert tuple(ops._extension._C.config_names()) == NAMES


def test_defaults_set_reset_and_validation(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv({"cpu_gemm": "MOE_CPU_GEMM", "cuda_gemm": "MOE_CUDA_GEMM",
                            "sm90_forward_config": "MOE_SM90_GEMM_CONFIG",
                            "sm90_wgrad_config": "MOE_SM90_WGRAD_CONFIG",
                            "sm90_gathered": "MOE_SM90_GATHERED"}[name], raising=False)
        assert not ops.config.is_set(name) and getattr(ops.config, name) == "auto"
    with ops.config.override(cuda_gemm="native", cpu_gemm="aten"):
        assert ops.config.cuda_gemm == "native" and ops.config.cpu_gemm == "aten"
        assert ops.config.is_set("cuda_gemm")
    assert not ops.config.is_set("cuda_gemm") and ops.config.cuda_gemm == "auto"
    ops.config.cuda_gemm = "torch"
    try:
        with ops.config.override(cuda_gemm="native"):
            pass
        assert ops.config.cuda_gemm == "torch" and ops.config.is_set("cuda_gemm")  # explicit value restored
    finally:
        ops.config.reset("cuda_gemm")
    assert not ops.config.is_set("cuda_gemm")
    with pytest.raises(AttributeError, match="cuda_gem"):
        ops.config.cuda_gem = "native"
    with pytest.raises(AttributeError, match="no setting"):
        with ops.config.override(cpu_gem="aten"):
            pass
    if ops.HAS_EXTENSION:
        for value in ("auto", "native", "torch", "stream"):  # every backend the C++ table takes
            with ops.config.override(cuda_gemm=value):
                assert ops.config.cuda_gemm == value
        assert ops.build_info()["cuda_stream_rows"] == 4  # "auto" streams at <= 4 rows per expert
        with pytest.raises(ValueError, match="cuda_gemm.*'fast'"):
            ops.config.cuda_gemm = "fast"
        with pytest.raises(ValueError, match="sm90_forward_config"):
            ops.config.sm90_forward_config = 10 ** 6
        for value in ("auto", "fused", "unfused"):
            with ops.config.override(sm90_gathered=value):
                assert ops.config.sm90_gathered == value
        with pytest.raises(ValueError, match="sm90_gathered.*'on'"):
            ops.config.sm90_gathered = "on"
        assert not ops.config.is_set("cuda_gemm") and not ops.config.is_set("sm90_forward_config")
    assert "cpu_gemm=" in repr(ops.config)


@needs_ext
def test_environment_is_the_default_and_a_bad_value_names_the_variable():
    out = run_json("""
    import json, os, torch
    from moe import ops
    got = dict(env=ops.config.cpu_gemm, explicit=None, bad=None)
    ops.config.cpu_gemm = "auto"
    got["explicit"] = ops.config.cpu_gemm  # an explicit value wins over the variable
    ops.config.reset("cpu_gemm")
    os.environ["MOE_CPU_GEMM"] = "avx"
    try:
        ops.config.cpu_gemm
    except ValueError as err:
        got["bad"] = str(err)
    print(json.dumps(got))
    """, MOE_CPU_GEMM="aten")
    assert out["env"] == "aten" and out["explicit"] == "auto"
    assert "MOE_CPU_GEMM" in out["bad"] and "'avx'" in out["bad"]


@needs_ext
def test_cpu_gemm_setting_reaches_the_kernels():
    """cpu_gemm="aten" makes the bfloat16 grouped GEMM at::mm per expert, bit for bit (the AVX-512
    kernel sums in another order, so on a machine that has it the two differ somewhere)."""
    torch.manual_seed(0)
    a = torch.randn(300, 96, dtype=torch.bfloat16)
    b = torch.randn(3, 96, 80, dtype=torch.bfloat16)
    offs = torch.tensor([100, 150, 300], dtype=torch.int32)
    bounds = [0, 100, 150, 300]
    per_expert_mm = torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])
    with ops.config.override(cpu_gemm="aten"):
        assert torch.equal(ops.grouped_mm(a, b, offs), per_expert_mm)
