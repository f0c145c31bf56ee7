"""Tests for csrc/host_cache.cpp, the caching allocator of large CPU outputs (MOE_HOST_CACHE_MB),
and its wrappers moe.ops.host_cache_stats / moe.ops.empty_host_cache.

The variable is read once per process, so most tests run a fresh interpreter. Policy under test:
requests of 1 MiB or more are rounded up to 64 KiB and served by the smallest cached block at most
1/8 larger; a freed block is kept while the cached bytes stay within the limit, evicting cached
blocks of other sizes (largest first) to make room; before a new allocation larger than every
cached block (the workload has outgrown them), cached blocks are released, largest first, until in
use + cached fits in the high-water mark of the bytes in use (the new block included); blocks are
never handed out while live.

Shape legend: T tokens, K slots per token, E experts, D feature dim.
"""

import pytest
import torch

from moe import ops
from moe.ops.twins import permute_torch
from tests.helpers.cpu_kernels import run_json
from tests.helpers.ops import make_ids

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

NO_CACHE = dict(cached_bytes=0, in_use_bytes=0, hits=0, misses=0, limit_bytes=0)
MiB, KiB = 1 << 20, 1 << 10

# permute outputs of `rows` float32 rows of 4 KiB (K = 1, E = 1): 256 rows per MiB. stats() is
# (cached_bytes, hits, misses).
TAKE = """
    import json
    import torch
    from moe import _C, ops
    def take(rows):
        return ops.permute(torch.ones(rows, 1024), ops.plan(torch.zeros(rows, 1, dtype=torch.long), 1))
    def stats():
        s = ops.host_cache_stats()
        return [s["cached_bytes"], s["hits"], s["misses"]]
"""


@needs_ext
def test_host_cache_default_reuses_blocks():
    code = """
        import json
        import torch
        from moe import _C, ops
        from moe.ops.twins import permute_torch
        from tests.helpers.ops import make_ids
        T, K, E, D = 256, 4, 8, 512  # permute output 1024 x 512 float32: 2 MiB
        p = ops.plan(make_ids(T, K, E), E)
        x = torch.randn(T, D)
        want = permute_torch(x, p.order_N, p.rows_TK)
        m = dict(s0=ops.host_cache_stats(), s0_C=_C.host_cache_stats())
        y = ops.permute(x, p)
        m["s1"] = ops.host_cache_stats()
        ptr = y.data_ptr()
        y.fill_(float("nan"))  # stale bytes for the next user of the block
        del y
        m["s2"] = ops.host_cache_stats()
        m["reuse"] = []
        for _ in range(3):
            y = ops.permute(x, p)
            m["reuse"].append([y.data_ptr() == ptr, torch.equal(y, want)])
            del y
        m["s3"] = ops.host_cache_stats()
        m["empty_returns_none"] = ops.empty_host_cache() is None
        m["s4"] = ops.host_cache_stats()
        m["after_empty_equal"] = torch.equal(ops.permute(x, p), want)
        print(json.dumps(m))
    """
    m = run_json(code, MOE_HOST_CACHE_MB=None)
    s0, s1, s2, s3, s4 = (m[k] for k in ("s0", "s1", "s2", "s3", "s4"))
    assert s0 == m["s0_C"] and s0["limit_bytes"] == 2048 << 20, s0
    assert s1["misses"] == s0["misses"] + 1, s1
    assert s1["in_use_bytes"] >= s0["in_use_bytes"] + (2 << 20), s1
    assert s2["in_use_bytes"] == s0["in_use_bytes"] and s2["cached_bytes"] >= 2 << 20, s2
    assert m["reuse"] == [[True, True]] * 3, m["reuse"]
    assert s3["hits"] == s2["hits"] + 3 and s3["misses"] == s2["misses"], s3
    assert s3["in_use_bytes"] == s0["in_use_bytes"], s3
    assert m["empty_returns_none"]
    assert s4["cached_bytes"] == 0 and s4["in_use_bytes"] == s0["in_use_bytes"], s4
    assert m["after_empty_equal"]


