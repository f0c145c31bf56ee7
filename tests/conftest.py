"""Shared pytest setup for moekit: the ``gpu`` marker skips cleanly where CUDA is unavailable;
``text_dir``, a folder of small text files for the CLI and demo tests.

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


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A folder of 12 small text documents (a fixed seed): the demo's --data in the CLI tests."""
    d = tmp_path_factory.mktemp("text")
    g = torch.Generator().manual_seed(0)
    words = "the experts route every token through a small gated network of layers".split()
    for i in range(12):
        ids = torch.randint(0, len(words), (600,), generator=g).tolist()
        (d / f"doc{i:02d}.txt").write_text(" ".join(words[j] for j in ids))
    return d
