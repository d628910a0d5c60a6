"""Your own data: image folders (one subfolder per class) prepared into the common HDF5 layout."""

import dataclasses
import json
import os
import shlex
import struct
import zlib

import h5py
import numpy as np
import pytest

from dpcnn.h5format import DataError, Split, verify
from dpcnn.images import folder_image, prepare_folder, read_folder
from dpcnn.prepare import main as prepare_main

Image = pytest.importorskip("PIL.Image")


def make_folder(root, classes=("circle", "cross", "square"), per_class=8, size=(40, 32), rgb=False, seed=0):
    """Images that differ by class: a bright disc, a cross or a square at a random place, on noise;
    as PNG and JPEG, grey or colour (each class its own hue)."""
    rng = np.random.default_rng(seed)
    H, W = size
    yy, xx = np.mgrid[:H, :W]
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            cy, cx = rng.integers(10, H - 10), rng.integers(10, W - 10)
            if c == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
            elif c == 1:
                mask = (abs(yy - cy) < 2) & (abs(xx - cx) < 8) | (abs(xx - cx) < 2) & (abs(yy - cy) < 8)
            else:
                mask = (abs(yy - cy) < 6) & (abs(xx - cx) < 6)
            grey = np.where(mask, 230, rng.integers(0, 40, (H, W))).astype(np.uint8)
            if rgb:
                hue = np.eye(3)[c] * 0.8 + 0.2
                img = Image.fromarray((grey[..., None] * hue).astype(np.uint8), "RGB")
            else:
                img = Image.fromarray(grey, "L")
            img.save(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def test_grey_folder_with_a_seeded_test_share(tmp_path):
    src = make_folder(tmp_path / "shapes")
    out = prepare_folder(src, tmp_path / "shapes.h5", test_fraction=0.25, size=(28, 28))
    with Split(out, "train") as tr, Split(out, "test") as te:
        assert tr.class_names == ["circle", "cross", "square"] and tr.dataset == "shapes"
        assert (tr.n, te.n) == (18, 6) and tr.image_shape == (28, 28)
        assert np.bincount(np.concatenate([tr.labels, te.labels])).tolist() == [8, 8, 8]
    assert verify(out) is True
    with h5py.File(out) as f:                          # the documented layout, nothing else
        assert set(f) == {"train", "test"} and f["train/images"].dtype == np.uint8
        assert json.loads(f.attrs["class_names"]) == ["circle", "cross", "square"]
    again = prepare_folder(src, tmp_path / "again.h5", test_fraction=0.25, size=(28, 28))
    with h5py.File(out) as a, h5py.File(again) as b:   # the draw is seeded: the same split
        assert np.array_equal(a["test/labels"][...], b["test/labels"][...])


def test_a_folder_keeps_its_colour_and_size(tmp_path, caplog):
    """Image folders became grey 28x28 silently (a set differing only in colour then could not be learned):
    they keep their colour (grey only when every image is grey, RGB-encoded grey included) and their size
    (resized only by --size, or to the most common size when sizes differ, said in one line)."""
    rgb = prepare_folder(make_folder(tmp_path / "rgb", rgb=True), tmp_path / "rgb.h5")
    grey = prepare_folder(make_folder(tmp_path / "grey"), tmp_path / "grey.h5")
    with Split(rgb) as r, Split(grey) as g:
        assert (r.image_shape, r.channels, g.image_shape, g.channels) == ((40, 32), 3, (40, 32), 1)
        assert r.recipe == {"kind": "resize", "size": [40, 32], "color": "rgb"}
        assert g.recipe == {"kind": "resize", "size": [40, 32], "color": "grey"}
        assert r.remake.endswith(f"--size 40x32 --color rgb --out {rgb}")
    # grey pictures stored as RGB PNGs are grey: the same arrays as the same pictures stored grey
    for name, mode in (("L", "L"), ("as-rgb", "RGB")):
        for c in ("a", "b"):
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(3):
                a = np.random.default_rng(i + 10 * (c == "b")).integers(0, 256, (20, 18), dtype=np.uint8)
                Image.fromarray(a, "L").convert(mode).save(tmp_path / name / c / f"{i}.png")
    x_l, *_ = read_folder(tmp_path / "L")
    x_rgb, *_ = read_folder(tmp_path / "as-rgb")
    assert x_l.shape == (6, 20, 18) and np.array_equal(x_l, x_rgb)
    # sizes that differ: the most common one, in one info line; --size and --color as given
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "rgb" / "cross" / "odd.png")
    caplog.set_level("INFO", logger="dpcnn")
    x, *_ = read_folder(tmp_path / "rgb")
    assert x.shape == (25, 40, 32, 3)
    said = [r.getMessage() for r in caplog.records if "sizes" in r.getMessage()]
    assert len(said) == 1 and "images of 2 sizes (30x30 to 40x32): all resized to 40x32, the most common (24 of 25" \
        in said[0], said
    x, *_ = read_folder(tmp_path / "rgb", size=(16, 12), color="grey")
    assert x.shape == (25, 16, 12)


