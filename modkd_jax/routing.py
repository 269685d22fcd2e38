"""Task inference over all sub-networks in one compiled call, and the routing rules.

``subnet_probs`` maps over task ids inside one compiled call: for each task j
it gates the shared parameters with j's forward mask, selects j's batch norm
and class block, and returns ``softmax(z_j / tau)``. Task-incremental accuracy
reads the true task's block; class-incremental accuracy picks a sub-network by
a rule.

``strategy="map"`` (default) runs the sub-networks one after another inside
the compiled call (``lax.map``); ``"vmap"`` batches them. XLA:CPU lowers a
vmapped convolution with per-task kernels to a grouped convolution, measured
7x slower than ``map`` for ResNet-32 (T=10, batch 64, 2 cores), so ``map`` is
the default; ``benchmarks/inference.py`` compares both on any device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from modkd_jax import masks

PyTree = Any
STRATEGIES = ("map", "vmap")


def _every_subnet(apply_fn: Callable, params: PyTree, batch_stats: PyTree, owner: PyTree, x: jax.Array,
                  task_count: int, block_size: int, strategy: str, with_features: bool):
    """Every sub-network's class block (and features) on ``x``, mapped or vmapped over task ids."""

    def one(task):
        gated = masks.gate(params, masks.forward_mask(owner, task))
        kwargs = {"with_features": True} if with_features else {}
        out = apply_fn({"params": gated, "batch_stats": batch_stats}, x, task, train=False, **kwargs)
        logits, h = out if with_features else (out, None)
        z = jax.lax.dynamic_slice_in_dim(logits, task * block_size, block_size, axis=-1)
        return (z, h) if with_features else z

    tasks = jnp.arange(task_count)
    if strategy == "vmap":
        return jax.vmap(one)(tasks)
    if strategy == "map":
        return jax.lax.map(one, tasks)
    raise ValueError(f"unknown strategy {strategy!r}; expected 'map' or 'vmap'")


def subnet_logits(apply_fn: Callable, params: PyTree, batch_stats: PyTree, owner: PyTree, x: jax.Array,
                  task_count: int, block_size: int, strategy: str = "map") -> jax.Array:
    """Class-block logits of every sub-network on ``x``: shape ``(task_count, batch, block_size)``."""
    return _every_subnet(apply_fn, params, batch_stats, owner, x, task_count, block_size, strategy, False)


def subnet_outputs(apply_fn: Callable, params: PyTree, batch_stats: PyTree, owner: PyTree, x: jax.Array,
                   task_count: int, block_size: int, strategy: str = "map") -> tuple[jax.Array, jax.Array]:
    """``(logits (T, B, block), features (T, B, h))`` of every sub-network (a model taking ``with_features``)."""
    return _every_subnet(apply_fn, params, batch_stats, owner, x, task_count, block_size, strategy, True)


def subnet_probs(apply_fn: Callable, params: PyTree, batch_stats: PyTree, owner: PyTree, x: jax.Array,
                 task_count: int, block_size: int, temperature: float = 1.0, strategy: str = "map") -> jax.Array:
    """``softmax(z_j / temperature)`` of every sub-network j on ``x``: shape ``(task_count, batch, block_size)``."""
    z = subnet_logits(apply_fn, params, batch_stats, owner, x, task_count, block_size, strategy)
    return jax.nn.softmax(z / temperature, axis=-1)


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy (nats) of distributions along ``axis``; 0 log 0 = 0."""
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def max_prob_task(probs: jax.Array, seen) -> jax.Array:
    """Per example, the sub-network (among the first ``seen``) with the highest max-probability."""
    conf = jnp.max(probs, axis=-1)  # (T, B)
    valid = (jnp.arange(probs.shape[0]) < seen)[:, None]
    return jnp.argmax(jnp.where(valid, conf, -jnp.inf), axis=0)


def entropy_top2_task(probs: jax.Array, seen) -> jax.Array:
    """Per example, of the two most confident sub-networks the one with the lower entropy."""
    conf = jnp.max(probs, axis=-1)
    valid = (jnp.arange(probs.shape[0]) < seen)[:, None]
    conf = jnp.where(valid, conf, -jnp.inf)
    _, top2 = jax.lax.top_k(conf.T, 2)  # (B, 2)
    ent = jnp.take_along_axis(entropy(probs).T, top2, axis=1)  # (B, 2)
    ent = jnp.where(jnp.take_along_axis(conf.T, top2, axis=1) > -jnp.inf, ent, jnp.inf)
    return jnp.take_along_axis(top2, jnp.argmin(ent, axis=1)[:, None], axis=1)[:, 0]


def predictions(probs: jax.Array, true_task, seen) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{rule: (task, local class)}`` per example for the TIL, max-prob and entropy rules."""
    batch = jnp.arange(probs.shape[1])
    out = {}
    for rule, task in (("til", jnp.full(probs.shape[1], true_task)),
                       ("cil", max_prob_task(probs, seen)),
                       ("cil_top2_entropy", entropy_top2_task(probs, seen))):
        out[rule] = (task, jnp.argmax(probs[task, batch], axis=-1))
    return out


