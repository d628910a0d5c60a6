"""MNIST-style IDX files -> a verified HDF5 file, and the ``python -m dpcnn.data`` command.

    python -m dpcnn.data prepare                        # MNIST from the public mirrors
    python -m dpcnn.data prepare --dataset fashion-mnist
    python -m dpcnn.data prepare --source ~/datasets/mnist       # four files, .gz or raw
    python -m dpcnn.data info                           # data/mnist.h5: summary, and verified?

Each of the four IDX files is verified against the SHA-256 of its uncompressed payload before
anything is written, so any mirror and any compression (or none) verifies. A file is decompressed
as a stream and never beyond the size its header states, which may not exceed the pinned size: a
gzip bomb fails after at most that many bytes. A download fails when it delivers less than 64 KiB
in ``--timeout`` seconds (a stalled or trickling server), or more than a copy of the file can
have. The HDF5 file (its layout is in ``dpcnn.data``) stores the SHA-256 of each array and is
written whole or not at all; temporaries left by killed runs (``.NAME.<pid>@<host>.tmp|.part``)
are removed when the next run starts writing the same file. No MPI is needed: run it on a
cluster's login node. ``dpcnn.data`` reads what this module writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import http.client
import io
import json
import logging
import math
import os
import socket
import struct
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Parser,
    UserError,
    add_common_flags,
    entry_point,
    open_unit_interval,
    positive_float,
    report_error,
    setup_logging,
)
from .data import (
    FORMAT_VERSION,
    ROW_CHUNK,
    SPLITS,
    DataError,
    Split,
    array_sha256,
    default_data_path,
    info_lines,
    verify,
)
from .fileio import WriteError, remove_stale_temporaries, temp_name, write_h5_atomic

try:
    from tqdm import tqdm
except ImportError:  # optional extra `progress`
    tqdm = None

logger = logging.getLogger(__name__)

FILES = {  # split -> (images file, labels file), the names used by every mirror
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TIMEOUT_S = 30.0  # a download fails when it sends less than _MIN_BYTES in this long
MAX_PAYLOAD_BYTES = 1 << 30  # an IDX file without a pinned size may not say it holds more
_CHUNK_BYTES = 1 << 16
_MIN_BYTES = 1 << 16       # what a download must deliver (or the rest of the file) every timeout
_READ_BYTES = 1 << 20      # decompression step: extra memory while reading a file


class DownloadError(DataError):
    """No mirror delivered a file that verifies (offline, blocked, or wrong files).

    offline: True when every source failed in the transfer itself (none delivered a file)."""

    def __init__(self, msg: str, offline: bool = True):
        super().__init__(msg)
        self.offline = offline


class _TransferError(DataError):
    """A download that failed in the network: refused, cut short, too slow, too large."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a data set is and how to verify it.

    sha256: file name (without .gz) -> SHA-256 of the uncompressed IDX payload, so any
        mirror and any compression (or none) verifies.
    size: file name -> bytes of the uncompressed payload. A file whose header states more is
        refused before it is decompressed, and a download larger than a compressed copy of it
        can be is cut off. Files without one are limited to MAX_PAYLOAD_BYTES.
    """

    name: str
    class_names: tuple[str, ...]
    mirrors: tuple[str, ...] = ()
    sha256: Mapping[str, str] = dataclasses.field(default_factory=dict)
    size: Mapping[str, int] = dataclasses.field(default_factory=dict)


_MNIST_SIZES = {  # 60000 and 10000 images of 28x28 (both data sets)
    "train-images-idx3-ubyte": 47040016, "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016, "t10k-labels-idx1-ubyte": 10008,
}

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        class_names=tuple(str(d) for d in range(10)),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        sha256={  # uncompressed payloads
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        size=_MNIST_SIZES,
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        sha256={  # uncompressed payloads of the official .gz files (MD5s in zalandoresearch/fashion-mnist)
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        size=_MNIST_SIZES,
    ),
}


# ----------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def _idx_header(f, name: str) -> tuple[bytes, np.dtype, tuple[int, ...], int]:
    """Read and check an IDX header from the binary stream f.

    Header: two zero bytes, a type code, the rank d, then d big-endian uint32 dimensions.
    Returns (the header's bytes, dtype, shape, size of the whole payload in bytes).
    """
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{name}: not an IDX file (only {len(head)} bytes)")
    if head[:2] != b"\x00\x00" or head[2] not in _IDX_DTYPES:
        raise DataError(f"{name}: not an IDX file (bad magic number 0x{head[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[head[2]]), head[3]
    if ndim == 0:
        raise DataError(f"{name}: IDX rank is 0, expected at least 1")
    head += f.read(4 * ndim)
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{name}: truncated header ({len(head)} bytes, rank {ndim} needs {4 + 4 * ndim})")
    shape = struct.unpack(f">{ndim}I", head[4:])
    return head, dtype, shape, len(head) + math.prod(shape) * dtype.itemsize


def _size_error(name: str, shape, dtype, want: int, have: str) -> DataError:
    what = "truncated" if have.isdigit() and int(have) < want else "too long"
    return DataError(f"{name}: {what}: header says {'x'.join(map(str, shape))} {dtype.name} "
                     f"({want} bytes), file has {have} bytes")


def read_payload(path, limit: int | None = MAX_PAYLOAD_BYTES, name: str | None = None) -> bytearray:
    """The uncompressed bytes of IDX file `path`, gzip-compressed (detected by magic) or raw.

    Streams: the header is read first, then exactly the payload size it states, so a file that
    decompresses to more (a gzip bomb) fails after that many bytes, and a header stating more
    than `limit` bytes fails before anything else is decompressed. Memory: the payload plus 1 MiB.
    `name` labels errors (default: the path).
    """
    path = Path(path)
    name = str(path) if name is None else name
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") if gz else contextlib.nullcontext(raw) as f:
                head, dtype, shape, want = _idx_header(f, name)
                if limit is not None and want > limit:
                    raise DataError(f"{name}: header says {'x'.join(map(str, shape))} {dtype.name} "
                                    f"({want} bytes), more than the {limit} bytes expected; refused")
                if not gz and os.fstat(raw.fileno()).st_size != want:
                    raise _size_error(name, shape, dtype, want, str(os.fstat(raw.fileno()).st_size))
                buf = bytearray(want)
                buf[:len(head)] = head
                pos = len(head)
                while pos < want:
                    block = f.read(min(_READ_BYTES, want - pos))
                    if not block:
                        raise _size_error(name, shape, dtype, want, str(pos))
                    buf[pos:pos + len(block)] = block
                    pos += len(block)
                if f.read(1):
                    raise _size_error(name, shape, dtype, want, "more")
                return buf
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{name}: corrupt or truncated gzip data ({e})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror or e})") from None


def parse_idx(payload: bytes | bytearray, name="IDX data") -> np.ndarray:
    """Decode a whole uncompressed IDX payload; `name` labels errors.

    Returns an array of shape (dim_1, ..., dim_d) in native byte order (a view of `payload`
    when no byte swap is needed, as for uint8).
    """
    head, dtype, shape, want = _idx_header(io.BytesIO(payload[:1024]), name)  # at most 4 + 4*255 bytes
    if len(payload) != want:
        raise _size_error(name, shape, dtype, want, str(len(payload)))
    a = np.frombuffer(payload, dtype, offset=len(head)).reshape(shape)
    return a.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path, limit: int | None = MAX_PAYLOAD_BYTES) -> np.ndarray:
    """Read an IDX file (.gz or raw), validating magic, rank and dimensions against its size."""
    return parse_idx(read_payload(path, limit), str(path))


def _verify(path: Path, name: str, info: DatasetInfo, label: str) -> tuple[np.ndarray, str]:
    """Check `path` (IDX file `name` of `info`) against its pinned SHA-256 and decode it.

    Returns (array, SHA-256 of the uncompressed payload). `label` names the file in errors.
    """
    if name not in info.sha256:
        raise DataError(f"{label}: no pinned SHA-256 for {info.name} {name}")
    payload = read_payload(path, info.size.get(name, MAX_PAYLOAD_BYTES), label)
    sha = hashlib.sha256(payload).hexdigest()
    if sha != info.sha256[name]:
        raise DataError(f"{label}: SHA-256 of the uncompressed data is {sha}, "
                        f"expected {info.sha256[name]} ({info.name} {name})")
    return parse_idx(payload, label), sha


# ----------------------------------------------------------------------------- sources

class _Progress:
    """A byte counter: a tqdm bar when tqdm is installed, else a log line every 25%."""

    def __init__(self, total: int | None, desc: str):
        self.total, self.desc, self.done, self._next = total, desc, 0, 0.25
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                        disable=None if logger.isEnabledFor(logging.INFO) else True) if tqdm else None

    def update(self, k: int):
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.total and self.done >= self._next * self.total:
            logger.info("%s: %d%% of %d bytes", self.desc, 100 * self.done // self.total, self.total)
            self._next += 0.25

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _Watchdog:
    """Ends a transfer that delivers less than _MIN_BYTES (or the rest of the file) within
    `timeout` seconds, connecting and headers included, by shutting its socket down.

    A socket timeout alone bounds each wait, not a server that sends a byte every few seconds.
    """

    def __init__(self, timeout: float):
        self.timeout, self.expired, self._sock = timeout, False, None
        self._mark, self._got = time.monotonic(), 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpcnn-download-watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def attach(self, sock) -> None:
        with self._lock:
            self._sock = sock
            if self.expired:
                self._shutdown()

    def progress(self, k: int, remaining: int | None) -> None:
        self._got += k
        if self._got >= min(_MIN_BYTES, _MIN_BYTES if remaining is None else remaining):
            self._mark, self._got = time.monotonic(), 0

    def _run(self):
        while not self._stop.wait(min(0.1, self.timeout / 4)):
            if time.monotonic() - self._mark > self.timeout:
                with self._lock:
                    self.expired = True
                    self._shutdown()
                return

    def _shutdown(self):
        if self._sock is not None:
            try:
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # wakes a blocked read
            except OSError:
                pass


def _watched(http_class, watch: _Watchdog):
    """A factory for http_class connections that hand their socket to `watch` once connected."""
    def make(*args, **kwargs):
        conn = http_class(*args, **kwargs)
        connect = conn.connect

        def watched_connect():
            connect()
            watch.attach(conn.sock)
        conn.connect = watched_connect
        return conn
    return make


class _WatchedOpen:
    """An urllib handler whose connections report their progress to a _Watchdog."""

    def __init__(self, watch: _Watchdog):
        super().__init__()
        self.watch = watch

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_watched(http_class, self.watch), req, **kwargs)


class _HTTPHandler(_WatchedOpen, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_WatchedOpen, urllib.request.HTTPSHandler):
    pass


def _download(url: str, tmp: Path, timeout: float, max_bytes: int, desc: str) -> None:
    """Stream `url` into the file `tmp` (the caller renames or removes it).

    Raises _TransferError when the transfer fails, ends before its Content-Length, sends more
    than max_bytes, or sends less than _MIN_BYTES (or the rest) in any `timeout` seconds.
    """
    too_slow = f"{url}: download too slow: less than {_MIN_BYTES // 1024} KiB in {timeout:g} s (--timeout)"
    with _Watchdog(timeout) as watch:
        opener = urllib.request.build_opener(_HTTPHandler(watch), _HTTPSHandler(watch))
        try:
            with open(tmp, "wb") as f, opener.open(url, timeout=timeout) as r:
                length = r.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > max_bytes:
                    raise _TransferError(f"{url}: announces {total} bytes, more than the {max_bytes} "
                                         "a copy of this file can have; refused")
                bar = _Progress(total, desc)
                try:
                    while block := r.read1(_CHUNK_BYTES):
                        f.write(block)
                        bar.update(len(block))
                        watch.progress(len(block), None if total is None else total - bar.done)
                        if bar.done > max_bytes:
                            raise _TransferError(f"{url}: sent more than the {max_bytes} bytes a copy of "
                                                 "this file can have; refused")
                finally:
                    bar.close()
        except (OSError, http.client.HTTPException) as e:
            if watch.expired:
                raise _TransferError(too_slow) from None
            raise _TransferError(f"{url}: download failed ({type(e).__name__}: {e})") from None
        if watch.expired:
            raise _TransferError(too_slow)
        if total is not None and bar.done != total:
            raise _TransferError(f"{url}: transfer cut short ({bar.done} of {total} bytes)")


def _download_cap(info: DatasetInfo, name: str) -> int:
    """The most bytes a gzip copy of `name` can have: its size, plus deflate's worst case."""
    n = info.size.get(name, MAX_PAYLOAD_BYTES)
    return n + n // 64 + 4096


def _fetch(name: str, *, info: DatasetInfo, urls: tuple[str, ...], cache: Path,
           timeout: float) -> tuple[np.ndarray, str]:
    """IDX file `name` from the download cache, else from the first base URL that verifies.

    A download is renamed to `cache/<name>.gz` only once complete and verified; its temporary
    file is removed on any failure, an interrupt included.
    """
    dest = cache / f"{name}.gz"
    _remove_stale(dest)
    if dest.exists():
        try:
            return _verify(dest, name, info, str(dest))
        except DataError as e:
            logger.warning("discarding cached download: %s", e)
            dest.unlink()
    created = [d for d in (cache, *cache.parents) if not d.exists()]     # deepest first
    cache.mkdir(parents=True, exist_ok=True)
    failures: list[DataError] = []
    try:
        for base in urls:
            url = base.rstrip("/") + f"/{name}.gz"
            logger.info("downloading %s", url)
            tmp = temp_name(dest, ".part")
            try:
                _download(url, tmp, timeout, _download_cap(info, name), dest.name)
                out = _verify(tmp, name, info, url)
                os.replace(tmp, dest)
                return out
            except DataError as e:
                logger.warning("%s", e)
                failures.append(e)
            finally:
                tmp.unlink(missing_ok=True)
        raise DownloadError(f"{name}.gz: none of {len(urls)} source(s) worked (last: {failures[-1]})",
                            offline=all(isinstance(e, _TransferError) for e in failures))
    finally:
        for d in created:                          # leave no empty directories behind
            try:
                d.rmdir()
            except OSError:
                pass


def _remove_stale(path: Path) -> None:
    for p in remove_stale_temporaries(path):
        logger.info("removed %s, left by a writer that is gone", p)


def _from_dir(src: Path, name: str, *, info: DatasetInfo) -> tuple[np.ndarray, str]:
    """IDX file `name` (or `name`.gz) from directory `src`, verified."""
    for cand in (src / name, src / f"{name}.gz"):
        if cand.is_file():
            return _verify(cand, name, info, str(cand))
    raise DataError(f"{src}: missing {name} (or {name}.gz)")


def _is_url(source) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


# ----------------------------------------------------------------------------- HDF5 writing

def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Exact mean and standard deviation of images / 255, via a histogram of the 256 values.

    images: (N, H, W) uint8 -> (mean, std) as Python floats (float64).
    """
    # bincount widens its input to int64: in blocks of 4 Mi values that is 32 MB, not 8 bytes a pixel
    flat, counts = images.reshape(-1), np.zeros(256, np.float64)
    for i in range(0, flat.size, 1 << 22):
        counts += np.bincount(flat[i:i + (1 << 22)], minlength=256)
    v = np.arange(256) / 255.0
    mean = counts @ v / counts.sum()
    var = counts @ (v - mean) ** 2 / counts.sum()
    return float(mean), float(np.sqrt(var))


def _check_pair(images: np.ndarray, labels: np.ndarray, split: str, num_classes: int,
                names: tuple[str, str] | None = None):
    """Images (N, H, W) or (N, H, W, C) uint8 and labels (N,) uint8 < num_classes, else DataError."""
    img, lab = names or FILES[split]
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise DataError(f"{img}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{lab}: expected (N,) uint8 labels, got {labels.shape} {labels.dtype}")
    if len(images) != len(labels):
        raise DataError(f"{lab}: {len(labels)} labels for {len(images)} images in {img}")
    if len(labels) and labels.max() >= num_classes:
        raise DataError(f"{lab}: label {labels.max()} out of range 0..{num_classes - 1}")


def write_h5(out: Path, info: DatasetInfo, arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
             sha: Mapping[str, str]) -> None:
    """Write the prepared file atomically (write_h5_atomic), chunked by rows, with a Fletcher-32
    checksum on every chunk so that a damaged file is detected when read, and the SHA-256 of
    each array as its ``sha256`` attribute, which `dpcnn.data.verify` checks.

    arrays: split -> (images (N, H, W) uint8, labels (N,) uint8). sha: file name -> SHA-256.
    """
    mean, std = pixel_stats(arrays["train"][0])

    def fill(f: h5py.File) -> None:
        f.attrs.update(dataset=info.name, class_names=json.dumps(list(info.class_names)),
                       format_version=FORMAT_VERSION, source_sha256=json.dumps(dict(sha)),
                       mean=mean, std=std, dpcnn_version=__version__)
        for split, (x, y) in arrays.items():
            g = f.create_group(split)
            g.create_dataset("images", data=x, chunks=(min(ROW_CHUNK, max(len(x), 1)), *x.shape[1:]),
                             fletcher32=True).attrs["sha256"] = array_sha256(x)
            g.create_dataset("labels", data=y, chunks=(min(ROW_CHUNK * 16, max(len(y), 1)),),
                             fletcher32=True).attrs["sha256"] = array_sha256(y)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_h5_atomic(out, fill)


# ----------------------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
COLORS = {"grey": "L", "rgb": "RGB"}


def eight_bit(im):
    """A Pillow image with 8 bits a channel: 16-bit grey (modes I;16*, and I holding 0-65535)
    scaled down by 257, as Pillow's own convert("L") would clip it to white; others unchanged."""
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max(initial=0) > 255):
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8), "L")
    return im


