"""Tests for moe.ops beyond the numbers: bad input raises an error naming the argument (on the
compiled kernels, the twins' fallback and the fake kernels alike), the fallback to the PyTorch
twins without the extension, and torch.compile(fullgraph=True).

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim,
X/Y GEMM input/output dims.
"""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moe import ops
from moe.ops.twins import plan_torch
from tests.helpers.ops import META, cpu_redispatch

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

T, K, E, D, Y = 5, 2, 4, 3, 6
IDS = torch.tensor([[0, 1], [3, -1], [2, 2], [-1, -1], [1, 0]])
P = ops.plan(IDS, E)
N = T * K
OFFS = P.offs_E
i32 = dict(dtype=torch.int32)


def x_(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# (case id, call, argument the message must name). Every call goes through the public API.
PLAN_CASES = [
    ("id_too_large", lambda plan: plan(IDS + E, E), "ids_TK"),
    ("id_below_minus_one", lambda plan: plan(IDS.clamp(min=-1) - 1, E), "ids_TK"),
    ("float_ids", lambda plan: plan(IDS.float(), E), "ids_TK"),
    ("ids_rank_1", lambda plan: plan(IDS[0], E), "ids_TK"),
    ("ids_rank_3", lambda plan: plan(IDS[None], E), "ids_TK"),
    ("zero_experts", lambda plan: plan(IDS.clamp(max=-1), 0), "num_experts"),
]

OP_CASES = [
    ("permute_x_rank", lambda: ops.permute(x_(D), P), "x_TD"),
    ("permute_x_int", lambda: ops.permute(torch.ones(T, D, dtype=torch.long), P), "x_TD"),
    ("permute_x_rows", lambda: ops.permute(x_(T + 1, D), P), "x_TD"),
    ("permute_scale_shape", lambda: ops.permute(x_(T, D), P, x_(T, K + 1)), "scale_TK"),
    ("permute_scale_dtype", lambda: ops.permute(x_(T, D), P, x_(T, K, dtype=torch.float64)), "scale_TK"),
    ("permute_not_a_plan", lambda: ops.permute(x_(T, D), tuple(ops.plan(IDS, E).__dict__.values())), "plan"),
    ("permute_stale_plan", lambda: torch.ops.moe.permute(x_(T, D), P.order_N + N, P.rows_TK), "order_N"),
    ("unpermute_y_rank", lambda: ops.unpermute(x_(N), P), "y_ND"),
    ("unpermute_y_rows", lambda: ops.unpermute(x_(T, D), P), "y_ND"),
    ("unpermute_weights_shape", lambda: ops.unpermute(x_(N, D), P, x_(K, T)), "weights_TK"),
    ("unpermute_weights_dtype", lambda: ops.unpermute(x_(N, D), P, x_(T, K, dtype=torch.float64)), "weights_TK"),
    ("unpermute_weights_rank", lambda: ops.unpermute(x_(N, D), P, x_(T * K)), "weights_TK"),
    ("unpermute_stale_plan", lambda: torch.ops.moe.unpermute(x_(N, D), P.order_N, P.rows_TK + N), "rows_TK"),
    ("uwgrad_width", lambda: torch.ops.moe.unpermute_weights_grad(x_(T, D), x_(N, D + 1), P.order_N, P.rows_TK), "grad_TD"),
    ("uwgrad_dtype", lambda: torch.ops.moe.unpermute_weights_grad(x_(T, D, dtype=torch.float64), x_(N, D), P.order_N, P.rows_TK), "grad_TD"),
    ("gmm_a_rank", lambda: ops.grouped_mm(x_(N), x_(E, D, Y), OFFS), "a_NX"),
    ("gmm_a_int", lambda: ops.grouped_mm(torch.ones(N, D, dtype=torch.long), x_(E, D, Y), OFFS), "a_NX"),
    ("gmm_b_rank", lambda: ops.grouped_mm(x_(N, D), x_(D, Y), OFFS), "b_EXY"),
    ("gmm_dtype_mismatch", lambda: ops.grouped_mm(x_(N, D), x_(E, D, Y, dtype=torch.float64), OFFS), "b_EXY"),
    ("gmm_inner_dim", lambda: ops.grouped_mm(x_(N, D), x_(E, D + 1, Y), OFFS), "b_EXY"),
    ("gmm_offs_int64", lambda: ops.grouped_mm(x_(N, D), x_(E, D, Y), OFFS.long()), "offs_E"),
    ("gmm_offs_rank", lambda: ops.grouped_mm(x_(N, D), x_(E, D, Y), OFFS[None]), "offs_E"),
    ("gmm_offs_len", lambda: ops.grouped_mm(x_(N, D), x_(E + 1, D, Y), OFFS), "offs_E"),
    ("gmm_offs_not_monotone", lambda: ops.grouped_mm(x_(N, D), x_(E, D, Y), torch.tensor([3, 2, 5, 6], **i32)), "offs_E"),
    ("gmm_offs_negative", lambda: ops.grouped_mm(x_(N, D), x_(E, D, Y), torch.tensor([-1, 2, 5, 6], **i32)), "offs_E"),
    ("gmm_offs_past_rows", lambda: ops.grouped_mm(x_(N, D), x_(E, D, Y), torch.tensor([3, 4, 5, N + 1], **i32)), "offs_E"),
    ("wgrad_rows", lambda: torch.ops.moe.grouped_mm_wgrad(x_(N, D), x_(N - 1, Y), OFFS), "g_NY"),
    ("wgrad_dtype", lambda: torch.ops.moe.grouped_mm_wgrad(x_(N, D), x_(N, Y, dtype=torch.float64), OFFS), "g_NY"),
    ("wgrad_offs_not_monotone", lambda: torch.ops.moe.grouped_mm_wgrad(x_(N, D), x_(N, Y), torch.tensor([3, 2, 5, 6], **i32)), "offs_E"),
    ("wgrad_offs_past_rows", lambda: torch.ops.moe.grouped_mm_wgrad(x_(N, D), x_(N, Y), torch.tensor([3, 4, 5, N + 1], **i32)), "offs_E"),
    ("wgrad_g_rank", lambda: torch.ops.moe.grouped_mm_wgrad(x_(N, D), x_(N, Y, 1), OFFS), "g_NY"),
    ("uwgrad_y_rank", lambda: torch.ops.moe.unpermute_weights_grad(x_(T, D), x_(N, D, 1), P.order_N, P.rows_TK), "y_ND"),
    ("uwgrad_grad_rows", lambda: torch.ops.moe.unpermute_weights_grad(x_(T + 1, D), x_(N, D), P.order_N, P.rows_TK), "grad_TD"),
    ("permute_order_dtype", lambda: torch.ops.moe.permute(x_(T, D), P.order_N.int(), P.rows_TK), "order_N"),
    ("permute_rows_rank", lambda: torch.ops.moe.permute(x_(T, D), P.order_N, P.rows_TK.reshape(-1)), "rows_TK"),
    ("permute_plan_sizes", lambda: torch.ops.moe.permute(x_(T, D), P.order_N[1:], P.rows_TK), "order_N"),
    ("gather_x_rank", lambda: ops.gather_grouped_mm(x_(T, D, 1), P, x_(E, D, Y)), "x_TD"),
    ("gather_b_rank", lambda: ops.gather_grouped_mm(x_(T, D), P, x_(D, Y)), "b_EXY"),
    ("gather_dtype_mismatch", lambda: ops.gather_grouped_mm(x_(T, D), P, x_(E, D, Y, dtype=torch.float64)), "b_EXY"),
    ("gather_inner_dim", lambda: ops.gather_grouped_mm(x_(T, D), P, x_(E, D + 1, Y)), "b_EXY"),
    ("gather_offs_len", lambda: ops.gather_grouped_mm(x_(T, D), P, x_(E + 1, D, Y)), "offs_E"),
    ("gather_wgrad_g_rows", lambda: torch.ops.moe.gather_grouped_mm_wgrad(x_(T, D), P.order_N, P.rows_TK, x_(N + 1, Y), OFFS), "g_NY"),
    ("gather_wgrad_g_rank", lambda: torch.ops.moe.gather_grouped_mm_wgrad(x_(T, D), P.order_N, P.rows_TK, x_(N), OFFS), "g_NY"),
    ("linear_x_rank", lambda: ops.linear_f32(x_(2, T, D), x_(E, D)), "x_TD"),
    ("linear_w_rank", lambda: ops.linear_f32(x_(T, D), x_(E, D, 1)), "weight_ED"),
    ("linear_width", lambda: ops.linear_f32(x_(T, D), x_(E, D + 1)), "weight_ED"),
    ("linear_dtype", lambda: ops.linear_f32(x_(T, D), x_(E, D, dtype=torch.float64)), "weight_ED"),
    ("linear_int", lambda: ops.linear_f32(torch.ones(T, D, dtype=torch.long), torch.ones(E, D, dtype=torch.long)), "x_TD"),
    ("swiglu_odd", lambda: ops.swiglu(x_(T, 2 * D + 1)), "h"),
    ("swiglu_int", lambda: ops.swiglu(torch.ones(T, 2 * D, dtype=torch.long)), "h"),
    ("swiglu_scalar", lambda: ops.swiglu(x_()), "h"),
    ("swiglu_backward_shape", lambda: torch.ops.moe.swiglu_backward(x_(T, D + 1), x_(T, 2 * D)), "grad"),
    ("swiglu_backward_dtype", lambda: torch.ops.moe.swiglu_backward(x_(T, D, dtype=torch.float64), x_(T, 2 * D)), "grad"),
]
# Checks that read tensor data (ids, plan entries, offsets): the compiled kernels' alone (the fake
# kernels cannot read data; the twins fail on them without naming the argument).
DATA_CASES = {"id_too_large", "id_below_minus_one", "permute_stale_plan", "unpermute_stale_plan",
              "gmm_offs_not_monotone", "gmm_offs_negative", "gmm_offs_past_rows", "wgrad_offs_not_monotone",
              "wgrad_offs_past_rows"}


@pytest.mark.parametrize("case,call,arg", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
@pytest.mark.parametrize("path", ["op", "twin"])
def test_plan_bad_input_names_the_argument(case, call, arg, path):
    plan = ops.plan if path == "op" else plan_torch
    with pytest.raises((RuntimeError, ValueError, TypeError), match=arg):
        call(plan)


@pytest.mark.parametrize("case,call,arg", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_bad_input_on_fake_tensors_names_the_argument(case, call, arg):
    if case in DATA_CASES:
        pytest.skip("a data check: the kernels' and the twin's alone")
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError, match=arg):
        call(ops.plan)


@pytest.mark.parametrize("case,call,arg", OP_CASES, ids=[c[0] for c in OP_CASES])
@pytest.mark.parametrize("path", ["dispatch", "fake"])
def test_op_bad_input_names_the_argument(case, call, arg, path):
    """"dispatch": the compiled kernel (the twin's fallback without the extension, which runs the
    same metadata checks); "fake": the fake kernel (meta / fake tensors, torch.compile)."""
    if case in DATA_CASES and (path == "fake" or not ops.HAS_EXTENSION):
        pytest.skip("a data check: the compiled kernels' alone")
    mode = FakeTensorMode(allow_non_fake_inputs=True) if path == "fake" else contextlib.nullcontext()
    with mode, pytest.raises((RuntimeError, ValueError, TypeError), match=arg):
        call()


@pytest.mark.parametrize("value", [3.7, 4.0, True, False, "4", None, torch.tensor(4), np.float64(4.0)])
def test_plan_num_experts_must_be_an_int(value):
    """A float is not truncated (3.7 planned 3 experts), a bool is not an int (True planned 1)."""
    with pytest.raises(TypeError, match="num_experts must be an int"):
        ops.plan(IDS, value)


def test_plan_num_experts_takes_python_and_numpy_ints():
    want = ops.plan(IDS, E)
    for value in (np.int64(E), np.int32(E)):
        got = ops.plan(IDS, value)
        assert got.num_experts == E and all(torch.equal(a, b) for a, b in zip(got.__dict__.values(), want.__dict__.values()))


@pytest.mark.parametrize("num_experts", [ops.MAX_EXPERTS + 1, 2**31 - 1, 2**31, 2**63 - 1])
@pytest.mark.parametrize("device", ["cpu", META])
def test_plan_num_experts_above_the_bound_raises_before_allocating(num_experts, device):
    """Past moe.ops.MAX_EXPERTS = 2^20 the plan raises, naming num_experts, instead of allocating
    O(E) memory (2^31 - 1 experts: 8 GiB per int32 output, 16 GiB of kernel scratch) for ids that
    use 4 experts; on the public wrapper, the op itself (kernel or twin) and the fake kernel."""
    ids = IDS.to(device)
    for plan in (ops.plan, torch.ops.moe.plan):
        with pytest.raises(RuntimeError, match=r"num_experts must be in \[1, 2\^20 = 1048576\]"):
            plan(ids, num_experts)


def test_plan_takes_max_experts():
    """The bound itself plans, the same as the twin (E = 2^20: 16 MiB of plan outputs)."""
    p, want = ops.plan(IDS, ops.MAX_EXPERTS), plan_torch(IDS, ops.MAX_EXPERTS)
    assert p.num_experts == ops.MAX_EXPERTS
    for got, ref in zip((p.counts_E, p.offs_E, p.order_N, p.rows_TK), want):
        assert torch.equal(got, ref)
    meta = ops.plan(IDS.to(META), ops.MAX_EXPERTS)
    assert meta.counts_E.shape == (ops.MAX_EXPERTS,) and meta.counts_E.device.type == "meta"


# A second device, emulated with "meta": the CPU kernels' own checks (reached by redispatching to
# the CPU key, since any meta argument sends the dispatcher to the fake kernel).
DEVICE_CASES = [
    ("permute_x", lambda: cpu_redispatch("permute")(x_(T, D, device=META), P.order_N, P.rows_TK, None), "x_TD"),
    ("permute_scale", lambda: cpu_redispatch("permute")(x_(T, D), P.order_N, P.rows_TK, x_(T, K, device=META)), "scale_TK"),
    ("unpermute_y", lambda: cpu_redispatch("unpermute")(x_(N, D, device=META), P.order_N, P.rows_TK, None), "y_ND"),
    ("unpermute_weights", lambda: cpu_redispatch("unpermute")(x_(N, D), P.order_N, P.rows_TK, x_(T, K, device=META)), "weights_TK"),
    ("gmm_b", lambda: cpu_redispatch("grouped_mm")(x_(N, D), x_(E, D, Y, device=META), OFFS), "b_EXY"),
    ("gmm_offs", lambda: cpu_redispatch("grouped_mm")(x_(N, D), x_(E, D, Y), OFFS.to(META)), "offs_E"),
    ("wgrad_g", lambda: cpu_redispatch("grouped_mm_wgrad")(x_(N, D), x_(N, Y, device=META), OFFS), "g_NY"),
]


@needs_ext
@pytest.mark.parametrize("case,call,arg", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_kernel_device_mismatch_names_the_argument(case, call, arg):
    with pytest.raises(RuntimeError, match=arg):
        call()


@needs_ext
@pytest.mark.parametrize("case", ["unpermute_weights", "gmm_b", "gmm_offs"])
def test_public_api_device_mismatch_names_the_argument(case):
    calls = {
        "unpermute_weights": (lambda: ops.unpermute(x_(N, D), P, x_(T, K, device=META)), "weights_TK"),
        "gmm_b": (lambda: ops.grouped_mm(x_(N, D), x_(E, D, Y, device=META), OFFS), "b_EXY"),
        "gmm_offs": (lambda: ops.grouped_mm(x_(N, D), x_(E, D, Y), OFFS.to(META)), "offs_E"),
    }
    call, arg = calls[case]
    with pytest.raises(RuntimeError, match=arg):
        call()


# ---------------------------------------------------------------- fallback without the extension

FALLBACK = textwrap.dedent("""
    import json
    import torch
    import moe, moe.ops as ops
    from moe.ops.twins import grouped_mm_torch, permute_torch
    m = dict(has_extension=ops.HAS_EXTENSION, plan_registered=hasattr(torch.ops.moe, "plan"),
             compiled=[k for name in ops.registry.OPS for k in ops.compiled_kernels(name)], runs=[])
    ids = torch.tensor([[0, 2], [1, -1], [2, 2], [-1, 0]])
    for _ in range(2):
        p = ops.plan(ids, 3)
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
        h = ops.grouped_mm(ops.permute(x, p), b, p.offs_E)
        y = ops.unpermute(h, p, torch.rand(4, 2, dtype=torch.float64))
        y.sum().backward()
        m["runs"].append(dict(offs=p.offs_E.tolist(), x_grad_shape_ok=x.grad.shape == x.shape,
                              b_grad_sum=float(b.grad[:, :, :].abs().sum()),
                              permute_is_twin=torch.equal(ops.permute(x, p), permute_torch(x, p.order_N, p.rows_TK))))
    print(json.dumps(m))
""")


def test_fallback_to_twins_without_extension_warns_once():
    env = {**os.environ, "MOE_DISABLE_EXTENSION": "1"}
    r = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert not m["has_extension"]
    assert m["plan_registered"], "torch.ops.moe.* must exist without the extension (the twins)"
    assert m["compiled"] == [], "no compiled kernel may be registered"
    assert len(m["runs"]) == 2
    for run in m["runs"]:
        assert run["offs"] == [2, 3, 6], run
        assert run["x_grad_shape_ok"] and run["b_grad_sum"] > 0, run
        assert run["permute_is_twin"], run
    assert r.stderr.count("pure-PyTorch ops") == 1, r.stderr


# ---------------------------------------------------------------- torch.compile


def _moe_layer(x_TD, ids_TK, weights_TK, w_up_EDF):
    p = ops.plan(ids_TK, w_up_EDF.shape[0])
    h_NF = ops.grouped_mm(ops.permute(x_TD, p), w_up_EDF, p.offs_E)
    return ops.unpermute(h_NF, p, weights_TK)


@needs_ext
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g, requires_grad=True)
    w_up = torch.randn(4, 6, 5, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 3], [1, -1], [3, 3], [-1, -1], [2, 0], [1, 2], [0, 0], [3, -1], [2, 1]])
    weights = torch.rand(9, 2, generator=g)
    compiled = torch.compile(_moe_layer, fullgraph=True, backend=backend)
    got = compiled(x, ids, weights, w_up)
    (gx, gw), want = torch.autograd.grad(got.sum(), (x, w_up)), _moe_layer(x, ids, weights, w_up)
    ex, ew = torch.autograd.grad(want.sum(), (x, w_up))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)
