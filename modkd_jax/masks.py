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

import functools
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
    """Initial owner maps: gated weights free, classifier blocks and per-task rows pre-assigned.

    Args:
      params: the parameter pytree (only the leaves' shapes are read).
      kinds: the params' structure, each leaf ``GATED``, ``CLASSIFIER`` or ``PER_TASK``.
      block_sizes: the classes of each task, in order (the classifier leaves' last axis is their sum).
    """
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
    """Weights sub-network ``task`` computes with: those owned by tasks <= task.

    Args:
      owner: the owner maps (``init_owners``, ``assign``).
      task: the task id (an int or a traced array).
    """
    return jax.tree.map(lambda o: (o >= 0) & (o <= task), owner)


def trainable_mask(owner: PyTree, task) -> PyTree:
    """Weights that receive updates while training ``task``: those it owns.

    Args:
      owner: the owner maps (``init_owners``, ``assign``).
      task: the task id (an int or a traced array).
    """
    return jax.tree.map(lambda o: o == task, owner)


def dense_masks(owner: PyTree, task) -> tuple[PyTree, PyTree]:
    """``(forward, trainable)`` of training ``task`` on every free weight too: earlier tasks' weights compute but
    stay frozen, the free ones and ``task``'s own learn (MIND's dense student, PackNet's training phase).

    Args:
      owner: the owner maps (``init_owners``, ``assign``).
      task: the task id (an int or a traced array).
    """
    return (jax.tree.map(lambda o: o <= task, owner),  # FREE (-1) <= task too
            jax.tree.map(lambda o: (o == FREE) | (o == task), owner))


def free_mask(owner: PyTree) -> PyTree:
    """Weights no task owns yet."""
    return jax.tree.map(lambda o: o == FREE, owner)


def full_mask(params: PyTree) -> PyTree:
    """An all-True mask (a dense network: the teacher)."""
    return jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)


def share_count(free, task, task_count):
    """How many of a layer's ``free`` weights task ``task`` of ``task_count`` receives (ints or traced arrays).

    Args:
      free: the layer's weights still free before ``task``; they are split evenly over the tasks left, so the
        shares of all tasks add up to the whole layer (the last task takes the remainder).
      task: the task id, from 0.
      task_count: the number of tasks of the run.
    """
    return free // (task_count - task)


def _check_task(task: int, task_count: int) -> None:
    """Refuse a task id outside ``0..task_count - 1`` (its share would be undefined)."""
    if not 0 <= task < task_count:
        raise ValueError(f"task {task} is outside 0..{task_count - 1}")


def _check_policy(policy: str, key, weights) -> None:
    """Refuse an unknown selection policy, or one missing the input it ranks by."""
    if policy == "random":
        if key is None:
            raise ValueError("policy='random' needs a PRNG key")
    elif policy == "magnitude":
        if weights is None:
            raise ValueError("policy='magnitude' needs the trained weights to rank")
    else:
        raise ValueError(f"unknown selection policy {policy!r}; expected 'random' or 'magnitude'")


def _select(owner: jax.Array, scores: jax.Array, count, task) -> jax.Array:
    """Give the ``count`` free weights with the highest ``scores`` to ``task``; ``count`` and ``task`` may be traced.

    The whole layer is ranked by ``lax.top_k`` with ``k`` = its size (a static shape), so one program serves
    every count, and the first ``count`` ranks are exactly what ``top_k(scores, count)`` picks (same order on
    ties: lower index first).
    """
    flat_owner = owner.reshape(-1)
    flat_scores = jnp.where(flat_owner == FREE, scores.reshape(-1).astype(jnp.float32), -jnp.inf)
    _, order = jax.lax.top_k(flat_scores, flat_scores.size)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype), unique_indices=True)
    return jnp.where(rank < count, jnp.asarray(task, OWNER_DTYPE), flat_owner).reshape(owner.shape)


