"""EWC's diagonal empirical Fisher: per-example squared gradients of the log-likelihood, summed on the device."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from modkd_jax import losses
from modkd_jax.data import batching
from modkd_jax.training import block

PyTree = Any


def make_fisher(apply_fn: Callable, block_size: int, mean, std, seen_classes: bool = False):
    """``fisher(variables, x, y, valid, task)``: per leaf, sum over valid examples of (d log p(y|x) / dw)^2; jitted.

    p is the softmax over the task's class block; labels are task-local; per-example gradients by vmap.

    Args:
      apply_fn: the model's ``apply(variables, x, task, train=False) -> logits``.
      block_size: the classes per task.
      mean: per-channel mean of ``batching.to_float`` (``x`` comes as uint8).
      std: per-channel standard deviation of it.
      seen_classes: p over every class up to and including the task's block (one head over all tasks seen so far).
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def fisher(variables, x, y, valid, task):
        def log_p(params, xi, yi):
            logits = apply_fn({"params": params, "batch_stats": variables["batch_stats"]}, xi[None], task,
                              train=False)[0]
            if seen_classes:
                z = losses.masked_logits(logits, jnp.arange(logits.shape[-1]) < (task + 1) * block_size)
                return jax.nn.log_softmax(z)[yi + task * block_size]
            return jax.nn.log_softmax(block(logits, task, block_size))[yi]

        xf = batching.to_float(x, mean, std)
        grads = jax.vmap(jax.grad(log_p), in_axes=(None, 0, 0))(variables["params"], xf, y)
        w = valid.astype(jnp.float32)
        return jax.tree.map(lambda g: jnp.tensordot(w, jnp.square(g), axes=1), grads)

    return fisher


def fisher_diagonal(fisher, variables: PyTree, split, task: int, samples: int = 1024, batch_size: int = 128) -> PyTree:
    """Diagonal empirical Fisher (a mean) of ``task`` on the first ``samples`` examples of ``split``.

    Args:
      fisher: the function of ``make_fisher``.
      variables: ``{"params", "batch_stats"}`` of the model.
      split: the task's training split (``x`` uint8, ``y`` task-local labels).
      task: the task index.
      samples: at most this many examples, the first of ``split``.
      batch_size: examples per call of ``fisher``.
    """
    n = min(samples, len(split.y))
    total = None
    for x, y, valid in batching.pad_batches(split.x[:n], split.y[:n], min(batch_size, n)):
        f = fisher(variables, x, y, valid, jnp.int32(task))
        total = f if total is None else jax.tree.map(jnp.add, total, f)
    return jax.tree.map(lambda v: v / n, total)
