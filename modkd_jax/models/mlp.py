"""MLP for small images (28x28 MNIST, 8x8 digits): gated dense layers, per-task batch norm."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from modkd_jax.models.layers import TaskBatchNorm


class MLP(nn.Module):
    """Flatten -> [Dense (no bias) -> per-task BN -> ReLU] x len(hidden) -> classifier.

    The classifier's outputs are the class blocks of all tasks side by side;
    ``with_features`` also returns its input (the last hidden layer); ``weights`` (per example, e.g. a
    padded batch's ``valid`` mask) restricts the training batch statistics to the weighted examples.
    """

    num_outputs: int
    num_tasks: int = 1
    hidden: Sequence[int] = (400, 400)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, task=0, train: bool = False, with_features: bool = False,
                 weights: jax.Array | None = None):
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, use_bias=False, dtype=self.dtype, name=f"dense{i}")(x)
            x = TaskBatchNorm(self.num_tasks, name=f"bn{i}")(x, task, train, weights)
            x = nn.relu(x)
        logits = nn.Dense(self.num_outputs, dtype=self.dtype, name="classifier")(x).astype(jnp.float32)
        return (logits, x.astype(jnp.float32)) if with_features else logits
