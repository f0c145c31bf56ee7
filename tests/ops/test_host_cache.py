"""Tests for csrc/host_cache.cpp, the caching allocator of large CPU outputs (MOE_HOST_CACHE_MB),
and its wrappers moe.ops.host_cache_stats / moe.ops.empty_host_cache.

The variable is read once per process, so most tests run a fresh interpreter. Policy under test:
requests of 1 MiB or more are rounded up to 64 KiB and served by the smallest cached block at most
1/8 larger; a freed block is kept while the cached bytes stay within the limit, evicting cached
blocks of other sizes (largest first) to make room; blocks are never handed out while live.

Shape legend: T tokens, K slots per token, E experts, D feature dim.
"""

import pytest
import torch

from moe import ops
from moe.ops_torch import permute_torch
from tests._cpu_kernel_utils import run_python
from tests.test_ops import make_ids

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="moe._C extension not built")

# permute outputs of `rows` float32 rows of 4 KiB (K = 1, E = 1): 256 rows per MiB.
TAKE = """
    import torch
    from moe import _C, ops
    MiB, KiB = 1 << 20, 1 << 10
    def take(rows):
        return ops.permute(torch.ones(rows, 1024), ops.plan(torch.zeros(rows, 1, dtype=torch.long), 1))
"""


@needs_ext
def test_host_cache_default_reuses_blocks():
    code = """
        import torch
        from moe import _C, ops
        from moe.ops_torch import permute_torch
        from tests.test_ops import make_ids
        T, K, E, D = 256, 4, 8, 512  # permute output 1024 x 512 float32: 2 MiB
        p = ops.plan(make_ids(T, K, E), E)
        x = torch.randn(T, D)
        want = permute_torch(x, p.order_N, p.rows_TK)
        s0 = ops.host_cache_stats()
        assert s0 == _C.host_cache_stats() and s0["limit_bytes"] == 2048 << 20, s0
        y = ops.permute(x, p)
        s1 = ops.host_cache_stats()
        assert s1["misses"] == s0["misses"] + 1, s1
        assert s1["in_use_bytes"] >= s0["in_use_bytes"] + (2 << 20), s1
        ptr = y.data_ptr()
        y.fill_(float("nan"))  # stale bytes for the next user of the block
        del y
        s2 = ops.host_cache_stats()
        assert s2["in_use_bytes"] == s0["in_use_bytes"] and s2["cached_bytes"] >= 2 << 20, s2
        for _ in range(3):
            y = ops.permute(x, p)
            assert y.data_ptr() == ptr and torch.equal(y, want)
            del y
        s3 = ops.host_cache_stats()
        assert s3["hits"] == s2["hits"] + 3 and s3["misses"] == s2["misses"], s3
        assert s3["in_use_bytes"] == s0["in_use_bytes"], s3
        assert ops.empty_host_cache() is None
        s4 = ops.host_cache_stats()
        assert s4["cached_bytes"] == 0 and s4["in_use_bytes"] == s0["in_use_bytes"], s4
        assert torch.equal(ops.permute(x, p), want)
        print("OK")
    """
    run_python(code, MOE_HOST_CACHE_MB=None)


@needs_ext
def test_host_cache_off():
    code = """
        import torch
        from moe import ops
        from moe.ops_torch import permute_torch
        from tests.test_ops import make_ids
        T, K, E, D = 256, 4, 8, 512
        p = ops.plan(make_ids(T, K, E), E)
        x = torch.randn(T, D)
        want = permute_torch(x, p.order_N, p.rows_TK)
        for _ in range(3):
            y = ops.permute(x, p)
            assert torch.equal(y, want)
            y.fill_(float("nan"))
            del y
        s = ops.host_cache_stats()
        assert s == dict(cached_bytes=0, in_use_bytes=0, hits=0, misses=0, limit_bytes=0), s
        print("OK")
    """
    run_python(code, MOE_HOST_CACHE_MB="0")


