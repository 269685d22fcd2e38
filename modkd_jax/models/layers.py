"""Building blocks shared by the gated networks: per-task batch norm and leaf kinds.

Gating is applied to the *parameter pytree* inside the forward pass
(``masks.gate(params, mask)`` right before ``model.apply``), so modules hold
no masks and any Flax layer becomes gated; what each leaf is (a gated weight,
a classifier block, a per-task row) is read from its path by ``leaf_kinds``.

``Conv`` is a bias-free NHWC convolution with three interchangeable lowerings
(``CONV_IMPLS``) behind one parameter layout; ``materialize`` is a runtime
identity that stops XLA from recomputing a residual stream inside every
consumer (see ``benchmarks/train_step.py`` for the measured effect).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from modkd_jax import masks

PyTree = Any

# "xla": lax.conv_general_dilated in the input dtype (the default; float32 numerics);
# "bf16": the same conv on bfloat16 operands with float32 accumulation and output;
# "patches": im2col (strided slices concatenated) + one matmul.
CONV_IMPLS = ("xla", "bf16", "patches")
_DIMS = ("NHWC", "HWIO", "NHWC")


def _im2col(x: jax.Array, kh: int, kw: int, stride: int, pad: int) -> jax.Array:
    """Patches ``(N, H', W', kh*kw*C)`` in (row, column, channel) order, matching an HWIO kernel's reshape."""
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    cols = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, pad: int = 0, impl: str = "xla") -> jax.Array:
    """NHWC convolution with an HWIO kernel, symmetric zero padding ``pad``, lowered as ``impl``."""
    if impl == "xla":
        return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=_DIMS)
    if impl == "bf16":
        y = jax.lax.conv_general_dilated(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (stride, stride),
                                         ((pad, pad), (pad, pad)), dimension_numbers=_DIMS,
                                         preferred_element_type=jnp.float32)
        return y.astype(jnp.promote_types(x.dtype, jnp.float32))
    if impl == "patches":
        kh, kw, cin, cout = kernel.shape
        cols = _im2col(x, kh, kw, stride, pad)
        return jnp.dot(cols, kernel.reshape(kh * kw * cin, cout).astype(x.dtype))
    raise ValueError(f"unknown conv impl {impl!r}; expected one of {CONV_IMPLS}")


class Conv(nn.Module):
    """Bias-free 2-D convolution (``kernel`` HWIO, like ``nn.Conv``) with a selectable lowering ``impl``."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: int = 0
    impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        return conv2d(x.astype(self.dtype), kernel, self.strides, self.padding, self.impl)


def materialize(x: jax.Array) -> jax.Array:
    """``x`` unchanged (bit for bit), divided by a runtime 1 so XLA keeps it in memory.

    XLA's fusion duplicates cheap elementwise producers into their consumers;
    along a residual stream (``relu(bn(conv(x)) + x)`` block after block) that
    recomputes every earlier block inside each later block and inside the
    layout transposes of the weight gradients, quadratic in depth. A division
    is "expensive" to XLA, so it is never duplicated: the block output is
    written once and read back. ``x / 1 == x`` exactly for every normal float,
    infinity and signed zero; subnormals become zero of the same sign, as they
    do in every arithmetic op on XLA:CPU (flush-to-zero), so a network's outputs
    and gradients are unchanged. The divisor ``sign(|x| + 1)`` is elementwise
    (1, or NaN where ``x`` is NaN), so nothing is read across devices when
    ``x`` is sharded along the batch. (``lax.optimization_barrier`` also stops
    the duplication but was measured slower: it blocks fusion on both sides.)
    """
    return x / jnp.sign(jnp.abs(x) + 1)


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