def folder_image(im, size: tuple[int, int], color: str = "grey") -> np.ndarray:
    """A Pillow image -> (H, W) grey or (H, W, 3) RGB uint8 resized to size = (H, W) (Lanczos),
    upright as its EXIF orientation says and 16-bit grey scaled to 8 bits: what --from-folder
    stores, and what predict feeds a model trained on such a file."""
    from PIL import Image, ImageOps

    H, W = size
    im = eight_bit(ImageOps.exif_transpose(im))
    return np.asarray(im.convert(COLORS[color]).resize((W, H), Image.Resampling.LANCZOS), dtype=np.uint8)


def read_folder(root: Path, size: tuple[int, int], color: str = "grey",
                classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """An image folder, one subfolder per class (the layout torchvision's ImageFolder and Keras's
    image_dataset_from_directory read) -> (images (N, H, W) grey or (N, H, W, 3) RGB uint8, labels
    (N,) uint8, class names, SHA-256 over every file's path and bytes).

    Classes are the subfolders in sorted order (or `classes`, for a test folder that must match);
    files are taken in sorted order, converted to grey or RGB and resized to size = (H, W).
    """
    try:
        from PIL import Image
    except ImportError:
        raise DataError('reading image folders needs Pillow: pip install "dpcnn[predict]"') from None
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected one subfolder of images per class)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is not None and found != classes:
        raise DataError(f"{root}: classes {found} differ from the training folder's {classes}")
    if len(found) < 2 or len(found) > 256:
        raise DataError(f"{root}: {len(found)} class subfolder(s), expected 2 to 256")
    H, W = size
    images, labels, h = [], [], hashlib.sha256()
    for label, name in enumerate(found):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{root / name}: no images ({', '.join(IMAGE_SUFFIXES)})")
        for p in files:                                   # one decode per file: not a hot path
            raw = p.read_bytes()
            h.update(f"{name}/{p.name}:{len(raw)}:".encode())
            h.update(raw)
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    images.append(folder_image(im, size, color))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"{p}: not a readable image ({e})") from None
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.uint8), found, h.hexdigest()


