"""dpcnn.data downloads, against local HTTP servers on 127.0.0.1 (never the internet)."""

import gzip
import http.server
import threading

import numpy as np
import pytest
from _idx import info_for, make_arrays, payloads

from dpcnn import prepare as prep
from dpcnn.data import DataError, Split
from dpcnn.prepare import prepare


def serve(files: dict, mode="good"):
    """Start a server for `files` (URL path -> bytes); return (base URL, request log, stop).

    mode "good" serves them; "cut" announces the full Content-Length, sends half, and
    closes; "wrong" serves every file with its bytes replaced by another valid IDX file.
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
            sent = {"good": body, "cut": body[: len(body) // 2], "wrong": other}[mode]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body if mode == "cut" else sent)))
            self.end_headers()
            self.wfile.write(sent)
            self.close_connection = True

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


def leftovers(d):
    return sorted(p.name for p in d.rglob(".*") if p.suffix in (".tmp", ".part"))


def test_download_from_url(tmp_path, source, server):
    url, log = server
    out = prepare(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=5)
    arrays = make_arrays()
    with Split(out, "test") as s:
        np.testing.assert_array_equal(s.labels, arrays["test"][1])
    cache = tmp_path / "downloads" / "tiny"
    assert sorted(p.name for p in cache.iterdir()) == sorted(k.split("/")[-1] for k in source[1])
    assert leftovers(tmp_path) == [] and len(log) == 4
    prepare(source=url, out=out, info=source[2], force=True)  # verified downloads are reused
    assert len(log) == 4


def test_mirrors_tried_in_order(tmp_path, source, server, caplog):
    url, log = server
    info = prep.DatasetInfo("tiny", source[2].class_names, sha256=source[2].sha256,
                            mirrors=(url.replace("/mnist/", "/gone/"), url))
    prepare(out=tmp_path / "tiny.h5", info=info, timeout=5)
    assert log[:2] == ["/gone/train-images-idx3-ubyte.gz", "/mnist/train-images-idx3-ubyte.gz"]
    assert "HTTP Error 404" in caplog.text


@pytest.mark.parametrize("server, expect", [("cut", "transfer cut short|IncompleteRead"),
                                            ("wrong", "SHA-256 of the uncompressed data is")],
                         indirect=["server"])
def test_bad_transfers_leave_nothing(tmp_path, source, server, expect):
    url, _ = server
    out = tmp_path / "tiny.h5"
    with pytest.raises(DataError, match=expect) as e:
        prepare(source=url, out=out, info=source[2], timeout=5)
    assert "\n" not in str(e.value) and "train-images-idx3-ubyte.gz" in str(e.value)
    assert not out.exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "downloads").exists()                  # nor empty directories


def test_bad_cached_download_is_replaced(tmp_path, source, server):
    url, log = server
    cache = tmp_path / "downloads" / "tiny"
    cache.mkdir(parents=True)
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    prepare(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=5)
    assert "/mnist/t10k-labels-idx1-ubyte.gz" in log
    assert (cache / "t10k-labels-idx1-ubyte.gz").read_bytes() == source[1]["/mnist/t10k-labels-idx1-ubyte.gz"]


def test_progress_without_tqdm_logs(tmp_path, source, server, monkeypatch, caplog):
    monkeypatch.setattr(prep, "tqdm", None)
    caplog.set_level("INFO", logger="dpcnn.prepare")
    prepare(source=server[0], out=tmp_path / "tiny.h5", info=source[2], timeout=5)
    assert "train-images-idx3-ubyte.gz: 100% of" in caplog.text


def test_unreachable_server_fails_fast(tmp_path, source):
    url, _, stop = serve(source[1])
    stop()  # nothing listens on that port any more
    with pytest.raises(DataError, match="none of 1 source.*download failed"):
        prepare(source=url, out=tmp_path / "tiny.h5", info=source[2], timeout=2)


def test_prepare_command_offline_names_the_offline_command(tmp_path, source, capsys):
    url, _, stop = serve(source[1])
    stop()
    assert prep.main(["prepare", "--source", url, "--out", str(tmp_path / "d" / "x.h5"),
                              "--timeout", "2", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "python -m dpcnn.data prepare --dataset mnist --source DIR" in err[-1]
    assert not (tmp_path / "d").exists()