@functools.partial(jax.jit, static_argnames="policy")
def _share(owner: jax.Array, source, index, task, task_count, *, policy: str) -> jax.Array:
    """``owner`` with ``task``'s share of its free weights, ranked by ``policy`` on ``source``.

    ``source`` is the keys split for the whole tree (``"random"``: this leaf draws from key ``index``) or the
    leaf's weights (``"magnitude"``). Everything but the policy is traced: one program per leaf shape serves
    every task.
    """
    scores = jax.random.uniform(source[index], owner.shape) if policy == "random" else jnp.abs(source)
    return _select(owner, scores, share_count(jnp.sum(owner == FREE), task, task_count), task)


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

    Classifier blocks and per-task rows are already owned and are left alone.
    Each gated layer is one jitted call whose program later tasks reuse (no host sync, no recompile).

    Args:
      owner: the owner maps.
      kinds: the leaf kinds, the owner maps' structure.
      task: the task that receives weights, in ``0..task_count - 1``.
      task_count: the number of tasks of the run.
      policy: ``"random"`` draws uniformly among free weights from ``key``; ``"magnitude"`` keeps the largest
        ``|w|`` of ``weights``.
      key: the PRNG key of ``"random"``.
      weights: the (trained) parameters ``"magnitude"`` ranks.

    Returns:
      The owner maps with ``task``'s share marked.
    """
    _check_policy(policy, key, weights)
    _check_task(int(task), int(task_count))
    task, task_count = np.int32(task), np.int32(task_count)
    leaves, treedef = jax.tree.flatten(owner)
    keys = jax.random.split(key, len(leaves)) if policy == "random" else None  # leaf i draws from key i
    weight_leaves = treedef.flatten_up_to(weights) if policy == "magnitude" else None
    out = []
    for i, (o, kind) in enumerate(zip(leaves, treedef.flatten_up_to(kinds))):
        if _check_kind(kind) != GATED:
            out.append(o)
            continue
        source = keys if policy == "random" else weight_leaves[i]
        out.append(_share(o, source, np.int32(i), task, task_count, policy=policy))
    return jax.tree.unflatten(treedef, out)


def free_fraction(owner: PyTree, kinds: PyTree) -> dict[str, float]:
    """Capacity left: the fraction of free weights of each gated layer, keyed by its path.

    Args:
      owner: the owner maps.
      kinds: the leaf kinds, the owner maps' structure.
    """
    out = {}
    for (path, o), kind in zip(jax.tree_util.tree_flatten_with_path(owner)[0], jax.tree.leaves(kinds)):
        if kind == GATED:
            out[jax.tree_util.keystr(path, simple=True, separator="/")] = float(jnp.mean(o == FREE))
    return out


def capacity_left(owner: PyTree, kinds: PyTree) -> float:
    """The fraction of all gated weights still free.

    Args:
      owner: the owner maps.
      kinds: the leaf kinds, the owner maps' structure.
    """
    free = total = 0
    for o, kind in zip(jax.tree.leaves(owner), jax.tree.leaves(kinds)):
        if kind == GATED:
            free += int(jnp.sum(o == FREE))
            total += o.size
    return free / max(total, 1)


def reinit_assigned(params: PyTree, owner: PyTree, kinds: PyTree, task: int, mode: str) -> PyTree:
    """Set the gated weights just given to ``task``: ``"zero"`` (as the MIND reference) or ``"keep"``.

    Args:
      params: the parameters.
      owner: the owner maps, with ``task``'s share assigned (``assign``).
      kinds: the leaf kinds (only ``GATED`` leaves change).
      task: the task whose weights are reset.
      mode: ``"zero"`` sets them to 0; ``"keep"`` returns ``params`` as they are.
    """
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
    """The parameters a sub-network computes with: masked-out weights read as exact zeros.

    Args:
      params: the parameters.
      mask: the params' structure, True where a weight is used (``forward_mask``); leaves broadcast to the params.
    """
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, mask)