def prepare_folder(root, out, *, test=None, test_fraction: float = 0.1, size: tuple[int, int] = (28, 28),
                   color: str = "grey", seed: int = 0, name: str | None = None) -> Path:
    """Write an image folder (and a test folder, or a seeded `test_fraction` of it) as a prepared file.

    The data set is named after the folder unless `name` is given; its class names are the
    subfolders'. The file has the layout of every prepared file (see dpcnn.data), images
    (N, H, W) for grey and (N, H, W, 3) for RGB.
    """
    root, out = Path(root), Path(out)
    if out.is_dir():
        raise DataError(f"--out {out}: is a directory; give a file name, e.g. {out / (root.name + '.h5')}")
    _check_writable(out)
    x, y, classes, digest = read_folder(root, size, color)
    sha = {"train": digest}
    if test is not None:
        xt, yt, _, sha["test"] = read_folder(Path(test), size, color, classes)
    else:
        if not 0 < test_fraction < 1:
            raise DataError(f"--test-fraction {test_fraction}: expected a number between 0 and 1")
        order = np.random.default_rng(seed).permutation(len(y))
        k = max(1, round(test_fraction * len(y)))
        if k >= len(y):
            raise DataError(f"{root}: {len(y)} images are too few to hold out a test split")
        te, tr = np.sort(order[:k]), np.sort(order[k:])
        (x, y), (xt, yt) = (x[tr], y[tr]), (x[te], y[te])
        sha["test"] = f"{digest}:fraction={test_fraction}:seed={seed}"
    info = DatasetInfo(name=name or root.name, class_names=tuple(classes))
    for split, (a, b) in (("train", (x, y)), ("test", (xt, yt))):
        _check_pair(a, b, split, len(classes), names=(f"{split} images", f"{split} labels"))
    write_h5(out, info, {"train": (x, y), "test": (xt, yt)}, sha)
    logger.info("wrote %s: %d train and %d test images of %s in %d classes", out, len(y), len(yt),
                "x".join(map(str, x.shape[1:])), len(classes))
    return out


