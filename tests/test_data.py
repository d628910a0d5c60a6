"""dpcnn.data: IDX reading, verified HDF5 preparation, validation on open, and sharding."""

import dataclasses
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from _idx import idx_bytes, info_for, make_arrays, make_source, payloads, write_file
from helpers import leftovers

from dpcnn import h5format
from dpcnn.data import ShardedLoader, epoch_order, num_batches, shard_bounds
from dpcnn.datasets import DATASETS, DatasetInfo
from dpcnn.h5format import FORMAT_VERSION, DataError, Split, write_h5
from dpcnn.idx import FILES, prepare_dataset, read_idx
from dpcnn.prepare import main as prepare_main

ROOT = Path(__file__).resolve().parents[1]


def one_line(e) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in msg
    return msg


@pytest.fixture
def prepared(tmp_path):
    """(path of a prepared tiny HDF5 file, its arrays): 50 train / 20 test 28x28 images."""
    info, arrays = make_source(tmp_path / "src")
    return prepare_dataset(source=tmp_path / "src", out=tmp_path / "tiny.h5", info=info), arrays


# ----------------------------------------------------------------------------- IDX reader

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("a", [np.arange(60, dtype=np.uint8).reshape(3, 4, 5),
                               np.array([-3, 7, 300], dtype=np.int16),
                               np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)])
def test_read_idx_round_trip(tmp_path, a, gz):
    path = write_file(tmp_path / "a-idx", idx_bytes(a), gz)
    b = read_idx(path)
    assert b.dtype == a.dtype and b.dtype.isnative
    np.testing.assert_array_equal(b, a)


GOOD = idx_bytes(np.zeros((4, 28, 28), np.uint8))


@pytest.mark.parametrize("payload, expect", [
    (GOOD[:-1], "truncated: header says 4x28x28 uint8 (3152 bytes), file has 3151 bytes"),
    (GOOD + b"\0", "too long"),
    (b"\x00\x00\x07\x03" + GOOD[4:], "bad magic number 0x00000703"),
    (b"\x01" + GOOD[1:], "bad magic number"),
    (b"\x00\x00\x08\x00", "rank is 0"),
    (GOOD[:10], "truncated header"),
    (b"\x00\x00", "not an IDX file"),
])
def test_read_idx_rejects_bad_files(tmp_path, payload, expect):
    path = write_file(tmp_path / "bad-idx3-ubyte", payload, gz=False)
    with pytest.raises(DataError, match="bad-idx3-ubyte") as e:
        read_idx(path)
    assert expect in one_line(e)


def test_read_idx_truncated_gzip_and_missing(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(GOOD)[:-20])
    with pytest.raises(DataError, match=r"cut\.gz: corrupt or truncated gzip") as e:
        read_idx(path)
    one_line(e)
    with pytest.raises(DataError, match="nope: no such file"):
        read_idx(tmp_path / "nope")


# ----------------------------------------------------------------------------- prepare

