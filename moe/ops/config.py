"""``moe.ops.config``: the backend settings of moekit's kernels, one object.

The values live in the C++ side (csrc/config.h), which the kernels read at every call; each
setting's default is its environment variable. Without the compiled extension the settings are
kept here and have no effect (the twins have no backends).

    moe.ops.config.cuda_gemm = "native"          # moekit's WMMA kernels for every CUDA GEMM
    with moe.ops.config.override(cpu_gemm="aten"):
        ...                                       # at::mm inside, the previous value after

=====================  =========================  ==============================================
setting                environment default        values
=====================  =========================  ==============================================
cpu_gemm               MOE_CPU_GEMM               "auto" (AVX-512 kernels where the CPU has them),
                                                  "aten" (at::mm)
cuda_gemm              MOE_CUDA_GEMM              "auto", "native" (moekit's WMMA kernels),
                                                  "torch" (PyTorch's grouped GEMM where it serves),
                                                  "stream" (the weight-streaming decode kernel for
                                                  every forward GEMM it takes; "auto" runs it at
                                                  <= build_info()["cuda_stream_rows"] rows/expert)
sm90_forward_config    MOE_SM90_GEMM_CONFIG       "auto" (the size table) or a configuration id
sm90_wgrad_config      MOE_SM90_WGRAD_CONFIG      likewise, of the weight-gradient GEMM
sm90_gathered          MOE_SM90_GATHERED          "fused" (gather_grouped_mm[_swiglu|_wgrad] in
                                                  one sm90 launch: x_TD's rows read in place,
                                                  SwiGLU in the epilogue; grouped_mm_unpermute's
                                                  down projection with the routing weights in
                                                  its epilogue, stored token-major), "unfused"
                                                  (gather + GEMM, then swiglu; grouped_mm, then
                                                  unpermute), "auto" (= "unfused" until
                                                  the fused kernels have passed the GPU checks)
=====================  =========================  ==============================================

The ids are the positions in ``moe.ops.build_info()["sm90_forward_configs"]`` (and wgrad).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from moe.ops._extension import _C

__all__ = ["OpsConfig", "config"]

NAMES = ("cpu_gemm", "cuda_gemm", "sm90_forward_config", "sm90_wgrad_config", "sm90_gathered")


class OpsConfig:
    """Attribute access to the settings of the table above; a bad value raises ValueError."""

    def __init__(self) -> None:
        object.__setattr__(self, "_local", {})  # without the extension: the values set, unused

    def __getattr__(self, name: str) -> str:
        if name not in NAMES:
            raise AttributeError(f"moe.ops.config has no setting {name!r} (settings: {', '.join(NAMES)})")
        if _C is None:
            return self._local.get(name, "auto")
        try:
            return _C.config_get(name)
        except RuntimeError as err:  # an invalid environment variable
            raise ValueError(str(err)) from None

    def __setattr__(self, name: str, value) -> None:
        if name not in NAMES:
            raise AttributeError(f"moe.ops.config has no setting {name!r} (settings: {', '.join(NAMES)})")
        value = "" if value is None else str(value)
        if _C is None:
            if value:
                self._local[name] = value
            else:
                self._local.pop(name, None)
            return
        try:
            _C.config_set(name, value)
        except RuntimeError as err:
            raise ValueError(str(err)) from None

    def reset(self, name: str) -> None:
        """Back to the environment variable's value (or "auto" when it is unset)."""
        setattr(self, name, None)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in NAMES}

    def is_set(self, name: str) -> bool:
        """Whether ``name`` was set explicitly (else its environment variable decides)."""
        getattr(self, name)  # validates the name
        return name in self._local if _C is None else _C.config_is_set(name)

    @contextlib.contextmanager
    def override(self, **settings) -> Iterator["OpsConfig"]:
        """Sets ``settings`` inside the block; after it each setting is back to what it was
        (its explicit value, or its environment variable when it had none)."""
        before = {name: getattr(self, name) if self.is_set(name) else None for name in settings}
        try:
            for name, value in settings.items():
                setattr(self, name, value)
            yield self
        finally:
            for name, value in before.items():
                setattr(self, name, value)

    def __repr__(self) -> str:
        return f"moe.ops.config({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


config = OpsConfig()
