"""Exact sums (dpcnn.exact) and the stacked exact step (dpcnn.step): the same bits whatever the
grouping; the stacked pass the same bits as one micro-batch at a time, layer by layer, for the
whole model and for the whole step on 1, 2, 3 ranks (simulated here, and under MPI with
`mpiexec -n 2|3 python -m pytest --with-mpi -m mpi tests/test_exact.py`); an overflow reported
instead of rounded.

The reference for the step is ``OneAtATime`` below: the exact step as it was before the stacked
pass (one forward and backward per micro-batch, each gradient rounded to the grid by adding and
subtracting 1.5 * 2**20 in float64 and added to a float64 sum), written independently of
dpcnn.step and dpcnn.exact; for the dense layers whose factors the step gathers (global batches
up to 110 for fc1), the reference keeps each micro-batch's factors and takes their product over the
whole batch. Bits are compared with one BLAS thread (the trainer's default).
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from dpcnn import exact
from dpcnn import layers as L
from dpcnn.comm import SerialComm
from dpcnn.data import micro_bounds
from dpcnn.model import CNN, ModelSpec
from dpcnn.optim import SGD
from dpcnn.step import Diverged, TrainStep


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(1):
        yield


def same(a, b) -> bool:
    """The same bits: shape, dtype and every value (NaN never occurs here)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


# ----------------------------------------------------------------------------
# exact sums


def test_grid_sums_do_not_depend_on_grouping():
    """Ten float32 rows spanning 1e-12..1e3, summed in many groupings: identical bits, and
    within n * GRID / 2 of the exact (float64, fsum-like) sum."""
    rng = np.random.default_rng(0)
    terms = (rng.standard_normal((10, 5000)) * 10.0 ** rng.uniform(-12, 3, (10, 5000))).astype(np.float32)
    bound = exact.limit(len(terms))
    results = []
    for trial in range(6):
        order = rng.permutation(len(terms))
        cuts = sorted(rng.choice(np.arange(1, len(terms)), size=trial % 4, replace=False))
        partials = []
        for group in np.split(order, cuts):                      # "ranks", each summing its rows
            out = np.empty(5000)
            assert exact.add_rows(terms[group] * np.float32(exact.SCALE), out, bound, overwrite=True)
            partials.append(out)
        total = np.zeros(5000)
        for p in partials[::-1]:                                 # the "allreduce", any order
            total += p
        results.append(total)
    for r in results[1:]:
        assert same(r, results[0])
    truth = terms.astype(np.float64).sum(axis=0)
    assert np.abs(results[0] * exact.GRID - truth).max() <= len(terms) * exact.GRID / 2
    # while plain float32 sums of the same terms in another order do differ
    f32 = [np.zeros(5000, np.float32), np.zeros(5000, np.float32)]
    for i in range(len(terms)):
        f32[0] += terms[i]
        f32[1] += terms[-1 - i]
    assert not np.array_equal(f32[0], f32[1])


def rounder_sum(rows: np.ndarray) -> np.ndarray:
    """The reference rounding: each float32 row (values, not grid units) to the grid by adding and
    subtracting 1.5 * 2**20 in float64 (ties to even), added up in float64."""
    acc = np.zeros(rows.shape[1])
    for x in rows:
        acc += (x.astype(np.float64) + 1.5 * 2.0**20) - 1.5 * 2.0**20
    return acc


def test_add_rows_rounds_each_element_to_the_grid_as_the_reference():
    """np.rint in units of GRID rounds as the float64 ROUNDER did, ties to even included."""
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((5, 4000)) * 10.0 ** rng.uniform(-13, 2, (5, 4000))).astype(np.float32)
    ties = (np.arange(-20, 20) + 0.5).astype(np.float32) * np.float32(exact.GRID)   # exactly half a grid step
    rows[:, :40] = ties
    out = np.zeros(4000)
    assert exact.add_rows(rows * np.float32(exact.SCALE), out, exact.limit(5))
    assert same(out * exact.GRID, rounder_sum(rows))
    assert np.all(out[:40] == 5 * np.round(np.arange(-20, 20) + 0.5))     # np.round: ties to even too


