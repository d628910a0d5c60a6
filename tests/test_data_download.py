"""dpcnn.data downloads, against local HTTP servers on 127.0.0.1 (never the internet)."""

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _idx import info_for, make_arrays, payloads
from helpers import leftovers

from dpcnn import downloads
from dpcnn import prepare as prep
from dpcnn.datasets import DATASETS, DatasetInfo
from dpcnn.h5format import DataError, Split
from dpcnn.idx import prepare_dataset


def serve(files: dict, mode="good"):
    """Start a server for `files` (URL path -> bytes); return (base URL, request log, stop).

    mode "good" serves them; "cut" announces the full Content-Length, sends half, and
    closes; "wrong" serves every file with its bytes replaced by another valid IDX file;
    "nolength" serves them without a Content-Length; "trickle" sends the headers, then one byte
    of the body every 0.2 s; "trickle-headers" sends the status line and headers that way (both
    give up after 10 s).
    """
    log = []
    other = gzip.compress(payloads(make_arrays(seed=99))["train-images-idx3-ubyte"], mtime=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            log.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.close_connection = True
            if mode == "trickle-headers":
                return self.trickle(b"HTTP/1.0 200 OK\r\nX-Slow: " + b"a" * 100)
            sent = {"cut": body[: len(body) // 2], "wrong": other}.get(mode, body)
            self.send_response(200)
            if mode != "nolength":
                self.send_header("Content-Length", str(len(body if mode == "cut" else sent)))
            self.end_headers()
            if mode == "trickle":
                return self.trickle(sent)
            self.wfile.write(sent)

        def trickle(self, data):
            try:
                for b in data[:50]:
                    self.wfile.write(bytes([b]))
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()

    def stop():
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_port}/mnist/", log, stop


@pytest.fixture
def source():
    """(payloads by file name, .gz files by URL path, DatasetInfo pinning the payloads)."""
    files = payloads(make_arrays())
    gz = {f"/mnist/{k}.gz": gzip.compress(v, mtime=0) for k, v in files.items()}
    return files, gz, info_for(files)


@pytest.fixture
def server(request, source):
    url, log, stop = serve(source[1], getattr(request, "param", "good"))
    yield url, log
    stop()


def test_download_from_url(tmp_path, source, server):
    url, log = server
    out = prepare_dataset(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=5)
    arrays = make_arrays()
    with Split(out, "test") as s:
        np.testing.assert_array_equal(s.labels, arrays["test"][1])
    cache = tmp_path / "downloads" / "tiny"
    assert sorted(p.name for p in cache.iterdir()) == sorted(k.split("/")[-1] for k in source[1])
    assert leftovers(tmp_path) == [] and len(log) == 4
    prepare_dataset(source=url, out=out, info=source[2], force=True)  # verified downloads are reused
    assert len(log) == 4


def test_mirrors_tried_in_order(tmp_path, source, server, caplog):
    url, log = server
    info = DatasetInfo("tiny", source[2].class_names, sha256=source[2].sha256,
                            mirrors=(url.replace("/mnist/", "/gone/"), url))
    prepare_dataset(out=tmp_path / "tiny.h5", info=info, timeout=5)
    assert log[:2] == ["/gone/train-images-idx3-ubyte.gz", "/mnist/train-images-idx3-ubyte.gz"]
    assert "HTTP Error 404" in caplog.text


@pytest.mark.parametrize("server, expect", [("cut", "transfer cut short|IncompleteRead"),
                                            ("wrong", "SHA-256 of the uncompressed data is")],
                         indirect=["server"])
def test_bad_transfers_leave_nothing(tmp_path, source, server, expect):
    url, _ = server
    out = tmp_path / "tiny.h5"
    with pytest.raises(DataError, match=expect) as e:
        prepare_dataset(source=url, out=out, info=source[2], timeout=5)
    assert "\n" not in str(e.value) and "train-images-idx3-ubyte.gz" in str(e.value)
    assert not out.exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "downloads").exists()                  # nor empty directories


def test_bad_cached_download_is_replaced(tmp_path, source, server):
    url, log = server
    cache = tmp_path / "downloads" / "tiny"
    cache.mkdir(parents=True)
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    prepare_dataset(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=5)
    assert "/mnist/t10k-labels-idx1-ubyte.gz" in log
    assert (cache / "t10k-labels-idx1-ubyte.gz").read_bytes() == source[1]["/mnist/t10k-labels-idx1-ubyte.gz"]


def test_progress_without_tqdm_logs(tmp_path, source, server, monkeypatch, caplog):
    monkeypatch.setattr(downloads, "tqdm", None)
    caplog.set_level("INFO", logger="dpcnn")
    prepare_dataset(source=server[0], out=tmp_path / "tiny.h5", info=source[2], timeout=5)
    assert "train-images-idx3-ubyte.gz: 100% of" in caplog.text


def test_unreachable_server_fails_fast(tmp_path, source):
    url, _, stop = serve(source[1])
    stop()  # nothing listens on that port any more
    with pytest.raises(DataError, match="none of 1 source.*download failed"):
        prepare_dataset(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=2)


FOUR = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"


def test_prepare_command_offline_says_what_to_do_first(tmp_path, source, capsys, monkeypatch):
    url, _, stop = serve(source[1])
    stop()
    monkeypatch.chdir(tmp_path)
    assert prep.main(["prepare", "--source", url, "--timeout", "2", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: cannot download mnist (offline?): copy {FOUR} (.gz or raw) into a directory "
                       "and run: python -m dpcnn.data prepare --source DIR")
    assert "download failed" in err[0]           # the cause was logged first
    assert prep.main(["prepare", "--dataset", "fashion-mnist", "--source", url, "--out", "d/x.h5",
                      "--timeout", "2", "-q"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "run: python -m dpcnn.data prepare --dataset fashion-mnist --source DIR --out d/x.h5")
    assert not (tmp_path / "d").exists() and not (tmp_path / "data").exists()


def test_prepare_command_wrong_files_are_not_called_offline(tmp_path, source, capsys, monkeypatch):
    url, _, stop = serve(source[1], "wrong")
    monkeypatch.setitem(DATASETS, "mnist", source[2])
    try:
        assert prep.main(["prepare", "--source", url, "--out", str(tmp_path / "x.h5"), "-q"]) == 1
    finally:
        stop()
    assert "error: cannot download mnist (no source gave files that verify): copy" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hostile or broken mirrors

@pytest.mark.parametrize("server", ["trickle", "trickle-headers"], indirect=True)
def test_trickling_server_fails_within_about_the_timeout(tmp_path, source, server):
    """One byte every 0.2 s never trips a per-read timeout; less than 64 KiB in --timeout s does."""
    url, _ = server
    t = time.monotonic()
    with pytest.raises(DataError, match=r"download too slow: less than 64 KiB in 1 s \(--timeout\)"):
        prepare_dataset(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=1)
    assert time.monotonic() - t < 3
    assert leftovers(tmp_path) == [] and not (tmp_path / "downloads").exists()


def test_slow_but_steady_transfer_is_not_too_slow(tmp_path, source, server, monkeypatch):
    """A file smaller than 64 KiB counts as progress once it has all arrived."""
    url, _ = server
    real = downloads._Progress.update

    def slow(self, k):
        time.sleep(0.05)
        real(self, k)
    monkeypatch.setattr(downloads._Progress, "update", slow)
    prepare_dataset(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=0.5)


def test_oversized_downloads_are_refused(tmp_path, source):
    """A mirror sending more than a gzip copy of the pinned file can have is cut off."""
    files = dict(source[1])
    files["/mnist/train-images-idx3-ubyte.gz"] = os.urandom(100_000)     # the pinned payload is 39,216 bytes
    for mode, expect in (("good", "announces 100000 bytes, more than the 43924 "),
                         ("nolength", "sent more than the 43924 ")):
        url, _, stop = serve(files, mode)
        try:
            with pytest.raises(DataError, match=expect):
                prepare_dataset(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=5)
        finally:
            stop()
        assert leftovers(tmp_path) == []


def test_interrupted_download_leaves_nothing(tmp_path, source, server, monkeypatch):
    url, _ = server

    def interrupt(self, k):
        raise KeyboardInterrupt
    monkeypatch.setattr(downloads._Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=5)
    assert list(tmp_path.iterdir()) == []                       # no .part, no empty downloads/


BOMB = r"""
import gzip, json, resource, struct, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from _idx import info_for, make_arrays, payloads, write_file
from dpcnn.h5format import DataError
from dpcnn.idx import prepare_dataset, read_idx

resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))     # decompressing it all would need 6.4 GB
zeros = gzip.compress(bytes(16 << 20), 9, mtime=0)              # 16 MiB of zeros in 16 KB


def bomb(shape):            # an IDX header, then 6.4 GB of zeros in 6.5 MB of gzip members
    head = bytes([0, 0, 8, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    return gzip.compress(head, mtime=0) + zeros * 400


d = Path(sys.argv[1])
files = payloads(make_arrays())
for k, v in files.items():
    write_file(d / k, v, gz=True)
info, path = info_for(files), d / "train-images-idx3-ubyte.gz"
cases = [("pinned", (50, 28, 28)), ("pinned", (60000, 28, 28)), ("pinned", (100000, 1000, 1000)),
         ("unpinned", (100000, 1000, 1000)), ("unpinned", (60000, 28, 28))]     # growing memory last
for how, shape in cases:
    path.write_bytes(bomb(shape))
    base, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    try:
        prepare_dataset(source=d, out=d / "o.h5", info=info) if how == "pinned" else read_idx(path)
        err = None
    except DataError as e:
        err = str(e)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"how": how, "shape": shape, "size": path.stat().st_size, "error": err,
                      "s": time.perf_counter() - t, "peak_growth_mb": grew / 1024}))
"""


def test_gzip_bomb_fails_fast_with_small_memory(tmp_path):
    """6.5 MB of gzip that inflates to 6.4 GB: never decompressed beyond the size its header
    states (refused at once when that exceeds the pinned size), in a child limited to 3 GB."""
    tests = Path(__file__).parent
    r = subprocess.run([sys.executable, "-c", BOMB, str(tmp_path), str(tests)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(tests.parent), "OPENBLAS_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(6_000_000 < c["size"] < 7_000_000 and c["s"] < 2 for c in res), res
    expect = ["too long: header says 50x28x28 uint8 (39216 bytes), file has more",
              "header says 60000x28x28 uint8 (47040016 bytes), more than the 39216 bytes expected; refused",
              "header says 100000x1000x1000 uint8 (100000000016 bytes), more than the 39216 bytes expected",
              "more than the 1073741824 bytes expected; refused",
              "too long: header says 60000x28x28 uint8 (47040016 bytes), file has more"]
    for c, want in zip(res, expect, strict=True):
        assert c["error"] and "train-images-idx3-ubyte.gz: " in c["error"] and want in c["error"], c
    assert all(c["peak_growth_mb"] < 16 for c in res[:4]), res
    assert res[4]["peak_growth_mb"] < 47 + 16, res                        # the 47 MB it states, once