@needs_ext
def test_host_cache_off():
    code = """
        import json
        import torch
        from moe import ops
        from moe.ops.twins import permute_torch
        from tests.helpers.ops import make_ids
        T, K, E, D = 256, 4, 8, 512
        p = ops.plan(make_ids(T, K, E), E)
        x = torch.randn(T, D)
        want = permute_torch(x, p.order_N, p.rows_TK)
        equal = []
        for _ in range(3):
            y = ops.permute(x, p)
            equal.append(torch.equal(y, want))
            y.fill_(float("nan"))
            del y
        print(json.dumps(dict(equal=equal, stats=ops.host_cache_stats())))
    """
    m = run_json(code, MOE_HOST_CACHE_MB="0")
    assert m["equal"] == [True] * 3
    assert m["stats"] == NO_CACHE, m["stats"]


# (step, expected (cached_bytes, hits, misses)) of test_host_cache_full_evicts_other_sizes_largest_first;
# "peak" is the high-water mark of the bytes in use.
FULL_STEPS = [
    ("take 5", (5 * MiB, 0, 1)),
    ("take 4", (4 * MiB, 0, 2)),  # 5 > 4 + 4/8: a miss (5 is larger: kept); 5 + 4 > 8: 5 evicted
    ("y5 = take 5", (0, 0, 3)),  # larger than all cached; 5 + 4 cached > peak 5: the 4 MiB block released
    ("y4 = 3 x take 4", (0, 0, 6)),  # peak 17
    ("del y4", (8 * MiB, 0, 6)),  # two 4 MiB blocks kept; no room for the third, same size kept
    ("del y5", (5 * MiB, 0, 6)),  # both 4 MiB blocks evicted for the 5 MiB one
    ("y2, y3 = take 2, take 3", (5 * MiB, 0, 8)),  # misses, but the 5 MiB block is larger: it stays
    ("del y2", (7 * MiB, 0, 8)),
    ("del y3", (5 * MiB, 0, 8)),  # evicts the 5 MiB block, the largest, not the 2 MiB one
    ("y2, y3 = take 2, take 3 again", (0, 2, 8)),
    ("del y2, y3", (5 * MiB, 2, 8)),
    ("take 9", (5 * MiB, 2, 9)),  # outgrown, but 9 + 5 <= peak 17; over the limit: freed, nothing evicted
    ("take 255 rows", (5 * MiB, 2, 9)),  # under 1 MiB: plain malloc, not counted
    ("empty", (0, 2, 9)),
    ("take 1025 rows", (4 * MiB + 64 * KiB, 2, 10)),  # rounded up to 64 KiB
    ("take 1040 rows", (4 * MiB + 64 * KiB, 3, 10)),  # the same rounded size: a hit
    ("empty; take 1152 rows", (4608 * KiB, 3, 11)),  # a 4.5 MiB block
    ("take 1024 rows", (4608 * KiB, 4, 11)),  # 4.5 <= 4 + 4/8: a hit
    ("take 1008 rows", (4032 * KiB, 4, 12)),  # 4.5 > 3.94 + 3.94/8: a miss; freed, 4.5 evicted
]


