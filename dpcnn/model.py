"""The CNN: a small spec, flat parameter and gradient vectors, forward and backward.

The default spec is the model dpcnn trains on MNIST::

    conv 3x3x8 (same) - ReLU - maxpool 2 - conv 3x3x16 (same) - ReLU - maxpool 2
    - dense 784->128 - ReLU - dense 128->10           (103,018 parameters)

Every parameter lives in one contiguous vector ``model.params`` and every gradient
in ``model.grads``; ``model.p[name]`` and ``model.g[name]`` are shaped views into
them. The optimizer works on the two flat vectors, and the distributed step reduces
``model.grads`` in one call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import layers as L

# Forward passes without training go in batches of this size: small batches keep the
# temporaries in cache (5,000 MNIST test images: 0.15 s at 64, 0.27 s at 1000, one thread).
EVAL_BATCH = 64

# How CNN.init draws the parameters (see there).
INITS = ("he", "torch", "glorot")


@dataclass(frozen=True)
class ModelSpec:
    """What the network looks like. ``ModelSpec()`` is the default model.

    input_shape: (H, W, C) of one image; channels: filters of each conv block
    (conv - ReLU - maxpool 2); kernel: conv kernel size; padding: 'same' or
    'valid'; hidden: widths of the dense ReLU layers; classes: outputs.
    """

    input_shape: tuple[int, int, int] = (28, 28, 1)
    channels: tuple[int, ...] = (8, 16)
    kernel: int = 3
    padding: str = "same"
    hidden: tuple[int, ...] = (128,)
    classes: int = 10

    def __post_init__(self):
        for f in ("input_shape", "channels", "hidden"):   # JSON gives lists; keep it hashable
            object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))
        L.pad_amounts(self.kernel, self.padding)           # validates padding
        if self.kernel < 1 or self.classes < 2 or min(self.channels + self.hidden, default=1) < 1:
            raise ValueError(f"invalid model spec: {self}")
        self.param_shapes()                                # validates that the sizes fit

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(**d)

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """[(name, shape)] in the order they sit in the flat vector."""
        H, W, C = self.input_shape
        k = self.kernel
        shapes = []
        for i, F in enumerate(self.channels, 1):
            shapes += [(f"conv{i}.w", (k, k, C, F)), (f"conv{i}.b", (F,))]
            if self.padding == "valid":
                H, W = H - k + 1, W - k + 1
            H, W, C = H // 2, W // 2, F
            if H < 1 or W < 1:
                raise ValueError(f"input {self.input_shape} is too small for {len(self.channels)} conv blocks")
        D = H * W * C
        for i, F in enumerate(self.hidden + (self.classes,), 1):
            shapes += [(f"fc{i}.w", (D, F)), (f"fc{i}.b", (F,))]
            D = F
        return shapes

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.param_shapes())


class CNN:
    """The network with its flat parameters. Not thread-safe: forward keeps caches for backward.

    forward: x (N, H, W, C) -> logits (N, classes); backward: dlogits -> fills ``grads``.
    Both also take a stack of G micro-batches, x (G, N, H, W, C) -> logits (G, N, classes),
    computed in one pass with the bits of G separate passes (see dpcnn.layers); the gradients
    then go to a (G, num_params) array, one row per micro-batch.
    """

    def __init__(self, spec: ModelSpec | None = None, seed: int = 0, dtype=np.float32,
                 grads: np.ndarray | None = None, init: str = "he"):
        """grads: optionally, the flat gradient vector to use, e.g. a view into a larger
        communication buffer (num_params,) of this dtype; init: one of INITS (see ``init``)."""
        self.spec = spec or ModelSpec()
        self.dtype = np.dtype(dtype)
        self.shapes = self.spec.param_shapes()
        n = self.spec.num_params
        self.params = np.zeros(n, dtype=self.dtype)
        if grads is None:
            grads = np.zeros(n, dtype=self.dtype)
        elif grads.shape != (n,) or grads.dtype != self.dtype or not grads.flags.c_contiguous:
            raise ValueError(f"grads must be a contiguous ({n},) {self.dtype} vector")
        self.grads = grads
        self.p, self.g = self.unflatten(self.params), self.unflatten(self.grads)
        self._caches: list | None = None
        self.factors: dict[int, tuple[np.ndarray, np.ndarray]] = {}     # see backward's factored
        self.init(seed, init)

    def unflatten(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        """A flat vector (num_params,) -> {layer name: shaped view into it}; rows (G, num_params)
        -> {layer name: (G, *shape) views}, one per row."""
        out, o = {}, 0
        lead = vec.shape[:-1]
        for name, shape in self.shapes:
            size = math.prod(shape)
            out[name] = vec[..., o:o + size].reshape(lead + shape)     # splits the last axis: a view
            o += size
        return out

    def init(self, seed: int, scheme: str = "he") -> None:
        """Draw every parameter from one seeded Generator, layer by layer, by `scheme`:

        'he': He-normal weights (std sqrt(2 / fan_in)), zero biases;
        'torch': PyTorch's default for Conv2d and Linear: weights and biases uniform in
        [-1/sqrt(fan_in), 1/sqrt(fan_in)] (kaiming_uniform_ with a = sqrt(5) for the weights);
        'glorot': Glorot-uniform weights (bound sqrt(6 / (fan_in + fan_out))), zero biases (Keras).

        A conv weight (k, k, C, F) has fan_in k*k*C and fan_out k*k*F; a dense one (D, F) D and F.
        Draws in float64 and rounds to the model dtype, so the same seed gives bit-identical
        parameters in any dtype's own precision.
        """
        if scheme not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {scheme!r}")
        rng = np.random.default_rng(seed)
        fan_in = 1
        for name, shape in self.shapes:              # each layer's weight comes before its bias
            p = self.p[name]
            if name.endswith(".w"):
                fan_in, fan_out = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
                if scheme == "he":
                    p[...] = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
                elif scheme == "torch":
                    p[...] = rng.uniform(-1, 1, shape) / math.sqrt(fan_in)
                else:
                    p[...] = rng.uniform(-1, 1, shape) * math.sqrt(6.0 / (fan_in + fan_out))
            elif scheme == "torch":
                p[...] = rng.uniform(-1, 1, shape) / math.sqrt(fan_in)
            else:
                p[...] = 0

    # -- forward / backward ---------------------------------------------------

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        """x: (N, H, W, C) -> logits: (N, classes), or a stack x: (G, N, H, W, C) -> logits
        (G, N, classes). train=True keeps what backward needs."""
        x = np.asarray(x, dtype=self.dtype)
        if x.ndim == 4:
            return self.forward(x[None], train)[0]
        s, p = self.spec, self.p
        x = x.transpose(0, 2, 3, 1, 4)                                  # (G, H, W, N, C): see dpcnn.layers
        caches: list = []
        for i in range(1, len(s.channels) + 1):
            # conv - ReLU - pool, computed as conv - pool - ReLU: max-pooling commutes with
            # ReLU, which then runs on a quarter of the values
            x, c_conv = L.conv_forward(x, p[f"conv{i}.w"], p[f"conv{i}.b"], s.padding)
            x, c_pool = L.maxpool_forward(x)
            x, c_relu = L.relu_forward(x)
            caches.append((c_conv, c_pool, c_relu))
        x, c_flat = L.flatten_forward(x)
        caches.append(c_flat)
        n_fc = len(s.hidden) + 1
        for i in range(1, n_fc + 1):
            x, c_fc = L.dense_forward(x, p[f"fc{i}.w"], p[f"fc{i}.b"])
            c_relu = None
            if i < n_fc:
                x, c_relu = L.relu_forward(x)
            caches.append((c_fc, c_relu))
        self._caches = caches if train else None
        return x

    def backward(self, dlogits: np.ndarray, grads: np.ndarray | None = None,
                 dense_done: Callable[[], None] | None = None, poll: Callable[[], None] | None = None,
                 factored: tuple[int, ...] = ()) -> None:
        """dlogits: (N, classes) -> writes every parameter gradient into ``self.grads``; or
        dlogits (G, N, classes) of a stacked forward -> row g of grads (G, num_params) gets
        micro-batch g's gradient.

        factored: dense layers (1 = fc1) whose weight gradient is not computed (its entries of
        grads are left as they were); ``self.factors[i]`` then holds the two factors of that
        gradient, the layer's input (G, N, D) and the gradient at its output (G, N, F), whose
        product summed over samples (x^T @ dout) is the weight gradient.

        Hooks for overlapping communication with the rest of the pass: dense_done() is called
        once the dense layers' gradients (the tail of the vector, from ``dense_offset``) are
        final, poll() after each step of the convolution blocks' backward."""
        if self._caches is None:
            raise RuntimeError("backward() needs a forward(x, train=True) first")
        if dlogits.ndim == 2:
            dlogits, grads = dlogits[None], self.grads[None]
        elif grads is None or grads.shape != (len(dlogits), self.spec.num_params) or grads.dtype != self.dtype:
            raise ValueError(f"a stacked backward needs grads of shape ({len(dlogits)}, {self.spec.num_params})")
        s, g = self.spec, self.unflatten(grads)
        caches, self.factors = self._caches, {}
        n_conv, n_fc = len(s.channels), len(s.hidden) + 1
        d = dlogits
        for i in range(n_fc, 0, -1):
            c_fc, c_relu = caches[n_conv + i]
            if c_relu is not None:
                d = L.relu_backward(d, c_relu)
            if i in factored:
                self.factors[i] = (c_fc[0], d)
            d, _, _ = L.dense_backward(d, c_fc, out=(g[f"fc{i}.w"], g[f"fc{i}.b"]), need_dw=i not in factored)
        if dense_done is not None:
            dense_done()
        poll = poll or _nothing
        d = L.flatten_backward(d, caches[n_conv])
        for i in range(n_conv, 0, -1):
            c_conv, c_pool, c_relu = caches[i - 1]
            d = L.relu_backward(d, c_relu)
            d = L.maxpool_backward(d, c_pool)
            poll()
            d, g[f"conv{i}.w"][...], g[f"conv{i}.b"][...] = L.conv_backward(d, c_conv, need_dx=i > 1)
            poll()
        self._caches = None

    @property
    def dense_offset(self) -> int:
        """Where the dense layers' parameters start in the flat vectors (they run to the end)."""
        o = 0
        for name, shape in self.shapes:
            if name.startswith("fc"):
                return o
            o += math.prod(shape)
        return o

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray, denom: float | None = None,
                      grads: np.ndarray | None = None, dense_done: Callable[[], None] | None = None,
                      poll: Callable[[], None] | None = None, factored: tuple[int, ...] = ()):
        """One forward and backward pass on a batch, or on a stack of micro-batches.

        x: (N, H, W, C), y: (N,) -> (loss, correct): the loss summed over the batch
        and divided by denom (default N, the mean), and the number of correct
        predictions. ``grads`` then holds the gradient of that loss.

        x: (G, N, H, W, C), y: (G, N), grads: (G, num_params) -> (loss (G,) float64, correct
        (G,) int64), per micro-batch, and row g of grads holds micro-batch g's gradient: the
        same bits as G separate calls. dense_done, poll, factored: see ``backward``.
        """
        if x.ndim == 4:
            if len(x) == 0:                      # a rank with no samples in this batch
                self.grads[...] = 0
                return 0.0, 0
            loss, correct = self.loss_and_grad(x[None], y[None], denom, self.grads[None], dense_done, poll, factored)
            return float(loss[0]), int(correct[0])
        logits = self.forward(x, train=True)
        loss, dlogits = L.softmax_cross_entropy(logits, y, denom)
        self.backward(dlogits, grads, dense_done, poll, factored)
        return loss, (logits.argmax(axis=-1) == y).sum(axis=-1)

    def predict_logits(self, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
        """x: (N, H, W, C) -> logits (N, classes), in batches to bound memory."""
        out = [self.forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.spec.classes), self.dtype)


def _nothing() -> None:
    pass
