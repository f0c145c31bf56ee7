"""Expert parallelism (moe.parallel.AllToAllDispatcher) on 2 and 4 gloo CPU processes against
the single-process computation with the same weights: outputs and all gradients (tokens,
routing weights, gathered expert shards), the exact dispatched layout, capacity drops, ranks
that receive or send nothing, dtypes, the named host sync, gradcheck, and no module globals.

Spawning costs seconds, so each spawn runs a batch of cases. Every rank builds the same global
data from one seed, computes the single-process reference itself and checks its own share.
Shape legend: T tokens, D hidden, K slots, E experts, L local experts, W ranks, C capacity.
"""

from __future__ import annotations

import copy
import math

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from moe import MoELayer, ops
from moe.dispatch import LocalDispatcher
from moe.parallel import AllToAllDispatcher
from tests.helpers.dist import run_workers

D, H, K = 4, 3, 2


def _data(seed: int, Ts: list, E: int, L: int, dtype, to_rank0: bool = False, k: int = K) -> dict:
    g = torch.Generator().manual_seed(seed)
    T = sum(Ts)
    pool = L if to_rank0 else E  # to_rank0: every token picks experts of rank 0 only
    ids = torch.rand(T, pool, generator=g).argsort(1)[:, :k]
    ids = ids.masked_fill(torch.rand(T, k, generator=g) < 0.2, -1)  # empty slots
    w = torch.rand(T, k, generator=g, dtype=dtype).masked_fill(ids < 0, 0.0)
    return dict(Ts=Ts, ids=ids, w=w, x=torch.randn(T, D, generator=g, dtype=dtype),
                cot=torch.randn(T, D, generator=g, dtype=dtype),
                w1=torch.randn(E, D, H, generator=g, dtype=dtype) / 2,
                w2=torch.randn(E, H, D, generator=g, dtype=dtype) / 2)


def _experts(x_ND, offs_E, w1, w2):
    """A small stand-in for GroupedExperts: tanh(x W1[e]) W2[e] per group (zero rows stay zero)."""
    return ops.grouped_mm(torch.tanh(ops.grouped_mm(x_ND, w1, offs_E)), w2, offs_E)


def _drop_reference(ids, Ts, E, C):
    """Slots over capacity, by a plain loop: per source rank and expert, the first C in (t, k)."""
    ids, t0 = ids.clone(), 0
    for T in Ts:
        seen = [0] * E
        for t in range(t0, t0 + T):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                if e >= 0:
                    seen[e] += 1
                    if seen[e] > C:
                        ids[t, k] = -1
        t0 += T
    return ids


def _expected_rows(d, ids, rank, L, C=None):
    """The rows rank's experts receive: by local expert, then source rank, then (t, k) order;
    in capacity mode each (expert, source) block is padded with zeros to C rows."""
    blocks, bounds = [], [0] + torch.tensor(d["Ts"]).cumsum(0).tolist()
    for e in range(rank * L, rank * L + L):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            t_rows = [t for t in range(lo, hi) for k in range(ids.shape[1]) if ids[t, k] == e]
            block = d["x"][t_rows]
            if C is not None:
                block = torch.cat([block, d["x"].new_zeros(C - len(t_rows), D)])
            blocks.append(block)
    return torch.cat(blocks)


def _close(actual, expected, what):
    if expected.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}")
    else:  # float32: error vs float64 at most 2x the single-process float32 error (+ rounding)
        err = (actual.double() - expected.double()).abs().max().item()
        bound = 4 * torch.finfo(actual.dtype).eps * max(1.0, expected.abs().max().item())
        assert err <= bound, f"{what}: error {err} > {bound}"


def _routing(ids_TK, weights_TK):
    """What a dispatcher reads of a routers.Routing."""
    return SimpleNamespace(ids_TK=ids_TK, weights_TK=weights_TK)


