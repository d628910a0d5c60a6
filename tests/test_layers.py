"""Layers against plain-loop references and centred finite differences (float64).

The layers work on stacks of G micro-batches; the loop references on ordinary stacks
(G, N, H, W, C), and ``hwnc`` and ``window_major`` put their results in the layouts the layers
use (see dpcnn.layers). Most cases use two micro-batches of two samples, so that a mix-up
between micro-batches shows; that a stack gives each micro-batch the bits of a call of its own
is tests/test_exact.py's subject.
"""

import numpy as np
import pytest

from dpcnn import layers as L


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-8)))


def numeric_grad(f, x, eps=1e-6):
    """Centred differences of the scalar f() with respect to every entry of x (in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def hwnc(x):
    """A stack of micro-batches (G, N, H, W, C) -> (G, H, W, N, C), the layers' layout between
    conv and pool."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1, 4))


def window_major(y):
    """A conv output (G, N, Ho, Wo, F) -> (G, 4, Ho // 2, Wo // 2, N, F), the four positions of
    every 2x2 window as conv_forward returns them (odd last rows and columns dropped)."""
    G, N, Ho, Wo, F = y.shape
    H2, W2 = Ho // 2, Wo // 2
    return np.stack([y[:, :, dy:2 * H2:2, dx:2 * W2:2].transpose(0, 2, 3, 1, 4) for dy, dx in L.WINDOWS], axis=1)


def unwindow(d, Ho, Wo):
    """Inverse of window_major: (G, 4, H2, W2, N, F) -> (G, N, Ho, Wo, F), zero where dropped."""
    G, _, H2, W2, N, F = d.shape
    y = np.zeros((G, N, Ho, Wo, F), d.dtype)
    for k, (dy, dx) in enumerate(L.WINDOWS):
        y[:, :, dy:2 * H2:2, dx:2 * W2:2] = d[:, k].transpose(0, 3, 1, 2, 4)
    return y


def conv_loop(x, w, b, padding):
    """Reference convolution of a stack (G, N, H, W, C): explicit loops over samples, pixels, filters."""
    kh, kw, C, F = w.shape
    ph, pw = L.pad_amounts(kh, padding), L.pad_amounts(kw, padding)
    xp = np.pad(x, ((0, 0), (0, 0), ph, pw, (0, 0)))
    G, N, Hp, Wp, _ = xp.shape
    out = np.zeros((G, N, Hp - kh + 1, Wp - kw + 1, F))
    for g in range(G):
        for n in range(N):
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    for f in range(F):
                        out[g, n, i, j, f] = np.sum(xp[g, n, i:i + kh, j:j + kw, :] * w[..., f]) + b[f]
    return out