def test_per_channel_mean_and_std_in_the_file_and_old_files_still_read(tmp_path, tiny_h5):
    """The file stores each channel's mean and std and inputs are standardised per channel; for one
    channel that is bit for bit what the single mean and std gave, and files without them still read."""
    out = prepare_folder(make_folder(tmp_path / "rgb", rgb=True), tmp_path / "rgb.h5")
    with h5py.File(out) as f:
        x = f["train/images"][...]
        assert f.attrs["channel_mean"].shape == (3,)
        np.testing.assert_allclose(f.attrs["channel_mean"], x.mean(axis=(0, 1, 2)) / 255, rtol=1e-12)
        np.testing.assert_allclose(f.attrs["channel_std"], (x / 255).std(axis=(0, 1, 2)), rtol=1e-9)
    with Split(out) as s:
        z = s.standardise(x).astype(np.float64)
        np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, rtol=1e-5)
    with Split(tiny_h5) as s:
        u8 = s.rows(np.arange(s.n))
        before = u8.astype(np.float32) * np.float32(1.0 / (255.0 * s.std)) - np.float32(s.mean / s.std)
        assert s.channel_mean.tolist() == [s.mean] and s.channel_std.tolist() == [s.std]
        assert np.array_equal(s.standardise(u8), before[..., None])        # the bits of one mean and std
    old = tmp_path / "old.h5"
    old.write_bytes(tiny_h5.read_bytes())
    with h5py.File(old, "r+") as f:                      # as an older dpcnn wrote it
        for k in ("channel_mean", "channel_std", "preprocess"):
            del f.attrs[k]
    with Split(old) as s:
        assert np.array_equal(s.standardise(u8), before[..., None])
        assert s.recipe == {"kind": "resize", "size": [28, 28], "color": "grey"}


def test_rgb_folder_and_separate_test_folder(tmp_path):
    src = make_folder(tmp_path / "train", rgb=True)
    test = make_folder(tmp_path / "test", rgb=True, per_class=3, seed=1)
    assert prepare_main(["prepare", "--from-folder", str(src), "--test-folder", str(test), "--color", "rgb",
                         "--size", "24x20", "--out", str(tmp_path / "c.h5")]) == 0
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["train/images"].shape == (24, 24, 20, 3) and f["test/images"].shape == (9, 24, 20, 3)
        x = f["train/images"][...]
    # the colour survived: each class is brightest in its own channel
    for c in range(3):
        y = np.repeat(np.arange(3), 8)
        assert x[y == c].mean(axis=(0, 1, 2)).argmax() == c