def test_add_rows_refuses_out_of_range_and_nonfinite_rows():
    bound = exact.limit(4)
    for bad in ([np.nan, 0, 0], [0, np.inf, 0], [bound * 1.01, 0, 0], [-bound, bound, 0]):
        rows = np.array([[1.0, 2.0, 3.0], bad], np.float32) * np.float32(exact.SCALE)
        for overwrite in (False, True):
            out = np.full(3, 7.0)
            assert not exact.add_rows(rows, out, bound, overwrite)
            assert np.all(out == 7.0)                             # left unchanged
    out = np.full(3, 7.0)
    rows = np.array([[bound * 0.99, -1.0, 2.0**-40]], np.float32) * np.float32(exact.SCALE)
    assert exact.add_rows(rows.copy(), out, bound, overwrite=True)
    assert out[2] == 0 and out[1] == -exact.SCALE                  # below half a grid step: rounds to 0
    assert exact.add_rows(rows, out, bound) and out[1] == -2 * exact.SCALE and out[2] == 0
    assert exact.add_rows(np.zeros((0, 3), np.float32), out, bound) and out[1] == -2 * exact.SCALE   # no rows
    # the bound keeps any sum of n terms (with the norm's own rounding) inside the exact range
    assert all(2 * n * exact.limit(n) <= exact.RANGE for n in (1, 2, 5, 1000))


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


# ----------------------------------------------------------------------------
# every layer: a stack of micro-batches gives each one the bits of a call of its own


def he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)


