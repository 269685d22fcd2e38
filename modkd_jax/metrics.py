"""Continual-learning metrics on an accuracy matrix (numpy in, numpy/float out, host side).

Convention: ``R[i, j]`` = accuracy on task j's test set after training task i.
R is T x T with all entries filled, including j > i (forward-transfer
information); rows not yet evaluated may be NaN (NaN then propagates).
These are the project's single definitions:

- ``average_accuracy(R, i=None)``: mean of R[i, :i+1] (default i = last row),
  the accuracy over the tasks seen so far.
- ``forgetting(R)``: per task j < T-1, max_{i in [j, T-2]} R[i, j] - R[T-1, j]
  (max previous accuracy minus final accuracy), averaged over all but the last
  task; ``forgetting_per_task(R)`` returns the vector. T == 1 -> 0.0.
- ``backward_transfer(R)``: BWT = mean_{j < T-1} (R[T-1, j] - R[j, j]).
- ``forward_transfer(R, baseline)``: FWT = mean_{j >= 1} (R[j-1, j] - baseline[j]),
  where baseline[j] is the accuracy of a randomly-initialised model on task j
  (required; chance level is not assumed).
- ``accuracy(pred, labels)``: fraction of correct predictions.

Example:
    >>> import numpy as np
    >>> from modkd_jax import metrics
    >>> R = np.array([[0.9, 0.1], [0.7, 0.95]])
    >>> round(metrics.average_accuracy(R), 3), round(metrics.forgetting(R), 3)
    (0.825, 0.2)
    >>> round(metrics.backward_transfer(R), 3)
    -0.2
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def _check_matrix(R: ArrayLike) -> np.ndarray:
    """Return R as a float64 array, raising ValueError unless it is a square 2-D matrix."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(
            f"The accuracy matrix must be a non-empty square 2-D array (T x T), got shape {R.shape}."
        )
    return R


def accuracy(pred: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predicted labels equal to the true labels.

    Args:
      pred: predicted labels, non-empty.
      labels: true labels, the shape of ``pred``.
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape or pred.size == 0:
        raise ValueError(
            f"pred and labels must be non-empty with the same shape, got {pred.shape} and {labels.shape}."
        )
    return float(np.mean(pred == labels))


def average_accuracy(R: ArrayLike, i: int | None = None) -> float:
    """Mean accuracy over tasks 0..i after training task i (default: last row).

    Args:
      R: the ``[T, T]`` accuracy matrix.
      i: the row (negative counts from the end); None: the last.
    """
    R = _check_matrix(R)
    T = R.shape[0]
    i = T - 1 if i is None else i
    if not -T <= i < T:
        raise IndexError(f"Row index i={i} is out of range for a {T}-task accuracy matrix.")
    i %= T
    return float(np.mean(R[i, : i + 1]))


def forgetting_per_task(R: ArrayLike) -> np.ndarray:
    """Per-task forgetting max_{i in [j, T-2]} R[i, j] - R[T-1, j] for each j < T-1."""
    R = _check_matrix(R)
    T = R.shape[0]
    return np.array([np.max(R[j : T - 1, j]) - R[T - 1, j] for j in range(T - 1)], dtype=np.float64)


def forgetting(R: ArrayLike) -> float:
    """Average forgetting over all but the last task (0.0 when T == 1)."""
    per_task = forgetting_per_task(R)
    return float(np.mean(per_task)) if per_task.size else 0.0


def backward_transfer(R: ArrayLike) -> float:
    """BWT = mean_{j < T-1} (R[T-1, j] - R[j, j]); negative means forgetting (0.0 when T == 1)."""
    R = _check_matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    j = np.arange(T - 1)
    return float(np.mean(R[T - 1, j] - R[j, j]))


def forward_transfer(R: ArrayLike, baseline: ArrayLike) -> float:
    """FWT = mean_{j >= 1} (R[j-1, j] - baseline[j]), baseline = random-init accuracy per task (0.0 when T == 1).

    Args:
      R: the ``[T, T]`` accuracy matrix.
      baseline: ``[T]``: a randomly-initialised model's accuracy on each task (chance level is not assumed).
    """
    R = _check_matrix(R)
    T = R.shape[0]
    baseline = np.asarray(baseline, dtype=np.float64)
    if baseline.shape != (T,):
        raise ValueError(f"baseline must have shape ({T},), one accuracy per task, got {baseline.shape}.")
    if T == 1:
        return 0.0
    j = np.arange(1, T)
    return float(np.mean(R[j - 1, j] - baseline[j]))


def summarize(R: ArrayLike) -> dict[str, Any]:
    """JSON-serialisable summary: average_accuracy, forgetting, bwt and final_row."""
    R = _check_matrix(R)
    return {
        "average_accuracy": average_accuracy(R),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
        "final_row": [float(x) for x in R[-1]],
    }


def welch(a: ArrayLike, b: ArrayLike) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value of mean(a) - mean(b) over seeds (unequal variances).

    NaN when undefined (fewer than two values on a side, or no variance on either), never "significant".

    Args:
      a: one value per seed of the first method.
      b: one value per seed of the second.
    """
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return float("nan"), float("nan")
    res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)
