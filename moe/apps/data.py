"""Byte-level text data for `moe demo`: the running Python's own standard library, or --data PATH.

Shape legend: B batch (windows), S sequence length (bytes per window).

No downloads, ever: the default corpus is the *.py files under sysconfig's "stdlib" directory
(site-packages and dist-packages excluded), read in sorted order. Files go to validation when
sha1(relative path) % 100 < val_percent, so the split depends only on the file names and never
on the machine's file-system order. A single --data file (or a folder whose hash split leaves
one side empty) is split by position instead: its last val_percent bytes are validation.
Batches are a pure function of (seed, step): a resumed run sees exactly the batches that an
uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

SEPARATOR = 0  # byte between files (NUL never occurs in text)
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class ByteCorpus:
    """train and val: uint8 1-D tensors of bytes; source: where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    num_files: int


def _walk(root: Path, suffix: str = "") -> list[Path]:
    """Sorted files under root ending in suffix; skips site-packages, caches and hidden dirs."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        out += [Path(dirpath, f) for f in filenames if f.endswith(suffix) and not f.startswith(".")]
    return sorted(out)


def stdlib_files() -> tuple[Path, list[Path]]:
    """(root, sorted *.py files) of the running interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, _walk(root, ".py")


def is_text_file(path: Path) -> bool:
    """The one text test of --data, for a file and for a folder's files: no NUL byte in the first
    4 KiB (as git and grep tell binary files; NUL is also the demo's file SEPARATOR)."""
    with open(path, "rb") as f:
        return b"\0" not in f.read(4096)


def _text_files(root: Path) -> list[Path]:
    """Every text file under root (is_text_file); binary ones are skipped."""
    return [p for p in _walk(root) if is_text_file(p)]


def is_validation(rel_path: str, val_percent: int) -> bool:
    """Deterministic split: sha1 of the relative path (posix), mod 100, below val_percent."""
    return int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % 100 < val_percent


def _join(chunks: list[bytes], max_bytes: int | None) -> torch.Tensor:
    out, total = [], 0
    for c in chunks:
        out.append(c + bytes([SEPARATOR]))
        total += len(c) + 1
        if max_bytes is not None and total >= max_bytes:
            break
    return _tensor(b"".join(out)[:max_bytes])


def _tensor(data: bytes) -> torch.Tensor:
    """uint8 (len(data),) tensor owning a copy of data."""
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _split_bytes(data: bytes, val_percent: int) -> tuple[torch.Tensor, torch.Tensor]:
    cut = len(data) - len(data) * val_percent // 100
    return _tensor(data[:cut]), _tensor(data[cut:])


def load_corpus(path: str | None = None, *, val_percent: int = 10,
                max_bytes: int | None = 8 << 20) -> ByteCorpus:
    """Load and split. path None: the stdlib sources; a text file: split by position (a binary file
    is a ValueError); a folder: every text file, split by path hash. max_bytes caps each split
    (None: no cap)."""
    if not 0 < val_percent < 100:
        raise ValueError(f"val_percent={val_percent} must be in (0, 100)")
    if path is None:
        root, files = stdlib_files()
        source = f"Python standard library sources ({root})"
    else:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"--data {path}: no such file or directory")
        if root.is_file():
            if not is_text_file(root):
                raise ValueError(f"--data {path} is a binary file (a NUL byte in its first 4 KiB); give "
                                 f"a text file, or a folder (whose binary files are skipped)")
            train, val = _split_bytes(root.read_bytes(), val_percent)
            if max_bytes is not None:
                train, val = train[:max_bytes], val[:max_bytes]
            return ByteCorpus(train, val, f"{root} (last {val_percent}% = validation)", 1)
        files, source = _text_files(root), str(root)
    if not files:
        raise ValueError(f"--data {path}: no text files found" if path else "no stdlib sources found")
    train_chunks, val_chunks, sizes = [], [], [0, 0]
    for p in files:  # read in sorted order until each split is full
        v = is_validation(p.relative_to(root).as_posix(), val_percent)
        if max_bytes is None or sizes[v] < max_bytes:
            (val_chunks if v else train_chunks).append(p.read_bytes())
            sizes[v] += len((val_chunks if v else train_chunks)[-1]) + 1
    if not train_chunks or not val_chunks:  # too few files for a hash split
        train, val = _split_bytes(b"".join(c + bytes([SEPARATOR]) for c in train_chunks + val_chunks),
                                  val_percent)
        return ByteCorpus(train, val, source + f" (few files: last {val_percent}% = validation)", len(files))
    return ByteCorpus(_join(train_chunks, max_bytes), _join(val_chunks, max_bytes), source, len(files))


def train_batch(data: torch.Tensor, *, step: int, seed: int, batch: int, seq_len: int) -> torch.Tensor:
    """(B, S) int64 windows of `data` at offsets drawn from a generator seeded by (seed, step)."""
    if data.numel() <= seq_len:
        raise ValueError(f"training data has {data.numel()} bytes, need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq_len, (batch,), generator=g)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def val_batches(data: torch.Tensor, *, batch: int, seq_len: int, num_batches: int) -> list[torch.Tensor]:
    """Fixed validation windows, evenly spaced over `data` (the same for every run and variant)."""
    if data.numel() <= seq_len:
        raise ValueError(f"validation data has {data.numel()} bytes, need more than seq_len={seq_len}")
    n = batch * num_batches
    starts = torch.linspace(0, data.numel() - seq_len - 1, n).long().tolist()
    windows = torch.stack([data[s:s + seq_len] for s in starts]).long()
    return list(windows.split(batch))