def _run_case(group, d, E, *, capacity_factor=None, capacity_tokens=None, spy=False) -> dict:
    """dispatch -> stand-in experts -> combine -> backward on this rank's share; every check
    against the single-process reference. Returns a few facts for the caller's own asserts."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    L = E // W
    lo, hi = sum(d["Ts"][:rank]), sum(d["Ts"][: rank + 1])
    disp = AllToAllDispatcher(E, group, capacity_factor=capacity_factor, capacity_tokens=capacity_tokens)
    assert disp.num_local_experts == L
    syncs = []
    if spy:
        real = disp._sync_split_sizes
        disp._sync_split_sizes = lambda *a: syncs.append(1) or real(*a)
    x = d["x"][lo:hi].clone().requires_grad_()
    w = d["w"][lo:hi].clone().requires_grad_()
    w1 = d["w1"][rank * L:(rank + 1) * L].clone().requires_grad_()
    w2 = d["w2"][rank * L:(rank + 1) * L].clone().requires_grad_()
    rows, state = disp.dispatch(x, _routing(d["ids"][lo:hi], w))
    assert not rows.gathered
    x_ND, offs_E = rows.x, rows.offs_E
    y_ND = _experts(x_ND, offs_E, w1, w2)
    y = disp.combine(y_ND, state)
    (y * d["cot"][lo:hi]).sum().backward()

    ids = d["ids"]
    # capacity mode: C from capacity_tokens, else from the largest T of the group
    C = None if capacity_factor is None else disp.capacity(max(d["Ts"]), d["ids"].shape[1])
    assert state.capacity == C
    if C is not None:
        ids = _drop_reference(ids, d["Ts"], E, C)
        n_drop = int(((d["ids"][lo:hi] >= 0) & (ids[lo:hi] < 0)).sum())
        assert int(state.num_dropped) == n_drop, (int(state.num_dropped), n_drop)
        pad = (x_ND == 0).all(1, keepdim=True) & (_expected_rows(d, ids, rank, L, C) == 0).all(1, keepdim=True)
        with torch.no_grad():  # junk in the padding rows must not reach any output
            assert torch.equal(disp.combine(y_ND + pad * 1e3, state), y.detach())
    exp_rows = _expected_rows(d, ids, rank, L, C)
    assert torch.equal(x_ND.detach(), exp_rows), "dispatched rows differ from the expected layout"
    if C is None:
        counts = torch.bincount(ids[ids >= 0], minlength=E)[rank * L:(rank + 1) * L]
        assert torch.equal(offs_E, counts.cumsum(0).int())
    else:
        assert torch.equal(offs_E, torch.arange(1, L + 1, dtype=torch.int32) * W * C)

    xr, wr = d["x"].clone().requires_grad_(), d["w"].clone().requires_grad_()
    w1r, w2r = d["w1"].clone().requires_grad_(), d["w2"].clone().requires_grad_()
    plan = ops.plan(ids, E)
    yr = ops.unpermute(_experts(ops.permute(xr, plan), plan.offs_E, w1r, w2r), plan, wr)
    (yr * d["cot"]).sum().backward()
    _close(y, yr[lo:hi], "y")
    _close(x.grad, xr.grad[lo:hi], "grad x")
    _close(w.grad, wr.grad[lo:hi], "grad weights_TK")
    for name, mine, ref in (("grad w1", w1.grad, w1r.grad), ("grad w2", w2.grad, w2r.grad)):
        shards = [torch.empty_like(mine) for _ in range(W)]
        dist.all_gather(shards, mine.contiguous(), group=group)
        _close(torch.cat(shards), ref, name)
    return dict(syncs=len(syncs), rows=x_ND.shape[0], dropped=int(state.num_dropped))


def _module_state():
    import moe
    import moe.dispatch
    import moe.experts
    import moe.layer
    import moe.parallel

    modules = (moe, moe.ops, moe.dispatch, moe.parallel, moe.layer, moe.experts)
    return {(m.__name__, k): (id(v), copy.copy(v) if isinstance(v, (dict, list, set)) else None)
            for m in modules for k, v in vars(m).items()}


def _worker_cases(rank: int, W: int) -> dict:
    before = _module_state()
    group, f64, f32 = dist.group.WORLD, torch.float64, torch.float32
    E = 6 if W == 2 else 8  # L = 3 and 2
    L = E // W
    uneven = [5, 7] if W == 2 else [3, 6, 1, 5]
    t0 = [6, 0] if W == 2 else [4, 0, 6, 3]  # a rank that sends nothing
    facts = {}
    facts["random"] = _run_case(group, _data(1, uneven, E, L, f64), E, spy=True)
    facts["sender_T0"] = _run_case(group, _data(2, t0, E, L, f64), E)
    facts["to_rank0"] = _run_case(group, _data(3, uneven, E, L, f64, to_rank0=True), E)
    facts["float32"] = _run_case(group, _data(4, uneven, E, L, f32), E)
    eq = [6] * W
    facts["cap_random"] = _run_case(group, _data(5, eq, E, L, f64), E, capacity_factor=1.0, spy=True)
    facts["cap_to_rank0"] = _run_case(group, _data(6, eq, E, L, f64, to_rank0=True), E, capacity_factor=1.0)
    facts["cap_sender_T0"] = _run_case(group, _data(7, t0, E, L, f64), E, capacity_factor=1.5,
                                       capacity_tokens=max(t0))
    facts["cap_float32"] = _run_case(group, _data(8, eq, E, L, f32), E, capacity_factor=0.75)
    # different token counts per rank, no capacity_tokens: the ranks agree on the largest T
    facts["cap_uneven"] = _run_case(group, _data(12, uneven, E, L, f64), E, capacity_factor=1.0, spy=True)
    facts["cap_uneven_T0"] = _run_case(group, _data(13, t0, E, L, f64), E, capacity_factor=0.5)
    if W == 4:  # two expert-parallel groups of 2 inside the world of 4, different data each
        subs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        facts["subgroup"] = _run_case(subs[rank // 2], _data(9 + rank // 2, [3, 5], 4, 2, f64), 4)
    facts["dtypes"] = _check_dtypes(group, E)
    facts["sweep"] = _check_sweep(group)
    for cf in (None, 1.0):  # an empty batch on every rank
        _run_case(group, _data(20, [0] * W, E, L, f64), E, capacity_factor=cf)
    _check_layer(group, E, t0)
    _check_layer(group, E, eq, ep_capacity_factor=1.0)
    _check_layer(group, E, uneven, ep_capacity_factor=1.0)  # C from the largest T, agreed
    _check_layer(group, E, uneven, ep_capacity_factor=0.5, ep_capacity_tokens=max(uneven) + 2)
    _check_gradcheck(group, E)
    _check_errors(group, E)
    after = _module_state()
    changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
    assert not changed, f"moe module-level state changed: {changed}"
    return facts


def _check_sweep(group, n: int = 12) -> int:
    """Seeded random configurations (the same on every rank): T per rank in [0, 6] (T = 0 and
    uneven included), k in 1..3, L in 1..3 (E = L*W, not a power of 2), tokens spread or all on
    rank 0's experts, dropless or capacity (capacity_tokens = the largest T)."""
    W, g = dist.get_world_size(group), torch.Generator().manual_seed(100)
    for i in range(n):
        L = int(torch.randint(1, 4, (), generator=g))
        k = int(torch.randint(1, min(3, L * W) + 1, (), generator=g))
        to_rank0 = bool(torch.rand((), generator=g) < 0.3) and k <= L
        Ts = torch.randint(0, 7, (W,), generator=g).tolist()
        cf = [None, None, 0.5, 1.0, 2.0][int(torch.randint(0, 5, (), generator=g))]
        d = _data(200 + i, Ts, L * W, L, torch.float64, to_rank0=to_rank0, k=k)
        tokens = None if cf is None or i % 2 else max(Ts) + i % 3  # a bound, or the agreed largest T
        _run_case(group, d, L * W, capacity_factor=cf, capacity_tokens=tokens)
    return n


