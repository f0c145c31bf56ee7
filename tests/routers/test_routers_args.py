"""Every numeric constructor argument of every router refuses what a user might mistype (a bool,
NaN, inf, a negative, a float where an int is needed, a string) with a ValueError that names the
argument (routers.checks: one helper per kind of argument), and accepts its boundary values."""

import math

import numpy as np
import pytest
import torch

from routers import (ExpertChoiceRouter, ExpertChoiceStepRouter, RecurrentRouter, RecurrentRouterChain,
                     ThresholdRouter, TokenChoiceDepthRouter, TopKRouter, capacity, capacity_schedule,
                     loss_free_bias_update_)
from routers.checks import check_coefficient, check_int, check_number
from routers.depth import ExpertChoiceConfig as EC
from routers.depth import TokenChoiceConfig as TC

D, E = 8, 4
NAN, INF = float("nan"), float("inf")
NOT_A_NUMBER = (True, False, NAN, INF, -INF, "1", None)  # never a real setting (None: unless in good)
NOT_A_COUNT = (True, 2.0, 1.5, NAN, "2", None)  # never a count

# (factory taking the one argument, argument name, bad values beyond NOT_A_NUMBER / NOT_A_COUNT,
#  good values: None among them where None means "off" or "default")
REAL_ARGS = [
    (lambda v: TopKRouter(D, E, 2, capacity_factor=v), "capacity_factor", (0, 0.0, -1.0), (None, 1e-3, 1, 8.0)),
    (lambda v: TopKRouter(D, E, 2, routed_scaling_factor=v), "routed_scaling_factor", (0.0, -2.5), (1, 2.5)),
    (lambda v: TopKRouter(D, E, 2, balance_loss_coeff=v), "balance_loss_coeff", (-1e-3,), (0, 0.0, 1e-2)),
    (lambda v: TopKRouter(D, E, 2, z_loss_coeff=v), "z_loss_coeff", (-1.0,), (0.0, 1e-3)),
    (lambda v: TopKRouter(D, E, 2, jitter=v), "jitter", (-0.1, 1.0, 2.0), (0.0, 0.5)),
    (lambda v: TopKRouter(D, E, 2, init_std=v), "init_std", (-0.02,), (0.0, 0.02)),
    (lambda v: ThresholdRouter(D, E, threshold=v), "threshold", (0.0, -0.5, 1.5), (1e-6, 0.5, 1, 1.0)),
    (lambda v: ThresholdRouter(D, E, threshold=0.5, capacity_factor=v), "capacity_factor", (0.0,), (None, 2.0)),
    (lambda v: ThresholdRouter(D, E, threshold=0.5, dynamic_loss_coeff=v), "dynamic_loss_coeff", (-1.0,), (0.0,)),
    (lambda v: ThresholdRouter(D, E, threshold=0.5, balance_loss_coeff=v), "balance_loss_coeff", (-1.0,), (0.0,)),
    (lambda v: ExpertChoiceRouter(D, E, v), "capacity_factor", (0.0, -1.0), (0.5, 4)),
    (lambda v: ExpertChoiceRouter(D, E, z_loss_coeff=v), "z_loss_coeff", (-1.0,), (0.0,)),
    (lambda v: ExpertChoiceRouter(D, E, init_std=v), "init_std", (-1.0,), (0.1,)),
    (lambda v: RecurrentRouter(D, E, 2, router_dim=4, capacity_factor=v), "capacity_factor", (0.0,), (None, 1.0)),
    (lambda v: RecurrentRouter(D, E, 2, router_dim=4, init_std=v), "init_std", (-1.0,), (0.0,)),
    (lambda v: RecurrentRouterChain(2, D, E, 2, router_dim=4, balance_loss_coeff=v), "balance_loss_coeff",
     (-1.0,), (0.0,)),
    (lambda v: ExpertChoiceStepRouter(D, v, EC()), "capacity", (-0.1, 1.5), (0.0, 0.5, 1)),
    (lambda v: ExpertChoiceStepRouter(D, 0.5, EC(alpha=v)), "alpha", (0.0, -1.0), (0.1,)),
    (lambda v: ExpertChoiceStepRouter(D, 0.5, EC(router_init_std=v)), "router_init_std", (-1.0,), (0.0,)),
    (lambda v: ExpertChoiceStepRouter(D, 0.5, EC(bce_coef=v)), "bce_coef", (-1.0,), (0.0,)),
    (lambda v: ExpertChoiceStepRouter(D, 0.5, EC(z_coef=v)), "z_coef", (-1.0,), (0.0,)),
    (lambda v: TokenChoiceDepthRouter(D, 3, TC(alpha=v)), "alpha", (0.0, -1.0), (None, 0.5)),
    (lambda v: TokenChoiceDepthRouter(D, 3, TC(balance_coef=v)), "balance_coef", (-1.0,), (0.0,)),
    (lambda v: TokenChoiceDepthRouter(D, 3, TC(z_coef=v)), "z_coef", (-1.0,), (0.0,)),
    (lambda v: TokenChoiceDepthRouter(D, 3, TC(bias_rate=v)), "bias_rate", (-1.0,), (0.0,)),
    (lambda v: capacity_schedule(EC(capacities=(1.0, v)), 2), r"capacities\[1\]", (-0.5, 1.5), (0.0, 1)),
]

