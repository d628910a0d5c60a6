"""The user tools: evaluate (checkpoint -> accuracy, confusion), plot (metrics.jsonl -> PNG), predict."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _idx import info_for, make_arrays, payloads
from conftest import child_env

from dpcnn import checkpoint as ckpt
from dpcnn import evaluate, plot, predict
from dpcnn.data import Split, holdout
from dpcnn.h5format import write_h5
from dpcnn.metrics import evaluate as metrics_evaluate
from dpcnn.model import CNN, ModelSpec
from dpcnn.records import Record

ROOT = Path(__file__).resolve().parents[1]


def make_data(path: Path, seed: int, name: str = "tiny") -> Path:
    """A prepared HDF5 file of random 28x28 digits: 40 train, 30 test images."""
    arrays = make_arrays(n_train=40, n_test=30, seed=seed)
    info = info_for(payloads(arrays), name)
    write_h5(path, info, arrays, info.sha256)
    return path


def save_checkpoint(path: Path, data: Path, dataset: str = "tiny", seed: int = 1, step: int = 7,
                    **config) -> CNN:
    """Save a freshly initialised CNN as a checkpoint trained on `data`; returns the model."""
    model = CNN(ModelSpec(), seed=seed)
    model.p["fc2.b"][...] = np.linspace(-0.5, 0.5, 10)       # some class preference, so predictions vary
    with Split(data, "test") as s:
        fingerprint = s.fingerprint
    ckpt.save(path, ckpt.State(params={k: v.copy() for k, v in model.p.items()},
                               velocity={k: np.zeros_like(v) for k, v in model.p.items()},
                               epoch=0, next_batch=step, step=step, spec=model.spec.to_dict(),
                               config={"data": str(data), "dataset": dataset, **config},
                               data_fingerprint=fingerprint))
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(data file, checkpoint file, the model saved in it), shared by the module's tests."""
    d = tmp_path_factory.mktemp("tools")
    data = make_data(d / "tiny.h5", seed=0)
    model = save_checkpoint(d / "best.h5", data)
    return data, d / "best.h5", model


def one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_json_against_a_direct_computation(run, capsys):
    """evaluate's loss, accuracy and confusion against a direct float64 computation from the
    model's logits over the whole test split (no batching, its own softmax and counting)."""
    data, path, model = run
    assert evaluate.main(["--checkpoint", str(path), "--json", "--batch-size", "7"]) == 0
    r = json.loads(capsys.readouterr().out)
    with Split(data, "test") as s:
        x, y = s.read(0, s.n)
    z = model.forward(x).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (y, z.argmax(axis=1)), 1)
    assert r["count"] == 30 == np.sum(r["confusion"])
    assert r["confusion"] == confusion.tolist()
    assert r["accuracy"] == np.trace(confusion) / 30
    assert r["loss"] == pytest.approx(loss, rel=1e-6)
    per_class = [None if n == 0 else c / n for c, n in zip(np.diag(confusion), confusion.sum(axis=1))]
    assert r["per_class_accuracy"] == pytest.approx(per_class)
    assert r["step"] == 7 and r["checkpoint"] == str(path) and r["data"] == str(data)   # data from the checkpoint
    assert r["class_names"] == list("0123456789")


def test_evaluate_val_and_train_splits_are_the_runs_rows(run, tmp_path, capsys):
    """--split val evaluates exactly the rows the run held out (its --val-size/--val-seed), --split
    train the rest: together they are the whole training split, confusion for confusion."""
    data, _, model = run
    path = tmp_path / "val.h5"
    save_checkpoint(path, data, val_size=10, val_seed=3)
    got = {}
    for split in ("val", "train"):
        assert evaluate.main(["--checkpoint", str(path), "--split", split, "--json"]) == 0
        got[split] = json.loads(capsys.readouterr().out)
    _, val_rows = holdout(40, 10, 3)
    with Split(data, "train") as s:
        want = metrics_evaluate(model, s.standardise(s.rows(val_rows)), s.labels[val_rows].astype(np.int64))
        whole = metrics_evaluate(model, *s.read(0, s.n))
    assert (got["val"]["count"], got["train"]["count"]) == (10, 30)
    assert got["val"]["confusion"] == want.confusion.tolist()
    assert np.array_equal(np.add(got["val"]["confusion"], got["train"]["confusion"]), whole.confusion)
    none = tmp_path / "none.h5"
    save_checkpoint(none, data, val_size=0)
    assert evaluate.main(["--checkpoint", str(none), "--split", "val"]) == 1
    one_error_line(capsys.readouterr().err, "none.h5", "--val-size 0", "--split test")


