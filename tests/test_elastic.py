"""Elastic distortions (Simard, Steinkraus and Platt 2003): smooth random displacement fields, drawn
from (seed, epoch, global batch, position) like the other augmentations, so the samples are the same
on any number of ranks and after a resume."""

import math

import numpy as np
import pytest
from conftest import run_job
from helpers import assert_same_state, final_state, job_args, metrics, records_without_timings, train

from dpcnn.config import Config, ConfigError
from dpcnn.data import Augment, ShardedLoader, Split, affine, gaussian_matrix, holdout, smooth, translate


def naive_smooth(plane: np.ndarray, sigma: float) -> np.ndarray:
    """The definition: a 2-D convolution with a Gaussian whose weights sum to 1 over all offsets,
    zero outside the plane, one output pixel at a time."""
    H, W = plane.shape
    z = sum(math.exp(-d * d / (2 * sigma * sigma)) for d in range(-200, 201))
    out = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            for a in range(H):
                for b in range(W):
                    out[i, j] += plane[a, b] * math.exp(-((i - a) ** 2 + (j - b) ** 2) / (2 * sigma * sigma))
    return out / (z * z)


def test_smooth_is_a_gaussian_convolution():
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, (3, 2, 9, 7))
    out = smooth(noise, 2.0)
    assert out.shape == noise.shape
    for n, c in ((0, 0), (2, 1)):
        np.testing.assert_allclose(out[n, c], naive_smooth(noise[n, c], 2.0), rtol=1e-12, atol=1e-14)
    G = gaussian_matrix(50, 3.0)                        # far from the edges each row sums to 1
    assert G[25].sum() == pytest.approx(1.0, abs=1e-12) and G[0].sum() == pytest.approx(0.5, abs=0.1)


def test_the_field_is_smooth_scaled_by_alpha_and_drawn_per_position():
    a = Augment(elastic=34, sigma=4, seed=3)
    f = a.field(1, 5, 64, 28, 28)
    assert f.shape == (64, 2, 28, 28) and f.dtype == np.float32
    # about Simard's displacements: a pixel or two, up to several; neighbours within a pixel of each other
    assert 0.5 < f.std() < 3 and np.abs(f).max() > 2
    steps = max(np.abs(np.diff(f, axis=2)).max(), np.abs(np.diff(f, axis=3)).max())
    assert steps < 0.25 * np.abs(f).max() and steps < 1.5
    # uniform noise of the same scale, unsmoothed, jumps by tens of pixels between neighbours
    noise = 34 * np.random.default_rng(0).uniform(-1, 1, (64, 2, 28, 28))
    assert np.abs(np.diff(noise, axis=3)).max() > 30
    # a field is twice as strong at alpha 68, smoother at sigma 6; each position's field is its own
    np.testing.assert_allclose(Augment(elastic=68, sigma=4, seed=3).field(1, 5, 64, 28, 28), 2 * f, rtol=1e-6)
    g = Augment(elastic=34, sigma=6, seed=3).field(1, 5, 64, 28, 28)
    assert np.abs(np.diff(g, axis=3)).max() < steps
    assert not np.array_equal(f[0], f[1]) and not np.array_equal(a.field(2, 5, 64, 28, 28), f)
    # the slice of one rank: the same bits as the whole batch's field, sliced
    assert np.array_equal(a.field(1, 5, 64, 28, 28, slice(40, 52)), f[40:52])


def test_the_noise_is_drawn_after_the_other_draws():
    """Turning --elastic on leaves every shift, angle and zoom of a run as it was."""
    plain, elastic = Augment(shift=2, rotate=10, scale=0.1, seed=3), Augment(shift=2, rotate=10, scale=0.1, seed=3,
                                                                              elastic=34)
    for u, v in zip(plain.draws(0, 7, 64), elastic.draws(0, 7, 64), strict=True):
        assert np.array_equal(u, v)