INT_ARGS = [
    (lambda v: TopKRouter(v, E, 2), "hidden_size", (0, -3), (1, np.int64(8))),
    (lambda v: TopKRouter(D, v, 1), "num_experts", (0,), (1, np.int32(4))),
    (lambda v: TopKRouter(D, E, v), "top_k", (0, E + 1), (1, E)),
    (lambda v: TopKRouter(D, 6, 2, num_groups=v, topk_groups=1), "num_groups", (0, 4, 7), (2, 3)),
    (lambda v: TopKRouter(D, 6, 1, num_groups=3, topk_groups=v), "topk_groups", (0, 4), (1, 3)),
    (lambda v: ThresholdRouter(D, E, threshold=0.5, max_experts=v), "max_experts", (0, E + 1), (None, 1, E)),
    (lambda v: ThresholdRouter(D, v, threshold=0.5), "num_experts", (0,), (1,)),
    (lambda v: ExpertChoiceRouter(v, E), "hidden_size", (0,), (2,)),
    (lambda v: RecurrentRouter(D, E, 2, router_dim=v), "router_dim", (0, -1), (1,)),
    (lambda v: RecurrentRouter(D, E, v, router_dim=4), "top_k", (0, E + 1), (E,)),
    (lambda v: RecurrentRouterChain(v, D, E, 2, router_dim=4), "num_layers", (0,), (1, 3)),
    (lambda v: RecurrentRouterChain(2, D, E, 2, router_dim=v), "router_dim", (0,), (2,)),
    (lambda v: TokenChoiceDepthRouter(D, v, TC()), "num_recursions", (0,), (1, 4)),
    (lambda v: ExpertChoiceStepRouter(v, 0.5, EC()), "hidden_size", (0,), (3,)),
]


def _ids(cases):
    return [f"{name}-{i}" for i, (_, name, _, _) in enumerate(cases)]


def _check_refuses(make, name, refused, good):
    """Every value of ``refused`` (but those in ``good``) raises a ValueError naming ``name``;
    every value of ``good`` builds."""
    for value in refused:
        if any(value is g for g in good):
            continue
        with pytest.raises(ValueError, match=name):
            make(value)
    for value in good:
        make(value)


@pytest.mark.parametrize("make, name, bad, good", REAL_ARGS, ids=_ids(REAL_ARGS))
def test_real_arguments_refuse_non_finite_bools_and_out_of_range(make, name, bad, good):
    _check_refuses(make, name, NOT_A_NUMBER + bad, good)


