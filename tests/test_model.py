"""The whole model: parameter count, gradient check, overfitting, determinism; the optimizer."""

import math

import numpy as np
import pytest

from dpcnn import layers as L
from dpcnn.metrics import Totals, evaluate
from dpcnn.model import CNN, ModelSpec
from dpcnn.optim import SGD, Schedule


def test_default_model_has_103018_parameters():
    m = CNN()
    assert m.spec.num_params == 103018 == m.params.size == m.grads.size
    assert m.params.dtype == np.float32
    assert [n for n, _ in m.shapes] == ["conv1.w", "conv1.b", "conv2.w", "conv2.b",
                                        "fc1.w", "fc1.b", "fc2.w", "fc2.b"]
    assert m.p["conv1.w"].shape == (3, 3, 1, 8) and m.p["fc1.w"].shape == (784, 128)
    # views into the flat vectors
    m.p["fc2.b"][3] = 7.0
    assert m.params[-7] == 7.0
    assert np.shares_memory(m.g["conv2.w"], m.grads)


def test_he_init_and_zero_biases():
    m = CNN(seed=3)
    for name, shape in m.shapes:
        v = m.p[name]
        if name.endswith(".b"):
            assert not v.any()
        else:
            std = math.sqrt(2.0 / math.prod(shape[:-1]))
            assert abs(v.std() / std - 1) < (0.3 if v.size < 100 else 0.05)


