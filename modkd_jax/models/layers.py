"""Building blocks shared by the gated networks: per-task batch norm and leaf kinds.

Gating is applied to the *parameter pytree* inside the forward pass
(``masks.gate(params, mask)`` right before ``model.apply``), so modules hold
no masks and any Flax layer becomes gated; what each leaf is (a gated weight,
a classifier block, a per-task row) is read from its path by ``leaf_kinds``.

``Conv`` is a bias-free NHWC convolution with interchangeable lowerings
(``CONV_IMPLS``) behind one parameter layout, optionally one kernel per task
(a leading task axis, like ``TaskBatchNorm``'s rows); ``materialize`` is a runtime
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
# "patches": im2col (strided slices concatenated) + one matmul;
# "auto": "patches" on maps of at most 4x4 pixels (XLA:CPU's conv took 3.1 s against 0.015 s for a 3x3
# 512->512 conv on 64 maps of 2x2, 2 cores), else "xla".
CONV_IMPLS = ("xla", "bf16", "patches", "auto")
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
    if impl == "auto":
        impl = "patches" if min(x.shape[1], x.shape[2]) <= 4 and kernel.shape[0] * kernel.shape[1] > 1 else "xla"
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


def _per_task(init: Any, num_tasks: int) -> Any:
    """An initializer of ``num_tasks`` independent rows stacked on a leading axis."""
    return lambda key, shape, dtype=jnp.float32: jax.vmap(lambda k: init(k, shape[1:], dtype))(
        jax.random.split(key, num_tasks))


class Conv(nn.Module):
    """Bias-free 2-D convolution (``kernel`` HWIO, like ``nn.Conv``) with a selectable lowering ``impl``.

    ``num_tasks > 0``: one kernel per task (``kernel`` of shape ``(num_tasks, *HWIO)``), row ``task`` used.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: int = 0
    impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    num_tasks: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, task=None) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        if self.num_tasks:
            kernel = self.param("kernel", _per_task(self.kernel_init, self.num_tasks), (self.num_tasks, *shape),
                                jnp.float32)[task]
        else:
            kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
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


def _row(a: jax.Array, task) -> jax.Array:
    """Row ``task`` of ``a``, or its only row (a parameter or statistic shared by every task)."""
    return a[0] if a.shape[0] == 1 else a[task]


class TaskBatchNorm(nn.Module):
    """Batch norm with one set of parameters and running statistics per task.

    ``task`` may be traced (selected inside ``jit`` and ``vmap``); in training
    only row ``task`` of the running statistics moves. ``param_rows=1`` shares
    scale and bias between tasks; ``use_running_average`` normalises with the
    running statistics even in training (a frozen layer: they never move).
    ``weights`` (per example) restricts the batch statistics to weighted
    examples; with none weighted the running statistics stay bit-identical.
    """

    num_tasks: int
    momentum: float = 0.9
    epsilon: float = 1e-5
    param_rows: int | None = None  # rows of scale/bias: num_tasks (None) or 1
    use_running_average: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, task, train: bool, weights: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        shape = (self.num_tasks, c)
        prow = (self.param_rows or self.num_tasks, c)
        scale = self.param("scale", nn.initializers.ones, prow, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, prow, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
        xf = x.astype(jnp.float32)
        if train and not self.use_running_average:
            axes = tuple(range(x.ndim - 1))
            if weights is None:
                mean = jnp.mean(xf, axes)
                var = jnp.mean(jnp.square(xf - mean), axes)
                seen = True
            else:
                w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
                count = jnp.sum(weights.astype(jnp.float32)) * (x.size // (x.shape[0] * c))
                mean = jnp.sum(w * xf, axes) / jnp.maximum(count, 1.0)
                var = jnp.sum(w * jnp.square(xf - mean), axes) / jnp.maximum(count, 1.0)
                seen = count > 0
            if not self.is_initializing():
                m, r = self.momentum, 0 if self.num_tasks == 1 else task
                for ra, new in ((ra_mean, mean), (ra_var, var)):
                    old = ra.value[r]
                    moved = m * old + (1 - m) * new
                    ra.value = ra.value.at[r].set(moved if seen is True else jnp.where(seen, moved, old))
        else:
            mean, var = _row(ra_mean.value, task), _row(ra_var.value, task)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * _row(scale, task) + _row(bias, task)).astype(x.dtype)


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
