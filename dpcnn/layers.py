"""Layers as forward/backward pairs over a whole batch, in NHWC layout.

Each ``*_forward`` returns ``(out, cache)``; the matching ``*_backward`` takes the
upstream gradient and that cache and returns the gradients of its inputs. Shapes
are the contract and every docstring states them. No layer loops over samples or
pixels in Python: convolution is im2col plus one matrix product, max-pooling is a
handful of whole-array operations on strided views.

NHWC (channels last) is chosen for speed: im2col rows are then (kh, kw, C)
patches built from ``kh * kw`` slice copies, the convolution output of the matrix
product is already NHWC, and flattening for the dense layer is free.

All functions work in the dtype of their inputs (float32 in training, float64 in
the gradient checks).
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------
# im2col / col2im


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


def pad_hw(x: np.ndarray, ph: tuple[int, int], pw: tuple[int, int]) -> np.ndarray:
    """Zero-pad the H and W axes of x: (N, H, W, C) -> (N, H+ph0+ph1, W+pw0+pw1, C)."""
    if ph == (0, 0) and pw == (0, 0):
        return x
    N, H, W, C = x.shape
    xp = np.zeros((N, H + sum(ph), W + sum(pw), C), dtype=x.dtype)
    xp[:, ph[0]:ph[0] + H, pw[0]:pw[0] + W, :] = x
    return xp


def im2col(xp: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Patches of an already padded input, one row per output pixel.

    xp: (N, Hp, Wp, C) -> cols: (N * Ho * Wo, kh * kw * C) with Ho = Hp - kh + 1,
    Wo = Wp - kw + 1, and each row ordered (i, j, c) to match a weight of shape
    (kh, kw, C, F) reshaped to (kh * kw * C, F).
    """
    N, Hp, Wp, C = xp.shape
    Ho, Wo = Hp - kh + 1, Wp - kw + 1
    cols = np.empty((N, Ho, Wo, kh, kw, C), dtype=xp.dtype)
    for i in range(kh):          # kh * kw whole-batch slice copies, no pixel loops
        for j in range(kw):
            cols[:, :, :, i, j, :] = xp[:, i:i + Ho, j:j + Wo, :]
    return cols.reshape(N * Ho * Wo, kh * kw * C)


def col2im(dcols: np.ndarray, xp_shape: tuple[int, int, int, int]) -> np.ndarray:
    """Adjoint of im2col: add each kernel tap's patch gradients back onto the padded input.

    dcols: (kh, kw, N, Ho, Wo, C) -> dxp: (N, Hp, Wp, C)

    dcols comes tap-major (not im2col's (N*Ho*Wo, kh*kw*C)) because the backward
    pass can produce it so for free, and each tap then adds one contiguous block.
    """
    kh, kw, N, Ho, Wo, C = dcols.shape
    dxp = np.zeros(xp_shape, dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, i:i + Ho, j:j + Wo, :] += dcols[i, j]
    return dxp


# ----------------------------------------------------------------------------
# convolution


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, padding: str = "same"):
    """2-D convolution (cross-correlation), stride 1.

    x: (N, H, W, C), w: (kh, kw, C, F), b: (F,) or None -> out: (N, Ho, Wo, F)
    with Ho = H, Wo = W for 'same' and Ho = H - kh + 1, Wo = W - kw + 1 for 'valid'.
    """
    kh, kw, C, F = w.shape
    ph, pw = pad_amounts(kh, padding), pad_amounts(kw, padding)
    xp = pad_hw(x, ph, pw)
    N, Hp, Wp, _ = xp.shape
    Ho, Wo = Hp - kh + 1, Wp - kw + 1
    cols = im2col(xp, kh, kw)
    out = cols @ w.reshape(kh * kw * C, F)
    if b is not None:
        out += b
    cache = (cols, w, xp.shape, ph, pw)
    return out.reshape(N, Ho, Wo, F), cache


def conv_backward(dout: np.ndarray, cache, need_dx: bool = True):
    """dout: (N, Ho, Wo, F) -> (dx: (N, H, W, C) or None, dw: (kh, kw, C, F), db: (F,)).

    need_dx=False skips the input gradient (the first layer has no use for it),
    which saves a matrix product and the col2im.
    """
    cols, w, xp_shape, ph, pw = cache
    kh, kw, C, F = w.shape
    N, Ho, Wo, _ = dout.shape
    d2 = dout.reshape(-1, F)
    dw = (cols.T @ d2).reshape(w.shape)
    db = sum_rows(d2)
    if not need_dx:
        return None, dw, db
    # dcols for every tap at once: (kh*kw, M, F) @ (kh*kw, F, C) -> (kh*kw, M, C)
    dcols = np.matmul(d2, w.reshape(kh * kw, C, F).transpose(0, 2, 1))
    dxp = col2im(dcols.reshape(kh, kw, N, Ho, Wo, C), xp_shape)
    _, Hp, Wp, _ = xp_shape
    dx = dxp[:, ph[0]:Hp - ph[1], pw[0]:Wp - pw[1], :]
    return dx, dw, db


