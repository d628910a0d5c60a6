"""Layers as forward/backward pairs over a stack of micro-batches.

Each ``*_forward`` returns ``(out, cache)``; the matching ``*_backward`` takes the
upstream gradient and that cache and returns the gradients of its inputs. Shapes
are the contract and every docstring states them. No layer loops over samples or
pixels in Python.

The stack. Every array has a leading axis G: G micro-batches of N samples each, computed
side by side in one call, and every result for micro-batch g is the one a call with that
micro-batch alone (G = 1) gives, bit for bit. That is what lets the exact training step
(dpcnn.step) compute all of a rank's micro-batches in one pass and still give the same bits
on any number of ranks. It holds because

* every matrix product is ``np.matmul`` on the stack, which calls BLAS once per micro-batch
  with that micro-batch's own shapes and strides (one product over all G * N rows may round
  a row differently: OpenBLAS picks its kernel and blocking by the row count);
* every sum over samples (bias gradients, the loss) reduces each micro-batch's own
  contiguous slice, with the shape and axis order of a one-micro-batch call;
* everything else is elementwise or a copy.

A one-pass batch (the float training step, evaluation) is the stack G = 1.
``tests/test_exact.py`` checks the bits of every layer, stacked against one at a time.

Layout. A conv layer's input and a pool's output are (G, H, W, N, C): pixels, then
samples, then channels. The conv output between them is window-major,
(G, 4, H2, W2, N, F): the four positions of every 2x2 pooling window as four separate
blocks. The reason is the size of the arrays: a training micro-batch is 16 samples
of 8-16 channels, so NumPy's time goes less into arithmetic than into walking short
runs (an elementwise operation over runs of 16 floats costs several times the same
operation over one whole array). Every step works on long contiguous blocks:

* conv_forward splits the zero-padded input into its four parity planes
  ``xs[a, b] = xpad[a::2, b::2]`` (split_planes, the one step that gathers);
* im2col orders its columns window-major: column (dy, dx, h2, w2, n) is the conv
  output at pixel (2 h2 + dy, 2 w2 + dx) of sample n. Its tap (i, j) reads parity
  plane ((dy + i) % 2, (dx + j) % 2) shifted by ((dy + i) // 2, (dx + j) // 2), so
  im2col copies the shifted planes ``Z[p, q] = xpad[p::2, q::2]`` once and takes
  each row of the patch matrix whole from them;
* one matrix product (the bias through a row of ones) gives the conv output as four
  contiguous blocks, and max-pooling is three elementwise maxima of whole blocks.
  The model applies the ReLU after the pool (the two commute), to a quarter of the values.

col2im, the adjoint of im2col, adds the patch gradients back in the same two steps;
merge_planes is the adjoint of split_planes. All functions work in the dtype of
their inputs (float32 in training, float64 in the gradient checks).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

# The four positions (dy, dx) of a 2x2 pooling window, in the order of im2col's column blocks.
WINDOWS = ((0, 0), (0, 1), (1, 0), (1, 1))


def pad_amounts(k: int, padding: str) -> tuple[int, int]:
    """Padding (before, after) along one axis for a stride-1 kernel of size k.

    'same' keeps the size (for even k the extra row goes after, as in TensorFlow
    and PyTorch's padding='same'); 'valid' pads nothing.
    """
    if padding == "same":
        return (k - 1) // 2, k - 1 - (k - 1) // 2
    if padding == "valid":
        return 0, 0
    raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")


# ----------------------------------------------------------------------------
# geometry of a conv layer, parity planes


class ConvGeometry(NamedTuple):
    """Sizes of a conv layer and its pool on an H x W input (see ``conv_geometry``)."""

    H2: int                     # pooled output: (H2, W2) = conv output // 2
    W2: int
    Ps: int                     # shifts per axis: shifted plane p = 2 s + a for s < Ps, a < 2
    Qs: int
    Hh: int                     # parity plane size: xs[a, b] is (Hh, Wh)
    Wh: int
    rows: tuple                 # for a = 0, 1: (input rows, plane rows) as slices
    cols: tuple                 # for b = 0, 1: (input columns, plane columns)
    covered: bool               # every input pixel reaches the output (else some get no gradient)


def _parity_slices(n: int, pad: int, n_half: int) -> tuple[tuple[slice, slice], ...]:
    """For a = 0, 1: the input indices h whose padded index h + pad is 2 u + a with u < n_half,
    as (slice of h, slice of u)."""
    out = []
    for a in (0, 1):
        h0 = (a - pad) % 2
        u0 = (h0 + pad) // 2
        count = max(0, min(len(range(h0, n, 2)), n_half - u0))
        out.append((slice(h0, h0 + 2 * count, 2), slice(u0, u0 + count)))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def conv_geometry(H: int, W: int, kh: int, kw: int, padding: str) -> ConvGeometry:
    """The sizes of a conv layer with a kh x kw kernel on an H x W input, and of its pool.

    Conv output pixels beyond 2 * H2 rows or 2 * W2 columns would be dropped by the pool, so
    none is computed; the parity planes hold just the padded rows and columns that the shifted
    planes read, Hh = H2 + Ps - 1 of each parity.
    """
    ph, pw = pad_amounts(kh, padding), pad_amounts(kw, padding)
    H2, W2 = (H + sum(ph) - kh + 1) // 2, (W + sum(pw) - kw + 1) // 2
    Ps, Qs = (kh + 2) // 2, (kw + 2) // 2              # 2 Ps >= kh + 1 shifted planes per axis
    Hh, Wh = H2 + Ps - 1, W2 + Qs - 1
    rows, cols = _parity_slices(H, ph[0], Hh), _parity_slices(W, pw[0], Wh)
    covered = (sum(len(range(H)[r]) for r, _ in rows) == H
               and sum(len(range(W)[c]) for c, _ in cols) == W)
    return ConvGeometry(H2, W2, Ps, Qs, Hh, Wh, rows, cols, covered)


def split_planes(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """x: (G, H, W, N, C), any strides -> xs: (G, 2, 2, C, Hh, Wh, N), the zero-padded input's
    parity planes: xs[:, a, b, c, u, v, n] = xpad[:, 2 u + a, 2 v + b, n, c]."""
    G, H, W, N, C = x.shape
    xs = np.zeros((G, 2, 2, C, g.Hh, g.Wh, N), x.dtype)
    xt = x.transpose(0, 4, 1, 2, 3)
    for a, (hi, ui) in enumerate(g.rows):
        for b, (wi, vi) in enumerate(g.cols):
            xs[:, a, b, :, ui, vi] = xt[:, :, hi, wi]
    return xs


def merge_planes(dxs: np.ndarray, x_shape: tuple[int, ...], g: ConvGeometry) -> np.ndarray:
    """Adjoint of split_planes: dxs: (G, 2, 2, C, Hh, Wh, N) -> dx: (G, H, W, N, C)."""
    dx = (np.empty if g.covered else np.zeros)(x_shape, dxs.dtype)
    dt = dx.transpose(0, 4, 1, 2, 3)
    for a, (hi, ui) in enumerate(g.rows):
        for b, (wi, vi) in enumerate(g.cols):
            dt[:, :, hi, wi] = dxs[:, a, b, :, ui, vi]
    return dx


def _strided(a: np.ndarray, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """A view of the contiguous array a with the given shape and strides (in elements).
    np.ndarray checks that the view stays inside a."""
    return np.ndarray(shape, a.dtype, a, 0, tuple(s * a.itemsize for s in strides))


# ----------------------------------------------------------------------------
# im2col / col2im


def im2col(xs: np.ndarray, kh: int, kw: int, g: ConvGeometry) -> np.ndarray:
    """Patches of the parity planes, one column per conv output pixel that the pool reads.

    xs: (G, 2, 2, C, Hh, Wh, N) -> cols: (G, kh * kw * C + 1, 4 * M) with M = H2 * W2 * N.
    Row (i, j, c) of column (dy, dx, h2, w2, n) of micro-batch g is
    xpad[g, 2 h2 + dy + i, 2 w2 + dx + j, n, c]: rows in the order of a weight (kh, kw, C, F)
    reshaped to (kh * kw * C, F), columns window-major (see WINDOWS). The last row is ones,
    the input of the bias.
    """
    G, _, _, C, _, _, N = xs.shape
    M = g.H2 * g.W2 * N
    sg, sa, sb, sc, su, sv, _ = (s // xs.itemsize for s in xs.strides)
    # Z[:, s, a, t, b, c, h2, w2, n] = xs[:, a, b, c, h2 + s, w2 + t, n]: the shifted planes
    # xpad[p::2, q::2] for p = 2 s + a, q = 2 t + b
    Z = np.empty((G, 2 * g.Ps, 2 * g.Qs, C, M), xs.dtype)
    shape: tuple[int, ...] = (G, g.Ps, 2, g.Qs, 2, C, g.H2, g.W2, N)
    Z.reshape(shape)[...] = _strided(xs, shape, (sg, su, sa, sv, sb, sc, su, sv, 1))
    # cols[:, i, j, c, dy, dx] = Z[:, i + dy, j + dx, c]: each row one whole shifted plane
    K, sp, sq = kh * kw * C, 2 * g.Qs * C * M, C * M
    cols = np.empty((G, K + 1, 4 * M), xs.dtype)
    shape = (G, kh, kw, C, 2, 2, M)
    _strided(cols, shape, ((K + 1) * 4 * M, kw * C * 4 * M, C * 4 * M, 4 * M, 2 * M, M, 1))[...] = \
        _strided(Z, shape, (2 * g.Ps * sp, sp, sq, M, sp, sq, 1))
    cols[:, -1] = 1
    return cols


def col2im(dcols, xs_shape: tuple[int, ...], kh: int, kw: int, g: ConvGeometry) -> np.ndarray:
    """Adjoint of im2col (without its row of ones): add each patch gradient back onto the planes.

    dcols: the gradient of cols[:, :-1] as four (G, kh * kw * C, M) blocks, one per window
    position (WINDOWS order): an array (4, G, kh * kw * C, M), or any iterable of the blocks,
    so that the backward pass can compute one block at a time -> dxs: (G, 2, 2, C, Hh, Wh, N)
    """
    G, _, _, C, Hh, Wh, N = xs_shape
    M, P, Q = g.H2 * g.W2 * N, 2 * g.Ps, 2 * g.Qs
    dZ: np.ndarray | None = None
    for (dy, dx), block in zip(WINDOWS, dcols, strict=True):
        if dZ is None:
            dZ = np.zeros((G, P, Q, C * M), block.dtype)              # the shifted planes
        dZ[:, dy:dy + kh, dx:dx + kw] += block.reshape(G, kh, kw, C * M)
    assert dZ is not None                                             # four blocks, always
    # plane (p, q) = (2 s + a, 2 t + b) goes to parity plane (a, b) shifted by (s, t)
    dZ = dZ.reshape(G, g.Ps, 2, g.Qs, 2 * C, g.H2, g.W2 * N)
    dxs = np.zeros((G, 2, 2 * C, Hh, Wh * N), dZ.dtype)
    for s in range(g.Ps):
        for t in range(g.Qs):
            dst = dxs[:, :, :, s:s + g.H2, t * N:(t + g.W2) * N]
            if s == t == 0:
                dst[...] = dZ[:, 0, :, 0]                             # into zeros: a copy is 3x cheaper
            else:
                dst += dZ[:, s, :, t]
    return dxs.reshape(xs_shape)


# ----------------------------------------------------------------------------
# convolution


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, padding: str = "same"):
    """2-D convolution (cross-correlation, stride 1) plus bias, for the 2x2 max-pool that follows.

    x: (G, H, W, N, C), any strides; w: (kh, kw, C, F); b: (F,) -> out: (G, 4, H2, W2, N, F),
    window-major: out[:, k, h2, w2, n] is the conv output at pixel (2 h2 + dy, 2 w2 + dx) with
    (dy, dx) = WINDOWS[k]. (H2, W2) is half the conv output's (H, W) for 'same' padding and
    (H - kh + 1, W - kw + 1) for 'valid', rounded down: the odd last row or column that the
    pool would drop is not computed. One (4 M, kh * kw * C + 1) @ (kh * kw * C + 1, F) product
    per micro-batch.
    """
    kh, kw, C, F = w.shape
    G, H, W, N, _ = x.shape
    g = conv_geometry(H, W, kh, kw, padding)
    xs = split_planes(x, g)
    cols = im2col(xs, kh, kw, g)
    wb = np.concatenate((w.reshape(-1, F), b[None]))                # bias: the ones row
    out = np.matmul(cols.transpose(0, 2, 1), wb)                    # (G, 4 * M, F)
    return out.reshape(G, 4, g.H2, g.W2, N, F), (cols, w, xs.shape, x.shape, g)


def conv_backward(dout: np.ndarray, cache, need_dx: bool = True):
    """dout: (G, 4, H2, W2, N, F), window-major as conv_forward's output
    -> (dx: (G, H, W, N, C) or None, dw: (G, kh, kw, C, F), db: (G, F)), one weight and bias
    gradient per micro-batch.

    need_dx=False skips the input gradient (the first layer has no use for it),
    which saves a matrix product and the col2im.
    """
    cols, w, xs_shape, x_shape, g = cache
    kh, kw, C, F = w.shape
    G = x_shape[0]
    d = dout.reshape(G, 4, g.H2 * g.W2 * x_shape[3], F)
    dwb = np.matmul(cols, d.reshape(G, -1, F))                      # (G, kh * kw * C + 1, F)
    dw, db = dwb[:, :-1].reshape((G,) + w.shape), dwb[:, -1]
    if not need_dx:
        return None, dw, db
    w2d, block = w.reshape(-1, F), np.empty((G, kh * kw * C, d.shape[2]), d.dtype)
    dcols = (np.matmul(w2d, d[:, k].transpose(0, 2, 1), out=block) for k in range(4))   # one window at a time
    dxs = col2im(dcols, xs_shape, kh, kw, g)
    return merge_planes(dxs, x_shape, g), dw, db


# ----------------------------------------------------------------------------
# max-pooling 2x2, stride 2, of a window-major conv output


def maxpool_forward(x: np.ndarray):
    """x: (G, 4, H2, W2, N, C), the four positions a, b, c, d of each window (WINDOWS order, as
    conv_forward gives them) -> out: (G, H2, W2, N, C).

    Three elementwise maxima of whole blocks. The cache keeps three boolean maps that name
    each window's arg-max, ties going to the first of a, b, c, d, so backward routes each
    gradient to exactly one input, as a loop reference would.
    """
    a, b, c, d = (x[:, k] for k in range(4))
    top, bot = np.maximum(a, b), np.maximum(c, d)
    masks = (b > a, d > c, bot > top)
    return np.maximum(top, bot, out=top), masks


def maxpool_backward(dout: np.ndarray, cache) -> np.ndarray:
    """dout: (G, H2, W2, N, C), any strides -> dx: (G, 4, H2, W2, N, C), nonzero only at each
    window's arg-max."""
    b_wins, d_wins, bot_wins = cache
    dx = np.empty((b_wins.shape[0], 4) + b_wins.shape[1:], dout.dtype)
    dbot = dout * bot_wins
    dtop = np.subtract(dout, dbot, out=dx[:, 0])
    np.multiply(dtop, b_wins, out=dx[:, 1])
    dtop -= dx[:, 1]
    np.multiply(dbot, d_wins, out=dx[:, 3])
    np.subtract(dbot, dx[:, 3], out=dx[:, 2])
    return dx


# ----------------------------------------------------------------------------
# ReLU, flatten, dense


def relu_forward(x: np.ndarray):
    """x: any shape -> out: same shape, max(x, 0)."""
    out = np.maximum(x, np.zeros(x.shape, x.dtype))     # 2x faster than against the scalar 0
    return out, out


def relu_backward(dout: np.ndarray, cache) -> np.ndarray:
    """Gradient passes where the output was positive (0 at the kink). dout may have any
    strides; dx is laid out as the forward output was."""
    return np.multiply(dout, cache > 0, out=np.empty_like(cache))


def sum_rows(d: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """d: (G, M, F) -> (G, F), each micro-batch's column sums (into out when given).

    A product with a ones vector, one per micro-batch: for tall, narrow d this is over ten
    times faster than d.sum(axis=1), which walks the short rows one by one.
    """
    return np.matmul(np.ones(d.shape[1], dtype=d.dtype), d, out=out)


def flatten_forward(x: np.ndarray):
    """x: (G, H, W, N, C), a conv block's output -> out: (G, N, H * W * C), each sample's
    features in (h, w, c) order (the rows of the first dense layer's weight)."""
    G, H, W, N, C = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(G, N, H * W * C), x.shape


def flatten_backward(dout: np.ndarray, cache) -> np.ndarray:
    """dout: (G, N, H * W * C) -> (G, H, W, N, C), a view."""
    G, H, W, N, C = cache
    return dout.reshape(G, N, H, W, C).transpose(0, 2, 3, 1, 4)


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray):
    """x: (G, N, D), w: (D, F), b: (F,) -> out: (G, N, F); one (N, D) @ (D, F) product per
    micro-batch."""
    out = np.matmul(x, w)
    out += b
    return out, (x, w)


def dense_backward(dout: np.ndarray, cache, need_dx: bool = True, out=None, need_dw: bool = True):
    """dout: (G, N, F), any strides -> (dx: (G, N, D) or None, dw: (G, D, F), db: (G, F)), one
    weight and bias gradient per micro-batch; dx is a transposed view.

    out: optionally (dw, db) arrays to write the two gradients into (views of the gradient
    vectors, any stride between micro-batches), which saves copying a large dw.
    need_dw=False: no weight gradient (dw is None); the caller computes it from the layer's
    input x (the cache's first item) and dout, over more samples than one micro-batch.
    """
    x, w = cache
    dw, db = out if out is not None else (None, None)
    dw = np.matmul(x.transpose(0, 2, 1), dout, out=dw) if need_dw else None
    db = sum_rows(dout, out=db)
    if not need_dx:
        return None, dw, db
    # dx as (w @ dout^T)^T: OpenBLAS is 1.2-2x faster at that product than at dout @ w^T
    dx = np.matmul(w, dout.transpose(0, 2, 1)).transpose(0, 2, 1)
    return dx, dw, db


# ----------------------------------------------------------------------------
# loss


def softmax(logits: np.ndarray) -> np.ndarray:
    """logits (..., K) -> probabilities (..., K), computed stably (each row's maximum subtracted)."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray, denom: float | None = None):
    """Softmax cross-entropy, computed stably with log-sum-exp, and its fused gradient.

    logits: (G, N, K), y: (G, N) integer labels in [0, K)
    -> (loss: (G,) float64, dlogits: (G, N, K)) with loss[g] = sum_i -log softmax(logits[g, i])[y[g, i]]
    / denom, each micro-batch's sum taken in the logits' dtype over its own N samples.
    One batch, logits (N, K) and y (N,), gives (loss as a float, dlogits (N, K)).

    denom defaults to N (the mean). The distributed step passes denom=1 to get
    per-sample sums, which add up exactly across ranks before one division.
    """
    if logits.ndim == 2:
        loss, e = softmax_cross_entropy(logits[None], y[None], denom)
        return float(loss[0]), e[0]
    G, N, _ = logits.shape
    denom = N if denom is None else denom
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=-1, keepdims=True)
    g, rows = np.arange(G)[:, None], np.arange(N)
    loss = (np.log(s[..., 0]) - z[g, rows, y]).sum(axis=-1).astype(np.float64) / denom
    e /= s                                  # softmax probabilities
    e[g, rows, y] -= 1
    if denom != 1:
        e /= denom
    return loss, e