@needs_ext
def test_host_cache_full_evicts_other_sizes_largest_first():
    """Limit 8 MiB. Each step checks cached_bytes and the hit/miss counts; an output not bound to
    a name is freed at once."""
    code = TAKE + """
    def check(cached, hits, misses):
        s = ops.host_cache_stats()
        assert (s["cached_bytes"], s["hits"], s["misses"]) == (cached, hits, misses), s

    assert ops.host_cache_stats()["limit_bytes"] == 8 * MiB
    take(5 * 256); check(5 * MiB, 0, 1)
    take(4 * 256); check(4 * MiB, 0, 2)  # 5 > 4 + 4/8: a miss; 5 + 4 > 8: 5 evicted
    y5 = take(5 * 256); check(4 * MiB, 0, 3)  # the 5 MiB block is gone
    y4 = [take(4 * 256) for _ in range(3)]; check(0, 1, 5)
    del y4; check(8 * MiB, 1, 5)  # two 4 MiB blocks kept; no room for the third, same size kept
    del y5; check(5 * MiB, 1, 5)  # both 4 MiB blocks evicted for the 5 MiB one
    y2, y3 = take(2 * 256), take(3 * 256); check(5 * MiB, 1, 7)
    p2, p3 = y2.data_ptr(), y3.data_ptr()
    del y2; check(7 * MiB, 1, 7)
    del y3; check(5 * MiB, 1, 7)  # evicts the 5 MiB block, the largest, not the 2 MiB one
    y2, y3 = take(2 * 256), take(3 * 256); check(0, 3, 7)
    assert (y2.data_ptr(), y3.data_ptr()) == (p2, p3)
    del y2, y3; check(5 * MiB, 3, 7)
    take(9 * 256); check(5 * MiB, 3, 8)  # over the limit: freed, nothing evicted
    take(255); check(5 * MiB, 3, 8)  # under 1 MiB: plain malloc, not counted

    ops.empty_host_cache(); check(0, 3, 8)
    take(1025); check(4 * MiB + 64 * KiB, 3, 9)  # rounded up to 64 KiB
    take(1040); check(4 * MiB + 64 * KiB, 4, 9)  # the same rounded size: a hit
    ops.empty_host_cache()
    take(1152); check(4608 * KiB, 4, 10)  # a 4.5 MiB block
    take(1024); check(4608 * KiB, 5, 10)  # 4.5 <= 4 + 4/8: a hit
    take(1008); check(4032 * KiB, 5, 11)  # 4.5 > 3.94 + 3.94/8: a miss, 4.5 evicted
    assert ops.host_cache_stats()["in_use_bytes"] == 0
    print("OK")
    """
    run_python(code, MOE_HOST_CACHE_MB="8")


BAD_VALUES = ["abc", "+5", " 5", "5 ", "-1", "0x10", "1e3", "1.5", "18446744073709551616",
              "99999999999999999999999", "17592186044416"]  # 2^64 (ERANGE), SIZE_MAX >> 20 + 1


@needs_ext
def test_host_cache_bad_env_names_the_variable():
    """Only digits, without overflow: else every entry point raises a RuntimeError (never an abort)
    naming MOE_HOST_CACHE_MB and the value. It is read again until valid: "" is the default."""
    code = f"""
        import os
        import torch
        from moe import _C, ops
        from tests.test_ops import make_ids
        p = ops.plan(make_ids(8, 2, 3), 3)
        calls = [lambda: ops.permute(torch.randn(8, 4), p), _C.host_cache_stats, _C.host_cache_clear,
                 ops.host_cache_stats, ops.empty_host_cache]
        for value in {BAD_VALUES!r}:
            os.environ["MOE_HOST_CACHE_MB"] = value
            for call in calls:
                try:
                    call()
                except RuntimeError as err:
                    assert "MOE_HOST_CACHE_MB" in str(err) and repr(value) in str(err), str(err)
                else:
                    raise AssertionError(f"no error for MOE_HOST_CACHE_MB={{value!r}}")
        os.environ["MOE_HOST_CACHE_MB"] = ""
        assert ops.host_cache_stats()["limit_bytes"] == 2048 << 20
        print("OK")
    """
    run_python(code, MOE_HOST_CACHE_MB="abc")


@needs_ext
def test_host_cache_largest_accepted_limit_is_reported():
    """The largest value accepted (INT64_MAX >> 20, so limit_bytes fits an int64) is reported as it
    is; one more is rejected with the variable named."""
    code = """
        from moe import ops
        assert ops.host_cache_stats()["limit_bytes"] == ((1 << 43) - 1) << 20, ops.host_cache_stats()
        print("OK")
    """
    run_python(code, MOE_HOST_CACHE_MB=str((1 << 43) - 1))
    code = """
        import pytest
        from moe import ops
        with pytest.raises(RuntimeError, match="MOE_HOST_CACHE_MB"):
            ops.host_cache_stats()
        print("OK")
    """
    run_python(code, MOE_HOST_CACHE_MB=str(1 << 43))


def test_host_cache_wrappers_without_extension():
    """MOE_DISABLE_EXTENSION=1: the wrappers report zeros and do nothing (the variable is unread)."""
    code = """
        import sys
        import torch
        from moe import ops
        assert not ops.HAS_EXTENSION and "moe._C" not in sys.modules
        s = ops.host_cache_stats()
        assert s == dict(cached_bytes=0, in_use_bytes=0, hits=0, misses=0, limit_bytes=0), s
        assert ops.empty_host_cache() is None
        p = ops.plan(torch.zeros(300, 1, dtype=torch.long), 1)
        assert (ops.permute(torch.ones(300, 1024), p) == 1).all()
        assert ops.host_cache_stats() == s
        print("OK")
    """
    run_python(code, MOE_DISABLE_EXTENSION="1", MOE_HOST_CACHE_MB="abc")


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