def _check_writable(out: Path) -> None:
    """WriteError unless `out` could be created: its nearest existing ancestor is a writable
    directory (checked without creating anything)."""
    d = out.absolute().parent
    while not d.exists():
        d = d.parent
    if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
        raise WriteError(f"--out {out}: cannot write there ({d} is not a writable directory)")


def _up_to_date(out: Path, info: DatasetInfo) -> bool:
    """Whether `out` is a valid prepared file of `info` (pinned checksums included) whose arrays
    all read back and match their stored SHA-256 (`dpcnn.data.verify`)."""
    try:
        with Split(out) as s:
            stored = s.source_sha256
            if s.dataset != info.name or any(stored.get(k) != v for k, v in info.sha256.items()):
                raise DataError(f"{out}: made from other data than {info.name}")
        if not verify(out):
            raise DataError(f"{out}: not verified (made before its arrays had SHA-256 checksums)")
        return True
    except DataError as e:
        logger.warning("%s; preparing it again", e)
        return False


def prepare(dataset="mnist", source=None, out=None, *, force=False,
            info: DatasetInfo | None = None, timeout: float = TIMEOUT_S) -> Path:
    """Verify the four IDX files of `dataset` and write them as one HDF5 file.

    source: None (the data set's mirrors, in order), a local directory holding the four
        files (.gz or raw), or an http(s) base URL serving the four .gz files.
    out: the HDF5 file; default data/<dataset>.h5. Downloads are kept, verified, in
        <out's directory>/downloads/<dataset>/ and reused.
    force: rewrite `out` even if it is already a valid file of this data set.
    info: the data set description (default DATASETS[dataset]); tests inject their own.
    Returns the path written (or found up to date). Raises DataError on any bad input.
    """
    if info is None:
        if dataset not in DATASETS:
            raise DataError(f"unknown data set {dataset!r}; expected one of {', '.join(DATASETS)}")
        info = DATASETS[dataset]
    out = Path(out) if out is not None else default_data_path(info.name)
    if out.is_dir():
        raise DataError(f"--out {out}: is a directory; give a file name, e.g. {out / (info.name + '.h5')}")
    _remove_stale(out)                             # temporaries of killed earlier runs
    if out.exists() and not force and _up_to_date(out, info):
        logger.info("%s is already prepared and verified; use --force to redo it", out)
        return out
    _check_writable(out)                           # before minutes of downloading and verifying
    if source is None or _is_url(source):
        urls = info.mirrors if source is None else (source,)
        if not urls:
            raise DataError(f"{info.name}: no mirrors known; give --source")
        cache = out.parent / "downloads" / info.name
        load = functools.partial(_fetch, info=info, urls=urls, cache=cache, timeout=timeout)
    else:
        src = Path(source).expanduser()
        if not src.is_dir():
            raise DataError(f"--source {source}: not a directory or an http(s) URL")
        load = functools.partial(_from_dir, src, info=info)

    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sha: dict[str, str] = {}
    for split in SPLITS:
        (x, sx), (y, sy) = (load(name) for name in FILES[split])
        _check_pair(x, y, split, len(info.class_names))
        arrays[split] = (x, y)
        sha.update(zip(FILES[split], (sx, sy), strict=True))
        if x.shape[1:] != arrays["train"][0].shape[1:]:
            raise DataError(f"{FILES[split][0]}: images are {x.shape[1:]}, training images "
                            f"{arrays['train'][0].shape[1:]}")
        logger.info("%s %s: %d images of %dx%d, verified", info.name, split, len(x), *x.shape[1:])
    write_h5(out, info, arrays, sha)
    logger.info("wrote %s", out)
    return out


