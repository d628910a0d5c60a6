"""MNIST-style data sets from their IDX files: parsing, verifying, fetching, and preparing one.

    prepare_dataset("mnist")                                   # the public mirrors, in order
    prepare_dataset("mnist", source="~/datasets/mnist")        # four files, .gz or raw
    prepare_dataset("mnist", source="https://example.org/mnist/", out="/scratch/mnist.h5")

Each of the four IDX files is verified against the SHA-256 of its uncompressed payload (pinned in
``dpcnn.datasets``) before anything is written, so any mirror and any compression (or none)
verifies. A file is decompressed as a stream and never beyond the size its header states, which
may not exceed the pinned size: a gzip bomb fails after at most that many bytes. Downloads
(``dpcnn.downloads``) are kept, verified, in ``<out's directory>/downloads/<dataset>/`` and
reused. The prepared file (``dpcnn.h5format``) is written whole or not at all; temporaries left
by killed runs (``.NAME.<pid>@<host>.tmp|.part``) are removed when the next run starts writing
the same file. No MPI is needed.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .datasets import DATASETS, DatasetInfo
from .downloads import TIMEOUT_S, TransferError, download
from .fileio import remove_stale_temporaries, temp_name
from .h5format import (
    SPLITS,
    DataError,
    Split,
    check_pair,
    check_replaceable,
    check_writable,
    default_data_path,
    verify,
    write_h5,
)

logger = logging.getLogger(__name__)

FILES = {  # split -> (images file, labels file), the names used by every mirror
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MAX_PAYLOAD_BYTES = 1 << 30  # an IDX file without a pinned size may not say it holds more
_READ_BYTES = 1 << 20        # decompression step: extra memory while reading a file


class DownloadError(DataError):
    """No mirror delivered a file that verifies (offline, blocked, or wrong files).

    offline: True when every source failed in the transfer itself (none delivered a file)."""

    def __init__(self, msg: str, offline: bool = True):
        super().__init__(msg)
        self.offline = offline


def offline_message(dataset: str, offline: bool, then: str) -> str:
    """The action first: which four files to copy where, and what to run then."""
    names = ", ".join(n for pair in FILES.values() for n in pair)
    why = "(offline?)" if offline else "(no source gave files that verify)"
    return f"cannot download {dataset} {why}: copy {names} (.gz or raw) into a directory and run: {then}"


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
    failures: list[DataError | TransferError] = []
    try:
        for base in urls:
            url = base.rstrip("/") + f"/{name}.gz"
            logger.info("downloading %s", url)
            tmp = temp_name(dest, ".part")
            try:
                download(url, tmp, timeout, _download_cap(info, name), dest.name)
                out = _verify(tmp, name, info, url)
                os.replace(tmp, dest)
                return out
            except (DataError, TransferError) as e:
                logger.warning("%s", e)
                failures.append(e)
            finally:
                tmp.unlink(missing_ok=True)
        raise DownloadError(f"{name}.gz: none of {len(urls)} source(s) worked (last: {failures[-1]})",
                            offline=all(isinstance(e, TransferError) for e in failures))
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


# ----------------------------------------------------------------------------- preparing

def _up_to_date(out: Path, info: DatasetInfo) -> bool:
    """Whether `out` is a valid prepared file of `info` (pinned checksums included) whose arrays
    all read back and match their stored SHA-256 (`verify`)."""
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


def prepare_dataset(dataset="mnist", source=None, out=None, *, force=False, info: DatasetInfo | None = None,
                    timeout: float = TIMEOUT_S, source_flag: str = "--source", out_flag: str = "--out") -> Path:
    """Verify the four IDX files of `dataset` and write them as one HDF5 file.

    source: None (the data set's mirrors, in order), a local directory holding the four
        files (.gz or raw), or an http(s) base URL serving the four .gz files.
    out: the HDF5 file; default data/<dataset>.h5. Downloads are kept, verified, in
        <out's directory>/downloads/<dataset>/ and reused.
    force: rewrite `out` even if it is already a valid file of this data set. A file at `out` that
        is not one of this data set (a checkpoint, a --from-folder file, ...) is never replaced.
    info: the data set description (default DATASETS[dataset]); tests inject their own.
    source_flag, out_flag: the caller's names for `source` and `out` in messages (the trainer's
        are --data-source and --data).
    Returns the path written (or found up to date). Raises DataError on any bad input.
    """
    if info is None:
        if dataset not in DATASETS:
            raise DataError(f"unknown data set {dataset!r}; expected one of {', '.join(DATASETS)}")
        info = DATASETS[dataset]
    out = Path(out) if out is not None else default_data_path(info.name)
    if out.is_dir():
        raise DataError(f"{out_flag} {out}: is a directory; give a file name, e.g. {out / (info.name + '.h5')}")
    _remove_stale(out)                             # temporaries of killed earlier runs
    where = None if source is None else source if _is_url(source) else str(Path(source).expanduser().absolute())
    made = {"kind": "idx", "dataset": info.name, "source": where}
    check_replaceable(out, made, out_flag)
    if out.exists() and not force and _up_to_date(out, info):
        logger.info("%s is already prepared and verified; use --force to redo it", out)
        return out
    check_writable(out, out_flag)                  # before minutes of downloading and verifying
    if source is None or _is_url(source):
        urls = info.mirrors if source is None else (source,)
        if not urls:
            raise DataError(f"{info.name}: no mirrors known; give {source_flag}")
        cache = out.parent / "downloads" / info.name
        load = functools.partial(_fetch, info=info, urls=urls, cache=cache, timeout=timeout)
    else:
        src = Path(source).expanduser()
        if not src.is_dir():
            raise DataError(f"{source_flag} {source}: not a directory or an http(s) URL")
        load = functools.partial(_from_dir, src, info=info)

    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sha: dict[str, str] = {}
    for split in SPLITS:
        (x, sx), (y, sy) = (load(name) for name in FILES[split])
        check_pair(x, y, len(info.class_names), FILES[split])
        arrays[split] = (x, y)
        sha.update(zip(FILES[split], (sx, sy), strict=True))
        if x.shape[1:] != arrays["train"][0].shape[1:]:
            raise DataError(f"{FILES[split][0]}: images are {x.shape[1:]}, training images "
                            f"{arrays['train'][0].shape[1:]}")
        logger.info("%s %s: %d images of %dx%d, verified", info.name, split, len(x), *x.shape[1:])
    write_h5(out, info, arrays, sha, made)
    logger.info("wrote %s", out)
    return out
