"""Owner maps and the binary mask pytrees derived from them.

Every parameter leaf has an *owner map*: an int16 array of the leaf's shape
holding, per weight, the id of the task that owns it, or ``FREE`` (-1).
Masks are never stored; they are derived on demand by pure functions, so a
task id may be a traced value (inside ``jit`` / ``vmap``)::

    import jax, jax.numpy as jnp
    from modkd_jax import masks
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    kinds = {"dense": {"kernel": masks.GATED}}
    owner = masks.init_owners(params, kinds, block_sizes=(3,))
    owner = masks.assign(owner, kinds, task=0, task_count=2, key=jax.random.key(0))
    masks.trainable_mask(owner, 0)["dense"]["kernel"].sum()   # 6 of 12 weights

Leaf kinds say how a leaf is shared between tasks:
``GATED``      a weight array split between tasks by a selection policy;
``CLASSIFIER`` an output layer whose last axis is blocks of classes per task;
``PER_TASK``   a leaf with a leading task axis (per-task batch norm), row t = task t.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FREE = -1
OWNER_DTYPE = jnp.int16  # up to 32767 tasks
MAX_TASKS = int(jnp.iinfo(OWNER_DTYPE).max)

GATED = "gated"
CLASSIFIER = "classifier"
PER_TASK = "per_task"
KINDS = (GATED, CLASSIFIER, PER_TASK)

PyTree = Any


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown leaf kind {kind!r}; expected one of {KINDS}")
    return kind


def _class_block_owner(shape: tuple[int, ...], block_sizes: tuple[int, ...]) -> jax.Array:
    """Owner map of a classifier leaf: the last axis is cut into class blocks, block t owned by t."""
    if sum(block_sizes) != shape[-1]:
        raise ValueError(
            f"class blocks {block_sizes} sum to {sum(block_sizes)} but the classifier has {shape[-1]} outputs"
        )
    ids = np.repeat(np.arange(len(block_sizes)), block_sizes).astype(np.int16)
    return jnp.broadcast_to(jnp.asarray(ids), shape).astype(OWNER_DTYPE)


def _per_task_owner(shape: tuple[int, ...]) -> jax.Array:
    """Owner map of a per-task leaf: row t of the leading axis belongs to task t."""
    ids = jnp.arange(shape[0], dtype=OWNER_DTYPE).reshape((shape[0],) + (1,) * (len(shape) - 1))
    return jnp.broadcast_to(ids, shape)


def init_owners(params: PyTree, kinds: PyTree, block_sizes: tuple[int, ...]) -> PyTree:
    """Initial owner maps: gated weights free, classifier blocks and per-task rows pre-assigned."""
    if len(block_sizes) > MAX_TASKS:
        raise ValueError(f"at most {MAX_TASKS} tasks are supported, got {len(block_sizes)}")

    def leaf(p, kind):
        kind = _check_kind(kind)
        if kind == GATED:
            return jnp.full(p.shape, FREE, OWNER_DTYPE)
        if kind == CLASSIFIER:
            return _class_block_owner(p.shape, tuple(block_sizes))
        return _per_task_owner(p.shape)

    return jax.tree.map(leaf, params, kinds)


def forward_mask(owner: PyTree, task) -> PyTree:
    """Weights sub-network ``task`` computes with: those owned by tasks <= task."""
    return jax.tree.map(lambda o: (o >= 0) & (o <= task), owner)


def trainable_mask(owner: PyTree, task) -> PyTree:
    """Weights that receive updates while training ``task``: those it owns."""
    return jax.tree.map(lambda o: o == task, owner)


def free_mask(owner: PyTree) -> PyTree:
    """Weights no task owns yet."""
    return jax.tree.map(lambda o: o == FREE, owner)


def full_mask(params: PyTree) -> PyTree:
    """An all-True mask (a dense network: the teacher)."""
    return jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)


def share_count(free: int, task: int, task_count: int) -> int:
    """How many of a layer's ``free`` weights task ``task`` of ``task_count`` receives.

    The still-free weights are split evenly over the tasks left, so the shares of
    N tasks always add up to the whole layer (the last task takes the remainder).
    """
    if not 0 <= task < task_count:
        raise ValueError(f"task {task} is outside 0..{task_count - 1}")
    return free // (task_count - task)


def _select(owner: jax.Array, scores: jax.Array, count: int, task: int) -> jax.Array:
    """Give the ``count`` free weights with the highest ``scores`` to ``task``."""
    if count == 0:
        return owner
    flat_owner = owner.reshape(-1)
    flat_scores = jnp.where(flat_owner == FREE, scores.reshape(-1).astype(jnp.float32), -jnp.inf)
    _, idx = jax.lax.top_k(flat_scores, count)
    return flat_owner.at[idx].set(jnp.asarray(task, OWNER_DTYPE)).reshape(owner.shape)


def assign(
    owner: PyTree,
    kinds: PyTree,
    task: int,
    task_count: int,
    *,
    policy: str = "random",
    key: jax.Array | None = None,
    weights: PyTree | None = None,
) -> PyTree:
    """Assign task ``task`` its share of every gated layer's free weights.

    ``policy="random"`` draws uniformly among free weights from ``key``;
    ``policy="magnitude"`` keeps the largest ``|w|`` of the (trained) ``weights``.
    Classifier blocks and per-task rows are already owned and are left alone.
    """
    if policy == "random":
        if key is None:
            raise ValueError("policy='random' needs a PRNG key")
    elif policy == "magnitude":
        if weights is None:
            raise ValueError("policy='magnitude' needs the trained weights to rank")
    else:
        raise ValueError(f"unknown selection policy {policy!r}; expected 'random' or 'magnitude'")

    leaves, treedef = jax.tree.flatten(owner)
    kind_leaves = treedef.flatten_up_to(kinds)
    weight_leaves = treedef.flatten_up_to(weights) if weights is not None else [None] * len(leaves)
    keys = jax.random.split(key, len(leaves)) if key is not None else [None] * len(leaves)
    out = []
    for o, kind, w, k in zip(leaves, kind_leaves, weight_leaves, keys):
        if _check_kind(kind) != GATED:
            out.append(o)
            continue
        count = share_count(int(jnp.sum(o == FREE)), task, task_count)
        scores = jax.random.uniform(k, o.shape) if policy == "random" else jnp.abs(w)
        out.append(_select(o, scores, count, task))
    return jax.tree.unflatten(treedef, out)


def release(owner: PyTree, kinds: PyTree, task: int) -> PyTree:
    """Free again the gated weights of ``task`` (used to retry a selection)."""
    return jax.tree.map(
        lambda o, kind: jnp.where(o == task, FREE, o).astype(OWNER_DTYPE) if kind == GATED else o,
        owner,
        kinds,
    )


def free_fraction(owner: PyTree, kinds: PyTree) -> dict[str, float]:
    """Capacity left: the fraction of free weights of each gated layer, keyed by its path."""
    out = {}
    for (path, o), kind in zip(jax.tree_util.tree_flatten_with_path(owner)[0], jax.tree.leaves(kinds)):
        if kind == GATED:
            out[jax.tree_util.keystr(path, simple=True, separator="/")] = float(jnp.mean(o == FREE))
    return out


def capacity_left(owner: PyTree, kinds: PyTree) -> float:
    """The fraction of all gated weights still free."""
    free = total = 0
    for o, kind in zip(jax.tree.leaves(owner), jax.tree.leaves(kinds)):
        if kind == GATED:
            free += int(jnp.sum(o == FREE))
            total += o.size
    return free / max(total, 1)


def reinit_assigned(params: PyTree, owner: PyTree, kinds: PyTree, task: int, mode: str) -> PyTree:
    """Set the gated weights just given to ``task``: ``"zero"`` (as the MIND reference) or ``"keep"``."""
    if mode == "keep":
        return params
    if mode != "zero":
        raise ValueError(f"unknown init mode {mode!r}; expected 'zero' or 'keep'")
    return jax.tree.map(
        lambda p, o, kind: jnp.where(o == task, jnp.zeros_like(p), p) if kind == GATED else p,
        params,
        owner,
        kinds,
    )


def gate(params: PyTree, mask: PyTree) -> PyTree:
    """The parameters a sub-network computes with: masked-out weights read as exact zeros."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, mask)
