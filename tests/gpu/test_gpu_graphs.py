"""CUDA graphs of moe.MoELayer's whole training step (router with aux losses, dispatch, experts,
combine; forward, loss = y.square().mean() + moe.collect_aux_losses(layer), backward): captured by hand
(torch.cuda.CUDAGraph, PyTorch's whole-network recipe), through
torch.cuda.make_graphed_callables, and compiled with torch.compile(mode="reduce-overhead").

Shape legend: B sequences, S tokens per sequence, D hidden size, F expert hidden size, E experts,
K slots.

Every test is marked ``gpu`` and skips cleanly without a CUDA device (checked when a test runs,
never at import).

Why the graph tests ask for eager's gradients bit for bit: a replay runs the kernels eager ran,
with the same launch configurations, on the same values, and every kernel of this step fixes its
summation order (the plan's histogram has integer atomics only; CUB's radix sort; the GEMMs of
cuBLAS, CUTLASS and moekit without split-K atomics; PyTorch's reductions; the balance loss's float
scatter_add adds ones; the gather backward's scatter meets each (t, e) once, since top-k ids are
distinct). A tolerance would hide the failure these tests exist to catch: a replay that used
the capture's routing, or stale buffers, for a few tokens. The check is
|graph - eager| <= 2 x |eager - eager again|: exact wherever eager is reproducible, and still a
fair test on a device where some kernel is not. torch.compile runs other kernels (inductor's
fusions, float32 inside), so it is held to the 2x-error rule against a float64 copy instead.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moe
from moe import ops

pytestmark = pytest.mark.gpu

B, S, D, F, E, K = 2, 48, 64, 96, 16, 4
CONFIGS = {
    "topk": {},  # softmax top-k, Switch balance loss
    "shared": dict(num_shared_experts=1),
    "capacity": dict(capacity_factor=1.0),  # drops: empty slots (-1) and padding rows
    "deepseek": dict(num_shared_experts=1, router_kwargs=dict(
        score="sigmoid", num_groups=4, topk_groups=2, expert_bias=True, balance_loss="seq", z_loss_coeff=1e-3)),
}


@pytest.fixture(autouse=True)
def _cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert ops.HAS_EXTENSION, "moe._C did not load: build it with MOE_BUILD_CUDA=1"


def _layer(config: str, **kwargs) -> moe.MoELayer:
    torch.manual_seed(0)
    layer = moe.MoELayer(D, F, E, K, **CONFIGS[config], **kwargs).cuda().bfloat16()
    if layer.router.expert_bias is not None:  # a nonzero bias, so that it changes the choice
        with torch.no_grad():
            layer.router.expert_bias.uniform_(-0.05, 0.05)
    return layer


def _inputs(n: int) -> list[torch.Tensor]:
    return [torch.randn(B, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(n)]


def _train_step(layer, x, *, zero: bool = True):
    if zero:
        layer.zero_grad(set_to_none=True)
    y = layer(x)
    loss = y.square().mean() + moe.collect_aux_losses(layer)
    loss.backward()
    return y, loss


def _state(layer, y, loss) -> dict:
    """What a step produced: y, the loss, the routing, every parameter's gradient (not copied)."""
    return {"y": y, "loss": loss, "ids_TK": layer.last_routing.ids_TK,
            **{n: p.grad for n, p in layer.named_parameters()}}


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _assert_replays(got: dict, eager: dict, again: dict, what: str) -> None:
    """|got - eager| <= 2 x |eager again - eager| for every entry: exact where eager is
    reproducible (the module docstring says why)."""
    assert got.keys() == eager.keys()
    for k in eager:
        g, want = got[k].detach().double(), eager[k].double()
        spread = (again[k].double() - want).abs().max().item()
        err = (g - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= 2 * spread, (f"{what}: {k} differs from eager by {err:.3g} (|eager| up to {scale:.3g}), "
                                   f"more than 2x eager's own run-to-run spread {spread:.3g}")


def _eager_twice(step, xs) -> tuple[list, list]:
    """Each input's eager result, and each again after the others (the run-to-run spread)."""
    first = [step(x) for x in xs]
    return first, [step(x) for x in xs]


def _capture_step(layer, static_x, warmup: int = 3):
    """PyTorch's whole-network capture: warm-up steps on a side stream, .grad set to None, one
    step captured; its backward allocates .grad in the graph's pool and each replay rewrites them."""
    moe.release_step(layer)  # eager steps ran on the default stream (moe.layer's docstring)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            _train_step(layer, static_x)
    torch.cuda.current_stream().wait_stream(stream)
    layer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y, loss = _train_step(layer, static_x, zero=False)
    return graph, _state(layer, y, loss)  # the graph's own tensors, rewritten by each replay


@pytest.mark.parametrize("config,backend", [  # MOE_CUDA_GEMM: auto (moekit's sm90 GEMM where built),
    ("topk", "auto"), ("topk", "native"), ("topk", "torch"),  # native (WMMA), torch (PyTorch's CUTLASS)
    ("shared", "auto"), ("capacity", "auto"), ("deepseek", "auto"), ("deepseek", "native"), ("deepseek", "torch")])
def test_training_step_captured_in_a_cuda_graph_replays_eager_gradients(config, backend, monkeypatch):
    """The whole training step in one CUDA graph, replayed on new tokens (so new routing): y, the
    loss, the routing and every gradient equal eager's."""
    monkeypatch.setattr(moe.ops.config, "cuda_gemm", backend)  # set, then reset by monkeypatch
    layer = _layer(config)
    xs = _inputs(3)
    eager, again = _eager_twice(lambda x: _clone(_state(layer, *_train_step(layer, x))), xs[:2])
    assert not torch.equal(eager[0]["ids_TK"], eager[1]["ids_TK"])
    if config == "capacity":
        assert (eager[0]["ids_TK"] < 0).any(), "capacity 1.0 should drop some slots here"
    static_x = xs[2].clone()  # captured on other tokens than any replay
    graph, static = _capture_step(layer, static_x)
    for i in (0, 1, 0):
        static_x.copy_(xs[i])
        graph.replay()
        _assert_replays(static, eager[i], again[i], f"{config}/{backend} replay on input {i}")


@pytest.mark.parametrize("config", ["shared", "deepseek"])
def test_make_graphed_callables_with_returned_aux_loss(config):
    """torch.cuda.make_graphed_callables on the layer itself. It replays only what forward
    returns, so the layer returns its aux loss (return_aux_loss=True) and keeps none on the
    module; gradients of x, of every parameter (the router's through the aux loss too) are
    eager's."""
    layer = _layer(config, return_aux_loss=True)

    def step(fn):
        def run(x):
            layer.zero_grad(set_to_none=True)
            x = x.detach().clone().requires_grad_()
            y, aux = fn(x)
            (y.square().mean() + aux).backward()
            assert layer.aux_losses == {} and float(moe.collect_aux_losses(layer)) == 0.0
            return _clone({"y": y, "aux": aux, "x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}})
        return run

    xs = _inputs(2)
    eager, again = _eager_twice(step(layer), xs)
    sample = torch.randn(B, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    moe.release_step(layer)  # last_routing from the eager steps (moe.layer's docstring)
    graphed = torch.cuda.make_graphed_callables(layer, (sample,))
    assert graphed is layer  # a module comes back with its forward replaced
    for i in (0, 1, 0):
        _assert_replays(step(graphed)(xs[i]), eager[i], again[i], f"{config} graphed, input {i}")


def _two_x_rule(got, ref64, same_dtype, what: str) -> None:
    """FlashAttention's rule: error vs float64 at most 2x the same-dtype eager error (+ eps)."""
    err = (got.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    assert err <= 2 * base + torch.finfo(got.dtype).eps * scale + 1e-12, (what, err, base)


@pytest.mark.slow
def test_torch_compile_reduce_overhead_training_step_matches_eager():
    """torch.compile(layer, mode="reduce-overhead") (inductor + CUDA graph trees): forward and
    backward, over warm-up, recording and replays on alternating inputs, against float64; and
    inductor did not skip the CUDA graphs (the reason is in the captured log if it did)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = _layer("shared")
    ref = copy.deepcopy(layer).double()

    def step(fn, module, x):
        """y and the gradients (not the loss: one bf16-rounded scalar, where either rounding can
        be the closer one; y and the gradients carry the check)."""
        module.zero_grad(set_to_none=True)
        y = fn(x)
        (y.square().mean() + moe.collect_aux_losses(module)).backward()
        return _clone({"y": y, **{n: p.grad for n, p in module.named_parameters()}})

    xs = _inputs(2)
    eager = [step(layer, layer, x) for x in xs]
    ref64 = [step(ref, ref, x.double()) for x in xs]
    moe.release_step(layer)
    compiled = torch.compile(layer, mode="reduce-overhead")
    torch._logging.set_logs(cudagraphs=True)  # a skipped graph says why (captured stderr)
    try:
        for n, i in enumerate((0, 1, 0, 1, 0)):  # cudagraph trees: warm-up, record, then replays
            torch.compiler.cudagraph_mark_step_begin()
            got = step(compiled, layer, xs[i])
            for k in got:
                _two_x_rule(got[k], ref64[i][k], eager[i][k], f"call {n}, input {i}: {k}")
    finally:
        torch._logging.set_logs()
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor ran without CUDA graphs"