def test_folder_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(DataError, match="not a directory"):
        read_folder(tmp_path / "none", (28, 28))
    src = make_folder(tmp_path / "a", classes=("x", "y"), per_class=2)
    (src / "y" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: not an image file Pillow can read"):
        read_folder(src, (28, 28))
    test = make_folder(tmp_path / "t", classes=("x", "z"), per_class=1)
    (src / "y" / "broken.png").unlink()
    with pytest.raises(DataError, match=r"classes \['x', 'z'\] differ from the training folder's \['x', 'y'\]"):
        prepare_folder(src, tmp_path / "o.h5", test=test)
    with pytest.raises(SystemExit) as e:
        prepare_main(["prepare", "--from-folder", str(src), "--size", "big"])
    assert e.value.code == 2 and "expected HxW" in capsys.readouterr().err
    assert not (tmp_path / "o.h5").exists()


def test_from_folder_replaces_only_a_file_made_from_a_folder(tmp_path, capsys):
    """`--from-folder ... --out best.h5` overwrote the checkpoint silently; it replaces only a file
    that was prepared from an image folder too (a file of an older dpcnn included)."""
    from conftest import write_tiny
    src, other = make_folder(tmp_path / "shapes", per_class=3), make_folder(tmp_path / "more", per_class=4)
    checkpoint = tmp_path / "best.h5"
    with h5py.File(checkpoint, "w") as f:                 # what dpcnn.checkpoint writes, in short
        f.attrs.update(format="dpcnn-checkpoint", format_version=2)
        f["params"] = np.arange(10.0)
    idx_made = write_tiny(tmp_path / "tiny.h5", n_train=20, n_test=10)   # IDX-style, no made_from
    for path, what in ((checkpoint, "is a dpcnn checkpoint, not a data file"),
                       (idx_made, "holds data named tiny-blobs that prepare did not make from its IDX files")):
        before = path.read_bytes()
        assert prepare_main(["prepare", "--from-folder", str(src), "--out", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --out {path}: {what}; not replaced by the images of "
                                                       f"{src}"), err
        assert path.read_bytes() == before
    out = prepare_folder(src, tmp_path / "shapes.h5")
    with h5py.File(out, "r+") as f:                       # as an older dpcnn wrote it
        del f.attrs["made_from"]
    prepare_folder(other, out)                            # a folder's file: made again, from the folder given
    with Split(out, "train") as tr, Split(out, "test") as te:
        assert tr.n + te.n == 12 and tr.dataset == "more"


def test_force_keeps_a_folders_images_and_the_damage_advice_makes_them_again(tmp_path, capsys, monkeypatch):
    """`prepare --force` on a --from-folder file (what the damaged-file error advised) replaced the photos
    with MNIST. --force never changes what a file holds, and the advice is the command that made it."""
    from _idx import make_source

    from dpcnn.datasets import DATASETS
    src, out = make_folder(tmp_path / "shapes", per_class=3, rgb=True), tmp_path / "shapes.h5"
    assert prepare_main(["prepare", "--from-folder", str(src), "--size", "24x20", "--color", "rgb",
                         "--out", str(out), "-q"]) == 0
    with h5py.File(out) as f:
        arrays = {k: f[k][...] for k in ("train/images", "train/labels", "test/images", "test/labels")}
    made = f"python -m dpcnn.data prepare --from-folder {src} --size 24x20 --color rgb --out {out}"
    info, _ = make_source(tmp_path / "idx")               # an MNIST that needs no network
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(info, name="mnist"))
    before = out.read_bytes()
    for argv in (["--force", "--source", str(tmp_path / "idx")], ["--force"]):
        assert prepare_main(["prepare", "--out", str(out), *argv]) == 1
        err = capsys.readouterr().err
        assert err == (f"error: --out {out}: holds shapes, prepared from an image folder; not replaced by mnist "
                       f"(give another --out, or move it away first); it is prepared again with: {made}\n")
        assert out.read_bytes() == before
    with h5py.File(out) as f:                             # damage one chunk of the training images
        start = f["train/images"].id.get_chunk_info(0).byte_offset
    raw = bytearray(before)
    raw[start + 50:start + 60] = bytes(255 - b for b in raw[start + 50:start + 60])
    out.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        verify(out)
    assert str(e.value).endswith(f"the file is damaged: prepare it again: {made}")
    assert prepare_main(shlex.split(made)[3:] + ["-q"]) == 0 and verify(out) is True
    with h5py.File(out) as f:
        assert all(np.array_equal(f[k][...], a) for k, a in arrays.items())


def test_a_made_from_not_as_documented_counts_as_missing(tmp_path):
    """made_from is read from a file anyone can write: a value of the wrong types gives the advice
    an older file gets, never a traceback in place of the damaged-file message."""
    out = prepare_folder(make_folder(tmp_path / "a", classes=("x", "y"), per_class=2), tmp_path / "a.h5")
    with h5py.File(out, "r+") as f:
        f.attrs["made_from"] = json.dumps({"kind": "folder", "folder": ["a"], "test_fraction": "x", "size": "big"})
    with Split(out) as s:
        assert s.remake == (f"python -m dpcnn.data prepare --from-folder DIR --size 40x32 --color grey --out {out} "
                            "(DIR: the image folder it was made from)")     # what the file holds


def test_folder_names_that_are_not_utf8_are_named(tmp_path, capsys):
    """A class folder whose name is not UTF-8 gave a bare UnicodeEncodeError: the error names the
    folder. An image file of such a name is just an image."""
    src = make_folder(tmp_path / "a", classes=("x", "y"), per_class=2)
    odd = os.fsdecode(b"caf\xe9")
    (src / "y" / "000.jpg").rename(src / "y" / f"{odd}.jpg")
    out = prepare_folder(src, tmp_path / "a.h5")
    with Split(out, "train") as tr, Split(out, "test") as te:
        assert tr.n + te.n == 4
    (src / "y").rename(src / odd)
    assert prepare_main(["prepare", "--from-folder", str(src), "--out", str(tmp_path / "b.h5")]) == 1
    assert capsys.readouterr().err == (f"error: {src}/caf\\xe9: the folder's name is not UTF-8, and its name is "
                                       "a class name, stored as text: rename the folder\n")
    (src / odd).rename(src / "y")
    src.rename(tmp_path / odd)
    assert prepare_main(["prepare", "--from-folder", str(tmp_path / odd), "--out", str(tmp_path / "c.h5")]) == 1
    assert "caf\\xe9: the folder's name is not UTF-8, and it names the data set" in capsys.readouterr().err
    assert not (tmp_path / "b.h5").exists() and not (tmp_path / "c.h5").exists()


def png_of_zeros(path, w, h):
    """A valid grey PNG of w x h black pixels, written without holding them (a few hundred KB)."""
    z, row = zlib.compressobj(1), bytes(w + 1)             # filter byte 0, then the row
    data = b"".join(z.compress(row) for _ in range(h)) + z.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_one_pixel_limit_for_from_folder_and_predict(tmp_path, capsys):
    """--from-folder decoded a 144-megapixel PNG that predict refused: both refuse it, before
    decoding, in the same words."""
    from dpcnn.inputs import Normalisation, Preprocess
    src = make_folder(tmp_path / "a", classes=("x", "y"), per_class=2)
    big = png_of_zeros(src / "y" / "big.png", 12000, 12000)
    said = f"{big}: 12000x12000 pixels, more than the 89478485 an image may have (PIL.Image.MAX_IMAGE_PIXELS); " \
           "scale it down first"
    assert prepare_main(["prepare", "--from-folder", str(src), "--out", str(tmp_path / "a.h5")]) == 1
    assert capsys.readouterr().err == f"error: {said}\n"
    norm = Normalisation(np.array([0.5]), np.array([0.25]), ["x", "y"], {"kind": "mnist", "size": [28, 28]}, "here")
    for style in ("mnist", "resize"):                   # what predict and dpcnn.load(...).predict do with files
        with pytest.raises(DataError) as e:
            Preprocess((28, 28, 1), norm, style).original(big, "images")
        assert str(e.value) == said
    assert not (tmp_path / "a.h5").exists()


@pytest.mark.timeout(120)
def test_a_colour_folder_trains_and_predicts(tmp_path, capsys):
    """RGB images end to end, prepared as they are (24x24 colour): the model's input channels come from the
    data file; the same bits on 1 and 2 ranks; with the data file gone, the Python API and the command
    classify colour arrays and image files from what the checkpoint stores."""
    from conftest import run_job

    import dpcnn
    from dpcnn import checkpoint as ckpt
    src = make_folder(tmp_path / "colours", rgb=True, per_class=40, size=(24, 24))
    data = prepare_folder(src, tmp_path / "colours.h5", test_fraction=0.25)
    states = {}
    for p in (1, 2):
        out = tmp_path / f"run{p}"
        r = run_job(["-m", "dpcnn.train", "--data", data, "--out", out, "--epochs", "6", "--batch-size", "16",
                     "--micro-batch", "8", "--exact", "--val-size", "0", "--threads", "1", "--no-progress", "-q"],
                    nprocs=p, timeout=100)
        assert r.returncode == 0, r.stderr
        states[p] = ckpt.load(sorted(out.glob("ckpt-step*.h5"))[-1])
        assert states[p].spec["input_shape"] == [24, 24, 3]
    assert all(np.array_equal(states[1].params[k], states[2].params[k]) for k in states[1].params)
    with h5py.File(data) as f:
        x, y = f["test/images"][...], f["test/labels"][...]
    data.rename(tmp_path / "moved.h5")                    # the checkpoint carries what predicting needs
    clf = dpcnn.load(tmp_path / "run1" / "best.h5")
    assert x.shape[1:] == (24, 24, 3) and np.mean(clf.predict(x) == y) > 0.8
    assert clf.predict(x[4]).tolist() == clf.predict(x[4:5]).tolist()       # one (H, W, C) image
    # predict on the image files prepares them as prepare did (RGB, resized to 24x24), and on .npy arrays
    from dpcnn import predict
    files = sorted(src.glob("*/*"))[::7]
    np.save(tmp_path / "x.npy", x[:5])
    assert predict.main(["--checkpoint", str(tmp_path / "run1" / "best.h5"), "--json",
                         *map(str, files), str(tmp_path / "x.npy")]) == 0
    got = json.loads(capsys.readouterr().out)["predictions"]
    seen = np.stack([folder_image(Image.open(f), (24, 24), "rgb") for f in files])
    want = np.concatenate([clf.predict_proba(seen), clf.predict_proba(x[:5])])
    assert [g["class"] for g in got] == list(want.argmax(1))
    np.testing.assert_allclose([g["probability"] for g in got], want.max(1), rtol=1e-5)
    assert np.mean([g["name"] == f.parent.name for g, f in zip(got, files)]) > 0.8


def test_a_file_written_with_plain_h5py_as_the_readme_documents_trains(tmp_path, tiny_h5):
    """The README's layout table, entry by entry, with nothing but h5py: it trains ('not verified')."""
    from dpcnn.train import main
    with h5py.File(tiny_h5) as src, h5py.File(tmp_path / "mine.h5", "w") as f:
        for split in ("train", "test"):
            f[f"{split}/images"] = src[f"{split}/images"][...]
            f[f"{split}/labels"] = src[f"{split}/labels"][...]
        f.attrs.update(format_version=1, dataset="mine", class_names=json.dumps(list("abcdefghij")),
                       mean=0.3, std=0.3, source_sha256="{}")
    assert verify(tmp_path / "mine.h5") is False                       # no array checksums: not verified
    assert main(["--data", str(tmp_path / "mine.h5"), "--out", str(tmp_path / "run"), "--max-steps", "4",
                 "--val-size", "0", "--comm", "serial", "--threads", "1", "--no-progress", "-q"]) == 0
    with h5py.File(tmp_path / "mine.h5", "a") as f:
        del f.attrs["class_names"]
    assert main(["--data", str(tmp_path / "mine.h5"), "--out", str(tmp_path / "run2"), "--comm", "serial",
                 "-q"]) == 1
