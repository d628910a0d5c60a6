"""What each rank reads of a prepared file: the sample order, its shards, and augmentation.

The file itself (layout, validated reading, ``verify``, writing) is ``dpcnn.h5format``.

Reading on P ranks: the order of epoch e is ``epoch_order(N, seed, e)``; global batch k is
``order[k*B : (k+1)*B]`` whatever P is, and rank r takes the contiguous slice
``shard_bounds(M, r, P)`` of it. At the first batch of an epoch a rank reads only the rows of
all its slices (about N/P) as uint8 and converts one batch at a time to standardised float32
NHWC ``(m, H, W, C)``.

Validation and augmentation: ``holdout(N, V, seed)`` draws the V training rows held out for
validation; the loader then orders only the others (``subset``). ``Augment`` translates (and
rotates, zooms and elastically distorts) each training image at random, with draws made from
(seed, epoch, global batch, position in the batch) alone. Every random draw here depends only
on such numbers, never on the rank or the rank count, so P ranks see exactly the samples one
process would.

``python -m dpcnn.data prepare|info`` is the data command; it lives in ``dpcnn.prepare``, and
this module runs it only when run as a program. This module never imports mpi4py.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

# default_data_path and verify are re-exported: the trainer and config import them from here.
from .h5format import DataError, Split, default_data_path, verify  # noqa: F401

# Random streams besides the sample order: each use draws from its own SeedSequence spawn key,
# so no two uses (nor epoch_order's default_rng([seed, epoch])) ever share a stream.
HOLDOUT_STREAM, AUGMENT_STREAM = 1, 2


def stream_rng(stream: int, *words: int) -> np.random.Generator:
    """A Generator determined by the stream and the words (seed, epoch, ...) alone."""
    return np.random.default_rng(np.random.SeedSequence(list(words), spawn_key=(stream,)))


def holdout(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows 0..n-1 split into (training rows, validation rows), each sorted, int64.

    The `size` validation rows are the first entries of a permutation drawn from `seed` alone,
    so every rank, and a resumed run, hold out the same rows. 0 <= size < n.
    """
    if not 0 <= size < n:
        raise ValueError(f"cannot hold out {size} of {n} rows for validation")
    perm = stream_rng(HOLDOUT_STREAM, seed).permutation(n).astype(np.int64)
    return np.sort(perm[size:]), np.sort(perm[:size])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation (n,) int64 drawn from (seed, epoch) only."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Global batches per epoch: floor(n / B) with the last partial batch dropped, else ceil."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def shard_bounds(m: int, rank: int, size: int) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of a global batch of m samples.

    Sizes differ by at most one: the first m % size ranks get one more. Ranks past m get 0.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for size {size}")
    q, r = divmod(m, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def micro_bounds(M: int, m: int, rank: int, size: int) -> tuple[int, int]:
    """This rank's samples [lo, hi) of a batch of M samples cut into micro-batches of m.

    The ceil(M/m) micro-batches (the last may be shorter) are dealt out in contiguous runs
    by shard_bounds, so each is computed whole by one rank whatever `size` is. m = 1 is
    shard_bounds(M, rank, size) itself.
    """
    lo, hi = shard_bounds(-(-M // m), rank, size)
    return min(lo * m, M), min(hi * m, M)


class ShardedLoader:
    """What one rank iterates during training: its slice of every global batch.

    Global batch k of epoch e is order[k*B : (k+1)*B] with order = subset[epoch_order(N, seed, e)]
    (N = len(subset); subset defaults to all rows of the split; with shuffle=False 0..N-1 instead
    of the permutation); the rank takes micro_bounds(M, micro_batch, rank, size) of it: whole
    micro-batches. The rows of all its slices of the current epoch (about N/P) are cached as
    uint8, so batch(e, k) never depends on which batches were asked for before. With `augment`,
    each image is transformed by the draw of its position in the global batch.
    """

    def __init__(self, split: Split, *, batch_size: int, rank: int, size: int, seed: int,
                 drop_last: bool = True, shuffle: bool = True, micro_batch: int = 1,
                 subset: np.ndarray | None = None, augment: Augment | None = None):
        shard_bounds(0, rank, size)  # validates rank and size
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.split, self.batch_size, self.rank, self.size = split, batch_size, rank, size
        self.micro_batch, self.augment = micro_batch, augment
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        self.subset = None if subset is None else np.asarray(subset, dtype=np.int64)
        self.n = split.n if self.subset is None else len(self.subset)
        self.steps_per_epoch = num_batches(self.n, batch_size, drop_last)
        if self.steps_per_epoch == 0:
            left = "" if subset is None else " left for training"
            raise DataError(f"{split.path}: batch size {batch_size} exceeds the {self.n} "
                            f"{split.split} samples{left} with drop_last")
        self._epoch: int | None = None                 # the epoch whose rows are cached:
        self._order: Any = None                        # its sample order (N,),
        self._rows: Any = None                         # this rank's rows of it, sorted (n_r,),
        self._images: Any = None                       # and their images (n_r, H, W) uint8

    def order(self, epoch: int) -> np.ndarray:
        """All row indices of the epoch in order, (N,) int64."""
        if self.shuffle:
            pos = epoch_order(self.n, self.seed, epoch)
        else:
            pos = np.arange(self.n, dtype=np.int64)
        return pos if self.subset is None else self.subset[pos]

    def _slice(self, k: int) -> tuple[int, int, int]:
        """(lo, hi, M): this rank's positions [lo, hi) in the epoch order for batch k of length M."""
        start = k * self.batch_size
        m = min(self.batch_size, self.n - start)
        lo, hi = micro_bounds(m, self.micro_batch, self.rank, self.size)
        return start + lo, start + hi, m

    def _load_epoch(self, epoch: int):
        """Read this rank's rows for the whole epoch into memory, as uint8."""
        self._epoch = self._rows = self._images = None  # free the last epoch's rows first
        order = self.order(epoch)
        mine = [order[lo:hi] for lo, hi, _ in map(self._slice, range(self.steps_per_epoch))]
        self._rows = np.sort(np.concatenate(mine))
        self._images = self.split.rows(self._rows)
        self._order, self._epoch = order, epoch

    def batch(self, epoch: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """This rank's slice of global batch k of `epoch`.

        Returns x (m_r, H, W, C) float32 standardised, y (m_r,) int64, and M, the length of
        the global batch (divide gradients summed over all ranks by M).
        """
        if not 0 <= k < self.steps_per_epoch:
            raise IndexError(f"batch {k} out of range 0..{self.steps_per_epoch - 1}")
        if epoch != self._epoch:
            self._load_epoch(epoch)
        lo, hi, m = self._slice(k)
        idx = self._order[lo:hi]
        images = self._images[np.searchsorted(self._rows, idx)]
        if self.augment is not None:
            start = lo - k * self.batch_size          # the first sample's position in the global batch
            images = self.augment(images, epoch, k, m, start)
        return self.split.standardise(images), self.split.labels[idx].astype(np.int64), m


# ----------------------------------------------------------------------------- augmentation


class Augment:
    """Random translations, and optionally small rotations, zooms and elastic distortions, of training
    images (as Keras's RandomTranslation/RandomRotation/RandomZoom or torchvision's RandomAffine and
    ElasticTransform do), filled with 0 (black).

    shift: each image moves by an integer number of pixels drawn uniformly from
    [-shift, shift] on each axis; rotate: and turns about its centre by an angle drawn
    uniformly from [-rotate, rotate] degrees; scale: and is magnified about its centre by a
    factor drawn uniformly from [1 - scale, 1 + scale]; elastic: and each pixel is displaced by a
    random smooth field (Simard, Steinkraus and Platt 2003): uniform noise in [-1, 1] on each
    axis, smoothed by a Gaussian of standard deviation `sigma` pixels (``smooth``), times `elastic`
    pixels. With a rotation, zoom or distortion the image is resampled bilinearly, as floats.
    The draws of global batch k of epoch e come from stream_rng(AUGMENT_STREAM, seed, e, k), one
    per position in the global batch of M samples, so an image gets the same transform whichever
    rank reads it and whatever the rank count; the noise is drawn after the other draws, so
    turning it on leaves the shifts, angles and zooms as they were.

        aug = Augment(shift=2, rotate=10, scale=0.1, elastic=34, sigma=6, seed=0)
        out = aug(images, epoch, k, M, start)     # images: positions [start, start + m) of batch k
    """

    def __init__(self, shift: int = 0, rotate: float = 0.0, seed: int = 0, scale: float = 0.0,
                 elastic: float = 0.0, sigma: float = 6.0):
        if shift < 0 or not 0 <= rotate <= 180 or not 0 <= scale <= 0.5 or elastic < 0 or sigma <= 0:
            raise ValueError(f"shift must be >= 0, rotate in [0, 180], scale in [0, 0.5], elastic >= 0 and "
                             f"sigma > 0, got {shift}, {rotate}, {scale}, {elastic}, {sigma}")
        self.shift, self.rotate, self.scale, self.seed = int(shift), float(rotate), float(scale), int(seed)
        self.elastic, self.sigma = float(elastic), float(sigma)

    def draws(self, epoch: int, k: int, M: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(dy, dx, angle, zoom) of the M positions of global batch k: (M,) int64 pixels, (M,) radians,
        (M,) magnifications."""
        return self._draws(epoch, k, M)[1:]

    def _draws(self, epoch: int, k: int, M: int):
        """(the Generator, left where the elastic noise is drawn next, dy, dx, angle, zoom)."""
        rng = stream_rng(AUGMENT_STREAM, self.seed, epoch, k)
        dy, dx = rng.integers(-self.shift, self.shift + 1, size=(2, M))
        angle = np.deg2rad(rng.uniform(-self.rotate, self.rotate, M)) if self.rotate else np.zeros(M)
        zoom = rng.uniform(1 - self.scale, 1 + self.scale, M) if self.scale else np.ones(M)
        return rng, dy, dx, angle, zoom

    def field(self, epoch: int, k: int, M: int, H: int, W: int, mine: slice = slice(None)) -> np.ndarray:
        """The displacement fields of positions `mine` of global batch k: (m, 2, H, W) float32 pixels,
        rows then columns. The noise of all M positions is drawn, (M, 2, H, W), then only mine smoothed."""
        rng = self._draws(epoch, k, M)[0]
        noise = rng.uniform(-1, 1, (M, 2, H, W))[mine]
        return (self.elastic * smooth(noise, self.sigma)).astype(np.float32)

    def __call__(self, images: np.ndarray, epoch: int, k: int, M: int, start: int) -> np.ndarray:
        """images (m, H, W) or (m, H, W, C) uint8 at positions [start, start + m) of global batch k
        of M samples -> the same shape: uint8 when only shifting, else float32 in [0, 255]."""
        dy, dx, angle, zoom = self.draws(epoch, k, M)
        mine = slice(start, start + len(images))
        # the source's step per output pixel, whole batch then sliced: the same bits on every rank
        c, s = (np.cos(angle) / zoom).astype(np.float32), (np.sin(angle) / zoom).astype(np.float32)
        draws = [a[mine] for a in (dy, dx, c, s)]
        if self.elastic:
            draws.append(self.field(epoch, k, M, images.shape[1], images.shape[2], mine))
        if images.ndim == 4:                  # (m, H, W, C): every channel of an image moves alike
            m, H, W, C = images.shape
            planes = np.moveaxis(images, 3, 1).reshape(m * C, H, W)
            out = self._apply(planes, *(np.repeat(a, C, axis=0) for a in draws))
            return np.moveaxis(out.reshape(m, C, H, W), 1, 3)
        return self._apply(images, *draws)

    def _apply(self, images: np.ndarray, dy, dx, c, s, field=None) -> np.ndarray:
        if not (self.rotate or self.scale or self.elastic):
            return translate(images, dy, dx)
        return affine(images, dy, dx, c, s, field)


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) float64 G with G[i, j] = exp(-(i - j)^2 / (2 sigma^2)) / Z, Z the sum of the kernel over
    all integer offsets: G @ x is x convolved with a normalised Gaussian, 0 outside [0, n)."""
    d = np.arange(-4 * n, 4 * n + 1)
    z = np.exp(-d ** 2 / (2 * sigma ** 2)).sum()
    i = np.arange(n)
    return np.exp(-(i[:, None] - i[None, :]) ** 2 / (2 * sigma ** 2)) / z


def smooth(noise: np.ndarray, sigma: float) -> np.ndarray:
    """noise (..., H, W) -> (..., H, W) float64: each plane convolved with a 2-D Gaussian of standard
    deviation sigma, as the separable product G_H @ plane @ G_W^T (a stack of small matrix products,
    one per plane, so a plane's result does not depend on how many are stacked)."""
    H, W = noise.shape[-2:]
    return np.matmul(np.matmul(gaussian_matrix(H, sigma), noise), gaussian_matrix(W, sigma).T)


def translate(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """images (m, H, W), integer shifts dy, dx (m,) -> (m, H, W) of the same dtype, with
    out[n, i, j] = images[n, i - dy[n], j - dx[n]], and 0 where that falls outside the image."""
    m, H, W = images.shape
    s = int(max(np.abs(dy).max(), np.abs(dx).max())) if m else 0
    padded = _padded(images, s)
    Hp, Wp = H + 2 * s, W + 2 * s
    first = np.arange(m) * (Hp * Wp) + (s - dy) * Wp + (s - dx)       # each output's pixel (0, 0)
    return padded.ravel()[first[:, None, None] + (np.arange(H) * Wp)[:, None] + np.arange(W)]


def affine(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, cos: np.ndarray, sin: np.ndarray,
           field: np.ndarray | None = None) -> np.ndarray:
    """images (m, H, W) rotated about their centre by the angles whose cosine and sine are
    cos, sin (m,) float32, then shifted by dy, dx (m,) pixels -> (m, H, W) float32, sampled
    bilinearly, 0 outside; cos and sin divided by z also magnify the image z times. field
    (m, 2, H, W) float32, if given: then each output pixel (i, j) takes the value of that image
    at (i + field[n, 0, i, j], j + field[n, 1, i, j]) (an elastic distortion). Elementwise
    float32 arithmetic only, so each output value depends on its own image and draw alone, not on m."""
    m, H, W = images.shape
    f = np.float32
    cy, cx = f((H - 1) / 2), f((W - 1) / 2)
    # each output pixel's offset from the centre, less the shift: (m, H, 1) and (m, 1, W)
    u = np.arange(H, dtype=f)[None, :, None] - cy - dy.astype(f)[:, None, None]
    v = np.arange(W, dtype=f)[None, None, :] - cx - dx.astype(f)[:, None, None]
    if field is not None:                              # displaced: (m, H, W) each
        u, v = u + field[:, 0], v + field[:, 1]
    c, s = cos[:, None, None], sin[:, None, None]
    ys = c * u + s * v + cy                            # the source pixel: rotated back by the angle
    xs = c * v - s * u + cx
    y0, x0 = np.floor(ys), np.floor(xs)
    fy, fx = ys - y0, xs - x0
    # a border of zeros around each image: corners outside the image are clipped onto it
    padded = _padded(images.astype(f), 1).ravel()
    Hp, Wp = H + 2, W + 2
    yi = np.clip(y0.astype(np.intp) + 1, 0, H + 1)     # rows and columns in the padded images
    yj = np.clip(y0.astype(np.intp) + 2, 0, H + 1)
    xi = np.clip(x0.astype(np.intp) + 1, 0, W + 1)
    xj = np.clip(x0.astype(np.intp) + 2, 0, W + 1)
    n = (np.arange(m) * (Hp * Wp))[:, None, None]
    ri, rj = n + yi * Wp, n + yj * Wp
    top = (1 - fx) * padded[ri + xi] + fx * padded[ri + xj]
    bottom = (1 - fx) * padded[rj + xi] + fx * padded[rj + xj]
    return (1 - fy) * top + fy * bottom


def _padded(images: np.ndarray, s: int) -> np.ndarray:
    """images (m, H, W) -> (m, H + 2s, W + 2s) with a border of s zeros."""
    m, H, W = images.shape
    out = np.zeros((m, H + 2 * s, W + 2 * s), images.dtype)
    out[:, s:s + H, s:s + W] = images
    return out


if __name__ == "__main__":             # python -m dpcnn.data prepare|info ...
    from .prepare import main

    sys.exit(main())