# ----------------------------------------------------------------------------- command line

EPILOG = """\
examples:
  python -m dpcnn.data prepare                         MNIST from the public mirrors
  python -m dpcnn.data prepare --dataset fashion-mnist
  python -m dpcnn.data prepare --source ~/datasets/mnist
  python -m dpcnn.data prepare --source https://example.org/mnist/ --out /scratch/mnist.h5
  python -m dpcnn.data info                            data/mnist.h5: attributes, counts, verified
  python -m dpcnn.data prepare --from-folder photos/ --size 32x32 --color rgb --out data/photos.h5
                                                       your images: photos/<class>/*.png|jpg
  dpcnn-prepare --dataset mnist                        the same, as a console script

Preparing needs only numpy and h5py (no MPI), so it runs on a cluster's login node:
  pip install numpy h5py tqdm && python -m dpcnn.data prepare
"""


def _size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 28x28, got {s!r}") from None
    if not (4 <= h <= 1024 and 4 <= w <= 1024):
        raise argparse.ArgumentTypeError(f"expected sizes from 4 to 1024, got {s!r}")
    return h, w


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dpcnn.data", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Prepare MNIST-style data sets as verified HDF5 files.")
    sub = p.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    add_common_flags(common)
    pp = sub.add_parser("prepare", parents=[common], epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="download or read, verify, and write data/<dataset>.h5")
    pp.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    pp.add_argument("--from-folder", type=Path, metavar="DIR",
                    help="your own images instead: DIR holds one subfolder of images per class (PNG, JPEG, ...)")
    pp.add_argument("--test-folder", type=Path, metavar="DIR", help="with --from-folder: the test images, the "
                    "same subfolders (default: hold out --test-fraction of DIR)")
    pp.add_argument("--test-fraction", type=open_unit_interval, default=0.1,
                    help="with --from-folder and no --test-folder: the seeded share held out for testing (0.1)")
    pp.add_argument("--size", type=_size, default=(28, 28), metavar="HxW",
                    help="with --from-folder: resize every image to H x W pixels (default 28x28)")
    pp.add_argument("--color", choices=sorted(COLORS), default="grey",
                    help="with --from-folder: grey (1 channel) or rgb (3 channels); default grey")
    pp.add_argument("--source", help="directory with the four IDX files (.gz or raw), or an "
                                     "http(s) base URL; default: the public mirrors in order")
    pp.add_argument("--out", type=Path, help="output file (default: data/<dataset>.h5)")
    pp.add_argument("--force", action="store_true", help="rewrite even if up to date")
    pp.add_argument("--timeout", type=positive_float, default=TIMEOUT_S,
                    help=f"a download fails when it delivers less than {_MIN_BYTES // 1024} KiB in this many "
                         f"seconds (a stalled or trickling server); default {TIMEOUT_S:g}")
    pi = sub.add_parser("info", parents=[common],
                        help="print a prepared file's attributes and counts, and verify its arrays")
    pi.add_argument("path", type=Path, nargs="?", help="prepared file (default: data/<dataset>.h5)")
    pi.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    return p


