"""Layers against plain-loop references and centred finite differences (float64)."""

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


def conv_loop(x, w, b, padding):
    """Reference convolution: explicit loops over samples, pixels, filters."""
    kh, kw, C, F = w.shape
    ph, pw = L.pad_amounts(kh, padding), L.pad_amounts(kw, padding)
    xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    N, Hp, Wp, _ = xp.shape
    out = np.zeros((N, Hp - kh + 1, Wp - kw + 1, F))
    for n in range(N):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                for f in range(F):
                    out[n, i, j, f] = np.sum(xp[n, i:i + kh, j:j + kw, :] * w[..., f]) + b[f]
    return out


def pool_loop(x):
    """Reference 2x2 max-pool; returns out and the (first) arg-max mask."""
    N, H, W, C = x.shape
    out = np.zeros((N, H // 2, W // 2, C))
    mask = np.zeros_like(x)
    for n in range(N):
        for i in range(H // 2):
            for j in range(W // 2):
                for c in range(C):
                    win = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
                    k = np.argmax(win)           # first maximum in row-major order
                    out[n, i, j, c] = win.flat[k]
                    mask[n, 2 * i + k // 2, 2 * j + k % 2, c] = 1
    return out, mask


CONV_CASES = [(3, "same", 2, 3), (3, "valid", 3, 2), (2, "same", 1, 4), (5, "same", 2, 2), (1, "valid", 3, 5)]


@pytest.mark.parametrize("k,padding,C,F", CONV_CASES)
def test_conv_forward_matches_loop(k, padding, C, F):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 6, C))
    w = rng.standard_normal((k, k, C, F))
    b = rng.standard_normal(F)
    out, _ = L.conv_forward(x, w, b, padding)
    ref = conv_loop(x, w, b, padding)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,padding,C,F", CONV_CASES)
def test_conv_backward_matches_finite_differences(k, padding, C, F):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 6, C))
    w = rng.standard_normal((k, k, C, F))
    b = rng.standard_normal(F)
    out, cache = L.conv_forward(x, w, b, padding)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.conv_backward(dout, cache)

    def f():
        return np.sum(L.conv_forward(x, w, b, padding)[0] * dout)

    assert rel_error(dx, numeric_grad(f, x)) < 1e-6
    assert rel_error(dw, numeric_grad(f, w)) < 1e-6
    assert rel_error(db, numeric_grad(f, b)) < 1e-6
    dx_skipped, dw2, _ = L.conv_backward(dout, cache, need_dx=False)
    assert dx_skipped is None and np.array_equal(dw, dw2)


def test_conv_backward_matches_loop_reference():
    """The input gradient of a convolution is the full correlation with the flipped kernel."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 5, 3))
    w = rng.standard_normal((3, 3, 3, 4))
    out, cache = L.conv_forward(x, w, np.zeros(4), "same")
    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.conv_backward(dout, cache)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dxp, dw_ref = np.zeros_like(xp), np.zeros_like(w)
    for n in range(2):
        for i in range(6):
            for j in range(5):
                for f in range(4):
                    dxp[n, i:i + 3, j:j + 3, :] += w[..., f] * dout[n, i, j, f]
                    dw_ref[..., f] += xp[n, i:i + 3, j:j + 3, :] * dout[n, i, j, f]
    np.testing.assert_allclose(dx, dxp[:, 1:-1, 1:-1, :], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, dout.sum(axis=(0, 1, 2)), rtol=1e-12)


def test_im2col_col2im_are_adjoint():
    """<im2col(x), D> == <x, col2im(D)> with D in col2im's tap-major layout."""
    rng = np.random.default_rng(4)
    xp = rng.standard_normal((2, 6, 7, 3))
    kh, kw = 3, 2
    cols = L.im2col(xp, kh, kw)
    N, Ho, Wo, C = 2, 4, 6, 3
    assert cols.shape == (N * Ho * Wo, kh * kw * C)
    D = rng.standard_normal((kh, kw, N, Ho, Wo, C))
    D_rows = D.transpose(2, 3, 4, 0, 1, 5).reshape(cols.shape)   # the same numbers, im2col layout
    lhs = np.sum(cols * D_rows)
    rhs = np.sum(xp * L.col2im(D, xp.shape))
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)
    # each row of cols is the patch under that output pixel
    assert np.array_equal(cols[N * Ho * Wo - 1].reshape(kh, kw, C), xp[1, 3:6, 5:7, :])


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 5, 7, 2)])
def test_maxpool_matches_loop_reference(shape):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape)
    x[0, 0:2, 0:2, 0] = 1.5                       # a fully tied window: first position wins
    x[0, 2:4, 0:2, 1] = [[0.0, 3.0], [3.0, 3.0]]  # ties at b, c, d: b wins
    out, cache = L.maxpool_forward(x)
    ref, mask = pool_loop(x)
    assert np.array_equal(out, ref)
    dout = rng.standard_normal(out.shape)
    dx = L.maxpool_backward(dout, cache)
    up = np.zeros_like(x)
    H2, W2 = shape[1] // 2 * 2, shape[2] // 2 * 2
    up[:, :H2, :W2] = dout.repeat(2, axis=1).repeat(2, axis=2)
    assert np.array_equal(dx, up * mask)


