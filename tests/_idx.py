"""Small generated IDX files and their DatasetInfo, for the data tests (never downloads)."""

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

from dpcnn.datasets import DatasetInfo
from dpcnn.idx import FILES

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
               np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def idx_bytes(a: np.ndarray) -> bytes:
    """The IDX encoding of array `a`: magic (0, 0, type, rank), big-endian dims, big-endian data."""
    head = bytes([0, 0, _TYPE_CODES[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    """Write `payload` to `path` (+ ".gz", compressed, when gz). Returns the path written."""
    path = Path(f"{path}.gz") if gz else Path(path)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def make_arrays(n_train=50, n_test=20, hw=(28, 28), seed=0) -> dict:
    """split -> (images (N, H, W) uint8, labels (N,) uint8 in 0..9), random but seeded."""
    rng = np.random.default_rng(seed)
    return {split: (rng.integers(0, 256, (n, *hw), dtype=np.uint8),
                    rng.integers(0, 10, n, dtype=np.uint8))
            for split, n in (("train", n_train), ("test", n_test))}


def payloads(arrays: dict) -> dict:
    """File name (e.g. "train-images-idx3-ubyte") -> uncompressed IDX bytes."""
    return {name: idx_bytes(a) for split, pair in arrays.items()
            for name, a in zip(FILES[split], pair, strict=True)}


def info_for(files: dict, name="tiny", mirrors=()) -> DatasetInfo:
    """A DatasetInfo that pins the SHA-256 and the size of each uncompressed payload in `files`."""
    return DatasetInfo(name=name, class_names=tuple("0123456789"), mirrors=tuple(mirrors),
                       sha256={k: hashlib.sha256(v).hexdigest() for k, v in files.items()},
                       size={k: len(v) for k, v in files.items()})


def make_source(directory: Path, gz=True, **kw) -> tuple[DatasetInfo, dict]:
    """Write the four IDX files into `directory`; return (their DatasetInfo, the arrays)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = make_arrays(**kw)
    files = payloads(arrays)
    for name, payload in files.items():
        write_file(directory / name, payload, gz)
    return info_for(files), arrays
