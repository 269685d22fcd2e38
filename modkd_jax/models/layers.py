"""Building blocks shared by the gated networks: per-task batch norm and leaf kinds.

Gating is applied to the *parameter pytree* inside the forward pass
(``masks.gate(params, mask)`` right before ``model.apply``), so modules hold
no masks and any Flax layer becomes gated; what each leaf is (a gated weight,
a classifier block, a per-task row) is read from its path by ``leaf_kinds``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from modkd_jax import masks

PyTree = Any


class TaskBatchNorm(nn.Module):
    """Batch norm with one set of parameters and running statistics per task.

    ``task`` may be traced (selected inside ``jit`` and ``vmap``); in training
    only row ``task`` of the running statistics moves.
    """

    num_tasks: int
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, task, train: bool) -> jax.Array:
        c = x.shape[-1]
        shape = (self.num_tasks, c)
        scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = ra_mean.value.at[task].set(m * ra_mean.value[task] + (1 - m) * mean)
                ra_var.value = ra_var.value.at[task].set(m * ra_var.value[task] + (1 - m) * var)
        else:
            mean, var = ra_mean.value[task], ra_var.value[task]
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale[task] + bias[task]).astype(x.dtype)


def _kind_of(path: tuple) -> str:
    names = [getattr(k, "key", str(k)) for k in path]
    if any(n == "classifier" for n in names):
        return masks.CLASSIFIER
    if any(n.startswith("TaskBatchNorm") or n.startswith("bn") for n in names[:-1]):
        return masks.PER_TASK
    if names[-1] == "kernel":
        return masks.GATED
    raise ValueError(f"cannot tell how parameter {'/'.join(names)} is shared between tasks")


def leaf_kinds(params: PyTree) -> PyTree:
    """The kind of every parameter leaf (gated / classifier / per_task), read from its path."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _kind_of(path), params)


def param_count(params: PyTree) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
