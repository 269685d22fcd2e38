"""ResNet-32 (CIFAR, parameter-free shortcuts) and ResNet-18 (CIFAR or ImageNet stem).

All convolutions are bias-free and followed by per-task batch norm, so gating
the conv kernels and selecting the task's BN row gives sub-network t exactly.

Speed knobs that leave the parameters and the API alone: ``conv_impl`` picks
the convolution lowering (``layers.CONV_IMPLS``; "xla" is the default, "bf16"
measured ~10% faster on an AVX512-BF16 CPU at bfloat16 precision, "patches"
slower), ``materialize`` writes each block's output once instead of letting XLA
recompute the residual stream in every consumer (bit-identical results, MIND's
teacher and distillation steps ~1.4x faster on XLA:CPU; see
``benchmarks/results/train_step.txt``).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from modkd_jax.models.layers import CONV_IMPLS, Conv, TaskBatchNorm
from modkd_jax.models.layers import materialize as _materialize

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; ``shortcut`` 'pad' (option A, no params) or 'conv' (1x1 projection)."""

    features: int
    strides: int
    num_tasks: int
    shortcut: str = "pad"
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"
    materialize: bool = True

    @nn.compact
    def __call__(self, x, task, train):
        conv = partial(Conv, kernel_init=_conv_init, impl=self.conv_impl, dtype=self.dtype)
        y = conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = nn.relu(TaskBatchNorm(self.num_tasks, name="bn1")(y, task, train))
        y = conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
        y = TaskBatchNorm(self.num_tasks, name="bn2")(y, task, train)
        if x.shape[-1] != self.features or self.strides != 1:
            if self.shortcut == "pad":
                x = x[:, :: self.strides, :: self.strides, :]
                extra = self.features - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            else:
                x = conv(self.features, (1, 1), self.strides, name="proj")(x)
                x = TaskBatchNorm(self.num_tasks, name="bn_proj")(x, task, train)
        out = nn.relu(x + y)
        return _materialize(out) if self.materialize else out


class ResNet(nn.Module):
    """A stack of basic-block stages with a stem, global average pooling and a class-block classifier."""

    num_outputs: int
    stage_sizes: Sequence[int]
    widths: Sequence[int]
    num_tasks: int = 1
    stem: str = "cifar"  # "cifar": 3x3 s1; "imagenet": 7x7 s2 + max-pool
    shortcut: str = "pad"
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"  # one of layers.CONV_IMPLS
    materialize: bool = True  # write each block's output once (see module docstring)

    def features(self, x: jax.Array, task, train: bool) -> jax.Array:
        """Pooled features before the classifier."""
        x = x.astype(self.dtype)
        conv = partial(Conv, kernel_init=_conv_init, impl=self.conv_impl, dtype=self.dtype, name="stem")
        if self.stem == "imagenet":
            x = conv(self.widths[0], (7, 7), 2, padding=3)(x)
        else:
            x = conv(self.widths[0], (3, 3), 1, padding=1)(x)
        x = nn.relu(TaskBatchNorm(self.num_tasks, name="bn_stem")(x, task, train))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(blocks):
                x = BasicBlock(width, 2 if (b == 0 and s > 0) else 1, self.num_tasks, self.shortcut,
                               self.dtype, self.conv_impl, self.materialize,
                               name=f"stage{s}_block{b}")(x, task, train)
        return jnp.mean(x, axis=(1, 2))

    @nn.compact
    def __call__(self, x: jax.Array, task=0, train: bool = False) -> jax.Array:
        h = self.features(x, task, train)
        return nn.Dense(self.num_outputs, dtype=self.dtype, name="classifier")(h).astype(jnp.float32)


def _check_impl(conv_impl: str) -> str:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {conv_impl!r}; expected one of {CONV_IMPLS}")
    return conv_impl


def resnet32(num_outputs: int, num_tasks: int = 1, dtype=jnp.float32, conv_impl: str = "xla",
             materialize: bool = True) -> ResNet:
    """ResNet-32 for 32x32 inputs: 16/32/64 channels, 5 blocks per stage, parameter-free shortcuts."""
    return ResNet(num_outputs, (5, 5, 5), (16, 32, 64), num_tasks, "cifar", "pad", dtype, _check_impl(conv_impl),
                  materialize)


def resnet18(num_outputs: int, num_tasks: int = 1, stem: str = "cifar", dtype=jnp.float32, conv_impl: str = "xla",
             materialize: bool = True) -> ResNet:
    """ResNet-18: 64-512 channels, 2 blocks per stage, 1x1 projection shortcuts; CIFAR or ImageNet stem."""
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"unknown stem {stem!r}; expected 'cifar' or 'imagenet'")
    return ResNet(num_outputs, (2, 2, 2, 2), (64, 128, 256, 512), num_tasks, stem, "conv", dtype,
                  _check_impl(conv_impl), materialize)