def test_maxpool_backward_matches_finite_differences():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 6, 3))
    out, cache = L.maxpool_forward(x)
    dout = rng.standard_normal(out.shape)
    dx = L.maxpool_backward(dout, cache)
    assert rel_error(dx, numeric_grad(lambda: np.sum(L.maxpool_forward(x)[0] * dout), x)) < 1e-6


def test_relu_dense_flatten_gradients():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 2, 2))
    x[np.abs(x) < 1e-3] = 0.5                     # stay away from the kink
    out, cache = L.relu_forward(x)
    dout = rng.standard_normal(out.shape)
    dx = L.relu_backward(dout, cache)
    assert rel_error(dx, numeric_grad(lambda: np.sum(L.relu_forward(x)[0] * dout), x)) < 1e-6

    flat, fcache = L.flatten_forward(x)
    assert flat.shape == (4, 12) and L.flatten_backward(flat, fcache).shape == x.shape

    w, b = rng.standard_normal((12, 5)), rng.standard_normal(5)
    out, cache = L.dense_forward(flat, w, b)
    np.testing.assert_allclose(out, flat @ w + b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.dense_backward(dout, cache)

    def f():
        return np.sum(L.dense_forward(flat, w, b)[0] * dout)

    assert rel_error(dx, numeric_grad(f, flat)) < 1e-6
    assert rel_error(dw, numeric_grad(f, w)) < 1e-6
    assert rel_error(db, numeric_grad(f, b)) < 1e-6


def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((6, 4))
    y = np.array([0, 3, 1, 1, 2, 0])
    loss, d = L.softmax_cross_entropy(logits, y)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert abs(loss - np.mean(-np.log(p[np.arange(6), y]))) < 1e-12
    num = numeric_grad(lambda: L.softmax_cross_entropy(logits, y)[0], logits)
    assert rel_error(d, num) < 1e-6
    loss_sum, d_sum = L.softmax_cross_entropy(logits, y, denom=1)
    assert abs(loss_sum - 6 * loss) < 1e-12 and np.allclose(d_sum, 6 * d)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], dtype=np.float32)
    loss, d = L.softmax_cross_entropy(logits, np.array([0, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    assert abs(loss - 5e4) < 1.0                  # -log softmax = 1e5 for the second row, 0 for the first


def test_conv_pool_reordering_equals_conv_relu_pool():
    """The model computes conv - pool - (+bias) - ReLU; it equals conv - ReLU - pool."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 8, 8, 2))
    w, b = rng.standard_normal((3, 3, 2, 4)), rng.standard_normal(4)
    y1, c1 = L.conv_forward(x, w, b)
    r1, cr = L.relu_forward(y1)
    ref, cp = L.maxpool_forward(r1)
    y2, _ = L.conv_forward(x, w, None)
    p2, _ = L.maxpool_forward(y2)
    out, _ = L.relu_forward(p2 + b)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
