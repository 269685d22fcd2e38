"""Statistics the task-inference rules keep per task (Gaussians, prototypes): their empty shapes, the fit
when a task ends (one compiled call, shapes independent of the task's size) and their size."""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import gaussians, routing
from modkd_jax.task_inference.rules import GAUSS_RULES, REGISTRY, InferenceConfig

PyTree = Any


def _gauss_kwargs(cfg: InferenceConfig) -> dict:
    return dict(shrinkage=cfg.gauss_shrinkage, rank=cfg.gauss_rank, components=cfg.gauss_components,
                covariance=cfg.gauss_covariance)


def init_stats(cfg: InferenceConfig, rules: Iterable[str], task_count: int, classes: int, input_dim: int,
               feature_dim: int = 0, fitted: Iterable[str] | None = None) -> PyTree:
    """Statistics of no task yet for the rules that keep some, and the rule in use (``"rule"``, an index of ``rules``).

    Every task's entry has its final shape from the start (a checkpoint restores into it).

    Args:
      cfg: the task-inference settings (the configured rule, Gaussian and prototype settings).
      rules: the candidate rules; ``"rule"`` starts at the configured one's index (0 under ``auto``).
      task_count: the tasks (rows of every statistic).
      classes: the classes per task.
      input_dim: the pixels per input (``pixels``' width).
      feature_dim: the width of a sub-network's features (the ``own`` / ``first`` spaces).
      fitted: the rules whose statistics live here (default ``rules``; the experts' router keeps its own
        prototypes).
    """
    rules = tuple(rules)
    out: dict[str, Any] = {"rule": jnp.int32(rules.index(cfg.task_inference) if cfg.task_inference in rules else 0)}
    for rule in rules if fitted is None else fitted:
        if rule in GAUSS_RULES:
            dim = input_dim if REGISTRY[rule].space == "pixels" else feature_dim
            one = gaussians.empty(classes, dim, **_gauss_kwargs(cfg))
            if REGISTRY[rule].standardised:
                one.update(ll_mean=np.float32(0.0), ll_std=np.float32(1.0))
            out[rule] = {k: jnp.asarray(np.stack([v] * task_count)) for k, v in one.items()}
        elif rule == "prototype":
            out[rule] = jnp.zeros((task_count, cfg.prototypes, input_dim), jnp.float32)
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "classes"))
def fit_task(cfg: InferenceConfig, stats: PyTree, t, y: jax.Array, classes: int, *, valid: jax.Array | None = None,
             x: jax.Array | None = None, own: jax.Array | None = None, first: jax.Array | None = None,
             key: jax.Array | None = None) -> PyTree:
    """``stats`` with row ``t`` fitted from task t's training data only, in one compiled call (the next task's
    fit with the same shapes compiles nothing).

    Args:
      cfg: the Gaussian and prototype settings.
      stats: from ``init_stats`` (its keys say which rules to fit).
      t: the task that just ended (an int, or traced).
      y: its task-local training labels ``(n,)``.
      classes: its number of classes.
      valid: bool ``(n,)``, the rows that are data in padded buffers (None: all).
      x: its training pixels in [0, 1] ``(n, d)`` (``pixels``).
      own: features of its training inputs in its own frozen sub-network ``(n, h)``.
      first: the same in sub-network 0's.
      key: PRNG key (k-means initialisations; None: ``jax.random.key(t)``).
    """
    key = jax.random.key(t) if key is None else key
    valid = jnp.ones(y.shape, bool) if valid is None else valid
    source = {"pixels": x, "own": own, "first": first}
    out, by_space = dict(stats), {}
    for rule in GAUSS_RULES:
        if rule in stats:
            space = source[REGISTRY[rule].space]
            if REGISTRY[rule].space not in by_space:  # rules in one space share one fit
                by_space[REGISTRY[rule].space] = gaussians.fit(space, y, classes, valid=valid, key=key,
                                                               **_gauss_kwargs(cfg))
            fitted = dict(by_space[REGISTRY[rule].space])
            if REGISTRY[rule].standardised:
                fitted.update(_standardiser(fitted, space, valid))
            out[rule] = {k: v.at[t].set(fitted[k]) for k, v in stats[rule].items()}
    if "prototype" in stats:
        z = routing.l2_normalize(x.reshape(x.shape[0], -1).astype(jnp.float32))
        out["prototype"] = stats["prototype"].at[t].set(routing.spherical_kmeans(key, z, cfg.prototypes, valid=valid))
    return out


STANDARDISER_CHUNK = 1024  # rows scored at once while standardising (the scores hold chunk x Gaussians x dims)


def _standardiser(stats: dict, z: jax.Array, valid: jax.Array) -> dict:
    """``{"ll_mean", "ll_std"}``: mean and spread of the task's log-likelihood on its own (valid) training rows,
    so that its scores, in a space of its own, become comparable with other tasks' (``task_score``)."""
    n = z.shape[0]
    pad = -n % STANDARDISER_CHUNK
    rows = jnp.concatenate([z, jnp.zeros((pad, *z.shape[1:]), z.dtype)]).reshape(-1, STANDARDISER_CHUNK, *z.shape[1:])
    ll = jax.lax.map(lambda c: gaussians.task_log_likelihood(stats, c), rows).reshape(-1)[:n]
    w = valid.astype(jnp.float32)
    mean = jnp.sum(w * ll) / jnp.maximum(jnp.sum(w), 1.0)
    std = jnp.sqrt(jnp.sum(w * (ll - mean) ** 2) / jnp.maximum(jnp.sum(w) - 1.0, 1.0))
    return {"ll_mean": mean, "ll_std": jnp.maximum(std, 1e-6)}


def bytes_per_task(stats: PyTree, rules: Iterable[str]) -> dict[str, int]:
    """Bytes each rule stores per task (0 for the rules that read only the outputs).

    Args:
      stats: the task-inference statistics (``init_stats``).
      rules: the rules to report.
    """
    def row(tree):
        return int(sum(np.asarray(v[0]).nbytes for v in jax.tree.leaves(tree)))

    return {r: row(stats[r]) if r in stats else 0 for r in rules}
