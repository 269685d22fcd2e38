"""The expert pool's routing parts: the stacked pool, the fixed embedding, prototype routing and soft top-k
mixtures, and the allocation of experts to a new task (``methods.experts`` trains and evaluates with them)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import models, routing

if TYPE_CHECKING:
    from modkd_jax.methods.experts import ExpertsConfig

PyTree = Any


# --- Pool, embedding, routing --------------------------------------------------------------------


def take(tree: PyTree, idx) -> PyTree:
    """Row(s) ``idx`` of every leaf of a stacked pytree (one expert, or several along a new axis)."""
    return jax.tree.map(lambda a: a[idx], tree)


def init_pool(model, key: jax.Array, input_shape: tuple[int, ...], n: int) -> tuple[PyTree, PyTree]:
    """``n`` independently initialised experts stacked on a leading axis: ``(params, batch_stats)``."""
    return jax.vmap(lambda k: models.init(model, k, input_shape))(jax.random.split(key, n))


def random_projection(key: jax.Array, in_dim: int, dim: int) -> jax.Array:
    """The fixed shared embedding: Gaussian ``(in_dim, dim) / sqrt(dim)``; ``dim=0`` gives an empty (pixel) one."""
    if dim == 0:
        return jnp.zeros((in_dim, 0), jnp.float32)
    return jax.random.normal(key, (in_dim, dim), jnp.float32) / math.sqrt(dim)


def embed(projection: jax.Array, x_uint8: jax.Array) -> jax.Array:
    """Unit-norm embedding of uint8 images: pixels in [0, 1], flattened, projected (or not, if empty)."""
    flat = x_uint8.reshape(x_uint8.shape[0], -1).astype(jnp.float32) / 255.0
    return routing.l2_normalize(flat @ projection if projection.shape[-1] else flat)


def task_scores(emb: jax.Array, prototypes: jax.Array, seen: jax.Array) -> jax.Array:
    """Best cosine of every input to each task's prototypes: ``(B, T)``, ``-inf`` for unseen tasks."""
    T, K, d = prototypes.shape
    member = jnp.repeat(jnp.eye(T, dtype=bool) & seen[:, None], K, axis=1)  # task j owns its K prototypes
    return routing.prototype_scores(emb, prototypes.reshape(T * K, d), member)


def expert_prototypes(membership: jax.Array, k: int) -> jax.Array:
    """Which of the ``T * k`` prototypes each expert owns: ``(E, T * k)``, from ``membership (E, T)``."""
    return jnp.repeat(membership, k, axis=1)


def route(router: PyTree, emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(expert, task)`` per embedded input: the expert with the most similar prototype and that prototype's task."""
    T, K, d = router["prototypes"].shape
    member = expert_prototypes(router["membership"] & router["seen"][None], K)
    expert = routing.route(emb, router["prototypes"].reshape(T * K, d), member)
    return expert, jnp.argmax(task_scores(emb, router["prototypes"], router["seen"]), axis=-1)


def task_weights(router: PyTree, emb: jax.Array, task, top_k: int, temperature: float) -> jax.Array:
    """Mixture weights ``(B, E)`` of the experts serving ``task`` (one, or one per input), 0 for the others.

    Soft top-k over the experts' similarity to the input through their *other*
    tasks' prototypes (what each already knows; 0 for an expert with no other
    task). A single expert gets weight 1.
    """
    T, K, d = router["prototypes"].shape
    served = router["membership"] & router["seen"][None]  # (E, T)
    protos = router["prototypes"].reshape(T * K, d)
    others = lambda j: expert_prototypes(served & (jnp.arange(T) != j)[None], K)  # noqa: E731
    per_task = jax.vmap(lambda j: routing.prototype_scores(emb, protos, others(j)))(jnp.arange(T))  # (T, B, E)
    task = jnp.broadcast_to(task, emb.shape[:1])
    s = per_task[task, jnp.arange(emb.shape[0])]
    s = jnp.where(served.T[task], jnp.where(jnp.isfinite(s), s, 0.0), -jnp.inf)
    return routing.soft_top_k(s, top_k, temperature)


def block_at(logits: jax.Array, task, size: int) -> jax.Array:
    """The class block of ``task`` (one, or one per input) of logits ``(..., B, out)``."""
    idx = jnp.broadcast_to(task, logits.shape[-2:-1])[:, None] * size + jnp.arange(size)
    return jnp.take_along_axis(logits, jnp.broadcast_to(idx, (*logits.shape[:-1], size)), axis=-1)


def mix(z: jax.Array, weights: jax.Array) -> jax.Array:
    """``log sum_s w_s softmax(z[s])`` of block logits ``z (S, B, block)``, ``weights (B, S)``; 0 weights drop out."""
    logp = jax.nn.log_softmax(z, axis=-1)
    on = (weights > 0).T[..., None]
    logw = jnp.log(jnp.where(weights > 0, weights, 1.0)).T[..., None]
    return jax.scipy.special.logsumexp(jnp.where(on, logp + logw, -jnp.inf), axis=0)


# --- Allocation ----------------------------------------------------------------------------------


def fit_shares(scores: jax.Array, radius: jax.Array, membership: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per expert, how many (and which share) of the inputs fit it: best cosine to one of its tasks >= that radius."""
    fits = np.asarray(scores) >= np.asarray(radius)[None]  # (N, T); -inf for unseen tasks never fits
    per_expert = (fits[:, None, :] & np.asarray(membership)[None]).any(-1)  # (N, E)
    count = per_expert.sum(0)
    return count, count / max(len(fits), 1)


def allocate(cfg: ExpertsConfig, task: int, counts: np.ndarray, fit_count: np.ndarray, share: np.ndarray,
             active: np.ndarray) -> tuple[list[int], str, dict]:
    """Experts for a new ``task``: reuse fitting specialists, else a new expert; ``(experts, decision, info)``.

    ``counts (E, T)`` are the routing statistics so far, ``fit_count``/``share``
    how many / which share of the task's inputs fit each expert.
    """
    after = np.asarray(counts, np.float64).copy()
    after[:, task] += fit_count
    h_after = np.asarray(routing.specialization_entropy(after))
    ok = active & (share >= cfg.reuse_threshold) & (np.nan_to_num(h_after, nan=0.0) <= cfg.max_entropy + 1e-9)
    info = {"fit_share": share, "entropy_if_reused": h_after}
    if cfg.allocation == "entropy" and ok.any():
        order = [int(e) for e in np.argsort(-share, kind="stable") if ok[e]]
        return order[: cfg.top_k], "reuse", info
    free = np.flatnonzero(~active)
    if len(free):
        return [int(free[0])], "new", info
    return [int(np.argmax(np.where(active, share, -1.0)))], "forced", info

