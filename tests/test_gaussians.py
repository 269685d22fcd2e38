"""Gaussian statistics and prototypes: the device fit against NumPy and the float64 reference fit, fixed shapes,
padded rows, and no recompile for a second task of the same shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scipy.optimize import linear_sum_assignment

from benchmarks.gaussians_reference import fit_reference
from modkd_jax import diagnostics, gaussians, routing, task_inference
from modkd_jax.task_inference import InferenceConfig

KEY = jax.random.key(0)


def _logpdf(x, mean, cov):
    """NumPy's multivariate normal log density (float64)."""
    d = len(mean)
    diff = x - mean
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (np.einsum("bi,bi->b", diff @ np.linalg.inv(cov), diff) + logdet + d * np.log(2 * np.pi))


def _hand_made(seed=0, n=(40, 60), d=5):
    rng = np.random.default_rng(seed)
    # correlated, well-conditioned classes (no eigenvalue near gaussians.VARIANCE_FLOOR of the mean variance)
    xs = [rng.normal(size=(k, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d))) + 3 * c for c, k in enumerate(n)]
    return np.concatenate(xs), np.repeat(np.arange(len(n)), n)


def test_gaussian_statistics_equal_numpy_on_hand_made_data():
    x, y = _hand_made()
    d = x.shape[1]
    for shrinkage in (0.0, 0.3):
        stats = gaussians.fit(x, y, 2, shrinkage=shrinkage, rank=0, components=1, key=KEY)
        for c in range(2):
            xc = x[y == c]
            S = np.cov(xc.T)
            target = (1 - shrinkage) * S + shrinkage * np.trace(S) / d * np.eye(d)
            np.testing.assert_allclose(stats["mean"][c], xc.mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(gaussians.covariance(stats, c), target, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(gaussians.log_likelihood(stats, jnp.asarray(x)))[:, c],
                                       _logpdf(x, xc.mean(0), target), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(np.exp(stats["log_weight"]), [0.4, 0.6], rtol=1e-6)
    # rank 2 of 5: the top eigenpairs kept (shrunk), the rest replaced by their mean
    stats = gaussians.fit(x, y, 2, shrinkage=0.2, rank=2, components=1, key=KEY)
    xc = x[y == 1]
    S = np.cov(xc.T)
    vals, vecs = np.linalg.eigh(0.8 * S + 0.2 * np.trace(S) / d * np.eye(d))
    vals, vecs = vals[::-1], vecs[:, ::-1]
    low = (vecs[:, :2] * vals[:2]) @ vecs[:, :2].T + vals[2:].mean() * (np.eye(d) - vecs[:, :2] @ vecs[:, :2].T)
    np.testing.assert_allclose(gaussians.covariance(stats, 1), low, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gaussians.log_likelihood(stats, jnp.asarray(x)))[:, 1],
                               _logpdf(x, xc.mean(0), low), rtol=1e-4, atol=1e-3)
    # one covariance pooled over the task: the within-class scatter over n - classes
    stats = gaussians.fit(x, y, 2, shrinkage=0.0, rank=0, covariance="task", key=KEY)
    centred = np.concatenate([x[y == c] - x[y == c].mean(0) for c in range(2)])
    np.testing.assert_allclose(gaussians.covariance(stats, 0), centred.T @ centred / (len(x) - 2), rtol=1e-4,
                               atol=1e-5)
    assert stats["basis"].shape[0] == 1 and list(stats["cov"]) == [0, 0]


def test_mixture_components_and_empty_statistics_have_fixed_shapes():
    x, y = _hand_made(n=(50, 50))
    stats = gaussians.fit(x, y, 2, components=3, rank=2, key=KEY)
    empty = gaussians.empty(2, x.shape[1], components=3, rank=2)
    assert {k: v.shape for k, v in stats.items()} == {k: v.shape for k, v in empty.items()}
    assert list(stats["label"]) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(np.exp(stats["log_weight"]).sum(), 1.0, rtol=1e-6)
    assert np.all(np.isneginf(empty["log_weight"]))
    assert gaussians.components_for(2, 0) == 20 and gaussians.components_for(10, 0) == 4
    assert gaussians.nbytes(stats) == sum(v.nbytes for v in stats.values())


def _clusters(rows, components, d, seed=0):
    """Far-apart clusters (``components`` per class, ``rows[c]`` rows each) with a spectral gap after 5
    directions: k-means (2 per class) finds them from any start, the top eigenvectors are well defined."""
    rng = np.random.default_rng(seed)
    scales = np.concatenate([[10.0, 8.0, 6.0, 4.0, 3.0], np.full(d - 5, 0.5)])
    xs = [rng.normal(size=d) * 60 + (rng.normal(size=(n, d)) * scales) @ np.linalg.qr(rng.normal(size=(d, d)))[0].T
          for n in rows for _ in range(components)]
    return np.concatenate(xs), np.repeat(np.arange(len(rows)), [n * components for n in rows])


def _matched(stats, ref):
    """``ref`` with each class's components reordered to ``stats``' (nearest means): k-means numbers clusters
    in the order of its random start."""
    perm = np.arange(len(ref["mean"]))
    for c in np.unique(ref["label"]):
        g = np.flatnonzero(ref["label"] == c)
        cost = ((np.asarray(stats["mean"])[g][:, None] - ref["mean"][g][None]) ** 2).sum(-1)
        perm[g] = g[linear_sum_assignment(cost)[1]]
    per_component = ("mean", "log_weight") + (("basis", "inv_lam", "inv_s2", "logdet") if len(ref["basis"]) > 1
                                              else ())
    return {k: v[perm] if k in per_component else v for k, v in ref.items()}


REFERENCE_CASES = {  # name: (rows per class, classes, d, fit settings)
    "full_covariance": ((40, 60), 2, 5, dict(rank=0, components=1, shrinkage=0.3)),
    "explicit_rank_below_d": ((100, 80, 120), 3, 60, dict(rank=5, components=2, shrinkage=0.2)),
    "rank_below_d": ((100, 80, 120), 3, 80, dict(rank=3, components=2, shrinkage=0.2)),  # subspace iteration
    "rank_below_d_unshrunk": ((100, 80, 120), 3, 80, dict(rank=5, components=2, shrinkage=0.0)),
    "more_dims_than_rows": ((20, 15, 30), 3, 80, dict(rank=5, components=1, shrinkage=0.2)),
    "rank_above_rows": ((12, 9), 2, 120, dict(rank=20, components=1, shrinkage=0.2)),
    "pooled": ((100, 80, 120), 3, 80, dict(rank=5, components=2, covariance="task", shrinkage=0.2)),
    "empty_class": ((50, 70), 3, 80, dict(rank=4, components=2, shrinkage=0.2)),
}


@pytest.fixture
def products(request, monkeypatch):
    """How the subspace iteration gets ``S_g Q``: from the data chunks, or from scatters formed once."""
    monkeypatch.setattr(gaussians, "_explicit", lambda *_: request.param == "scatter")
    gaussians.fit.clear_cache()  # traced under the other choice
    yield request.param
    gaussians.fit.clear_cache()


@pytest.mark.parametrize("case,products", [(c, "scatter") for c in sorted(REFERENCE_CASES)]
                         + [(c, "data") for c in sorted(REFERENCE_CASES) if REFERENCE_CASES[c][2] > 60],
                         indirect=["products"])
def test_device_fit_equals_the_float64_reference(case, products):
    """The same statistics as ``benchmarks.gaussians_reference`` (float64 NumPy): the explicit scatter's ``eigh``
    (subspace over half the dimensions), and the subspace iteration with either product."""
    rows, classes, d, kw = REFERENCE_CASES[case]
    x, y = _clusters(rows, kw["components"], d) if d > 5 else _hand_made()
    stats = gaussians.fit(x, y, classes, key=KEY, **kw)
    ref = _matched(stats, fit_reference(x, y, classes, seed=0, **kw))
    assert {k: (v.shape, v.dtype) for k, v in stats.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
    np.testing.assert_array_equal(np.isneginf(stats["log_weight"]), np.isneginf(ref["log_weight"]))
    np.testing.assert_allclose(np.exp(stats["log_weight"]), np.exp(ref["log_weight"]), rtol=1e-6)  # same partition
    np.testing.assert_allclose(stats["mean"], ref["mean"], rtol=1e-5, atol=1e-4)
    for s in range(len(ref["basis"])):
        want = gaussians.covariance(ref, s)
        np.testing.assert_allclose(gaussians.covariance(stats, s), want, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(stats["logdet"], ref["logdet"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(gaussians.task_log_likelihood(stats, jnp.asarray(x)),
                               gaussians.task_log_likelihood(ref, jnp.asarray(x)), rtol=1e-5, atol=1e-3)
    if case == "empty_class":
        assert np.all(np.isneginf(stats["log_weight"][-2:])) and np.all(stats["inv_lam"][-2:] == 1.0)


def test_padded_rows_change_nothing():
    x, y = _clusters((50, 70), 2, 60)
    rng = np.random.default_rng(1)
    pad_x = np.concatenate([x, np.full((37, 60), np.nan), rng.normal(size=(3, 60)) * 1e6])
    pad_y = np.concatenate([y, rng.integers(-2, 5, 40)])
    valid = np.arange(len(pad_y)) < len(y)
    for kw in (dict(rank=4, components=2), dict(rank=0, components=2, covariance="task")):
        want = gaussians.fit(x, y, 2, key=KEY, **kw)
        got = gaussians.fit(pad_x, pad_y, 2, valid=valid, key=KEY, **kw)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    z = routing.l2_normalize(jnp.asarray(pad_x, jnp.float32))
    np.testing.assert_allclose(routing.spherical_kmeans(KEY, z, 4, valid=jnp.asarray(valid)),
                               routing.spherical_kmeans(KEY, z[:len(y)], 4, valid=jnp.ones(len(y), bool)),
                               rtol=1e-5, atol=1e-6)
    few = routing.spherical_kmeans(KEY, z, 5, valid=jnp.arange(len(pad_y)) < 3)  # 3 rows for 5 prototypes
    np.testing.assert_array_equal(few[3:], np.stack([few[0], few[0]]))


def test_a_second_fit_with_the_same_shapes_compiles_nothing():
    cfg = InferenceConfig(gauss_components=2, gauss_rank=3, prototypes=4)
    stats = task_inference.init_stats(cfg, ("gauss_input", "gauss_own", "prototype"), 3, 3, 60, 60)
    tasks = []
    for t, count in enumerate((300, 200)):  # the same padded buffer, other data and another number of real rows
        x, y = _clusters((count // 3,) * 3, 1, 60, seed=t)
        pad = 320 - len(y)
        tasks.append((jnp.asarray(np.pad(x, ((0, pad), (0, 0))), jnp.float32), jnp.asarray(np.pad(y, (0, pad))),
                      jnp.arange(320) < len(y)))
    before = diagnostics.backend_compiles()
    first = jax.block_until_ready(gaussians.fit(*tasks[0][:2], 3, valid=tasks[0][2], key=KEY, rank=3))
    stats = jax.block_until_ready(task_inference.fit_task(cfg, stats, 0, tasks[0][1], 3, valid=tasks[0][2],
                                                          x=tasks[0][0], own=tasks[0][0]))
    assert diagnostics.backend_compiles() > before  # the counter sees compilations
    before = diagnostics.backend_compiles()
    second = jax.block_until_ready(gaussians.fit(*tasks[1][:2], 3, valid=tasks[1][2], key=KEY, rank=3))
    stats = jax.block_until_ready(task_inference.fit_task(cfg, stats, 1, tasks[1][1], 3, valid=tasks[1][2],
                                                          x=tasks[1][0], own=tasks[1][0]))
    assert diagnostics.backend_compiles() == before
    assert not np.allclose(first["mean"], second["mean"])
    assert np.all(np.isfinite(np.asarray(stats["gauss_input"]["log_weight"][:2])))
    assert np.all(np.isneginf(np.asarray(stats["gauss_own"]["log_weight"][2])))
