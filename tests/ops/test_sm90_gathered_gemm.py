"""The layout claims of moekit's gathered sm90 GEMM (csrc/cuda/sm90/gathered_gemm.cuh), checked on
the CPU: tests/cpp/sm90_gathered_gemm.cu, compiled with nvcc against CUTLASS's headers as a host program,
evaluates the kernel's own CuTe layouts. B's shared-memory layout must be the order in which the TMA
box writes its two halves (with SwiGLU an expert's gate and up columns) under the 128-byte swizzle,
each thread's accumulators must pair a column of one half with the same column of the other (the
SwiGLU epilogue's reading), and the persistent CTAs' tiles must
cover every routed row and column block once (random routings). The kernel itself runs only on an sm90
GPU (tests/gpu/test_gpu.py); a wrong layout there would be a wrong answer, not an error. Skipped
where nvcc or CUTLASS's headers are absent."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cutlass_include():
    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    spec = importlib.util.find_spec("cutlass_library")
    candidates = ([env] if env else []) + [os.path.join(loc, "source", "include")
                                           for loc in ((spec.submodule_search_locations or []) if spec else [])]
    return next((c for c in candidates if os.path.exists(os.path.join(c, "cute", "tensor.hpp"))), None)


def test_sm90_gathered_gemm_layouts_and_tiles(tmp_path):
    nvcc, cutlass = _nvcc(), _cutlass_include()
    if nvcc is None or cutlass is None:
        pytest.skip("needs nvcc and CUTLASS's headers (pip install nvidia-cutlass)")
    exe = str(tmp_path / "sm90_gathered_gemm")
    build = subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-I", os.path.join(ROOT, "csrc"),
                            "-I", cutlass, os.path.join(ROOT, "tests", "cpp", "sm90_gathered_gemm.cu"), "-o", exe],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "row-major b 0, b_col 0, wgrad 0, tiles 0" in run.stdout, run.stdout + run.stderr