def pool_loop(x):
    """Reference 2x2 max-pool of a stack (G, N, H, W, C); returns out and the (first) arg-max mask."""
    G, N, H, W, C = x.shape
    out = np.zeros((G, N, H // 2, W // 2, C))
    mask = np.zeros_like(x)
    for g, n, i, j, c in np.ndindex(G, N, H // 2, W // 2, C):
        win = x[g, n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
        k = np.argmax(win)           # first maximum in row-major order
        out[g, n, i, j, c] = win.flat[k]
        mask[g, n, 2 * i + k // 2, 2 * j + k % 2, c] = 1
    return out, mask


# (kernel, padding, C, F) on 7 x 6 inputs: odd conv output sizes, whose last row the pool drops,
# even kernels, whose 'same' padding is uneven, and a 1 x 1 kernel
CONV_CASES = [(3, "same", 2, 3), (3, "valid", 3, 2), (2, "same", 1, 4), (5, "same", 2, 2), (1, "valid", 3, 5),
              (4, "valid", 2, 3)]


@pytest.mark.parametrize("k,padding,C,F", CONV_CASES)
def test_conv_forward_matches_loop(k, padding, C, F):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 7, 6, C))                   # two micro-batches of two samples
    w = rng.standard_normal((k, k, C, F))
    b = rng.standard_normal(F)
    out, _ = L.conv_forward(hwnc(x), w, b, padding)
    ref = window_major(conv_loop(x, w, b, padding))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,padding,C,F", CONV_CASES)
def test_conv_backward_matches_finite_differences(k, padding, C, F):
    """dx[g], dw[g] and db[g] against micro-batch g's sum alone (dx[g] is all of f(g)'s input gradient)."""
    rng = np.random.default_rng(2)
    x = hwnc(rng.standard_normal((2, 2, 5, 6, C)))
    w = rng.standard_normal((k, k, C, F))
    b = rng.standard_normal(F)
    out, cache = L.conv_forward(x, w, b, padding)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.conv_backward(dout, cache)
    assert dw.shape == (2,) + w.shape and db.shape == (2, F)

    def f(g=slice(None)):
        return np.sum(L.conv_forward(x, w, b, padding)[0][g] * dout[g])

    for g in range(2):                # f is linear in each of x, w, b: a large step only cuts the roundoff
        num = numeric_grad(lambda g=g: f(g), x, eps=1e-3)
        assert rel_error(dx[g], num[g]) < 1e-6 and not num[1 - g].any()
        assert rel_error(dw[g], numeric_grad(lambda g=g: f(g), w, eps=1e-3)) < 1e-6
        assert rel_error(db[g], numeric_grad(lambda g=g: f(g), b, eps=1e-3)) < 1e-6
    dx_skipped, dw2, db2 = L.conv_backward(dout, cache, need_dx=False)
    assert dx_skipped is None and np.array_equal(dw, dw2) and np.array_equal(db, db2)


def test_conv_backward_matches_loop_reference():
    """The input gradient of a convolution is the full correlation with the flipped kernel;
    the pixels the pool drops (here the last row) pass no gradient."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 7, 6, 3))
    w = rng.standard_normal((3, 3, 3, 4))
    out, cache = L.conv_forward(hwnc(x), w, np.zeros(4), "same")
    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.conv_backward(dout, cache)
    dy = unwindow(dout, 7, 6)
    assert not dy[:, :, 6].any()
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    dxp, dw_ref = np.zeros_like(xp), np.zeros((2,) + w.shape)
    for g, n, i, j, f in np.ndindex(2, 2, 7, 6, 4):
        dxp[g, n, i:i + 3, j:j + 3, :] += w[..., f] * dy[g, n, i, j, f]
        dw_ref[g, ..., f] += xp[g, n, i:i + 3, j:j + 3, :] * dy[g, n, i, j, f]
    np.testing.assert_allclose(dx, hwnc(dxp[:, :, 1:-1, 1:-1, :]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, dy.sum(axis=(1, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("H,W,k,padding", [(7, 6, 3, "same"), (9, 8, 3, "valid"), (6, 7, 2, "same"),
                                           (8, 8, 5, "same"), (5, 9, 4, "valid")])
def test_split_and_merge_planes_are_adjoint(H, W, k, padding):
    """split_planes puts each padded pixel on its parity plane; merge_planes is its adjoint."""
    rng = np.random.default_rng(4)
    g = L.conv_geometry(H, W, k, k, padding)
    x = rng.standard_normal((2, H, W, 2, 3))
    xs = L.split_planes(x, g)
    assert xs.shape == (2, 2, 2, 3, g.Hh, g.Wh, 2)
    ph, pw = L.pad_amounts(k, padding), L.pad_amounts(k, padding)
    xp = np.pad(x, ((0, 0), ph, pw, (0, 0), (0, 0)))
    xp = np.pad(xp, ((0, 0), (0, max(0, 2 * g.Hh - xp.shape[1])), (0, max(0, 2 * g.Wh - xp.shape[2])), (0, 0),
                     (0, 0)))
    for a in (0, 1):
        for b in (0, 1):
            plane = xp[:, a:2 * g.Hh:2, b:2 * g.Wh:2]              # (G, Hh, Wh, N, C)
            np.testing.assert_array_equal(xs[:, a, b], plane.transpose(0, 4, 1, 2, 3))
    D = rng.standard_normal(xs.shape)
    lhs, rhs = np.sum(xs * D), np.sum(x * L.merge_planes(D, x.shape, g))
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)


@pytest.mark.parametrize("H,W,k,padding", [(7, 6, 3, "same"), (9, 8, 3, "valid"), (6, 7, 2, "same"),
                                           (8, 8, 5, "same"), (5, 9, 4, "valid")])
def test_im2col_col2im_are_adjoint(H, W, k, padding):
    """Each column of im2col is the patch under its conv output pixel (and a 1 for the bias);
    <im2col(xs), D> == <xs, col2im(D)> with D in col2im's window-major layout."""
    rng = np.random.default_rng(5)
    G, N, C = 2, 2, 3
    g = L.conv_geometry(H, W, k, k, padding)
    x = rng.standard_normal((G, H, W, N, C))
    xs = L.split_planes(x, g)
    cols = L.im2col(xs, k, k, g)
    M = g.H2 * g.W2 * N
    assert cols.shape == (G, k * k * C + 1, 4 * M) and np.all(cols[:, -1] == 1)
    xp = np.pad(x, ((0, 0), L.pad_amounts(k, padding), L.pad_amounts(k, padding), (0, 0), (0, 0)))
    for s, c in zip(rng.integers(0, G, 20), rng.integers(0, 4 * M, 20)):
        window, h2, w2, n = np.unravel_index(c, (4, g.H2, g.W2, N))
        dy, dx = L.WINDOWS[window]
        patch = xp[s, 2 * h2 + dy:2 * h2 + dy + k, 2 * w2 + dx:2 * w2 + dx + k, n, :]
        np.testing.assert_array_equal(cols[s, :-1, c], patch.ravel())
    D = rng.standard_normal((G, k * k * C, 4 * M))
    D_windows = D.reshape(G, -1, 4, M).transpose(2, 0, 1, 3)         # (4, G, k * k * C, M)
    lhs = np.sum(cols[:, :-1] * D)
    rhs = np.sum(xs * L.col2im(D_windows, xs.shape, k, k, g))
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)
    assert np.array_equal(L.col2im(iter(D_windows), xs.shape, k, k, g), L.col2im(D_windows, xs.shape, k, k, g))


@pytest.mark.parametrize("shape", [(2, 2, 6, 8, 3), (1, 1, 5, 7, 2)])
def test_maxpool_matches_loop_reference(shape):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape)
    x[0, 0, 0:2, 0:2, 0] = 1.5                       # a fully tied window: first position wins
    x[0, 0, 2:4, 0:2, 1] = [[0.0, 3.0], [3.0, 3.0]]  # ties at b, c, d: b wins
    x[0, 0, 0:2, 2:4, 1] = [[0.0, 0.0], [2.0, 2.0]]  # ties at c, d: c wins
    out, cache = L.maxpool_forward(window_major(x))
    ref, mask = pool_loop(x)
    assert np.array_equal(out, hwnc(ref))
    dout = rng.standard_normal(out.shape)
    dx = L.maxpool_backward(dout, cache)
    up = np.zeros_like(x)
    H2, W2 = shape[2] // 2 * 2, shape[3] // 2 * 2
    up[:, :, :H2, :W2] = dout.transpose(0, 3, 1, 2, 4).repeat(2, axis=2).repeat(2, axis=3)
    assert np.array_equal(dx, window_major(up * mask))


def test_maxpool_backward_matches_finite_differences():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 2, 3, 2, 3))
    out, cache = L.maxpool_forward(x)
    dout = rng.standard_normal(out.shape)
    dx = L.maxpool_backward(dout, cache)
    assert rel_error(dx, numeric_grad(lambda: np.sum(L.maxpool_forward(x)[0] * dout), x)) < 1e-6


