"""moekit's compiled extension ``moe._C``: loading it, and what it holds.

Importing ``moe._C`` registers the C++ CPU and CUDA kernels of ``torch.ops.moe.*`` (schemas in
csrc/registration.cpp). Without it, or with ``MOE_DISABLE_EXTENSION=1``, every op runs its
pure-PyTorch twin through the same dispatcher entry (moe/ops/defs.py), logged once here. A
child forked from a process that imported moekit runs torch on one thread (see
``_one_thread_in_child``).
"""

from __future__ import annotations

import logging
import os

import torch  # (also loads libtorch, which moe._C links against)

__all__ = ["HAS_EXTENSION", "build_info", "host_cache_stats", "empty_host_cache"]

_log = logging.getLogger("moe.ops")


def _load():
    if os.environ.get("MOE_DISABLE_EXTENSION", "0") == "1":
        _log.warning("moekit: MOE_DISABLE_EXTENSION=1, using the pure-PyTorch ops")
        return None
    try:
        from moe import _C
    except ImportError as err:
        _log.warning("moekit: compiled ops unavailable (%s); using the pure-PyTorch ops", err)
        return None
    return _C


_C = _load()
HAS_EXTENSION = _C is not None


def _one_thread_in_child() -> None:
    """After ``os.fork()`` (``multiprocessing``'s "fork" context included), the child runs torch
    on one thread, as PyTorch's DataLoader workers do: GNU OpenMP's thread pool does not survive a
    fork, so a child that enters a parallel region of the parent's pool (any op on 2+ threads,
    a plain matmul too) waits forever for threads that do not exist. Raising the count again in
    the child (``torch.set_num_threads``) is safe only if the parent never ran a parallel op."""
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_in_child)


def host_cache_stats() -> dict:
    """Usage of the CPU kernels' buffer cache (csrc/host_cache.cpp): ``cached_bytes`` (freed
    output blocks kept for reuse), ``in_use_bytes`` (blocks held by live tensors), ``hits`` /
    ``misses`` (requests served from the cache / by a new allocation) and ``limit_bytes``
    (``MOE_HOST_CACHE_MB``, read once; 0 turns the cache off), the most ``cached_bytes`` reaches.
    Before a new block larger than every cached one, cached blocks are released until
    ``in_use_bytes + cached_bytes`` fits in the most ``in_use_bytes`` has been. All zero without
    the extension."""
    if _C is None:
        return dict(cached_bytes=0, in_use_bytes=0, hits=0, misses=0, limit_bytes=0)
    return _C.host_cache_stats()


def empty_host_cache() -> None:
    """Return every cached CPU buffer to the system (like ``torch.cuda.empty_cache()``)."""
    if _C is not None:
        _C.host_cache_clear()


def build_info() -> dict:
    """Which kernels the loaded ``moe._C`` holds: ``cuda`` (the CUDA kernels), ``sm90_gemm``
    (moekit's Hopper grouped GEMM, csrc/cuda/sm90) and the names of its forward and weight-gradient
    configurations by id (``sm90_forward_configs``, ``sm90_wgrad_configs``: the values that
    ``moe.ops.config.sm90_forward_config`` / ``sm90_wgrad_config`` take); ``cpu_gemm``, what the
    CPU grouped GEMMs run on this CPU under the current ``moe.ops.config.cpu_gemm``, by dtype
    ({"float32": "avx512" or "aten", "bfloat16": "avx512_bf16" or "aten"}; "aten" is at::mm, float32
    GEMMs under 64 in a dimension run there too); ``cpu_stream_rows``, the most rows of one
    expert (one tile) that the CPU forward GEMM reads the expert's weight rows in place for,
    instead of packing them, ``cpu_stream_rows_yx`` the same for weights stored (E, Y, X)
    (a transposed view of an nn.Linear-style weight) and ``cpu_stream_rows_deep`` for bfloat16
    weights whose packed panel of 64 columns (128 X bytes) exceeds a quarter of L2;
    ``cpu_l2_bytes``, this CPU's L2 per core as the kernels read it (sysconf; 1 MiB where the
    system does not say), which sizes the streamed path's column ranges.
    Without the extension: no kernels (cpu_gemm "twin" for both dtypes, the stream rows and
    cpu_l2_bytes 0)."""
    if _C is None:
        return dict(cuda=False, sm90_gemm=False, sm90_forward_configs=[], sm90_wgrad_configs=[],
                    cpu_gemm=dict(float32="twin", bfloat16="twin"), cpu_stream_rows=0, cpu_stream_rows_yx=0,
                    cpu_stream_rows_deep=0, cpu_l2_bytes=0)
    return _C.build_info()
