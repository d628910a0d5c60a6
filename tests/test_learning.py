"""Learning well and choosing honestly: the validation hold-out, augmentation, initialisation
schemes and starting from a checkpoint's weights. Each random draw depends on the seed, the
epoch, the global batch and the position in it only, so every test here also checks that one
rank and three see the same bits."""

import json
import math

import numpy as np
import pytest
from conftest import run_job
from helpers import assert_same_state, final_state, job_args, metrics, records_without_timings, train

from dpcnn import checkpoint as ckpt
from dpcnn.config import Config, parse_args
from dpcnn.data import Augment, ShardedLoader, Split, affine, holdout, translate
from dpcnn.model import CNN, ModelSpec

# ------------------------------------------------------------------------- the validation hold-out

def test_holdout_is_a_seeded_partition():
    tr, va = holdout(1000, 100, seed=0)
    assert tr.dtype == va.dtype == np.int64 and (len(tr), len(va)) == (900, 100)
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(1000))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)               # sorted, distinct
    assert all(np.array_equal(a, b) for a, b in zip(holdout(1000, 100, 0), (tr, va), strict=True))
    assert not np.array_equal(holdout(1000, 100, 1)[1], va)
    assert len(holdout(1000, 0, 0)[1]) == 0
    with pytest.raises(ValueError):
        holdout(10, 10, 0)


def test_loader_orders_only_the_training_rows(tiny_h5):
    """With a subset, every epoch covers exactly those rows, and the ranks' slices of each global
    batch still concatenate to the one-rank batch."""
    tr, va = holdout(384, 64, seed=0)
    with Split(tiny_h5) as s:
        x_all, y_all = s.read(0, s.n)
        one = ShardedLoader(s, batch_size=40, rank=0, size=1, seed=3, drop_last=False, subset=tr)
        assert (one.n, one.steps_per_epoch) == (320, 8)
        for epoch in (0, 1):
            order = one.order(epoch)
            assert np.array_equal(np.sort(order), tr)
            for k in range(one.steps_per_epoch):
                x, y, M = one.batch(epoch, k)
                rows = order[k * 40:(k + 1) * 40]
                assert M == len(rows) and np.array_equal(y, y_all[rows]) and np.array_equal(x, x_all[rows])
                parts = [ShardedLoader(s, batch_size=40, rank=r, size=3, seed=3, drop_last=False, subset=tr,
                                       micro_batch=4).batch(epoch, k) for r in range(3)]
                assert np.array_equal(np.concatenate([p[0] for p in parts]), x)


# ------------------------------------------------------------------------- augmentation

def naive_translate(images, dy, dx):
    """The definition, one pixel at a time."""
    out = np.zeros_like(images)
    m, H, W = images.shape
    for n in range(m):
        for i in range(H):
            for j in range(W):
                if 0 <= i - dy[n] < H and 0 <= j - dx[n] < W:
                    out[n, i, j] = images[n, i - dy[n], j - dx[n]]
    return out


def test_translate_is_the_shift_it_claims():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (40, 9, 7)).astype(np.uint8)       # no zeros: a zero is the fill
    dy, dx = rng.integers(-4, 5, 40), rng.integers(-3, 4, 40)
    dy[:3], dx[:3] = (0, 12, -9), (0, 0, 8)                      # none, off the image, off both ways
    out = translate(x, dy, dx)
    assert out.dtype == np.uint8 and out.shape == x.shape
    np.testing.assert_array_equal(out, naive_translate(x, dy, dx))
    assert np.array_equal(out[0], x[0]) and not out[1].any() and not out[2].any()
    # shifted back, the pixels that stayed inside are the originals, the others are zeros
    stayed = translate(translate(np.ones_like(x), dy, dx), -dy, -dx)
    assert np.array_equal(translate(out, -dy, -dx), x * stayed)
    assert stayed[0].all() and stayed[3:].sum() == sum((9 - abs(a)) * (7 - abs(b)) for a, b in zip(dy[3:], dx[3:]))
    assert translate(x[:0], dy[:0], dx[:0]).shape == (0, 9, 7)


