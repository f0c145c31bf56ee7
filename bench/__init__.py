"""moekit benchmarks: speed is measured here only, as ratios against baselines in the same run.

``python -m bench.ops`` prints the op table (grouped GEMM and dispatch); ``bench/bench_ops.py``
holds the pytest-benchmark versions (``pytest bench/bench_ops.py``). Run them from the repository
root (``python -m bench.<name>``; no path edits): bench/ is not installed with the wheel, and
``moe bench`` runs each module in a child process whose working directory is that root.
"""