def normal(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# (G micro-batches, N samples each, H, W, C, kernel, F, padding, dense D -> F2): the default
# model's two conv layers and its dense layers at m = 16, an odd micro-batch, and odd sizes
LAYER_CASES = {
    "conv1-m16": dict(G=4, N=16, H=28, W=28, C=1, k=3, F=8, padding="same"),
    "conv2-m16": dict(G=4, N=16, H=14, W=14, C=8, k=3, F=16, padding="same"),
    "odd-m5": dict(G=3, N=5, H=14, W=14, C=8, k=3, F=16, padding="same"),
    "valid-odd": dict(G=3, N=7, H=9, W=7, C=3, k=2, F=5, padding="valid"),
}


def one_at_a_time(f, *stacked):
    """f applied to each micro-batch g of the stacked arguments alone (a stack of one), as a list."""
    return [f(*(a[g:g + 1] for a in stacked)) for g in range(len(stacked[0]))]


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_conv_pool_relu_layers_stacked_give_the_bits_of_one_at_a_time(name):
    c = LAYER_CASES[name]
    rng = np.random.default_rng(2)
    G, N, k, C, F = c["G"], c["N"], c["k"], c["C"], c["F"]
    x = normal(rng, (G, N, c["H"], c["W"], C)).transpose(0, 2, 3, 1, 4)    # strided, as the model's input
    w, b = he(rng, (k, k, C, F), k * k * C), normal(rng, F, 0.1)
    out, cache = L.conv_forward(x, w, b, c["padding"])
    dout = normal(rng, out.shape, 1e-2)
    dx, dw, db = L.conv_backward(dout, cache)
    pooled, pcache = L.maxpool_forward(out)
    act, rcache = L.relu_forward(pooled)
    dact = normal(rng, act.shape, 1e-2)
    dpool = L.relu_backward(dact, rcache)
    dconv = L.maxpool_backward(dpool, pcache)
    for g in range(G):
        x1, dout1, dact1 = x[g:g + 1], dout[g:g + 1], dact[g:g + 1]
        out1, cache1 = L.conv_forward(x1, w, b, c["padding"])
        assert same(out1, out[g:g + 1]), "conv_forward"
        dx1, dw1, db1 = L.conv_backward(dout1, cache1)
        assert same(dx1, dx[g:g + 1]) and same(dw1, dw[g:g + 1]) and same(db1, db[g:g + 1]), "conv_backward"
        assert same(L.conv_backward(dout1, cache1, need_dx=False)[1], dw1)
        pooled1, pcache1 = L.maxpool_forward(out1)
        assert same(pooled1, pooled[g:g + 1]), "maxpool_forward"
        act1, rcache1 = L.relu_forward(pooled1)
        assert same(act1, act[g:g + 1]), "relu_forward"
        dpool1 = L.relu_backward(dact1, rcache1)
        assert same(dpool1, dpool[g:g + 1]), "relu_backward"
        assert same(L.maxpool_backward(dpool1, pcache1), dconv[g:g + 1]), "maxpool_backward"
    # the pieces inside conv_forward and conv_backward, on their own
    geo = L.conv_geometry(c["H"], c["W"], k, k, c["padding"])
    xs = L.split_planes(x, geo)
    cols = L.im2col(xs, k, k, geo)
    dcols = normal(rng, (4, G, k * k * C, cols.shape[2] // 4))
    for g, (xs1, cols1) in enumerate(zip(one_at_a_time(lambda a: L.split_planes(a, geo), x),
                                         one_at_a_time(lambda a: L.im2col(a, k, k, geo), xs))):
        assert same(xs1, xs[g:g + 1]) and same(cols1, cols[g:g + 1])
        assert same(L.col2im(dcols[:, g:g + 1], xs1.shape, k, k, geo), L.col2im(dcols, xs.shape, k, k, geo)[g:g + 1])
        assert same(L.merge_planes(xs1, x[g:g + 1].shape, geo), L.merge_planes(xs, x.shape, geo)[g:g + 1])


@pytest.mark.parametrize("G,N", [(4, 16), (3, 5), (2, 1)])
def test_dense_flatten_loss_layers_stacked_give_the_bits_of_one_at_a_time(G, N):
    rng = np.random.default_rng(3)
    n = 784 * 128 + 128 + 128 * 10 + 10
    conv_out = np.maximum(normal(rng, (G, 7, 7, N, 16)), 0)
    flat, fcache = L.flatten_forward(conv_out)
    w1, b1 = he(rng, (784, 128), 784), normal(rng, 128, 0.1)
    w2, b2 = he(rng, (128, 10), 128), normal(rng, 10, 0.1)
    h, c1 = L.dense_forward(flat, w1, b1)
    a, r1 = L.relu_forward(h)
    logits, c2 = L.dense_forward(a, w2, b2)
    y = rng.integers(0, 10, (G, N))
    loss, dlogits = L.softmax_cross_entropy(logits, y, exact.GRID)
    # the gradients go into rows of a larger array (stride n between micro-batches), as in the step
    rows = np.zeros((G + 1, n), np.float32)
    views = [rows[:G, :784 * 128].reshape(G, 784, 128), rows[:G, 784 * 128:784 * 128 + 128],
             rows[:G, -1290:-10].reshape(G, 128, 10), rows[:G, -10:]]
    da, _, _ = L.dense_backward(dlogits, c2, out=(views[2], views[3]))
    dh = L.relu_backward(da, r1)
    dflat, _, _ = L.dense_backward(dh, c1, out=(views[0], views[1]))
    dconv = L.flatten_backward(dflat, fcache)
    sums = L.sum_rows(dh)
    for g in range(G):
        flat1, fcache1 = L.flatten_forward(conv_out[g:g + 1])
        assert same(flat1, flat[g:g + 1]), "flatten_forward"
        h1, c11 = L.dense_forward(flat1, w1, b1)
        assert same(h1, h[g:g + 1]), "dense_forward"
        a1, r11 = L.relu_forward(h1)
        logits1, c21 = L.dense_forward(a1, w2, b2)
        assert same(logits1, logits[g:g + 1])
        loss1, dlogits1 = L.softmax_cross_entropy(logits1, y[g:g + 1], exact.GRID)
        assert same(loss1, loss[g:g + 1]) and same(dlogits1, dlogits[g:g + 1]), "softmax_cross_entropy"
        da1, dw21, db21 = L.dense_backward(dlogits1, c21)
        assert same(da1, da[g:g + 1]) and same(dw21[0], views[2][g]) and same(db21[0], views[3][g]), "dense_backward"
        dh1 = L.relu_backward(da1, r11)
        dflat1, dw11, db11 = L.dense_backward(dh1, c11)
        assert same(dflat1, dflat[g:g + 1]) and same(dw11[0], views[0][g]) and same(db11[0], views[1][g])
        assert same(L.flatten_backward(dflat1, fcache1), dconv[g:g + 1]), "flatten_backward"
        assert same(L.sum_rows(dh1), sums[g:g + 1]), "sum_rows"
    assert not rows[G].any()                                  # nothing written past the stack
    # one batch, the 2-D form the metrics use: a float loss, the same bits as a stack of one
    loss1, d1 = L.softmax_cross_entropy(logits[0], y[0], 1)
    assert isinstance(loss1, float) and same(d1, L.softmax_cross_entropy(logits[:1], y[:1], 1)[1][0])


# ----------------------------------------------------------------------------
# the whole model


SPECS = {"default": ModelSpec(),
         "valid-rgb": ModelSpec(input_shape=(20, 16, 3), channels=(6, 10), kernel=3, padding="valid",
                                hidden=(32, 24), classes=7)}


@pytest.mark.parametrize("spec_name,G,m", [("default", 4, 16), ("default", 3, 5), ("valid-rgb", 3, 8)])
def test_stacked_model_pass_gives_the_bits_of_one_pass_per_micro_batch(spec_name, G, m):
    spec = SPECS[spec_name]
    rng = np.random.default_rng(4)
    model = CNN(spec, seed=1)
    x = normal(rng, (G, m) + spec.input_shape)
    y = rng.integers(0, spec.classes, (G, m))
    scratch = np.full((G + 2, spec.num_params), np.nan, np.float32)
    loss, correct = model.loss_and_grad(x, y, exact.GRID, scratch[1:G + 1])
    assert loss.shape == correct.shape == (G,)
    for g in range(G):
        loss1, correct1 = model.loss_and_grad(x[g], y[g], denom=1)       # the pass of one micro-batch
        assert loss[g] == loss1 * exact.SCALE and correct[g] == correct1
        # in units of the grid: the unscaled gradient times 2**32, exactly
        assert same(scratch[1 + g], model.grads * np.float32(exact.SCALE))
        assert same(model.forward(x[g]), model.forward(x)[g])
    assert np.isnan(scratch[0]).all() and np.isnan(scratch[G + 1]).all()
    with pytest.raises(ValueError, match="stacked backward needs grads"):
        model.loss_and_grad(x, y, exact.GRID, scratch[:G - 1])


# ----------------------------------------------------------------------------
# the whole step


class OneAtATime:
    """The exact step before the stacked pass, as the reference: one forward and backward per
    micro-batch, each float32 gradient rounded to the grid and added to a float64 sum."""

    def __init__(self, spec, seed, momentum=0.9, weight_decay=5e-4, gather=True):
        self.model, self.gather = CNN(spec, seed=seed), gather
        self.opt = SGD(self.model.params, self.model.grads, momentum=momentum, nesterov=momentum > 0,
                       weight_decay=weight_decay)

    def factored(self, M):
        """The dense layers whose weight gradient the step takes from gathered factors at a global
        batch of M: those whose factors (M rows of D + F) are no more values than the weights."""
        return tuple(i for i in range(1, len(self.model.spec.hidden) + 2)
                     if self.gather and M * sum(self.model.p[f"fc{i}.w"].shape) <= self.model.p[f"fc{i}.w"].size)

    def compute(self, x, y, m, M):
        """This rank's micro-batches -> (gradient sum, loss sum as an integer of GRIDs, correct,
        {factored layer: [(x, dout) of each micro-batch]})."""
        acc, loss_fixed, correct = np.zeros(self.model.grads.size), 0, 0
        layers, factors = self.factored(M), {}
        for i in range(0, len(x), m):
            self.model.grads[:] = 0
            loss, c = self.model.loss_and_grad(x[i:i + m], y[i:i + m], denom=1, factored=layers)
            acc += rounder_sum(self.model.grads[None])
            loss_fixed, correct = loss_fixed + exact.to_fixed(loss), correct + c
            for j, (a, d) in self.model.factors.items():
                factors.setdefault(j, []).append((a[0].copy(), d[0].copy()))
        return acc, loss_fixed, correct, factors

    def update(self, grad_sum, M, lr, factors):
        """factors: every micro-batch's, in the order of the global batch."""
        np.multiply(grad_sum, 1.0 / M, out=self.model.grads, casting="unsafe")
        for j, parts in factors.items():       # x^T @ dout over the whole batch, dout in units of the grid
            a = np.concatenate([p[0] for p in parts])
            d = np.concatenate([p[1] for p in parts]) * np.float32(exact.SCALE)
            w = np.ascontiguousarray(a).T @ np.ascontiguousarray(d)
            self.model.g[f"fc{j}.w"][...] = w * np.float32(exact.GRID / M)
        self.opt.step(lr)


def batches(spec, sizes, seed=5):
    """A list of (x, y) global batches of the given sizes: random images, labels."""
    rng = np.random.default_rng(seed)
    return [(normal(rng, (M,) + spec.input_shape), rng.integers(0, spec.classes, M)) for M in sizes]


def run_reference(spec, data, m, lr=0.05, P=1, gather=True):
    """The reference on P simulated ranks: each rank's micro-batches one at a time, the ranks'
    sums added in reverse rank order."""
    ref = OneAtATime(spec, seed=1, gather=gather)
    losses = []
    for x, y in data:
        M = len(y)
        parts = [ref.compute(x[lo:hi], y[lo:hi], m, M) for lo, hi in (micro_bounds(M, m, r, P) for r in range(P))]
        total = sum((p[0] for p in parts[::-1]), np.zeros_like(parts[0][0]))
        losses.append((exact.from_fixed(sum(p[1] for p in parts)), sum(p[2] for p in parts)))
        factors = {j: [f for p in parts for f in p[3].get(j, [])] for j in ref.factored(M)}
        ref.update(total, M, lr, factors)
    return ref.model.params, ref.opt.velocity, losses


class SimRank(SerialComm):
    """Rank `rank` of `size` simulated in one process: the test does the collectives itself."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def run_stacked(spec, data, m, P, lr=0.05, stack=None, gather=True):
    """TrainStep (the stacked pass) on P simulated ranks: the buffers added as the allreduce would
    (in reverse rank order), each rank updating from the sum. Returns every rank's (params,
    velocity) and the reported (loss_sum, correct) per step. stack: micro-batches per pass."""
    steps = [TrainStep(spec, SimRank(r, P), micro_batch=m, seed=1, weight_decay=5e-4, gather=gather)
             for r in range(P)]
    for s in steps:
        s.stack = stack or s.stack
    losses = []
    for x, y in data:
        M = len(y)
        for r, s in enumerate(steps):
            lo, hi = micro_bounds(M, m, r, P)
            s.compute(x[lo:hi], y[lo:hi], M)
        total = sum((s.buf.array for s in steps[::-1]), np.zeros_like(steps[0].buf.array))
        for s in steps:
            s.buf.array[:] = total
            if s.plan(M) is not None:                               # what the allgather gives
                s.plan(M).recv[:] = np.stack([t.plan(M).send for t in steps])
            s.update(M, lr)
        losses.append((steps[0].buf.loss_sum, steps[0].buf.correct))
    return [(s.model.params, s.opt.velocity) for s in steps], losses


# (global batch sizes step by step, micro-batch, micro-batches per stacked pass): the default
# 64 / 16; batches that are not a multiple of m, as --keep-last leaves at the end of an epoch
# (28 = 8 + 8 + 8 + 4, 13 = 8 + 5); a global batch with fewer micro-batches than ranks (20 =
# 16 + 4: on 3 ranks one has none); more micro-batches on a rank than one pass stacks (passes
# of 3 + 3 + 2 on one rank, 3 + 1 on two)
STEP_CASES = [([64, 64, 64], 16, None), ([28, 28, 13], 8, None), ([20, 20], 16, None), ([64, 60], 8, 3)]
# and by which sums: fc1's weight gradient from gathered factors up to a global batch of 110, then
# a grid sum (111); fc2's too at 9 or fewer samples (8, 9)
GATHER_CASES = [([110, 111, 64], 16, None), ([8, 9], 4, None)]


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("sizes,m,stack", STEP_CASES + GATHER_CASES)
def test_stacked_step_gives_the_bits_of_one_micro_batch_at_a_time_on_1_2_3_ranks(sizes, m, stack, gather):
    spec = ModelSpec()
    data = batches(spec, sizes)
    params, velocity, losses = run_reference(spec, data, m, gather=gather)
    for P in (1, 2, 3):
        ranks, reported = run_stacked(spec, data, m, P, stack=stack, gather=gather)
        for p, v in ranks:
            assert same(p, params) and same(v, velocity), f"P = {P}"
        assert reported == losses, f"P = {P}"
    # and the reference itself gives the same bits on 3 ranks: the sum does not depend on grouping
    assert same(run_reference(spec, data, m, P=3, gather=gather)[0], params)


@pytest.mark.parametrize("gather", [True, False])
def test_a_rank_without_micro_batches_contributes_nothing_and_reports_no_overflow(gather):
    step = TrainStep(ModelSpec(), SimRank(2, 3), micro_batch=16, seed=1, gather=gather)
    step.buf.array[:] = 3.0                                       # left over from an earlier step
    if gather:
        step.plan(20).send[:] = 3.0
    step.compute(np.zeros((0, 28, 28, 1), np.float32), np.zeros(0, np.int64), 20, stop=True)
    k = step.model.dense_offset
    # what this rank sends: the Allreduce's part, and with gather the allgather's block
    assert not step.buf.grads[:k if gather else None].any()
    assert step.buf.loss_sum == 0 and step.buf.correct == 0
    if gather:
        assert step.plan(20).counts == [16, 4, 0] and not step.plan(20).partials.any()
    assert step.buf.stop and not step.buf.overflow


def test_step_is_the_mean_gradient():
    """Close to one float32 pass over the whole batch (denom = M): the mean, not the sum."""
    rng = np.random.default_rng(3)
    x, y = normal(rng, (24, 28, 28, 1)), rng.integers(0, 10, 24)
    step = TrainStep(ModelSpec(), SerialComm(), micro_batch=8, seed=1, momentum=0.0)
    before = step.model.params.copy()
    step(x, y, 24, lr=1.0)
    ref = CNN(seed=1)
    ref.loss_and_grad(x, y)                                          # the mean, in float32
    g = before - step.model.params                                   # lr = 1, no momentum: the gradient
    assert np.abs(g - ref.grads).max() <= 1e-5 * np.abs(ref.grads).max()


def test_an_overflowing_gradient_is_a_divergence_not_a_wrapped_sum():
    step = TrainStep(ModelSpec(), SerialComm(), micro_batch=4, seed=0)
    x = np.full((8, 28, 28, 1), 1e6, np.float32)                     # finite, but gradients far out of range
    y = np.arange(8) % 10
    before = step.model.params.copy()
    step.compute(x, y, 8)
    assert step.buf.overflow and not step.buf.grads.any()
    with pytest.raises(Diverged, match="not finite, or too large to sum exactly"):
        step.update(8, 0.1)
    assert np.array_equal(step.model.params, before)                 # nothing applied
    x[:] = 0
    x[5, 3, 3] = np.nan                                              # one sample of the second micro-batch
    step.compute(x, y, 8)
    assert step.buf.overflow


def test_the_float_path_is_one_pass_and_the_plain_mean():
    """--no-exact: TrainStep(exact=False) applies the mean float32 gradient of one pass."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 12)
    step = TrainStep(ModelSpec(), SerialComm(), seed=2, momentum=0.0, exact=False)
    ref = CNN(seed=2)
    before = step.model.params.copy()
    r = step(x, y, 12, lr=0.1)
    ref.loss_and_grad(x, y, denom=1)                             # one float32 pass, the sum
    want = before - np.float32(0.1) * (ref.grads * np.float32(1 / 12))
    assert same(step.model.params, want)
    assert step.buf.array.dtype == np.float32 and r.samples == 12 and 0 <= r.correct <= 12


# ----------------------------------------------------------------------------
# under MPI: 2 or 3 real ranks, the real allreduce


@pytest.fixture(scope="module")
def comm():
    from dpcnn.comm import MPIComm
    return MPIComm()


@pytest.mark.mpi
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("sizes,m,stack", STEP_CASES + GATHER_CASES)
def test_stacked_step_under_mpi_gives_the_bits_of_one_rank(comm, sizes, m, stack, gather):
    """Each rank steps on its micro-batches (uneven: 28 on 3 ranks is 8+8 / 8 / 4; 20 on 3 ranks
    leaves one rank without any); the parameters, momentum and reported sums equal one process
    stepping through all of them one at a time (the reference), on every rank."""
    spec = ModelSpec()
    data = batches(spec, sizes)
    params, velocity, losses = run_reference(spec, data, m, gather=gather)
    step = TrainStep(spec, comm, micro_batch=m, seed=1, weight_decay=5e-4, gather=gather)
    step.stack = stack or step.stack
    reported = []
    for x, y in data:
        lo, hi = micro_bounds(len(y), m, comm.rank, comm.size)
        r = step(x[lo:hi], y[lo:hi], len(y), 0.05)
        reported.append((r.loss_sum, r.correct))
    assert same(step.model.params, params) and same(step.opt.velocity, velocity) and reported == losses
    assert comm.allgather_obj(step.model.params.tobytes()) == [step.model.params.tobytes()] * comm.size


def test_which_dense_layers_gather_depends_on_the_batch_and_model_only():
    """fc1 (784 x 128) gathers while its factors, M rows of 784 + 128, are no more values than
    its weights (M <= 110); fc2 (128 x 10) at M <= 9; the same on any rank count."""
    for P in (1, 2, 5):
        step = TrainStep(ModelSpec(), SimRank(0, P), micro_batch=4)
        assert step.plan(110).layers == (1,) and step.plan(111) is None
        assert step.plan(9).layers == (1, 2) and step.plan(10).layers == (1,)
        assert sum(step.plan(64).counts) == 64
    assert TrainStep(ModelSpec(), SerialComm(), gather=False).plan(64) is None
    assert TrainStep(ModelSpec(), SerialComm(), exact=False).plan(64) is None


def test_a_gathering_step_refuses_a_share_other_than_micro_bounds():
    """The gathered rows are read back by micro_bounds' counts: another split would silently give
    a wrong product, so it is refused before any collective."""
    rng = np.random.default_rng(0)
    x, y = normal(rng, (32, 28, 28, 1)), rng.integers(0, 10, 32)
    step = TrainStep(ModelSpec(), SimRank(1, 3), micro_batch=16, seed=1)     # micro_bounds: 16, 16, 0
    with pytest.raises(ValueError, match="rank 1 got 0 samples of a global batch of 32"):
        step.compute(x[:0], y[:0], 32)
    step.compute(x[16:], y[16:], 32)


def test_a_huge_but_finite_gathered_gradient_is_a_divergence_as_on_the_grid():
    """fc1's product is held to the range the grid sums keep to: the step that the grid path
    refuses (a gradient out of range, still finite in float32) is refused too, nothing applied."""
    rng = np.random.default_rng(0)
    x, y = normal(rng, (64, 28, 28, 1)), rng.integers(0, 10, 64)
    for gather in (False, True):
        step = TrainStep(ModelSpec(), SerialComm(), micro_batch=16, seed=1, gather=gather)
        step.model.p["conv2.b"][:] = 1e7                  # huge inputs to fc1, small weights: a finite
        step.model.p["fc1.w"][:] *= np.float32(1e-7)      # loss, a weight gradient far out of range
        before = step.model.params.copy()
        with pytest.raises(Diverged, match="too large to sum exactly"):
            step(x, y, 64, 0.05)
        assert same(step.model.params, before), gather