def sum_rows(d: np.ndarray) -> np.ndarray:
    """d: (M, F) -> (F,), the column sums.

    A product with a ones vector: for tall, narrow d this is over ten times
    faster than d.sum(axis=0), which walks the short rows one by one.
    """
    return np.ones(d.shape[0], dtype=d.dtype) @ d


# ----------------------------------------------------------------------------
# max-pooling 2x2, stride 2


def _windows(x: np.ndarray):
    """The four positions of every 2x2 window as strided views of x: (N, H, W, C) ->
    a, b (top row) and c, d (bottom row), each (N, H // 2, W // 2, C)."""
    H2, W2 = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return (x[:, 0:H2:2, 0:W2:2], x[:, 0:H2:2, 1:W2:2],
            x[:, 1:H2:2, 0:W2:2], x[:, 1:H2:2, 1:W2:2])


def maxpool_forward(x: np.ndarray):
    """2x2 max-pooling with stride 2 (odd trailing rows/columns are dropped).

    x: (N, H, W, C) -> out: (N, H // 2, W // 2, C)

    The cache keeps three boolean maps that name each window's arg-max, ties going
    to the first of a, b, c, d, so backward routes each gradient to exactly one
    input, as a loop reference would.
    """
    a, b, c, d = _windows(x)
    top, bot = np.maximum(a, b), np.maximum(c, d)
    out = np.maximum(top, bot)
    return out, (b > a, d > c, bot > top, x.shape)


def maxpool_backward(dout: np.ndarray, cache) -> np.ndarray:
    """dout: (N, Ho, Wo, C) -> dx: (N, H, W, C), nonzero only at each window's arg-max.

    Each of the four window positions is written once (gradient or zero), so dx
    needs no zero fill unless odd rows or columns were dropped.
    """
    b_wins, d_wins, bot_wins, x_shape = cache
    odd = x_shape[1] % 2 or x_shape[2] % 2
    dx = (np.zeros if odd else np.empty)(x_shape, dtype=dout.dtype)
    da, db, dc, dd = _windows(dx)
    dbot = dout * bot_wins
    dtop = dout - dbot
    np.multiply(dtop, b_wins, out=db)
    np.subtract(dtop, db, out=da)
    np.multiply(dbot, d_wins, out=dd)
    np.subtract(dbot, dd, out=dc)
    return dx


# ----------------------------------------------------------------------------
# ReLU, flatten, dense


def relu_forward(x: np.ndarray):
    """x: any shape -> out: same shape, max(x, 0)."""
    out = np.maximum(x, 0)
    return out, out


def relu_backward(dout: np.ndarray, cache) -> np.ndarray:
    """Gradient passes where the output was positive (0 at the kink)."""
    return dout * (cache > 0)


def flatten_forward(x: np.ndarray):
    """x: (N, ...) -> out: (N, D). A view for contiguous x."""
    return x.reshape(x.shape[0], -1), x.shape


def flatten_backward(dout: np.ndarray, cache) -> np.ndarray:
    return dout.reshape(cache)


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray):
    """x: (N, D), w: (D, F), b: (F,) -> out: (N, F)."""
    out = x @ w
    out += b
    return out, (x, w)


def dense_backward(dout: np.ndarray, cache, need_dx: bool = True):
    """dout: (N, F) -> (dx: (N, D) or None, dw: (D, F), db: (F,))."""
    x, w = cache
    dw = x.T @ dout
    db = sum_rows(dout)
    dx = dout @ w.T if need_dx else None
    return dx, dw, db


# ----------------------------------------------------------------------------
# loss


def softmax(logits: np.ndarray) -> np.ndarray:
    """logits (N, K) -> probabilities (N, K), computed stably (each row's maximum subtracted)."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray, denom: float | None = None):
    """Softmax cross-entropy, computed stably with log-sum-exp, and its fused gradient.

    logits: (N, K), y: (N,) integer labels in [0, K)
    -> (loss, dlogits: (N, K)) with loss = sum_i -log softmax(logits_i)[y_i] / denom.

    denom defaults to N (the mean). The distributed step passes denom=1 to get
    per-sample sums, which add up exactly across ranks before one division.
    """
    N = logits.shape[0]
    denom = N if denom is None else denom
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(N)
    loss = float((np.log(s[:, 0]) - z[rows, y]).sum()) / denom
    e /= s                                  # softmax probabilities
    e[rows, y] -= 1
    if denom != 1:
        e /= denom
    return loss, e
