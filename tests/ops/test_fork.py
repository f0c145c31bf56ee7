"""A child forked after the parent ran ops on two threads finishes its own ops (moe/ops/_extension.py
sets the child's torch threads to one, as PyTorch's DataLoader workers do; without that, GNU
OpenMP's pool, which does not survive a fork, makes the child wait forever in its first parallel
region). Run in a fresh interpreter, so a hang is a failed test, not a hung suite.

Shape legend: T tokens, K slots per token, E experts, D feature dim, Y GEMM output dim.
"""

from tests.helpers.cpu_kernels import run_json

FORK = """
    import json, multiprocessing, os, time
    import torch
    from moe import ops

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    T, K, E, D, Y = 2048, 2, 8, 256, 128
    ids = torch.randint(-1, E, (T, K), generator=g)
    x, w = torch.randn(T, D, generator=g), torch.randn(E, D, Y, generator=g)

    def work():
        p = ops.plan(ids, E)
        y = ops.unpermute(ops.grouped_mm(ops.permute(x, p), w, p.offs_E), p)
        return [float(y.double().sum()), float((x @ x.T).double().sum()), torch.get_num_threads()]

    def child(conn):
        conn.send(work())

    m = dict(parent=work())  # the parent's thread pool now exists, on 2 threads

    def wait(alive, kill, timeout=60):
        deadline = time.time() + timeout
        while alive() and time.time() < deadline:
            time.sleep(0.05)
        if alive():
            kill()
            return False
        return True

    r, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w_fd, json.dumps(work()).encode())
        finally:
            os._exit(0)
    os.close(w_fd)
    reaped = []

    def alive():
        if not reaped and os.waitpid(pid, os.WNOHANG)[0] == pid:
            reaped.append(pid)
        return not reaped

    finished = wait(alive, lambda: os.kill(pid, 9))
    if not finished:
        os.waitpid(pid, 0)
    m["os_fork"] = json.loads(os.read(r, 4096).decode()) if finished else "hung"

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(send,))
    proc.start()
    finished = wait(lambda: proc.exitcode is None, proc.kill)
    proc.join()
    m["mp_fork"] = recv.recv() if finished and recv.poll() else "hung"
    m["parent_threads_after"] = torch.get_num_threads()
    print(json.dumps(m))
"""


def test_forked_child_finishes_its_ops():
    """The parent plans, permutes, runs the grouped GEMM and a plain matmul on 2 threads, then
    forks (os.fork, and multiprocessing's "fork" context): each child runs the same on 1 thread,
    within 60 s, to the parent's values; the parent keeps its 2 threads."""
    m = run_json(FORK)
    parent = m["parent"]
    assert parent[2] == 2 and m["parent_threads_after"] == 2, m
    for how in ("os_fork", "mp_fork"):
        got = m[how]
        assert got != "hung", f"the child of {how} hung in an op"
        assert got[2] == 1, (how, got)
        for a, b in zip(got[:2], parent[:2]):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (how, got, parent)  # 1 vs 2 threads' sums
