"""Exact sums (dpcnn.exact) and the micro-batched step (dpcnn.step): the same bits whatever
the grouping, an overflow reported instead of rounded."""

import numpy as np
import pytest

from dpcnn import exact
from dpcnn.comm import SerialComm
from dpcnn.data import micro_bounds
from dpcnn.model import ModelSpec
from dpcnn.step import Diverged, TrainStep


def test_grid_sums_do_not_depend_on_grouping():
    """Ten float32 vectors spanning 1e-12..1e3, summed in many groupings: identical bits, and
    within n * GRID / 2 of the exact (float64, fsum-like) sum."""
    rng = np.random.default_rng(0)
    terms = (rng.standard_normal((10, 5000)) * 10.0 ** rng.uniform(-12, 3, (10, 5000))).astype(np.float32)
    bound = exact.limit(len(terms))
    results = []
    for trial in range(6):
        order = rng.permutation(len(terms))
        cuts = sorted(rng.choice(np.arange(1, len(terms)), size=trial % 4, replace=False))
        partials = []
        for group in np.split(order, cuts):                      # "ranks", each adding its terms
            acc, tmp = np.zeros(5000), np.empty(5000)
            for i in group:
                assert exact.accumulate(acc, terms[i], bound, tmp)
            partials.append(acc)
        total = np.zeros(5000)
        for p in partials[::-1]:                                 # the "allreduce", any order
            total += p
        results.append(total)
    for r in results[1:]:
        assert np.array_equal(r, results[0])
    truth = terms.astype(np.float64).sum(axis=0)
    assert np.abs(results[0] - truth).max() <= len(terms) * exact.GRID / 2
    # while plain float32 sums of the same terms in another order do differ
    f32 = [np.zeros(5000, np.float32), np.zeros(5000, np.float32)]
    for i in range(len(terms)):
        f32[0] += terms[i]
        f32[1] += terms[-1 - i]
    assert not np.array_equal(f32[0], f32[1])


def test_accumulate_refuses_out_of_range_and_nonfinite_terms():
    acc, tmp = np.zeros(3), np.empty(3)
    bound = exact.limit(4)
    for bad in ([np.nan, 0, 0], [0, np.inf, 0], [bound * 1.01, 0, 0], [-bound, bound, 0]):
        assert not exact.accumulate(acc, np.array(bad, np.float32), bound, tmp)
        assert np.array_equal(acc, np.zeros(3))                  # left unchanged
    assert exact.accumulate(acc, np.array([bound * 0.99, -1.0, 2.0**-40], np.float32), bound, tmp)
    assert acc[2] == 0 and acc[1] == -1.0                         # below half a grid step: rounds to 0
    # the bound keeps any partial sum of n terms inside the exact range
    assert 4 * exact.limit(4) <= exact.RANGE and exact.limit(1) <= 2**19


def test_to_fixed_is_exact_for_python_ints():
    xs = [0.1, 1e-9, 123.456, -7.25] * 1000
    assert exact.from_fixed(sum(exact.to_fixed(x) for x in xs)) == exact.from_fixed(
        sum(exact.to_fixed(x) for x in reversed(xs)))


@pytest.mark.parametrize("M,m,P", [(28, 4, 3), (64, 16, 3), (20, 16, 2), (5, 2, 4), (7, 3, 1)])
def test_micro_bounds_deal_whole_micro_batches(M, m, P):
    spans = [micro_bounds(M, m, r, P) for r in range(P)]
    assert spans[0][0] == 0 and spans[-1][1] == M
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(lo % m == 0 for lo, hi in spans if hi > lo)                      # starts on a micro-batch
    counts = [-(-(hi - lo) // m) for lo, hi in spans]
    assert max(counts) - min(counts) <= 1                                        # dealt evenly


def _step_on(x, y, micro_batch, split):
    """A step where the micro-batches are split into 'ranks' [0, split) and [split, M) whose
    buffers are added, as the allreduce would; returns (parameters, velocity, loss, correct)."""
    M = len(y)
    steps = [TrainStep(ModelSpec(), SerialComm(), micro_batch=micro_batch, seed=1, weight_decay=5e-4)
             for _ in range(2)]
    steps[0].compute(x[:split], y[:split], M)
    steps[1].compute(x[split:], y[split:], M)
    steps[0].buf.array += steps[1].buf.array
    loss, correct = steps[0].buf.loss_sum, steps[0].buf.correct
    steps[0].update(M, 0.1)
    return steps[0].model.params.copy(), steps[0].opt.velocity.copy(), loss, correct


def test_step_bits_do_not_depend_on_how_micro_batches_are_dealt():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 24)
    ref = _step_on(x, y, 4, 24)                                      # one "rank" computes all six
    for split in (0, 4, 12, 20):
        out = _step_on(x, y, 4, split)
        assert all(np.array_equal(a, b) for a, b in zip(out[:2], ref[:2], strict=True)) and out[2:] == ref[2:]
    # and it is the mean gradient: close to one float32 pass over the whole batch
    step = TrainStep(ModelSpec(), SerialComm(), micro_batch=24, seed=1, weight_decay=5e-4)
    g_exact = step.model.grads.copy()
    step.compute(x, y, 24)
    np.multiply(step.buf.grads, 1 / 24, out=g_exact, casting="unsafe")
    step.model.loss_and_grad(x, y)                                   # denom = N: the mean, in float32
    assert np.abs(g_exact - step.model.grads).max() <= 1e-5 * np.abs(step.model.grads).max()


def test_an_overflowing_gradient_is_a_divergence_not_a_wrapped_sum():
    step = TrainStep(ModelSpec(), SerialComm(), micro_batch=4, seed=0)
    x = np.full((8, 28, 28, 1), 1e6, np.float32)                     # finite, but gradients far out of range
    y = np.arange(8) % 10
    before = step.model.params.copy()
    step.compute(x, y, 8)
    assert step.buf.overflow
    with pytest.raises(Diverged, match="not finite, or too large to sum exactly"):
        step.update(8, 0.1)
    assert np.array_equal(step.model.params, before)                 # nothing applied


def test_the_float_path_is_one_pass_and_the_plain_mean():
    """--no-exact: TrainStep(exact=False) applies the mean float32 gradient of one pass."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 12)
    step = TrainStep(ModelSpec(), SerialComm(), seed=2, momentum=0.0, exact=False)
    ref = TrainStep(ModelSpec(), SerialComm(), seed=2, momentum=0.0)
    before = step.model.params.copy()
    r = step(x, y, 12, lr=0.1)
    ref.model.loss_and_grad(x, y)                               # the mean, one float32 pass
    want = before - np.float32(0.1) * ref.model.grads          # (1/M after the sum rounds apart from a mean)
    assert np.abs(step.model.params - want).max() <= 1e-6 * np.abs(want).max()
    assert step.buf.array.dtype == np.float32 and r.samples == 12 and 0 <= r.correct <= 12
