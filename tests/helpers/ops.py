"""Inputs and checks shared by the tests of moe.ops (dispatch, permutation, grouped GEMM).

Shape legend: T tokens, K slots per token, E experts, N routed rows (T*K), D feature dim.
"""

import torch

# (T, K, E, kind): empty batch, k=1, one expert, -1 slots, all rows on one expert, many empty
# experts (E >> rows), every slot empty, sizes that are not powers of two.
ROUTINGS = [(0, 2, 4, "rand"), (1, 1, 1, "rand"), (37, 3, 5, "rand"), (64, 8, 16, "holes"),
            (50, 2, 8, "one"), (33, 4, 300, "holes"), (9, 3, 4, "empty")]

# A second device, emulated with "meta": see cpu_redispatch.
META = "meta"


def make_ids(T, K, E, kind="holes", *, seed=0):
    """(T, K) int64 expert ids; ``holes`` has ~25% empty (-1) slots, ``one`` puts every routed
    row on expert E-1, ``empty`` leaves every slot empty."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g)
    if kind == "one":
        ids.fill_(E - 1)
    if kind in ("holes", "one"):
        ids[torch.rand(T, K, generator=g) < 0.25] = -1
    if kind == "empty":
        ids.fill_(-1)
    return ids


def check_plan_invariants(p, ids_TK, E):
    """The properties that define a plan: a stable counting sort with a true inverse map."""
    T, K = ids_TK.shape
    flat = ids_TK.reshape(-1).long()
    valid = flat >= 0
    n = int(valid.sum())
    assert p.counts_E.dtype == p.offs_E.dtype == torch.int32
    assert p.order_N.dtype == p.rows_TK.dtype == torch.int64
    assert p.counts_E.shape == p.offs_E.shape == (E,)
    assert p.order_N.shape == (T * K,) and p.rows_TK.shape == (T, K)
    assert torch.equal(p.counts_E.long(), torch.bincount(flat[valid], minlength=E))
    assert int(p.counts_E.sum()) == n == int(p.offs_E[-1])
    assert torch.equal(p.offs_E, p.counts_E.cumsum(0).int())
    order, rows = p.order_N, p.rows_TK.reshape(-1)
    assert (order[n:] == -1).all() and (order[:n] >= 0).all()
    assert torch.equal(rows[order[:n]], torch.arange(n))  # rows o order = id on routed rows
    assert torch.equal(order[rows[valid]], torch.arange(T * K)[valid])  # order o rows = id on slots
    assert (rows[~valid] == -1).all()
    experts = flat[order[:n]]
    assert torch.equal(experts, torch.repeat_interleave(torch.arange(E), p.counts_E.long()))
    same = experts[1:] == experts[:-1]
    assert (order[1:n][same] > order[: max(n - 1, 0)][same]).all()  # stable: slot order kept


def plan_fields(p):
    return (p.counts_E, p.offs_E, p.order_N, p.rows_TK)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def strided_rows(x):
    """A non-contiguous view with the same values: every other row of a 2x taller buffer."""
    big = torch.full((2 * x.shape[0], x.shape[1]), float("nan"), dtype=x.dtype)
    big[::2] = x
    return big[::2]


def strided_cols(x):
    """A view with column stride 2 (stride(1) != 1)."""
    big = torch.full((x.shape[0], 2 * x.shape[1]), float("nan"), dtype=x.dtype)
    big[:, ::2] = x
    return big[:, ::2]


def cpu_redispatch(op):
    """torch.ops.moe.<op> sent straight to its CPU kernel: with a "meta" argument this reaches the
    CPU kernels' own device checks (else any meta argument selects the fake kernel)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return lambda *args: getattr(torch.ops.moe, op).default.redispatch(keys, *args)


def router_logits(T, E, dtype=torch.float32, *, seed=0, bias=False):
    """(logits_TE ~ 2 N(0, 1) in ``dtype``, bias_E ~ 0.1 N(0, 1) float32 or None): the inputs of
    the topk_route tests (CPU and GPU)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    return logits, (torch.randn(E, generator=g) * 0.1 if bias else None)
