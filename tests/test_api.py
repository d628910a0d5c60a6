"""The Python API: dpcnn.fit with a Config, dpcnn.load(...).predict, export_npz."""

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import child_env, run_job

import dpcnn
from dpcnn import evaluate
from dpcnn.cli import UserError
from dpcnn.comm import SerialComm
from dpcnn.data import Split


@pytest.fixture(scope="module")
def trained(tiny_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    cfg = dpcnn.Config(data=tiny_h5, out=out, epochs=2, batch_size=32, threads=1, progress=False)
    assert dpcnn.fit(cfg, comm=SerialComm()) == 0
    return out


def test_fit_from_a_script_shows_and_logs_the_commands_lines(tiny_h5, tmp_path):
    """A script calling dpcnn.fit without setting up logging sees the command's lines on stderr,
    and train.log receives them (it used to stay empty)."""
    out = tmp_path / "run"
    script = ("import sys, dpcnn\n"
              f"cfg = dpcnn.Config(data={str(tiny_h5)!r}, out={str(out)!r}, max_steps=1, batch_size=32, "
              "progress=False, comm='serial')\n"
              "sys.exit(dpcnn.fit(cfg))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    assert "done: 1 step, validation accuracy" in r.stderr           # a tenth of 384 rows held out
    assert "done: 1 step, validation accuracy" in (out / "train.log").read_text()


def test_fit_refuses_what_the_command_line_would(tiny_h5, tmp_path):
    for changes, said in ((dict(batch_size=0), "Config(batch_size=0): expected an integer >= 1"),
                          (dict(scale=0.9), "Config(scale=0.9): expected a zoom range in [0, 0.5]"),
                          (dict(momentum=1.5), "(the flag --momentum)"),
                          (dict(init="zeros"), "expected one of he, torch, glorot"),
                          (dict(val_seed=None), "Config(val_seed=None): expected a value")):
        cfg = dpcnn.Config(data=tiny_h5, out=tmp_path / "run", **changes)
        with pytest.raises(UserError, match=re.escape(said)):
            dpcnn.fit(cfg, comm=SerialComm())
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(120)
def test_fit_under_mpi_an_error_on_one_rank_ends_every_rank(tiny_h5, tmp_path):
    """A script whose rank 1 alone has a bad setting must not leave rank 0 waiting forever."""
    # each rank reports what fit raised in one write: two ranks' tracebacks interleave on stderr
    script = ("import os, sys, dpcnn\nfrom mpi4py import MPI\nrank = MPI.COMM_WORLD.rank\n"
              f"cfg = dpcnn.Config(data={str(tiny_h5)!r}, out={str(tmp_path / 'run')!r}, max_steps=3, "
              "batch_size=32, progress=False, scale=0.9 if rank == 1 else 0.0)\n"
              "try:\n    dpcnn.fit(cfg)\n"
              "except Exception as e:\n"
              "    os.write(2, f'rank {rank}: {type(e).__name__}: {e}\\n'.encode())\n    sys.exit(1)\n")
    t0 = time.monotonic()
    r = run_job(["-c", script], nprocs=2, timeout=90)
    assert r.returncode != 0 and time.monotonic() - t0 < 60, r
    lines = r.stderr.splitlines()
    assert any(x.startswith("rank 1: ConfigError: Config(scale=0.9): expected a zoom range") for x in lines), lines
    assert any(x.startswith("rank 0: ConfigError: 1 other rank(s) were given a Config") for x in lines), lines


def test_fit_then_load_predicts_like_evaluate(trained, tiny_h5):
    clf = dpcnn.load(trained / "best.h5")
    with Split(tiny_h5, "test") as s:
        u8 = s.rows(np.arange(s.n))                         # (N, 28, 28) uint8, as stored
        labels = s.labels
    pred = clf.predict(u8)
    report = evaluate.run(trained / "best.h5")
    assert pred.shape == labels.shape and np.mean(pred == labels) == pytest.approx(report["accuracy"])
    p = clf.predict_proba(u8)
    assert p.shape == (len(labels), 10) and np.allclose(p.sum(axis=1), 1)
    # float intensities in [0, 1] and one (H, W) image give the same answers
    assert np.array_equal(clf.predict(u8.astype(np.float64) / 255), pred)
    assert clf.predict(u8[3]).tolist() == [pred[3]] == clf.predict(u8[3][..., None]).tolist()   # (H, W[, 1])
    assert clf.class_names == list("0123456789")


def test_bad_inputs_are_one_line_errors(trained):
    clf = dpcnn.load(trained / "best.h5")
    for bad, says in ((np.zeros((2, 3, 27, 28), np.uint8), "expected (28, 28)"),
                      (np.full((2, 27, 28), 300), "0-255"),       # images of another size: checked too
                      (np.full((1, 28, 28), 300), "0-255"), (np.full((1, 28, 28), np.nan), "NaN"),
                      (np.zeros((1, 28, 28), "U1"), "dtype")):
        with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
            clf.predict(bad)


def test_the_api_refuses_what_the_predict_command_refuses(trained, tmp_path, capsys):
    """dpcnn.load(ckpt).predict(x) answered float pixels in 0-255 (and 1e30) with saturated
    probabilities where `python -m dpcnn.predict` refused the same array: one check serves both."""
    from dpcnn import predict
    ckpt, npy = trained / "best.h5", tmp_path / "x.npy"
    clf = dpcnn.load(ckpt)
    for bad in (np.full((2, 28, 28), 200.0), np.full((1, 28, 28), 1e30, np.float32), np.ones((28, 28), bool),
                np.full((28, 28), -3), np.zeros((0, 28, 28), np.uint8)):
        with pytest.raises(UserError) as e:
            clf.predict(bad)
        np.save(npy, bad)
        assert predict.main(["--checkpoint", str(ckpt), str(npy)]) == 1
        said = str(e.value)
        assert said.startswith("images: ") and capsys.readouterr().err == f"error: {npy}: {said[8:]}\n"
    good = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    for a in (good, good / 255.0):                        # and what both take, both answer alike
        np.save(npy, a)
        assert predict.main(["--checkpoint", str(ckpt), str(npy), "--json", "--top", "10"]) == 0
        tops = [r["top"] for r in json.loads(capsys.readouterr().out)["predictions"]]
        probs = np.array([[t["probability"] for t in sorted(top, key=lambda t: t["class"])] for top in tops])
        assert np.array_equal(probs, clf.predict_proba(a))


def test_export_npz_holds_every_layer(trained, tmp_path):
    clf = dpcnn.load(trained / "best.h5")
    path = dpcnn.export_npz(trained / "best.h5", tmp_path / "w.npz")
    with np.load(path) as z:
        for name, v in clf.model.p.items():
            assert np.array_equal(z[name], v), name
        assert json.loads(str(z["spec.json"]))["channels"] == [8, 16]
        assert z["mean"].shape == (1,) and np.array_equal(z["mean"], clf.norm.mean)
        assert json.loads(str(z["class_names.json"]))[0] == "0"
        assert json.loads(str(z["preprocess.json"])) == {"kind": "resize", "size": [28, 28], "color": "grey"}


# ----------------------------------------------------------------------------- the model carries its preprocessing


def colour_checkpoint(path, shape=(24, 20, 3), recipe=None, classes=3, **config):
    """A checkpoint of a fresh CNN whose facts say how its inputs are made, and whose data file is gone."""
    from dpcnn import checkpoint as ckpt
    from dpcnn.model import CNN, ModelSpec
    model = CNN(ModelSpec(input_shape=shape, classes=classes), seed=1)
    C = shape[2]
    prep = {"recipe": recipe or {"kind": "resize", "size": list(shape[:2]), "color": "rgb" if C == 3 else "grey"},
            "mean": [0.2, 0.4, 0.6][:C], "std": [0.25, 0.2, 0.3][:C], "class_names": [f"c{k}" for k in range(classes)]}
    ckpt.save(path, ckpt.State(params={k: v.copy() for k, v in model.p.items()},
                               velocity={k: np.zeros_like(v) for k, v in model.p.items()}, epoch=0, next_batch=0,
                               step=3, spec=model.spec.to_dict(), data_fingerprint="0" * 64,
                               config={"data": str(path.parent / "gone.h5"), "dataset": "photos",
                                       "preprocessing": prep, **config}))
    return prep


def standardised(u8, prep):
    """What training does to stored uint8 images (N, H, W, C), written out channel by channel."""
    m, s = np.array(prep["mean"]), np.array(prep["std"])
    return u8.astype(np.float32) * (1 / (255 * s)).astype(np.float32) - (m / s).astype(np.float32)


def test_the_model_carries_its_preprocessing_files_pil_and_arrays(tmp_path, capsys):
    """dpcnn.load(ckpt).predict on image files, Pillow images and arrays of the original images' size and
    colour (uint8 or float, grey, RGB or RGBA), without the data file: each prepared as prepare made the
    training images (converted, resized to 24x20), standardised per channel; the predict command agrees."""
    Image = pytest.importorskip("PIL.Image")
    from dpcnn import predict
    from dpcnn.images import folder_image
    prep = colour_checkpoint(tmp_path / "best.h5")
    rng = np.random.default_rng(0)
    photos = rng.integers(0, 256, (3, 40, 32, 3), dtype=np.uint8)            # the originals: 40x32 RGB
    files = []
    for i, a in enumerate(photos):
        files.append(tmp_path / f"p{i}.png")
        Image.fromarray(a, "RGB").save(files[-1])
    want_u8 = np.stack([folder_image(Image.fromarray(a, "RGB"), (24, 20), "rgb") for a in photos])
    want = standardised(want_u8, prep)
    clf = dpcnn.load(tmp_path / "best.h5")                  # no data file: the checkpoint has what it needs
    assert clf.class_names == ["c0", "c1", "c2"] and clf.norm.source == "checkpoint"
    rgba = np.concatenate([photos[0], np.full((40, 32, 1), 255, np.uint8)], axis=2)
    for given in ([str(f) for f in files], files, [Image.open(f) for f in files], photos, photos / 255.0,
                  [files[0], Image.fromarray(photos[1]), photos[2]]):
        assert np.array_equal(clf.prepare(given), want), type(given)
    assert np.array_equal(clf.prepare(files[0]), want[:1]) and np.array_equal(clf.prepare(rgba), want[:1])
    assert np.array_equal(clf.prepare(photos[0].astype(np.float32) / 255), want[:1])
    assert np.array_equal(clf.prepare(want_u8), want)                        # the model's own shape: as it is
    grey = photos[0, ..., 0]                                                 # grey originals become RGB
    assert np.array_equal(clf.prepare(grey), standardised(folder_image(Image.fromarray(grey), (24, 20), "rgb")[None],
                                                          prep))
    assert predict.main(["--checkpoint", str(tmp_path / "best.h5"), "--json", "--top", "3", *map(str, files)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["normalisation"] == "checkpoint" and got["errors"] == []
    probs = clf.predict_proba(files)
    for rec, p in zip(got["predictions"], probs):
        assert rec["class"] == p.argmax() and rec["name"] == f"c{p.argmax()}"
        assert rec["probability"] == pytest.approx(p.max(), rel=1e-5)       # one image a call: other rounding
    with pytest.raises(UserError, match=r"images: array of shape \(2, 3, 40, 32, 3\)"):
        clf.predict(np.zeros((2, 3, 40, 32, 3), np.uint8))


def test_an_mnist_model_centres_original_digits_and_takes_its_own_shape_as_it_is(tmp_path):
    """MNIST-style centring is for models trained on MNIST-like data only, and only for originals."""
    pytest.importorskip("PIL")
    from dpcnn.images import mnist_style
    prep = colour_checkpoint(tmp_path / "mnist.h5", shape=(28, 28, 1), recipe={"kind": "mnist", "size": [28, 28]},
                             classes=10)
    photo = np.full((100, 80), 235, np.uint8)
    photo[20:30, 10:60] = 20                                        # a dark '7' on light paper, off-centre
    for r in range(30, 90):
        photo[r, max(55 - (r - 30) // 2 - 4, 0):55 - (r - 30) // 2 + 4] = 20
    clf = dpcnn.load(tmp_path / "mnist.h5")
    centred = mnist_style(photo.astype(np.float64))
    assert np.array_equal(clf.prepare(photo), standardised(centred[None, ..., None], prep))
    assert np.array_equal(clf.prepare(np.stack([photo, photo])), standardised(np.stack([centred] * 2)[..., None],
                                                                              prep))
    raw = photo[:28, :28]                                           # 28x28: already in MNIST form, not re-centred
    assert np.array_equal(clf.prepare(raw), standardised(raw[None, ..., None], prep))
    colour_checkpoint(tmp_path / "res.h5", shape=(28, 28, 1), classes=10)
    from PIL import Image

    from dpcnn.images import folder_image
    resized = dpcnn.load(tmp_path / "res.h5").prepare(photo)        # a model of an image folder: resized
    assert np.array_equal(resized, standardised(folder_image(Image.fromarray(photo), (28, 28))[None, ..., None], prep))


def test_checkpoints_store_the_per_channel_mean_std_recipe_and_classes(trained, tiny_h5):
    from dpcnn import checkpoint as ckpt
    with Split(tiny_h5, "train") as s:
        want = s.preprocessing
    assert want == {"recipe": {"kind": "resize", "size": [28, 28], "color": "grey"}, "mean": [s.mean],
                    "std": [s.std], "class_names": list("0123456789")}
    for path in (trained / "best.h5", *sorted(trained.glob("ckpt-step*.h5"))):
        assert ckpt.load(path).config["preprocessing"] == want, path
    assert json.loads((trained / "config.json").read_text())["preprocessing"] == want


def test_a_quiet_console_still_fills_train_log(tiny_h5, tmp_path):
    """-q left train.log empty: the file gets the INFO lines whatever the console shows."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "dpcnn.train", "--data", str(tiny_h5), "--out", str(out), "--max-steps",
                        "2", "--batch-size", "32", "--comm", "serial", "--no-progress", "-q"],
                       capture_output=True, text=True, timeout=120, env=child_env())
    assert r.returncode == 0 and r.stderr == "", r.stderr
    log = (out / "train.log").read_text()
    assert "done: 2 steps, " in log and "test accuracy" in log and "dpcnn " in log, log


# ----------------------------------------------------------------------------- fit on NumPy arrays


def blobs(seed=0):
    from conftest import blob_arrays
    return blob_arrays(seed=seed)


FIT = dict(epochs=2, batch_size=32, threads=1, progress=False)


def final(run_dir):
    from dpcnn import checkpoint as ckpt
    from dpcnn.rundir import RunDir
    return ckpt.load(RunDir(run_dir).checkpoints()[0])


def test_fit_on_arrays_is_training_on_the_same_arrays_prepared_as_a_file(tmp_path):
    """fit(x, y, x_test=, y_test=, validation_split=) writes the arrays as a prepared file and trains on it:
    bit for bit what training on the same arrays prepared as a file gives; the same arrays again reuse it."""
    from dpcnn.api import ArrayData
    from dpcnn.datasets import DatasetInfo
    from dpcnn.h5format import write_h5
    (x, y), (xt, yt) = blobs()["train"], blobs()["test"]
    code = dpcnn.fit(x, y, x_test=xt, y_test=yt, validation_split=0.125, comm=SerialComm(), out=tmp_path / "a",
                     data_dir=tmp_path / "data", **FIT)
    assert code == 0
    (written,) = (tmp_path / "data").glob("arrays-*.h5")
    file = tmp_path / "same.h5"
    write_h5(file, DatasetInfo("same", tuple("0123456789")), {"train": (x, y), "test": (xt, yt)}, {"x": "0" * 64})
    assert dpcnn.fit(dpcnn.Config(data=file, val_size=48, out=tmp_path / "b", **FIT), comm=SerialComm()) == 0
    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert a.step == b.step == 2 * ((384 - 48) // 32) and a.config["val_size"] == 48
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert [m["test_accuracy"] for m in a.metrics] == [m["test_accuracy"] for m in b.metrics]
    assert a.config["data"] == str(written.absolute()) and a.config["dataset"] == "arrays"
    # floats in [0, 1] are the same pixels; the same arrays name the same file, which is reused
    same = ArrayData(x / 255.0, y, xt, yt, data_dir=tmp_path / "data")
    before = written.stat().st_mtime_ns
    assert same.path == written and same.write() == written and written.stat().st_mtime_ns == before


def test_fit_on_arrays_holds_out_a_test_split_and_refuses_what_it_cannot_take(tmp_path):
    from dpcnn.api import ArrayData
    (x, y) = blobs()["train"]
    d = ArrayData(x, y, test_split=0.25, data_dir=tmp_path)
    (_, ya), (xb, yb) = d.arrays["train"], d.arrays["test"]
    assert (len(ya), len(yb)) == (288, 96) and sorted(np.concatenate([ya, yb])) == sorted(y)
    assert np.array_equal(ArrayData(x, y, test_split=0.25, data_dir=tmp_path).arrays["test"][0], xb)   # seeded
    for args, kw, says in (((x, y[:-1]), {}, "y: 383 labels for 384 images in x"),
                           ((x, np.eye(10)[y]), {}, "one-hot labels? give class indices"),
                           ((x * 2.0, y), {}, "float values must be intensities in [0, 1]"),
                           ((x[0], y[:1]), {}, "expected images (N, H, W) or (N, H, W, C)"),
                           ((x, y), {"x_test": x}, "give x_test and y_test together"),
                           ((x, y), {"class_names": ["a", "b"]}, "2 names for labels 0..9")):
        with pytest.raises(UserError, match=re.escape(says)):
            ArrayData(*args, data_dir=tmp_path, **kw)
    with pytest.raises(TypeError, match="labels y are missing"):
        dpcnn.fit(x)
    with pytest.raises(UserError, match="give no data="):
        dpcnn.fit(x, y, data=tmp_path / "x.h5")


@pytest.mark.timeout(200)
def test_fit_on_arrays_under_mpi_every_rank_the_same_arrays(tmp_path):
    """A script calling fit(x, y, ...) on 2 ranks trains on both (with exact: the bits of one process);
    a rank given other arrays is refused on every rank, naming it."""
    script = ("import sys, numpy as np, dpcnn\nfrom mpi4py import MPI\nrank = MPI.COMM_WORLD.rank\n"
              "rng = np.random.default_rng(0)\n"
              "x = rng.integers(0, 256, (200, 12, 12, 3), dtype=np.uint8); y = (x[:, :6].mean((1, 2, 3)) > "
              "x[:, 6:].mean((1, 2, 3))).astype(np.uint8)\n"
              "if rank == 1 and sys.argv[1] == 'other':\n    x = x.copy(); x[0, 0, 0, 0] ^= 1\n"
              f"sys.exit(dpcnn.fit(x, y, validation_split=0.1, out=sys.argv[2], data_dir={str(tmp_path / 'data')!r}, "
              "epochs=1, batch_size=16, micro_batch=8, exact=True, threads=1, progress=False))\n")
    r = run_job(["-c", script, "same", tmp_path / "mpi"], nprocs=2, timeout=150)
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 12, 12, 3), dtype=np.uint8)
    y = (x[:, :6].mean((1, 2, 3)) > x[:, 6:].mean((1, 2, 3))).astype(np.uint8)
    assert dpcnn.fit(x, y, validation_split=0.1, out=tmp_path / "one", data_dir=tmp_path / "data", comm=SerialComm(),
                     epochs=1, batch_size=16, micro_batch=8, exact=True, threads=1, progress=False) == 0
    two, one = final(tmp_path / "mpi"), final(tmp_path / "one")
    assert two.config["world_size"] == 2 and one.config["world_size"] == 1 and two.step == one.step > 0
    assert all(np.array_equal(two.params[k], one.params[k]) for k in one.params)
    r = run_job(["-c", script, "other", tmp_path / "other"], nprocs=2, timeout=150)
    assert r.returncode != 0 and "rank(s) [1] were given other arrays than rank 0" in r.stderr, r.stderr
    assert not (tmp_path / "other").exists()