@needs_ext
def test_host_cache_full_evicts_other_sizes_largest_first():
    """Limit 8 MiB. Each step records cached_bytes and the hit/miss counts; an output not bound to
    a name is freed at once."""
    code = TAKE + """
    steps = []
    limit = ops.host_cache_stats()["limit_bytes"]
    take(5 * 256); steps.append(stats())
    take(4 * 256); steps.append(stats())
    y5 = take(5 * 256); steps.append(stats())
    y4 = [take(4 * 256) for _ in range(3)]; steps.append(stats())
    del y4; steps.append(stats())
    del y5; steps.append(stats())
    y2, y3 = take(2 * 256), take(3 * 256); steps.append(stats())
    p2, p3 = y2.data_ptr(), y3.data_ptr()
    del y2; steps.append(stats())
    del y3; steps.append(stats())
    y2, y3 = take(2 * 256), take(3 * 256); steps.append(stats())
    same_blocks = (y2.data_ptr(), y3.data_ptr()) == (p2, p3)
    del y2, y3; steps.append(stats())
    take(9 * 256); steps.append(stats())
    take(255); steps.append(stats())
    ops.empty_host_cache(); steps.append(stats())
    take(1025); steps.append(stats())
    take(1040); steps.append(stats())
    ops.empty_host_cache()
    take(1152); steps.append(stats())
    take(1024); steps.append(stats())
    take(1008); steps.append(stats())
    in_use = ops.host_cache_stats()["in_use_bytes"]
    print(json.dumps(dict(limit=limit, steps=steps, same_blocks=same_blocks, in_use=in_use)))
    """
    m = run_json(code, MOE_HOST_CACHE_MB="8")
    assert m["limit"] == 8 * MiB
    assert len(m["steps"]) == len(FULL_STEPS)
    for (step, want), got in zip(FULL_STEPS, m["steps"]):
        assert tuple(got) == want, (step, got)
    assert m["same_blocks"]
    assert m["in_use"] == 0


@needs_ext
def test_host_cache_releases_what_a_miss_cannot_reuse():
    """Issue 18 item 12. Blocks of 1, 2 and 3 MiB live at once (peak 6 MiB), then freed: cached.
    A 4 MiB request is larger than all of them: before allocating it the cache releases the 3 and
    2 MiB blocks (largest first) until in use + cached fits in the 6 MiB peak, so the process never
    holds more than its largest working set; the 1 MiB block stays and serves the next 1 MiB
    request. (The old policy kept all 6 MiB cached next to the new 4: 10 MiB for a 6 MiB working
    set.)"""
    code = TAKE + """
    s = ops.host_cache_stats
    ys = [take(n * 256) for n in (1, 2, 3)]
    peak = s()["in_use_bytes"]
    del ys
    before = s()
    y4 = take(4 * 256)
    during = s()
    del y4
    after = s()
    y1 = take(256)
    reuse = s()
    print(json.dumps(dict(peak=peak, before=before, during=during, after=after, reuse=reuse)))
    """
    m = run_json(code, MOE_HOST_CACHE_MB=None)
    assert m["peak"] == 6 * MiB and m["before"]["cached_bytes"] == 6 * MiB, m
    d = m["during"]
    assert (d["in_use_bytes"], d["cached_bytes"], d["misses"]) == (4 * MiB, 1 * MiB, 4), d
    assert d["in_use_bytes"] + d["cached_bytes"] <= m["peak"]
    assert (m["after"]["cached_bytes"], m["after"]["in_use_bytes"]) == (5 * MiB, 0), m["after"]
    r = m["reuse"]
    assert (r["hits"], r["misses"], r["cached_bytes"]) == (1, 4, 4 * MiB), r


@needs_ext
def test_host_cache_growing_workload_stays_within_its_peak():
    """Random steps of a workload whose request size only grows (1 to ~40 MiB; each step allocates
    an output of the current size or frees a random live one; now and then the cache is emptied),
    under the default limit and an 8 MiB one: every cached block a miss finds is smaller than the
    request, so after every step in use + cached is at most the largest in-use total seen so far
    (the old policy kept the outgrown blocks), and the cached bytes at most the limit."""
    code = TAKE + """
    import random
    rng = random.Random(0)
    live, peak, rows, over = [], 0, 256, []
    limit = ops.host_cache_stats()["limit_bytes"]
    for step in range(300):
        r = rng.random()
        if r < 0.12:
            rows += rng.choice([17, 256, 700])
        if r < 0.6 or not live:
            live.append(take(rows))
        elif r < 0.98:
            live.pop(rng.randrange(len(live)))
        else:
            ops.empty_host_cache()
        st = ops.host_cache_stats()
        peak = max(peak, st["in_use_bytes"])
        over.append([st["in_use_bytes"] + st["cached_bytes"] - peak, st["cached_bytes"] - limit])
    print(json.dumps(dict(over_peak=max(o[0] for o in over), over_limit=max(o[1] for o in over),
                          rows=rows, stats=ops.host_cache_stats())))
    """
    for limit in (None, "8"):
        m = run_json(code, MOE_HOST_CACHE_MB=limit)
        assert m["over_peak"] <= 0 and m["over_limit"] <= 0, (limit, m)
        assert m["stats"]["hits"] > 0 and m["stats"]["misses"] > 0 and m["rows"] > 256 * 20, m


