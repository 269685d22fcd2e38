"""Device batching and augmentation on real digits images."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modkd_jax.data import augment, epoch_batches, eval_batches, load, normalization, random_crop_flip, to_float
from modkd_jax.data.batching import num_batches


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _epoch_indices(ds, key, batch_size=100, **kwargs):
    """Run one epoch carrying row indices as an extra array; check rows match, return the index order."""
    rows = np.arange(len(ds.train_y))
    order = []
    for xb, yb, ib in epoch_batches(ds.train_x, ds.train_y, batch_size, key, extra=(rows,), **kwargs):
        assert isinstance(xb, jax.Array) and xb.dtype == jnp.uint8
        ib = np.asarray(ib)
        assert np.array_equal(np.asarray(xb), ds.train_x[ib]) and np.array_equal(np.asarray(yb), ds.train_y[ib])
        order.append(ib)
    return order


def test_epoch_covers_each_example_once(digits):
    order = _epoch_indices(digits, jax.random.key(0))
    assert [len(b) for b in order] == [100] * 14 + [37]
    assert np.array_equal(np.sort(np.concatenate(order)), np.arange(1437))


def test_epoch_order_follows_key(digits):
    a = np.concatenate(_epoch_indices(digits, jax.random.key(1)))
    b = np.concatenate(_epoch_indices(digits, jax.random.key(1)))
    c = np.concatenate(_epoch_indices(digits, jax.random.key(2)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.arange(1437))  # actually shuffled


def test_drop_remainder_and_num_batches(digits):
    order = _epoch_indices(digits, jax.random.key(0), drop_remainder=True)
    assert [len(b) for b in order] == [100] * 14 and len(np.unique(np.concatenate(order))) == 1400
    assert num_batches(1437, 100, False) == 15 and num_batches(1437, 100, True) == 14 and num_batches(0, 8, False) == 0
    with pytest.raises(ValueError):
        num_batches(10, 0, False)


def test_eval_batches_in_order_with_short_tail(digits):
    batches = list(eval_batches(digits.test_x, digits.test_y, 128))
    assert [len(b[0]) for b in batches] == [128, 128, 104]
    assert np.array_equal(np.concatenate([np.asarray(b[0]) for b in batches]), digits.test_x)
    assert np.array_equal(np.concatenate([np.asarray(b[1]) for b in batches]), digits.test_y)


def _is_crop_or_mirror(out, img, pad):
    """Whether `out` is some HxW window of the zero-padded `img`, or that window mirrored left-right."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    for dy, dx in itertools.product(range(2 * pad + 1), repeat=2):
        window = padded[dy : dy + h, dx : dx + w]
        if np.array_equal(out, window) or np.array_equal(out, window[:, ::-1]):
            return True
    return False


def test_random_crop_flip_outputs_crops_of_padded_input(digits):
    x = digits.train_x[:64]
    out = np.asarray(random_crop_flip(jax.random.key(3), x, pad=2))
    assert out.shape == x.shape and out.dtype == np.uint8
    assert all(_is_crop_or_mirror(o, i, 2) for o, i in zip(out, x))
    assert not np.array_equal(out, x)
    again = np.asarray(random_crop_flip(jax.random.key(3), x, pad=2))
    assert np.array_equal(out, again)


def test_random_crop_flip_identity_and_pure_flip(digits):
    x = digits.train_x[:64]
    assert np.array_equal(np.asarray(random_crop_flip(jax.random.key(0), x, pad=0, flip=False)), x)
    flipped = np.asarray(random_crop_flip(jax.random.key(0), x, pad=0))
    same = [np.array_equal(o, i) for o, i in zip(flipped, x)]
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(m and not s for s, m in zip(same, mirrored)) < 54  # about half are mirrored


def test_to_float_standardises(digits):
    mean, std = normalization("digits")
    x = digits.train_x[:16]
    out = np.asarray(jax.jit(to_float)(x, mean, std))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (x / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    rgb = np.asarray(to_float(np.full((1, 2, 2, 3), 255, np.uint8), np.array([0.5, 0.25, 0.0]), np.array([0.5, 0.25, 1.0])))
    np.testing.assert_allclose(rgb[0, 0, 0], [1.0, 3.0, 1.0], rtol=1e-6)


def test_augment_inside_a_jitted_step(digits):
    mean, std = normalization("digits")
    x = jnp.asarray(digits.train_x[:32])

    @jax.jit
    def step(key, batch):
        return augment(key, batch, mean, std, crop_flip=True, pad=1).mean(), augment(key, batch, mean, std, False)

    _, plain = step(jax.random.key(0), x)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(to_float(x, mean, std)), rtol=1e-5, atol=1e-6)
    lowered = jax.jit(random_crop_flip, static_argnames=("pad", "flip")).lower(jax.random.key(0), x, pad=4)
    assert "dynamic_slice" in lowered.as_text() or "gather" in lowered.as_text()
    assert augment(jax.random.key(1), x, mean, std, True).shape == (32, 8, 8, 1)


def test_brightness_jitter_scales_each_image_within_range_and_clips(digits):
    from modkd_jax.data.batching import random_brightness

    x01 = jnp.asarray(digits.train_x[:64], jnp.float32) / 255.0
    out = random_brightness(jax.random.key(0), x01, 63 / 255)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    inside = (x01 > 0) & (out < 1.0)  # not clipped: out = x * factor, one factor per image
    ratios = np.where(np.asarray(inside), np.asarray(out) / np.where(np.asarray(x01) > 0, np.asarray(x01), 1), np.nan)
    per_image = np.nanmax(ratios, axis=(1, 2, 3)), np.nanmin(ratios, axis=(1, 2, 3))
    np.testing.assert_allclose(per_image[0], per_image[1], rtol=1e-5)
    assert per_image[0].min() >= 1 - 63 / 255 - 1e-6 and per_image[0].max() <= 1 + 63 / 255 + 1e-6
    assert per_image[0].std() > 0.05  # factors differ between images
    mean, std = normalization("digits")
    plain = augment(jax.random.key(1), digits.train_x[:8], mean, std, True)
    same = augment(jax.random.key(1), digits.train_x[:8], mean, std, True, brightness=0.0)
    np.testing.assert_array_equal(plain, same)
    assert not np.array_equal(plain, augment(jax.random.key(1), digits.train_x[:8], mean, std, True, brightness=0.25))


@pytest.mark.parametrize("drop_last, batches, rows", [(True, 3, 96), (False, 4, 100)])
def test_run_phase_keeps_the_last_partial_batch_unless_asked(drop_last, batches, rows):
    """Every batch has the one compiled shape; drop_last=False pads the last one and marks its real rows."""
    from modkd_jax import training
    from modkd_jax.data.scenarios import Split

    split = Split(np.zeros((100, 2, 2, 1), np.uint8), np.zeros(100, np.int32), np.zeros(100, np.int32))
    params = {"w": jnp.zeros(3)}
    tx = training.make_optimizer("adam", 0.1)
    logged = []

    def step(carry, batch, key, ctx):
        real = jnp.float32(batch.y.shape[0]) if batch.valid is None else jnp.sum(batch.valid).astype(jnp.float32)
        return carry, {"loss": real, "acc": jnp.float32(batch.x.shape[0])}

    training.run_phase(step, (params, {}, tx.init(params)), split, None,
                       training.Phase(1, 32, 0.1, drop_last=drop_last), jax.random.key(0), log=logged.append)
    assert (batches * logged[0]["loss"], logged[0]["acc"]) == (rows, 32)  # batch means of real rows, shape 32