def test_prepare_round_trip(tmp_path, prepared):
    path, arrays = prepared
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["dataset"] == "tiny" and a["format_version"] == FORMAT_VERSION
        assert json.loads(a["class_names"]) == list("0123456789")
        files = payloads(arrays)
        assert json.loads(a["source_sha256"]) == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
        x = arrays["train"][0] / 255.0
        assert a["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert a["std"] == pytest.approx(x.std(), rel=1e-12)
        for split, (x, y) in arrays.items():
            g = f[split]
            assert g["images"].dtype == np.uint8 and g["labels"].dtype == np.uint8
            assert g["images"].chunks[1:] == (28, 28)  # chunked by rows
            np.testing.assert_array_equal(g["images"][...], x)
            np.testing.assert_array_equal(g["labels"][...], y)
    assert leftovers(tmp_path) == []


def test_prepare_accepts_raw_files_and_skips_when_up_to_date(tmp_path, caplog):
    info, _ = make_source(tmp_path / "src", gz=False)
    out = tmp_path / "d" / "tiny.h5"
    prepare_dataset(source=tmp_path / "src", out=out, info=info)
    stamp = out.stat().st_mtime_ns
    caplog.set_level("INFO", logger="dpcnn")
    assert prepare_dataset(source=tmp_path / "src", out=out, info=info) == out
    assert out.stat().st_mtime_ns == stamp and "already prepared" in caplog.text
    os.utime(out, ns=(0, 0))
    prepare_dataset(source=tmp_path / "src", out=out, info=info, force=True)
    assert out.stat().st_mtime_ns != 0


def test_prepare_keeps_an_unreadable_output_and_says_so(tmp_path):
    """What is at --out and cannot be read may be anyone's: it is not replaced (it used to be)."""
    info, _ = make_source(tmp_path / "src")
    out = tmp_path / "tiny.h5"
    out.write_bytes(b"half a file")
    with pytest.raises(DataError, match=r"tiny\.h5: is not an HDF5 file; not replaced by tiny \(give another --out, "
                                        r"or move it away first\)$"):
        prepare_dataset(source=tmp_path / "src", out=out, info=info, force=True)
    assert out.read_bytes() == b"half a file"
    out.unlink()
    prepare_dataset(source=tmp_path / "src", out=out, info=info)
    with Split(out) as s:
        assert s.n == 50


def test_prepare_rejects_wrong_checksum_and_leaves_nothing(tmp_path):
    info, _ = make_source(tmp_path / "src")
    bad = dict(info.sha256, **{"t10k-labels-idx1-ubyte": "0" * 64})
    info = DatasetInfo("tiny", info.class_names, sha256=bad)
    out = tmp_path / "tiny.h5"
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: SHA-256 of the uncompressed") as e:
        prepare_dataset(source=tmp_path / "src", out=out, info=info)
    one_line(e)
    assert not out.exists() and leftovers(tmp_path) == []


def test_prepare_source_errors(tmp_path):
    info, _ = make_source(tmp_path / "src")
    (tmp_path / "src" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"src: missing train-labels-idx1-ubyte \(or train-labels"):
        prepare_dataset(source=tmp_path / "src", out=tmp_path / "o.h5", info=info)
    with pytest.raises(DataError, match="--source .*nowhere: not a directory or an http"):
        prepare_dataset(source=str(tmp_path / "nowhere"), out=tmp_path / "o.h5", info=info)
    with pytest.raises(DataError, match="unknown data set 'cifar'"):
        prepare_dataset("cifar", out=tmp_path / "o.h5")


def _pinned_source(tmp_path, arrays):
    """Write `arrays` (possibly inconsistent) as a source whose checksums verify."""
    files = payloads(arrays)
    for name, payload in files.items():
        write_file(tmp_path / "src" / name, payload, gz=True)
    return info_for(files)


def test_prepare_rejects_inconsistent_files(tmp_path):
    (tmp_path / "src").mkdir()
    arrays = make_arrays()
    arrays["train"] = (arrays["train"][0], arrays["train"][1][:-1])
    info = _pinned_source(tmp_path, arrays)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: 49 labels for 50 images"):
        prepare_dataset(source=tmp_path / "src", out=tmp_path / "o.h5", info=info)
    arrays = make_arrays()
    arrays["test"][1][3] = 10
    info = _pinned_source(tmp_path, arrays)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: label 10 out of range 0\.\.9"):
        prepare_dataset(source=tmp_path / "src", out=tmp_path / "o.h5", info=info)
    arrays = make_arrays()
    arrays["test"] = (arrays["test"][0][:, :14, :14].copy(), arrays["test"][1])
    info = _pinned_source(tmp_path, arrays)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: images are \(14, 14\), training"):
        prepare_dataset(source=tmp_path / "src", out=tmp_path / "o.h5", info=info)
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("how", ["raw", "gzip level 1", "gzip with a name and mtime"])
def test_any_compression_of_the_pinned_payloads_verifies(tmp_path, how):
    """The pins are of the uncompressed payloads: a raw or recompressed copy verifies the same."""
    files = payloads(make_arrays())
    src = tmp_path / "src"
    src.mkdir()
    for k, v in files.items():
        if how == "raw":
            (src / k).write_bytes(v)
        else:
            with open(src / f"{k}.gz", "wb") as f, gzip.GzipFile(
                    k, "wb", compresslevel=1 if "1" in how else 9, fileobj=f, mtime=0 if "1" in how else 12345) as g:
                g.write(v)
    out = prepare_dataset(source=src, out=tmp_path / "t.h5", info=info_for(files))
    assert Split(out).source_sha256 == info_for(files).sha256


FASHION_SHA256 = {  # uncompressed payloads of the official Fashion-MNIST .gz files
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def test_registry():
    assert set(DATASETS) == {"mnist", "fashion-mnist"}
    for info in DATASETS.values():
        assert len(info.class_names) == 10 and info.mirrors
        names = sorted(n for pair in FILES.values() for n in pair)
        assert sorted(info.sha256) == sorted(info.size) == names       # every file pinned, uncompressed
        assert all(len(v) == 64 for v in info.sha256.values())
    assert DATASETS["fashion-mnist"].sha256 == FASHION_SHA256
    assert DATASETS["fashion-mnist"].size == DATASETS["mnist"].size
    assert DATASETS["mnist"].size["train-images-idx3-ubyte"] == 16 + 60000 * 28 * 28
    assert DATASETS["fashion-mnist"].class_names[9] == "Ankle boot"
    assert h5format.default_data_path("fashion-mnist") == Path("data/fashion-mnist.h5")


# ----------------------------------------------------------------------------- Split

def test_split_reads_standardised(prepared):
    path, arrays = prepared
    with Split(path, "test") as s:
        assert (s.n, s.image_shape, s.num_classes, s.dataset) == (20, (28, 28), 10, "tiny")
        x, y = s.read(3, 11)
        assert x.shape == (8, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int64
        ref = (arrays["test"][0][3:11, :, :, None] / 255.0 - s.mean) / s.std
        np.testing.assert_allclose(x, ref, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(y, arrays["test"][1][3:11])
        assert len(s.fingerprint) == 64 and s.fingerprint == Split(path, "train").fingerprint
    with Split(path) as s:  # standardising the training set gives mean 0, std 1
        x, _ = s.read(0, s.n)
        assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-5


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def _replace(group, name, value):
    del group[name]
    group[name] = value


@pytest.mark.parametrize("edit, expect", [
    (lambda f: f.attrs.__setitem__("format_version", 2), "format version 2, this dpcnn reads 1"),
    (lambda f: f.attrs.__delitem__("format_version"), "not a dpcnn data file"),
    (lambda f: f.attrs.__delitem__("class_names"), "missing attribute class_names"),
    (lambda f: f.attrs.__setitem__("class_names", "[oops"), "missing or malformed attribute"),
    (lambda f: f.attrs.__setitem__("format", "dpcnn-checkpoint"), "is a dpcnn checkpoint, not a data file"),
    (lambda f: f.attrs.__setitem__("std", 0.0), "bad pixel statistics"),
    (lambda f: f.__delitem__("train"), "no train/images and train/labels"),
    (lambda f: _replace(f["train"], "images", np.zeros((50, 784), np.uint8)),
     r"train/images is \(50, 784\) uint8, expected \(N, H, W\) or \(N, H, W, C\) uint8"),
    (lambda f: _replace(f["train"], "images", np.zeros((50, 28, 28), np.float32)), "float32"),
    (lambda f: _replace(f["train"], "labels", np.zeros(49, np.uint8)),
     r"labels is \(49,\) uint8, expected \(50,\)"),
    (lambda f: _replace(f["train"], "labels", np.full(50, 12, np.uint8)), r"has label 12, expected 0\.\.9"),
])
def test_split_validation(prepared, edit, expect):
    path, _ = prepared
    _edit(path, edit)
    with pytest.raises(DataError, match=path.name) as e:
        Split(path)
    assert re.search(expect, one_line(e))


def test_a_file_of_one_class_says_so(prepared, tmp_path, capsys):
    """A 1-class file was refused by the trainer as a bad --channels/--kernel/--hidden: the file
    says it has one class, and write_h5 does not write one."""
    from dpcnn.train import main as train_main
    path, _ = prepared
    _edit(path, lambda f: (f.attrs.__setitem__("class_names", json.dumps(["cat"])),
                           _replace(f["train"], "labels", np.zeros(50, np.uint8)),
                           _replace(f["test"], "labels", np.zeros(20, np.uint8))))
    said = f"{path}: has one class ('cat'); a classifier needs at least 2 (the class_names attribute)"
    with pytest.raises(DataError) as e:
        Split(path)
    assert one_line(e) == said
    assert train_main(["--data", str(path), "--out", str(tmp_path / "run"), "--comm", "serial", "-q"]) == 1
    assert capsys.readouterr().err == f"error: {said}\n"
    one = {s: (np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.uint8)) for s in ("train", "test")}
    with pytest.raises(DataError, match=r"^one: has one class \('cat'\); a classifier needs at least 2$"):
        write_h5(tmp_path / "one.h5", DatasetInfo("one", ("cat",)), one, {})
    assert not (tmp_path / "one.h5").exists()


def test_split_open_errors(tmp_path, prepared):
    with pytest.raises(DataError, match="no such file; run `python -m dpcnn.data prepare`"):
        Split(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="junk.h5: not a readable HDF5 file"):
        Split(tmp_path / "junk.h5")
    with pytest.raises(DataError, match="split 'val'"):
        Split(prepared[0], "val")


def test_split_opens_without_file_locks(prepared):
    """Another process holds the file open for writing (an exclusive HDF5 lock): reads still work."""
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r+');"
                               "print('ready', flush=True); sys.stdin.read()", str(prepared[0])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        with Split(prepared[0]) as a, Split(prepared[0], "test") as b:
            assert (a.n, b.n) == (50, 20)
    finally:
        holder.communicate("")


def test_read_rows_matches_fancy_indexing(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (5000, 3, 2), dtype=np.uint8)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        ds = f.create_dataset("x", data=x, chunks=(64, 3, 2))
        for idx in (np.array([], np.int64), np.array([0]), np.array([4999]),
                    np.sort(np.random.default_rng(2).choice(5000, 1234, replace=False)), np.arange(5000)):
            np.testing.assert_array_equal(h5format._read_rows(ds, idx, block=256), x[idx])


# ----------------------------------------------------------------------------- sharding (closed form)

def test_epoch_order():
    a = epoch_order(1000, seed=7, epoch=3)
    assert a.dtype == np.int64 and np.array_equal(np.sort(a), np.arange(1000))
    np.testing.assert_array_equal(a, epoch_order(1000, 7, 3))
    assert not np.array_equal(a, epoch_order(1000, 7, 4))
    assert not np.array_equal(a, epoch_order(1000, 8, 3))


def test_num_batches():
    assert [num_batches(10, 3, True), num_batches(10, 3, False), num_batches(9, 3, False)] == [3, 4, 3]
    assert num_batches(2, 3, True) == 0
    with pytest.raises(ValueError):
        num_batches(10, 0, True)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_shard_bounds_partition(size):
    for m in range(0, 23):
        b = [shard_bounds(m, r, size) for r in range(size)]
        assert b[0][0] == 0 and b[-1][1] == m
        assert all(b[r][1] == b[r + 1][0] for r in range(size - 1))
        sizes = [hi - lo for lo, hi in b]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert shard_bounds(10, 2, 4) == (6, 8) and shard_bounds(2, 3, 4) == (2, 2)
    with pytest.raises(ValueError):
        shard_bounds(4, size, size)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("batch_size", [7, 8, 16])
def test_union_of_rank_slices_is_the_global_batch(prepared, drop_last, batch_size):
    """For P = 1..4 the ranks' slices of global batch k concatenate to the same batch."""
    path, arrays = prepared
    images, labels = arrays["train"]
    s = Split(path)
    steps = num_batches(50, batch_size, drop_last)
    for epoch in (0, 1):
        order = epoch_order(50, 5, epoch)
        seen = []
        for k in range(steps):
            idx = order[k * batch_size:(k + 1) * batch_size]
            want_x, _ = s.read(0, 50)
            for P in (1, 2, 3, 4):
                parts = [ShardedLoader(s, batch_size=batch_size, rank=r, size=P, seed=5,
                                       drop_last=drop_last).batch(epoch, k) for r in range(P)]
                assert all(M == len(idx) for _, _, M in parts)
                assert max(len(y) for _, y, _ in parts) - min(len(y) for _, y, _ in parts) <= 1
                np.testing.assert_array_equal(np.concatenate([y for _, y, _ in parts]), labels[idx])
                np.testing.assert_array_equal(np.concatenate([x for x, _, _ in parts]), want_x[idx])
            seen.extend(idx)
        if not drop_last:  # every sample exactly once per epoch
            assert sorted(seen) == list(range(50))
        else:
            assert len(seen) == len(set(seen)) == steps * batch_size


def test_loader_is_independent_of_request_history(prepared):
    s = Split(prepared[0])
    kw = dict(batch_size=8, rank=1, size=3, seed=11)
    used = ShardedLoader(s, **kw)
    for e in (0, 1, 2):
        for k in range(used.steps_per_epoch):
            used.batch(e, k)
    fresh = ShardedLoader(s, **kw)                 # e.g. a resume at batch 2 of epoch 1
    assert fresh.steps_per_epoch == 6
    for k in range(2, fresh.steps_per_epoch):
        a, b = used.batch(1, k), fresh.batch(1, k)
        assert a[2] == b[2]
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_loader_reads_only_its_rows(prepared):
    s = Split(prepared[0])
    for P in (1, 2, 4):
        L = ShardedLoader(s, batch_size=10, rank=P - 1, size=P, seed=0)
        L.batch(0, 0)
        lo, hi = shard_bounds(10, P - 1, P)
        assert len(L._images) == L.steps_per_epoch * (hi - lo)  # about N/P rows, not N


def test_loader_edge_cases(prepared):
    s = Split(prepared[0])
    x, y, M = ShardedLoader(s, batch_size=2, rank=3, size=4, seed=0).batch(0, 0)
    assert x.shape == (0, 28, 28, 1) and y.shape == (0,) and M == 2
    with pytest.raises(DataError, match="batch size 64 exceeds the 50 train samples"):
        ShardedLoader(s, batch_size=64, rank=0, size=1, seed=0)
    with pytest.raises(IndexError):
        ShardedLoader(s, batch_size=8, rank=0, size=1, seed=0).batch(0, 6)
    plain = ShardedLoader(s, batch_size=8, rank=0, size=1, seed=0, shuffle=False, drop_last=False)
    np.testing.assert_array_equal(plain.batch(3, 6)[1], prepared[1]["train"][1][48:])


# ----------------------------------------------------------------------------- command line

def test_cli_prepare_and_info(tmp_path, monkeypatch, capsys):
    info, arrays = make_source(tmp_path / "src")
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(info, name="mnist"))
    out = tmp_path / "m.h5"
    assert prepare_main(["prepare", "--source", str(tmp_path / "src"), "--out", str(out), "-q"]) == 0
    assert prepare_main(["--source", str(tmp_path / "src"), "--out", str(out), "--force", "-q"]) == 0
    assert prepare_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    counts = " ".join(map(str, np.bincount(arrays["test"][1], minlength=10)))
    assert "dataset        mnist" in text and f"test           20 x 28x28, per class: {counts}" in text


def test_prepare_replaces_only_a_file_of_the_same_data_set(tmp_path, monkeypatch, capsys):
    """`prepare --out runs/x/best.h5` said "is a dpcnn checkpoint ... preparing it again" and overwrote
    the checkpoint: what is not a data file of this data set is never replaced, --force or not."""
    info, _ = make_source(tmp_path / "src")
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(info, name="mnist"))
    checkpoint = tmp_path / "best.h5"
    with h5py.File(checkpoint, "w") as f:                 # what dpcnn.checkpoint writes, in short
        f.attrs.update(format="dpcnn-checkpoint", format_version=2)
        f["params"] = np.arange(10.0)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    fashion = prepare_dataset(source=tmp_path / "src", out=tmp_path / "fashion.h5",
                              info=dataclasses.replace(info, name="fashion-mnist"))
    dangling = tmp_path / "link.h5"
    dangling.symlink_to(tmp_path / "gone.h5")
    capsys.readouterr()
    for path, what in ((checkpoint, "is a dpcnn checkpoint, not a data file"), (notes, "is not an HDF5 file"),
                       (foreign, "is an HDF5 file but not a dpcnn data file"), (dangling, "is a link to nothing"),
                       (fashion, "holds fashion-mnist, prepared from its IDX files")):
        before = path.read_bytes() if path.exists() else None
        for force in ([], ["--force"]):
            assert prepare_main(["prepare", "--source", str(tmp_path / "src"), "--out", str(path), *force]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"error: --out {path}: {what}; not replaced by mnist"), err
        assert (path.read_bytes() if path.exists() else None) == before and dangling.is_symlink()
    assert "it is prepared again with: python -m dpcnn.data prepare --dataset fashion-mnist --source" in err


def test_cli_info_defaults_to_the_data_path_of_the_dataset(tmp_path, monkeypatch, capsys):
    """`info` without a path reads data/mnist.h5, like every other command; --dataset picks data/<dataset>.h5."""
    info, _ = make_source(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    prepare_dataset(source=tmp_path / "src", out=Path("data/mnist.h5"), info=info)
    assert prepare_main(["info"]) == 0
    assert capsys.readouterr().out.startswith("file           data/mnist.h5\n")
    assert prepare_main(["info", "--dataset", "fashion-mnist"]) == 1
    assert capsys.readouterr().err == \
        "error: data/fashion-mnist.h5: no such file; run `python -m dpcnn.data prepare` first\n"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert prepare_main(["--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.h5")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --source") and err.count("\n") == 1 and "Traceback" not in err
    assert prepare_main(["--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.h5"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError" in err and err.rstrip().splitlines()[-1].startswith("error: --source")
    assert prepare_main(["info", str(tmp_path / "none.h5")]) == 1


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        prepare_main(["prepare", "--help"])
    assert e.value.code == 0 and "python -m dpcnn.data prepare --source" in capsys.readouterr().out


def test_module_runs_without_mpi(tmp_path):
    """`python -m dpcnn.data` works, fails cleanly, and never imports mpi4py."""
    code = ("import sys, runpy; sys.modules['mpi4py'] = None; sys.argv = ['x', 'info', 'none.h5'];"
            "runpy.run_module('dpcnn.data', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and r.stderr.strip() == \
        "error: none.h5: no such file; run `python -m dpcnn.data prepare` first"


# ----------------------------------------------------------------------------- real MNIST

def _mnist_dir():
    return Path(os.environ.get("DPCNN_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.mark.skipif(not (_mnist_dir() / "train-images-idx3-ubyte.gz").exists()
                    and not (_mnist_dir() / "train-images-idx3-ubyte").exists(),
                    reason="real MNIST files not present")
def test_real_mnist(tmp_path):
    out = prepare_dataset("mnist", source=_mnist_dir(), out=tmp_path / "mnist.h5")
    with Split(out) as tr, Split(out, "test") as te:
        assert tr.source_sha256 == DATASETS["mnist"].sha256
        assert (tr.n, te.n, tr.image_shape) == (60000, 10000, (28, 28))
        assert np.bincount(tr.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        assert np.bincount(te.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
        assert (round(tr.mean, 4), round(tr.std, 4)) == (0.1307, 0.3081)
        assert h5format.verify(out) is True
        L = ShardedLoader(tr, batch_size=128, rank=1, size=4, seed=0)
        x, y, M = L.batch(0, 0)
        assert x.shape == (32, 28, 28, 1) and M == 128 and len(L._images) == 468 * 32


def test_damaged_chunk_is_detected_on_read(tmp_path):
    """Every chunk carries a Fletcher-32 checksum: flipped bytes fail the read, naming the file."""
    from conftest import write_tiny
    path = write_tiny(tmp_path / "tiny.h5")
    with h5py.File(path, "r") as f:
        assert f["train/images"].fletcher32 and f["train/labels"].fletcher32
        info = f["train/images"].id.get_chunk_info(0)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + 100: info.byte_offset + 110] = b"\xff" * 10
    path.write_bytes(bytes(raw))
    s = Split(path)
    with pytest.raises(DataError, match=r"tiny\.h5: cannot read train/images .*damaged"):
        s.rows(np.arange(s.n))
    with pytest.raises(DataError, match="damaged"):
        ShardedLoader(s, batch_size=8, rank=0, size=1, seed=0).batch(0, 0)