def test_rotation_resamples_like_the_geometry_says():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 11, 11)).astype(np.uint8)
    dy, dx = rng.integers(-2, 3, 6), rng.integers(-2, 3, 6)
    zero = np.zeros(6, np.float32)
    # angle 0: exactly the integer shift
    np.testing.assert_array_equal(affine(x, dy, dx, zero + 1, zero), translate(x, dy, dx).astype(np.float32))
    # a quarter turn of a square image: np.rot90, up to float32 rounding of cos and sin
    c, s = np.float32(math.cos(math.pi / 2)), np.float32(math.sin(math.pi / 2))
    quarter = affine(x, zero.astype(int), zero.astype(int), zero + c, zero + s)
    turned = [np.rot90(x, 1, axes=(1, 2)), np.rot90(x, -1, axes=(1, 2))]
    assert min(np.abs(quarter - t).max() for t in turned) < 1e-3
    # a small rotation keeps a central blob's mass, values stay in [0, 255]
    blob = np.zeros((1, 28, 28), np.uint8)
    blob[0, 10:18, 11:17] = 200
    c, s = np.float32(math.cos(0.2)), np.float32(math.sin(0.2))
    r = affine(blob, np.array([1]), np.array([-2]), np.array([c]), np.array([s]))
    assert r.min() >= 0 and r.max() <= 255 and abs(r.sum() / blob.sum() - 1) < 0.02


@pytest.mark.parametrize("rotate, scale", [(0.0, 0.0), (10.0, 0.0), (0.0, 0.1)])
def test_augmented_batch_is_the_same_on_1_and_3_ranks(tiny_h5, rotate, scale):
    """Each image's transform is drawn for its position in the global batch: the ranks' slices
    concatenate bitwise to the one-rank batch, also from a fresh loader (a resume)."""
    tr, _ = holdout(384, 64, seed=0)
    aug = Augment(shift=2, rotate=rotate, seed=7, scale=scale)
    with Split(tiny_h5) as s:
        def loader(rank, size):
            return ShardedLoader(s, batch_size=28, rank=rank, size=size, seed=7, subset=tr, micro_batch=4,
                                 drop_last=False, augment=aug)
        one, three = loader(0, 1), [loader(r, 3) for r in range(3)]
        plain = ShardedLoader(s, batch_size=28, rank=0, size=1, seed=7, subset=tr, drop_last=False)
        for epoch, k in ((0, 0), (0, 11), (1, 3)):                   # batch 11 is the last, of 12 samples
            x, y, M = one.batch(epoch, k)
            parts = [ld.batch(epoch, k) for ld in three]
            assert [len(p[1]) for p in parts] == ([12, 8, 8] if k < 11 else [4, 4, 4])
            assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
            assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
            assert np.array_equal(loader(2, 3).batch(epoch, k)[0], parts[2][0])
            assert not np.array_equal(x, plain.batch(epoch, k)[0])          # it did transform
        assert not np.array_equal(one.batch(0, 0)[0], one.batch(1, 0)[0])


def test_augment_draws_depend_on_seed_epoch_and_batch_only():
    a = Augment(shift=2, seed=3)
    dy, dx, angle, zoom = a.draws(1, 5, 64)
    assert dy.min() >= -2 and dy.max() <= 2 and set(np.unique(dx)) == set(range(-2, 3)) and not angle.any()
    assert (zoom == 1).all()
    assert all(np.array_equal(u, v) for u, v in zip(a.draws(1, 5, 64), (dy, dx, angle, zoom), strict=True))
    for other in (Augment(shift=2, seed=4).draws(1, 5, 64), a.draws(2, 5, 64), a.draws(1, 6, 64)):
        assert not np.array_equal(other[0], dy)
    _, _, angle, _ = Augment(shift=1, rotate=15, seed=3).draws(0, 0, 1000)
    assert np.abs(angle).max() <= math.radians(15) and np.abs(angle).max() > math.radians(14)
    # a zoom is drawn after the others: adding --scale leaves the shifts and angles of a run as they were
    *same, zoom = Augment(shift=1, rotate=15, seed=3, scale=0.1).draws(0, 0, 1000)
    assert all(np.array_equal(u, v) for u, v in zip(same, Augment(shift=1, rotate=15, seed=3).draws(0, 0, 1000)))
    assert 0.9 <= zoom.min() < 0.901 and 1.099 < zoom.max() <= 1.1


def test_zoom_magnifies_about_the_centre():
    """cos/z, sin/z magnify z times: a centred Gaussian blob (sd 4 pixels) keeps its centre, its sd
    becomes 4z and its mass grows by z^2."""
    i = np.arange(41) - 20
    g = np.rint(250 * np.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / (2 * 4.0 ** 2))).astype(np.uint8)
    z = np.array([1.25, 0.8])
    c, s = (np.cos(0.0) / z).astype(np.float32), (np.sin(0.0) / z).astype(np.float32)
    out = affine(np.stack([g, g]), np.zeros(2, int), np.zeros(2, int), c, s)
    np.testing.assert_allclose(out.sum((1, 2)) / g.sum(), z ** 2, rtol=1e-3)
    for img, zoom in zip(out, z):
        rows = img.sum(1) / img.sum()
        assert abs(rows @ i) < 1e-4 and abs(np.sqrt(rows @ i ** 2) - 4 * zoom) < 0.01