def _info(path: Path) -> None:
    """`info`: the file's summary, then whether its arrays verify (a failure raises, after the summary)."""
    print("\n".join(info_lines(path)), flush=True)
    try:
        ok = verify(path)
    except DataError:
        print("verified       FAILED (see the error)", flush=True)
        raise
    print("verified       yes: every array matches its SHA-256" if ok else
          "verified       no: not verified, the file stores no SHA-256 of its arrays; "
          "prepare it again with --force to add them")


def offline_message(dataset: str, offline: bool, then: str) -> str:
    """The action first: which four files to copy where, and what to run then."""
    names = ", ".join(n for pair in FILES.values() for n in pair)
    why = "(offline?)" if offline else "(no source gave files that verify)"
    return f"cannot download {dataset} {why}: copy {names} (.gz or raw) into a directory and run: {then}"


def _offline_message(args, offline: bool) -> str:
    cmd = "python -m dpcnn.data prepare"
    if args.dataset != "mnist":
        cmd += f" --dataset {args.dataset}"
    cmd += " --source DIR" + (f" --out {args.out}" if args.out else "")
    return offline_message(args.dataset, offline, cmd)


@entry_point
def main(argv=None) -> int:
    """`python -m dpcnn.data prepare|info ...`; also the `dpcnn-prepare` script (no verb)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("prepare", "info", "-h", "--help"):
        argv.insert(0, "prepare")
    args = _parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        if args.command == "info":
            _info(args.path or default_data_path(args.dataset))
        elif args.from_folder is not None:
            out = args.out or default_data_path(args.from_folder.resolve().name)
            prepare_folder(args.from_folder, out, test=args.test_folder, test_fraction=args.test_fraction,
                           size=args.size, color=args.color)
        else:
            prepare(args.dataset, args.source, args.out, force=args.force, timeout=args.timeout)
        return EXIT_OK
    except KeyboardInterrupt as e:
        report_error(e, args.debug)
        return EXIT_INTERRUPTED
    except DownloadError as e:
        if args.debug:
            report_error(e, True)
        report_error(UserError(_offline_message(args, e.offline)))
        return EXIT_ERROR
    except Exception as e:
        report_error(e, args.debug)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