# --- Similarity routing over a pool of experts and module specialization (modular experts) ---


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
    """``x`` scaled to unit length along ``axis`` (zero vectors stay zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def prototype_scores(emb: jax.Array, prototypes: jax.Array, membership: jax.Array) -> jax.Array:
    """Similarity of every input to every expert: ``(B, E)``, the best cosine to one of the expert's prototypes.

    ``emb`` is ``(B, d)``, ``prototypes`` ``(P, d)`` and ``membership`` ``(E, P)`` bool
    (expert e owns prototype p). An expert without prototypes scores ``-inf``.
    """
    sims = l2_normalize(emb) @ l2_normalize(prototypes).T  # (B, P)
    return jnp.max(jnp.where(membership[None], sims[:, None, :], -jnp.inf), axis=-1)


def distinct_rows(key: jax.Array, member: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``k`` distinct random member rows of each mask of ``member`` ``(..., n)``: indices and whether each is one.

    The top ``k`` of one uniform score per row, so a row's draw does not depend on rows appended after
    it (padding); where a mask has fewer than ``k`` members the rest are flagged False.
    """
    n = member.shape[-1]
    score = jnp.where(member, jax.random.uniform(key, (n,)), -jnp.inf)
    score = jnp.concatenate([score, jnp.full(score.shape[:-1] + (max(k - n, 0),), -jnp.inf)], axis=-1)
    top, rows = jax.lax.top_k(score, k)
    return jnp.minimum(rows, n - 1), top > -jnp.inf


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def spherical_kmeans(key: jax.Array, z: jax.Array, k: int, iters: int = 20, valid: jax.Array | None = None
                     ) -> jax.Array:
    """``k`` unit centroids of unit vectors ``z`` (cosine k-means from ``k`` distinct random points).

    With ``valid`` (bool ``(n,)``) only those rows count, the start is ``distinct_rows``' and, where fewer
    than ``k`` rows are valid, the centroids without a row are copies of the first.
    """
    if valid is None:
        centroids = z[jax.random.choice(key, z.shape[0], (k,), replace=False)]
        alive, w = jnp.ones(k, bool), jnp.ones(z.shape[0])
    else:
        z = jnp.where(valid[:, None], z, 0.0)
        rows, alive = distinct_rows(key, valid, k)
        centroids, w = z[rows], valid.astype(z.dtype)

    def body(c, _):
        assign = jnp.argmax(jnp.where(alive, z @ c.T, -jnp.inf), axis=1)
        sums = jax.ops.segment_sum(z * w[:, None], assign, k)
        sizes = jax.ops.segment_sum(w, assign, k)
        return jnp.where(sizes[:, None] > 0, l2_normalize(sums), c), None

    centroids = jax.lax.scan(body, centroids, None, iters)[0]
    return jnp.where(alive[:, None], centroids, centroids[:1])


def route(emb: jax.Array, prototypes: jax.Array, membership: jax.Array) -> jax.Array:
    """Hard routing r(x) = argmax_e cosine(embed(x), prototypes of e): one expert id per input."""
    return jnp.argmax(prototype_scores(emb, prototypes, membership), axis=-1)


def soft_top_k(scores: jax.Array, k: int, temperature: float) -> jax.Array:
    """Routing weights ``(B, E)``: softmax of ``scores / temperature`` over each row's top ``k``, exact 0 elsewhere.

    Differentiable in ``scores``; ``-inf`` scores (experts that cannot be chosen)
    get weight 0 even inside the top k. Rows must hold at least one finite score.
    """
    k = min(int(k), scores.shape[-1])
    _, top = jax.lax.top_k(scores, k)  # (B, k)
    chosen = jnp.sum(jax.nn.one_hot(top, scores.shape[-1], dtype=bool), axis=-2) > 0
    z = jnp.where(chosen & jnp.isfinite(scores), scores / temperature, -jnp.inf)
    return jax.nn.softmax(z, axis=-1)


def routing_counts(expert: jax.Array, task: jax.Array, num_experts: int, num_tasks: int,
                   valid: jax.Array | None = None) -> jax.Array:
    """Routing statistics ``C[i, j]``: how many task-j inputs were routed to expert i."""
    w = jnp.ones(expert.shape, jnp.int32) if valid is None else valid.astype(jnp.int32)
    return jnp.zeros((num_experts, num_tasks), jnp.int32).at[expert, task].add(w)


def specialization_entropy(counts: jax.Array) -> jax.Array:
    """H(theta_i) = -sum_j p(j|theta_i) log p(j|theta_i) per expert (nats), p from routing counts ``(E, T)``.

    0 means expert i only ever receives one task's inputs (a specialist), ``log T``
    that it receives all tasks alike; an expert that received nothing is NaN.
    """
    counts = jnp.asarray(counts, jnp.float32)
    total = jnp.sum(counts, axis=-1, keepdims=True)
    h = entropy(counts / jnp.where(total > 0, total, 1.0))
    return jnp.where(total[..., 0] > 0, h + 0.0, jnp.nan)  # + 0.0: no -0.0
