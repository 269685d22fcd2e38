"""Class-conditional Gaussian statistics: fitted once from one task's data, scored for a batch in one pass.

A task's statistics are ``G = classes * components`` Gaussians (``components``
clusters per class by k-means, one when 1) with means ``mu_g`` and
covariances kept as *shrunk, optionally low-rank* factors::

    Sigma = (1 - a) S + a (tr S / d) I          (a = shrinkage, S the sample covariance)
    Sigma ~ U diag(lam) U^T + s2 (I - U U^T)     (U: top ``rank`` eigenvectors, s2: mean of the rest)

so a Gaussian costs ``d * (rank + 1)`` floats instead of ``d * d`` (a 3072-dim
CIFAR covariance is 37 MB in full, 0.4 MB at rank 30). ``covariance="task"``
pools one covariance over the task's components. Fitting is float64 NumPy on
the host (once per task); scoring is ``log_likelihood`` under jit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

COVARIANCES = ("component", "task")
VARIANCE_FLOOR = 1e-2  # no variance below this share of the task's mean per-dimension variance
COMPONENTS_PER_TASK = 40  # components 0 ("auto"): this many Gaussians per task, shared among its classes


def rank_for(dim: int, rank: int) -> int:
    """The covariance rank kept for ``dim``-dimensional data: ``rank``, or the full ``dim`` for 0."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return dim if rank == 0 else min(rank, dim)


def components_for(classes: int, components: int) -> int:
    """Gaussians per class: ``components``, or (0) ``COMPONENTS_PER_TASK // classes`` (at least 1)."""
    if components < 0:
        raise ValueError(f"components must be >= 0, got {components}")
    return components or max(1, COMPONENTS_PER_TASK // classes)


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


def fit(x: np.ndarray, y: np.ndarray, classes: int, *, shrinkage: float = 0.2, rank: int = 0, components: int = 1,
        covariance: str = "component", seed: int = 0) -> dict[str, np.ndarray]:
    """Gaussian statistics of ``classes`` classes from rows ``x`` ``(n, d)`` with labels ``y`` in ``[0, classes)``.

    Args:
      x: the task's data as vectors (pixels in [0, 1], or a frozen network's features).
      y: task-local labels.
      classes: classes of the task (a class without examples gets weight 0).
      shrinkage: ``a`` of the module docstring, in [0, 1].
      rank: eigenvectors kept per covariance (0: all, the full covariance).
      components: Gaussians per class (k-means clusters; 0: ``components_for``'s default).
      covariance: "component" (one each) or "task" (one pooled covariance).
      seed: k-means initialisation.

    Returns:
      float32 arrays: ``mean (G, d)``, ``basis (S, d, r)``, ``inv_lam (S, r)``, ``inv_s2 (S,)``,
      ``logdet (S,)``, ``log_weight (G,)`` (log share of the task's examples; -inf if empty) and
      int32 ``cov (G,)`` (which covariance) and ``label (G,)`` (which class); ``S`` is ``G`` or 1.
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


def empty(classes: int, dim: int, *, rank: int = 0, components: int = 1, covariance: str = "component",
          **_) -> dict[str, np.ndarray]:
    """Statistics of the shapes ``fit`` returns, for a task not yet learnt (every weight -inf; ``fit``'s other
    settings are ignored)."""
    r, G = rank_for(dim, rank), classes * components_for(classes, components)
    S = 1 if covariance == "task" else G
    components = components_for(classes, components)
    return {"mean": np.zeros((G, dim), np.float32), "basis": np.zeros((S, dim, r), np.float32),
            "inv_lam": np.ones((S, r), np.float32), "inv_s2": np.zeros((S,), np.float32),
            "logdet": np.zeros((S,), np.float32), "log_weight": np.full((G,), -np.inf, np.float32),
            "cov": np.zeros((G,), np.int32) if covariance == "task" else np.arange(G, dtype=np.int32),
            "label": (np.arange(G) // components).astype(np.int32)}


def covariance(stats: dict, s: int) -> np.ndarray:
    """The dense ``(d, d)`` covariance ``s`` that ``stats`` represent (tests; large for big ``d``)."""
    u, lam = np.asarray(stats["basis"][s], np.float64), 1.0 / np.asarray(stats["inv_lam"][s], np.float64)
    d, r = u.shape
    s2 = 0.0 if r == d else 1.0 / float(stats["inv_s2"][s])
    return (u * lam) @ u.T + s2 * (np.eye(d) - u @ u.T)


def log_likelihood(stats: dict, x: jax.Array) -> jax.Array:
    """``log N(x; mu_g, Sigma_g)`` of every row of ``x`` ``(B, d)`` under every Gaussian: ``(B, G)``."""
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    cov = stats["cov"]
    proj_mu = jnp.einsum("gd,gdr->gr", stats["mean"], stats["basis"][cov])
    proj = jnp.einsum("bd,sdr->bsr", x, stats["basis"])[:, cov] - proj_mu[None]  # (B, G, r), x projected once
    diff = x[:, None, :] - stats["mean"][None]  # (B, G, d)
    inside = jnp.sum(proj * proj * stats["inv_lam"][cov][None], -1)
    residual = jnp.maximum(jnp.sum(diff * diff, -1) - jnp.sum(proj * proj, -1), 0.0)
    maha = inside + residual * stats["inv_s2"][cov][None]
    d = x.shape[-1]
    return -0.5 * (maha + stats["logdet"][cov][None] + d * math.log(2 * math.pi))


def task_log_likelihood(stats: dict, x: jax.Array) -> jax.Array:
    """``log p(x | task)``, the task's Gaussians mixed by their weights: ``(B,)`` (-inf for an empty task)."""
    return jax.nn.logsumexp(log_likelihood(stats, x) + stats["log_weight"][None], axis=-1)


def nbytes(stats: dict) -> int:
    """Bytes one task's statistics occupy."""
    return int(sum(np.asarray(v).nbytes for v in stats.values()))
