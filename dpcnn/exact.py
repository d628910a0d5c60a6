"""Exact, order-independent sums of floats: values on a fixed grid of 2**-32.

Floating-point addition is not associative, so a sum of per-rank partial sums depends on how
the terms were grouped, that is on the number of ranks. It becomes exact, and so independent
of the order, when every term is a multiple of GRID = 2**-32 and every partial sum stays below
RANGE = 2**21 in magnitude: such numbers need at most 21 + 32 = 53 significant bits, which a
float64 holds exactly, so no addition ever rounds, whichever rank adds what and in whatever
order MPI's Allreduce(SUM) combines them.

* Vectors (micro-batches' summed gradients): the training step computes them in units of GRID
  (the loss scaled by 2**32, ``SCALE``: a power of two, so every float32 operation of the
  backward pass gives the significand it gives unscaled, barring underflow to subnormal numbers,
  which the scaling only makes rarer), one float32 row per micro-batch, and
  ``add_rows`` rounds each element to an integer (``np.rint``: ties to even, a function of the
  element alone) and adds the rows in float64: integers below 2**53 add exactly, in any
  order. Two vectorised passes over the rows.
* Scalars (loss sums, evaluation totals): ``to_fixed`` gives Python integers in units of
  GRID, whose sums are exact at any size.

What the grid drops: 2**-32 = 2.3e-10 absolute on a summed gradient element. A summed
gradient element of this model is at most a few hundred (258 measured over 64 MNIST
samples), so float32's 24-bit mantissa is kept for every element above 2**-9, and what is
lost below is far under the float32 resolution of the weights it updates. ``limit(n)`` is the
largest norm a term may have so that n of them cannot leave the exact range; a term over
it, or not finite, is reported (the caller stops with a divergence error), never rounded.

This is the simplest form of reproducible summation (Demmel and Nguyen, "Fast reproducible
floating-point summation", ARITH 2013; ReproBLAS), sufficient for these magnitudes.
"""

from __future__ import annotations

import numpy as np

FRAC_BITS = 32
GRID = 2.0**-FRAC_BITS
SCALE = 2.0**FRAC_BITS           # a value times SCALE is that value in units of GRID
RANGE = 2.0**21                  # 53 significant bits: float64's mantissa


def limit(n_terms: int) -> float:
    """The largest norm a term (a micro-batch's summed gradient) may have so that no partial sum
    of n_terms of them leaves the exact range; the factor 2 covers the float32 rounding of the
    computed norm itself (a relative error below n * 2**-24 for n elements: 0.6% for this model)."""
    return RANGE / (2 * max(n_terms, 1))


def add_rows(rows: np.ndarray, acc: np.ndarray, bound: float, overwrite: bool = False) -> bool:
    """acc (n,) float64 += the rows (G >= 1, n) float32 (or float64), values in units of GRID,
    each element rounded to an integer: the exact sum on the grid, in units of GRID (with
    overwrite, acc = that sum).

    Rounds rows in place. Returns False, leaving acc unchanged, when a row is not finite or its
    Euclidean norm exceeds bound / GRID (the norm bounds every element; one BLAS dot product a
    row checks both); with bound <= limit(n) for the n rows that will ever be summed together
    (over all ranks), every partial sum of every element is an integer below 2**53.
    """
    sq = np.matmul(rows[:, None, :], rows[:, :, None])              # (G, 1, 1): inf or nan when a row is
    if not np.all(sq <= (bound * SCALE) ** 2):
        return False
    np.rint(rows, out=rows)
    if overwrite:
        np.copyto(acc, rows[0])
    for row in rows[1:] if overwrite else rows:     # 20% faster than np.add.reduce(rows, axis=0, dtype=float64)
        np.add(acc, row, out=acc)
    return True


def to_fixed(x: float) -> int:
    """A float as an integer number of GRIDs, rounded to nearest (ValueError when not finite)."""
    return round(x * 2**FRAC_BITS)


def from_fixed(n: int) -> float:
    return n * GRID
