"""moekit benchmarks: speed is measured here only, as ratios against baselines in the same run.

``python -m bench.ops`` prints the op table (grouped GEMM and dispatch); ``bench/bench_ops.py``
holds the pytest-benchmark versions (``pytest bench/bench_ops.py``).
"""
