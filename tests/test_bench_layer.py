"""bench.layer on a tiny shape: the best dense GEMM reference and the header's machine line (a
smoke test of the benchmark's code, not a measurement).

Shape legend: T tokens, D hidden size, F expert hidden size, E experts, K top-k.
"""

import pytest
import torch

from bench import layer
from bench.ops import machine_line
from moe import ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_carry_the_best_dense_reference(dtype):
    rows = layer.layer_rows(T=16, shapes=((64, 40, 4, 2),), dtypes=(dtype,), repeat=1,
                            skip=("hf_eager", "hf_gmm", "hf_moekit"))
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    for r in rows:
        wins = [int(w[1:]) for w in r["best_by"].split()]  # "t4 m2": GEMMs won by torch, moekit
        assert r["best_by"].startswith("t") and sum(wins) == (2 if r["mode"] == "fwd" else 6)
        assert 0 < r["best_ms"] <= r["best1_ms"]
        assert r["vs_best"] == pytest.approx(r["moekit_ms"] / r["best_ms"])
    table = layer.format_table(rows)
    assert "best ms" in table and "/best" in table and "best by" in table and "/best1" in table


def test_machine_line_names_the_cpu_and_the_gemm_path():
    line, info = machine_line(), ops.build_info()
    assert line.startswith("CPU: ") and f"{torch.get_num_threads()} threads" in line
    for dtype, path in info["cpu_gemm"].items():
        assert f"{dtype} {path}" in line
    assert f"streamed up to {info['cpu_stream_rows']} rows" in line and f"L2 {info['cpu_l2_bytes'] >> 10} KiB" in line


def test_machine_line_names_the_huge_page_setting(monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert "THP_MEM_ALLOC_ENABLE=1" in machine_line()
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert "THP_MEM_ALLOC_ENABLE=0" in machine_line() and "; THP " in machine_line()


def test_ops_bench_takes_shapes_and_tokens(capsys):
    from bench import ops as bench_ops

    bench_ops.main(["--only", "grouped_mm", "--dtype", "bfloat16", "--T", "16", "--shape", "64,48,4,2",
                    "--repeat", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("bfloat16")]
    assert [r[:6] for r in rows] == [["bfloat16", "16", "64", "48", "4", "2"]]
    with pytest.raises(SystemExit):
        bench_ops.main(["--shape", "64,48,4"])
