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
    assert dpcnn.fit(cfg, SerialComm()) == 0
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
            dpcnn.fit(cfg, SerialComm())
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
    for bad, says in ((np.zeros((2, 27, 28), np.uint8), "expected (28, 28)"),
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
                np.full((28, 28), -3), np.zeros((0, 28, 28), np.uint8), np.zeros((3, 28, 28, 3), np.uint8)):
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
        assert float(z["mean"]) == clf.norm.mean and json.loads(str(z["class_names.json"]))[0] == "0"
