"""bench.decode on a tiny shape: the rows it reports, the bound's bytes, the table (a smoke test of
the benchmark's code, not a measurement).

Shape legend: T tokens, D hidden size, F expert hidden size, E experts, K top-k.
"""

import importlib.util

import pytest

from bench import decode


def test_decode_rows_on_a_tiny_shape(monkeypatch):
    monkeypatch.setitem(decode.SHAPES, "tiny", decode.Shape(64, 40, 6, 2, "a tiny layer"))
    rows = decode.decode_rows("tiny", (1, 3), repeat=1, copy_bytes=1 << 20)
    assert [r["T"] for r in rows] == [1, 3]
    for r in rows:
        assert 1 <= r["distinct"] <= min(6, 2 * r["T"])
        assert r["rate"] > 0 and r["bound_ms"] == pytest.approx(
            decode._bytes(decode.SHAPES["tiny"], r["distinct"], False) / r["rate"] * 1e3)
        assert r["int8_x"] == pytest.approx(r["moekit_ms"] / r["int8_ms"])
        assert 0 < r["int8_err"] < 0.015
    hf = importlib.util.find_spec("transformers") is not None and decode._register_moekit()
    for r in rows if hf else ():  # transformers' block on moekit's ops: a fraction of the same bound
        assert r["hf_moekit_ms"] > 0 and r["hf_moekit_frac"] == pytest.approx(r["bound_ms"] / r["hf_moekit_ms"])
    table = decode.format_table(rows)
    assert "tiny: a tiny layer (D 64, F 40, E 6, k 2)" in table and "CPU:" in table


def test_weight_bytes():
    s = decode.Shape(8, 4, 3, 1, "")
    assert decode._bytes(s, 2, False) == 2 * 3 * 8 * 4 * 2 + 3 * 8 * 2
    assert decode._bytes(s, 2, True) == 2 * (3 * 8 * 4 + 4 * (2 * 4 + 8)) + 3 * 8 * 2