@needs_ext
def test_host_cache_repeated_step_reuses_every_block():
    """A step that allocates 3, 5, 2, 4 and 6 MiB, freeing each before the step ends in another
    order (peak 12 MiB in use, 20 MiB of distinct blocks): after the first steps every request is
    a hit. (A cache that bounded in use + cached by the peak at every miss would miss in every
    step; one that released the smaller blocks at every miss takes longer to settle.)"""
    code = TAKE + """
    per_step = []
    for step in range(8):
        h0, m0 = ops.host_cache_stats()["hits"], ops.host_cache_stats()["misses"]
        a = take(3 * 256); b = take(5 * 256)
        del a
        c = take(2 * 256); d = take(4 * 256)
        del b
        e = take(6 * 256)
        del c, d, e
        st = ops.host_cache_stats()
        per_step.append([st["hits"] - h0, st["misses"] - m0])
    print(json.dumps(per_step))
    """
    per_step = run_json(code, MOE_HOST_CACHE_MB=None)
    assert per_step[0] == [0, 5], per_step
    assert per_step[4:] == [[5, 0]] * 4, per_step


BAD_VALUES = ["abc", "+5", " 5", "5 ", "-1", "0x10", "1e3", "1.5", "18446744073709551616",
              "99999999999999999999999", "17592186044416"]  # 2^64 (ERANGE), SIZE_MAX >> 20 + 1


@needs_ext
def test_host_cache_bad_env_names_the_variable():
    """Only digits, without overflow: else every entry point raises a RuntimeError (never an abort)
    naming MOE_HOST_CACHE_MB and the value. It is read again until valid: "" is the default."""
    code = f"""
        import json
        import os
        import torch
        from moe import _C, ops
        from tests.helpers.ops import make_ids
        p = ops.plan(make_ids(8, 2, 3), 3)
        calls = [lambda: ops.permute(torch.randn(8, 4), p), _C.host_cache_stats, _C.host_cache_clear,
                 ops.host_cache_stats, ops.empty_host_cache]
        errors = []
        for value in {BAD_VALUES!r}:
            os.environ["MOE_HOST_CACHE_MB"] = value
            for call in calls:
                try:
                    call()
                    errors.append(None)
                except Exception as err:
                    errors.append([type(err).__name__, str(err)])
        os.environ["MOE_HOST_CACHE_MB"] = ""
        print(json.dumps(dict(n_calls=len(calls), errors=errors, limit=ops.host_cache_stats()["limit_bytes"])))
    """
    m = run_json(code, MOE_HOST_CACHE_MB="abc")
    assert m["n_calls"] == 5 and len(m["errors"]) == 5 * len(BAD_VALUES)
    for i, error in enumerate(m["errors"]):
        value = BAD_VALUES[i // 5]
        assert error is not None, f"no error for MOE_HOST_CACHE_MB={value!r} (entry point {i % 5})"
        assert error[0] == "RuntimeError", error
        assert "MOE_HOST_CACHE_MB" in error[1] and repr(value) in error[1], error[1]
    assert m["limit"] == 2048 << 20


STATS_OR_ERROR = """
    import json
    from moe import ops
    try:
        print(json.dumps(dict(stats=ops.host_cache_stats())))
    except Exception as err:
        print(json.dumps(dict(error=[type(err).__name__, str(err)])))
"""


@needs_ext
def test_host_cache_largest_accepted_limit_is_reported():
    """The largest value accepted (INT64_MAX >> 20, so limit_bytes fits an int64) is reported as it
    is; one more is rejected with the variable named."""
    m = run_json(STATS_OR_ERROR, MOE_HOST_CACHE_MB=str((1 << 43) - 1))
    assert "stats" in m and m["stats"]["limit_bytes"] == ((1 << 43) - 1) << 20, m
    m = run_json(STATS_OR_ERROR, MOE_HOST_CACHE_MB=str(1 << 43))
    assert "error" in m and m["error"][0] == "RuntimeError" and "MOE_HOST_CACHE_MB" in m["error"][1], m


def test_host_cache_wrappers_without_extension():
    """MOE_DISABLE_EXTENSION=1: the wrappers report zeros and do nothing (the variable is unread)."""
    code = """
        import json
        import sys
        import torch
        from moe import ops
        m = dict(has_extension=ops.HAS_EXTENSION, c_loaded="moe._C" in sys.modules)
        m["stats"] = ops.host_cache_stats()
        m["empty_returns_none"] = ops.empty_host_cache() is None
        p = ops.plan(torch.zeros(300, 1, dtype=torch.long), 1)
        m["permute_ones"] = bool((ops.permute(torch.ones(300, 1024), p) == 1).all())
        m["stats_after"] = ops.host_cache_stats()
        print(json.dumps(m))
    """
    m = run_json(code, MOE_DISABLE_EXTENSION="1", MOE_HOST_CACHE_MB="abc")
    assert not m["has_extension"] and not m["c_loaded"]
    assert m["stats"] == NO_CACHE, m["stats"]
    assert m["empty_returns_none"]
    assert m["permute_ones"]
    assert m["stats_after"] == m["stats"]


def big_permute_case():
    T, K, E, D = 256, 4, 8, 512  # float32 outputs of 2 MiB: served by the cache when it is on
    p = ops.plan(make_ids(T, K, E, seed=12), E)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(12))
    return p, x, permute_torch(x, p.order_N, p.rows_TK)


