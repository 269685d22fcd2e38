"""ResNet-32 (CIFAR, parameter-free shortcuts) and ResNet-18 (CIFAR or ImageNet stems).

All convolutions are bias-free and followed by per-task batch norm, so gating
the conv kernels and selecting the task's BN row gives sub-network t exactly.
``conv`` and ``norm`` inject the module built for each layer, chosen by its
path (``"stem"``, ``"stage3_block1/conv2"``, ``"stage3_block1/bn2"``): e.g.
per-task kernels (``layers.Conv(num_tasks=T)``) or a frozen batch norm
(``methods.split_backbone`` builds its frozen / shared / per-task split so).

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
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from modkd_jax.models.layers import CONV_IMPLS, Conv, TaskBatchNorm
from modkd_jax.models.layers import materialize as _materialize

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# stem: (kernel, stride, 3x3/2 max-pool); the 7x7 ones share ImageNet's parameters (32 px in: 8, 16, 32 px out)
STEMS = {"cifar": (3, 1, False), "imagenet": (7, 2, True), "no_pool": (7, 2, False), "stride1": (7, 1, False)}
Factory = Callable[[str], Callable[..., nn.Module]]  # layer path -> module constructor


def _conv(factory: Factory | None, path: str, features: int, size: int, strides: int, padding: int, impl: str,
          dtype) -> nn.Module:
    """The conv module of layer ``path`` (``factory(path)``, else ``layers.Conv``), named as its last part."""
    cls = Conv if factory is None else factory(path)
    return cls(features, (size, size), strides, padding=padding, kernel_init=_conv_init, impl=impl, dtype=dtype,
               name=path.split("/")[-1])


def _norm(factory: Factory | None, path: str, num_tasks: int) -> nn.Module:
    """The batch norm of layer ``path`` (``factory(path)``, else ``layers.TaskBatchNorm``)."""
    cls = TaskBatchNorm if factory is None else factory(path)
    return cls(num_tasks, name=path.split("/")[-1])


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; ``shortcut`` 'pad' (option A, no params) or 'conv' (1x1 projection)."""

    features: int
    strides: int
    num_tasks: int
    shortcut: str = "pad"
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"
    materialize: bool = True
    conv: Factory | None = None
    norm: Factory | None = None

    @nn.compact
    def __call__(self, x, task, train, weights=None):
        conv = partial(_conv, self.conv, impl=self.conv_impl, dtype=self.dtype)
        norm = lambda n, h: _norm(self.norm, f"{self.name}/{n}", self.num_tasks)(h, task, train, weights)  # noqa: E731
        y = conv(f"{self.name}/conv1", self.features, 3, self.strides, 1)(x, task)
        y = nn.relu(norm("bn1", y))
        y = norm("bn2", conv(f"{self.name}/conv2", self.features, 3, 1, 1)(y, task))
        if x.shape[-1] != self.features or self.strides != 1:
            if self.shortcut == "pad":
                x = x[:, :: self.strides, :: self.strides, :]
                extra = self.features - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            else:
                x = norm("bn_proj", conv(f"{self.name}/proj", self.features, 1, self.strides, 0)(x, task))
        out = nn.relu(x + y)
        return _materialize(out) if self.materialize else out


class ResNet(nn.Module):
    """A stack of basic-block stages with a stem, global average pooling and a class-block classifier."""

    num_outputs: int
    stage_sizes: Sequence[int]
    widths: Sequence[int]
    num_tasks: int = 1
    stem: str = "cifar"  # one of STEMS: "cifar" 3x3/1; "imagenet" 7x7/2 + max-pool; "no_pool" 7x7/2; "stride1" 7x7/1
    shortcut: str = "pad"
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"  # one of layers.CONV_IMPLS
    materialize: bool = True  # write each block's output once (see module docstring)
    conv: Factory | None = None  # layer path -> conv constructor (default layers.Conv)
    norm: Factory | None = None  # layer path -> norm constructor (default layers.TaskBatchNorm)

    def features(self, x: jax.Array, task, train: bool, weights: jax.Array | None = None) -> jax.Array:
        """Pooled features before the classifier; ``weights`` (per example) weight the batch statistics."""
        x = x.astype(self.dtype)
        size, stride, pool = STEMS[self.stem]
        x = _conv(self.conv, "stem", self.widths[0], size, stride, size // 2, self.conv_impl, self.dtype)(x, task)
        x = nn.relu(_norm(self.norm, "bn_stem", self.num_tasks)(x, task, train, weights))
        if pool:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(blocks):
                x = BasicBlock(width, 2 if (b == 0 and s > 0) else 1, self.num_tasks, self.shortcut,
                               self.dtype, self.conv_impl, self.materialize, self.conv, self.norm,
                               name=f"stage{s}_block{b}")(x, task, train, weights)
        return jnp.mean(x, axis=(1, 2))

    @nn.compact
    def __call__(self, x: jax.Array, task=0, train: bool = False, weights: jax.Array | None = None,
                 with_features: bool = False):
        """Class-block logits; with ``with_features`` also the pooled features they come from."""
        h = self.features(x, task, train, weights)
        logits = nn.Dense(self.num_outputs, dtype=self.dtype, name="classifier")(h).astype(jnp.float32)
        return (logits, h.astype(jnp.float32)) if with_features else logits


def _check_impl(conv_impl: str) -> str:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {conv_impl!r}; expected one of {CONV_IMPLS}")
    return conv_impl


def resnet32(num_outputs: int, num_tasks: int = 1, dtype=jnp.float32, conv_impl: str = "xla",
             materialize: bool = True, conv: Factory | None = None, norm: Factory | None = None) -> ResNet:
    """ResNet-32 for 32x32 inputs: 16/32/64 channels, 5 blocks per stage, parameter-free shortcuts."""
    return ResNet(num_outputs, (5, 5, 5), (16, 32, 64), num_tasks, "cifar", "pad", dtype, _check_impl(conv_impl),
                  materialize, conv, norm)


def resnet18(num_outputs: int, num_tasks: int = 1, stem: str = "cifar", dtype=jnp.float32, conv_impl: str = "xla",
             materialize: bool = True, conv: Factory | None = None, norm: Factory | None = None) -> ResNet:
    """ResNet-18: 64-512 channels, 2 blocks per stage, 1x1 projection shortcuts; a stem of ``STEMS``.

    Args:
        num_outputs: classifier outputs (all tasks' class blocks).
        num_tasks: rows of the per-task batch norm (and of injected per-task layers).
        stem: "cifar" (3x3/1) or an ImageNet 7x7 stem: "imagenet" (stride 2 + max-pool), "no_pool", "stride1".
        dtype: compute dtype.
        conv_impl: convolution lowering, one of ``layers.CONV_IMPLS``.
        materialize: write each block's output once (bit-identical, faster on XLA:CPU).
        conv: layer path -> conv constructor (default ``layers.Conv``).
        norm: layer path -> batch-norm constructor (default ``layers.TaskBatchNorm``).
    """
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; expected one of {', '.join(STEMS)}")
    return ResNet(num_outputs, (2, 2, 2, 2), (64, 128, 256, 512), num_tasks, stem, "conv", dtype,
                  _check_impl(conv_impl), materialize, conv, norm)
