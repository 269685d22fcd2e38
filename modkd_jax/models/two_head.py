"""DKT's network: one shared feature extractor with two linear heads, ``cl_head`` and ``student_head``.

The CL head learns the agent's own stream by cross-entropy; the student head
learns only from a teacher's soft targets. Both heads have one row per global
class of the dataset, so the logits of two agents with different class orders
mean the same classes and can be compared and distilled directly.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from modkd_jax.models.layers import TaskBatchNorm
from modkd_jax.models.resnet import ResNet, resnet18, resnet32

BACKBONES = ("mlp", "resnet32", "resnet18")


class MLPFeatures(nn.Module):
    """Flatten -> [Dense (no bias) -> batch norm -> ReLU] x len(hidden), for 28x28 and 8x8 images."""

    hidden: Sequence[int] = (400, 400)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, use_bias=False, dtype=self.dtype, name=f"dense{i}")(x)
            x = nn.relu(TaskBatchNorm(1, name=f"bn{i}")(x, 0, train))  # one BN: no task id at test time
        return x


class ResNetFeatures(ResNet):
    """The project's ResNet (one batch-norm row) returning its pooled ``features``; no classifier."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.features(x, 0, train)


def _resnet_features(arch: str, dtype) -> ResNetFeatures:
    """ResNet-32 or ResNet-18 (CIFAR stem) as a feature extractor, same layers as ``models.resnet``."""
    net = resnet32(1, 1, dtype=dtype) if arch == "resnet32" else resnet18(1, 1, dtype=dtype)
    fields = {f.name: getattr(net, f.name) for f in dataclasses.fields(net)
              if f.init and f.name not in ("parent", "name")}
    return ResNetFeatures(**fields)


class TwoHead(nn.Module):
    """Shared features -> (CL-head logits, student-head logits), each ``[batch, num_classes]`` float32."""

    num_classes: int
    backbone: str = "mlp"
    hidden: Sequence[int] = (400, 400)
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        if self.backbone == "mlp":
            self.features = MLPFeatures(tuple(self.hidden), self.dtype)
        elif self.backbone in ("resnet32", "resnet18"):
            self.features = _resnet_features(self.backbone, self.dtype)
        else:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {BACKBONES}")
        self.cl_head = nn.Dense(self.num_classes, dtype=self.dtype)
        self.student_head = nn.Dense(self.num_classes, dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        h = self.features(x, train)
        return self.cl_head(h).astype(jnp.float32), self.student_head(h).astype(jnp.float32)


def init(model: TwoHead, key: jax.Array, input_shape: tuple[int, ...]):
    """``(params, batch_stats)`` of ``model`` for inputs of shape ``(H, W, C)``."""
    variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return variables["params"], variables["batch_stats"]
