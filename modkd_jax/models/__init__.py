"""Gated Flax networks: ResNet-32, ResNet-18, MLP, with per-task batch norm and class blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modkd_jax.models.layers import TaskBatchNorm, leaf_kinds, param_count
from modkd_jax.models.mlp import MLP
from modkd_jax.models.resnet import STEMS, ResNet, resnet18, resnet32

ARCHS = ("mlp", "resnet32", "resnet18")


def build(arch: str, num_outputs: int, num_tasks: int = 1, dtype=jnp.float32, **kwargs):
    """The network ``arch`` with ``num_outputs`` classifier rows and ``num_tasks`` batch-norm rows.

    Args:
      arch: one of ``ARCHS``.
      num_outputs: the classifier's outputs (every task's class block).
      num_tasks: the rows of per-task batch norm.
      dtype: the computation dtype.
      **kwargs: go to the constructor (MLP ``hidden``; ResNet ``conv_impl``, ``materialize``, ResNet-18
        ``stem``, ``conv``, ``norm``).
    """
    if arch == "mlp":
        return MLP(num_outputs, num_tasks, dtype=dtype, **kwargs)
    if arch == "resnet32":
        return resnet32(num_outputs, num_tasks, dtype=dtype, **kwargs)
    if arch == "resnet18":
        return resnet18(num_outputs, num_tasks, dtype=dtype, **kwargs)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


def init(model, key: jax.Array, input_shape: tuple[int, ...]):
    """``(params, batch_stats)`` of ``model`` for inputs of shape ``(H, W, C)``.

    Args:
      model: the network (``build``).
      key: the PRNG key of the initialisation.
      input_shape: one input's shape ``(H, W, C)``.
    """
    variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), 0, train=False)
    return variables["params"], variables["batch_stats"]




def feature_dim(model, input_shape: tuple[int, ...]) -> int:
    """Width of the features ``model(..., with_features=True)`` returns (shapes only, nothing computed).

    Args:
      model: the network (``build``).
      input_shape: one input's shape ``(H, W, C)``.
    """
    params, batch_stats = jax.eval_shape(lambda: init(model, jax.random.key(0), input_shape))
    out = jax.eval_shape(lambda p, b: model.apply({"params": p, "batch_stats": b},
                                                  jnp.zeros((1, *input_shape)), 0, with_features=True),
                         params, batch_stats)
    return int(out[1].shape[-1])


__all__ = ["ARCHS", "MLP", "ResNet", "STEMS", "TaskBatchNorm", "build", "feature_dim", "init", "leaf_kinds", "param_count",
           "resnet18", "resnet32"]