def test_relu_dense_flatten_gradients():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 3, 2, 2))
    x[np.abs(x) < 1e-3] = 0.5                     # stay away from the kink
    out, cache = L.relu_forward(x)
    assert np.array_equal(out, np.maximum(x, 0))
    dout = rng.standard_normal(out.shape)
    dx = L.relu_backward(dout, cache)
    assert rel_error(dx, numeric_grad(lambda: np.sum(L.relu_forward(x)[0] * dout), x)) < 1e-6
    assert np.array_equal(L.relu_backward(dout.T.copy().T, cache), dx)    # any strides in, same result

    flat, fcache = L.flatten_forward(x)           # x as (G, H, W, N, C): sample n's features in (h, w, c) order
    assert flat.shape == (2, 2, 24) and np.array_equal(flat[1, 1], x[1, :, :, 1, :].ravel())
    assert np.array_equal(L.flatten_backward(flat, fcache), x)

    w, b = rng.standard_normal((24, 5)), rng.standard_normal(5)
    out, cache = L.dense_forward(flat, w, b)
    np.testing.assert_allclose(out, flat @ w + b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.dense_backward(dout, cache)
    assert dw.shape == (2, 24, 5) and db.shape == (2, 5)

    def f(g=slice(None)):
        return np.sum(L.dense_forward(flat, w, b)[0][g] * dout[g])

    assert rel_error(dx, numeric_grad(f, flat)) < 1e-6
    for g in range(2):                            # each micro-batch's own weight and bias gradient
        assert rel_error(dw[g], numeric_grad(lambda g=g: f(g), w)) < 1e-6
        assert rel_error(db[g], numeric_grad(lambda g=g: f(g), b)) < 1e-6
    dw_out, db_out = np.empty_like(dw), np.empty_like(db)
    _, dw2, db2 = L.dense_backward(dout, cache, need_dx=False, out=(dw_out, db_out))
    assert dw2 is dw_out and db2 is db_out and np.array_equal(dw_out, dw) and np.array_equal(db_out, db)


def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((6, 4))
    y = np.array([0, 3, 1, 1, 2, 0])
    loss, d = L.softmax_cross_entropy(logits, y)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert isinstance(loss, float) and abs(loss - np.mean(-np.log(p[np.arange(6), y]))) < 1e-12
    num = numeric_grad(lambda: L.softmax_cross_entropy(logits, y)[0], logits)
    assert rel_error(d, num) < 1e-6
    loss_sum, d_sum = L.softmax_cross_entropy(logits, y, denom=1)
    assert abs(loss_sum - 6 * loss) < 1e-12 and np.allclose(d_sum, 6 * d)
    # a stack of two micro-batches of three: one loss per micro-batch, the same values
    losses, d_stack = L.softmax_cross_entropy(logits.reshape(2, 3, 4), y.reshape(2, 3), denom=1)
    assert losses.shape == (2,) and abs(losses.sum() - loss_sum) < 1e-12
    np.testing.assert_allclose(d_stack.reshape(6, 4), d_sum, rtol=1e-15)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], dtype=np.float32)
    loss, d = L.softmax_cross_entropy(logits, np.array([0, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    assert abs(loss - 5e4) < 1.0                  # -log softmax = 1e5 for the second row, 0 for the first


@pytest.mark.parametrize("k,padding", [(3, "same"), (2, "valid")])
def test_conv_pool_relu_equals_conv_relu_pool(k, padding):
    """The model computes conv - pool - ReLU; it equals conv - ReLU - pool (loop references),
    odd sizes included."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 9, 8, 2))
    w, b = rng.standard_normal((k, k, 2, 4)), rng.standard_normal(4)
    ref, _ = pool_loop(np.maximum(conv_loop(x, w, b, padding), 0))
    y, _ = L.conv_forward(hwnc(x), w, b, padding)
    p, _ = L.maxpool_forward(y)
    out, _ = L.relu_forward(p)
    np.testing.assert_allclose(out, hwnc(ref), rtol=1e-12, atol=1e-12)


def test_conv_geometry():
    g = L.conv_geometry(28, 28, 3, 3, "same")
    assert (g.H2, g.W2, g.Hh, g.Wh, g.covered) == (14, 14, 15, 15, True)
    g = L.conv_geometry(9, 9, 3, 3, "valid")      # conv 7 x 7, pooled 3 x 3: the last input row and column
    assert (g.H2, g.W2, g.covered) == (3, 3, False)   # reach only the dropped conv row and column
    assert L.conv_geometry(28, 28, 3, 3, "same") is L.conv_geometry(28, 28, 3, 3, "same")
    with pytest.raises(ValueError):
        L.conv_geometry(8, 8, 3, 3, "full")