def test_a_field_displaces_the_sampling_point():
    """out[n, i, j] = image[n, i + field_y, j + field_x]: a constant field of whole pixels is a shift the
    other way, alpha 0 (a zero field) changes nothing, and a field composes with the shift."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, 11, 9)).astype(np.uint8)
    zero_i, one, zero = np.zeros(5, int), np.ones(5, np.float32), np.zeros(5, np.float32)
    field = np.zeros((5, 2, 11, 9), np.float32)
    assert np.array_equal(affine(x, zero_i, zero_i, one, zero, field), x.astype(np.float32))
    field[:, 0], field[:, 1] = 2, -1
    np.testing.assert_array_equal(affine(x, zero_i, zero_i, one, zero, field),
                                  translate(x, zero_i - 2, zero_i + 1).astype(np.float32))
    dy, dx = rng.integers(-2, 3, 5), rng.integers(-2, 3, 5)
    np.testing.assert_array_equal(affine(x, dy, dx, one, zero, field), translate(x, dy - 2, dx + 1).astype(np.float32))
    # alpha 0: Augment's output is the image itself
    img = rng.integers(0, 256, (8, 28, 28)).astype(np.uint8)
    still = Augment(elastic=0, seed=1)
    assert np.array_equal(still(img, 0, 0, 8, 0), img)
    # every channel of a colour image is distorted alike: as the grey image is
    aug = Augment(shift=1, elastic=34, seed=1)
    colour = aug(np.stack([img, img, img], axis=3), 0, 0, 8, 0)
    grey = aug(img, 0, 0, 8, 0)
    assert colour.shape == (8, 28, 28, 3) and all(np.array_equal(colour[..., c], grey) for c in range(3))


def test_distorted_batches_are_the_same_on_1_and_3_ranks(tiny_h5):
    tr, _ = holdout(384, 64, seed=0)
    aug = Augment(shift=2, rotate=10, elastic=34, sigma=4, seed=7)
    with Split(tiny_h5) as s:
        def loader(rank, size):
            return ShardedLoader(s, batch_size=28, rank=rank, size=size, seed=7, subset=tr, micro_batch=4,
                                 drop_last=False, augment=aug)
        one, three = loader(0, 1), [loader(r, 3) for r in range(3)]
        shifted = ShardedLoader(s, batch_size=28, rank=0, size=1, seed=7, subset=tr, drop_last=False,
                                augment=Augment(shift=2, rotate=10, seed=7))
        for epoch, k in ((0, 0), (1, 11)):
            x = one.batch(epoch, k)[0]
            assert np.array_equal(np.concatenate([ld.batch(epoch, k)[0] for ld in three]), x)
            assert not np.array_equal(x, shifted.batch(epoch, k)[0])            # it did distort


def test_elastic_flags_are_checked():
    with pytest.raises(ConfigError, match="elastic"):
        Config(elastic=-1.0).check()
    with pytest.raises(ConfigError, match="elastic_sigma"):
        Config(elastic_sigma=0.0).check()
    with pytest.raises(ValueError, match="sigma > 0"):
        Augment(elastic=34, sigma=0)


@pytest.mark.timeout(300)
def test_same_bits_on_1_and_2_ranks_with_elastic_distortions(tiny_h5, tmp_path):
    flags = ("--max-steps", "20", "--batch-size", "28", "--micro-batch", "4", "--eval-every", "7", "--exact",
             "--val-size", "40", "--shift", "1", "--elastic", "34", "--elastic-sigma", "5")
    runs = {}
    for p in (1, 2):
        runs[p] = tmp_path / f"p{p}"
        r = run_job(job_args(tiny_h5, runs[p], *flags), nprocs=p)
        assert r.returncode == 0, r.stderr
    assert records_without_timings(runs[2]) == records_without_timings(runs[1])
    assert_same_state(final_state(runs[2]), final_state(runs[1]))


def test_elastic_runs_resume_bit_identical_and_only_with_the_same_distortions(tiny_h5, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(tiny_h5, a, "--max-steps", "17", "--elastic", "20") == 0
    assert train(tiny_h5, b, "--max-steps", "7", "--elastic", "20") == 0
    capsys.readouterr()
    assert train(tiny_h5, b, "--max-steps", "17", "--elastic", "20", "--elastic-sigma", "4") == 1
    assert "--elastic-sigma 4.0 (saved: --elastic-sigma 6.0)" in capsys.readouterr().err
    assert train(tiny_h5, b, "--max-steps", "17", "--elastic", "20") == 0
    assert_same_state(final_state(a), final_state(b))
    assert metrics(a)[-1]["test_loss"] == metrics(b)[-1]["test_loss"]
    assert train(tiny_h5, tmp_path / "c", "--max-steps", "17") == 0           # the distortions changed the run
    assert metrics(tmp_path / "c")[-1]["test_loss"] != metrics(a)[-1]["test_loss"]