class _RankDropDispatcher(LocalDispatcher):
    """Single-process reference for capacity mode: drops the slots each source rank drops."""

    def __init__(self, num_experts, Ts, capacity):
        super().__init__(num_experts)
        self.Ts, self.C = Ts, capacity

    def dispatch(self, x_TD, routing):
        ids_TK = _drop_reference(routing.ids_TK, self.Ts, self.num_experts, self.C)
        return super().dispatch(x_TD, _routing(ids_TK, routing.weights_TK))


def _check_layer(group, E, Ts, *, ep_capacity_factor=None, ep_capacity_tokens=None) -> None:
    """moe.MoELayer(ep_group=group) vs the single-process layer with the same weights: output,
    x grad, gathered expert grads, and the summed grads of the replicated router and shared
    expert (each rank holds its tokens' share). The aux loss is batch-level, so it is left out."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    L, lo, hi = E // W, sum(Ts[:rank]), sum(Ts[: rank + 1])
    torch.manual_seed(12)
    kw = dict(num_shared_experts=1, bias=True, activation="swiglu")
    ep = MoELayer(D, 5, E, K, ep_group=group, ep_capacity_factor=ep_capacity_factor,
                  ep_capacity_tokens=ep_capacity_tokens, **kw).double()
    assert ep.dispatcher.capacity_tokens == ep_capacity_tokens
    C = None if ep_capacity_factor is None else ep.dispatcher.capacity(max(Ts), K)
    ref = MoELayer(D, 5, E, K, dispatcher=None if C is None else _RankDropDispatcher(E, Ts, C), **kw).double()
    assert [n for n, _ in ep.named_parameters()] == [n for n, _ in ref.named_parameters()]
    with torch.no_grad():
        for (name, p), q in zip(ep.named_parameters(), ref.parameters()):
            p.copy_(q[rank * L:(rank + 1) * L] if name.startswith("experts.") else q)
    g = torch.Generator().manual_seed(13)
    x, cot = torch.randn(2, sum(Ts), D, generator=g, dtype=torch.float64)
    xe, xr = x[lo:hi].clone().requires_grad_(), x.clone().requires_grad_()
    ye, yr = ep(xe), ref(xr)
    (ye * cot[lo:hi]).sum().backward()
    (yr * cot).sum().backward()
    _close(ye, yr[lo:hi], "layer y")
    _close(xe.grad, xr.grad[lo:hi], "layer grad x")
    for (name, p), q in zip(ep.named_parameters(), ref.parameters()):
        if name.startswith("experts."):
            shards = [torch.empty_like(p.grad) for _ in range(W)]
            dist.all_gather(shards, p.grad.contiguous(), group=group)
            _close(torch.cat(shards), q.grad, f"layer grad {name}")
        else:
            total = p.grad.clone()
            dist.all_reduce(total, group=group)
            _close(total, q.grad, f"layer grad {name}")


def _check_dtypes(group, E) -> list:
    """Pure data movement (identity experts) is exact in every dtype gloo carries."""
    W, rank, done = dist.get_world_size(group), dist.get_rank(group), []
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for cf in (None, 2.0):
            d = _data(10, [5] * W, E, E // W, dtype)
            disp = AllToAllDispatcher(E, group, capacity_factor=cf)
            x = d["x"][5 * rank:5 * rank + 5].clone().requires_grad_()
            w = d["w"][5 * rank:5 * rank + 5].float()
            rows, state = disp.dispatch(x, _routing(d["ids"][5 * rank:5 * rank + 5], w))
            x_ND = rows.x
            y = disp.combine(x_ND * 2, state)
            y.backward(torch.ones_like(y))
            xr = x.detach().clone().requires_grad_()
            plan = ops.plan(d["ids"][5 * rank:5 * rank + 5], E)
            yr = ops.unpermute(ops.permute(xr, plan) * 2, plan, w)
            yr.backward(torch.ones_like(yr))
            assert y.dtype == dtype and torch.equal(y, yr) and torch.equal(x.grad, xr.grad), dtype
        done.append(str(dtype))
    return done


def _check_gradcheck(group, E) -> None:
    """float64 gradcheck of the distributed layer in x and the routing weights (equal T on every
    rank, so all ranks run the same number of collectives; y of a rank depends only on its own
    tokens, so the ranks' simultaneous perturbations do not interfere)."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    d = _data(11, [3] * W, E, E // W, torch.float64)
    sl = slice(3 * rank, 3 * rank + 3)
    w1, w2 = d["w1"][rank * (E // W):(rank + 1) * (E // W)], d["w2"][rank * (E // W):(rank + 1) * (E // W)]
    for cf in (None, 1.0):
        disp = AllToAllDispatcher(E, group, capacity_factor=cf)

        def f(x, w, disp=disp):
            rows, state = disp.dispatch(x, _routing(d["ids"][sl], w))
            return disp.combine(_experts(rows.x, rows.offs_E, w1, w2), state)

        torch.autograd.gradcheck(f, (d["x"][sl].clone().requires_grad_(), d["w"][sl].clone().requires_grad_()))


def _check_errors(group, E) -> None:
    with pytest.raises(ValueError, match="num_experts"):
        AllToAllDispatcher(E + 1, group)
    for bad in (0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
            AllToAllDispatcher(E, group, capacity_factor=bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="capacity_tokens must be an int >= 0"):
            AllToAllDispatcher(E, group, capacity_factor=1.0, capacity_tokens=bad)
    with pytest.raises(ValueError, match="capacity_tokens=4 needs capacity_factor"):
        AllToAllDispatcher(E, group, capacity_tokens=4)
    disp = AllToAllDispatcher(E, group)
    x, ids, w = torch.randn(3, D), torch.zeros(3, K, dtype=torch.long), torch.ones(3, K)
    with pytest.raises(ValueError, match="ids_TK"):
        disp.dispatch(x, _routing(ids[:2], w))
    with pytest.raises(ValueError, match="weights_TK"):
        disp.dispatch(x, _routing(ids, w[:, :1]))
    with pytest.warns(DeprecationWarning, match="routing"):
        x_ND, _, state = disp.dispatch(x, ids, w)  # the deprecated (ids_TK, weights_TK) form
    with pytest.raises(ValueError, match="y_ND"):
        disp.combine(torch.cat([x_ND, x_ND.new_zeros(1, D)]), state)
    disp.combine(x_ND, state)  # keep the ranks' collectives matched
    with pytest.raises(ValueError, match="capacity_tokens"):
        AllToAllDispatcher(E, group, capacity_factor=1.0, capacity_tokens=2).dispatch(x, _routing(ids, w))


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world):
    facts = run_workers(_worker_cases, world, timeout=150)
    for f in facts:
        assert f["random"]["syncs"] == 1 and f["cap_random"]["syncs"] == 0  # the one named sync
        assert f["cap_uneven"]["syncs"] == 0
        assert f["sweep"] == 12
        assert f["dtypes"] == ["torch.float64", "torch.float32", "torch.bfloat16", "torch.float16"]
    E = 6 if world == 2 else 8
    assert all(f["to_rank0"]["rows"] == 0 for f in facts[1:])  # ranks that receive nothing
    assert sum(f["cap_to_rank0"]["dropped"] for f in facts) > 0  # the capacity cases drop slots
    C = math.ceil(6 * K / E * 1.0)
    assert all(f["cap_random"]["rows"] == E * C for f in facts)  # L*W*C rows: host-known size


def test_needs_initialized_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="not initialized"):
        AllToAllDispatcher(4, None)


# ---- configuration checks: every rank raises, no rank aborts or hangs ----------------------------

def _first_dispatch(group, E, x, ids, **kw):
    """One dispatch + combine of a new dispatcher; the error it raised as (type name, message)."""
    try:
        disp = AllToAllDispatcher(E, group, **kw)
        rows, state = disp.dispatch(x, _routing(ids, torch.ones(ids.shape, dtype=torch.float32)))
        disp.combine(rows.x, state)
    except Exception as e:  # noqa: BLE001  (reported to the parent, which checks every rank's)
        return type(e).__name__, str(e)
    return None


def _worker_mismatches(rank: int, W: int) -> dict:
    """Each case gives the ranks a different setting at the first dispatch; the group must still
    work afterwards (the all_reduce after each case would hang or fail otherwise)."""
    group, out = dist.group.WORLD, {}
    g = torch.Generator().manual_seed(rank)

    def batch(T=5, D_=D, dtype=torch.float32, k=K, E=6):
        return torch.randn(T, D_, generator=g).to(dtype), torch.randint(0, E, (T, k), generator=g)

    x, ids = batch()
    cases = {
        "E": lambda: _first_dispatch(group, 6 if rank == 0 else 4, *batch(E=4)),
        "D": lambda: _first_dispatch(group, 6, *batch(D_=D + rank)),
        "dtype": lambda: _first_dispatch(group, 6, *batch(dtype=(torch.float32, torch.bfloat16)[rank])),
        "K": lambda: _first_dispatch(group, 6, *batch(k=2 - rank)),
        "mode": lambda: _first_dispatch(group, 6, x, ids, capacity_factor=(None, 1.0)[rank]),
        "capacity_factor": lambda: _first_dispatch(group, 6, x, ids, capacity_factor=(1.0, 1.25)[rank]),
        "capacity_tokens": lambda: _first_dispatch(group, 6, x, ids, capacity_factor=1.0,
                                                   capacity_tokens=(8, None)[rank]),
        "T_over_bound": lambda: _first_dispatch(group, 6, *batch(T=5 + 4 * rank), capacity_factor=1.0,
                                                capacity_tokens=8),
        "bad_args": lambda: _first_dispatch(group, 6, x, ids[: 5 - rank]),
        "layer_mode": lambda: _layer_forward(group, (None, 1.0)[rank]),
        "agree": lambda: _first_dispatch(group, 6, x, ids, capacity_factor=1.0),  # control: no error
    }
    for name, case in cases.items():
        out[name] = case()
        alive = torch.ones(1)
        dist.all_reduce(alive, group=group)  # every rank is still here and in step
        assert alive.item() == W
    return out


def _layer_forward(group, ep_capacity_factor):
    try:
        MoELayer(D, 5, 6, K, ep_group=group, ep_capacity_factor=ep_capacity_factor)(torch.randn(2, 3, D))
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return None


def test_mismatched_configuration_raises_on_every_rank():
    """Issue 18 item 3: ranks that disagree on E, D, dtype, K, mode or capacity settings used to
    abort the process in a mismatched all-to-all (gloo EnforceNotMet, SIGABRT); now every rank
    raises the same ValueError naming the setting and each rank's value, and the group goes on."""
    r0, r1 = run_workers(_worker_mismatches, 2, timeout=120)
    expected = {
        "E": "num_experts E (rank 0: 6, rank 1: 4)",
        "D": f"hidden size D (x_TD.shape[1]) (rank 0: {D}, rank 1: {D + 1})",
        "dtype": "dtype of x_TD (rank 0: torch.float32, rank 1: torch.bfloat16)",
        "K": "routing slots K (ids_TK.shape[1]) (rank 0: 2, rank 1: 1)",
        "mode": "mode (rank 0: dropless, rank 1: capacity)",
        "capacity_factor": "capacity_factor (rank 0: 1.0, rank 1: 1.25)",
        "capacity_tokens": "capacity_tokens (rank 0: 8, rank 1: None)",
        "T_over_bound": "T within capacity_tokens=8 (rank 1: T=9)",
        "layer_mode": "mode (rank 0: dropless, rank 1: capacity)",
    }
    for name, words in expected.items():
        for rank, res in enumerate((r0, r1)):
            assert res[name] is not None, f"{name}: rank {rank} raised nothing"
            kind, msg = res[name]
            assert kind == "ValueError" and words in msg and f"(this is rank {rank})" in msg, (name, rank, msg)
        assert r0[name][1].replace("rank 0)", "rank 1)") == r1[name][1]  # the same error on both
    # a rank with invalid arguments raises its own error; the others say which rank it was
    assert r1["bad_args"][0] == "ValueError" and "ids_TK must have shape" in r1["bad_args"][1]
    assert r0["bad_args"][0] == "ValueError" and "rank(s) [1]" in r0["bad_args"][1]
    assert r0["agree"] is None and r1["agree"] is None


def test_layer_ep_arguments_need_ep_group():
    for kw in (dict(ep_capacity_factor=1.0), dict(ep_capacity_tokens=8)):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} needs ep_group"):
            MoELayer(8, 4, 4, 2, **kw)
