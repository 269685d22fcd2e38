"""The float64 NumPy fit of class-conditional Gaussians that ``modkd_jax.gaussians.fit`` replaced (host, per task).

Kept as the reference the device fit is tested and timed against
(``tests/test_task_inference.py``, ``benchmarks/gaussian_fit.py``): k-means per
class, then per covariance the top ``rank`` eigenpairs of its scatter by LAPACK
(``scipy.linalg.eigh(subset_by_index, driver="evr")``). Same keys, shapes and
dtypes as ``gaussians.fit``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from modkd_jax.gaussians import COVARIANCES, VARIANCE_FLOOR, components_for, rank_for


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """Cluster of every row of ``x`` (Euclidean k-means from ``k`` distinct random rows)."""
    k = min(k, len(x))
    centers = x[rng.choice(len(x), k, replace=False)]
    assign = np.zeros(len(x), np.int64)
    for _ in range(iters):
        d2 = (x * x).sum(1)[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None]
        assign = np.argmin(d2, axis=1)
        for j in range(k):
            if np.any(assign == j):
                centers[j] = x[assign == j].mean(0)
    return assign


def _top_eigen(xc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (descending) and unit eigenvectors ``(d, k)`` of the scatter ``xc^T xc``.

    From the smaller of the ``d x d`` scatter and the ``n x n`` Gram matrix, and only the top ``k`` of
    them (LAPACK ``evr``): 8x faster than a full decomposition for 30 of 784.
    """
    n, d = xc.shape
    if min(n, d) == 0:
        return np.zeros(0), np.zeros((d, 0))
    small = xc.T @ xc if d <= n else xc @ xc.T
    m = small.shape[0]
    k = min(k, m)
    if k == m:
        vals, vecs = np.linalg.eigh(small)
    else:
        vals, vecs = scipy.linalg.eigh(small, subset_by_index=[m - k, m - 1], driver="evr")
    vals, vecs = vals[::-1].clip(min=0.0), vecs[:, ::-1]
    if d > n:  # Gram eigenvectors w give the scatter's as xc^T w / sqrt(val)
        keep = vals > 1e-12 * max(vals[0], 1e-300)
        vals, vecs = vals[keep], xc.T @ vecs[:, keep] / np.sqrt(vals[keep])
    return vals, vecs


def _factor(xc: np.ndarray, n: float, rank: int, shrinkage: float, floor: float
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """``(U (d, r), lam (r,), s2)`` of the shrunk covariance of centred rows ``xc`` (``n - 1`` in the denominator).

    No variance falls below ``floor`` (a cluster of a few points would otherwise claim zero volume).
    """
    d = xc.shape[1]
    denom = max(n - 1.0, 1.0)
    vals, vecs = _top_eigen(xc, rank)
    vals = vals / denom
    trace = float(np.sum(xc * xc)) / denom
    m = trace / d
    lam = (1 - shrinkage) * vals[:rank] + shrinkage * m
    if len(lam) < rank:  # more kept directions than data: pad with arbitrary orthonormal ones at the floor
        extra = rank - len(lam)
        q, _ = np.linalg.qr(np.concatenate([vecs[:, :len(lam)], np.eye(d)[:, :extra + len(lam)]], axis=1))
        vecs = q[:, :rank]
        lam = np.concatenate([lam, np.full(extra, shrinkage * m)])
    rest = max(trace - float(np.sum(vals[:rank])), 0.0) / (d - rank) if rank < d else 0.0
    s2 = (1 - shrinkage) * rest + shrinkage * m
    return vecs[:, :rank], np.maximum(lam, floor), max(s2, floor)


def fit_reference(x: np.ndarray, y: np.ndarray, classes: int, *, shrinkage: float = 0.2, rank: int = 0,
                  components: int = 1, covariance: str = "component", seed: int = 0) -> dict[str, np.ndarray]:
    """Gaussian statistics of ``classes`` classes from rows ``x`` ``(n, d)`` with labels ``y`` in ``[0, classes)``.

    Args:
      x: the task's data as vectors (pixels in [0, 1], or a frozen network's features).
      y: task-local labels.
      classes: classes of the task (a class without examples gets weight 0).
      shrinkage: ``a`` of ``modkd_jax.gaussians``' docstring, in [0, 1].
      rank: eigenvectors kept per covariance (0: all, the full covariance).
      components: Gaussians per class (k-means clusters; 0: ``components_for``'s default).
      covariance: "component" (one each) or "task" (one pooled covariance).
      seed: k-means initialisation (NumPy).

    Returns:
      float32 NumPy arrays with ``gaussians.fit``'s keys and shapes.
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"unknown covariance {covariance!r}; expected one of {COVARIANCES}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"need 0 <= shrinkage <= 1, got {shrinkage}")
    components = components_for(classes, components)
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y)
    n, d = x.shape
    r = rank_for(d, rank)
    rng = np.random.default_rng(seed)
    g_of = np.zeros(n, np.int64)
    for c in range(classes):
        rows = np.flatnonzero(y == c)
        if len(rows):
            g_of[rows] = c * components + (_kmeans(x[rows], components, rng) if components > 1 else 0)
    G = classes * components
    counts = np.bincount(g_of, minlength=G).astype(np.float64)
    means = np.stack([x[g_of == g].mean(0) if counts[g] else np.zeros(d) for g in range(G)])
    centred = x - means[g_of]
    groups = [np.arange(n)] if covariance == "task" else [np.flatnonzero(g_of == g) for g in range(G)]
    floor = max(VARIANCE_FLOOR * float(np.mean(x.var(0))) if n else 0.0, 1e-12)
    basis, inv_lam, inv_s2, logdet = [], [], [], []
    for rows in groups:
        # a pooled covariance divides by n - G (the components' means were estimated)
        dof = len(rows) - (G - 1) if covariance == "task" else len(rows)
        if len(rows) == 0:
            u, lam, s2 = np.eye(d)[:, :r], np.ones(r), 1.0
        else:
            u, lam, s2 = _factor(centred[rows], dof, r, shrinkage, floor)
        basis.append(u)
        inv_lam.append(1.0 / lam)
        inv_s2.append(0.0 if r == d else 1.0 / s2)
        logdet.append(float(np.sum(np.log(lam)) + (d - r) * math.log(s2)))
    with np.errstate(divide="ignore"):
        log_weight = np.log(counts / max(n, 1))
    return {"mean": means.astype(np.float32), "basis": np.stack(basis).astype(np.float32),
            "inv_lam": np.stack(inv_lam).astype(np.float32), "inv_s2": np.asarray(inv_s2, np.float32),
            "logdet": np.asarray(logdet, np.float32), "log_weight": log_weight.astype(np.float32),
            "cov": (np.zeros(G) if covariance == "task" else np.arange(G)).astype(np.int32),
            "label": (np.arange(G) // components).astype(np.int32)}
