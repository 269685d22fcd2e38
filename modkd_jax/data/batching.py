"""Device-side batching and augmentation: shuffled epochs over device-resident splits, jit-able transforms."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Number of batches one pass over `n` examples yields.

    Args:
      n: the examples.
      batch_size: examples per batch, at least 1.
      drop_remainder: leave out the last partial batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


@jax.jit
def _gather(arrays: tuple[jax.Array, ...], idx: jax.Array) -> tuple[jax.Array, ...]:
    """Take rows `idx` of every array in one compiled call."""
    return tuple(jnp.take(a, idx, axis=0) for a in arrays)


def _on_device(x, y, extra: Sequence) -> tuple[jax.Array, ...]:
    """Put a split and its aligned extra arrays on the default device once."""
    arrays = (x, y, *extra)
    n = len(x)
    for a in arrays:
        if len(a) != n:
            raise ValueError(f"all arrays must have {n} rows, got one with {len(a)}")
    return tuple(jax.device_put(a) for a in arrays)


def epoch_batches(
    x, y, batch_size: int, key: jax.Array, *, drop_remainder: bool = False, extra: Sequence = ()
) -> Iterator[tuple[jax.Array, ...]]:
    """One shuffled epoch of (x, y, *extra) device batches; the order comes from `key`.

    Args:
      x: the split's inputs ``[n, ...]`` (host or device).
      y: its labels ``[n]``.
      batch_size: examples per batch.
      key: the PRNG key of the permutation.
      drop_remainder: leave out the last partial batch.
      extra: more arrays of ``n`` rows, batched alike.
    """
    count = num_batches(len(x), batch_size, drop_remainder)
    arrays = _on_device(x, y, extra)
    perm = jax.random.permutation(key, len(x))
    for b in range(count):
        yield _gather(arrays, perm[b * batch_size : (b + 1) * batch_size])


def eval_batches(x, y, batch_size: int, *, extra: Sequence = ()) -> Iterator[tuple[jax.Array, ...]]:
    """Unshuffled (x, y, *extra) device batches covering the split, last short batch kept.

    Args:
      x: the split's inputs ``[n, ...]`` (host or device).
      y: its labels ``[n]``.
      batch_size: examples per batch.
      extra: more arrays of ``n`` rows, batched alike.
    """
    count = num_batches(len(x), batch_size, False)
    arrays = _on_device(x, y, extra)
    for b in range(count):
        yield tuple(a[b * batch_size : (b + 1) * batch_size] for a in arrays)


def to_float(x_uint8: jax.Array, mean, std) -> jax.Array:
    """Map uint8 pixels to standardised float32: (x/255 - mean)/std, mean/std per channel.

    Args:
      x_uint8: uint8 images, channels last.
      mean: per-channel mean, of pixels in [0, 1].
      std: per-channel standard deviation, of pixels in [0, 1].
    """
    return _standardize(x_uint8.astype(jnp.float32) / 255.0, mean, std)


def _standardize(x01: jax.Array, mean, std) -> jax.Array:
    """(x - mean) / std of float32 images in [0, 1], mean / std per channel."""
    return (x01 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@functools.partial(jax.jit, static_argnames=("pad", "flip"))
def random_crop_flip(key: jax.Array, x_uint8: jax.Array, pad: int = 4, flip: bool = True) -> jax.Array:
    """Per-example random crop of the zero-padded NHWC batch and random horizontal flip (uint8 in/out).

    Args:
      key: the PRNG key.
      x_uint8: uint8 images ``[N, H, W, C]``.
      pad: zero padding on each side before the crop (static).
      flip: also flip each image horizontally with probability 1/2 (static).
    """
    n, h, w, c = x_uint8.shape
    k_crop, k_flip = jax.random.split(key)
    padded = jnp.pad(x_uint8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    corners = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
    crop = jax.vmap(lambda img, yx: jax.lax.dynamic_slice(img, (yx[0], yx[1], 0), (h, w, c)))(padded, corners)
    if not flip:
        return crop
    mirror = jax.random.bernoulli(k_flip, 0.5, (n,))
    return jnp.where(mirror[:, None, None, None], crop[:, :, ::-1, :], crop)


def random_brightness(key: jax.Array, x01: jax.Array, max_delta: float) -> jax.Array:
    """Per-example brightness jitter of images in [0, 1]: scaled by U[max(0, 1 - d), 1 + d], clipped to [0, 1].

    torchvision's ``ColorJitter(brightness=d)``, computed in float32 without its rounding to uint8.

    Args:
      key: the PRNG key.
      x01: float images in [0, 1], one per row of the leading axis.
      max_delta: d (the MIND reference uses d = 63/255).
    """
    factor = jax.random.uniform(key, (x01.shape[0],) + (1,) * (x01.ndim - 1),
                                minval=max(0.0, 1.0 - max_delta), maxval=1.0 + max_delta)
    return jnp.clip(x01 * factor, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("crop_flip", "pad", "brightness"))
def augment(key: jax.Array, x_uint8: jax.Array, mean, std, crop_flip: bool, pad: int = 4,
            brightness: float = 0.0) -> jax.Array:
    """Training-time input pipeline: optional crop+flip, optional brightness jitter, then standardise to float32.

    Args:
      key: the PRNG key (crop and flip; brightness from ``fold_in(key, 1)``).
      x_uint8: uint8 images ``[N, H, W, C]``.
      mean: per-channel mean of the standardisation (``to_float``).
      std: per-channel standard deviation of it.
      crop_flip: random crop and horizontal flip (``random_crop_flip``; static).
      pad: the crop's zero padding (static).
      brightness: the brightness jitter's ``max_delta`` (0: none; static).
    """
    if crop_flip:
        x_uint8 = random_crop_flip(key, x_uint8, pad=pad)
    if brightness <= 0.0:
        return to_float(x_uint8, mean, std)
    x01 = random_brightness(jax.random.fold_in(key, 1), x_uint8.astype(jnp.float32) / 255.0, brightness)
    return _standardize(x01, mean, std)


def pad_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fixed-size batches ``(x, y, valid)`` over a split, the last one zero-padded (no recompiles).

    Args:
      x: the split's inputs ``[n, ...]``.
      y: its labels ``[n]``.
      batch_size: rows per batch; ``valid`` marks the real ones.
    """
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        pad = batch_size - len(yb)
        valid = np.arange(batch_size) < len(yb)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
        yield xb, yb, valid
