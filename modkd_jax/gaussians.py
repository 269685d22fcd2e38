"""Class-conditional Gaussian statistics: fitted once from one task's data, scored for a batch in one pass.

A task's statistics are ``G = classes * components`` Gaussians (``components``
clusters per class by k-means, one when 1) with means ``mu_g`` and
covariances kept as *shrunk, optionally low-rank* factors::

    Sigma = (1 - a) S + a (tr S / d) I          (a = shrinkage, S the sample covariance)
    Sigma ~ U diag(lam) U^T + s2 (I - U U^T)     (U: top ``rank`` eigenvectors, s2: mean of the rest)

so a Gaussian costs ``d * (rank + 1)`` floats instead of ``d * d`` (a 3072-dim
CIFAR covariance is 37 MB in full, 0.4 MB at rank 30). ``covariance="task"``
pools one covariance over the task's components.

Fitting is one compiled float32 program whose shapes depend only on the
(possibly padded) data buffer's: k-means with each class's rows in chunks of
their own (compared with that class's centres only); each covariance's rows
gathered into chunks of their own, for its scatter ``S_g``; the top ``rank``
eigenpairs by block subspace iteration with a Rayleigh-Ritz step, ``S_g Q``
from the data chunks (large ``d``) or from ``S_g`` formed once (where that
costs fewer flops); a full ``eigh`` only where the subspace would be more than
half the dimensions. ``benchmarks/gaussians_reference.py`` keeps the float64
NumPy fit this replaced (tests check they agree; ``benchmarks/gaussian_fit.py``
times both). Scoring is ``log_likelihood`` under jit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import routing

COVARIANCES = ("component", "task")
VARIANCE_FLOOR = 1e-2  # no variance below this share of the task's mean per-dimension variance
COMPONENTS_PER_TASK = 40  # components 0 ("auto"): this many Gaussians per task, shared among its classes
KMEANS_ITERS = 20
OVERSAMPLE = 30  # subspace iteration keeps rank + this many directions
POWER_ITERS = 8  # subspace iterations after the first product (MNIST pixels: log-likelihoods to ~1e-4)
SHIFT = 1e-3  # iterate with S + SHIFT tr(S) I: condition number at most ~1 / SHIFT
CHUNK = 128  # rows per chunk of one covariance's data
KMEANS_CHUNK = 512  # rows per chunk of one class's data (k-means: fewer, larger steps are faster)
EXPLICIT_FLOATS = 1 << 25  # largest explicit scatters (floats, all covariances) the subspace iteration multiplies
HIGHEST = jax.lax.Precision.HIGHEST


def rank_for(dim: int, rank: int) -> int:
    """The covariance rank kept for ``dim``-dimensional data: ``rank``, or the full ``dim`` for 0.

    Args:
      dim: the data's dimension d.
      rank: the requested rank, >= 0 (capped at ``dim``; 0: full).
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return dim if rank == 0 else min(rank, dim)


