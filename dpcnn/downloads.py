"""Downloading one file over HTTP(S), failing on a stalled or trickling server.

    download("https://example.org/x.gz", Path("x.gz.part"), timeout=30, max_bytes=10_000_000, desc="x.gz")

A socket timeout bounds each wait, not a server that sends a byte every few seconds: here a
download fails when it delivers less than MIN_BYTES (or the rest of the file) in any ``timeout``
seconds, connecting and headers included, or sends more than ``max_bytes``. A tqdm bar shows the
progress when tqdm is installed, else a log line every 25%. What is downloaded, and how it is
verified, is ``dpcnn.idx``'s business.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path

from .cli import UserError, console_shows

try:
    from tqdm import tqdm
except ImportError:  # optional extra `progress`
    tqdm = None

logger = logging.getLogger(__name__)

TIMEOUT_S = 30.0           # a download fails when it sends less than MIN_BYTES in this long
MIN_BYTES = 1 << 16        # what a download must deliver (or the rest of the file) every timeout
_CHUNK_BYTES = 1 << 16


class TransferError(UserError):
    """A download that failed in the network: refused, cut short, too slow, too large."""


class _Progress:
    """A byte counter: a tqdm bar when tqdm is installed, else a log line every 25%."""

    def __init__(self, total: int | None, desc: str):
        self.total, self.desc, self.done, self._next = total, desc, 0, 0.25
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                        disable=None if console_shows(logging.INFO, __name__) else True) if tqdm else None

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


class _StallTimer:
    """Ends a transfer that delivers less than MIN_BYTES (or the rest of the file) within
    `timeout` seconds, connecting and headers included, by shutting its socket down.

    A socket timeout alone bounds each wait, not a server that sends a byte every few seconds.
    """

    def __init__(self, timeout: float):
        self.timeout, self.expired, self._sock = timeout, False, None
        self._mark, self._got = time.monotonic(), 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpcnn-download-stall-timer", daemon=True)

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
        if self._got >= min(MIN_BYTES, MIN_BYTES if remaining is None else remaining):
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


def _timed(http_class, timer: _StallTimer):
    """A factory for http_class connections that hand their socket to `timer` once connected."""
    def make(*args, **kwargs):
        conn = http_class(*args, **kwargs)
        connect = conn.connect

        def timed_connect():
            connect()
            timer.attach(conn.sock)
        conn.connect = timed_connect
        return conn
    return make


class _TimedOpen:
    """An urllib handler whose connections report their progress to a _StallTimer."""

    def __init__(self, timer: _StallTimer):
        super().__init__()
        self.timer = timer

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_timed(http_class, self.timer), req, **kwargs)


class _HTTPHandler(_TimedOpen, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_TimedOpen, urllib.request.HTTPSHandler):
    pass


def download(url: str, tmp: Path, timeout: float, max_bytes: int, desc: str) -> None:
    """Stream `url` into the file `tmp` (the caller renames or removes it).

    Raises TransferError when the transfer fails, ends before its Content-Length, sends more
    than max_bytes, or sends less than MIN_BYTES (or the rest) in any `timeout` seconds.
    """
    too_slow = f"{url}: download too slow: less than {MIN_BYTES // 1024} KiB in {timeout:g} s (--timeout)"
    with _StallTimer(timeout) as timer:
        opener = urllib.request.build_opener(_HTTPHandler(timer), _HTTPSHandler(timer))
        try:
            with open(tmp, "wb") as f, opener.open(url, timeout=timeout) as r:
                length = r.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > max_bytes:
                    raise TransferError(f"{url}: announces {total} bytes, more than the {max_bytes} "
                                        "a copy of this file can have; refused")
                bar = _Progress(total, desc)
                try:
                    while block := r.read1(_CHUNK_BYTES):
                        f.write(block)
                        bar.update(len(block))
                        timer.progress(len(block), None if total is None else total - bar.done)
                        if bar.done > max_bytes:
                            raise TransferError(f"{url}: sent more than the {max_bytes} bytes a copy of "
                                                "this file can have; refused")
                finally:
                    bar.close()
        except (OSError, http.client.HTTPException) as e:
            if timer.expired:
                raise TransferError(too_slow) from None
            raise TransferError(f"{url}: download failed ({type(e).__name__}: {e})") from None
        if timer.expired:
            raise TransferError(too_slow)
        if total is not None and bar.done != total:
            raise TransferError(f"{url}: transfer cut short ({bar.done} of {total} bytes)")
