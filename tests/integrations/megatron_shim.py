"""TEST-ONLY shim that lets megatron-core 0.16.1 run on a CPU-only machine (no CUDA, no
Transformer Engine). It is never imported by the library: only
tests/integrations/megatron_cases.py calls ``install()``, and tests/integrations/test_megatron.py
runs those cases in subprocesses of their own, so these patches touch nothing else.

Each patch fixes one thing Megatron-Core does even with ``use_cpu_initialization=True``:

1. ``torch.cuda.current_device()`` -> ``torch.device("cpu")``: Megatron uses it as the device of
   buffers (memory buffer, expert-bias buffers, all-to-all outputs, router weights).
2. ``torch.cuda.Stream`` / ``Event`` / ``current_stream`` / ``stream(...)`` / ``synchronize`` ->
   no-op stand-ins: the all-to-all dispatcher copies split sizes device-to-host on a side stream,
   the distributed-checkpoint writer synchronizes before it copies tensors to the host.
3. The CUDA RNG tracker runs on the CPU generator: ``torch.cuda.get_rng_state`` /
   ``manual_seed`` and Megatron's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` use the CPU
   RNG, so ``tracker.fork()`` still forks and restores a real state.
4. ``get_default_causal_mask`` (hard-coded ``device="cuda"``) builds the mask on the CPU.
5. ``moe_utils.te_general_gemm = None``: without TE the name is never bound and every
   TopKRouter forward raises NameError; ``None`` selects Megatron's own torch.mm path.
6. ``megatron.core.utils._te_version = Version("0")``: without TE ``is_te_min_version`` compares
   None with a Version (TypeError); "version 0" makes every TE feature check answer False.
   (Only inference, fp8/fp4 and CUDA-graph paths ask; no current case does, the patch keeps a
   new case on those paths from failing for this reason.)
7. ``torch.distributed.all_to_all_single``: gloo needs the split sizes as a list, Megatron passes
   CPU tensors (on GPU it would have numpy arrays); converted with ``.tolist()``.
8. ``grouped_gemm_util``: Megatron's (legacy) GroupedMLP needs the ``grouped_gemm`` CUDA package;
   ``gg.ops.gmm`` becomes :func:`_gmm`, one ``torch.mm`` per expert group (autograd through
   PyTorch), so GroupedMLP's own weights, layout and forward run on the CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


class _NoStream:
    """Stand-in for torch.cuda.Stream / Event on a CPU run: every operation is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoStream)

    def __hash__(self):
        return 0


def _split_list(sizes):
    if sizes is None or isinstance(sizes, list):
        return sizes
    return [int(s) for s in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)]


def _gmm(a, b, batch_sizes, trans_b=False):
    """grouped_gemm.ops.gmm on the CPU: rows of ``a`` (N, X) in groups of ``batch_sizes`` (E,)
    times ``b[e]`` (E, X, Y) (``b[e].T`` with trans_b) -> (N, Y)."""
    parts = torch.split(a, [int(n) for n in batch_sizes])
    return torch.cat([p @ (b[e].t() if trans_b else b[e]) for e, p in enumerate(parts)])


class _GroupedGemmOps:
    gmm = staticmethod(_gmm)


def install() -> None:
    """Apply patches 1-8 (idempotent). Call before building any Megatron module."""
    if getattr(torch.cuda, "_moekit_shim", False):
        return
    import packaging.version

    import megatron.core.utils as mcore_utils
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.moe import moe_utils

    cpu = torch.device("cpu")
    # 1. device queries
    torch.cuda.current_device = lambda: cpu
    # 2. streams and events
    no_stream = _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *a, **k: no_stream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    # 3. RNG tracker on the CPU generator
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # 4. causal mask on the CPU
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tutils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask
    # 5. router GEMM without TE
    moe_utils.te_general_gemm = None
    # 6. TE version checks without TE
    mcore_utils._te_version = packaging.version.Version("0")
    # 7. gloo all_to_all_single with list split sizes
    a2a = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        return a2a(output, input, _split_list(output_split_sizes), _split_list(input_split_sizes), **kwargs)

    dist.all_to_all_single = all_to_all_single
    # 8. GroupedMLP's grouped GEMM
    from megatron.core.transformer.moe import grouped_gemm_util

    grouped_gemm_util.grouped_gemm = grouped_gemm_util.ops = _GroupedGemmOps
    torch.cuda._moekit_shim = True


def init_distributed(rank: int = 0, world_size: int = 1, *, port: int, ep: int = 1) -> None:
    """gloo process group + Megatron's parallel state (TP=PP=1, expert parallel ``ep``) and the
    model-parallel RNG tracker seeded with 1234 (CPU generator, see patch 3)."""
    install()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)
