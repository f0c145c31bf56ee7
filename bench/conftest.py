"""pytest setup for bench/: ``pytest bench/`` also collects the bench_*.py files (pytest-benchmark
suites). ``pytest`` and ``pytest tests/`` never look here (pyproject testpaths = ["tests"])."""


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
