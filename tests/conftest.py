"""Shared test fixtures: a small, learnable data set in dpcnn's HDF5 format, and launch helpers."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpcnn.datasets import DatasetInfo
from dpcnn.h5format import write_h5
from dpcnn.node import find_mpiexec

ROOT = Path(__file__).resolve().parents[1]
TINY_INFO = DatasetInfo(name="tiny-blobs", class_names=tuple("0123456789"))


def blob_arrays(n_train=384, n_test=96, seed=0) -> dict:
    """split -> (images (N, 28, 28) uint8, labels (N,) uint8): a bright 7x7 square whose
    position encodes the class, on noise. A CNN learns it in a few dozen steps."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        rows, cols = 2 + 12 * (y // 5), 1 + 5 * (y % 5)
        for dy in range(7):                       # 49 vectorised writes, not a per-sample loop
            for dx in range(7):
                x[np.arange(n), rows + dy, cols + dx] = 220
        out[split] = (x, y)
    return out


def write_tiny(path: Path, **kw) -> Path:
    write_h5(Path(path), TINY_INFO, blob_arrays(**kw), {"tiny": "0" * 64})
    return Path(path)


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("data") / "tiny.h5")


MNIST_DIR = Path(os.environ.get("DPCNN_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_h5(tmp_path_factory) -> Path:
    """The real MNIST, prepared once from DPCNN_MNIST_DIR (default ../shared/data/mnist); skips without it."""
    if not any((MNIST_DIR / f"train-images-idx3-ubyte{gz}").exists() for gz in ("", ".gz")):
        pytest.skip(f"real MNIST files not present in {MNIST_DIR} (set DPCNN_MNIST_DIR)")
    from dpcnn.idx import prepare_dataset
    return prepare_dataset("mnist", source=MNIST_DIR, out=tmp_path_factory.mktemp("mnist") / "mnist.h5")


def mpiexec() -> str:
    exe = find_mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    return exe


def child_env(**extra) -> dict:
    """Environment for launched jobs: the repo importable, one BLAS thread, no Slurm leakage."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_job(args, nprocs=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run `python ARGS` (under `mpiexec -n nprocs` when given) with a hard timeout."""
    cmd = [sys.executable, *map(str, args)]
    if nprocs:
        cmd = [mpiexec(), "-n", str(nprocs), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(), **kw)
