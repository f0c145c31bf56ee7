"""Shared pytest setup for moekit: the ``gpu`` marker skips cleanly where CUDA is unavailable.

Nothing here touches CUDA at import time; ``torch.cuda.is_available()`` is asked once, at
collection, and only when some collected test carries the marker.
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped cleanly without one)")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
