"""Training the split ResNet-18 online: per-group learning rates behind ``optim.gated``, the task rows' gate, the
weighted cross-entropy of one task or a mixed batch, the train step and one pass over host batches."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from modkd_jax import training
from modkd_jax.data import batching
from modkd_jax.epochs import run_epoch
from modkd_jax.methods.split_backbone_net import SplitBackbone, apply, apply_all, group_labels, path_names

PyTree = Any


def make_optimizer(net: SplitBackbone, lr_shared: float, lr_task: float, optimizer: str = "sgd",
                   momentum: float = 0.9):
    """``training.make_optimizer`` with a learning rate per group (frozen: none, shared, task), gated.

    Args:
        net: the split network (its plan labels every parameter).
        lr_shared: learning rate of the shared group.
        lr_task: learning rate of the task group.
        optimizer: "sgd" or "adam".
        momentum: SGD momentum (0: none).
    """
    return training.make_optimizer(optimizer, {"frozen": None, "shared": lr_shared, "task": lr_task},
                                   momentum=momentum, groups=functools.partial(group_labels, net))


def train_mask(net: SplitBackbone, params: dict, rows) -> dict:
    """Gate: frozen never, shared always, task rows (and head blocks) only where ``rows`` (bool per task).

    Leaves broadcast against their parameter (scalars, ``(T, 1, ...)`` rows, the head's ``(T * K,)``).
    """
    K = net.head_width
    rows = jnp.asarray(rows, bool)

    def mask(path, a, g):
        if g != "task":
            return jnp.asarray(g == "shared")
        if path_names(path)[0] == "classifier":
            return jnp.repeat(rows, K)
        return rows.reshape((-1,) + (1,) * (a.ndim - 1))

    return jax.tree_util.tree_map_with_path(mask, params, group_labels(net, params))


class StreamBatch(NamedTuple):
    """One online batch: uint8 (or standardised) images, task-local labels, task ids, real-example flags."""

    x: jax.Array
    y: jax.Array
    task: jax.Array  # int32: a scalar (Setting 1) or one per example (Setting 2)
    valid: jax.Array  # bool per example (the last batch is zero-padded)


class Context(NamedTuple):
    """What ``training.make_step`` needs besides the batch: the gate of ``optim.gated``."""

    trainable: PyTree


def _weighted_ce(logits: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)


def make_loss(net: SplitBackbone, mixed: bool = False) -> Callable:
    """The weighted cross-entropy of ``training.make_step``: ``(params, stats, batch, ctx) -> (loss, (stats, m))``.

    ``mixed=False``: the batch is one task's (``batch.task`` a scalar), only that
    task's network runs. ``mixed=True`` (Setting 2): every task's network runs on
    the batch, its loss and BN statistics restricted to its own examples; the
    shared weights get the sum of their gradients. Frozen parameters are
    constants (no gradient is computed through them).
    """
    T = net.num_tasks

    def loss_fn(params, stats, batch: StreamBatch, ctx: Context):
        del ctx
        params = jax.tree.map(lambda a, g: jax.lax.stop_gradient(a) if g == "frozen" else a, params,
                              group_labels(net, params))
        w = batch.valid.astype(jnp.float32)
        if not mixed:
            logits, new = apply(net, params, stats, batch.x, batch.task, True, w)
        else:
            ws = w[None, :] * (batch.task[None, :] == jnp.arange(T)[:, None])
            all_logits, new = apply_all(net, params, stats, batch.x, True, ws)
            logits = all_logits[batch.task, jnp.arange(len(batch.y))]
        loss = _weighted_ce(logits, batch.y, w)
        acc = jnp.sum(w * (jnp.argmax(logits, -1) == batch.y)) / jnp.maximum(jnp.sum(w), 1.0)
        return loss, (new, {"acc": acc})

    return loss_fn


def make_train_step(net: SplitBackbone, tx, mixed: bool = False) -> Callable:
    """``step(carry=(params, stats, opt_state), batch: StreamBatch, key, ctx: Context)``: ``training.make_step``.

    The batch's uint8 images are standardised outside the gradient; ``ctx.trainable``
    (``train_mask``) gates the optimizer.
    """
    mean, std = jnp.asarray(net.mean), jnp.asarray(net.std)
    prepare = lambda batch, key, ctx: batch._replace(x=batching.to_float(batch.x, mean, std))  # noqa: E731
    return training.make_step(make_loss(net, mixed), tx, prepare)


def task_batches(split, task: int, batch_size: int, key: jax.Array) -> Iterator[tuple]:
    """One shuffled pass over one task's split: ``(x, y, task)`` host batches (Setting 1)."""
    order = np.asarray(jax.random.permutation(key, len(split.y)))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield split.x[idx], split.y[idx], task


def make_gate(net: SplitBackbone) -> Callable:
    """``gate(params, task, valid) -> Context``: the task copies with real examples in the batch train.

    The mask depends only on which tasks are present (``params`` give its structure), so it is built
    once per pattern of tasks and reused: one per task in setting 1, a few in the merged stream.
    """
    T = net.num_tasks
    mask = jax.jit(functools.partial(train_mask, net))
    built: dict[bytes, Context] = {}

    def gate(params, task, valid) -> Context:
        task = np.asarray(task)
        if task.ndim:
            rows = np.any((task[None, :] == np.arange(T)[:, None]) & np.asarray(valid)[None, :], axis=1)
        else:
            rows = np.arange(T) == task
        if rows.tobytes() not in built:
            built[rows.tobytes()] = Context(mask(params, rows))
        return built[rows.tobytes()]

    return gate


def train_online(step: Callable, gate: Callable, carry, batches: Iterable[tuple], batch_size: int, *,
                 total: int | None = None, desc: str = "", progress: bool = False):
    """One pass of ``step`` over host batches ``(x, y, task)``, each example seen once: carry, mean metrics.

    Every batch is zero-padded to ``batch_size`` (``batching.pad_batches``: one
    compiled shape); ``gate`` (``make_gate``) opens the task copies present in it.
    """
    key = jax.random.key(0)  # unused: no augmentation

    def padded(x, y, task):
        x, y, valid = next(batching.pad_batches(np.asarray(x), np.asarray(y), batch_size))
        task = np.asarray(task, np.int32)
        if task.ndim:  # one task id per example: padded like the labels
            task = np.concatenate([task, np.zeros(batch_size - len(task), np.int32)])
        return x, y, task, valid

    def gated(carry, x, y, task, valid):
        return step(carry, StreamBatch(x, y, jnp.asarray(task), valid), key, gate(carry[0], task, valid))

    carry, means, steps = run_epoch(gated, carry, (padded(*b) for b in batches), total=total, desc=desc,
                                    progress=progress)
    return carry, {**{k: float(v) for k, v in means.items()}, "steps": steps}