@needs_ext
def test_host_cache_never_hands_out_a_live_block():
    p, x, want = big_permute_case()
    live = [ops.permute(x, p), ops.permute(x, p)]
    live[1].mul_(-1)  # distinct contents for the two live outputs
    assert live[0].data_ptr() != live[1].data_ptr()
    for _ in range(4):  # churn: allocate and free same-size outputs while both stay alive
        tmp = ops.permute(x, p)
        assert tmp.data_ptr() not in {t.data_ptr() for t in live}
        tmp.fill_(float("nan"))
        live.append(ops.permute(x * 2, p))
        del tmp
    assert len({t.data_ptr() for t in live}) == len(live)
    assert torch.equal(live[0], want) and torch.equal(live[1], -want)
    assert all(torch.equal(t, permute_torch(x * 2, p.order_N, p.rows_TK)) for t in live[2:])


@needs_ext
def test_host_cache_outputs_are_resizable():
    p, x, want = big_permute_case()
    y = ops.permute(x, p)
    y.resize_(3 * y.shape[0], y.shape[1])  # grows the storage through the same allocator
    assert torch.equal(y[: want.shape[0]], want)
    y.resize_(10, y.shape[1])
    assert torch.equal(y, want[:10])
    y.resize_(2 * want.shape[0], y.shape[1])
    assert torch.equal(y[:10], want[:10])
    del y
    assert torch.equal(ops.permute(x, p), want)


@needs_ext
def test_host_cache_threads_allocate_and_free_concurrently():
    """Outputs allocated and freed from several threads at once stay intact and all come back."""
    from concurrent.futures import ThreadPoolExecutor

    p, x, want = big_permute_case()
    before = ops.host_cache_stats()["in_use_bytes"]

    def work(i):
        ys = [ops.permute(x * (i + 1), p) for _ in range(3)]
        return all(torch.equal(y, want * (i + 1)) for y in ys)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(16)))
    assert ops.host_cache_stats()["in_use_bytes"] == before