# ------------------------------------------------------------------------- initialisation

def test_init_schemes():
    spec = ModelSpec()
    fans = {"conv1": (9, 72), "conv2": (72, 144), "fc1": (784, 128), "fc2": (128, 10)}
    he, torch, glorot = (CNN(spec, seed=5, init=s) for s in ("he", "torch", "glorot"))
    rng = np.random.default_rng(5)                       # He-normal draws as they always were
    for name, shape in he.shapes:
        want = rng.standard_normal(shape) * math.sqrt(2 / fans[name[:-2]][0]) if name.endswith(".w") else 0
        np.testing.assert_array_equal(he.p[name], np.asarray(want, np.float32) + np.zeros(shape, np.float32))
    for layer, (fan_in, fan_out) in fans.items():
        w, b = torch.p[f"{layer}.w"], torch.p[f"{layer}.b"]
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound and np.abs(b).max() <= bound
        assert np.all(b != 0)
        g = glorot.p[f"{layer}.w"]
        assert np.abs(g).max() <= math.sqrt(6 / (fan_in + fan_out)) and not glorot.p[f"{layer}.b"].any()
    assert np.array_equal(CNN(spec, seed=5, init="torch").params, torch.params)
    with pytest.raises(ValueError, match="init must be one of"):
        CNN(spec, init="lecun")


def test_init_flag_sets_the_initial_weights(tiny_h5, tmp_path):
    for scheme in ("he", "torch"):
        assert train(tiny_h5, tmp_path / scheme, "--max-steps", "1", "--lr", "0", "--init", scheme,
                     "--val-size", "0") == 0
        got = final_state(tmp_path / scheme).params                  # lr 0: the weights it started from
        want = CNN(ModelSpec(), seed=0, init=scheme).p
        assert all(np.array_equal(got[k], want[k]) for k in want), scheme


# ------------------------------------------------------------------------- the trainer

