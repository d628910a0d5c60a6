"""Evaluation: loss, accuracy, per-class accuracy and the confusion matrix, in batches.

The totals are sums (not means) so that partial results from several ranks add up
exactly before one division: the loss as an integer number of 2**-32 (``dpcnn.exact``), one
term per batch of ``EVAL_BATCH`` samples, and the confusion counts as integers. ``Totals.as_array`` packs
them into one int64 vector for an allreduce and ``Totals.from_array`` unpacks the sum, which
is the same whichever rank evaluated which batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import exact
from .data import micro_bounds
from .layers import softmax_cross_entropy
from .model import EVAL_BATCH

# A batch whose mean loss is above this counts as not finite (diverged): no model that learns gets
# there (guessing costs ln K), and it bounds every sum: N samples x 64 x 2^32 is below 2^63 for N < 2^25.
LOSS_MEAN_MAX = 64.0


@dataclass
class Totals:
    """Summed evaluation results over some samples.

    loss_fixed: summed cross-entropy in fixed point; nonfinite: batches whose loss was not
    finite (then ``loss`` is inf); confusion: (K, K) int64 counts, row = true class, column =
    predicted class.
    """

    num_classes: int
    loss_fixed: int = 0
    nonfinite: int = 0
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))

    def __post_init__(self):
        if self.confusion.size == 0:
            self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, logits: np.ndarray, y: np.ndarray) -> None:
        """logits: (N, K), y: (N,) -> accumulate loss (one fixed-point term) and confusion counts."""
        if len(y) == 0:
            return
        loss, _ = softmax_cross_entropy(logits.astype(np.float64), y, denom=1)
        if np.isfinite(loss) and loss <= LOSS_MEAN_MAX * len(y):       # per batch: the same on any rank count
            self.loss_fixed += exact.to_fixed(loss)
        else:
            self.nonfinite += 1
        K = self.num_classes
        pred = logits.argmax(axis=1)
        self.confusion += np.bincount(y * K + pred, minlength=K * K).reshape(K, K)

    def as_array(self) -> np.ndarray:
        """Everything in one int64 vector [loss_fixed, nonfinite, confusion...], for one allreduce
        (which cannot overflow: see LOSS_MEAN_MAX)."""
        return np.concatenate([[self.loss_fixed, self.nonfinite], self.confusion.ravel()]).astype(np.int64)

    @classmethod
    def from_array(cls, a: np.ndarray, num_classes: int) -> Totals:
        return cls(num_classes, int(a[0]), int(a[1]), a[2:].astype(np.int64).reshape(num_classes, num_classes))

    @property
    def loss_sum(self) -> float:
        """The summed loss; inf when some batch's loss was not finite (a diverged model)."""
        return float("inf") if self.nonfinite else exact.from_fixed(self.loss_fixed)

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion)) / max(self.count, 1)

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """(K,) accuracy of each true class (NaN for a class with no samples)."""
        n = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / n

    def summary(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "count": self.count,
                "per_class_accuracy": [None if np.isnan(a) else float(a) for a in self.per_class_accuracy],
                "confusion": self.confusion.tolist()}


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH) -> Totals:
    """Run ``model`` over x: (N, H, W, C), y: (N,) in batches of batch_size and return the Totals.

    Each batch is one term of the loss sum, so results add up exactly across ranks that
    evaluate whole batches of the same global split (``dpcnn.data.micro_bounds``)."""
    t = Totals(model.spec.classes)
    for i in range(0, len(x), batch_size):
        t.add(model.forward(x[i:i + batch_size]), y[i:i + batch_size])
    return t


class Evaluator:
    """The validation rows (held out of the training split) and the test split, each rank holding
    whole EVAL_BATCH batches of each: ``evaluator(model)`` evaluates this rank's and adds the totals
    up over the ranks (one allreduce each), the same on every rank and on any rank count."""

    def __init__(self, train_set, val_rows: np.ndarray, test_set, comm):
        self.comm = comm
        lo, hi = micro_bounds(len(val_rows), EVAL_BATCH, comm.rank, comm.size)
        mine = val_rows[lo:hi]
        self.xv, self.yv = train_set.standardise(train_set.rows(mine)), train_set.labels[mine].astype(np.int64)
        self.has_val = len(val_rows) > 0
        lo, hi = micro_bounds(test_set.n, EVAL_BATCH, comm.rank, comm.size)
        self.xt, self.yt = test_set.read(lo, hi)

    def _shared(self, model, x: np.ndarray, y: np.ndarray) -> Totals:
        a = evaluate(model, x, y).as_array()
        self.comm.allreduce(a)                                      # distributed: the totals of all ranks
        return Totals.from_array(a, model.spec.classes)

    def __call__(self, model) -> tuple[Totals | None, Totals]:
        """(validation Totals, or None without a validation split; test Totals) over all ranks."""
        with np.errstate(over="ignore", invalid="ignore"):
            val = self._shared(model, self.xv, self.yv) if self.has_val else None
            return val, self._shared(model, self.xt, self.yt)
