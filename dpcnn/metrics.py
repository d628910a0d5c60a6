"""Evaluation: loss, accuracy, per-class accuracy and the confusion matrix, in batches.

The totals are sums (not means) so that partial results from several ranks add up
exactly before one division: ``Totals.as_array`` packs them into one vector for an
allreduce, and ``Totals.from_array`` unpacks the sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .layers import softmax_cross_entropy
from .model import EVAL_BATCH


@dataclass
class Totals:
    """Summed evaluation results over some samples.

    loss_sum: summed cross-entropy; confusion: (K, K) int64 counts, row = true
    class, column = predicted class.
    """

    num_classes: int
    loss_sum: float = 0.0
    confusion: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.confusion is None:
            self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, logits: np.ndarray, y: np.ndarray) -> None:
        """logits: (N, K), y: (N,) -> accumulate loss and confusion counts."""
        if len(y) == 0:
            return
        loss, _ = softmax_cross_entropy(logits.astype(np.float64), y, denom=1)
        self.loss_sum += loss
        K = self.num_classes
        pred = logits.argmax(axis=1)
        self.confusion += np.bincount(y * K + pred, minlength=K * K).reshape(K, K)

    def as_array(self) -> np.ndarray:
        """Everything in one float64 vector [loss_sum, confusion...], for one allreduce."""
        return np.concatenate([[self.loss_sum], self.confusion.ravel().astype(np.float64)])

    @classmethod
    def from_array(cls, a: np.ndarray, num_classes: int) -> "Totals":
        conf = np.rint(a[1:]).astype(np.int64).reshape(num_classes, num_classes)
        return cls(num_classes, float(a[0]), conf)

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
    """Run ``model`` over x: (N, H, W, C), y: (N,) in batches and return the Totals."""
    t = Totals(model.spec.classes)
    t.add(model.predict_logits(x, batch_size), y)
    return t