def components_for(classes: int, components: int) -> int:
    """Gaussians per class: ``components``, or (0) ``COMPONENTS_PER_TASK // classes`` (at least 1).

    Args:
      classes: the task's classes.
      components: the requested Gaussians per class, >= 0 (0: the default).
    """
    if components < 0:
        raise ValueError(f"components must be >= 0, got {components}")
    return components or max(1, COMPONENTS_PER_TASK // classes)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in full float32 (accelerators would otherwise round float32 operands to TF32 or bfloat16)."""
    return jnp.matmul(a, b, precision=HIGHEST)


def _kmeans(x: jax.Array, y: jax.Array, member: jax.Array, classes: int, k: int, key: jax.Array) -> jax.Array:
    """Component ``(n,)`` in ``[0, k)`` of every row within its class: Euclidean k-means per class, from ``k``
    distinct random member rows of the class (fewer members: the rest of its components stay empty).

    Each class's rows are laid out in chunks of their own, so a row is compared with its class's centres only.
    """
    n, d = x.shape
    start, alive = routing.distinct_rows(key, member[None] & (y[None] == jnp.arange(classes)[:, None]), k)
    row, filled, owner = _chunks(y, member, classes, *_layout(n, classes, KMEANS_CHUNK))
    p = jnp.where(filled[..., None], x[row], 0.0)

    def nearest(pc, c, centres):  # the nearest of class c's centres to each row of the chunk pc
        own = centres[c]
        d2 = jnp.sum(own * own, -1)[None] - 2 * _mm(pc, own.T)
        return jnp.argmin(jnp.where(alive[c][None], d2, jnp.inf), axis=-1)

    def step(_, centres):  # one pass over the chunks: assignments and the new centres' sums together
        def chunk(acc, one):
            pc, c, ok = one
            hot = jax.nn.one_hot(nearest(pc, c, centres), k, dtype=pc.dtype) * ok[:, None]
            return (acc[0].at[c].add(_mm(hot.T, pc)), acc[1].at[c].add(jnp.sum(hot, 0))), None

        (sums, sizes), _ = jax.lax.scan(chunk, (jnp.zeros_like(centres), jnp.zeros((classes, k))), (p, owner, filled))
        return jnp.where(sizes[..., None] > 0, sums / jnp.maximum(sizes, 1.0)[..., None], centres)

    centres = jax.lax.fori_loop(0, KMEANS_ITERS - 1, step, x[start])
    component = jax.vmap(nearest, in_axes=(0, 0, None))(p, owner, centres)
    return jnp.zeros(n, jnp.int32).at[jnp.where(filled, row, n)].set(component, mode="drop")


def _chunks(group: jax.Array, member: jax.Array, groups: int, size: int, count: int
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each group's member rows laid out in ``count`` chunks of ``size`` rows that hold one group each.

    Returns ``(row (count, size), filled (count, size), owner (count,))``: the row in every slot, whether the
    slot holds one, and the chunk's group (0 for unused chunks, which hold no row).
    """
    n = group.shape[0]
    order = jnp.argsort(jnp.where(member, group, groups), stable=True)  # by group, members first
    rows = jax.ops.segment_sum(member.astype(jnp.int32), group, groups)
    used = (rows + size - 1) // size
    end = jnp.cumsum(used)
    owner = jnp.searchsorted(end, jnp.arange(count), side="right")
    g = jnp.minimum(owner, groups - 1)
    offset = (jnp.arange(count) - end[g] + used[g])[:, None] * size + jnp.arange(size)[None]
    filled = (owner < groups)[:, None] & (offset < rows[g][:, None])
    row = order[jnp.clip((jnp.cumsum(rows) - rows)[g][:, None] + offset, 0, n - 1)]
    return row, filled, jnp.where(owner < groups, owner, 0)


def _scatter_times(p: jax.Array, owner: jax.Array, groups: int, q: jax.Array | None = None) -> jax.Array:
    """``S_g q_g`` ``(groups, d, cols)`` for every group g, ``S_g`` the sum of ``P_c^T P_c`` over the chunks
    ``p (C, size, d)`` it owns (``q`` None: the identity, so ``S_g`` itself); one chunk after another."""
    d = p.shape[-1]
    cols = d if q is None else q.shape[-1]

    def step(acc, chunk):
        pc, g = chunk
        return acc.at[g].add(_mm(pc.T, pc if q is None else _mm(pc, q[g]))), None

    return jax.lax.scan(step, jnp.zeros((groups, d, cols), p.dtype), (p, owner))[0]


def _cholesky_inverse(m: jax.Array) -> jax.Array:
    """``L^{-1}`` of the Cholesky factor ``L`` of each symmetric positive definite ``m`` ``(G, w, w)``.

    Column by column in plain XLA ops: the LAPACK kernels' BLAS threads contend with XLA's (40x slower).
    """
    w = m.shape[-1]
    idx = jnp.arange(w)

    def factor(j, carry):
        a, low = carry
        col = a[:, :, j] / jnp.sqrt(a[:, j, j])[:, None]
        col = jnp.where(idx >= j, col, 0.0)
        return a - col[:, :, None] * col[:, None, :], low.at[:, :, j].set(col)

    low = jax.lax.fori_loop(0, w, factor, (m, jnp.zeros_like(m)))[1]

    def solve(j, inv):  # forward substitution, one row of L^{-1} at a time
        row = (jnp.where(idx == j, 1.0, 0.0) - _mm(low[:, j, None], inv)[:, 0]) / low[:, j, j][:, None]
        return inv.at[:, j].set(row)

    return jax.lax.fori_loop(0, w, solve, jnp.zeros_like(m))


def _cholesky_qr(z: jax.Array) -> jax.Array:
    """``z`` ``(G, d, w)`` times ``R^{-1}`` of its Cholesky QR: columns orthonormal up to ~``eps cond(z)^2``, so
    well-conditioned for ``cond(z)`` up to ~1e3 (and orthonormal to float32 precision after a second pass)."""
    return _mm(z, jnp.swapaxes(_cholesky_inverse(_mm(jnp.swapaxes(z, 1, 2), z)), 1, 2))


def _explicit(rows: int, d: int, groups: int, width: int) -> bool:
    """Whether forming the ``groups`` scatters ``(d, d)`` once costs fewer flops than ``S_g Q`` from ``rows`` data
    rows at every subspace iteration, and they fit in ``EXPLICIT_FLOATS`` (400-dim features: 2x faster)."""
    passes = POWER_ITERS + 2
    return (2 * rows * d * d + passes * 2 * groups * d * d * width < passes * 4 * rows * d * width
            and groups * d * d <= EXPLICIT_FLOATS)


def _top_eigen(p: jax.Array, owner: jax.Array, groups: int, rank: int, trace: jax.Array, key: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """The ``rank`` largest eigenvalues (descending, >= 0) ``(groups, r)`` and unit eigenvectors
    ``(groups, d, r)`` of every group's scatter (``trace`` its traces).

    Block subspace iteration on ``rank + OVERSAMPLE`` directions with ``S + SHIFT tr(S) I`` (same
    eigenvectors; every iterate well-conditioned, so directions beyond the data's stay orthonormal), then
    Rayleigh-Ritz with ``S``; ``S q`` from the chunks ``p`` or, where ``_explicit`` says it is cheaper, from
    the scatters formed once. A full ``eigh`` of the scatter where those directions would be more than half
    the dimensions. Each eigenvector's largest entry is positive (the same vectors from slightly different sums).
    """
    count, size, d = p.shape
    width = rank + OVERSAMPLE
    if 2 * width > d:
        vals, vecs = _eigh(_scatter_times(p, owner, groups))
    else:
        scatter = _scatter_times(p, owner, groups) if _explicit(count * size, d, groups, width) else None
        shift = jnp.where(trace > 0, SHIFT * trace, 1.0)[:, None, None]

        def product(q):  # S q
            return _scatter_times(p, owner, groups, q) if scatter is None else _mm(scatter, q)

        def step(q):  # a well-conditioned basis of (S + shift I) q
            return _cholesky_qr(product(q) + shift * q)

        q = step(_cholesky_qr(jax.random.normal(key, (groups, d, width), p.dtype)))
        q = _cholesky_qr(jax.lax.fori_loop(0, POWER_ITERS, lambda _, q: step(q), q))  # orthonormal
        small = _mm(jnp.swapaxes(q, 1, 2), product(q))
        vals, w = _eigh(0.5 * (small + jnp.swapaxes(small, 1, 2)))
        vecs = _mm(q, w)
    vecs = vecs[:, :, ::-1][:, :, :rank]
    peak = jnp.take_along_axis(vecs, jnp.argmax(jnp.abs(vecs), axis=1, keepdims=True), axis=1)
    return jnp.maximum(vals[:, ::-1][:, :rank], 0.0), vecs * jnp.where(peak < 0, -1.0, 1.0)  # a sign per vector


def _eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` of a batch of symmetric matrices; one matrix per call on CPU.

    jaxlib's CPU kernel splits a large batch over XLA's intra-op pool and blocks a pool thread until the
    pieces finish; two such fits in one program wedged the pool (seen here on 2 cores: every worker idle,
    two parked in ``ParallelBatchMap``). One matrix per call runs inline. Other backends keep the batch.
    """
    return jax.lax.platform_dependent(m, cpu=lambda m: jax.lax.map(jnp.linalg.eigh, m), default=jnp.linalg.eigh)


def _factors(vals: jax.Array, vecs: jax.Array, trace: jax.Array, denom: jax.Array, rows: jax.Array,
             shrinkage: float, floor: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U (S, d, r), lam (S, r), s2 (S,))`` of the shrunk covariances from their scatters' top eigenpairs
    ``vals``/``vecs``, traces and denominators; no variance below ``floor``, an empty one (``rows`` 0) the identity.

    Directions beyond the data's (eigenvalue 0) get ``shrinkage * tr / d``, the variance of the rest.
    """
    d, r = vecs.shape[1:]
    vals, trace = vals / denom[:, None], trace / denom
    m = trace / d
    lam = (1 - shrinkage) * vals + shrinkage * m[:, None]
    rest = jnp.maximum(trace - jnp.sum(vals, -1), 0.0) / (d - r) if r < d else jnp.zeros_like(trace)
    s2 = (1 - shrinkage) * rest + shrinkage * m
    empty = rows == 0
    return (jnp.where(empty[:, None, None], jnp.eye(d, r), vecs),
            jnp.where(empty[:, None], 1.0, jnp.maximum(lam, floor)), jnp.where(empty, 1.0, jnp.maximum(s2, floor)))


def _layout(n: int, groups: int, chunk: int = CHUNK) -> tuple[int, int]:
    """``(rows per chunk, chunks)`` that hold ``n`` rows of ``groups`` groups, each chunk one group's (at most
    ``chunk`` rows, fewer where the groups are small)."""
    size = min(chunk, max(8, 1 << math.ceil(math.log2(max(1, -(-n // groups))))))
    return size, n // size + groups


@functools.partial(jax.jit, static_argnames=("classes", "shrinkage", "rank", "components", "covariance"))
def fit(x: jax.Array, y: jax.Array, classes: int, *, valid: jax.Array | None = None, key: jax.Array,
        shrinkage: float = 0.2, rank: int = 0, components: int = 1, covariance: str = "component"
        ) -> dict[str, jax.Array]:
    """Gaussian statistics of ``classes`` classes from rows ``x`` ``(n, d)`` with labels ``y`` in ``[0, classes)``.

    Compiled once per shape of ``x`` and setting: a padded buffer with another number of valid rows, or
    another task's data, reuses the program.

    Args:
      x: the task's data as vectors (pixels in [0, 1], or a frozen network's features), possibly padded.
      y: task-local labels ``(n,)``.
      classes: classes of the task (a class without examples gets weight 0).
      valid: bool ``(n,)``, the rows that are data (None: all); the others, and rows labelled outside
        ``[0, classes)``, change nothing.
      key: PRNG key (k-means starts, the subspace iteration's start).
      shrinkage: ``a`` of the module docstring, in [0, 1].
      rank: eigenvectors kept per covariance (0: all, the full covariance).
      components: Gaussians per class (k-means clusters; 0: ``components_for``'s default).
      covariance: "component" (one each) or "task" (one pooled covariance).

    Returns:
      float32 arrays: ``mean (G, d)``, ``basis (S, d, r)``, ``inv_lam (S, r)``, ``inv_s2 (S,)``,
      ``logdet (S,)``, ``log_weight (G,)`` (log share of the task's examples; -inf if empty) and
      int32 ``cov (G,)`` (which covariance) and ``label (G,)`` (which class); ``S`` is ``G`` or 1.
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"unknown covariance {covariance!r}; expected one of {COVARIANCES}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"need 0 <= shrinkage <= 1, got {shrinkage}")
    k = components_for(classes, components)
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    n, d = x.shape
    r, G = rank_for(d, rank), classes * k
    member = (jnp.ones(n, bool) if valid is None else valid) & (y >= 0) & (y < classes)
    y = jnp.where(member, y, 0).astype(jnp.int32)
    x = jnp.where(member[:, None], x, 0.0)
    w = member.astype(jnp.float32)
    k_means, k_basis = jax.random.split(key)
    g_of = y * k + (_kmeans(x, y, member, classes, k, k_means) if k > 1 else 0)
    counts = jax.ops.segment_sum(w, g_of, G)
    total = jnp.sum(counts)
    means = jax.ops.segment_sum(x, g_of, G) / jnp.maximum(counts, 1.0)[:, None]
    pooled = covariance == "task"
    groups = 1 if pooled else G
    row, filled, owner = _chunks(jnp.zeros_like(g_of) if pooled else g_of, member, groups, *_layout(n, groups))
    p = jnp.where(filled[..., None], x[row] - means[g_of[row]], 0.0)  # centred rows, chunked by covariance
    trace = jax.ops.segment_sum(jnp.sum(p * p, (1, 2)), owner, groups)
    vals, vecs = _top_eigen(p, owner, groups, r, trace, k_basis)
    # a pooled covariance divides by n - G (the components' means were estimated)
    rows, denom = (total[None], jnp.maximum(total - G, 1.0)[None]) if pooled else (counts, jnp.maximum(counts - 1, 1.0))
    centre = jnp.sum(x, 0) / jnp.maximum(total, 1.0)
    variance = jnp.sum(w[:, None] * (x - centre) ** 2, 0) / jnp.maximum(total, 1.0)
    floor = jnp.maximum(VARIANCE_FLOOR * jnp.mean(variance), 1e-12)
    basis, lam, s2 = _factors(vals, vecs, trace, denom, rows, shrinkage, floor)
    return {"mean": means, "basis": basis, "inv_lam": 1.0 / lam,
            "inv_s2": jnp.zeros_like(s2) if r == d else 1.0 / s2,
            "logdet": jnp.sum(jnp.log(lam), -1) + (d - r) * jnp.log(s2),
            "log_weight": jnp.log(counts / jnp.maximum(total, 1.0)),
            "cov": jnp.asarray(np.zeros(G) if pooled else np.arange(G), jnp.int32),
            "label": jnp.asarray(np.arange(G) // k, jnp.int32)}


def empty(classes: int, dim: int, *, rank: int = 0, components: int = 1, covariance: str = "component",
          **_) -> dict[str, np.ndarray]:
    """Statistics of the shapes ``fit`` returns, for a task not yet learnt (every weight -inf; ``fit``'s other
    settings are ignored).

    Args:
      classes: the task's classes.
      dim: the data's dimension d.
      rank: eigenvectors kept per covariance (0: full), as in ``fit``.
      components: Gaussians per class (0: ``components_for``'s default), as in ``fit``.
      covariance: ``"component"`` or ``"task"``, as in ``fit``.
      **_: ``fit``'s other settings (``shrinkage``), ignored.
    """
    r, G = rank_for(dim, rank), classes * components_for(classes, components)
    S = 1 if covariance == "task" else G
    components = components_for(classes, components)
    return {"mean": np.zeros((G, dim), np.float32), "basis": np.zeros((S, dim, r), np.float32),
            "inv_lam": np.ones((S, r), np.float32), "inv_s2": np.zeros((S,), np.float32),
            "logdet": np.zeros((S,), np.float32), "log_weight": np.full((G,), -np.inf, np.float32),
            "cov": np.zeros((G,), np.int32) if covariance == "task" else np.arange(G, dtype=np.int32),
            "label": (np.arange(G) // components).astype(np.int32)}


def covariance(stats: dict, s: int) -> np.ndarray:
    """The dense ``(d, d)`` covariance ``s`` that ``stats`` represent (tests; large for big ``d``).

    Args:
      stats: one task's statistics (``fit``).
      s: the covariance's index, in ``[0, S)``.
    """
    u, lam = np.asarray(stats["basis"][s], np.float64), 1.0 / np.asarray(stats["inv_lam"][s], np.float64)
    d, r = u.shape
    s2 = 0.0 if r == d else 1.0 / float(stats["inv_s2"][s])
    return (u * lam) @ u.T + s2 * (np.eye(d) - u @ u.T)


def log_likelihood(stats: dict, x: jax.Array) -> jax.Array:
    """``log N(x; mu_g, Sigma_g)`` of every row of ``x`` ``(B, d)`` under every Gaussian: ``(B, G)``.

    Args:
      stats: one task's statistics (``fit``).
      x: the rows, flattened to ``(B, d)``.
    """
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
    """``log p(x | task)``, the task's Gaussians mixed by their weights: ``(B,)`` (-inf for an empty task).

    Args:
      stats: one task's statistics (``fit``).
      x: the rows, flattened to ``(B, d)``.
    """
    return jax.nn.logsumexp(log_likelihood(stats, x) + stats["log_weight"][None], axis=-1)


def nbytes(stats: dict) -> int:
    """Bytes one task's statistics occupy."""
    return int(sum(np.asarray(v).nbytes for v in stats.values()))