def test_evaluate_text_report(run, capsys):
    data, path, _ = run
    assert evaluate.main(["--checkpoint", str(path), "--data", str(data), "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "accuracy" in out and "loss" in out and "(test split, 30 images)" in out
    assert "confusion matrix (rows: true class, columns: predicted class)" in out
    table = out.split("confusion matrix")[1].strip().splitlines()[2:]       # after the note and header
    assert len(table) == 10 and sum(int(v) for row in table for v in row.split()[1:]) == 30


def test_evaluate_refuses_another_data_set_unless_forced(run, tmp_path, capsys):
    _, path, _ = run
    other = make_data(tmp_path / "other.h5", seed=5, name="other")
    assert evaluate.main(["--checkpoint", str(path), "--data", str(other)]) == 1
    one_error_line(capsys.readouterr().err, "another data set", "--force")
    assert evaluate.main(["--checkpoint", str(path), "--data", str(other), "--force", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["count"] == 30 and "warning" in err


def test_evaluate_errors_are_one_line_unless_debug(run, tmp_path, capsys):
    data, path, _ = run
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.h5")]) == 1
    one_error_line(capsys.readouterr().err, "nope.h5", "no such checkpoint")
    (tmp_path / "junk.h5").write_text("not hdf5")
    assert evaluate.main(["--checkpoint", str(tmp_path / "junk.h5"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")
    moved = tmp_path / "moved.h5"                     # the recorded data file is gone
    save_checkpoint(moved, data)
    state = ckpt.load(moved)
    state.config["data"] = str(tmp_path / "gone.h5")
    ckpt.save(moved, state)
    assert evaluate.main(["--checkpoint", str(moved)]) == 1
    one_error_line(capsys.readouterr().err, "gone.h5", "--data")


# ----------------------------------------------------------------------------- plot


def write_metrics(run_dir: Path, n: int = 4) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = [{"epoch": (i + 1) / 2, "step": 50 * (i + 1), "train_loss": None if i == 0 else 1.0 / (i + 1),
             "train_accuracy": None if i == 0 else 0.8 + 0.04 * i, "test_loss": 0.9 / (i + 1),
             "test_accuracy": 0.85 + 0.03 * i, "images_per_second": 1000.0 + 10 * i, "elapsed_seconds": 2.0 * i,
             "world_size": 2, "global_batch_size": 64, "lr": 0.05, "final": i == n - 1} for i in range(n)]
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "run")
    assert plot.main([str(tmp_path / "run"), "-q"]) == 0
    png = (tmp_path / "run" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert plot.main([str(tmp_path / "run" / "metrics.jsonl"), "--out", str(tmp_path / "a" / "b.png")]) == 0
    assert (tmp_path / "a" / "b.png").stat().st_size > 5000


@pytest.mark.parametrize("with_val", [True, False])
def test_plot_draws_validation_and_stars_what_best_follows(with_val):
    """The validation curve is drawn, and the star marks the best validation accuracy (how best.h5 is
    chosen), not the best test accuracy; without a validation split, the best test accuracy."""
    pytest.importorskip("matplotlib")
    val = [0.90, 0.95, 0.93, 0.94] if with_val else [None] * 4
    recs = [Record(epoch=i + 1.0, step=i + 1, train_loss=0.5, train_accuracy=0.9, val_loss=v and 1 - v,
                   val_accuracy=v, test_loss=0.1, test_accuracy=t, images_per_second=9.0)
            for i, (v, t) in enumerate(zip(val, [0.91, 0.92, 0.96, 0.94]))]
    assert plot.best_record(recs) == (("val", 2.0, 95.0) if with_val else ("test", 3.0, 96.0))
    fig = plot.draw(recs)
    ax_loss, ax_acc, _ = fig.axes
    acc = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax_acc.get_lines()}
    loss = [line.get_label() for line in ax_loss.get_lines()]
    star = acc.pop("best validation (best.h5)" if with_val else "best test (best.h5)")
    assert star == (([2.0], [95.0]) if with_val else ([3.0], [96.0]))
    assert ("validation" in acc) == ("validation" in loss) == with_val
    if with_val:
        assert acc["validation"][1] == pytest.approx([90, 95, 93, 94])
    fig.clf()


@pytest.mark.parametrize("content, needle", [(None, "no such file"), ("", "no records yet"),
                                             ("\n{\"epoch\": 1}\n{oops\n", "metrics.jsonl:3: not a JSON line"),
                                             ("[1, 2]\n", "not a dpcnn metrics record")])
def test_plot_bad_metrics_one_line(tmp_path, capsys, content, needle):
    d = tmp_path / "run"
    d.mkdir()
    if content is not None:
        (d / "metrics.jsonl").write_text(content)
    assert plot.main([str(d)]) == 1
    one_error_line(capsys.readouterr().err, needle)


def test_plot_missing_run_dir_and_missing_matplotlib(run, tmp_path, capsys, monkeypatch):
    assert plot.main([str(tmp_path / "nowhere")]) == 1
    one_error_line(capsys.readouterr().err, "nowhere: no such run directory")
    assert plot.main([str(run[1])]) == 1                           # a checkpoint
    one_error_line(capsys.readouterr().err, "an HDF5 file (a checkpoint or a data file), not a metrics.jsonl")
    write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    assert plot.main([str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == \
        'error: plotting needs matplotlib: pip install "dpcnn[plot]" (or pip install matplotlib)\n'


# ----------------------------------------------------------------------------- predict


def drawn_seven(h: int = 90, w: int = 60) -> np.ndarray:
    """A dark '7' on light paper, off-centre, as grey levels (h, w) uint8."""
    a = np.full((h, w), 235, np.uint8)
    a[12:20, 8:44] = 20                                   # the bar
    for r in range(20, 75):                               # the slanted stroke
        c = 44 - (r - 20) * 24 // 55
        a[r, max(c - 4, 0):c + 4] = 20
    return a


def seven_png(d: Path) -> Path:
    """drawn_seven() saved as an RGB PNG, d/seven.png."""
    from PIL import Image
    Image.fromarray(drawn_seven()).convert("RGB").save(d / "seven.png")
    return d / "seven.png"


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    m = a.astype(np.float64)
    return (m.sum(1) @ np.arange(a.shape[0])) / m.sum(), (m.sum(0) @ np.arange(a.shape[1])) / m.sum()


def test_mnist_style_preprocessing():
    pytest.importorskip("PIL")
    u8 = predict.mnist_style(drawn_seven().astype(np.float64))
    assert u8.shape == (28, 28) and u8.dtype == np.uint8
    cy, cx = centre_of_mass(u8)
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1
    rows, cols = np.nonzero(u8 > 0)
    h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert h <= 20 and w <= 20 and max(h, w) >= 19
    assert u8.max() == 255 and (u8 > 0).mean() < 0.4                # white ink on black
    for corner in (u8[0, 0], u8[0, -1], u8[-1, 0], u8[-1, -1]):
        assert corner == 0
    # light-on-dark input gives the same result as dark-on-light
    np.testing.assert_array_equal(predict.mnist_style(255.0 - drawn_seven()), u8)


def test_predict_image_probabilities_equal_model_softmax(run, tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    data, path, model = run
    img, seen = seven_png(tmp_path), tmp_path / "seen"
    assert predict.main(["--checkpoint", str(path), str(img), "--json", "--top", "3", "--preprocess", "mnist",
                         "--save-input", str(seen)]) == 0
    r = json.loads(capsys.readouterr().out)
    u8 = np.asarray(Image.open(seen / "seven.28x28.png"))
    np.testing.assert_array_equal(u8, predict.mnist_style(drawn_seven().astype(np.float64)))
    with Split(data, "test") as s:
        x = s.standardise(u8[None])                               # the training-time transform
    z = model.forward(x).astype(np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    (rec,) = r["predictions"]
    assert rec["input"] == str(img) and rec["class"] == int(p.argmax()) and len(rec["top"]) == 3
    assert rec["probability"] == pytest.approx(p.max(), rel=1e-5)
    for t in rec["top"]:
        assert t["probability"] == pytest.approx(p[0, t["class"]], rel=1e-5)
    assert r["errors"] == [] and r["normalisation"] == str(data)
    assert rec["low_confidence"] == (p.max() < 0.5)


def test_predict_preprocess_resize_is_what_prepare_from_folder_stores(run, tmp_path, capsys):
    """--preprocess resize feeds a grey model the image as --from-folder would have stored it;
    mnist on a model that is not square and grey is refused."""
    Image = pytest.importorskip("PIL.Image")
    from dpcnn.images import folder_image
    _, path, _ = run
    img, seen = seven_png(tmp_path), tmp_path / "seen"
    assert predict.main(["--checkpoint", str(path), str(img), "--preprocess", "resize", "--save-input", str(seen),
                         "-q"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(seen / "seven.28x28.png")),
                                  folder_image(Image.open(img), (28, 28), "grey"))
    capsys.readouterr()
    rgb = tmp_path / "rgb.h5"
    model = CNN(ModelSpec(input_shape=(28, 28, 3)), seed=1)
    ckpt.save(rgb, ckpt.State(params=dict(model.p), velocity={k: np.zeros_like(v) for k, v in model.p.items()},
                              epoch=0, next_batch=0, step=0, spec=model.spec.to_dict(),
                              config={"dataset": "mnist"}, data_fingerprint="x"))
    assert predict.main(["--checkpoint", str(rgb), str(img), "--preprocess", "mnist", "-q"]) == 1
    one_error_line(capsys.readouterr().err, "--preprocess mnist", "28x28x3", "--preprocess resize")


def test_16_bit_and_exif_rotated_images_are_read_as_what_they_show(run, tmp_path, capsys):
    """A 16-bit grey PNG is the 8-bit picture scaled by 257, not clipped to white; a photo whose EXIF
    says 'rotated' is turned upright, by predict (both preprocessings) and prepare --from-folder."""
    Image = pytest.importorskip("PIL.Image")
    from dpcnn.images import folder_image
    _, path, _ = run
    seven = drawn_seven()
    Image.fromarray(seven.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(seven).save(tmp_path / "flat.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    for style in ("mnist", "resize"):
        seen = tmp_path / style
        assert predict.main(["--checkpoint", str(path), "--preprocess", style, "--save-input", str(seen), "-q",
                             str(tmp_path / "deep.png"), str(tmp_path / "flat.png")]) == 0
        deep, flat = (np.asarray(Image.open(seen / f"{n}.28x28.png")) for n in ("deep", "flat"))
        assert np.array_equal(deep, flat), style
    turned = Image.fromarray(np.rot90(seven, 1).copy())          # stored on its side, EXIF: rotate back
    exif = Image.Exif()
    exif[0x0112] = 6                                             # Orientation: turn 90 degrees clockwise to view
    turned.save(tmp_path / "side.jpg", exif=exif, quality=100)
    upright = folder_image(Image.open(tmp_path / "side.jpg"), (28, 28), "grey")
    want = folder_image(Image.fromarray(seven), (28, 28), "grey")
    assert np.abs(upright.astype(int) - want).mean() < 3, np.abs(upright.astype(int) - want).mean()
    capsys.readouterr()


def test_predict_text_shows_only_meaningful_probabilities_and_flags_doubt():
    top = [{"name": "7", "probability": 0.29}, {"name": "1", "probability": 0.2},
           {"name": "4", "probability": 0.004}]
    assert predict.describe(top) == "7 (p=0.290), 1 (p=0.200)  [low confidence: not much like any class]"
    assert predict.describe([{"name": "3", "probability": 0.995}, {"name": "5", "probability": 0.003}]) \
        == "3 (p=0.995)"


def test_predict_npy_arrays(run, tmp_path, capsys):
    data, path, model = run
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "batch.npy", u8[..., None])                      # (N, 28, 28, 1) uint8
    np.save(tmp_path / "one.npy", u8[1].astype(np.float32) / 255)       # (28, 28) float in [0, 1]
    np.save(tmp_path / "two.npy", u8[2][..., None])                       # (28, 28, 1) uint8
    assert predict.main(["--checkpoint", str(path), str(tmp_path / "batch.npy"), str(tmp_path / "one.npy"),
                         str(tmp_path / "two.npy")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    with Split(data, "test") as s:
        logits = model.forward(s.standardise(u8)).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    flag = ["  [low confidence: not much like any class]" if p[i].max() < 0.5 else "" for i in range(3)]
    want = [f"{tmp_path / 'batch.npy'}[{i}]: {p[i].argmax()} (p={p[i].max():.3f}){flag[i]}" for i in range(3)]
    assert lines == want + [f"{tmp_path / 'one.npy'}: {p[1].argmax()} (p={p[1].max():.3f}){flag[1]}",
                            f"{tmp_path / 'two.npy'}: {p[2].argmax()} (p={p[2].max():.3f}){flag[2]}"]


def test_predict_bad_files_are_reported_and_skipped(run, tmp_path, capsys):
    _, path, _ = run
    (tmp_path / "x.png").write_text("this is text, not a picture\n")
    np.save(tmp_path / "wide.npy", np.zeros((2, 28, 30), np.uint8))
    np.save(tmp_path / "hot.npy", np.full((28, 28), 3.0))
    np.save(tmp_path / "good.npy", np.zeros((28, 28), np.uint8))
    args = [str(tmp_path / n) for n in ("x.png", "wide.npy", "good.npy", "hot.npy", "missing.jpg")]
    assert predict.main(["--checkpoint", str(path), *args]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{tmp_path / 'good.npy'}: ") and len(out.splitlines()) == 1
    errs = err.strip().splitlines()
    assert len(errs) == 4 and all(e.startswith("error: ") for e in errs)
    assert f"{tmp_path / 'x.png'}: not an image" in errs[0]
    assert "wide.npy: array of shape (2, 28, 30)" in errs[1]
    assert "hot.npy: float values must be intensities in [0, 1]" in errs[2]
    assert "missing.jpg: no such file" in errs[3]


def test_predict_without_pillow_still_reads_npy(run, tmp_path, capsys, monkeypatch):
    _, path, _ = run
    (tmp_path / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    np.save(tmp_path / "d.npy", np.zeros((28, 28), np.uint8))
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert predict.main(["--checkpoint", str(path), str(tmp_path / "d.png"), str(tmp_path / "d.npy")]) == 1
    out, err = capsys.readouterr()
    one_error_line(err, "d.png", 'pip install "dpcnn[predict]"')
    assert out.startswith(f"{tmp_path / 'd.npy'}: ")


def test_predict_normalisation_when_the_data_file_is_gone(run, tmp_path, capsys):
    data, _, _ = run
    np.save(tmp_path / "d.npy", np.zeros((28, 28), np.uint8))
    for dataset in ("mnist", "tiny"):
        p = tmp_path / f"{dataset}.h5"
        save_checkpoint(p, data, dataset=dataset)
        s = ckpt.load(p)
        s.config["data"] = str(tmp_path / "gone.h5")
        ckpt.save(p, s)
    assert predict.main(["--checkpoint", str(tmp_path / "mnist.h5"), str(tmp_path / "d.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["normalisation"] == "MNIST constants"
    assert predict.main(["--checkpoint", str(tmp_path / "tiny.h5"), str(tmp_path / "d.npy")]) == 1
    one_error_line(capsys.readouterr().err, "gone.h5", "pass --data")
    tiny = ["--checkpoint", str(tmp_path / "tiny.h5"), str(tmp_path / "d.npy")]
    assert predict.main([*tiny, "--data", str(data)]) == 0
    other = make_data(tmp_path / "other.h5", seed=9, name="other")
    assert predict.main([*tiny, "--data", str(other)]) == 1
    one_error_line(capsys.readouterr().err, "another data set", "--force")


# ----------------------------------------------------------------------------- command lines


@pytest.mark.parametrize("module", ["evaluate", "plot", "predict"])
def test_help_has_examples(module):
    r = subprocess.run([sys.executable, "-m", f"dpcnn.{module}", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "examples:" in r.stdout and f"python -m dpcnn.{module}" in r.stdout
    for flag in ("-v, --verbose", "-q, --quiet", "--debug"):
        assert flag in r.stdout


@pytest.mark.parametrize("argv, needle", [
    (["dpcnn.train", "--scale", "0.9"], "argument --scale: expected a zoom range in [0, 0.5], got 0.9"),
    (["dpcnn.evaluate"], "the following arguments are required: --checkpoint"),
    (["dpcnn.plot", "run", "--bogus"], "unrecognized arguments: --bogus"),
    (["dpcnn.predict", "--checkpoint", "c.h5", "x.png", "--top", "0"], "argument --top"),
    (["dpcnn.data", "prepare", "--timeout", "-1"], "argument --timeout"),
    (["dpcnn.bench", "--batch-size", "x"], "argument --batch-size"),
])
def test_bad_command_line_is_one_error_line(argv, needle):
    """A bad command line is reported like every other error: one line, not the whole usage."""
    r = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r
    prog = "python -m " + " ".join(argv[:2] if argv[1:2] == ["prepare"] else argv[:1])
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(f" (see {prog} --help)"), lines
    assert needle in lines[0]


@pytest.mark.parametrize("command", ["info", "decorated"])
def test_closed_stdout_ends_a_command_quietly(tiny_h5, command):
    """`python -m dpcnn.data info FILE | true`: no traceback, no error line, status 1."""
    code = {"info": f"import sys, dpcnn.prepare as d; sys.exit(d.main(['info', {str(tiny_h5)!r}]))",
            "decorated": ("import sys, dpcnn.cli as c\n"
                          "main = c.entry_point(lambda: [print('line', i) for i in range(10**5)] and 0)\n"
                          "sys.exit(main())")}[command]
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "$0" | true; exit ${{PIPESTATUS[0]}}', code],
                       capture_output=True, text=True, timeout=60, env=child_env())
    assert r.stderr == "" and r.returncode == 1, r.stderr


def test_the_readme_error_table_quotes_real_messages():
    """Every message the README's error table quotes is in the code, fragment by fragment (a
    `...` stands for names and numbers filled in at run time)."""
    import re
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### When something goes wrong", 1)[1].split("###", 1)[0]
    quoted = [m for row in table.splitlines() if row.startswith("| `")
              for m in [re.match(r"\| `([^`]+)`", row).group(1)]]
    assert len(quoted) >= 10
    code = " ".join(" ".join(p.read_text().split()) for p in (ROOT / "dpcnn").glob("*.py"))
    code = re.sub(r'"\s*f?"', "", code)                     # join implicitly concatenated literals
    code = re.sub(r"\{[^{}]*\}|%[ds.0-9fg]+", "...", code)  # placeholders as the table writes them
    for message in quoted:
        for fragment in (f.strip() for f in message.split("...")):
            if fragment:
                assert fragment in code, (message, fragment)