@pytest.mark.parametrize("make, name, bad, good", INT_ARGS, ids=_ids(INT_ARGS))
def test_count_arguments_refuse_bools_floats_and_out_of_range(make, name, bad, good):
    _check_refuses(make, name, NOT_A_COUNT + bad, good)


def test_the_issue_cases():
    """Issue 18 item 7, before -> after: capacity_factor=inf built a router whose forward raised
    OverflowError; routed_scaling_factor=nan gave NaN weights; threshold=True was threshold 1."""
    with pytest.raises(ValueError, match=r"capacity_factor must be a finite number > 0.0, got inf"):
        TopKRouter(D, E, 2, capacity_factor=INF)
    with pytest.raises(ValueError, match=r"routed_scaling_factor must be a finite number > 0.0, got nan"):
        TopKRouter(D, E, 2, routed_scaling_factor=NAN)
    with pytest.raises(ValueError, match=r"threshold must be a finite number > 0.0 and <= 1.0, got True"):
        ThresholdRouter(D, E, threshold=True)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\], got True"):
        TopKRouter(D, E, True)


def test_none_is_dropless_where_allowed_only():
    assert TopKRouter(D, E, 2, capacity_factor=None).capacity_factor is None
    assert ThresholdRouter(D, E, threshold=0.5, capacity_factor=None).capacity_factor is None
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(D, E, None)


def test_checked_values_are_stored_as_plain_python_numbers():
    r = TopKRouter(np.int64(D), np.int64(E), np.int64(2), capacity_factor=np.float32(1.5),
                   routed_scaling_factor=2, num_groups=np.int64(2), topk_groups=1)
    assert (type(r.hidden_size), type(r.num_experts), type(r.top_k), type(r.num_groups)) == (int,) * 4
    assert (type(r.capacity_factor), type(r.routed_scaling_factor)) == (float, float)
    assert r.routed_scaling_factor == 2.0 and r.capacity_factor == 1.5
    out = r(torch.randn(6, D))  # and the router works with them
    assert out.ids_TK.shape == (6, 2)


def test_capacity_rule_refuses_what_would_overflow():
    assert capacity(10, 2, 4, 1.0) == 5
    for bad in (INF, NAN, 0.0, True):
        with pytest.raises(ValueError, match="capacity_factor"):
            capacity(10, 2, 4, bad)
    with pytest.raises(ValueError, match="capacity_factor=1e.308 makes the capacity .* overflow"):
        capacity(10, 2, 1, 1e308)  # finite factor, infinite T*K/E*factor: not an OverflowError


def test_bias_update_rate_is_checked():
    bias = torch.zeros(3)
    for bad in (NAN, -1e-3, True, INF):
        with pytest.raises(ValueError, match="rate"):
            loss_free_bias_update_(bias, torch.tensor([1.0, 2.0, 3.0]), bad)
    r = TopKRouter(D, 3, 1, expert_bias=True)
    with pytest.raises(ValueError, match="rate"):
        r.update_expert_bias(torch.tensor([1, 2, 3]), rate=NAN)
    assert torch.equal(r.expert_bias, torch.zeros(3))  # nothing applied


def test_helpers_name_the_argument_and_return_plain_numbers():
    assert check_int("n", np.int16(3)) == 3 and type(check_int("n", np.int16(3))) is int
    assert check_number("f", np.float64(0.25), gt=0, le=1) == 0.25
    assert check_coefficient("c", 0) == 0.0
    for value, pattern in ((True, r"n must be an int >= 1, got True"), (3.0, r"n must be an int >= 1, got 3.0")):
        with pytest.raises(ValueError, match=pattern):
            check_int("n", value)
    with pytest.raises(ValueError, match=r"f must be a finite number >= 0 and < 1, got -inf"):
        check_number("f", -math.inf, ge=0, lt=1)
    with pytest.raises(ValueError, match=r"c must be a finite number >= 0.0, got nan"):
        check_coefficient("c", NAN)