def test_validation_in_records_and_config(tiny_h5, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--epochs", "2", "--val-size", "64", "--shift", "1") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["val_size"], cfg["val_seed"], cfg["train_samples"], cfg["steps_per_epoch"]) == (64, 0, 320, 10)
    assert (cfg["shift"], cfg["rotate"], cfg["init"], cfg["init_from"]) == (1, 0.0, "torch", None)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [10, 20]
    assert all(0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert ckpt.load(out / "best.h5").config["val_size"] == 64
    assert train(tiny_h5, tmp_path / "none", "--max-steps", "3", "--val-size", "0") == 0
    assert metrics(tmp_path / "none")[-1]["val_accuracy"] is None


def test_default_validation_size():
    assert Config().val_size is None and parse_args([])[0].val_size is None
    assert Config().with_val_size(60000).val_size == 5000          # MNIST: 55,000 left to train on
    assert Config().with_val_size(384).val_size == 38              # a small data set: a tenth (Keras's habit)
    assert Config().with_val_size(9).val_size == 0
    assert Config(val_size=7).with_val_size(60000).val_size == 7


@pytest.mark.parametrize("by", ["val", "test"])
def test_best_is_chosen_by_validation_accuracy(tiny_h5, tmp_path, monkeypatch, by):
    """best.h5 follows the validation accuracy and ignores the test accuracy, which chooses only
    without a validation split."""
    from dpcnn import train as T
    scores = iter([(0.5, 0.9), (0.9, 0.5), (0.7, 0.95)])          # (validation, test) after epochs 1-3
    orig = T.Recorder.record

    def record(self, *a):
        rec = orig(self, *a)
        val, test = next(scores)
        rec.val_accuracy, rec.test_accuracy = (val if by == "val" else None), test
        return rec

    monkeypatch.setattr(T.Recorder, "record", record)
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--epochs", "3", "--val-size", "64" if by == "val" else "0") == 0
    best = ckpt.load(out / "best.h5")
    assert (best.step, best.best_accuracy) == ((20, 0.9) if by == "val" else (36, 0.95))   # 10 or 12 steps an epoch


def test_best_follows_every_evaluation_also_within_epochs(tiny_h5, tmp_path, monkeypatch):
    """With --eval-every, best.h5 is the best of all records, not only of the epoch ends; a record
    within an epoch that is not the best writes no checkpoint."""
    from dpcnn import train as T
    scores = iter([0.5, 0.8, 0.6, 0.7, 0.75, 0.4])        # records at steps 4, 8, 10 (epoch end), 12, 16, 20
    orig = T.Recorder.record

    def record(self, *a):
        rec = orig(self, *a)
        rec.val_accuracy = next(scores)
        return rec

    monkeypatch.setattr(T.Recorder, "record", record)
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--epochs", "2", "--val-size", "64", "--eval-every", "4", "--keep", "10") == 0
    assert [r["step"] for r in metrics(out)] == [4, 8, 10, 12, 16, 20]
    best = ckpt.load(out / "best.h5")
    assert (best.step, best.best_accuracy) == (8, 0.8)
    assert sorted(int(p.name[9:18]) for p in out.glob("ckpt-step*.h5")) == [4, 8, 10, 20]


def test_best_survives_a_kill_between_its_two_writes(tiny_h5, tmp_path, monkeypatch):
    """A new best writes best.h5 and a step checkpoint; a process killed after the first of the two
    must still end, once resumed, with best.h5 holding the best record."""
    from dpcnn import checkpoint
    from dpcnn import train as T
    acc = {4: 0.5, 8: 0.8, 10: 0.6, 12: 0.7, 16: 0.75, 20: 0.4}     # by step: the best is at step 8
    orig_record, orig_save = T.Recorder.record, checkpoint.save
    saves_at_8 = []

    def record(self, *a):
        rec = orig_record(self, *a)
        rec.val_accuracy = acc[rec.step]
        return rec

    def save(path, state):
        if state.step == 8:
            saves_at_8.append(path.name)
            if len(saves_at_8) == 2:
                raise KeyboardInterrupt                      # killed between the two writes
        return orig_save(path, state)

    monkeypatch.setattr(T.Recorder, "record", record)
    monkeypatch.setattr(checkpoint, "save", save)
    out = tmp_path / "run"
    flags = ("--epochs", "2", "--val-size", "64", "--eval-every", "4", "--keep", "10")
    assert train(tiny_h5, out, *flags) == 1 and len(saves_at_8) == 2
    assert train(tiny_h5, out, *flags) == 0                              # resumes, ends
    best = ckpt.load(out / "best.h5")
    assert (best.step, best.best_accuracy) == (8, 0.8)


def test_validation_refusals(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--val-size", "360") == 1                # 24 left: less than a batch of 32
    err = capsys.readouterr().err
    assert "--val-size 360 leaves 24 of the 384 training samples" in err and err.count("\n") == 1, err
    assert train(tiny_h5, out, "--epochs", "2", "--max-steps", "3", "--val-size", "64", "--shift", "1") == 0
    capsys.readouterr()
    for extra, said in ((["--val-size", "32", "--shift", "1"], "--val-size 32 (saved: --val-size 64)"),
                        (["--val-size", "64", "--shift", "1", "--val-seed", "1"], "(saved: --val-seed 0)"),
                        (["--val-size", "64"], "--shift 0 (saved: --shift 1)"),
                        (["--val-size", "64", "--shift", "1", "--init", "he"], "--init he (saved: --init torch)"),
                        (["--val-size", "64", "--shift", "1", "--scale", "0.1"], "--scale 0.1 (saved: --scale 0.0)")):
        assert train(tiny_h5, out, "--epochs", "2", "--max-steps", "6", *extra) == 1
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert train(tiny_h5, tmp_path / "far", "--shift", "28") == 1
    err = capsys.readouterr().err
    assert "--shift 28: the images of" in err and "are 28x28" in err and err.count("\n") == 1, err
    # a checkpoint from before --scale and --val-size existed ran without them: changing them is refused too
    newest = sorted(out.glob("ckpt-step*.h5"))[-1]
    state = ckpt.load(newest)
    del state.config["scale"], state.config["val_size"]
    ckpt.save(newest, state)
    for extra, said in ((["--shift", "1", "--scale", "0.3"], "--scale 0.3 (saved: --scale 0.0)"),
                        (["--shift", "1", "--val-size", "64"], "--val-size 64 (saved: --val-size 0)")):
        assert train(tiny_h5, out, "--epochs", "2", "--max-steps", "6", *extra) == 1
        err = capsys.readouterr().err
        assert said in err, err
    for flag, value in (("--rotate", "200"), ("--shift", "-1"), ("--val-size", "-5"), ("--init", "zeros"),
                        ("--scale", "0.7"), ("--scale", "nan")):
        with pytest.raises(SystemExit) as e:
            parse_args([flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_init_from_starts_a_new_run_from_the_weights(tiny_h5, tmp_path, capsys):
    src, tune = tmp_path / "src", tmp_path / "tune"
    assert train(tiny_h5, src, "--epochs", "1", "--val-size", "0") == 0
    source = ckpt.load(src / "best.h5")
    # lr 0: after one step the weights are still the source's; the step count starts afresh
    assert train(tiny_h5, tune, "--epochs", "2", "--max-steps", "1", "--lr", "0", "--val-size", "0",
                 "--init-from", src / "best.h5") == 0
    s = final_state(tune)
    assert s.step == 1 and len(s.metrics) == 1 and s.config["init_from"] == str(src / "best.h5")
    assert all(np.array_equal(s.params[k], source.params[k]) for k in source.params)
    assert not all(np.array_equal(s.velocity[k], source.velocity[k]) for k in source.velocity)
    capsys.readouterr()
    # resuming that run needs the same --init-from; another model is refused in one line
    assert train(tiny_h5, tune, "--epochs", "2", "--max-steps", "2", "--lr", "0", "--val-size", "0") == 1
    err = capsys.readouterr().err
    assert "1 setting: no --init-from (saved: --init-from" in err and err.count("\n") == 1, err
    assert train(tiny_h5, tmp_path / "other", "--channels", "4,8", "--init-from", src / "best.h5") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --init-from {src / 'best.h5'}: saved for model") and err.count("\n") == 1, err
    assert train(tiny_h5, tmp_path / "none", "--init-from", tmp_path / "missing.h5") == 1
    err = capsys.readouterr().err
    assert "missing.h5: no such checkpoint file" in err and err.count("\n") == 1, err


@pytest.mark.timeout(300)
def test_same_bits_on_1_and_3_ranks_with_validation_augmentation_and_init(tiny_h5, tmp_path):
    """The new draws keep the guarantee: a validation hold-out, shifts, rotations, zooms and PyTorch's
    initialisation on 1 and 3 ranks (batch 28 in micro-batches of 4: 3/2/2 on 3 ranks)."""
    flags = ("--max-steps", "20", "--batch-size", "28", "--micro-batch", "4", "--eval-every", "7",
             "--val-size", "40", "--shift", "2", "--rotate", "10", "--scale", "0.1", "--init", "torch", "--exact")
    runs = {}
    for p in (1, 3):
        runs[p] = tmp_path / f"p{p}"
        r = run_job(job_args(tiny_h5, runs[p], *flags), nprocs=p)
        assert r.returncode == 0, r.stderr
    assert records_without_timings(runs[3]) == records_without_timings(runs[1])
    assert_same_state(final_state(runs[3]), final_state(runs[1]))
    assert all(m["val_accuracy"] is not None for m in metrics(runs[1]))


def test_patience_stops_a_run_that_stopped_improving(tiny_h5, tmp_path, capsys):
    """--patience 2 with a learning rate of 0: the first record is the best, the next two are no
    better, so the run ends after the third, as its final record, and stays ended."""
    out = tmp_path / "run"
    args = ("--epochs", "10", "--lr", "0", "--val-size", "64", "--patience", "2", "--eval-every", "4", "-v")
    assert train(tiny_h5, out, *args) == 0                          # 320 rows: 10 steps an epoch
    assert [(m["step"], m["final"]) for m in metrics(out)] == [(4, False), (8, False), (10, True)]
    assert "stopping early: no better validation accuracy in the last 2 evaluations" in capsys.readouterr().err
    assert final_state(out).step == 10 and ckpt.load(out / "best.h5").step == 4
    assert train(tiny_h5, out, *args) == 0                          # the same command: nothing to train
    assert "stopped early at step 10 (--patience 2): nothing to train" in capsys.readouterr().err
    assert len(metrics(out)) == 3
    # a mid-epoch record that ends the run is checkpointed too, so a resume does not train past it
    mid = tmp_path / "mid"
    assert train(tiny_h5, mid, "--epochs", "10", "--lr", "0", "--val-size", "64", "--patience", "1",
                 "--eval-every", "3") == 0
    assert [m["step"] for m in metrics(mid)] == [3, 6] and final_state(mid).step == 6