def test_same_seed_gives_bit_identical_parameters_and_training():
    a, b, c = CNN(seed=11), CNN(seed=11), CNN(seed=12)
    assert np.array_equal(a.params, b.params) and not np.array_equal(a.params, c.params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    for m in (a, b):
        opt = SGD(m.params, m.grads, momentum=0.9, nesterov=True, weight_decay=5e-4)
        for _ in range(3):
            m.loss_and_grad(x, y)
            opt.step(0.05)
    assert np.array_equal(a.params, b.params)


def small_spec():
    return ModelSpec(input_shape=(8, 8, 2), channels=(3, 4), kernel=3, hidden=(6,), classes=5)


@pytest.mark.parametrize("spec", [small_spec(), ModelSpec(input_shape=(9, 7, 1), channels=(2,),
                                                           kernel=2, padding="valid", hidden=(), classes=3)])
def test_whole_model_gradient_matches_finite_differences(spec):
    """Every parameter of a small model, in float64, against centred differences."""
    m = CNN(spec, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    m.params[:] += 0.1 * rng.standard_normal(m.params.size)   # nonzero biases, away from kinks
    x = rng.standard_normal((3,) + spec.input_shape)
    y = rng.integers(0, spec.classes, 3)
    m.loss_and_grad(x, y)
    analytic = m.grads.copy()

    def loss():
        return L.softmax_cross_entropy(m.forward(x), y)[0]

    eps = 1e-6
    numeric = np.zeros_like(analytic)
    for i in range(m.params.size):
        old = m.params[i]
        m.params[i] = old + eps
        fp = loss()
        m.params[i] = old - eps
        fm = loss()
        m.params[i] = old
        numeric[i] = (fp - fm) / (2 * eps)
    err = np.abs(analytic - numeric) / np.maximum(np.abs(analytic) + np.abs(numeric), 1e-8)
    assert err.max() < 1e-6, f"worst parameter {np.argmax(err)}: {err.max():.2e}"


def test_default_model_gradient_on_sampled_parameters():
    m = CNN(seed=0, dtype=np.float64)
    rng = np.random.default_rng(2)
    m.params[:] += 0.01 * rng.standard_normal(m.params.size)
    x = rng.standard_normal((2, 28, 28, 1))
    y = np.array([3, 7])
    m.loss_and_grad(x, y)
    analytic = m.grads.copy()
    eps = 1e-6
    offsets = {}
    o = 0
    for name, shape in m.shapes:
        offsets[name] = (o, o + math.prod(shape))
        o += math.prod(shape)
    for name, (lo, hi) in offsets.items():
        for i in rng.choice(np.arange(lo, hi), size=min(8, hi - lo), replace=False):
            old = m.params[i]
            m.params[i] = old + eps
            fp = L.softmax_cross_entropy(m.forward(x), y)[0]
            m.params[i] = old - eps
            fm = L.softmax_cross_entropy(m.forward(x), y)[0]
            m.params[i] = old
            num = (fp - fm) / (2 * eps)
            err = abs(num - analytic[i]) / max(abs(num) + abs(analytic[i]), 1e-8)
            assert err < 1e-6, f"{name}[{i - lo}]: {err:.2e}"


def test_model_overfits_64_samples():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    m = CNN(seed=0)
    opt = SGD(m.params, m.grads, momentum=0.9)
    for step in range(300):
        m.loss_and_grad(x, y)
        opt.step(0.02)
        if step % 20 == 19 and evaluate(m, x, y).accuracy == 1.0:
            break
    t = evaluate(m, x, y)
    assert t.accuracy == 1.0 and t.loss < 0.1


def test_sgd_matches_reference_formula():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(10)
    grads = [rng.standard_normal(10) for _ in range(4)]
    for nesterov in (False, True):
        w, g = w0.copy(), np.zeros(10)
        opt = SGD(w, g, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
        ref_w, v = w0.copy(), np.zeros(10)
        for gr in grads:
            g[:] = gr
            opt.step(0.1)
            d = gr + 0.01 * ref_w
            v = 0.9 * v + d
            ref_w = ref_w - 0.1 * (d + 0.9 * v if nesterov else v)
        np.testing.assert_allclose(w, ref_w, rtol=1e-12)
    w, g = w0.copy(), grads[0].copy()
    SGD(w, g, momentum=0.0).step(0.5)
    np.testing.assert_allclose(w, w0 - 0.5 * grads[0])


def test_schedules():
    c = Schedule("constant", 0.1, total_steps=100, warmup_steps=10)
    assert c(0) == pytest.approx(0.01) and c(9) == pytest.approx(0.1) and c(50) == 0.1
    s = Schedule("step", 1.0, total_steps=100, milestones=(30, 60), gamma=0.1)
    assert (s(29), s(30), s(59), s(60)) == (1.0, pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.01))
    cos = Schedule("cosine", 1.0, total_steps=110, warmup_steps=10)
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    assert all(cos(i) >= cos(i + 1) for i in range(10, 110))
    with pytest.raises(ValueError):
        Schedule("linear", 0.1, 10)


def test_totals_merge_and_per_class():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 3))
    y = rng.integers(0, 3, 50)
    whole = Totals(3)
    whole.add(logits, y)
    a, b = Totals(3), Totals(3)
    a.add(logits[:20], y[:20])
    b.add(logits[20:], y[20:])
    merged = Totals.from_array(a.as_array() + b.as_array(), 3)
    assert merged.count == 50 and np.array_equal(merged.confusion, whole.confusion)
    assert merged.loss == pytest.approx(whole.loss)
    pred = logits.argmax(1)
    assert whole.accuracy == pytest.approx(np.mean(pred == y))
    for k in range(3):
        assert whole.per_class_accuracy[k] == pytest.approx(np.mean(pred[y == k] == k))


def test_a_loss_too_large_to_sum_counts_as_diverged():
    """A finite but enormous loss (lr far too high) used to overflow the int64 allreduce vector
    (OverflowError); a batch's mean loss above LOSS_MEAN_MAX now reads as not finite (the trainer
    reports divergence), decided per batch, so the same on any number of ranks."""
    y = np.array([0, 1, 2, 0])
    huge = Totals(3)
    huge.add(np.array([[0.0, 1e9, 0.0]] * 4), y)            # ~3e9 summed: finite, past 2^24
    a = huge.as_array()
    assert a.dtype == np.int64 and Totals.from_array(a, 3).loss == float("inf")
    assert Totals.from_array(a, 3).count == 4
    fine = Totals(3)
    fine.add(np.array([[0.0, 5.0, 0.0]] * 4), y)
    assert np.isfinite(Totals.from_array(fine.as_array(), 3).loss)
